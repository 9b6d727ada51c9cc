//! A failed TLS handshake in words a person can act on: who refused what, and why.
//!
//! rustls reports a refusal as `invalid peer certificate: UnknownIssuer` on the side that
//! refused and `received fatal alert: UnknownCA` on the other; by the time it reaches a
//! caller it is buried in transport errors. [`HandshakeFailure::find`] digs it out.

use std::error::Error;
use std::fmt;

use rustls::{AlertDescription, CertificateError};

/// What went wrong in a TLS handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// This side refused the peer's certificate; why, in words.
    PeerCertificate(String),
    /// The peer, a client, presented no certificate where one is required.
    NoPeerCertificate,
    /// The peer requires a certificate from this side, and none was presented.
    CertificateRequired,
    /// The peer refused this node's certificate; the alert it sent.
    CertificateRefused(String),
    /// The peer does not speak TLS (a plaintext client or server).
    NotTls(String),
    /// Another TLS error, as rustls words it.
    Other(String),
}

impl HandshakeFailure {
    /// The TLS failure in `error`'s chain of sources, if there is one.
    pub fn find(error: &(dyn Error + 'static)) -> Option<HandshakeFailure> {
        let mut next = Some(error);
        while let Some(e) = next {
            if let Some(r) = rustls_error(e) {
                return Some(HandshakeFailure::from_rustls(r));
            }
            next = e.source();
        }
        None
    }

    fn from_rustls(e: &rustls::Error) -> HandshakeFailure {
        use rustls::Error as E;
        match e {
            E::InvalidCertificate(_) => HandshakeFailure::PeerCertificate(describe_rustls(e)),
            E::NoCertificatesPresented => HandshakeFailure::NoPeerCertificate,
            E::AlertReceived(AlertDescription::CertificateRequired) => {
                HandshakeFailure::CertificateRequired
            }
            E::AlertReceived(
                a @ (AlertDescription::BadCertificate
                | AlertDescription::UnsupportedCertificate
                | AlertDescription::CertificateRevoked
                | AlertDescription::CertificateExpired
                | AlertDescription::CertificateUnknown
                | AlertDescription::UnknownCA
                | AlertDescription::AccessDenied
                | AlertDescription::DecryptError),
            ) => HandshakeFailure::CertificateRefused(format!("alert {a:?}")),
            E::InvalidMessage(_) | E::InappropriateMessage { .. } => {
                HandshakeFailure::NotTls(e.to_string())
            }
            other => HandshakeFailure::Other(other.to_string()),
        }
    }

    /// The failure as a phrase about `peer` ("the coordinator", "the worker at …").
    pub fn describe(&self, peer: &str) -> String {
        match self {
            HandshakeFailure::PeerCertificate(why) => {
                format!("{peer}'s certificate was refused: {why}")
            }
            HandshakeFailure::NoPeerCertificate => format!("{peer} presented no certificate"),
            HandshakeFailure::CertificateRequired => {
                format!("{peer} requires a client certificate, and none was presented")
            }
            HandshakeFailure::CertificateRefused(alert) => {
                format!("{peer} refused this node's certificate ({alert})")
            }
            HandshakeFailure::NotTls(why) => format!("{peer} does not speak TLS ({why})"),
            HandshakeFailure::Other(why) => format!("TLS with {peer} failed: {why}"),
        }
    }
}

impl fmt::Display for HandshakeFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe("the peer"))
    }
}

/// A rustls error that is `e` itself or that `e`, an I/O error, wraps. (An I/O error's
/// `source()` skips the error it wraps, so the chain alone would never show it.)
fn rustls_error<'a>(e: &'a (dyn Error + 'static)) -> Option<&'a rustls::Error> {
    if let Some(r) = e.downcast_ref::<rustls::Error>() {
        return Some(r);
    }
    e.downcast_ref::<std::io::Error>()
        .and_then(|io| io.get_ref())
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
}

/// A rustls error with what it means for a certificate, when it is about one:
/// `not signed by a trusted CA (invalid peer certificate: UnknownIssuer)`.
pub(crate) fn describe_rustls(e: &rustls::Error) -> String {
    use CertificateError as C;
    let gloss = match e {
        rustls::Error::InvalidCertificate(c) => match c {
            C::UnknownIssuer => "not signed by a trusted CA",
            C::NotValidForName | C::NotValidForNameContext { .. } => {
                "not issued for the name it was expected to carry"
            }
            C::Expired | C::ExpiredContext { .. } => "expired",
            C::NotValidYet | C::NotValidYetContext { .. } => "not valid yet",
            C::InvalidPurpose | C::InvalidPurposeContext { .. } => {
                "not issued for this use (extended key usage)"
            }
            C::BadSignature => {
                "its signature does not verify: another CA of the trusted one's name, or a \
                 damaged certificate"
            }
            C::Revoked => "revoked",
            _ => "",
        },
        _ => "",
    };
    if gloss.is_empty() {
        e.to_string()
    } else {
        format!("{gloss} ({e})")
    }
}
