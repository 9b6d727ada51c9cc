//! Serving a tonic router on a listener, over TLS or not.

use std::future::Future;

use tokio::net::TcpListener;
use tonic::transport::server::{Router, TcpIncoming};

use crate::TlsAcceptor;

/// Serves `router` on `listener` until `signal` resolves: over TLS when `tls` is given
/// (`what` names the listener in the log of refused handshakes), in plaintext otherwise.
/// Connections have TCP_NODELAY either way.
pub async fn serve_grpc(
    router: Router,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    what: &'static str,
    signal: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    match tls {
        None => {
            let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
            router.serve_with_incoming_shutdown(incoming, signal).await
        }
        Some(tls) => {
            router
                .serve_with_incoming_shutdown(tls.incoming(listener, what), signal)
                .await
        }
    }
}
