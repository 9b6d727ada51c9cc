//! Bring-up and the life of a coordinator: listen, wait for the workers, assign their
//! shards, open their collectives, load, warm up, serve, watch their health, and rebuild
//! the cluster when a worker is lost.
//!
//! Recovery: a failed step or a silent worker puts the cluster in `Recovering`. The
//! workers that do not answer a health check within the worker timeout are taken out of
//! their slots (and reported on [`Coordinator::take_vacated`], so a supervisor can end a
//! hung process); the others are released keeping their weights, which breaks their
//! collectives. The next workers to register get the vacant shards, bring-up runs again
//! on every worker with the same KV-cache size (a survivor takes its new collective group
//! without reading its weights again), and the scheduler takes the new set and prefills
//! its sequences again. Past the recovery timeout the waiting requests end with UNAVAILABLE
//! (`Failed`), and the cluster goes on waiting for a replacement.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics::{counter, histogram};
use tessera_model::{ModelConfig, ShardPlan, Tokenizer};
use tessera_proto::v1::generation_server::GenerationServer;
use tessera_proto::v1::{ModelInfoResponse, WorkerInfo};
use tessera_proto::worker::v1 as pb;
use tessera_proto::worker::v1::cluster_server::ClusterServer;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Server;
use tonic_health::ServingStatus;
use tracing::{info, warn};

/// How long a recovery waits for a worker to answer a health check before it takes the
/// worker out (a live worker answers in milliseconds, even mid-step; the failure was
/// already detected, so this only tells the lost from the survivors).
const RECOVERY_PROBE: Duration = Duration::from_secs(2);
/// Pause before a recovery tries the same workers again.
const RETRY_PAUSE: Duration = Duration::from_secs(1);

use crate::api::GenerationService;
use crate::auth::{ApiKeys, GrpcAuth};
use crate::blocks::BlockManager;
use crate::collectives::{choose_transport, nccl_id_counts, relay_nccl_ids, Transport};
use crate::config::{defaults, CoordinatorConfig, ModelSource};
use crate::error::StartError;
use crate::membership::{Membership, Registered};
use crate::metrics as m;
use crate::registration::RegistrationListener;
use crate::scheduler::{BatchLimits, Scheduler};
use crate::state::{fail, recover, ClusterState, StateRx, StateTx};
use crate::tls::CoordinatorTls;
use crate::workers::{ShardedClient, WorkerClient};

/// A running coordinator.
pub struct Coordinator {
    addr: SocketAddr,
    http_addr: Option<SocketAddr>,
    registration_addr: Option<SocketAddr>,
    state: StateRx,
    stop: watch::Sender<bool>,
    vacated: Option<mpsc::UnboundedReceiver<Registered>>,
    task: JoinHandle<Result<(), StartError>>,
}

/// What bring-up needs to know about the model.
struct Model {
    config: ModelConfig,
    tokenizer: Tokenizer,
    weights: pb::model_spec::Weights,
}

fn open_model(source: &ModelSource) -> Result<Model, StartError> {
    Ok(match source {
        ModelSource::Checkpoint(dir) => Model {
            config: ModelConfig::from_hf_dir(dir)?,
            tokenizer: Tokenizer::for_checkpoint(dir)?,
            weights: pb::model_spec::Weights::CheckpointDir(dir.display().to_string()),
        },
        ModelSource::Synthetic { preset, seed } => Model {
            config: ModelConfig::preset(preset)?,
            tokenizer: Tokenizer::gpt2(),
            weights: pb::model_spec::Weights::SyntheticSeed(*seed),
        },
    })
}

impl Coordinator {
    /// Opens the listener and starts bring-up in the background. Returns once the
    /// listener is bound; [`Coordinator::state`] tells when the cluster serves.
    pub async fn start(config: CoordinatorConfig) -> Result<Coordinator, StartError> {
        config.validate()?;
        crate::metrics::recorder();
        let model = open_model(&config.model)?;
        let api_keys = config
            .api_key_file
            .as_deref()
            .map(ApiKeys::load)
            .transpose()?;
        if let Some(keys) = &api_keys {
            info!("the public APIs require one of {} API keys", keys.len());
        }
        let api_keys = api_keys.map(Arc::new);
        let plan = ShardPlan::new(&model.config, config.tp, config.pp)?;
        if let Some(bytes) = config.kv_cache_bytes {
            // An explicit size that cannot hold a block of the smallest elements (bf16) is
            // an error before any worker comes.
            crate::blocks::kv_blocks_for_bytes(&model.config, &plan, &config, bytes, 2)?;
        }
        let world = plan.world_size();
        let generation = rand::random::<u64>() | 1;
        let tls = CoordinatorTls::load(&config)?;

        let listener = tokio::net::TcpListener::bind(&config.listen)
            .await
            .map_err(|source| StartError::Listen {
                addr: config.listen.clone(),
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| StartError::Listen {
            addr: config.listen.clone(),
            source,
        })?;

        let (state_tx, state_rx) = watch::channel(ClusterState::Starting(format!(
            "0 of {world} workers registered"
        )));
        let membership = Membership::new(world, generation, config.heartbeat.as_millis() as u32);
        let config_arc = Arc::new(model.config.clone());
        let tokenizer = Arc::new(model.tokenizer);
        let api = GenerationService::new(config_arc, tokenizer.clone(), state_rx.clone());

        let (health, health_service) = tonic_health::server::health_reporter();
        // Both reflection versions: current tools ask v1, older ones v1alpha. Only the
        // public services are advertised; the worker protocol shares the listener but is
        // not an API for clients.
        let reflection_builder = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(tessera_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                .with_service_name("tessera.v1.Generation")
                .with_service_name("grpc.health.v1.Health")
        };
        let reflection = reflection_builder()
            .build_v1()
            .map_err(|e| StartError::Config(format!("reflection: {e}")))?;
        let reflection_alpha = reflection_builder()
            .build_v1alpha()
            .map_err(|e| StartError::Config(format!("reflection: {e}")))?;
        let (stop, stop_rx) = watch::channel(false);

        let server_stop = {
            let mut rx = stop_rx.clone();
            async move {
                let _ = rx.wait_for(|s| *s).await;
            }
        };
        let registration = match config.registration_listen() {
            None => None,
            Some(at) => Some(
                RegistrationListener::open(
                    at,
                    membership.clone(),
                    tls.registration()?,
                    stop_rx.clone(),
                )
                .await?,
            ),
        };
        let grpc_tls = tls.grpc()?;
        let router = Server::builder()
            .tcp_nodelay(true)
            .add_service(health_service)
            .add_service(reflection)
            .add_service(reflection_alpha)
            .add_service(InterceptedService::new(
                GenerationServer::new(api.clone())
                    .max_decoding_message_size(defaults::MAX_MESSAGE_BYTES),
                GrpcAuth::new(api_keys.clone()),
            ))
            .add_optional_service(
                registration
                    .is_none()
                    .then(|| ClusterServer::new(membership.clone())),
            );
        let server = tokio::spawn(tessera_tls::serve_grpc(
            router,
            listener,
            grpc_tls,
            "gRPC API",
            server_stop,
        ));

        let http = match &config.http_listen {
            None => None,
            Some(at) => {
                let listener = tokio::net::TcpListener::bind(at).await.map_err(|source| {
                    StartError::Listen {
                        addr: at.clone(),
                        source,
                    }
                })?;
                let addr = listener.local_addr().map_err(|source| StartError::Listen {
                    addr: at.clone(),
                    source,
                })?;
                let mut rx = stop_rx.clone();
                let read_timeout = config.http_read_timeout;
                let app = crate::http::router(api.clone(), api_keys.clone(), read_timeout);
                let http_tls = tls.http()?;
                let task = tokio::spawn(async move {
                    let stopped = async move {
                        let _ = rx.wait_for(|s| *s).await;
                    };
                    match http_tls {
                        None => {
                            let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
                                // Without TCP_NODELAY each streamed event after the first
                                // waits for the client's delayed ACK (up to 40 ms on
                                // Linux), which bunches tokens and adds that much to the
                                // time to first token. (The TLS listener sets it itself.)
                                let _ = tcp.set_nodelay(true);
                            });
                            crate::http::serve(listener, app, read_timeout, stopped).await
                        }
                        Some(tls) => {
                            let listener = tls.incoming(listener, "HTTP API");
                            crate::http::serve(listener, app, read_timeout, stopped).await
                        }
                    }
                });
                info!(%addr, "OpenAI-compatible HTTP API listening");
                Some((addr, task))
            }
        };
        let http_addr = http.as_ref().map(|(a, _)| *a);

        // Health follows the cluster state: SERVING only while every worker is ready.
        {
            let mut rx = state_rx.clone();
            tokio::spawn(async move {
                loop {
                    let status = if *rx.borrow_and_update() == ClusterState::Serving {
                        ServingStatus::Serving
                    } else {
                        ServingStatus::NotServing
                    };
                    health.set_service_status("", status).await;
                    health
                        .set_service_status("tessera.v1.Generation", status)
                        .await;
                    if rx.changed().await.is_err() {
                        break;
                    }
                }
            });
        }
        let registration_addr = registration.as_ref().map(|r| r.addr);
        match registration_addr {
            None => info!(%addr, "coordinator listening (gRPC API and worker registration)"),
            Some(_) => info!(%addr, "coordinator listening (gRPC API)"),
        }

        let (vacated_tx, vacated) = mpsc::unbounded_channel();
        let bring_up = BringUp {
            config,
            model_config: model.config,
            weights: model.weights,
            plan,
            kv_blocks: 0,
            generation,
            membership,
            tokenizer,
            api,
            state_tx,
            stop: stop_rx,
            vacated: vacated_tx,
            recovering: None,
            worker_tls: tls.workers(),
        };
        let task = tokio::spawn(async move {
            let result = bring_up.run().await;
            // Whatever ended the coordinator, the listeners close with it.
            server.abort();
            if let Some((_, task)) = http {
                task.abort();
            }
            if let Some(r) = registration {
                r.task.abort();
            }
            result
        });
        Ok(Coordinator {
            addr,
            http_addr,
            registration_addr,
            state: state_rx,
            stop,
            vacated: Some(vacated),
            task,
        })
    }

    /// The bound address of the gRPC listener.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The bound address of the HTTP API, when it listens.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// Where workers register: the registration listener when there is one, else the
    /// gRPC listener.
    pub fn registration_addr(&self) -> SocketAddr {
        self.registration_addr.unwrap_or(self.addr)
    }

    /// The cluster's state, to watch for `Serving` or `Failed`.
    pub fn state(&self) -> StateRx {
        self.state.clone()
    }

    /// The workers taken out of the cluster because they died or hung, as they are found;
    /// `None` after the first call. A supervisor of worker processes ends the ones that
    /// still run (a hung process) so it can start replacements.
    pub fn take_vacated(&mut self) -> Option<mpsc::UnboundedReceiver<Registered>> {
        self.vacated.take()
    }

    /// A handle that stops the coordinator when sent `true`.
    pub fn stopper(&self) -> watch::Sender<bool> {
        self.stop.clone()
    }

    /// Waits until the coordinator ends: an error when bring-up failed.
    pub async fn wait(self) -> Result<(), StartError> {
        match self.task.await {
            Ok(r) => r,
            Err(e) => Err(StartError::BringUp(format!(
                "the coordinator task ended: {e}"
            ))),
        }
    }
}

struct BringUp {
    config: CoordinatorConfig,
    model_config: ModelConfig,
    weights: pb::model_spec::Weights,
    plan: ShardPlan,
    kv_blocks: usize,
    generation: u64,
    membership: Membership,
    tokenizer: Arc<Tokenizer>,
    api: GenerationService,
    state_tx: StateTx,
    stop: watch::Receiver<bool>,
    /// Where workers taken out of the cluster are reported.
    vacated: mpsc::UnboundedSender<Registered>,
    /// While recovering: the failure that started it.
    recovering: Option<String>,
    /// How to dial the workers; `None`: plaintext.
    worker_tls: Option<tonic::transport::ClientTlsConfig>,
}

impl BringUp {
    async fn run(mut self) -> Result<(), StartError> {
        let mut stop = self.stop.clone();
        let workers = tokio::select! {
            w = self.bring_up() => w,
            _ = stop.wait_for(|s| *s) => {
                self.state_tx.send_replace(ClusterState::Stopping);
                return Ok(());
            }
        };
        let workers = match workers {
            Ok(w) => w,
            Err(e) => {
                fail(&self.state_tx, e.to_string());
                return Err(e);
            }
        };
        let (cluster_tx, cluster) = watch::channel(workers);
        let (scheduler, handle) = Scheduler::new(
            cluster.clone(),
            BlockManager::new(self.kv_blocks, self.config.kv_block_tokens),
            BatchLimits {
                max_seqs: self.config.max_batch_seqs,
                max_tokens: self.config.max_batch_tokens,
                max_queued: self.config.max_queued,
            },
            self.tokenizer.clone(),
            self.model_config.eos_token_id,
            self.state_tx.clone(),
        );
        self.api.serve(handle, self.model_info(&cluster.borrow()));
        self.state_tx.send_replace(ClusterState::Serving);
        info!(
            model = %self.model_config.name,
            tp = self.plan.tp,
            pp = self.plan.pp,
            kv_blocks = self.kv_blocks,
            kv_block_tokens = self.config.kv_block_tokens,
            "cluster serving"
        );
        let scheduler = tokio::spawn(scheduler.run());
        let monitor = tokio::spawn(monitor(
            cluster.clone(),
            self.state_tx.clone(),
            self.config.heartbeat,
            self.config.worker_timeout,
        ));
        // Serve, rebuilding the cluster each time a worker is lost, until stopped.
        let mut state = self.state_tx.subscribe();
        loop {
            let lost = tokio::select! {
                r = state.wait_for(|s| matches!(s, ClusterState::Recovering(_))) => r.is_ok(),
                _ = stop.wait_for(|s| *s) => false,
            };
            if !lost {
                break;
            }
            let current = cluster.borrow().clone();
            let rebuilt = tokio::select! {
                w = self.recover(current) => w,
                _ = stop.wait_for(|s| *s) => break,
            };
            self.api.set_info(self.model_info(&rebuilt));
            cluster_tx.send_replace(rebuilt);
            self.state_tx.send_replace(ClusterState::Serving);
        }
        self.state_tx.send_replace(ClusterState::Stopping);
        monitor.abort();
        if let Ok(timing) = scheduler.await {
            if timing.steps > 0 {
                info!(
                    steps = timing.steps,
                    mean_step_ms = timing.wall.as_secs_f64() * 1e3 / timing.steps as f64,
                    mean_compute_ms = timing.compute.as_secs_f64() * 1e3 / timing.steps as f64,
                    "scheduler stopped"
                );
            }
        }
        let workers = cluster.borrow().clone();
        workers.release(false).await;
        Ok(())
    }

    /// Rebuilds the cluster after a worker was lost, and returns the new set of workers,
    /// warmed up. Each attempt takes the workers that do not answer out of their slots,
    /// releases the others, waits for every slot to be taken, and brings all of them up
    /// again; an attempt that fails (another worker lost meanwhile, a replacement that
    /// cannot load) starts over. Once the recovery timeout passes, the cluster is marked
    /// failed, which ends the waiting requests, and recovery goes on.
    async fn recover(&mut self, mut workers: ShardedClient) -> ShardedClient {
        let started = Instant::now();
        let deadline = started + self.config.recovery_timeout;
        let cause = match &*self.state_tx.borrow() {
            ClusterState::Recovering(why) => why.clone(),
            other => format!("{other:?}"),
        };
        self.recovering = Some(cause.clone());
        loop {
            let dead = workers
                .unreachable(self.config.worker_timeout.min(RECOVERY_PROBE))
                .await;
            for &i in &dead {
                counter!(m::WORKER_FAILURES).increment(1);
                warn!(worker = %workers.workers[i].name(), "worker lost; its shard is vacant");
                if let Some(gone) = self.membership.vacate(i) {
                    let _ = self.vacated.send(gone);
                }
            }
            let alive: Vec<usize> = (0..workers.workers.len())
                .filter(|i| !dead.contains(i))
                .collect();
            // The survivors keep their weights: each is assigned the same shard again.
            workers.release_only(&alive, true).await;
            if dead.is_empty() {
                // Nobody to replace: the failure was the step's own (a worker that failed
                // it and lives on). Pause before trying the same workers again.
                tokio::time::sleep(RETRY_PAUSE).await;
            }
            if let Err(e) = self.await_replacements(&workers, &dead, deadline).await {
                warn!("recovery: {e}");
                continue;
            }
            let attempt = match self.clients() {
                Ok(w) => w,
                Err(e) => {
                    warn!("recovery: {e}");
                    continue;
                }
            };
            workers = attempt;
            match self.bring_up_workers(&mut workers).await {
                Ok(()) => {
                    let took = started.elapsed();
                    counter!(m::RECOVERIES).increment(1);
                    histogram!(m::RECOVERY_DURATION).record(took.as_secs_f64());
                    info!(
                        ms = took.as_millis() as u64,
                        "cluster rebuilt after losing a worker ({cause}); serving again"
                    );
                    self.recovering = None;
                    return workers;
                }
                Err(e) => {
                    warn!("recovery: bringing the workers up again failed: {e}");
                    workers.release(true).await;
                    if Instant::now() >= deadline {
                        self.give_up_waiting(&format!("the rebuilt cluster failed: {e}"));
                    }
                }
            }
        }
    }

    /// Waits until every slot is taken. Past `deadline` the cluster is marked failed (the
    /// waiting requests end with UNAVAILABLE) and the wait goes on.
    async fn await_replacements(
        &self,
        old: &ShardedClient,
        vacant: &[usize],
        deadline: Instant,
    ) -> Result<(), StartError> {
        let world = self.plan.world_size();
        let mut count = self.membership.watch_count();
        loop {
            let n = *count.borrow_and_update();
            if n >= world {
                return Ok(());
            }
            let shards: Vec<String> = vacant.iter().map(|&i| old.workers[i].name()).collect();
            self.starting(format!(
                "waiting for {} worker(s) to take over from {}",
                world - n,
                shards.join(", ")
            ));
            if Instant::now() >= deadline {
                self.give_up_waiting(&format!(
                    "no worker took over from {} within {} s",
                    shards.join(", "),
                    self.config.recovery_timeout.as_secs_f64()
                ));
                if count.changed().await.is_err() {
                    return Err(StartError::BringUp("registry closed".into()));
                }
            } else if let Ok(Err(_)) =
                tokio::time::timeout_at(deadline.into(), count.changed()).await
            {
                return Err(StartError::BringUp("registry closed".into()));
            }
        }
    }

    /// Ends the requests waiting on a recovery that is taking too long: the cluster is
    /// marked failed, which the scheduler answers with UNAVAILABLE, and new requests are
    /// refused until it serves again.
    fn give_up_waiting(&self, why: &str) {
        let cause = self.recovering.clone().unwrap_or_default();
        fail(&self.state_tx, format!("{cause}; {why}"));
    }

    /// Says how far bring-up (or a recovery) got.
    fn starting(&self, what: String) {
        match &self.recovering {
            None => {
                self.state_tx.send_replace(ClusterState::Starting(what));
            }
            Some(cause) => {
                self.state_tx.send_if_modified(|s| match s {
                    ClusterState::Recovering(_) => {
                        *s = ClusterState::Recovering(format!("{cause}; {what}"));
                        true
                    }
                    _ => false,
                });
            }
        }
    }

    async fn bring_up(&mut self) -> Result<ShardedClient, StartError> {
        let world = self.plan.world_size();
        let mut count = self.membership.watch_count();
        let deadline = Instant::now() + self.config.register_timeout;
        loop {
            let n = *count.borrow_and_update();
            self.starting(format!("{n} of {world} workers registered"));
            if n >= world {
                break;
            }
            info!("waiting for workers: {n} of {world} registered");
            match tokio::time::timeout_at(deadline.into(), count.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(StartError::BringUp("registry closed".into())),
                Err(_) => {
                    return Err(StartError::BringUp(format!(
                        "only {n} of {world} workers registered within {} s",
                        self.config.register_timeout.as_secs()
                    )))
                }
            }
        }
        let registered = self.membership.workers();
        let sizing =
            crate::blocks::kv_blocks(&self.model_config, &self.plan, &self.config, &registered)?;
        self.kv_blocks = sizing.blocks;
        info!(
            kv_blocks = sizing.blocks,
            kv_block_tokens = self.config.kv_block_tokens,
            kv_tokens = sizing.blocks * self.config.kv_block_tokens,
            "KV cache: {}",
            sizing.why
        );
        let mut workers = self.clients()?;
        let result = self.bring_up_workers(&mut workers).await;
        if result.is_err() {
            workers.release(false).await;
        }
        result.map(|()| workers)
    }

    /// Clients of the registered workers, one per shard of the plan.
    fn clients(&self) -> Result<ShardedClient, StartError> {
        let registered = self.membership.workers();
        if registered.len() != self.plan.world_size() {
            return Err(StartError::BringUp(format!(
                "{} of {} workers registered",
                registered.len(),
                self.plan.world_size()
            )));
        }
        let clients = registered
            .iter()
            .zip(&self.plan.shards)
            .map(|(r, s)| WorkerClient::new(r, s.clone(), self.worker_tls.as_ref()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(StartError::BringUp)?;
        Ok(ShardedClient::new(clients, self.generation))
    }

    async fn bring_up_workers(&self, workers: &mut ShardedClient) -> Result<(), StartError> {
        let generation = self.generation;
        let (tp, pp) = (self.plan.tp, self.plan.pp);
        let model = pb::ModelSpec {
            config: Some((&self.model_config).into()),
            weights: Some(self.weights.clone()),
            dtype: self.config.dtype.clone(),
        };
        self.starting("assigning shards".into());
        let kv_blocks = self.kv_blocks as u32;
        let kv_block_tokens = self.config.kv_block_tokens as u32;
        let assigned = workers
            .all("Assign", |mut c, w| {
                let req = pb::AssignRequest {
                    generation,
                    model: Some(model.clone()),
                    tp: tp as u32,
                    pp: pp as u32,
                    stage: w.spec.stage as u32,
                    tp_rank: w.spec.tp_rank as u32,
                    kv_blocks,
                    kv_block_tokens,
                };
                async move { c.assign(req).await }
            })
            .await
            .map_err(StartError::BringUp)?;

        let transport = choose_transport(workers.workers.iter().map(|w| w.backend.as_str()));
        let nccl_ids = match transport {
            Transport::Tcp => None,
            Transport::Nccl => {
                self.starting("making NCCL ids".into());
                Some(self.nccl_ids(workers).await?)
            }
        };
        self.starting("opening collectives".into());
        info!(?transport, "opening collectives");
        let token: [u8; 16] = rand::random();
        let at = |i: usize, port: u32| {
            SocketAddr::new(workers.workers[i].address.ip(), port as u16).to_string()
        };
        let timeout_ms = self.config.connect_timeout.as_millis() as u32;
        let io_timeout_ms = defaults::COLLECTIVE_IO_TIMEOUT_MS as u32;
        workers
            .all("OpenCollectives", |mut c, w| {
                let req = match &nccl_ids {
                    // NCCL: the ids of the worker's groups; the TCP fields stay empty.
                    Some(ids) => pb::OpenCollectivesRequest {
                        generation,
                        timeout_ms,
                        io_timeout_ms,
                        transport: transport.proto().into(),
                        nccl: Some(ids[w.spec.worker].clone()),
                        ..Default::default()
                    },
                    None => {
                        let stage = w.spec.stage;
                        let tp_peers = (0..tp)
                            .map(|r| pb::Endpoint {
                                address: at(stage * tp + r, assigned[stage * tp + r].tp_port),
                            })
                            .collect();
                        let next = stage * tp + tp + w.spec.tp_rank;
                        let next_stage = if stage + 1 < pp {
                            at(next, assigned[next].prev_port)
                        } else {
                            String::new()
                        };
                        pb::OpenCollectivesRequest {
                            generation,
                            tp_peers,
                            next_stage,
                            token: token.to_vec(),
                            timeout_ms,
                            io_timeout_ms,
                            transport: transport.proto().into(),
                            nccl: None,
                        }
                    }
                };
                async move { c.open_collectives(req).await }
            })
            .await
            .map_err(StartError::BringUp)?;

        self.starting("loading weights".into());
        let loaded = workers
            .all("Load", |mut c, _| async move {
                c.load(pb::LoadRequest { generation }).await
            })
            .await
            .map_err(StartError::BringUp)?;
        for (w, l) in workers.workers.iter_mut().zip(&loaded) {
            w.weight_bytes = l.weight_bytes;
            info!(
                worker = %w.name(),
                weight_bytes = l.weight_bytes,
                load_ms = l.load_ms,
                reused = l.reused,
                "shard loaded"
            );
        }

        self.starting("warming up".into());
        let warm = pb::StepRequest {
            generation,
            step_id: crate::workers::WARM_UP_STEP_ID,
            seqs: vec![pb::SeqStep {
                seq_id: 0,
                tokens: vec![self.model_config.eos_token_id],
                start_pos: 0,
                block_table: vec![0],
                sample: Some(pb::SampleSpec {
                    top_p: 1.0,
                    repetition_penalty: 1.0,
                    ..Default::default()
                }),
            }],
        };
        workers
            .step(warm)
            .await
            .map_err(|f| StartError::BringUp(format!("warm-up step: {}", f.message)))?;
        Ok(())
    }

    /// Asks every group's founder for its NCCL ids (`NcclIds`, see [`crate::collectives`])
    /// and returns the ids each worker is given, in plan order.
    async fn nccl_ids(&self, workers: &ShardedClient) -> Result<Vec<pb::NcclGroupIds>, StartError> {
        let (tp, pp, generation) = (self.plan.tp, self.plan.pp, self.generation);
        let counts = nccl_id_counts(tp, pp);
        let founders: Vec<usize> = (0..counts.len()).filter(|&i| counts[i] > 0).collect();
        let answers = workers
            .only("NcclIds", &founders, |mut c, w| {
                let req = pb::NcclIdsRequest {
                    generation,
                    count: counts[w.spec.worker],
                };
                async move { c.nccl_ids(req).await }
            })
            .await
            .map_err(StartError::BringUp)?;
        let mut made = vec![Vec::new(); counts.len()];
        for (&i, answer) in founders.iter().zip(answers) {
            made[i] = answer.ids;
        }
        relay_nccl_ids(tp, pp, &made).map_err(|e| StartError::BringUp(format!("NcclIds: {e}")))
    }

    fn model_info(&self, workers: &ShardedClient) -> ModelInfoResponse {
        let c = &self.model_config;
        ModelInfoResponse {
            name: c.name.clone(),
            vocab_size: c.vocab_size as u32,
            context_length: c.n_positions as u32,
            n_layer: c.n_layer as u32,
            n_embd: c.n_embd as u32,
            n_head: c.n_head as u32,
            eos_token_id: c.eos_token_id,
            parameters: c.param_count(),
            dtype: self.config.dtype.clone(),
            tp: self.plan.tp as u32,
            pp: self.plan.pp as u32,
            kv_blocks: self.kv_blocks as u32,
            kv_block_tokens: self.config.kv_block_tokens as u32,
            tokenizer: self.tokenizer.kind().into(),
            workers: workers
                .workers
                .iter()
                .map(|w| WorkerInfo {
                    address: w.address.to_string(),
                    stage: w.spec.stage as u32,
                    tp_rank: w.spec.tp_rank as u32,
                    first_layer: w.spec.layers.start as u32,
                    end_layer: w.spec.layers.end as u32,
                    weight_bytes: w.weight_bytes,
                    backend: w.backend.clone(),
                })
                .collect(),
        }
    }
}

/// Checks every worker's health each `every`; a worker that fails or does not answer
/// within `timeout` starts a recovery, which abandons the step in flight.
async fn monitor(
    mut cluster: watch::Receiver<ShardedClient>,
    state: StateTx,
    every: Duration,
    timeout: Duration,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if *state.borrow() != ClusterState::Serving {
            continue;
        }
        let workers = cluster.borrow_and_update().clone();
        if let Err(message) = workers.health(timeout).await {
            // A check that straddled a recovery speaks of the old workers.
            if !cluster.has_changed().unwrap_or(true) {
                recover(&state, message);
            }
        }
    }
}
