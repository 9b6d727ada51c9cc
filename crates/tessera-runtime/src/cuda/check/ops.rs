//! Every operation of the `Backend` trait on the CUDA backend against the CPU backend,
//! and each timed at the large shard's shape.
//!
//! Checks run both backends through the trait on the same fresh random inputs, rounded
//! to bf16 first so both start from the same numbers; shapes are deliberately not
//! multiples of any tile. Outputs the API lets a caller hand in are filled with NaN
//! first, so an element a kernel does not write fails the check.

use tessera_model::splitmix64;

use super::data::{compare, not_run, random_bf16, random_ids};
use super::floors::Ceilings;
use super::plan::{Dims, KernelCase};
use super::report::{Check, Timing};
use super::timer::time_runs;
use super::BF16_OP_TOLERANCE;
use crate::backend::{Backend, KvSpec, SeqSpan};
use crate::collective::local_group;
use crate::cpu::CpuBackend;
use crate::cuda::CudaBackend;
use crate::dtype::WeightDtype;
use crate::error::Result;
use crate::sampling::{RecordAsk, RecordMode, RowSpec};
use crate::step::{SampleSpec, SamplingParams};

const SECTION: &str = "ops";

/// A NaN-filled GPU tensor: the output of an operation under check.
fn poisoned(
    gpu: &CudaBackend,
    rows: usize,
    cols: usize,
) -> Result<<CudaBackend as Backend>::Tensor> {
    gpu.upload(&vec![f32::NAN; rows * cols], rows, cols)
}

struct Pair<'a> {
    gpu: &'a CudaBackend,
    cpu: &'a CpuBackend,
    seed: u64,
}

impl Pair<'_> {
    fn next_seed(&mut self) -> u64 {
        self.seed = splitmix64(self.seed);
        self.seed
    }

    fn values(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        let seed = self.next_seed();
        random_bf16(n, seed, lo, hi)
    }

    fn check(&self, name: String, got: &[f32], want: &[f32]) -> Check {
        compare(SECTION, name, got, want, BF16_OP_TOLERANCE)
    }
}

/// Runs every operation check; one failing (or erroring) check does not stop the rest.
pub fn check_ops(gpu: &CudaBackend, cpu: &CpuBackend, seed: u64) -> Vec<Check> {
    let mut p = Pair { gpu, cpu, seed };
    let mut out = Vec::new();
    let mut push = |name: &str, r: Result<Check>| {
        out.push(r.unwrap_or_else(|e| not_run(SECTION, name.to_string(), e)))
    };
    push("embed 37x771", embed(&mut p, 37, 771));
    push("add_positions 37x771", add_positions(&mut p, 37, 771));
    push("layer_norm 37x1000", layer_norm(&mut p, 37, 1000));
    push("layer_norm 3x12288", layer_norm(&mut p, 3, 12288));
    push("gelu 37x1000", gelu(&mut p, 37, 1000));
    push("add_bias 37x771", add_bias(&mut p, 37, 771));
    push("add_assign 37x771", add_assign(&mut p, 37, 771));
    push("gather_rows 37x771", gather_rows(&mut p, 37, 771));
    push("all_reduce_sum world 1", all_reduce_world1(&mut p, 37, 771));
    for (rows, k, m, bias) in [
        (37, 1000, 771, true),
        (1, 1000, 771, false),
        (130, 96, 200, true),
        (5, 12288, 4608, false),
    ] {
        push(
            &format!("linear {rows}x{k}x{m}"),
            linear(&mut p, rows, k, m, bias),
        );
    }
    push(
        "sample_records 5x25129",
        sample_records(&mut p, 25129, 25128),
    );
    for (heads, head_dim) in [(3, 80), (2, 128)] {
        match attention(&mut p, heads, head_dim) {
            Ok(checks) => out.extend(checks),
            Err(e) => out.push(not_run(SECTION, format!("attention {heads}x{head_dim}"), e)),
        }
    }
    out
}

fn embed(p: &mut Pair, rows: usize, cols: usize) -> Result<Check> {
    let (first_id, table_rows) = (1000usize, 300usize);
    let table = p.values(table_rows * cols, -1.0, 1.0);
    // Ids below, inside and past the slice [1000, 1300).
    let seed = p.next_seed();
    let ids: Vec<u32> = random_ids(rows, seed, 1600);
    let gt = p
        .gpu
        .upload_matrix(table_rows, cols, table.clone(), WeightDtype::Bf16)?;
    let ct = p
        .cpu
        .upload_matrix(table_rows, cols, table, WeightDtype::Bf16)?;
    let mut go = poisoned(p.gpu, rows, cols)?;
    let mut co = p.cpu.zeros(rows, cols)?;
    p.gpu.embed(&gt, first_id, &ids, &mut go)?;
    p.cpu.embed(&ct, first_id, &ids, &mut co)?;
    Ok(p.check(
        format!("embed {rows}x{cols} (ids in and out of the slice)"),
        &p.gpu.download(&go)?,
        &p.cpu.download(&co)?,
    ))
}

fn add_positions(p: &mut Pair, rows: usize, cols: usize) -> Result<Check> {
    let positions_n = 50;
    let table = p.values(positions_n * cols, -1.0, 1.0);
    let x = p.values(rows * cols, -1.0, 1.0);
    let seed = p.next_seed();
    let positions = random_ids(rows, seed, positions_n as u32);
    let (gt, ct) = (
        p.gpu.upload(&table, positions_n, cols)?,
        p.cpu.upload(&table, positions_n, cols)?,
    );
    let (mut gx, mut cx) = (p.gpu.upload(&x, rows, cols)?, p.cpu.upload(&x, rows, cols)?);
    p.gpu.add_positions(&gt, &positions, &mut gx)?;
    p.cpu.add_positions(&ct, &positions, &mut cx)?;
    Ok(p.check(
        format!("add_positions {rows}x{cols}"),
        &p.gpu.download(&gx)?,
        &p.cpu.download(&cx)?,
    ))
}

fn layer_norm(p: &mut Pair, rows: usize, cols: usize) -> Result<Check> {
    // An offset mean, as residual streams have, tests the variance's numerics.
    let x = p.values(rows * cols, 2.0, 4.0);
    let w = p.values(cols, 0.5, 1.5);
    let b = p.values(cols, -0.5, 0.5);
    let (gx, cx) = (p.gpu.upload(&x, rows, cols)?, p.cpu.upload(&x, rows, cols)?);
    let (gw, cw) = (p.gpu.upload(&w, 1, cols)?, p.cpu.upload(&w, 1, cols)?);
    let (gb, cb) = (p.gpu.upload(&b, 1, cols)?, p.cpu.upload(&b, 1, cols)?);
    let mut go = poisoned(p.gpu, rows, cols)?;
    let mut co = p.cpu.zeros(rows, cols)?;
    p.gpu.layer_norm(&gx, &gw, &gb, 1e-5, &mut go)?;
    p.cpu.layer_norm(&cx, &cw, &cb, 1e-5, &mut co)?;
    Ok(p.check(
        format!("layer_norm {rows}x{cols}"),
        &p.gpu.download(&go)?,
        &p.cpu.download(&co)?,
    ))
}

fn linear(p: &mut Pair, rows: usize, k: usize, m: usize, bias: bool) -> Result<Check> {
    let x = p.values(rows * k, -1.0, 1.0);
    let w = p.values(m * k, -0.05, 0.05);
    let b = p.values(m, -0.5, 0.5);
    let (gx, cx) = (p.gpu.upload(&x, rows, k)?, p.cpu.upload(&x, rows, k)?);
    let gw = p.gpu.upload_matrix(m, k, w.clone(), WeightDtype::Bf16)?;
    let cw = p.cpu.upload_matrix(m, k, w, WeightDtype::Bf16)?;
    let (gb, cb) = (p.gpu.upload(&b, 1, m)?, p.cpu.upload(&b, 1, m)?);
    let mut go = poisoned(p.gpu, rows, m)?;
    let mut co = p.cpu.zeros(rows, m)?;
    p.gpu.linear(&gx, &gw, bias.then_some(&gb), &mut go)?;
    p.cpu.linear(&cx, &cw, bias.then_some(&cb), &mut co)?;
    Ok(p.check(
        format!("linear {rows}x{k}x{m}{}", if bias { " +bias" } else { "" }),
        &p.gpu.download(&go)?,
        &p.cpu.download(&co)?,
    ))
}

fn gelu(p: &mut Pair, rows: usize, cols: usize) -> Result<Check> {
    let x = p.values(rows * cols, -4.0, 4.0);
    let (mut gx, mut cx) = (p.gpu.upload(&x, rows, cols)?, p.cpu.upload(&x, rows, cols)?);
    p.gpu.gelu(&mut gx)?;
    p.cpu.gelu(&mut cx)?;
    Ok(p.check(
        format!("gelu {rows}x{cols}"),
        &p.gpu.download(&gx)?,
        &p.cpu.download(&cx)?,
    ))
}

fn add_bias(p: &mut Pair, rows: usize, cols: usize) -> Result<Check> {
    let x = p.values(rows * cols, -1.0, 1.0);
    let b = p.values(cols, -1.0, 1.0);
    let (mut gx, mut cx) = (p.gpu.upload(&x, rows, cols)?, p.cpu.upload(&x, rows, cols)?);
    let (gb, cb) = (p.gpu.upload(&b, 1, cols)?, p.cpu.upload(&b, 1, cols)?);
    p.gpu.add_bias(&mut gx, &gb)?;
    p.cpu.add_bias(&mut cx, &cb)?;
    Ok(p.check(
        format!("add_bias {rows}x{cols}"),
        &p.gpu.download(&gx)?,
        &p.cpu.download(&cx)?,
    ))
}

fn add_assign(p: &mut Pair, rows: usize, cols: usize) -> Result<Check> {
    let x = p.values(rows * cols, -1.0, 1.0);
    let y = p.values(rows * cols, -1.0, 1.0);
    let (mut gx, mut cx) = (p.gpu.upload(&x, rows, cols)?, p.cpu.upload(&x, rows, cols)?);
    let (gy, cy) = (p.gpu.upload(&y, rows, cols)?, p.cpu.upload(&y, rows, cols)?);
    p.gpu.add_assign(&mut gx, &gy)?;
    p.cpu.add_assign(&mut cx, &cy)?;
    Ok(p.check(
        format!("add_assign {rows}x{cols}"),
        &p.gpu.download(&gx)?,
        &p.cpu.download(&cx)?,
    ))
}

fn gather_rows(p: &mut Pair, rows: usize, cols: usize) -> Result<Check> {
    let x = p.values(rows * cols, -1.0, 1.0);
    let picked = [rows - 1, 0, 5, 5];
    let (gx, cx) = (p.gpu.upload(&x, rows, cols)?, p.cpu.upload(&x, rows, cols)?);
    let go = p.gpu.gather_rows(&gx, &picked)?;
    let co = p.cpu.gather_rows(&cx, &picked)?;
    Ok(p.check(
        format!("gather_rows {} of {rows}x{cols}", picked.len()),
        &p.gpu.download(&go)?,
        &p.cpu.download(&co)?,
    ))
}

fn all_reduce_world1(p: &mut Pair, rows: usize, cols: usize) -> Result<Check> {
    let x = p.values(rows * cols, -1.0, 1.0);
    let mut gx = p.gpu.upload(&x, rows, cols)?;
    let mut comm = local_group(1).pop().expect("one rank");
    p.gpu.all_reduce_sum(&mut comm, &mut gx)?;
    Ok(p.check(
        format!("all_reduce_sum world 1 {rows}x{cols}"),
        &p.gpu.download(&gx)?,
        &x,
    ))
}

/// The sampler's per-rank records (`sample_stats`) of five rows, one per kind of
/// sampling, over a vocabulary slice that is no multiple of the block; then a later
/// round's subset of rows, out of order. Every field must equal the CPU's bit for bit
/// except the two sums of exponentials, which are f32 sums in another order.
fn sample_records(p: &mut Pair, vocab: usize, first_id: usize) -> Result<Check> {
    let params = |temperature, top_k, top_p, repetition_penalty| SamplingParams {
        temperature,
        top_k,
        top_p,
        seed: 0x5EED_0000_0000_0007,
        repetition_penalty,
    };
    // Ids below, inside and past the slice.
    let penalty_ids: Vec<u32> = vec![3, first_id as u32 + 7, first_id as u32 + 800, 60_000];
    let specs: Vec<SampleSpec> = [
        params(0.0, 0, 1.0, 1.0),
        params(0.8, 0, 1.0, 1.0),
        params(1.0, 40, 1.0, 1.0),
        params(0.7, 0, 0.9, 1.0),
        params(0.0, 0, 1.0, 1.3),
    ]
    .into_iter()
    .map(|params| SampleSpec {
        params,
        penalty_ids: penalty_ids.clone(),
        return_logits: false,
    })
    .collect();
    let rows: Vec<RowSpec> = specs
        .iter()
        .enumerate()
        .map(|(i, spec)| RowSpec {
            spec,
            position: 100 + 7 * i,
        })
        .collect();
    let logits = p.values(rows.len() * vocab, -8.0, 8.0);
    let gl = p.gpu.upload(&logits, rows.len(), vocab)?;
    let cl = p.cpu.upload(&logits, rows.len(), vocab)?;
    let first: Vec<RecordAsk> = rows
        .iter()
        .enumerate()
        .map(|(row, r)| RecordAsk {
            row,
            mode: RecordMode::first_round(&r.spec.params),
        })
        .collect();
    let later = [
        RecordAsk {
            row: 3,
            mode: RecordMode::Filtered { c: 1024 },
        },
        RecordAsk {
            row: 1,
            mode: RecordMode::Full,
        },
    ];
    let (mut got, mut want) = (Vec::new(), Vec::new());
    for asks in [&first[..], &later[..]] {
        p.gpu.sample_records(&gl, &rows, asks, first_id, &mut got)?;
        p.cpu
            .sample_records(&cl, &rows, asks, first_id, &mut want)?;
    }
    let mut worst = 0f64;
    let mut wrong = Vec::new();
    let mut offset = 0;
    for (k, ask) in first.iter().chain(&later).enumerate() {
        let len = ask.mode.record_len();
        for i in 0..len {
            let (g, w) = (
                got.get(offset + i).copied().unwrap_or(f32::NAN),
                want[offset + i],
            );
            let ok = if i == 1 || i == 3 {
                let rel = ((g - w) as f64 / w.max(f32::MIN_POSITIVE) as f64).abs();
                worst = worst.max(rel);
                rel <= 1e-5
            } else {
                g.to_bits() == w.to_bits()
            };
            if !ok && wrong.len() < 3 {
                wrong.push(format!("record {k} field {i}: {g}, the CPU {w}"));
            }
        }
        offset += len;
    }
    let detail = if got.len() != want.len() {
        format!("{} values, the CPU gave {}", got.len(), want.len())
    } else {
        wrong.join("; ")
    };
    Ok(Check {
        section: SECTION.to_string(),
        name: format!(
            "sample_records {}x{vocab} (greedy, gumbel, top-k, top-p, penalty; then a subset)",
            rows.len()
        ),
        passed: detail.is_empty(),
        error: Some(worst),
        tolerance: Some(1e-5),
        detail,
    })
}

/// One attention call on both backends' caches, compared.
fn attention_call(
    p: &mut Pair,
    caches: &mut (
        <CudaBackend as Backend>::KvCache,
        <CpuBackend as Backend>::KvCache,
    ),
    spec: &KvSpec,
    seqs: &[SeqSpan],
    what: &str,
) -> Result<Check> {
    let rows = seqs.last().map_or(0, |s| s.rows.end);
    let width = spec.heads * spec.head_dim;
    let qkv = p.values(rows * 3 * width, -1.0, 1.0);
    let (gq, cq) = (
        p.gpu.upload(&qkv, rows, 3 * width)?,
        p.cpu.upload(&qkv, rows, 3 * width)?,
    );
    let mut go = poisoned(p.gpu, rows, width)?;
    let mut co = p.cpu.zeros(rows, width)?;
    p.gpu.attention(&gq, &mut caches.0, 0, seqs, &mut go)?;
    p.cpu.attention(&cq, &mut caches.1, 0, seqs, &mut co)?;
    Ok(p.check(
        format!("attention {}x{} {what}", spec.heads, spec.head_dim),
        &p.gpu.download(&go)?,
        &p.cpu.download(&co)?,
    ))
}

fn span(rows: std::ops::Range<usize>, start_pos: usize, blocks: &[u32]) -> SeqSpan {
    SeqSpan {
        rows,
        start_pos,
        block_table: blocks.to_vec(),
    }
}

/// Prefill of two sequences in one call, a chunk appended to one of them, decode of
/// both, then a sequence long enough that decode attention splits its context.
fn attention(p: &mut Pair, heads: usize, head_dim: usize) -> Result<Vec<Check>> {
    let spec = KvSpec {
        layers: 1,
        num_blocks: 64,
        block_size: 16,
        heads,
        head_dim,
    };
    let mut caches = (p.gpu.alloc_kv(spec)?, p.cpu.alloc_kv(spec)?);
    let a: Vec<u32> = vec![5, 2, 9, 11];
    let b: Vec<u32> = vec![1, 7];
    let c: Vec<u32> = (20..40).collect();
    let steps: Vec<(&str, Vec<SeqSpan>)> = vec![
        (
            "prefill 37+20 tokens",
            vec![span(0..37, 0, &a[..3]), span(37..57, 0, &b)],
        ),
        ("chunked prefill 13 after 37", vec![span(0..13, 37, &a)]),
        (
            "decode at 50 and 20",
            vec![span(0..1, 50, &a), span(1..2, 20, &b)],
        ),
        ("prefill 300 tokens", vec![span(0..300, 0, &c)]),
        (
            "decode at 300 (split context) and 51",
            vec![span(0..1, 300, &c), span(1..2, 51, &a)],
        ),
    ];
    let mut out = Vec::new();
    for (what, seqs) in steps {
        out.push(attention_call(p, &mut caches, &spec, &seqs, what)?);
    }
    Ok(out)
}

/// Times every kernel case at `dims` (the large shard's rank); one that fails to run is
/// reported with why, and the rest still run.
pub fn time_kernels(
    gpu: &CudaBackend,
    dims: &Dims,
    prefill_tokens: usize,
    ceilings: Option<&Ceilings>,
    warmup: usize,
    repeats: usize,
) -> Vec<Timing> {
    KernelCase::all(dims, prefill_tokens)
        .into_iter()
        .map(|case| {
            let mut t = Timing::new("kernels", case.name(dims), case.work(dims, 2), ceilings);
            t.repeats = repeats;
            match time_case(gpu, dims, case, warmup, repeats) {
                Ok(s) => {
                    t.measured_ms = Some(s.median_ms());
                    t.min_ms = Some(s.min_ms());
                }
                Err(e) => t.detail = format!("could not run: {e}"),
            }
            tracing::info!(
                "kernel {}: {}",
                t.name,
                t.measured_ms
                    .map_or_else(|| t.detail.clone(), |m| format!("{m:.4} ms"))
            );
            t
        })
        .collect()
}

fn time_case(
    gpu: &CudaBackend,
    dims: &Dims,
    case: KernelCase,
    warmup: usize,
    repeats: usize,
) -> Result<super::timer::Samples> {
    let (d, f) = (dims.d, dims.ffn);
    let tensor = |rows: usize, cols: usize, seed: u64| {
        gpu.upload(&random_bf16(rows * cols, seed, -1.0, 1.0), rows, cols)
    };
    let matrix = |rows: usize, cols: usize, seed: u64| {
        gpu.upload_matrix(
            rows,
            cols,
            random_bf16(rows * cols, seed, -0.02, 0.02),
            WeightDtype::Bf16,
        )
    };
    let time = |f: &mut dyn FnMut() -> Result<()>| time_runs(gpu, warmup, repeats, f);
    match case {
        KernelCase::Embed { rows } => {
            let table = matrix(dims.vocab, d, 1)?;
            let ids = random_ids(rows, 2, dims.vocab as u32);
            let mut out = gpu.zeros(rows, d)?;
            time(&mut || gpu.embed(&table, 0, &ids, &mut out))
        }
        KernelCase::AddPositions { rows } => {
            let table = tensor(dims.positions, d, 3)?;
            let positions: Vec<u32> = (0..rows as u32)
                .map(|i| i % dims.positions as u32)
                .collect();
            let mut x = tensor(rows, d, 4)?;
            time(&mut || gpu.add_positions(&table, &positions, &mut x))
        }
        KernelCase::LayerNorm { rows } => {
            let x = tensor(rows, d, 5)?;
            let (w, b) = (tensor(1, d, 6)?, tensor(1, d, 7)?);
            let mut out = gpu.zeros(rows, d)?;
            time(&mut || gpu.layer_norm(&x, &w, &b, 1e-5, &mut out))
        }
        KernelCase::Linear { rows, k, m, .. } => {
            let x = tensor(rows, k, 8)?;
            let w = matrix(m, k, 9)?;
            let mut out = gpu.zeros(rows, m)?;
            time(&mut || gpu.linear(&x, &w, None, &mut out))
        }
        KernelCase::Gelu { rows } => {
            let mut x = tensor(rows, f, 10)?;
            time(&mut || gpu.gelu(&mut x))
        }
        KernelCase::AddBias { rows } => {
            let mut x = tensor(rows, d, 11)?;
            let b = tensor(1, d, 12)?;
            time(&mut || gpu.add_bias(&mut x, &b))
        }
        KernelCase::AddAssign { rows } => {
            let mut x = tensor(rows, d, 13)?;
            let y = tensor(rows, d, 14)?;
            time(&mut || gpu.add_assign(&mut x, &y))
        }
        KernelCase::AttentionPrefill { tokens } => {
            let block_size = 16;
            let blocks = tokens.div_ceil(block_size);
            let spec = KvSpec {
                layers: 1,
                num_blocks: blocks,
                block_size,
                heads: dims.heads,
                head_dim: dims.head_dim,
            };
            let mut cache = gpu.alloc_kv(spec)?;
            let qkv = tensor(tokens, 3 * dims.width(), 15)?;
            let seqs = [span(0..tokens, 0, &(0..blocks as u32).collect::<Vec<_>>())];
            let mut out = gpu.zeros(tokens, dims.width())?;
            time(&mut || gpu.attention(&qkv, &mut cache, 0, &seqs, &mut out))
        }
        KernelCase::AttentionDecode { batch, context } => {
            let block_size = 16;
            let per_seq = (context + 1).div_ceil(block_size);
            let spec = KvSpec {
                layers: 1,
                num_blocks: batch * per_seq,
                block_size,
                heads: dims.heads,
                head_dim: dims.head_dim,
            };
            let mut cache = gpu.alloc_kv(spec)?;
            let table = |s: usize| -> Vec<u32> {
                (s * per_seq..(s + 1) * per_seq).map(|b| b as u32).collect()
            };
            // Fill every sequence's context through prefill attention, a few sequences
            // per call, so the timed decode reads written (random) K and V.
            let chunk = 8;
            for first in (0..batch).step_by(chunk) {
                let seqs: Vec<SeqSpan> = (first..(first + chunk).min(batch))
                    .enumerate()
                    .map(|(i, s)| span(i * context..(i + 1) * context, 0, &table(s)))
                    .collect();
                let rows = seqs.len() * context;
                let qkv = tensor(rows, 3 * dims.width(), 16 + first as u64)?;
                let mut out = gpu.zeros(rows, dims.width())?;
                gpu.attention(&qkv, &mut cache, 0, &seqs, &mut out)?;
            }
            let seqs: Vec<SeqSpan> = (0..batch)
                .map(|s| span(s..s + 1, context, &table(s)))
                .collect();
            let qkv = tensor(batch, 3 * dims.width(), 17)?;
            let mut out = gpu.zeros(batch, dims.width())?;
            time(&mut || gpu.attention(&qkv, &mut cache, 0, &seqs, &mut out))
        }
        KernelCase::GatherRows { rows, from } => {
            let x = tensor(from, d, 18)?;
            let picked: Vec<usize> = (0..rows).map(|i| (i * 31) % from).collect();
            time(&mut || gpu.gather_rows(&x, &picked).map(drop))
        }
        KernelCase::SampleRecords { rows } => {
            let logits = tensor(rows, dims.vocab, 19)?;
            let spec = SampleSpec {
                params: SamplingParams {
                    temperature: 0.8,
                    top_k: 0,
                    top_p: 0.9,
                    seed: 7,
                    repetition_penalty: 1.0,
                },
                penalty_ids: vec![],
                return_logits: false,
            };
            let specs: Vec<RowSpec> = (0..rows)
                .map(|i| RowSpec {
                    spec: &spec,
                    position: 100 + i,
                })
                .collect();
            let asks: Vec<RecordAsk> = (0..rows)
                .map(|row| RecordAsk {
                    row,
                    mode: RecordMode::first_round(&spec.params),
                })
                .collect();
            let mut out = Vec::new();
            time(&mut || {
                out.clear();
                gpu.sample_records(&logits, &specs, &asks, 0, &mut out)
            })
        }
    }
}
