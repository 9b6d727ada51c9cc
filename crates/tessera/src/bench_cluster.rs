//! `tessera bench cluster`: batch-1 decode through a running cluster, timed at the client.
//!
//! The time between consecutive streamed tokens is everything a decode step costs: the
//! coordinator's scheduling, the gRPC fan-out to every worker, the forward pass with its
//! collectives, and the token's way back. Compared with `tessera run` (the same forward
//! pass in one process) on the same model, the difference is the cluster's overhead.

use anyhow::{bail, Result};
use clap::Args;
use serde::Serialize;
use tessera_client::{Client, GenerateRequest};

/// Arguments of `tessera bench cluster`.
#[derive(Debug, Args)]
pub struct ClusterArgs {
    /// The cluster's gRPC endpoint: host:port, or https://host:port.
    #[arg(long, default_value = "127.0.0.1:50051")]
    endpoint: String,
    #[command(flatten)]
    api_key: crate::api_key_arg::ApiKeyArg,
    #[command(flatten)]
    tls: crate::tls_args::CaCertArg,
    /// Prompt tokens before decode starts.
    #[arg(long, default_value_t = 16)]
    prompt_tokens: usize,
    /// Tokens generated per round (the first, which includes the prompt, is not timed).
    #[arg(long, default_value_t = 64)]
    tokens: u32,
    /// Rounds; the median and the best are reported.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct Report {
    model: String,
    tp: u32,
    pp: u32,
    tokens_per_round: u32,
    median_ms_per_token: f64,
    best_ms_per_token: f64,
    median_decode_tokens_per_s: f64,
}

pub fn bench_cluster(args: ClusterArgs) -> Result<()> {
    if args.tokens < 2 || args.rounds == 0 || args.prompt_tokens == 0 {
        bail!("--tokens must be at least 2, --rounds and --prompt-tokens at least 1");
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let mut client =
            Client::connect_with(&args.endpoint, args.api_key.client_options(&args.tls)).await?;
        let info = client.model_info().await?;
        let prompt: Vec<u32> = (0..args.prompt_tokens as u32)
            .map(|i| (i * 7919 + 13) % info.vocab_size)
            .collect();
        let mut per_token_ms = Vec::with_capacity(args.rounds);
        for _ in 0..args.rounds + 1 {
            let req = GenerateRequest {
                prompt_ids: prompt.clone(),
                max_tokens: Some(args.tokens),
                ignore_eos: true,
                ..Default::default()
            };
            let seen = crate::bench_throughput::one_request(&mut client, req, args.tokens).await?;
            per_token_ms.push(seen.tpot.as_secs_f64() * 1e3);
        }
        // The first round warms caches and connections.
        per_token_ms.remove(0);
        per_token_ms.sort_by(f64::total_cmp);
        let median = per_token_ms[per_token_ms.len() / 2];
        let report = Report {
            model: info.name,
            tp: info.tp,
            pp: info.pp,
            tokens_per_round: args.tokens,
            median_ms_per_token: median,
            best_ms_per_token: per_token_ms[0],
            median_decode_tokens_per_s: 1e3 / median,
        };
        if args.json {
            println!("{}", serde_json::to_string(&report)?);
        } else {
            println!(
                "{} (tp={} pp={}): {:.3} ms/token median, {:.3} best, {:.1} tokens/s over {} rounds of {} tokens",
                report.model,
                report.tp,
                report.pp,
                report.median_ms_per_token,
                report.best_ms_per_token,
                report.median_decode_tokens_per_s,
                args.rounds,
                args.tokens
            );
        }
        Ok(())
    })
}
