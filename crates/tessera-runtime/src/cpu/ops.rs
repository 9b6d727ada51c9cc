//! Element-wise and attention kernels of the CPU backend.

use rayon::prelude::*;

use crate::backend::{KvSpec, SeqSpan};
use crate::error::{Result, RuntimeError};

/// Rows per rayon task for row-wise kernels; below it, threads cost more than they save.
const ROWS_PER_TASK: usize = 16;

/// Row-wise LayerNorm (biased variance, as PyTorch).
pub(super) fn layer_norm(x: &[f32], w: &[f32], b: &[f32], eps: f32, cols: usize, out: &mut [f32]) {
    let norm_row = |(xr, or): (&[f32], &mut [f32])| {
        let n = cols as f32;
        let mean = xr.iter().sum::<f32>() / n;
        let var = xr.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
        let inv = 1.0 / (var + eps).sqrt();
        for ((o, &v), (&g, &bb)) in or.iter_mut().zip(xr).zip(w.iter().zip(b)) {
            *o = (v - mean) * inv * g + bb;
        }
    };
    if x.len() / cols >= 2 * ROWS_PER_TASK {
        x.par_chunks(cols)
            .zip(out.par_chunks_mut(cols))
            .with_min_len(ROWS_PER_TASK)
            .for_each(norm_row);
    } else {
        x.chunks(cols).zip(out.chunks_mut(cols)).for_each(norm_row);
    }
}

/// GPT-2's `gelu_new`: `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`.
///
/// The tanh is computed by [`tanh_approx`] in plain f32 arithmetic, which the compiler
/// vectorises: an element's result depends only on its value, never on where it sits in
/// the buffer (vector body or scalar tail give the same bits), which keeps the forward pass
/// batch-invariant. libm's `tanhf` was a fifth of a batched GPT-2 decode step.
pub(super) fn gelu_new(x: &mut [f32]) {
    // A decode row of the MLP (4·d values) is already worth splitting.
    if x.len() >= 2048 {
        x.par_chunks_mut(1024).for_each(gelu_slice);
    } else {
        gelu_slice(x);
    }
}

fn gelu_slice(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if avx512() {
            // SAFETY: the CPU has AVX-512 F (and BW), detected at run time.
            unsafe { gelu_slice_avx512(x) };
            return;
        }
    }
    gelu_slice_portable(x);
}

/// Whether the AVX-512 builds may run: the level the linear kernels detected once.
#[cfg(target_arch = "x86_64")]
fn avx512() -> bool {
    super::matmul::SimdLevel::detected() == super::matmul::SimdLevel::Avx512
}

/// The same loop compiled for AVX-512: the arithmetic is the same IEEE operations in the
/// same order (Rust never contracts a multiply and an add into an FMA), so the bits are too.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn gelu_slice_avx512(x: &mut [f32]) {
    gelu_slice_portable(x);
}

#[inline(always)]
fn gelu_slice_portable(x: &mut [f32]) {
    const C: f32 = 0.797_884_6; // sqrt(2/pi)
    for v in x.iter_mut() {
        let u = *v;
        *v = 0.5 * u * (1.0 + tanh_approx(C * (u + 0.044715 * u * u * u)));
    }
}

/// `e^v` for `v ≥ 0` (clamped at 88, below f32 overflow): `2^n · e^r` with `n` the nearest
/// integer to `v / ln 2`, `|r| ≤ ln 2 / 2` (Cody–Waite split of ln 2), and `e^r` by its
/// Taylor polynomial to `r^7` (truncation below 1e-8 relative). Branch-free, so it
/// vectorises.
#[inline(always)]
fn exp_nonneg(v: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4; // 0.693359375, exact in 9 bits
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2^23: adding and subtracting rounds to an integer
    let v = v.min(88.0);
    let n = (v * LOG2E + ROUND) - ROUND;
    let r = (v - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// `tanh(u) = sign(u) · (1 − 2 / (e^{2|u|} + 1))`, absolute error below 2e-7.
#[inline(always)]
fn tanh_approx(u: f32) -> f32 {
    let t = 1.0 - 2.0 / (exp_nonneg(2.0 * u.abs()) + 1.0);
    t.copysign(u)
}

fn slot(spec: KvSpec, table: &[u32], pos: usize) -> Result<usize> {
    let block = *table.get(pos / spec.block_size).ok_or_else(|| {
        RuntimeError::invalid(
            "block_table",
            format!("position {pos} has no block (table of {})", table.len()),
        )
    })? as usize;
    if block >= spec.num_blocks {
        return Err(RuntimeError::invalid(
            "block_table",
            format!("block {block} of {}", spec.num_blocks),
        ));
    }
    Ok(block * spec.block_size + pos % spec.block_size)
}

/// Writes the K and V of every new token into its cache slot.
pub(super) fn write_kv(
    qkv: &[f32],
    seqs: &[SeqSpan],
    spec: KvSpec,
    k: &mut [f32],
    v: &mut [f32],
) -> Result<()> {
    let width = spec.heads * spec.head_dim;
    for s in seqs {
        for (i, row) in s.rows.clone().enumerate() {
            let at = slot(spec, &s.block_table, s.start_pos + i)? * width;
            let src = &qkv[row * 3 * width..(row + 1) * 3 * width];
            k[at..at + width].copy_from_slice(&src[width..2 * width]);
            v[at..at + width].copy_from_slice(&src[2 * width..]);
        }
    }
    Ok(())
}

/// `a · b` with eight independent partial sums, so the compiler vectorises it.
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Where a group of neighbouring heads of one sequence lives in the paged cache.
struct HeadView<'a> {
    table: &'a [u32],
    block_size: usize,
    /// Values per cache slot (every head of the worker).
    width: usize,
    /// The group's first value in a slot.
    offset: usize,
    /// Heads in the group.
    heads: usize,
    dh: usize,
}

impl HeadView<'_> {
    /// Where the group starts in the slot of each position `0..=last`, in position order,
    /// walking the block table block by block; head `h` of the group is `h · dh` further.
    fn slots(&self, last: usize) -> Vec<usize> {
        let mut out = Vec::with_capacity(last + 1);
        for (b, &block) in self.table.iter().enumerate() {
            let first = b * self.block_size;
            if first > last {
                break;
            }
            let base = block as usize * self.block_size;
            for slot in 0..self.block_size.min(last + 1 - first) {
                out.push((base + slot) * self.width + self.offset);
            }
        }
        out
    }
}

/// One query row of a group of heads over positions `0..=pos`: for each head, scaled dot
/// products, softmax, weighted sum of the values into its `dh` values of `o`. The heads of
/// a group are neighbours in every cache slot, so the group reads each slot's part once,
/// front to back, instead of one strided pass per head; per head the arithmetic is fixed
/// (the same `dot`, positions in order), whatever the grouping, and the AVX-512 build of it
/// gives the same bits as the portable one.
fn attend(head: &HeadView, q: &[f32], pos: usize, scale: f32, k: &[f32], v: &[f32], o: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if avx512() {
            // SAFETY: the CPU has AVX-512 F (and BW), detected at run time.
            unsafe { attend_avx512(head, q, pos, scale, k, v, o) };
            return;
        }
    }
    attend_portable(head, q, pos, scale, k, v, o);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn attend_avx512(
    head: &HeadView,
    q: &[f32],
    pos: usize,
    scale: f32,
    k: &[f32],
    v: &[f32],
    o: &mut [f32],
) {
    attend_portable(head, q, pos, scale, k, v, o);
}

#[inline(always)]
fn attend_portable(
    head: &HeadView,
    q: &[f32],
    pos: usize,
    scale: f32,
    k: &[f32],
    v: &[f32],
    o: &mut [f32],
) {
    let (dh, n, len) = (head.dh, head.heads, pos + 1);
    // Plain loops over the slots (no closure), so that all of it is compiled with the
    // caller's target features.
    let slots = head.slots(pos);
    // scores[h · len + p]: head h, position p.
    let mut scores = vec![0f32; n * len];
    for (p, &at) in slots.iter().enumerate() {
        if let Some(&ahead) = slots.get(p + PREFETCH_SLOTS) {
            prefetch(&k[ahead..ahead + n * dh]);
        }
        for h in 0..n {
            let (q, k) = (&q[h * dh..(h + 1) * dh], &k[at + h * dh..at + (h + 1) * dh]);
            scores[h * len + p] = dot(q, k) * scale;
        }
    }
    let mut inv = vec![0f32; n];
    for (h, scores) in scores.chunks_exact_mut(len).enumerate() {
        let max = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for sc in scores.iter_mut() {
            *sc = (*sc - max).exp();
            sum += *sc;
        }
        inv[h] = 1.0 / sum;
    }
    o.fill(0.0);
    for (p, &at) in slots.iter().enumerate() {
        if let Some(&ahead) = slots.get(p + PREFETCH_SLOTS) {
            prefetch(&v[ahead..ahead + n * dh]);
        }
        for h in 0..n {
            let w = scores[h * len + p] * inv[h];
            let o = &mut o[h * dh..(h + 1) * dh];
            for (acc, &vv) in o.iter_mut().zip(&v[at + h * dh..at + (h + 1) * dh]) {
                *acc += w * vv;
            }
        }
    }
}

/// How many cache slots ahead attention prefetches its keys and values: the blocks of a
/// sequence are scattered, so the hardware prefetcher loses the stream at every block.
const PREFETCH_SLOTS: usize = 8;

/// Hints every cache line of `data` into L1. Never faults; a no-op off x86-64.
#[inline(always)]
fn prefetch(data: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    for line in data.chunks(16) {
        // SAFETY: a prefetch (baseline SSE) only hints the cache; it never faults or reads.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                line.as_ptr().cast(),
            )
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = data;
}

/// Heads per attention task: all of a row's heads when there are rows enough to keep every
/// thread busy, else fewer (a divisor of `heads`) so that `rows × groups` tasks do.
fn heads_per_task(rows: usize, heads: usize, threads: usize) -> usize {
    let want_groups = (2 * threads).div_ceil(rows.max(1)).clamp(1, heads.max(1));
    (want_groups..=heads.max(1))
        .find(|g| heads.is_multiple_of(*g))
        .map_or(heads.max(1), |groups| heads / groups)
}

/// Causal attention of every new token over its sequence's cached positions, one task per
/// (token, group of heads). Slots were validated by [`write_kv`], which runs first.
pub(super) fn paged_attention(
    qkv: &[f32],
    seqs: &[SeqSpan],
    spec: KvSpec,
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
) {
    let width = spec.heads * spec.head_dim;
    let dh = spec.head_dim;
    let scale = 1.0 / (dh as f32).sqrt();
    // (sequence, position) of every new token, by row.
    let mut rows: Vec<(&SeqSpan, usize)> = Vec::with_capacity(out.len() / width);
    for s in seqs {
        for (i, row) in s.rows.clone().enumerate() {
            debug_assert_eq!(row, rows.len(), "sequences cover the rows in order");
            rows.push((s, s.start_pos + i));
        }
    }
    let per_task = heads_per_task(rows.len(), spec.heads, rayon::current_num_threads());
    let groups = spec.heads / per_task;
    let one_group = |(task, o): (usize, &mut [f32])| {
        let (row, g) = (task / groups, task % groups);
        let (s, pos) = rows[row];
        let first = g * per_task * dh;
        let q = &qkv[row * 3 * width + first..row * 3 * width + first + per_task * dh];
        let head = HeadView {
            table: &s.block_table,
            block_size: spec.block_size,
            width,
            offset: first,
            heads: per_task,
            dh,
        };
        attend(&head, q, pos, scale, k, v, o);
    };
    // Work per task grows with the context; split whenever there is more than one task.
    if rows.len() * groups > 1 {
        out.par_chunks_mut(per_task * dh)
            .enumerate()
            .for_each(one_group);
    } else {
        out.chunks_mut(per_task * dh)
            .enumerate()
            .for_each(one_group);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gelu_new_matches_the_tanh_formula_in_f64() {
        let xs: Vec<f32> = (-4000..=4000).map(|i| i as f32 * 0.0037).collect();
        let mut got = xs.clone();
        gelu_new(&mut got);
        for (&x, &g) in xs.iter().zip(&got) {
            let x64 = x as f64;
            let c = (2.0 / std::f64::consts::PI).sqrt();
            let want = 0.5 * x64 * (1.0 + (c * (x64 + 0.044715 * x64.powi(3))).tanh());
            assert!(
                (g as f64 - want).abs() <= 2e-7 * x64.abs().max(1.0),
                "gelu({x}) = {g}, want {want}"
            );
        }
        let mut big = [100.0f32, -100.0, 1e30, -1e30, 0.0];
        gelu_new(&mut big);
        assert_eq!(big, [100.0, -0.0, 1e30, -0.0, 0.0]);
    }

    #[test]
    fn gelu_of_a_value_does_not_depend_on_its_place_in_the_buffer() {
        let xs: Vec<f32> = (0..4099)
            .map(|i| ((i * 7919 % 2001) as f32 - 1000.0) / 97.0)
            .collect();
        let mut all = xs.clone();
        gelu_new(&mut all);
        for (i, &x) in xs.iter().enumerate().step_by(13) {
            let mut one = [x];
            gelu_new(&mut one);
            assert_eq!(one[0].to_bits(), all[i].to_bits(), "element {i}");
            gelu_slice_portable(&mut one[..0]);
            let mut again = [x];
            gelu_slice_portable(&mut again);
            assert_eq!(
                again[0].to_bits(),
                all[i].to_bits(),
                "portable code, element {i}"
            );
        }
    }

    #[test]
    fn gelu_new_matches_known_values() {
        let mut x = [-3.0f32, -1.0, 0.0, 0.5, 2.0];
        gelu_new(&mut x);
        let expected = [-0.003_637_392, -0.158_808, 0.0, 0.345_714, 1.954_597_7];
        for (a, b) in x.iter().zip(expected) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }

    #[test]
    fn dot_handles_every_length() {
        for n in [0, 1, 7, 8, 9, 64, 80, 131] {
            let a: Vec<f32> = (0..n).map(|i| i as f32 * 0.5 - 3.0).collect();
            let b: Vec<f32> = (0..n).map(|i| 1.0 - i as f32 * 0.25).collect();
            let want: f64 = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (*x as f64) * (*y as f64))
                .sum();
            assert!((dot(&a, &b) as f64 - want).abs() < 1e-3, "n={n}");
        }
    }

    #[test]
    fn heads_are_grouped_to_keep_every_thread_busy() {
        assert_eq!(heads_per_task(1, 12, 2), 3);
        assert_eq!(heads_per_task(32, 6, 2), 6);
        assert_eq!(heads_per_task(2, 6, 2), 3);
        assert_eq!(heads_per_task(1, 7, 4), 1);
        assert_eq!(heads_per_task(1, 1, 8), 1);
        assert_eq!(heads_per_task(0, 4, 1), 2);
    }

    #[test]
    fn a_group_of_heads_gives_each_head_the_bits_it_gets_alone() {
        for (dh, heads, block_size) in [(64, 6, 16), (80, 3, 4), (13, 4, 5)] {
            let width = heads * dh;
            let blocks = 9;
            let k: Vec<f32> = (0..blocks * block_size * width)
                .map(|i| ((i * 7919 % 2003) as f32 - 1001.0) / 613.0)
                .collect();
            let v: Vec<f32> = (0..k.len())
                .map(|i| ((i * 104_729 % 1999) as f32 - 999.0) / 577.0)
                .collect();
            let q: Vec<f32> = (0..width).map(|d| (d as f32 * 0.37).sin()).collect();
            let table: Vec<u32> = (0..blocks as u32).rev().collect();
            let view = |offset, heads| HeadView {
                table: &table,
                block_size,
                width,
                offset,
                heads,
                dh,
            };
            for pos in [0, 1, 5, 17, blocks * block_size - 1] {
                let mut all = vec![f32::NAN; width];
                attend(&view(0, heads), &q, pos, 0.125, &k, &v, &mut all);
                for h in 0..heads {
                    let mut one = vec![f32::NAN; dh];
                    let q1 = &q[h * dh..(h + 1) * dh];
                    attend_portable(&view(h * dh, 1), q1, pos, 0.125, &k, &v, &mut one);
                    for d in 0..dh {
                        assert_eq!(
                            all[h * dh + d].to_bits(),
                            one[d].to_bits(),
                            "dh {dh} head {h} pos {pos} d {d}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn layer_norm_normalises() {
        let x = [1.0f32, 2.0, 3.0, 4.0];
        let mut out = [0f32; 4];
        layer_norm(&x, &[1.0; 4], &[0.5; 4], 1e-5, 4, &mut out);
        let mean: f32 = out.iter().sum::<f32>() / 4.0;
        assert!((mean - 0.5).abs() < 1e-6);
        assert!((out[3] - out[0] - 2.0 * 1.341_635).abs() < 1e-4);
    }

    #[test]
    fn paged_attention_equals_contiguous_attention() {
        // One sequence of 5 tokens with 2 heads of size 3, blocks of 2 slots scattered.
        let spec = KvSpec {
            layers: 1,
            num_blocks: 8,
            block_size: 2,
            heads: 2,
            head_dim: 3,
        };
        let width = 6;
        let qkv: Vec<f32> = (0..5 * 3 * width)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) / 7.0)
            .collect();
        let seq = SeqSpan {
            rows: 0..5,
            start_pos: 0,
            block_table: vec![6, 1, 3],
        };
        let mut k = vec![0f32; 8 * 2 * width];
        let mut v = k.clone();
        write_kv(&qkv, std::slice::from_ref(&seq), spec, &mut k, &mut v).unwrap();
        let mut out = vec![0f32; 5 * width];
        paged_attention(&qkv, std::slice::from_ref(&seq), spec, &k, &v, &mut out);
        for t in 0..5 {
            for h in 0..2 {
                let q = &qkv[t * 18 + h * 3..t * 18 + h * 3 + 3];
                let scores: Vec<f64> = (0..=t)
                    .map(|j| {
                        (0..3)
                            .map(|d| (q[d] * qkv[j * 18 + 6 + h * 3 + d]) as f64)
                            .sum::<f64>()
                            / 3f64.sqrt()
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::MIN, f64::max);
                let z: f64 = scores.iter().map(|s| (s - m).exp()).sum();
                for d in 0..3 {
                    let want: f64 = (0..=t)
                        .map(|j| (scores[j] - m).exp() / z * qkv[j * 18 + 12 + h * 3 + d] as f64)
                        .sum();
                    assert!((out[t * 6 + h * 3 + d] as f64 - want).abs() < 1e-5);
                }
            }
        }
    }

    #[test]
    fn a_position_without_a_block_is_an_error() {
        let spec = KvSpec {
            layers: 1,
            num_blocks: 2,
            block_size: 2,
            heads: 1,
            head_dim: 1,
        };
        let qkv = vec![0f32; 3 * 3];
        let seq = SeqSpan {
            rows: 0..3,
            start_pos: 0,
            block_table: vec![0],
        };
        let (mut k, mut v) = (vec![0f32; 4], vec![0f32; 4]);
        let e = write_kv(&qkv, &[seq], spec, &mut k, &mut v)
            .unwrap_err()
            .to_string();
        assert!(e.contains("block_table"), "{e}");
    }
}
