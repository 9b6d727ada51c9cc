//! The Tessera worker: one shard of the model behind the `tessera.worker.v1.Worker` gRPC
//! service (`proto/tessera/worker/v1/worker.proto`).
//!
//! [`run_worker`] serves the service, registers with the coordinator, and serves until
//! told to stop or until the coordinator goes silent. The coordinator then drives the
//! worker: `Assign` → `OpenCollectives` → `Load` → `Step`… → `Release`.
mod collectives;
mod convert;
mod cuda;
mod error;
mod memory;
mod service;
mod shard_thread;
mod sim;

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use tessera_proto::worker::v1::cluster_client::ClusterClient;
use tessera_proto::worker::v1::worker_server::WorkerServer;
use tessera_proto::worker::v1::{RegisterRequest, RegisterResponse};
use tessera_tls::{ClusterTls, ClusterTlsFiles, HandshakeFailure};
use tokio::sync::{oneshot, watch};
use tonic::transport::{Endpoint, Server};
use tonic::Code;
use tracing::{info, warn};

pub use cuda::CudaDevice;
pub use error::WorkerError;
pub use memory::available_memory_bytes;
pub use sim::SimDevice;

use service::WorkerService;
use shard_thread::Device;

/// Largest gRPC message the worker accepts: a step of a large batch with long prompts
/// and block tables fits many times over.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;
/// Default of [`WorkerOptions::coordinator_timeout`].
pub const DEFAULT_COORDINATOR_TIMEOUT: Duration = Duration::from_secs(15);

/// First and longest pause between attempts to reach a coordinator that is not up yet.
const REGISTER_BACKOFF: (Duration, Duration) = (Duration::from_millis(50), Duration::from_secs(1));
/// How long the gRPC server may take to finish its calls once told to stop.
const SERVER_DRAIN: Duration = Duration::from_secs(5);

/// How a worker process runs.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// The coordinator's `Cluster` service, `host:port`.
    pub coordinator: String,
    /// Where the `Worker` service listens; port 0 picks a free port. The collective
    /// listeners bind on the same IP.
    pub listen: SocketAddr,
    /// IP address the coordinator and the peers should dial; `None`: the address the
    /// coordinator sees the registration come from.
    pub advertise_host: Option<String>,
    /// Compute backend: `cpu`, `cuda` (builds with the `cuda` feature), or `sim` with
    /// [`WorkerOptions::sim`] set.
    pub backend: String,
    /// CUDA device ordinal of the `cuda` backend: the one GPU this worker drives.
    pub cuda_device: usize,
    /// Kernel threads of the shard (at least 1).
    pub threads: usize,
    /// The simulated device of the `sim` backend.
    pub sim: Option<SimDevice>,
    /// How long to keep trying to register, and how long the coordinator may stay
    /// silent (no call at all, none in progress) before the worker gives up on it.
    pub coordinator_timeout: Duration,
    /// Mutual TLS with the coordinator: the `Worker` service then takes only clients
    /// whose certificate the cluster CA signed, and registration checks the coordinator's.
    /// Plaintext when absent.
    pub cluster_tls: Option<ClusterTlsFiles>,
}

impl WorkerOptions {
    /// Options for a CPU worker of `coordinator` on every core, listening on any address.
    pub fn new(coordinator: impl Into<String>) -> Self {
        WorkerOptions {
            coordinator: coordinator.into(),
            listen: SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0),
            advertise_host: None,
            backend: "cpu".into(),
            cuda_device: 0,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            sim: None,
            coordinator_timeout: DEFAULT_COORDINATOR_TIMEOUT,
            cluster_tls: None,
        }
    }

    /// What the shard runs on; `cuda` is the GPU probed for the `cuda` backend.
    fn device(&self, cuda: Option<CudaDevice>) -> Device {
        match (&self.sim, cuda) {
            (Some(sim), _) => Device::Sim(sim.clone()),
            (None, Some(gpu)) => Device::Cuda(gpu),
            (None, None) => Device::Cpu {
                threads: self.threads,
            },
        }
    }

    /// Probes the GPU of the `cuda` backend; `None` for the other backends.
    fn probe_cuda(&self) -> Result<Option<CudaDevice>, WorkerError> {
        if self.backend != "cuda" {
            return Ok(None);
        }
        let gpu = cuda::probe(self.cuda_device)?;
        info!("--backend cuda: {}", gpu.description);
        Ok(Some(gpu))
    }

    fn check(&self, tls: Option<&ClusterTls>) -> Result<Endpoint, WorkerError> {
        match (self.backend.as_str(), &self.sim) {
            ("cpu", None) => {}
            ("cuda", None) if !tessera_runtime::cuda::COMPILED => return Err(cuda::not_compiled()),
            ("cuda", None) => {}
            ("cuda", Some(_)) => {
                return Err(WorkerError::InvalidOptions(
                    "--gpu is only for --backend sim; --device picks the GPU of --backend cuda"
                        .into(),
                ))
            }
            ("sim", Some(sim)) => {
                sim.hardware
                    .validate()
                    .map_err(|e| WorkerError::InvalidOptions(format!("--gpu: {e}")))?;
                if sim.gpus_per_node == 0 {
                    return Err(WorkerError::InvalidOptions(
                        "--gpus-per-node must be at least 1".into(),
                    ));
                }
            }
            ("sim", None) => {
                return Err(WorkerError::InvalidOptions(
                    "the sim backend needs a device profile: --gpu a100-80g|h100-sxm|h200".into(),
                ))
            }
            ("cpu", Some(_)) => {
                return Err(WorkerError::InvalidOptions(
                    "--gpu is only for --backend sim".into(),
                ))
            }
            (other, _) => {
                return Err(WorkerError::InvalidOptions(format!(
                    "backend `{other}` is not available in this worker; use --backend cpu \
                     (or cuda, or sim to simulate a GPU)"
                )))
            }
        }
        if self.threads == 0 {
            return Err(WorkerError::InvalidOptions(
                "--threads must be at least 1".into(),
            ));
        }
        if self.coordinator_timeout.is_zero() {
            return Err(WorkerError::InvalidOptions(
                "--coordinator-timeout must be positive".into(),
            ));
        }
        let scheme = if tls.is_some() { "https" } else { "http" };
        let uri = match self.coordinator.split_once("://") {
            None => format!("{scheme}://{}", self.coordinator),
            Some((given, _)) if given == scheme => self.coordinator.clone(),
            Some(_) => {
                return Err(WorkerError::InvalidOptions(format!(
                    "--coordinator `{}`: give host:port{}",
                    self.coordinator,
                    if tls.is_some() {
                        " (with --cluster-ca the worker speaks TLS to it)"
                    } else {
                        ""
                    }
                )))
            }
        };
        let endpoint = Endpoint::from_shared(uri).map_err(|e| {
            WorkerError::InvalidOptions(format!(
                "--coordinator `{}` is not host:port: {e}",
                self.coordinator
            ))
        })?;
        match tls {
            None => Ok(endpoint),
            Some(tls) => endpoint
                .tls_config(tls.client_tls())
                .map_err(|e| WorkerError::InvalidOptions(format!("cluster TLS: {e}"))),
        }
    }
}

/// Entry points of the fuzz targets in `fuzz/`: the checks every protocol message passes
/// before it reaches a shard. Not part of the worker's API.
#[doc(hidden)]
pub mod fuzzing {
    use tessera_model::ModelConfig;
    use tessera_proto::worker::v1 as pb;
    use tessera_runtime::{KvSpec, StepRequest};

    use crate::{convert, service, WorkerError};

    /// The limits a CPU worker holds its steps to after an accepted `Assign`.
    #[derive(Debug, Clone)]
    pub struct Assigned {
        config: ModelConfig,
        kv: KvSpec,
        max_step_tokens: usize,
    }

    /// Checks an `Assign` request as a CPU worker does.
    pub fn assign(req: &pb::AssignRequest) -> Result<Assigned, WorkerError> {
        let (config, kv, max_step_tokens) = service::step_limits(req)?;
        Ok(Assigned {
            config,
            kv,
            max_step_tokens,
        })
    }

    impl Assigned {
        /// A `Step` request as this worker takes it: converted, then checked as the shard
        /// checks it before touching any state.
        pub fn step(&self, req: pb::StepRequest) -> Result<StepRequest, WorkerError> {
            let step = convert::step_request(req, self.max_step_tokens)?;
            step.validate(&self.config, &self.kv)?;
            Ok(step)
        }
    }
}

/// Runs a worker: serves the `Worker` service, registers with the coordinator (retrying
/// while it is not up, for up to `coordinator_timeout`), then serves until `shutdown`
/// resolves (`Ok`) or the coordinator goes silent for `coordinator_timeout`
/// ([`WorkerError::LostCoordinator`]). A refused registration is an error too. On return
/// the shard, its thread and its connections are gone.
pub async fn run_worker(
    opts: WorkerOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), WorkerError> {
    let tls = opts.cluster_tls.as_ref().map(|f| f.load()).transpose()?;
    let endpoint = opts.check(tls.as_ref())?;
    let gpu = opts.probe_cuda()?;
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .map_err(|source| WorkerError::Listen {
            addr: opts.listen,
            source,
        })?;
    let addr = listener
        .local_addr()
        .map_err(|source| WorkerError::Listen {
            addr: opts.listen,
            source,
        })?;
    info!("worker serving on {addr}");

    let (generation_tx, generation_rx) = watch::channel(None);
    let device = opts.device(gpu);
    let service = WorkerService::new(generation_rx, addr.ip(), device.clone());
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    // With the cluster's TLS only the coordinator, holding a certificate the cluster CA
    // signed, gets past the handshake.
    let acceptor = tls.as_ref().map(ClusterTls::acceptor).transpose()?;
    let mut server = tokio::spawn(tessera_tls::serve_grpc(
        Server::builder().add_service(
            WorkerServer::new(service.clone()).max_decoding_message_size(MAX_MESSAGE_BYTES),
        ),
        listener,
        acceptor,
        "worker service",
        async {
            let _ = stop_rx.await;
        },
    ));

    tokio::pin!(shutdown);
    let mut server_done = false;
    let outcome = async {
        let registered = tokio::select! {
            r = register(&opts, &device, &endpoint, addr.port()) => r?,
            _ = &mut shutdown => return Ok(()),
            r = &mut server => {
                server_done = true;
                return server_exit(r);
            }
        };
        info!(
            worker_id = registered.worker_id,
            generation = registered.generation,
            heartbeat_ms = registered.heartbeat_ms,
            "registered with the coordinator at {}",
            opts.coordinator
        );
        let heartbeat = Duration::from_millis(registered.heartbeat_ms.into());
        if heartbeat * 2 > opts.coordinator_timeout {
            warn!(
                "the coordinator's heartbeat of {heartbeat:?} is close to the coordinator \
                 timeout of {:?}; the worker may give up on a live coordinator",
                opts.coordinator_timeout
            );
        }
        service.contact().touch();
        let _ = generation_tx.send(Some(registered.generation));
        let tick = (opts.coordinator_timeout / 10)
            .clamp(Duration::from_millis(10), Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = &mut shutdown => return Ok(()),
                r = &mut server => {
                    server_done = true;
                    return server_exit(r);
                }
                _ = tokio::time::sleep(tick) => {
                    let silent = service.contact().silence();
                    if silent >= opts.coordinator_timeout {
                        return Err(WorkerError::LostCoordinator {
                            addr: opts.coordinator.clone(),
                            silent: opts.coordinator_timeout,
                        });
                    }
                }
            }
        }
    }
    .await;

    let _ = stop_tx.send(());
    if !server_done
        && tokio::time::timeout(SERVER_DRAIN, &mut server)
            .await
            .is_err()
    {
        server.abort();
    }
    service.release(false).await;
    info!("worker stopped");
    outcome
}

fn server_exit(
    r: Result<Result<(), tonic::transport::Error>, tokio::task::JoinError>,
) -> Result<(), WorkerError> {
    match r {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.into()),
        Err(e) => Err(WorkerError::ServerStopped(e.to_string())),
    }
}

/// Calls `Cluster.Register` until the coordinator takes the worker, backing off while it
/// is not reachable or has no vacant slot, for up to `coordinator_timeout`.
async fn register(
    opts: &WorkerOptions,
    device: &Device,
    endpoint: &Endpoint,
    port: u16,
) -> Result<RegisterResponse, WorkerError> {
    // A simulated device is a machine of its own, with the profile's memory; so is a GPU,
    // with its free memory: the coordinator sizes each memory pool on its own.
    let (hostname, memory_available_bytes) = match device {
        Device::Sim(sim) => (
            format!("{}/sim-{}", hostname(), std::process::id()),
            sim.hardware.memory_bytes,
        ),
        Device::Cuda(gpu) => (
            format!("{}/cuda:{}", hostname(), gpu.ordinal),
            gpu.free_memory_bytes,
        ),
        Device::Cpu { .. } => (hostname(), memory::available_memory_bytes().unwrap_or(0)),
    };
    let request = RegisterRequest {
        port: port.into(),
        advertise_host: opts.advertise_host.clone().unwrap_or_default(),
        backend: opts.backend.clone(),
        threads: opts.threads.min(u32::MAX as usize) as u32,
        hostname,
        memory_available_bytes,
        pid: std::process::id(),
    };
    let started = Instant::now();
    let deadline = started + opts.coordinator_timeout;
    let mut backoff = REGISTER_BACKOFF.0;
    let mut last_error: Option<String> = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let attempt = async {
            let channel = endpoint.connect().await.map_err(Err)?;
            ClusterClient::new(channel)
                .register(request.clone())
                .await
                .map(tonic::Response::into_inner)
                .map_err(Ok)
        };
        // `Err(Ok(status))`: the coordinator answered; `Err(Err(e))`: it could not be reached.
        let outcome = tokio::time::timeout(left, attempt).await;
        // A refused certificate does not get better by trying again.
        if let Ok(Err(e)) = &outcome {
            let failure = match e {
                Ok(status) => HandshakeFailure::find(status),
                Err(transport) => HandshakeFailure::find(transport),
            };
            if let Some(failure) = failure {
                return Err(WorkerError::Handshake {
                    addr: opts.coordinator.clone(),
                    failure: failure.describe("the coordinator"),
                });
            }
        }
        let error = match outcome {
            Ok(Ok(registered)) => return Ok(registered),
            // A full cluster frees a slot when it loses a worker: keep trying.
            Ok(Err(Ok(s)))
                if !matches!(
                    s.code(),
                    Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted
                ) =>
            {
                return Err(WorkerError::RegistrationRefused {
                    addr: opts.coordinator.clone(),
                    code: s.code(),
                    message: s.message().to_string(),
                });
            }
            Ok(Err(Ok(s))) => s.message().to_string(),
            Ok(Err(Err(e))) => error::chain(&e),
            // An attempt cut short by the deadline says less than the one before it.
            Err(_) => last_error.take().unwrap_or_else(|| "no answer".to_string()),
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(WorkerError::CoordinatorUnreachable {
                addr: opts.coordinator.clone(),
                waited: opts.coordinator_timeout,
                last_error: error,
            });
        }
        tracing::debug!(
            "coordinator at {} not reachable yet: {error}",
            opts.coordinator
        );
        last_error = Some(error);
        tokio::time::sleep(backoff.min(left)).await;
        backoff = (backoff * 2).min(REGISTER_BACKOFF.1);
    }
}

/// This machine's name, for the coordinator's logs.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default()
}
