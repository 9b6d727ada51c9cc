//! The shard thread: one OS thread that loads the shard and then owns it, running steps
//! in the order they arrive. On the CPU, load and every step run inside `backend.run`, so
//! the kernels use this shard's own thread pool; a `cuda` shard's context, stream and
//! memory are made and used on this thread; a `sim` shard only takes its time.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tessera_model::{
    check_source, Checkpoint, ModelConfig, ShardPlan, ShardSpec, SyntheticWeights, WeightSource,
};
use tessera_runtime::{
    Backend, CpuBackend, Shard, ShardComms, ShardOptions, StepOutput, StepRequest,
};
use tokio::sync::oneshot;

use crate::cuda::CudaDevice;
use crate::error::WorkerError;
use crate::memory::kv_spec;
use crate::sim::{SimDevice, SimShard};

/// Where the weights come from.
#[derive(Debug, Clone, PartialEq)]
pub enum WeightsSpec {
    /// A Hugging Face checkpoint directory on this machine.
    Checkpoint(PathBuf),
    /// Synthetic weights with this seed.
    Synthetic(u64),
}

/// Everything the shard thread needs to load its shard.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadSpec {
    /// The assigned model.
    pub config: ModelConfig,
    /// This worker's place in the plan.
    pub spec: ShardSpec,
    /// Tensor-parallel degree of the plan.
    pub tp: usize,
    /// Pipeline stages of the plan.
    pub pp: usize,
    /// Where the weights come from.
    pub weights: WeightsSpec,
    /// Storage dtype and KV cache size.
    pub options: ShardOptions,
    /// What the shard runs on.
    pub device: Device,
}

/// What a shard runs on.
#[derive(Debug, Clone, PartialEq)]
pub enum Device {
    /// The CPU backend with this many kernel threads.
    Cpu {
        /// Kernel threads.
        threads: usize,
    },
    /// No arithmetic: each step takes the time predicted on a device profile.
    Sim(SimDevice),
    /// The CUDA backend on one GPU.
    Cuda(CudaDevice),
}

/// A loaded shard, on whatever it runs.
enum Runner {
    Cpu(CpuBackend, Box<Shard<CpuBackend>>),
    #[cfg(feature = "cuda")]
    Cuda(Box<Shard<tessera_runtime::CudaBackend>>),
    Sim(Box<SimShard>),
}

impl Runner {
    fn weight_bytes(&self) -> usize {
        match self {
            Runner::Cpu(_, shard) => shard.weight_bytes(),
            #[cfg(feature = "cuda")]
            Runner::Cuda(shard) => shard.weight_bytes(),
            Runner::Sim(shard) => shard.weight_bytes(),
        }
    }

    fn step(&mut self, req: &StepRequest) -> Result<Option<StepOutput>, WorkerError> {
        match self {
            Runner::Cpu(backend, shard) => backend.run(|| shard.step(req)).map_err(Into::into),
            #[cfg(feature = "cuda")]
            Runner::Cuda(shard) => shard.step(req).map_err(Into::into),
            Runner::Sim(shard) => shard.step(req),
        }
    }

    fn replace_comms(&mut self, comms: ShardComms) -> ShardComms {
        match self {
            Runner::Cpu(_, shard) => shard.replace_comms(comms),
            #[cfg(feature = "cuda")]
            Runner::Cuda(shard) => shard.replace_comms(comms),
            Runner::Sim(shard) => shard.replace_comms(comms),
        }
    }
}

/// What a finished load reports.
#[derive(Debug, Clone, Copy)]
pub struct Loaded {
    /// Bytes of weight matrices held.
    pub weight_bytes: usize,
}

/// A step's outcome on this shard and the time the shard spent on it.
pub type StepReply = Result<(Option<StepOutput>, Duration), WorkerError>;

enum Job {
    /// Run a step.
    Step {
        req: StepRequest,
        reply: oneshot::Sender<StepReply>,
    },
    /// Take a new collective group, keeping the weights.
    Regroup {
        comms: ShardComms,
        reply: oneshot::Sender<Result<Loaded, WorkerError>>,
    },
}

/// Handle of the shard thread. Dropping it closes the step channel and joins the thread,
/// which first finishes the steps already sent: call it where blocking is allowed.
pub struct ShardThread {
    jobs: Option<Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for ShardThread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardThread")
            .field("open", &self.jobs.is_some())
            .finish()
    }
}

impl ShardThread {
    /// Starts the thread; the receiver answers once the shard is loaded or has failed to.
    pub fn spawn(
        load: LoadSpec,
        comms: ShardComms,
    ) -> Result<(ShardThread, oneshot::Receiver<Result<Loaded, WorkerError>>), WorkerError> {
        let (jobs, inbox) = channel::<Job>();
        let (ready, loaded) = oneshot::channel();
        let name = format!("shard-s{}-r{}", load.spec.stage, load.spec.tp_rank);
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                let mut shard = match caught(|| load_shard(&load, comms)) {
                    Ok(loaded) => loaded,
                    Err(e) => {
                        let _ = ready.send(Err(e));
                        return;
                    }
                };
                let _ = ready.send(Ok(Loaded {
                    weight_bytes: shard.weight_bytes(),
                }));
                while let Ok(job) = inbox.recv() {
                    let (req, reply) = match job {
                        Job::Step { req, reply } => (req, reply),
                        Job::Regroup { comms, reply } => {
                            // The old group is dropped here, on the shard's thread.
                            drop(shard.replace_comms(comms));
                            let _ = reply.send(Ok(Loaded {
                                weight_bytes: shard.weight_bytes(),
                            }));
                            continue;
                        }
                    };
                    let start = Instant::now();
                    let result = caught(|| shard.step(&req));
                    // A panic may have left the KV cache or a collective half-written.
                    let broken = matches!(&result, Err(WorkerError::ShardFailed(_)));
                    let _ = reply.send(result.map(|out| (out, start.elapsed())));
                    if broken {
                        return;
                    }
                }
            })
            .map_err(|e| WorkerError::ShardFailed(format!("cannot start the shard thread: {e}")))?;
        Ok((
            ShardThread {
                jobs: Some(jobs),
                thread: Some(thread),
            },
            loaded,
        ))
    }

    /// Queues a step after those already sent; the receiver answers when it has run.
    pub fn submit(&self, req: StepRequest) -> Result<oneshot::Receiver<StepReply>, WorkerError> {
        let (reply, answer) = oneshot::channel();
        self.send(Job::Step { req, reply })?;
        Ok(answer)
    }

    /// Gives the loaded shard a new collective group after the steps already sent; the
    /// receiver answers once it has it. The weights stay.
    pub fn regroup(
        &self,
        comms: ShardComms,
    ) -> Result<oneshot::Receiver<Result<Loaded, WorkerError>>, WorkerError> {
        let (reply, answer) = oneshot::channel();
        self.send(Job::Regroup { comms, reply })?;
        Ok(answer)
    }

    /// Whether the thread still takes jobs (it stops after a panic).
    pub fn is_alive(&self) -> bool {
        self.jobs.is_some() && self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    fn send(&self, job: Job) -> Result<(), WorkerError> {
        self.jobs
            .as_ref()
            .ok_or_else(|| WorkerError::ShardFailed("the shard is closed".into()))?
            .send(job)
            .map_err(|_| WorkerError::ShardFailed("the shard thread has stopped".into()))
    }

    /// Takes no more steps; those already sent still run.
    pub fn close(&mut self) {
        self.jobs = None;
    }
}

impl Drop for ShardThread {
    fn drop(&mut self) {
        self.close();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Runs `f`, turning a panic into a failed shard.
fn caught<T>(f: impl FnOnce() -> Result<T, WorkerError>) -> Result<T, WorkerError> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let why = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown cause".into());
        Err(WorkerError::ShardFailed(format!(
            "the shard panicked: {why}"
        )))
    })
}

fn load_shard(load: &LoadSpec, comms: ShardComms) -> Result<Runner, WorkerError> {
    let threads = match &load.device {
        Device::Cpu { threads } => *threads,
        Device::Cuda(gpu) => return load_cuda(load, gpu, comms),
        Device::Sim(device) => {
            let plan = ShardPlan::new(&load.config, load.tp, load.pp)?;
            let kv = kv_spec(&load.config, &load.spec, &load.options);
            return Ok(Runner::Sim(Box::new(SimShard::new(
                &load.config,
                &plan,
                &load.spec,
                kv,
                device,
                comms,
            )?)));
        }
    };
    let source = open_weights(&load.weights, &load.config)?;
    let backend = CpuBackend::new(threads)?;
    let shard = backend.run(|| {
        Shard::load(
            backend.clone(),
            &load.config,
            &load.spec,
            source.as_ref(),
            load.options,
            comms,
        )
    })?;
    Ok(Runner::Cpu(backend, Box::new(shard)))
}

/// Opens the GPU, compiles (or reads from the kernel cache) and loads the kernels, and
/// loads the shard into device memory.
#[cfg(feature = "cuda")]
fn load_cuda(load: &LoadSpec, gpu: &CudaDevice, comms: ShardComms) -> Result<Runner, WorkerError> {
    use tessera_runtime::cuda::compile::KernelCache;
    use tessera_runtime::{CudaBackend, CudaOptions};

    let source = open_weights(&load.weights, &load.config)?;
    let backend = CudaBackend::new(&CudaOptions {
        ordinal: gpu.ordinal,
        dtype: load.options.dtype,
        kernel_cache: KernelCache::from_env(),
    })?;
    let shard = Shard::load(
        backend,
        &load.config,
        &load.spec,
        source.as_ref(),
        load.options,
        comms,
    )?;
    Ok(Runner::Cuda(Box::new(shard)))
}

#[cfg(not(feature = "cuda"))]
fn load_cuda(_: &LoadSpec, _: &CudaDevice, _: ShardComms) -> Result<Runner, WorkerError> {
    Err(crate::cuda::not_compiled())
}

/// Opens the weights; a checkpoint must describe the assigned model and hold every
/// tensor in the shape that model implies.
fn open_weights(
    weights: &WeightsSpec,
    config: &ModelConfig,
) -> Result<Box<dyn WeightSource>, WorkerError> {
    match weights {
        WeightsSpec::Synthetic(seed) => Ok(Box::new(SyntheticWeights::new(config.clone(), *seed))),
        WeightsSpec::Checkpoint(dir) => {
            let ckpt = open_checkpoint(dir)?;
            check_same_model(ckpt.config(), config)?;
            check_source(&ckpt, config)?;
            Ok(Box::new(ckpt))
        }
    }
}

fn open_checkpoint(dir: &Path) -> Result<Checkpoint, WorkerError> {
    Ok(Checkpoint::open(dir)?)
}

/// Compares every field that shapes the computation. The name is a label, and the
/// end-of-text id only matters to the coordinator, which stops sequences.
pub fn check_same_model(
    checkpoint: &ModelConfig,
    assigned: &ModelConfig,
) -> Result<(), WorkerError> {
    let fields: [(&'static str, String, String); 7] = [
        (
            "vocab_size",
            checkpoint.vocab_size.to_string(),
            assigned.vocab_size.to_string(),
        ),
        (
            "n_positions",
            checkpoint.n_positions.to_string(),
            assigned.n_positions.to_string(),
        ),
        (
            "n_embd",
            checkpoint.n_embd.to_string(),
            assigned.n_embd.to_string(),
        ),
        (
            "n_layer",
            checkpoint.n_layer.to_string(),
            assigned.n_layer.to_string(),
        ),
        (
            "n_head",
            checkpoint.n_head.to_string(),
            assigned.n_head.to_string(),
        ),
        (
            "n_inner",
            checkpoint.n_inner.to_string(),
            assigned.n_inner.to_string(),
        ),
        (
            "layer_norm_epsilon",
            checkpoint.layer_norm_epsilon.to_string(),
            assigned.layer_norm_epsilon.to_string(),
        ),
    ];
    match fields.into_iter().find(|(_, c, a)| c != a) {
        Some((field, checkpoint, assigned)) => Err(WorkerError::ConfigMismatch {
            field,
            checkpoint,
            assigned,
        }),
        None => Ok(()),
    }
}
