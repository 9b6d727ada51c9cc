//! Workers driven as the coordinator drives them, against a fake `Cluster` service, with
//! no coordinator process: bring-up, steps compared with `LocalEngine`, refusals, release
//! and re-assignment, and the ways a worker process ends.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tessera_model::{ModelConfig, ShardPlan, SyntheticWeights};
use tessera_proto::worker::v1 as pb;
use tessera_proto::worker::v1::cluster_server::{Cluster, ClusterServer};
use tessera_proto::worker::v1::worker_client::WorkerClient;
use tessera_runtime::{
    CpuBackend, GenerateRequest, LocalEngine, SamplingParams, ShardOptions, WeightDtype,
};
use tessera_worker::{run_worker, WorkerError, WorkerOptions};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Channel, Server};
use tonic::{Code, Request, Response, Status};

const GENERATION: u64 = 7;
const SEED: u64 = 5;
const KV_BLOCKS: u32 = 16;
const BLOCK_TOKENS: u32 = 8;
const PROMPT: [u32; 7] = [464, 2068, 7586, 21831, 18045, 625, 262];

/// A `Cluster` service that records registrations and answers generation 7, or refuses
/// with the given code.
#[derive(Clone, Default)]
struct FakeCoordinator {
    registered: Arc<Mutex<Vec<pb::RegisterRequest>>>,
    refuse: Option<Code>,
}

#[tonic::async_trait]
impl Cluster for FakeCoordinator {
    async fn register(
        &self,
        req: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        match self.refuse {
            Some(Code::ResourceExhausted) => {
                return Err(Status::resource_exhausted(
                    "the cluster has every worker it needs",
                ))
            }
            Some(code) => return Err(Status::new(code, "not this worker")),
            None => {}
        }
        let mut r = self.registered.lock().unwrap();
        r.push(req.into_inner());
        Ok(Response::new(pb::RegisterResponse {
            worker_id: r.len() as u32 - 1,
            generation: GENERATION,
            heartbeat_ms: 100,
        }))
    }
}

impl FakeCoordinator {
    /// Serves on 127.0.0.1; returns the address.
    async fn start(self) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            Server::builder()
                .add_service(ClusterServer::new(self))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        addr
    }

    /// Waits until `n` workers have registered; returns their ports in order.
    async fn ports(&self, n: usize) -> Vec<u32> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ports: Vec<u32> = self
                .registered
                .lock()
                .unwrap()
                .iter()
                .map(|r| r.port)
                .collect();
            if ports.len() >= n {
                return ports;
            }
            assert!(Instant::now() < deadline, "{n} workers did not register");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// A worker process in this test: its task and the switch that stops it.
struct TestWorker {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), WorkerError>>,
}

fn options(coordinator: SocketAddr, timeout: Duration) -> WorkerOptions {
    WorkerOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        threads: 1,
        coordinator_timeout: timeout,
        ..WorkerOptions::new(coordinator.to_string())
    }
}

fn spawn_worker(opts: WorkerOptions) -> TestWorker {
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(run_worker(opts, async {
        let _ = stopped.await;
    }));
    TestWorker {
        stop: Some(stop),
        task,
    }
}

impl TestWorker {
    async fn stop(mut self) -> Result<(), WorkerError> {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap()
    }
}

/// `n` workers of `fake`, started one at a time so that registration order (which gives
/// the ranks) is spawn order, and a client of each in that order.
async fn spawn_in_rank_order(
    fake: &FakeCoordinator,
    coordinator: SocketAddr,
    n: usize,
) -> (Vec<TestWorker>, Vec<WorkerClient<Channel>>) {
    let mut workers = Vec::new();
    for registered in 1..=n {
        workers.push(spawn_worker(options(coordinator, Duration::from_secs(10))));
        fake.ports(registered).await;
    }
    let mut clients = Vec::new();
    for p in fake.ports(n).await {
        clients.push(client(p).await);
    }
    (workers, clients)
}

async fn client(port: u32) -> WorkerClient<Channel> {
    WorkerClient::connect(format!("http://127.0.0.1:{port}"))
        .await
        .unwrap()
}

fn tiny() -> ModelConfig {
    ModelConfig::preset("gpt2-tiny").unwrap()
}

/// gpt2-tiny with synthetic weights of seed 5.
fn synthetic() -> pb::ModelSpec {
    pb::ModelSpec {
        config: Some(pb::ModelConfig::from(&tiny())),
        weights: Some(pb::model_spec::Weights::SyntheticSeed(SEED)),
        dtype: "f32".into(),
    }
}

fn assign(tp: u32, pp: u32, stage: u32, tp_rank: u32) -> pb::AssignRequest {
    assign_model(synthetic(), tp, pp, stage, tp_rank)
}

fn assign_model(
    model: pb::ModelSpec,
    tp: u32,
    pp: u32,
    stage: u32,
    tp_rank: u32,
) -> pb::AssignRequest {
    pb::AssignRequest {
        generation: GENERATION,
        model: Some(model),
        tp,
        pp,
        stage,
        tp_rank,
        kv_blocks: KV_BLOCKS,
        kv_block_tokens: BLOCK_TOKENS,
    }
}

/// Workers of a TP × PP split, in plan order (`stage · tp + tp_rank`).
struct TestCluster {
    tp: u32,
    pp: u32,
    clients: Vec<WorkerClient<Channel>>,
}

/// Runs every call at once (a TP group forms only when all its ranks dial) and returns
/// the answers in order.
async fn all<T: Send + 'static>(
    calls: impl IntoIterator<Item = impl std::future::Future<Output = T> + Send + 'static>,
) -> Vec<T> {
    let handles: Vec<_> = calls.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

impl TestCluster {
    /// Assign, OpenCollectives (all at once) and Load (all at once), as the coordinator's
    /// bring-up does.
    async fn bring_up(
        model: pb::ModelSpec,
        tp: u32,
        pp: u32,
        clients: Vec<WorkerClient<Channel>>,
    ) -> Self {
        let (cluster, loaded) = Self::try_bring_up(model, tp, pp, clients).await;
        for r in loaded {
            assert!(r.unwrap().weight_bytes > 0);
        }
        cluster
    }

    /// Like `bring_up`, but returns what each `Load` answered.
    async fn try_bring_up(
        model: pb::ModelSpec,
        tp: u32,
        pp: u32,
        mut clients: Vec<WorkerClient<Channel>>,
    ) -> (Self, Vec<Result<pb::LoadResponse, Status>>) {
        let mut ports = Vec::new();
        for stage in 0..pp {
            for rank in 0..tp {
                let c = &mut clients[(stage * tp + rank) as usize];
                let req = assign_model(model.clone(), tp, pp, stage, rank);
                let r = c.assign(req).await.unwrap().into_inner();
                assert_eq!(r.prev_port == 0, stage == 0, "prev_port on stage {stage}");
                ports.push(r);
            }
        }
        let opens = clients.iter().enumerate().map(|(i, c)| {
            let mut c = c.clone();
            let (stage, rank) = (i as u32 / tp, i as u32 % tp);
            let tp_peers = (0..tp)
                .map(|r| pb::Endpoint {
                    address: format!("127.0.0.1:{}", ports[(stage * tp + r) as usize].tp_port),
                })
                .collect();
            let next_stage = if stage + 1 < pp {
                format!(
                    "127.0.0.1:{}",
                    ports[((stage + 1) * tp + rank) as usize].prev_port
                )
            } else {
                String::new()
            };
            async move {
                c.open_collectives(pb::OpenCollectivesRequest {
                    generation: GENERATION,
                    tp_peers,
                    next_stage,
                    token: vec![9; 16],
                    timeout_ms: 5000,
                    io_timeout_ms: 5000,
                    transport: pb::CollectiveTransport::Tcp.into(),
                    nccl: None,
                })
                .await
            }
        });
        for r in all(opens).await {
            r.unwrap();
        }
        let loads = clients.iter().map(|c| {
            let mut c = c.clone();
            async move {
                c.load(pb::LoadRequest {
                    generation: GENERATION,
                })
                .await
            }
        });
        let loaded = all(loads)
            .await
            .into_iter()
            .map(|r| r.map(Response::into_inner))
            .collect();
        (TestCluster { tp, pp, clients }, loaded)
    }

    /// Sends one step to every worker at once; returns the reporting worker's results
    /// and checks that exactly the last stage's TP rank 0 reported.
    async fn step(&self, req: pb::StepRequest) -> Result<Vec<pb::SeqResult>, Status> {
        let calls = self.clients.iter().map(|c| {
            let mut c = c.clone();
            let req = req.clone();
            async move { c.step(req).await }
        });
        let answers = all(calls).await;
        let reporter = ((self.pp - 1) * self.tp) as usize;
        let mut results = None;
        for (i, a) in answers.into_iter().enumerate() {
            let a = a?.into_inner();
            assert_eq!(a.reports, i == reporter, "worker {i} reports");
            if a.reports {
                results = Some(a.results);
            } else {
                assert!(a.results.is_empty());
            }
        }
        Ok(results.unwrap())
    }

    async fn release(&self) {
        self.release_keeping(false).await;
    }

    /// `Release` on every worker, keeping loaded weights when asked.
    async fn release_keeping(&self, keep_weights: bool) {
        for c in &self.clients {
            c.clone()
                .release(pb::ReleaseRequest {
                    generation: GENERATION,
                    keep_weights,
                })
                .await
                .unwrap();
        }
    }
}

/// Seeded sampling at temperature 1: the tokens vary from step to step (synthetic
/// weights tend to repeat one token greedily), and the noise of each step depends only on
/// the seed and the position, so every split must pick the same tokens.
const SAMPLING: SamplingParams = SamplingParams {
    temperature: 1.0,
    top_k: 0,
    top_p: 1.0,
    seed: 1234,
    repetition_penalty: 1.0,
};

fn sampling() -> pb::SampleSpec {
    pb::SampleSpec {
        temperature: SAMPLING.temperature,
        top_k: SAMPLING.top_k,
        top_p: SAMPLING.top_p,
        seed: SAMPLING.seed,
        repetition_penalty: SAMPLING.repetition_penalty,
        penalty_ids: vec![],
        return_logits: false,
    }
}

fn step(step_id: u64, tokens: Vec<u32>, start_pos: u32) -> pb::StepRequest {
    step_with(step_id, tokens, start_pos, sampling())
}

fn step_with(
    step_id: u64,
    tokens: Vec<u32>,
    start_pos: u32,
    sample: pb::SampleSpec,
) -> pb::StepRequest {
    pb::StepRequest {
        generation: GENERATION,
        step_id,
        seqs: vec![pb::SeqStep {
            seq_id: 1,
            tokens,
            start_pos,
            block_table: (0..KV_BLOCKS).collect(),
            sample: Some(sample),
        }],
    }
}

/// Tokens and logprobs of `LocalEngine` for the same plan and weights.
async fn reference(tp: usize, pp: usize, n: usize) -> (Vec<u32>, Vec<f32>) {
    tokio::task::spawn_blocking(move || {
        let config = tiny();
        let plan = ShardPlan::new(&config, tp, pp).unwrap();
        let options = ShardOptions {
            dtype: WeightDtype::F32,
            kv_blocks: KV_BLOCKS as usize,
            block_size: BLOCK_TOKENS as usize,
        };
        let source = Arc::new(SyntheticWeights::new(config.clone(), SEED));
        let engine =
            LocalEngine::start(|_| CpuBackend::new(1), &config, plan, source, options).unwrap();
        let g = engine
            .generate(&GenerateRequest {
                prompt_ids: PROMPT.to_vec(),
                max_tokens: n,
                params: SAMPLING,
                ignore_eos: true,
                return_logits: false,
            })
            .unwrap();
        (g.token_ids, g.logprobs)
    })
    .await
    .unwrap()
}

/// Generation through the workers: the prompt as step `first_id`, then decodes;
/// returns the tokens, their logprobs and the next step id.
async fn generate(cluster: &TestCluster, first_id: u64, n: usize) -> (Vec<u32>, Vec<f32>, u64) {
    generate_with(cluster, first_id, n, &PROMPT, sampling()).await
}

async fn generate_with(
    cluster: &TestCluster,
    first_id: u64,
    n: usize,
    prompt: &[u32],
    sample: pb::SampleSpec,
) -> (Vec<u32>, Vec<f32>, u64) {
    let mut id = first_id;
    let mut tokens = Vec::new();
    let mut logprobs = Vec::new();
    let mut input = prompt.to_vec();
    let mut pos = 0u32;
    while tokens.len() < n {
        let r = cluster
            .step(step_with(id, input.clone(), pos, sample.clone()))
            .await
            .unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].seq_id, 1);
        pos += input.len() as u32;
        input = vec![r[0].token_id];
        tokens.push(r[0].token_id);
        logprobs.push(r[0].logprob);
        id += 1;
    }
    (tokens, logprobs, id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_tp_workers_match_the_local_engine_and_refuse_bad_calls() {
    let fake = FakeCoordinator::default();
    let coordinator = fake.clone().start().await;
    let workers: Vec<TestWorker> = (0..2)
        .map(|_| spawn_worker(options(coordinator, Duration::from_secs(10))))
        .collect();
    let want = tokio::spawn(reference(2, 1, 6));
    let ports = fake.ports(2).await;
    {
        let r = fake.registered.lock().unwrap();
        assert!(r.iter().all(|w| w.backend == "cpu" && w.threads == 1));
    }
    let mut clients = Vec::new();
    for p in &ports {
        clients.push(client(*p).await);
    }
    let cluster = TestCluster::bring_up(synthetic(), 2, 1, clients).await;
    let (want_tokens, want_logprobs) = want.await.unwrap();

    // Prefill and two decodes.
    let (mut tokens, mut logprobs, mut next_id) = generate(&cluster, 100, 3).await;
    assert_eq!(tokens, want_tokens[..3]);

    // A token outside the vocabulary: refused by both, and nothing changes.
    let pos = (PROMPT.len() + 2) as u32;
    let bad = cluster
        .step(step(next_id, vec![50257], pos))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument, "{bad:?}");
    assert!(bad.message().contains("tokens"), "{}", bad.message());
    next_id += 1;
    // A repeated step id is out of order.
    let dup = cluster
        .step(step(next_id - 1, vec![*tokens.last().unwrap()], pos))
        .await
        .unwrap_err();
    assert_eq!(dup.code(), Code::FailedPrecondition, "{dup:?}");
    // A stale generation.
    let mut stale = step(next_id, vec![*tokens.last().unwrap()], pos);
    stale.generation = GENERATION + 1;
    let e = cluster.step(stale).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("generation"), "{}", e.message());
    let e = cluster.clients[1]
        .clone()
        .health(pb::HealthRequest { generation: 3 })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);

    // The next good step continues the sequence as if nothing had happened.
    let mut input = vec![*tokens.last().unwrap()];
    let mut pos = pos;
    while tokens.len() < want_tokens.len() {
        let r = cluster.step(step(next_id, input, pos)).await.unwrap();
        tokens.push(r[0].token_id);
        logprobs.push(r[0].logprob);
        input = vec![r[0].token_id];
        pos += 1;
        next_id += 1;
    }
    assert_eq!(tokens, want_tokens);
    // The TCP ring sums in the local collective's order, so the numbers are identical.
    assert_eq!(logprobs, want_logprobs);

    let h = cluster.clients[0]
        .clone()
        .health(pb::HealthRequest {
            generation: GENERATION,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(h.state(), pb::WorkerState::Ready);
    assert_eq!(h.steps, want_tokens.len() as u64);

    // Release, twice (it is idempotent), then the same workers take a new assignment.
    cluster.release().await;
    cluster.release().await;
    let h = cluster.clients[1]
        .clone()
        .health(pb::HealthRequest {
            generation: GENERATION,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(h.state(), pb::WorkerState::Idle);
    let cluster = TestCluster::bring_up(synthetic(), 2, 1, cluster.clients).await;
    let (again, _, _) = generate(&cluster, 0, 2).await;
    assert_eq!(again, want_tokens[..2]);
    cluster.release().await;

    for w in workers {
        w.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_pipeline_stages_match_the_local_engine() {
    let fake = FakeCoordinator::default();
    let coordinator = fake.clone().start().await;
    let workers: Vec<TestWorker> = (0..2)
        .map(|_| spawn_worker(options(coordinator, Duration::from_secs(10))))
        .collect();
    let want = tokio::spawn(reference(1, 2, 4));
    let mut clients = Vec::new();
    for p in fake.ports(2).await {
        clients.push(client(p).await);
    }
    let cluster = TestCluster::bring_up(synthetic(), 1, 2, clients).await;
    let (tokens, logprobs, _) = generate(&cluster, 1, 4).await;
    let (want_tokens, want_logprobs) = want.await.unwrap();
    assert_eq!(tokens, want_tokens);
    assert_eq!(logprobs, want_logprobs);
    cluster.release().await;
    for w in workers {
        w.stop().await.unwrap();
    }
}

/// What a rebuilt cluster does to its survivors: `Release` keeping the weights, then the
/// same assignment again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_kept_shard_takes_a_new_group_without_reading_its_weights_again() {
    let fake = FakeCoordinator::default();
    let coordinator = fake.clone().start().await;
    let (workers, clients) = spawn_in_rank_order(&fake, coordinator, 2).await;
    let (cluster, loaded) = TestCluster::try_bring_up(synthetic(), 2, 1, clients).await;
    assert!(loaded.iter().all(|l| !l.as_ref().unwrap().reused));
    let (want, _, _) = generate(&cluster, 1, 4).await;

    // Kept: the same shards take a new group and give the same tokens, prefilled again
    // from position 0 with step ids starting over.
    cluster.release_keeping(true).await;
    let (cluster, loaded) = TestCluster::try_bring_up(synthetic(), 2, 1, cluster.clients).await;
    for l in &loaded {
        let l = l.as_ref().unwrap();
        assert!(l.reused && l.weight_bytes > 0, "{l:?}");
    }
    assert_eq!(generate(&cluster, 1, 4).await.0, want);

    // Another shard (the ranks swapped) is loaded afresh.
    cluster.release_keeping(true).await;
    let swapped: Vec<_> = cluster.clients.iter().rev().cloned().collect();
    let (cluster, loaded) = TestCluster::try_bring_up(synthetic(), 2, 1, swapped).await;
    assert!(loaded.iter().all(|l| !l.as_ref().unwrap().reused));
    assert_eq!(generate(&cluster, 1, 4).await.0, want);

    // A plain release drops the weights.
    cluster.release().await;
    let (cluster, loaded) = TestCluster::try_bring_up(synthetic(), 2, 1, cluster.clients).await;
    assert!(loaded.iter().all(|l| !l.as_ref().unwrap().reused));
    cluster.release().await;
    for w in workers {
        w.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_out_of_turn_or_with_bad_fields_are_refused() {
    let fake = FakeCoordinator::default();
    let coordinator = fake.clone().start().await;
    let worker = spawn_worker(options(coordinator, Duration::from_secs(10)));
    let mut c = client(fake.ports(1).await[0]).await;

    let e = c.step(step(1, vec![1], 0)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("idle"), "{}", e.message());
    let e = c
        .load(pb::LoadRequest {
            generation: GENERATION,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);

    type Spoil = fn(&mut pb::AssignRequest);
    let fields: [(&str, Spoil); 7] = [
        ("stage", |r| r.stage = 2),
        ("tp_rank", |r| r.tp_rank = 1),
        ("kv_blocks", |r| r.kv_blocks = 0),
        ("kv_block_tokens", |r| r.kv_block_tokens = 0),
        ("model.dtype", |r| {
            r.model.as_mut().unwrap().dtype = "f8".into()
        }),
        ("model.config.n_embd", |r| {
            r.model.as_mut().unwrap().config.as_mut().unwrap().n_embd = 0
        }),
        ("tp × pp", |r| r.tp = 3),
    ];
    for (field, spoil) in &fields {
        let mut req = assign(1, 2, 0, 0);
        spoil(&mut req);
        let e = c.assign(req).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{field}: {e:?}");
        assert!(e.message().contains(field), "{field}: {}", e.message());
    }

    let r = c.assign(assign(1, 2, 1, 0)).await.unwrap().into_inner();
    assert!(r.tp_port > 0 && r.prev_port > 0);
    let e = c.assign(assign(1, 2, 1, 0)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("assigned"), "{}", e.message());
    let open = |token: Vec<u8>, next_stage: &str| pb::OpenCollectivesRequest {
        generation: GENERATION,
        tp_peers: vec![pb::Endpoint {
            address: format!("127.0.0.1:{}", r.tp_port),
        }],
        next_stage: next_stage.into(),
        token,
        timeout_ms: 200,
        io_timeout_ms: 200,
        ..Default::default()
    };
    let e = c.open_collectives(open(vec![1; 15], "")).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("token"), "{}", e.message());
    let e = c
        .open_collectives(open(vec![1; 16], "127.0.0.1:1"))
        .await
        .unwrap_err();
    assert!(e.message().contains("next_stage"), "{}", e.message());
    // No previous stage ever dials: the bring-up fails and the worker says why.
    let e = c.open_collectives(open(vec![1; 16], "")).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    let h = c
        .health(pb::HealthRequest {
            generation: GENERATION,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(h.state(), pb::WorkerState::Failed);
    assert!(h.message.contains("previous stage"), "{}", h.message);
    c.release(pb::ReleaseRequest {
        generation: GENERATION,
        keep_weights: false,
    })
    .await
    .unwrap();
    c.assign(assign(1, 1, 0, 0)).await.unwrap();

    worker.stop().await.unwrap();
}

/// NCCL asked of a CPU worker. A malformed request is INVALID_ARGUMENT naming its field
/// (an id must be exactly 128 bytes, the TCP fields must stay empty, each link's id is
/// present exactly where the stage has that link); a well-formed one is FAILED_PRECONDITION
/// saying why this worker cannot use NCCL. None of it fails the worker: it stays assigned
/// and then opens a TCP group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nccl_is_refused_by_a_cpu_worker_and_malformed_ids_are_named() {
    let fake = FakeCoordinator::default();
    let coordinator = fake.clone().start().await;
    let worker = spawn_worker(options(coordinator, Duration::from_secs(10)));
    let mut c = client(fake.ports(1).await[0]).await;
    let ids = |count| pb::NcclIdsRequest {
        generation: GENERATION,
        count,
    };
    let why_not = if cfg!(feature = "cuda") {
        "runs the cpu backend"
    } else {
        "built without CUDA support"
    };

    let e = c.nccl_ids(ids(1)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("idle"), "{}", e.message());

    // The middle of three stages has a link on each side.
    c.assign(assign(1, 3, 1, 0)).await.unwrap();
    for count in [0, 3] {
        let e = c.nccl_ids(ids(count)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{count}: {e:?}");
        assert!(e.message().contains("count"), "{}", e.message());
    }
    let e = c.nccl_ids(ids(2)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains("NCCL is not available") && e.message().contains(why_not),
        "{}",
        e.message()
    );

    let id = vec![5u8; 128];
    let nccl = || pb::OpenCollectivesRequest {
        generation: GENERATION,
        timeout_ms: 200,
        io_timeout_ms: 200,
        transport: pb::CollectiveTransport::Nccl.into(),
        nccl: Some(pb::NcclGroupIds {
            tp_id: id.clone(),
            prev_id: id.clone(),
            next_id: id.clone(),
        }),
        ..Default::default()
    };
    type Spoil = fn(&mut pb::OpenCollectivesRequest);
    let spoilt: [(&str, &str, Spoil); 10] = [
        ("nccl.tp_id", "127 bytes", |r| {
            r.nccl.as_mut().unwrap().tp_id.pop();
        }),
        ("nccl.tp_id", "0 bytes", |r| {
            r.nccl.as_mut().unwrap().tp_id.clear()
        }),
        ("nccl.prev_id", "129 bytes", |r| {
            r.nccl.as_mut().unwrap().prev_id.push(0)
        }),
        ("nccl.next_id", "missing on stage 1", |r| {
            r.nccl.as_mut().unwrap().next_id.clear()
        }),
        ("nccl", "missing", |r| r.nccl = None),
        ("token", "does not use it", |r| r.token = vec![1; 16]),
        ("tp_peers", "does not use it", |r| {
            r.tp_peers = vec![pb::Endpoint {
                address: "127.0.0.1:9".into(),
            }]
        }),
        ("next_stage", "does not use it", |r| {
            r.next_stage = "127.0.0.1:9".into()
        }),
        ("transport", "9 is not a transport", |r| r.transport = 9),
        ("timeout_ms", "at least 1", |r| r.timeout_ms = 0),
    ];
    for (field, why, spoil) in spoilt {
        let mut req = nccl();
        spoil(&mut req);
        let e = c.open_collectives(req).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{field}: {e:?}");
        assert!(
            e.message().contains(field) && e.message().contains(why),
            "{field}: {}",
            e.message()
        );
    }
    // NCCL ids on a TCP request.
    let e = c
        .open_collectives(pb::OpenCollectivesRequest {
            transport: pb::CollectiveTransport::Tcp.into(),
            ..nccl()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("nccl"), "{}", e.message());
    // Well formed: refused for what the worker is.
    let e = c.open_collectives(nccl()).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains("NCCL is not available") && e.message().contains(why_not),
        "{}",
        e.message()
    );
    let probe = c.clone();
    let health = || async {
        probe
            .clone()
            .health(pb::HealthRequest {
                generation: GENERATION,
            })
            .await
            .unwrap()
            .into_inner()
    };
    assert_eq!(health().await.state(), pb::WorkerState::Assigned);

    // On the first stage a previous link's id is refused; on the last a next link's.
    for (stage, pp, field, place) in [
        (0, 2, "nccl.prev_id", "first stage"),
        (1, 2, "nccl.next_id", "last stage"),
    ] {
        c.release(pb::ReleaseRequest {
            generation: GENERATION,
            keep_weights: false,
        })
        .await
        .unwrap();
        c.assign(assign(1, pp, stage, 0)).await.unwrap();
        let e = c.open_collectives(nccl()).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{field}: {e:?}");
        assert!(
            e.message().contains(field) && e.message().contains(place),
            "{field}: {}",
            e.message()
        );
    }

    // The refusals left the worker able to open its groups over TCP.
    c.release(pb::ReleaseRequest {
        generation: GENERATION,
        keep_weights: false,
    })
    .await
    .unwrap();
    let r = c.assign(assign(1, 1, 0, 0)).await.unwrap().into_inner();
    c.open_collectives(pb::OpenCollectivesRequest {
        generation: GENERATION,
        tp_peers: vec![pb::Endpoint {
            address: format!("127.0.0.1:{}", r.tp_port),
        }],
        token: vec![3; 16],
        timeout_ms: 5000,
        io_timeout_ms: 5000,
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(health().await.state(), pb::WorkerState::Connected);
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn a_silent_coordinator_ends_the_worker() {
    let fake = FakeCoordinator::default();
    let coordinator = fake.clone().start().await;
    let started = Instant::now();
    let e = run_worker(
        options(coordinator, Duration::from_millis(300)),
        std::future::pending(),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, WorkerError::LostCoordinator { .. }), "{e}");
    assert_eq!(
        e.to_string(),
        format!("lost the coordinator at {coordinator}: no contact for 0.3 s")
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(fake.registered.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn a_refused_or_absent_coordinator_is_a_clean_error() {
    let fake = FakeCoordinator {
        refuse: Some(Code::FailedPrecondition),
        ..Default::default()
    };
    let coordinator = fake.start().await;
    let e = run_worker(
        options(coordinator, Duration::from_secs(5)),
        std::future::pending(),
    )
    .await
    .unwrap_err();
    match &e {
        WorkerError::RegistrationRefused { code, .. } => {
            assert_eq!(*code, Code::FailedPrecondition)
        }
        other => panic!("{other}"),
    }

    // A full cluster frees a slot when it loses a worker: the worker keeps trying until
    // its coordinator timeout.
    let full = FakeCoordinator {
        refuse: Some(Code::ResourceExhausted),
        ..Default::default()
    };
    let coordinator = full.start().await;
    let started = Instant::now();
    let e = run_worker(
        options(coordinator, Duration::from_millis(1500)),
        std::future::pending(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(e, WorkerError::CoordinatorUnreachable { .. }),
        "{e}"
    );
    assert!(e.to_string().contains("every worker it needs"), "{e}");
    assert!(started.elapsed() >= Duration::from_millis(1400));

    // Nothing listens on a port just freed.
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let started = Instant::now();
    let e = run_worker(
        options(free, Duration::from_millis(400)),
        std::future::pending(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(e, WorkerError::CoordinatorUnreachable { .. }),
        "{e}"
    );
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert!(started.elapsed() < Duration::from_secs(3));

    let mut opts = options(free, Duration::from_secs(1));
    opts.backend = "cuda".into();
    let e = run_worker(opts, std::future::pending()).await.unwrap_err();
    assert!(e.to_string().contains("--backend cpu"), "{e}");
}

#[tokio::test]
async fn a_worker_registers_late_coordinators_and_stops_on_shutdown() {
    // The coordinator comes up after the worker has started trying.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let worker = spawn_worker(options(port, Duration::from_secs(5)));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let fake = FakeCoordinator::default();
    let listener = tokio::net::TcpListener::bind(port).await.unwrap();
    tokio::spawn(
        Server::builder()
            .add_service(ClusterServer::new(fake.clone()))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    fake.ports(1).await;
    worker.stop().await.unwrap();
}

/// The fixture made by transformers (`tests/fixtures/tiny-gpt2`): its directory, the
/// prompt of its first case and the greedy tokens transformers generated.
fn fixture() -> (String, Vec<u32>, Vec<u32>) {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-gpt2");
    let text = std::fs::read_to_string(dir.join("expected.json")).unwrap();
    let expected: serde_json::Value = serde_json::from_str(&text).unwrap();
    let case = &expected["cases"][0];
    let ids = |key: &str| -> Vec<u32> {
        case[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect()
    };
    (
        dir.display().to_string(),
        ids("prompt_ids"),
        ids("greedy_token_ids"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_checkpoint_loads_only_for_its_own_config_and_matches_transformers() {
    let (dir, prompt, want) = fixture();
    let config = tessera_model::Checkpoint::open(std::path::Path::new(&dir))
        .unwrap()
        .config()
        .clone();
    let fake = FakeCoordinator::default();
    let coordinator = fake.clone().start().await;
    let workers: Vec<TestWorker> = (0..2)
        .map(|_| spawn_worker(options(coordinator, Duration::from_secs(10))))
        .collect();
    let mut clients = Vec::new();
    for p in fake.ports(2).await {
        clients.push(client(p).await);
    }
    let model = |config: &ModelConfig| pb::ModelSpec {
        config: Some(pb::ModelConfig::from(config)),
        weights: Some(pb::model_spec::Weights::CheckpointDir(dir.clone())),
        dtype: "f32".into(),
    };

    // The coordinator believes in another epsilon than the checkpoint's config.json.
    let mut other = config.clone();
    other.layer_norm_epsilon = 1e-6;
    let (cluster, loaded) = TestCluster::try_bring_up(model(&other), 2, 1, clients).await;
    for r in loaded {
        let e = r.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        assert!(
            e.message().contains("layer_norm_epsilon"),
            "{}",
            e.message()
        );
    }
    let h = cluster.clients[0]
        .clone()
        .health(pb::HealthRequest {
            generation: GENERATION,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(h.state(), pb::WorkerState::Failed);
    assert!(h.message.contains("layer_norm_epsilon"), "{}", h.message);
    cluster.release().await;

    let cluster = TestCluster::bring_up(model(&config), 2, 1, cluster.clients).await;
    let greedy = pb::SampleSpec {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        seed: 0,
        repetition_penalty: 1.0,
        penalty_ids: vec![],
        return_logits: false,
    };
    let (tokens, _, _) = generate_with(&cluster, 1, want.len(), &prompt, greedy).await;
    assert_eq!(tokens, want);
    cluster.release().await;
    for w in workers {
        w.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lost_peer_fails_the_step_and_the_worker() {
    let fake = FakeCoordinator::default();
    let coordinator = fake.clone().start().await;
    let (mut workers, clients) = spawn_in_rank_order(&fake, coordinator, 2).await;
    let cluster = TestCluster::bring_up(synthetic(), 2, 1, clients).await;
    generate(&cluster, 1, 1).await;

    // TP rank 1's process goes away; rank 0's next all-reduce finds the connection closed.
    workers.pop().unwrap().stop().await.unwrap();
    let mut rank0 = cluster.clients[0].clone();
    let e = rank0
        .step(step(2, vec![1], PROMPT.len() as u32))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    let h = rank0
        .health(pb::HealthRequest {
            generation: GENERATION,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(h.state(), pb::WorkerState::Failed);
    assert!(h.message.contains("collective"), "{}", h.message);
    let e = rank0
        .step(step(3, vec![1], PROMPT.len() as u32 + 1))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("failed"), "{}", e.message());
    rank0
        .release(pb::ReleaseRequest {
            generation: GENERATION,
            keep_weights: false,
        })
        .await
        .unwrap();
    workers.pop().unwrap().stop().await.unwrap();
}
