//! Where a worker's weights come from: a checkpoint on disk or seeded synthetic values.
//!
//! Tensors are named and shaped as in a Hugging Face GPT-2 checkpoint without the
//! `transformer.` prefix (`h.3.attn.c_attn.weight`, …). GPT-2's `Conv1D` weights are
//! stored `[in, out]`; readers return whatever region of that layout they are asked for,
//! so a worker reads only its own slices.

use std::ops::Range;

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};

/// A source of named tensors that can be read region by region.
pub trait WeightSource: Send + Sync {
    /// Shape of the named tensor as stored.
    fn shape(&self, name: &str) -> Result<Vec<usize>>;

    /// Reads `region` (one range per dimension) of the named tensor as f32, row-major
    /// over the region.
    fn read_f32(&self, name: &str, region: &[Range<usize>]) -> Result<Vec<f32>>;

    /// Reads the whole tensor.
    fn read_all_f32(&self, name: &str) -> Result<Vec<f32>> {
        let region: Vec<Range<usize>> = self.shape(name)?.into_iter().map(|n| 0..n).collect();
        self.read_f32(name, &region)
    }
}

/// Every tensor a GPT-2-architecture model needs, with its stored shape.
pub fn expected_tensors(config: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let d = config.n_embd;
    let f = config.n_inner;
    let mut out = vec![
        ("wte.weight".to_string(), vec![config.vocab_size, d]),
        ("wpe.weight".to_string(), vec![config.n_positions, d]),
    ];
    for i in 0..config.n_layer {
        let p = |s: &str| format!("h.{i}.{s}");
        out.push((p("ln_1.weight"), vec![d]));
        out.push((p("ln_1.bias"), vec![d]));
        out.push((p("attn.c_attn.weight"), vec![d, 3 * d]));
        out.push((p("attn.c_attn.bias"), vec![3 * d]));
        out.push((p("attn.c_proj.weight"), vec![d, d]));
        out.push((p("attn.c_proj.bias"), vec![d]));
        out.push((p("ln_2.weight"), vec![d]));
        out.push((p("ln_2.bias"), vec![d]));
        out.push((p("mlp.c_fc.weight"), vec![d, f]));
        out.push((p("mlp.c_fc.bias"), vec![f]));
        out.push((p("mlp.c_proj.weight"), vec![f, d]));
        out.push((p("mlp.c_proj.bias"), vec![d]));
    }
    out.push(("ln_f.weight".to_string(), vec![d]));
    out.push(("ln_f.bias".to_string(), vec![d]));
    out
}

/// Checks that `source` holds every tensor of `config` with the expected shape, so a bad
/// checkpoint fails before any worker starts loading.
pub fn check_source(source: &dyn WeightSource, config: &ModelConfig) -> Result<()> {
    for (name, expected) in expected_tensors(config) {
        let found = source.shape(&name)?;
        if found != expected {
            return Err(ModelError::ShapeMismatch {
                name,
                expected,
                found,
            });
        }
    }
    Ok(())
}

/// Checks a region request against a shape; readers call it before touching data.
pub(crate) fn check_region(name: &str, shape: &[usize], region: &[Range<usize>]) -> Result<()> {
    let ok = region.len() == shape.len()
        && region
            .iter()
            .zip(shape)
            .all(|(r, &n)| r.start <= r.end && r.end <= n);
    if ok {
        Ok(())
    } else {
        Err(ModelError::ShapeMismatch {
            name: format!("{name} (region {region:?})"),
            expected: shape.to_vec(),
            found: region.iter().map(|r| r.end).collect(),
        })
    }
}

/// Calls `f(flat_index_in_tensor, out_index)` for every element of `region` in row-major
/// order, grouped by innermost runs: `f(start_flat, len, out_offset)`.
pub(crate) fn for_each_run(
    shape: &[usize],
    region: &[Range<usize>],
    mut f: impl FnMut(usize, usize, usize),
) {
    if shape.is_empty() {
        f(0, 1, 0);
        return;
    }
    let rank = shape.len();
    let inner = region[rank - 1].clone();
    if inner.is_empty() || region.iter().any(|r| r.is_empty()) {
        return;
    }
    let mut strides = vec![1usize; rank];
    for i in (0..rank - 1).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    let mut idx: Vec<usize> = region.iter().map(|r| r.start).collect();
    let mut out = 0;
    loop {
        let flat: usize = idx.iter().zip(&strides).map(|(i, s)| i * s).sum();
        f(flat, inner.len(), out);
        out += inner.len();
        // Advance the outer indices like an odometer.
        let mut dim = rank - 1;
        loop {
            if dim == 0 {
                return;
            }
            dim -= 1;
            idx[dim] += 1;
            if idx[dim] < region[dim].end {
                break;
            }
            idx[dim] = region[dim].start;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_cover_a_region_in_row_major_order() {
        let shape = [3, 4, 5];
        let region = [1..3, 0..2, 2..5];
        let mut runs = vec![];
        for_each_run(&shape, &region, |flat, len, out| {
            runs.push((flat, len, out))
        });
        assert_eq!(runs, vec![(22, 3, 0), (27, 3, 3), (42, 3, 6), (47, 3, 9)]);
    }

    #[test]
    fn tiny_model_needs_a_tensor_set() {
        let c = ModelConfig::preset("gpt2-tiny").unwrap();
        assert_eq!(expected_tensors(&c).len(), 2 + 12 * 4 + 2);
    }
}
