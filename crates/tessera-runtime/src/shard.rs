//! One worker's shard of the model and its forward pass (Megatron TP × pipeline PP).
//!
//! Placement, for the heads `[h0, h1)` and MLP columns `[f0, f1)` of this rank:
//! - QKV (`TensorParallelColumnLinear`): the q, k and v columns of those heads; attention
//!   and its KV cache are local.
//! - attention output (`TensorParallelRowLinear`): the rows of those heads, then an
//!   all-reduce, then the bias, once.
//! - fc1 column-parallel (+ bias, GELU), fc2 row-parallel, all-reduce, bias.
//! - LayerNorms, residuals and position embeddings are replicated.
//! - The tied embedding / LM head is vocab-parallel: stage 0 embeds with its rows and
//!   all-reduces; the last stage computes its logits slice and samples distributedly.

use std::ops::Range;

use tessera_model::{ModelConfig, ShardSpec, WeightSource};

use crate::backend::{Backend, KvSpec, SeqSpan};
use crate::collective::Collective;
use crate::dtype::WeightDtype;
use crate::error::{Result, RuntimeError};
use crate::sampling::{sample_distributed_with, RowSpec};
use crate::step::{SeqResult, StepOutput, StepRequest};

/// How a shard stores its weights and how large its KV cache is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardOptions {
    /// Storage dtype of weight matrices (norms and biases stay f32).
    pub dtype: WeightDtype,
    /// KV cache blocks per layer.
    pub kv_blocks: usize,
    /// Tokens per KV block.
    pub block_size: usize,
}

/// The communicators of one worker.
pub struct ShardComms {
    /// The TP group of this stage (world size = tp).
    pub tp: Box<dyn Collective>,
    /// Link to the same TP rank of the previous stage (this worker is its rank 1).
    pub prev: Option<Box<dyn Collective>>,
    /// Link to the same TP rank of the next stage (this worker is its rank 0).
    pub next: Option<Box<dyn Collective>>,
}

struct LayerNorm<B: Backend> {
    weight: B::Tensor,
    bias: B::Tensor,
}

struct Layer<B: Backend> {
    ln_1: LayerNorm<B>,
    qkv: B::Matrix,
    qkv_bias: B::Tensor,
    attn_out: B::Matrix,
    attn_out_bias: B::Tensor,
    ln_2: LayerNorm<B>,
    fc1: B::Matrix,
    fc1_bias: B::Tensor,
    fc2: B::Matrix,
    fc2_bias: B::Tensor,
}

/// One worker's weights, KV cache and communicators.
pub struct Shard<B: Backend> {
    backend: B,
    config: ModelConfig,
    spec: ShardSpec,
    kv_spec: KvSpec,
    /// Vocabulary rows `spec.vocab` of the tied embedding (stage 0 and last stage).
    wte: Option<B::Matrix>,
    wpe: Option<B::Tensor>,
    layers: Vec<Layer<B>>,
    ln_f: Option<LayerNorm<B>>,
    kv: B::KvCache,
    comms: ShardComms,
    weight_bytes: usize,
}

/// `[in, out]` region of a GPT-2 Conv1D weight, transposed to `[out, in]`.
fn read_transposed(
    src: &dyn WeightSource,
    name: &str,
    rows_in: Range<usize>,
    cols_out: Range<usize>,
) -> Result<(usize, usize, Vec<f32>)> {
    let (n_in, n_out) = (rows_in.len(), cols_out.len());
    let data = src.read_f32(name, &[rows_in, cols_out])?;
    Ok((n_out, n_in, transpose(&data, n_in, n_out)))
}

/// Output rows of [`transpose`] one task writes: each input row then contributes one
/// contiguous run of this many values, and the task's output rows stay in cache.
const TRANSPOSE_ROWS_PER_TASK: usize = 32;

/// `[rows, cols]` row-major to `[cols, rows]`, in parallel over blocks of output rows (a
/// 175B shard transposes about 22 G values while loading).
fn transpose(data: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    use rayon::prelude::*;
    let mut t = vec![0f32; data.len()];
    if rows == 0 || cols == 0 {
        return t;
    }
    t.par_chunks_mut(TRANSPOSE_ROWS_PER_TASK * rows)
        .enumerate()
        .for_each(|(block, out)| {
            let first = block * TRANSPOSE_ROWS_PER_TASK;
            let n = out.len() / rows;
            for i in 0..rows {
                let run = &data[i * cols + first..i * cols + first + n];
                for (o, &v) in run.iter().enumerate() {
                    out[o * rows + i] = v;
                }
            }
        });
    t
}

impl<B: Backend> Shard<B> {
    /// Loads this worker's slices from `src` and allocates its KV cache.
    pub fn load(
        backend: B,
        config: &ModelConfig,
        spec: &ShardSpec,
        src: &dyn WeightSource,
        opts: ShardOptions,
        comms: ShardComms,
    ) -> Result<Self> {
        if opts.block_size == 0 || opts.kv_blocks == 0 {
            return Err(RuntimeError::invalid(
                "kv_blocks",
                "the KV cache needs at least one block of at least one token",
            ));
        }
        let d = config.n_embd;
        let dh = config.head_dim();
        let attn = spec.heads.start * dh..spec.heads.end * dh;
        let mut bytes = 0usize;
        let mut matrix = |(rows, cols, data): (usize, usize, Vec<f32>)| -> Result<B::Matrix> {
            let m = backend.upload_matrix(rows, cols, data, opts.dtype)?;
            bytes += backend.matrix_bytes(&m);
            Ok(m)
        };
        let vector = |name: &str, range: Range<usize>| -> Result<B::Tensor> {
            let n = range.len();
            backend.upload(&src.read_f32(name, &[range])?, 1, n)
        };
        let norm = |prefix: &str| -> Result<LayerNorm<B>> {
            Ok(LayerNorm {
                weight: vector(&format!("{prefix}.weight"), 0..d)?,
                bias: vector(&format!("{prefix}.bias"), 0..d)?,
            })
        };

        let wte = if spec.embeds || spec.has_lm_head {
            let rows = spec.vocab.len();
            Some(matrix((
                rows,
                d,
                src.read_f32("wte.weight", &[spec.vocab.clone(), 0..d])?,
            ))?)
        } else {
            None
        };
        let wpe = if spec.embeds {
            Some(backend.upload(
                &src.read_f32("wpe.weight", &[0..config.n_positions, 0..d])?,
                config.n_positions,
                d,
            )?)
        } else {
            None
        };
        let mut layers = Vec::with_capacity(spec.layers.len());
        for i in spec.layers.clone() {
            let p = |s: &str| format!("h.{i}.{s}");
            // q, k and v columns of this rank's heads, stacked as [q | k | v] rows.
            let mut qkv_rows = Vec::with_capacity(3 * attn.len() * d);
            let mut qkv_bias = Vec::with_capacity(3 * attn.len());
            for part in 0..3 {
                let cols = part * d + attn.start..part * d + attn.end;
                qkv_rows
                    .extend(read_transposed(src, &p("attn.c_attn.weight"), 0..d, cols.clone())?.2);
                qkv_bias.extend(src.read_f32(&p("attn.c_attn.bias"), &[cols])?);
            }
            layers.push(Layer {
                ln_1: norm(&p("ln_1"))?,
                qkv: matrix((3 * attn.len(), d, qkv_rows))?,
                qkv_bias: backend.upload(&qkv_bias, 1, 3 * attn.len())?,
                attn_out: matrix(read_transposed(
                    src,
                    &p("attn.c_proj.weight"),
                    attn.clone(),
                    0..d,
                )?)?,
                attn_out_bias: vector(&p("attn.c_proj.bias"), 0..d)?,
                ln_2: norm(&p("ln_2"))?,
                fc1: matrix(read_transposed(
                    src,
                    &p("mlp.c_fc.weight"),
                    0..d,
                    spec.ffn.clone(),
                )?)?,
                fc1_bias: vector(&p("mlp.c_fc.bias"), spec.ffn.clone())?,
                fc2: matrix(read_transposed(
                    src,
                    &p("mlp.c_proj.weight"),
                    spec.ffn.clone(),
                    0..d,
                )?)?,
                fc2_bias: vector(&p("mlp.c_proj.bias"), 0..d)?,
            });
        }
        let ln_f = if spec.has_lm_head {
            Some(norm("ln_f")?)
        } else {
            None
        };
        let kv_spec = KvSpec {
            layers: spec.layers.len(),
            num_blocks: opts.kv_blocks,
            block_size: opts.block_size,
            heads: spec.heads.len(),
            head_dim: dh,
        };
        let kv = backend.alloc_kv(kv_spec)?;
        Ok(Shard {
            backend,
            config: config.clone(),
            spec: spec.clone(),
            kv_spec,
            wte,
            wpe,
            layers,
            ln_f,
            kv,
            comms,
            weight_bytes: bytes,
        })
    }

    /// This worker's place in the plan.
    pub fn spec(&self) -> &ShardSpec {
        &self.spec
    }

    /// The KV cache geometry.
    pub fn kv_spec(&self) -> KvSpec {
        self.kv_spec
    }

    /// Bytes of weight matrices held (norms and biases excluded).
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    /// Swaps in a new collective group (the cluster was rebuilt around this shard) and
    /// returns the old one. The weights stay; the KV cache's contents are stale, and the
    /// coordinator prefills every sequence again before reading them.
    pub fn replace_comms(&mut self, comms: ShardComms) -> ShardComms {
        std::mem::replace(&mut self.comms, comms)
    }

    /// Runs one step. Returns the sampled tokens on the last stage's TP rank 0, `None` elsewhere.
    pub fn step(&mut self, req: &StepRequest) -> Result<Option<StepOutput>> {
        req.validate(&self.config, &self.kv_spec)?;
        let b = &self.backend;
        let d = self.config.n_embd;
        let n = req.num_tokens();
        let mut spans = Vec::with_capacity(req.seqs.len());
        let mut row = 0;
        for s in &req.seqs {
            spans.push(SeqSpan {
                rows: row..row + s.tokens.len(),
                start_pos: s.start_pos,
                block_table: s.block_table.clone(),
            });
            row += s.tokens.len();
        }

        let mut x = if self.spec.embeds {
            let ids: Vec<u32> = req
                .seqs
                .iter()
                .flat_map(|s| s.tokens.iter().copied())
                .collect();
            let positions: Vec<u32> = req
                .seqs
                .iter()
                .flat_map(|s| (s.start_pos..s.start_pos + s.tokens.len()).map(|p| p as u32))
                .collect();
            let mut x = b.zeros(n, d)?;
            b.embed(
                self.wte.as_ref().expect("stage 0 holds the embedding"),
                self.spec.vocab.start,
                &ids,
                &mut x,
            )?;
            b.all_reduce_sum(self.comms.tp.as_mut(), &mut x)?;
            b.add_positions(
                self.wpe.as_ref().expect("stage 0 holds positions"),
                &positions,
                &mut x,
            )?;
            x
        } else {
            let mut x = b.zeros(n, d)?;
            let prev =
                self.comms.prev.as_mut().ok_or_else(|| {
                    RuntimeError::Collective("no link to the previous stage".into())
                })?;
            b.recv(prev.as_mut(), 0, &mut x)?;
            x
        };

        let width = self.kv_spec.heads * self.kv_spec.head_dim;
        let ffn = self.spec.ffn.len();
        for (li, layer) in self.layers.iter().enumerate() {
            let mut h = b.zeros(n, d)?;
            b.layer_norm(
                &x,
                &layer.ln_1.weight,
                &layer.ln_1.bias,
                self.config.layer_norm_epsilon,
                &mut h,
            )?;
            let mut qkv = b.zeros(n, 3 * width)?;
            b.linear(&h, &layer.qkv, Some(&layer.qkv_bias), &mut qkv)?;
            let mut att = b.zeros(n, width)?;
            b.attention(&qkv, &mut self.kv, li, &spans, &mut att)?;
            let mut o = b.zeros(n, d)?;
            b.linear(&att, &layer.attn_out, None, &mut o)?;
            b.all_reduce_sum(self.comms.tp.as_mut(), &mut o)?;
            b.add_bias(&mut o, &layer.attn_out_bias)?;
            b.add_assign(&mut x, &o)?;

            b.layer_norm(
                &x,
                &layer.ln_2.weight,
                &layer.ln_2.bias,
                self.config.layer_norm_epsilon,
                &mut h,
            )?;
            let mut a = b.zeros(n, ffn)?;
            b.linear(&h, &layer.fc1, Some(&layer.fc1_bias), &mut a)?;
            b.gelu(&mut a)?;
            b.linear(&a, &layer.fc2, None, &mut o)?;
            b.all_reduce_sum(self.comms.tp.as_mut(), &mut o)?;
            b.add_bias(&mut o, &layer.fc2_bias)?;
            b.add_assign(&mut x, &o)?;
        }

        if !self.spec.has_lm_head {
            let next = self
                .comms
                .next
                .as_mut()
                .ok_or_else(|| RuntimeError::Collective("no link to the next stage".into()))?;
            b.send(next.as_mut(), 1, &x)?;
            return Ok(None);
        }
        self.sample(req, &spans, &x)
    }

    /// Final LayerNorm, vocab-parallel LM head and distributed sampling of the last rows.
    fn sample(
        &mut self,
        req: &StepRequest,
        spans: &[SeqSpan],
        x: &B::Tensor,
    ) -> Result<Option<StepOutput>> {
        let b = &self.backend;
        let wanted: Vec<usize> = req
            .seqs
            .iter()
            .enumerate()
            .filter(|(_, s)| s.sample.is_some())
            .map(|(i, _)| i)
            .collect();
        if wanted.is_empty() {
            return Ok((self.spec.tp_rank == 0).then(StepOutput::default));
        }
        let last_rows: Vec<usize> = wanted.iter().map(|&i| spans[i].rows.end - 1).collect();
        let last = b.gather_rows(x, &last_rows)?;
        let ln_f = self.ln_f.as_ref().expect("the last stage holds ln_f");
        let mut h = b.zeros(last_rows.len(), self.config.n_embd)?;
        b.layer_norm(
            &last,
            &ln_f.weight,
            &ln_f.bias,
            self.config.layer_norm_epsilon,
            &mut h,
        )?;
        let wte = self.wte.as_ref().expect("the last stage holds the LM head");
        let v_local = self.spec.vocab.len();
        let mut logits = b.zeros(last_rows.len(), v_local)?;
        b.linear(&h, wte, None, &mut logits)?;

        let rows: Vec<RowSpec> = wanted
            .iter()
            .map(|&i| {
                let s = &req.seqs[i];
                RowSpec {
                    spec: s.sample.as_ref().expect("filtered on sample"),
                    position: s.start_pos + s.tokens.len(),
                }
            })
            .collect();
        let first_id = self.spec.vocab.start;
        let sampled = sample_distributed_with(
            &rows,
            self.spec.vocab.clone(),
            self.comms.tp.as_mut(),
            |asks, out| b.sample_records(&logits, &rows, asks, first_id, out),
        )?;
        // The full logits leave the device only for a request that asked for them.
        let host_logits = if rows.iter().any(|r| r.spec.return_logits) {
            Some(b.download(&logits)?)
        } else {
            None
        };

        let mut results = Vec::with_capacity(wanted.len());
        for (k, (&i, s)) in wanted.iter().zip(sampled).enumerate() {
            let seq = &req.seqs[i];
            let full = match &host_logits {
                Some(all) if rows[k].spec.return_logits => {
                    Some(self.gather_vocab(&all[k * v_local..(k + 1) * v_local])?)
                }
                _ => None,
            };
            results.push(SeqResult {
                seq_id: seq.seq_id,
                token_id: s.token_id,
                logprob: s.logprob,
                logits: full,
            });
        }
        Ok((self.spec.tp_rank == 0).then_some(StepOutput { results }))
    }

    /// Gathers one full logits row from the vocab slices (debugging and tests only).
    fn gather_vocab(&mut self, local: &[f32]) -> Result<Vec<f32>> {
        let tp = self.comms.tp.world_size();
        let ranges = tessera_model::even_ranges(self.config.vocab_size, tp);
        let width = ranges[0].len();
        let mut padded = local.to_vec();
        padded.resize(width, 0.0);
        let all = self.comms.tp.all_gather(&padded)?;
        Ok(ranges
            .iter()
            .enumerate()
            .flat_map(|(r, range)| all[r * width..r * width + range.len()].to_vec())
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::transpose;

    #[test]
    fn transpose_moves_every_value() {
        for (rows, cols) in [(1, 1), (3, 5), (70, 33), (2, 100)] {
            let data: Vec<f32> = (0..rows * cols).map(|v| v as f32).collect();
            let t = transpose(&data, rows, cols);
            for i in 0..rows {
                for o in 0..cols {
                    assert_eq!(t[o * rows + i], data[i * cols + o], "{rows}x{cols}");
                }
            }
        }
    }
}
