//! Storage types of weights.

use serde::{Deserialize, Serialize};

/// How a backend stores weight matrices. The CPU backend stores f32 or bf16 and computes in
/// f32; the CUDA backend stores bf16 or f16 (weights and activations alike) and accumulates
/// in f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum WeightDtype {
    /// 4 bytes per weight; bit-exact with an f32 checkpoint.
    #[default]
    F32,
    /// 2 bytes per weight (bfloat16, round-to-nearest-even from f32); half the memory
    /// traffic of f32 for bandwidth-bound decode.
    Bf16,
    /// 2 bytes per weight (IEEE half precision, round-to-nearest-even from f32): more
    /// mantissa than bf16, less range. CUDA backend only.
    F16,
}

impl WeightDtype {
    /// Bytes per stored weight.
    pub fn size_bytes(self) -> usize {
        match self {
            WeightDtype::F32 => 4,
            WeightDtype::Bf16 | WeightDtype::F16 => 2,
        }
    }
}

impl std::fmt::Display for WeightDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WeightDtype::F32 => "f32",
            WeightDtype::Bf16 => "bf16",
            WeightDtype::F16 => "f16",
        })
    }
}

impl std::str::FromStr for WeightDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(WeightDtype::F32),
            "bf16" | "bfloat16" => Ok(WeightDtype::Bf16),
            "f16" | "float16" | "fp16" => Ok(WeightDtype::F16),
            other => Err(format!(
                "unknown weight dtype `{other}`; use f32 or bf16 (or f16 on the cuda backend)"
            )),
        }
    }
}
