//! `tessera bench throughput`: output tokens per second of a running cluster at several
//! numbers of concurrent clients (closed loop).
//!
//! Each of C clients streams requests back to back (a fixed prompt length, a fixed number
//! of new tokens with `ignore_eos`, a prompt of its own so that no two requests are alike);
//! the figure is the tokens generated over the wall time from the first request to the
//! last token. One client measures latency-bound decode; many measure how well continuous
//! batching turns concurrency into throughput.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;
use tessera_client::{Client, GenerateRequest};

/// Arguments of `tessera bench throughput`.
#[derive(Debug, Args)]
pub struct ThroughputArgs {
    /// The cluster's gRPC endpoint: host:port, or https://host:port.
    #[arg(long, default_value = "127.0.0.1:50051")]
    endpoint: String,
    #[command(flatten)]
    api_key: crate::api_key_arg::ApiKeyArg,
    #[command(flatten)]
    tls: crate::tls_args::CaCertArg,
    /// Concurrent clients to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,64")]
    concurrency: Vec<usize>,
    /// Prompt tokens per request.
    #[arg(long, default_value_t = 32)]
    prompt_tokens: usize,
    /// New tokens per request (generated to the end: `ignore_eos`).
    #[arg(long, default_value_t = 64)]
    tokens: u32,
    /// Requests each client sends, one after another.
    #[arg(long, default_value_t = 2)]
    requests_per_client: usize,
    /// Print one JSON object per concurrency instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct Point {
    model: String,
    tp: u32,
    pp: u32,
    concurrency: usize,
    requests: usize,
    prompt_tokens: usize,
    output_tokens_per_request: u32,
    duration_s: f64,
    output_tokens_per_s: f64,
    requests_per_s: f64,
    mean_ttft_ms: f64,
    mean_tpot_ms: f64,
}

/// What one request saw: time to its first token and mean time per later token.
pub struct Seen {
    pub ttft: Duration,
    pub tpot: Duration,
}

/// Streams one request that must give exactly `tokens` tokens, timed at the client.
pub async fn one_request(client: &mut Client, req: GenerateRequest, tokens: u32) -> Result<Seen> {
    let start = Instant::now();
    let mut stream = client.generate_stream(req).await?;
    let mut first = None;
    let mut last = start;
    let mut n = 0u32;
    while let Some(m) = stream.message().await? {
        last = Instant::now();
        first.get_or_insert(last);
        n += m.token_ids.len() as u32;
    }
    if n != tokens {
        bail!("asked for {tokens} tokens, got {n}");
    }
    let first = first.context("no token came back")?;
    Ok(Seen {
        ttft: first - start,
        tpot: (last - first) / (n - 1).max(1),
    })
}

pub fn bench_throughput(args: ThroughputArgs) -> Result<()> {
    if args.tokens < 2 || args.prompt_tokens == 0 || args.requests_per_client == 0 {
        bail!("--tokens must be at least 2, --prompt-tokens and --requests-per-client at least 1");
    }
    if args.concurrency.contains(&0) {
        bail!("--concurrency values must be at least 1");
    }
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let mut client =
            Client::connect_with(&args.endpoint, args.api_key.client_options(&args.tls)).await?;
        let info = client.model_info().await?;
        let vocab = info.vocab_size;
        let request = |client: usize, k: usize| GenerateRequest {
            prompt_ids: (0..args.prompt_tokens)
                .map(|i| ((client * 7919 + k * 104_729 + i * 31 + 11) as u32) % vocab)
                .collect(),
            max_tokens: Some(args.tokens),
            ignore_eos: true,
            ..Default::default()
        };
        // Warm-up: connections, caches, the workers' first steps.
        let warm_up = args.concurrency.iter().max().copied().unwrap_or(1);
        one_request(&mut client, request(warm_up, 0), args.tokens).await?;
        if !args.json {
            println!(
                "{} (tp={} pp={}): {} prompt tokens, {} new tokens, {} requests per client",
                info.name,
                info.tp,
                info.pp,
                args.prompt_tokens,
                args.tokens,
                args.requests_per_client
            );
            println!(
                "{:>11} {:>9} {:>14} {:>10} {:>10} {:>10}",
                "concurrency", "requests", "output tok/s", "req/s", "TTFT ms", "TPOT ms"
            );
        }
        for &c in &args.concurrency {
            let start = Instant::now();
            let tasks: Vec<_> = (0..c)
                .map(|i| {
                    let mut client = client.clone();
                    let reqs: Vec<GenerateRequest> = (0..args.requests_per_client)
                        .map(|k| request(i, k))
                        .collect();
                    let tokens = args.tokens;
                    tokio::spawn(async move {
                        let mut seen = Vec::new();
                        for r in reqs {
                            seen.push(one_request(&mut client, r, tokens).await?);
                        }
                        anyhow::Ok(seen)
                    })
                })
                .collect();
            let mut seen = Vec::new();
            for t in tasks {
                seen.extend(t.await??);
            }
            let duration = start.elapsed().as_secs_f64();
            let n = seen.len();
            let mean = |f: &dyn Fn(&Seen) -> Duration| {
                seen.iter().map(|s| f(s).as_secs_f64()).sum::<f64>() * 1e3 / n as f64
            };
            let point = Point {
                model: info.name.clone(),
                tp: info.tp,
                pp: info.pp,
                concurrency: c,
                requests: n,
                prompt_tokens: args.prompt_tokens,
                output_tokens_per_request: args.tokens,
                duration_s: duration,
                output_tokens_per_s: (n as f64 * f64::from(args.tokens)) / duration,
                requests_per_s: n as f64 / duration,
                mean_ttft_ms: mean(&|s| s.ttft),
                mean_tpot_ms: mean(&|s| s.tpot),
            };
            if args.json {
                println!("{}", serde_json::to_string(&point)?);
            } else {
                println!(
                    "{:>11} {:>9} {:>14.1} {:>10.2} {:>10.1} {:>10.2}",
                    c,
                    n,
                    point.output_tokens_per_s,
                    point.requests_per_s,
                    point.mean_ttft_ms,
                    point.mean_tpot_ms
                );
            }
        }
        Ok(())
    })
}
