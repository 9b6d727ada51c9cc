//! Model descriptions in the worker protocol's terms.

use tessera_model::ModelConfig;
use tessera_proto::worker::v1 as pb;

/// A model config as the worker protocol carries it.
pub fn model_config(c: &ModelConfig) -> pb::ModelConfig {
    pb::ModelConfig {
        name: c.name.clone(),
        vocab_size: c.vocab_size as u32,
        n_positions: c.n_positions as u32,
        n_embd: c.n_embd as u32,
        n_layer: c.n_layer as u32,
        n_head: c.n_head as u32,
        n_inner: c.n_inner as u32,
        layer_norm_epsilon: c.layer_norm_epsilon,
        eos_token_id: c.eos_token_id,
    }
}
