//! Generating one sequence on a [`LocalEngine`]: prefill, then decode until a stop.

use std::collections::BTreeSet;
use std::time::Instant;

use serde::Serialize;

use crate::engine::LocalEngine;
use crate::error::{Result, RuntimeError};
use crate::step::{SampleSpec, SamplingParams, SeqStep, StepRequest};

/// One generation request.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    /// The prompt, at least one token.
    pub prompt_ids: Vec<u32>,
    /// New tokens to generate at most; fewer when the context fills or EOS comes.
    pub max_tokens: usize,
    /// How to pick tokens.
    pub params: SamplingParams,
    /// Keep going past the end-of-text token.
    pub ignore_eos: bool,
    /// Return the full logits row of every step (tests, debugging).
    pub return_logits: bool,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// `max_tokens` were generated or the context is full.
    Length,
    /// The model produced the end-of-text token.
    Stop,
}

/// The result of a generation.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// Generated tokens only.
    pub token_ids: Vec<u32>,
    /// Log-probability of each generated token.
    pub logprobs: Vec<f32>,
    /// Full logits of each step, when asked for.
    pub logits: Vec<Vec<f32>>,
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// Wall time of the prompt step (which also samples the first token).
    pub prefill_ms: f64,
    /// Wall time of all later steps.
    pub decode_ms: f64,
}

impl Generation {
    /// Decode throughput: tokens after the first per second of decode time.
    pub fn decode_tokens_per_s(&self) -> f64 {
        let n = self.token_ids.len().saturating_sub(1);
        if n == 0 || self.decode_ms <= 0.0 {
            0.0
        } else {
            n as f64 / (self.decode_ms / 1e3)
        }
    }
}

impl LocalEngine {
    /// Generates up to `max_tokens` after the prompt, one sequence at a time.
    pub fn generate(&self, req: &GenerateRequest) -> Result<Generation> {
        let config = self.config();
        let context = config.n_positions;
        if req.prompt_ids.is_empty() {
            return Err(RuntimeError::invalid("prompt", "the prompt is empty"));
        }
        if req.prompt_ids.len() >= context {
            return Err(RuntimeError::invalid(
                "prompt",
                format!(
                    "the prompt has {} tokens; the context of {} leaves room for none",
                    req.prompt_ids.len(),
                    context
                ),
            ));
        }
        if let Some(&bad) = req
            .prompt_ids
            .iter()
            .find(|&&t| t as usize >= config.vocab_size)
        {
            return Err(RuntimeError::invalid(
                "prompt",
                format!(
                    "token id {bad} is not below the vocabulary size {}",
                    config.vocab_size
                ),
            ));
        }
        req.params.validate(config.vocab_size)?;
        let max_new = req.max_tokens.min(context - req.prompt_ids.len());
        if max_new == 0 {
            return Ok(Generation {
                token_ids: vec![],
                logprobs: vec![],
                logits: vec![],
                finish_reason: FinishReason::Length,
                prefill_ms: 0.0,
                decode_ms: 0.0,
            });
        }
        let kv = self.options();
        // The last generated token is never fed back, so it needs no slot.
        let slots = req.prompt_ids.len() + max_new - 1;
        let blocks = slots.div_ceil(kv.block_size);
        if blocks > kv.kv_blocks {
            return Err(RuntimeError::KvExhausted {
                reason: format!(
                    "{slots} tokens need {blocks} blocks of {}; the cache has {}",
                    kv.block_size, kv.kv_blocks
                ),
            });
        }
        let block_table: Vec<u32> = (0..blocks as u32).collect();
        let mut seen: BTreeSet<u32> = BTreeSet::new();
        let penalise = req.params.repetition_penalty != 1.0;
        if penalise {
            seen.extend(&req.prompt_ids);
        }

        let mut out = Generation {
            token_ids: Vec::with_capacity(max_new),
            logprobs: Vec::with_capacity(max_new),
            logits: Vec::new(),
            finish_reason: FinishReason::Length,
            prefill_ms: 0.0,
            decode_ms: 0.0,
        };
        let mut tokens = req.prompt_ids.clone();
        let mut start_pos = 0;
        let decode_start = Instant::now();
        let mut prefill_end = decode_start;
        while out.token_ids.len() < max_new {
            let step = StepRequest {
                seqs: vec![SeqStep {
                    seq_id: 0,
                    tokens: tokens.clone(),
                    start_pos,
                    block_table: block_table.clone(),
                    sample: Some(SampleSpec {
                        params: req.params,
                        penalty_ids: if penalise {
                            seen.iter().copied().collect()
                        } else {
                            Vec::new()
                        },
                        return_logits: req.return_logits,
                    }),
                }],
            };
            let result = self
                .step(step)?
                .results
                .pop()
                .ok_or_else(|| RuntimeError::Backend("a step returned no token".into()))?;
            if out.token_ids.is_empty() {
                prefill_end = Instant::now();
                out.prefill_ms = (prefill_end - decode_start).as_secs_f64() * 1e3;
            }
            start_pos += tokens.len();
            out.token_ids.push(result.token_id);
            out.logprobs.push(result.logprob);
            if let Some(l) = result.logits {
                out.logits.push(l);
            }
            if penalise {
                seen.insert(result.token_id);
            }
            if result.token_id == config.eos_token_id && !req.ignore_eos {
                out.finish_reason = FinishReason::Stop;
                break;
            }
            tokens = vec![result.token_id];
        }
        out.decode_ms = prefill_end.elapsed().as_secs_f64() * 1e3;
        Ok(out)
    }
}
