//! The CUDA kernels of the `cuda` backend as source text, and the contract for launching them.
//!
//! Everything here is plain data and arithmetic on sizes, so it compiles without the `cuda`
//! feature: the device backend loads the sources through NVRTC and launches the kernels as
//! described here, `tessera kernels` compiles them in CI, and the host-emulation test
//! (`tests/host_kernels.rs`) runs every kernel listed here on the CPU.
//!
//! # Conventions shared by every kernel
//! - Activations, weights, norms, biases, logits and the KV cache are 16-bit: `bf16` or `f16`
//!   ([`KernelDtype`]), defined in `common.cuh` as `unsigned short` wrappers. Arithmetic is f32
//!   (f64 where the CPU sampler uses f64); results are rounded to nearest-even once, on store.
//! - A kernel with an element type is exported once per dtype as `<name>_bf16` and
//!   `<name>_f16` ([`KernelSpec::exported_names`]); one without (only `gumbel_noise`) under
//!   its bare name.
//! - Blocks are one-dimensional and `blockDim.x` is exactly [`KernelSpec::block_threads`] (a
//!   multiple of 32, the kernel's `__launch_bounds__`). Use the `*_launch` functions below
//!   for the whole configuration; none needs more than 48 KiB of shared memory, so no
//!   kernel needs `cudaFuncAttributeMaxDynamicSharedMemorySize`.
//! - Compile each [`KernelFile`] as its own program from [`program_source`] (the header
//!   inlined, so no include paths are needed) with [`NVRTC_OPTIONS`] plus the architecture.
//!   Never add `--use_fast_math`: the sampler relies on IEEE division, and the Gumbel noise
//!   must equal [`crate::sampling::gumbel`] bit for bit.
//! - Sizes are `unsigned int` (`u32`) unless a product can pass 2^32; offsets into buffers
//!   are computed in 64 bits inside the kernels.
//!
//! Kernel signatures are stable: the host's launches and the emulation test's generated
//! glue (which checks every signature below against the `.cu` files with `static_assert`)
//! both read them from here.

/// Storage type of a kernel's 16-bit tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KernelDtype {
    /// bfloat16: 8 exponent bits, 7 mantissa bits.
    Bf16,
    /// IEEE binary16: 5 exponent bits, 10 mantissa bits.
    F16,
}

impl KernelDtype {
    /// Both dtypes, in the order their kernels are listed.
    pub const ALL: [KernelDtype; 2] = [KernelDtype::Bf16, KernelDtype::F16];

    /// Suffix of exported kernel names and the C type name in `common.cuh`.
    pub fn suffix(self) -> &'static str {
        match self {
            KernelDtype::Bf16 => "bf16",
            KernelDtype::F16 => "f16",
        }
    }

    /// Bytes per element.
    pub fn size_bytes(self) -> usize {
        2
    }
}

/// C type of one kernel parameter. `Elem` is the kernel's element type (`bf16` or `f16`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamType {
    /// `T*`: a 16-bit tensor the kernel writes (possibly also reads).
    ElemPtr,
    /// `const T*`: a 16-bit tensor the kernel only reads.
    ConstElemPtr,
    /// `float*`.
    F32Ptr,
    /// `const float*`.
    ConstF32Ptr,
    /// `double*`.
    F64Ptr,
    /// `const unsigned int*`.
    ConstU32Ptr,
    /// `const SampleRowParams*`: see [`SampleRowParams`].
    ConstSampleRowParamsPtr,
    /// `unsigned int`.
    U32,
    /// `unsigned long long`.
    U64,
    /// `float`.
    F32,
}

impl ParamType {
    /// The C spelling of the type for the kernel exported for `dtype` (`None` for a
    /// kernel without an element type).
    pub fn c_type(self, dtype: Option<KernelDtype>) -> String {
        let elem = || {
            dtype
                .expect("an element pointer needs a dtype")
                .suffix()
                .to_string()
        };
        match self {
            ParamType::ElemPtr => format!("{}*", elem()),
            ParamType::ConstElemPtr => format!("const {}*", elem()),
            ParamType::F32Ptr => "float*".into(),
            ParamType::ConstF32Ptr => "const float*".into(),
            ParamType::F64Ptr => "double*".into(),
            ParamType::ConstU32Ptr => "const unsigned int*".into(),
            ParamType::ConstSampleRowParamsPtr => "const SampleRowParams*".into(),
            ParamType::U32 => "unsigned int".into(),
            ParamType::U64 => "unsigned long long".into(),
            ParamType::F32 => "float".into(),
        }
    }

    /// Whether the parameter is a device pointer.
    pub fn is_pointer(self) -> bool {
        !matches!(self, ParamType::U32 | ParamType::U64 | ParamType::F32)
    }

    /// Bytes of the argument value itself (what `kernelParams[i]` points to).
    pub fn arg_bytes(self) -> usize {
        match self {
            ParamType::U32 | ParamType::F32 => 4,
            _ => 8,
        }
    }
}

/// One kernel parameter, in declaration order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Param {
    /// Name in the `.cu` source.
    pub name: &'static str,
    /// C type.
    pub ty: ParamType,
}

const fn p(name: &'static str, ty: ParamType) -> Param {
    Param { name, ty }
}

/// One kernel of a [`KernelFile`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelSpec {
    /// Base name; exported as `<name>_bf16` and `<name>_f16` when `typed`.
    pub name: &'static str,
    /// Whether the kernel is exported once per [`KernelDtype`].
    pub typed: bool,
    /// Parameters in order.
    pub params: &'static [Param],
    /// `blockDim.x` of every launch (also the kernel's `__launch_bounds__`).
    pub block_threads: u32,
    /// What it computes and how to launch it (the matching `*_launch` function).
    pub doc: &'static str,
}

impl KernelSpec {
    /// Names the host loads from the compiled module, with the dtype of each.
    pub fn exported_names(&self) -> Vec<(String, Option<KernelDtype>)> {
        if self.typed {
            KernelDtype::ALL
                .iter()
                .map(|&d| (format!("{}_{}", self.name, d.suffix()), Some(d)))
                .collect()
        } else {
            vec![(self.name.to_string(), None)]
        }
    }

    /// The C declaration of one exported kernel, as it appears in the `.cu` file.
    pub fn c_signature(&self, dtype: Option<KernelDtype>) -> String {
        let name = match dtype {
            Some(d) => format!("{}_{}", self.name, d.suffix()),
            None => self.name.to_string(),
        };
        let params: Vec<String> = self
            .params
            .iter()
            .map(|p| format!("{} {}", p.ty.c_type(dtype), p.name))
            .collect();
        format!("void {name}({})", params.join(", "))
    }
}

/// One `.cu` file: a family of kernels compiled as one NVRTC program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelFile {
    /// File name, also the NVRTC program name.
    pub name: &'static str,
    /// Source text; it includes [`COMMON_HEADER`] as `#include "common.cuh"`.
    pub source: &'static str,
    /// Its kernels.
    pub kernels: &'static [KernelSpec],
}

/// The header every kernel file includes: 16-bit types, reductions, splitmix64, the
/// portable logarithm of the Gumbel noise.
pub const COMMON_HEADER: (&str, &str) = ("common.cuh", include_str!("kernels/common.cuh"));

/// Options every program is compiled with, besides `--gpu-architecture`.
pub const NVRTC_OPTIONS: &[&str] = &["--std=c++17"];

/// Threads per block of the row kernels (embedding, positions, LayerNorm, KV write).
pub const ROW_THREADS: u32 = 256;
/// Threads per block of the grid-stride element-wise kernels.
pub const ELEMENTWISE_THREADS: u32 = 256;
/// Most blocks an element-wise launch uses; larger tensors are covered by grid-stride loops.
pub const ELEMENTWISE_MAX_BLOCKS: u32 = 65_535;
/// Threads per block of prefill attention (4 warps).
pub const PREFILL_THREADS: u32 = 128;
/// Query rows per prefill attention block (4 per warp).
pub const PREFILL_BLOCK_Q: u32 = 16;
/// Key/value positions per shared-memory tile of prefill attention.
pub const PREFILL_BLOCK_K: u32 = 32;
/// Threads per block of split-K decode attention.
pub const DECODE_THREADS: u32 = 128;
/// Key/value positions per tile of split-K decode attention.
pub const DECODE_BLOCK_K: u32 = 64;
/// Threads per block of the decode combine.
pub const COMBINE_THREADS: u32 = 128;
/// Threads per block of the sampling statistics (one block per row).
pub const SAMPLE_THREADS: u32 = 512;
/// Largest head size the attention kernels accept (their per-thread accumulators and
/// shared tiles are sized for it).
pub const MAX_HEAD_DIM: u32 = 256;
/// Shared memory every launch fits in without an opt-in.
pub const DEFAULT_SHARED_LIMIT_BYTES: u32 = 48 * 1024;

use ParamType::*;

use crate::error::{Result, RuntimeError};
use crate::sampling::{RecordMode, RowSpec};

/// Every kernel file, in load order.
pub const FILES: &[KernelFile] = &[
    KernelFile {
        name: "embedding.cu",
        source: include_str!("kernels/embedding.cu"),
        kernels: &[
            KernelSpec {
                name: "embed",
                typed: true,
                params: &[
                    p("out", ElemPtr),
                    p("table", ConstElemPtr),
                    p("ids", ConstU32Ptr),
                    p("rows", U32),
                    p("cols", U32),
                    p("first_id", U32),
                    p("table_rows", U32),
                ],
                block_threads: ROW_THREADS,
                doc: "Vocab-parallel gather: out[i] = table[ids[i] - first_id] when \
                      first_id <= ids[i] < first_id + table_rows, else zeros. out [rows, cols], \
                      table [table_rows, cols]. Launch: row_launch(rows).",
            },
            KernelSpec {
                name: "add_positions",
                typed: true,
                params: &[
                    p("x", ElemPtr),
                    p("table", ConstElemPtr),
                    p("positions", ConstU32Ptr),
                    p("rows", U32),
                    p("cols", U32),
                ],
                block_threads: ROW_THREADS,
                doc: "x[i] += table[positions[i]] for every row i of x [rows, cols]; the host \
                      checks positions against the table's rows. Launch: row_launch(rows).",
            },
        ],
    },
    KernelFile {
        name: "layer_norm.cu",
        source: include_str!("kernels/layer_norm.cu"),
        kernels: &[KernelSpec {
            name: "layer_norm",
            typed: true,
            params: &[
                p("out", ElemPtr),
                p("x", ConstElemPtr),
                p("weight", ConstElemPtr),
                p("bias", ConstElemPtr),
                p("rows", U32),
                p("cols", U32),
                p("eps", F32),
            ],
            block_threads: ROW_THREADS,
            doc: "Row-wise LayerNorm with biased variance (two passes in f32): \
                  out = (x - mean) / sqrt(var + eps) * weight + bias. One block per row. \
                  out may not alias x. Launch: row_launch(rows).",
        }],
    },
    KernelFile {
        name: "elementwise.cu",
        source: include_str!("kernels/elementwise.cu"),
        kernels: &[
            KernelSpec {
                name: "bias_gelu",
                typed: true,
                params: &[
                    p("x", ElemPtr),
                    p("bias", ConstElemPtr),
                    p("rows", U32),
                    p("cols", U32),
                ],
                block_threads: ELEMENTWISE_THREADS,
                doc: "In place x = gelu_new(x + bias) over x [rows, cols] with a [cols] bias; \
                      bias may be null (GELU alone). Launch: elementwise_launch(rows * cols).",
            },
            KernelSpec {
                name: "add_bias",
                typed: true,
                params: &[
                    p("x", ElemPtr),
                    p("bias", ConstElemPtr),
                    p("rows", U32),
                    p("cols", U32),
                ],
                block_threads: ELEMENTWISE_THREADS,
                doc: "In place x += bias over x [rows, cols] with a [cols] bias. \
                      Launch: elementwise_launch(rows * cols).",
            },
            KernelSpec {
                name: "add_assign",
                typed: true,
                params: &[p("x", ElemPtr), p("y", ConstElemPtr), p("n", U64)],
                block_threads: ELEMENTWISE_THREADS,
                doc: "Residual add: x[i] += y[i] for i < n. Launch: elementwise_launch(n).",
            },
        ],
    },
    KernelFile {
        name: "kv_cache.cu",
        source: include_str!("kernels/kv_cache.cu"),
        kernels: &[KernelSpec {
            name: "write_kv",
            typed: true,
            params: &[
                p("k_cache", ElemPtr),
                p("v_cache", ElemPtr),
                p("qkv", ConstElemPtr),
                p("slots", ConstU32Ptr),
                p("rows", U32),
                p("heads", U32),
                p("head_dim", U32),
            ],
            block_threads: ROW_THREADS,
            doc: "Copies the k and v parts of every qkv row ([q | k | v], each heads * head_dim \
                  wide) into the layer's paged cache at slot slots[i] = block * block_size + \
                  position % block_size (the host maps positions through the block table and \
                  checks them). k_cache and v_cache are one layer's [num_blocks * block_size, \
                  heads * head_dim]. Launch: row_launch(rows).",
        }],
    },
    KernelFile {
        name: "attention_prefill.cu",
        source: include_str!("kernels/attention_prefill.cu"),
        kernels: &[KernelSpec {
            name: "attention_prefill",
            typed: true,
            params: &[
                p("out", ElemPtr),
                p("qkv", ConstElemPtr),
                p("k_cache", ConstElemPtr),
                p("v_cache", ConstElemPtr),
                p("block_tables", ConstU32Ptr),
                p("seq_rows", ConstU32Ptr),
                p("seq_start_pos", ConstU32Ptr),
                p("num_seqs", U32),
                p("heads", U32),
                p("head_dim", U32),
                p("block_size", U32),
                p("table_stride", U32),
                p("scale", F32),
            ],
            block_threads: PREFILL_THREADS,
            doc: "Causal flash attention over the paged cache (run write_kv first). Sequence s \
                  owns qkv/out rows [seq_rows[s], seq_rows[s+1]) at positions seq_start_pos[s] \
                  + i and reads its cache through block_tables[s * table_stride ..]; each row \
                  attends to positions 0..=its own. A block takes PREFILL_BLOCK_Q query rows of \
                  one (sequence, head), streams PREFILL_BLOCK_K positions at a time through \
                  shared memory with an online softmax. scale = 1 / sqrt(head_dim). \
                  head_dim <= MAX_HEAD_DIM. Launch: attention_prefill_launch.",
        }],
    },
    KernelFile {
        name: "attention_decode.cu",
        source: include_str!("kernels/attention_decode.cu"),
        kernels: &[
            KernelSpec {
                name: "attention_decode",
                typed: true,
                params: &[
                    p("part_max", F32Ptr),
                    p("part_sum", F32Ptr),
                    p("part_acc", F32Ptr),
                    p("qkv", ConstElemPtr),
                    p("k_cache", ConstElemPtr),
                    p("v_cache", ConstElemPtr),
                    p("block_tables", ConstU32Ptr),
                    p("row_seq", ConstU32Ptr),
                    p("row_pos", ConstU32Ptr),
                    p("rows", U32),
                    p("heads", U32),
                    p("head_dim", U32),
                    p("block_size", U32),
                    p("table_stride", U32),
                    p("blocks_per_split", U32),
                    p("num_splits", U32),
                    p("scale", F32),
                ],
                block_threads: DECODE_THREADS,
                doc: "Split-K (flash-decoding) attention, first pass. Query row r (qkv row r) \
                  of sequence row_seq[r] attends to positions 0..=row_pos[r]; split j of it \
                  covers cache blocks [j * blocks_per_split, (j + 1) * blocks_per_split) of its \
                  table. Writes per (row, head, split) the max score part_max, the sum of \
                  exp(score - max) part_sum and the unnormalised sum of weighted values \
                  part_acc [head_dim]; an empty split writes -inf, 0, 0. Layout: \
                  part_max/part_sum [rows, heads, num_splits], part_acc [rows, heads, \
                  num_splits, head_dim], f32. Launch: attention_decode_launch, with num_splits \
                  from decode_splits.",
            },
            KernelSpec {
                name: "attention_combine",
                typed: true,
                params: &[
                    p("out", ElemPtr),
                    p("part_max", ConstF32Ptr),
                    p("part_sum", ConstF32Ptr),
                    p("part_acc", ConstF32Ptr),
                    p("rows", U32),
                    p("heads", U32),
                    p("head_dim", U32),
                    p("num_splits", U32),
                ],
                block_threads: COMBINE_THREADS,
                doc: "Split-K second pass: out[r, h*head_dim + d] = sum_j part_acc[j][d] * \
                      exp(part_max[j] - M) / sum_j part_sum[j] * exp(part_max[j] - M) with M \
                      the largest part_max. out [rows, heads * head_dim]. \
                      Launch: attention_combine_launch.",
            },
        ],
    },
    KernelFile {
        name: "sampling.cu",
        source: include_str!("kernels/sampling.cu"),
        kernels: &[
            KernelSpec {
                name: "sample_stats",
                typed: true,
                params: &[
                    p("records", F32Ptr),
                    p("scratch", F32Ptr),
                    p("logits", ConstElemPtr),
                    p("params", ConstSampleRowParamsPtr),
                    p("penalty_ids", ConstU32Ptr),
                    p("rows", U32),
                    p("vocab", U32),
                    p("first_id", U32),
                ],
                block_threads: SAMPLE_THREADS,
                doc: "This rank's sampling record of every row, exactly as \
                      sampling::local_record writes it: [raw max, raw sum-exp, processed max, \
                      processed sum-exp (0, 0 unless scaled_stats), candidate count, then \
                      `candidates` slots of (score, token id, raw logit), best first (higher \
                      score, then lower id), unused slots (-inf, -1, 0)]. logits [rows, vocab] \
                      is the rank's slice starting at token first_id; scratch [rows, vocab] f32 \
                      receives the processed logits (repetition penalty, then temperature). \
                      Row r's record starts at records[params[r].record_offset]. One block per \
                      row; vocab >= 1. Launch: sample_stats_launch(rows).",
            },
            KernelSpec {
                name: "gumbel_noise",
                typed: false,
                params: &[
                    p("out", F64Ptr),
                    p("seed", U64),
                    p("position", U32),
                    p("first_id", U32),
                    p("n", U32),
                ],
                block_threads: ELEMENTWISE_THREADS,
                doc: "out[i] = sampling::gumbel(seed, position, first_id + i), bit for bit, for \
                      i < n: the noise sample_stats adds, exposed for checks. \
                      Launch: elementwise_launch(n).",
            },
        ],
    },
];

/// Kernels of the sampling statistics: how to fill one row's [`SampleRowParams::mode`].
pub mod sample_mode {
    /// Argmax of the processed logits (first maximum, NaNs skipped); one candidate.
    pub const GREEDY: u32 = 0;
    /// Gumbel-max over the whole slice: score = processed logit (as f64) + noise; one
    /// candidate.
    pub const FULL: u32 = 1;
    /// The `candidates` best processed logits (higher, then lower id), no noise.
    pub const TOP: u32 = 2;
}

/// Per-row input of `sample_stats`: eleven 32-bit words, no padding (44 bytes), in this
/// order in `common.cuh`'s `struct SampleRowParams`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct SampleRowParams {
    /// Divides the logits unless the mode is greedy.
    pub temperature: f32,
    /// Penalty of the row's `penalty_ids`; 1 disables it.
    pub repetition_penalty: f32,
    /// Low 32 bits of the sampler seed.
    pub seed_lo: u32,
    /// High 32 bits of the sampler seed.
    pub seed_hi: u32,
    /// Position of the token being generated (keys the noise).
    pub position: u32,
    /// One of [`sample_mode`].
    pub mode: u32,
    /// Candidate slots in the record: 1 for greedy and full, `c` for top.
    pub candidates: u32,
    /// 1: also write the processed logits' max and sum-exp (top-p without top-k).
    pub scaled_stats: u32,
    /// First index of the row's ids in `penalty_ids` (distinct ids).
    pub penalty_begin: u32,
    /// One past the last index of the row's ids in `penalty_ids`.
    pub penalty_end: u32,
    /// Index in `records` of the row's first value.
    pub record_offset: u32,
}

impl SampleRowParams {
    /// Size of the C struct.
    pub const SIZE_BYTES: usize = 44;

    /// The struct as the words the device reads.
    pub fn to_words(&self) -> [u32; 11] {
        [
            self.temperature.to_bits(),
            self.repetition_penalty.to_bits(),
            self.seed_lo,
            self.seed_hi,
            self.position,
            self.mode,
            self.candidates,
            self.scaled_stats,
            self.penalty_begin,
            self.penalty_end,
            self.record_offset,
        ]
    }

    /// The parameters of one row's record in `mode`: its penalty ids start at
    /// `penalty_begin` of the launch's `penalty_ids` (the row's own ids follow there when
    /// its penalty is not 1), its record at `record_offset` of `records`.
    pub fn for_row(
        row: &RowSpec,
        mode: RecordMode,
        penalty_begin: usize,
        record_offset: usize,
    ) -> Result<Self> {
        let p = &row.spec.params;
        let penalty_len = if p.repetition_penalty != 1.0 {
            row.spec.penalty_ids.len()
        } else {
            0
        };
        let word = |what: &str, n: usize| {
            u32::try_from(n).map_err(|_| {
                RuntimeError::Backend(format!("sample_stats: {what} {n} does not fit in 32 bits"))
            })
        };
        Ok(SampleRowParams {
            temperature: p.temperature,
            repetition_penalty: p.repetition_penalty,
            seed_lo: p.seed as u32,
            seed_hi: (p.seed >> 32) as u32,
            position: word("position", row.position)?,
            mode: match mode {
                RecordMode::Greedy => sample_mode::GREEDY,
                RecordMode::Full => sample_mode::FULL,
                RecordMode::Filtered { .. } => sample_mode::TOP,
            },
            candidates: word("candidates", mode.candidates())?,
            scaled_stats: mode.scaled_stats(p) as u32,
            penalty_begin: word("penalty offset", penalty_begin)?,
            penalty_end: word("penalty offset", penalty_begin + penalty_len)?,
            record_offset: word("record offset", record_offset)?,
        })
    }

    /// Ids of `row`'s penalty set the launch must carry: none when its penalty is 1.
    pub fn penalty_ids<'a>(row: &RowSpec<'a>) -> &'a [u32] {
        if row.spec.params.repetition_penalty != 1.0 {
            &row.spec.penalty_ids
        } else {
            &[]
        }
    }

    /// Floats of a record with this many candidate slots (header of 5, 3 per slot).
    pub fn record_len(candidates: u32) -> usize {
        5 + 3 * candidates as usize
    }
}

/// Grid, block and dynamic shared memory of one launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaunchConfig {
    /// Blocks in x, y, z.
    pub grid: (u32, u32, u32),
    /// Threads in x, y, z (always `(block_threads, 1, 1)`).
    pub block: (u32, u32, u32),
    /// Dynamic shared memory per block.
    pub shared_bytes: u32,
}

fn ceil_div(a: u64, b: u64) -> u64 {
    a.div_ceil(b)
}

/// One block per row: `embed`, `add_positions`, `layer_norm`, `write_kv`.
pub fn row_launch(rows: u32) -> LaunchConfig {
    LaunchConfig {
        grid: (rows.max(1), 1, 1),
        block: (ROW_THREADS, 1, 1),
        shared_bytes: 0,
    }
}

/// Grid-stride launch over `n` elements: `bias_gelu`, `add_bias`, `add_assign`,
/// `gumbel_noise`.
pub fn elementwise_launch(n: u64) -> LaunchConfig {
    let blocks = ceil_div(n, ELEMENTWISE_THREADS as u64).clamp(1, ELEMENTWISE_MAX_BLOCKS as u64);
    LaunchConfig {
        grid: (blocks as u32, 1, 1),
        block: (ELEMENTWISE_THREADS, 1, 1),
        shared_bytes: 0,
    }
}

/// Elements of one cached K row in prefill's shared tile: `head_dim` padded so the row is an
/// odd number of 32-bit words (lanes reading different rows hit different banks).
pub fn prefill_k_stride(head_dim: u32) -> u32 {
    let mut words = head_dim.div_ceil(2);
    if words.is_multiple_of(2) {
        words += 1;
    }
    2 * words
}

/// Dynamic shared bytes of `attention_prefill`: scores `[BLOCK_Q][BLOCK_K]` f32, then the
/// Q tile `[BLOCK_Q][head_dim]`, the K tile `[BLOCK_K][prefill_k_stride]` and the V tile
/// `[BLOCK_K][head_dim]` in the element type.
pub fn prefill_shared_bytes(head_dim: u32, dtype: KernelDtype) -> u32 {
    let e = dtype.size_bytes() as u32;
    4 * PREFILL_BLOCK_Q * PREFILL_BLOCK_K
        + e * PREFILL_BLOCK_Q * head_dim
        + e * PREFILL_BLOCK_K * prefill_k_stride(head_dim)
        + e * PREFILL_BLOCK_K * head_dim
}

/// `attention_prefill`: grid (query tiles of the longest sequence's new rows, heads,
/// sequences). Blocks past a shorter sequence's rows return at once. `num_seqs` and
/// `heads` must be at most 65 535.
pub fn attention_prefill_launch(
    max_new_rows: u32,
    heads: u32,
    num_seqs: u32,
    head_dim: u32,
    dtype: KernelDtype,
) -> LaunchConfig {
    LaunchConfig {
        grid: (
            max_new_rows.div_ceil(PREFILL_BLOCK_Q).max(1),
            heads,
            num_seqs,
        ),
        block: (PREFILL_THREADS, 1, 1),
        shared_bytes: prefill_shared_bytes(head_dim, dtype),
    }
}

/// Splits of `attention_decode` for a longest context of `max_kv_len` positions
/// (`row_pos + 1`) when each split covers `blocks_per_split` cache blocks.
pub fn decode_splits(max_kv_len: u32, block_size: u32, blocks_per_split: u32) -> u32 {
    max_kv_len.div_ceil(block_size * blocks_per_split).max(1)
}

/// Dynamic shared bytes of `attention_decode`: slot offsets `[DECODE_BLOCK_K]` u64, the
/// query and the accumulator `[head_dim]` f32 each, probabilities `[DECODE_BLOCK_K]` f32.
pub fn decode_shared_bytes(head_dim: u32) -> u32 {
    8 * DECODE_BLOCK_K + 4 * 2 * head_dim + 4 * DECODE_BLOCK_K
}

/// `attention_decode`: grid (splits, heads, rows); `rows` and `heads` at most 65 535.
pub fn attention_decode_launch(
    rows: u32,
    heads: u32,
    num_splits: u32,
    head_dim: u32,
) -> LaunchConfig {
    LaunchConfig {
        grid: (num_splits, heads, rows),
        block: (DECODE_THREADS, 1, 1),
        shared_bytes: decode_shared_bytes(head_dim),
    }
}

/// `attention_combine`: grid (heads, rows), one block per (row, head).
pub fn attention_combine_launch(rows: u32, heads: u32) -> LaunchConfig {
    LaunchConfig {
        grid: (heads, rows, 1),
        block: (COMBINE_THREADS, 1, 1),
        shared_bytes: 0,
    }
}

/// `sample_stats`: one block per row (static shared memory only).
pub fn sample_stats_launch(rows: u32) -> LaunchConfig {
    LaunchConfig {
        grid: (rows.max(1), 1, 1),
        block: (SAMPLE_THREADS, 1, 1),
        shared_bytes: 0,
    }
}

/// The text NVRTC compiles for `file`: its source with `#include "common.cuh"` replaced by
/// the header, and `#line` marks so diagnostics name the original files.
pub fn program_source(file: &KernelFile) -> String {
    let (header_name, header) = COMMON_HEADER;
    let include = format!("#include \"{header_name}\"");
    let mut out = String::with_capacity(header.len() + file.source.len() + 128);
    for (i, line) in file.source.lines().enumerate() {
        if line.trim() == include {
            out.push_str(&format!("#line 1 \"{header_name}\"\n"));
            out.push_str(header);
            if !header.ends_with('\n') {
                out.push('\n');
            }
            out.push_str(&format!("#line {} \"{}\"\n", i + 2, file.name));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// Every kernel, with its file.
pub fn all_kernels() -> impl Iterator<Item = (&'static KernelFile, &'static KernelSpec)> {
    FILES
        .iter()
        .flat_map(|f| f.kernels.iter().map(move |k| (f, k)))
}

/// Every exported kernel name.
pub fn exported_names() -> Vec<String> {
    all_kernels()
        .flat_map(|(_, k)| k.exported_names().into_iter().map(|(n, _)| n))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_every_kernel_is_defined_in_its_file() {
        let names = exported_names();
        let mut sorted = names.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), names.len(), "duplicate kernel names");
        for (file, k) in all_kernels() {
            assert!(
                file.source.contains("#include \"common.cuh\""),
                "{} must include the common header",
                file.name
            );
            for (name, _) in k.exported_names() {
                let decl = format!("__launch_bounds__({}) {name}(", k.block_threads);
                assert!(
                    file.source.contains(&decl),
                    "{}: no `extern \"C\" __global__ void {decl}...` (kernel or launch bounds \
                     differ from sources.rs)",
                    file.name
                );
            }
        }
    }

    #[test]
    fn every_launch_fits_the_default_shared_memory() {
        for dh in 1..=MAX_HEAD_DIM {
            for dtype in KernelDtype::ALL {
                assert!(prefill_shared_bytes(dh, dtype) <= DEFAULT_SHARED_LIMIT_BYTES);
            }
            assert!(decode_shared_bytes(dh) <= DEFAULT_SHARED_LIMIT_BYTES);
            assert_eq!(prefill_k_stride(dh) / 2 % 2, 1);
            assert!(prefill_k_stride(dh) >= dh);
        }
    }

    #[test]
    fn program_source_inlines_the_header_once() {
        for f in FILES {
            let text = program_source(f);
            assert!(!text.contains("#include \"common.cuh\""));
            assert_eq!(text.matches("TESSERA_COMMON_CUH").count(), 3, "{}", f.name);
        }
    }

    #[test]
    fn sample_row_params_is_eleven_words() {
        assert_eq!(
            std::mem::size_of::<SampleRowParams>(),
            SampleRowParams::SIZE_BYTES
        );
        assert_eq!(SampleRowParams::record_len(4), 17);
    }

    #[test]
    fn launch_grids_cover_the_work() {
        assert_eq!(elementwise_launch(0).grid.0, 1);
        assert_eq!(elementwise_launch(257).grid.0, 2);
        assert_eq!(elementwise_launch(1 << 40).grid.0, ELEMENTWISE_MAX_BLOCKS);
        assert_eq!(
            attention_prefill_launch(17, 4, 3, 64, KernelDtype::F16).grid,
            (2, 4, 3)
        );
        assert_eq!(decode_splits(33, 16, 2), 2);
        assert_eq!(decode_splits(32, 16, 2), 1);
    }
}
