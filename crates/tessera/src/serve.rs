//! `tessera serve`: a whole cluster on this machine — a coordinator in this process and
//! one worker process per shard — serving until Ctrl-C.
//!
//! No worker outlives it: each is started with the parent-death signal set to SIGKILL
//! (so even a SIGKILL of `serve` takes the workers down), and on Ctrl-C or SIGTERM they
//! are stopped before `serve` exits.

use std::ffi::OsString;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use tessera_coordinator::{ClusterState, Coordinator, CoordinatorConfig, ModelSource};
use tracing::{info, warn};

use crate::cluster_args::ClusterArgs;
use crate::tls_args::ClusterTlsArgs;

/// The model `tessera serve` runs with no flags: small enough for any laptop.
pub const DEFAULT_PRESET: &str = "gpt2-tiny";

/// Arguments of `tessera serve`. With no flags: the gpt2-tiny preset (synthetic weights),
/// TP=2, PP=1, gRPC on 127.0.0.1:50051 and the OpenAI-compatible API on 127.0.0.1:8000.
#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Address of the gRPC API.
    #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:50051")]
    pub listen: String,
    /// Kernel threads in all, split evenly over the workers (default: every core).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Backend of the workers: `cpu`, or `sim` to simulate a GPU cluster on this machine
    /// (no arithmetic: each step takes the time `tessera plan` predicts on `--gpu`; weights
    /// and KV cache are bf16 and sized from the profile's memory; tokens are placeholders).
    #[arg(long, value_name = "BACKEND", default_value = "cpu")]
    pub backend: String,
    /// Device profile of `--backend sim`: a100-80g, h100-sxm or h200.
    #[arg(long, value_name = "PROFILE", default_value = "h100-sxm")]
    pub gpu: String,
    /// Simulated devices per node (`--backend sim`); workers fill one node after another.
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub gpus_per_node: usize,
}

/// The config `serve` runs: TP=2 over the default preset unless told otherwise.
pub fn config(args: &ServeArgs) -> Result<CoordinatorConfig> {
    let mut c = CoordinatorConfig::new(ModelSource::Synthetic {
        preset: DEFAULT_PRESET.into(),
        seed: 0,
    });
    c.tp = 2;
    match args.backend.as_str() {
        "cpu" => {}
        "sim" => {
            // What a GPU deployment runs: bf16 weights, the profile's share of memory.
            let hw = tessera_model::Hardware::gpu(&args.gpu)?;
            c.dtype = "bf16".into();
            c.kv_memory_fraction = hw.memory_fraction;
        }
        other => bail!("--backend: `{other}` is not cpu or sim"),
    }
    args.cluster.apply(&mut c)?;
    c.listen = args.listen.clone();
    if c.http_listen.is_none() {
        c.http_listen = Some(tessera_coordinator::config::defaults::SERVE_HTTP_LISTEN.into());
    }
    if c.cluster_tls.is_some() && c.cluster_listen.is_none() {
        c.cluster_listen = Some(tessera_coordinator::config::defaults::SERVE_CLUSTER_LISTEN.into());
    }
    c.register_timeout = Duration::from_secs(60);
    c.validate()?;
    Ok(c)
}

/// Worker processes that are killed when this value is dropped.
struct Workers {
    children: Vec<Child>,
}

impl Workers {
    /// `n` workers registering at `coordinator`, with `extra` flags (device, TLS).
    fn spawn(n: usize, coordinator: &str, threads: usize, extra: &[OsString]) -> Result<Workers> {
        let exe = std::env::current_exe().context("cannot find the tessera executable")?;
        let mut workers = Workers {
            children: Vec::with_capacity(n),
        };
        for _ in 0..n {
            let mut cmd = Command::new(&exe);
            cmd.args(["worker", "--coordinator", coordinator])
                .args(["--listen", "127.0.0.1:0"])
                .args(["--threads", &threads.to_string()])
                .args(extra)
                .stdin(Stdio::null());
            #[cfg(target_os = "linux")]
            {
                use std::os::unix::process::CommandExt;
                let parent = std::process::id() as libc::pid_t;
                // SAFETY: runs in the forked child before exec and only makes
                // async-signal-safe system calls (prctl, getppid, _exit).
                unsafe {
                    cmd.pre_exec(move || {
                        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        // The parent may have died before the signal was armed.
                        if libc::getppid() != parent {
                            libc::_exit(1);
                        }
                        Ok(())
                    });
                }
            }
            let child = cmd.spawn().context("cannot start a worker process")?;
            workers.children.push(child);
        }
        Ok(workers)
    }

    /// The first worker that has exited, with its status.
    fn exited(&mut self) -> Option<(u32, std::process::ExitStatus)> {
        self.children.iter_mut().find_map(|c| match c.try_wait() {
            Ok(Some(status)) => Some((c.id(), status)),
            _ => None,
        })
    }

    /// SIGTERM, a grace period, then SIGKILL; waits for every worker.
    fn stop(&mut self, grace: Duration) {
        for c in &self.children {
            // SAFETY: sending a signal to our own child, which we have not yet reaped.
            unsafe {
                libc::kill(c.id() as libc::pid_t, libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + grace;
        for c in &mut self.children {
            loop {
                match c.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() >= deadline => {
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
        self.children.clear();
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(2));
    }
}

pub fn serve(args: ServeArgs) -> Result<()> {
    let config = config(&args)?;
    let world = config.tp * config.pp;
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if threads == 0 {
        bail!("--threads must be at least 1");
    }
    let per_worker = (threads / world).max(1);
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    // Workers are spawned from this (the main) thread: the parent-death signal fires when
    // the thread that forked a child exits, and the main thread lives as long as we do.
    let coordinator = runtime.block_on(Coordinator::start(config.clone()))?;
    let dial = dialable(coordinator.local_addr());
    let mut extra: Vec<OsString> = match args.backend.as_str() {
        "sim" => vec![
            "--backend".into(),
            "sim".into(),
            "--gpu".into(),
            args.gpu.clone(),
            "--gpus-per-node".into(),
            args.gpus_per_node.to_string(),
        ]
        .into_iter()
        .map(OsString::from)
        .collect(),
        _ => Vec::new(),
    };
    if let Some(files) = &config.cluster_tls {
        extra.extend(ClusterTlsArgs::to_args(files));
    }
    let register_at = dialable(coordinator.registration_addr());
    let mut workers = Workers::spawn(world, &register_at, per_worker, &extra)?;
    // What clients dial: the scheme says whether the API speaks TLS.
    let (grpc, http_scheme) = match config.tls {
        Some(_) => (format!("https://{dial}"), "https"),
        None => (dial.clone(), "http"),
    };
    let stop = coordinator.stopper();
    let mut state = coordinator.state();

    let outcome: Result<()> = runtime.block_on(async {
        let shutdown = crate::signals::shutdown();
        tokio::pin!(shutdown);
        // Bring-up: ends when serving, when it fails, or when a worker process dies.
        loop {
            let s = state.borrow_and_update().clone();
            match s {
                ClusterState::Serving => break,
                ClusterState::Failed(msg) => bail!("the cluster did not start: {msg}"),
                ClusterState::Stopping => bail!("stopped during start-up"),
                ClusterState::Starting(_) => {}
            }
            if let Some((pid, status)) = workers.exited() {
                bail!("worker process {pid} exited during start-up ({status})");
            }
            tokio::select! {
                _ = state.changed() => {}
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = &mut shutdown => bail!("interrupted during start-up"),
            }
        }
        let on = if args.backend == "sim" {
            format!(", simulated on {} × {}", world, args.gpu)
        } else {
            String::new()
        };
        println!(
            "Tessera is serving {} (tp={} pp={}, {} worker processes{on}) on {grpc}",
            describe(&config.model),
            config.tp,
            config.pp,
            world
        );
        println!("  gRPC API:   {grpc} (tessera.v1.Generation, grpc.health.v1, reflection)");
        if let Some(http) = coordinator.http_addr() {
            println!(
                "  OpenAI API: {http_scheme}://{http}/v1 (completions, models; also /health, /metrics)"
            );
        }
        if config.cluster_tls.is_some() {
            println!("  workers:    mutual TLS, registering at {register_at}");
        }
        let trust = if config.tls.is_some() {
            " --ca-cert CA.pem"
        } else {
            ""
        };
        println!(
            "  try:        tessera generate --endpoint {grpc}{trust} --prompt \"The cluster\" --stream"
        );
        println!("Ctrl-C stops the cluster.");
        let mut reported = false;
        loop {
            tokio::select! {
                _ = &mut shutdown => {
                    info!("shutting down");
                    return Ok(());
                }
                _ = tokio::time::sleep(Duration::from_millis(200)) => {
                    if !reported {
                        if let Some((pid, status)) = workers.exited() {
                            warn!("worker process {pid} exited ({status}); the cluster stops serving");
                            reported = true;
                        }
                    }
                }
            }
        }
    });
    let _ = stop.send(true);
    let _ = runtime
        .block_on(async { tokio::time::timeout(Duration::from_secs(5), coordinator.wait()).await });
    workers.stop(Duration::from_secs(3));
    runtime.shutdown_timeout(Duration::from_secs(1));
    outcome
}

/// An address to dial: a listener on every interface is reached on 127.0.0.1.
fn dialable(addr: std::net::SocketAddr) -> String {
    if addr.ip().is_unspecified() {
        format!("127.0.0.1:{}", addr.port())
    } else {
        addr.to_string()
    }
}

fn describe(m: &ModelSource) -> String {
    match m {
        ModelSource::Checkpoint(dir) => dir.display().to_string(),
        ModelSource::Synthetic { preset, seed } => {
            format!("{preset} (synthetic weights, seed {seed})")
        }
    }
}
