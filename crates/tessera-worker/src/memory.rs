//! What an assignment will allocate, checked against this machine's memory before a byte
//! is read: an assignment that cannot fit fails at `Assign` with a message that says so,
//! rather than taking the process down at `Load`.

use tessera_model::{ModelConfig, ShardPlan, ShardSpec};
use tessera_runtime::{KvSpec, ShardOptions};

use crate::error::WorkerError;
use crate::shard_thread::Device;

/// Bytes of one KV-cache element on the CPU backend (f32).
const CPU_KV_ELEMENT_BYTES: u64 = 4;

/// Bytes of one KV-cache element of a shard on `device`: f32 on the CPU, the storage
/// dtype (bf16 or f16) on a GPU.
pub fn kv_element_bytes(device: &Device, options: &ShardOptions) -> u64 {
    match device {
        Device::Cuda(_) => options.dtype.size_bytes() as u64,
        Device::Cpu { .. } | Device::Sim(_) => CPU_KV_ELEMENT_BYTES,
    }
}

/// The KV cache geometry a shard of `spec` allocates with `options`.
pub fn kv_spec(config: &ModelConfig, spec: &ShardSpec, options: &ShardOptions) -> KvSpec {
    KvSpec {
        layers: spec.layers.len(),
        num_blocks: options.kv_blocks,
        block_size: options.block_size,
        heads: spec.heads.len(),
        head_dim: config.head_dim(),
    }
}

/// Bytes the shard's weight matrices and KV cache (of `kv_element` bytes per value) will
/// take, or `None` past `u64`.
pub fn shard_bytes(
    config: &ModelConfig,
    plan: &ShardPlan,
    spec: &ShardSpec,
    options: &ShardOptions,
    kv_element: u64,
) -> Option<u64> {
    let kv = kv_spec(config, spec, options);
    let kv_bytes = [
        2,
        kv.layers as u64,
        kv.num_blocks as u64,
        kv.block_size as u64,
        kv.heads as u64,
        kv.head_dim as u64,
        kv_element,
    ]
    .into_iter()
    .try_fold(1u64, u64::checked_mul)?;
    let weight_bytes = plan
        .worker_params(config, spec)
        .checked_mul(options.dtype.size_bytes() as u64)?;
    kv_bytes.checked_add(weight_bytes)
}

/// Refuses an assignment whose shard needs more than the memory of `device` (or more
/// than `u64` can count): the machine's memory for the CPU, the GPU's memory free at
/// start-up for CUDA. Where the total is unknown, only the overflow is checked.
pub fn check_fits(
    config: &ModelConfig,
    plan: &ShardPlan,
    spec: &ShardSpec,
    options: &ShardOptions,
    device: &Device,
) -> Result<(), WorkerError> {
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let element = kv_element_bytes(device, options);
    let needed = shard_bytes(config, plan, spec, options, element).ok_or_else(|| {
        WorkerError::OutOfMemory("the shard's weights and KV cache overflow 2^64 bytes".into())
    })?;
    let (capacity, what) = match device {
        Device::Cuda(gpu) => (
            Some(gpu.free_memory_bytes),
            format!("GPU {} has {{}} GiB free", gpu.ordinal),
        ),
        _ => (host_memory_bytes(), "this machine has {} GiB".to_string()),
    };
    match capacity {
        Some(total) if needed > total => Err(WorkerError::OutOfMemory(format!(
            "the shard needs {:.2} GiB for weights and KV cache ({} KV blocks of {} tokens); \
             {}",
            gib(needed),
            options.kv_blocks,
            options.block_size,
            what.replace("{}", &format!("{:.2}", gib(total)))
        ))),
        _ => Ok(()),
    }
}

/// `MemTotal` of `/proc/meminfo`, where there is one.
fn host_memory_bytes() -> Option<u64> {
    meminfo_bytes("MemTotal:")
}

/// `MemAvailable` of `/proc/meminfo` (what can be allocated without swapping), where
/// there is one.
pub fn available_memory_bytes() -> Option<u64> {
    meminfo_bytes("MemAvailable:")
}

fn meminfo_bytes(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_runtime::WeightDtype;

    #[test]
    fn a_small_shard_fits_and_an_absurd_cache_does_not() {
        let config = ModelConfig::preset("gpt2-tiny").unwrap();
        let plan = ShardPlan::new(&config, 2, 1).unwrap();
        let spec = plan.shard(0, 1).clone();
        let small = ShardOptions {
            dtype: WeightDtype::F32,
            kv_blocks: 16,
            block_size: 8,
        };
        let cpu = Device::Cpu { threads: 1 };
        check_fits(&config, &plan, &spec, &small, &cpu).unwrap();
        // 4 layers · 16 blocks · 8 tokens · 4 heads · 32 · 2 (K and V) · 4 bytes.
        let kv = 4 * 16 * 8 * 4 * 32 * 2 * 4;
        let weights = plan.worker_params(&config, &spec) * 4;
        assert_eq!(
            shard_bytes(&config, &plan, &spec, &small, 4),
            Some(kv + weights)
        );
        let absurd = ShardOptions {
            kv_blocks: u32::MAX as usize,
            block_size: u32::MAX as usize,
            ..small
        };
        let e = check_fits(&config, &plan, &spec, &absurd, &cpu).unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
    }

    #[test]
    fn a_gpu_shard_counts_16_bit_kv_against_the_gpu_memory() {
        let config = ModelConfig::preset("gpt2-tiny").unwrap();
        let plan = ShardPlan::new(&config, 2, 1).unwrap();
        let spec = plan.shard(0, 1).clone();
        let options = ShardOptions {
            dtype: WeightDtype::Bf16,
            kv_blocks: 16,
            block_size: 8,
        };
        let gpu = |free_memory_bytes| {
            Device::Cuda(crate::cuda::CudaDevice {
                ordinal: 3,
                description: "test".into(),
                total_memory_bytes: free_memory_bytes,
                free_memory_bytes,
            })
        };
        assert_eq!(kv_element_bytes(&gpu(1), &options), 2);
        let needed = shard_bytes(&config, &plan, &spec, &options, 2).unwrap();
        let kv = 4 * 16 * 8 * 4 * 32 * 2 * 2;
        assert_eq!(needed, kv + plan.worker_params(&config, &spec) * 2);
        check_fits(&config, &plan, &spec, &options, &gpu(needed)).unwrap();
        let e = check_fits(&config, &plan, &spec, &options, &gpu(needed - 1)).unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(e.to_string().contains("GPU 3 has"), "{e}");
    }
}
