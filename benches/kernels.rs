//! CPU kernel benchmarks: `linear` for GPT-2 124M shapes, and the machine's read bandwidth
//! to hold the decode numbers against.
//!
//! Batch-1 decode streams every weight once per token, so its floor is weight bytes ÷ read
//! bandwidth. To measure streaming from memory (not a cache that a real model would not fit
//! in), `linear_decode` cycles through enough copies of each matrix to fill
//! `WORKING_SET_BYTES`, and `linear_decode_model` runs the 49 linears of a whole GPT-2 124M
//! decode step; `read_bandwidth` sums buffers of the matching sizes on the same rayon pool.
//! Throughput is in decimal GB/s (weight bytes per second). `linear_batch` runs every shape
//! at batch sizes from 1 to 256 with the weights reused, in flops per second.
//!
//! Run with `cargo bench -p tessera-runtime --bench kernels`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};
use rayon::prelude::*;
use tessera_runtime::cpu::matmul::{linear, Matrix};
use tessera_runtime::WeightDtype;

/// Bytes of weights a decode benchmark cycles through: well past the last-level cache.
const WORKING_SET_BYTES: usize = 512 << 20;

/// GPT-2 124M.
const D_MODEL: usize = 768;
const N_LAYER: usize = 12;
const VOCAB: usize = 50257;

/// `(name, in_features, out_features)` of the linears in one GPT-2 block, then the LM head.
const BLOCK_SHAPES: [(&str, usize, usize); 4] = [
    ("qkv_768x2304", D_MODEL, 3 * D_MODEL),
    ("attn_proj_768x768", D_MODEL, D_MODEL),
    ("fc1_768x3072", D_MODEL, 4 * D_MODEL),
    ("fc2_3072x768", 4 * D_MODEL, D_MODEL),
];
const LM_HEAD: (&str, usize, usize) = ("lm_head_768x50257", D_MODEL, VOCAB);

const DTYPES: [WeightDtype; 2] = [WeightDtype::F32, WeightDtype::Bf16];

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

/// Weights in one GPT-2 124M decode step's linears (the LM head is the tied embedding).
fn gpt2_linear_params() -> usize {
    let block: usize = BLOCK_SHAPES
        .iter()
        .map(|&(_, cols, rows)| cols * rows)
        .sum();
    N_LAYER * block + LM_HEAD.1 * LM_HEAD.2
}

fn matrix(cols: usize, rows: usize, dtype: WeightDtype, seed: u64) -> Matrix {
    Matrix::new(rows, cols, values(rows * cols, seed), dtype)
}

fn configure(group: &mut BenchmarkGroup<'_, criterion::measurement::WallTime>) {
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
}

/// m = 1, one matrix shape at a time, cycling through copies so the weights come from memory.
fn linear_decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("linear_decode");
    configure(&mut group);
    for (name, cols, rows) in BLOCK_SHAPES
        .into_iter()
        .filter(|s| s.0 != "attn_proj_768x768")
        .chain([LM_HEAD])
    {
        for dtype in DTYPES {
            let first = matrix(cols, rows, dtype, 1);
            let copies = WORKING_SET_BYTES.div_ceil(first.size_bytes()).max(2);
            let mats: Vec<Matrix> = (0..copies).map(|_| first.clone()).collect();
            let x = values(cols, 2);
            let bias = values(rows, 3);
            let mut out = vec![0.0; rows];
            let mut next = 0;
            group.throughput(Throughput::BytesDecimal(first.size_bytes() as u64));
            group.bench_function(format!("{name}/{dtype}"), |b| {
                b.iter(|| {
                    next = (next + 1) % mats.len();
                    linear(black_box(&x), 1, &mats[next], Some(&bias), &mut out);
                    black_box(&out);
                })
            });
        }
    }
    group.finish();
}

/// The 49 linears of one GPT-2 124M decode step (m = 1), every weight streamed once.
fn linear_decode_model(c: &mut Criterion) {
    let mut group = c.benchmark_group("linear_decode_model");
    configure(&mut group);
    for dtype in DTYPES {
        let shapes: Vec<(usize, usize)> = (0..N_LAYER)
            .flat_map(|_| BLOCK_SHAPES.map(|(_, cols, rows)| (cols, rows)))
            .chain([(LM_HEAD.1, LM_HEAD.2)])
            .collect();
        let mats: Vec<Matrix> = shapes
            .iter()
            .enumerate()
            .map(|(i, &(cols, rows))| matrix(cols, rows, dtype, 10 + i as u64))
            .collect();
        let bytes: usize = mats.iter().map(Matrix::size_bytes).sum();
        let xs: Vec<Vec<f32>> = mats.iter().map(|w| values(w.cols(), 4)).collect();
        let mut outs: Vec<Vec<f32>> = mats.iter().map(|w| vec![0.0; w.rows()]).collect();
        group.throughput(Throughput::BytesDecimal(bytes as u64));
        group.bench_function(format!("gpt2_124m/{dtype}"), |b| {
            b.iter(|| {
                for ((w, x), out) in mats.iter().zip(&xs).zip(outs.iter_mut()) {
                    linear(black_box(x), 1, w, None, out);
                }
                black_box(&outs);
            })
        });
    }
    group.finish();
}

/// Activation rows per `linear` call in `linear_batch`: batch-1 decode, a decode batch, and
/// prefill chunks of growing size (continuous batching mixes all of them in one step).
const BATCH_ROWS: [usize; 6] = [1, 8, 16, 32, 64, 256];

/// Activation rows for the LM head slice in `linear_batch` (its weights are 154 MB at f32, so
/// larger batches only take longer without telling more).
const LM_HEAD_BATCH_ROWS: [usize; 3] = [1, 16, 64];

/// `linear` at every batch size for each GPT-2 shape, weights reused call after call (as
/// prefill reuses them for every row tile). Throughput in flops (2 per multiply-add) per
/// second.
fn linear_batch(c: &mut Criterion) {
    let mut group = c.benchmark_group("linear_batch");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_millis(1500));
    let shapes = BLOCK_SHAPES
        .iter()
        .map(|&shape| (shape, &BATCH_ROWS[..]))
        .chain([(LM_HEAD, &LM_HEAD_BATCH_ROWS[..])]);
    for ((name, cols, rows), batches) in shapes {
        for dtype in DTYPES {
            let w = matrix(cols, rows, dtype, 7);
            let bias = values(rows, 6);
            for &m in batches {
                let x = values(m * cols, 5);
                let mut out = vec![0.0; m * rows];
                group.throughput(Throughput::Elements((2 * m * rows * cols) as u64));
                group.bench_function(format!("{name}/{dtype}/m{m}"), |b| {
                    b.iter(|| {
                        linear(black_box(&x), m, &w, Some(&bias), &mut out);
                        black_box(&out);
                    })
                });
            }
        }
    }
    group.finish();
}

/// Sums f32 buffers on the current rayon pool, split as `linear` splits its weights: the
/// read bandwidth a kernel that streams the same bytes could reach. `plain` is the portable
/// loop as compiled for the baseline target; `simd` uses the widest vectors the CPU has and
/// prefetches ahead like the GEMV kernels do, the best read found on the development
/// machine and so the strictest floor for decode.
fn read_bandwidth(c: &mut Criterion) {
    let mut group = c.benchmark_group("read_bandwidth");
    configure(&mut group);
    let params = gpt2_linear_params();
    let sizes = [
        ("gpt2_124m_bf16_247MB", params * 2),
        ("gpt2_124m_f32_494MB", params * 4),
        ("512MiB", 512 << 20),
    ];
    for (name, bytes) in sizes {
        let buf = values(bytes / 4, 8);
        let chunk = buf.len().div_ceil(8 * rayon::current_num_threads());
        group.throughput(Throughput::BytesDecimal(bytes as u64));
        for (kind, sum) in [
            ("plain", sum_plain as fn(&[f32]) -> f32),
            ("simd", sum_simd),
        ] {
            group.bench_function(format!("{kind}/{name}"), |b| {
                b.iter(|| {
                    let total: f32 = black_box(&buf).par_chunks(chunk).map(sum).sum();
                    black_box(total)
                })
            });
        }
    }
    group.finish();
}

/// The portable reader, compiled for the baseline target.
fn sum_plain(values: &[f32]) -> f32 {
    tessera_runtime::cpu::membw::sum_portable(values)
}

/// The strict reader `tessera bench decode` measures its floor with.
fn sum_simd(values: &[f32]) -> f32 {
    tessera_runtime::cpu::membw::sum_f32(values)
}

criterion_group!(
    benches,
    read_bandwidth,
    linear_decode,
    linear_decode_model,
    linear_batch
);
criterion_main!(benches);
