//! Deterministic synthetic weights.
//!
//! Every element is a pure function of `(seed, tensor name, flat index)`, so any worker can
//! generate exactly its own slices of any model — gpt3-175b included — without a checkpoint
//! and without materialising the rest. The values follow GPT-2's initialisation scales
//! (uniform with std 0.02, output projections scaled by `1/sqrt(2·n_layer)`), with
//! LayerNorm parameters perturbed around (1, 0) so that every parameter matters in tests.

use std::ops::Range;
use std::path::Path;

use rayon::prelude::*;

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::weights::{check_region, expected_tensors, for_each_run, WeightSource};

/// Seeded synthetic weights for one config.
#[derive(Debug, Clone)]
pub struct SyntheticWeights {
    config: ModelConfig,
    seed: u64,
}

/// SplitMix64: a fast, well-mixed 64-bit hash. Synthetic weights and the sampler's noise
/// both key their values with it, so neither depends on an RNG's call order.
pub fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// How one tensor's values are drawn: `offset + scale · u`, `u` uniform in [-1, 1).
#[derive(Debug, Clone, Copy)]
struct Law {
    key: u64,
    offset: f32,
    scale: f32,
}

impl Law {
    #[inline]
    fn value(&self, index: usize) -> f32 {
        let bits = splitmix64(self.key ^ (index as u64).wrapping_mul(0xD1B5_4A32_D192_ED03));
        // 24 random bits -> [-1, 1).
        let u = (bits >> 40) as f32 * (2.0 / (1u64 << 24) as f32) - 1.0;
        self.offset + self.scale * u
    }
}

/// Uniform on [-a, a) has std a/sqrt(3).
const UNIFORM_STD_TO_HALF_WIDTH: f32 = 1.732_050_8;

impl SyntheticWeights {
    /// Synthetic weights for `config`, drawn from `seed`.
    pub fn new(config: ModelConfig, seed: u64) -> Self {
        SyntheticWeights { config, seed }
    }

    /// The config these weights are for.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn law(&self, name: &str) -> Result<Law> {
        let key = splitmix64(self.seed ^ fnv1a(name));
        let std = |s: f32| Law {
            key,
            offset: 0.0,
            scale: s * UNIFORM_STD_TO_HALF_WIDTH,
        };
        let out_proj = 0.02 / (2.0 * self.config.n_layer as f32).sqrt();
        let law = if name.ends_with("ln_1.weight")
            || name.ends_with("ln_2.weight")
            || name == "ln_f.weight"
        {
            Law {
                key,
                offset: 1.0,
                scale: 0.1,
            }
        } else if name.ends_with(".bias") {
            std(0.02)
        } else if name == "wpe.weight" {
            std(0.01)
        } else if name.ends_with("c_proj.weight") {
            std(out_proj)
        } else {
            std(0.02)
        };
        Ok(law)
    }

    fn shape_of(&self, name: &str) -> Option<Vec<usize>> {
        expected_tensors(&self.config)
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, s)| s)
    }

    /// Writes an HF-compatible checkpoint (`config.json` + `model.safetensors`, f32) to `dir`,
    /// one tensor in memory at a time.
    pub fn write_checkpoint(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
        let config_path = dir.join("config.json");
        std::fs::write(&config_path, self.config.to_hf_json())
            .map_err(|e| ModelError::io(&config_path, e))?;
        let tensors: Vec<(String, LazyTensor<'_>)> = expected_tensors(&self.config)
            .into_iter()
            .map(|(name, shape)| {
                let full = format!("transformer.{name}");
                (
                    full,
                    LazyTensor {
                        source: self,
                        name,
                        shape,
                    },
                )
            })
            .collect();
        let mut meta = std::collections::HashMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        let path = dir.join("model.safetensors");
        safetensors::serialize_to_file(tensors, Some(meta), &path)
            .map_err(|e| ModelError::io(&path, std::io::Error::other(e.to_string())))
    }
}

impl WeightSource for SyntheticWeights {
    fn shape(&self, name: &str) -> Result<Vec<usize>> {
        self.shape_of(name)
            .ok_or_else(|| ModelError::MissingTensor {
                path: format!("synthetic:{}", self.config.name).into(),
                name: name.to_string(),
            })
    }

    fn read_f32(&self, name: &str, region: &[Range<usize>]) -> Result<Vec<f32>> {
        let shape = self.shape(name)?;
        check_region(name, &shape, region)?;
        let law = self.law(name)?;
        let len: usize = region.iter().map(|r| r.len()).product();
        let mut runs = Vec::new();
        for_each_run(&shape, region, |flat, n, out| runs.push((flat, n, out)));
        let mut data = vec![0f32; len];
        // Fill runs in parallel; each run is a disjoint slice of the output.
        let mut slices = Vec::with_capacity(runs.len());
        let mut rest: &mut [f32] = &mut data;
        for &(flat, n, _) in &runs {
            let (head, tail) = rest.split_at_mut(n);
            slices.push((flat, head));
            rest = tail;
        }
        slices
            .into_par_iter()
            .with_min_len(64)
            .for_each(|(flat, out)| {
                for (i, v) in out.iter_mut().enumerate() {
                    *v = law.value(flat + i);
                }
            });
        Ok(data)
    }
}

/// A tensor generated when the safetensors writer asks for its bytes.
struct LazyTensor<'a> {
    source: &'a SyntheticWeights,
    name: String,
    shape: Vec<usize>,
}

impl safetensors::View for LazyTensor<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        safetensors::Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        let values = self
            .source
            .read_all_f32(&self.name)
            .expect("expected tensors are synthesisable");
        values
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<u8>>()
            .into()
    }
    fn data_len(&self) -> usize {
        self.shape.iter().product::<usize>() * 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_equal_the_same_region_of_the_whole() {
        let s = SyntheticWeights::new(ModelConfig::preset("gpt2-tiny").unwrap(), 7);
        let name = "h.1.attn.c_attn.weight";
        let whole = s.read_all_f32(name).unwrap();
        let part = s.read_f32(name, &[10..20, 300..310]).unwrap();
        for r in 0..10 {
            for c in 0..10 {
                assert_eq!(part[r * 10 + c], whole[(10 + r) * 768 + 300 + c]);
            }
        }
    }

    #[test]
    fn seed_and_name_change_the_values_and_scale_is_gpt2s() {
        let c = ModelConfig::preset("gpt2-tiny").unwrap();
        let a = SyntheticWeights::new(c.clone(), 1)
            .read_all_f32("wte.weight")
            .unwrap();
        let b = SyntheticWeights::new(c.clone(), 2)
            .read_all_f32("wte.weight")
            .unwrap();
        assert_ne!(a[..16], b[..16]);
        let n = a.len() as f64;
        let mean = a.iter().map(|&v| v as f64).sum::<f64>() / n;
        let std = (a.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
        assert!(
            mean.abs() < 1e-3 && (std - 0.02).abs() < 1e-3,
            "mean {mean} std {std}"
        );
        let ln = SyntheticWeights::new(c, 1)
            .read_all_f32("ln_f.weight")
            .unwrap();
        assert!(ln.iter().all(|&v| (0.9..=1.1).contains(&v)));
    }

    #[test]
    fn a_slice_of_gpt3_175b_needs_no_more_than_itself() {
        let s = SyntheticWeights::new(ModelConfig::preset("gpt3-175b").unwrap(), 0);
        let part = s
            .read_f32("h.95.mlp.c_fc.weight", &[0..4, 49152 - 8..49152])
            .unwrap();
        assert_eq!(part.len(), 32);
    }
}
