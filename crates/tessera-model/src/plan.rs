//! `ShardPlan`: which worker owns which part of the model (Megatron TP × pipeline PP).
//!
//! The plan is pure data. Every other component derives its slices from it; nothing
//! else recomputes the split.

use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};

/// One worker's part of the model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardSpec {
    /// Index of the worker in the plan: `stage · tp + tp_rank`.
    pub worker: usize,
    /// Pipeline stage.
    pub stage: usize,
    /// Tensor-parallel rank inside the stage.
    pub tp_rank: usize,
    /// Transformer blocks this stage runs.
    pub layers: Range<usize>,
    /// Attention heads this rank owns (QKV columns, attention-out rows, KV cache).
    pub heads: Range<usize>,
    /// MLP inner columns this rank owns (fc1 columns, fc2 rows).
    pub ffn: Range<usize>,
    /// Vocabulary rows this rank owns of the tied embedding / LM head.
    pub vocab: Range<usize>,
    /// Stage 0 embeds the input tokens.
    pub embeds: bool,
    /// The last stage owns the final LayerNorm and the LM head.
    pub has_lm_head: bool,
}

/// A TP × PP split of one model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardPlan {
    /// Tensor-parallel degree (ranks per stage).
    pub tp: usize,
    /// Pipeline-parallel degree (stages).
    pub pp: usize,
    /// Every worker, ordered by `(stage, tp_rank)`.
    pub shards: Vec<ShardSpec>,
}

/// Splits `0..n` into `parts` contiguous ranges whose sizes differ by at most one,
/// the larger ones first.
pub fn even_ranges(n: usize, parts: usize) -> Vec<Range<usize>> {
    let base = n / parts;
    let extra = n % parts;
    let mut start = 0;
    (0..parts)
        .map(|i| {
            let len = base + usize::from(i < extra);
            let r = start..start + len;
            start += len;
            r
        })
        .collect()
}

impl ShardPlan {
    /// Plans `tp` ranks in each of `pp` stages, or says why the model cannot be split so.
    pub fn new(config: &ModelConfig, tp: usize, pp: usize) -> Result<Self> {
        let fail = |reason: String| Err(ModelError::ImpossibleSplit { tp, pp, reason });
        if tp == 0 || pp == 0 {
            return fail("tp and pp must be at least 1".into());
        }
        if !config.n_head.is_multiple_of(tp) {
            return fail(format!(
                "tp={tp} does not divide the {} attention heads",
                config.n_head
            ));
        }
        if !config.n_inner.is_multiple_of(tp) {
            return fail(format!(
                "tp={tp} does not divide the MLP size {}",
                config.n_inner
            ));
        }
        if tp > config.vocab_size {
            return fail(format!(
                "tp={tp} exceeds the vocabulary size {}",
                config.vocab_size
            ));
        }
        if pp > config.n_layer {
            return fail(format!("pp={pp} exceeds the {} layers", config.n_layer));
        }
        let heads_per_rank = config.n_head / tp;
        let ffn_per_rank = config.n_inner / tp;
        let vocab = even_ranges(config.vocab_size, tp);
        let layers = even_ranges(config.n_layer, pp);
        let mut shards = Vec::with_capacity(tp * pp);
        for (stage, layers) in layers.iter().enumerate() {
            for (tp_rank, vocab) in vocab.iter().enumerate() {
                shards.push(ShardSpec {
                    worker: stage * tp + tp_rank,
                    stage,
                    tp_rank,
                    layers: layers.clone(),
                    heads: tp_rank * heads_per_rank..(tp_rank + 1) * heads_per_rank,
                    ffn: tp_rank * ffn_per_rank..(tp_rank + 1) * ffn_per_rank,
                    vocab: vocab.clone(),
                    embeds: stage == 0,
                    has_lm_head: stage == pp - 1,
                });
            }
        }
        Ok(ShardPlan { tp, pp, shards })
    }

    /// Number of workers, `tp · pp`.
    pub fn world_size(&self) -> usize {
        self.shards.len()
    }

    /// The worker at `(stage, tp_rank)`.
    pub fn shard(&self, stage: usize, tp_rank: usize) -> &ShardSpec {
        &self.shards[stage * self.tp + tp_rank]
    }

    /// Parameters one worker holds: its layers' slices, plus embedding rows on stage 0
    /// and the LM head (tied, so the same rows) plus final LayerNorm on the last stage.
    /// A worker on both the first and last stage holds the tied rows once.
    pub fn worker_params(&self, config: &ModelConfig, shard: &ShardSpec) -> u64 {
        let d = config.n_embd as u64;
        let dh = config.head_dim() as u64;
        let heads = shard.heads.len() as u64;
        let ffn = shard.ffn.len() as u64;
        let attn_cols = heads * dh;
        // Replicated: two LayerNorms, attention-out bias, fc2 bias.
        let per_layer = 4 * d + d + d
            + (d * 3 * attn_cols + 3 * attn_cols)   // c_attn slice
            + attn_cols * d                         // attn c_proj rows
            + (d * ffn + ffn)                       // c_fc slice
            + ffn * d; // mlp c_proj rows
        let mut total = per_layer * shard.layers.len() as u64;
        if shard.embeds || shard.has_lm_head {
            total += shard.vocab.len() as u64 * d;
        }
        if shard.embeds {
            total += config.n_positions as u64 * d;
        }
        if shard.has_lm_head {
            total += 2 * d;
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> ModelConfig {
        ModelConfig::preset("gpt2-tiny").unwrap()
    }

    #[test]
    fn ranges_cover_without_overlap() {
        for n in [1, 7, 50257] {
            for parts in 1..=8.min(n) {
                let r = even_ranges(n, parts);
                assert_eq!(r[0].start, 0);
                assert_eq!(r.last().unwrap().end, n);
                for w in r.windows(2) {
                    assert_eq!(w[0].end, w[1].start);
                    assert!(w[0].len() >= w[1].len() && w[0].len() - w[1].len() <= 1);
                }
            }
        }
    }

    #[test]
    fn split_assigns_every_head_and_layer_once() {
        let c = tiny();
        let plan = ShardPlan::new(&c, 4, 2).unwrap();
        assert_eq!(plan.world_size(), 8);
        for stage in 0..2 {
            let heads: usize = (0..4).map(|r| plan.shard(stage, r).heads.len()).sum();
            assert_eq!(heads, c.n_head);
        }
        assert_eq!(plan.shard(0, 0).layers, 0..2);
        assert_eq!(plan.shard(1, 3).layers, 2..4);
        assert!(plan.shard(0, 1).embeds && !plan.shard(0, 1).has_lm_head);
        assert!(plan.shard(1, 2).has_lm_head);
    }

    #[test]
    fn impossible_splits_name_the_numbers() {
        let c = tiny();
        let e = ShardPlan::new(&c, 3, 1).unwrap_err().to_string();
        assert!(e.contains("tp=3") && e.contains("8 attention heads"), "{e}");
        let e = ShardPlan::new(&c, 1, 5).unwrap_err().to_string();
        assert!(e.contains("pp=5") && e.contains("4 layers"), "{e}");
        assert!(ShardPlan::new(&c, 0, 1).is_err());
    }

    #[test]
    fn worker_params_add_up_to_the_model() {
        let c = ModelConfig::preset("gpt2").unwrap();
        let single = ShardPlan::new(&c, 1, 1).unwrap();
        assert_eq!(single.worker_params(&c, &single.shards[0]), c.param_count());
        // Under TP the replicated parts are counted on every rank, so the sum only grows.
        let split = ShardPlan::new(&c, 4, 3).unwrap();
        let sum: u64 = split
            .shards
            .iter()
            .map(|s| split.worker_params(&c, s))
            .sum();
        assert!(sum > c.param_count());
    }
}
