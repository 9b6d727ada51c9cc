//! What can go wrong setting up TLS, naming the file or the certificate at fault.

use std::path::PathBuf;

/// Errors of loading certificates and keys, building TLS configs and writing a
/// development CA. None of them is a failed handshake: those are
/// [`HandshakeFailure`](crate::HandshakeFailure)s, found in a connection's error.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or written.
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A PEM file without what it should hold, or holding something unreadable.
    #[error("{origin}: {reason}")]
    Pem { origin: String, reason: String },
    /// A certificate that cannot serve where it is given: not signed by the cluster CA,
    /// expired, without the cluster's name, or not matching its key.
    #[error("{origin}: {reason}")]
    Certificate { origin: String, reason: String },
    /// A file `tessera certs` would overwrite.
    #[error("{} exists; remove it, or write elsewhere", .0.display())]
    Exists(PathBuf),
    /// Making a certificate failed.
    #[error("making a certificate: {0}")]
    Generate(#[from] rcgen::Error),
}
