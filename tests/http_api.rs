//! The OpenAI-compatible HTTP API of a real cluster: completions equal the gRPC API's,
//! streaming as server-sent events, usage and log-probabilities, models, health and
//! Prometheus metrics; every bad request gets a 4xx with an OpenAI-style JSON error; and
//! the official `openai` Python client works against it.

mod cluster_common;
mod common;

use std::process::Command;
use std::time::Duration;

use cluster_common::{metric, wait_idle, wait_serving, Serve};
use common::fixture;
use serde_json::{json, Value};
use tessera_client::GenerateRequest;

const MODEL: &str = "tiny-gpt2";

async fn post(http: &str, body: Value) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .post(format!("{http}/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

/// The `data:` payloads of a server-sent event stream.
fn sse_data(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_equal_the_grpc_api_and_speak_openai() {
    let model = fixture(MODEL).display().to_string();
    let serve = Serve::start(&["--model", &model, "--tp", "2"]);
    let mut client = wait_serving(&serve.endpoint, Duration::from_secs(30)).await;
    let http = &serve.http;
    let prompt = vec![15u32, 400, 27, 8, 311];
    let grpc = client
        .generate(GenerateRequest {
            prompt_ids: prompt.clone(),
            max_tokens: Some(20),
            ignore_eos: true,
            logprobs: true,
            ..Default::default()
        })
        .await
        .unwrap();

    let body = json!({
        "model": MODEL, "prompt": prompt, "max_tokens": 20, "temperature": 0,
        "ignore_eos": true, "logprobs": 1,
    });
    let (status, done) = post(http, body.clone()).await;
    assert_eq!(status, 200, "{done}");
    assert_eq!(done["object"], "text_completion");
    assert_eq!(done["model"], MODEL);
    let choice = &done["choices"][0];
    assert_eq!(choice["text"], grpc.text.as_str(), "HTTP and gRPC agree");
    assert_eq!(choice["finish_reason"], "length");
    assert_eq!(done["usage"]["prompt_tokens"], 5);
    assert_eq!(done["usage"]["completion_tokens"], 20);
    assert_eq!(done["usage"]["total_tokens"], 25);
    let lps: Vec<f32> = choice["logprobs"]["token_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    assert_eq!(lps, grpc.logprobs);
    assert_eq!(choice["logprobs"]["tokens"].as_array().unwrap().len(), 20);

    // Streamed: one event per token, then the usage chunk, then [DONE].
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let resp = reqwest::Client::new()
        .post(format!("{http}/v1/completions"))
        .json(&streamed)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let events = sse_data(&resp.text().await.unwrap());
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks.len(), 21, "20 token chunks and a usage chunk");
    let text: String = chunks[..20]
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(text, grpc.text);
    assert_eq!(chunks[19]["choices"][0]["finish_reason"], "length");
    assert!(chunks[18]["choices"][0]["finish_reason"].is_null());
    assert_eq!(chunks[20]["usage"]["completion_tokens"], 20);
    assert!(chunks.iter().all(|c| c["id"] == chunks[0]["id"]));

    let models: Value = reqwest::get(format!("{http}/v1/models"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], MODEL);
    assert_eq!(models["data"][0]["max_model_len"], 64);
    let health = reqwest::get(format!("{http}/health")).await.unwrap();
    assert_eq!(health.status(), 200);

    let text = reqwest::get(format!("{http}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "tessera_requests_running",
        "tessera_requests_waiting",
        "tessera_kv_blocks_used",
        "tessera_kv_blocks_total",
        "tessera_time_to_first_token_seconds_bucket",
        "tessera_time_per_output_token_seconds_bucket",
        "tessera_generated_tokens_total",
        "tessera_preemptions_total",
        "tessera_worker_step_seconds_bucket{stage=\"0\",tp_rank=\"1\"",
    ] {
        assert!(text.contains(name), "/metrics lacks {name}:\n{text}");
    }
    assert!(metric(http, "tessera_generated_tokens_total").await >= 60.0);
    assert!(metric(http, "tessera_kv_blocks_total").await > 0.0);
    wait_idle(http, Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_4xx_with_an_openai_error() {
    let model = fixture(MODEL).display().to_string();
    let serve = Serve::start(&["--model", &model, "--tp", "1"]);
    wait_serving(&serve.endpoint, Duration::from_secs(30)).await;
    let http = &serve.http;
    let ok = json!({"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 4});
    let with = |k: &str, v: Value| {
        let mut b = ok.clone();
        b[k] = v;
        b
    };
    let cases: Vec<(&str, Value, u16, Option<&str>)> = vec![
        (
            "top_p above 1",
            with("top_p", json!(2.0)),
            400,
            Some("top_p"),
        ),
        (
            "negative temperature",
            with("temperature", json!(-1)),
            400,
            Some("temperature"),
        ),
        (
            "max_tokens past the context",
            with("max_tokens", json!(500)),
            400,
            Some("max_tokens"),
        ),
        (
            "max_tokens 0",
            with("max_tokens", json!(0)),
            400,
            Some("max_tokens"),
        ),
        (
            "token id past the vocabulary",
            with("prompt", json!([5000])),
            400,
            Some("prompt"),
        ),
        ("no prompt", json!({"model": MODEL}), 400, Some("prompt")),
        (
            "empty prompt",
            with("prompt", json!("")),
            400,
            Some("prompt"),
        ),
        (
            "two prompts",
            with("prompt", json!(["a", "b"])),
            400,
            Some("prompt"),
        ),
        ("n = 2", with("n", json!(2)), 400, Some("n")),
        ("echo", with("echo", json!(true)), 400, Some("echo")),
        (
            "logprobs 5",
            with("logprobs", json!(5)),
            400,
            Some("logprobs"),
        ),
        (
            "empty stop string",
            with("stop", json!([""])),
            400,
            Some("stop"),
        ),
        (
            "prompt of the wrong type",
            with("prompt", json!({"a": 1})),
            400,
            None,
        ),
        (
            "max_tokens of the wrong type",
            with("max_tokens", json!("many")),
            400,
            None,
        ),
        (
            "unknown model",
            with("model", json!("gpt-4")),
            404,
            Some("model"),
        ),
    ];
    for (what, body, status, param) in cases {
        let (got, err) = post(http, body).await;
        assert_eq!(got, status, "{what}: {err}");
        let e = &err["error"];
        assert!(
            e["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}: {err}"
        );
        assert!(e["type"].is_string(), "{what}: {err}");
        if let Some(p) = param {
            assert_eq!(e["param"], p, "{what}: {err}");
        }
    }

    let raw = |body: &'static str, content_type: &'static str| {
        let http = http.clone();
        async move {
            let resp = reqwest::Client::new()
                .post(format!("{http}/v1/completions"))
                .header("content-type", content_type)
                .body(body)
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            let v: Value = resp.json().await.unwrap();
            (status, v)
        }
    };
    let (s, e) = raw("{\"model\": ", "application/json").await;
    assert_eq!(s, 400, "truncated JSON: {e}");
    assert!(e["error"]["message"].is_string());
    let (s, e) = raw("{}", "text/plain").await;
    assert_eq!(s, 415, "not JSON: {e}");
    let big = reqwest::Client::new()
        .post(format!("{http}/v1/completions"))
        .header("content-type", "application/json")
        .body(vec![b' '; 20 << 20])
        .send()
        .await
        .unwrap();
    assert_eq!(big.status(), 413, "a body over the limit");
    let missing = reqwest::get(format!("{http}/v1/chat/nothing"))
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let v: Value = missing.json().await.unwrap();
    assert!(v["error"]["message"].is_string());
    let wrong = reqwest::get(format!("{http}/v1/completions"))
        .await
        .unwrap();
    assert_eq!(wrong.status(), 405);

    // Still serving, and nothing left behind.
    let (s, done) = post(http, ok).await;
    assert_eq!(s, 200, "{done}");
    wait_idle(http, Duration::from_secs(2)).await;
}

/// A Python with the `openai` package: `TESSERA_TEST_PYTHON` (CI sets it, and then the
/// test must run), else `python3` if it has the package.
fn openai_python() -> Option<String> {
    if let Ok(p) = std::env::var("TESSERA_TEST_PYTHON") {
        return Some(p);
    }
    let ok = Command::new("python3")
        .args(["-c", "import openai"])
        .output()
        .is_ok_and(|o| o.status.success());
    ok.then(|| "python3".to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_python_client_works() {
    let Some(python) = openai_python() else {
        eprintln!("skipped: no Python with the openai package (set TESSERA_TEST_PYTHON)");
        return;
    };
    let serve = Serve::start(&["--tp", "1"]);
    wait_serving(&serve.endpoint, Duration::from_secs(30)).await;
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../scripts/openai_client_check.py");
    let base = format!("{}/v1", serve.http);
    let out = tokio::task::spawn_blocking(move || {
        Command::new(&python)
            .arg(&script)
            .args(["--base-url", &base])
            .output()
            .expect("python runs")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "openai client checks failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("all checks passed"), "{stdout}");
    wait_idle(&serve.http, Duration::from_secs(2)).await;
}
