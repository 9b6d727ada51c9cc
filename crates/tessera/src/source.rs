//! Where the model comes from: a checkpoint directory or a preset with synthetic weights.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use tessera_model::{check_source, Checkpoint, ModelConfig, SyntheticWeights, WeightSource};

/// Model selection flags shared by every command that loads a model.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// Hugging Face GPT-2 checkpoint directory (config.json + model.safetensors or a
    /// sharded model.safetensors.index.json).
    #[arg(long, value_name = "DIR", conflicts_with = "preset")]
    pub model: Option<PathBuf>,
    /// A preset with synthetic weights (see `tessera model list`).
    #[arg(long, value_name = "NAME", default_value = "gpt2-tiny")]
    pub preset: String,
    /// Seed of the synthetic weights of a preset.
    #[arg(long, value_name = "S", default_value_t = 0)]
    pub synth_seed: u64,
}

impl ModelArgs {
    /// Opens the checkpoint or prepares the synthetic weights, and checks every tensor's shape.
    pub fn open(&self) -> Result<(ModelConfig, Arc<dyn WeightSource>)> {
        match &self.model {
            Some(dir) => {
                let ckpt = Checkpoint::open(dir)
                    .with_context(|| format!("cannot open checkpoint {}", dir.display()))?;
                let config = ckpt.config().clone();
                check_source(&ckpt, &config)?;
                Ok((config, Arc::new(ckpt)))
            }
            None => {
                let config = ModelConfig::preset(&self.preset)?;
                Ok((
                    config.clone(),
                    Arc::new(SyntheticWeights::new(config, self.synth_seed)),
                ))
            }
        }
    }
}

/// One CPU backend per shard, splitting `threads` evenly over the `world` shards of this
/// process (at least one each).
pub fn cpu_backends(
    threads: usize,
    world: usize,
) -> impl Fn(&tessera_model::ShardSpec) -> tessera_runtime::Result<tessera_runtime::CpuBackend> {
    let per_shard = (threads / world.max(1)).max(1);
    move |_| tessera_runtime::CpuBackend::new(per_shard)
}

/// Sizes rayon's global pool: every core unless told otherwise.
pub fn init_threads(threads: Option<usize>) -> Result<usize> {
    let n = threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    if n == 0 {
        anyhow::bail!("--threads must be at least 1");
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
        .context("cannot size the thread pool")?;
    Ok(n)
}
