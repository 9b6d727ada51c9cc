//! The scheduler: one task that owns every sequence, the KV blocks and the step loop.
//!
//! Requests reach it over a channel ([`SchedulerHandle::submit`]); each step it admits
//! waiting requests first come, first served while the batch limits and the KV blocks
//! allow, drops sequences whose client has gone, sends one step with every running
//! sequence to the workers, and turns the sampled tokens into stream messages. The
//! coordinator's record of every sequence (prompt and generated tokens) lives here.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tessera_model::Tokenizer;
use tessera_proto::v1::{FinishReason, GenerateStreamResponse};
use tessera_proto::worker::v1 as pb;
use tokio::sync::mpsc;
use tonic::Status;
use tracing::{debug, warn};

use crate::blocks::BlockManager;
use crate::detok::TextStream;
use crate::error::CoordinatorError;
use crate::state::{fail, ClusterState, StateRx, StateTx};
use crate::workers::ShardedClient;

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
}

/// Messages of one request's stream; an `Err` ends it.
pub type EventRx = mpsc::UnboundedReceiver<Result<GenerateStreamResponse, Status>>;
type EventTx = mpsc::UnboundedSender<Result<GenerateStreamResponse, Status>>;

struct Submission {
    params: GenerationParams,
    events: EventTx,
}

/// Limits of the running batch.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    /// Sequences per step.
    pub max_seqs: usize,
    /// New tokens per step.
    pub max_tokens: usize,
    /// Requests waiting at most.
    pub max_queued: usize,
}

/// How the rest of the coordinator talks to the scheduler.
#[derive(Clone)]
pub struct SchedulerHandle {
    tx: mpsc::UnboundedSender<Submission>,
    waiting: Arc<AtomicUsize>,
    max_queued: usize,
    state: StateRx,
    kv_capacity_tokens: usize,
    block_tokens: usize,
}

impl SchedulerHandle {
    /// Queues a request; its messages arrive on the returned receiver. Refused at once when
    /// the cluster is not serving, the queue is full, or the request could never fit the
    /// KV cache.
    pub fn submit(&self, params: GenerationParams) -> Result<EventRx, CoordinatorError> {
        if let Some(e) = self.state.borrow().refusal() {
            return Err(e);
        }
        let slots = params.prompt_ids.len() + params.max_new - 1;
        let needed = slots.div_ceil(self.block_tokens) * self.block_tokens;
        if needed > self.kv_capacity_tokens {
            return Err(CoordinatorError::ResourceExhausted(format!(
                "the request needs KV cache for {slots} tokens; the cluster holds {}",
                self.kv_capacity_tokens
            )));
        }
        let waiting = self.waiting.fetch_add(1, Ordering::SeqCst);
        if waiting >= self.max_queued {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(CoordinatorError::ResourceExhausted(format!(
                "{waiting} requests are already waiting (max_queued)"
            )));
        }
        let (events, rx) = mpsc::unbounded_channel();
        if self.tx.send(Submission { params, events }).is_err() {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(CoordinatorError::Cancelled(
                "the scheduler has stopped".into(),
            ));
        }
        Ok(rx)
    }
}

struct Sequence {
    id: u64,
    params: GenerationParams,
    events: EventTx,
    /// Generated tokens: with the prompt, the coordinator's full record of the sequence.
    generated: Vec<u32>,
    /// Tokens whose K/V the workers hold.
    cached: usize,
    blocks: Vec<u32>,
    text: TextStream,
    seen: BTreeSet<u32>,
}

impl Sequence {
    fn next_tokens(&self) -> Vec<u32> {
        if self.cached == 0 {
            self.params.prompt_ids.clone()
        } else {
            vec![*self
                .generated
                .last()
                .expect("decode follows a sampled token")]
        }
    }
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

/// The scheduler task's state.
pub struct Scheduler {
    rx: mpsc::UnboundedReceiver<Submission>,
    waiting_count: Arc<AtomicUsize>,
    waiting: VecDeque<Submission>,
    running: Vec<Sequence>,
    blocks: BlockManager,
    limits: BatchLimits,
    workers: ShardedClient,
    tokenizer: Arc<Tokenizer>,
    eos: u32,
    state_tx: StateTx,
    state: StateRx,
    next_seq: u64,
    step_id: u64,
    timing: StepTiming,
}

impl Scheduler {
    /// A scheduler over `workers`, whose KV caches hold `blocks`; and its handle.
    pub fn new(
        workers: ShardedClient,
        blocks: BlockManager,
        limits: BatchLimits,
        tokenizer: Arc<Tokenizer>,
        eos: u32,
        state_tx: StateTx,
        first_step_id: u64,
    ) -> (Scheduler, SchedulerHandle) {
        let (tx, rx) = mpsc::unbounded_channel();
        let waiting = Arc::new(AtomicUsize::new(0));
        let state = state_tx.subscribe();
        let handle = SchedulerHandle {
            tx,
            waiting: waiting.clone(),
            max_queued: limits.max_queued,
            state: state.clone(),
            kv_capacity_tokens: blocks.total() * blocks.block_tokens(),
            block_tokens: blocks.block_tokens(),
        };
        let s = Scheduler {
            rx,
            waiting_count: waiting,
            waiting: VecDeque::new(),
            running: Vec::new(),
            blocks,
            limits,
            workers,
            tokenizer,
            eos,
            state_tx,
            state,
            next_seq: 0,
            step_id: first_step_id,
            timing: StepTiming::default(),
        };
        (s, handle)
    }

    /// Runs until every handle is dropped or the cluster stops.
    pub async fn run(mut self) -> StepTiming {
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                tokio::select! {
                    sub = self.rx.recv() => match sub {
                        Some(s) => self.waiting.push_back(s),
                        None => break,
                    },
                    changed = self.state.changed() => {
                        if changed.is_err() { break; }
                    }
                }
            }
            while let Ok(s) = self.rx.try_recv() {
                self.waiting.push_back(s);
            }
            let state = self.state.borrow().clone();
            if let Some(e) = state.refusal() {
                self.fail_all(&e);
                if state == ClusterState::Stopping {
                    break;
                }
                continue;
            }
            self.drop_cancelled();
            self.admit();
            if self.running.is_empty() {
                // Everything waiting was cancelled; wait for more.
                continue;
            }
            self.step().await;
        }
        let e = CoordinatorError::Cancelled("the server is shutting down".into());
        self.fail_all(&e);
        self.timing
    }

    fn drop_cancelled(&mut self) {
        let before = self.waiting.len();
        self.waiting.retain(|s| !s.events.is_closed());
        let gone = before - self.waiting.len();
        self.waiting_count.fetch_sub(gone, Ordering::SeqCst);
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].events.is_closed() {
                let seq = self.running.swap_remove(i);
                debug!(seq = seq.id, "client gone; sequence dropped");
                self.blocks.release(seq.blocks);
            } else {
                i += 1;
            }
        }
    }

    /// Admits waiting requests first come, first served while the step's sequence and
    /// token budgets and the free KV blocks allow. Blocks for the whole generation are
    /// taken up front, so an admitted sequence always runs to its end.
    fn admit(&mut self) {
        let mut tokens: usize = self.running.len();
        while let Some(front) = self.waiting.front() {
            let p = &front.params;
            if self.running.len() >= self.limits.max_seqs {
                break;
            }
            let first = self.running.is_empty();
            if !first && tokens + p.prompt_ids.len() > self.limits.max_tokens {
                break;
            }
            let slots = p.prompt_ids.len() + p.max_new - 1;
            let Some(blocks) = self.blocks.allocate(self.blocks.blocks_for(slots)) else {
                break;
            };
            let sub = self.waiting.pop_front().expect("front exists");
            self.waiting_count.fetch_sub(1, Ordering::SeqCst);
            tokens += sub.params.prompt_ids.len();
            let seen = if sub.params.repetition_penalty != 1.0 {
                sub.params.prompt_ids.iter().copied().collect()
            } else {
                BTreeSet::new()
            };
            let id = self.next_seq;
            self.next_seq += 1;
            self.running.push(Sequence {
                id,
                text: TextStream::new(sub.params.stop.clone()),
                params: sub.params,
                events: sub.events,
                generated: Vec::new(),
                cached: 0,
                blocks,
                seen,
            });
        }
    }

    fn build_step(&mut self) -> pb::StepRequest {
        self.step_id += 1;
        let seqs = self
            .running
            .iter()
            .map(|s| {
                let p = &s.params;
                pb::SeqStep {
                    seq_id: s.id,
                    tokens: s.next_tokens(),
                    start_pos: s.cached as u32,
                    block_table: s.blocks.clone(),
                    sample: Some(pb::SampleSpec {
                        temperature: p.temperature,
                        top_k: p.top_k,
                        top_p: p.top_p,
                        seed: p.seed,
                        repetition_penalty: p.repetition_penalty,
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

    async fn step(&mut self) {
        let req = self.build_step();
        let workers = self.workers.clone();
        let mut state = self.state.clone();
        let outcome = tokio::select! {
            r = workers.step(req) => Some(r),
            _ = state.wait_for(|s| *s != ClusterState::Serving) => None,
        };
        match outcome {
            None => {
                // The health monitor marked the cluster failed while the step ran; the
                // next turn of the loop ends every sequence with its message.
            }
            Some(Err(f)) if f.invalid => {
                let e = CoordinatorError::Internal(format!("a step was refused: {}", f.message));
                warn!("{e}");
                for seq in std::mem::take(&mut self.running) {
                    let _ = seq.events.send(Err(e.clone().into()));
                    self.blocks.release(seq.blocks);
                }
            }
            Some(Err(f)) => fail(&self.state_tx, f.message),
            Some(Ok(reply)) => {
                self.timing.steps += 1;
                self.timing.wall += reply.wall;
                self.timing.compute += reply.max_compute;
                debug!(
                    step = self.step_id,
                    seqs = self.running.len(),
                    wall_us = reply.wall.as_micros() as u64,
                    compute_us = reply.max_compute.as_micros() as u64,
                    "step"
                );
                let by_seq: HashMap<u64, pb::SeqResult> =
                    reply.results.into_iter().map(|r| (r.seq_id, r)).collect();
                let mut i = 0;
                while i < self.running.len() {
                    let finished = match by_seq.get(&self.running[i].id) {
                        Some(r) => self.advance(i, r.token_id, r.logprob),
                        None => {
                            let e = CoordinatorError::Internal(format!(
                                "the step returned no token for sequence {}",
                                self.running[i].id
                            ));
                            let _ = self.running[i].events.send(Err(e.into()));
                            true
                        }
                    };
                    if finished {
                        let seq = self.running.swap_remove(i);
                        self.blocks.release(seq.blocks);
                    } else {
                        i += 1;
                    }
                }
            }
        }
    }

    /// Appends a sampled token to sequence `i`, streams it, and says whether it finished.
    fn advance(&mut self, i: usize, token: u32, logprob: f32) -> bool {
        let eos = self.eos;
        let seq = &mut self.running[i];
        seq.cached += seq.next_tokens().len();
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
        finish.is_some()
    }

    fn fail_all(&mut self, e: &CoordinatorError) {
        for seq in std::mem::take(&mut self.running) {
            let _ = seq.events.send(Err(e.clone().into()));
            self.blocks.release(seq.blocks);
        }
        for sub in std::mem::take(&mut self.waiting) {
            let _ = sub.events.send(Err(e.clone().into()));
            self.waiting_count.fetch_sub(1, Ordering::SeqCst);
        }
        // Requests that arrive later are refused by `submit`; drain any that raced it.
        while let Ok(sub) = self.rx.try_recv() {
            let _ = sub.events.send(Err(e.clone().into()));
            self.waiting_count.fetch_sub(1, Ordering::SeqCst);
        }
    }
}
