//! TLS for Tessera.
//!
//! Two trust domains, never mixed:
//! - **The public API** (gRPC and the OpenAI-compatible HTTP API) presents a server
//!   certificate ([`ServerTlsFiles`], `--tls-cert`/`--tls-key`) and asks clients for none;
//!   clients trust the CA they are given (`--ca-cert`) or the system's roots
//!   ([`client_tls`]).
//! - **The cluster**: the coordinator and every worker hold a certificate signed by the
//!   cluster CA ([`ClusterTlsFiles`], `--cluster-ca`/`--cluster-cert`/`--cluster-key`),
//!   present it as servers and as clients, and accept only peers whose certificate that
//!   CA signed ([`ClusterTls`]).
//!
//! [`TlsAcceptor::incoming`] turns a TCP listener into finished TLS connections for tonic
//! and axum; [`HandshakeFailure`] says why a handshake failed; [`DevCa`] makes the
//! development certificates of `tessera certs`.

mod cluster;
mod dev_certs;
mod error;
mod failure;
mod identity;
mod incoming;
mod pem;
mod public;
mod serve;

use std::sync::Arc;

pub use cluster::{ClusterTls, ClusterTlsFiles};
pub use dev_certs::{write_dev_certs, DevCa, DevCert, DevCertsSpec, WrittenCerts};
pub use error::TlsError;
pub use failure::HandshakeFailure;
pub use identity::Identity;
pub use incoming::{TlsAcceptor, TlsIncoming, HANDSHAKE_TIMEOUT};
pub use pem::{certificates, private_key};
pub use public::{client_tls, PublicTls, ServerTlsFiles};
pub use serve::serve_grpc;

/// The name every cluster node's certificate carries (a DNS subject alternative name), and
/// the name a node checks when it dials another, whatever address it dials.
///
/// Workers are dialled at addresses learnt at run time — the address a registration came
/// from, or `--advertise-host` — which change whenever a worker moves to another machine
/// or container. Tying certificates to those addresses would mean a certificate per
/// address and a re-issue per move. What makes a peer a member is that the cluster CA
/// signed its certificate; the fixed name adds that the certificate was issued as a
/// cluster node's, so a certificate the same CA issued for something else (the public
/// API's, without this name) cannot stand in for a node.
pub const CLUSTER_SERVER_NAME: &str = "tessera-node";

/// The one crypto provider Tessera's TLS uses.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}
