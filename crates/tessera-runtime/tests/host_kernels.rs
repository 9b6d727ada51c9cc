//! Every CUDA kernel of `src/cuda/kernels`, executed on the CPU by the host emulation in
//! `tests/host_kernels/` and compared with the CPU backend, for bf16 and f16.
//!
//! Inputs are rounded to the kernel's dtype and the CPU backend gets the same values as
//! f32, so the only differences left are the kernels' f32 arithmetic order and the single
//! rounding of each stored result:
//! - Kernels that copy, or add two values and round once (embedding, positions, bias,
//!   residual, KV-cache write), must equal the CPU result rounded to the dtype bit for bit.
//! - The others (LayerNorm, GELU, attention) must be within a relative error
//!   ‖out − ref‖ / ‖ref‖ of twice the dtype's unit roundoff (bf16 2^-7, f16 2^-10): the
//!   rounding of the outputs alone is bounded by one unit roundoff, and f32 reordering adds
//!   orders of magnitude less.
//! - Sampling records must equal `sampling::local_record` bit for bit except the two sums
//!   of exponentials (relative 1e-5); the Gumbel noise must equal `sampling::gumbel`.
//!
//! Every output buffer starts as NaN (0xff bytes), so an element a kernel fails to write
//! fails the comparison. The set of kernels launched must be the set `sources.rs` lists.

#[path = "host_kernels/harness.rs"]
mod harness;

use std::sync::Mutex;

use harness::{Arg, Job};
use tessera_model::splitmix64;
use tessera_runtime::cuda::sources::{self, sample_mode, KernelDtype, SampleRowParams};
use tessera_runtime::sampling::{self, RecordMode, RowSpec, SampleRow};
use tessera_runtime::{
    Backend, CpuBackend, KvSpec, SampleSpec, SamplingParams, SeqSpan, WeightDtype,
};

// ---- Data ------------------------------------------------------------------------------

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(1);
        splitmix64(self.0)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * ((self.next() >> 40) as f32 / (1u64 << 24) as f32)
    }
    fn vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform(lo, hi)).collect()
    }
}

fn to_bits(d: KernelDtype, v: f32) -> u16 {
    match d {
        KernelDtype::Bf16 => half::bf16::from_f32(v).to_bits(),
        KernelDtype::F16 => half::f16::from_f32(v).to_bits(),
    }
}

fn from_bits(d: KernelDtype, b: u16) -> f32 {
    match d {
        KernelDtype::Bf16 => half::bf16::from_bits(b).to_f32(),
        KernelDtype::F16 => half::f16::from_bits(b).to_f32(),
    }
}

/// The values the dtype can hold nearest to `v`, as f32.
fn rounded(d: KernelDtype, v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| from_bits(d, to_bits(d, x))).collect()
}

fn elem_bytes(d: KernelDtype, v: &[f32]) -> Vec<u8> {
    v.iter()
        .flat_map(|&x| to_bits(d, x).to_le_bytes())
        .collect()
}

fn bits16(bytes: &[u8]) -> Vec<u16> {
    bytes
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect()
}

fn elems(d: KernelDtype, bytes: &[u8]) -> Vec<f32> {
    bits16(bytes).into_iter().map(|b| from_bits(d, b)).collect()
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn u32_bytes(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// NaN in every 16- and 32-bit float format, -1 as an integer.
fn poison(bytes: usize) -> Vec<u8> {
    vec![0xff; bytes]
}

const POISON16: u16 = 0xffff;

fn kernel(name: &str, d: KernelDtype) -> String {
    format!("{name}_{}", d.suffix())
}

/// Twice the unit roundoff of the dtype (see the module comment).
fn tolerance(d: KernelDtype) -> f64 {
    match d {
        KernelDtype::Bf16 => 2.0 * 2f64.powi(-8),
        KernelDtype::F16 => 2.0 * 2f64.powi(-11),
    }
}

// ---- Comparison and report -------------------------------------------------------------

/// How one case of a kernel compared.
enum Outcome {
    /// Bit for bit.
    Exact,
    /// Relative error and its bound.
    Within(f64, f64),
    /// Checked for completeness only (intermediate buffers).
    Written,
}

/// The printed report: kernel, case, outcome.
static REPORT: Mutex<Vec<(String, String, Outcome)>> = Mutex::new(Vec::new());

fn report(kernel: &str, case: &str, outcome: Outcome) {
    REPORT
        .lock()
        .unwrap()
        .push((kernel.to_string(), case.to_string(), outcome));
}

fn check_close(kernel: &str, case: &str, d: KernelDtype, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{kernel} {case}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            g.is_finite() == w.is_finite(),
            "{kernel} {case}: element {i} is {g}, want {w} (unwritten elements stay NaN)"
        );
    }
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(&g, &w)| (g as f64 - w as f64).powi(2))
        .sum();
    let den: f64 = want.iter().map(|&w| (w as f64).powi(2)).sum();
    let rel = if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    };
    let tol = tolerance(d);
    report(kernel, case, Outcome::Within(rel, tol));
    assert!(
        rel <= tol,
        "{kernel} {case}: relative error {rel:.3e} exceeds {tol:.3e}"
    );
}

fn check_exact(kernel: &str, case: &str, got: &[u16], want: &[u16]) {
    assert_eq!(got.len(), want.len(), "{kernel} {case}: length");
    if let Some(i) = (0..got.len()).find(|&i| got[i] != want[i]) {
        panic!(
            "{kernel} {case}: element {i} is {:#06x}, want {:#06x}{}",
            got[i],
            want[i],
            if got[i] == POISON16 {
                " (never written)"
            } else {
                ""
            }
        );
    }
    report(kernel, case, Outcome::Exact);
}

fn cpu() -> CpuBackend {
    CpuBackend::new(1).unwrap()
}

// ---- Embeddings ------------------------------------------------------------------------

fn check_embed() {
    let cpu = cpu();
    for d in KernelDtype::ALL {
        for (case, rows, cols, table_rows, first_id) in
            [(0u64, 7usize, 100usize, 50usize, 20u32), (1, 6, 300, 9, 0)]
        {
            let mut rng = Rng(100 + case);
            let table = rounded(d, &rng.vec(table_rows * cols, -3.0, 3.0));
            let last = first_id + table_rows as u32 - 1;
            let mut ids = vec![
                first_id,
                last,
                last + 1,
                last + 9,
                first_id.saturating_sub(1),
            ];
            while ids.len() < rows {
                ids.push(first_id + rng.below(table_rows as u64) as u32);
            }
            ids.truncate(rows);

            let m = cpu
                .upload_matrix(table_rows, cols, table.clone(), WeightDtype::F32)
                .unwrap();
            let mut out = cpu.zeros(rows, cols).unwrap();
            cpu.embed(&m, first_id as usize, &ids, &mut out).unwrap();
            let want: Vec<u16> = cpu
                .download(&out)
                .unwrap()
                .iter()
                .map(|&v| to_bits(d, v))
                .collect();

            let mut job = Job::new();
            let out_b = job.buffer(poison(2 * rows * cols));
            let table_b = job.buffer(elem_bytes(d, &table));
            let ids_b = job.buffer(u32_bytes(&ids));
            job.launch(
                &kernel("embed", d),
                sources::row_launch(rows as u32),
                &[
                    Arg::Buf(out_b),
                    Arg::Buf(table_b),
                    Arg::Buf(ids_b),
                    Arg::U32(rows as u32),
                    Arg::U32(cols as u32),
                    Arg::U32(first_id),
                    Arg::U32(table_rows as u32),
                ],
            );
            let got = job.run();
            check_exact(
                &kernel("embed", d),
                &format!("{rows}x{cols}, ids from {first_id}"),
                &bits16(&got[0]),
                &want,
            );
        }
    }
}

fn check_add_positions() {
    let cpu = cpu();
    for d in KernelDtype::ALL {
        for (case, rows, cols) in [(0u64, 9usize, 300usize), (1, 3, 64)] {
            let mut rng = Rng(200 + case);
            let context = 20;
            let table = rounded(d, &rng.vec(context * cols, -1.0, 1.0));
            let x = rounded(d, &rng.vec(rows * cols, -2.0, 2.0));
            let positions: Vec<u32> = (0..rows)
                .map(|_| rng.below(context as u64) as u32)
                .collect();

            let table_t = cpu.upload(&table, context, cols).unwrap();
            let mut x_t = cpu.upload(&x, rows, cols).unwrap();
            cpu.add_positions(&table_t, &positions, &mut x_t).unwrap();
            let want: Vec<u16> = cpu
                .download(&x_t)
                .unwrap()
                .iter()
                .map(|&v| to_bits(d, v))
                .collect();

            let mut job = Job::new();
            let x_b = job.buffer(elem_bytes(d, &x));
            let table_b = job.buffer(elem_bytes(d, &table));
            let pos_b = job.buffer(u32_bytes(&positions));
            job.launch(
                &kernel("add_positions", d),
                sources::row_launch(rows as u32),
                &[
                    Arg::Buf(x_b),
                    Arg::Buf(table_b),
                    Arg::Buf(pos_b),
                    Arg::U32(rows as u32),
                    Arg::U32(cols as u32),
                ],
            );
            let got = job.run();
            check_exact(
                &kernel("add_positions", d),
                &format!("{rows}x{cols}"),
                &bits16(&got[0]),
                &want,
            );
        }
    }
}

// ---- LayerNorm and element-wise --------------------------------------------------------

fn check_layer_norm() {
    let cpu = cpu();
    let eps = 1e-5f32;
    for d in KernelDtype::ALL {
        for (case, rows, cols) in [(0u64, 5usize, 1usize), (1, 3, 100), (2, 4, 769)] {
            let mut rng = Rng(300 + case);
            let x = rounded(d, &rng.vec(rows * cols, 1.0, 4.0));
            let w = rounded(d, &rng.vec(cols, 0.5, 1.5));
            let b = rounded(d, &rng.vec(cols, -0.5, 0.5));

            let (x_t, w_t, b_t) = (
                cpu.upload(&x, rows, cols).unwrap(),
                cpu.upload(&w, 1, cols).unwrap(),
                cpu.upload(&b, 1, cols).unwrap(),
            );
            let mut out = cpu.zeros(rows, cols).unwrap();
            cpu.layer_norm(&x_t, &w_t, &b_t, eps, &mut out).unwrap();
            let want = cpu.download(&out).unwrap();

            let mut job = Job::new();
            let out_b = job.buffer(poison(2 * rows * cols));
            let x_b = job.buffer(elem_bytes(d, &x));
            let w_b = job.buffer(elem_bytes(d, &w));
            let b_b = job.buffer(elem_bytes(d, &b));
            job.launch(
                &kernel("layer_norm", d),
                sources::row_launch(rows as u32),
                &[
                    Arg::Buf(out_b),
                    Arg::Buf(x_b),
                    Arg::Buf(w_b),
                    Arg::Buf(b_b),
                    Arg::U32(rows as u32),
                    Arg::U32(cols as u32),
                    Arg::F32(eps),
                ],
            );
            let got = job.run();
            check_close(
                &kernel("layer_norm", d),
                &format!("{rows}x{cols}"),
                d,
                &elems(d, &got[0]),
                &want,
            );
        }
    }
}

fn check_bias_gelu() {
    let cpu = cpu();
    for d in KernelDtype::ALL {
        for (case, rows, cols, with_bias) in [(0u64, 6usize, 333usize, true), (1, 4, 100, false)] {
            let mut rng = Rng(400 + case);
            let x = rounded(d, &rng.vec(rows * cols, -5.0, 5.0));
            let bias = rounded(d, &rng.vec(cols, -1.0, 1.0));

            let mut x_t = cpu.upload(&x, rows, cols).unwrap();
            if with_bias {
                cpu.add_bias(&mut x_t, &cpu.upload(&bias, 1, cols).unwrap())
                    .unwrap();
            }
            cpu.gelu(&mut x_t).unwrap();
            let want = cpu.download(&x_t).unwrap();

            let mut job = Job::new();
            let x_b = job.buffer(elem_bytes(d, &x));
            let bias_arg = if with_bias {
                Arg::Buf(job.buffer(elem_bytes(d, &bias)))
            } else {
                Arg::Null
            };
            job.launch(
                &kernel("bias_gelu", d),
                sources::elementwise_launch((rows * cols) as u64),
                &[
                    Arg::Buf(x_b),
                    bias_arg,
                    Arg::U32(rows as u32),
                    Arg::U32(cols as u32),
                ],
            );
            let got = job.run();
            let case = format!(
                "{rows}x{cols}, {}",
                if with_bias { "bias" } else { "no bias" }
            );
            check_close(&kernel("bias_gelu", d), &case, d, &elems(d, &got[0]), &want);
        }
    }
}

fn check_add_bias() {
    let cpu = cpu();
    for d in KernelDtype::ALL {
        let (rows, cols) = (4usize, 1000usize);
        let mut rng = Rng(500);
        let x = rounded(d, &rng.vec(rows * cols, -8.0, 8.0));
        let bias = rounded(d, &rng.vec(cols, -1.0, 1.0));
        let mut x_t = cpu.upload(&x, rows, cols).unwrap();
        cpu.add_bias(&mut x_t, &cpu.upload(&bias, 1, cols).unwrap())
            .unwrap();
        let want: Vec<u16> = cpu
            .download(&x_t)
            .unwrap()
            .iter()
            .map(|&v| to_bits(d, v))
            .collect();

        let mut job = Job::new();
        let x_b = job.buffer(elem_bytes(d, &x));
        let bias_b = job.buffer(elem_bytes(d, &bias));
        job.launch(
            &kernel("add_bias", d),
            sources::elementwise_launch((rows * cols) as u64),
            &[
                Arg::Buf(x_b),
                Arg::Buf(bias_b),
                Arg::U32(rows as u32),
                Arg::U32(cols as u32),
            ],
        );
        let got = job.run();
        check_exact(
            &kernel("add_bias", d),
            &format!("{rows}x{cols}"),
            &bits16(&got[0]),
            &want,
        );
    }
}

/// Values across the dtype's whole range: ordinary, subnormal and near the largest finite
/// (their sums overflow), so the conversions' every branch is taken.
fn wide_values(d: KernelDtype, rng: &mut Rng, n: usize) -> Vec<f32> {
    let (tiny, big) = match d {
        KernelDtype::Bf16 => (1e-39f32, 2.5e38f32),
        KernelDtype::F16 => (3e-6f32, 4.0e4f32),
    };
    let v: Vec<f32> = (0..n)
        .map(|_| match rng.below(10) {
            0 => rng.uniform(-tiny, tiny),
            1 => rng.uniform(big, 1.3 * big) * if rng.below(2) == 0 { 1.0 } else { -1.0 },
            _ => rng.uniform(-10.0, 10.0),
        })
        .collect();
    rounded(d, &v)
}

fn check_add_assign() {
    let cpu = cpu();
    for d in KernelDtype::ALL {
        // The contract's grid, then a 3-block grid that must stride over the rest.
        for (case, n, grid) in [(0u64, 5000usize, None), (1, 4099, Some(3u32))] {
            let mut rng = Rng(600 + case);
            let x = wide_values(d, &mut rng, n);
            let y = wide_values(d, &mut rng, n);
            let mut x_t = cpu.upload(&x, 1, n).unwrap();
            cpu.add_assign(&mut x_t, &cpu.upload(&y, 1, n).unwrap())
                .unwrap();
            let want: Vec<u16> = cpu
                .download(&x_t)
                .unwrap()
                .iter()
                .map(|&v| to_bits(d, v))
                .collect();

            let mut cfg = sources::elementwise_launch(n as u64);
            if let Some(g) = grid {
                cfg.grid.0 = g;
            }
            let mut job = Job::new();
            let x_b = job.buffer(elem_bytes(d, &x));
            let y_b = job.buffer(elem_bytes(d, &y));
            job.launch(
                &kernel("add_assign", d),
                cfg,
                &[Arg::Buf(x_b), Arg::Buf(y_b), Arg::U64(n as u64)],
            );
            let got = job.run();
            check_exact(
                &kernel("add_assign", d),
                &format!("n={n}, {} blocks, subnormals and overflow", cfg.grid.0),
                &bits16(&got[0]),
                &want,
            );
        }
    }
}

// ---- Attention -------------------------------------------------------------------------

/// One attention configuration: sequences with `before[s]` tokens written by a first
/// (prefill) step, then `new[s]` tokens in a second step run by prefill attention or, with
/// `decode = Some(blocks_per_split)`, by split-K decode attention.
struct AttentionCase {
    heads: usize,
    head_dim: usize,
    block_size: usize,
    before: Vec<usize>,
    new: Vec<usize>,
    decode: Option<u32>,
}

/// Row ranges and u32 arrays of one step.
struct Step {
    rows: usize,
    qkv: Vec<f32>,
    spans: Vec<SeqSpan>,
    slots: Vec<u32>,
    seq_rows: Vec<u32>,
    start_pos: Vec<u32>,
    row_seq: Vec<u32>,
    row_pos: Vec<u32>,
    max_new: usize,
}

fn attention_step(
    d: KernelDtype,
    rng: &mut Rng,
    c: &AttentionCase,
    tables: &[Vec<u32>],
    start: &[usize],
    lens: &[usize],
) -> Step {
    let width = c.heads * c.head_dim;
    let rows: usize = lens.iter().sum();
    let qkv = rounded(d, &rng.vec(rows * 3 * width, -2.0, 2.0));
    let (mut spans, mut slots, mut seq_rows, mut row_seq, mut row_pos) =
        (vec![], vec![], vec![0u32], vec![], vec![]);
    let mut row = 0;
    for (s, (&st, &len)) in start.iter().zip(lens).enumerate() {
        spans.push(SeqSpan {
            rows: row..row + len,
            start_pos: st,
            block_table: tables[s].clone(),
        });
        for pos in st..st + len {
            let block = tables[s][pos / c.block_size] as usize;
            slots.push((block * c.block_size + pos % c.block_size) as u32);
            row_seq.push(s as u32);
            row_pos.push(pos as u32);
        }
        row += len;
        seq_rows.push(row as u32);
    }
    Step {
        rows,
        qkv,
        spans,
        slots,
        seq_rows,
        start_pos: start.iter().map(|&p| p as u32).collect(),
        row_seq,
        row_pos,
        max_new: lens.iter().copied().max().unwrap_or(0),
    }
}

fn check_attention_case(d: KernelDtype, c: &AttentionCase, seed: u64) {
    let cpu = cpu();
    let mut rng = Rng(seed);
    let (heads, dh, bs) = (c.heads, c.head_dim, c.block_size);
    let width = heads * dh;
    let nseq = c.before.len();
    let totals: Vec<usize> = c.before.iter().zip(&c.new).map(|(a, b)| a + b).collect();
    let needed: Vec<usize> = totals.iter().map(|t| t.div_ceil(bs)).collect();
    let num_blocks = needed.iter().sum::<usize>() + 3;
    // Blocks handed out in a scrambled order; tables padded with poison entries.
    let mut order: Vec<u32> = (0..num_blocks as u32).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let mut next = order.into_iter();
    let tables: Vec<Vec<u32>> = needed
        .iter()
        .map(|&n| next.by_ref().take(n).collect())
        .collect();
    let stride = needed.iter().copied().max().unwrap() + 1;
    let mut flat_tables = vec![u32::MAX; nseq * stride];
    for (s, t) in tables.iter().enumerate() {
        flat_tables[s * stride..s * stride + t.len()].copy_from_slice(t);
    }
    let zeros = vec![0usize; nseq];
    let step1 = attention_step(d, &mut rng, c, &tables, &zeros, &c.before);
    let step2 = attention_step(d, &mut rng, c, &tables, &c.before, &c.new);

    // CPU reference: both steps through the backend, one layer.
    let spec = KvSpec {
        layers: 1,
        num_blocks,
        block_size: bs,
        heads,
        head_dim: dh,
    };
    let mut cache = cpu.alloc_kv(spec).unwrap();
    let mut want = Vec::new();
    for step in [&step1, &step2] {
        let qkv = cpu.upload(&step.qkv, step.rows, 3 * width).unwrap();
        let mut out = cpu.zeros(step.rows, width).unwrap();
        cpu.attention(&qkv, &mut cache, 0, &step.spans, &mut out)
            .unwrap();
        want.push(cpu.download(&out).unwrap());
    }
    let (k_want, v_want) = cache.layer(0);

    // The same on the emulated device.
    let slots_total = num_blocks * bs;
    let scale = 1.0 / (dh as f32).sqrt();
    let mut job = Job::new();
    let k_b = job.buffer(poison(2 * slots_total * width));
    let v_b = job.buffer(poison(2 * slots_total * width));
    let tables_b = job.buffer(u32_bytes(&flat_tables));
    let mut outs = Vec::new();
    let mut parts = None;
    for (i, step) in [&step1, &step2].into_iter().enumerate() {
        let qkv_b = job.buffer(elem_bytes(d, &step.qkv));
        let out_b = job.buffer(poison(2 * step.rows * width));
        outs.push(out_b);
        if step.rows > 0 {
            let slots_b = job.buffer(u32_bytes(&step.slots));
            job.launch(
                &kernel("write_kv", d),
                sources::row_launch(step.rows as u32),
                &[
                    Arg::Buf(k_b),
                    Arg::Buf(v_b),
                    Arg::Buf(qkv_b),
                    Arg::Buf(slots_b),
                    Arg::U32(step.rows as u32),
                    Arg::U32(heads as u32),
                    Arg::U32(dh as u32),
                ],
            );
        }
        match (i, c.decode) {
            (1, Some(blocks_per_split)) => {
                let max_len = step.row_pos.iter().map(|p| p + 1).max().unwrap();
                let splits = sources::decode_splits(max_len, bs as u32, blocks_per_split);
                let n_parts = step.rows * heads * splits as usize;
                let max_b = job.buffer(poison(4 * n_parts));
                let sum_b = job.buffer(poison(4 * n_parts));
                let acc_b = job.buffer(poison(4 * n_parts * dh));
                let row_seq_b = job.buffer(u32_bytes(&step.row_seq));
                let row_pos_b = job.buffer(u32_bytes(&step.row_pos));
                job.launch(
                    &kernel("attention_decode", d),
                    sources::attention_decode_launch(
                        step.rows as u32,
                        heads as u32,
                        splits,
                        dh as u32,
                    ),
                    &[
                        Arg::Buf(max_b),
                        Arg::Buf(sum_b),
                        Arg::Buf(acc_b),
                        Arg::Buf(qkv_b),
                        Arg::Buf(k_b),
                        Arg::Buf(v_b),
                        Arg::Buf(tables_b),
                        Arg::Buf(row_seq_b),
                        Arg::Buf(row_pos_b),
                        Arg::U32(step.rows as u32),
                        Arg::U32(heads as u32),
                        Arg::U32(dh as u32),
                        Arg::U32(bs as u32),
                        Arg::U32(stride as u32),
                        Arg::U32(blocks_per_split),
                        Arg::U32(splits),
                        Arg::F32(scale),
                    ],
                );
                job.launch(
                    &kernel("attention_combine", d),
                    sources::attention_combine_launch(step.rows as u32, heads as u32),
                    &[
                        Arg::Buf(out_b),
                        Arg::Buf(max_b),
                        Arg::Buf(sum_b),
                        Arg::Buf(acc_b),
                        Arg::U32(step.rows as u32),
                        Arg::U32(heads as u32),
                        Arg::U32(dh as u32),
                        Arg::U32(splits),
                    ],
                );
                parts = Some((max_b, sum_b, acc_b, splits));
            }
            _ => {
                let seq_rows_b = job.buffer(u32_bytes(&step.seq_rows));
                let start_b = job.buffer(u32_bytes(&step.start_pos));
                job.launch(
                    &kernel("attention_prefill", d),
                    sources::attention_prefill_launch(
                        step.max_new as u32,
                        heads as u32,
                        nseq as u32,
                        dh as u32,
                        d,
                    ),
                    &[
                        Arg::Buf(out_b),
                        Arg::Buf(qkv_b),
                        Arg::Buf(k_b),
                        Arg::Buf(v_b),
                        Arg::Buf(tables_b),
                        Arg::Buf(seq_rows_b),
                        Arg::Buf(start_b),
                        Arg::U32(nseq as u32),
                        Arg::U32(heads as u32),
                        Arg::U32(dh as u32),
                        Arg::U32(bs as u32),
                        Arg::U32(stride as u32),
                        Arg::F32(scale),
                    ],
                );
            }
        }
    }
    let got = job.run();

    let shape = format!(
        "dh={dh} bs={bs} seqs {:?}+{:?}{}",
        c.before,
        c.new,
        match c.decode {
            Some(b) => format!(" split {b} blocks"),
            None => String::new(),
        }
    );
    // Cache: every written slot equals the CPU's, every other one is untouched.
    let written: std::collections::BTreeSet<u32> =
        step1.slots.iter().chain(&step2.slots).copied().collect();
    for (name, buf, reference) in [("K", k_b, k_want), ("V", v_b, v_want)] {
        let cache_bits = bits16(&got[buf.index()]);
        let want_bits: Vec<u16> = (0..slots_total * width)
            .map(|i| {
                if written.contains(&((i / width) as u32)) {
                    to_bits(d, reference[i])
                } else {
                    POISON16
                }
            })
            .collect();
        check_exact(
            &kernel("write_kv", d),
            &format!("{name} cache, {shape}"),
            &cache_bits,
            &want_bits,
        );
    }
    let step2_kernel = if c.decode.is_some() {
        "attention_combine"
    } else {
        "attention_prefill"
    };
    check_close(
        &kernel("attention_prefill", d),
        &format!("step 1, {shape}"),
        d,
        &elems(d, &got[outs[0].index()]),
        &want[0],
    );
    check_close(
        &kernel(step2_kernel, d),
        &format!("step 2, {shape}"),
        d,
        &elems(d, &got[outs[1].index()]),
        &want[1],
    );
    if let Some((max_b, sum_b, acc_b, splits)) = parts {
        for (what, b) in [("max", max_b), ("sum", sum_b), ("acc", acc_b)] {
            let v = f32s(&got[b.index()]);
            assert!(
                v.iter().all(|x| !x.is_nan()),
                "attention_decode {shape}: partial {what} left unwritten ({splits} splits)"
            );
        }
        let max = f32s(&got[max_b.index()]);
        report(
            &kernel("attention_decode", d),
            &format!(
                "{shape}: {splits} splits, {} empty, all partials written",
                max.iter().filter(|m| **m == f32::NEG_INFINITY).count()
            ),
            Outcome::Written,
        );
    }
}

fn check_attention() {
    for d in KernelDtype::ALL {
        for (i, (dh, bs)) in [(64usize, 16usize), (80, 5), (128, 7)]
            .into_iter()
            .enumerate()
        {
            let seed = 700 + i as u64;
            check_attention_case(
                d,
                &AttentionCase {
                    heads: 2,
                    head_dim: dh,
                    block_size: bs,
                    before: vec![33, 5, 19, 0],
                    new: vec![3, 17, 1, 6],
                    decode: None,
                },
                seed,
            );
            check_attention_case(
                d,
                &AttentionCase {
                    heads: 2,
                    head_dim: dh,
                    block_size: bs,
                    before: vec![40, 5, 0, 17],
                    new: vec![1, 1, 2, 1],
                    decode: Some(if bs < 8 { 2 } else { 1 }),
                },
                seed + 10,
            );
        }
    }
}

// ---- Sampling --------------------------------------------------------------------------

struct SampleCase {
    params: SamplingParams,
    penalty_ids: Vec<u32>,
    /// A later round's mode instead of the first round's.
    mode: Option<RecordMode>,
    /// Logits quantised to steps of 0.5: many ties.
    ties: bool,
}

fn sample_cases(first_id: u32, n: u32) -> Vec<SampleCase> {
    let p = |temperature, top_k, top_p, seed, repetition_penalty| SamplingParams {
        temperature,
        top_k,
        top_p,
        seed,
        repetition_penalty,
    };
    let penalty = vec![
        first_id + 3,
        first_id + 100,
        first_id + n - 1,
        first_id - 1,
        first_id + n,
        7,
    ];
    let case = |params, penalty_ids: &Vec<u32>, mode, ties| SampleCase {
        params,
        penalty_ids: penalty_ids.clone(),
        mode,
        ties,
    };
    let none = vec![];
    vec![
        case(p(0.0, 0, 1.0, 0, 1.0), &none, None, false),
        case(p(0.0, 0, 1.0, 0, 1.3), &penalty, None, false),
        case(p(0.8, 0, 1.0, 42, 1.0), &none, None, false),
        case(p(1.2, 0, 1.0, u64::MAX, 1.5), &penalty, None, false),
        case(p(1.1, 5, 1.0, 3, 1.0), &none, None, false),
        case(p(0.7, 0, 0.9, 9, 1.0), &none, None, false),
        case(p(0.9, 40, 0.8, 5, 1.2), &penalty, None, false),
        case(p(1.0, 50, 1.0, 1, 1.0), &none, None, true),
        case(p(0.6, 1, 1.0, 8, 1.0), &none, None, true),
        case(
            p(1.0, 0, 0.95, 2, 1.0),
            &none,
            Some(RecordMode::Filtered { c: 1024 }),
            true,
        ),
        case(
            p(1.3, 0, 0.5, 4, 1.1),
            &penalty,
            Some(RecordMode::Filtered { c: n as usize + 37 }),
            false,
        ),
    ]
}

fn check_sampling() {
    let (first_id, n) = (4000u32, 1500u32);
    for d in KernelDtype::ALL {
        let cases = sample_cases(first_id, n);
        let mut rng = Rng(800);
        let mut logits = Vec::new();
        let mut want = Vec::new();
        let mut params = Vec::new();
        let mut penalty = Vec::new();
        let mut offsets = Vec::new();
        for (r, c) in cases.iter().enumerate() {
            let mut row = rng.vec(n as usize, -4.0, 4.0);
            if c.ties {
                row.iter_mut().for_each(|v| *v = (*v * 2.0).round() / 2.0);
            }
            // A repeated maximum: greedy takes the first.
            row[100] = 9.0;
            row[900] = 9.0;
            let row = rounded(d, &row);
            let spec = SampleSpec {
                params: c.params,
                penalty_ids: c.penalty_ids.clone(),
                return_logits: false,
            };
            let position = 17 + 5 * r;
            let mode = c.mode.unwrap_or_else(|| RecordMode::first_round(&c.params));
            offsets.push(want.len());
            sampling::local_record(
                &SampleRow {
                    logits: &row,
                    spec: &spec,
                    position,
                },
                mode,
                first_id as usize,
                &mut want,
            );
            let row_spec = RowSpec {
                spec: &spec,
                position,
            };
            params.push(
                SampleRowParams::for_row(&row_spec, mode, penalty.len(), *offsets.last().unwrap())
                    .unwrap(),
            );
            penalty.extend(SampleRowParams::penalty_ids(&row_spec));
            logits.extend(row);
        }
        let rows = cases.len();

        let mut job = Job::new();
        let records_b = job.buffer(poison(4 * want.len()));
        let scratch_b = job.buffer(poison(4 * rows * n as usize));
        let logits_b = job.buffer(elem_bytes(d, &logits));
        let params_b = job.buffer(u32_bytes(
            &params.iter().flat_map(|p| p.to_words()).collect::<Vec<_>>(),
        ));
        let penalty_b = job.buffer(u32_bytes(&penalty));
        job.launch(
            &kernel("sample_stats", d),
            sources::sample_stats_launch(rows as u32),
            &[
                Arg::Buf(records_b),
                Arg::Buf(scratch_b),
                Arg::Buf(logits_b),
                Arg::Buf(params_b),
                Arg::Buf(penalty_b),
                Arg::U32(rows as u32),
                Arg::U32(n),
                Arg::U32(first_id),
            ],
        );
        let got = f32s(&job.run()[0]);

        let name = kernel("sample_stats", d);
        for (r, c) in cases.iter().enumerate() {
            let start = offsets[r];
            let end = offsets.get(r + 1).copied().unwrap_or(want.len());
            let (g, w) = (&got[start..end], &want[start..end]);
            let what = format!("row {r} {:?} {:?}", c.params, c.mode);
            let mut worst = 0f64;
            for i in 0..g.len() {
                if i == 1 || i == 3 {
                    // Sums of exponentials: f32 sums in another order.
                    let rel = ((g[i] - w[i]) as f64 / w[i].max(f32::MIN_POSITIVE) as f64).abs();
                    worst = worst.max(rel);
                    assert!(
                        rel <= 1e-5,
                        "{name} {what}: field {i} is {}, want {}",
                        g[i],
                        w[i]
                    );
                } else {
                    assert!(
                        g[i].to_bits() == w[i].to_bits(),
                        "{name} {what}: field {i} is {} ({:#010x}), want {} ({:#010x})",
                        g[i],
                        g[i].to_bits(),
                        w[i],
                        w[i].to_bits()
                    );
                }
            }
            report(
                &name,
                &format!(
                    "{}: {} of {} candidates, seed {}",
                    match params[r].mode {
                        sample_mode::GREEDY => "greedy",
                        sample_mode::FULL => "gumbel-max",
                        _ => "top",
                    },
                    g[4],
                    params[r].candidates,
                    c.params.seed
                ),
                Outcome::Within(worst, 1e-5),
            );
        }
    }
}

fn check_gumbel_noise() {
    for (seed, position, first_id, n, grid) in [
        (0u64, 0u32, 0u32, 1000u32, None),
        (u64::MAX, 123_456, 50_000, 777, None),
        (42, 7, 3, 300, Some(1u32)),
    ] {
        let mut cfg = sources::elementwise_launch(n as u64);
        if let Some(g) = grid {
            cfg.grid.0 = g;
        }
        let mut job = Job::new();
        let out_b = job.buffer(poison(8 * n as usize));
        job.launch(
            "gumbel_noise",
            cfg,
            &[
                Arg::Buf(out_b),
                Arg::U64(seed),
                Arg::U32(position),
                Arg::U32(first_id),
                Arg::U32(n),
            ],
        );
        let got = job.run();
        for (i, c) in got[0].chunks_exact(8).enumerate() {
            let g = f64::from_le_bytes(c.try_into().unwrap());
            let want = sampling::gumbel(seed, position as usize, first_id + i as u32);
            assert_eq!(
                g.to_bits(),
                want.to_bits(),
                "gumbel_noise seed {seed} position {position} id {}: {g} vs {want}",
                first_id + i as u32
            );
        }
        report(
            "gumbel_noise",
            &format!("seed {seed}, position {position}, {n} ids"),
            Outcome::Exact,
        );
    }
}

// ---- The test --------------------------------------------------------------------------

#[test]
fn every_kernel_matches_the_cpu_backend() {
    let checks: [(&str, fn()); 10] = [
        ("emulator build", || {
            harness::emulator();
        }),
        ("embed", check_embed),
        ("add_positions", check_add_positions),
        ("layer_norm", check_layer_norm),
        ("bias_gelu", check_bias_gelu),
        ("add_bias", check_add_bias),
        ("add_assign", check_add_assign),
        ("attention", check_attention),
        ("sample_stats", check_sampling),
        ("gumbel_noise", check_gumbel_noise),
    ];
    let mut failures = Vec::new();
    for (name, check) in checks {
        let started = std::time::Instant::now();
        if let Err(e) = std::panic::catch_unwind(check) {
            let message = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            failures.push(format!("{name}: {message}"));
        }
        eprintln!("{name}: {:.2} s", started.elapsed().as_secs_f64());
    }
    println!(
        "{:<26} {:<60} {:>10} {:>10}",
        "kernel", "case", "error", "bound"
    );
    for (k, case, outcome) in REPORT.lock().unwrap().iter() {
        match outcome {
            Outcome::Exact => println!("{k:<26} {case:<60} {:>10} {:>10}", "exact", "exact"),
            Outcome::Within(err, bound) => {
                println!("{k:<26} {case:<60} {err:>10.2e} {bound:>10.2e}")
            }
            Outcome::Written => println!("{k:<26} {case:<60} {:>10} {:>10}", "written", "-"),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    let listed: std::collections::BTreeSet<String> =
        sources::exported_names().into_iter().collect();
    let launched = harness::emulator().launched();
    assert_eq!(
        launched, listed,
        "the kernels exercised here must be exactly the kernels sources.rs lists"
    );
}

/// The emulator must report the bugs it exists to catch, not run through them.
#[test]
fn the_emulator_reports_kernel_bugs() {
    let cfg = |shared_bytes| sources::LaunchConfig {
        grid: (2, 1, 1),
        block: (64, 1, 1),
        shared_bytes,
    };
    for (kernel, shared_bytes, expected) in [
        ("selftest_early_return", 0, "deadlock"),
        ("selftest_divergent_barrier", 0, "divergent barrier"),
        ("selftest_out_of_bounds", 0, "out-of-bounds access"),
        (
            "selftest_shared_overflow",
            128,
            "past the launch's 128 bytes",
        ),
        ("selftest_half_warp_shuffle", 0, "deadlock"),
    ] {
        let mut job = Job::new();
        let out = job.buffer(poison(4 * 128));
        job.launch_unlisted(kernel, cfg(shared_bytes), out);
        let report = job.run_expecting_failure();
        assert!(
            report.contains(expected) && report.contains(kernel),
            "{kernel}: expected a report of `{expected}`, got:\n{report}"
        );
    }

    // A missing barrier gives a wrong value in at least one block (even blocks run their
    // threads in order, odd blocks in reverse).
    let mut job = Job::new();
    let out = job.buffer(poison(4 * 128));
    job.launch_unlisted("selftest_missing_barrier", cfg(0), out);
    let got = f32s(&job.run()[0]);
    let race_free: Vec<f32> = (0..128).map(|i| ((i + 1) % 64 + 1) as f32).collect();
    assert_ne!(got, race_free, "the missing barrier went unnoticed");
}
