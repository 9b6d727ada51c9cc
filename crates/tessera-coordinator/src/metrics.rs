//! The coordinator's Prometheus metrics: names, help texts and the recorder.
//!
//! Code records through the `metrics` facade (`gauge!`, `counter!`, `histogram!`) with the
//! names below; [`recorder`] installs one Prometheus recorder per process, and `GET /metrics`
//! renders it. Histograms use fixed buckets so that Prometheus can aggregate them across
//! coordinators.

use std::sync::OnceLock;

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Sequences in the running batch.
pub const REQUESTS_RUNNING: &str = "tessera_requests_running";
/// Requests waiting for the batch (new ones and preempted ones).
pub const REQUESTS_WAITING: &str = "tessera_requests_waiting";
/// KV-cache blocks owned by sequences.
pub const KV_BLOCKS_USED: &str = "tessera_kv_blocks_used";
/// KV-cache blocks in all.
pub const KV_BLOCKS_TOTAL: &str = "tessera_kv_blocks_total";
/// From arrival to the first generated token.
pub const TIME_TO_FIRST_TOKEN: &str = "tessera_time_to_first_token_seconds";
/// Between consecutive generated tokens of one sequence.
pub const TIME_PER_OUTPUT_TOKEN: &str = "tessera_time_per_output_token_seconds";
/// From arrival to the last token, by finish reason.
pub const REQUEST_DURATION: &str = "tessera_request_duration_seconds";
/// Generated tokens.
pub const GENERATED_TOKENS: &str = "tessera_generated_tokens_total";
/// Prompt tokens of admitted requests.
pub const PROMPT_TOKENS: &str = "tessera_prompt_tokens_total";
/// Sequences preempted for KV-cache space (recomputed later).
pub const PREEMPTIONS: &str = "tessera_preemptions_total";
/// Requests that ended, by `reason`: length, stop, cancelled, deadline, error.
pub const REQUESTS_FINISHED: &str = "tessera_requests_finished_total";
/// Requests refused at submission, by `reason`: queue_full, too_long, unavailable.
pub const REQUESTS_REJECTED: &str = "tessera_requests_rejected_total";
/// Requests refused for want of a valid API key, by `api` (grpc, http) and `reason`
/// (missing, malformed, invalid).
pub const REQUESTS_UNAUTHENTICATED: &str = "tessera_requests_unauthenticated_total";
/// Steps sent to the workers.
pub const STEPS: &str = "tessera_steps_total";
/// Wall time of a step as the coordinator sees it (fan-out to every worker and back).
pub const STEP_DURATION: &str = "tessera_step_duration_seconds";
/// New tokens per step (prefill chunks and decodes).
pub const STEP_TOKENS: &str = "tessera_step_tokens";
/// Compute time of one step on one worker, labelled `stage` and `tp_rank`.
pub const WORKER_STEP_DURATION: &str = "tessera_worker_step_seconds";
/// Workers found dead or hung and taken out of the cluster.
pub const WORKER_FAILURES: &str = "tessera_worker_failures_total";
/// Times the cluster was rebuilt after losing workers and went on serving.
pub const RECOVERIES: &str = "tessera_recoveries_total";
/// From a failure's detection to serving again.
pub const RECOVERY_DURATION: &str = "tessera_recovery_seconds";

const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0,
    10.0, 30.0, 60.0,
];
const DURATION_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
];
const TOKEN_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0,
];

/// The process's Prometheus recorder, installed on first use. `None` when another
/// recorder was installed first (an embedding program's own); metrics then go there.
pub fn recorder() -> Option<&'static PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let buckets: [(&str, &[f64]); 7] = [
                (TIME_TO_FIRST_TOKEN, LATENCY_BUCKETS),
                (TIME_PER_OUTPUT_TOKEN, LATENCY_BUCKETS),
                (STEP_DURATION, LATENCY_BUCKETS),
                (WORKER_STEP_DURATION, LATENCY_BUCKETS),
                (REQUEST_DURATION, DURATION_BUCKETS),
                (RECOVERY_DURATION, DURATION_BUCKETS),
                (STEP_TOKENS, TOKEN_BUCKETS),
            ];
            let builder = buckets
                .into_iter()
                .try_fold(PrometheusBuilder::new(), |b, (name, values)| {
                    b.set_buckets_for_metric(Matcher::Full(name.into()), values)
                })
                .ok()?;
            let handle = builder.install_recorder().ok()?;
            describe();
            // Counters are exported from the start, at 0, so that a rate over them has a
            // first sample (and a dashboard shows "no preemptions" rather than nothing).
            for name in [
                PREEMPTIONS,
                GENERATED_TOKENS,
                PROMPT_TOKENS,
                STEPS,
                WORKER_FAILURES,
                RECOVERIES,
            ] {
                metrics::counter!(name).absolute(0);
            }
            Some(handle)
        })
        .as_ref()
}

/// The Prometheus text exposition of every metric, or a comment saying why there is none.
pub fn render() -> String {
    match recorder() {
        Some(h) => h.render(),
        None => "# another metrics recorder is installed in this process\n".into(),
    }
}

fn describe() {
    describe_gauge!(REQUESTS_RUNNING, "Sequences in the running batch");
    describe_gauge!(
        REQUESTS_WAITING,
        "Requests waiting for the batch, new and preempted"
    );
    describe_gauge!(KV_BLOCKS_USED, "KV-cache blocks owned by sequences");
    describe_gauge!(KV_BLOCKS_TOTAL, "KV-cache blocks on every worker");
    describe_histogram!(
        TIME_TO_FIRST_TOKEN,
        Unit::Seconds,
        "From a request's arrival to its first generated token"
    );
    describe_histogram!(
        TIME_PER_OUTPUT_TOKEN,
        Unit::Seconds,
        "Between consecutive generated tokens of one request"
    );
    describe_histogram!(
        REQUEST_DURATION,
        Unit::Seconds,
        "From a request's arrival to its end, by finish reason"
    );
    describe_counter!(GENERATED_TOKENS, "Tokens generated");
    describe_counter!(PROMPT_TOKENS, "Prompt tokens of admitted requests");
    describe_counter!(
        PREEMPTIONS,
        "Sequences preempted for KV-cache space and recomputed later"
    );
    describe_counter!(REQUESTS_FINISHED, "Requests that ended, by reason");
    describe_counter!(REQUESTS_REJECTED, "Requests refused on arrival, by reason");
    describe_counter!(
        REQUESTS_UNAUTHENTICATED,
        "Requests refused for want of a valid API key, by API and reason"
    );
    describe_counter!(STEPS, "Steps sent to the workers");
    describe_histogram!(
        STEP_DURATION,
        Unit::Seconds,
        "Wall time of a step at the coordinator (fan-out and reply)"
    );
    describe_histogram!(STEP_TOKENS, "New tokens in a step");
    describe_counter!(
        WORKER_FAILURES,
        "Workers found dead or hung and taken out of the cluster"
    );
    describe_counter!(
        RECOVERIES,
        "Rebuilds of the cluster after a worker was lost"
    );
    describe_histogram!(
        RECOVERY_DURATION,
        Unit::Seconds,
        "From detecting a lost worker to serving again"
    );
    describe_histogram!(
        WORKER_STEP_DURATION,
        Unit::Seconds,
        "Compute time of a step on one worker"
    );
}
