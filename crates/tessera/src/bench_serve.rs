//! `tessera bench [OPTIONS]`: the serving load generator, like vLLM's `bench serve`.
//!
//! Sends a workload to a Tessera cluster (gRPC) or any OpenAI-compatible server at a
//! request rate and/or concurrency limit, or a sweep of them, and reports TTFT, TPOT,
//! ITL, E2EL, throughputs and goodput with vLLM's definitions and JSON keys. The work is
//! in `tessera-bench`; this file reads the flags and prints.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use tessera_bench::arrival::RequestRate;
use tessera_bench::dataset::{Dataset, WorkloadSpec, DEFAULT_OUTPUT_LEN};
use tessera_bench::metrics::{check_percentiles, Metrics, Slo};
use tessera_bench::plot::{write_plots, PLOTS};
use tessera_bench::record::append_run;
use tessera_bench::report::{self, PointResult, Setup, Sweep};
use tessera_bench::run::{run_point, LoadSpec};
use tessera_bench::target::{Target, TargetSpec};
use tessera_model::Tokenizer;

/// The workloads `--dataset` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DatasetName {
    /// Random token ids; lengths from --input-len, --output-len, --range-ratio.
    Random,
    /// Conversations from a ShareGPT JSON file (--dataset-path).
    Sharegpt,
    /// --num-prefixes random prefixes of --prefix-len tokens, each prompt one of them
    /// followed by a random suffix of --input-len tokens.
    SharedPrefix,
}

/// Arguments of `tessera bench` without a subcommand.
#[derive(Debug, Args)]
pub struct ServeBenchArgs {
    /// Tessera cluster to load, over its gRPC API: prompts go as token ids, and the report
    /// names the model and its split (tp, pp); https://HOST:PORT when it speaks TLS.
    /// [default: 127.0.0.1:50051]
    #[arg(long, value_name = "HOST:PORT", conflicts_with = "openai_base_url")]
    endpoint: Option<String>,
    /// Load an OpenAI-compatible server instead (Tessera's HTTP API, vLLM, …): streamed
    /// POST {URL}/completions with prompts as text, e.g. http://127.0.0.1:8000/v1
    /// [default: none; --endpoint is used].
    #[arg(long, value_name = "URL")]
    openai_base_url: Option<String>,
    /// For an https:// endpoint or base URL: the CA certificate (PEM) to trust instead of
    /// the system's roots, e.g. the ca.pem of `tessera certs`.
    #[arg(long, value_name = "FILE")]
    ca_cert: Option<PathBuf>,
    /// Model to ask an OpenAI-compatible server for [default: the first of GET {URL}/models].
    /// With --endpoint the cluster's own model is used.
    #[arg(long, value_name = "NAME")]
    model: Option<String>,
    #[command(flatten)]
    api_key: crate::api_key_arg::ApiKeyArg,
    /// Workload to send.
    #[arg(long, value_enum, default_value = "random")]
    dataset: DatasetName,
    /// ShareGPT JSON file, for --dataset sharegpt: the first human turn of each
    /// conversation is a prompt; conversations are sampled with --seed and filtered as
    /// vLLM does (prompt and answer ≥ 4 tokens, prompt ≤ 1024, both ≤ 2048)
    /// [default: none; required by sharegpt].
    #[arg(long, value_name = "FILE")]
    dataset_path: Option<PathBuf>,
    /// Prompt tokens per request (random), or suffix tokens after the prefix (shared-prefix).
    #[arg(long, value_name = "TOKENS", default_value_t = 128)]
    input_len: usize,
    /// Tokens to generate per request (max_tokens) [default: 128; sharegpt: the length
    /// of the conversation's answer].
    #[arg(long, value_name = "TOKENS")]
    output_len: Option<u32>,
    /// Spread of random lengths: each is uniform in [len·(1−R), len·(1+R)]; R in [0, 1).
    #[arg(long, value_name = "R", default_value_t = 0.0)]
    range_ratio: f64,
    /// Tokens in each shared prefix, for --dataset shared-prefix.
    #[arg(long, value_name = "TOKENS", default_value_t = 256)]
    prefix_len: usize,
    /// Distinct prefixes, for --dataset shared-prefix.
    #[arg(long, value_name = "K", default_value_t = 4)]
    num_prefixes: usize,
    /// Requests per point (warm-ups not included).
    #[arg(long, value_name = "N", default_value_t = 200)]
    num_prompts: usize,
    /// Ask the server to generate past the end-of-text token, so every request produces
    /// its full output length [default: off].
    #[arg(long)]
    ignore_eos: bool,
    /// Seed of everything random: prompts, lengths, arrival times. The same seed gives the
    /// same workload at every point of a sweep and on every run.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Requests per second, with gamma-distributed gaps (see --burstiness); `inf` sends
    /// them all at once. A comma-separated list runs one point per rate (a sweep).
    #[arg(
        long,
        value_name = "RATE[,RATE…]",
        value_delimiter = ',',
        default_value = "inf"
    )]
    request_rate: Vec<String>,
    /// Shape of the gamma distribution of the gaps between requests (mean 1/rate): 1 is a
    /// Poisson process, below 1 burstier, above 1 more even.
    #[arg(long, value_name = "B", default_value_t = 1.0)]
    burstiness: f64,
    /// Most requests in flight at once (closed loop; combines with --request-rate)
    /// [default: no limit]. A comma-separated list runs one point per value (a sweep);
    /// only one of --request-rate and --max-concurrency may be a list.
    #[arg(long, value_name = "C[,C…]", value_delimiter = ',')]
    max_concurrency: Vec<usize>,
    /// Requests sent and awaited before each point's timed run, not counted: they open
    /// connections and warm the server. vLLM's default is 0 too.
    #[arg(long, value_name = "N", default_value_t = 0)]
    num_warmups: usize,
    /// Runs every point N times, in alternating order (first to last, then last to
    /// first, …), and pools each point's runs. On a machine whose speed drifts over
    /// minutes (a shared VM, a GPU warming up) every point then sees the same conditions
    /// on average, which a comparison of points (and `tessera plan --calibrate`) needs.
    /// A point's runs are timed back to back, so its throughput is over its own time.
    #[arg(long, value_name = "N", default_value_t = 1)]
    repeat: usize,
    /// A request not finished within this many seconds counts as failed (`timeout`).
    #[arg(long, value_name = "SECONDS", default_value_t = 600.0)]
    request_timeout: f64,
    /// Percentiles reported for TTFT, TPOT, ITL and E2EL, comma-separated (the mean,
    /// median and standard deviation always are).
    #[arg(
        long,
        value_name = "P[,P…]",
        value_delimiter = ',',
        default_value = "90,99"
    )]
    metric_percentiles: Vec<f64>,
    /// Service-level objectives in ms, e.g. ttft:500,tpot:50,e2el:10000 (any subset):
    /// adds request goodput (requests meeting all of them per second) and the capacity
    /// verdict (the highest point whose p99s meet them) [default: none].
    #[arg(long, value_name = "METRIC:MS[,…]")]
    slo: Option<String>,
    /// Write the results as JSON with vLLM's `bench serve` keys: one object, or an array
    /// of one per point for a sweep (rewritten after each point) [default: not written].
    #[arg(long, value_name = "FILE")]
    result_json: Option<PathBuf>,
    /// Add per-request arrays to the JSON: input_lens, output_lens, ttfts, itls, errors
    /// [default: off].
    #[arg(long)]
    save_detailed: bool,
    /// Write report.md and the plots (latency_throughput, ttft_distribution,
    /// tpot_distribution, each .png and .svg) into this folder, created if needed
    /// [default: not written].
    #[arg(long, value_name = "DIR")]
    report_dir: Option<PathBuf>,
}

/// One point's load: its request rate and concurrency limit.
type Point = (RequestRate, Option<usize>);

/// The points to run, and what they vary.
fn points(args: &ServeBenchArgs) -> Result<(Vec<Point>, Sweep)> {
    let rates = args
        .request_rate
        .iter()
        .map(|r| RequestRate::parse(r))
        .collect::<Result<Vec<_>, _>>()?;
    if rates.is_empty() {
        bail!("--request-rate needs a value: requests/s or inf");
    }
    if args.max_concurrency.contains(&0) {
        bail!("--max-concurrency must be at least 1");
    }
    let concs = &args.max_concurrency;
    if rates.len() > 1 && concs.len() > 1 {
        bail!("--request-rate and --max-concurrency cannot both be lists; sweep one at a time");
    }
    Ok(if concs.len() > 1 {
        (
            concs.iter().map(|&c| (rates[0], Some(c))).collect(),
            Sweep::MaxConcurrency,
        )
    } else {
        let sweep = if rates.len() > 1 {
            Sweep::RequestRate
        } else {
            Sweep::Single
        };
        (
            rates
                .into_iter()
                .map(|r| (r, concs.first().copied()))
                .collect(),
            sweep,
        )
    })
}

fn workload(args: &ServeBenchArgs) -> Result<WorkloadSpec> {
    let dataset = match (args.dataset, &args.dataset_path) {
        (DatasetName::Sharegpt, Some(path)) => Dataset::ShareGpt { path: path.clone() },
        (DatasetName::Sharegpt, None) => {
            bail!("--dataset-path is required with --dataset sharegpt (a ShareGPT JSON file)")
        }
        (_, Some(_)) => bail!("--dataset-path is only read with --dataset sharegpt"),
        (DatasetName::Random, None) => Dataset::Random,
        (DatasetName::SharedPrefix, None) => Dataset::SharedPrefix {
            prefix_len: args.prefix_len,
            num_prefixes: args.num_prefixes,
        },
    };
    let spec = WorkloadSpec {
        output_len: match dataset {
            Dataset::ShareGpt { .. } => args.output_len,
            _ => Some(args.output_len.unwrap_or(DEFAULT_OUTPUT_LEN)),
        },
        dataset,
        num_prompts: args.num_prompts,
        input_len: args.input_len,
        range_ratio: args.range_ratio,
        seed: args.seed,
    };
    spec.validate()?;
    Ok(spec)
}

/// Writes `text` to `path`, naming the file on failure.
fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

pub fn bench_serve(args: ServeBenchArgs) -> Result<()> {
    let workload = workload(&args)?;
    let (points, sweep) = points(&args)?;
    check_percentiles(&args.metric_percentiles)?;
    let slo = args.slo.as_deref().map(Slo::parse).transpose()?;
    if !(args.request_timeout > 0.0 && args.request_timeout.is_finite()) {
        bail!("--request-timeout must be a positive number of seconds");
    }
    let load = |(request_rate, max_concurrency): Point| LoadSpec {
        request_rate,
        burstiness: args.burstiness,
        max_concurrency,
        num_warmups: args.num_warmups,
        ignore_eos: args.ignore_eos,
        request_timeout: Duration::from_secs_f64(args.request_timeout),
        seed: args.seed,
    };
    for &p in &points {
        load(p).validate()?;
    }
    if args.repeat == 0 {
        bail!("--repeat: must be at least 1");
    }
    if let Some(dir) = &args.report_dir {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("--report-dir: cannot create {}", dir.display()))?;
    }
    let spec = match &args.openai_base_url {
        Some(url) => TargetSpec::OpenAi {
            base_url: url.clone(),
            model: args.model.clone(),
            api_key: args.api_key.api_key.clone(),
            ca_cert: args.ca_cert.clone(),
        },
        None => TargetSpec::Tessera {
            endpoint: args
                .endpoint
                .clone()
                .unwrap_or_else(|| "127.0.0.1:50051".into()),
            api_key: args.api_key.api_key.clone(),
            ca_cert: args.ca_cert.clone(),
        },
    };

    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let target = Arc::new(Target::connect(&spec).await?);
        let info = target.info().clone();
        let tokenizer = Tokenizer::gpt2();
        let prompts = workload.generate(&tokenizer, info.form)?;
        let setup = Setup {
            date: report::date_stamp(),
            target: info.clone(),
            workload: workload.clone(),
            burstiness: args.burstiness,
            ignore_eos: args.ignore_eos,
            num_warmups: args.num_warmups,
            repeats: args.repeat,
            percentiles: args.metric_percentiles.clone(),
            slo,
            sweep,
        };
        let split = match (info.tp, info.pp) {
            (Some(tp), Some(pp)) => format!(", tp={tp} pp={pp}"),
            _ => String::new(),
        };
        println!(
            "{} at {} ({}{split}): {} dataset, {} prompts ({} input and {} output tokens in all), {} point(s)",
            info.model_id,
            info.address,
            info.api(),
            workload.dataset.name(),
            prompts.len(),
            prompts.iter().map(|p| p.input_len).sum::<usize>(),
            prompts.iter().map(|p| p.output_len as u64).sum::<u64>(),
            points.len()
        );
        let mut pooled: Vec<PointResult> = points
            .iter()
            .map(|&(request_rate, max_concurrency)| PointResult {
                request_rate,
                max_concurrency,
                metrics: Metrics::default(),
                records: Vec::new(),
            })
            .collect();
        // Which points have all their runs; the result file lists those, in the order asked.
        let mut finished = vec![false; points.len()];
        for run in 0..args.repeat {
            let last = run + 1 == args.repeat;
            let order: Vec<usize> = if run % 2 == 0 {
                (0..points.len()).collect()
            } else {
                (0..points.len()).rev().collect()
            };
            for i in order {
                let result = &mut pooled[i];
                let mut label = result.label(sweep);
                if args.repeat > 1 {
                    label = format!("{label} (run {} of {})", run + 1, args.repeat);
                }
                let records = run_point(target.clone(), &prompts, &load(points[i]), &label).await?;
                append_run(&mut result.records, records);
                if !last {
                    continue;
                }
                result.metrics = Metrics::compute(&result.records, &setup.percentiles, slo.as_ref());
                print!("{}", report::console_point(&setup, result));
                finished[i] = true;
                if let Some(path) = &args.result_json {
                    let so_far: Vec<PointResult> = pooled
                        .iter()
                        .zip(&finished)
                        .filter(|(_, done)| **done)
                        .map(|(p, _)| p.clone())
                        .collect();
                    write(path, &report::results_json(&setup, &so_far, args.save_detailed))?;
                }
            }
        }
        let results = pooled;
        if results.len() > 1 {
            println!();
            print!("{}", report::console_sweep(&setup, &results));
        }
        println!("{}", report::capacity_line(&setup, &results));
        if let Some(path) = &args.result_json {
            println!("Results: {}", path.display());
        }
        if let Some(dir) = &args.report_dir {
            let title = format!("{} ({})", info.model_id, info.backend);
            write_plots(dir, &title, &results, sweep)?;
            let md = report::markdown(&setup, &results, &PLOTS);
            write(&dir.join("report.md"), &md)?;
            println!("Report: {}", dir.join("report.md").display());
        }
        if results.iter().all(|r| r.metrics.completed == 0) {
            let failures: Vec<String> = results
                .iter()
                .flat_map(|r| r.metrics.failures.iter())
                .map(|(s, n)| format!("{n} × {s}"))
                .collect();
            let example = results
                .iter()
                .flat_map(|r| &r.records)
                .find_map(|r| r.failure.as_ref())
                .map(|f| format!("; the first said: {}", f.message))
                .unwrap_or_default();
            bail!("no request completed ({}){example}", failures.join(", "));
        }
        Ok(())
    })
}
