//! Measured memory read bandwidth: the denominator of the decode floor.
//!
//! Batch-1 decode streams every weight once per token, so no kernel can beat
//! `read bandwidth ÷ weight bytes per token`. The reader here is the strictest one found:
//! the widest vectors the CPU has, several independent sums, and the same prefetch distance
//! as the GEMV kernels.

use std::time::Instant;

use rayon::prelude::*;

use super::huge::HugeBuf;

/// Prefetch distance, as in the GEMV kernels.
#[cfg(target_arch = "x86_64")]
const PREFETCH_AHEAD_BYTES: usize = 8 * 1024;

/// Sums `values` as fast as this CPU can read them.
pub fn sum_f32(values: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F, checked just above.
            return unsafe { x86::sum_avx512(values) };
        }
        if is_x86_feature_detected!("avx") {
            // SAFETY: the CPU has AVX, checked just above.
            return unsafe { x86::sum_avx(values) };
        }
    }
    sum_portable(values)
}

/// The portable reader: sixteen independent sums the compiler vectorises for the baseline
/// target.
pub fn sum_portable(values: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let chunks = values.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().sum();
    for chunk in chunks {
        for (a, v) in acc.iter_mut().zip(chunk) {
            *a += v;
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::PREFETCH_AHEAD_BYTES;

    /// Four 16-lane partial sums over 64-float blocks, prefetching ahead into L2.
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn sum_avx512(values: &[f32]) -> f32 {
        let mut acc = [_mm512_setzero_ps(); 4];
        let blocks = values.chunks_exact(64);
        let tail: f32 = blocks.remainder().iter().sum();
        for block in blocks {
            let ahead = block
                .as_ptr()
                .cast::<i8>()
                .wrapping_add(PREFETCH_AHEAD_BYTES);
            for (u, acc) in acc.iter_mut().enumerate() {
                // SAFETY: a prefetch never faults (`ahead` may be past the end); the load
                // reads 16 of the block's 64 floats.
                unsafe {
                    _mm_prefetch::<_MM_HINT_T1>(ahead.wrapping_add(64 * u));
                    *acc = _mm512_add_ps(*acc, _mm512_loadu_ps(block.as_ptr().add(16 * u)));
                }
            }
        }
        let acc = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
        _mm512_reduce_add_ps(acc) + tail
    }

    /// Four 8-lane partial sums over 32-float blocks, prefetching ahead into L2.
    ///
    /// # Safety
    /// The CPU has AVX.
    #[target_feature(enable = "avx")]
    pub unsafe fn sum_avx(values: &[f32]) -> f32 {
        let mut acc = [_mm256_setzero_ps(); 4];
        let blocks = values.chunks_exact(32);
        let tail: f32 = blocks.remainder().iter().sum();
        for block in blocks {
            let ahead = block
                .as_ptr()
                .cast::<i8>()
                .wrapping_add(PREFETCH_AHEAD_BYTES);
            for (u, acc) in acc.iter_mut().enumerate() {
                // SAFETY: a prefetch never faults; the load reads 8 of the block's 32 floats.
                unsafe {
                    _mm_prefetch::<_MM_HINT_T1>(ahead.wrapping_add(32 * u));
                    *acc = _mm256_add_ps(*acc, _mm256_loadu_ps(block.as_ptr().add(8 * u)));
                }
            }
        }
        let mut lanes = [0f32; 8];
        let acc = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        // SAFETY: `lanes` holds exactly 8 floats.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc) };
        lanes.iter().sum::<f32>() + tail
    }
}

/// Best-of-`reps` read bandwidth in GB/s (10⁹ bytes/s) over a buffer of `bytes`, split over
/// the current rayon pool the way the GEMV kernels split their weights.
pub fn read_bandwidth_gb_s(bytes: usize, reps: usize) -> f64 {
    // The weights' own allocation (huge pages where Linux gives them), so that the floor
    // is what the kernels could reach from the same memory.
    let mut buf = HugeBuf::<f32>::zeroed(bytes / 4);
    buf.par_iter_mut()
        .enumerate()
        .for_each(|(i, v)| *v = (i % 1024) as f32);
    let chunk = buf.len().div_ceil(8 * rayon::current_num_threads()).max(1);
    let mut best = 0f64;
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        let total: f32 = buf.par_chunks(chunk).map(sum_f32).sum();
        let s = t.elapsed().as_secs_f64();
        std::hint::black_box(total);
        best = best.max(bytes as f64 / s / 1e9);
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reader_sums_correctly() {
        let v: Vec<f32> = (0..1000).map(|i| (i % 7) as f32).collect();
        let want: f32 = v.iter().sum();
        assert_eq!(sum_portable(&v), want);
        assert_eq!(sum_f32(&v), want);
    }
}
