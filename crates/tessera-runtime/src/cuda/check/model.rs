//! Whole forward passes: GPT-2 on the CUDA backend against the CPU backend, and the
//! decode and prefill steps of a large shard timed against their floors.

use std::time::Instant;

use tessera_model::{ModelConfig, ShardPlan, ShardSpec, SyntheticWeights, Tokenizer};
use tracing::info;

use super::data::{compare, not_run, random_ids, Bf16Rounded};
use super::floors::Ceilings;
use super::plan::{step_timings, CheckOptions};
use super::report::{Check, Timing};
use super::timer::time_runs;
use super::BF16_FORWARD_TOLERANCE;
use crate::backend::Backend;
use crate::collective::{local_group, Collective};
use crate::cpu::CpuBackend;
use crate::cuda::CudaBackend;
use crate::dtype::WeightDtype;
use crate::error::{Result, RuntimeError};
use crate::shard::{Shard, ShardComms, ShardOptions};
use crate::step::{SampleSpec, SamplingParams, SeqStep, StepRequest};

/// Seed of the synthetic weights of every model the check loads.
const WEIGHT_SEED: u64 = 0x7e55e7a;

/// The prompt of the GPT-2 check.
const PROMPT: &str = "Tessera serves GPT-family models from a cluster of GPU workers: one \
                      coordinator, many shards, and a KV cache in blocks.";

fn world_one() -> ShardComms {
    ShardComms {
        tp: Box::new(local_group(1).pop().expect("one rank")) as Box<dyn Collective>,
        prev: None,
        next: None,
    }
}

fn greedy_with_logits() -> Option<SampleSpec> {
    Some(SampleSpec {
        params: SamplingParams::default(),
        penalty_ids: Vec::new(),
        return_logits: true,
    })
}

fn step_logits<B: Backend>(shard: &mut Shard<B>, req: &StepRequest) -> Result<Vec<f32>> {
    let out = shard
        .step(req)?
        .ok_or_else(|| RuntimeError::Backend("a one-rank shard returned no output".into()))?;
    out.results
        .into_iter()
        .next()
        .and_then(|r| r.logits)
        .ok_or_else(|| RuntimeError::Backend("the step returned no logits".into()))
}

fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &x)| {
            if x > bv {
                (i, x)
            } else {
                (bi, bv)
            }
        })
        .0
}

/// The gap between the largest and second-largest value.
fn top2_margin(v: &[f32]) -> f32 {
    let (mut a, mut b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
    for &x in v {
        if x > a {
            b = a;
            a = x;
        } else if x > b {
            b = x;
        }
    }
    a - b
}

/// GPT-2 (synthetic weights, bf16) on the GPU against the CPU backend holding the same
/// bf16 values in f32: the prefill logits of a fixed prompt, then decode steps fed the
/// CPU's greedy tokens on both (teacher forcing). Top-1 must agree wherever the CPU's
/// top two logits are further apart than four times the largest logit difference; a
/// closer pair is a tie that bf16 may break either way.
pub fn check_gpt2(gpu: &CudaBackend, cpu: &CpuBackend, opts: &CheckOptions) -> Vec<Check> {
    match gpt2_checks(gpu, cpu, opts) {
        Ok(c) => c,
        Err(e) => vec![not_run(
            "forward",
            format!("{} forward pass", opts.small_model),
            e,
        )],
    }
}

fn gpt2_checks(gpu: &CudaBackend, cpu: &CpuBackend, opts: &CheckOptions) -> Result<Vec<Check>> {
    let config = ModelConfig::preset(&opts.small_model)?;
    let plan = ShardPlan::new(&config, 1, 1)?;
    let spec = plan.shard(0, 0).clone();
    let weights = SyntheticWeights::new(config.clone(), WEIGHT_SEED);
    let block_size = opts.block_size;
    let mut prompt = Tokenizer::gpt2().encode(PROMPT)?;
    prompt.truncate(
        config
            .n_positions
            .saturating_sub(opts.small_decode_steps + 1),
    );
    let tokens = prompt.len() + opts.small_decode_steps;
    let blocks = tokens.div_ceil(block_size);
    let shard_opts = |dtype| ShardOptions {
        dtype,
        kv_blocks: blocks,
        block_size,
    };
    let started = Instant::now();
    let mut g = Shard::load(
        gpu.clone(),
        &config,
        &spec,
        &weights,
        shard_opts(WeightDtype::Bf16),
        world_one(),
    )?;
    let rounded = Bf16Rounded(weights.clone());
    let mut c = cpu.run(|| {
        Shard::load(
            cpu.clone(),
            &config,
            &spec,
            &rounded,
            shard_opts(WeightDtype::F32),
            world_one(),
        )
    })?;
    info!(
        "{}: loaded on both backends in {:.1} s",
        config.name,
        started.elapsed().as_secs_f64()
    );
    let table: Vec<u32> = (0..blocks as u32).collect();
    let request = |tokens: Vec<u32>, start_pos: usize| StepRequest {
        seqs: vec![SeqStep {
            seq_id: 1,
            tokens,
            start_pos,
            block_table: table.clone(),
            sample: greedy_with_logits(),
        }],
    };
    let section = "forward";
    let mut checks = Vec::new();
    let (mut agree, mut predictions, mut ties) = (0, 0, 0);
    let mut disagreements = Vec::new();
    let mut req = request(prompt.clone(), 0);
    for step in 0..=opts.small_decode_steps {
        let gl = step_logits(&mut g, &req)?;
        let cl = cpu.run(|| step_logits(&mut c, &req))?;
        let what = if step == 0 {
            format!("{} prefill {} tokens logits", config.name, prompt.len())
        } else {
            format!("{} decode step {step} logits", config.name)
        };
        checks.push(compare(section, what, &gl, &cl, BF16_FORWARD_TOLERANCE));
        let max_diff = gl
            .iter()
            .zip(&cl)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let (gt, ct) = (argmax(&gl), argmax(&cl));
        predictions += 1;
        if gt == ct {
            agree += 1;
        } else if top2_margin(&cl) <= 4.0 * max_diff {
            ties += 1;
        } else {
            disagreements.push(format!("step {step}: gpu {gt}, cpu {ct}"));
        }
        let start = req.seqs[0].start_pos + req.seqs[0].tokens.len();
        req = request(vec![ct as u32], start);
    }
    checks.push(Check {
        section: section.into(),
        name: format!("{} top-1 agreement", config.name),
        passed: disagreements.is_empty(),
        error: Some(1.0 - agree as f64 / predictions as f64),
        tolerance: None,
        detail: format!(
            "{agree} of {predictions} tokens agree, {ties} near-ties differ{}",
            if disagreements.is_empty() {
                String::new()
            } else {
                format!("; clear disagreements: {}", disagreements.join(", "))
            }
        ),
    });
    Ok(checks)
}

/// The large shard on the GPU, loaded once for every step timing.
pub struct LargeShard {
    shard: Shard<CudaBackend>,
    config: ModelConfig,
    spec: ShardSpec,
    /// Blocks each decode sequence owns.
    blocks_per_seq: usize,
    /// Seconds the load took, synthesis and upload included.
    pub load_s: f64,
}

/// KV blocks the timings need: each decode sequence its own context plus one token,
/// and the prefill its tokens (reusing the decode blocks after them).
fn kv_blocks_needed(opts: &CheckOptions, n_positions: usize) -> (usize, usize) {
    let per_seq = (opts.decode_context + 1).div_ceil(opts.block_size);
    let batch = opts.decode_batches.iter().copied().max().unwrap_or(1);
    let prefill = opts
        .prefill_tokens
        .min(n_positions)
        .div_ceil(opts.block_size);
    (per_seq, (per_seq * batch).max(prefill))
}

/// Loads rank 0 of the large model's TP split with synthetic bf16 weights.
pub fn load_large(
    gpu: &CudaBackend,
    config: &ModelConfig,
    spec: &ShardSpec,
    opts: &CheckOptions,
) -> Result<LargeShard> {
    let (blocks_per_seq, kv_blocks) = kv_blocks_needed(opts, config.n_positions);
    let weights = SyntheticWeights::new(config.clone(), WEIGHT_SEED);
    let started = Instant::now();
    let shard = Shard::load(
        gpu.clone(),
        config,
        spec,
        &weights,
        ShardOptions {
            dtype: WeightDtype::Bf16,
            kv_blocks,
            block_size: opts.block_size,
        },
        world_one(),
    )?;
    gpu.synchronize()?;
    let load_s = started.elapsed().as_secs_f64();
    info!(
        "{} tp{} rank {}: {:.2} GB of weights and {} KV blocks loaded in {load_s:.1} s",
        config.name,
        opts.large_tp,
        spec.tp_rank,
        shard.weight_bytes() as f64 / 1e9,
        kv_blocks,
    );
    Ok(LargeShard {
        shard,
        config: config.clone(),
        spec: spec.clone(),
        blocks_per_seq,
        load_s,
    })
}

impl LargeShard {
    fn table(&self, seq: usize) -> Vec<u32> {
        (seq * self.blocks_per_seq..(seq + 1) * self.blocks_per_seq)
            .map(|b| b as u32)
            .collect()
    }

    /// Prefills `context` tokens of each of `batch` sequences, a few sequences a step.
    fn fill_contexts(&mut self, batch: usize, context: usize) -> Result<()> {
        let per_step = (2048 / context.max(1)).max(1);
        for first in (0..batch).step_by(per_step) {
            let seqs = (first..(first + per_step).min(batch))
                .map(|s| SeqStep {
                    seq_id: s as u64,
                    tokens: random_ids(context, s as u64, self.config.vocab_size as u32),
                    start_pos: 0,
                    block_table: self.table(s),
                    sample: None,
                })
                .collect();
            self.shard.step(&StepRequest { seqs })?;
        }
        Ok(())
    }

    fn greedy() -> Option<SampleSpec> {
        Some(SampleSpec {
            params: SamplingParams::default(),
            penalty_ids: Vec::new(),
            return_logits: false,
        })
    }

    /// A decode step of `batch` sequences at position `context`: the same step each
    /// repeat (it rewrites the same cache slot), so every repeat does the same work.
    fn decode_request(&self, batch: usize, context: usize) -> StepRequest {
        StepRequest {
            seqs: (0..batch)
                .map(|s| SeqStep {
                    seq_id: s as u64,
                    tokens: vec![(s * 97 % self.config.vocab_size) as u32],
                    start_pos: context,
                    block_table: self.table(s),
                    sample: Self::greedy(),
                })
                .collect(),
        }
    }
}

/// Times decode at each batch and the prefill; fills each timing's measurement (or says
/// why there is none).
pub fn time_steps(
    gpu: &CudaBackend,
    large: &mut LargeShard,
    opts: &CheckOptions,
    ceilings: Option<&Ceilings>,
) -> Vec<Timing> {
    let mut timings = step_timings(opts, &large.config, &large.spec, ceilings);
    let context = opts.decode_context;
    let max_batch = opts.decode_batches.iter().copied().max().unwrap_or(1);
    let started = Instant::now();
    let filled = large.fill_contexts(max_batch, context);
    if filled.is_ok() {
        let _ = gpu.synchronize();
        info!(
            "KV cache: {max_batch} sequences of {context} tokens prefilled in {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }
    let record = |t: &mut Timing, r: Result<super::timer::Samples>, repeats: usize| {
        t.repeats = repeats;
        match r {
            Ok(s) => {
                t.measured_ms = Some(s.median_ms());
                t.min_ms = Some(s.min_ms());
                t.detail = format!("{}; host {:.2} ms per step", t.detail, s.host_median_ms());
            }
            Err(e) => t.detail = format!("could not run: {e}"),
        }
        info!(
            "{}/{}: {}",
            t.section,
            t.name,
            t.measured_ms
                .map_or_else(|| t.detail.clone(), |m| format!("{m:.3} ms ({})", t.detail))
        );
    };
    for (t, &batch) in timings.iter_mut().zip(&opts.decode_batches) {
        let r = match &filled {
            Err(e) => Err(RuntimeError::Backend(format!(
                "filling the KV cache failed: {e}"
            ))),
            Ok(()) => {
                let req = large.decode_request(batch, context);
                time_runs(gpu, opts.warmup, opts.repeats, || {
                    large.shard.step(&req).map(drop)
                })
            }
        };
        record(t, r, opts.repeats);
    }
    // The prefill reuses the first blocks; the decode contexts are no longer needed.
    let tokens = opts.prefill_tokens.min(large.config.n_positions);
    let blocks = tokens.div_ceil(opts.block_size) as u32;
    let req = StepRequest {
        seqs: vec![SeqStep {
            seq_id: 0,
            tokens: random_ids(tokens, 99, large.config.vocab_size as u32),
            start_pos: 0,
            block_table: (0..blocks).collect(),
            sample: LargeShard::greedy(),
        }],
    };
    let (warmup, repeats) = (1, opts.repeats.clamp(1, 5));
    let r = time_runs(gpu, warmup, repeats, || large.shard.step(&req).map(drop));
    if let Some(t) = timings.last_mut() {
        record(t, r, repeats);
    }
    timings
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn margins_and_argmax() {
        assert_eq!(argmax(&[0.1, 0.5, 0.3]), 1);
        assert!((top2_margin(&[0.1, 0.5, 0.3]) - 0.2).abs() < 1e-6);
    }

    #[test]
    fn kv_blocks_cover_the_largest_batch_and_the_prefill() {
        let opts = CheckOptions::default();
        // 257 positions in blocks of 16: 17 blocks a sequence, 64 sequences.
        assert_eq!(kv_blocks_needed(&opts, 2048), (17, 17 * 64));
        let small = CheckOptions {
            decode_batches: vec![1],
            ..CheckOptions::default()
        };
        assert_eq!(kv_blocks_needed(&small, 2048), (17, 128));
    }
}
