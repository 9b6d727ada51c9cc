//! Inputs and comparisons of the checks: seeded random values rounded to bf16 (so both
//! backends start from the same numbers), relative errors, and a weight source whose
//! every value is rounded to bf16.

use std::ops::Range;

use half::bf16;
use rayon::prelude::*;
use tessera_model::{splitmix64, WeightSource};

use super::report::Check;

/// Seeded uniform values in `[lo, hi)`, each rounded to bf16; generated in parallel.
pub fn random_bf16(n: usize, seed: u64, lo: f32, hi: f32) -> Vec<f32> {
    let key = splitmix64(seed);
    (0..n)
        .into_par_iter()
        .with_min_len(1 << 14)
        .map(|i| {
            let u = (splitmix64(key ^ i as u64) >> 40) as f32 / (1u64 << 24) as f32;
            round_bf16(lo + (hi - lo) * u)
        })
        .collect()
}

/// `v` rounded to bf16 (nearest, ties to even) and widened back.
pub fn round_bf16(v: f32) -> f32 {
    bf16::from_f32(v).to_f32()
}

/// A seeded sequence of small integers below `n`.
pub fn random_ids(count: usize, seed: u64, n: u32) -> Vec<u32> {
    (0..count)
        .map(|i| (splitmix64(seed ^ splitmix64(i as u64)) % n as u64) as u32)
        .collect()
}

/// ‖got − want‖ / ‖want‖ in f64, and how many values of `got` are not finite.
pub fn relative_error(got: &[f32], want: &[f32]) -> (f64, usize) {
    let non_finite = got.iter().filter(|v| !v.is_finite()).count();
    let (mut diff, mut norm) = (0f64, 0f64);
    for (&g, &w) in got.iter().zip(want) {
        diff += (g as f64 - w as f64).powi(2);
        norm += (w as f64).powi(2);
    }
    let err = if norm > 0.0 {
        (diff / norm).sqrt()
    } else {
        diff.sqrt()
    };
    (err, non_finite)
}

/// A check of `got` (the GPU's) against `want` (the CPU's) at `tolerance`: it fails on
/// a length mismatch, on any value that is not finite (an unwritten, NaN-poisoned
/// output), or on a relative error past the tolerance.
pub fn compare(section: &str, name: String, got: &[f32], want: &[f32], tolerance: f64) -> Check {
    let (err, non_finite) = relative_error(got, want);
    let mut detail = String::new();
    let passed = if got.len() != want.len() {
        detail = format!("{} values, the CPU gave {}", got.len(), want.len());
        false
    } else if non_finite > 0 {
        detail = format!(
            "{non_finite} of {} values are not finite (unwritten or overflowed)",
            got.len()
        );
        false
    } else {
        err <= tolerance
    };
    Check {
        section: section.to_string(),
        name,
        passed,
        error: Some(err),
        tolerance: Some(tolerance),
        detail,
    }
}

/// A check that could not run: it fails, and says why.
pub fn not_run(section: &str, name: String, why: impl std::fmt::Display) -> Check {
    Check {
        section: section.to_string(),
        name,
        passed: false,
        error: None,
        tolerance: None,
        detail: why.to_string(),
    }
}

/// A weight source whose values are another's rounded to bf16: the CPU backend, which
/// keeps norms and biases in f32, then starts from exactly the numbers the GPU stores.
pub struct Bf16Rounded<S>(pub S);

impl<S: WeightSource> WeightSource for Bf16Rounded<S> {
    fn shape(&self, name: &str) -> tessera_model::Result<Vec<usize>> {
        self.0.shape(name)
    }

    fn read_f32(&self, name: &str, region: &[Range<usize>]) -> tessera_model::Result<Vec<f32>> {
        let mut v = self.0.read_f32(name, region)?;
        v.par_iter_mut().for_each(|x| *x = round_bf16(*x));
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_values_are_bf16_in_range_and_seeded() {
        let a = random_bf16(1000, 1, -2.0, 3.0);
        assert!(a
            .iter()
            .all(|&v| (-2.0..=3.0).contains(&v) && round_bf16(v) == v));
        assert_eq!(a, random_bf16(1000, 1, -2.0, 3.0));
        assert_ne!(a, random_bf16(1000, 2, -2.0, 3.0));
        assert!(random_ids(100, 3, 7).iter().all(|&i| i < 7));
    }

    #[test]
    fn poisoned_or_wrong_outputs_fail() {
        let want = [1.0f32, 2.0, 3.0];
        assert!(compare("ops", "same".into(), &want, &want, 1e-2).passed);
        let close = [1.001f32, 2.0, 3.0];
        assert!(compare("ops", "close".into(), &close, &want, 1e-2).passed);
        let nan = [1.0f32, f32::NAN, 3.0];
        let c = compare("ops", "nan".into(), &nan, &want, 1e-2);
        assert!(!c.passed && c.detail.contains("1 of 3"), "{c:?}");
        let far = [1.0f32, 2.0, 4.0];
        assert!(!compare("ops", "far".into(), &far, &want, 1e-2).passed);
        assert!(!compare("ops", "short".into(), &want[..2], &want, 1e-2).passed);
    }
}
