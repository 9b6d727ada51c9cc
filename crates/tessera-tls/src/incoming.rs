//! A TLS listener: TCP connections in, connections with a finished handshake out, for
//! tonic (a `Stream`) and for axum (a `Listener`) alike.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_rustls::server::TlsStream;
use tokio_stream::Stream;
use tracing::{debug, warn};

use crate::HandshakeFailure;

/// How long a client may take over its handshake before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections past their handshake that the server has not taken yet, at most.
const READY_BACKLOG: usize = 128;
/// The pause after a failed `accept` (e.g. out of file descriptors) before the next.
const ACCEPT_RETRY: Duration = Duration::from_millis(50);

/// Server-side TLS of one listener: its certificate, and whether it requires clients to
/// present one.
#[derive(Clone)]
pub struct TlsAcceptor {
    config: Arc<ServerConfig>,
    mutual: bool,
}

impl TlsAcceptor {
    pub(crate) fn new(config: Arc<ServerConfig>, mutual: bool) -> Self {
        TlsAcceptor { config, mutual }
    }

    /// Whether clients must present a certificate (the cluster's listeners).
    pub fn is_mutual(&self) -> bool {
        self.mutual
    }

    /// Takes over `listener`: accepts connections, runs each handshake on a task of its
    /// own (so a slow or hostile client holds up nobody) for up to
    /// [`HANDSHAKE_TIMEOUT`], and yields the connections whose handshake finished. A
    /// refused handshake is logged with the peer's address and the reason, naming the
    /// listener as `what`: at WARN on a mutual-TLS listener, where it means a node that
    /// cannot prove it belongs to the cluster, at DEBUG on the public ones.
    pub fn incoming(&self, listener: TcpListener, what: &'static str) -> TlsIncoming {
        let local_addr = listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let (ready_tx, ready) = mpsc::channel(READY_BACKLOG);
        let acceptor = tokio_rustls::TlsAcceptor::from(self.config.clone());
        let accepting = tokio::spawn(accept_loop(listener, acceptor, ready_tx, what, self.mutual));
        TlsIncoming {
            local_addr,
            ready,
            accepting,
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    ready: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
    what: &'static str,
    mutual: bool,
) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                debug!("{what}: accept failed: {e}");
                tokio::time::sleep(ACCEPT_RETRY).await;
                continue;
            }
        };
        // Without TCP_NODELAY every streamed token after the first waits for the peer's
        // delayed ACK.
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let ready = ready.clone();
        tokio::spawn(async move {
            let why = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => {
                    let _ = ready.send((stream, peer)).await;
                    return;
                }
                Ok(Err(e)) => match HandshakeFailure::find(&e) {
                    Some(failure) => failure.describe("the client"),
                    None => e.to_string(),
                },
                Err(_) => format!(
                    "the handshake did not finish within {} s",
                    HANDSHAKE_TIMEOUT.as_secs()
                ),
            };
            if mutual {
                warn!("{what}: refused a TLS connection from {peer}: {why}");
            } else {
                debug!("{what}: refused a TLS connection from {peer}: {why}");
            }
        });
    }
}

/// The connections of a TLS listener whose handshake finished. Dropping it closes the
/// listener.
pub struct TlsIncoming {
    local_addr: SocketAddr,
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    accepting: JoinHandle<()>,
}

impl Drop for TlsIncoming {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

/// What tonic's `serve_with_incoming` takes. tonic reads each connection's peer address
/// and certificates from the stream (`Request::remote_addr`, `Request::peer_certs`).
impl Stream for TlsIncoming {
    type Item = Result<TlsStream<TcpStream>, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.ready
            .poll_recv(cx)
            .map(|next| next.map(|(stream, _)| Ok(stream)))
    }
}

/// What `axum::serve` takes.
impl axum::serve::Listener for TlsIncoming {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(connection) => connection,
            // The accept loop never ends on its own; a listener without it has nothing
            // more to give.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local_addr)
    }
}
