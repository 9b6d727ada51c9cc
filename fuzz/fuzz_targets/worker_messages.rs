//! The coordinator's messages as a worker meets them: the first byte picks the message,
//! the rest is its protobuf encoding.
//!
//! - even: an `AssignRequest`, checked as a CPU worker checks it; an accepted assignment
//!   must then accept the smallest step (one token at position 0 in block 0);
//! - odd: a `StepRequest` for a fixed assignment (gpt2-tiny, TP 2 × PP 2, the last
//!   stage's rank 1, 64 blocks of 16 tokens), converted and checked as the shard checks
//!   it before touching any state.
//!
//! Errors are expected; a panic, an overflow or an absurd allocation is a bug.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use prost::Message;
use tessera_model::ModelConfig;
use tessera_proto::worker::v1 as pb;
use tessera_worker::fuzzing::{assign, Assigned};

fn tiny_assignment() -> pb::AssignRequest {
    let config = ModelConfig::preset("gpt2-tiny").expect("a preset");
    pb::AssignRequest {
        generation: 1,
        model: Some(pb::ModelSpec {
            config: Some((&config).into()),
            weights: Some(pb::model_spec::Weights::SyntheticSeed(7)),
            dtype: "f32".into(),
        }),
        tp: 2,
        pp: 2,
        stage: 1,
        tp_rank: 1,
        kv_blocks: 64,
        kv_block_tokens: 16,
    }
}

static ASSIGNED: LazyLock<Assigned> =
    LazyLock::new(|| assign(&tiny_assignment()).expect("the fixed assignment is valid"));

fn smallest_step(eos: u32) -> pb::StepRequest {
    pb::StepRequest {
        generation: 1,
        step_id: 1,
        seqs: vec![pb::SeqStep {
            seq_id: 0,
            tokens: vec![eos],
            start_pos: 0,
            block_table: vec![0],
            sample: Some(pb::SampleSpec {
                top_p: 1.0,
                repetition_penalty: 1.0,
                ..Default::default()
            }),
        }],
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&kind, body)) = data.split_first() else {
        return;
    };
    if kind % 2 == 0 {
        let Ok(req) = pb::AssignRequest::decode(body) else {
            return;
        };
        let Ok(assigned) = assign(&req) else {
            return;
        };
        let eos = req
            .model
            .and_then(|m| m.config)
            .map(|c| c.eos_token_id)
            .expect("an accepted assignment has a model config");
        if let Err(e) = assigned.step(smallest_step(eos)) {
            panic!("an accepted assignment refuses the smallest step: {e}");
        }
    } else {
        let Ok(req) = pb::StepRequest::decode(body) else {
            return;
        };
        let sent: usize = req.seqs.iter().map(|s| s.tokens.len()).sum();
        if let Ok(step) = ASSIGNED.step(req) {
            assert_eq!(step.num_tokens(), sent);
        }
    }
});
