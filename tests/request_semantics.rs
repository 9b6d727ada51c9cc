//! What a request may ask and what happens when it goes away, against real clusters:
//! stop strings matched across token boundaries (the stop text is not returned), gRPC
//! deadlines ending requests with DEADLINE_EXCEEDED, dropped streams freeing their KV
//! blocks within a step, and a full queue refused at once with RESOURCE_EXHAUSTED.

mod cluster_common;
mod common;

use std::time::{Duration, Instant};

use cluster_common::{metric, wait_idle, wait_serving, Serve};
use common::fixture;
use futures::StreamExt;
use tessera_client::proto::generation_client::GenerationClient;
use tessera_client::{Code, FinishReason, GenerateRequest};
use tessera_model::Tokenizer;

/// A long request on the default preset (gpt2-tiny): far more tokens than any test waits
/// for.
fn long_request(i: u32) -> GenerateRequest {
    GenerateRequest {
        prompt_ids: vec![464 + i, 3290, 318],
        max_tokens: Some(900),
        ignore_eos: true,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_end_the_text_before_them_across_token_boundaries() {
    let model = fixture("tiny-gpt2").display().to_string();
    let serve = Serve::start(&["--model", &model, "--tp", "1"]);
    let mut client = wait_serving(&serve.endpoint, Duration::from_secs(30)).await;
    let tokenizer = Tokenizer::gpt2();
    let base = GenerateRequest {
        prompt_ids: vec![11, 42, 7, 300],
        max_tokens: Some(40),
        ignore_eos: true,
        ..Default::default()
    };
    let full = client.generate(base.clone()).await.unwrap();
    // Find a token boundary past the middle with a character on each side, and stop on
    // the text that straddles it.
    let pieces: Vec<String> = full
        .token_ids
        .iter()
        .map(|&t| tokenizer.decode(&[t]).unwrap())
        .collect();
    let mut at = 0;
    let mut stop = None;
    for (k, p) in pieces.iter().enumerate() {
        at += p.len();
        if k >= pieces.len() / 2 && k + 1 < pieces.len() && !pieces[k + 1].is_empty() {
            let before = full.text[..at].chars().next_back().unwrap();
            let after = full.text[at..].chars().next().unwrap();
            stop = Some(format!("{before}{after}"));
            break;
        }
    }
    let stop = stop.expect("a boundary to stop on");
    let cut = full.text.find(&stop).unwrap();
    let want_text = &full.text[..cut];

    let req = GenerateRequest {
        stop: vec!["never appears \u{1F600}".into(), stop.clone()],
        ..base
    };
    let got = client.generate(req.clone()).await.unwrap();
    assert_eq!(
        got.text, want_text,
        "the text ends before the stop string {stop:?}"
    );
    assert_eq!(got.finish_reason, FinishReason::Stop as i32);
    assert_eq!(got.matched_stop, stop);
    assert!(got.completion_tokens < 40);
    assert_eq!(
        &got.token_ids[..],
        &full.token_ids[..got.token_ids.len()],
        "the tokens up to the stop are those of the full run"
    );
    let streamed = client
        .generate_stream(req)
        .await
        .unwrap()
        .collect_response()
        .await
        .unwrap();
    assert_eq!(streamed.text, want_text);
    assert_eq!(streamed.matched_stop, stop);

    // The same through the HTTP API.
    let body = serde_json::json!({
        "model": "tiny-gpt2",
        "prompt": [11, 42, 7, 300],
        "max_tokens": 40,
        "temperature": 0,
        "ignore_eos": true,
        "stop": stop,
    });
    let http: serde_json::Value = reqwest::Client::new()
        .post(format!("{}/v1/completions", serve.http))
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(http["choices"][0]["text"], want_text);
    assert_eq!(http["choices"][0]["finish_reason"], "stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_deadline_ends_the_request_with_deadline_exceeded() {
    let serve = Serve::start(&["--tp", "1"]);
    wait_serving(&serve.endpoint, Duration::from_secs(30)).await;
    let mut raw = GenerationClient::connect(format!("http://{}", serve.endpoint))
        .await
        .unwrap();
    let timeout = Duration::from_millis(400);

    let mut req = tonic::Request::new(long_request(0));
    req.set_timeout(timeout);
    let start = Instant::now();
    let mut stream = raw.generate_stream(req).await.unwrap().into_inner();
    let mut tokens = 0;
    let status = loop {
        match stream.message().await {
            Ok(Some(m)) => tokens += m.token_ids.len(),
            Ok(None) => panic!("the stream ended without an error after {tokens} tokens"),
            Err(s) => break s,
        }
    };
    let took = start.elapsed();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().starts_with("deadline"), "{status:?}");
    assert!(
        tokens > 0 && tokens < 900,
        "{tokens} tokens before the deadline"
    );
    assert!(
        took < timeout + Duration::from_millis(300),
        "ended after {took:?}"
    );

    let mut req = tonic::Request::new(long_request(1));
    req.set_timeout(timeout);
    let status = raw.generate(req).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");

    // The unary answer leaves at its deadline; the scheduler ends the sequence at its next
    // turn, so the count may trail the answer by a step.
    wait_idle(&serve.http, Duration::from_secs(2)).await;
    let counted = Instant::now();
    while metric(&serve.http, "tessera_requests_finished_total").await < 2.0 {
        assert!(
            counted.elapsed() < Duration::from_secs(2),
            "both requests should be counted as finished"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_streams_free_their_kv_blocks_within_a_step() {
    let serve = Serve::start(&["--tp", "1"]);
    let client = wait_serving(&serve.endpoint, Duration::from_secs(30)).await;
    let mut streams = Vec::new();
    for i in 0..4 {
        let mut c = client.clone();
        let mut s = c.generate_stream(long_request(i)).await.unwrap();
        for _ in 0..3 {
            s.message().await.unwrap().expect("a token");
        }
        streams.push(s);
    }
    // An HTTP stream too, dropped after its first event.
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/completions", serve.http))
        .json(&serde_json::json!({
            "model": "gpt2-tiny", "prompt": "The cluster", "max_tokens": 900,
            "ignore_eos": true, "stream": true,
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    body.next().await.unwrap().unwrap();
    assert!(metric(&serve.http, "tessera_kv_blocks_used").await > 0.0);
    const CANCELLED: &str = "tessera_requests_finished_total{reason=\"cancelled\"}";
    let before = metric(&serve.http, CANCELLED).await;
    drop(streams);
    drop(body);
    let took = wait_idle(&serve.http, Duration::from_secs(2)).await;
    assert!(took < Duration::from_millis(1000), "freed after {took:?}");
    assert_eq!(metric(&serve.http, CANCELLED).await - before, 5.0);

    // A unary HTTP request whose client hangs up.
    let gone = reqwest::Client::new()
        .post(format!("{}/v1/completions", serve.http))
        .timeout(Duration::from_millis(300))
        .json(&serde_json::json!({
            "model": "gpt2-tiny", "prompt": "The cluster", "max_tokens": 900, "ignore_eos": true,
        }))
        .send()
        .await;
    assert!(gone.is_err(), "the client gave up first");
    let took = wait_idle(&serve.http, Duration::from_secs(2)).await;
    assert!(took < Duration::from_millis(1000), "freed after {took:?}");
    assert_eq!(metric(&serve.http, CANCELLED).await - before, 6.0);

    // The cluster serves on.
    let mut c = client.clone();
    let r = c
        .generate(GenerateRequest {
            max_tokens: Some(4),
            ..long_request(9)
        })
        .await
        .unwrap();
    assert_eq!(r.token_ids.len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_is_refused_at_once() {
    let serve = Serve::start(&["--tp", "1", "--max-batch-seqs", "1", "--max-queued", "2"]);
    let client = wait_serving(&serve.endpoint, Duration::from_secs(30)).await;
    let mut c = client.clone();
    let mut running = c.generate_stream(long_request(0)).await.unwrap();
    running
        .message()
        .await
        .unwrap()
        .expect("the first request runs");
    let mut queued = Vec::new();
    for i in 1..=2 {
        queued.push(c.generate_stream(long_request(i)).await.unwrap());
    }
    let start = Instant::now();
    let e = c.generate(long_request(3)).await.unwrap_err();
    assert_eq!(e.code(), Some(Code::ResourceExhausted), "{e}");
    assert!(
        start.elapsed() < Duration::from_millis(1000),
        "refused at once"
    );
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/completions", serve.http))
        .json(&serde_json::json!({"model": "gpt2-tiny", "prompt": "x", "max_tokens": 4}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("max_queued"));
    // The gauges are published between steps.
    let start = Instant::now();
    while metric(&serve.http, "tessera_requests_waiting").await != 2.0 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the two queued requests wait"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(queued);
    drop(running);
    wait_idle(&serve.http, Duration::from_secs(2)).await;
}
