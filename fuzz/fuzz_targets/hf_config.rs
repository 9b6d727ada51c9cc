//! A checkpoint's `config.json`, as the coordinator and `tessera model` read it before any
//! weight: parsed and validated, then what is derived from it: parameter counts, KV bytes
//! per token, the tensor list, the shard plans of small splits and each worker's share, and
//! the message that carries it to the workers. Errors are expected; a panic, an overflow
//! or an allocation out of proportion to the file is a bug.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_model::{expected_tensors, ModelConfig, ShardPlan};
use tessera_proto::worker::v1 as pb;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = ModelConfig::from_hf_json("fuzz", text) else {
        return;
    };
    let params = config.param_count();
    let _ = config.kv_bytes_per_token(4);
    assert_eq!(
        expected_tensors(&config).len(),
        4 + 12 * config.n_layer,
        "one entry per tensor"
    );
    for (tp, pp) in [(1, 1), (2, 1), (1, 2), (4, 2)] {
        let Ok(plan) = ShardPlan::new(&config, tp, pp) else {
            continue;
        };
        let held: u64 = plan
            .shards
            .iter()
            .map(|s| plan.worker_params(&config, s))
            .sum();
        assert!(held >= params, "the shards hold less than the model");
    }
    // The coordinator sends the config to every worker in 32-bit fields.
    let wire = pb::ModelConfig::from(&config);
    let fields = [
        (wire.vocab_size, config.vocab_size),
        (wire.n_positions, config.n_positions),
        (wire.n_embd, config.n_embd),
        (wire.n_layer, config.n_layer),
        (wire.n_head, config.n_head),
        (wire.n_inner, config.n_inner),
    ];
    for (sent, value) in fields {
        assert_eq!(sent as usize, value, "a dimension does not fit its field");
    }
});
