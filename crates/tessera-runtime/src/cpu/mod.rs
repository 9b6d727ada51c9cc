//! The CPU backend: f32 compute, f32 or bf16 weights, SIMD kernels chosen at run time.
pub mod matmul;
