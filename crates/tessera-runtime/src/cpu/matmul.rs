//! Weight matrices and the linear layer `out = x·Wᵀ + b`, batch-invariant.
//!
//! # The guarantee
//!
//! Row i of `out` depends only on row i of `x`, the weights and the bias: it is bit-identical
//! whatever the batch size `m`, wherever the row sits in the batch, however many rayon threads
//! run the call and whichever SIMD level (AVX-512, AVX2+FMA, portable scalar) the CPU has.
//! Continuous batching puts a sequence's rows in one step with other sequences' decode rows
//! and prefill chunks, so the same row is computed at many batch sizes and positions; this is
//! what lets a request produce the same tokens whatever else is in the batch.
//!
//! Every output element is therefore one fused multiply-add chain over k in order, from 0.0:
//! `acc = fma(x[k], w[k], acc)` for k = 0..cols, then `out = acc + bias` (one rounding).
//! FMA is correctly rounded, so a hardware FMA lane and `f32::mul_add` give the same bits;
//! bf16 weights widen exactly to f32 (a bf16 is the top half of an f32) before the FMA.
//! Nothing ever splits the k loop across lanes, tiles or threads.
//!
//! # The design
//!
//! `Matrix::new` packs W into panels of `PANEL_WIDTH` (64) output features, stored k-major
//! inside the panel (`panel[k][0..64]`, zero-padded past `rows`), so that one panel is a single
//! sequential stream and the kernels vectorise across output features: broadcast `x[i][k]`,
//! load the panel's row k, FMA into one accumulator per (row, feature). That is the standard
//! outer-product microkernel, and its per-element order is exactly the canonical chain. A tile
//! is up to `TILE_ROWS` (6) activation rows × one panel: 24 zmm accumulators on AVX-512, and on
//! AVX2 four passes of 6 × 16. Any m is covered by full tiles and one smaller tile.
//!
//! Batch-1 decode streams every weight once per token and does one multiply-add per weight,
//! so it is bound by memory bandwidth: a tile of one row reads its panel sequentially with a
//! software prefetch a few KiB ahead, and its four independent FMA chains per k step are far
//! faster than memory. Prefill is compute bound: a group of panels (about 1 MB) stays in L2
//! while every row tile of the batch runs over each of its panels in turn, so a tile's rows
//! stay in L1 across the group and a large batch reads its activations once per group.
//! Measured on the 2-core development VM (GPT-2 shapes, m = 64 and 256): blocking k so that
//! a 128- or 256-row block of the panel stays in L1 (partial sums stored to `out` and
//! reloaded, which is exact) was no faster, and widening a bf16 panel once into an f32
//! scratch (a portable loop) was slower at m = 16–64 than widening each panel row in
//! registers, so neither is done.
//!
//! Parallelism uses the current rayon pool (callers `pool.install(..)`): tasks own groups of
//! panels and, for large batches, blocks of rows; a task computes whole output elements, so
//! the split never changes a result.

use std::sync::OnceLock;

use half::bf16;
use rayon::prelude::*;

use super::huge::{HugeBuf, Zeroable};
use crate::dtype::WeightDtype;

/// Output features per packed panel. 64 f32 are four zmm vectors (one AVX-512 tile row);
/// the numerics do not depend on it.
const PANEL_WIDTH: usize = 64;

/// Activation rows per register tile: 6 rows × 4 zmm = 24 accumulators of AVX-512's 32
/// registers (and 6 × 2 of AVX2's 16 per pass), leaving room for the weights and the
/// broadcast.
const TILE_ROWS: usize = 6;

/// Bytes of weights in a group of panels that the row tiles of a batch share while it is
/// in L2 (see `Matrix::panels_per_group`); half of a 2 MiB L2, leaving room for the
/// activations and the output.
const PANEL_GROUP_BYTES: usize = 1 << 20;

/// Fewest weight bytes one task streams, so that rayon's per-task cost (a few µs) stays a few
/// percent of the task; matrices smaller than two of these run on the calling thread.
const MIN_TASK_BYTES: usize = 128 * 1024;

/// Tasks per rayon thread: several, so that work stealing evens out the end of a call (and a
/// thread the OS or a noisy neighbour slows down). A thread runs neighbouring tasks in order,
/// so its weights still stream sequentially. Measured for the GEMV this kernel replaced: 8
/// per thread is 5–10% faster than 1–2 on a whole GPT-2 decode step.
const TASKS_PER_THREAD: usize = 8;

/// Fewest activation rows in a task's block when a large batch is also split over rows
/// (each row block reads the task's panels again, from cache).
const MIN_TASK_ROWS: usize = 4 * TILE_ROWS;

/// How far ahead of the kernels' reads a streaming tile prefetches weights (into L2). The
/// hardware prefetcher alone keeps too few lines in flight on one core: measured on a whole
/// GPT-2 decode step, 4–16 KiB ahead is 25–50% faster than none.
#[cfg(target_arch = "x86_64")]
const PREFETCH_AHEAD_BYTES: usize = 8 * 1024;

/// One 64-byte cache line of packed weights; the packed storage is a vector of these so that
/// every panel row starts on a cache line (a vector load never splits two lines).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct CacheLine([u8; 64]);

// SAFETY: bytes; all zero is a valid line.
unsafe impl Zeroable for CacheLine {}

/// A weight matrix `[rows = out_features, cols = in_features]` (nn.Linear layout), packed into
/// panels for `linear` (see the module documentation).
#[derive(Clone)]
pub struct Matrix {
    rows: usize,
    cols: usize,
    dtype: WeightDtype,
    /// `rows.div_ceil(PANEL_WIDTH)` panels of `cols × PANEL_WIDTH` weights each, k-major. A
    /// bf16 panel row pairs features within each group of 32 (see `bf16_slot`).
    panels: HugeBuf<CacheLine>,
}

impl std::fmt::Debug for Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Matrix")
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .field("dtype", &self.dtype)
            .finish_non_exhaustive()
    }
}

/// Where feature `j` (0..64) of a panel row sits among its 64 bf16 values. Within each group
/// of 32 features, 32-bit lane l holds feature l in its low half and feature l + 16 in its
/// high half: shifting a lane left by 16 then gives feature l as an f32 and masking off the
/// low half gives feature l + 16, two instructions to widen 32 features.
fn bf16_slot(j: usize) -> usize {
    let (group, f) = (j / 32, j % 32);
    32 * group + 2 * (f % 16) + f / 16
}

impl Matrix {
    /// Packs f32 weights (row-major `rows × cols`) as f32.
    ///
    /// # Panics
    /// If `data.len() != rows * cols`.
    pub fn from_f32(rows: usize, cols: usize, data: Vec<f32>) -> Self {
        Self::new(rows, cols, data, WeightDtype::F32)
    }

    /// Packs row-major `rows × cols` weights as `dtype`; bf16 rounds each weight to nearest,
    /// ties to even.
    ///
    /// # Panics
    /// If `data.len() != rows * cols`, or for f16, which the CPU kernels do not read.
    pub fn new(rows: usize, cols: usize, data: Vec<f32>, dtype: WeightDtype) -> Self {
        check_len("Matrix::new", rows, cols, data.len());
        assert!(
            dtype != WeightDtype::F16,
            "the CPU backend stores weights as f32 or bf16, not f16"
        );
        let panel_lines = cols * PANEL_WIDTH * dtype.size_bytes() / 64;
        let n_panels = rows.div_ceil(PANEL_WIDTH);
        let mut panels = HugeBuf::<CacheLine>::zeroed(n_panels * panel_lines);
        if panel_lines > 0 {
            panels
                .par_chunks_mut(panel_lines)
                .enumerate()
                .for_each(|(p, panel)| {
                    let r0 = p * PANEL_WIDTH;
                    let width = (rows - r0).min(PANEL_WIDTH);
                    let src = &data[r0 * cols..(r0 + width) * cols];
                    match dtype {
                        WeightDtype::F32 => {
                            let panel = lines_as_mut::<f32>(panel);
                            for (j, row) in src.chunks_exact(cols).enumerate() {
                                for (k, &v) in row.iter().enumerate() {
                                    panel[k * PANEL_WIDTH + j] = v;
                                }
                            }
                        }
                        WeightDtype::F16 => unreachable!("refused above"),
                        WeightDtype::Bf16 => {
                            let panel = lines_as_mut::<u16>(panel);
                            for (j, row) in src.chunks_exact(cols).enumerate() {
                                let slot = bf16_slot(j);
                                for (k, &v) in row.iter().enumerate() {
                                    panel[k * PANEL_WIDTH + slot] = bf16::from_f32(v).to_bits();
                                }
                            }
                        }
                    }
                });
        }
        Matrix {
            rows,
            cols,
            dtype,
            panels,
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
        self.dtype
    }

    /// Bytes of weights one decode step streams through `linear`: `rows × cols × dtype size`.
    /// The packed storage pads the last panel to 64 features, so it holds up to 63 rows more.
    pub fn size_bytes(&self) -> usize {
        self.rows * self.cols * self.dtype.size_bytes()
    }

    /// Writes row `r` widened to f32 into `out` (embedding lookup of a tied embedding).
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
        let (p, j) = (r / PANEL_WIDTH, r % PANEL_WIDTH);
        let panel = self.panel_lines(p);
        match self.dtype {
            WeightDtype::F32 => {
                let panel = lines_as::<f32>(panel);
                for (o, row) in out.iter_mut().zip(panel.chunks_exact(PANEL_WIDTH)) {
                    *o = row[j];
                }
            }
            WeightDtype::F16 => unreachable!("Matrix::new refuses f16"),
            WeightDtype::Bf16 => {
                let panel = lines_as::<u16>(panel);
                let slot = bf16_slot(j);
                for (o, row) in out.iter_mut().zip(panel.chunks_exact(PANEL_WIDTH)) {
                    *o = bf16_to_f32(row[slot]);
                }
            }
        }
    }

    /// Panels a row tile runs over one after another, so that the tile's activation rows
    /// stay in L1 across them while the group's panels stay in L2: a large batch then
    /// reads its activations once per group instead of once per panel.
    fn panels_per_group(&self) -> usize {
        (PANEL_GROUP_BYTES / self.panel_bytes().max(1)).max(1)
    }

    /// Bytes of one packed panel: `cols` rows of `PANEL_WIDTH` weights.
    fn panel_bytes(&self) -> usize {
        self.cols * PANEL_WIDTH * self.dtype.size_bytes()
    }

    /// The cache lines of panel `p`.
    fn panel_lines(&self, p: usize) -> &[CacheLine] {
        let lines = self.panel_bytes() / 64;
        &self.panels[p * lines..(p + 1) * lines]
    }
}

/// A plain-old-data element of packed weights (f32 or bf16 bits).
trait Pod: Copy {}
impl Pod for f32 {}
impl Pod for u16 {}

/// The packed weights as their element type.
fn lines_as<T: Pod>(lines: &[CacheLine]) -> &[T] {
    let len = std::mem::size_of_val(lines) / std::mem::size_of::<T>();
    // SAFETY: `CacheLine` is 64 plain bytes aligned to 64, so the bytes of `lines` are valid
    // and aligned as `len` values of `T` (f32 or u16, for which every bit pattern is valid);
    // the view borrows `lines` for its whole life.
    unsafe { std::slice::from_raw_parts(lines.as_ptr().cast(), len) }
}

/// As `lines_as`, mutably.
fn lines_as_mut<T: Pod>(lines: &mut [CacheLine]) -> &mut [T] {
    let len = std::mem::size_of_val(lines) / std::mem::size_of::<T>();
    // SAFETY: as in `lines_as`; the view borrows `lines` mutably, so it is the only access.
    unsafe { std::slice::from_raw_parts_mut(lines.as_mut_ptr().cast(), len) }
}

/// Widens bf16 bits to the f32 they denote (exact).
fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
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
/// Row i of `out` is bit-identical for every `m`, every position of the row in the batch,
/// every thread count and every SIMD level (see the module documentation). Uses the *current*
/// rayon thread pool (callers `pool.install(..)`) for parallelism.
///
/// # Panics
/// If `x.len() != m * w.cols()`, `out.len() != m * w.rows()` or `bias.len() != w.rows()`.
pub fn linear(x: &[f32], m: usize, w: &Matrix, bias: Option<&[f32]>, out: &mut [f32]) {
    linear_with(SimdLevel::detected(), x, m, w, bias, out);
}

/// Instruction set the kernels run with, ordered from least to most capable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // only x86-64 has SIMD kernels
pub(super) enum SimdLevel {
    Scalar,
    /// AVX2 + FMA, 8 lanes.
    Avx2,
    /// AVX-512 F + BW, 16 lanes.
    Avx512,
}

impl SimdLevel {
    /// The best level this CPU supports, detected once per process.
    pub(super) fn detected() -> SimdLevel {
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

/// `linear` at the SIMD level chosen by the caller (tests force each one).
fn linear_with(
    level: SimdLevel,
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

    let plan = Plan::new(m, w, rayon::current_num_threads());
    let call = Call {
        level,
        x,
        m,
        w,
        bias,
        out: SendPtr(out.as_mut_ptr()),
    };
    let run = |t: usize| {
        let (group, block) = (t / plan.row_blocks, t % plan.row_blocks);
        let p0 = group * plan.panels_per_task;
        let p1 = (p0 + plan.panels_per_task).min(plan.n_panels);
        let r0 = block * plan.rows_per_block;
        let r1 = (r0 + plan.rows_per_block).min(m);
        // SAFETY: task t computes the output elements of rows r0..r1 in the columns of panels
        // p0..p1, a set no other task of this call touches; `out` (m×rows, checked above) is
        // borrowed mutably for the whole call and not otherwise used meanwhile.
        unsafe { call.run_task(p0..p1, r0..r1) };
    };
    let tasks = plan.groups() * plan.row_blocks;
    if tasks == 1 {
        run(0);
    } else {
        (0..tasks).into_par_iter().for_each(run);
    }
}

/// How a call splits into tasks: groups of `panels_per_task` panels × blocks of
/// `rows_per_block` activation rows. Task t is group `t / row_blocks`, block
/// `t % row_blocks`, so a thread's contiguous run of tasks streams neighbouring panels.
struct Plan {
    n_panels: usize,
    panels_per_task: usize,
    rows_per_block: usize,
    row_blocks: usize,
}

impl Plan {
    fn new(m: usize, w: &Matrix, threads: usize) -> Plan {
        let n_panels = w.rows.div_ceil(PANEL_WIDTH);
        if threads <= 1 {
            return Plan {
                n_panels,
                panels_per_task: n_panels,
                rows_per_block: m,
                row_blocks: 1,
            };
        }
        let target = threads * TASKS_PER_THREAD;
        let panel_bytes = w.panel_bytes();
        let panels_per_task = n_panels
            .div_ceil(target)
            .max(MIN_TASK_BYTES.div_ceil(panel_bytes))
            .min(n_panels);
        let groups = n_panels.div_ceil(panels_per_task);
        let wanted_blocks = target.div_ceil(groups).min(m / MIN_TASK_ROWS).max(1);
        let rows_per_block = m.div_ceil(wanted_blocks).next_multiple_of(TILE_ROWS);
        Plan {
            n_panels,
            panels_per_task,
            rows_per_block,
            row_blocks: m.div_ceil(rows_per_block),
        }
    }

    fn groups(&self) -> usize {
        self.n_panels.div_ceil(self.panels_per_task)
    }
}

/// The arguments of one `linear` call, shared by its tasks.
struct Call<'a> {
    level: SimdLevel,
    x: &'a [f32],
    m: usize,
    w: &'a Matrix,
    bias: Option<&'a [f32]>,
    out: SendPtr,
}

impl Call<'_> {
    /// Computes the output elements of activation rows `rows` in the columns of `panels`,
    /// a group of panels at a time (`Matrix::panels_per_group`): every row tile runs over
    /// each panel of the group in turn, its rows staying in L1 and the group in L2.
    ///
    /// # Safety
    /// Nothing else reads or writes those output elements during the call.
    unsafe fn run_task(&self, panels: std::ops::Range<usize>, rows: std::ops::Range<usize>) {
        debug_assert!(rows.end <= self.m);
        let group = self.w.panels_per_group();
        let mut g0 = panels.start;
        while g0 < panels.end {
            let g1 = (g0 + group).min(panels.end);
            let mut i = rows.start;
            while i < rows.end {
                let tile_rows = (rows.end - i).min(TILE_ROWS);
                for p in g0..g1 {
                    // Only the first tile streams a panel from memory; the others find it
                    // in cache, where prefetching would only cost instructions.
                    // SAFETY: the caller gives this task these rows of these panels alone.
                    unsafe { self.run_panel_tile(p, i, tile_rows, i == rows.start) };
                }
                i += tile_rows;
            }
            g0 = g1;
        }
    }

    /// One register tile: `tile_rows` activation rows from row `i` × panel `p`. `stream`:
    /// the first tile over the panel, which reads it from memory (and prefetches ahead).
    ///
    /// # Safety
    /// As `run_task`, for those output elements.
    #[inline(always)]
    unsafe fn run_panel_tile(&self, p: usize, i: usize, tile_rows: usize, stream: bool) {
        let (n_out, cols) = (self.w.rows, self.w.cols);
        let c0 = p * PANEL_WIDTH;
        let tile = Tile {
            x: self.x[i * cols..].as_ptr(),
            x_stride: cols,
            w: self.w.panel_lines(p).as_ptr().cast(),
            k_len: cols,
            // SAFETY: row i < m and column c0 < rows: inside `out` (m×rows).
            out: unsafe { self.out.get().add(i * n_out + c0) },
            out_stride: n_out,
            width: (n_out - c0).min(PANEL_WIDTH),
            bias: self.bias.map(|b| b[c0..].as_ptr()),
        };
        // SAFETY: the tile reads `tile_rows` rows of x from row i (i + tile_rows <= m) and
        // the whole panel p, and writes the tile's `width` columns of those rows, which the
        // caller gives this task alone.
        unsafe { run_tile(self.level, self.w.dtype, tile_rows, stream, &tile) };
    }
}

/// One register tile: up to `TILE_ROWS` activation rows × one panel, over `k_len` values of k.
struct Tile {
    /// `x[i][k]` is at `x + i * x_stride + k`.
    x: *const f32,
    x_stride: usize,
    /// The panel's first row (`k_len` rows of `PANEL_WIDTH` packed weights follow).
    w: *const u8,
    k_len: usize,
    /// `out[i][j]` is at `out + i * out_stride + j`, for the tile's `width` columns.
    out: *mut f32,
    out_stride: usize,
    /// Features of the panel that exist (the rest are padding, computed and discarded).
    width: usize,
    /// The bias of the tile's first column, added to the finished chains.
    bias: Option<*const f32>,
}

/// Runs the tile kernel for `level`, `dtype` and `rows` activation rows.
///
/// # Safety
/// `t` describes `rows` readable rows of x, a readable panel of `t.k_len` rows of `dtype`
/// weights, `t.width` readable bias values if any, and `rows` × `t.width` outputs no one else
/// accesses; `level` is at most `SimdLevel::detected()`.
unsafe fn run_tile(level: SimdLevel, dtype: WeightDtype, rows: usize, stream: bool, t: &Tile) {
    macro_rules! dispatch {
        ($kernel:ident, $bf16:literal) => {
            match (rows, stream) {
                (1, true) => $kernel::<$bf16, 1, true>(t),
                (1, false) => $kernel::<$bf16, 1, false>(t),
                (2, true) => $kernel::<$bf16, 2, true>(t),
                (2, false) => $kernel::<$bf16, 2, false>(t),
                (3, true) => $kernel::<$bf16, 3, true>(t),
                (3, false) => $kernel::<$bf16, 3, false>(t),
                (4, true) => $kernel::<$bf16, 4, true>(t),
                (4, false) => $kernel::<$bf16, 4, false>(t),
                (5, true) => $kernel::<$bf16, 5, true>(t),
                (5, false) => $kernel::<$bf16, 5, false>(t),
                (6, true) => $kernel::<$bf16, 6, true>(t),
                (6, false) => $kernel::<$bf16, 6, false>(t),
                _ => unreachable!("tiles have 1 to {TILE_ROWS} rows"),
            }
        };
    }
    let bf16 = dtype == WeightDtype::Bf16;
    // SAFETY (each arm): the caller's contract is the kernels' contract; the x86 arms run only
    // at a level the CPU supports.
    unsafe {
        match (level, bf16) {
            #[cfg(target_arch = "x86_64")]
            (SimdLevel::Avx512, false) => dispatch!(tile_avx512, false),
            #[cfg(target_arch = "x86_64")]
            (SimdLevel::Avx512, true) => dispatch!(tile_avx512, true),
            #[cfg(target_arch = "x86_64")]
            (SimdLevel::Avx2, false) => dispatch!(tile_avx2, false),
            #[cfg(target_arch = "x86_64")]
            (SimdLevel::Avx2, true) => dispatch!(tile_avx2, true),
            (_, false) => dispatch!(tile_scalar, false),
            (_, true) => dispatch!(tile_scalar, true),
        }
    }
}

/// Portable kernel, the same outer product as the SIMD ones: per k, each (row, feature)
/// accumulator takes one `f32::mul_add` (correctly rounded, so equal to a hardware FMA lane).
/// Where the target has FMA (aarch64, for one) the compiler can vectorise the feature loop.
///
/// # Safety
/// As `run_tile`, with `MR` rows.
unsafe fn tile_scalar<const BF16: bool, const MR: usize, const STREAM: bool>(t: &Tile) {
    let mut acc = [[0.0f32; PANEL_WIDTH]; MR];
    let mut row = [0.0f32; PANEL_WIDTH];
    for k in 0..t.k_len {
        // SAFETY: k < k_len, so panel row k (64 packed weights) is readable.
        unsafe {
            if BF16 {
                let packed = t.w.cast::<u16>().add(k * PANEL_WIDTH);
                for (j, w) in row.iter_mut().enumerate() {
                    *w = bf16_to_f32(*packed.add(bf16_slot(j)));
                }
            } else {
                let packed = t.w.cast::<f32>().add(k * PANEL_WIDTH);
                row.copy_from_slice(std::slice::from_raw_parts(packed, PANEL_WIDTH));
            }
        }
        for (i, acc) in acc.iter_mut().enumerate() {
            // SAFETY: row i < MR of x, column k < k_len.
            let xv = unsafe { *t.x.add(i * t.x_stride + k) };
            for (a, &w) in acc.iter_mut().zip(&row) {
                *a = xv.mul_add(w, *a);
            }
        }
    }
    for (i, acc) in acc.iter().enumerate() {
        for (j, &a) in acc.iter().enumerate().take(t.width) {
            // SAFETY: j < width: a bias value and an output of this tile.
            unsafe {
                let out = t.out.add(i * t.out_stride + j);
                *out = match t.bias {
                    Some(b) => a + *b.add(j),
                    None => a,
                };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
use x86::{tile_avx2, tile_avx512};

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The x86-64 tile kernels (see `super::run_tile`). Each is `unsafe` because it needs the
    //! CPU features in its `target_feature` attribute, which callers check at run time, and
    //! follows the pointers of its `Tile`.
    //!
    //! Per k: broadcast `x[i][k]` for each tile row, load the panel's row k (widening bf16),
    //! and FMA into the (row, feature) accumulator: the canonical chain per output element.

    use std::arch::x86_64::*;

    use super::{Tile, PANEL_WIDTH, PREFETCH_AHEAD_BYTES};

    /// Bytes of one panel row.
    const fn row_bytes(bf16: bool) -> usize {
        PANEL_WIDTH * if bf16 { 2 } else { 4 }
    }

    /// Hints the panel row `PREFETCH_AHEAD_BYTES` past `row` into L2, one prefetch per cache
    /// line. Never faults, so the lines may lie past the end of the weights.
    #[inline(always)]
    fn prefetch_row<const BF16: bool>(row: *const u8) {
        let ahead = row.wrapping_add(PREFETCH_AHEAD_BYTES);
        for line in 0..row_bytes(BF16) / 64 {
            // SAFETY: a prefetch (baseline SSE) only hints the cache; it never faults or reads.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(ahead.wrapping_add(64 * line).cast()) };
        }
    }

    /// Lane masks of the four 16-feature vectors of a panel row with `width` features.
    #[inline(always)]
    fn masks16(width: usize) -> [__mmask16; 4] {
        std::array::from_fn(|v| {
            let n = width.saturating_sub(16 * v).min(16);
            ((1u32 << n) - 1) as __mmask16
        })
    }

    /// Panel row k as four vectors of features 0..16, 16..32, 32..48, 48..64.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn load_row_avx512<const BF16: bool>(row: *const u8) -> [__m512; 4] {
        // SAFETY (all loads here): the caller points `row` at a whole panel row.
        unsafe {
            if BF16 {
                let high_half = _mm512_set1_epi32(0xFFFF_0000_u32 as i32);
                let a = _mm512_loadu_si512(row.cast());
                let b = _mm512_loadu_si512(row.add(64).cast());
                [
                    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(a)),
                    _mm512_castsi512_ps(_mm512_and_si512(a, high_half)),
                    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(b)),
                    _mm512_castsi512_ps(_mm512_and_si512(b, high_half)),
                ]
            } else {
                let p = row.cast::<f32>();
                [
                    _mm512_loadu_ps(p),
                    _mm512_loadu_ps(p.add(16)),
                    _mm512_loadu_ps(p.add(32)),
                    _mm512_loadu_ps(p.add(48)),
                ]
            }
        }
    }

    /// `MR` rows × 64 features in 4 × `MR` zmm accumulators.
    ///
    /// # Safety
    /// As `super::run_tile`, with `MR` rows, on a CPU with AVX-512 F+BW.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn tile_avx512<const BF16: bool, const MR: usize, const STREAM: bool>(
        t: &Tile,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 4]; MR];
        let mut w = t.w;
        let mut x = t.x;
        for _ in 0..t.k_len {
            if STREAM {
                prefetch_row::<BF16>(w);
            }
            // SAFETY: fewer than k_len rows have been consumed, so `w` is a panel row and `x`
            // column k of each of the MR rows.
            unsafe {
                let wv = load_row_avx512::<BF16>(w);
                for (i, acc) in acc.iter_mut().enumerate() {
                    let xb = _mm512_set1_ps(*x.add(i * t.x_stride));
                    for (a, wv) in acc.iter_mut().zip(wv) {
                        *a = _mm512_fmadd_ps(xb, wv, *a);
                    }
                }
                w = w.add(row_bytes(BF16));
                x = x.add(1);
            }
        }
        let masks = masks16(t.width);
        if let Some(b) = t.bias {
            for (v, &mask) in masks.iter().enumerate() {
                // SAFETY: the mask selects only the tile's `width` bias values; masked-off
                // lanes are not read.
                let bv = unsafe { _mm512_maskz_loadu_ps(mask, b.wrapping_add(16 * v)) };
                for acc in acc.iter_mut() {
                    acc[v] = _mm512_add_ps(acc[v], bv);
                }
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            let out = t.out.wrapping_add(i * t.out_stride);
            for (v, &mask) in masks.iter().enumerate() {
                // SAFETY: the mask selects only the tile's `width` outputs of row i.
                unsafe { _mm512_mask_storeu_ps(out.wrapping_add(16 * v), mask, acc[v]) };
            }
        }
    }

    /// Lane mask with the first `n` (≤ 8) of 8 lanes set, for `maskload`/`maskstore`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn lane_mask8(n: usize) -> __m256i {
        _mm256_cmpgt_epi32(
            _mm256_set1_epi32(n as i32),
            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
        )
    }

    /// `MR` rows × 64 features in four passes of 16 features (2 × `MR` ymm accumulators).
    /// Pass s of an f32 panel covers features 16s..16s+8 and 16s+8..16s+16; of a bf16 panel
    /// (one 256-bit load of 16 packed values, see `super::bf16_slot`) features c..c+8 and
    /// c+16..c+24 with c = 32·(s/2) + 8·(s%2).
    ///
    /// # Safety
    /// As `super::run_tile`, with `MR` rows, on a CPU with AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile_avx2<const BF16: bool, const MR: usize, const STREAM: bool>(
        t: &Tile,
    ) {
        let high_half = _mm256_set1_epi32(0xFFFF_0000_u32 as i32);
        for pass in 0..4 {
            let (first, second, offset) = if BF16 {
                let c = 32 * (pass / 2) + 8 * (pass % 2);
                (c, c + 16, 32 * pass)
            } else {
                (16 * pass, 16 * pass + 8, 64 * pass)
            };
            if first >= t.width {
                continue;
            }
            let mut acc = [[_mm256_setzero_ps(); 2]; MR];
            let mut w = t.w.wrapping_add(offset);
            let mut x = t.x;
            for _ in 0..t.k_len {
                if STREAM && pass == 0 {
                    prefetch_row::<BF16>(w);
                }
                // SAFETY: fewer than k_len rows have been consumed, so `w` is inside a panel
                // row (32 bytes at `offset` < row bytes) and `x` column k of the MR rows.
                unsafe {
                    let wv = if BF16 {
                        let packed = _mm256_loadu_si256(w.cast());
                        [
                            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(packed)),
                            _mm256_castsi256_ps(_mm256_and_si256(packed, high_half)),
                        ]
                    } else {
                        let p = w.cast::<f32>();
                        [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8))]
                    };
                    for (i, acc) in acc.iter_mut().enumerate() {
                        let xb = _mm256_set1_ps(*x.add(i * t.x_stride));
                        for (a, wv) in acc.iter_mut().zip(wv) {
                            *a = _mm256_fmadd_ps(xb, wv, *a);
                        }
                    }
                    w = w.add(row_bytes(BF16));
                    x = x.add(1);
                }
            }
            for (v, c) in [first, second].into_iter().enumerate() {
                let n = t.width.saturating_sub(c).min(8);
                if n == 0 {
                    continue;
                }
                let mask = lane_mask8(n);
                if let Some(b) = t.bias {
                    // SAFETY: the mask selects only bias values of the tile's columns.
                    let bv = unsafe { _mm256_maskload_ps(b.wrapping_add(c), mask) };
                    for acc in acc.iter_mut() {
                        acc[v] = _mm256_add_ps(acc[v], bv);
                    }
                }
                for (i, acc) in acc.iter().enumerate() {
                    let out = t.out.wrapping_add(i * t.out_stride + c);
                    // SAFETY: the mask selects only the tile's outputs of row i.
                    unsafe { _mm256_maskstore_ps(out, mask, acc[v]) };
                }
            }
        }
    }
}

/// An output pointer shared by the tasks of one `linear` call, which write disjoint parts of
/// it.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);

// SAFETY: only used by `linear_with`, whose tasks write disjoint output elements.
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

    /// `(rows, cols)`: edge cases, sizes that are multiples of nothing, and panels with and
    /// without padding.
    const SHAPES: [(usize, usize); 10] = [
        (1, 1),
        (7, 5),
        (3, 17),
        (37, 129),
        (33, 130),
        (64, 64),
        (65, 3),
        (100, 257),
        (250, 768),
        (4, 100),
    ];
    const BATCHES: [usize; 12] = [1, 2, 3, 5, 6, 7, 12, 13, 31, 64, 65, 100];
    const DTYPES: [WeightDtype; 2] = [WeightDtype::F32, WeightDtype::Bf16];

    fn levels() -> Vec<SimdLevel> {
        [SimdLevel::Scalar, SimdLevel::Avx2, SimdLevel::Avx512]
            .into_iter()
            .filter(|&l| l <= SimdLevel::detected())
            .collect()
    }

    /// The weights as `Matrix::new` stores them (bf16-rounded), row-major, from the source
    /// values rather than from the packed layout.
    fn stored(data: &[f32], dtype: WeightDtype) -> Vec<f32> {
        match dtype {
            WeightDtype::F32 => data.to_vec(),
            WeightDtype::Bf16 => data.iter().map(|&v| bf16::from_f32(v).to_f32()).collect(),
            WeightDtype::F16 => unreachable!("the CPU backend has no f16 weights"),
        }
    }

    /// The canonical numerics, written independently of the kernels: one `mul_add` chain per
    /// output over k in order from 0.0, then the bias in one rounding.
    fn canonical(
        x: &[f32],
        m: usize,
        rows: usize,
        cols: usize,
        w: &[f32],
        bias: Option<&[f32]>,
    ) -> Vec<f32> {
        let mut out = vec![0.0; m * rows];
        for i in 0..m {
            for r in 0..rows {
                let mut acc = 0.0f32;
                for k in 0..cols {
                    acc = x[i * cols + k].mul_add(w[r * cols + k], acc);
                }
                out[i * rows + r] = acc + bias.map_or(0.0, |b| b[r]);
            }
        }
        out
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

    fn run(level: SimdLevel, x: &[f32], m: usize, w: &Matrix, bias: Option<&[f32]>) -> Vec<f32> {
        // NaN so that an output the kernel forgets to write fails the check.
        let mut out = vec![f32::NAN; m * w.rows()];
        linear_with(level, x, m, w, bias, &mut out);
        out
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|f| f.to_bits()).collect()
    }

    fn matches_reference(dtype: WeightDtype) {
        for (s, &(rows, cols)) in SHAPES.iter().enumerate() {
            let w = Matrix::new(rows, cols, values(rows * cols, s as u64), dtype);
            let bias = values(rows, 100 + s as u64);
            for m in [1, 2, 5, 8, 9, 33] {
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
    fn every_simd_level_computes_the_canonical_chain_bit_for_bit() {
        for level in levels() {
            for dtype in DTYPES {
                for (s, &(rows, cols)) in SHAPES.iter().enumerate() {
                    let data = values(rows * cols, 300 + s as u64);
                    let w = Matrix::new(rows, cols, data.clone(), dtype);
                    let wf = stored(&data, dtype);
                    let bias = values(rows, 400 + s as u64);
                    for m in [1, 2, 6, 7, 13] {
                        let x = values(m * cols, 500 + m as u64);
                        for b in [None, Some(bias.as_slice())] {
                            let out = run(level, &x, m, &w, b);
                            let want = canonical(&x, m, rows, cols, &wf, b);
                            assert_eq!(
                                bits(&out),
                                bits(&want),
                                "{level:?} {dtype} {rows}×{cols} m={m} bias={}",
                                b.is_some()
                            );
                        }
                    }
                }
            }
        }
    }

    /// The batch-invariance promise: a probe row gives the same bits alone and at every
    /// position of every batch size, at every SIMD level.
    #[test]
    fn rows_are_bit_identical_at_every_batch_size_and_position() {
        let shapes = SHAPES.iter().copied().chain([(3072, 768)]);
        for (s, (rows, cols)) in shapes.enumerate() {
            let bias = values(rows, 600 + s as u64);
            let probe = values(cols, 700 + s as u64);
            for dtype in DTYPES {
                let w = Matrix::new(rows, cols, values(rows * cols, 800 + s as u64), dtype);
                for level in levels() {
                    // The scalar kernel is slow; the big shape only runs small batches there.
                    let max_m = if rows * cols > 1 << 20 { 13 } else { 100 };
                    let alone = run(level, &probe, 1, &w, Some(&bias));
                    for m in BATCHES.into_iter().filter(|&m| m <= max_m) {
                        let mut positions = vec![0, m / 2, m - 1];
                        positions.dedup();
                        for pos in positions {
                            let mut x = values(m * cols, 900 + m as u64);
                            x[pos * cols..(pos + 1) * cols].copy_from_slice(&probe);
                            let out = run(level, &x, m, &w, Some(&bias));
                            assert_eq!(
                                bits(&out[pos * rows..(pos + 1) * rows]),
                                bits(&alone),
                                "{level:?} {dtype} {rows}×{cols}: row {pos} of m={m}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn every_simd_level_gives_the_same_bits() {
        let (rows, cols) = (300, 200);
        for dtype in DTYPES {
            let w = Matrix::new(rows, cols, values(rows * cols, 10), dtype);
            let bias = values(rows, 11);
            for m in [1, 4, 6, 19] {
                let x = values(m * cols, 12);
                let outs: Vec<_> = levels()
                    .into_iter()
                    .map(|l| bits(&run(l, &x, m, &w, Some(&bias))))
                    .collect();
                assert!(
                    outs.iter().all(|o| o == &outs[0]),
                    "{dtype} m={m}: levels {:?} disagree",
                    levels()
                );
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
    fn results_do_not_depend_on_thread_count() {
        // (rows, cols, m): 1000×300 splits into several panel groups; 64×300 at m = 100 is
        // one panel split over row blocks.
        let cases = [
            (1000, 300, 1),
            (1000, 300, 3),
            (1000, 300, 40),
            (64, 300, 100),
        ];
        for (rows, cols, m) in cases {
            let x = values(m * cols, 1);
            let bias = values(rows, 2);
            for dtype in DTYPES {
                let w = Matrix::new(rows, cols, values(rows * cols, 3), dtype);
                let plan = Plan::new(m, &w, 3);
                assert!(
                    plan.groups() * plan.row_blocks > 1,
                    "{rows}×{cols} m={m} should split into tasks"
                );
                for level in levels() {
                    let outs: Vec<Vec<u32>> = [1, 2, 3]
                        .into_iter()
                        .map(|threads| {
                            let pool = rayon::ThreadPoolBuilder::new()
                                .num_threads(threads)
                                .build()
                                .unwrap();
                            pool.install(|| bits(&run(level, &x, m, &w, Some(&bias))))
                        })
                        .collect();
                    assert!(
                        outs.iter().all(|o| o == &outs[0]),
                        "{level:?} {dtype} {rows}×{cols} m={m}: outputs differ by thread count"
                    );
                }
            }
        }
    }

    #[test]
    fn large_batches_split_over_rows_and_decode_over_panels() {
        let w = Matrix::new(64, 300, values(64 * 300, 1), WeightDtype::F32);
        let plan = Plan::new(100, &w, 3);
        assert_eq!(plan.groups(), 1);
        assert!(plan.row_blocks > 1 && plan.rows_per_block.is_multiple_of(TILE_ROWS));

        let w = Matrix::new(3072, 768, values(3072 * 768, 1), WeightDtype::F32);
        let plan = Plan::new(1, &w, 2);
        assert_eq!(plan.row_blocks, 1);
        assert_eq!(
            plan.groups(),
            2 * TASKS_PER_THREAD,
            "48 panels over 2 threads"
        );

        let plan = Plan::new(1000, &w, 1);
        assert_eq!(
            plan.groups() * plan.row_blocks,
            1,
            "one thread runs one task"
        );
    }

    #[test]
    fn bias_is_added_to_every_row() {
        let (rows, cols, m) = (70, 9, 3);
        let w = Matrix::from_f32(rows, cols, values(rows * cols, 13));
        let x = values(m * cols, 14);
        let bias = values(rows, 15);
        let plain = run(SimdLevel::detected(), &x, m, &w, None);
        let biased = run(SimdLevel::detected(), &x, m, &w, Some(&bias));
        for i in 0..m {
            for r in 0..rows {
                let (p, b) = (plain[i * rows + r], biased[i * rows + r]);
                assert_eq!(b.to_bits(), (p + bias[r]).to_bits(), "out[{i}][{r}]");
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
        // 130 rows: three panels, the last one padded.
        let (rows, cols) = (130, 17);
        let data = values(rows * cols, 7);
        for dtype in DTYPES {
            let w = Matrix::new(rows, cols, data.clone(), dtype);
            let want = stored(&data, dtype);
            let mut row = vec![0.0; cols];
            for r in 0..rows {
                w.row_to_f32(r, &mut row);
                assert_eq!(
                    bits(&row),
                    bits(&want[r * cols..(r + 1) * cols]),
                    "{dtype} row {r}"
                );
            }
        }
    }

    #[test]
    fn bf16_slots_are_a_permutation_of_the_panel_row() {
        let mut seen = [false; PANEL_WIDTH];
        for j in 0..PANEL_WIDTH {
            assert!(
                !std::mem::replace(&mut seen[bf16_slot(j)], true),
                "feature {j}"
            );
        }
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

    #[test]
    #[should_panic(expected = "linear: bias holds")]
    fn linear_rejects_a_wrong_bias_length() {
        let w = Matrix::from_f32(2, 3, vec![0.0; 6]);
        linear(&[0.0; 3], 1, &w, Some(&[0.0; 3]), &mut [0.0; 2]);
    }
}
