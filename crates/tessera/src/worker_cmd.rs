//! `tessera worker`: one worker process of a cluster; it registers with the coordinator,
//! which then assigns it a shard.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use tessera_model::Hardware;
use tessera_worker::{run_worker, SimDevice, WorkerOptions};

use crate::tls_args::ClusterTlsArgs;

/// Flags of `tessera worker`.
#[derive(Debug, Clone, Args)]
pub struct WorkerArgs {
    /// The coordinator's cluster address (host:port) to register with: its registration
    /// listener (--cluster-listen) when it has one, else its gRPC API.
    #[arg(long, value_name = "ADDR")]
    pub coordinator: String,
    /// Address the worker's gRPC service listens on; port 0 picks a free port. Collective
    /// connections listen on the same IP.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:0")]
    pub listen: SocketAddr,
    /// IP address the coordinator and the other workers should dial to reach this worker
    /// (default: the address the coordinator sees the registration come from).
    #[arg(long, value_name = "IP")]
    pub advertise_host: Option<std::net::IpAddr>,
    /// Compute backend of the shard: `cpu`; `cuda` (one GPU, `--device`; needs a build with
    /// `--features cuda`, the NVIDIA driver, NVRTC and cuBLAS, and a coordinator serving
    /// --dtype bf16 or f16); or `sim` (no arithmetic: each step takes the time the cost
    /// model predicts on the `--gpu` profile).
    #[arg(long, value_name = "BACKEND", default_value = "cpu")]
    pub backend: String,
    /// The GPU of `--backend cuda` (CUDA device ordinal; one worker process per GPU).
    /// Compiled kernels are cached in $TESSERA_KERNEL_CACHE, else
    /// $XDG_CACHE_HOME/tessera/kernels, else ~/.cache/tessera/kernels.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub device: usize,
    /// Device profile simulated by `--backend sim`: a100-80g, h100-sxm or h200.
    #[arg(long, value_name = "PROFILE")]
    pub gpu: Option<String>,
    /// Simulated devices per node (`--backend sim`): links between workers of different
    /// nodes are charged at network speed.
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub gpus_per_node: usize,
    /// Kernel threads of the shard (default: every core of this machine).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Seconds to keep trying to reach the coordinator at start-up, and seconds of
    /// silence from it after which the worker gives up and exits.
    #[arg(long, value_name = "SECS", default_value_t = 15)]
    pub coordinator_timeout: u64,
    #[command(flatten)]
    pub cluster_tls: ClusterTlsArgs,
}

/// Runs the worker until Ctrl-C or SIGTERM, or until it loses its coordinator.
pub fn worker(args: WorkerArgs) -> Result<()> {
    let defaults = WorkerOptions::new(args.coordinator.clone());
    let sim = match &args.gpu {
        Some(name) => Some(SimDevice {
            hardware: Hardware::gpu(name)?,
            gpus_per_node: args.gpus_per_node,
        }),
        None => None,
    };
    let opts = WorkerOptions {
        listen: args.listen,
        advertise_host: args.advertise_host.map(|ip| ip.to_string()),
        backend: args.backend,
        cuda_device: args.device,
        sim,
        threads: args.threads.unwrap_or(defaults.threads),
        coordinator_timeout: Duration::from_secs(args.coordinator_timeout),
        cluster_tls: args.cluster_tls.files(),
        ..defaults
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("worker-rpc")
        .build()
        .context("cannot start the async runtime")?;
    let result = runtime.block_on(async { run_worker(opts, crate::signals::shutdown()).await });
    // A collective still forming when the worker stops gives up at its own timeout; do
    // not wait that long to exit.
    runtime.shutdown_timeout(Duration::from_secs(1));
    Ok(result?)
}
