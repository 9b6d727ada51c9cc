//! `tessera plan`: which TP × PP split a model needs on given hardware, and what it serves.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;
use tessera_bench::plan::{
    calibrate, calibrate_overhead, compare, plan, read_runs, split_model, Cluster, Comparison,
    MeasuredRun, PlanReport, SchedulerSettings, Slo, SplitReport, Workload,
};
use tessera_bench::replay::Limits;
use tessera_coordinator::config::defaults;
use tessera_model::{CostModel, Efficiency, Hardware, ModelConfig, ShardPlan};
use tessera_runtime::WeightDtype;

/// Arguments of `tessera plan`.
#[derive(Debug, Args)]
pub struct PlanArgs {
    /// The model: a preset name (see `tessera model list`).
    #[arg(
        long,
        value_name = "NAME",
        default_value = "gpt2",
        conflicts_with = "model"
    )]
    preset: String,
    /// The model: a Hugging Face GPT-2 checkpoint directory (only config.json is read).
    #[arg(long, value_name = "DIR")]
    model: Option<PathBuf>,
    /// Device profile: a100-80g, h100-sxm, h200, or cpu (measured on this machine: one
    /// device is one CPU worker with its share of the cores).
    #[arg(long, value_name = "PROFILE", default_value = "h100-sxm")]
    gpu: String,
    /// A device profile in JSON (as `--save-hardware` writes it); replaces `--gpu`.
    #[arg(long, value_name = "FILE")]
    hardware: Option<PathBuf>,
    /// Nodes in the cluster.
    #[arg(long, value_name = "N", default_value_t = 1)]
    nodes: usize,
    /// Devices per node (default: 8, or 2 CPU workers for `--gpu cpu`).
    #[arg(long, value_name = "N")]
    gpus_per_node: Option<usize>,
    /// Only this tensor-parallel degree.
    #[arg(long, value_name = "T")]
    tp: Option<usize>,
    /// Only this number of pipeline stages.
    #[arg(long, value_name = "P")]
    pp: Option<usize>,
    /// Prompt tokens per request.
    #[arg(long, value_name = "N", default_value_t = 128)]
    input_len: usize,
    /// Output tokens per request.
    #[arg(long, value_name = "N", default_value_t = 128)]
    output_len: usize,
    /// Concurrent requests of the per-split `ttft_ms`, `tpot_ms` and `e2e_ms`.
    #[arg(long, value_name = "N", default_value_t = 1)]
    batch: usize,
    /// Latency targets, e.g. `ttft:500,tpot:50,e2el:10000` (milliseconds).
    #[arg(long, value_name = "SLO")]
    slo: Option<String>,
    /// The scheduler's `--max-batch-tokens`.
    #[arg(long, value_name = "N", default_value_t = defaults::MAX_BATCH_TOKENS)]
    max_batch_tokens: usize,
    /// The scheduler's `--max-batch-seqs`.
    #[arg(long, value_name = "N", default_value_t = defaults::MAX_BATCH_SEQS)]
    max_batch_seqs: usize,
    /// Override the profile's memory per device, GB (10⁹ bytes).
    #[arg(long, value_name = "GB")]
    memory_gb: Option<f64>,
    /// Override the profile's memory bandwidth, GB/s.
    #[arg(long, value_name = "GB/S")]
    memory_bandwidth_gb_s: Option<f64>,
    /// Override the profile's dense matrix peak, TFLOP/s.
    #[arg(long, value_name = "TFLOPS")]
    matrix_tflops: Option<f64>,
    /// Override the link inside a node: bandwidth per direction, GB/s.
    #[arg(long, value_name = "GB/S")]
    intra_node_gb_s: Option<f64>,
    /// Override the link inside a node: latency per hop, µs.
    #[arg(long, value_name = "US")]
    intra_node_latency_us: Option<f64>,
    /// Override the link between nodes: bandwidth per device, GB/s.
    #[arg(long, value_name = "GB/S")]
    inter_node_gb_s: Option<f64>,
    /// Override the link between nodes: latency per hop, µs.
    #[arg(long, value_name = "US")]
    inter_node_latency_us: Option<f64>,
    /// Override the time per step outside the workers (scheduling, the step's RPCs,
    /// streaming), ms.
    #[arg(long, value_name = "MS")]
    step_overhead_ms: Option<f64>,
    /// The scheduler's `--kv-block-tokens`.
    #[arg(long, value_name = "N", default_value_t = defaults::KV_BLOCK_TOKENS)]
    kv_block_tokens: usize,
    /// Weight dtype of the `cpu` profile (GPU profiles are bf16).
    #[arg(long, value_name = "DTYPE", default_value = "f32")]
    dtype: WeightDtype,
    /// Threads per CPU worker for the `cpu` profile (default: the cores over the workers).
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
    /// Fit the profile's bandwidth and compute efficiencies to a `tessera bench
    /// --result-json` file (its first run, or `--calibrate-run`) before planning. The
    /// run's split is read from the file, or from `--tp`/`--pp`.
    #[arg(long, value_name = "RESULT.json")]
    calibrate: Option<PathBuf>,
    /// Fit the costs outside the workers (per step, and per sequence in a step) to the
    /// median TPOTs of a `tessera bench` sweep, before any `--calibrate`: best measured on
    /// a `--backend sim` cluster of a small model, whose device time is negligible.
    #[arg(long, value_name = "RESULT.json")]
    calibrate_overhead: Option<PathBuf>,
    /// Which run of the calibration file to fit (0-based).
    #[arg(long, value_name = "K", default_value_t = 0)]
    calibrate_run: usize,
    /// Predict every run of a `tessera bench --result-json` file and print the
    /// predictions beside the measurements.
    #[arg(long, value_name = "RESULT.json")]
    compare: Option<PathBuf>,
    /// Write the (calibrated) device profile as JSON, for `--hardware`.
    #[arg(long, value_name = "FILE")]
    save_hardware: Option<PathBuf>,
    /// List the splits that do not fit too.
    #[arg(long)]
    all: bool,
    /// Print the whole plan as JSON.
    #[arg(long)]
    json: bool,
}

fn model_config(args: &PlanArgs) -> Result<ModelConfig> {
    Ok(match &args.model {
        Some(dir) => ModelConfig::from_hf_dir(dir)
            .with_context(|| format!("cannot read the config of {}", dir.display()))?,
        None => ModelConfig::preset(&args.preset)?,
    })
}

fn hardware(args: &PlanArgs, gpus_per_node: usize) -> Result<Hardware> {
    let mut hw = match &args.hardware {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            serde_json::from_str(&text)
                .with_context(|| format!("{} is not a device profile", path.display()))?
        }
        None if args.gpu == "cpu" => {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            let threads = args.threads.unwrap_or((cores / gpus_per_node).max(1));
            eprintln!(
                "measuring the cpu profile: {gpus_per_node} worker(s) of {threads} thread(s)…"
            );
            crate::cpu_profile::measure(gpus_per_node, threads, args.dtype)?
        }
        None => Hardware::gpu(&args.gpu)?,
    };
    if let Some(v) = args.memory_gb {
        hw.memory_bytes = (v * 1e9) as u64;
    }
    if let Some(v) = args.memory_bandwidth_gb_s {
        hw.memory_bandwidth = v * 1e9;
    }
    if let Some(v) = args.matrix_tflops {
        hw.matrix_flops = v * 1e12;
    }
    if let Some(v) = args.intra_node_gb_s {
        hw.intra_node.bandwidth = v * 1e9;
    }
    if let Some(v) = args.intra_node_latency_us {
        hw.intra_node.latency = v * 1e-6;
    }
    if let Some(v) = args.inter_node_gb_s {
        hw.inter_node.bandwidth = v * 1e9;
    }
    if let Some(v) = args.inter_node_latency_us {
        hw.inter_node.latency = v * 1e-6;
    }
    if let Some(v) = args.step_overhead_ms {
        hw.efficiency.step_overhead = v * 1e-3;
    }
    hw.validate()?;
    Ok(hw)
}

fn read_file_runs(path: &PathBuf) -> Result<Vec<MeasuredRun>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    read_runs(&text).with_context(|| {
        format!(
            "{} is not a `tessera bench --result-json` file",
            path.display()
        )
    })
}

/// The split a measured run used: the file's, else the flags'.
fn run_split(args: &PlanArgs, run: &MeasuredRun, flag: &str) -> Result<(usize, usize)> {
    match (run.tp.or(args.tp), run.pp.or(args.pp)) {
        (Some(tp), pp) => Ok((tp, pp.unwrap_or(1))),
        (None, _) => bail!("{flag}: the run does not say its split; give --tp (and --pp)"),
    }
}

/// The split a measured run used, with its cost model and scheduler limits.
fn run_model(
    args: &PlanArgs,
    config: &ModelConfig,
    cluster: &Cluster,
    sched: &SchedulerSettings,
    run: &MeasuredRun,
    flag: &str,
) -> Result<((usize, usize), CostModel, Limits)> {
    let (tp, pp) = run_split(args, run, flag)?;
    let split = ShardPlan::new(config, tp, pp)?;
    let (cost, limits) = split_model(config, cluster, &split, sched);
    Ok(((tp, pp), cost, limits))
}

#[derive(Serialize)]
struct Output<'a> {
    calibrated: Option<Efficiency>,
    comparison: Option<&'a [Comparison]>,
    #[serde(flatten)]
    plan: &'a PlanReport,
}

pub fn plan_cmd(args: PlanArgs) -> Result<()> {
    if args.nodes == 0 || args.gpus_per_node == Some(0) {
        bail!("--nodes and --gpus-per-node must be at least 1");
    }
    if args.input_len == 0 || args.output_len == 0 || args.batch == 0 {
        bail!("--input-len, --output-len and --batch must be at least 1");
    }
    if args.max_batch_tokens == 0 || args.max_batch_seqs == 0 || args.kv_block_tokens == 0 {
        bail!("--max-batch-tokens, --max-batch-seqs and --kv-block-tokens must be at least 1");
    }
    let config = model_config(&args)?;
    let gpus_per_node = args
        .gpus_per_node
        .unwrap_or(if args.gpu == "cpu" { 2 } else { 8 });
    let slo = args
        .slo
        .as_deref()
        .map(Slo::parse)
        .transpose()?
        .unwrap_or_default();
    let sched = SchedulerSettings {
        max_batch_tokens: args.max_batch_tokens,
        max_batch_seqs: args.max_batch_seqs,
        kv_block_tokens: args.kv_block_tokens,
    };
    let mut cluster = Cluster {
        hardware: hardware(&args, gpus_per_node)?,
        nodes: args.nodes,
        gpus_per_node,
    };

    let mut calibrated = None;
    if let Some(path) = &args.calibrate_overhead {
        let runs = read_file_runs(path)?;
        let first = runs
            .first()
            .with_context(|| format!("{} holds no run", path.display()))?;
        // The runs may be of another model than the one planned (a small one on `sim`).
        let measured = match &first.model_id {
            Some(name) => ModelConfig::preset(name).unwrap_or_else(|_| config.clone()),
            None => config.clone(),
        };
        let (_, mut cost, limits) = run_model(
            &args,
            &measured,
            &cluster,
            &sched,
            first,
            "--calibrate-overhead",
        )?;
        let e = calibrate_overhead(&mut cost, &limits, &runs);
        cluster.hardware.efficiency = e;
        calibrated = Some(e);
        if !args.json {
            println!(
                "overheads fitted on {} ({} runs of {}): {:.3} ms per step + {:.4} ms per \
                 sequence",
                path.display(),
                runs.len(),
                measured.name,
                e.step_overhead * 1e3,
                e.seq_overhead * 1e3
            );
        }
    }
    if let Some(path) = &args.calibrate {
        let runs = read_file_runs(path)?;
        let run = runs.get(args.calibrate_run).with_context(|| {
            format!(
                "--calibrate-run {}: {} holds {} runs",
                args.calibrate_run,
                path.display(),
                runs.len()
            )
        })?;
        let ((tp, pp), mut cost, limits) =
            run_model(&args, &config, &cluster, &sched, run, "--calibrate")?;
        let e = calibrate(&mut cost, &limits, run);
        cluster.hardware.efficiency = e;
        calibrated = Some(e);
        if !args.json {
            println!(
                "calibrated on {} ({}, tp={tp} pp={pp}): bandwidth efficiency {:.3}, \
                 compute efficiency {:.3}",
                path.display(),
                run.label(),
                e.bandwidth,
                e.compute
            );
        }
    }
    if let Some(path) = &args.save_hardware {
        std::fs::write(
            path,
            serde_json::to_string_pretty(&cluster.hardware)? + "\n",
        )
        .with_context(|| format!("cannot write {}", path.display()))?;
    }

    let mut comparison = None;
    if let Some(path) = &args.compare {
        let runs = read_file_runs(path)?;
        let mut rows = Vec::new();
        for run in &runs {
            let (_, cost, limits) = run_model(&args, &config, &cluster, &sched, run, "--compare")?;
            rows.push(compare(&cost, &limits, run));
        }
        if !args.json {
            print_comparison(&rows);
        }
        comparison = Some(rows);
    }

    let workload = Workload {
        input_len: args.input_len,
        output_len: args.output_len,
    };
    let mut report = plan(&config, &cluster, &workload, &slo, &sched, args.batch);
    report
        .splits
        .retain(|s| args.tp.is_none_or(|t| s.tp == t) && args.pp.is_none_or(|p| s.pp == p));
    if args.json {
        let out = Output {
            calibrated,
            comparison: comparison.as_deref(),
            plan: &report,
        };
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    print_plan(&report, args.all);
    Ok(())
}

fn print_comparison(rows: &[Comparison]) {
    println!();
    println!(
        "{:<18} {:>28} {:>28} {:>30}",
        "measured run", "median TTFT ms", "median TPOT ms", "output tok/s"
    );
    println!(
        "{:<18} {:>9} {:>9} {:>8} {:>9} {:>9} {:>8} {:>10} {:>10} {:>8}",
        "", "pred", "meas", "err", "pred", "meas", "err", "pred", "meas", "err"
    );
    for r in rows {
        let cell = |v: [f64; 3], w: usize| {
            format!(
                "{:>w$.2} {:>w$.2} {:>7.1}%",
                v[0],
                v[1],
                v[2] * 100.0,
                w = w
            )
        };
        println!(
            "{:<18} {} {} {}",
            r.load,
            cell(r.median_ttft_ms, 9),
            cell(r.median_tpot_ms, 9),
            cell(r.output_throughput, 10)
        );
    }
    println!();
}

fn print_plan(report: &PlanReport, all: bool) {
    let hw = &report.cluster.hardware;
    let devices = report.cluster.nodes * report.cluster.gpus_per_node;
    println!(
        "{} ({:.2} B parameters) on {} node(s) × {} {} ({:.0} GB, {:.0} GB/s, {:.1} GFLOP/s; \
         efficiency: bandwidth {:.3}, compute {:.3})",
        report.model,
        report.params as f64 / 1e9,
        report.cluster.nodes,
        report.cluster.gpus_per_node,
        hw.name,
        hw.memory_bytes as f64 / 1e9,
        hw.memory_bandwidth / 1e9,
        hw.matrix_flops / 1e9,
        hw.efficiency.bandwidth,
        hw.efficiency.compute,
    );
    let slo = &report.slo;
    let targets: Vec<String> = [
        ("TTFT", slo.ttft_ms),
        ("TPOT", slo.tpot_ms),
        ("E2E", slo.e2el_ms),
    ]
    .iter()
    .filter_map(|(n, v)| v.map(|v| format!("{n} ≤ {v} ms")))
    .collect();
    println!(
        "workload: {} prompt → {} output tokens; SLO: {}; latencies at batch {}",
        report.workload.input_len,
        report.workload.output_len,
        if targets.is_empty() {
            "none".into()
        } else {
            targets.join(", ")
        },
        report.batch
    );
    println!();
    println!(
        "{:>3} {:>3} {:>4} {:>11} {:>10} {:>5} {:>9} {:>9} {:>10} {:>6} {:>11} {:>11}",
        "tp",
        "pp",
        "gpus",
        "weights/gpu",
        "KV tokens",
        "seqs",
        "TTFT ms",
        "TPOT ms",
        "E2E ms",
        "batch",
        "out tok/s",
        "tok/s/gpu"
    );
    let fmt = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.2}"));
    let mut hidden = 0;
    for s in &report.splits {
        if !s.fits && !all {
            hidden += 1;
            continue;
        }
        let best = s.best;
        println!(
            "{:>3} {:>3} {:>4} {:>9.2}GB {:>10} {:>5} {:>9} {:>9} {:>10} {:>6} {:>11} {:>11}{}",
            s.tp,
            s.pp,
            s.gpus,
            s.weight_bytes_per_gpu as f64 / 1e9,
            s.kv_tokens,
            s.max_seqs,
            fmt(s.ttft_ms),
            fmt(s.tpot_ms),
            fmt(s.e2e_ms),
            best.map_or("-".into(), |b| b.batch.to_string()),
            best.map_or("-".into(), |b| format!("{:.1}", b.output_throughput)),
            best.map_or("-".into(), |b| format!(
                "{:.1}",
                b.output_throughput / s.gpus as f64
            )),
            why(s),
        );
    }
    if hidden > 0 {
        println!(
            "({hidden} more splits of at most {devices} devices do not fit; --all lists them)"
        );
    }
    println!();
    match report
        .recommended
        .and_then(|(tp, pp)| report.splits.iter().find(|s| s.tp == tp && s.pp == pp))
    {
        Some(s) => {
            let b = s.best.expect("a recommended split has a best batch");
            println!(
                "recommended: tp={} pp={} ({} devices): {:.1} output tokens/s at {} concurrent \
                 requests (TTFT {:.1} ms, TPOT {:.2} ms)",
                s.tp, s.pp, s.gpus, b.output_throughput, b.batch, b.ttft_ms, b.tpot_ms
            );
        }
        None => println!("recommended: none; no split meets the SLO with these devices"),
    }
}

fn why(s: &SplitReport) -> String {
    match &s.why_not {
        Some(w) => format!("  does not fit: {w}"),
        None if s.best.is_none() => "  misses the SLO at every batch".into(),
        None => String::new(),
    }
}
