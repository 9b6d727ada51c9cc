//! TLS of the public API: the gRPC and HTTP listeners present a certificate and ask
//! clients for none; clients trust a given CA or the system's roots.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::ServerConfig;
use tonic::transport::{Certificate, ClientTlsConfig};

use crate::{pem, provider, Identity, TlsAcceptor, TlsError};

/// ALPN of gRPC: HTTP/2 only.
pub(crate) const ALPN_GRPC: &[&[u8]] = &[b"h2"];
/// ALPN of the HTTP API: what axum serves.
const ALPN_HTTP: &[&[u8]] = &[b"http/1.1"];

/// The public API's certificate and key, as PEM file paths (`--tls-cert`, `--tls-key`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTlsFiles {
    /// Certificate chain, leaf first.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
}

impl ServerTlsFiles {
    /// Reads and checks both files.
    pub fn load(&self) -> Result<PublicTls, TlsError> {
        Ok(PublicTls {
            identity: Identity::load(&self.cert, &self.key)?,
        })
    }
}

/// The public API's TLS, loaded.
#[derive(Debug, Clone)]
pub struct PublicTls {
    identity: Identity,
}

impl PublicTls {
    /// From an identity already loaded.
    pub fn new(identity: Identity) -> Self {
        PublicTls { identity }
    }

    /// The acceptor of the gRPC listener (HTTP/2 by ALPN).
    pub fn grpc_acceptor(&self) -> Result<TlsAcceptor, TlsError> {
        self.acceptor(ALPN_GRPC)
    }

    /// The acceptor of the OpenAI-compatible HTTP listener (HTTP/1.1 by ALPN).
    pub fn http_acceptor(&self) -> Result<TlsAcceptor, TlsError> {
        self.acceptor(ALPN_HTTP)
    }

    fn acceptor(&self, alpn: &[&[u8]]) -> Result<TlsAcceptor, TlsError> {
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .and_then(|b| {
                b.with_no_client_auth()
                    .with_single_cert(self.identity.chain().to_vec(), self.identity.key())
            })
            .map_err(|e| TlsError::Certificate {
                origin: self.identity.origin().to_string(),
                reason: e.to_string(),
            })?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(TlsAcceptor::new(Arc::new(config), false))
    }
}

/// How a client of the public API trusts the server: only the CA in `ca_cert` (a PEM
/// file, for a private CA) or, without one, the system's root certificates.
pub fn client_tls(ca_cert: Option<&Path>) -> Result<ClientTlsConfig, TlsError> {
    let config = ClientTlsConfig::new();
    Ok(match ca_cert {
        None => config.with_native_roots(),
        Some(path) => {
            let bytes = pem::read(path)?;
            // Parsed here so that a wrong file is named now, not as a failed handshake.
            pem::certificates(&bytes, &path.display().to_string())?;
            config.ca_certificate(Certificate::from_pem(bytes))
        }
    })
}
