//! Conversions from tessera-model's types (feature `model`), so the coordinator, which
//! sends a model config, and the worker's tests, which play the coordinator, share one.

use crate::worker::v1 as pb;

impl From<&tessera_model::ModelConfig> for pb::ModelConfig {
    fn from(c: &tessera_model::ModelConfig) -> Self {
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
}
