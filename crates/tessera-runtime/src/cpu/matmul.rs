//! Weight matrices and the linear layer `out = x·Wᵀ + b`.
//!
//! Batch-1 decode streams every weight once per token and does one multiply-add per weight,
//! so it is bound by memory bandwidth, not arithmetic. For small batches `linear` therefore
//! runs a GEMV kernel that reads each weight row exactly once and dots it with every
//! activation row while it is in registers; bf16 weights halve the bytes streamed and are
//! widened to f32 in-register (a bf16 is the top half of an f32). Prefill (large batches) is
//! compute bound and goes to the `gemm` crate.
//!
//! The SIMD level (AVX-512, AVX2+FMA or portable scalar) is detected once at run time; the
//! build never assumes `target-cpu=native`.

use std::sync::OnceLock;

use half::bf16;
use rayon::prelude::*;

use crate::dtype::WeightDtype;

/// Batches of up to this many rows use the streaming GEMV kernel, larger ones `gemm`.
/// Measured on a 2-core Sapphire Rapids with weights streamed from memory (768→3072 and
/// 3072→768, f32 and bf16): GEMV is faster through m = 12 (1.3–3× at m = 8), `gemm` from
/// about m = 16–24.
const GEMV_MAX_M: usize = 12;

/// Fewest weight bytes one GEMV task streams, so that rayon's per-task cost (a few µs)
/// stays a few percent of the task.
const GEMV_MIN_TASK_BYTES: usize = 128 * 1024;

/// GEMV tasks per rayon thread: several, so that work stealing evens out the end of a call
/// (and a thread the OS or a noisy neighbour slows down). A thread runs neighbouring tasks
/// in order, so its weights still stream sequentially. Measured: 8 per thread is 5–10%
/// faster than 1–2 on a whole GPT-2 decode step.
const GEMV_TASKS_PER_THREAD: usize = 8;

/// Activation rows dotted against a weight row per pass (4 × 4 accumulator registers).
const GEMV_X_GROUP: usize = 4;

/// How far ahead of the GEMV kernels' reads weights are prefetched (into L2). The hardware
/// prefetcher alone keeps too few lines in flight on one core: measured on a whole GPT-2
/// decode step, 4–16 KiB ahead is 25–50% faster than none (bf16 gains the most, having
/// more instructions per byte, so the out-of-order window reaches less far ahead).
#[cfg(target_arch = "x86_64")]
const PREFETCH_AHEAD_BYTES: usize = 8 * 1024;

/// Most bf16 weight rows widened to an f32 scratch for one `gemm` call in prefill.
const PREFILL_BF16_BLOCK_ROWS: usize = 256;

/// bf16 prefill blocks per rayon thread (when the matrix has fewer rows than
/// `PREFILL_BF16_BLOCK_ROWS` × this × threads), for balance.
const PREFILL_BF16_BLOCKS_PER_THREAD: usize = 4;

/// Below this many multiply-adds `gemm` runs on the calling thread: fanning out costs more
/// than it saves.
const GEMM_PARALLEL_MIN_MACS: usize = 1 << 21;

#[derive(Clone)]
enum Storage {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
}

/// A weight matrix `[rows = out_features, cols = in_features]`, row-major (nn.Linear layout).
#[derive(Clone)]
pub struct Matrix {
    rows: usize,
    cols: usize,
    data: Storage,
}

impl std::fmt::Debug for Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Matrix")
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .field("dtype", &self.dtype())
            .finish_non_exhaustive()
    }
}

impl Matrix {
    /// Wraps f32 weights without copying.
    ///
    /// # Panics
    /// If `data.len() != rows * cols`.
    pub fn from_f32(rows: usize, cols: usize, data: Vec<f32>) -> Self {
        check_len("Matrix::from_f32", rows, cols, data.len());
        Matrix {
            rows,
            cols,
            data: Storage::F32(data),
        }
    }

    /// Stores `data` as `dtype`; bf16 rounds each weight to nearest, ties to even.
    ///
    /// # Panics
    /// If `data.len() != rows * cols`.
    pub fn new(rows: usize, cols: usize, data: Vec<f32>, dtype: WeightDtype) -> Self {
        match dtype {
            WeightDtype::F32 => Self::from_f32(rows, cols, data),
            WeightDtype::Bf16 => {
                check_len("Matrix::new", rows, cols, data.len());
                let data = data.par_iter().map(|&v| bf16::from_f32(v)).collect();
                Matrix {
                    rows,
                    cols,
                    data: Storage::Bf16(data),
                }
            }
        }
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// How the weights are stored.
    pub fn dtype(&self) -> WeightDtype {
        match self.data {
            Storage::F32(_) => WeightDtype::F32,
            Storage::Bf16(_) => WeightDtype::Bf16,
        }
    }

    /// Bytes of weight storage: what one decode step streams through `linear`.
    pub fn size_bytes(&self) -> usize {
        self.rows * self.cols * self.dtype().size_bytes()
    }

    /// Writes row `r` widened to f32 into `out` (embedding lookup).
    ///
    /// # Panics
    /// If `r >= rows` or `out.len() != cols`.
    pub fn row_to_f32(&self, r: usize, out: &mut [f32]) {
        assert!(
            r < self.rows,
            "row {r} out of range for a matrix of {} rows",
            self.rows
        );
        assert_eq!(
            out.len(),
            self.cols,
            "row_to_f32: output holds {} values, row has {}",
            out.len(),
            self.cols
        );
        let range = r * self.cols..(r + 1) * self.cols;
        match &self.data {
            Storage::F32(d) => out.copy_from_slice(&d[range]),
            Storage::Bf16(d) => {
                for (o, v) in out.iter_mut().zip(&d[range]) {
                    *o = v.to_f32();
                }
            }
        }
    }
}

fn check_len(what: &str, rows: usize, cols: usize, len: usize) {
    assert_eq!(
        len,
        rows * cols,
        "{what}: a {rows}×{cols} matrix needs {} values, got {len}",
        rows * cols
    );
}

/// out[m × rows] = x[m × cols] · Wᵀ (+ bias[rows] broadcast over the m rows).
///
/// Uses the *current* rayon thread pool (callers `pool.install(..)`) for parallelism. For
/// m ≤ 12 (decode) each output is computed wholly by one task in a fixed order, so results
/// do not depend on the number of threads, and row i of a batch equals the same row run
/// alone.
///
/// # Panics
/// If `x.len() != m * w.cols()`, `out.len() != m * w.rows()` or `bias.len() != w.rows()`.
pub fn linear(x: &[f32], m: usize, w: &Matrix, bias: Option<&[f32]>, out: &mut [f32]) {
    let kernel = if m <= GEMV_MAX_M {
        Kernel::Gemv
    } else {
        Kernel::Gemm
    };
    linear_with(SimdLevel::detected(), kernel, x, m, w, bias, out);
}

/// Which algorithm computes a `linear`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    /// Streams each weight row once; for decode-sized batches.
    Gemv,
    /// Blocked matrix multiply from the `gemm` crate; for prefill.
    Gemm,
}

/// Instruction set the GEMV kernel runs with, ordered from least to most capable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // only x86-64 has SIMD kernels
enum SimdLevel {
    Scalar,
    /// AVX2 + FMA, 8 lanes.
    Avx2,
    /// AVX-512 F + BW, 16 lanes.
    Avx512,
}

impl SimdLevel {
    /// The best level this CPU supports, detected once per process.
    fn detected() -> SimdLevel {
        static LEVEL: OnceLock<SimdLevel> = OnceLock::new();
        *LEVEL.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") {
                    return SimdLevel::Avx512;
                }
                if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                    return SimdLevel::Avx2;
                }
            }
            SimdLevel::Scalar
        })
    }
}

/// `linear` with the kernel and SIMD level chosen by the caller (tests force each one).
fn linear_with(
    level: SimdLevel,
    kernel: Kernel,
    x: &[f32],
    m: usize,
    w: &Matrix,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    // The x86 kernels are only sound on CPUs that have the instructions.
    assert!(
        level <= SimdLevel::detected(),
        "{level:?} kernels requested on a CPU without them"
    );
    let (rows, cols) = (w.rows, w.cols);
    assert_eq!(
        x.len(),
        m * cols,
        "linear: x holds {} values, expected m×cols = {m}×{cols}",
        x.len()
    );
    assert_eq!(
        out.len(),
        m * rows,
        "linear: out holds {} values, expected m×rows = {m}×{rows}",
        out.len()
    );
    if let Some(b) = bias {
        assert_eq!(
            b.len(),
            rows,
            "linear: bias holds {} values, matrix has {rows} rows",
            b.len()
        );
    }
    if m == 0 || rows == 0 {
        return;
    }
    if cols == 0 {
        for out_row in out.chunks_mut(rows) {
            match bias {
                Some(b) => out_row.copy_from_slice(b),
                None => out_row.fill(0.0),
            }
        }
        return;
    }
    match kernel {
        Kernel::Gemv => gemv(level, x, m, w, bias, out),
        Kernel::Gemm => gemm_linear(x, m, w, bias, out),
    }
}

// ---------------------------------------------------------------------------------------
// GEMV (decode)
// ---------------------------------------------------------------------------------------

/// Splits the weight rows into tasks on the current rayon pool; each task owns the matching
/// columns of every output row and writes them with the bias added.
fn gemv(level: SimdLevel, x: &[f32], m: usize, w: &Matrix, bias: Option<&[f32]>, out: &mut [f32]) {
    let (rows, cols) = (w.rows, w.cols);
    let row_bytes = cols * w.dtype().size_bytes();
    let threads = rayon::current_num_threads();
    let min_rows = GEMV_MIN_TASK_BYTES.div_ceil(row_bytes);
    let balanced_rows = rows.div_ceil(threads * GEMV_TASKS_PER_THREAD);
    let chunk_rows = balanced_rows.max(min_rows);
    let n_tasks = rows.div_ceil(chunk_rows);

    // The SIMD bf16 kernels split each block of packed weights into even and odd elements;
    // reorder x once to match.
    let x_split;
    let x = match (&w.data, bf16_block(level)) {
        (Storage::Bf16(_), Some(block)) => {
            x_split = split_even_odd(x, cols, block);
            &x_split[..]
        }
        _ => x,
    };

    let mut tasks: Vec<Vec<&mut [f32]>> = (0..n_tasks).map(|_| Vec::with_capacity(m)).collect();
    for out_row in out.chunks_mut(rows) {
        for (task, piece) in tasks.iter_mut().zip(out_row.chunks_mut(chunk_rows)) {
            task.push(piece);
        }
    }
    let run = |(t, mut outs): (usize, Vec<&mut [f32]>)| {
        let r0 = t * chunk_rows;
        let r1 = r0 + outs[0].len();
        let bias = bias.map(|b| &b[r0..r1]);
        match &w.data {
            Storage::F32(d) => {
                gemv_rows(level, x, m, cols, &d[r0 * cols..r1 * cols], bias, &mut outs)
            }
            Storage::Bf16(d) => {
                gemv_rows(level, x, m, cols, &d[r0 * cols..r1 * cols], bias, &mut outs)
            }
        }
    };
    if n_tasks == 1 {
        tasks.into_iter().enumerate().for_each(run);
    } else {
        tasks.into_par_iter().enumerate().for_each(run);
    }
}

/// Elements per even/odd block of the bf16 kernel at `level` (one vector of packed bf16),
/// `None` where x keeps its order.
fn bf16_block(level: SimdLevel) -> Option<usize> {
    match level {
        SimdLevel::Scalar => None,
        SimdLevel::Avx2 => Some(16),
        SimdLevel::Avx512 => Some(32),
    }
}

/// Copies the `cols`-long rows of `x`, reordering each whole block of `block` values to its
/// even-indexed values followed by its odd-indexed ones; a trailing partial block keeps its
/// order.
fn split_even_odd(x: &[f32], cols: usize, block: usize) -> Vec<f32> {
    let mut split = Vec::with_capacity(x.len());
    for row in x.chunks_exact(cols) {
        let blocks = row.chunks_exact(block);
        let tail = blocks.remainder();
        for b in blocks {
            split.extend(b.iter().step_by(2));
            split.extend(b.iter().skip(1).step_by(2));
        }
        split.extend_from_slice(tail);
    }
    split
}

/// Dots the weight rows `w` (`outs[i].len()` rows of `cols`) with every row of `x`, one
/// weight row at a time so the task reads its weights as a single sequential stream (the
/// hardware prefetcher follows one stream per 4 KiB page; several interleaved short rows
/// defeat it).
fn gemv_rows<T: Weight>(
    level: SimdLevel,
    x: &[f32],
    m: usize,
    cols: usize,
    w: &[T],
    bias: Option<&[f32]>,
    outs: &mut [&mut [f32]],
) {
    for (r, w_row) in w.chunks_exact(cols).enumerate() {
        let b = bias.map_or(0.0, |b| b[r]);
        let mut i = 0;
        while i < m {
            let xs = (m - i).min(GEMV_X_GROUP);
            let x = &x[i * cols..(i + xs) * cols];
            let outs = &mut outs[i..i + xs];
            match xs {
                1 => store(dot_row::<T, 1>(level, w_row, x), r, b, outs),
                2 => store(dot_row::<T, 2>(level, w_row, x), r, b, outs),
                3 => store(dot_row::<T, 3>(level, w_row, x), r, b, outs),
                _ => store(dot_row::<T, 4>(level, w_row, x), r, b, outs),
            }
            i += xs;
        }
    }
}

fn store<const MR: usize>(dots: [f32; MR], r: usize, bias: f32, outs: &mut [&mut [f32]]) {
    for (out, dot) in outs.iter_mut().zip(dots) {
        out[r] = dot + bias;
    }
}

/// `[i] = x[i] · w` for one weight row `w` and `MR` activation rows of `w.len()` values
/// (for bf16 at a SIMD level, x reordered by `split_even_odd`).
///
/// The summation order depends only on `w.len()` and the SIMD level, never on the row or
/// the task: results do not depend on the thread count, and a row of a batch equals the
/// same row run alone.
fn dot_row<T: Weight, const MR: usize>(level: SimdLevel, w: &[T], x: &[f32]) -> [f32; MR] {
    let cols = w.len();
    assert_eq!(x.len(), MR * cols);
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `linear_with` only lets levels up to `SimdLevel::detected()` through, so
        // the CPU has AVX-512 F+BW; the lengths asserted above are the ones the kernel reads.
        SimdLevel::Avx512 => unsafe { T::dot_row_avx512::<MR>(w.as_ptr(), x.as_ptr(), cols) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above, the CPU has AVX2 and FMA; lengths asserted above.
        SimdLevel::Avx2 => unsafe { T::dot_row_avx2::<MR>(w.as_ptr(), x.as_ptr(), cols) },
        _ => dot_row_scalar::<T, MR>(w, x),
    }
}

/// Portable kernel: eight interleaved partial sums per dot, which the compiler may keep in
/// a vector register.
fn dot_row_scalar<T: Weight, const MR: usize>(w: &[T], x: &[f32]) -> [f32; MR] {
    const LANES: usize = 8;
    let mut out = [0.0; MR];
    for (xi, o) in x.chunks_exact(w.len()).zip(out.iter_mut()) {
        let mut lanes = [0.0f32; LANES];
        let (wc, xc) = (w.chunks_exact(LANES), xi.chunks_exact(LANES));
        let (w_tail, x_tail) = (wc.remainder(), xc.remainder());
        for (wc, xc) in wc.zip(xc) {
            for ((l, wv), xv) in lanes.iter_mut().zip(wc).zip(xc) {
                *l += wv.to_f32() * xv;
            }
        }
        for ((l, wv), xv) in lanes.iter_mut().zip(w_tail).zip(x_tail) {
            *l += wv.to_f32() * xv;
        }
        *o = lanes.iter().sum();
    }
    out
}

/// A stored weight type, with its kernels.
trait Weight: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;

    /// See `dot_row`.
    ///
    /// # Safety
    /// The CPU has AVX-512 F+BW; `w` points at `cols` weights and `x` at `MR * cols` floats
    /// (row-major, row stride `cols`).
    #[cfg(target_arch = "x86_64")]
    unsafe fn dot_row_avx512<const MR: usize>(
        w: *const Self,
        x: *const f32,
        cols: usize,
    ) -> [f32; MR];

    /// See `dot_row`.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; `w` points at `cols` weights and `x` at `MR * cols` floats
    /// (row-major, row stride `cols`).
    #[cfg(target_arch = "x86_64")]
    unsafe fn dot_row_avx2<const MR: usize>(
        w: *const Self,
        x: *const f32,
        cols: usize,
    ) -> [f32; MR];
}

impl Weight for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn dot_row_avx512<const MR: usize>(
        w: *const f32,
        x: *const f32,
        cols: usize,
    ) -> [f32; MR] {
        x86::dot_row_f32_avx512::<MR>(w, x, cols)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot_row_avx2<const MR: usize>(
        w: *const f32,
        x: *const f32,
        cols: usize,
    ) -> [f32; MR] {
        x86::dot_row_f32_avx2::<MR>(w, x, cols)
    }
}

impl Weight for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn dot_row_avx512<const MR: usize>(
        w: *const bf16,
        x: *const f32,
        cols: usize,
    ) -> [f32; MR] {
        x86::dot_row_bf16_avx512::<MR>(w.cast(), x, cols)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot_row_avx2<const MR: usize>(
        w: *const bf16,
        x: *const f32,
        cols: usize,
    ) -> [f32; MR] {
        x86::dot_row_bf16_avx2::<MR>(w.cast(), x, cols)
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The x86-64 GEMV kernels (see `super::dot_row`). Each is `unsafe` because it needs the
    //! CPU features in its `target_feature` attribute, which callers check at run time, and
    //! reads `cols` weights at `w` and `MR * cols` floats at `x` (row stride `cols`).
    //!
    //! Each dot keeps several vectors in flight, each summed in its own accumulator (FMA
    //! latency is 4 cycles), and folds them in a fixed order at the end.
    //!
    //! bf16 weights: a 32-bit lane of packed bf16 holds element 2j in its low half and 2j+1
    //! in its high half. Shifting the lane left by 16 gives element 2j as an f32, masking
    //! off the low half gives element 2j+1: two instructions widen a whole vector, against
    //! x reordered even-then-odd (`super::split_even_odd`). A trailing partial block is
    //! widened by zero-extension against x in order.

    use std::arch::x86_64::*;

    use super::PREFETCH_AHEAD_BYTES;

    /// Hints the cache line `PREFETCH_AHEAD_BYTES` past `p` into L2. Never faults, so the
    /// line may lie past the end of the weights.
    #[inline(always)]
    fn prefetch_ahead<T>(p: *const T) {
        let ahead = p.cast::<u8>().wrapping_add(PREFETCH_AHEAD_BYTES);
        // SAFETY: a prefetch (baseline SSE) only hints the cache; it never faults or reads.
        unsafe { _mm_prefetch::<_MM_HINT_T1>(ahead.cast()) };
    }

    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn dot_row_f32_avx512<const MR: usize>(
        w: *const f32,
        x: *const f32,
        cols: usize,
    ) -> [f32; MR] {
        const U: usize = 4;
        let mut acc = [[_mm512_setzero_ps(); U]; MR];
        let mut k = 0;
        while k + 16 * U <= cols {
            for u in 0..U {
                prefetch_ahead(w.wrapping_add(k + 16 * u));
                // SAFETY (all loads here): k + 16 * U <= cols.
                let wv = _mm512_loadu_ps(w.add(k + 16 * u));
                for (i, acc) in acc.iter_mut().enumerate() {
                    acc[u] =
                        _mm512_fmadd_ps(wv, _mm512_loadu_ps(x.add(i * cols + k + 16 * u)), acc[u]);
                }
            }
            k += 16 * U;
        }
        while k + 16 <= cols {
            // SAFETY (all loads here): k + 16 <= cols.
            let wv = _mm512_loadu_ps(w.add(k));
            for (i, acc) in acc.iter_mut().enumerate() {
                acc[0] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x.add(i * cols + k)), acc[0]);
            }
            k += 16;
        }
        if k < cols {
            let mask = ((1u32 << (cols - k)) - 1) as u16;
            // SAFETY (all loads here): the mask selects only the cols - k elements left.
            let wv = _mm512_maskz_loadu_ps(mask, w.add(k));
            for (i, acc) in acc.iter_mut().enumerate() {
                acc[1] =
                    _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(mask, x.add(i * cols + k)), acc[1]);
            }
        }
        fold_avx512(acc)
    }

    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn dot_row_bf16_avx512<const MR: usize>(
        w: *const u16,
        x: *const f32,
        cols: usize,
    ) -> [f32; MR] {
        const U: usize = 2;
        const BLOCK: usize = 32;
        let high_half = _mm512_set1_epi32(0xFFFF_0000_u32 as i32);
        // Per x row: [even, odd] accumulators of each of the U blocks in flight.
        let mut acc = [[_mm512_setzero_ps(); 2 * U]; MR];
        let mut k = 0;
        while k + BLOCK * U <= cols {
            for u in 0..U {
                let k = k + BLOCK * u;
                prefetch_ahead(w.wrapping_add(k));
                // SAFETY (all loads here): the outer k + BLOCK * U <= cols.
                let packed = _mm512_loadu_si512(w.add(k).cast());
                let even = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(packed));
                let odd = _mm512_castsi512_ps(_mm512_and_si512(packed, high_half));
                for (i, acc) in acc.iter_mut().enumerate() {
                    let xi = x.add(i * cols + k);
                    acc[2 * u] = _mm512_fmadd_ps(even, _mm512_loadu_ps(xi), acc[2 * u]);
                    acc[2 * u + 1] =
                        _mm512_fmadd_ps(odd, _mm512_loadu_ps(xi.add(16)), acc[2 * u + 1]);
                }
            }
            k += BLOCK * U;
        }
        if k + BLOCK <= cols {
            // SAFETY (all loads here): k + BLOCK <= cols.
            let packed = _mm512_loadu_si512(w.add(k).cast());
            let even = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(packed));
            let odd = _mm512_castsi512_ps(_mm512_and_si512(packed, high_half));
            for (i, acc) in acc.iter_mut().enumerate() {
                let xi = x.add(i * cols + k);
                acc[0] = _mm512_fmadd_ps(even, _mm512_loadu_ps(xi), acc[0]);
                acc[1] = _mm512_fmadd_ps(odd, _mm512_loadu_ps(xi.add(16)), acc[1]);
            }
            k += BLOCK;
        }
        while k < cols {
            let n = (cols - k).min(16);
            let mask = ((1u32 << n) - 1) as u16;
            // SAFETY (all loads here): the mask selects only the n <= cols - k elements left.
            let halves =
                _mm512_castsi512_si256(_mm512_maskz_loadu_epi16(u32::from(mask), w.add(k).cast()));
            let wv = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(halves)));
            for (i, acc) in acc.iter_mut().enumerate() {
                acc[2] =
                    _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(mask, x.add(i * cols + k)), acc[2]);
            }
            k += n;
        }
        fold_avx512(acc)
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn fold_avx512<const MR: usize>(acc: [[__m512; 4]; MR]) -> [f32; MR] {
        let mut out = [0.0; MR];
        for (o, a) in out.iter_mut().zip(acc) {
            *o = _mm512_reduce_add_ps(_mm512_add_ps(
                _mm512_add_ps(a[0], a[1]),
                _mm512_add_ps(a[2], a[3]),
            ));
        }
        out
    }

    /// As `dot_row_f32_avx512` with 8 lanes; 16 registers hold 2 × `MR` accumulators.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_row_f32_avx2<const MR: usize>(
        w: *const f32,
        x: *const f32,
        cols: usize,
    ) -> [f32; MR] {
        const U: usize = 2;
        let mut acc = [[_mm256_setzero_ps(); U]; MR];
        let mut k = 0;
        while k + 8 * U <= cols {
            prefetch_ahead(w.wrapping_add(k));
            for u in 0..U {
                // SAFETY (all loads here): k + 8 * U <= cols.
                let wv = _mm256_loadu_ps(w.add(k + 8 * u));
                for (i, acc) in acc.iter_mut().enumerate() {
                    acc[u] =
                        _mm256_fmadd_ps(wv, _mm256_loadu_ps(x.add(i * cols + k + 8 * u)), acc[u]);
                }
            }
            k += 8 * U;
        }
        while k + 8 <= cols {
            // SAFETY (all loads here): k + 8 <= cols.
            let wv = _mm256_loadu_ps(w.add(k));
            for (i, acc) in acc.iter_mut().enumerate() {
                acc[0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x.add(i * cols + k)), acc[0]);
            }
            k += 8;
        }
        if k < cols {
            let mask = lane_mask8(cols - k);
            // SAFETY (all loads here): the mask selects only the cols - k elements left.
            let wv = _mm256_maskload_ps(w.add(k), mask);
            for (i, acc) in acc.iter_mut().enumerate() {
                acc[1] = _mm256_fmadd_ps(wv, _mm256_maskload_ps(x.add(i * cols + k), mask), acc[1]);
            }
        }
        fold_avx2(acc)
    }

    /// As `dot_row_bf16_avx512` with 8 lanes: blocks of 16 bf16, one block in flight.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_row_bf16_avx2<const MR: usize>(
        w: *const u16,
        x: *const f32,
        cols: usize,
    ) -> [f32; MR] {
        const BLOCK: usize = 16;
        let high_half = _mm256_set1_epi32(0xFFFF_0000_u32 as i32);
        let mut acc = [[_mm256_setzero_ps(); 2]; MR];
        let mut k = 0;
        while k + BLOCK <= cols {
            prefetch_ahead(w.wrapping_add(k));
            // SAFETY (all loads here): k + BLOCK <= cols.
            let packed = _mm256_loadu_si256(w.add(k).cast());
            let even = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(packed));
            let odd = _mm256_castsi256_ps(_mm256_and_si256(packed, high_half));
            for (i, acc) in acc.iter_mut().enumerate() {
                let xi = x.add(i * cols + k);
                acc[0] = _mm256_fmadd_ps(even, _mm256_loadu_ps(xi), acc[0]);
                acc[1] = _mm256_fmadd_ps(odd, _mm256_loadu_ps(xi.add(8)), acc[1]);
            }
            k += BLOCK;
        }
        while k < cols {
            let n = (cols - k).min(8);
            // SAFETY: n <= cols - k weights are left; the copy reads only those.
            let mut buf = [0u16; 8];
            std::ptr::copy_nonoverlapping(w.add(k), buf.as_mut_ptr(), n);
            let wv = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(
                _mm_loadu_si128(buf.as_ptr().cast()),
            )));
            let mask = lane_mask8(n);
            for (i, acc) in acc.iter_mut().enumerate() {
                // SAFETY: the mask selects only the n elements left in x row i.
                acc[1] = _mm256_fmadd_ps(wv, _mm256_maskload_ps(x.add(i * cols + k), mask), acc[1]);
            }
            k += n;
        }
        fold_avx2(acc)
    }

    /// Lane mask with the first `n` of 8 lanes set, for `maskload`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn lane_mask8(n: usize) -> __m256i {
        _mm256_cmpgt_epi32(
            _mm256_set1_epi32(n as i32),
            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
        )
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn fold_avx2<const MR: usize>(acc: [[__m256; 2]; MR]) -> [f32; MR] {
        let mut out = [0.0; MR];
        for (o, a) in out.iter_mut().zip(acc) {
            let v = _mm256_add_ps(a[0], a[1]);
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            *o = _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
        }
        out
    }
}

// ---------------------------------------------------------------------------------------
// gemm (prefill)
// ---------------------------------------------------------------------------------------

/// Prefill through the `gemm` crate. bf16 weights are widened block by block into an f32
/// scratch that stays in cache, one block per rayon task.
fn gemm_linear(x: &[f32], m: usize, w: &Matrix, bias: Option<&[f32]>, out: &mut [f32]) {
    let (rows, cols) = (w.rows, w.cols);
    let threads = rayon::current_num_threads();
    let parallel = threads > 1 && m * rows * cols >= GEMM_PARALLEL_MIN_MACS;
    match &w.data {
        Storage::F32(d) => {
            let par = if parallel {
                gemm::Parallelism::Rayon(threads)
            } else {
                gemm::Parallelism::None
            };
            // SAFETY: `linear_with` checked x = m×cols, W = rows×cols and out = m×rows, the
            // extents this call reads and writes; `out` is borrowed mutably, so unaliased.
            unsafe {
                gemm_x_wt(
                    m,
                    rows,
                    cols,
                    out.as_mut_ptr(),
                    rows,
                    x.as_ptr(),
                    d.as_ptr(),
                    par,
                )
            };
        }
        Storage::Bf16(d) => {
            let block_rows = if parallel {
                let per_block = rows.div_ceil(PREFILL_BF16_BLOCKS_PER_THREAD * threads);
                per_block.next_multiple_of(16).min(PREFILL_BF16_BLOCK_ROWS)
            } else {
                PREFILL_BF16_BLOCK_ROWS
            };
            let out_ptr = SendPtr(out.as_mut_ptr());
            let run = |scratch: &mut Vec<f32>, r0: usize| {
                let r1 = (r0 + block_rows).min(rows);
                scratch.clear();
                scratch.extend(d[r0 * cols..r1 * cols].iter().map(|v| v.to_f32()));
                // SAFETY: the block writes columns r0..r1 (< rows) of the m output rows, a
                // range no other block touches; `out` (m×rows, checked in `linear_with`) is
                // borrowed mutably for the whole loop and not otherwise used during it; x is
                // m×cols and the scratch (r1 - r0)×cols.
                unsafe {
                    gemm_x_wt(
                        m,
                        r1 - r0,
                        cols,
                        out_ptr.get().add(r0),
                        rows,
                        x.as_ptr(),
                        scratch.as_ptr(),
                        gemm::Parallelism::None,
                    )
                };
            };
            if parallel {
                (0..rows)
                    .into_par_iter()
                    .step_by(block_rows)
                    .for_each_init(Vec::new, run);
            } else {
                let mut scratch = Vec::new();
                (0..rows)
                    .step_by(block_rows)
                    .for_each(|r0| run(&mut scratch, r0));
            }
        }
    }
    if let Some(b) = bias {
        for out_row in out.chunks_mut(rows) {
            for (o, b) in out_row.iter_mut().zip(b) {
                *o += b;
            }
        }
    }
}

/// `out[m × n] = x[m × k] · wᵀ` with `w` = `n` rows of `k` (row-major) and output row
/// stride `out_rs`.
///
/// # Safety
/// `x` is readable for `m * k` floats, `w` for `n * k`, `out` writable at `i * out_rs + j`
/// for `i < m`, `j < n`, and nothing else accesses those outputs during the call.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_x_wt(
    m: usize,
    n: usize,
    k: usize,
    out: *mut f32,
    out_rs: usize,
    x: *const f32,
    w: *const f32,
    par: gemm::Parallelism,
) {
    gemm::gemm(
        m,
        n,
        k,
        out,
        1,
        out_rs as isize,
        false,
        x,
        1,
        k as isize,
        w,
        k as isize,
        1,
        0.0,
        1.0,
        false,
        false,
        false,
        par,
    );
}

/// An output pointer shared by rayon tasks that write disjoint parts of it.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);

// SAFETY: only used by `gemm_linear`, whose tasks write disjoint output columns.
unsafe impl Send for SendPtr {}
// SAFETY: as above.
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// A method (not field access) so closures capture the whole `Send + Sync` wrapper.
    fn get(self) -> *mut f32 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-1, 1).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    const SHAPES: [(usize, usize); 8] = [
        (1, 1),
        (3, 17),
        (37, 129),
        (250, 768),
        (16, 64),
        (9, 23),
        (5, 47),
        (4, 100),
    ];
    const BATCHES: [usize; 7] = [1, 2, 3, 5, 8, 9, 33];

    fn levels() -> Vec<SimdLevel> {
        [SimdLevel::Scalar, SimdLevel::Avx2, SimdLevel::Avx512]
            .into_iter()
            .filter(|&l| l <= SimdLevel::detected())
            .collect()
    }

    /// Checks `out` against an f64 reference over the weights as stored, allowing f32
    /// rounding relative to the sum of |products| (the scale of the rounding error).
    fn check(out: &[f32], x: &[f32], m: usize, w: &Matrix, bias: Option<&[f32]>, what: &str) {
        let (rows, cols) = (w.rows(), w.cols());
        let mut row = vec![0.0; cols];
        for r in 0..rows {
            w.row_to_f32(r, &mut row);
            for i in 0..m {
                let xi = &x[i * cols..(i + 1) * cols];
                let exact: f64 = xi
                    .iter()
                    .zip(&row)
                    .map(|(&a, &b)| f64::from(a) * f64::from(b))
                    .sum();
                let scale: f64 = xi
                    .iter()
                    .zip(&row)
                    .map(|(&a, &b)| (f64::from(a) * f64::from(b)).abs())
                    .sum();
                let expected = exact + bias.map_or(0.0, |b| f64::from(b[r]));
                let got = f64::from(out[i * rows + r]);
                let tol = 1e-5 * (scale + expected.abs()) + 1e-6;
                assert!(
                    (got - expected).abs() <= tol,
                    "{what}: out[{i}][{r}] = {got}, expected {expected} (tolerance {tol})"
                );
            }
        }
    }

    fn run(
        level: SimdLevel,
        kernel: Kernel,
        x: &[f32],
        m: usize,
        w: &Matrix,
        bias: Option<&[f32]>,
    ) -> Vec<f32> {
        // NaN so that an output the kernel forgets to write fails the check.
        let mut out = vec![f32::NAN; m * w.rows()];
        linear_with(level, kernel, x, m, w, bias, &mut out);
        out
    }

    fn matches_reference(dtype: WeightDtype) {
        for (s, &(rows, cols)) in SHAPES.iter().enumerate() {
            let w = Matrix::new(rows, cols, values(rows * cols, s as u64), dtype);
            let bias = values(rows, 100 + s as u64);
            for m in BATCHES {
                let x = values(m * cols, 200 + m as u64);
                for b in [None, Some(bias.as_slice())] {
                    let mut out = vec![f32::NAN; m * rows];
                    linear(&x, m, &w, b, &mut out);
                    let what = format!("{dtype} {rows}×{cols} m={m} bias={}", b.is_some());
                    check(&out, &x, m, &w, b, &what);
                }
            }
        }
    }

    #[test]
    fn f32_linear_matches_f64_reference() {
        matches_reference(WeightDtype::F32);
    }

    #[test]
    fn bf16_linear_matches_f64_reference_on_rounded_weights() {
        matches_reference(WeightDtype::Bf16);
    }

    #[test]
    fn every_simd_level_and_kernel_matches_reference() {
        for level in levels() {
            for kernel in [Kernel::Gemv, Kernel::Gemm] {
                for dtype in [WeightDtype::F32, WeightDtype::Bf16] {
                    for (s, &(rows, cols)) in SHAPES.iter().enumerate() {
                        let w = Matrix::new(rows, cols, values(rows * cols, 300 + s as u64), dtype);
                        let bias = values(rows, 400 + s as u64);
                        for m in BATCHES {
                            let x = values(m * cols, 500 + m as u64);
                            for b in [None, Some(bias.as_slice())] {
                                let out = run(level, kernel, &x, m, &w, b);
                                let what = format!(
                                    "{level:?} {kernel:?} {dtype} {rows}×{cols} m={m} bias={}",
                                    b.is_some()
                                );
                                check(&out, &x, m, &w, b, &what);
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn avx512_is_detected_where_the_cpu_has_it() {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") {
            assert_eq!(SimdLevel::detected(), SimdLevel::Avx512);
        }
    }

    #[test]
    fn gemv_results_do_not_depend_on_thread_count() {
        // 1000 rows of 300: the task split differs between 1, 2 and 3 threads.
        let (rows, cols, m) = (1000, 300, 3);
        let x = values(m * cols, 1);
        let bias = values(rows, 2);
        for dtype in [WeightDtype::F32, WeightDtype::Bf16] {
            let w = Matrix::new(rows, cols, values(rows * cols, 3), dtype);
            for level in levels() {
                let outs: Vec<Vec<f32>> = [1, 2, 3]
                    .into_iter()
                    .map(|threads| {
                        let pool = rayon::ThreadPoolBuilder::new()
                            .num_threads(threads)
                            .build()
                            .unwrap();
                        pool.install(|| run(level, Kernel::Gemv, &x, m, &w, Some(&bias)))
                    })
                    .collect();
                assert!(
                    outs.iter().all(|o| o == &outs[0]),
                    "{level:?} {dtype}: outputs differ by thread count"
                );
            }
        }
    }

    #[test]
    fn batched_gemv_rows_equal_single_row_decode() {
        let (rows, cols, m) = (37, 129, 7);
        let x = values(m * cols, 4);
        for dtype in [WeightDtype::F32, WeightDtype::Bf16] {
            let w = Matrix::new(rows, cols, values(rows * cols, 5), dtype);
            for level in levels() {
                let batch = run(level, Kernel::Gemv, &x, m, &w, None);
                for i in 0..m {
                    let single = run(
                        level,
                        Kernel::Gemv,
                        &x[i * cols..(i + 1) * cols],
                        1,
                        &w,
                        None,
                    );
                    assert_eq!(
                        &batch[i * rows..(i + 1) * rows],
                        single.as_slice(),
                        "{level:?} {dtype} row {i}"
                    );
                }
            }
        }
    }

    #[test]
    fn bf16_conversion_rounds_to_nearest_even() {
        let cases: [(u32, u16); 8] = [
            (0x3F80_8000, 0x3F80), // tie, 0x3F80 even: down
            (0x3F81_8000, 0x3F82), // tie, 0x3F81 odd: up
            (0x3F80_8001, 0x3F81), // above the tie: up
            (0x3F80_7FFF, 0x3F80), // below the tie: down
            (0xBF80_8000, 0xBF80), // negative tie, even: down in magnitude
            (0xBF81_8000, 0xBF82), // negative tie, odd: up in magnitude
            (0x7F7F_FFFF, 0x7F80), // f32::MAX rounds to +inf
            (0x0000_8000, 0x0000), // subnormal tie, even
        ];
        let data: Vec<f32> = cases
            .iter()
            .map(|&(bits, _)| f32::from_bits(bits))
            .collect();
        let w = Matrix::new(1, cases.len(), data, WeightDtype::Bf16);
        let mut row = vec![0.0; cases.len()];
        w.row_to_f32(0, &mut row);
        for (&(bits, want), got) in cases.iter().zip(&row) {
            assert_eq!(
                got.to_bits() >> 16,
                u32::from(want),
                "f32 bits {bits:#010x}"
            );
        }

        // A sweep against half's converter and an independent bit formula.
        let data = values(4096, 6)
            .into_iter()
            .map(|v| v * 1e3)
            .collect::<Vec<_>>();
        let w = Matrix::new(1, data.len(), data.clone(), WeightDtype::Bf16);
        let mut row = vec![0.0; data.len()];
        w.row_to_f32(0, &mut row);
        for (v, got) in data.iter().zip(&row) {
            let bits = v.to_bits();
            let rne = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16;
            assert_eq!(got.to_bits(), rne << 16, "{v}");
            assert_eq!(got.to_bits(), bf16::from_f32(*v).to_f32().to_bits(), "{v}");
        }
    }

    #[test]
    fn row_to_f32_returns_the_stored_row() {
        let data = values(3 * 17, 7);
        let w = Matrix::from_f32(3, 17, data.clone());
        let mut row = vec![0.0; 17];
        w.row_to_f32(2, &mut row);
        assert_eq!(row, &data[34..51]);

        let w = Matrix::new(3, 17, data.clone(), WeightDtype::Bf16);
        w.row_to_f32(1, &mut row);
        let want: Vec<f32> = data[17..34]
            .iter()
            .map(|&v| bf16::from_f32(v).to_f32())
            .collect();
        assert_eq!(row, want);
    }

    #[test]
    fn size_bytes_follows_the_storage_dtype() {
        let w = Matrix::new(3, 17, values(51, 8), WeightDtype::F32);
        assert_eq!(
            (w.rows(), w.cols(), w.dtype(), w.size_bytes()),
            (3, 17, WeightDtype::F32, 204)
        );
        let w = Matrix::new(3, 17, values(51, 8), WeightDtype::Bf16);
        assert_eq!(
            (w.rows(), w.cols(), w.dtype(), w.size_bytes()),
            (3, 17, WeightDtype::Bf16, 102)
        );
    }

    #[test]
    fn zero_inner_dimension_yields_the_bias() {
        let w = Matrix::from_f32(3, 0, vec![]);
        let bias = [1.0, 2.0, 3.0];
        let mut out = [f32::NAN; 6];
        linear(&[], 2, &w, Some(&bias), &mut out);
        assert_eq!(out, [1.0, 2.0, 3.0, 1.0, 2.0, 3.0]);
    }

    #[test]
    #[should_panic(expected = "needs 6 values")]
    fn from_f32_rejects_a_wrong_length() {
        Matrix::from_f32(2, 3, vec![0.0; 5]);
    }

    #[test]
    #[should_panic(expected = "linear: x holds")]
    fn linear_rejects_a_wrong_input_length() {
        let w = Matrix::from_f32(2, 3, vec![0.0; 6]);
        linear(&[0.0; 5], 2, &w, None, &mut [0.0; 4]);
    }
}
