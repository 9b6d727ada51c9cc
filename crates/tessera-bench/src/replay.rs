//! Replays Tessera's scheduler over the cost model: the requests a load produces, the steps
//! the scheduler would form from them, and what each client would see.
//!
//! The policy is the coordinator's (`tessera-coordinator/src/scheduler.rs`): each step,
//! running sequences take their tokens oldest first under `max_batch_tokens`, decodes
//! before prompt chunks; then waiting requests are admitted first come, first served while
//! there is room in the batch and in the KV cache. A step starts when the previous one
//! ends, so a request that arrives during a step waits for the next. Tokens reach the
//! client when their step ends. The replay reserves each sequence's whole KV need at
//! admission, so it never preempts: with the lengths known that is the same capacity.

use std::collections::VecDeque;

use rand::SeedableRng;
use rand_distr::{Distribution, Exp, Gamma};
use serde::{Deserialize, Serialize};
use tessera_model::{CostModel, SeqWork};

/// The scheduler's limits (`--max-batch-tokens`, `--max-batch-seqs`, the KV cache).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    /// Tokens in one step.
    pub max_batch_tokens: usize,
    /// Sequences in one step.
    pub max_batch_seqs: usize,
    /// Tokens of context the KV cache holds in all.
    pub kv_tokens: u64,
}

/// How requests arrive.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Load {
    /// `concurrency` clients, each sending its next request when the last one finishes
    /// (requests at an infinite rate behind a semaphore).
    Closed {
        /// Requests in flight at once.
        concurrency: usize,
    },
    /// Arrivals at `rate` per second with gamma inter-arrival times of shape
    /// `burstiness` (1: Poisson), optionally capped at `concurrency` in flight.
    Open {
        /// Requests per second.
        rate: f64,
        /// Shape of the gamma distribution of the gaps.
        burstiness: f64,
        /// Cap on requests in flight.
        concurrency: Option<usize>,
        /// Seed of the arrival times.
        seed: u64,
    },
}

/// One request: its prompt and output lengths.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    /// Prompt tokens.
    pub prompt: usize,
    /// Tokens to generate (at least 1).
    pub output: usize,
}

/// What one client saw, in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Seen {
    /// Request sent → first token.
    pub ttft: f64,
    /// Request sent → last token.
    pub e2e: f64,
    /// Tokens received.
    pub tokens: usize,
}

impl Seen {
    /// Mean time per output token after the first, if there was more than one.
    pub fn tpot(&self) -> Option<f64> {
        (self.tokens > 1).then(|| (self.e2e - self.ttft) / (self.tokens - 1) as f64)
    }
}

/// The outcome of a replay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Replay {
    /// Every request, in the order of the jobs.
    pub seen: Vec<Seen>,
    /// First request sent → last token, seconds.
    pub duration: f64,
    /// Steps run.
    pub steps: usize,
    /// Jobs that can never fit the KV cache and were not run.
    pub rejected: usize,
}

impl Replay {
    /// Output tokens per second.
    pub fn output_throughput(&self) -> f64 {
        let tokens: usize = self.seen.iter().map(|s| s.tokens).sum();
        tokens as f64 / self.duration.max(f64::MIN_POSITIVE)
    }

    /// Requests per second.
    pub fn request_throughput(&self) -> f64 {
        self.seen.len() as f64 / self.duration.max(f64::MIN_POSITIVE)
    }

    /// Median time to first token, seconds.
    pub fn median_ttft(&self) -> f64 {
        median(self.seen.iter().map(|s| s.ttft).collect())
    }

    /// Median time per output token, seconds.
    pub fn median_tpot(&self) -> f64 {
        median(self.seen.iter().filter_map(Seen::tpot).collect())
    }

    /// Median end-to-end latency, seconds.
    pub fn median_e2e(&self) -> f64 {
        median(self.seen.iter().map(|s| s.e2e).collect())
    }
}

/// Median by linear interpolation (NaN for no values).
fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    crate::metrics::percentile(&v, 50.0)
}

/// Seconds from a client receiving its last token to its next request reaching the
/// scheduler; a step that starts at the same moment runs without it.
const CLIENT_TURNAROUND: f64 = 100e-6;

/// Seconds between the first requests of a closed loop's clients.
const CLIENT_STAGGER: f64 = 20e-6;

struct Running {
    job: usize,
    arrival: f64,
    prompt: usize,
    output: usize,
    /// Tokens in the KV cache.
    cached: usize,
    generated: usize,
    first: Option<f64>,
}

impl Running {
    fn prefilled(&self) -> bool {
        self.cached >= self.prompt
    }

    fn need(&self) -> u64 {
        (self.prompt + self.output) as u64
    }
}

/// Arrival times of `n` requests at `rate` per second, gamma gaps of shape `burstiness`.
pub fn arrivals(n: usize, rate: f64, burstiness: f64, seed: u64) -> Vec<f64> {
    if !rate.is_finite() {
        return vec![0.0; n];
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut t = 0.0;
    let gap: Box<dyn Fn(&mut rand::rngs::StdRng) -> f64> = if burstiness == 1.0 {
        let exp = Exp::new(rate).expect("rate is positive");
        Box::new(move |r| exp.sample(r))
    } else {
        let gamma = Gamma::new(burstiness, 1.0 / (rate * burstiness)).expect("positive shape");
        Box::new(move |r| gamma.sample(r))
    };
    (0..n)
        .map(|_| {
            let at = t;
            t += gap(&mut rng);
            at
        })
        .collect()
}

/// Replays `jobs` under `load` through the scheduler with `limits` on `cost`.
pub fn replay(cost: &CostModel, limits: &Limits, jobs: &[Job], load: &Load) -> Replay {
    let (times, cap) = match *load {
        // The clients of a closed loop start one after another, as a load generator's
        // tasks do: the first request reaches an idle scheduler alone.
        Load::Closed { concurrency } => (
            (0..jobs.len())
                .map(|i| i.min(concurrency) as f64 * CLIENT_STAGGER)
                .collect(),
            concurrency.max(1),
        ),
        Load::Open {
            rate,
            burstiness,
            concurrency,
            seed,
        } => (
            arrivals(jobs.len(), rate, burstiness, seed),
            concurrency.unwrap_or(usize::MAX).max(1),
        ),
    };
    let mut seen = vec![
        Seen {
            ttft: f64::NAN,
            e2e: f64::NAN,
            tokens: 0,
        };
        jobs.len()
    ];
    // Requests not yet sent (client side: the arrival process and the concurrency cap),
    // requests sent and waiting for admission, and the running batch. With a cap, `free`
    // holds the times at which each idle client may send again.
    let capped = cap != usize::MAX;
    let mut free: Vec<f64> = if capped {
        vec![0.0; cap.min(jobs.len())]
    } else {
        Vec::new()
    };
    let mut unsent: VecDeque<usize> = (0..jobs.len()).collect();
    let mut waiting: VecDeque<(usize, f64)> = VecDeque::new();
    let mut running: Vec<Running> = Vec::new();
    let mut kv_used = 0u64;
    let mut now = 0.0f64;
    let mut steps = 0usize;
    let mut rejected = 0usize;
    let mut end = 0.0f64;
    let mut batch = Vec::new();
    // When the request at the head of `unsent` goes out, and on which idle client.
    let next_send = |j: usize, free: &[f64]| -> Option<(f64, Option<usize>)> {
        if !capped {
            return Some((times[j], None));
        }
        let (slot, at) = free.iter().enumerate().min_by(|a, b| a.1.total_cmp(b.1))?;
        Some((times[j].max(*at), Some(slot)))
    };

    loop {
        while let Some(&j) = unsent.front() {
            match next_send(j, &free) {
                Some((at, slot)) if at <= now => {
                    unsent.pop_front();
                    if let Some(slot) = slot {
                        free.swap_remove(slot);
                    }
                    waiting.push_back((j, at));
                }
                _ => break,
            }
        }
        if running.is_empty() && waiting.is_empty() {
            match unsent.front().and_then(|&j| next_send(j, &free)) {
                Some((at, _)) => {
                    now = now.max(at);
                    continue;
                }
                None => break,
            }
        }

        // Form the step: decodes, then prompt chunks of running sequences, then admission.
        batch.clear();
        let mut budget = limits.max_batch_tokens;
        let mut rows: Vec<(usize, usize)> = Vec::new(); // (index in running, new tokens)
        for (i, r) in running.iter().enumerate() {
            if r.prefilled() && budget > 0 {
                rows.push((i, 1));
                budget -= 1;
            }
        }
        for (i, r) in running.iter().enumerate() {
            if !r.prefilled() && budget > 0 {
                let n = (r.prompt - r.cached).min(budget);
                rows.push((i, n));
                budget -= n;
            }
        }
        while budget > 0 && running.len() < limits.max_batch_seqs {
            let Some(&(j, arrival)) = waiting.front() else {
                break;
            };
            let job = jobs[j];
            let need = (job.prompt + job.output) as u64;
            if need > limits.kv_tokens {
                waiting.pop_front();
                rejected += 1;
                if capped {
                    free.push(now + CLIENT_TURNAROUND);
                }
                continue;
            }
            if kv_used + need > limits.kv_tokens {
                break;
            }
            waiting.pop_front();
            kv_used += need;
            running.push(Running {
                job: j,
                arrival,
                prompt: job.prompt.max(1),
                output: job.output.max(1),
                cached: 0,
                generated: 0,
                first: None,
            });
            let n = running.last().map_or(0, |r| r.prompt).min(budget);
            rows.push((running.len() - 1, n));
            budget -= n;
        }
        if rows.is_empty() {
            // Nothing can run: the KV cache is full of nothing (cannot happen with a
            // running batch) or the only waiting request was rejected.
            continue;
        }
        for &(i, n) in &rows {
            let r = &running[i];
            batch.push(SeqWork {
                past: if r.prefilled() {
                    r.prompt + r.generated - 1
                } else {
                    r.cached
                },
                new: n,
                samples: r.prefilled() || r.cached + n >= r.prompt,
            });
        }
        now += cost.step(&batch).total();
        steps += 1;

        // Apply the step: tokens reach their clients at `now`.
        for &(i, n) in &rows {
            let r = &mut running[i];
            if r.prefilled() {
                r.generated += 1;
            } else {
                r.cached += n;
                if r.prefilled() {
                    r.generated = 1;
                    r.first = Some(now);
                }
            }
        }
        let mut k = 0;
        while k < running.len() {
            let r = &running[k];
            if r.generated >= r.output {
                let first = r.first.unwrap_or(now);
                seen[r.job] = Seen {
                    ttft: first - r.arrival,
                    e2e: now - r.arrival,
                    tokens: r.generated,
                };
                kv_used -= r.need();
                if capped {
                    free.push(now + CLIENT_TURNAROUND);
                }
                end = end.max(now);
                running.remove(k);
            } else {
                k += 1;
            }
        }
    }
    let start = times.iter().copied().fold(f64::INFINITY, f64::min);
    let seen_ok: Vec<Seen> = seen.into_iter().filter(|s| s.tokens > 0).collect();
    Replay {
        duration: if seen_ok.is_empty() {
            0.0
        } else {
            end - start.min(end)
        },
        seen: seen_ok,
        steps,
        rejected,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_model::{Efficiency, Hardware, Link, ModelConfig, ShardPlan, Topology};

    /// A device whose every step costs exactly `step` seconds plus `per_token` per token:
    /// all bandwidth, no compute, no links, so the arithmetic is checkable.
    fn flat_cost() -> CostModel {
        let config = ModelConfig::preset("gpt2-tiny").unwrap();
        let plan = ShardPlan::new(&config, 1, 1).unwrap();
        let hw = Hardware {
            name: "flat".into(),
            memory_bytes: 1 << 40,
            memory_bandwidth: 1e30,
            matrix_flops: 1e30,
            intra_node: Link {
                bandwidth: 1e30,
                latency: 0.0,
            },
            inter_node: Link {
                bandwidth: 1e30,
                latency: 0.0,
            },
            weight_bytes: 4,
            activation_bytes: 4,
            kv_bytes: 4,
            memory_fraction: 1.0,
            overlap: 1.0,
            efficiency: Efficiency {
                bandwidth: 1.0,
                compute: 1.0,
                layer_overhead: 0.0,
                step_overhead: 0.010,
                seq_overhead: 0.0,
            },
        };
        CostModel::new(&config, &plan, &hw, Topology { gpus_per_node: 1 })
    }

    fn limits() -> Limits {
        Limits {
            max_batch_tokens: 2048,
            max_batch_seqs: 64,
            kv_tokens: 1 << 20,
        }
    }

    #[test]
    fn one_client_sees_one_step_per_token() {
        let jobs = vec![
            Job {
                prompt: 8,
                output: 5
            };
            3
        ];
        let r = replay(
            &flat_cost(),
            &limits(),
            &jobs,
            &Load::Closed { concurrency: 1 },
        );
        assert_eq!(r.steps, 15);
        for s in &r.seen {
            assert!((s.ttft - 0.010).abs() < 1e-9);
            assert!((s.e2e - 0.050).abs() < 1e-9);
            assert!((s.tpot().unwrap() - 0.010).abs() < 1e-9);
        }
        // Each client waits its turnaround between requests.
        assert!((r.duration - 0.150 - 2.0 * CLIENT_TURNAROUND).abs() < 1e-9);
        assert!((r.output_throughput() - 15.0 / r.duration).abs() < 1e-9);
    }

    #[test]
    fn concurrent_clients_share_steps() {
        let jobs = vec![
            Job {
                prompt: 8,
                output: 5
            };
            8
        ];
        let r = replay(
            &flat_cost(),
            &limits(),
            &jobs,
            &Load::Closed { concurrency: 4 },
        );
        // In each wave one request starts alone (its client was first) and the other
        // three join it a step later: two waves of six steps, back to back.
        assert_eq!(r.steps, 12);
        assert!((r.duration - 0.120).abs() < 1e-6, "{}", r.duration);
    }

    #[test]
    fn long_prompts_are_chunked_under_the_token_budget() {
        let l = Limits {
            max_batch_tokens: 16,
            ..limits()
        };
        let jobs = vec![Job {
            prompt: 40,
            output: 2,
        }];
        let r = replay(&flat_cost(), &l, &jobs, &Load::Closed { concurrency: 1 });
        // Chunks of 16, 16, 8, then one decode.
        assert_eq!(r.steps, 4);
        assert!((r.seen[0].ttft - 0.030).abs() < 1e-9);
    }

    #[test]
    fn the_kv_cache_limits_the_batch_and_oversized_requests_are_rejected() {
        let l = Limits {
            kv_tokens: 30,
            ..limits()
        };
        let jobs = vec![
            Job {
                prompt: 8,
                output: 5,
            },
            Job {
                prompt: 8,
                output: 5,
            },
            Job {
                prompt: 8,
                output: 5,
            },
            Job {
                prompt: 40,
                output: 5,
            },
        ];
        let r = replay(&flat_cost(), &l, &jobs, &Load::Closed { concurrency: 4 });
        assert_eq!(r.rejected, 1);
        assert_eq!(r.seen.len(), 3);
        // Two fit at once (26 of 30 tokens), the third follows.
        assert_eq!(r.steps, 10);
    }

    #[test]
    fn open_loop_arrivals_have_the_asked_rate() {
        let t = arrivals(20_000, 50.0, 1.0, 7);
        let mean_gap = t.last().unwrap() / (t.len() - 1) as f64;
        assert!((mean_gap - 0.02).abs() < 0.001, "{mean_gap}");
        let bursty = arrivals(20_000, 50.0, 0.25, 7);
        let var = |t: &[f64]| {
            let gaps: Vec<f64> = t.windows(2).map(|w| w[1] - w[0]).collect();
            let m = gaps.iter().sum::<f64>() / gaps.len() as f64;
            gaps.iter().map(|g| (g - m).powi(2)).sum::<f64>() / gaps.len() as f64
        };
        assert!(var(&bursty) > 2.0 * var(&t));
        let jobs = vec![
            Job {
                prompt: 4,
                output: 2
            };
            10
        ];
        let load = Load::Open {
            rate: 1.0,
            burstiness: 1.0,
            concurrency: None,
            seed: 1,
        };
        let r = replay(&flat_cost(), &limits(), &jobs, &load);
        // Requests a second apart run alone: two steps each.
        assert_eq!(r.seen.len(), 10);
        assert!(r.median_ttft() < 0.02);
    }
}
