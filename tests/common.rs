//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use tessera_model::{Checkpoint, ModelConfig, ShardPlan, WeightSource};
use tessera_runtime::{
    CpuBackend, GenerateRequest, Generation, LocalEngine, SamplingParams, ShardOptions, WeightDtype,
};

/// One case of a fixture made by `scripts/make_fixtures.py` with transformers.
#[derive(Debug, Deserialize)]
pub struct Case {
    pub name: String,
    pub prompt_ids: Vec<u32>,
    pub max_new_tokens: usize,
    pub greedy_token_ids: Vec<u32>,
    pub step_logits: Vec<Vec<f32>>,
}

#[derive(Debug, Deserialize)]
pub struct Expected {
    pub cases: Vec<Case>,
}

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

pub fn expected(name: &str) -> Expected {
    let text = std::fs::read_to_string(fixture(name).join("expected.json"))
        .expect("fixture expected.json");
    serde_json::from_str(&text).expect("fixture parses")
}

pub fn open(dir: &Path) -> (ModelConfig, Arc<dyn WeightSource>) {
    let ckpt = Checkpoint::open(dir).expect("fixture checkpoint opens");
    (ckpt.config().clone(), Arc::new(ckpt))
}

/// An engine whose KV cache holds one full context, in blocks of 8 tokens.
pub fn engine(
    config: &ModelConfig,
    source: Arc<dyn WeightSource>,
    tp: usize,
    pp: usize,
    dtype: WeightDtype,
) -> LocalEngine {
    engine_with_blocks(
        config,
        source,
        tp,
        pp,
        dtype,
        config.n_positions.div_ceil(8),
    )
}

/// An engine with `kv_blocks` KV blocks of 8 tokens.
pub fn engine_with_blocks(
    config: &ModelConfig,
    source: Arc<dyn WeightSource>,
    tp: usize,
    pp: usize,
    dtype: WeightDtype,
    kv_blocks: usize,
) -> LocalEngine {
    let plan = ShardPlan::new(config, tp, pp).expect("valid split");
    let options = ShardOptions {
        dtype,
        kv_blocks,
        block_size: 8,
    };
    LocalEngine::start(|_| CpuBackend::new(1), config, plan, source, options)
        .expect("engine starts")
}

pub fn greedy(engine: &LocalEngine, prompt: &[u32], n: usize, logits: bool) -> Generation {
    sample(engine, prompt, n, SamplingParams::default(), logits)
}

pub fn sample(
    engine: &LocalEngine,
    prompt: &[u32],
    n: usize,
    params: SamplingParams,
    logits: bool,
) -> Generation {
    engine
        .generate(&GenerateRequest {
            prompt_ids: prompt.to_vec(),
            max_tokens: n,
            params,
            ignore_eos: true,
            return_logits: logits,
        })
        .expect("generation succeeds")
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}
