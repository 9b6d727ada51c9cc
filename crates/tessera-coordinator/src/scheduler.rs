//! The scheduler: one task that owns every sequence, the KV blocks and the step loop.
//!
//! Continuous batching over a paged KV cache. Requests reach the scheduler over a channel
//! ([`SchedulerHandle::submit`]). Before every step it
//! 1. ends sequences whose client has gone or whose deadline has passed, freeing their
//!    blocks;
//! 2. gives each running sequence, oldest first, its next tokens under the step's token
//!    budget (`max_batch_tokens`): one token for a sequence that decodes, a chunk of the
//!    prompt for one still in prefill, so a long prompt is spread over several steps and
//!    never stalls everyone's decoding. Blocks are taken as a sequence grows; when none is
//!    free, the newest running sequence is preempted: its blocks are freed and it waits at
//!    the head of the queue to be recomputed (its prompt and generated tokens prefilled
//!    again), so a request that fits the cache alone never fails for lack of blocks;
//! 3. admits waiting requests first come, first served into whatever budget, sequence
//!    slots and blocks are left.
//!
//! One step then goes to every worker; the sampled tokens are appended, detokenised and
//! streamed. The kernels give a row the same result whatever else is in its step, so a
//! request's tokens do not depend on batching, chunking or preemption. The coordinator's
//! record of every sequence (prompt and generated tokens) lives here.
//!
//! When a worker is lost (a step fails, or the health monitor finds it silent) the
//! cluster is `Recovering`: the step in flight is abandoned (it streamed nothing), every
//! running sequence goes back to the head of the queue as if preempted, and the
//! scheduler waits, still ending requests whose client goes or whose deadline passes and
//! queueing new ones. Once the cluster is rebuilt it takes the new workers and prefills
//! each sequence again from its record, so the streams go on with no token missing or
//! repeated.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics::{counter, gauge, histogram};
use tessera_model::Tokenizer;
use tessera_proto::v1::{FinishReason, GenerateStreamResponse};
use tessera_proto::worker::v1 as pb;
use tokio::sync::{mpsc, watch};
use tonic::Status;
use tracing::{debug, warn};

use crate::blocks::BlockManager;
use crate::detok::TextStream;
use crate::error::CoordinatorError;
use crate::metrics as m;
use crate::state::{recover, ClusterState, StateRx, StateTx};
use crate::workers::{ShardedClient, WARM_UP_STEP_ID};

/// While the cluster recovers, how often requests' deadlines and clients are checked.
const RECOVERY_POLL: Duration = Duration::from_millis(50);

/// One validated generation request.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationParams {
    /// The prompt, at least one token, each below the vocabulary size.
    pub prompt_ids: Vec<u32>,
    /// New tokens at most; the prompt plus these fit the context.
    pub max_new: usize,
    pub temperature: f32,
    pub top_k: u32,
    pub top_p: f32,
    pub seed: u64,
    pub repetition_penalty: f32,
    /// Non-empty stop strings.
    pub stop: Vec<String>,
    pub ignore_eos: bool,
    pub logprobs: bool,
    /// When the request ends with DEADLINE_EXCEEDED if it has not finished.
    pub deadline: Option<Instant>,
}

/// Messages of one request's stream; an `Err` ends it.
pub type EventRx = mpsc::UnboundedReceiver<Result<GenerateStreamResponse, Status>>;
type EventTx = mpsc::UnboundedSender<Result<GenerateStreamResponse, Status>>;

struct Submission {
    params: GenerationParams,
    events: EventTx,
    arrived: Instant,
}

/// Limits of the running batch.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    /// Sequences per step.
    pub max_seqs: usize,
    /// New tokens per step (prefill chunks and decodes together).
    pub max_tokens: usize,
    /// Requests waiting at most.
    pub max_queued: usize,
}

/// How the rest of the coordinator talks to the scheduler.
#[derive(Clone)]
pub struct SchedulerHandle {
    tx: mpsc::UnboundedSender<Submission>,
    queued: Arc<AtomicUsize>,
    max_queued: usize,
    state: StateRx,
    kv_capacity_tokens: usize,
    block_tokens: usize,
}

impl SchedulerHandle {
    /// Queues a request; its messages arrive on the returned receiver. Refused at once when
    /// the cluster is not serving (UNAVAILABLE), the queue is full (RESOURCE_EXHAUSTED), or
    /// the request could never fit the KV cache, even alone (OUT_OF_RANGE on `max_tokens`).
    pub fn submit(&self, params: GenerationParams) -> Result<EventRx, CoordinatorError> {
        let reject = |reason: &'static str, e: CoordinatorError| {
            counter!(m::REQUESTS_REJECTED, "reason" => reason).increment(1);
            Err(e)
        };
        if let Some(e) = self.state.borrow().refusal() {
            return reject("unavailable", e);
        }
        let slots = params.prompt_ids.len() + params.max_new - 1;
        let needed = slots.div_ceil(self.block_tokens) * self.block_tokens;
        if needed > self.kv_capacity_tokens {
            return reject(
                "too_long",
                CoordinatorError::out_of_range(
                    "max_tokens",
                    format!(
                        "a prompt of {} tokens and {} new tokens need KV cache for {slots} tokens; \
                         the cluster holds {}",
                        params.prompt_ids.len(),
                        params.max_new,
                        self.kv_capacity_tokens
                    ),
                ),
            );
        }
        let queued = self.queued.fetch_add(1, Ordering::SeqCst);
        if queued >= self.max_queued {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            return reject(
                "queue_full",
                CoordinatorError::ResourceExhausted(format!(
                    "{queued} requests are already waiting (max_queued)"
                )),
            );
        }
        let (events, rx) = mpsc::unbounded_channel();
        let sub = Submission {
            params,
            events,
            arrived: Instant::now(),
        };
        if self.tx.send(sub).is_err() {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            return reject(
                "unavailable",
                CoordinatorError::Cancelled("the scheduler has stopped".into()),
            );
        }
        Ok(rx)
    }

    /// Tokens of KV cache the cluster holds.
    pub fn kv_capacity_tokens(&self) -> usize {
        self.kv_capacity_tokens
    }
}

/// A request from its arrival to its end: waiting, running, or preempted and waiting again.
struct Sequence {
    id: u64,
    params: GenerationParams,
    events: EventTx,
    arrived: Instant,
    /// Generated tokens: with the prompt, the coordinator's full record of the sequence.
    generated: Vec<u32>,
    /// Leading tokens of prompt + generated whose K/V the workers hold.
    cached: usize,
    blocks: Vec<u32>,
    text: TextStream,
    seen: BTreeSet<u32>,
    /// Counted in the submission queue (never admitted yet).
    queued: bool,
    /// Preempted at least once.
    preempted: bool,
    last_token_at: Option<Instant>,
}

impl Sequence {
    fn len(&self) -> usize {
        self.params.prompt_ids.len() + self.generated.len()
    }

    /// Tokens still to run through the model before the next sample: the prompt (or its
    /// rest) on prefill, everything after a preemption, the last sampled token on decode.
    fn pending(&self) -> usize {
        self.len() - self.cached
    }

    /// Tokens `[from, to)` of prompt + generated.
    fn tokens(&self, from: usize, to: usize) -> Vec<u32> {
        let p = &self.params.prompt_ids;
        (from..to)
            .map(|i| {
                if i < p.len() {
                    p[i]
                } else {
                    self.generated[i - p.len()]
                }
            })
            .collect()
    }
}

/// One sequence's share of a step.
struct Planned {
    seq_id: u64,
    tokens: usize,
    samples: bool,
}

/// Per-step timing, for logs and benchmarks.
#[derive(Debug, Default, Clone, Copy)]
pub struct StepTiming {
    /// Steps run.
    pub steps: u64,
    /// Sum of the coordinator's wall time per step.
    pub wall: Duration,
    /// Sum of the slowest worker's compute time per step.
    pub compute: Duration,
}

/// Why a sequence left the scheduler.
enum End {
    Finished(FinishReason),
    Failed(&'static str, CoordinatorError),
}

/// The scheduler task's state.
pub struct Scheduler {
    rx: mpsc::UnboundedReceiver<Submission>,
    queued: Arc<AtomicUsize>,
    /// Not running: new requests in arrival order, preempted ones ahead of them.
    waiting: VecDeque<Sequence>,
    /// The running batch, oldest first.
    running: Vec<Sequence>,
    blocks: BlockManager,
    limits: BatchLimits,
    /// The cluster's workers; replaced by a rebuilt set after a recovery.
    cluster: watch::Receiver<ShardedClient>,
    workers: ShardedClient,
    worker_labels: Vec<(String, String)>,
    tokenizer: Arc<Tokenizer>,
    eos: u32,
    state_tx: StateTx,
    state: StateRx,
    next_seq: u64,
    step_id: u64,
    timing: StepTiming,
    /// A moving average of recent steps' wall time.
    recent_step: Duration,
    /// Sequences preempted so far.
    preemptions: u64,
}

impl Scheduler {
    /// A scheduler over the workers `cluster` holds (each set warmed up with step
    /// [`WARM_UP_STEP_ID`]), whose KV caches hold `blocks`; and its handle.
    pub fn new(
        mut cluster: watch::Receiver<ShardedClient>,
        blocks: BlockManager,
        limits: BatchLimits,
        tokenizer: Arc<Tokenizer>,
        eos: u32,
        state_tx: StateTx,
    ) -> (Scheduler, SchedulerHandle) {
        let workers = cluster.borrow_and_update().clone();
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let state = state_tx.subscribe();
        let handle = SchedulerHandle {
            tx,
            queued: queued.clone(),
            max_queued: limits.max_queued,
            state: state.clone(),
            kv_capacity_tokens: blocks.total() * blocks.block_tokens(),
            block_tokens: blocks.block_tokens(),
        };
        let worker_labels = labels(&workers);
        let s = Scheduler {
            rx,
            queued,
            waiting: VecDeque::new(),
            running: Vec::new(),
            blocks,
            limits,
            cluster,
            workers,
            worker_labels,
            tokenizer,
            eos,
            state_tx,
            state,
            next_seq: 0,
            step_id: WARM_UP_STEP_ID,
            timing: StepTiming::default(),
            recent_step: Duration::ZERO,
            preemptions: 0,
        };
        s.publish();
        (s, handle)
    }

    /// Runs until every handle is dropped or the cluster stops.
    pub async fn run(mut self) -> StepTiming {
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                tokio::select! {
                    sub = self.rx.recv() => match sub {
                        Some(s) => self.enqueue(s),
                        None => break,
                    },
                    changed = self.state.changed() => {
                        if changed.is_err() { break; }
                    }
                }
            }
            while let Ok(s) = self.rx.try_recv() {
                self.enqueue(s);
            }
            let state = self.state.borrow().clone();
            if let ClusterState::Recovering(_) = state {
                self.requeue_running();
                self.drop_gone();
                self.publish();
                tokio::select! {
                    changed = self.state.changed() => {
                        if changed.is_err() { break; }
                    }
                    sub = self.rx.recv() => match sub {
                        Some(s) => self.enqueue(s),
                        None => break,
                    },
                    _ = tokio::time::sleep(RECOVERY_POLL) => {}
                }
                continue;
            }
            if let Some(e) = state.refusal() {
                self.fail_all(&e);
                self.publish();
                if state == ClusterState::Stopping {
                    break;
                }
                continue;
            }
            if self.cluster.has_changed().unwrap_or(false) {
                self.adopt();
            }
            self.drop_gone();
            let plan = self.schedule();
            self.publish();
            if plan.is_empty() {
                // Everything waiting was cancelled; wait for more.
                continue;
            }
            self.step(plan).await;
            self.publish();
        }
        // No submission may slip in after the last drain.
        self.rx.close();
        let e = CoordinatorError::Cancelled("the server is shutting down".into());
        self.fail_all(&e);
        self.publish();
        self.timing
    }

    fn enqueue(&mut self, sub: Submission) {
        let seen = if sub.params.repetition_penalty != 1.0 {
            sub.params.prompt_ids.iter().copied().collect()
        } else {
            BTreeSet::new()
        };
        let id = self.next_seq;
        self.next_seq += 1;
        self.waiting.push_back(Sequence {
            id,
            text: TextStream::new(sub.params.stop.clone()),
            params: sub.params,
            events: sub.events,
            arrived: sub.arrived,
            generated: Vec::new(),
            cached: 0,
            blocks: Vec::new(),
            seen,
            queued: true,
            preempted: false,
            last_token_at: None,
        });
    }

    /// Takes the rebuilt cluster's workers, which expect the step after their warm-up.
    fn adopt(&mut self) {
        self.workers = self.cluster.borrow_and_update().clone();
        self.worker_labels = labels(&self.workers);
        self.step_id = WARM_UP_STEP_ID;
    }

    /// After a worker is lost every KV cache is gone with the collective group: each
    /// running sequence goes back to the head of the queue, oldest first, to be prefilled
    /// again from the coordinator's record once the cluster is rebuilt.
    fn requeue_running(&mut self) {
        while let Some(mut seq) = self.running.pop() {
            self.blocks.release(std::mem::take(&mut seq.blocks));
            seq.cached = 0;
            seq.preempted = true;
            self.waiting.push_front(seq);
        }
    }

    /// Gauges of the batch and the cache.
    fn publish(&self) {
        gauge!(m::REQUESTS_RUNNING).set(self.running.len() as f64);
        gauge!(m::REQUESTS_WAITING).set(self.waiting.len() as f64);
        gauge!(m::KV_BLOCKS_USED).set(self.blocks.used() as f64);
        gauge!(m::KV_BLOCKS_TOTAL).set(self.blocks.total() as f64);
    }

    /// Ends, freeing their blocks, the sequences whose client has gone (a dropped stream
    /// or a closed connection) and those whose deadline would pass before the next step
    /// ends (no token could reach them in time, and the client learns it before the
    /// transport's own timer cancels the call).
    fn drop_gone(&mut self) {
        let now = Instant::now() + self.recent_step;
        let why = |s: &Sequence| -> Option<End> {
            if s.events.is_closed() {
                return Some(End::Failed(
                    "cancelled",
                    CoordinatorError::Cancelled("the client went away".into()),
                ));
            }
            match s.params.deadline {
                Some(d) if d <= now => Some(End::Failed(
                    "deadline",
                    CoordinatorError::DeadlineExceeded(format!(
                        "deadline: the request's deadline passed after {} of {} new tokens",
                        s.generated.len(),
                        s.params.max_new
                    )),
                )),
                _ => None,
            }
        };
        let mut i = 0;
        while i < self.waiting.len() {
            match why(&self.waiting[i]) {
                Some(end) => {
                    let seq = self.waiting.remove(i).expect("index in range");
                    self.end(seq, end);
                }
                None => i += 1,
            }
        }
        let mut i = 0;
        while i < self.running.len() {
            match why(&self.running[i]) {
                Some(end) => {
                    let seq = self.running.remove(i);
                    self.end(seq, end);
                }
                None => i += 1,
            }
        }
    }

    /// Chooses the next step: the running sequences' tokens first (preempting the newest
    /// when blocks run out), then new admissions. Sequences planned are `running[..n]`.
    fn schedule(&mut self) -> Vec<Planned> {
        let mut budget = self.limits.max_tokens;
        let mut plan = Vec::new();
        let preempted_before = self.preemptions;
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let seq = &self.running[i];
            let n = seq.pending().min(budget);
            let want = self.blocks.blocks_for(seq.cached + n) - seq.blocks.len();
            if !self.grow(i, want) {
                // Sequence `i` was the newest and has been preempted itself.
                break;
            }
            let seq = &self.running[i];
            plan.push(Planned {
                seq_id: seq.id,
                tokens: n,
                samples: seq.cached + n == seq.len(),
            });
            budget -= n;
            i += 1;
        }
        // Admissions only once every running sequence has its place, and not in a step
        // that had to preempt (the cache is full: admitting now would only preempt again).
        // First come, first served: a preempted sequence, at the head, comes back first.
        if i == self.running.len() && self.preemptions == preempted_before {
            while budget > 0 && self.running.len() < self.limits.max_seqs {
                let Some(front) = self.waiting.front() else {
                    break;
                };
                let n = front.pending().min(budget);
                // A sequence that was preempted comes back only when its whole record and
                // its next token fit, or it would be preempted again at once. (Its last
                // token is never cached, so this never exceeds what `submit` checked fits
                // the empty cache.)
                let p = &front.params;
                let whole = (front.len() + 1).min(p.prompt_ids.len() + p.max_new - 1);
                if front.preempted
                    && self.blocks.total() - self.blocks.used() < self.blocks.blocks_for(whole)
                {
                    break;
                }
                let Some(blocks) = self.blocks.allocate(self.blocks.blocks_for(n)) else {
                    break;
                };
                let mut seq = self.waiting.pop_front().expect("front exists");
                if std::mem::take(&mut seq.queued) {
                    self.queued.fetch_sub(1, Ordering::SeqCst);
                    counter!(m::PROMPT_TOKENS).increment(seq.params.prompt_ids.len() as u64);
                }
                seq.blocks = blocks;
                plan.push(Planned {
                    seq_id: seq.id,
                    tokens: n,
                    samples: n == seq.len(),
                });
                budget -= n;
                self.running.push(seq);
            }
        }
        plan
    }

    /// Gives running sequence `i` `want` more blocks, preempting the newest running
    /// sequences until they are free. False when `i` itself had to go.
    fn grow(&mut self, i: usize, want: usize) -> bool {
        loop {
            if let Some(more) = self.blocks.allocate(want) {
                self.running[i].blocks.extend(more);
                return true;
            }
            let newest = self.running.len() - 1;
            self.preempt(newest);
            if newest == i {
                return false;
            }
        }
    }

    /// Frees running sequence `i`'s blocks and puts it at the head of the queue, to be
    /// prefilled again from the coordinator's record when there is room.
    fn preempt(&mut self, i: usize) {
        let mut seq = self.running.remove(i);
        debug!(
            seq = seq.id,
            tokens = seq.len(),
            "KV cache full; sequence preempted"
        );
        counter!(m::PREEMPTIONS).increment(1);
        self.preemptions += 1;
        self.blocks.release(std::mem::take(&mut seq.blocks));
        seq.cached = 0;
        seq.preempted = true;
        self.waiting.push_front(seq);
    }

    fn build_step(&mut self, plan: &[Planned]) -> pb::StepRequest {
        self.step_id += 1;
        let seqs = plan
            .iter()
            .zip(&self.running)
            .map(|(p, s)| {
                debug_assert_eq!(p.seq_id, s.id, "the plan follows the running order");
                let params = &s.params;
                pb::SeqStep {
                    seq_id: s.id,
                    tokens: s.tokens(s.cached, s.cached + p.tokens),
                    start_pos: s.cached as u32,
                    block_table: s.blocks.clone(),
                    sample: p.samples.then(|| pb::SampleSpec {
                        temperature: params.temperature,
                        top_k: params.top_k,
                        top_p: params.top_p,
                        seed: params.seed,
                        repetition_penalty: params.repetition_penalty,
                        penalty_ids: s.seen.iter().copied().collect(),
                        return_logits: false,
                    }),
                }
            })
            .collect();
        pb::StepRequest {
            generation: self.workers.generation(),
            step_id: self.step_id,
            seqs,
        }
    }

    async fn step(&mut self, plan: Vec<Planned>) {
        let req = self.build_step(&plan);
        let workers = self.workers.clone();
        let mut state = self.state.clone();
        let outcome = tokio::select! {
            r = workers.step(req) => Some(r),
            _ = state.wait_for(|s| *s != ClusterState::Serving) => None,
        };
        let reply = match outcome {
            None => {
                // The health monitor found a worker lost while the step ran; the next
                // turn of the loop puts the sequences back in the queue.
                return;
            }
            Some(Err(f)) if f.invalid => {
                let e = CoordinatorError::Internal(format!("a step was refused: {}", f.message));
                warn!("{e}");
                for seq in std::mem::take(&mut self.running) {
                    self.end(seq, End::Failed("error", e.clone()));
                }
                return;
            }
            Some(Err(f)) => {
                recover(&self.state_tx, f.message);
                return;
            }
            Some(Ok(reply)) => reply,
        };
        self.timing.steps += 1;
        self.timing.wall += reply.wall;
        self.recent_step = (self.recent_step * 3 + reply.wall) / 4;
        self.timing.compute += reply.max_compute();
        let tokens: usize = plan.iter().map(|p| p.tokens).sum();
        counter!(m::STEPS).increment(1);
        histogram!(m::STEP_DURATION).record(reply.wall.as_secs_f64());
        histogram!(m::STEP_TOKENS).record(tokens as f64);
        for ((stage, rank), t) in self.worker_labels.iter().zip(&reply.compute) {
            histogram!(m::WORKER_STEP_DURATION, "stage" => stage.clone(), "tp_rank" => rank.clone())
                .record(t.as_secs_f64());
        }
        debug!(
            step = self.step_id,
            seqs = plan.len(),
            tokens,
            wall_us = reply.wall.as_micros() as u64,
            compute_us = reply.max_compute().as_micros() as u64,
            "step"
        );
        self.finish_step(&plan, reply.results);
    }

    /// Applies a step's results: every planned sequence has its tokens cached, and those
    /// that sampled get their token appended, streamed, and are ended when done.
    fn finish_step(&mut self, plan: &[Planned], results: Vec<pb::SeqResult>) {
        let mut by_seq: HashMap<u64, pb::SeqResult> =
            results.into_iter().map(|r| (r.seq_id, r)).collect();
        let now = Instant::now();
        // `plan[k]` is `running[k]`; walk backwards so removals keep earlier indices.
        for (k, p) in plan.iter().enumerate().rev() {
            self.running[k].cached += p.tokens;
            if !p.samples {
                continue;
            }
            let end = match by_seq.remove(&p.seq_id) {
                Some(r) => self.advance(k, r.token_id, r.logprob, now),
                None => Some(End::Failed(
                    "error",
                    CoordinatorError::Internal(format!(
                        "the step returned no token for sequence {}",
                        p.seq_id
                    )),
                )),
            };
            if let Some(end) = end {
                let seq = self.running.remove(k);
                self.end(seq, end);
            }
        }
    }

    /// Appends a sampled token to running sequence `i`, streams it, and says whether and
    /// why the sequence ended.
    fn advance(&mut self, i: usize, token: u32, logprob: f32, now: Instant) -> Option<End> {
        let eos = self.eos;
        let seq = &mut self.running[i];
        match seq.last_token_at {
            None => histogram!(m::TIME_TO_FIRST_TOKEN)
                .record(now.duration_since(seq.arrived).as_secs_f64()),
            Some(t) => {
                histogram!(m::TIME_PER_OUTPUT_TOKEN).record(now.duration_since(t).as_secs_f64())
            }
        }
        seq.last_token_at = Some(now);
        counter!(m::GENERATED_TOKENS).increment(1);
        seq.generated.push(token);
        if seq.params.repetition_penalty != 1.0 {
            seq.seen.insert(token);
        }
        let mut msg = GenerateStreamResponse {
            token_ids: vec![token],
            logprobs: if seq.params.logprobs {
                vec![logprob]
            } else {
                Vec::new()
            },
            ..Default::default()
        };
        let is_eos = token == eos && !seq.params.ignore_eos;
        let mut finish = None;
        if is_eos {
            finish = Some(FinishReason::Stop);
        } else {
            // The end-of-text token is never rendered as text.
            let bytes = if token == eos {
                Vec::new()
            } else {
                self.tokenizer.decode_bytes(&[token]).unwrap_or_default()
            };
            let delta = seq.text.push(&bytes);
            msg.text = delta.text;
            if let Some(stop) = delta.stopped {
                msg.matched_stop = stop;
                finish = Some(FinishReason::Stop);
            }
        }
        if finish.is_none() && seq.generated.len() >= seq.params.max_new {
            finish = Some(FinishReason::Length);
        }
        if let Some(reason) = finish {
            if msg.matched_stop.is_empty() {
                msg.text.push_str(&seq.text.finish());
            }
            msg.finish_reason = reason as i32;
            msg.prompt_tokens = seq.params.prompt_ids.len() as u32;
            msg.completion_tokens = seq.generated.len() as u32;
            msg.seed = seq.params.seed;
        }
        let _ = seq.events.send(Ok(msg));
        finish.map(End::Finished)
    }

    /// Frees a sequence's blocks, counts its end and, on failure, tells its client.
    fn end(&mut self, mut seq: Sequence, end: End) {
        self.blocks.release(std::mem::take(&mut seq.blocks));
        if seq.queued {
            self.queued.fetch_sub(1, Ordering::SeqCst);
        }
        let reason = match end {
            End::Finished(FinishReason::Length) => "length",
            End::Finished(_) => "stop",
            End::Failed(reason, e) => {
                debug!(seq = seq.id, "sequence ended: {e}");
                let _ = seq.events.send(Err(e.into()));
                reason
            }
        };
        counter!(m::REQUESTS_FINISHED, "reason" => reason).increment(1);
        histogram!(m::REQUEST_DURATION, "reason" => reason)
            .record(seq.arrived.elapsed().as_secs_f64());
    }

    fn fail_all(&mut self, e: &CoordinatorError) {
        let reason = if matches!(e, CoordinatorError::Cancelled(_)) {
            "cancelled"
        } else {
            "error"
        };
        for seq in std::mem::take(&mut self.running) {
            self.end(seq, End::Failed(reason, e.clone()));
        }
        for seq in std::mem::take(&mut self.waiting) {
            self.end(seq, End::Failed(reason, e.clone()));
        }
        // Requests that arrive later are refused by `submit`; drain any that raced it.
        while let Ok(sub) = self.rx.try_recv() {
            let _ = sub.events.send(Err(e.clone().into()));
            self.queued.fetch_sub(1, Ordering::SeqCst);
            counter!(m::REQUESTS_REJECTED, "reason" => "unavailable").increment(1);
        }
    }
}

/// The `(stage, tp_rank)` labels of each worker's metrics, in plan order.
fn labels(workers: &ShardedClient) -> Vec<(String, String)> {
    workers
        .workers
        .iter()
        .map(|w| (w.spec.stage.to_string(), w.spec.tp_rank.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const EOS: u32 = 50256;

    fn scheduler(
        blocks: usize,
        block_tokens: usize,
        limits: BatchLimits,
    ) -> (Scheduler, SchedulerHandle) {
        let (state_tx, _) = watch::channel(ClusterState::Serving);
        Scheduler::new(
            watch::channel(ShardedClient::new(Vec::new(), 1)).1,
            BlockManager::new(blocks, block_tokens),
            limits,
            Arc::new(Tokenizer::gpt2()),
            EOS,
            state_tx,
        )
    }

    fn limits(max_seqs: usize, max_tokens: usize) -> BatchLimits {
        BatchLimits {
            max_seqs,
            max_tokens,
            max_queued: 16,
        }
    }

    fn params(prompt: usize, max_new: usize) -> GenerationParams {
        GenerationParams {
            prompt_ids: (0..prompt as u32).map(|i| 100 + i).collect(),
            max_new,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            repetition_penalty: 1.0,
            stop: Vec::new(),
            ignore_eos: true,
            logprobs: false,
            deadline: None,
        }
    }

    /// Takes what was submitted, plans a step and completes it as a worker would, every
    /// sampled token being `token`. Returns `(seq_id, tokens, samples)` of the plan.
    fn turn(s: &mut Scheduler, token: u32) -> Vec<(u64, usize, bool)> {
        while let Ok(sub) = s.rx.try_recv() {
            s.enqueue(sub);
        }
        s.drop_gone();
        let was_running: Vec<u64> = s.running.iter().map(|q| q.id).collect();
        let preempted = s.preemptions;
        let plan = s.schedule();
        if s.preemptions > preempted {
            assert!(
                plan.iter().all(|p| was_running.contains(&p.seq_id)),
                "a step that preempts admits nothing"
            );
        }
        let step = s.build_step(&plan);
        for (p, seq) in plan.iter().zip(&step.seqs) {
            assert_eq!(seq.tokens.len(), p.tokens);
            let needed = (seq.start_pos as usize + p.tokens).div_ceil(s.blocks.block_tokens());
            assert_eq!(seq.block_table.len(), needed, "exactly the blocks in use");
        }
        let results = plan
            .iter()
            .filter(|p| p.samples)
            .map(|p| pb::SeqResult {
                seq_id: p.seq_id,
                token_id: token,
                ..Default::default()
            })
            .collect();
        let out = plan
            .iter()
            .map(|p| (p.seq_id, p.tokens, p.samples))
            .collect();
        s.finish_step(&plan, results);
        out
    }

    fn drain(rx: &mut EventRx) -> (Vec<u32>, Option<Status>) {
        let mut ids = Vec::new();
        while let Ok(m) = rx.try_recv() {
            match m {
                Ok(m) => ids.extend(m.token_ids),
                Err(e) => return (ids, Some(e)),
            }
        }
        (ids, None)
    }

    #[test]
    fn a_long_prompt_is_prefilled_in_chunks_under_the_token_budget() {
        let (mut s, h) = scheduler(64, 4, limits(8, 8));
        let mut rx = h.submit(params(20, 2)).unwrap();
        assert_eq!(turn(&mut s, 7), vec![(0, 8, false)]);
        assert_eq!(turn(&mut s, 7), vec![(0, 8, false)]);
        assert_eq!(
            turn(&mut s, 7),
            vec![(0, 4, true)],
            "the last chunk samples"
        );
        assert_eq!(turn(&mut s, 7), vec![(0, 1, true)], "then decode");
        assert_eq!(drain(&mut rx).0, vec![7, 7]);
        assert!(s.running.is_empty());
        assert_eq!(s.blocks.used(), 0, "a finished sequence frees its blocks");
    }

    #[test]
    fn running_sequences_decode_before_a_new_prompt_takes_the_rest_of_the_budget() {
        let (mut s, h) = scheduler(64, 4, limits(8, 8));
        let _a = h.submit(params(3, 10)).unwrap();
        assert_eq!(turn(&mut s, 7), vec![(0, 3, true)]);
        let _b = h.submit(params(20, 2)).unwrap();
        assert_eq!(turn(&mut s, 7), vec![(0, 1, true), (1, 7, false)]);
        assert_eq!(turn(&mut s, 7), vec![(0, 1, true), (1, 7, false)]);
        assert_eq!(turn(&mut s, 7), vec![(0, 1, true), (1, 6, true)]);
        assert_eq!(turn(&mut s, 7), vec![(0, 1, true), (1, 1, true)]);
    }

    #[test]
    fn admission_is_first_come_first_served_within_the_sequence_limit() {
        let (mut s, h) = scheduler(64, 4, limits(2, 64));
        let _rx: Vec<_> = (0..4).map(|_| h.submit(params(2, 2)).unwrap()).collect();
        assert_eq!(turn(&mut s, 7), vec![(0, 2, true), (1, 2, true)]);
        assert_eq!(turn(&mut s, 7), vec![(0, 1, true), (1, 1, true)]);
        assert_eq!(turn(&mut s, 7), vec![(2, 2, true), (3, 2, true)]);
    }

    #[test]
    fn the_newest_sequence_is_preempted_and_recomputed_with_its_tokens() {
        // 4 blocks of 4 slots: each request alone needs 4 (6 + 10 - 1 = 15 slots).
        let (mut s, h) = scheduler(4, 4, limits(8, 64));
        let mut a = h.submit(params(6, 10)).unwrap();
        let mut b = h.submit(params(6, 10)).unwrap();
        assert_eq!(turn(&mut s, 7), vec![(0, 6, true), (1, 6, true)]);
        assert_eq!(s.blocks.used(), 4);
        // Both now hold 7 tokens (6 + 1 sampled); caching the 7th and 8th fits the two
        // blocks each has; the 9th needs a third block, which only B's preemption frees.
        assert_eq!(turn(&mut s, 7), vec![(0, 1, true), (1, 1, true)]);
        assert_eq!(turn(&mut s, 7), vec![(0, 1, true), (1, 1, true)]);
        assert_eq!(turn(&mut s, 8), vec![(0, 1, true)], "B was preempted");
        assert_eq!(s.waiting.len(), 1);
        assert_eq!(s.waiting[0].id, 1);
        assert_eq!(s.waiting[0].cached, 0, "B's cache is gone");
        let mut steps = 0;
        let mut recomputed = false;
        while !s.running.is_empty() || !s.waiting.is_empty() {
            let plan = turn(&mut s, 9);
            if let Some(&(1, n, samples)) = plan.iter().find(|p| p.0 == 1 && p.1 > 1) {
                assert_eq!(
                    n,
                    6 + 3,
                    "B re-prefills its prompt and its generated tokens"
                );
                assert!(samples);
                recomputed = true;
            }
            steps += 1;
            assert!(steps < 64, "no livelock");
        }
        assert!(recomputed);
        let (a_ids, a_err) = drain(&mut a);
        let (b_ids, b_err) = drain(&mut b);
        assert!(a_err.is_none() && b_err.is_none());
        assert_eq!(a_ids.len(), 10);
        assert_eq!(b_ids.len(), 10);
        assert_eq!(
            &b_ids[..3],
            &[7, 7, 7],
            "tokens streamed before the preemption stay"
        );
        assert_eq!(s.blocks.used(), 0);
    }

    #[test]
    fn a_sequence_preempted_for_lack_of_blocks_is_not_readmitted_in_the_same_step() {
        // 3 blocks of 4 slots, 5 tokens a step. B, the newest, preempts itself to grow; the
        // block it frees would take the 4-token chunk left in the budget at once, and the
        // next step would preempt it again.
        let (mut s, h) = scheduler(3, 4, limits(8, 5));
        let _a = h.submit(params(4, 8)).unwrap();
        let _b = h.submit(params(4, 8)).unwrap();
        assert_eq!(turn(&mut s, 7), vec![(0, 4, true), (1, 1, false)]);
        assert_eq!(turn(&mut s, 7), vec![(0, 1, true), (1, 3, true)]);
        assert_eq!(
            turn(&mut s, 7),
            vec![(0, 1, true)],
            "B preempted itself and waits"
        );
        assert_eq!(s.waiting.len(), 1);
        let mut steps = 0;
        while !s.running.is_empty() || !s.waiting.is_empty() {
            turn(&mut s, 7);
            steps += 1;
            assert!(steps < 64, "no livelock");
        }
        assert_eq!(s.preemptions, 1, "B waited for A instead of thrashing");
    }

    #[test]
    fn a_preempted_sequence_as_large_as_the_cache_still_returns() {
        // 2 blocks of 4 slots, 4 tokens a step. B (older) and A's first chunk share the
        // cache; A's growth preempts A; A needs the whole cache (5 + 4 - 1 = 8 slots) and
        // gets it back once B is done.
        let (mut s, h) = scheduler(2, 4, limits(8, 4));
        let mut b = h.submit(params(2, 3)).unwrap();
        let mut a = h.submit(params(5, 4)).unwrap();
        assert_eq!(turn(&mut s, 7), vec![(0, 2, true), (1, 2, false)]);
        assert_eq!(turn(&mut s, 7), vec![(0, 1, true)], "A preempted itself");
        let mut steps = 0;
        while !s.running.is_empty() || !s.waiting.is_empty() {
            turn(&mut s, 7);
            steps += 1;
            assert!(steps < 64, "no livelock");
        }
        let (ids, err) = drain(&mut a);
        assert!(err.is_none(), "{err:?}");
        assert_eq!(ids.len(), 4);
        assert_eq!(drain(&mut b).0.len(), 3);
        assert_eq!(s.preemptions, 1);
        assert_eq!(s.blocks.used(), 0);
    }

    #[test]
    fn after_a_lost_worker_every_sequence_is_prefilled_again_in_order() {
        let (mut s, h) = scheduler(64, 4, limits(8, 64));
        let mut a = h.submit(params(5, 6)).unwrap();
        let mut b = h.submit(params(3, 6)).unwrap();
        turn(&mut s, 7);
        turn(&mut s, 8);
        assert_eq!(s.blocks.used(), 2 + 1, "6 and 4 tokens cached");
        // The cluster loses a worker: the KV caches are gone.
        s.requeue_running();
        assert!(s.running.is_empty());
        assert_eq!(s.blocks.used(), 0);
        let order: Vec<u64> = s.waiting.iter().map(|q| q.id).collect();
        assert_eq!(order, [0, 1], "oldest first");
        assert!(s.waiting.iter().all(|q| q.cached == 0));
        s.adopt();
        assert_eq!(
            s.step_id, WARM_UP_STEP_ID,
            "the rebuilt workers' next step follows their warm-up"
        );
        assert_eq!(
            turn(&mut s, 9),
            vec![(0, 5 + 2, true), (1, 3 + 2, true)],
            "each prefills its prompt and its 2 generated tokens, then samples"
        );
        while !s.running.is_empty() || !s.waiting.is_empty() {
            turn(&mut s, 9);
        }
        for rx in [&mut a, &mut b] {
            let (ids, err) = drain(rx);
            assert!(err.is_none(), "{err:?}");
            assert_eq!(ids, [7, 8, 9, 9, 9, 9], "no token lost or repeated");
        }
        assert_eq!(s.blocks.used(), 0);
    }

    #[test]
    fn submission_refuses_a_full_queue_and_a_request_that_can_never_fit() {
        let (s, h) = scheduler(
            4,
            4,
            BatchLimits {
                max_seqs: 1,
                max_tokens: 64,
                max_queued: 2,
            },
        );
        let _a = h.submit(params(2, 2)).unwrap();
        let _b = h.submit(params(2, 2)).unwrap();
        let e = h.submit(params(2, 2)).unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");
        let e = h.submit(params(10, 8)).unwrap_err();
        assert_eq!(e.code(), tonic::Code::OutOfRange, "{e}");
        assert!(e.to_string().starts_with("max_tokens"), "{e}");
        drop(s);
    }

    #[test]
    fn cancelled_and_expired_requests_free_their_blocks() {
        let (mut s, h) = scheduler(64, 4, limits(8, 64));
        let a = h.submit(params(5, 20)).unwrap();
        let mut late = params(5, 20);
        late.deadline = Some(Instant::now() + Duration::from_secs(3600));
        let mut b = h.submit(late).unwrap();
        let mut c = h.submit(params(5, 20)).unwrap();
        turn(&mut s, 7);
        assert_eq!(s.blocks.used(), 6);
        drop(a);
        turn(&mut s, 7);
        assert_eq!(s.running.len(), 2, "the dropped stream's sequence is gone");
        s.running[0].params.deadline = Some(Instant::now());
        turn(&mut s, 7);
        assert_eq!(s.running.len(), 1);
        let (_, err) = drain(&mut b);
        assert_eq!(err.unwrap().code(), tonic::Code::DeadlineExceeded);
        assert_eq!(s.blocks.used(), 2, "only C's blocks remain");
        assert_eq!(drain(&mut c).0.len(), 3);
        assert_eq!(h.queued.load(Ordering::SeqCst), 0);
    }
}
