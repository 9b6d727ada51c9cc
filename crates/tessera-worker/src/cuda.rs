//! `--backend cuda`: the GPU a worker found at start-up, and its shard on that GPU.
//!
//! A worker drives one GPU (`--device N`). It probes the GPU before it registers, so a
//! machine without a driver, or a binary built without the `cuda` feature, fails at once
//! with a message that says why and suggests `--backend cpu`, never with a panic.

use crate::error::WorkerError;
use tessera_runtime::RuntimeError;

/// The GPU of a `cuda` worker, as probed at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CudaDevice {
    /// CUDA device ordinal.
    pub ordinal: usize,
    /// What the probe saw, for logs: name, architecture, memory, driver.
    pub description: String,
    /// Device memory in all.
    pub total_memory_bytes: u64,
    /// Device memory free when probed: what the worker offers the coordinator.
    pub free_memory_bytes: u64,
}

/// Probes GPU `ordinal` and the CUDA libraries the backend loads.
pub fn probe(ordinal: usize) -> Result<CudaDevice, WorkerError> {
    #[cfg(feature = "cuda")]
    {
        let info = tessera_runtime::cuda::probe::probe_backend(ordinal)?;
        Ok(CudaDevice {
            ordinal,
            description: info.to_string(),
            total_memory_bytes: info.total_memory_bytes,
            free_memory_bytes: info.free_memory_bytes,
        })
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = ordinal;
        Err(not_compiled())
    }
}

/// The error of `--backend cuda` in a build without the feature.
pub fn not_compiled() -> WorkerError {
    RuntimeError::CudaUnavailable(tessera_runtime::cuda::NOT_COMPILED.into()).into()
}
