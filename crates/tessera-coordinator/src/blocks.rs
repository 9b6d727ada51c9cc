//! The KV block manager: which cache blocks each sequence owns.
//!
//! Every worker holds the same number of blocks per layer; the coordinator alone decides
//! which sequence owns which block and sends each sequence's block table with every step.
//! How many blocks there are is decided once, at bring-up ([`kv_blocks`]).

use std::collections::BTreeMap;
use std::net::IpAddr;

use tessera_model::{ModelConfig, ShardPlan};

use crate::config::CoordinatorConfig;
use crate::error::StartError;
use crate::membership::Registered;

/// How many KV blocks every worker holds, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct KvSizing {
    /// Blocks per worker (every worker holds the same number).
    pub blocks: usize,
    /// What limited it, for the start-up log.
    pub why: String,
}

/// Bytes of one KV-cache element on workers of `backend`: f32 on the CPU, bf16 on GPUs
/// (and on the simulated GPUs of `sim`).
pub fn kv_element_bytes(backend: &str) -> u64 {
    if backend == "cpu" {
        4
    } else {
        2
    }
}

/// The largest KV element of any worker.
fn largest_element(workers: &[Registered]) -> u64 {
    workers
        .iter()
        .map(|w| kv_element_bytes(&w.backend))
        .max()
        .unwrap_or(4)
}

/// Most KV blocks a worker may hold: block ids are 32-bit on the wire.
pub const MAX_KV_BLOCKS: usize = u32::MAX as usize;

/// Bytes of one KV block on each worker of the plan: K and V, `element` bytes each, for
/// each of the shard's layers and heads (saturating: a block past `u64` holds no cache).
fn block_bytes(
    config: &ModelConfig,
    plan: &ShardPlan,
    block_tokens: usize,
    element: u64,
) -> Vec<u64> {
    plan.shards
        .iter()
        .map(|s| {
            [
                2,
                s.layers.len(),
                s.heads.len(),
                config.head_dim(),
                block_tokens,
            ]
            .into_iter()
            .fold(element, |bytes, n| bytes.saturating_mul(n as u64))
            .max(1)
        })
        .collect()
}

/// Blocks that `bytes` of KV cache per worker hold on the worker with the largest blocks,
/// with KV elements of `element` bytes.
pub fn kv_blocks_for_bytes(
    config: &ModelConfig,
    plan: &ShardPlan,
    c: &CoordinatorConfig,
    bytes: u64,
    element: u64,
) -> Result<usize, StartError> {
    let largest = block_bytes(config, plan, c.kv_block_tokens, element)
        .into_iter()
        .max()
        .unwrap_or(1);
    match (bytes / largest) as usize {
        0 => Err(StartError::Config(format!(
            "kv_cache_bytes: {bytes} bytes hold no block of {} tokens ({largest} bytes)",
            c.kv_block_tokens
        ))),
        n => Ok(n),
    }
}

/// The KV blocks of every worker: `kv_cache_bytes` of cache each when it is set; otherwise
/// what `kv_memory_fraction` of each machine's available memory (as its workers reported
/// at registration; workers at the same address and host name share one machine's) leaves
/// after their weights, split evenly among them. Never more than a full batch of
/// full-context sequences can use, nor more than [`MAX_KV_BLOCKS`].
pub fn kv_blocks(
    config: &ModelConfig,
    plan: &ShardPlan,
    c: &CoordinatorConfig,
    workers: &[Registered],
) -> Result<KvSizing, StartError> {
    let useful = c
        .max_batch_seqs
        .saturating_mul(config.n_positions.div_ceil(c.kv_block_tokens));
    let (fit, why) = match c.kv_cache_bytes {
        Some(bytes) => (
            kv_blocks_for_bytes(config, plan, c, bytes, largest_element(workers))?,
            format!("{bytes} bytes per worker (kv_cache_bytes)"),
        ),
        None => by_memory(config, plan, c, workers)?,
    };
    let (blocks, why) = if fit > useful {
        (
            useful,
            format!(
                "{useful} blocks serve max_batch_seqs sequences of the whole context \
                 ({why} would allow {fit})"
            ),
        )
    } else {
        (fit, why)
    };
    if blocks > MAX_KV_BLOCKS {
        return Ok(KvSizing {
            blocks: MAX_KV_BLOCKS,
            why: format!("{MAX_KV_BLOCKS} blocks, as many as 32-bit ids number ({why})"),
        });
    }
    Ok(KvSizing { blocks, why })
}

fn by_memory(
    config: &ModelConfig,
    plan: &ShardPlan,
    c: &CoordinatorConfig,
    workers: &[Registered],
) -> Result<(usize, String), StartError> {
    let block = block_bytes(config, plan, c.kv_block_tokens, largest_element(workers));
    let weight_bytes = if c.dtype == "f32" { 4 } else { 2 };
    // Per machine: (available bytes, weight bytes, block bytes) of its workers.
    let mut machines: BTreeMap<(IpAddr, &str), (u64, u64, u64)> = BTreeMap::new();
    for (w, spec) in workers.iter().zip(&plan.shards) {
        if w.memory_available_bytes == 0 {
            return Err(StartError::Config(format!(
                "kv_cache_bytes: worker {} ({}) does not report its memory; set \
                 kv_cache_bytes (--kv-cache-bytes)",
                w.worker_id, w.address
            )));
        }
        let m = machines
            .entry((w.address.ip(), w.hostname.as_str()))
            .or_insert((u64::MAX, 0, 0));
        m.0 = m.0.min(w.memory_available_bytes);
        m.1 = m.1.saturating_add(
            plan.worker_params(config, spec)
                .saturating_mul(weight_bytes),
        );
        m.2 = m.2.saturating_add(block[spec.worker]);
    }
    let mut fit = usize::MAX;
    let mut why = String::new();
    for ((ip, host), (available, weights, per_block)) in machines {
        let budget = (available as f64 * c.kv_memory_fraction) as u64;
        let blocks = (budget.saturating_sub(weights) / per_block) as usize;
        if blocks == 0 {
            return Err(StartError::Config(format!(
                "kv_memory_fraction: {:.2} of the {:.2} GiB available on {host} ({ip}) \
                 leaves no room for a KV block after {:.2} GiB of weights; raise it, or \
                 set kv_cache_bytes",
                c.kv_memory_fraction,
                gib(available),
                gib(weights)
            )));
        }
        if blocks < fit {
            fit = blocks;
            why = format!(
                "{:.2} of the {:.2} GiB available on {host} ({ip}), less {:.2} GiB of weights",
                c.kv_memory_fraction,
                gib(available),
                gib(weights)
            );
        }
    }
    Ok((fit, why))
}

fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// Free and used KV-cache blocks.
#[derive(Debug)]
pub struct BlockManager {
    block_tokens: usize,
    total: usize,
    free: Vec<u32>,
}

impl BlockManager {
    /// `total` blocks of `block_tokens` tokens each, all free.
    pub fn new(total: usize, block_tokens: usize) -> Self {
        BlockManager {
            block_tokens,
            total,
            // Popped from the back: low block ids are handed out first.
            free: (0..total as u32).rev().collect(),
        }
    }

    /// Blocks needed to hold `tokens` token slots.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_tokens)
    }

    /// Tokens per block.
    pub fn block_tokens(&self) -> usize {
        self.block_tokens
    }

    /// Blocks in all.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Blocks in use.
    pub fn used(&self) -> usize {
        self.total - self.free.len()
    }

    /// Takes `n` blocks, or none if fewer are free.
    pub fn allocate(&mut self, n: usize) -> Option<Vec<u32>> {
        if n > self.free.len() {
            return None;
        }
        let at = self.free.len() - n;
        Some(self.free.split_off(at).into_iter().rev().collect())
    }

    /// Returns blocks to the free list.
    pub fn release(&mut self, blocks: Vec<u32>) {
        debug_assert!(blocks.iter().all(|&b| (b as usize) < self.total));
        self.free.extend(blocks.into_iter().rev());
        debug_assert!(self.free.len() <= self.total);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelSource;

    fn worker(id: usize, ip: &str, memory: u64) -> Registered {
        Registered {
            worker_id: id,
            address: format!("{ip}:7000").parse().unwrap(),
            backend: "cpu".into(),
            hostname: format!("host-{ip}"),
            memory_available_bytes: memory,
            pid: 0,
        }
    }

    #[test]
    fn kv_cache_is_sized_from_bytes_or_from_each_machines_memory() {
        let model = ModelConfig::preset("gpt2-tiny").unwrap();
        let plan = ShardPlan::new(&model, 2, 1).unwrap();
        let mut c = CoordinatorConfig::new(ModelSource::Synthetic {
            preset: "gpt2-tiny".into(),
            seed: 0,
        });
        c.max_batch_seqs = 1_000_000;
        // gpt2-tiny at TP=2: 4 layers × 4 heads × 32 dims × 16 tokens × 2 × 4 bytes.
        let block = 4 * 4 * 32 * 16 * 2 * 4;
        c.kv_cache_bytes = Some(10 * block + 5);
        let s = kv_blocks(&model, &plan, &c, &[]).unwrap();
        assert_eq!(s.blocks, 10);
        c.kv_cache_bytes = Some(block - 1);
        assert!(kv_blocks(&model, &plan, &c, &[]).is_err());

        c.kv_cache_bytes = None;
        c.kv_memory_fraction = 0.5;
        let weights = plan.worker_params(&model, &plan.shards[0]) * 4;
        // Two workers on one machine share its memory; on two machines each has its own.
        let gib = 1u64 << 30;
        let shared = [
            worker(0, "10.0.0.1", 2 * gib),
            worker(1, "10.0.0.1", 2 * gib),
        ];
        let s = kv_blocks(&model, &plan, &c, &shared).unwrap();
        assert_eq!(s.blocks as u64, (gib - 2 * weights) / (2 * block));
        let apart = [
            worker(0, "10.0.0.1", 2 * gib),
            worker(1, "10.0.0.2", 4 * gib),
        ];
        let s = kv_blocks(&model, &plan, &c, &apart).unwrap();
        assert_eq!(
            s.blocks as u64,
            (gib - weights) / block,
            "the smaller machine limits"
        );
        assert!(s.why.contains("10.0.0.1"), "{}", s.why);
        let unknown = [worker(0, "10.0.0.1", 0), worker(1, "10.0.0.2", gib)];
        assert!(kv_blocks(&model, &plan, &c, &unknown).is_err());
        let tiny = [worker(0, "10.0.0.1", 1000), worker(1, "10.0.0.2", gib)];
        let e = kv_blocks(&model, &plan, &c, &tiny).unwrap_err().to_string();
        assert!(e.contains("kv_memory_fraction"), "{e}");

        c.max_batch_seqs = 2;
        let s = kv_blocks(&model, &plan, &c, &apart).unwrap();
        assert_eq!(
            s.blocks,
            2 * 1024 / 16,
            "capped at a full batch of full contexts"
        );
    }

    #[test]
    fn absurd_limits_size_the_cache_without_overflow() {
        let model = ModelConfig::preset("gpt2-tiny").unwrap();
        let plan = ShardPlan::new(&model, 8, 4).unwrap();
        let mut c = CoordinatorConfig::new(ModelSource::Synthetic {
            preset: "gpt2-tiny".into(),
            seed: 0,
        });
        c.max_batch_seqs = usize::MAX;
        let machine = [worker(0, "10.0.0.1", 1 << 30)];
        let s = kv_blocks(&model, &plan, &c, &machine).unwrap();
        assert!(s.blocks >= 1 && s.blocks < MAX_KV_BLOCKS, "{s:?}");

        // A cache of 2^63 bytes in blocks of 4 KiB: more blocks than 32-bit ids name.
        c.kv_cache_bytes = Some(i64::MAX as u64);
        let s = kv_blocks(&model, &plan, &c, &machine).unwrap();
        assert_eq!(s.blocks, MAX_KV_BLOCKS, "{}", s.why);
        assert!(s.why.contains("32-bit"), "{}", s.why);
    }

    #[test]
    fn allocates_until_empty_and_reuses_released_blocks() {
        let mut m = BlockManager::new(5, 16);
        assert_eq!(m.blocks_for(0), 0);
        assert_eq!(m.blocks_for(16), 1);
        assert_eq!(m.blocks_for(17), 2);
        let a = m.allocate(3).unwrap();
        assert_eq!(a, vec![0, 1, 2]);
        assert!(m.allocate(3).is_none(), "only 2 left");
        let b = m.allocate(2).unwrap();
        assert_eq!(m.used(), 5);
        m.release(a);
        assert_eq!(m.used(), 2);
        let c = m.allocate(3).unwrap();
        let mut all: Vec<u32> = b.iter().chain(&c).copied().collect();
        all.sort();
        assert_eq!(all, vec![0, 1, 2, 3, 4], "no block is handed out twice");
    }
}
