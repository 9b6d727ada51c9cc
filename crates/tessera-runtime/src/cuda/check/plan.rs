//! What `tessera gpu-check` times, and the work of each: compiled in every build so that
//! `--dry-run` can print the plan and its floors without a GPU.

use tessera_model::{ModelConfig, ShardPlan, ShardSpec};

use super::floors::{self, Ceilings, Work};
use super::report::Timing;
use crate::error::Result;

/// How a check runs; every number a user may change, with its default.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckOptions {
    /// CUDA device ordinal.
    pub device: usize,
    /// Untimed runs before the timed ones.
    pub warmup: usize,
    /// Timed runs; the median is reported.
    pub repeats: usize,
    /// Bytes of each of the copy test's two buffers.
    pub copy_bytes: usize,
    /// `m = n = k` of the GEMM-rate test.
    pub gemm_size: usize,
    /// Preset whose forward pass is checked against the CPU backend.
    pub small_model: String,
    /// Decode steps after the prefill in that check (fed the CPU's tokens).
    pub small_decode_steps: usize,
    /// Preset of the timed shard.
    pub large_model: String,
    /// Tensor-parallel degree of the timed shard (its rank 0 is timed).
    pub large_tp: usize,
    /// Tokens already in the KV cache of every sequence of the timed decode steps.
    pub decode_context: usize,
    /// Batch sizes of the timed decode steps.
    pub decode_batches: Vec<usize>,
    /// Tokens of the timed prefill.
    pub prefill_tokens: usize,
    /// Tokens per KV-cache block.
    pub block_size: usize,
    /// Skip loading and timing the large shard.
    pub skip_large: bool,
}

impl Default for CheckOptions {
    fn default() -> Self {
        CheckOptions {
            device: 0,
            warmup: 3,
            repeats: 10,
            copy_bytes: 2 << 30,
            gemm_size: 8192,
            small_model: "gpt2".into(),
            small_decode_steps: 4,
            large_model: "gpt3-175b".into(),
            large_tp: 8,
            decode_context: 256,
            decode_batches: vec![1, 8, 64],
            prefill_tokens: 2048,
            block_size: 16,
            skip_large: false,
        }
    }
}

/// The batch-1 decode step's target: within this factor of its HBM floor.
pub const DECODE_BATCH1_TARGET_RATIO: f64 = 1.25;

/// The timed shard: the config and rank 0 of its TP split (one stage).
pub fn large_shard(opts: &CheckOptions) -> Result<(ModelConfig, ShardSpec)> {
    let config = ModelConfig::preset(&opts.large_model)?;
    let plan = ShardPlan::new(&config, opts.large_tp, 1)?;
    let spec = plan.shard(0, 0).clone();
    Ok((config, spec))
}

/// One kernel timing: an operation of the `Backend` trait at the timed shard's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelCase {
    /// Vocab-parallel embedding of `rows` ids, all in the rank's slice.
    Embed { rows: usize },
    /// Position rows added to `rows` hidden rows.
    AddPositions { rows: usize },
    /// LayerNorm of `rows` hidden rows.
    LayerNorm { rows: usize },
    /// `rows` by a `[m, k]` weight; `what` names the layer's matrix.
    Linear {
        what: &'static str,
        rows: usize,
        k: usize,
        m: usize,
    },
    /// GELU over `rows` rows of the rank's MLP columns.
    Gelu { rows: usize },
    /// A hidden-width bias added to `rows` rows.
    AddBias { rows: usize },
    /// Residual add of `rows` hidden rows.
    AddAssign { rows: usize },
    /// Causal prefill attention of one sequence of `tokens`.
    AttentionPrefill { tokens: usize },
    /// Decode attention: `batch` sequences, each with `context` cached tokens.
    AttentionDecode { batch: usize, context: usize },
    /// `rows` rows gathered out of `from`.
    GatherRows { rows: usize, from: usize },
    /// The sampler's records of `rows` rows of the rank's logits slice (top-p: the
    /// processed logits' statistics and 256 candidates a row).
    SampleRecords { rows: usize },
}

/// The shard dimensions the kernel cases use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    /// Hidden size.
    pub d: usize,
    /// Heads of the rank.
    pub heads: usize,
    /// Head size.
    pub head_dim: usize,
    /// MLP columns of the rank.
    pub ffn: usize,
    /// Vocabulary rows of the rank.
    pub vocab: usize,
    /// Context length of the model.
    pub positions: usize,
}

impl Dims {
    /// The dimensions of `spec`.
    pub fn of(config: &ModelConfig, spec: &ShardSpec) -> Self {
        Dims {
            d: config.n_embd,
            heads: spec.heads.len(),
            head_dim: config.head_dim(),
            ffn: spec.ffn.len(),
            vocab: spec.vocab.len(),
            positions: config.n_positions,
        }
    }

    /// Attention width of the rank.
    pub fn width(&self) -> usize {
        self.heads * self.head_dim
    }
}

impl KernelCase {
    /// Every case at the timed shard's dimensions: element-wise operations over a
    /// prefill's rows, each of the layer's GEMMs as a decode GEMV (1 row) and as a
    /// prefill GEMM, the LM head over a decode batch of 64, both attention paths.
    pub fn all(dims: &Dims, prefill_tokens: usize) -> Vec<KernelCase> {
        let n = prefill_tokens.min(dims.positions);
        let (d, w, f) = (dims.d, dims.width(), dims.ffn);
        let mut cases = vec![
            KernelCase::Embed { rows: n },
            KernelCase::AddPositions { rows: n },
            KernelCase::LayerNorm { rows: n },
        ];
        for rows in [1, n] {
            cases.push(KernelCase::Linear {
                what: "qkv",
                rows,
                k: d,
                m: 3 * w,
            });
            cases.push(KernelCase::Linear {
                what: "attn_out",
                rows,
                k: w,
                m: d,
            });
            cases.push(KernelCase::Linear {
                what: "fc1",
                rows,
                k: d,
                m: f,
            });
            cases.push(KernelCase::Linear {
                what: "fc2",
                rows,
                k: f,
                m: d,
            });
        }
        cases.extend([
            KernelCase::Linear {
                what: "lm_head",
                rows: 64,
                k: d,
                m: dims.vocab,
            },
            KernelCase::Gelu { rows: n },
            KernelCase::AddBias { rows: n },
            KernelCase::AddAssign { rows: n },
            KernelCase::AttentionPrefill { tokens: n },
            KernelCase::AttentionDecode {
                batch: 64,
                context: dims.positions - 1,
            },
            KernelCase::GatherRows { rows: 64, from: n },
            KernelCase::SampleRecords { rows: 64 },
        ]);
        cases
    }

    /// A name with the shape, for the table.
    pub fn name(&self, dims: &Dims) -> String {
        let (d, f) = (dims.d, dims.ffn);
        match *self {
            KernelCase::Embed { rows } => format!("embed {rows}x{d}"),
            KernelCase::AddPositions { rows } => format!("add_positions {rows}x{d}"),
            KernelCase::LayerNorm { rows } => format!("layer_norm {rows}x{d}"),
            KernelCase::Linear { what, rows, k, m } => format!("linear {what} {rows}x{k}x{m}"),
            KernelCase::Gelu { rows } => format!("gelu {rows}x{f}"),
            KernelCase::AddBias { rows } => format!("add_bias {rows}x{d}"),
            KernelCase::AddAssign { rows } => format!("add_assign {rows}x{d}"),
            KernelCase::AttentionPrefill { tokens } => format!(
                "attention prefill {tokens} tok {}x{}",
                dims.heads, dims.head_dim
            ),
            KernelCase::AttentionDecode { batch, context } => format!(
                "attention decode b{batch} ctx{context} {}x{}",
                dims.heads, dims.head_dim
            ),
            KernelCase::GatherRows { rows, from } => format!("gather_rows {rows} of {from}x{d}"),
            KernelCase::SampleRecords { rows } => {
                format!("sample_records {rows}x{} top-p", dims.vocab)
            }
        }
    }

    /// What the case must move and compute at `elem_bytes` per element.
    pub fn work(&self, dims: &Dims, elem_bytes: usize) -> Work {
        let (d, e) = (dims.d, elem_bytes);
        match *self {
            KernelCase::Embed { rows } => floors::embed(rows, d, e),
            KernelCase::AddPositions { rows } => floors::add_positions(rows, d, e),
            KernelCase::LayerNorm { rows } => floors::layer_norm(rows, d, e),
            KernelCase::Linear { rows, k, m, .. } => floors::linear(rows, k, m, e),
            KernelCase::Gelu { rows } => floors::gelu(rows, dims.ffn, e),
            KernelCase::AddBias { rows } => floors::add_bias(rows, d, e),
            KernelCase::AddAssign { rows } => floors::add_assign(rows, d, e),
            KernelCase::AttentionPrefill { tokens } => {
                floors::attention(1, 0, tokens, dims.heads, dims.head_dim, e)
            }
            KernelCase::AttentionDecode { batch, context } => {
                floors::attention(batch, context, 1, dims.heads, dims.head_dim, e)
            }
            KernelCase::GatherRows { rows, .. } => floors::gather_rows(rows, d, e),
            KernelCase::SampleRecords { rows } => floors::sample_records(rows, dims.vocab, e),
        }
    }
}

/// The timings a run makes, with their work and (given ceilings) their floors; what
/// `--dry-run` prints.
pub fn planned_timings(opts: &CheckOptions, ceilings: Option<&Ceilings>) -> Result<Vec<Timing>> {
    let (config, spec) = large_shard(opts)?;
    let dims = Dims::of(&config, &spec);
    let mut out: Vec<Timing> = KernelCase::all(&dims, opts.prefill_tokens)
        .iter()
        .map(|k| Timing::new("kernels", k.name(&dims), k.work(&dims, 2), ceilings))
        .collect();
    out.extend(step_timings(opts, &config, &spec, ceilings));
    Ok(out)
}

/// The decode and prefill timings of the large shard.
pub fn step_timings(
    opts: &CheckOptions,
    config: &ModelConfig,
    spec: &ShardSpec,
    ceilings: Option<&Ceilings>,
) -> Vec<Timing> {
    let shard = format!(
        "{} tp{} r{} ({} layers)",
        config.name,
        opts.large_tp,
        spec.tp_rank,
        spec.layers.len()
    );
    let mut out = Vec::new();
    for &batch in &opts.decode_batches {
        let w = floors::decode_step(config, spec, batch, opts.decode_context, 2);
        let mut t = Timing::new(
            "decode",
            format!("{shard} b{batch} ctx{}", opts.decode_context),
            w.work(),
            ceilings,
        );
        t.detail = format!(
            "weights {:.2} GB + KV {:.2} GB read",
            w.weight_bytes / 1e9,
            w.kv_bytes / 1e9
        );
        if batch == 1 {
            t.target_ratio = Some(DECODE_BATCH1_TARGET_RATIO);
        }
        out.push(t);
    }
    let p = floors::prefill(config, spec, opts.prefill_tokens, 2);
    let mut t = Timing::new(
        "prefill",
        format!("{shard} {} tokens", opts.prefill_tokens),
        p.work(),
        ceilings,
    );
    t.detail = format!(
        "GEMM {:.2} + attention {:.2} + LM head {:.3} TFLOP",
        p.gemm_flops / 1e12,
        p.attention_flops / 1e12,
        p.lm_head_flops / 1e12
    );
    out.push(t);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_covers_every_operation_at_the_175b_rank_shape() {
        let opts = CheckOptions::default();
        let (c, spec) = large_shard(&opts).unwrap();
        let dims = Dims::of(&c, &spec);
        assert_eq!(
            dims,
            Dims {
                d: 12288,
                heads: 12,
                head_dim: 128,
                ffn: 6144,
                vocab: 6283,
                positions: 2048,
            }
        );
        let timings = planned_timings(&opts, None).unwrap();
        for op in [
            "embed",
            "add_positions",
            "layer_norm",
            "linear qkv 1x12288x4608",
            "linear fc2 2048x6144x12288",
            "linear lm_head",
            "gelu",
            "add_bias",
            "add_assign",
            "attention prefill 2048",
            "attention decode b64 ctx2047",
            "gather_rows",
            "sample_records",
        ] {
            assert!(
                timings.iter().any(|t| t.name.starts_with(op)),
                "{op} is not timed"
            );
        }
        let decode: Vec<&Timing> = timings.iter().filter(|t| t.section == "decode").collect();
        assert_eq!(decode.len(), 3);
        assert_eq!(decode[0].target_ratio, Some(DECODE_BATCH1_TARGET_RATIO));
        assert!(decode[0]
            .name
            .contains("gpt3-175b tp8 r0 (96 layers) b1 ctx256"));
        assert!(timings.iter().all(|t| t.floor_ms.is_none()));
    }

    #[test]
    fn floors_at_h200_like_ceilings() {
        let c = Ceilings {
            memory_bytes_per_s: 4.3e12,
            matrix_flops_per_s: 780e12,
        };
        let t = planned_timings(&CheckOptions::default(), Some(&c)).unwrap();
        let b1 = t.iter().find(|t| t.name.ends_with("b1 ctx256")).unwrap();
        // (43.66 GB of weights + 0.15 GB of KV) / 4.3 TB/s.
        let floor = b1.floor_ms.unwrap();
        assert!((floor - 10.19).abs() < 0.01, "{floor}");
        let prefill = t.iter().find(|t| t.section == "prefill").unwrap();
        let floor = prefill.floor_ms.unwrap();
        assert!((floor - 115.8).abs() < 0.1, "{floor}");
    }
}
