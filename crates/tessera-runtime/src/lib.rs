//! Tessera's runtime: backends over device-resident tensors, collectives, the sharded
//! GPT forward pass, the paged KV cache and distributed sampling.
pub mod backend;
pub mod collective;
pub mod cpu;
pub mod cuda;
pub mod dtype;
pub mod engine;
pub mod error;
pub mod generate;
pub mod sampling;
pub mod shard;
pub mod step;

pub use backend::{Backend, KvSpec, SeqSpan};
pub use collective::{
    local_group, Collective, LocalComm, NcclId, TcpAbort, TcpComm, TcpGroupSpec, TcpListenerHandle,
};
#[cfg(feature = "cuda")]
pub use collective::{NcclAbort, NcclComm, NcclGroupSpec};
pub use cpu::CpuBackend;
#[cfg(feature = "cuda")]
pub use cuda::{CudaBackend, CudaOptions};
pub use dtype::WeightDtype;
pub use engine::LocalEngine;
pub use error::{Result, RuntimeError};
pub use generate::{FinishReason, GenerateRequest, Generation};
pub use shard::{Shard, ShardComms, ShardOptions};
pub use step::{SampleSpec, SamplingParams, SeqResult, SeqStep, StepOutput, StepRequest};
