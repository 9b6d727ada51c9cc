//! `tessera plan` and the `sim` backend: the planner's output contract, calibration and
//! comparison from bench result files, clear failures, and a simulated GPU cluster that
//! serves through the real coordinator.

mod cluster_common;

use std::process::{Command, Output};
use std::time::Duration;

use cluster_common::*;
use tessera_client::GenerateRequest;

fn tessera_out(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("tessera runs")
}

fn plan_json(args: &[&str]) -> serde_json::Value {
    let mut all = vec!["plan", "--json"];
    all.extend_from_slice(args);
    let o = tessera_out(&all);
    assert!(
        o.status.success(),
        "{all:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).expect("plan --json prints JSON")
}

fn split(plan: &serde_json::Value, tp: u64, pp: u64) -> &serde_json::Value {
    plan["splits"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["tp"] == tp && s["pp"] == pp)
        .unwrap_or_else(|| panic!("no split tp={tp} pp={pp}"))
}

#[test]
fn plan_json_has_every_split_with_latencies_for_the_asked_batch() {
    let plan = plan_json(&[
        "--preset",
        "gpt3-175b",
        "--gpu",
        "a100-80g",
        "--input-len",
        "128",
        "--output-len",
        "8",
        "--batch",
        "1",
    ]);
    let tp8 = split(&plan, 8, 1);
    assert_eq!(tp8["fits"], true);
    let ttft = tp8["ttft_ms"].as_f64().unwrap();
    let tpot = tp8["tpot_ms"].as_f64().unwrap();
    let e2e = tp8["e2e_ms"].as_f64().unwrap();
    assert!(ttft > 0.0 && tpot > 0.0);
    assert!((e2e - ttft - 7.0 * tpot).abs() < 1e-3 * e2e, "{tp8}");
    // 350 GB of bf16 weights cannot sit on 4 GPUs of 80 GiB.
    let tp4 = split(&plan, 4, 1);
    assert_eq!(tp4["fits"], false);
    assert!(tp4["why_not"].as_str().unwrap().contains("weights"));
    assert_eq!(plan["recommended"], serde_json::json!([8, 1]));
}

#[test]
fn calibration_and_comparison_read_bench_results() {
    let dir = tempfile::tempdir().unwrap();
    // A measured sweep in `tessera bench --result-json` form (vLLM's keys).
    let run = |c: u64, ttft: f64, tpot: f64, tput: f64| {
        serde_json::json!({
            "completed": 4 * c, "request_rate": "inf", "max_concurrency": c,
            "total_input_tokens": 4 * c * 32, "total_output_tokens": 4 * c * 16,
            "input_len": 32, "output_len": 16, "tp": 2, "pp": 1,
            "median_ttft_ms": ttft, "median_tpot_ms": tpot, "output_throughput": tput,
        })
    };
    let sweep = serde_json::json!([run(1, 40.0, 30.0, 32.0), run(4, 90.0, 40.0, 95.0)]);
    let path = dir.path().join("sweep.json");
    std::fs::write(&path, sweep.to_string()).unwrap();
    let p = path.to_str().unwrap();
    let out = plan_json(&[
        "--preset",
        "gpt2",
        "--gpu",
        "a100-80g",
        "--calibrate",
        p,
        "--compare",
        p,
        "--tp",
        "2",
        "--pp",
        "1",
    ]);
    // Calibrated on the first run, the prediction of that run matches it.
    let e = &out["calibrated"];
    assert!(e["bandwidth"].as_f64().unwrap() < 0.01, "{e}");
    let rows = out["comparison"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["load"], "concurrency 1");
    for metric in ["median_ttft_ms", "median_tpot_ms"] {
        let err = rows[0][metric][2].as_f64().unwrap();
        assert!(err.abs() < 0.01, "{metric}: {}", rows[0]);
    }
    // Splits other than --tp/--pp are left out.
    assert_eq!(out["splits"].as_array().unwrap().len(), 1);
}

#[test]
fn plan_refuses_bad_input_by_name() {
    for (args, needle) in [
        (vec!["plan", "--gpu", "v100"], "v100"),
        (vec!["plan", "--slo", "ttft:abc"], "--slo"),
        (vec!["plan", "--slo", "latency:5"], "latency"),
        (vec!["plan", "--nodes", "0"], "--nodes"),
        (
            vec!["plan", "--calibrate", "/nonexistent.json"],
            "/nonexistent.json",
        ),
        (
            vec!["plan", "--gpu", "h100-sxm", "--memory-bandwidth-gb-s", "0"],
            "memory_bandwidth",
        ),
    ] {
        let o = tessera_out(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

#[test]
fn the_cpu_profile_is_measured_here() {
    let plan = plan_json(&[
        "--preset",
        "gpt2",
        "--gpu",
        "cpu",
        "--tp",
        "2",
        "--pp",
        "1",
        "--input-len",
        "16",
        "--output-len",
        "4",
    ]);
    let hw = &plan["cluster"]["hardware"];
    assert_eq!(hw["name"], "cpu");
    assert_eq!(hw["weight_bytes"], 4);
    assert!(hw["memory_bandwidth"].as_f64().unwrap() > 1e8);
    assert!(hw["matrix_flops"].as_f64().unwrap() > 1e8);
    assert!(split(&plan, 2, 1)["tpot_ms"].as_f64().unwrap() > 0.0);
}

/// A simulated 8-GPU cluster (TP=4 × PP=2 of gpt3-350m on H100s) serves through the real
/// coordinator: every request gets its tokens, the KV cache is sized from the profile's
/// memory at bf16, and steps take at least the time the cost model predicts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_simulated_gpu_cluster_serves_through_the_real_coordinator() {
    let serve = Serve::start(&[
        "--backend",
        "sim",
        "--gpu",
        "h100-sxm",
        "--preset",
        "gpt3-350m",
        "--tp",
        "4",
        "--pp",
        "2",
    ]);
    let mut client = wait_serving(&serve.endpoint, Duration::from_secs(60)).await;
    let info = client.model_info().await.unwrap();
    assert_eq!((info.tp, info.pp), (4, 2));
    assert!(info.workers.iter().all(|w| w.backend == "sim"));
    let mut tasks = Vec::new();
    for i in 0..4u32 {
        let mut c = client.clone();
        tasks.push(tokio::spawn(async move {
            c.generate(GenerateRequest {
                prompt_ids: vec![10 + i, 20, 30],
                max_tokens: Some(12),
                ignore_eos: true,
                ..Default::default()
            })
            .await
        }));
    }
    for t in tasks {
        let r = t.await.unwrap().unwrap();
        assert_eq!(r.token_ids.len(), 12);
    }
    // The planner's view of the same deployment: the cache the coordinator sized is the
    // one the planner predicts (64 sequences of the whole context at most).
    let plan = plan_json(&[
        "--preset",
        "gpt3-350m",
        "--gpu",
        "h100-sxm",
        "--tp",
        "4",
        "--pp",
        "2",
    ]);
    let kv_tokens = split(&plan, 4, 2)["kv_tokens"].as_u64().unwrap();
    assert_eq!(
        u64::from(info.kv_blocks) * u64::from(info.kv_block_tokens),
        kv_tokens
    );
    wait_idle(&serve.http, Duration::from_secs(10)).await;
}
