//! `tessera bench` end to end: against a stand-in OpenAI-compatible server whose timings
//! and failures are known (TTFT, TPOT, ITL, 429s and the JSON keys checked against them),
//! and against a real cluster over both of its APIs, with the report and plots written.

mod cluster_common;

use std::convert::Infallible;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use cluster_common::Serve;
use serde_json::{json, Value};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

/// The stand-in's first chunk comes this long after the request.
const FIRST_MS: u64 = 60;
/// Then a chunk of one token every this many ms.
const STEP_MS: u64 = 20;
/// Every this-many-th request (the 4th, the 8th, …) is answered 429.
const REFUSE_EVERY: usize = 4;

#[derive(Default)]
struct StandIn {
    requests: AtomicUsize,
    bodies: Mutex<Vec<Value>>,
}

async fn completions(State(s): State<Arc<StandIn>>, Json(body): Json<Value>) -> Response {
    let n = s.requests.fetch_add(1, Ordering::SeqCst);
    s.bodies.lock().unwrap().push(body.clone());
    if n % REFUSE_EVERY == REFUSE_EVERY - 1 {
        let error = json!({"error": {"message": "queue full", "type": "server_overloaded"}});
        return (StatusCode::TOO_MANY_REQUESTS, Json(error)).into_response();
    }
    let tokens = body["max_tokens"].as_u64().unwrap_or(16);
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        let chunk = |text: &str, finish: Option<&str>| {
            json!({"id": "cmpl-1", "object": "text_completion", "model": "stand-in",
                   "choices": [{"index": 0, "text": text, "finish_reason": finish}], "usage": null})
        };
        tokio::time::sleep(Duration::from_millis(FIRST_MS)).await;
        for i in 0..tokens {
            if i > 0 {
                tokio::time::sleep(Duration::from_millis(STEP_MS)).await;
            }
            let finish = (i + 1 == tokens).then_some("length");
            let _ = tx.send(chunk(" tok", finish).to_string()).await;
        }
        let usage = json!({"id": "cmpl-1", "object": "text_completion", "model": "stand-in",
            "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": tokens,
            "total_tokens": 5 + tokens}});
        let _ = tx.send(usage.to_string()).await;
        let _ = tx.send("[DONE]".to_string()).await;
    });
    let events =
        ReceiverStream::new(rx).map(|data| Ok::<_, Infallible>(Event::default().data(data)));
    Sse::new(events).into_response()
}

/// Starts the stand-in on an ephemeral port; returns its base URL (`…/v1`).
async fn stand_in() -> (String, Arc<StandIn>) {
    let state = Arc::new(StandIn::default());
    let app = Router::new()
        .route("/v1/completions", post(completions))
        .route(
            "/v1/models",
            get(|| async { Json(json!({"object": "list", "data": [{"id": "stand-in"}]})) }),
        )
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // Each event on the wire when it is written, as a real server should.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/v1"), state)
}

/// Runs `tessera bench ARGS` to completion; panics with its output if it fails.
async fn bench(args: &[&str]) -> String {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_tessera"))
        .arg("bench")
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .output();
    let out = tokio::time::timeout(Duration::from_secs(120), out)
        .await
        .expect("tessera bench finishes")
        .expect("tessera bench runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "tessera bench {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn f(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} is not a number: {}", v[key]))
}

/// The keys the capacity planner and vLLM tooling read.
const KEYS: [&str; 33] = [
    "date",
    "backend",
    "model_id",
    "num_prompts",
    "request_rate",
    "burstiness",
    "max_concurrency",
    "duration",
    "completed",
    "failed",
    "total_input_tokens",
    "total_output_tokens",
    "request_throughput",
    "request_goodput",
    "output_throughput",
    "total_token_throughput",
    "max_output_tokens_per_s",
    "max_concurrent_requests",
    "mean_ttft_ms",
    "median_ttft_ms",
    "std_ttft_ms",
    "mean_tpot_ms",
    "mean_itl_ms",
    "mean_e2el_ms",
    "tp",
    "pp",
    "dataset_name",
    "input_len",
    "output_len",
    "range_ratio",
    "seed",
    "repeats",
    "failures",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stand_in_servers_timings_and_refusals_are_measured() {
    let (base, state) = stand_in().await;
    let dir = tempfile::tempdir().unwrap();
    let json_path = dir.path().join("result.json");
    let stdout = bench(&[
        "--openai-base-url",
        &base,
        "--num-prompts",
        "8",
        "--input-len",
        "16",
        "--output-len",
        "8",
        "--max-concurrency",
        "4",
        "--ignore-eos",
        "--metric-percentiles",
        "50,99.9",
        "--slo",
        "ttft:10000",
        "--save-detailed",
        "--result-json",
        json_path.to_str().unwrap(),
    ])
    .await;
    assert!(stdout.contains("Serving Benchmark Result"), "{stdout}");
    assert!(stdout.contains("failed with 429:"), "{stdout}");

    // What the server was sent: OpenAI's streaming completion with vLLM's ignore_eos.
    let bodies = state.bodies.lock().unwrap().clone();
    assert_eq!(bodies.len(), 8, "no warm-up by default");
    for b in &bodies {
        assert_eq!(b["model"], "stand-in", "the first model of GET /models");
        assert_eq!(b["stream"], true);
        assert_eq!(b["stream_options"]["include_usage"], true);
        assert_eq!(b["ignore_eos"], true);
        assert_eq!(b["temperature"], 0);
        assert_eq!(b["max_tokens"], 8);
        assert!(b["prompt"].is_string(), "prompts go as text: {b}");
    }

    let r = read_json(&json_path);
    assert!(r.is_object(), "one point, one object");
    for key in KEYS {
        assert!(r.get(key).is_some(), "missing {key}: {r}");
    }
    for key in [
        "p50_ttft_ms",
        "p99.9_tpot_ms",
        "p50_itl_ms",
        "p99.9_e2el_ms",
    ] {
        assert!(r[key].is_number(), "missing {key}");
    }
    assert_eq!(r["backend"], "openai");
    assert_eq!(r["model_id"], "stand-in");
    assert_eq!(r["request_rate"], "inf");
    assert_eq!(r["max_concurrency"], 4);
    assert_eq!(r["tp"], Value::Null);
    assert_eq!(
        (r["completed"].as_u64(), r["failed"].as_u64()),
        (Some(6), Some(2))
    );
    assert_eq!(r["failures"], json!({"429": 2}));
    assert_eq!(r["total_output_tokens"], 6 * 8, "the usage chunks' counts");
    assert!(f(&r, "max_concurrent_requests") <= 4.0);
    assert_eq!(f(&r, "request_goodput"), f(&r, "request_throughput"));

    // Timings: TTFT at least the stand-in's 60 ms, TPOT about its 20 ms.
    let ttfts: Vec<f64> = r["ttfts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .filter(|&t| t > 0.0)
        .collect();
    assert_eq!(ttfts.len(), 6);
    for t in &ttfts {
        assert!(*t >= 0.060 && *t < 1.0, "TTFT {t} s");
    }
    assert!(f(&r, "mean_ttft_ms") >= 60.0 && f(&r, "mean_ttft_ms") < 1000.0);
    let tpot = f(&r, "median_tpot_ms");
    assert!((15.0..60.0).contains(&tpot), "median TPOT {tpot} ms");
    // One ITL per token after the first, for each completed request; none for refusals.
    let itls = r["itls"].as_array().unwrap();
    let counts: Vec<usize> = itls.iter().map(|l| l.as_array().unwrap().len()).collect();
    assert_eq!(counts.iter().sum::<usize>(), 6 * 7, "{counts:?}");
    assert!(counts.iter().all(|&c| c == 0 || c == 7), "{counts:?}");
    let pooled: Vec<f64> = itls
        .iter()
        .flat_map(|l| l.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()))
        .collect();
    let mean_itl = pooled.iter().sum::<f64>() / pooled.len() as f64;
    assert!((0.015..0.060).contains(&mean_itl), "mean ITL {mean_itl} s");
    assert!((f(&r, "mean_itl_ms") - mean_itl * 1e3).abs() < 1e-6);
    // The stream ends right after its last token, so each request's TPOT, (E2EL − TTFT)
    // over 7 gaps, is the mean of its 7 ITLs: the means agree.
    let (tpot, itl) = (f(&r, "mean_tpot_ms"), f(&r, "mean_itl_ms"));
    assert!(
        (tpot - itl).abs() < 0.05 * itl,
        "mean TPOT {tpot} ms, mean ITL {itl} ms"
    );
    let errors: Vec<&str> = r["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    assert_eq!(
        errors
            .iter()
            .filter(|e| e.starts_with("429: queue full"))
            .count(),
        2
    );
    assert_eq!(errors.iter().filter(|e| e.is_empty()).count(), 6);
    let outputs: Vec<u64> = r["output_lens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(outputs.iter().filter(|&&n| n == 8).count(), 6);

    // A sweep run twice over (50, inf, inf, 50) and pooled: one object per point, in the
    // order asked, the rate as a number or "inf".
    let sent_before = state.bodies.lock().unwrap().len();
    let sweep_path = dir.path().join("sweep.json");
    let stdout = bench(&[
        "--openai-base-url",
        &base,
        "--model",
        "stand-in",
        "--num-prompts",
        "3",
        "--input-len",
        "8",
        "--output-len",
        "3",
        "--request-rate",
        "50,inf",
        "--repeat",
        "2",
        "--result-json",
        sweep_path.to_str().unwrap(),
    ])
    .await;
    assert!(stdout.contains("no SLO was given"), "{stdout}");
    assert_eq!(state.bodies.lock().unwrap().len() - sent_before, 12);
    let sweep = read_json(&sweep_path);
    let points = sweep.as_array().expect("a sweep writes an array");
    assert_eq!(points.len(), 2);
    assert_eq!(points[0]["request_rate"], 50.0);
    assert_eq!(points[1]["request_rate"], "inf");
    for p in points {
        assert_eq!(p["repeats"], 2);
        assert_eq!(
            p["completed"].as_u64().unwrap() + p["failed"].as_u64().unwrap(),
            6,
            "both runs pooled: {p}"
        );
    }
    assert_eq!(points[0]["slo"], Value::Null);
    assert!(
        points[0].get("itls").is_none(),
        "per-request arrays only with --save-detailed"
    );
}

#[test]
fn an_unreachable_target_is_named() {
    let out = cluster_common::tessera()
        .args([
            "bench",
            "--openai-base-url",
            "http://127.0.0.1:9/v1",
            "--num-prompts",
            "1",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("target http://127.0.0.1:9/v1: cannot be reached"),
        "{stderr}"
    );
    let out = cluster_common::tessera()
        .args(["bench", "--range-ratio", "1.5"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--range-ratio must be in [0, 1)"),
        "{stderr}"
    );
}

fn non_empty(path: &Path) {
    let len = std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .len();
    assert!(len > 0, "{} is empty", path.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_cluster_is_benchmarked_over_both_apis() {
    let serve = Serve::start(&[]);
    cluster_common::wait_serving(&serve.endpoint, Duration::from_secs(60)).await;
    let dir = tempfile::tempdir().unwrap();
    let openai = format!("{}/v1", serve.http);
    for (backend, target) in [
        ("tessera", ["--endpoint", &serve.endpoint]),
        ("openai", ["--openai-base-url", &openai]),
    ] {
        let json_path = dir.path().join(format!("{backend}.json"));
        let report = dir.path().join(backend);
        bench(&[
            target[0],
            target[1],
            "--num-prompts",
            "6",
            "--input-len",
            "8",
            "--output-len",
            "8",
            "--ignore-eos",
            "--max-concurrency",
            "3",
            "--result-json",
            json_path.to_str().unwrap(),
            "--report-dir",
            report.to_str().unwrap(),
        ])
        .await;
        let r = read_json(&json_path);
        assert_eq!(r["backend"], backend);
        assert_eq!(r["model_id"], "gpt2-tiny");
        assert_eq!(r["completed"], 6, "{r}");
        assert_eq!(r["failed"], 0, "{r}");
        assert_eq!(r["total_output_tokens"], 6 * 8);
        assert!(f(&r, "max_concurrent_requests") <= 3.0);
        assert!(f(&r, "mean_tpot_ms") > 0.0 && f(&r, "mean_ttft_ms") > 0.0);
        if backend == "tessera" {
            assert_eq!((r["tp"].as_u64(), r["pp"].as_u64()), (Some(2), Some(1)));
            assert_eq!(r["total_input_tokens"], 6 * 8);
        }
        non_empty(&report.join("report.md"));
        for stem in [
            "latency_throughput",
            "ttft_distribution",
            "tpot_distribution",
        ] {
            non_empty(&report.join(format!("{stem}.png")));
            non_empty(&report.join(format!("{stem}.svg")));
        }
    }
}
