//! The CUDA backend (feature `cuda`): device memory and streams through cudarc, GEMMs
//! through cuBLAS, and Tessera's own kernels compiled from `.cu` sources by NVRTC at
//! start-up (and cached on disk).
//!
//! cudarc loads every CUDA library at run time, so a build with the feature needs no CUDA
//! installed; [`probe`] checks what is there before anything touches cudarc, which would
//! panic on a missing library. Without the feature the module still says why CUDA is not
//! available ([`NOT_COMPILED`]), so callers need no `cfg` of their own to report it.

pub mod check;
pub mod sources;

#[cfg(feature = "cuda")]
pub mod backend;
#[cfg(feature = "cuda")]
pub mod compile;
#[cfg(feature = "cuda")]
pub mod kernels;
#[cfg(feature = "cuda")]
pub mod probe;

#[cfg(feature = "cuda")]
pub use backend::{CudaBackend, CudaMatrix, CudaOptions, CudaTensor};

/// Why `--backend cuda` cannot work in a build without the `cuda` feature.
pub const NOT_COMPILED: &str = "this tessera was built without CUDA support; rebuild it with \
     `cargo build --release -p tessera --features cuda`, or use --backend cpu";

/// Whether this build has the CUDA backend.
pub const COMPILED: bool = cfg!(feature = "cuda");
