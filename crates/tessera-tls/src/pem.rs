//! Certificates and private keys from PEM files (or PEM text), with errors that name where
//! they came from.

use std::path::Path;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::TlsError;

/// The bytes of a file, the error naming it.
pub(crate) fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Every certificate in `pem`, in order (a chain: the leaf first). `origin` names the
/// source in errors. At least one is required.
pub fn certificates(pem: &[u8], origin: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            origin: origin.to_string(),
            reason: format!("not a PEM certificate file ({e})"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            origin: origin.to_string(),
            reason: "holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into(),
        });
    }
    Ok(certs)
}

/// The private key in `pem` (PKCS#8, PKCS#1 or SEC1). `origin` names the source in errors.
pub fn private_key(pem: &[u8], origin: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| TlsError::Pem {
        origin: origin.to_string(),
        reason: format!("holds no PEM private key ({e})"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_or_foreign_pem_is_refused_by_name() {
        let e = certificates(b"", "ca.pem").unwrap_err().to_string();
        assert!(e.starts_with("ca.pem: holds no PEM certificate"), "{e}");
        let e = private_key(
            b"-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n",
            "k.pem",
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("k.pem: holds no PEM private key"), "{e}");
    }
}
