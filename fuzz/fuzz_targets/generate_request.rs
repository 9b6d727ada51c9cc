//! A client's generation request, as the coordinator meets it: the first byte picks the
//! door, the rest is the request.
//!
//! - even: a `tessera.v1.GenerateRequest` in protobuf, as the gRPC API decodes it;
//! - odd: a `POST /v1/completions` JSON body, read and converted as the HTTP API does.
//!
//! Either way the request then goes through the validation both APIs share. Errors are
//! expected; a panic is a bug, and so is an accepted request the scheduler could not serve.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use prost::Message;
use tessera_coordinator::api;
use tessera_coordinator::config::defaults;
use tessera_coordinator::fuzzing::completion_request;
use tessera_model::{ModelConfig, Tokenizer};
use tessera_proto::v1::GenerateRequest;

static MODEL: LazyLock<(ModelConfig, Tokenizer)> = LazyLock::new(|| {
    (
        ModelConfig::preset("gpt2-tiny").expect("a preset"),
        Tokenizer::gpt2(),
    )
});

fuzz_target!(|data: &[u8]| {
    let Some((&door, body)) = data.split_first() else {
        return;
    };
    let (config, tokenizer) = &*MODEL;
    let req = if door % 2 == 0 {
        match GenerateRequest::decode(body) {
            Ok(req) => req,
            Err(_) => return,
        }
    } else {
        match completion_request(body, &config.name) {
            Ok(req) => req,
            Err(_) => return,
        }
    };
    let Ok(params) = api::validate(config, tokenizer, &req) else {
        return;
    };
    // What the scheduler relies on for an accepted request.
    assert!(!params.prompt_ids.is_empty());
    assert!(params.max_new >= 1);
    assert!(params.prompt_ids.len() + params.max_new <= config.n_positions);
    assert!(params
        .prompt_ids
        .iter()
        .all(|&t| (t as usize) < config.vocab_size));
    assert!(params.temperature.is_finite() && params.temperature >= 0.0);
    assert!(params.top_k as usize <= config.vocab_size);
    assert!(params.top_p > 0.0 && params.top_p <= 1.0);
    assert!(params.repetition_penalty.is_finite() && params.repetition_penalty > 0.0);
    assert!(params.stop.len() <= defaults::MAX_STOP_STRINGS);
    assert!(params
        .stop
        .iter()
        .all(|s| !s.is_empty() && s.len() <= defaults::MAX_STOP_BYTES));
});
