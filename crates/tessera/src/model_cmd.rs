//! `tessera model`: sizes of a model and its split, synthetic checkpoints, the preset list.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Subcommand;
use serde::Serialize;
use tessera_model::{ModelConfig, ShardPlan, SyntheticWeights, PRESETS};

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Parameters, weight and KV-cache bytes, and per-worker weight bytes for a split.
    Info {
        /// A preset name or a checkpoint directory.
        model: String,
        /// Tensor-parallel degree of the split to size.
        #[arg(long, default_value_t = 1)]
        tp: usize,
        /// Pipeline stages of the split to size.
        #[arg(long, default_value_t = 1)]
        pp: usize,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Write a Hugging Face-compatible checkpoint of synthetic weights (f32 safetensors).
    Synth {
        /// The preset to synthesise.
        #[arg(long)]
        preset: String,
        /// Seed of the weights; the same seed gives the same checkpoint.
        #[arg(long, alias = "synth-seed", default_value_t = 0)]
        seed: u64,
        /// Output directory (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// Keep only this many transformer blocks (a shallower model of the same width,
        /// e.g. to measure per-step overheads).
        #[arg(long, value_name = "N")]
        layers: Option<usize>,
    },
    /// List the presets.
    List,
}

#[derive(Serialize)]
struct WorkerSize {
    stage: usize,
    tp_rank: usize,
    layers: String,
    params: u64,
    bytes_f32: u64,
    bytes_bf16: u64,
}

#[derive(Serialize)]
struct Info {
    name: String,
    params: u64,
    n_layer: usize,
    n_embd: usize,
    n_head: usize,
    head_dim: usize,
    n_positions: usize,
    vocab_size: usize,
    weight_bytes_f32: u64,
    weight_bytes_bf16: u64,
    weight_bytes_f16: u64,
    kv_bytes_per_token_f32: u64,
    kv_bytes_per_token_bf16: u64,
    tp: usize,
    pp: usize,
    workers: Vec<WorkerSize>,
}

fn load_config(model: &str) -> Result<ModelConfig> {
    let path = Path::new(model);
    if path.is_dir() {
        Ok(ModelConfig::from_hf_dir(path)?)
    } else {
        Ok(ModelConfig::preset(model)?)
    }
}

/// Bytes with a binary unit.
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

fn count(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.1}M", n as f64 / 1e6),
        n => n.to_string(),
    }
}

pub fn model(cmd: ModelCommand) -> Result<()> {
    match cmd {
        ModelCommand::Info {
            model,
            tp,
            pp,
            json,
        } => {
            let c = load_config(&model)?;
            let plan = ShardPlan::new(&c, tp, pp)?;
            let p = c.param_count();
            let workers: Vec<WorkerSize> = plan
                .shards
                .iter()
                .map(|s| {
                    let params = plan.worker_params(&c, s);
                    WorkerSize {
                        stage: s.stage,
                        tp_rank: s.tp_rank,
                        layers: format!("{}..{}", s.layers.start, s.layers.end),
                        params,
                        bytes_f32: params * 4,
                        bytes_bf16: params * 2,
                    }
                })
                .collect();
            let info = Info {
                name: c.name.clone(),
                params: p,
                n_layer: c.n_layer,
                n_embd: c.n_embd,
                n_head: c.n_head,
                head_dim: c.head_dim(),
                n_positions: c.n_positions,
                vocab_size: c.vocab_size,
                weight_bytes_f32: p * 4,
                weight_bytes_bf16: p * 2,
                weight_bytes_f16: p * 2,
                kv_bytes_per_token_f32: c.kv_bytes_per_token(4),
                kv_bytes_per_token_bf16: c.kv_bytes_per_token(2),
                tp,
                pp,
                workers,
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&info)?);
                return Ok(());
            }
            println!("{}: {} parameters", info.name, count(p));
            println!(
                "  layers {}  d_model {}  heads {} × {}  context {}  vocab {}",
                c.n_layer,
                c.n_embd,
                c.n_head,
                c.head_dim(),
                c.n_positions,
                c.vocab_size
            );
            println!(
                "  weights: f32 {}  bf16 {}  f16 {}",
                human_bytes(info.weight_bytes_f32),
                human_bytes(info.weight_bytes_bf16),
                human_bytes(info.weight_bytes_f16)
            );
            println!(
                "  KV cache per token: f32 {}  bf16/f16 {}",
                human_bytes(info.kv_bytes_per_token_f32),
                human_bytes(info.kv_bytes_per_token_bf16)
            );
            println!("  split tp={tp} pp={pp}: {} workers", plan.world_size());
            println!(
                "  {:>5} {:>7} {:>9} {:>10} {:>12} {:>12}",
                "stage", "tp_rank", "layers", "params", "f32", "bf16"
            );
            for w in &info.workers {
                println!(
                    "  {:>5} {:>7} {:>9} {:>10} {:>12} {:>12}",
                    w.stage,
                    w.tp_rank,
                    w.layers,
                    count(w.params),
                    human_bytes(w.bytes_f32),
                    human_bytes(w.bytes_bf16)
                );
            }
            Ok(())
        }
        ModelCommand::Synth {
            preset,
            seed,
            out,
            layers,
        } => {
            let mut config = ModelConfig::preset(&preset)?;
            if let Some(n) = layers {
                config.n_layer = n;
                config.name = format!("{preset}-{n}l");
                config.validate()?;
            }
            let bytes = config.param_count() * 4;
            eprintln!(
                "writing {} ({}, seed {seed}) to {}",
                config.name,
                human_bytes(bytes),
                out.display()
            );
            SyntheticWeights::new(config, seed)
                .write_checkpoint(&out)
                .with_context(|| format!("cannot write {}", out.display()))?;
            println!("{}", out.display());
            Ok(())
        }
        ModelCommand::List => {
            println!(
                "{:<12} {:>8} {:>6} {:>7} {:>6} {:>7}  about",
                "preset", "params", "layers", "d_model", "heads", "context"
            );
            for p in PRESETS {
                let c = p.config();
                println!(
                    "{:<12} {:>8} {:>6} {:>7} {:>6} {:>7}  {}",
                    p.name,
                    count(c.param_count()),
                    c.n_layer,
                    c.n_embd,
                    c.n_head,
                    c.n_positions,
                    p.about
                );
            }
            Ok(())
        }
    }
}
