//! `tessera gpu-check`: checks the CUDA backend against the CPU backend on this machine's
//! GPU and times it against floors measured on the same GPU (see
//! `tessera_runtime::cuda::check`). Prints a short table last; `--out` keeps the whole
//! record as JSON.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use tessera_runtime::cuda::check::{planned_timings, Ceilings, CheckOptions, Report};

/// Flags of `tessera gpu-check`.
#[derive(Debug, Args)]
pub struct GpuCheckArgs {
    /// CUDA device to check.
    #[arg(long, default_value_t = 0)]
    pub device: usize,
    /// Directory for `gpu-check.json` (everything measured) and `gpu-check.txt` (the
    /// table); created if missing.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Untimed runs before each timing.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Timed runs of each timing; the median is reported.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub repeats: u64,
    /// Tokens already cached per sequence in the timed decode steps.
    #[arg(long, default_value_t = 256)]
    pub context: usize,
    /// Batch sizes of the timed decode steps.
    #[arg(long, value_delimiter = ',', default_value = "1,8,64")]
    pub batches: Vec<usize>,
    /// Tokens of the timed prefill.
    #[arg(long, default_value_t = 2048)]
    pub prefill_tokens: usize,
    /// Preset of the timed shard.
    #[arg(long, default_value = "gpt3-175b")]
    pub model: String,
    /// Tensor-parallel degree of the timed shard; its rank 0 is loaded and timed.
    #[arg(long, default_value_t = 8)]
    pub tp: usize,
    /// Skip loading and timing the large shard (checks and kernel timings only).
    #[arg(long)]
    pub skip_large: bool,
    /// Print what would be timed, with the bytes and FLOPs of each, and exit; needs no
    /// GPU. With --memory-gbps and --matrix-tflops it prints floors too.
    #[arg(long)]
    pub dry_run: bool,
    /// Memory bandwidth (read+write GB/s) to compute --dry-run floors with.
    #[arg(long, requires = "dry_run")]
    pub memory_gbps: Option<f64>,
    /// bf16 matrix rate (TFLOP/s) to compute --dry-run floors with.
    #[arg(long, requires = "dry_run")]
    pub matrix_tflops: Option<f64>,
}

impl GpuCheckArgs {
    fn options(&self) -> Result<CheckOptions> {
        if self.batches.is_empty() || self.batches.contains(&0) {
            bail!("--batches needs one or more batch sizes of at least 1");
        }
        if self.prefill_tokens == 0 {
            bail!("--prefill-tokens must be at least 1");
        }
        Ok(CheckOptions {
            device: self.device,
            warmup: self.warmup,
            repeats: self.repeats as usize,
            decode_context: self.context,
            decode_batches: self.batches.clone(),
            prefill_tokens: self.prefill_tokens,
            large_model: self.model.clone(),
            large_tp: self.tp,
            skip_large: self.skip_large,
            ..CheckOptions::default()
        })
    }
}

pub fn gpu_check(args: GpuCheckArgs) -> Result<()> {
    let opts = args.options()?;
    if args.dry_run {
        return dry_run(&args, &opts);
    }
    let report = run(&opts)?;
    let table = report.table();
    if let Some(dir) = &args.out {
        write_out(dir, &report, &table)?;
    }
    print!("{table}");
    let failures = report.failures();
    if failures > 0 {
        bail!(
            "{failures} of {} checks and timings failed or did not run (see the table)",
            report.checks.len() + report.timings.len()
        );
    }
    Ok(())
}

#[cfg(feature = "cuda")]
fn run(opts: &CheckOptions) -> Result<Report> {
    // A machine without a driver, NVRTC or cuBLAS gets the probe's message, not a table.
    tessera_runtime::cuda::probe::probe_backend(opts.device)
        .context("tessera gpu-check needs an NVIDIA GPU with a CUDA 13 driver")?;
    Ok(tessera_runtime::cuda::check::run(opts))
}

#[cfg(not(feature = "cuda"))]
fn run(_opts: &CheckOptions) -> Result<Report> {
    bail!(
        "`tessera gpu-check` runs the CUDA backend, and {}",
        tessera_runtime::cuda::NOT_COMPILED
    )
}

fn write_out(dir: &Path, report: &Report, table: &str) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let json = dir.join("gpu-check.json");
    std::fs::write(&json, serde_json::to_string_pretty(report)?)
        .with_context(|| format!("cannot write {}", json.display()))?;
    let txt = dir.join("gpu-check.txt");
    std::fs::write(&txt, table).with_context(|| format!("cannot write {}", txt.display()))?;
    eprintln!("wrote {} and {}", json.display(), txt.display());
    Ok(())
}

fn dry_run(args: &GpuCheckArgs, opts: &CheckOptions) -> Result<()> {
    let ceilings = match (args.memory_gbps, args.matrix_tflops) {
        (Some(m), Some(t)) if m > 0.0 && t > 0.0 => Some(Ceilings {
            memory_bytes_per_s: m * 1e9,
            matrix_flops_per_s: t * 1e12,
        }),
        (None, None) => None,
        _ => bail!("--memory-gbps and --matrix-tflops go together, each above 0"),
    };
    let timings = planned_timings(opts, ceilings.as_ref())?;
    let report = Report {
        ceilings,
        timings,
        notes: vec![if ceilings.is_some() {
            "dry run: nothing measured; floors from the ceilings given".into()
        } else {
            "dry run: nothing measured; give --memory-gbps and --matrix-tflops for floors".into()
        }],
        ..Report::default()
    };
    if let Some(dir) = &args.out {
        write_out(dir, &report, &report.work_table())?;
    }
    print!("{}", report.work_table());
    Ok(())
}
