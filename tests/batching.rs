//! Continuous batching changes no request's tokens: 64 concurrent requests of mixed prompt
//! and output lengths (prefills chunked under a small token budget, decodes of every length
//! in one step) give exactly the tokens each gives alone, and the same log-probabilities
//! to the bit, at TP=1 and TP=2; and a KV cache
//! too small for the load preempts sequences, recomputes them, and still gives the same
//! tokens. Afterwards no sequence runs and no KV block is held.

mod cluster_common;
mod common;

use std::time::Duration;

use cluster_common::{metric, wait_idle, wait_serving, Serve};
use common::fixture;
use tessera_client::{Client, GenerateRequest};

const MODEL: &str = "tiny-gpt2";

/// Request `i` of a mixed load: prompts of 1–40 tokens, 1–30 new tokens within the
/// fixture's 64-token context, one in three sampled with its own seed.
fn request(i: u32) -> GenerateRequest {
    let prompt_len = 1 + (i * 7) % 40;
    let room = (63 - prompt_len).min(30);
    let sampled = i % 3 == 1;
    GenerateRequest {
        prompt_ids: (0..prompt_len)
            .map(|j| (i * 31 + j * 17 + 3) % 999)
            .collect(),
        max_tokens: Some(1 + (i * 13) % room),
        ignore_eos: true,
        temperature: sampled.then_some(0.8),
        top_k: sampled.then_some(50),
        seed: Some(u64::from(i)),
        logprobs: true,
        ..Default::default()
    }
}

/// A completion's tokens and the bits of their log-probabilities: equal only when every
/// logit was computed bit for bit the same.
type Output = (Vec<u32>, Vec<u32>);

fn output(token_ids: Vec<u32>, logprobs: &[f32]) -> Output {
    (token_ids, logprobs.iter().map(|p| p.to_bits()).collect())
}

/// Each request alone, one after another.
async fn alone(client: &mut Client, requests: &[GenerateRequest]) -> Vec<Output> {
    let mut out = Vec::new();
    for r in requests {
        let g = client.generate(r.clone()).await.unwrap();
        out.push(output(g.token_ids, &g.logprobs));
    }
    out
}

/// Every request at once, half of them streamed.
async fn together(endpoint: &str, requests: &[GenerateRequest]) -> Vec<Output> {
    let client = Client::connect(endpoint).await.unwrap();
    let tasks: Vec<_> = requests
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let (mut c, r) = (client.clone(), r.clone());
            tokio::spawn(async move {
                let g = if i % 2 == 0 {
                    c.generate(r).await.unwrap()
                } else {
                    let stream = c.generate_stream(r).await.unwrap();
                    stream.collect_response().await.unwrap()
                };
                output(g.token_ids, &g.logprobs)
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

async fn sixty_four_concurrent_requests_equal_each_alone(tp: &str) {
    let model = fixture(MODEL).display().to_string();
    // A small token budget: prompts are chunked and share steps with decodes.
    let serve = Serve::start(&["--model", &model, "--tp", tp, "--max-batch-tokens", "48"]);
    let mut client = wait_serving(&serve.endpoint, Duration::from_secs(30)).await;
    let requests: Vec<GenerateRequest> = (0..64).map(request).collect();
    let want = alone(&mut client, &requests).await;
    for (r, w) in requests.iter().zip(&want) {
        assert_eq!(w.0.len(), r.max_tokens.unwrap() as usize);
        assert_eq!(w.1.len(), w.0.len(), "a log-probability per token");
    }

    let steps_before = metric(&serve.http, "tessera_steps_total").await;
    let got = together(&serve.endpoint, &requests).await;
    let steps = metric(&serve.http, "tessera_steps_total").await - steps_before;
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(
            g.0, w.0,
            "tp={tp}: request {i} ({:?}): tokens differ from alone",
            requests[i]
        );
        assert_eq!(
            g.1, w.1,
            "tp={tp}: request {i}: log-probabilities differ from alone"
        );
    }
    let tokens: usize = want.iter().map(|w| w.0.len()).sum();
    assert!(
        (steps as usize) < tokens / 2,
        "tp={tp}: {steps} steps for {tokens} tokens: the requests were not batched"
    );
    wait_idle(&serve.http, Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_concurrent_requests_equal_each_alone_tp1() {
    sixty_four_concurrent_requests_equal_each_alone("1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_concurrent_requests_equal_each_alone_tp2() {
    sixty_four_concurrent_requests_equal_each_alone("2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tiny_kv_cache_preempts_and_still_gives_the_same_tokens() {
    let model = fixture(MODEL).display().to_string();
    // tiny-gpt2 on one worker: 6 layers × 12 heads × 8 dims, K and V in f32, 4-token
    // blocks: 18432 bytes a block. 20 blocks hold 80 tokens; each request below grows to
    // 45–53 tokens (12–14 blocks), so at most one runs to its end at a time.
    let block_bytes = 2 * 6 * 12 * 8 * 4 * 4;
    let bytes = (20 * block_bytes).to_string();
    let serve = Serve::start(&[
        "--model",
        &model,
        "--tp",
        "1",
        "--kv-block-tokens",
        "4",
        "--kv-cache-bytes",
        &bytes,
    ]);
    let mut client = wait_serving(&serve.endpoint, Duration::from_secs(30)).await;
    let info = client.model_info().await.unwrap();
    assert_eq!((info.kv_blocks, info.kv_block_tokens), (20, 4));
    let requests: Vec<GenerateRequest> = (0..12u32)
        .map(|i| GenerateRequest {
            max_tokens: Some(30),
            prompt_ids: (0..16 + i % 9).map(|j| (i * 53 + j * 11) % 999).collect(),
            ..request(i)
        })
        .collect();
    let want = alone(&mut client, &requests).await;
    let preempted_before = metric(&serve.http, "tessera_preemptions_total").await;
    let got = together(&serve.endpoint, &requests).await;
    let preemptions = metric(&serve.http, "tessera_preemptions_total").await - preempted_before;
    assert!(preemptions > 0.0, "the load must outgrow the cache");
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(
            g.0, w.0,
            "request {i}: tokens differ from alone after preemption"
        );
        assert_eq!(
            g.1, w.1,
            "request {i}: log-probabilities differ after preemption"
        );
    }
    wait_idle(&serve.http, Duration::from_secs(2)).await;
}
