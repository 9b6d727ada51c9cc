//! `tessera certs`: a development CA, a certificate per cluster node and one for the public
//! API, and the flags that use them.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Args;
use tessera_tls::{write_dev_certs, DevCertsSpec};

/// Nodes made when no --node is given.
const DEFAULT_NODES: [&str; 2] = ["coordinator", "worker"];

/// Arguments of `tessera certs`.
#[derive(Debug, Args)]
pub struct CertsArgs {
    /// Directory to write the files into (made if missing).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// A cluster node to make a certificate for (NAME.pem, NAME-key.pem), usable as server
    /// and as client; repeat for several [default: coordinator, worker].
    #[arg(long = "node", value_name = "NAME")]
    pub nodes: Vec<String>,
    /// An IP address to add to every certificate; repeat for several.
    #[arg(long = "ip", value_name = "IP")]
    pub ips: Vec<IpAddr>,
    /// A host name clients reach the public API by, besides localhost; repeat for several.
    #[arg(long = "host", value_name = "NAME")]
    pub hosts: Vec<String>,
    /// Days the certificates stay valid.
    #[arg(long, value_name = "N", default_value_t = 365)]
    pub days: u32,
    /// Overwrite files that exist. The new CA does not sign certificates made before.
    #[arg(long)]
    pub force: bool,
}

pub fn certs(args: CertsArgs) -> Result<()> {
    let nodes = if args.nodes.is_empty() {
        DEFAULT_NODES.map(String::from).to_vec()
    } else {
        args.nodes.clone()
    };
    if args.days == 0 {
        anyhow::bail!("--days must be at least 1");
    }
    let written = write_dev_certs(
        &args.out,
        &DevCertsSpec {
            nodes,
            ips: args.ips.clone(),
            hosts: args.hosts.clone(),
            days: args.days,
            force: args.force,
        },
    )?;
    let show = |p: &Path| p.display().to_string();
    let file_name = |p: &Path| {
        p.file_name()
            .map_or_else(|| show(p), |n| n.to_string_lossy().into_owned())
    };
    let mut names = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()];
    names.extend(args.hosts.iter().cloned());
    names.extend(args.ips.iter().map(|ip| ip.to_string()));
    names.dedup();
    let mut rows = vec![
        (
            &written.ca,
            "the CA (keep its key private: it makes members)".to_string(),
        ),
        (
            &written.server,
            format!("the public API ({})", names.join(", ")),
        ),
    ];
    let node_pairs: Vec<((PathBuf, PathBuf), String)> = written
        .nodes
        .iter()
        .map(|(name, c, k)| ((c.clone(), k.clone()), format!("cluster node `{name}`")))
        .collect();
    rows.extend(node_pairs.iter().map(|(p, what)| (p, what.clone())));
    let listed: Vec<(String, String)> = rows
        .into_iter()
        .map(|((c, k), what)| (format!("{}, {}", file_name(c), file_name(k)), what))
        .collect();
    let width = listed.iter().map(|(f, _)| f.len()).max().unwrap_or(0);
    println!(
        "Wrote a development CA and certificates valid for {} days to {}:",
        args.days,
        show(&args.out)
    );
    for (files, what) in &listed {
        println!("  {files:<width$}   {what}");
    }
    let ca = show(&written.ca.0);
    let public = format!(
        "--tls-cert {} --tls-key {}",
        show(&written.server.0),
        show(&written.server.1)
    );
    let node = |i: usize| {
        let (_, cert, key) = &written.nodes[i.min(written.nodes.len() - 1)];
        format!(
            "--cluster-ca {ca} --cluster-cert {} --cluster-key {}",
            show(cert),
            show(key)
        )
    };
    println!();
    println!("On one machine:");
    println!("  tessera serve {public} \\");
    println!("      {}", node(0));
    println!("  tessera generate --endpoint https://127.0.0.1:50051 --ca-cert {ca} --prompt \"The cluster\"");
    println!("  curl --cacert {ca} https://127.0.0.1:8000/v1/models");
    println!("Across machines (workers register on port 50052):");
    println!("  tessera coordinator --preset gpt2-tiny {public} \\");
    println!("      {}", node(0));
    println!(
        "  tessera worker --coordinator COORDINATOR:50052 {}",
        node(1)
    );
    Ok(())
}
