//! `LocalEngine`: every shard of a TP × PP plan as a thread of this process, joined by the
//! `local` collective. It is what `tessera run` drives, and the reference the cluster's
//! cross-process runs are compared with.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

use tessera_model::{ModelConfig, ShardPlan, ShardSpec, WeightSource};

use crate::backend::Backend;
use crate::collective::{local_group, Collective};
use crate::error::{Result, RuntimeError};
use crate::shard::{Shard, ShardComms, ShardOptions};
use crate::step::{StepOutput, StepRequest};

struct Worker {
    tx: Option<Sender<Arc<StepRequest>>>,
    rx: Receiver<Result<Option<StepOutput>>>,
    thread: Option<JoinHandle<()>>,
}

/// All shards of a plan, one thread each.
pub struct LocalEngine {
    config: ModelConfig,
    plan: ShardPlan,
    options: ShardOptions,
    weight_bytes: Vec<usize>,
    workers: Vec<Worker>,
}

impl LocalEngine {
    /// Loads every shard of `plan` from `source` on `backend` and waits until all are ready.
    /// `backend_for` makes each shard's backend (for the CPU, a pool of that shard's threads).
    pub fn start<B: Backend + Clone>(
        backend_for: impl Fn(&ShardSpec) -> Result<B>,
        config: &ModelConfig,
        plan: ShardPlan,
        source: Arc<dyn WeightSource>,
        options: ShardOptions,
    ) -> Result<Self> {
        let (tp, pp) = (plan.tp, plan.pp);
        let mut tp_groups: Vec<Vec<Box<dyn Collective>>> = (0..pp)
            .map(|_| {
                local_group(tp)
                    .into_iter()
                    .map(|c| Box::new(c) as Box<dyn Collective>)
                    .collect()
            })
            .collect();
        let mut prev: Vec<Option<Box<dyn Collective>>> = (0..tp * pp).map(|_| None).collect();
        let mut next: Vec<Option<Box<dyn Collective>>> = (0..tp * pp).map(|_| None).collect();
        for stage in 0..pp.saturating_sub(1) {
            for rank in 0..tp {
                let mut pair = local_group(2);
                let later = pair.pop().expect("two ranks");
                let earlier = pair.pop().expect("two ranks");
                next[stage * tp + rank] = Some(Box::new(earlier));
                prev[(stage + 1) * tp + rank] = Some(Box::new(later));
            }
        }
        let mut workers = Vec::with_capacity(tp * pp);
        let mut ready = Vec::with_capacity(tp * pp);
        for (i, spec) in plan.shards.iter().enumerate().rev() {
            let comms = ShardComms {
                tp: tp_groups[spec.stage].pop().expect("one comm per rank"),
                prev: prev[i].take(),
                next: next[i].take(),
            };
            let (step_tx, step_rx) = channel::<Arc<StepRequest>>();
            let (out_tx, out_rx) = channel();
            let (ready_tx, ready_rx) = channel();
            let backend = backend_for(spec)?;
            let (config, spec, source) = (config.clone(), spec.clone(), source.clone());
            let thread = std::thread::Builder::new()
                .name(format!("shard-s{}-r{}", spec.stage, spec.tp_rank))
                .spawn(move || {
                    let threads = backend.clone();
                    let loaded = threads.run(|| {
                        Shard::load(backend, &config, &spec, source.as_ref(), options, comms)
                    });
                    let mut shard = match loaded {
                        Ok(s) => {
                            let _ = ready_tx.send(Ok(s.weight_bytes()));
                            s
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    while let Ok(req) = step_rx.recv() {
                        let result = threads.run(|| shard.step(&req));
                        if out_tx.send(result).is_err() {
                            return;
                        }
                    }
                })
                .map_err(|e| RuntimeError::Backend(format!("cannot start a shard thread: {e}")))?;
            workers.push(Worker {
                tx: Some(step_tx),
                rx: out_rx,
                thread: Some(thread),
            });
            ready.push(ready_rx);
        }
        workers.reverse();
        ready.reverse();
        let mut weight_bytes = Vec::new();
        let mut first_error = None;
        for r in ready {
            match r.recv() {
                Ok(Ok(bytes)) => weight_bytes.push(bytes),
                Ok(Err(e)) => {
                    first_error.get_or_insert(e);
                }
                Err(_) => {
                    first_error.get_or_insert(RuntimeError::Backend(
                        "a shard thread died while loading".into(),
                    ));
                }
            }
        }
        let engine = LocalEngine {
            config: config.clone(),
            plan,
            options,
            weight_bytes,
            workers,
        };
        if let Some(e) = first_error {
            // Dropping the engine stops and joins the shards that did load.
            return Err(e);
        }
        Ok(engine)
    }

    /// The model served.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The split in use.
    pub fn plan(&self) -> &ShardPlan {
        &self.plan
    }

    /// Storage options of the shards.
    pub fn options(&self) -> ShardOptions {
        self.options
    }

    /// Weight-matrix bytes held by each worker, in plan order.
    pub fn weight_bytes(&self) -> &[usize] {
        &self.weight_bytes
    }

    /// Runs one step on every shard and returns the last stage's answer.
    pub fn step(&self, req: StepRequest) -> Result<StepOutput> {
        let req = Arc::new(req);
        for w in &self.workers {
            w.tx.as_ref()
                .expect("senders live until shutdown")
                .send(req.clone())
                .map_err(|_| RuntimeError::Backend("a shard thread has stopped".into()))?;
        }
        let mut output = None;
        let mut first_error = None;
        for w in &self.workers {
            match w.rx.recv() {
                Ok(Ok(Some(out))) => output = Some(out),
                Ok(Ok(None)) => {}
                Ok(Err(e)) => {
                    first_error.get_or_insert(e);
                }
                Err(_) => {
                    first_error
                        .get_or_insert(RuntimeError::Backend("a shard thread has stopped".into()));
                }
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        output.ok_or_else(|| RuntimeError::Backend("no shard returned the step's tokens".into()))
    }

    fn shutdown(&mut self) {
        for w in &mut self.workers {
            w.tx.take();
        }
        for w in &mut self.workers {
            if let Some(t) = w.thread.take() {
                let _ = t.join();
            }
        }
    }
}

impl Drop for LocalEngine {
    fn drop(&mut self) {
        self.shutdown();
    }
}
