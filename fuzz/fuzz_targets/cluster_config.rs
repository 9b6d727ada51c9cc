//! A cluster config file (`cluster/*.toml`) as `tessera coordinator --config` reads it:
//! parsed, made into a `CoordinatorConfig`, validated, then taken through what bring-up
//! derives from it: the shard plan, the KV blocks an explicit `kv_cache_bytes` holds, and
//! the KV sizing once every worker has registered (CPU workers on one machine). Errors are
//! expected; a panic, an overflow or a value that cannot reach the workers is a bug.
#![no_main]

use std::net::SocketAddr;

use libfuzzer_sys::fuzz_target;
use tessera_coordinator::blocks::{kv_blocks, kv_blocks_for_bytes};
use tessera_coordinator::membership::Registered;
use tessera_coordinator::{ConfigFile, CoordinatorConfig, ModelSource};
use tessera_model::{ModelConfig, ShardPlan};

/// Memory each registered worker reports.
const WORKER_MEMORY_BYTES: u64 = 64 << 30;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(file) = ConfigFile::parse(text) else {
        return;
    };
    let Ok(config) = CoordinatorConfig::from_file(&file) else {
        return;
    };
    if config.validate().is_err() {
        return;
    }
    // A checkpoint is not read here; its model is taken to be gpt2-tiny.
    let model = match &config.model {
        ModelSource::Synthetic { preset, .. } => match ModelConfig::preset(preset) {
            Ok(m) => m,
            Err(_) => return,
        },
        ModelSource::Checkpoint(_) => ModelConfig::preset("gpt2-tiny").expect("a preset"),
    };
    let Ok(plan) = ShardPlan::new(&model, config.tp, config.pp) else {
        return;
    };
    // Bring-up sends these to every worker as 32-bit fields.
    assert!(u32::try_from(config.kv_block_tokens).is_ok());
    if let Some(bytes) = config.kv_cache_bytes {
        if kv_blocks_for_bytes(&model, &plan, &config, bytes, 2).is_err() {
            return;
        }
    }
    let workers: Vec<Registered> = (0..plan.world_size())
        .map(|i| Registered {
            worker_id: i,
            address: SocketAddr::from(([127, 0, 0, 1], 9000 + i as u16)),
            backend: "cpu".into(),
            hostname: "node".into(),
            memory_available_bytes: WORKER_MEMORY_BYTES,
            pid: 0,
        })
        .collect();
    if let Ok(sizing) = kv_blocks(&model, &plan, &config, &workers) {
        assert!(sizing.blocks >= 1);
        assert!(
            u32::try_from(sizing.blocks).is_ok(),
            "{} blocks",
            sizing.blocks
        );
    }
});
