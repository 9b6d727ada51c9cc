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
/// Measured on a 2-core Sapphire Rapids (768→3072, f32 and bf16): GEMV still streams the
/// weights at full bandwidth at m = 8, and `gemm` only overtakes it at about m = 12.
const GEMV_MAX_M: usize = 8;

/// Fewest weight bytes one GEMV task streams, so that rayon's per-task cost (a few µs)
/// stays a few percent of the task.
const GEMV_MIN_TASK_BYTES: usize = 128 * 1024;

/// GEMV tasks per rayon thread: more than one, so work stealing evens out a thread that the
/// OS (or a noisy neighbour) slows down.
const GEMV_TASKS_PER_THREAD: usize = 4;

/// Weight rows dotted in one pass: independent accumulators hide the FMA latency and give
/// the hardware prefetcher several streams.
const GEMV_ROW_GROUP: usize = 4;

/// Activation rows dotted against a row group per pass (4 × 4 accumulator registers).
const GEMV_X_GROUP: usize = 4;

/// Most bf16 weight rows widened to an f32 scratch for one `gemm` call in prefill.
const PREFILL_BF16_BLOCK_ROWS: usize = 256;

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
        Matrix { rows, cols, data: Storage::F32(data) }
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
                Matrix { rows, cols, data: Storage::Bf16(data) }
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
        assert!(r < self.rows, "row {r} out of range for a matrix of {} rows", self.rows);
        assert_eq!(out.len(), self.cols, "row_to_f32: output holds {} values, row has {}", out.len(), self.cols);
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
    assert_eq!(len, rows * cols, "{what}: a {rows}×{cols} matrix needs {} values, got {len}", rows * cols);
}

/// out[m × rows] = x[m × cols] · Wᵀ (+ bias[rows] broadcast over the m rows).
///
/// Uses the *current* rayon thread pool (callers `pool.install(..)`) for parallelism. For
/// m ≤ 8 each output is computed wholly by one task in a fixed order, so results do not
/// depend on the number of threads, and row i of a batch equals the same row run alone.
///
/// # Panics
/// If `x.len() != m * w.cols()`, `out.len() != m * w.rows()` or `bias.len() != w.rows()`.
pub fn linear(x: &[f32], m: usize, w: &Matrix, bias: Option<&[f32]>, out: &mut [f32]) {
    let kernel = if m <= GEMV_MAX_M { Kernel::Gemv } else { Kernel::Gemm };
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
    assert!(level <= SimdLevel::detected(), "{level:?} kernels requested on a CPU without them");
    let (rows, cols) = (w.rows, w.cols);
    assert_eq!(x.len(), m * cols, "linear: x holds {} values, expected m×cols = {m}×{cols}", x.len());
    assert_eq!(out.len(), m * rows, "linear: out holds {} values, expected m×rows = {m}×{rows}", out.len());
    if let Some(b) = bias {
        assert_eq!(b.len(), rows, "linear: bias holds {} values, matrix has {rows} rows", b.len());
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
    let chunk_rows = balanced_rows.max(min_rows).next_multiple_of(GEMV_ROW_GROUP);
    let n_tasks = rows.div_ceil(chunk_rows);

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
            Storage::F32(d) => gemv_rows(level, x, m, cols, &d[r0 * cols..r1 * cols], bias, &mut outs),
            Storage::Bf16(d) => gemv_rows(level, x, m, cols, &d[r0 * cols..r1 * cols], bias, &mut outs),
        }
    };
    if n_tasks == 1 {
        tasks.into_iter().enumerate().for_each(run);
    } else {
        tasks.into_par_iter().enumerate().for_each(run);
    }
}

/// Dots the weight rows `w` (`outs[i].len()` rows of `cols`) with every row of `x`.
fn gemv_rows<T: Weight>(
    level: SimdLevel,
    x: &[f32],
    m: usize,
    cols: usize,
    w: &[T],
    bias: Option<&[f32]>,
    outs: &mut [&mut [f32]],
) {
    let n = outs[0].len();
    let grouped = n - n % GEMV_ROW_GROUP;
    for r in (0..grouped).step_by(GEMV_ROW_GROUP) {
        gemv_group::<T, GEMV_ROW_GROUP>(level, x, m, cols, &w[r * cols..], r, bias, outs);
    }
    for r in grouped..n {
        gemv_group::<T, 1>(level, x, m, cols, &w[r * cols..], r, bias, outs);
    }
}

/// Dots `R` weight rows (the start of `w`) with all `m` activation rows, `GEMV_X_GROUP` at
/// a time, and stores them at column `r` of each output row.
#[allow(clippy::too_many_arguments)]
fn gemv_group<T: Weight, const R: usize>(
    level: SimdLevel,
    x: &[f32],
    m: usize,
    cols: usize,
    w: &[T],
    r: usize,
    bias: Option<&[f32]>,
    outs: &mut [&mut [f32]],
) {
    let w = &w[..R * cols];
    let mut i = 0;
    while i < m {
        let xs = (m - i).min(GEMV_X_GROUP);
        let x = &x[i * cols..(i + xs) * cols];
        let outs = &mut outs[i..i + xs];
        match xs {
            1 => store(dot_tile::<T, R, 1>(level, w, x, cols), r, bias, outs),
            2 => store(dot_tile::<T, R, 2>(level, w, x, cols), r, bias, outs),
            3 => store(dot_tile::<T, R, 3>(level, w, x, cols), r, bias, outs),
            _ => store(dot_tile::<T, R, 4>(level, w, x, cols), r, bias, outs),
        }
        i += xs;
    }
}

fn store<const R: usize, const MR: usize>(
    dots: [[f32; R]; MR],
    r: usize,
    bias: Option<&[f32]>,
    outs: &mut [&mut [f32]],
) {
    for (out, dots) in outs.iter_mut().zip(dots) {
        let out = &mut out[r..r + R];
        match bias {
            Some(b) => {
                for ((o, d), b) in out.iter_mut().zip(dots).zip(&b[r..r + R]) {
                    *o = d + b;
                }
            }
            None => out.copy_from_slice(&dots),
        }
    }
}

/// `[i][r] = x[i] · w[r]` for `R` weight rows and `MR` activation rows of `cols` values.
///
/// Each dot is accumulated on its own, lane by lane in column order, then reduced in a fixed
/// order: the result for a pair of rows does not depend on `R`, `MR` or which task ran it.
fn dot_tile<T: Weight, const R: usize, const MR: usize>(
    level: SimdLevel,
    w: &[T],
    x: &[f32],
    cols: usize,
) -> [[f32; R]; MR] {
    assert!(w.len() == R * cols && x.len() == MR * cols);
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `linear_with` only lets levels up to `SimdLevel::detected()` through, so
        // the CPU has AVX-512 F+BW; the lengths asserted above are the ones the kernel reads.
        SimdLevel::Avx512 => unsafe { x86::dot_tile_avx512::<T, R, MR>(w.as_ptr(), x.as_ptr(), cols) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above, the CPU has AVX2 and FMA; lengths asserted above.
        SimdLevel::Avx2 => unsafe { x86::dot_tile_avx2::<T, R, MR>(w.as_ptr(), x.as_ptr(), cols) },
        _ => dot_tile_scalar::<T, R, MR>(w, x, cols),
    }
}

/// Portable kernel: eight interleaved partial sums per dot (which the compiler may keep in a
/// vector register), the same summation shape as the SIMD kernels.
fn dot_tile_scalar<T: Weight, const R: usize, const MR: usize>(w: &[T], x: &[f32], cols: usize) -> [[f32; R]; MR] {
    const LANES: usize = 8;
    let mut out = [[0.0; R]; MR];
    for (xi, out_i) in x.chunks_exact(cols).zip(out.iter_mut()) {
        for (wr, o) in w.chunks_exact(cols).zip(out_i.iter_mut()) {
            let mut lanes = [0.0f32; LANES];
            let (wc, xc) = (wr.chunks_exact(LANES), xi.chunks_exact(LANES));
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
    }
    out
}

/// A stored weight type the kernels widen to f32.
trait Weight: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;

    /// Widens 16 weights at `p`.
    ///
    /// # Safety
    /// The CPU has AVX-512 F+BW; `p..p + 16` is readable.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;

    /// Widens the weights at `p` selected by `mask`, zero elsewhere.
    ///
    /// # Safety
    /// The CPU has AVX-512 F+BW; the masked-in elements of `p..p + 16` are readable (the
    /// others are never touched).
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16_masked(p: *const Self, mask: u16) -> std::arch::x86_64::__m512;

    /// Widens 8 weights at `p`.
    ///
    /// # Safety
    /// The CPU has AVX2; `p..p + 8` is readable.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;

    /// Widens the first `n < 8` weights at `p`, zero in the other lanes.
    ///
    /// # Safety
    /// The CPU has AVX2; `p..p + n` is readable.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8_partial(p: *const Self, n: usize) -> std::arch::x86_64::__m256;
}

impl Weight for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn load16(p: *const f32) -> std::arch::x86_64::__m512 {
        std::arch::x86_64::_mm512_loadu_ps(p)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn load16_masked(p: *const f32, mask: u16) -> std::arch::x86_64::__m512 {
        std::arch::x86_64::_mm512_maskz_loadu_ps(mask, p)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load8(p: *const f32) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load8_partial(p: *const f32, n: usize) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_maskload_ps(p, x86::lane_mask8(n))
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
    unsafe fn load16(p: *const bf16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        x86::widen_bf16x16(_mm256_loadu_si256(p.cast()))
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn load16_masked(p: *const bf16, mask: u16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        let v = _mm512_maskz_loadu_epi16(u32::from(mask), p.cast());
        x86::widen_bf16x16(_mm512_castsi512_si256(v))
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load8(p: *const bf16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        x86::widen_bf16x8(_mm_loadu_si128(p.cast()))
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load8_partial(p: *const bf16, n: usize) -> std::arch::x86_64::__m256 {
        let mut buf = [half::bf16::ZERO; 8];
        std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), n);
        x86::widen_bf16x8(std::arch::x86_64::_mm_loadu_si128(buf.as_ptr().cast()))
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The x86-64 GEMV kernels. Every function here is `unsafe` because it needs the CPU
    //! features in its `target_feature` attribute; callers check them at run time.

    use std::arch::x86_64::*;

    use super::Weight;

    /// bf16 bits are the upper half of the f32 with the same value: zero-extend, shift.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn widen_bf16x16(v: __m256i) -> __m512 {
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(v)))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn widen_bf16x8(v: __m128i) -> __m256 {
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(v)))
    }

    /// Lane mask with the first `n` of 8 lanes set, for `maskload`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn lane_mask8(n: usize) -> __m256i {
        _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn reduce_add256(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    /// See `super::dot_tile`.
    ///
    /// # Safety
    /// The CPU has AVX-512 F+BW; `w` points at `R * cols` weights and `x` at `MR * cols`
    /// floats (row-major, row stride `cols`).
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn dot_tile_avx512<T: Weight, const R: usize, const MR: usize>(
        w: *const T,
        x: *const f32,
        cols: usize,
    ) -> [[f32; R]; MR] {
        let mut acc = [[_mm512_setzero_ps(); R]; MR];
        let mut xv = [_mm512_setzero_ps(); MR];
        let mut k = 0;
        while k + 16 <= cols {
            for (i, xv) in xv.iter_mut().enumerate() {
                // SAFETY: k + 16 <= cols, so the 16 floats are inside x row i.
                *xv = _mm512_loadu_ps(x.add(i * cols + k));
            }
            for r in 0..R {
                // SAFETY: k + 16 <= cols, inside weight row r.
                let wv = T::load16(w.add(r * cols + k));
                for (acc, xv) in acc.iter_mut().zip(&xv) {
                    acc[r] = _mm512_fmadd_ps(wv, *xv, acc[r]);
                }
            }
            k += 16;
        }
        if k < cols {
            let mask = ((1u32 << (cols - k)) - 1) as u16;
            for (i, xv) in xv.iter_mut().enumerate() {
                // SAFETY: the mask selects only the cols - k floats left in x row i.
                *xv = _mm512_maskz_loadu_ps(mask, x.add(i * cols + k));
            }
            for r in 0..R {
                // SAFETY: the mask selects only the cols - k weights left in row r.
                let wv = T::load16_masked(w.add(r * cols + k), mask);
                for (acc, xv) in acc.iter_mut().zip(&xv) {
                    acc[r] = _mm512_fmadd_ps(wv, *xv, acc[r]);
                }
            }
        }
        let mut out = [[0.0; R]; MR];
        for (out, acc) in out.iter_mut().zip(&acc) {
            for (o, a) in out.iter_mut().zip(acc) {
                *o = _mm512_reduce_add_ps(*a);
            }
        }
        out
    }

    /// See `super::dot_tile`.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; `w` points at `R * cols` weights and `x` at `MR * cols`
    /// floats (row-major, row stride `cols`).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_tile_avx2<T: Weight, const R: usize, const MR: usize>(
        w: *const T,
        x: *const f32,
        cols: usize,
    ) -> [[f32; R]; MR] {
        let mut acc = [[_mm256_setzero_ps(); R]; MR];
        let mut xv = [_mm256_setzero_ps(); MR];
        let mut k = 0;
        while k + 8 <= cols {
            for (i, xv) in xv.iter_mut().enumerate() {
                // SAFETY: k + 8 <= cols, so the 8 floats are inside x row i.
                *xv = _mm256_loadu_ps(x.add(i * cols + k));
            }
            for r in 0..R {
                // SAFETY: k + 8 <= cols, inside weight row r.
                let wv = T::load8(w.add(r * cols + k));
                for (acc, xv) in acc.iter_mut().zip(&xv) {
                    acc[r] = _mm256_fmadd_ps(wv, *xv, acc[r]);
                }
            }
            k += 8;
        }
        if k < cols {
            let n = cols - k;
            let mask = lane_mask8(n);
            for (i, xv) in xv.iter_mut().enumerate() {
                // SAFETY: the mask selects only the n floats left in x row i.
                *xv = _mm256_maskload_ps(x.add(i * cols + k), mask);
            }
            for r in 0..R {
                // SAFETY: n weights are left in row r.
                let wv = T::load8_partial(w.add(r * cols + k), n);
                for (acc, xv) in acc.iter_mut().zip(&xv) {
                    acc[r] = _mm256_fmadd_ps(wv, *xv, acc[r]);
                }
            }
        }
        let mut out = [[0.0; R]; MR];
        for (out, acc) in out.iter_mut().zip(&acc) {
            for (o, a) in out.iter_mut().zip(acc) {
                *o = reduce_add256(*a);
            }
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
            let par = if parallel { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
            // SAFETY: `linear_with` checked x = m×cols, W = rows×cols and out = m×rows, the
            // extents this call reads and writes; `out` is borrowed mutably, so unaliased.
            unsafe { gemm_x_wt(m, rows, cols, out.as_mut_ptr(), rows, x.as_ptr(), d.as_ptr(), par) };
        }
        Storage::Bf16(d) => {
            let block_rows = if parallel {
                rows.div_ceil(2 * threads).next_multiple_of(16).min(PREFILL_BF16_BLOCK_ROWS)
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
                (0..rows).into_par_iter().step_by(block_rows).for_each_init(Vec::new, run);
            } else {
                let mut scratch = Vec::new();
                (0..rows).step_by(block_rows).for_each(|r0| run(&mut scratch, r0));
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

    const SHAPES: [(usize, usize); 6] = [(1, 1), (3, 17), (37, 129), (250, 768), (16, 64), (9, 23)];
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
                let exact: f64 = xi.iter().zip(&row).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum();
                let scale: f64 = xi.iter().zip(&row).map(|(&a, &b)| (f64::from(a) * f64::from(b)).abs()).sum();
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

    fn run(level: SimdLevel, kernel: Kernel, x: &[f32], m: usize, w: &Matrix, bias: Option<&[f32]>) -> Vec<f32> {
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
                                let what = format!("{level:?} {kernel:?} {dtype} {rows}×{cols} m={m} bias={}", b.is_some());
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
                        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                        pool.install(|| run(level, Kernel::Gemv, &x, m, &w, Some(&bias)))
                    })
                    .collect();
                assert!(outs.iter().all(|o| o == &outs[0]), "{level:?} {dtype}: outputs differ by thread count");
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
                    let single = run(level, Kernel::Gemv, &x[i * cols..(i + 1) * cols], 1, &w, None);
                    assert_eq!(&batch[i * rows..(i + 1) * rows], single.as_slice(), "{level:?} {dtype} row {i}");
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
        let data: Vec<f32> = cases.iter().map(|&(bits, _)| f32::from_bits(bits)).collect();
        let w = Matrix::new(1, cases.len(), data, WeightDtype::Bf16);
        let mut row = vec![0.0; cases.len()];
        w.row_to_f32(0, &mut row);
        for (&(bits, want), got) in cases.iter().zip(&row) {
            assert_eq!(got.to_bits() >> 16, u32::from(want), "f32 bits {bits:#010x}");
        }

        // A sweep against half's converter and an independent bit formula.
        let data = values(4096, 6).into_iter().map(|v| v * 1e3).collect::<Vec<_>>();
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
        let want: Vec<f32> = data[17..34].iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
        assert_eq!(row, want);
    }

    #[test]
    fn size_bytes_follows_the_storage_dtype() {
        let w = Matrix::new(3, 17, values(51, 8), WeightDtype::F32);
        assert_eq!((w.rows(), w.cols(), w.dtype(), w.size_bytes()), (3, 17, WeightDtype::F32, 204));
        let w = Matrix::new(3, 17, values(51, 8), WeightDtype::Bf16);
        assert_eq!((w.rows(), w.cols(), w.dtype(), w.size_bytes()), (3, 17, WeightDtype::Bf16, 102));
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
