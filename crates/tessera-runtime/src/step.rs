//! What one step asks of the workers and what it gives back.
//!
//! The coordinator sends the same `StepRequest` to every worker (stage 0 embeds its tokens,
//! later stages receive activations); the last stage answers with one sampled token per
//! sequence that asked for one.

use serde::{Deserialize, Serialize};
use tessera_model::ModelConfig;

use crate::backend::KvSpec;
use crate::error::{Result, RuntimeError};

/// How to pick the next token. The defaults are greedy decoding.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// Softmax temperature; 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 keeps all.
    pub top_k: u32,
    /// Keep the smallest set of most likely tokens whose mass reaches `top_p`; 1 keeps all.
    pub top_p: f32,
    /// Seed of the sampler. With the same seed a request gives the same tokens at every
    /// split and in every batch: the noise of token `i` at position `p` depends only on
    /// `(seed, p, i)`.
    pub seed: u64,
    /// Logits of tokens already in the sequence are divided (if positive) or multiplied
    /// (if negative) by this; 1 disables it.
    pub repetition_penalty: f32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            repetition_penalty: 1.0,
        }
    }
}

impl SamplingParams {
    /// Checks every field; the error names the field and the accepted range.
    pub fn validate(&self, vocab_size: usize) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(RuntimeError::invalid(
                "temperature",
                format!("{} is not a number ≥ 0", self.temperature),
            ));
        }
        if self.top_k as usize > vocab_size {
            return Err(RuntimeError::invalid(
                "top_k",
                format!("{} exceeds the vocabulary of {vocab_size}", self.top_k),
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(RuntimeError::invalid(
                "top_p",
                format!("{} is not in (0, 1]", self.top_p),
            ));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return Err(RuntimeError::invalid(
                "repetition_penalty",
                format!("{} is not a number > 0", self.repetition_penalty),
            ));
        }
        Ok(())
    }

    /// Whether any randomness is involved.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == 1
    }
}

/// Sampling for one sequence at the end of a step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampleSpec {
    /// The sampling parameters of the request.
    pub params: SamplingParams,
    /// Distinct token ids in the sequence so far, for the repetition penalty (empty when
    /// the penalty is 1).
    pub penalty_ids: Vec<u32>,
    /// Also return the full logits row (gathered from every TP rank; tests and debugging).
    pub return_logits: bool,
}

/// One sequence's part of a step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeqStep {
    /// The coordinator's id of the sequence.
    pub seq_id: u64,
    /// The new tokens: a prompt (or a chunk of it) on prefill, the last token on decode.
    pub tokens: Vec<u32>,
    /// Tokens of this sequence already in the KV cache.
    pub start_pos: usize,
    /// KV block of each `block_size` positions.
    pub block_table: Vec<u32>,
    /// Sample a token after the last new one; `None` for a prefill chunk that is not last.
    pub sample: Option<SampleSpec>,
}

/// One forward step over a batch of sequences.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct StepRequest {
    /// Sequences in the batch, each with at least one new token.
    pub seqs: Vec<SeqStep>,
}

/// The sampled token of one sequence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeqResult {
    /// The sequence it belongs to.
    pub seq_id: u64,
    /// The sampled token.
    pub token_id: u32,
    /// Log-probability of the token under the model's unprocessed distribution.
    pub logprob: f32,
    /// The full logits row, when the request asked for it.
    pub logits: Option<Vec<f32>>,
}

/// What the last stage returns for a step.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct StepOutput {
    /// One result per sequence that asked to sample, in request order.
    pub results: Vec<SeqResult>,
}

impl StepRequest {
    /// Total new tokens in the step.
    pub fn num_tokens(&self) -> usize {
        self.seqs.iter().map(|s| s.tokens.len()).sum()
    }

    /// Checks the request against the model and the KV cache; every worker calls it
    /// before touching any state, so a bad request changes nothing.
    pub fn validate(&self, config: &ModelConfig, kv: &KvSpec) -> Result<()> {
        if self.seqs.is_empty() {
            return Err(RuntimeError::invalid(
                "seqs",
                "a step needs at least one sequence",
            ));
        }
        for s in &self.seqs {
            if s.tokens.is_empty() {
                return Err(RuntimeError::invalid(
                    "tokens",
                    format!("sequence {} has no new tokens", s.seq_id),
                ));
            }
            if let Some(&bad) = s.tokens.iter().find(|&&t| t as usize >= config.vocab_size) {
                return Err(RuntimeError::invalid(
                    "tokens",
                    format!(
                        "token id {bad} is not below the vocabulary size {}",
                        config.vocab_size
                    ),
                ));
            }
            let end = s.start_pos + s.tokens.len();
            if end > config.n_positions {
                return Err(RuntimeError::invalid(
                    "tokens",
                    format!(
                        "sequence {} would reach {end} tokens; the context is {}",
                        s.seq_id, config.n_positions
                    ),
                ));
            }
            let needed = end.div_ceil(kv.block_size);
            if s.block_table.len() < needed {
                return Err(RuntimeError::invalid(
                    "block_table",
                    format!(
                        "sequence {} needs {needed} blocks for {end} tokens, got {}",
                        s.seq_id,
                        s.block_table.len()
                    ),
                ));
            }
            if let Some(&bad) = s.block_table.iter().find(|&&b| b as usize >= kv.num_blocks) {
                return Err(RuntimeError::invalid(
                    "block_table",
                    format!("block {bad} of {} blocks", kv.num_blocks),
                ));
            }
            if let Some(sample) = &s.sample {
                sample.params.validate(config.vocab_size)?;
                if let Some(&bad) = sample
                    .penalty_ids
                    .iter()
                    .find(|&&t| t as usize >= config.vocab_size)
                {
                    return Err(RuntimeError::invalid(
                        "penalty_ids",
                        format!("token id {bad} is out of range"),
                    ));
                }
            }
        }
        Ok(())
    }
}
