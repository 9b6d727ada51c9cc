//! The GPT-2 / GPT-3 architecture, its Hugging Face `config.json`, and the named presets.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// GPT-2 BPE vocabulary size, shared by GPT-2 and GPT-3.
pub const GPT2_VOCAB: usize = 50257;
/// `<|endoftext|>` in the GPT-2 BPE.
pub const GPT2_EOS: u32 = 50256;

/// Upper bounds of a model's dimensions, checked by [`ModelConfig::validate`]. Far above any
/// GPT-2/3 model (GPT-3 175B has 96 layers of 12288), low enough that every product of them
/// fits `u64` and every dimension fits the worker protocol's 32-bit fields.
const MAX_DIMS: [(&str, usize); 6] = [
    ("vocab_size", 1 << 24),
    ("n_positions", 1 << 20),
    ("n_embd", 1 << 16),
    ("n_layer", 1 << 12),
    ("n_head", 1 << 12),
    ("n_inner", 1 << 18),
];

/// One decoder-only, pre-LayerNorm transformer with learned position embeddings,
/// `gelu_new` (tanh) activation and tied input/output embeddings.
///
/// Every size the cluster serves, from a test model to GPT-3 175B, is one of these.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Preset name, or the checkpoint directory's name.
    pub name: String,
    /// Number of token ids the embedding covers.
    pub vocab_size: usize,
    /// Context length: the number of learned positions.
    pub n_positions: usize,
    /// Hidden size `d`.
    pub n_embd: usize,
    /// Number of transformer blocks.
    pub n_layer: usize,
    /// Attention heads per block.
    pub n_head: usize,
    /// MLP inner size, `4·d` in every GPT-2/3 model.
    pub n_inner: usize,
    /// LayerNorm epsilon.
    pub layer_norm_epsilon: f32,
    /// End-of-text token id: generation stops on it unless told to ignore it.
    pub eos_token_id: u32,
}

/// The subset of a Hugging Face GPT-2 `config.json` that Tessera reads.
#[derive(Debug, Deserialize)]
struct HfGpt2Config {
    model_type: Option<String>,
    vocab_size: usize,
    n_positions: usize,
    n_embd: usize,
    n_layer: usize,
    n_head: usize,
    n_inner: Option<usize>,
    #[serde(default = "default_eps")]
    layer_norm_epsilon: f32,
    #[serde(default = "default_activation")]
    activation_function: String,
    eos_token_id: Option<u32>,
    #[serde(default = "yes")]
    tie_word_embeddings: bool,
    #[serde(default = "yes")]
    scale_attn_weights: bool,
    #[serde(default)]
    scale_attn_by_inverse_layer_idx: bool,
}

fn default_eps() -> f32 {
    1e-5
}
fn default_activation() -> String {
    "gelu_new".into()
}
fn yes() -> bool {
    true
}

impl ModelConfig {
    /// A GPT-2-architecture config with the GPT-2 vocabulary and `n_inner = 4·d`.
    pub fn gpt(
        name: &str,
        n_layer: usize,
        n_embd: usize,
        n_head: usize,
        n_positions: usize,
    ) -> Self {
        ModelConfig {
            name: name.to_string(),
            vocab_size: GPT2_VOCAB,
            n_positions,
            n_embd,
            n_layer,
            n_head,
            n_inner: 4 * n_embd,
            layer_norm_epsilon: 1e-5,
            eos_token_id: GPT2_EOS,
        }
    }

    /// Looks a preset up by name (see [`PRESETS`]).
    pub fn preset(name: &str) -> Result<Self> {
        PRESETS
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.config())
            .ok_or_else(|| ModelError::UnknownPreset {
                name: name.to_string(),
                known: PRESETS
                    .iter()
                    .map(|p| p.name)
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// Reads and validates `DIR/config.json` of a Hugging Face GPT-2 checkpoint.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
        let name = dir
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "model".into());
        Self::from_hf_json(&name, &text).map_err(|e| match e {
            ModelError::Corrupt { reason, .. } => ModelError::corrupt(&path, reason),
            other => other,
        })
    }

    /// Parses a Hugging Face GPT-2 `config.json` and rejects variants Tessera does not run.
    pub fn from_hf_json(name: &str, text: &str) -> Result<Self> {
        let hf: HfGpt2Config = serde_json::from_str(text)
            .map_err(|e| ModelError::corrupt("config.json", format!("not a GPT-2 config: {e}")))?;
        if let Some(t) = &hf.model_type {
            if t != "gpt2" {
                return Err(invalid(
                    "model_type",
                    t,
                    "only `gpt2` checkpoints are supported",
                ));
            }
        }
        if !matches!(
            hf.activation_function.as_str(),
            "gelu_new" | "gelu_pytorch_tanh"
        ) {
            return Err(invalid(
                "activation_function",
                &hf.activation_function,
                "only the tanh GELU (`gelu_new`) of GPT-2/GPT-3 is supported",
            ));
        }
        if !hf.tie_word_embeddings {
            return Err(invalid(
                "tie_word_embeddings",
                &false,
                "GPT-2/GPT-3 tie the LM head to the embedding",
            ));
        }
        if !hf.scale_attn_weights || hf.scale_attn_by_inverse_layer_idx {
            return Err(invalid(
                "scale_attn_weights",
                &hf.scale_attn_weights,
                "only 1/sqrt(d_head) scaling is supported",
            ));
        }
        let config = ModelConfig {
            name: name.to_string(),
            vocab_size: hf.vocab_size,
            n_positions: hf.n_positions,
            n_embd: hf.n_embd,
            n_layer: hf.n_layer,
            n_head: hf.n_head,
            n_inner: hf.n_inner.unwrap_or(hf.n_embd.saturating_mul(4)),
            layer_norm_epsilon: hf.layer_norm_epsilon,
            eos_token_id: hf.eos_token_id.unwrap_or(GPT2_EOS),
        };
        config.validate()?;
        Ok(config)
    }

    /// The Hugging Face `config.json` for this model, loadable by `transformers`.
    pub fn to_hf_json(&self) -> String {
        let v = serde_json::json!({
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": self.vocab_size,
            "n_positions": self.n_positions,
            "n_ctx": self.n_positions,
            "n_embd": self.n_embd,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_inner": self.n_inner,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "activation_function": "gelu_new",
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "initializer_range": 0.02,
            "bos_token_id": self.eos_token_id,
            "eos_token_id": self.eos_token_id,
            "tie_word_embeddings": true,
            "scale_attn_weights": true,
            "use_cache": true,
            "torch_dtype": "float32",
        });
        serde_json::to_string_pretty(&v).expect("a json! value serialises")
    }

    /// Checks the relations every GPT-2-architecture model satisfies, and that every
    /// dimension is positive and within the bounds Tessera's arithmetic holds for.
    pub fn validate(&self) -> Result<()> {
        let dims = [
            self.vocab_size,
            self.n_positions,
            self.n_embd,
            self.n_layer,
            self.n_head,
            self.n_inner,
        ];
        for ((field, max), value) in MAX_DIMS.into_iter().zip(dims) {
            if value == 0 || value > max {
                return Err(invalid(field, &value, &format!("must be in 1..={max}")));
            }
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            return Err(invalid(
                "n_head",
                &self.n_head,
                &format!("must divide n_embd = {}", self.n_embd),
            ));
        }
        if !(self.layer_norm_epsilon > 0.0 && self.layer_norm_epsilon.is_finite()) {
            return Err(invalid(
                "layer_norm_epsilon",
                &self.layer_norm_epsilon,
                "must be a positive number",
            ));
        }
        if self.eos_token_id as usize >= self.vocab_size {
            return Err(invalid(
                "eos_token_id",
                &self.eos_token_id,
                &format!("must be below vocab_size = {}", self.vocab_size),
            ));
        }
        Ok(())
    }

    /// Size of one attention head.
    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }

    /// Parameters of one transformer block.
    pub fn params_per_layer(&self) -> u64 {
        let d = self.n_embd as u64;
        let f = self.n_inner as u64;
        // ln_1, ln_2 (weight + bias); c_attn (d×3d + 3d); attn c_proj (d×d + d);
        // mlp c_fc (d×f + f); mlp c_proj (f×d + d).
        4 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d)
    }

    /// Total parameters; the LM head is tied to the token embedding and counted once.
    pub fn param_count(&self) -> u64 {
        let d = self.n_embd as u64;
        let embeddings = (self.vocab_size as u64 + self.n_positions as u64) * d;
        embeddings + self.n_layer as u64 * self.params_per_layer() + 2 * d
    }

    /// Bytes of K and V cache per token of context, over the whole model.
    pub fn kv_bytes_per_token(&self, bytes_per_element: u64) -> u64 {
        2 * self.n_layer as u64 * self.n_embd as u64 * bytes_per_element
    }
}

fn invalid(field: &'static str, value: &dyn std::fmt::Display, reason: &str) -> ModelError {
    ModelError::InvalidConfig {
        field,
        value: value.to_string(),
        reason: reason.to_string(),
    }
}

/// A named model size.
#[derive(Debug, Clone, Copy)]
pub struct Preset {
    /// The name users type: `gpt2`, `gpt3-175b`, …
    pub name: &'static str,
    /// Transformer blocks.
    pub n_layer: usize,
    /// Hidden size.
    pub n_embd: usize,
    /// Attention heads.
    pub n_head: usize,
    /// Context length.
    pub n_positions: usize,
    /// One line on where the size comes from.
    pub about: &'static str,
}

impl Preset {
    /// The full config of this preset.
    pub fn config(&self) -> ModelConfig {
        ModelConfig::gpt(
            self.name,
            self.n_layer,
            self.n_embd,
            self.n_head,
            self.n_positions,
        )
    }
}

/// Every preset. GPT-2 sizes follow the released checkpoints; GPT-3 sizes follow
/// Table 2.1 of "Language Models are Few-Shot Learners" with dense attention and context 2048.
pub const PRESETS: &[Preset] = &[
    Preset { name: "gpt2-tiny", n_layer: 4, n_embd: 256, n_head: 8, n_positions: 1024, about: "small test and demo model (serve's default)" },
    Preset { name: "gpt2", n_layer: 12, n_embd: 768, n_head: 12, n_positions: 1024, about: "GPT-2 124M" },
    Preset { name: "gpt2-medium", n_layer: 24, n_embd: 1024, n_head: 16, n_positions: 1024, about: "GPT-2 355M" },
    Preset { name: "gpt2-large", n_layer: 36, n_embd: 1280, n_head: 20, n_positions: 1024, about: "GPT-2 774M" },
    Preset { name: "gpt2-xl", n_layer: 48, n_embd: 1600, n_head: 25, n_positions: 1024, about: "GPT-2 1.5B" },
    Preset { name: "gpt3-125m", n_layer: 12, n_embd: 768, n_head: 12, n_positions: 2048, about: "GPT-3 Small" },
    Preset { name: "gpt3-350m", n_layer: 24, n_embd: 1024, n_head: 16, n_positions: 2048, about: "GPT-3 Medium" },
    Preset { name: "gpt3-760m", n_layer: 24, n_embd: 1536, n_head: 16, n_positions: 2048, about: "GPT-3 Large" },
    Preset { name: "gpt3-1.3b", n_layer: 24, n_embd: 2048, n_head: 16, n_positions: 2048, about: "GPT-3 XL (paper prints 24 heads; 24 × 128 ≠ 2048, so 16 heads of 128 keep d_head and the 1.3B count)" },
    Preset { name: "gpt3-2.7b", n_layer: 32, n_embd: 2560, n_head: 32, n_positions: 2048, about: "GPT-3 2.7B" },
    Preset { name: "gpt3-6.7b", n_layer: 32, n_embd: 4096, n_head: 32, n_positions: 2048, about: "GPT-3 6.7B" },
    Preset { name: "gpt3-13b", n_layer: 40, n_embd: 5120, n_head: 40, n_positions: 2048, about: "GPT-3 13B (paper prints d_model 5140; 40 × 128 = 5120)" },
    Preset { name: "gpt3-175b", n_layer: 96, n_embd: 12288, n_head: 96, n_positions: 2048, about: "GPT-3 175B" },
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt2_has_124m_parameters() {
        let c = ModelConfig::preset("gpt2").unwrap();
        assert_eq!(c.param_count(), 124_439_808);
    }

    #[test]
    fn gpt3_175b_matches_the_paper() {
        let c = ModelConfig::preset("gpt3-175b").unwrap();
        let p = c.param_count() as f64 / 1e9;
        assert!((174.0..176.0).contains(&p), "{p}B");
        assert_eq!(c.head_dim(), 128);
        // 2 · 96 · 12288 · 2 bytes = 4.5 MiB per token in bf16.
        assert_eq!(c.kv_bytes_per_token(2), 4_718_592);
    }

    #[test]
    fn every_gpt3_preset_has_the_papers_head_size() {
        let head = [
            ("gpt3-125m", 64),
            ("gpt3-350m", 64),
            ("gpt3-760m", 96),
            ("gpt3-1.3b", 128),
            ("gpt3-2.7b", 80),
            ("gpt3-6.7b", 128),
            ("gpt3-13b", 128),
            ("gpt3-175b", 128),
        ];
        for (name, d_head) in head {
            let c = ModelConfig::preset(name).unwrap();
            c.validate().unwrap();
            assert_eq!(c.head_dim(), d_head, "{name}");
            assert_eq!(c.n_positions, 2048);
            assert_eq!(c.vocab_size, 50257);
        }
        let billions = |n: &str| ModelConfig::preset(n).unwrap().param_count() as f64 / 1e9;
        assert!((1.2..1.4).contains(&billions("gpt3-1.3b")));
        assert!((12.5..13.5).contains(&billions("gpt3-13b")));
        assert!((6.5..6.9).contains(&billions("gpt3-6.7b")));
    }

    #[test]
    fn unknown_preset_lists_the_known_ones() {
        let e = ModelConfig::preset("gpt5").unwrap_err().to_string();
        assert!(e.contains("gpt5") && e.contains("gpt3-175b"), "{e}");
    }

    #[test]
    fn hf_config_round_trips() {
        let c = ModelConfig::preset("gpt2-medium").unwrap();
        let back = ModelConfig::from_hf_json("gpt2-medium", &c.to_hf_json()).unwrap();
        assert_eq!(c, back);
    }

    #[test]
    fn unsupported_variants_name_the_field() {
        let text = r#"{"model_type":"gpt2","vocab_size":10,"n_positions":8,"n_embd":8,"n_layer":1,"n_head":3,"eos_token_id":0}"#;
        let e = ModelConfig::from_hf_json("x", text)
            .unwrap_err()
            .to_string();
        assert!(e.contains("n_head") && e.contains("n_embd = 8"), "{e}");
        let text = r#"{"model_type":"gpt2","vocab_size":10,"n_positions":8,"n_embd":8,"n_layer":1,"n_head":2,"activation_function":"relu"}"#;
        let e = ModelConfig::from_hf_json("x", text)
            .unwrap_err()
            .to_string();
        assert!(e.contains("activation_function"), "{e}");
    }

    #[test]
    fn absurd_dimensions_are_refused_before_any_arithmetic() {
        // No n_inner: it would be 4 · n_embd, past usize.
        let text = r#"{"vocab_size":50257,"n_positions":1024,"n_embd":4611686018427387904,"n_layer":4294967296,"n_head":1}"#;
        let e = ModelConfig::from_hf_json("x", text)
            .unwrap_err()
            .to_string();
        assert!(e.contains("n_embd"), "{e}");
        let mut c = ModelConfig::preset("gpt2").unwrap();
        c.n_layer = 1 << 32;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("n_layer"), "{e}");
        // At every bound the parameter count still fits.
        let c = ModelConfig {
            name: "widest".into(),
            vocab_size: 1 << 24,
            n_positions: 1 << 20,
            n_embd: 1 << 16,
            n_layer: 1 << 12,
            n_head: 1 << 12,
            n_inner: 1 << 18,
            layer_norm_epsilon: 1e-5,
            eos_token_id: 0,
        };
        c.validate().unwrap();
        assert!(c.param_count() > 1 << 40);
    }
}
