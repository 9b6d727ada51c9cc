//! Worker registration on a listener of its own, when
//! [`CoordinatorConfig::registration_listen`](crate::config::CoordinatorConfig::registration_listen)
//! asks for one: the `Cluster` service alone, behind mutual TLS when the cluster has a CA.

use std::net::SocketAddr;

use tessera_proto::worker::v1::cluster_server::ClusterServer;
use tessera_tls::TlsAcceptor;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::Server;
use tracing::{info, warn};

use crate::error::StartError;
use crate::membership::Membership;

/// The registration listener, serving until the coordinator stops.
pub struct RegistrationListener {
    /// Its bound address.
    pub addr: SocketAddr,
    /// The server's task.
    pub task: JoinHandle<()>,
}

impl RegistrationListener {
    /// Binds `at` and serves `membership` there until `stop` turns true.
    pub async fn open(
        at: &str,
        membership: Membership,
        tls: Option<TlsAcceptor>,
        mut stop: watch::Receiver<bool>,
    ) -> Result<RegistrationListener, StartError> {
        let listen_error = |source| StartError::Listen {
            addr: at.to_string(),
            source,
        };
        let listener = tokio::net::TcpListener::bind(at)
            .await
            .map_err(listen_error)?;
        let addr = listener.local_addr().map_err(listen_error)?;
        let mutual = tls.is_some();
        let router = Server::builder()
            .tcp_nodelay(true)
            .add_service(ClusterServer::new(membership));
        let stopped = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        let task = tokio::spawn(async move {
            let served =
                tessera_tls::serve_grpc(router, listener, tls, "worker registration", stopped);
            if let Err(e) = served.await {
                warn!("worker registration server: {e}");
            }
        });
        if mutual {
            info!(%addr, "worker registration listening (mutual TLS: the cluster CA's certificates only)");
        } else {
            info!(%addr, "worker registration listening");
        }
        Ok(RegistrationListener { addr, task })
    }
}
