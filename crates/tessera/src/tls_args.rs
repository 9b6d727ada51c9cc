//! TLS flags: the cluster's mutual TLS (coordinator, serve and worker alike) and the CA a
//! client of the public API trusts.

use std::path::PathBuf;

use clap::Args;
use tessera_tls::ClusterTlsFiles;

/// `--cluster-ca`, `--cluster-cert`, `--cluster-key`: mutual TLS between the coordinator
/// and its workers. All three or none.
#[derive(Debug, Clone, Default, Args)]
pub struct ClusterTlsArgs {
    /// The cluster CA's certificate (PEM). With it, the coordinator and the workers talk
    /// mutual TLS and take only peers whose certificate this CA signed. Needs
    /// --cluster-cert and --cluster-key.
    #[arg(
        long,
        value_name = "FILE",
        requires_all = ["cluster_cert", "cluster_key"]
    )]
    pub cluster_ca: Option<PathBuf>,
    /// This node's certificate (PEM), signed by the cluster CA and carrying the name
    /// `tessera-node` (`tessera certs` makes such certificates).
    #[arg(long, value_name = "FILE", requires = "cluster_ca")]
    pub cluster_cert: Option<PathBuf>,
    /// The private key of --cluster-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "cluster_ca")]
    pub cluster_key: Option<PathBuf>,
}

impl ClusterTlsArgs {
    /// The files, when the flags were given.
    pub fn files(&self) -> Option<ClusterTlsFiles> {
        match (&self.cluster_ca, &self.cluster_cert, &self.cluster_key) {
            (Some(ca), Some(cert), Some(key)) => Some(ClusterTlsFiles {
                ca: ca.clone(),
                cert: cert.clone(),
                key: key.clone(),
            }),
            _ => None,
        }
    }

    /// The same flags for another process: what `serve` gives the workers it starts.
    pub fn to_args(files: &ClusterTlsFiles) -> Vec<std::ffi::OsString> {
        vec![
            "--cluster-ca".into(),
            files.ca.clone().into_os_string(),
            "--cluster-cert".into(),
            files.cert.clone().into_os_string(),
            "--cluster-key".into(),
            files.key.clone().into_os_string(),
        ]
    }
}

/// `--ca-cert`: the CA a client of an `https://` endpoint trusts.
#[derive(Debug, Clone, Default, Args)]
pub struct CaCertArg {
    /// For an https:// endpoint: the CA certificate (PEM) to trust instead of the
    /// system's roots, e.g. the ca.pem of `tessera certs`.
    #[arg(long, value_name = "FILE")]
    pub ca_cert: Option<PathBuf>,
}
