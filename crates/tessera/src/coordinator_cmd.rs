//! `tessera coordinator`: the public API and the scheduler of a multi-node cluster, whose
//! workers are started separately with `tessera worker --coordinator ADDR`.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use tessera_coordinator::{ClusterState, ConfigFile, Coordinator, CoordinatorConfig};
use tracing::info;

use crate::cluster_args::ClusterArgs;

/// Arguments of `tessera coordinator`.
#[derive(Debug, Args)]
pub struct CoordinatorArgs {
    /// A cluster config (TOML; see cluster/*.toml). Flags override its values.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Address of the public gRPC API, where workers also register unless
    /// --cluster-listen or --cluster-ca moves them (default 0.0.0.0:50051).
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: Option<String>,
    /// Seconds to wait for every worker to register before giving up (default 300).
    #[arg(long, value_name = "SECS")]
    pub register_timeout: Option<u64>,
}

/// The coordinator's config from the file and the flags.
pub fn config(args: &CoordinatorArgs) -> Result<CoordinatorConfig> {
    let mut c = match (&args.config, args.cluster.model_source()) {
        (Some(path), _) => CoordinatorConfig::from_file(&ConfigFile::load(path)?)?,
        (None, Some(model)) => CoordinatorConfig::new(model),
        (None, None) => bail!("give --config FILE, or --model DIR or --preset NAME"),
    };
    args.cluster.apply(&mut c)?;
    if let Some(l) = &args.listen {
        c.listen = l.clone();
    }
    if let Some(s) = args.register_timeout {
        c.register_timeout = std::time::Duration::from_secs(s);
    }
    c.validate()?;
    Ok(c)
}

pub fn coordinator(args: CoordinatorArgs) -> Result<()> {
    let config = config(&args)?;
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let coordinator = Coordinator::start(config.clone()).await?;
        let addr = coordinator.local_addr();
        let scheme = if config.tls.is_some() {
            "https"
        } else {
            "http"
        };
        if let Some(http) = coordinator.http_addr() {
            eprintln!("OpenAI-compatible API on {scheme}://{http}/v1");
        }
        let tls = if config.cluster_tls.is_some() {
            " --cluster-ca CA --cluster-cert CERT --cluster-key KEY"
        } else {
            ""
        };
        eprintln!(
            "coordinator on {addr}: waiting for {} workers (tessera worker --coordinator {}{tls})",
            config.tp * config.pp,
            coordinator.registration_addr()
        );
        let stop = coordinator.stopper();
        let mut state = coordinator.state();
        tokio::spawn(async move {
            if state
                .wait_for(|s| *s == ClusterState::Serving)
                .await
                .is_ok()
            {
                eprintln!("serving on {addr}");
            }
        });
        let shutdown = crate::signals::shutdown();
        tokio::spawn(async move {
            shutdown.await;
            info!("shutting down");
            let _ = stop.send(true);
        });
        coordinator.wait().await?;
        Ok(())
    })
}
