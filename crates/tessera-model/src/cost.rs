//! The cost model: how long one step of a TP × PP split takes on named hardware.
//!
//! A step is what the scheduler sends the workers: some sequences decoding one token and
//! some prefilling a chunk of their prompt. Every stage runs its layers for the step's
//! tokens, one after another (Tessera keeps one step in flight), so the step takes the
//! sum of the stages plus the activations sent between them plus the coordinator's
//! own time per step.
//!
//! Each matrix product is charged its weight and activation traffic against memory
//! bandwidth and its FLOPs against the matrix peak, the larger of the two on a GPU (a
//! roofline per GEMM) and their sum on a CPU core ([`Hardware::overlap`]); attention is
//! charged its KV reads and its FLOPs the same way; each all-reduce follows the α–β
//! model of a ring, `2(p−1)·α + 2(p−1)/p · bytes/β`. Achieved fractions of the peaks and
//! the fixed costs are the hardware's [`Efficiency`], which `tessera plan --calibrate`
//! fits to a measured run. The planner (`tessera-bench`) and the `sim` workers, which sleep
//! for the time this model predicts for their shard, share this one model.

use serde::{Deserialize, Serialize};

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::plan::ShardPlan;

/// A point-to-point link: NVLink inside a node, the network between nodes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Link {
    /// Bytes per second in one direction, per GPU.
    pub bandwidth: f64,
    /// Seconds per message hop (the α of the α–β model).
    pub latency: f64,
}

impl Link {
    /// Time of one message of `bytes`.
    pub fn transfer(&self, bytes: f64) -> f64 {
        self.latency + bytes / self.bandwidth
    }

    /// Time of a ring all-reduce of `bytes` over `p` ranks.
    pub fn all_reduce(&self, p: usize, bytes: f64) -> f64 {
        if p <= 1 {
            return 0.0;
        }
        let p = p as f64;
        2.0 * (p - 1.0) * self.latency + 2.0 * (p - 1.0) / p * bytes / self.bandwidth
    }

    /// Time of a ring all-gather whose result is `bytes` on every rank.
    pub fn all_gather(&self, p: usize, bytes: f64) -> f64 {
        if p <= 1 {
            return 0.0;
        }
        let p = p as f64;
        (p - 1.0) * self.latency + (p - 1.0) / p * bytes / self.bandwidth
    }
}

/// The fractions of the peaks a deployment reaches, and its fixed costs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Efficiency {
    /// Fraction of the peak memory bandwidth that weight and KV reads reach.
    pub bandwidth: f64,
    /// Fraction of the peak matrix FLOP/s that GEMMs and attention reach.
    pub compute: f64,
    /// Seconds of fixed cost per layer and step (kernel launches, thread hand-offs).
    pub layer_overhead: f64,
    /// Seconds per step outside the workers: scheduling, the step's RPCs.
    pub step_overhead: f64,
    /// Seconds per sequence and step outside the workers: its part of the step request,
    /// detokenising and streaming its token.
    #[serde(default)]
    pub seq_overhead: f64,
}

/// One device a worker runs on, with the links between devices.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hardware {
    /// Profile name: `a100-80g`, `h100-sxm`, `h200`, `cpu`, or a custom one.
    pub name: String,
    /// Device memory in bytes.
    pub memory_bytes: u64,
    /// Peak memory bandwidth, bytes per second.
    pub memory_bandwidth: f64,
    /// Peak dense matrix FLOP/s at the weight dtype (bf16 on GPUs, f32 on the CPU).
    pub matrix_flops: f64,
    /// Link between devices of one node.
    pub intra_node: Link,
    /// Link between nodes.
    pub inter_node: Link,
    /// Bytes per weight element.
    pub weight_bytes: u32,
    /// Bytes per activation element (what the collectives and stages exchange).
    pub activation_bytes: u32,
    /// Bytes per KV-cache element.
    pub kv_bytes: u32,
    /// Fraction of the device memory given to weights and KV cache.
    pub memory_fraction: f64,
    /// How far memory traffic and arithmetic overlap: 1 charges an operation the larger
    /// of the two (a roofline: GPUs hide loads behind many warps), 0 their sum (a CPU core
    /// issues its loads and FMAs from one instruction stream).
    #[serde(default = "full_overlap")]
    pub overlap: f64,
    /// Achieved fractions and fixed costs.
    pub efficiency: Efficiency,
}

/// Names of the built-in GPU profiles.
pub const GPU_PROFILES: [&str; 3] = ["a100-80g", "h100-sxm", "h200"];

fn full_overlap() -> f64 {
    1.0
}

const GB: f64 = 1e9;
const GIB: u64 = 1 << 30;

impl Hardware {
    /// A built-in GPU profile: the vendor's peak figures (dense bf16, no sparsity), NVLink
    /// per direction inside a node, one InfiniBand NIC per GPU between nodes, bf16 weights
    /// and KV, and default efficiencies typical of a tuned serving stack.
    pub fn gpu(name: &str) -> Result<Hardware> {
        let nvlink = |gb_s: f64| Link {
            bandwidth: gb_s * GB,
            // NCCL's low-latency protocol: about 11 µs for a small all-reduce of 8 GPUs.
            latency: 0.8e-6,
        };
        let infiniband = |gbit_s: f64| Link {
            bandwidth: gbit_s / 8.0 * GB,
            latency: 5e-6,
        };
        let (memory_bytes, bandwidth, flops, intra, inter) = match name {
            // A100 SXM 80GB: HBM2e 2.039 TB/s, 312 TFLOP/s bf16, NVLink 3 600 GB/s
            // (both directions), HDR 200 Gb/s per GPU.
            "a100-80g" => (
                80 * GIB,
                2039.0 * GB,
                312e12,
                nvlink(300.0),
                infiniband(200.0),
            ),
            // H100 SXM5 80GB: HBM3 3.35 TB/s, 989 TFLOP/s bf16, NVLink 4 900 GB/s,
            // NDR 400 Gb/s per GPU.
            "h100-sxm" => (
                80 * GIB,
                3350.0 * GB,
                989e12,
                nvlink(450.0),
                infiniband(400.0),
            ),
            // H200 SXM 141GB: HBM3e 4.8 TB/s, otherwise an H100.
            "h200" => (
                141 * GB as u64,
                4800.0 * GB,
                989e12,
                nvlink(450.0),
                infiniband(400.0),
            ),
            other => {
                return Err(ModelError::InvalidConfig {
                    field: "gpu",
                    value: other.to_string(),
                    reason: format!(
                        "not a known profile; known: {}, cpu",
                        GPU_PROFILES.join(", ")
                    ),
                })
            }
        };
        Ok(Hardware {
            name: name.to_string(),
            memory_bytes,
            memory_bandwidth: bandwidth,
            matrix_flops: flops,
            intra_node: intra,
            inter_node: inter,
            weight_bytes: 2,
            activation_bytes: 2,
            kv_bytes: 2,
            memory_fraction: 0.9,
            overlap: 1.0,
            efficiency: Efficiency {
                bandwidth: 0.85,
                compute: 0.7,
                layer_overhead: 10e-6,
                step_overhead: 0.5e-3,
                seq_overhead: 10e-6,
            },
        })
    }

    /// Checks every figure; the error names the field.
    pub fn validate(&self) -> Result<()> {
        let positive: [(&'static str, f64); 8] = [
            ("memory_bandwidth", self.memory_bandwidth),
            ("matrix_flops", self.matrix_flops),
            ("intra_node.bandwidth", self.intra_node.bandwidth),
            ("inter_node.bandwidth", self.inter_node.bandwidth),
            ("efficiency.bandwidth", self.efficiency.bandwidth),
            ("efficiency.compute", self.efficiency.compute),
            ("memory_fraction", self.memory_fraction),
            ("memory_bytes", self.memory_bytes as f64),
        ];
        for (field, v) in positive {
            if !(v.is_finite() && v > 0.0) {
                return Err(ModelError::InvalidConfig {
                    field,
                    value: v.to_string(),
                    reason: "must be a positive number".into(),
                });
            }
        }
        let non_negative: [(&'static str, f64); 5] = [
            ("intra_node.latency", self.intra_node.latency),
            ("inter_node.latency", self.inter_node.latency),
            ("efficiency.layer_overhead", self.efficiency.layer_overhead),
            ("efficiency.step_overhead", self.efficiency.step_overhead),
            ("efficiency.seq_overhead", self.efficiency.seq_overhead),
        ];
        for (field, v) in non_negative {
            if !(v.is_finite() && v >= 0.0) {
                return Err(ModelError::InvalidConfig {
                    field,
                    value: v.to_string(),
                    reason: "must be a number ≥ 0".into(),
                });
            }
        }
        if !(0.0..=1.0).contains(&self.overlap) {
            return Err(ModelError::InvalidConfig {
                field: "overlap",
                value: self.overlap.to_string(),
                reason: "must be in [0, 1]".into(),
            });
        }
        for (field, v) in [
            ("efficiency.bandwidth", self.efficiency.bandwidth),
            ("efficiency.compute", self.efficiency.compute),
            ("memory_fraction", self.memory_fraction),
        ] {
            if v > 1.0 {
                return Err(ModelError::InvalidConfig {
                    field,
                    value: v.to_string(),
                    reason: "is a fraction: at most 1".into(),
                });
            }
        }
        for (field, v) in [
            ("weight_bytes", self.weight_bytes),
            ("activation_bytes", self.activation_bytes),
            ("kv_bytes", self.kv_bytes),
        ] {
            if v == 0 || v > 8 {
                return Err(ModelError::InvalidConfig {
                    field,
                    value: v.to_string(),
                    reason: "must be 1 to 8 bytes".into(),
                });
            }
        }
        Ok(())
    }

    /// Time of a transfer at the achieved memory bandwidth.
    fn read(&self, bytes: f64) -> f64 {
        bytes / (self.memory_bandwidth * self.efficiency.bandwidth)
    }

    /// Time of `flops` at the achieved matrix rate.
    fn compute(&self, flops: f64) -> f64 {
        flops / (self.matrix_flops * self.efficiency.compute)
    }

    /// Time of an operation that moves `bytes` and does `flops`, by the overlap.
    fn op(&self, bytes: f64, flops: f64) -> f64 {
        let (read, compute) = (self.read(bytes), self.compute(flops));
        read.max(compute) + (1.0 - self.overlap) * read.min(compute)
    }

    /// Time of a `[m, k] × [k, n]` product with weights of `k × n`.
    fn gemm(&self, m: f64, k: f64, n: f64) -> f64 {
        let bytes =
            k * n * f64::from(self.weight_bytes) + m * (k + n) * f64::from(self.activation_bytes);
        self.op(bytes, 2.0 * m * k * n)
    }
}

/// Where the devices are: how many nodes, how many devices in each. Workers are placed in
/// plan order, `stage · tp + tp_rank`, filling one node before the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Topology {
    /// Devices per node.
    pub gpus_per_node: usize,
}

impl Topology {
    fn node(&self, worker: usize) -> usize {
        worker / self.gpus_per_node.max(1)
    }
}

/// One sequence's part of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeqWork {
    /// Tokens of the sequence already in the KV cache.
    pub past: usize,
    /// New tokens this step: 1 when decoding, a prompt chunk when prefilling.
    pub new: usize,
    /// Whether a token is sampled after the new ones.
    pub samples: bool,
}

/// The time of one step, by part.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepCost {
    /// Seconds each stage computes (its slowest rank).
    pub stages: Vec<f64>,
    /// Seconds spent sending activations from each stage to the next.
    pub transfers: Vec<f64>,
    /// Seconds outside the workers.
    pub overhead: f64,
}

impl StepCost {
    /// The whole step, as the coordinator sees it.
    pub fn total(&self) -> f64 {
        self.stages.iter().sum::<f64>() + self.transfers.iter().sum::<f64>() + self.overhead
    }
}

/// The cost model of one split of one model on one kind of hardware.
#[derive(Debug, Clone)]
pub struct CostModel {
    config: ModelConfig,
    plan: ShardPlan,
    hardware: Hardware,
    topology: Topology,
}

impl CostModel {
    /// The model of `config` split as `plan` on `hardware` placed as `topology`.
    pub fn new(
        config: &ModelConfig,
        plan: &ShardPlan,
        hardware: &Hardware,
        topology: Topology,
    ) -> CostModel {
        CostModel {
            config: config.clone(),
            plan: plan.clone(),
            hardware: hardware.clone(),
            topology,
        }
    }

    /// The hardware profile.
    pub fn hardware(&self) -> &Hardware {
        &self.hardware
    }

    /// Replaces the hardware's efficiencies (calibration).
    pub fn set_efficiency(&mut self, e: Efficiency) {
        self.hardware.efficiency = e;
    }

    /// The link of the TP group of `stage`: NVLink when the group is inside one node.
    fn tp_link(&self, stage: usize) -> Link {
        let first = self.plan.shard(stage, 0).worker;
        let last = self.plan.shard(stage, self.plan.tp - 1).worker;
        if self.topology.node(first) == self.topology.node(last) {
            self.hardware.intra_node
        } else {
            self.hardware.inter_node
        }
    }

    /// The link from `stage` to the next: the network when a rank's peer is on
    /// another node.
    fn pp_link(&self, stage: usize) -> Link {
        let crosses = (0..self.plan.tp).any(|r| {
            self.topology.node(self.plan.shard(stage, r).worker)
                != self.topology.node(self.plan.shard(stage + 1, r).worker)
        });
        if crosses {
            self.hardware.inter_node
        } else {
            self.hardware.intra_node
        }
    }

    /// Seconds one rank of `stage` computes the step `batch`.
    pub fn stage_time(&self, stage: usize, batch: &[SeqWork]) -> f64 {
        let hw = &self.hardware;
        let c = &self.config;
        let tp = self.plan.tp;
        let spec = self.plan.shard(stage, 0);
        let link = self.tp_link(stage);
        let t: f64 = batch.iter().map(|s| s.new as f64).sum();
        let d = c.n_embd as f64;
        let width = (spec.heads.len() * c.head_dim()) as f64;
        let ffn = spec.ffn.len() as f64;
        let act = f64::from(hw.activation_bytes);
        let row_bytes = t * d * act;

        // One layer: QKV, attention out, fc1, fc2; attention; element-wise passes
        // (two LayerNorms, two residual adds, GELU, biases); two all-reduces.
        let gemms = hw.gemm(t, d, 3.0 * width)
            + hw.gemm(t, width, d)
            + hw.gemm(t, d, ffn)
            + hw.gemm(t, ffn, d);
        let kv_row = 2.0 * width * f64::from(hw.kv_bytes);
        let mut kv_bytes = 0.0;
        let mut attention_flops = 0.0;
        for s in batch {
            let (past, new) = (s.past as f64, s.new as f64);
            kv_bytes += (past + new) * kv_row;
            // Each new token attends to the past and to the new tokens up to itself:
            // QKᵀ and PV, two FLOPs per multiply-add.
            attention_flops += 4.0 * width * (new * past + new * (new + 1.0) / 2.0);
        }
        let attention = hw.op(kv_bytes, attention_flops);
        let elementwise = hw.read(t * (14.0 * d + 3.0 * ffn) * act);
        let reduce = 2.0 * link.all_reduce(tp, row_bytes);
        let layer = gemms + attention + elementwise + reduce + hw.efficiency.layer_overhead;
        let mut time = layer * spec.layers.len() as f64;

        let vocab = spec.vocab.len() as f64;
        if spec.embeds {
            // Gather the token rows of this rank's vocabulary slice, add positions,
            // all-reduce (the embedding is vocabulary-parallel).
            time += hw.read(t * d * f64::from(hw.weight_bytes) * 2.0 + row_bytes)
                + link.all_reduce(tp, row_bytes);
        }
        if spec.has_lm_head {
            let sampled = batch.iter().filter(|s| s.samples).count() as f64;
            if sampled > 0.0 {
                // Final LayerNorm of the sampled rows, this rank's logits, and the
                // exchange of each rank's candidates.
                time += hw.read(sampled * d * act * 2.0)
                    + hw.gemm(sampled, d, vocab)
                    + link.all_gather(tp, sampled * 64.0 * 8.0 * tp as f64)
                    + hw.efficiency.layer_overhead;
            }
        }
        time
    }

    /// Seconds to send the step's activations from `stage` to the next stage.
    pub fn transfer_time(&self, stage: usize, batch: &[SeqWork]) -> f64 {
        let t: usize = batch.iter().map(|s| s.new).sum();
        let bytes = (t * self.config.n_embd) as f64 * f64::from(self.hardware.activation_bytes);
        self.pp_link(stage).transfer(bytes)
    }

    /// The whole step `batch`.
    pub fn step(&self, batch: &[SeqWork]) -> StepCost {
        let pp = self.plan.pp;
        StepCost {
            stages: (0..pp).map(|s| self.stage_time(s, batch)).collect(),
            transfers: (0..pp - 1).map(|s| self.transfer_time(s, batch)).collect(),
            overhead: self.hardware.efficiency.step_overhead
                + self.hardware.efficiency.seq_overhead * batch.len() as f64,
        }
    }

    /// Bytes of weights the most loaded device holds.
    pub fn weight_bytes_per_device(&self) -> u64 {
        self.plan
            .shards
            .iter()
            .map(|s| self.plan.worker_params(&self.config, s))
            .max()
            .unwrap_or(0)
            * u64::from(self.hardware.weight_bytes)
    }

    /// Bytes of KV cache one token of context takes on the most loaded device.
    pub fn kv_bytes_per_token_per_device(&self) -> u64 {
        self.plan
            .shards
            .iter()
            .map(|s| 2 * s.layers.len() * s.heads.len() * self.config.head_dim())
            .max()
            .unwrap_or(0) as u64
            * u64::from(self.hardware.kv_bytes)
    }

    /// Tokens of KV cache every device can hold next to its weights, or 0 when the
    /// weights alone do not fit.
    pub fn kv_token_capacity(&self) -> u64 {
        let budget = (self.hardware.memory_bytes as f64 * self.hardware.memory_fraction) as u64;
        budget.saturating_sub(self.weight_bytes_per_device())
            / self.kv_bytes_per_token_per_device().max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(preset: &str, tp: usize, pp: usize, gpu: &str) -> CostModel {
        let config = ModelConfig::preset(preset).unwrap();
        let plan = ShardPlan::new(&config, tp, pp).unwrap();
        CostModel::new(
            &config,
            &plan,
            &Hardware::gpu(gpu).unwrap(),
            Topology { gpus_per_node: 8 },
        )
    }

    fn decode(batch: usize, past: usize) -> Vec<SeqWork> {
        vec![
            SeqWork {
                past,
                new: 1,
                samples: true
            };
            batch
        ]
    }

    #[test]
    fn batch_one_decode_is_bound_by_reading_the_weights() {
        let m = model("gpt3-175b", 8, 1, "a100-80g");
        let hw = m.hardware().clone();
        let floor =
            m.weight_bytes_per_device() as f64 / (hw.memory_bandwidth * hw.efficiency.bandwidth);
        let step = m.step(&decode(1, 128)).total();
        // Weights dominate; KV, all-reduces and overheads add a few per cent.
        assert!(step > floor && step < 1.25 * floor, "{step} vs {floor}");
    }

    #[test]
    fn prefill_is_bound_by_compute() {
        let m = model("gpt3-175b", 8, 1, "h100-sxm");
        let hw = m.hardware().clone();
        let tokens = 2048;
        let prefill = [SeqWork {
            past: 0,
            new: tokens,
            samples: true,
        }];
        let flops = 2.0 * tokens as f64 * m.weight_bytes_per_device() as f64 / 2.0;
        let floor = flops / (hw.matrix_flops * hw.efficiency.compute);
        let step = m.step(&prefill).total();
        // Element-wise passes and 50 MB all-reduces at 2048 tokens add about half.
        assert!(step > floor && step < 1.7 * floor, "{step} vs {floor}");
    }

    #[test]
    fn more_batch_costs_more_but_less_per_token() {
        let m = model("gpt3-13b", 2, 1, "h100-sxm");
        let one = m.step(&decode(1, 512)).total();
        let many = m.step(&decode(64, 512)).total();
        assert!(many > one);
        assert!(many / 64.0 < one / 4.0);
    }

    #[test]
    fn pipeline_stages_add_up_and_cross_nodes_on_the_network() {
        let m = model("gpt3-175b", 8, 2, "h100-sxm");
        let step = m.step(&decode(8, 100));
        assert_eq!(step.stages.len(), 2);
        assert_eq!(step.transfers.len(), 1);
        // Stage 1 is on the second node of 8 GPUs: its activations cross the network.
        let network = Hardware::gpu("h100-sxm").unwrap().inter_node;
        let bytes = 8.0 * 12288.0 * 2.0;
        assert!((step.transfers[0] - network.transfer(bytes)).abs() < 1e-12);
        let half = m.stage_time(0, &decode(8, 100));
        assert!((step.total() - step.overhead - step.transfers[0] - 2.0 * half).abs() < 2e-3);
    }

    #[test]
    fn memory_capacity_follows_the_split() {
        let one = model("gpt3-175b", 8, 1, "a100-80g");
        // 350 GB of bf16 weights over 8 GPUs of 80 GiB at 90 %: about 44 GB each.
        let w = one.weight_bytes_per_device() as f64;
        assert!((w / 1e9 - 43.8).abs() < 0.5, "{w}");
        let two = model("gpt3-175b", 8, 2, "a100-80g");
        assert!(two.kv_token_capacity() > 2 * one.kv_token_capacity());
        let tiny = model("gpt3-175b", 1, 1, "a100-80g");
        assert_eq!(tiny.kv_token_capacity(), 0);
    }

    #[test]
    fn ring_collectives_follow_alpha_beta() {
        let l = Link {
            bandwidth: 1e9,
            latency: 1e-6,
        };
        assert_eq!(l.all_reduce(1, 1e6), 0.0);
        let t = l.all_reduce(4, 1e6);
        assert!((t - (6.0 * 1e-6 + 1.5 * 1e-3)).abs() < 1e-12);
    }

    #[test]
    fn unknown_profiles_and_bad_figures_are_named() {
        let e = Hardware::gpu("v100").unwrap_err().to_string();
        assert!(e.contains("v100") && e.contains("h100-sxm"), "{e}");
        let mut hw = Hardware::gpu("h200").unwrap();
        hw.validate().unwrap();
        hw.efficiency.compute = 1.5;
        let e = hw.validate().unwrap_err().to_string();
        assert!(e.contains("efficiency.compute"), "{e}");
    }
}
