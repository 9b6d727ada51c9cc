//! Models Tessera serves: configs and presets, shard plans, checkpoints, synthetic
//! weights and the GPT-2 tokenizer.
pub mod checkpoint;
pub mod config;
pub mod cost;
pub mod error;
pub mod plan;
pub mod synth;
pub mod tokenizer;
pub mod weights;

pub use checkpoint::Checkpoint;
pub use config::{ModelConfig, Preset, GPT2_EOS, GPT2_VOCAB, PRESETS};
pub use cost::{CostModel, Efficiency, Hardware, Link, SeqWork, StepCost, Topology};
pub use error::{ModelError, Result};
pub use plan::{even_ranges, ShardPlan, ShardSpec};
pub use synth::{splitmix64, SyntheticWeights};
pub use tokenizer::Tokenizer;
pub use weights::{check_source, expected_tensors, WeightSource};
