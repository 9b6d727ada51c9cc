//! Bring-up and the life of a coordinator: listen, wait for the workers, assign their
//! shards, open their collectives, load, warm up, serve, watch their health.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tessera_model::{ModelConfig, ShardPlan, Tokenizer};
use tessera_proto::v1::generation_server::GenerationServer;
use tessera_proto::v1::{ModelInfoResponse, WorkerInfo};
use tessera_proto::worker::v1 as pb;
use tessera_proto::worker::v1::cluster_server::ClusterServer;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::Server;
use tonic_health::ServingStatus;
use tracing::{info, warn};

use crate::api::GenerationService;
use crate::blocks::BlockManager;
use crate::config::{defaults, CoordinatorConfig, ModelSource};
use crate::error::StartError;
use crate::membership::Membership;
use crate::registration::RegistrationListener;
use crate::scheduler::{BatchLimits, Scheduler};
use crate::state::{fail, ClusterState, StateRx, StateTx};
use crate::tls::CoordinatorTls;
use crate::workers::{ShardedClient, WorkerClient};

/// A running coordinator.
pub struct Coordinator {
    addr: SocketAddr,
    http_addr: Option<SocketAddr>,
    registration_addr: Option<SocketAddr>,
    state: StateRx,
    stop: watch::Sender<bool>,
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
            .add_service(
                GenerationServer::new(api.clone())
                    .max_decoding_message_size(defaults::MAX_MESSAGE_BYTES),
            )
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
                let app = crate::http::router(api.clone());
                let http_tls = tls.http()?;
                let task = tokio::spawn(async move {
                    let stopped = async move {
                        let _ = rx.wait_for(|s| *s).await;
                    };
                    // Without TCP_NODELAY each streamed event after the first waits for
                    // the client's delayed ACK (up to 40 ms on Linux), which bunches
                    // tokens and adds that much to the time to first token. (The TLS
                    // listener sets it itself.)
                    let served = match http_tls {
                        None => {
                            let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
                                let _ = tcp.set_nodelay(true);
                            });
                            axum::serve(listener, app)
                                .with_graceful_shutdown(stopped)
                                .await
                        }
                        Some(tls) => {
                            axum::serve(tls.incoming(listener, "HTTP API"), app)
                                .with_graceful_shutdown(stopped)
                                .await
                        }
                    };
                    if let Err(e) = served {
                        warn!("HTTP server: {e}");
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
        let (scheduler, handle) = Scheduler::new(
            workers.clone(),
            BlockManager::new(self.kv_blocks, self.config.kv_block_tokens),
            BatchLimits {
                max_seqs: self.config.max_batch_seqs,
                max_tokens: self.config.max_batch_tokens,
                max_queued: self.config.max_queued,
            },
            self.tokenizer.clone(),
            self.model_config.eos_token_id,
            self.state_tx.clone(),
            1,
        );
        self.api.serve(handle, self.model_info(&workers));
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
            workers.clone(),
            self.state_tx.clone(),
            self.config.heartbeat,
            self.config.worker_timeout,
        ));
        let _ = stop.wait_for(|s| *s).await;
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
        workers.release().await;
        Ok(())
    }

    fn starting(&self, what: String) {
        self.state_tx.send_replace(ClusterState::Starting(what));
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
        let clients = registered
            .iter()
            .zip(&self.plan.shards)
            .map(|(r, s)| WorkerClient::new(r, s.clone(), self.worker_tls.as_ref()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(StartError::BringUp)?;
        let mut workers = ShardedClient::new(clients, self.generation);
        let result = self.bring_up_workers(&mut workers).await;
        if result.is_err() {
            workers.release().await;
        }
        result.map(|()| workers)
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

        self.starting("opening collectives".into());
        let token: [u8; 16] = rand::random();
        let at = |i: usize, port: u32| {
            SocketAddr::new(workers.workers[i].address.ip(), port as u16).to_string()
        };
        let timeout_ms = self.config.connect_timeout.as_millis() as u32;
        workers
            .all("OpenCollectives", |mut c, w| {
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
                let req = pb::OpenCollectivesRequest {
                    generation,
                    tp_peers,
                    next_stage,
                    token: token.to_vec(),
                    timeout_ms,
                    io_timeout_ms: defaults::COLLECTIVE_IO_TIMEOUT_MS as u32,
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
                "shard loaded"
            );
        }

        self.starting("warming up".into());
        let warm = pb::StepRequest {
            generation,
            step_id: 1,
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
/// within `timeout` fails the cluster, which aborts the step in flight.
async fn monitor(workers: ShardedClient, state: StateTx, every: Duration, timeout: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if *state.borrow() != ClusterState::Serving {
            continue;
        }
        if let Err(message) = workers.health(timeout).await {
            warn!("health check failed: {message}");
            fail(&state, message);
        }
    }
}
