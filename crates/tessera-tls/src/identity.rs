//! A certificate chain and its private key: what a node presents in a handshake.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;

use crate::{pem, provider, TlsError};

/// A certificate chain (leaf first) with its private key, kept both parsed (for rustls)
/// and as PEM (for tonic's client configs).
#[derive(Clone)]
pub struct Identity {
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    origin: String,
}

impl std::fmt::Debug for Identity {
    /// Names the certificate and leaves the key out.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("origin", &self.origin)
            .field("chain_len", &self.chain.len())
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Reads a certificate chain and its key from PEM files.
    pub fn load(cert: &Path, key: &Path) -> Result<Identity, TlsError> {
        Identity::from_pem(
            &pem::read(cert)?,
            &pem::read(key)?,
            &cert.display().to_string(),
            &key.display().to_string(),
        )
    }

    /// Parses PEM text; `cert_origin` and `key_origin` name the sources in errors. The key
    /// must be the certificate's.
    pub fn from_pem(
        cert_pem: &[u8],
        key_pem: &[u8],
        cert_origin: &str,
        key_origin: &str,
    ) -> Result<Identity, TlsError> {
        let identity = Identity {
            chain: pem::certificates(cert_pem, cert_origin)?,
            key: Arc::new(pem::private_key(key_pem, key_origin)?),
            cert_pem: cert_pem.to_vec(),
            key_pem: key_pem.to_vec(),
            origin: cert_origin.to_string(),
        };
        // rustls checks that the key belongs to the certificate when it builds a config.
        ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .and_then(|b| {
                b.with_no_client_auth()
                    .with_single_cert(identity.chain.clone(), identity.key.clone_key())
            })
            .map_err(|e| TlsError::Certificate {
                origin: format!("{cert_origin} with {key_origin}"),
                reason: e.to_string(),
            })?;
        Ok(identity)
    }

    /// The chain, leaf first.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// A copy of the private key.
    pub fn key(&self) -> PrivateKeyDer<'static> {
        self.key.clone_key()
    }

    /// Where the certificate came from, for messages.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// tonic's form of it, for a client that presents it.
    pub fn to_tonic(&self) -> tonic::transport::Identity {
        tonic::transport::Identity::from_pem(&self.cert_pem, &self.key_pem)
    }
}
