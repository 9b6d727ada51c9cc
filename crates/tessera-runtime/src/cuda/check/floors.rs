//! The least time an operation can take on a device: the bytes it must move through
//! device memory over the measured memory bandwidth, or the FLOPs it must do over the
//! measured matrix rate, whichever is larger.
//!
//! Pure arithmetic, compiled in every build, so the numbers `tessera gpu-check` holds its
//! timings to can be checked (and printed with `--dry-run`) without a GPU.
//!
//! Counting rules: each input is read once and each output written once; 16-bit storage
//! (`elem_bytes` = 2 for bf16); activations between operations are not counted in a
//! whole step, whose floor is the weights and KV cache it must read. Element-wise
//! arithmetic is left out of FLOPs: it runs on the general cores, which the matrix rate
//! does not describe, and every element-wise operation here is memory-bound.

use serde::Serialize;
use tessera_model::{ModelConfig, ShardSpec};

/// The two ceilings of a device, measured on it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Ceilings {
    /// Bytes per second a device-to-device copy moves, counting bytes read plus bytes
    /// written: what device memory serves in all. A stream that only reads can use all
    /// of it, so this is also the read rate a read-bound step is held to.
    pub memory_bytes_per_s: f64,
    /// FLOPs per second of a large bf16 GEMM (f32 accumulation) on random data.
    pub matrix_flops_per_s: f64,
}

/// What one operation must do.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct Work {
    /// Bytes that must cross device memory.
    pub bytes: f64,
    /// Floating-point operations (a multiply-add counts two).
    pub flops: f64,
}

/// Which ceiling sets a floor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Bound {
    /// Bytes over memory bandwidth is the larger time.
    Memory,
    /// FLOPs over the matrix rate is the larger time.
    Compute,
}

impl std::fmt::Display for Bound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Bound::Memory => "memory",
            Bound::Compute => "compute",
        })
    }
}

impl Work {
    /// Work of `bytes` and `flops`.
    pub fn new(bytes: f64, flops: f64) -> Self {
        Work { bytes, flops }
    }

    /// The floor in seconds and the ceiling that sets it.
    pub fn floor_s(&self, c: &Ceilings) -> (f64, Bound) {
        let memory = self.bytes / c.memory_bytes_per_s;
        let compute = self.flops / c.matrix_flops_per_s;
        if compute > memory {
            (compute, Bound::Compute)
        } else {
            (memory, Bound::Memory)
        }
    }
}

impl std::ops::Add for Work {
    type Output = Work;
    fn add(self, o: Work) -> Work {
        Work::new(self.bytes + o.bytes, self.flops + o.flops)
    }
}

fn f(n: usize) -> f64 {
    n as f64
}

/// `embed` of `rows` token ids from a `[_, cols]` table: read the rows, write them.
pub fn embed(rows: usize, cols: usize, elem_bytes: usize) -> Work {
    Work::new(f(2 * rows * cols * elem_bytes + 4 * rows), 0.0)
}

/// `add_positions` over `[rows, cols]`: read x and the position rows, write x.
pub fn add_positions(rows: usize, cols: usize, elem_bytes: usize) -> Work {
    Work::new(f(3 * rows * cols * elem_bytes + 4 * rows), 0.0)
}

/// `layer_norm` of `[rows, cols]`: read x, weight and bias, write out.
pub fn layer_norm(rows: usize, cols: usize, elem_bytes: usize) -> Work {
    Work::new(f((2 * rows * cols + 2 * cols) * elem_bytes), 0.0)
}

/// `linear` of `[rows, k]` by a `[m, k]` weight: read both, write `[rows, m]`.
pub fn linear(rows: usize, k: usize, m: usize, elem_bytes: usize) -> Work {
    Work::new(
        f((rows * k + m * k + rows * m) * elem_bytes),
        2.0 * f(rows) * f(k) * f(m),
    )
}

/// In-place GELU of `[rows, cols]`: read and write each element.
pub fn gelu(rows: usize, cols: usize, elem_bytes: usize) -> Work {
    Work::new(f(2 * rows * cols * elem_bytes), 0.0)
}

/// `add_bias` of a `[cols]` bias to `[rows, cols]`.
pub fn add_bias(rows: usize, cols: usize, elem_bytes: usize) -> Work {
    Work::new(f((2 * rows * cols + cols) * elem_bytes), 0.0)
}

/// Residual `x += y` over `[rows, cols]`: read both, write x.
pub fn add_assign(rows: usize, cols: usize, elem_bytes: usize) -> Work {
    Work::new(f(3 * rows * cols * elem_bytes), 0.0)
}

/// `gather_rows` of `rows` rows of width `cols`.
pub fn gather_rows(rows: usize, cols: usize, elem_bytes: usize) -> Work {
    Work::new(f(2 * rows * cols * elem_bytes), 0.0)
}

/// `sample_stats` over `rows` rows of a `vocab` logits slice: each logit read once, its
/// processed f32 value written to the scratch and read back by the later passes (the
/// statistics and the candidates run over the scratch, in L2 at best); no matrix work.
pub fn sample_records(rows: usize, vocab: usize, elem_bytes: usize) -> Work {
    Work::new(f(rows * vocab * (elem_bytes + 2 * 4)), 0.0)
}

/// Causal attention FLOPs of one head over `new` tokens appended after `start` cached
/// ones: token `i` of the new ones attends to `start + i + 1` positions, and each
/// position costs a `head_dim` dot product for its score and another for its share of
/// the output (2 FLOPs per multiply-add each).
pub fn attention_flops_per_head(start: usize, new: usize, head_dim: usize) -> f64 {
    // Σ_{i<new} (start + i + 1) = new·start + new(new+1)/2
    let positions = f(new) * f(start) + f(new) * f(new + 1) / 2.0;
    4.0 * f(head_dim) * positions
}

/// Attention of `seqs` sequences, each adding `new` tokens after `start` cached ones, over
/// `heads` heads of `head_dim`: read the new q, k, v, write the new K and V into the cache,
/// read the K and V of every attended position once, write the output.
pub fn attention(
    seqs: usize,
    start: usize,
    new: usize,
    heads: usize,
    head_dim: usize,
    elem_bytes: usize,
) -> Work {
    let width = heads * head_dim;
    let rows = seqs * new;
    let bytes = f(rows * 3 * width * elem_bytes)
        + f(rows * 2 * width * elem_bytes)
        + f(seqs * (start + new) * 2 * width * elem_bytes)
        + f(rows * width * elem_bytes);
    let flops = f(seqs * heads) * attention_flops_per_head(start, new, head_dim);
    Work::new(bytes, flops)
}

/// Elements of the weight matrices of one layer of `spec`: qkv, attention output, fc1,
/// fc2 (`[out, in]` each).
pub fn layer_matrix_elements(config: &ModelConfig, spec: &ShardSpec) -> usize {
    let d = config.n_embd;
    let width = spec.heads.len() * config.head_dim();
    let ffn = spec.ffn.len();
    3 * width * d + width * d + ffn * d + d * ffn
}

/// Elements of one layer's vectors on `spec`: two LayerNorms, the qkv, attention-output,
/// fc1 and fc2 biases.
pub fn layer_vector_elements(config: &ModelConfig, spec: &ShardSpec) -> usize {
    let d = config.n_embd;
    let width = spec.heads.len() * config.head_dim();
    4 * d + 3 * width + d + spec.ffn.len() + d
}

/// Bytes of K and V of one token of one sequence on `spec`, over all its layers.
pub fn kv_bytes_per_token(config: &ModelConfig, spec: &ShardSpec, elem_bytes: usize) -> usize {
    spec.layers.len() * 2 * spec.heads.len() * config.head_dim() * elem_bytes
}

/// What one decode step of `spec` must read and compute: `batch` sequences, each with
/// `context` tokens already cached, each adding one.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct DecodeStepWork {
    /// Bytes of weights read: every matrix, norm and bias of the shard's layers, the
    /// final LayerNorm and the LM head slice on the last stage, and the embedding and
    /// position rows of the batch's tokens on the first.
    pub weight_bytes: f64,
    /// Bytes of K and V read: `context + 1` positions (the new one included) per sequence.
    pub kv_bytes: f64,
    /// FLOPs: the GEMMs over the batch, the LM head for one row per sequence, attention.
    pub flops: f64,
}

impl DecodeStepWork {
    /// Everything a decode step reads, with its FLOPs.
    pub fn work(&self) -> Work {
        Work::new(self.weight_bytes + self.kv_bytes, self.flops)
    }

    /// The step's floor: the bytes it reads over the memory rate (a decode step of a
    /// large model is read-bound at any batch this check runs).
    pub fn floor_s(&self, c: &Ceilings) -> (f64, Bound) {
        self.work().floor_s(c)
    }
}

/// The work of one decode step; see [`DecodeStepWork`].
pub fn decode_step(
    config: &ModelConfig,
    spec: &ShardSpec,
    batch: usize,
    context: usize,
    elem_bytes: usize,
) -> DecodeStepWork {
    let d = config.n_embd;
    let layers = spec.layers.len();
    let per_layer = layer_matrix_elements(config, spec) + layer_vector_elements(config, spec);
    let mut weights = layers * per_layer;
    let mut flops = 2.0 * f(batch) * f(layers * layer_matrix_elements(config, spec));
    if spec.has_lm_head {
        weights += spec.vocab.len() * d + 2 * d;
        flops += 2.0 * f(batch) * f(spec.vocab.len() * d);
    }
    if spec.embeds {
        // One wte row and one wpe row per token.
        weights += 2 * batch * d;
    }
    let heads = spec.heads.len();
    let attention_flops =
        f(layers * batch * heads) * attention_flops_per_head(context, 1, config.head_dim());
    DecodeStepWork {
        weight_bytes: f(weights * elem_bytes),
        kv_bytes: f(batch * (context + 1) * kv_bytes_per_token(config, spec, elem_bytes)),
        flops: flops + attention_flops,
    }
}

/// What a prefill of one sequence of `tokens` (from position 0) on `spec` must compute.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PrefillWork {
    /// FLOPs of the layers' GEMMs over every token.
    pub gemm_flops: f64,
    /// FLOPs of causal attention.
    pub attention_flops: f64,
    /// FLOPs of the LM head for the last token (the only one sampled).
    pub lm_head_flops: f64,
    /// Bytes of weights read once.
    pub weight_bytes: f64,
}

impl PrefillWork {
    /// All FLOPs and the weight bytes.
    pub fn work(&self) -> Work {
        Work::new(
            self.weight_bytes,
            self.gemm_flops + self.attention_flops + self.lm_head_flops,
        )
    }
}

/// The work of a prefill; see [`PrefillWork`].
pub fn prefill(
    config: &ModelConfig,
    spec: &ShardSpec,
    tokens: usize,
    elem_bytes: usize,
) -> PrefillWork {
    let d = config.n_embd;
    let layers = spec.layers.len();
    let matrices = layers * layer_matrix_elements(config, spec);
    let mut weights =
        layers * (layer_matrix_elements(config, spec) + layer_vector_elements(config, spec));
    let lm_head_flops = if spec.has_lm_head {
        weights += spec.vocab.len() * d + 2 * d;
        2.0 * f(spec.vocab.len() * d)
    } else {
        0.0
    };
    if spec.embeds {
        weights += 2 * tokens * d;
    }
    PrefillWork {
        gemm_flops: 2.0 * f(tokens) * f(matrices),
        attention_flops: f(layers * spec.heads.len())
            * attention_flops_per_head(0, tokens, config.head_dim()),
        lm_head_flops,
        weight_bytes: f(weights * elem_bytes),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_model::ShardPlan;

    fn gpt3_175b_tp8_rank0() -> (ModelConfig, ShardSpec, ShardPlan) {
        let c = ModelConfig::preset("gpt3-175b").unwrap();
        let plan = ShardPlan::new(&c, 8, 1).unwrap();
        let spec = plan.shard(0, 0).clone();
        (c, spec, plan)
    }

    /// The weights a decode step reads are the rank's parameters as `tessera model info`
    /// counts them (`ShardPlan::worker_params`), less the position table, of which a step
    /// reads only its tokens' rows, plus those rows and the embedding rows.
    #[test]
    fn decode_weight_bytes_are_the_workers_parameters() {
        let (c, spec, plan) = gpt3_175b_tp8_rank0();
        let params = plan.worker_params(&c, &spec);
        assert_eq!(params, 21_853_777_920);
        let d = c.n_embd as u64;
        for batch in [1u64, 8, 64] {
            let w = decode_step(&c, &spec, batch as usize, 256, 2);
            let expected = 2 * (params - c.n_positions as u64 * d) + 2 * 2 * batch * d;
            assert_eq!(w.weight_bytes, expected as f64, "batch {batch}");
        }
        // 43.66 GB at batch 1.
        assert_eq!(
            decode_step(&c, &spec, 1, 256, 2).weight_bytes,
            43_657_273_344.0
        );
    }

    /// 12 heads of 128 on each of 96 layers, K and V, bf16: 589 824 bytes per token; that
    /// is `tessera model info`'s KV bytes per token (4.5 MiB for the model) over tp = 8.
    #[test]
    fn kv_bytes_are_an_eighth_of_the_models() {
        let (c, spec, _) = gpt3_175b_tp8_rank0();
        assert_eq!(kv_bytes_per_token(&c, &spec, 2), 589_824);
        assert_eq!(
            kv_bytes_per_token(&c, &spec, 2) as u64 * 8,
            c.kv_bytes_per_token(2)
        );
        let w = decode_step(&c, &spec, 64, 256, 2);
        assert_eq!(w.kv_bytes, 64.0 * 257.0 * 589_824.0);
    }

    #[test]
    fn prefill_flops_of_2048_tokens() {
        let (c, spec, _) = gpt3_175b_tp8_rank0();
        assert_eq!(layer_matrix_elements(&c, &spec), 226_492_416);
        let p = prefill(&c, &spec, 2048, 2);
        assert_eq!(p.gemm_flops, 2.0 * 2048.0 * 96.0 * 226_492_416.0);
        // 2 · 128 · 2048 · 2049 per head and layer, 12 heads, 96 layers.
        assert_eq!(p.attention_flops, 1_237_554_561_024.0);
        assert_eq!(p.lm_head_flops, 2.0 * 6283.0 * 12288.0);
        let total = p.work().flops;
        assert!((total / 1e12 - 90.30).abs() < 0.01, "{total}");
    }

    #[test]
    fn the_larger_time_is_the_floor() {
        let c = Ceilings {
            memory_bytes_per_s: 4.0e12,
            matrix_flops_per_s: 800.0e12,
        };
        // A GEMV: 2 bytes per 2 FLOPs, memory-bound.
        let gemv = linear(1, 12288, 12288, 2);
        let (t, b) = gemv.floor_s(&c);
        assert_eq!(b, Bound::Memory);
        assert!((t - gemv.bytes / 4.0e12).abs() < 1e-15);
        // A square 8192 GEMM: 1.1 TFLOP over 400 MB, compute-bound.
        let gemm = linear(8192, 8192, 8192, 2);
        let (t, b) = gemm.floor_s(&c);
        assert_eq!(b, Bound::Compute);
        assert!((t - 2.0 * 8192f64.powi(3) / 800.0e12).abs() < 1e-12);
    }

    #[test]
    fn attention_counts_every_attended_position() {
        // One new token after 3 cached: 4 positions, 2 dot products of 8 each.
        assert_eq!(attention_flops_per_head(3, 1, 8), 4.0 * 8.0 * 4.0);
        // Three new tokens from 0: 1 + 2 + 3 positions.
        assert_eq!(attention_flops_per_head(0, 3, 8), 4.0 * 8.0 * 6.0);
        let w = attention(2, 3, 1, 4, 8, 2);
        let width = 32.0;
        assert_eq!(
            w.bytes,
            2.0 * (3.0 + 2.0 + 1.0) * width * 2.0 + 2.0 * 4.0 * 2.0 * width * 2.0
        );
    }
}
