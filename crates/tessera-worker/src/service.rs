//! The `Worker` gRPC service: a state machine over one shard.
//!
//! ```text
//!   Idle ──Assign──▶ Assigned ──OpenCollectives──▶ Connected ──Load──▶ Ready ──Step…
//!    ▲                  │ (connecting)                │ (loading)        │
//!    └──── Release ◀────┴────────── Failed(message) ◀─┴──────────────────┘
//! ```
//!
//! `Release` returns to `Idle` from any state. A bring-up call that fails, or a step that
//! breaks the shard (a peer gone, a backend failure), leaves the worker `Failed` with the
//! reason until `Release`; a step that is merely invalid is refused and the worker stays
//! `Ready`.
//!
//! A `Release` with `keep_weights` (the coordinator rebuilding the cluster after losing a
//! worker) keeps a loaded shard aside, its connections broken. If the next `Assign` is for
//! the same shard, `Load` gives it the new collective group instead of reading the
//! weights again; any other `Assign` drops it first. The slow transitions (connecting, loading) release the state lock while they
//! wait, so `Health` answers throughout; they report as the state they leave
//! (`Assigned`, `Connected`), and an epoch, bumped by every `Assign` and `Release`,
//! keeps a transition that finishes after a `Release` from touching the new state.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tessera_model::{ModelConfig, ShardPlan};
use tessera_proto::worker::v1 as pb;
use tessera_proto::worker::v1::model_spec::Weights;
use tessera_runtime::{KvSpec, NcclId, ShardComms, ShardOptions, WeightDtype};
use tokio::sync::{watch, Mutex};
use tonic::{Request, Response, Status};
use tracing::{info, instrument, warn};

use crate::collectives::{self, Abort, Listeners, NcclPeers, Peers, Transport};
use crate::convert;
use crate::error::WorkerError;
use crate::memory;
use crate::shard_thread::{Device, LoadSpec, ShardThread, WeightsSpec};

/// Most tokens a KV block may hold; far above any useful block.
const MAX_BLOCK_TOKENS: u32 = 1 << 16;
/// Most NCCL ids one `NcclIds` makes: a worker founds its TP group and its link to the
/// next stage, no more.
const MAX_NCCL_IDS: u32 = 2;
/// How long a call that arrives before this worker's `Register` has returned waits for
/// it (the coordinator may call as soon as it has answered).
const REGISTRATION_WAIT: Duration = Duration::from_secs(5);

/// When the coordinator was last heard from. A call in progress counts as contact: the
/// coordinator is waiting on it (a long `Load`, a long prefill) and has no reason to poll.
#[derive(Debug)]
pub(crate) struct Contact {
    origin: Instant,
    last_ms: AtomicU64,
    in_flight: AtomicUsize,
}

/// Marks a call in progress while it lives.
pub(crate) struct InFlight<'a>(&'a Contact);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Contact {
    fn new() -> Self {
        Contact {
            origin: Instant::now(),
            last_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
        }
    }

    /// Records contact now.
    pub(crate) fn touch(&self) {
        let now = self.origin.elapsed().as_millis() as u64;
        self.last_ms.fetch_max(now, Ordering::SeqCst);
    }

    fn call(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.touch();
        InFlight(self)
    }

    /// Time since the last contact; zero while a call is in progress.
    pub(crate) fn silence(&self) -> Duration {
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return Duration::ZERO;
        }
        let now = self.origin.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_ms.load(Ordering::SeqCst)))
    }
}

/// The shard this worker was assigned, as validated at `Assign`.
#[derive(Debug, Clone)]
struct Assignment {
    /// What the shard thread loads, including the plan's TP and PP.
    load: LoadSpec,
    /// New tokens one step may carry: the KV cache's capacity.
    max_step_tokens: usize,
}

struct ReadyShard {
    assignment: Assignment,
    shard: ShardThread,
    /// The id of the last step accepted; the next must follow it.
    last_step: Option<u64>,
    /// Steps run since load.
    steps: u64,
}

enum State {
    Idle,
    Assigned(Assignment, Listeners),
    Connecting,
    Connected(Assignment, ShardComms),
    Loading(Assignment, ShardThread),
    Ready(ReadyShard),
    Failed {
        message: String,
        /// The shard, to be joined (or kept) at `Release`.
        shard: Option<Kept>,
    },
}

impl State {
    fn name(&self) -> String {
        match self {
            State::Idle => "idle".into(),
            State::Assigned(..) => "assigned".into(),
            State::Connecting => "assigned (opening its collectives)".into(),
            State::Connected(..) => "connected".into(),
            State::Loading(..) => "connected (loading)".into(),
            State::Ready(..) => "ready".into(),
            State::Failed { message, .. } => format!("failed ({message})"),
        }
    }

    fn proto(&self) -> pb::WorkerState {
        match self {
            State::Idle => pb::WorkerState::Idle,
            State::Assigned(..) | State::Connecting => pb::WorkerState::Assigned,
            State::Connected(..) | State::Loading(..) => pb::WorkerState::Connected,
            State::Ready(..) => pb::WorkerState::Ready,
            State::Failed { .. } => pb::WorkerState::Failed,
        }
    }
}

/// A loaded shard and what it was loaded for.
struct Kept {
    load: LoadSpec,
    shard: ShardThread,
}

struct Machine {
    epoch: u64,
    state: State,
    /// A loaded shard kept by a `Release` for the next assignment, if it is the same.
    retained: Option<Kept>,
    /// Breaks the shard's connections, once they are open.
    abort: Option<Abort>,
}

impl Machine {
    fn wrong_state(&self, rpc: &'static str) -> WorkerError {
        WorkerError::WrongState {
            rpc,
            state: self.state.name(),
        }
    }

    /// Moves to `Failed`, keeping the shard (if any) for `Release` to join or keep.
    fn fail(&mut self, message: String, shard: Option<Kept>) {
        warn!("worker failed: {message}");
        self.state = State::Failed { message, shard };
    }
}

/// The `Worker` service. Cloning shares the state.
#[derive(Clone)]
pub(crate) struct WorkerService {
    inner: Arc<Inner>,
}

struct Inner {
    /// This worker's generation, once `Register` has returned.
    generation: watch::Receiver<Option<u64>>,
    contact: Contact,
    machine: Mutex<Machine>,
    /// The gRPC listener's IP; the collective listeners bind on it too.
    bind_ip: IpAddr,
    /// What the shard runs on.
    device: Device,
}

impl WorkerService {
    /// A service that accepts calls carrying the generation `generation` will hold.
    pub(crate) fn new(
        generation: watch::Receiver<Option<u64>>,
        bind_ip: IpAddr,
        device: Device,
    ) -> Self {
        WorkerService {
            inner: Arc::new(Inner {
                generation,
                contact: Contact::new(),
                machine: Mutex::new(Machine {
                    epoch: 0,
                    state: State::Idle,
                    retained: None,
                    abort: None,
                }),
                bind_ip,
                device,
            }),
        }
    }

    /// When the coordinator was last heard from.
    pub(crate) fn contact(&self) -> &Contact {
        &self.inner.contact
    }

    /// Drops the shard's connections and the shard itself, joining the shard thread, or
    /// with `keep_weights` keeps a loaded shard aside for the next assignment.
    pub(crate) async fn release(&self, keep_weights: bool) {
        let mut m = self.inner.machine.lock().await;
        let old = std::mem::replace(&mut m.state, State::Idle);
        m.epoch += 1;
        // A step may be blocked on a peer that hangs; breaking the connections ends it,
        // so joining the shard thread waits only for steps that can finish.
        if let Some(abort) = m.abort.take() {
            abort.abort();
        }
        let loaded = match old {
            State::Ready(r) => Some(Kept {
                load: r.assignment.load,
                shard: r.shard,
            }),
            State::Failed { shard, .. } => shard,
            other => {
                let _ = tokio::task::spawn_blocking(move || drop(other)).await;
                None
            }
        };
        let previous = m.retained.take();
        match loaded {
            Some(k) if keep_weights && k.shard.is_alive() => {
                info!("shard kept for the next assignment");
                m.retained = Some(k);
            }
            other => {
                let _ = tokio::task::spawn_blocking(move || drop(other)).await;
            }
        }
        let _ = tokio::task::spawn_blocking(move || drop(previous)).await;
    }

    /// Admits a call that carries this worker's generation, counting it as contact with
    /// the coordinator while it runs; refuses any other.
    async fn admit(&self, generation: u64) -> Result<InFlight<'_>, WorkerError> {
        self.check_generation(generation).await?;
        Ok(self.inner.contact.call())
    }

    /// Refuses a call that does not carry this worker's generation.
    async fn check_generation(&self, got: u64) -> Result<(), WorkerError> {
        let mut rx = self.inner.generation.clone();
        let expected =
            match tokio::time::timeout(REGISTRATION_WAIT, rx.wait_for(Option::is_some)).await {
                Ok(Ok(g)) => g.expect("waited for Some"),
                _ => return Err(WorkerError::NotRegistered),
            };
        if got != expected {
            return Err(WorkerError::StaleGeneration { got, expected });
        }
        Ok(())
    }

    async fn assign_shard(
        &self,
        req: pb::AssignRequest,
    ) -> Result<pb::AssignResponse, WorkerError> {
        let mut m = self.inner.machine.lock().await;
        if !matches!(m.state, State::Idle) {
            return Err(m.wrong_state("Assign"));
        }
        let assignment = validate_assignment(&req, &self.inner.device)?;
        let reuse = m
            .retained
            .as_ref()
            .is_some_and(|k| k.load == assignment.load && k.shard.is_alive());
        if !reuse {
            let stale = m.retained.take();
            let _ = tokio::task::spawn_blocking(move || drop(stale)).await;
            // A simulated shard allocates nothing here; it checks its device's memory at
            // load. A kept shard already holds its memory.
            if !matches!(self.inner.device, Device::Sim(_)) {
                let load = &assignment.load;
                let plan = ShardPlan::new(&load.config, load.tp, load.pp)
                    .map_err(|e| WorkerError::invalid("tp × pp", e.to_string()))?;
                memory::check_fits(
                    &load.config,
                    &plan,
                    &load.spec,
                    &load.options,
                    &self.inner.device,
                )?;
            }
        }
        let spec = &assignment.load.spec;
        let listeners = Listeners::bind(self.inner.bind_ip, spec.stage, assignment.load.pp)?;
        let response = pb::AssignResponse {
            tp_port: listeners.tp_port()?.into(),
            prev_port: listeners.prev_port()?.into(),
        };
        info!(
            model = %assignment.load.config.name,
            stage = spec.stage,
            tp_rank = spec.tp_rank,
            tp = assignment.load.tp,
            pp = assignment.load.pp,
            tp_port = response.tp_port,
            prev_port = response.prev_port,
            "assigned"
        );
        m.epoch += 1;
        m.state = State::Assigned(assignment, listeners);
        Ok(response)
    }

    async fn open_groups(
        &self,
        req: pb::OpenCollectivesRequest,
    ) -> Result<pb::OpenCollectivesResponse, WorkerError> {
        let (assigned, epoch) = {
            let m = self.inner.machine.lock().await;
            match &m.state {
                State::Assigned(a, _) => (a.clone(), m.epoch),
                _ => return Err(m.wrong_state("OpenCollectives")),
            }
        };
        let transport = validate_open(&req, &assigned, &self.inner.device).await?;
        let (assignment, listeners) = {
            let mut m = self.inner.machine.lock().await;
            if m.epoch != epoch {
                return Err(m.wrong_state("OpenCollectives"));
            }
            match std::mem::replace(&mut m.state, State::Idle) {
                State::Assigned(a, l) => {
                    m.state = State::Connecting;
                    (a, l)
                }
                other => {
                    m.state = other;
                    return Err(m.wrong_state("OpenCollectives"));
                }
            }
        };
        let started = Instant::now();
        let connected =
            tokio::task::spawn_blocking(move || collectives::connect(listeners, &transport))
                .await
                .unwrap_or_else(|e| {
                    Err(WorkerError::ShardFailed(format!(
                        "opening the collectives panicked: {e}"
                    )))
                });
        let mut m = self.inner.machine.lock().await;
        if m.epoch != epoch || !matches!(m.state, State::Connecting) {
            return Err(WorkerError::WrongState {
                rpc: "OpenCollectives",
                state: "released while connecting".into(),
            });
        }
        match connected {
            Ok((comms, abort)) => {
                info!(
                    ms = started.elapsed().as_millis() as u64,
                    "collectives open"
                );
                m.state = State::Connected(assignment, comms);
                m.abort = Some(abort);
                Ok(pb::OpenCollectivesResponse {})
            }
            Err(e) => {
                m.fail(format!("opening the collectives: {e}"), None);
                Err(e)
            }
        }
    }

    /// Makes the NCCL ids of the groups this assigned worker founds.
    async fn make_nccl_ids(
        &self,
        req: pb::NcclIdsRequest,
    ) -> Result<pb::NcclIdsResponse, WorkerError> {
        {
            let m = self.inner.machine.lock().await;
            if !matches!(m.state, State::Assigned(..)) {
                return Err(m.wrong_state("NcclIds"));
            }
        }
        if req.count == 0 || req.count > MAX_NCCL_IDS {
            return Err(WorkerError::invalid(
                "count",
                format!(
                    "{} ids; a worker founds 1 or {MAX_NCCL_IDS} groups (its TP group, its \
                     link to the next stage)",
                    req.count
                ),
            ));
        }
        let device = self.inner.device.clone();
        let count = req.count as usize;
        let ids = tokio::task::spawn_blocking(move || collectives::make_nccl_ids(&device, count))
            .await
            .unwrap_or_else(|e| {
                Err(WorkerError::ShardFailed(format!(
                    "making NCCL ids panicked: {e}"
                )))
            })?;
        info!(count, "NCCL ids made");
        Ok(pb::NcclIdsResponse {
            ids: ids.iter().map(|id| id.as_bytes().to_vec()).collect(),
        })
    }

    async fn load_shard(&self) -> Result<pb::LoadResponse, WorkerError> {
        let started = Instant::now();
        let (loaded, epoch, reused) = {
            let mut m = self.inner.machine.lock().await;
            let (assignment, comms) = match std::mem::replace(&mut m.state, State::Idle) {
                State::Connected(a, c) => (a, c),
                other => {
                    m.state = other;
                    return Err(m.wrong_state("Load"));
                }
            };
            let kept = m
                .retained
                .take()
                .filter(|k| k.load == assignment.load && k.shard.is_alive());
            let reused = kept.is_some();
            let started = match kept {
                Some(k) => {
                    info!("reusing the kept shard with the new collective group");
                    k.shard.regroup(comms).map(|loaded| (k.shard, loaded))
                }
                None => ShardThread::spawn(assignment.load.clone(), comms),
            };
            match started {
                Ok((shard, loaded)) => {
                    m.state = State::Loading(assignment, shard);
                    (loaded, m.epoch, reused)
                }
                Err(e) => {
                    m.fail(e.to_string(), None);
                    return Err(e);
                }
            }
        };
        let outcome = loaded.await.unwrap_or_else(|_| {
            Err(WorkerError::ShardFailed(
                "the shard thread stopped while loading".into(),
            ))
        });
        let mut m = self.inner.machine.lock().await;
        if m.epoch != epoch || !matches!(m.state, State::Loading(..)) {
            return Err(WorkerError::WrongState {
                rpc: "Load",
                state: "released while loading".into(),
            });
        }
        let State::Loading(assignment, shard) = std::mem::replace(&mut m.state, State::Idle) else {
            unreachable!("checked above");
        };
        match outcome {
            Ok(loaded) => {
                let load_ms = started.elapsed().as_millis().min(u32::MAX as u128) as u32;
                info!(
                    weight_bytes = loaded.weight_bytes,
                    load_ms, reused, "shard loaded"
                );
                m.state = State::Ready(ReadyShard {
                    assignment,
                    shard,
                    last_step: None,
                    steps: 0,
                });
                Ok(pb::LoadResponse {
                    weight_bytes: loaded.weight_bytes as u64,
                    load_ms,
                    reused,
                })
            }
            Err(e) => {
                m.fail(
                    format!("loading: {e}"),
                    Some(Kept {
                        load: assignment.load,
                        shard,
                    }),
                );
                Err(e)
            }
        }
    }

    async fn run_step(&self, req: pb::StepRequest) -> Result<pb::StepResponse, WorkerError> {
        let (answer, epoch) = {
            let mut m = self.inner.machine.lock().await;
            let epoch = m.epoch;
            let State::Ready(ready) = &mut m.state else {
                return Err(m.wrong_state("Step"));
            };
            if let Some(last) = ready.last_step {
                match last.checked_add(1) {
                    Some(next) if next == req.step_id => {}
                    _ => {
                        return Err(WorkerError::StepOutOfOrder {
                            got: req.step_id,
                            expected: last.wrapping_add(1),
                        })
                    }
                }
            }
            // The id is spent whatever becomes of the step, so every worker of the
            // cluster, seeing the same request, expects the same next id.
            ready.last_step = Some(req.step_id);
            let step = convert::step_request(req, ready.assignment.max_step_tokens)?;
            match ready.shard.submit(step) {
                Ok(answer) => (answer, epoch),
                Err(e) => {
                    let State::Ready(ready) = std::mem::replace(&mut m.state, State::Idle) else {
                        unreachable!("matched above");
                    };
                    m.fail(
                        e.to_string(),
                        Some(Kept {
                            load: ready.assignment.load,
                            shard: ready.shard,
                        }),
                    );
                    return Err(e);
                }
            }
        };
        let reply = answer.await.unwrap_or_else(|_| {
            Err(WorkerError::ShardFailed(
                "the shard thread stopped during the step".into(),
            ))
        });
        match reply {
            Ok((output, elapsed)) => {
                let mut m = self.inner.machine.lock().await;
                if m.epoch == epoch {
                    if let State::Ready(ready) = &mut m.state {
                        ready.steps += 1;
                    }
                }
                let compute_us = elapsed.as_micros().min(u64::MAX as u128) as u64;
                Ok(convert::step_response(output, compute_us))
            }
            Err(e) if e.is_request_error() => Err(e),
            Err(e) => {
                let message = e.to_string();
                let mut m = self.inner.machine.lock().await;
                if m.epoch == epoch && matches!(m.state, State::Ready(_)) {
                    let State::Ready(ready) = std::mem::replace(&mut m.state, State::Idle) else {
                        unreachable!("matched above");
                    };
                    m.fail(
                        message.clone(),
                        Some(Kept {
                            load: ready.assignment.load,
                            shard: ready.shard,
                        }),
                    );
                }
                Err(match e {
                    WorkerError::ShardFailed(_) => e,
                    _ => WorkerError::ShardFailed(message),
                })
            }
        }
    }

    async fn report_health(&self) -> Result<pb::HealthResponse, WorkerError> {
        let m = self.inner.machine.lock().await;
        let (message, steps) = match &m.state {
            State::Failed { message, .. } => (message.clone(), 0),
            State::Ready(r) => (String::new(), r.steps),
            _ => (String::new(), 0),
        };
        Ok(pb::HealthResponse {
            state: m.state.proto().into(),
            message,
            steps,
        })
    }
}

/// What a CPU worker assigned by `req` takes of a step: the model, the shard's KV cache
/// geometry and the most new tokens one step may carry (for [`crate::fuzzing`]).
pub(crate) fn step_limits(
    req: &pb::AssignRequest,
) -> Result<(ModelConfig, KvSpec, usize), WorkerError> {
    let a = validate_assignment(req, &Device::Cpu { threads: 1 })?;
    let kv = memory::kv_spec(&a.load.config, &a.load.spec, &a.load.options);
    Ok((a.load.config, kv, a.max_step_tokens))
}

/// Checks an `Assign` request field by field; the error names the first bad one.
fn validate_assignment(
    req: &pb::AssignRequest,
    device: &Device,
) -> Result<Assignment, WorkerError> {
    let model = req
        .model
        .as_ref()
        .ok_or_else(|| WorkerError::invalid("model", "missing"))?;
    let config: ModelConfig = convert::model_config(
        model
            .config
            .as_ref()
            .ok_or_else(|| WorkerError::invalid("model.config", "missing"))?,
        "model.config",
    )?;
    let weights = match &model.weights {
        Some(Weights::CheckpointDir(dir)) if dir.is_empty() => {
            return Err(WorkerError::invalid("model.checkpoint_dir", "empty path"))
        }
        Some(Weights::CheckpointDir(dir)) => WeightsSpec::Checkpoint(dir.into()),
        Some(Weights::SyntheticSeed(seed)) => WeightsSpec::Synthetic(*seed),
        None => {
            return Err(WorkerError::invalid(
                "model.weights",
                "neither checkpoint_dir nor synthetic_seed is set",
            ))
        }
    };
    let dtype: WeightDtype = model
        .dtype
        .parse()
        .map_err(|e: String| WorkerError::invalid("model.dtype", e))?;
    match (device, dtype) {
        (Device::Cpu { .. }, WeightDtype::F16) => {
            return Err(WorkerError::invalid(
                "model.dtype",
                "f16 is for cuda workers; this worker runs the cpu backend (f32 or bf16)",
            ))
        }
        (Device::Cuda(_), WeightDtype::F32) => {
            return Err(WorkerError::invalid(
                "model.dtype",
                "f32: a cuda worker stores weights, activations and KV cache as bf16 or \
                 f16; start the coordinator with --dtype bf16",
            ))
        }
        _ => {}
    }
    let (tp, pp) = (req.tp as usize, req.pp as usize);
    if tp == 0 {
        return Err(WorkerError::invalid("tp", "must be at least 1"));
    }
    if pp == 0 {
        return Err(WorkerError::invalid("pp", "must be at least 1"));
    }
    if req.stage >= req.pp {
        return Err(WorkerError::invalid(
            "stage",
            format!("{} is not below pp = {}", req.stage, req.pp),
        ));
    }
    if req.tp_rank >= req.tp {
        return Err(WorkerError::invalid(
            "tp_rank",
            format!("{} is not below tp = {}", req.tp_rank, req.tp),
        ));
    }
    if req.kv_blocks == 0 {
        return Err(WorkerError::invalid("kv_blocks", "must be at least 1"));
    }
    if req.kv_block_tokens == 0 || req.kv_block_tokens > MAX_BLOCK_TOKENS {
        return Err(WorkerError::invalid(
            "kv_block_tokens",
            format!("{} is not in 1..={MAX_BLOCK_TOKENS}", req.kv_block_tokens),
        ));
    }
    let plan = ShardPlan::new(&config, tp, pp)
        .map_err(|e| WorkerError::invalid("tp × pp", e.to_string()))?;
    let spec = plan.shard(req.stage as usize, req.tp_rank as usize).clone();
    let options = ShardOptions {
        dtype,
        kv_blocks: req.kv_blocks as usize,
        block_size: req.kv_block_tokens as usize,
    };
    let max_step_tokens = options.kv_blocks.saturating_mul(options.block_size);
    Ok(Assignment {
        load: LoadSpec {
            config,
            spec,
            weights,
            options,
            tp,
            pp,
            device: device.clone(),
        },
        max_step_tokens,
    })
}

/// Checks an `OpenCollectives` request against the assignment and this worker, and
/// resolves its addresses. A malformed request is INVALID_ARGUMENT, naming the field; NCCL
/// asked of a worker that cannot use it is FAILED_PRECONDITION, saying why.
async fn validate_open(
    req: &pb::OpenCollectivesRequest,
    assigned: &Assignment,
    device: &Device,
) -> Result<Transport, WorkerError> {
    let transport = pb::CollectiveTransport::try_from(req.transport).map_err(|_| {
        WorkerError::invalid("transport", format!("{} is not a transport", req.transport))
    })?;
    match transport {
        pb::CollectiveTransport::Unspecified | pb::CollectiveTransport::Tcp => {
            if req.nccl.is_some() {
                return Err(WorkerError::invalid(
                    "nccl",
                    "set with transport TCP, which does not use it",
                ));
            }
            validate_peers(req, assigned).await.map(Transport::Tcp)
        }
        pb::CollectiveTransport::Nccl => {
            validate_nccl(req, assigned, device).map(|peers| Transport::Nccl(Box::new(peers)))
        }
    }
}

/// Checks the NCCL part of an `OpenCollectives` request: the TCP fields empty, an id of
/// 128 bytes for each group this worker belongs to and none for another; then that this
/// worker can use NCCL.
fn validate_nccl(
    req: &pb::OpenCollectivesRequest,
    assigned: &Assignment,
    device: &Device,
) -> Result<NcclPeers, WorkerError> {
    let (tp, pp, stage) = (assigned.load.tp, assigned.load.pp, assigned.load.spec.stage);
    for (field, set) in [
        ("tp_peers", !req.tp_peers.is_empty()),
        ("next_stage", !req.next_stage.is_empty()),
        ("token", !req.token.is_empty()),
    ] {
        if set {
            return Err(WorkerError::invalid(
                field,
                "set with transport NCCL, which does not use it",
            ));
        }
    }
    if req.timeout_ms == 0 {
        return Err(WorkerError::invalid("timeout_ms", "must be at least 1"));
    }
    if req.io_timeout_ms == 0 {
        return Err(WorkerError::invalid("io_timeout_ms", "must be at least 1"));
    }
    let ids = req
        .nccl
        .as_ref()
        .ok_or_else(|| WorkerError::invalid("nccl", "missing with transport NCCL"))?;
    let tp_id = NcclId::parse("nccl.tp_id", &ids.tp_id)?;
    let link = |field: &'static str, bytes: &[u8], expected: bool, place: &str| match (
        expected,
        bytes.is_empty(),
    ) {
        (true, false) => NcclId::parse(field, bytes)
            .map(Some)
            .map_err(WorkerError::from),
        (false, true) => Ok(None),
        (true, true) => Err(WorkerError::invalid(
            field,
            format!("missing on stage {stage} of pp = {pp}"),
        )),
        (false, false) => Err(WorkerError::invalid(
            field,
            format!("set on the {place} stage ({stage} of pp = {pp})"),
        )),
    };
    let prev_id = link("nccl.prev_id", &ids.prev_id, stage > 0, "first")?;
    let next_id = link("nccl.next_id", &ids.next_id, stage + 1 < pp, "last")?;
    let device = collectives::nccl_device(device)?;
    Ok(NcclPeers {
        device,
        tp_rank: assigned.load.spec.tp_rank,
        tp,
        tp_id,
        prev_id,
        next_id,
        timeout: Duration::from_millis(req.timeout_ms.into()),
        io_timeout: Duration::from_millis(req.io_timeout_ms.into()),
    })
}

/// Checks a TCP `OpenCollectives` request against the assignment and resolves its
/// addresses.
async fn validate_peers(
    req: &pb::OpenCollectivesRequest,
    assigned: &Assignment,
) -> Result<Peers, WorkerError> {
    let (tp, pp, stage) = (assigned.load.tp, assigned.load.pp, assigned.load.spec.stage);
    if req.tp_peers.len() != tp {
        return Err(WorkerError::invalid(
            "tp_peers",
            format!("{} addresses for a TP group of {tp}", req.tp_peers.len()),
        ));
    }
    let token: [u8; 16] = req.token.as_slice().try_into().map_err(|_| {
        WorkerError::invalid("token", format!("{} bytes; it must be 16", req.token.len()))
    })?;
    if req.timeout_ms == 0 {
        return Err(WorkerError::invalid("timeout_ms", "must be at least 1"));
    }
    if req.io_timeout_ms == 0 {
        return Err(WorkerError::invalid("io_timeout_ms", "must be at least 1"));
    }
    let last_stage = stage + 1 == pp;
    let next_stage = match (last_stage, req.next_stage.is_empty()) {
        (true, true) => None,
        (false, false) => Some(collectives::resolve("next_stage", &req.next_stage).await?),
        (true, false) => {
            return Err(WorkerError::invalid(
                "next_stage",
                format!("set on the last stage ({stage} of pp = {pp})"),
            ))
        }
        (false, true) => {
            return Err(WorkerError::invalid(
                "next_stage",
                format!("missing on stage {stage} of pp = {pp}"),
            ))
        }
    };
    let mut peers = Vec::with_capacity(tp);
    for (rank, e) in req.tp_peers.iter().enumerate() {
        peers.push(collectives::resolve(&format!("tp_peers[{rank}]"), &e.address).await?);
    }
    Ok(Peers {
        tp_rank: assigned.load.spec.tp_rank,
        tp: peers,
        next_stage,
        token,
        timeout: Duration::from_millis(req.timeout_ms.into()),
        io_timeout: Duration::from_millis(req.io_timeout_ms.into()),
    })
}

#[tonic::async_trait]
impl pb::worker_server::Worker for WorkerService {
    #[instrument(skip_all, fields(stage = req.get_ref().stage, tp_rank = req.get_ref().tp_rank))]
    async fn assign(
        &self,
        req: Request<pb::AssignRequest>,
    ) -> Result<Response<pb::AssignResponse>, Status> {
        let _call = self.admit(req.get_ref().generation).await?;
        Ok(Response::new(self.assign_shard(req.into_inner()).await?))
    }

    #[instrument(skip_all, fields(count = req.get_ref().count))]
    async fn nccl_ids(
        &self,
        req: Request<pb::NcclIdsRequest>,
    ) -> Result<Response<pb::NcclIdsResponse>, Status> {
        let _call = self.admit(req.get_ref().generation).await?;
        Ok(Response::new(self.make_nccl_ids(req.into_inner()).await?))
    }

    #[instrument(skip_all)]
    async fn open_collectives(
        &self,
        req: Request<pb::OpenCollectivesRequest>,
    ) -> Result<Response<pb::OpenCollectivesResponse>, Status> {
        let _call = self.admit(req.get_ref().generation).await?;
        Ok(Response::new(self.open_groups(req.into_inner()).await?))
    }

    #[instrument(skip_all)]
    async fn load(
        &self,
        req: Request<pb::LoadRequest>,
    ) -> Result<Response<pb::LoadResponse>, Status> {
        let _call = self.admit(req.get_ref().generation).await?;
        Ok(Response::new(self.load_shard().await?))
    }

    #[instrument(skip_all, fields(step_id = req.get_ref().step_id))]
    async fn step(
        &self,
        req: Request<pb::StepRequest>,
    ) -> Result<Response<pb::StepResponse>, Status> {
        let _call = self.admit(req.get_ref().generation).await?;
        Ok(Response::new(self.run_step(req.into_inner()).await?))
    }

    #[instrument(skip_all)]
    async fn release(
        &self,
        req: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let _call = self.admit(req.get_ref().generation).await?;
        self.release(req.get_ref().keep_weights).await;
        info!("released");
        Ok(Response::new(pb::ReleaseResponse {}))
    }

    #[instrument(skip_all, level = "debug")]
    async fn health(
        &self,
        req: Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthResponse>, Status> {
        let _call = self.admit(req.get_ref().generation).await?;
        Ok(Response::new(self.report_health().await?))
    }
}
