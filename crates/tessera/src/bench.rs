//! `tessera bench`: the serving load generator (`bench_serve.rs`) or a subcommand;
//! `tessera bench decode`, here: batch-1 decode throughput against the memory-bandwidth
//! floor.
//!
//! Batch-1 decode reads every weight once per token, so its ceiling is
//! `read bandwidth ÷ weight bytes per token`. The bandwidth is measured here, with the
//! same threads, over a buffer as large as the weights streamed per token.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use serde::Serialize;
use tessera_model::ShardPlan;
use tessera_runtime::cpu::membw;
use tessera_runtime::{
    Backend, CpuBackend, GenerateRequest, LocalEngine, SamplingParams, ShardOptions, WeightDtype,
};

use crate::source::{init_threads, ModelArgs};

/// `tessera bench`: the serving load generator, or one of the older benchmarks.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    #[command(subcommand)]
    command: Option<BenchCommand>,
    #[command(flatten)]
    serve: crate::bench_serve::ServeBenchArgs,
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Batch-1 decode tokens/s per weight dtype, beside the bandwidth floor (and PyTorch).
    Decode(DecodeArgs),
    /// Decode latency per token as a client of a running cluster sees it (streaming).
    Cluster(crate::bench_cluster::ClusterArgs),
    /// Output tokens/s of a running cluster at 1, 8, 32, 64 concurrent clients.
    Throughput(crate::bench_throughput::ThroughputArgs),
}

#[derive(Debug, Args)]
pub struct DecodeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Weight dtypes to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "f32,bf16")]
    dtypes: Vec<WeightDtype>,
    /// Prompt tokens before decode starts.
    #[arg(long, default_value_t = 16)]
    prompt_tokens: usize,
    /// Decode steps not timed.
    #[arg(long, default_value_t = 8)]
    warmup: usize,
    /// Decode steps timed.
    #[arg(long, default_value_t = 64)]
    tokens: usize,
    /// Rounds of (decode, bandwidth read); the best of each is reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Threads (default: every core).
    #[arg(long)]
    threads: Option<usize>,
    /// Also run `scripts/bench_torch.py` with this Python (transformers + torch installed)
    /// on the same shape and threads, and print its figures beside ours.
    #[arg(long, value_name = "PYTHON")]
    torch_python: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct DecodeResult {
    engine: String,
    dtype: String,
    decode_tokens_per_s: f64,
    ms_per_token: f64,
    weight_bytes_per_token: Option<u64>,
    read_bandwidth_gb_s: Option<f64>,
    floor_tokens_per_s: Option<f64>,
    fraction_of_floor: Option<f64>,
}

fn measure(args: &DecodeArgs, dtype: WeightDtype, threads: usize) -> Result<DecodeResult> {
    let (config, source) = args.model.open()?;
    let plan = ShardPlan::new(&config, 1, 1)?;
    let block_size = 16;
    let options = ShardOptions {
        dtype,
        kv_blocks: config.n_positions.div_ceil(block_size),
        block_size,
    };
    let engine = LocalEngine::start(|_| CpuBackend::new(threads), &config, plan, source, options)?;
    let bytes: u64 = engine.weight_bytes().iter().map(|&b| b as u64).sum();
    if args.prompt_tokens + args.warmup + args.tokens >= config.n_positions {
        bail!(
            "prompt + warm-up + timed tokens must fit in the context of {}",
            config.n_positions
        );
    }
    let prompt: Vec<u32> = (0..args.prompt_tokens as u32)
        .map(|i| (i * 7919) % config.vocab_size as u32)
        .collect();
    let req = |n| GenerateRequest {
        prompt_ids: prompt.clone(),
        max_tokens: n,
        params: SamplingParams::default(),
        ignore_eos: true,
        return_logits: false,
    };
    engine.generate(&req(args.warmup + 1))?;
    // Rounds alternate decode and the bandwidth read on a pool of the same threads; the best
    // of each is the figure least disturbed by whatever else shares the machine.
    let reader = CpuBackend::new(threads)?;
    let (mut tps, mut bw) = (0f64, 0f64);
    for _ in 0..args.rounds.max(1) {
        // The first token comes from the prefill step; decode_ms covers the rest.
        let g = engine.generate(&req(args.tokens + 1))?;
        tps = tps.max(g.decode_tokens_per_s());
        bw = bw.max(reader.run(|| membw::read_bandwidth_gb_s(bytes as usize, 3)));
    }
    let floor = bw * 1e9 / bytes as f64;
    Ok(DecodeResult {
        engine: "tessera".into(),
        dtype: dtype.to_string(),
        decode_tokens_per_s: tps,
        ms_per_token: 1e3 / tps,
        weight_bytes_per_token: Some(bytes),
        read_bandwidth_gb_s: Some(bw),
        floor_tokens_per_s: Some(floor),
        fraction_of_floor: Some(tps / floor),
    })
}

fn torch(args: &DecodeArgs, python: &PathBuf, threads: usize) -> Result<Vec<DecodeResult>> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/bench_torch.py");
    let dtypes: Vec<String> = args.dtypes.iter().map(|d| d.to_string()).collect();
    let dtype_arg = if dtypes.len() > 1 {
        "both".to_string()
    } else {
        dtypes[0].clone()
    };
    let mut cmd = Command::new(python);
    cmd.arg(&script)
        .args([
            "--preset",
            &args.model.preset,
            "--dtype",
            &dtype_arg,
            "--tokens",
            &args.tokens.to_string(),
        ])
        .args(["--threads", &threads.to_string(), "--json"]);
    if let Some(dir) = &args.model.model {
        cmd.arg("--checkpoint").arg(dir);
    }
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {}", python.display()))?;
    if !out.status.success() {
        bail!(
            "bench_torch.py failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .context("bench_torch.py printed no JSON")?;
    let v: serde_json::Value = serde_json::from_str(line)?;
    let version = v["torch"].as_str().unwrap_or("?");
    let results = v["results"]
        .as_array()
        .context("bench_torch.py JSON has no results")?;
    Ok(results
        .iter()
        .map(|r| DecodeResult {
            engine: format!("pytorch {version}"),
            dtype: r["dtype"].as_str().unwrap_or("?").to_string(),
            decode_tokens_per_s: r["decode_tokens_per_s"].as_f64().unwrap_or(0.0),
            ms_per_token: r["ms_per_token"].as_f64().unwrap_or(0.0),
            weight_bytes_per_token: None,
            read_bandwidth_gb_s: None,
            floor_tokens_per_s: None,
            fraction_of_floor: None,
        })
        .collect())
}

pub fn bench(args: BenchArgs) -> Result<()> {
    let Some(cmd) = args.command else {
        return crate::bench_serve::bench_serve(args.serve);
    };
    match cmd {
        BenchCommand::Cluster(args) => crate::bench_cluster::bench_cluster(args),
        BenchCommand::Throughput(args) => crate::bench_throughput::bench_throughput(args),
        BenchCommand::Decode(args) => {
            let threads = init_threads(args.threads)?;
            let mut results = Vec::new();
            for &dtype in &args.dtypes {
                results.push(measure(&args, dtype, threads)?);
            }
            if let Some(py) = &args.torch_python {
                let theirs = torch(&args, py, threads)?;
                for r in theirs {
                    let floor = results
                        .iter()
                        .find(|o| o.dtype == r.dtype)
                        .and_then(|o| o.floor_tokens_per_s);
                    results.push(DecodeResult {
                        fraction_of_floor: floor.map(|f| r.decode_tokens_per_s / f),
                        floor_tokens_per_s: floor,
                        ..r
                    });
                }
            }
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string(
                        &serde_json::json!({ "threads": threads, "results": results })
                    )?
                );
                return Ok(());
            }
            let name = args
                .model
                .model
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or(args.model.preset.clone());
            println!(
                "batch-1 decode, {name}, {threads} threads, {} timed tokens, best of {} rounds",
                args.tokens, args.rounds
            );
            println!(
                "{:<22} {:>5} {:>10} {:>9} {:>12} {:>10} {:>11} {:>8}",
                "engine",
                "dtype",
                "tokens/s",
                "ms/token",
                "MB/token",
                "read GB/s",
                "floor tok/s",
                "of floor"
            );
            for r in &results {
                let opt = |v: Option<f64>, p: usize| {
                    v.map(|v| format!("{v:.p$}")).unwrap_or_else(|| "-".into())
                };
                println!(
                    "{:<22} {:>5} {:>10.2} {:>9.2} {:>12} {:>10} {:>11} {:>8}",
                    r.engine,
                    r.dtype,
                    r.decode_tokens_per_s,
                    r.ms_per_token,
                    opt(r.weight_bytes_per_token.map(|b| b as f64 / 1e6), 1),
                    opt(r.read_bandwidth_gb_s, 2),
                    opt(r.floor_tokens_per_s, 2),
                    r.fraction_of_floor
                        .map(|f| format!("{:.1}%", f * 100.0))
                        .unwrap_or_else(|| "-".into()),
                );
            }
            Ok(())
        }
    }
}
