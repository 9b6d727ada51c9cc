//! The capacity planner: for every TP × PP split of a model over a set of devices, what
//! fits, how fast a request is served, and how much the deployment sustains within the
//! latency targets; calibration of a profile on a measured run; and the comparison of
//! predictions with measurements.

use serde::{Deserialize, Serialize};
use tessera_model::{CostModel, Efficiency, Hardware, ModelConfig, ShardPlan, Topology};

pub use crate::metrics::Slo;
use crate::replay::{replay, Job, Limits, Load, Replay};

/// Where the model runs: the device profile and how many of them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cluster {
    /// The device profile.
    pub hardware: Hardware,
    /// Nodes.
    pub nodes: usize,
    /// Devices per node.
    pub gpus_per_node: usize,
}

/// The requests to plan for.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Workload {
    /// Prompt tokens per request.
    pub input_len: usize,
    /// Output tokens per request.
    pub output_len: usize,
}

/// Whether a prediction meets every latency target.
fn meets(slo: &Slo, p: &Prediction) -> bool {
    slo.ttft_ms.is_none_or(|t| p.ttft_ms <= t)
        && slo.tpot_ms.is_none_or(|t| p.tpot_ms <= t)
        && slo.e2el_ms.is_none_or(|t| p.e2e_ms <= t)
}

/// The scheduler settings the deployment runs with.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SchedulerSettings {
    /// `--max-batch-tokens`.
    pub max_batch_tokens: usize,
    /// `--max-batch-seqs`.
    pub max_batch_seqs: usize,
    /// `--kv-block-tokens`.
    pub kv_block_tokens: usize,
}

/// What a closed loop of `batch` clients is predicted to see.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    /// Concurrent requests.
    pub batch: usize,
    /// Median time to first token, ms.
    pub ttft_ms: f64,
    /// Median time per output token, ms.
    pub tpot_ms: f64,
    /// Median end-to-end latency, ms.
    pub e2e_ms: f64,
    /// Output tokens per second of the whole deployment.
    pub output_throughput: f64,
    /// Requests per second.
    pub request_throughput: f64,
}

impl Prediction {
    fn from_replay(batch: usize, r: &Replay) -> Prediction {
        Prediction {
            batch,
            ttft_ms: r.median_ttft() * 1e3,
            tpot_ms: r.median_tpot() * 1e3,
            e2e_ms: r.median_e2e() * 1e3,
            output_throughput: r.output_throughput(),
            request_throughput: r.request_throughput(),
        }
    }
}

/// One split, assessed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SplitReport {
    /// Tensor-parallel degree.
    pub tp: usize,
    /// Pipeline stages.
    pub pp: usize,
    /// Devices used, `tp · pp`.
    pub gpus: usize,
    /// Whether the weights and one request's KV cache fit every device.
    pub fits: bool,
    /// Why not, when it does not fit.
    pub why_not: Option<String>,
    /// Weight bytes of the most loaded device.
    pub weight_bytes_per_gpu: u64,
    /// KV-cache bytes per token of context on the most loaded device.
    pub kv_bytes_per_token_per_gpu: u64,
    /// Tokens of context the KV cache holds.
    pub kv_tokens: u64,
    /// Most sequences of the workload's length served at once (KV cache and
    /// `max_batch_seqs`).
    pub max_seqs: usize,
    /// Median TTFT at the requested batch, ms.
    pub ttft_ms: Option<f64>,
    /// Median TPOT at the requested batch, ms.
    pub tpot_ms: Option<f64>,
    /// Median end-to-end latency at the requested batch, ms.
    pub e2e_ms: Option<f64>,
    /// Predictions across batch sizes.
    pub points: Vec<Prediction>,
    /// The batch with the highest output throughput that meets the SLO.
    pub best: Option<Prediction>,
}

/// The whole plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanReport {
    /// Model name.
    pub model: String,
    /// Parameters.
    pub params: u64,
    /// Devices and their profile.
    pub cluster: Cluster,
    /// The workload.
    pub workload: Workload,
    /// The latency targets.
    pub slo: Slo,
    /// The scheduler settings.
    pub scheduler: SchedulerSettings,
    /// The batch of `ttft_ms`, `tpot_ms` and `e2e_ms`.
    pub batch: usize,
    /// Every split that exists, fitting or not.
    pub splits: Vec<SplitReport>,
    /// The recommended split: the highest throughput within the SLO, fewer devices on a
    /// tie.
    pub recommended: Option<(usize, usize)>,
}

/// Requests replayed per batch size: enough waves to reach steady state.
fn jobs_for(w: &Workload, batch: usize) -> Vec<Job> {
    vec![
        Job {
            prompt: w.input_len.max(1),
            output: w.output_len.max(1),
        };
        (4 * batch).max(8)
    ]
}

/// The cost model and the scheduler limits of one split.
pub fn split_model(
    config: &ModelConfig,
    cluster: &Cluster,
    plan: &ShardPlan,
    sched: &SchedulerSettings,
) -> (CostModel, Limits) {
    let cost = CostModel::new(
        config,
        plan,
        &cluster.hardware,
        Topology {
            gpus_per_node: cluster.gpus_per_node,
        },
    );
    // Whole blocks, and never more than a full batch of full-context sequences can use
    // (the coordinator sizes its cache the same way).
    let block = sched.kv_block_tokens.max(1) as u64;
    let useful = (sched.max_batch_seqs * config.n_positions.div_ceil(block as usize)) as u64;
    let limits = Limits {
        max_batch_tokens: sched.max_batch_tokens,
        max_batch_seqs: sched.max_batch_seqs,
        kv_tokens: (cost.kv_token_capacity() / block).min(useful) * block,
    };
    (cost, limits)
}

/// Predicts a closed loop of `batch` clients on one split.
pub fn predict(cost: &CostModel, limits: &Limits, w: &Workload, batch: usize) -> Prediction {
    let r = replay(
        cost,
        limits,
        &jobs_for(w, batch),
        &Load::Closed { concurrency: batch },
    );
    Prediction::from_replay(batch, &r)
}

/// Batch sizes to assess: powers of two up to the most the split serves, and `batch`.
fn batches(max_seqs: usize, batch: usize) -> Vec<usize> {
    let mut b: Vec<usize> = std::iter::successors(Some(1usize), |x| Some(x * 2))
        .take_while(|&x| x <= max_seqs)
        .collect();
    if max_seqs > 0 && !b.contains(&max_seqs) {
        b.push(max_seqs);
    }
    if batch <= max_seqs && !b.contains(&batch) {
        b.push(batch);
    }
    b.sort_unstable();
    b
}

/// Assesses every TP × PP split of `config` that uses at most the cluster's devices.
pub fn plan(
    config: &ModelConfig,
    cluster: &Cluster,
    workload: &Workload,
    slo: &Slo,
    sched: &SchedulerSettings,
    batch: usize,
) -> PlanReport {
    let devices = cluster.nodes * cluster.gpus_per_node;
    let mut splits = Vec::new();
    for tp in 1..=devices {
        for pp in 1..=devices / tp {
            let Ok(plan) = ShardPlan::new(config, tp, pp) else {
                continue;
            };
            // TP beyond a node or an uneven number of nodes is never worth listing
            // unless nothing else exists; keep TP within a node or the whole of nodes.
            if tp > cluster.gpus_per_node && !tp.is_multiple_of(cluster.gpus_per_node) {
                continue;
            }
            splits.push(assess(config, cluster, workload, slo, sched, batch, &plan));
        }
    }
    let recommended = splits
        .iter()
        .filter_map(|s| s.best.map(|b| (s, b)))
        .max_by(|(a, x), (b, y)| {
            x.output_throughput
                .total_cmp(&y.output_throughput)
                .then(b.gpus.cmp(&a.gpus))
                .then(b.pp.cmp(&a.pp))
        })
        .map(|(s, _)| (s.tp, s.pp));
    PlanReport {
        model: config.name.clone(),
        params: config.param_count(),
        cluster: cluster.clone(),
        workload: *workload,
        slo: *slo,
        scheduler: *sched,
        batch,
        splits,
        recommended,
    }
}

fn assess(
    config: &ModelConfig,
    cluster: &Cluster,
    w: &Workload,
    slo: &Slo,
    sched: &SchedulerSettings,
    batch: usize,
    plan: &ShardPlan,
) -> SplitReport {
    let (cost, limits) = split_model(config, cluster, plan, sched);
    let hw = &cluster.hardware;
    let seq_tokens = (w.input_len + w.output_len) as u64;
    let max_seqs = ((limits.kv_tokens / seq_tokens.max(1)) as usize).min(sched.max_batch_seqs);
    let budget = hw.memory_bytes as f64 * hw.memory_fraction;
    let weights = cost.weight_bytes_per_device();
    let why_not = if weights as f64 > budget {
        Some(format!(
            "{:.1} GB of weights per device exceed {:.0}% of {:.1} GB",
            weights as f64 / 1e9,
            hw.memory_fraction * 100.0,
            hw.memory_bytes as f64 / 1e9
        ))
    } else if max_seqs == 0 {
        Some(format!(
            "the KV cache left beside the weights holds {} tokens, less than one request \
             of {seq_tokens}",
            limits.kv_tokens
        ))
    } else {
        None
    };
    let mut report = SplitReport {
        tp: plan.tp,
        pp: plan.pp,
        gpus: plan.tp * plan.pp,
        fits: why_not.is_none(),
        why_not,
        weight_bytes_per_gpu: weights,
        kv_bytes_per_token_per_gpu: cost.kv_bytes_per_token_per_device(),
        kv_tokens: limits.kv_tokens,
        max_seqs,
        ttft_ms: None,
        tpot_ms: None,
        e2e_ms: None,
        points: Vec::new(),
        best: None,
    };
    if !report.fits {
        return report;
    }
    report.points = batches(max_seqs, batch)
        .into_iter()
        .map(|b| predict(&cost, &limits, w, b))
        .collect();
    if let Some(p) = report.points.iter().find(|p| p.batch == batch) {
        report.ttft_ms = Some(p.ttft_ms);
        report.tpot_ms = Some(p.tpot_ms);
        report.e2e_ms = Some(p.e2e_ms);
    }
    report.best = report
        .points
        .iter()
        .filter(|p| meets(slo, p))
        .max_by(|a, b| a.output_throughput.total_cmp(&b.output_throughput))
        .copied();
    report
}

/// What the planner needs of one `tessera bench` run (its `--result-json`, vLLM's keys).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct MeasuredRun {
    /// The model served (its name as the server reports it).
    #[serde(default)]
    pub model_id: Option<String>,
    /// TP of the measured deployment, when the bench could read it.
    #[serde(default)]
    pub tp: Option<usize>,
    /// PP of the measured deployment.
    #[serde(default)]
    pub pp: Option<usize>,
    /// Requests completed.
    pub completed: usize,
    /// Runs of the point pooled in the figures (`tessera bench --repeat`); absent: 1.
    #[serde(default)]
    pub repeats: Option<usize>,
    /// `inf` or requests per second.
    #[serde(default, deserialize_with = "rate")]
    pub request_rate: Option<f64>,
    /// Shape of the arrival gaps.
    #[serde(default)]
    pub burstiness: Option<f64>,
    /// Cap on requests in flight.
    #[serde(default)]
    pub max_concurrency: Option<usize>,
    /// Prompt tokens per request, as asked.
    #[serde(default)]
    pub input_len: Option<usize>,
    /// Output tokens per request, as asked.
    #[serde(default)]
    pub output_len: Option<usize>,
    /// Prompt tokens in all.
    pub total_input_tokens: u64,
    /// Output tokens in all.
    pub total_output_tokens: u64,
    /// Seed of the bench.
    #[serde(default)]
    pub seed: Option<u64>,
    /// Median TTFT, ms.
    pub median_ttft_ms: f64,
    /// Median TPOT, ms.
    pub median_tpot_ms: f64,
    /// Output tokens per second.
    pub output_throughput: f64,
}

fn rate<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    Ok(match Option::<serde_json::Value>::deserialize(d)? {
        Some(serde_json::Value::Number(n)) => n.as_f64(),
        _ => None,
    })
}

/// Reads a `--result-json` file: one run or an array of runs.
pub fn read_runs(text: &str) -> Result<Vec<MeasuredRun>, serde_json::Error> {
    let v: serde_json::Value = serde_json::from_str(text)?;
    match v {
        serde_json::Value::Array(items) => items
            .into_iter()
            .map(serde_json::from_value)
            .collect::<Result<_, _>>(),
        other => Ok(vec![serde_json::from_value(other)?]),
    }
}

impl MeasuredRun {
    /// The run's mean request shape.
    pub fn workload(&self) -> Workload {
        let n = self.completed.max(1) as u64;
        Workload {
            input_len: self
                .input_len
                .unwrap_or((self.total_input_tokens / n) as usize),
            output_len: self
                .output_len
                .unwrap_or((self.total_output_tokens / n) as usize),
        }
    }

    /// The run's load.
    pub fn load(&self) -> Load {
        match self.request_rate {
            Some(rate) if rate.is_finite() && rate > 0.0 => Load::Open {
                rate,
                burstiness: self.burstiness.unwrap_or(1.0),
                concurrency: self.max_concurrency,
                seed: self.seed.unwrap_or(0),
            },
            _ => Load::Closed {
                concurrency: self.max_concurrency.unwrap_or(self.completed.max(1)),
            },
        }
    }

    /// A short label: `concurrency 4` or `rate 2/s`.
    pub fn label(&self) -> String {
        match self.load() {
            Load::Closed { concurrency } => format!("concurrency {concurrency}"),
            Load::Open { rate, .. } => format!("rate {rate}/s"),
        }
    }
}

/// Replays a measured run's load on the model: one run of the point (a pooled `--repeat`
/// run's figures are medians over runs alike, each of `completed / repeats` requests).
pub fn replay_run(cost: &CostModel, limits: &Limits, run: &MeasuredRun) -> Replay {
    let w = run.workload();
    let jobs = vec![
        Job {
            prompt: w.input_len.max(1),
            output: w.output_len.max(1),
        };
        (run.completed / run.repeats.unwrap_or(1).max(1)).max(1)
    ];
    replay(cost, limits, &jobs, &run.load())
}

/// Predicted and measured figures of one run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Comparison {
    /// `concurrency 4`, `rate 2/s`.
    pub load: String,
    /// `[predicted, measured, relative error]` of the median TTFT, ms.
    pub median_ttft_ms: [f64; 3],
    /// The same for the median TPOT.
    pub median_tpot_ms: [f64; 3],
    /// The same for the output throughput, tokens/s.
    pub output_throughput: [f64; 3],
}

/// Predicts `run` and sets the prediction beside the measurement.
pub fn compare(cost: &CostModel, limits: &Limits, run: &MeasuredRun) -> Comparison {
    let r = replay_run(cost, limits, run);
    let row = |p: f64, m: f64| [p, m, (p - m) / m];
    Comparison {
        load: run.label(),
        median_ttft_ms: row(r.median_ttft() * 1e3, run.median_ttft_ms),
        median_tpot_ms: row(r.median_tpot() * 1e3, run.median_tpot_ms),
        output_throughput: row(r.output_throughput(), run.output_throughput),
    }
}

/// Fits the bandwidth and compute efficiencies of `cost`'s hardware so that the replay of
/// `run` gives its median TPOT (mostly weight reads) and median TTFT (mostly prefill
/// FLOPs). Each is found by bisection with the other held, alternating until both settle.
pub fn calibrate(cost: &mut CostModel, limits: &Limits, run: &MeasuredRun) -> Efficiency {
    let mut e = cost.hardware().efficiency;
    // Efficiencies are searched on a log scale between 10⁻⁶ and about 3 (10^0.5): past 1
    // where the profile's own figures are low, as a `cpu` profile measured while `plan`
    // runs can be against the run it is fitted to (stopping at 1 then bent the other
    // efficiency to make up for it).
    fn solve(mut f: impl FnMut(f64) -> f64, target: f64) -> f64 {
        // f decreases as the efficiency grows.
        let (mut lo, mut hi) = (-6.0f64, 0.5f64);
        for _ in 0..48 {
            let mid = 0.5 * (lo + hi);
            if f(10f64.powf(mid)) > target {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        10f64.powf(0.5 * (lo + hi))
    }
    for _ in 0..4 {
        e.bandwidth = solve(
            |x| {
                cost.set_efficiency(Efficiency { bandwidth: x, ..e });
                replay_run(cost, limits, run).median_tpot() * 1e3
            },
            run.median_tpot_ms,
        );
        e.compute = solve(
            |x| {
                cost.set_efficiency(Efficiency { compute: x, ..e });
                replay_run(cost, limits, run).median_ttft() * 1e3
            },
            run.median_ttft_ms,
        );
    }
    cost.set_efficiency(e);
    e
}

/// Fits the fixed costs outside the workers — per step and per sequence in a step — to
/// measured runs, by least squares on what the replay leaves unexplained of each run's
/// median TPOT: `measured − predicted without overheads = step + seq · concurrency`.
/// Meant for runs whose device time is small or well known, such as a `sim` cluster of a
/// small model: the residual is then the coordinator's own time.
pub fn calibrate_overhead(
    cost: &mut CostModel,
    limits: &Limits,
    runs: &[MeasuredRun],
) -> Efficiency {
    let e = cost.hardware().efficiency;
    cost.set_efficiency(Efficiency {
        step_overhead: 0.0,
        seq_overhead: 0.0,
        ..e
    });
    let points: Vec<(f64, f64)> = runs
        .iter()
        .map(|run| {
            let batch = match run.load() {
                Load::Closed { concurrency } => concurrency,
                Load::Open { concurrency, .. } => concurrency.unwrap_or(1),
            } as f64;
            let predicted = replay_run(cost, limits, run).median_tpot() * 1e3;
            (batch, (run.median_tpot_ms - predicted) * 1e-3)
        })
        .collect();
    let n = points.len() as f64;
    let (mx, my) = (
        points.iter().map(|p| p.0).sum::<f64>() / n,
        points.iter().map(|p| p.1).sum::<f64>() / n,
    );
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let seq = if sxx > 0.0 { (sxy / sxx).max(0.0) } else { 0.0 };
    let fitted = Efficiency {
        step_overhead: (my - seq * mx).max(0.0),
        seq_overhead: seq,
        ..e
    };
    cost.set_efficiency(fitted);
    fitted
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The coordinator's defaults.
    fn defaults() -> SchedulerSettings {
        SchedulerSettings {
            max_batch_tokens: 2048,
            max_batch_seqs: 64,
            kv_block_tokens: 16,
        }
    }

    fn cluster(gpu: &str, nodes: usize) -> Cluster {
        Cluster {
            hardware: Hardware::gpu(gpu).unwrap(),
            nodes,
            gpus_per_node: 8,
        }
    }

    fn w() -> Workload {
        Workload {
            input_len: 128,
            output_len: 8,
        }
    }

    #[test]
    fn gpt3_175b_needs_eight_a100s_and_the_plan_says_so() {
        let config = ModelConfig::preset("gpt3-175b").unwrap();
        let sched = defaults();
        let report = plan(
            &config,
            &cluster("a100-80g", 1),
            &w(),
            &Slo::default(),
            &sched,
            1,
        );
        let small = report
            .splits
            .iter()
            .find(|s| s.tp == 4 && s.pp == 1)
            .unwrap();
        assert!(!small.fits);
        assert!(small.why_not.as_ref().unwrap().contains("weights"));
        let tp8 = report
            .splits
            .iter()
            .find(|s| s.tp == 8 && s.pp == 1)
            .unwrap();
        assert!(tp8.fits, "{:?}", tp8.why_not);
        // Batch 1: TTFT is a 128-token prefill, TPOT a weight read; E2E adds up.
        let (ttft, tpot, e2e) = (
            tp8.ttft_ms.unwrap(),
            tp8.tpot_ms.unwrap(),
            tp8.e2e_ms.unwrap(),
        );
        assert!((e2e - ttft - 7.0 * tpot).abs() < 1e-6 * e2e);
        assert!(tpot > 25.0 && tpot < 35.0, "{tpot}");
        assert_eq!(report.recommended.map(|r| r.0 * r.1), Some(8));
    }

    #[test]
    fn the_slo_picks_the_batch() {
        let config = ModelConfig::preset("gpt3-13b").unwrap();
        let sched = defaults();
        let c = cluster("h100-sxm", 1);
        let loose = plan(&config, &c, &w(), &Slo::default(), &sched, 8);
        let tight_slo = Slo {
            tpot_ms: Some(loose.splits[0].points[0].tpot_ms * 1.05),
            ..Slo::default()
        };
        let tight = plan(&config, &c, &w(), &tight_slo, &sched, 8);
        let a = loose
            .splits
            .iter()
            .find(|s| s.tp == 1 && s.pp == 1)
            .unwrap();
        let b = tight
            .splits
            .iter()
            .find(|s| s.tp == 1 && s.pp == 1)
            .unwrap();
        assert!(b.best.unwrap().batch < a.best.unwrap().batch);
    }

    #[test]
    fn calibration_recovers_known_efficiencies() {
        let config = ModelConfig::preset("gpt3-1.3b").unwrap();
        let c = cluster("a100-80g", 1);
        let plan = ShardPlan::new(&config, 2, 1).unwrap();
        let (mut truth, limits) = split_model(&config, &c, &plan, &defaults());
        let real = Efficiency {
            bandwidth: 0.42,
            compute: 0.21,
            ..truth.hardware().efficiency
        };
        truth.set_efficiency(real);
        let mut run = MeasuredRun {
            model_id: None,
            tp: Some(2),
            pp: Some(1),
            completed: 32,
            repeats: None,
            request_rate: None,
            burstiness: None,
            max_concurrency: Some(4),
            input_len: Some(512),
            output_len: Some(64),
            total_input_tokens: 32 * 512,
            total_output_tokens: 32 * 64,
            seed: None,
            median_ttft_ms: 0.0,
            median_tpot_ms: 0.0,
            output_throughput: 0.0,
        };
        let r = replay_run(&truth, &limits, &run);
        run.median_ttft_ms = r.median_ttft() * 1e3;
        run.median_tpot_ms = r.median_tpot() * 1e3;
        run.output_throughput = r.output_throughput();
        let (mut guess, _) = split_model(&config, &c, &plan, &defaults());
        let e = calibrate(&mut guess, &limits, &run);
        assert!((e.bandwidth - 0.42).abs() < 0.01, "{e:?}");
        assert!((e.compute - 0.21).abs() < 0.01, "{e:?}");
        let cmp = compare(&guess, &limits, &run);
        assert!(cmp.output_throughput[2].abs() < 0.01, "{cmp:?}");

        // The same point run twice and pooled is replayed as one run of it.
        let pooled = MeasuredRun {
            completed: 64,
            repeats: Some(2),
            total_input_tokens: 64 * 512,
            total_output_tokens: 64 * 64,
            ..run.clone()
        };
        assert_eq!(
            replay_run(&truth, &limits, &pooled),
            replay_run(&truth, &limits, &run)
        );
    }

    #[test]
    fn a_bench_result_is_read_with_vllm_keys() {
        let one = r#"{"completed": 10, "request_rate": "inf", "max_concurrency": 4,
            "total_input_tokens": 1280, "total_output_tokens": 640, "median_ttft_ms": 12.5,
            "median_tpot_ms": 3.0, "output_throughput": 500.0, "tp": 2, "pp": null,
            "other": [1, 2]}"#;
        let runs = read_runs(one).unwrap();
        assert_eq!(runs.len(), 1);
        assert_eq!(
            runs[0].workload(),
            Workload {
                input_len: 128,
                output_len: 64
            }
        );
        assert_eq!(runs[0].load(), Load::Closed { concurrency: 4 });
        let two = format!("[{one}, {}]", one.replace("\"inf\"", "2.5"));
        let runs = read_runs(&two).unwrap();
        assert!(matches!(runs[1].load(), Load::Open { rate, .. } if rate == 2.5));
        assert_eq!(runs[1].label(), "rate 2.5/s");
    }
}
