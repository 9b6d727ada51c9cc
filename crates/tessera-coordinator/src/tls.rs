//! The coordinator's TLS, loaded and checked once at start, before any listener opens: the
//! public API's certificate, and the cluster's mutual TLS with the workers.

use tessera_tls::{ClusterTls, PublicTls, TlsAcceptor};
use tonic::transport::ClientTlsConfig;

use crate::config::CoordinatorConfig;
use crate::error::StartError;

/// What the coordinator's listeners and its clients of the workers need.
#[derive(Debug, Clone, Default)]
pub struct CoordinatorTls {
    /// The certificate of the public gRPC and HTTP APIs.
    pub public: Option<PublicTls>,
    /// This coordinator's certificate as a cluster node, and the cluster CA.
    pub cluster: Option<ClusterTls>,
}

impl CoordinatorTls {
    /// Reads every file the config names; errors name the file.
    pub fn load(config: &CoordinatorConfig) -> Result<Self, StartError> {
        Ok(CoordinatorTls {
            public: config.tls.as_ref().map(|f| f.load()).transpose()?,
            cluster: config.cluster_tls.as_ref().map(|f| f.load()).transpose()?,
        })
    }

    /// The public gRPC listener's acceptor; `None`: plaintext.
    pub fn grpc(&self) -> Result<Option<TlsAcceptor>, StartError> {
        Ok(self
            .public
            .as_ref()
            .map(|t| t.grpc_acceptor())
            .transpose()?)
    }

    /// The HTTP listener's acceptor; `None`: plaintext.
    pub fn http(&self) -> Result<Option<TlsAcceptor>, StartError> {
        Ok(self
            .public
            .as_ref()
            .map(|t| t.http_acceptor())
            .transpose()?)
    }

    /// The registration listener's acceptor, which requires a member's certificate;
    /// `None`: plaintext.
    pub fn registration(&self) -> Result<Option<TlsAcceptor>, StartError> {
        Ok(self.cluster.as_ref().map(|t| t.acceptor()).transpose()?)
    }

    /// How the coordinator dials its workers' `Worker` services; `None`: plaintext.
    pub fn workers(&self) -> Option<ClientTlsConfig> {
        self.cluster.as_ref().map(|t| t.client_tls())
    }
}
