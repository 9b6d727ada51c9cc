//! The `sim` backend: a shard that does no arithmetic. Each step takes the time the cost
//! model ([`tessera_model::cost`]) predicts for this shard on the named device, so the real
//! coordinator, scheduler and RPC path of a large cluster run on one machine.
//!
//! Stages keep their order as on devices: a later stage waits for the previous one's
//! hand-off over the real pipeline link before it starts its own time, and the hand-off
//! itself takes the predicted transfer time. The last stage's first rank answers with a
//! placeholder token per sequence: deterministic in the sequence and position, never the
//! end-of-text id, with a log-probability of 0. Nothing is allocated for weights or KV.

use std::time::{Duration, Instant};

use tessera_model::{CostModel, Hardware, ModelConfig, SeqWork, ShardPlan, ShardSpec, Topology};
use tessera_runtime::{KvSpec, SeqResult, ShardComms, StepOutput, StepRequest};

use crate::error::WorkerError;

/// The simulated device of a `sim` worker.
#[derive(Debug, Clone, PartialEq)]
pub struct SimDevice {
    /// The device profile whose times the worker takes.
    pub hardware: Hardware,
    /// Devices per node, which decides which links cross nodes.
    pub gpus_per_node: usize,
}

/// A shard that sleeps for its predicted time.
pub struct SimShard {
    config: ModelConfig,
    spec: ShardSpec,
    kv: KvSpec,
    cost: CostModel,
    comms: ShardComms,
    weight_bytes: usize,
}

impl SimShard {
    /// The shard `spec` of `plan` on `device`; checks that its weights and KV cache fit
    /// the device's memory.
    pub fn new(
        config: &ModelConfig,
        plan: &ShardPlan,
        spec: &ShardSpec,
        kv: KvSpec,
        device: &SimDevice,
        comms: ShardComms,
    ) -> Result<SimShard, WorkerError> {
        let hw = &device.hardware;
        let weights = plan.worker_params(config, spec) * u64::from(hw.weight_bytes);
        let kv_bytes = kv.size_bytes(hw.kv_bytes as usize) as u64;
        if weights + kv_bytes > hw.memory_bytes {
            return Err(WorkerError::OutOfMemory(format!(
                "the shard's {:.2} GB of weights and {:.2} GB of KV cache exceed the {:.2} GB \
                 of a simulated {}",
                weights as f64 / 1e9,
                kv_bytes as f64 / 1e9,
                hw.memory_bytes as f64 / 1e9,
                hw.name
            )));
        }
        let topology = Topology {
            gpus_per_node: device.gpus_per_node,
        };
        Ok(SimShard {
            config: config.clone(),
            spec: spec.clone(),
            kv,
            cost: CostModel::new(config, plan, hw, topology),
            comms,
            weight_bytes: weights as usize,
        })
    }

    /// Bytes of weights the device would hold.
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    /// Swaps in a new collective group and returns the old one.
    pub fn replace_comms(&mut self, comms: ShardComms) -> ShardComms {
        std::mem::replace(&mut self.comms, comms)
    }

    /// Runs one step: waits for the previous stage, takes this stage's time, hands off.
    pub fn step(&mut self, req: &StepRequest) -> Result<Option<StepOutput>, WorkerError> {
        req.validate(&self.config, &self.kv)?;
        let batch: Vec<SeqWork> = req
            .seqs
            .iter()
            .map(|s| SeqWork {
                past: s.start_pos,
                new: s.tokens.len(),
                samples: s.sample.is_some(),
            })
            .collect();
        let mut token = [0f32; 1];
        if let Some(prev) = self.comms.prev.as_mut() {
            prev.recv(0, &mut token)?;
        }
        let start = Instant::now();
        let mut busy = self.cost.stage_time(self.spec.stage, &batch);
        if !self.spec.has_lm_head {
            busy += self.cost.transfer_time(self.spec.stage, &batch);
        }
        sleep_until(start + Duration::from_secs_f64(busy));
        if let Some(next) = self.comms.next.as_mut() {
            next.send(1, &token)?;
        }
        if !self.spec.has_lm_head || self.spec.tp_rank != 0 {
            return Ok(None);
        }
        let results = req
            .seqs
            .iter()
            .filter(|s| s.sample.is_some())
            .map(|s| SeqResult {
                seq_id: s.seq_id,
                token_id: placeholder(&self.config, s.seq_id, s.start_pos + s.tokens.len()),
                logprob: 0.0,
                logits: None,
            })
            .collect();
        Ok(Some(StepOutput { results }))
    }
}

/// The placeholder token of `seq` at `position`: spread over the vocabulary, never EOS.
fn placeholder(config: &ModelConfig, seq: u64, position: usize) -> u32 {
    let vocab = config.vocab_size as u64;
    let mut id = tessera_model::splitmix64(seq.wrapping_mul(0x9e37_79b9) ^ position as u64) % vocab;
    if id == u64::from(config.eos_token_id) {
        id = (id + 1) % vocab;
    }
    id as u32
}

/// Sleeps to `deadline`: the OS sleep for all but the last stretch, then yields, so a
/// step ends within tens of microseconds of its predicted time.
fn sleep_until(deadline: Instant) {
    const SPIN: Duration = Duration::from_micros(200);
    loop {
        let now = Instant::now();
        if now >= deadline {
            return;
        }
        let left = deadline - now;
        if left > SPIN {
            std::thread::sleep(left - SPIN);
        } else {
            std::thread::yield_now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_runtime::collective::local_group;
    use tessera_runtime::{SampleSpec, SamplingParams, SeqStep};

    fn shard(preset: &str, tp: usize, pp: usize, stage: usize) -> (SimShard, CostModel) {
        let config = ModelConfig::preset(preset).unwrap();
        let plan = ShardPlan::new(&config, tp, pp).unwrap();
        let spec = plan.shard(stage, 0).clone();
        let device = SimDevice {
            hardware: Hardware::gpu("h100-sxm").unwrap(),
            gpus_per_node: 8,
        };
        let kv = KvSpec {
            layers: spec.layers.len(),
            num_blocks: 64,
            block_size: 16,
            heads: spec.heads.len(),
            head_dim: config.head_dim(),
        };
        let comms = ShardComms {
            tp: Box::new(local_group(1).pop().unwrap()),
            prev: None,
            next: None,
        };
        let cost = CostModel::new(
            &config,
            &plan,
            &device.hardware,
            Topology { gpus_per_node: 8 },
        );
        (
            SimShard::new(&config, &plan, &spec, kv, &device, comms).unwrap(),
            cost,
        )
    }

    fn decode(n: usize) -> StepRequest {
        StepRequest {
            seqs: (0..n as u64)
                .map(|i| SeqStep {
                    seq_id: i,
                    tokens: vec![5],
                    start_pos: 40,
                    block_table: vec![i as u32 % 64; 3],
                    sample: Some(SampleSpec {
                        params: SamplingParams::default(),
                        penalty_ids: vec![],
                        return_logits: false,
                    }),
                })
                .collect(),
        }
    }

    #[test]
    fn a_step_takes_the_predicted_time_and_answers_every_sequence() {
        let (mut s, cost) = shard("gpt3-6.7b", 1, 1, 0);
        let req = decode(4);
        let batch: Vec<SeqWork> = (0..4)
            .map(|_| SeqWork {
                past: 40,
                new: 1,
                samples: true,
            })
            .collect();
        let want = cost.stage_time(0, &batch);
        let t = Instant::now();
        let out = s.step(&req).unwrap().unwrap();
        let took = t.elapsed().as_secs_f64();
        assert!(took >= want, "{took} < {want}");
        assert_eq!(out.results.len(), 4);
        let again = s.step(&req).unwrap().unwrap();
        assert_eq!(out, again, "placeholders are deterministic");
        assert!(out.results.iter().all(|r| r.token_id != 50256));
    }

    #[test]
    fn a_bad_step_is_refused_as_on_a_real_shard() {
        let (mut s, _) = shard("gpt2", 1, 1, 0);
        let mut req = decode(1);
        req.seqs[0].block_table = vec![999; 3];
        assert!(s.step(&req).is_err());
    }

    #[test]
    fn a_shard_too_big_for_the_device_is_refused() {
        let config = ModelConfig::preset("gpt3-175b").unwrap();
        let plan = ShardPlan::new(&config, 1, 1).unwrap();
        let spec = plan.shard(0, 0).clone();
        let kv = KvSpec {
            layers: 96,
            num_blocks: 1,
            block_size: 16,
            heads: 96,
            head_dim: 128,
        };
        let device = SimDevice {
            hardware: Hardware::gpu("h200").unwrap(),
            gpus_per_node: 8,
        };
        let comms = ShardComms {
            tp: Box::new(local_group(1).pop().unwrap()),
            prev: None,
            next: None,
        };
        let e = SimShard::new(&config, &plan, &spec, kv, &device, comms)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("h200"), "{e}");
    }
}
