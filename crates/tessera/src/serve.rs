//! `tessera serve`: a whole cluster on this machine — a coordinator in this process and
//! one worker process per shard — serving until Ctrl-C.
//!
//! No worker outlives it: each is started with the parent-death signal set to SIGKILL
//! (so even a SIGKILL of `serve` takes the workers down), and on Ctrl-C or SIGTERM they
//! are stopped before `serve` exits.
//!
//! While serving, `serve` supervises its workers: one that exits is started again (at
//! once the first time, then with a backoff that doubles while it keeps dying young), and
//! one that the coordinator took out of the cluster because it hung is killed and started
//! again. The new process registers and the coordinator gives it the vacant shard.

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
    /// Backend of the workers: `cpu`; `cuda`, one worker process per GPU of `--devices`
    /// (bf16 unless --dtype f16; needs a build with `--features cuda`); or `sim` to
    /// simulate a GPU cluster on this machine (no arithmetic: each step takes the time
    /// `tessera plan` predicts on `--gpu`; weights and KV cache are bf16 and sized from the
    /// profile's memory; tokens are placeholders).
    #[arg(long, value_name = "BACKEND", default_value = "cpu")]
    pub backend: String,
    /// GPUs of `--backend cuda`, one per worker: worker i (of tp × pp) drives GPU
    /// devices[i]. Default: 0, 1, …, tp × pp − 1.
    #[arg(long, value_name = "N,N,...", value_delimiter = ',')]
    pub devices: Option<Vec<usize>>,
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
        "cuda" if !tessera_runtime::cuda::COMPILED => {
            bail!("--backend cuda: {}", tessera_runtime::cuda::NOT_COMPILED)
        }
        "cuda" => {
            // GPUs store 16 bits; f32 is refused by cuda workers.
            c.dtype = "bf16".into();
            c.kv_memory_fraction = CUDA_MEMORY_FRACTION;
        }
        "sim" => {
            // What a GPU deployment runs: bf16 weights, the profile's share of memory.
            let hw = tessera_model::Hardware::gpu(&args.gpu)?;
            c.dtype = "bf16".into();
            c.kv_memory_fraction = hw.memory_fraction;
        }
        other => bail!("--backend: `{other}` is not cpu, cuda or sim"),
    }
    args.cluster.apply(&mut c)?;
    if args.backend == "cuda" && c.dtype == "f32" {
        bail!("--dtype f32: cuda workers store bf16 or f16; use --dtype bf16 (the default) or f16");
    }
    if args.backend != "cuda" && args.devices.is_some() {
        bail!("--devices picks the GPUs of --backend cuda");
    }
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

/// Share of each GPU's free memory that `serve --backend cuda` gives weights and KV cache:
/// the rest is the CUDA context, cuBLAS's workspace and the step's activations.
const CUDA_MEMORY_FRACTION: f64 = 0.85;

/// The GPU of each of `world` workers: `--devices` as given (one per worker), else 0, 1, ….
fn cuda_devices(given: Option<&[usize]>, world: usize) -> Result<Vec<usize>> {
    match given {
        None => Ok((0..world).collect()),
        Some(d) if d.len() != world => bail!(
            "--devices names {} GPU(s) for {world} workers (tp × pp); give one per worker",
            d.len()
        ),
        Some(d) => {
            let mut seen = d.to_vec();
            seen.sort_unstable();
            if let Some(w) = seen.windows(2).find(|w| w[0] == w[1]) {
                bail!(
                    "--devices names GPU {} twice; each worker needs its own GPU",
                    w[0]
                );
            }
            Ok(d.to_vec())
        }
    }
}

/// First pause before restarting a worker that died young, and the longest.
const RESTART_BACKOFF: (Duration, Duration) = (Duration::from_millis(250), Duration::from_secs(8));
/// How often exited workers are looked for.
const SUPERVISE_EVERY: Duration = Duration::from_millis(100);
/// A worker that ran this long before it exited is restarted at once.
const HEALTHY_RUN: Duration = Duration::from_secs(30);

/// One worker process and its restart history.
struct Supervised {
    child: Child,
    /// Flags of this worker alone (its GPU).
    own_args: Vec<OsString>,
    started: Instant,
    /// Exits in a row, each before a healthy run.
    young_exits: u32,
    /// When an exited worker is due to start again.
    restart_at: Option<Instant>,
}

/// The pause before restarting a worker after `young_exits` exits in a row that each
/// came before a healthy run: none after the first, then doubling up to the longest.
fn restart_backoff(young_exits: u32) -> Duration {
    match young_exits {
        0 | 1 => Duration::ZERO,
        n => RESTART_BACKOFF
            .0
            .saturating_mul(1 << (n - 2).min(16))
            .min(RESTART_BACKOFF.1),
    }
}

/// Worker processes that are killed when this value is dropped.
struct Workers {
    children: Vec<Supervised>,
    exe: std::path::PathBuf,
    args: Vec<OsString>,
}

impl Workers {
    /// Workers registering at `coordinator` with `extra` flags (backend, TLS), one per entry
    /// of `own`, which holds each worker's own flags (its GPU).
    fn spawn(
        own: Vec<Vec<OsString>>,
        coordinator: &str,
        threads: usize,
        extra: &[OsString],
    ) -> Result<Workers> {
        let exe = std::env::current_exe().context("cannot find the tessera executable")?;
        let mut args: Vec<OsString> = [
            "worker",
            "--coordinator",
            coordinator,
            "--listen",
            "127.0.0.1:0",
            "--threads",
            &threads.to_string(),
        ]
        .map(OsString::from)
        .to_vec();
        args.extend_from_slice(extra);
        let mut workers = Workers {
            children: Vec::with_capacity(own.len()),
            exe,
            args,
        };
        for own_args in own {
            let child = workers.start(&own_args)?;
            workers.children.push(Supervised {
                child,
                own_args,
                started: Instant::now(),
                young_exits: 0,
                restart_at: None,
            });
        }
        Ok(workers)
    }

    /// Starts one worker process with its own flags.
    fn start(&self, own_args: &[OsString]) -> Result<Child> {
        {
            let mut cmd = Command::new(&self.exe);
            cmd.args(&self.args).args(own_args).stdin(Stdio::null());
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
            cmd.spawn().context("cannot start a worker process")
        }
    }

    /// The first worker that has exited, with its status.
    fn exited(&mut self) -> Option<(u32, std::process::ExitStatus)> {
        self.children
            .iter_mut()
            .find_map(|c| match c.child.try_wait() {
                Ok(Some(status)) => Some((c.child.id(), status)),
                _ => None,
            })
    }

    /// Kills the worker process `pid`, if it is one of ours and still runs (a worker the
    /// coordinator found hung); [`Workers::supervise`] then starts a replacement.
    fn kill(&mut self, pid: u32) {
        if let Some(c) = self.children.iter_mut().find(|c| c.child.id() == pid) {
            if matches!(c.child.try_wait(), Ok(None)) {
                warn!("worker process {pid} was taken out of the cluster; killing it");
                let _ = c.child.kill();
            }
        }
    }

    /// Restarts the workers that have exited: at once after a healthy run, else after a
    /// backoff that doubles each time a worker dies young.
    fn supervise(&mut self) {
        let now = Instant::now();
        for i in 0..self.children.len() {
            let c = &mut self.children[i];
            if c.restart_at.is_none() {
                let Ok(Some(status)) = c.child.try_wait() else {
                    continue;
                };
                let lived = now.duration_since(c.started);
                c.young_exits = if lived >= HEALTHY_RUN {
                    0
                } else {
                    c.young_exits + 1
                };
                let backoff = restart_backoff(c.young_exits);
                warn!(
                    "worker process {} exited ({status}) after {:.1} s; restarting it in {} ms",
                    c.child.id(),
                    lived.as_secs_f64(),
                    backoff.as_millis()
                );
                c.restart_at = Some(now + backoff);
            }
            if self.children[i].restart_at.is_some_and(|t| t <= now) {
                match self.start(&self.children[i].own_args) {
                    Ok(child) => {
                        info!(
                            "started worker process {} in place of {}",
                            child.id(),
                            self.children[i].child.id()
                        );
                        let c = &mut self.children[i];
                        c.child = child;
                        c.started = now;
                        c.restart_at = None;
                    }
                    Err(e) => {
                        let c = &mut self.children[i];
                        c.young_exits += 1;
                        let backoff = restart_backoff(c.young_exits);
                        warn!(
                            "cannot restart a worker process ({e:#}); trying again in {} ms",
                            backoff.as_millis()
                        );
                        c.restart_at = Some(now + backoff);
                    }
                }
            }
        }
    }

    /// SIGTERM, a grace period, then SIGKILL; waits for every worker.
    fn stop(&mut self, grace: Duration) {
        for c in &mut self.children {
            // Only a child not yet reaped: its pid cannot have been reused.
            if matches!(c.child.try_wait(), Ok(None)) {
                // SAFETY: sending a signal to our own child, which we have not yet reaped.
                unsafe {
                    libc::kill(c.child.id() as libc::pid_t, libc::SIGTERM);
                }
            }
        }
        let deadline = Instant::now() + grace;
        for c in self.children.iter_mut().map(|c| &mut c.child) {
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
    // Each worker's own flags: its GPU under --backend cuda.
    let own: Vec<Vec<OsString>> = if args.backend == "cuda" {
        cuda_devices(args.devices.as_deref(), world)?
            .into_iter()
            .map(|d| vec!["--device".into(), d.to_string().into()])
            .collect()
    } else {
        vec![Vec::new(); world]
    };
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    // Workers are spawned from this (the main) thread: the parent-death signal fires when
    // the thread that forked a child exits, and the main thread lives as long as we do.
    let mut coordinator = runtime.block_on(Coordinator::start(config.clone()))?;
    let mut vacated = coordinator
        .take_vacated()
        .context("the coordinator's vacated workers were already taken")?;
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
        "cuda" => vec!["--backend".into(), "cuda".into()],
        _ => Vec::new(),
    };
    if let Some(files) = &config.cluster_tls {
        extra.extend(ClusterTlsArgs::to_args(files));
    }
    let register_at = dialable(coordinator.registration_addr());
    let mut workers = Workers::spawn(own, &register_at, per_worker, &extra)?;
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
                ClusterState::Starting(_) | ClusterState::Recovering(_) => {}
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
        let on = match args.backend.as_str() {
            "sim" => format!(", simulated on {} × {}", world, args.gpu),
            "cuda" => format!(", one GPU each, {}", config.dtype),
            _ => String::new(),
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
        loop {
            tokio::select! {
                _ = &mut shutdown => {
                    info!("shutting down");
                    return Ok(());
                }
                Some(gone) = vacated.recv() => workers.kill(gone.pid),
                _ = tokio::time::sleep(SUPERVISE_EVERY) => workers.supervise(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_that_keeps_dying_young_waits_longer_each_time() {
        assert_eq!(restart_backoff(0), Duration::ZERO);
        assert_eq!(
            restart_backoff(1),
            Duration::ZERO,
            "the first exit restarts at once"
        );
        assert_eq!(restart_backoff(2), RESTART_BACKOFF.0);
        assert_eq!(restart_backoff(3), RESTART_BACKOFF.0 * 2);
        assert_eq!(restart_backoff(4), RESTART_BACKOFF.0 * 4);
        assert_eq!(restart_backoff(40), RESTART_BACKOFF.1, "capped");
    }

    #[test]
    fn each_cuda_worker_gets_its_own_gpu() {
        assert_eq!(cuda_devices(None, 4).unwrap(), [0, 1, 2, 3]);
        assert_eq!(cuda_devices(Some(&[3, 1]), 2).unwrap(), [3, 1]);
        let e = cuda_devices(Some(&[0, 1, 2]), 2).unwrap_err().to_string();
        assert!(e.contains("3 GPU(s) for 2 workers"), "{e}");
        let e = cuda_devices(Some(&[1, 1]), 2).unwrap_err().to_string();
        assert!(e.contains("GPU 1 twice"), "{e}");
    }
}
