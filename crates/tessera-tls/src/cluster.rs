//! Mutual TLS inside the cluster: between the coordinator and its workers, both ways.
//!
//! Every node (the coordinator and each worker) holds a certificate signed by the cluster
//! CA. It presents it as a server on its own listener and as a client when it dials
//! another node, and it accepts a peer only if the peer's certificate chains to that CA.
//! The CA is the whole membership test, so it should sign cluster nodes and nothing else.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::{ServerName, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::{client::WebPkiServerVerifier, RootCertStore, ServerConfig};
use tonic::transport::{Certificate, ClientTlsConfig};

use crate::failure::describe_rustls;
use crate::public::ALPN_GRPC;
use crate::{pem, provider, Identity, TlsAcceptor, TlsError, CLUSTER_SERVER_NAME};

/// The cluster's mutual TLS as PEM file paths (`--cluster-ca`, `--cluster-cert`,
/// `--cluster-key`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterTlsFiles {
    /// The cluster CA's certificate: the only root a node trusts for its peers.
    pub ca: PathBuf,
    /// This node's certificate, signed by the cluster CA.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
}

impl ClusterTlsFiles {
    /// Reads the three files and checks that the certificate is one the cluster's peers
    /// will accept: signed by the CA, valid now, for [`CLUSTER_SERVER_NAME`], for both
    /// server and client use. A mix-up of files is reported here, by file name, rather
    /// than as a refused handshake on some other machine.
    pub fn load(&self) -> Result<ClusterTls, TlsError> {
        ClusterTls::new(
            &pem::read(&self.ca)?,
            &self.ca.display().to_string(),
            Identity::load(&self.cert, &self.key)?,
        )
    }
}

/// The cluster's mutual TLS, loaded and checked.
#[derive(Clone)]
pub struct ClusterTls {
    roots: Arc<RootCertStore>,
    ca_pem: Vec<u8>,
    identity: Identity,
}

impl std::fmt::Debug for ClusterTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterTls")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl ClusterTls {
    /// The cluster CA in `ca_pem` (named `ca_origin` in errors) and this node's identity,
    /// checked as [`ClusterTlsFiles::load`] says.
    pub fn new(ca_pem: &[u8], ca_origin: &str, identity: Identity) -> Result<ClusterTls, TlsError> {
        let mut roots = RootCertStore::empty();
        for cert in pem::certificates(ca_pem, ca_origin)? {
            roots.add(cert).map_err(|e| TlsError::Certificate {
                origin: ca_origin.to_string(),
                reason: format!("not a usable CA certificate: {e}"),
            })?;
        }
        let tls = ClusterTls {
            roots: Arc::new(roots),
            ca_pem: ca_pem.to_vec(),
            identity,
        };
        tls.check_own_certificate(ca_origin)?;
        Ok(tls)
    }

    fn check_own_certificate(&self, ca_origin: &str) -> Result<(), TlsError> {
        let (leaf, intermediates) = self
            .identity
            .chain()
            .split_first()
            .expect("an identity has a certificate");
        let now = UnixTime::now();
        let refused = |e: rustls::Error| TlsError::Certificate {
            origin: self.identity.origin().to_string(),
            reason: format!(
                "not a cluster node's certificate under the CA {ca_origin}: {}",
                describe_rustls(&e)
            ),
        };
        let name = ServerName::try_from(CLUSTER_SERVER_NAME).expect("a valid DNS name");
        self.server_verifier()
            .verify_server_cert(leaf, intermediates, &name, &[], now)
            .map_err(refused)?;
        self.client_verifier()
            .verify_client_cert(leaf, intermediates, now)
            .map_err(refused)?;
        Ok(())
    }

    fn server_verifier(&self) -> Arc<WebPkiServerVerifier> {
        WebPkiServerVerifier::builder_with_provider(self.roots.clone(), provider())
            .build()
            .expect("a non-empty root store")
    }

    fn client_verifier(&self) -> Arc<dyn ClientCertVerifier> {
        WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider())
            .build()
            .expect("a non-empty root store")
    }

    /// This node's identity.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The acceptor of a listener only cluster nodes may use: it presents this node's
    /// certificate and finishes a handshake only with a client whose certificate the
    /// cluster CA signed. A client without one, or with another CA's, never gets as far
    /// as HTTP/2, so no RPC of the service behind it is reachable.
    pub fn acceptor(&self) -> Result<TlsAcceptor, TlsError> {
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .and_then(|b| {
                b.with_client_cert_verifier(self.client_verifier())
                    .with_single_cert(self.identity.chain().to_vec(), self.identity.key())
            })
            .map_err(|e| TlsError::Certificate {
                origin: self.identity.origin().to_string(),
                reason: e.to_string(),
            })?;
        config.alpn_protocols = ALPN_GRPC.iter().map(|p| p.to_vec()).collect();
        Ok(TlsAcceptor::new(Arc::new(config), true))
    }

    /// How this node dials another: it trusts only the cluster CA, expects the peer's
    /// certificate to carry [`CLUSTER_SERVER_NAME`] whatever address it was dialled at,
    /// and presents its own certificate. The URI dialled must be `https://`.
    pub fn client_tls(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .identity(self.identity.to_tonic())
            .domain_name(CLUSTER_SERVER_NAME)
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use rustls::pki_types::ServerName;
    use rustls::{ClientConfig, RootCertStore};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio_stream::StreamExt;

    use super::*;
    use crate::{DevCa, DevCert, HandshakeFailure};

    fn node_tls(ca: &DevCa, cert: &DevCert) -> Result<ClusterTls, TlsError> {
        let identity = Identity::from_pem(
            cert.cert_pem.as_bytes(),
            cert.key_pem.as_bytes(),
            "n.pem",
            "k",
        )?;
        ClusterTls::new(ca.cert_pem().as_bytes(), "ca.pem", identity)
    }

    /// A rustls client that trusts `trusted` and presents `cert`, if any.
    fn client(trusted: &DevCa, cert: Option<&DevCert>) -> tokio_rustls::TlsConnector {
        let mut roots = RootCertStore::empty();
        roots
            .add(pem::certificates(trusted.cert_pem().as_bytes(), "ca").unwrap()[0].clone())
            .unwrap();
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let mut config = match cert {
            None => builder.with_no_client_auth(),
            Some(c) => builder
                .with_client_auth_cert(
                    pem::certificates(c.cert_pem.as_bytes(), "c").unwrap(),
                    pem::private_key(c.key_pem.as_bytes(), "k").unwrap(),
                )
                .unwrap(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }

    /// Handshakes with the server at `addr` as `connector` and reads: the read is where a
    /// TLS 1.3 client learns that the server refused its certificate.
    async fn exchange(
        connector: &tokio_rustls::TlsConnector,
        addr: SocketAddr,
    ) -> Result<(), HandshakeFailure> {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from(CLUSTER_SERVER_NAME).unwrap();
        let failure = |e: std::io::Error| HandshakeFailure::find(&e).expect("a TLS failure");
        let mut tls = connector.connect(name, tcp).await.map_err(failure)?;
        tls.write_all(b"ping").await.map_err(failure)?;
        let mut got = [0u8; 4];
        tls.read_exact(&mut got).await.map_err(failure)?;
        assert_eq!(&got, b"pong");
        Ok(())
    }

    #[test]
    fn a_certificate_the_cluster_would_refuse_is_refused_at_load() {
        let ca = DevCa::new("cluster", 1).unwrap();
        let other = DevCa::new("another cluster", 1).unwrap();
        node_tls(&ca, &ca.node("w0", &[]).unwrap()).unwrap();

        let foreign = node_tls(&ca, &other.node("w0", &[]).unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            foreign.starts_with("n.pem: not a cluster node's certificate under the CA ca.pem")
                && foreign.contains("not signed by a trusted CA"),
            "{foreign}"
        );
        // The public API's certificate from the same CA lacks the cluster's name.
        let public = node_tls(&ca, &ca.server(&[], &[]).unwrap())
            .unwrap_err()
            .to_string();
        assert!(public.contains("not issued for the name"), "{public}");

        let a = ca.node("a", &[]).unwrap();
        let b = ca.node("b", &[]).unwrap();
        let mixed = Identity::from_pem(
            a.cert_pem.as_bytes(),
            b.key_pem.as_bytes(),
            "a.pem",
            "b-key.pem",
        )
        .unwrap_err()
        .to_string();
        assert!(mixed.starts_with("a.pem with b-key.pem:"), "{mixed}");
    }

    #[tokio::test]
    async fn the_cluster_listener_takes_only_certificates_its_ca_signed() {
        let ca = DevCa::new("cluster", 1).unwrap();
        let other = DevCa::new("another cluster", 1).unwrap();
        let server = node_tls(&ca, &ca.node("coordinator", &[]).unwrap()).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut incoming = server
            .acceptor()
            .unwrap()
            .incoming(listener, "test listener");
        let member = ca.node("w0", &[]).unwrap();
        let serving = tokio::spawn(async move {
            // Only connections past the handshake come out, each answered once.
            let mut peers = Vec::new();
            while let Some(Ok(mut tls)) = incoming.next().await {
                let certs = tls.get_ref().1.peer_certificates().map(|c| c.len());
                peers.push(certs);
                let mut got = [0u8; 4];
                tls.read_exact(&mut got).await.unwrap();
                tls.write_all(b"pong").await.unwrap();
                if peers.len() == 2 {
                    return peers;
                }
            }
            peers
        });

        // Another CA's certificate, a missing one, and a server the client cannot trust.
        let foreign = exchange(&client(&ca, Some(&other.node("w1", &[]).unwrap())), addr).await;
        assert!(
            matches!(&foreign, Err(HandshakeFailure::CertificateRefused(a)) if a.contains("UnknownCA")),
            "{foreign:?}"
        );
        let anonymous = exchange(&client(&ca, None), addr).await;
        assert_eq!(anonymous, Err(HandshakeFailure::CertificateRequired));
        let distrusting = exchange(&client(&other, Some(&member)), addr).await;
        assert!(
            matches!(&distrusting, Err(HandshakeFailure::PeerCertificate(why)) if why.contains("not signed by a trusted CA")),
            "{distrusting:?}"
        );
        // A plaintext client gets nothing.
        let mut plain = TcpStream::connect(addr).await.unwrap();
        plain
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        let mut buf = Vec::new();
        let _ = plain.read_to_end(&mut buf).await;
        assert!(!buf.windows(4).any(|w| w == b"pong"));

        // Members get through, and the server sees their certificate.
        exchange(&client(&ca, Some(&member)), addr).await.unwrap();
        exchange(&client(&ca, Some(&member)), addr).await.unwrap();
        assert_eq!(serving.await.unwrap(), vec![Some(1), Some(1)]);
    }

    #[test]
    fn failures_read_as_who_refused_what() {
        let refused = HandshakeFailure::CertificateRefused("alert UnknownCA".into());
        assert_eq!(
            refused.describe("the coordinator at 10.0.0.1:50052"),
            "the coordinator at 10.0.0.1:50052 refused this node's certificate (alert UnknownCA)"
        );
        let e = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, e);
        let found = HandshakeFailure::find(&io).unwrap();
        assert_eq!(
            found.describe("the worker"),
            "the worker's certificate was refused: not signed by a trusted CA \
             (invalid peer certificate: UnknownIssuer)"
        );
        assert_eq!(HandshakeFailure::find(&std::io::Error::other("no")), None);
    }
}
