//! `tessera gpu-check`: on a machine with a GPU, checks every operation of the CUDA
//! backend and a whole GPT-2 forward pass against the CPU backend, forms a one-rank NCCL
//! communicator, and times the kernels and the steps of a large shard against floors made
//! of the ceilings measured on the same device.
//!
//! The floors ([`floors`]), the plan of what is timed ([`plan`]) and the report
//! ([`report`]) are plain arithmetic and compile in every build; running anything needs
//! the `cuda` feature and a device.

pub mod floors;
pub mod plan;
pub mod report;

// Used by the device runs only; compiled (and unit-tested) in every build.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
mod data;
#[cfg(feature = "cuda")]
mod model;
#[cfg(feature = "cuda")]
mod ops;
#[cfg(feature = "cuda")]
mod run;
#[cfg(feature = "cuda")]
mod timer;

pub use floors::{Bound, Ceilings, Work};
pub use plan::{planned_timings, CheckOptions, DECODE_BATCH1_TARGET_RATIO};
pub use report::{Check, Report, Section, Timing};
#[cfg(feature = "cuda")]
pub use run::run;

/// Largest relative error ‖gpu − cpu‖ / ‖cpu‖ of one operation in bf16: a few units of
/// bf16's roundoff (2^-8 ≈ 3.9e-3), for inputs and outputs rounded once each.
pub const BF16_OP_TOLERANCE: f64 = 1e-2;

/// Largest relative error of a whole forward pass's logits in bf16 against the CPU
/// backend in f32: every layer's activations are stored in bf16 on the GPU, so the error
/// grows with depth past one operation's.
pub const BF16_FORWARD_TOLERANCE: f64 = 5e-2;
