//! One benchmark point: warm-up, then every prompt sent on the arrival schedule, at most
//! `max_concurrency` in flight, each request timed by the target.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use tokio::sync::Semaphore;

use crate::arrival::{Arrivals, RequestRate};
use crate::dataset::Prompt;
use crate::record::RequestRecord;
use crate::target::Target;
use crate::BenchError;

/// How one point loads the target.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadSpec {
    /// Open-loop arrival rate.
    pub request_rate: RequestRate,
    /// Shape of the gamma-distributed gaps between arrivals (1: Poisson).
    pub burstiness: f64,
    /// Closed-loop limit on requests in flight; `None`: no limit.
    pub max_concurrency: Option<usize>,
    /// Requests sent (and awaited) before the timed run, not counted.
    pub num_warmups: usize,
    /// Ask the server to generate past the end-of-text token.
    pub ignore_eos: bool,
    /// A request not finished within this is a failure (`timeout`).
    pub request_timeout: Duration,
    /// Seed of the arrival schedule.
    pub seed: u64,
}

impl LoadSpec {
    /// Refuses settings that cannot run, naming the flag.
    pub fn validate(&self) -> Result<(), BenchError> {
        if self.max_concurrency == Some(0) {
            return Err(BenchError::invalid(
                "--max-concurrency",
                "must be at least 1",
            ));
        }
        if self.request_timeout.is_zero() {
            return Err(BenchError::invalid("--request-timeout", "must be positive"));
        }
        Arrivals::new(self.request_rate, self.burstiness, self.seed).map(|_| ())
    }
}

/// Sends `prompts` to `target` as `load` says and returns one record per prompt, in the
/// order sent. A progress bar counts finished requests on stderr when it is a terminal.
pub async fn run_point(
    target: Arc<Target>,
    prompts: &[Prompt],
    load: &LoadSpec,
    label: &str,
) -> Result<Vec<RequestRecord>, BenchError> {
    load.validate()?;
    let limit = load.max_concurrency.map(|c| Arc::new(Semaphore::new(c)));
    let send = |prompt: Prompt, run_start: Instant, bar: Option<ProgressBar>| {
        let target = target.clone();
        let limit = limit.clone();
        let (ignore_eos, timeout) = (load.ignore_eos, load.request_timeout);
        tokio::spawn(async move {
            // A closed semaphore is never closed here; without a permit it runs unlimited.
            let _permit = match &limit {
                Some(s) => s.clone().acquire_owned().await.ok(),
                None => None,
            };
            let record = target.send(&prompt, ignore_eos, timeout, run_start).await;
            if let Some(bar) = bar {
                bar.inc(1);
            }
            record
        })
    };

    if load.num_warmups > 0 && !prompts.is_empty() {
        let warm: Vec<_> = (0..load.num_warmups)
            .map(|i| send(prompts[i % prompts.len()].clone(), Instant::now(), None))
            .collect();
        for w in warm {
            let _ = w.await;
        }
    }

    let bar = progress_bar(prompts.len(), label);
    let schedule =
        Arrivals::new(load.request_rate, load.burstiness, load.seed)?.schedule(prompts.len());
    let run_start = Instant::now();
    let mut tasks = Vec::with_capacity(prompts.len());
    for (prompt, at_s) in prompts.iter().zip(schedule) {
        tokio::time::sleep_until((run_start + Duration::from_secs_f64(at_s)).into()).await;
        tasks.push(send(prompt.clone(), run_start, Some(bar.clone())));
    }
    let mut records = Vec::with_capacity(tasks.len());
    for t in tasks {
        // `send` returns a record for everything a server can do; a task can only end
        // without one if the benchmark itself is broken.
        records.push(t.await.expect("a request task panicked"));
    }
    bar.finish_and_clear();
    Ok(records)
}

/// A bar on stderr when a person watches it; hidden otherwise.
fn progress_bar(n: usize, label: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(n as u64);
    if let Ok(style) =
        ProgressStyle::with_template("{msg} [{elapsed_precise}] {wide_bar} {pos}/{len} requests")
    {
        bar.set_style(style);
    }
    bar.set_message(label.to_string());
    bar
}
