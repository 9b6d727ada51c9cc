//! `tessera run`: all shards in one process, one prompt, text or JSON out.

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;
use tessera_model::{ShardPlan, Tokenizer};
use tessera_runtime::{GenerateRequest, LocalEngine, SamplingParams, ShardOptions, WeightDtype};

use crate::source::{cpu_backends, init_threads, ModelArgs};

/// Arguments of `tessera run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Tensor-parallel degree: must divide the attention heads and the MLP size.
    #[arg(long, default_value_t = 1)]
    pub tp: usize,
    /// Pipeline stages: at most the number of layers.
    #[arg(long, default_value_t = 1)]
    pub pp: usize,
    /// Prompt text, tokenized with the checkpoint's tokenizer.json, else the GPT-2 BPE.
    #[arg(
        long,
        conflicts_with = "prompt_ids",
        required_unless_present = "prompt_ids"
    )]
    pub prompt: Option<String>,
    /// Prompt as comma-separated token ids.
    #[arg(long, value_delimiter = ',', value_name = "IDS")]
    pub prompt_ids: Option<Vec<u32>>,
    /// New tokens to generate at most.
    #[arg(long, default_value_t = 32)]
    pub max_tokens: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Keep generating past the end-of-text token.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Storage dtype of the weights: f32 or bf16 (compute is f32).
    #[arg(long, default_value = "f32")]
    pub dtype: WeightDtype,
    /// Kernel threads in all, split evenly over the tp × pp shards (default: every core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Tokens per KV-cache block.
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// Print one JSON object on the last line of stdout instead of the text.
    #[arg(long)]
    pub json: bool,
}

/// Sampling flags; the defaults are greedy decoding.
#[derive(Debug, Clone, Args)]
pub struct SamplingArgs {
    /// Softmax temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Sample among the k most likely tokens; 0 disables.
    #[arg(long, default_value_t = 0)]
    pub top_k: u32,
    /// Sample from the smallest set of tokens whose probability reaches p; 1 disables.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Sampler seed: the same seed gives the same tokens at every split (random if absent).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Penalise tokens already in the sequence (1 disables; 1.1–1.3 is typical).
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
}

impl SamplingArgs {
    pub fn params(&self) -> SamplingParams {
        let seed = self.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
        });
        SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            seed,
            repetition_penalty: self.repetition_penalty,
        }
    }
}

#[derive(Serialize)]
struct RunReport<'a> {
    prompt_ids: &'a [u32],
    token_ids: &'a [u32],
    text: String,
    logprobs: &'a [f32],
    finish_reason: tessera_runtime::FinishReason,
    prefill_ms: f64,
    decode_ms: f64,
    decode_tokens_per_s: f64,
}

pub fn run(args: RunArgs) -> Result<()> {
    let threads = init_threads(args.threads)?;
    let (config, source) = args.model.open()?;
    let tokenizer = match &args.model.model {
        Some(dir) => Tokenizer::for_checkpoint(dir)?,
        None => Tokenizer::gpt2(),
    };
    let prompt_ids = match (&args.prompt, &args.prompt_ids) {
        (Some(text), _) => tokenizer.encode(text)?,
        (None, Some(ids)) => ids.clone(),
        (None, None) => bail!("give --prompt TEXT or --prompt-ids 1,2,3"),
    };
    if prompt_ids.is_empty() {
        bail!("the prompt is empty");
    }
    if let Some(&bad) = prompt_ids
        .iter()
        .find(|&&t| t as usize >= config.vocab_size)
    {
        bail!(
            "prompt token id {bad} is not below the vocabulary size {} of {}",
            config.vocab_size,
            config.name
        );
    }
    if prompt_ids.len() >= config.n_positions {
        bail!(
            "the prompt has {} tokens; the context of {} is {} tokens",
            prompt_ids.len(),
            config.name,
            config.n_positions
        );
    }
    let plan = ShardPlan::new(&config, args.tp, args.pp)?;
    if args.block_size == 0 {
        bail!("--block-size must be at least 1");
    }
    let options = ShardOptions {
        dtype: args.dtype,
        kv_blocks: config.n_positions.div_ceil(args.block_size),
        block_size: args.block_size,
    };
    let engine = LocalEngine::start(
        cpu_backends(threads, args.tp * args.pp),
        &config,
        plan,
        source,
        options,
    )
    .context("cannot load the model")?;
    let req = GenerateRequest {
        prompt_ids: prompt_ids.clone(),
        max_tokens: args.max_tokens,
        params: args.sampling.params(),
        ignore_eos: args.ignore_eos,
        return_logits: false,
    };
    let g = engine.generate(&req)?;
    let text = tokenizer.decode(&g.token_ids)?;
    if args.json {
        let report = RunReport {
            prompt_ids: &prompt_ids,
            token_ids: &g.token_ids,
            text,
            logprobs: &g.logprobs,
            finish_reason: g.finish_reason,
            prefill_ms: g.prefill_ms,
            decode_ms: g.decode_ms,
            decode_tokens_per_s: g.decode_tokens_per_s(),
        };
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("{}{}", tokenizer.decode(&prompt_ids)?, text);
        eprintln!(
            "{} tokens, prefill {:.1} ms, decode {:.1} tokens/s ({}, tp={} pp={}, {})",
            g.token_ids.len(),
            g.prefill_ms,
            g.decode_tokens_per_s(),
            config.name,
            args.tp,
            args.pp,
            args.dtype
        );
    }
    Ok(())
}
