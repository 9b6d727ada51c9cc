//! A development CA and the certificates `tessera certs` writes: one per cluster node and
//! one for the public API, all signed by the CA.
//!
//! Good for trying TLS out and for tests. A production cluster's CA key belongs somewhere
//! safer than a directory next to the certificates.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

use crate::{TlsError, CLUSTER_SERVER_NAME};

/// A certificate authority made on the spot, which signs the certificates below.
pub struct DevCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
    days: u32,
}

/// A certificate and its private key, PEM.
#[derive(Debug, Clone)]
pub struct DevCert {
    /// The certificate.
    pub cert_pem: String,
    /// Its private key.
    pub key_pem: String,
}

impl DevCa {
    /// A new CA named `name` and a few hex digits of its public key, valid for `days` from
    /// now (as are the certificates it signs).
    ///
    /// The digits keep two development CAs apart: a verifier looks a certificate's issuer
    /// up by name, and under a shared name the certificate of one CA would be checked
    /// against the other's key, which reads as a bad signature rather than an unknown CA.
    pub fn new(name: &str, days: u32) -> Result<DevCa, TlsError> {
        let key = KeyPair::generate()?;
        let id: String = key
            .public_key_raw()
            .iter()
            .skip(1)
            .take(4)
            .map(|b| format!("{b:02x}"))
            .collect();
        let mut params = base_params(&format!("{name} {id}"), days);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        Ok(DevCa {
            issuer: CertifiedIssuer::self_signed(params, key)?,
            days,
        })
    }

    /// The CA's certificate, PEM: what every node and client trusts.
    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// The CA's private key, PEM: what signs more certificates.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// A cluster node's certificate, for server and client use alike. Its names are
    /// [`CLUSTER_SERVER_NAME`] (what peers check), `name` and `ips` (for people and tools
    /// that look at it).
    pub fn node(&self, name: &str, ips: &[IpAddr]) -> Result<DevCert, TlsError> {
        let mut names = vec![dns(CLUSTER_SERVER_NAME)?];
        if name != CLUSTER_SERVER_NAME {
            names.push(dns(name)?);
        }
        names.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        self.sign(
            name,
            names,
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        )
    }

    /// The public API's certificate: server use only, for `localhost`, 127.0.0.1 and ::1
    /// and for every name in `hosts` and address in `ips`.
    pub fn server(&self, hosts: &[String], ips: &[IpAddr]) -> Result<DevCert, TlsError> {
        let mut names = vec![dns("localhost")?];
        for h in hosts {
            names.push(dns(h)?);
        }
        let loopback = [Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into()];
        for ip in loopback.iter().chain(ips) {
            if !names.contains(&SanType::IpAddress(*ip)) {
                names.push(SanType::IpAddress(*ip));
            }
        }
        self.sign(
            "tessera public API",
            names,
            vec![ExtendedKeyUsagePurpose::ServerAuth],
        )
    }

    fn sign(
        &self,
        common_name: &str,
        names: Vec<SanType>,
        usages: Vec<ExtendedKeyUsagePurpose>,
    ) -> Result<DevCert, TlsError> {
        let mut params = base_params(common_name, self.days);
        params.subject_alt_names = names;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = usages;
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(DevCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

fn base_params(common_name: &str, days: u32) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    let now = OffsetDateTime::now_utc();
    // An hour back, for clocks a little behind this one.
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(days.into());
    params
}

fn dns(name: &str) -> Result<SanType, TlsError> {
    Ok(SanType::DnsName(name.try_into()?))
}

/// What `tessera certs` makes.
#[derive(Debug, Clone)]
pub struct DevCertsSpec {
    /// The cluster nodes to make a certificate for, one file pair each (`NAME.pem`,
    /// `NAME-key.pem`).
    pub nodes: Vec<String>,
    /// Addresses to add to every certificate, for tools that check them.
    pub ips: Vec<IpAddr>,
    /// Host names the public API is reached by, besides `localhost`.
    pub hosts: Vec<String>,
    /// Days the certificates are valid.
    pub days: u32,
    /// Overwrite files that exist.
    pub force: bool,
}

/// The files `tessera certs` wrote.
#[derive(Debug, Clone)]
pub struct WrittenCerts {
    /// The CA's certificate and key.
    pub ca: (PathBuf, PathBuf),
    /// The public API's certificate and key.
    pub server: (PathBuf, PathBuf),
    /// Each node's name, certificate and key.
    pub nodes: Vec<(String, PathBuf, PathBuf)>,
}

/// Makes a CA and the certificates `spec` asks for, and writes them under `dir` (made if
/// missing): `ca.pem`, `ca-key.pem`, `server.pem`, `server-key.pem`, and `NAME.pem`,
/// `NAME-key.pem` per node. Keys are readable by their owner only. Nothing is written
/// when a file exists, unless `spec.force`.
pub fn write_dev_certs(dir: &Path, spec: &DevCertsSpec) -> Result<WrittenCerts, TlsError> {
    for name in &spec.nodes {
        check_node_name(name)?;
    }
    let pair = |stem: &str| {
        (
            dir.join(format!("{stem}.pem")),
            dir.join(format!("{stem}-key.pem")),
        )
    };
    let written = WrittenCerts {
        ca: pair("ca"),
        server: pair("server"),
        nodes: spec
            .nodes
            .iter()
            .map(|n| {
                let (c, k) = pair(n);
                (n.clone(), c, k)
            })
            .collect(),
    };
    let mut files = vec![&written.ca, &written.server];
    let node_files: Vec<(PathBuf, PathBuf)> = written
        .nodes
        .iter()
        .map(|(_, c, k)| (c.clone(), k.clone()))
        .collect();
    files.extend(node_files.iter());
    if !spec.force {
        for (c, k) in &files {
            for path in [c, k] {
                if path.exists() {
                    return Err(TlsError::Exists(path.clone()));
                }
            }
        }
    }
    std::fs::create_dir_all(dir).map_err(|source| TlsError::Io {
        path: dir.to_path_buf(),
        source,
    })?;

    let ca = DevCa::new("Tessera development CA", spec.days)?;
    write(&written.ca.0, &ca.cert_pem(), false)?;
    write(&written.ca.1, &ca.key_pem(), true)?;
    let server = ca.server(&spec.hosts, &spec.ips)?;
    write(&written.server.0, &server.cert_pem, false)?;
    write(&written.server.1, &server.key_pem, true)?;
    for (name, cert, key) in &written.nodes {
        let node = ca.node(name, &spec.ips)?;
        write(cert, &node.cert_pem, false)?;
        write(key, &node.key_pem, true)?;
    }
    Ok(written)
}

/// A node name is a DNS label or name (it goes into the certificate) and a file name.
fn check_node_name(name: &str) -> Result<(), TlsError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && !matches!(name, "ca" | "server");
    if ok {
        Ok(())
    } else {
        Err(TlsError::Certificate {
            origin: format!("node name `{name}`"),
            reason: "use letters, digits, `-` and `.` (at most 63, starting with a letter \
                     or digit), and not `ca` or `server`"
                .into(),
        })
    }
}

fn write(path: &Path, text: &str, secret: bool) -> Result<(), TlsError> {
    let io = |source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut file = options.open(path).map_err(io)?;
    file.write_all(text.as_bytes()).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ClusterTlsFiles, ServerTlsFiles};

    fn spec(nodes: &[&str]) -> DevCertsSpec {
        DevCertsSpec {
            nodes: nodes.iter().map(|n| n.to_string()).collect(),
            ips: vec!["10.0.0.7".parse().unwrap()],
            hosts: vec!["tessera.internal".into()],
            days: 30,
            force: false,
        }
    }

    #[test]
    fn written_certificates_load_as_the_flags_take_them() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("certs");
        let written = write_dev_certs(&out, &spec(&["coordinator", "worker-0"])).unwrap();
        for (name, cert, key) in &written.nodes {
            ClusterTlsFiles {
                ca: written.ca.0.clone(),
                cert: cert.clone(),
                key: key.clone(),
            }
            .load()
            .unwrap_or_else(|e| panic!("{name}: {e}"));
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(key).unwrap().permissions().mode();
                assert_eq!(mode & 0o077, 0, "{} is private", key.display());
            }
        }
        ServerTlsFiles {
            cert: written.server.0.clone(),
            key: written.server.1.clone(),
        }
        .load()
        .unwrap();

        // A second run would replace the CA under the certificates already handed out.
        let e = write_dev_certs(&out, &spec(&["worker-1"])).unwrap_err();
        assert!(
            matches!(&e, TlsError::Exists(p) if p.ends_with("ca.pem")),
            "{e}"
        );
        assert!(!out.join("worker-1.pem").exists());
        let forced = DevCertsSpec {
            force: true,
            ..spec(&["worker-1"])
        };
        write_dev_certs(&out, &forced).unwrap();
    }

    #[test]
    fn node_names_must_be_names() {
        for bad in ["", "ca", "server", "../x", "-a", "a b", "w_0"] {
            let e = write_dev_certs(Path::new("/nonexistent"), &spec(&[bad])).unwrap_err();
            assert!(e.to_string().contains("node name"), "{bad}: {e}");
        }
    }
}
