//! Protocol messages to runtime types and back. Every value is checked on the way in, so
//! nothing the coordinator sends can make the runtime allocate absurdly or overflow.

use tessera_model::ModelConfig;
use tessera_proto::worker::v1 as pb;
use tessera_runtime::{SampleSpec, SamplingParams, SeqStep, StepOutput, StepRequest};

use crate::error::WorkerError;

/// Longest model name accepted.
const MAX_NAME_BYTES: usize = 256;

/// A proto `ModelConfig` as the model crate's, checked by [`ModelConfig::validate`] (which
/// bounds every dimension, so nothing derived from them can overflow). `field` prefixes the
/// names in errors.
pub fn model_config(c: &pb::ModelConfig, field: &str) -> Result<ModelConfig, WorkerError> {
    if c.name.len() > MAX_NAME_BYTES {
        return Err(WorkerError::invalid(
            format!("{field}.name"),
            format!("{} bytes; at most {MAX_NAME_BYTES}", c.name.len()),
        ));
    }
    let config = ModelConfig {
        name: c.name.clone(),
        vocab_size: c.vocab_size as usize,
        n_positions: c.n_positions as usize,
        n_embd: c.n_embd as usize,
        n_layer: c.n_layer as usize,
        n_head: c.n_head as usize,
        n_inner: c.n_inner as usize,
        layer_norm_epsilon: c.layer_norm_epsilon,
        eos_token_id: c.eos_token_id,
    };
    config.validate().map_err(|e| match e {
        tessera_model::ModelError::InvalidConfig {
            field: name,
            value,
            reason,
        } => WorkerError::invalid(format!("{field}.{name}"), format!("{value}: {reason}")),
        other => WorkerError::invalid(field, other.to_string()),
    })?;
    Ok(config)
}

/// A proto step as the runtime's. `max_tokens` bounds the new tokens of the whole step
/// (the worker passes its KV capacity: a step cannot write more tokens than the cache
/// holds), which bounds the activations the step allocates. The model-dependent checks
/// (token ids, context, block tables, sampling parameters) are the runtime's, in
/// [`StepRequest::validate`].
pub fn step_request(req: pb::StepRequest, max_tokens: usize) -> Result<StepRequest, WorkerError> {
    let total: usize = req.seqs.iter().map(|s| s.tokens.len()).sum();
    if total > max_tokens {
        return Err(WorkerError::invalid(
            "seqs",
            format!("the step has {total} new tokens; the KV cache holds {max_tokens}"),
        ));
    }
    let seqs = req
        .seqs
        .into_iter()
        .map(|s| {
            if u64::from(s.start_pos) + s.tokens.len() as u64 > u64::from(u32::MAX) {
                return Err(WorkerError::invalid(
                    "start_pos",
                    format!(
                        "sequence {}: {} + {} new tokens passes 2^32 positions",
                        s.seq_id,
                        s.start_pos,
                        s.tokens.len()
                    ),
                ));
            }
            Ok(SeqStep {
                seq_id: s.seq_id,
                tokens: s.tokens,
                start_pos: s.start_pos as usize,
                block_table: s.block_table,
                sample: s.sample.map(sample_spec),
            })
        })
        .collect::<Result<_, _>>()?;
    Ok(StepRequest { seqs })
}

/// Sampling values pass through as sent; the runtime names any that is out of range.
fn sample_spec(s: pb::SampleSpec) -> SampleSpec {
    SampleSpec {
        params: SamplingParams {
            temperature: s.temperature,
            top_k: s.top_k,
            top_p: s.top_p,
            seed: s.seed,
            repetition_penalty: s.repetition_penalty,
        },
        penalty_ids: s.penalty_ids,
        return_logits: s.return_logits,
    }
}

/// A runtime step's outcome on this worker as the proto response: results only where the
/// shard reported them (last stage, TP rank 0).
pub fn step_response(output: Option<StepOutput>, compute_us: u64) -> pb::StepResponse {
    let reports = output.is_some();
    let results = output
        .map(|o| o.results)
        .unwrap_or_default()
        .into_iter()
        .map(|r| pb::SeqResult {
            seq_id: r.seq_id,
            token_id: r.token_id,
            logprob: r.logprob,
            logits: r.logits.unwrap_or_default(),
        })
        .collect();
    pb::StepResponse {
        results,
        reports,
        compute_us,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> ModelConfig {
        ModelConfig::preset("gpt2-tiny").unwrap()
    }

    #[test]
    fn model_config_round_trips() {
        let c = tiny();
        assert_eq!(
            model_config(&pb::ModelConfig::from(&c), "model.config").unwrap(),
            c
        );
    }

    #[test]
    fn zero_and_huge_dimensions_name_the_field() {
        let mut p = pb::ModelConfig::from(&tiny());
        p.n_embd = 0;
        let e = model_config(&p, "model.config").unwrap_err().to_string();
        assert!(e.contains("model.config.n_embd"), "{e}");
        let mut p = pb::ModelConfig::from(&tiny());
        p.vocab_size = u32::MAX;
        let e = model_config(&p, "model.config").unwrap_err().to_string();
        assert!(e.contains("model.config.vocab_size"), "{e}");
    }

    #[test]
    fn validate_failures_name_the_field() {
        let mut p = pb::ModelConfig::from(&tiny());
        p.n_head = 7;
        let e = model_config(&p, "model.config").unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.to_string().contains("model.config.n_head"), "{e}");
        let mut p = pb::ModelConfig::from(&tiny());
        p.layer_norm_epsilon = f32::NAN;
        let e = model_config(&p, "model.config").unwrap_err().to_string();
        assert!(e.contains("layer_norm_epsilon"), "{e}");
    }

    fn seq(tokens: Vec<u32>, start_pos: u32) -> pb::SeqStep {
        pb::SeqStep {
            seq_id: 3,
            tokens,
            start_pos,
            block_table: vec![0, 1],
            sample: Some(pb::SampleSpec {
                temperature: 0.0,
                top_k: 0,
                top_p: 1.0,
                seed: 9,
                repetition_penalty: 1.0,
                penalty_ids: vec![],
                return_logits: true,
            }),
        }
    }

    #[test]
    fn step_request_keeps_every_field() {
        let req = pb::StepRequest {
            generation: 7,
            step_id: 1,
            seqs: vec![seq(vec![5, 6], 4)],
        };
        let r = step_request(req, 100).unwrap();
        let s = &r.seqs[0];
        assert_eq!((s.seq_id, s.start_pos), (3, 4));
        assert_eq!(s.tokens, vec![5, 6]);
        assert_eq!(s.block_table, vec![0, 1]);
        let sample = s.sample.as_ref().unwrap();
        assert_eq!(sample.params.seed, 9);
        assert!(sample.return_logits);
    }

    #[test]
    fn absurd_steps_are_refused() {
        let overflow = pb::StepRequest {
            generation: 7,
            step_id: 1,
            seqs: vec![seq(vec![1, 2], u32::MAX)],
        };
        let e = step_request(overflow, 100).unwrap_err().to_string();
        assert!(e.contains("start_pos"), "{e}");
        let too_many = pb::StepRequest {
            generation: 7,
            step_id: 1,
            seqs: vec![seq(vec![1; 60], 0), seq(vec![1; 60], 0)],
        };
        let e = step_request(too_many, 100).unwrap_err().to_string();
        assert!(e.contains("120 new tokens"), "{e}");
    }

    #[test]
    fn only_the_reporting_worker_reports() {
        let out = StepOutput {
            results: vec![tessera_runtime::SeqResult {
                seq_id: 1,
                token_id: 42,
                logprob: -0.5,
                logits: None,
            }],
        };
        let r = step_response(Some(out), 17);
        assert!(r.reports);
        assert_eq!(r.results[0].token_id, 42);
        assert_eq!(r.compute_us, 17);
        let r = step_response(None, 5);
        assert!(!r.reports && r.results.is_empty());
    }
}
