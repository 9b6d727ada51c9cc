//! Tessera's runtime: backends over device-resident tensors, collectives, the sharded
//! GPT forward pass, the paged KV cache and distributed sampling.
pub mod cpu;
pub mod dtype;

pub use dtype::WeightDtype;
