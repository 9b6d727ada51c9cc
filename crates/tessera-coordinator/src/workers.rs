//! Clients of the workers: one [`WorkerClient`] per worker and a [`ShardedClient`] that
//! fans a call out to all of them (every step goes to every worker).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures::future::join_all;
use tessera_model::ShardSpec;
use tessera_proto::worker::v1 as pb;
use tessera_proto::worker::v1::worker_client::WorkerClient as RawClient;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Status};

use crate::config::defaults;
use crate::membership::Registered;

/// The id of the warm-up step that ends every bring-up; the scheduler's first step
/// follows it.
pub const WARM_UP_STEP_ID: u64 = 1;

/// One worker: its shard and a channel to its `Worker` service.
#[derive(Clone)]
pub struct WorkerClient {
    /// How it registered.
    pub registered: Registered,
    /// The shard it holds.
    pub spec: ShardSpec,
    /// Where its `Worker` service listens.
    pub address: SocketAddr,
    /// Its backend.
    pub backend: String,
    /// Bytes of weight matrices it loaded.
    pub weight_bytes: u64,
    client: RawClient<Channel>,
}

impl WorkerClient {
    /// A lazily connected client of `w`, which holds `spec`; over mutual TLS when `tls`
    /// is given (the cluster's, from [`ClusterTls::client_tls`](tessera_tls::ClusterTls::client_tls)).
    pub fn new(
        w: &Registered,
        spec: ShardSpec,
        tls: Option<&ClientTlsConfig>,
    ) -> Result<Self, String> {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{}", w.address))
            .map_err(|e| format!("worker address {}: {e}", w.address))?;
        if let Some(tls) = tls {
            endpoint = endpoint
                .tls_config(tls.clone())
                .map_err(|e| format!("TLS to the worker at {}: {e}", w.address))?;
        }
        let endpoint = endpoint
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10));
        let client = RawClient::new(endpoint.connect_lazy())
            .max_decoding_message_size(defaults::MAX_MESSAGE_BYTES * 4)
            .max_encoding_message_size(defaults::MAX_MESSAGE_BYTES * 4);
        Ok(WorkerClient {
            registered: w.clone(),
            spec,
            address: w.address,
            backend: w.backend.clone(),
            weight_bytes: 0,
            client,
        })
    }

    /// How errors name this worker: `worker 3 (stage 1, tp rank 1, 10.0.0.4:7001)`.
    pub fn name(&self) -> String {
        format!(
            "worker {} (stage {}, tp rank {}, {})",
            self.spec.worker, self.spec.stage, self.spec.tp_rank, self.address
        )
    }

    /// The raw gRPC client.
    pub fn raw(&self) -> RawClient<Channel> {
        self.client.clone()
    }

    /// Asks for the worker's health, giving up after `timeout`: `Err` when it does not
    /// answer, else its answer, whatever state it reports.
    pub async fn probe(
        &self,
        generation: u64,
        timeout: Duration,
    ) -> Result<pb::HealthResponse, String> {
        let mut c = self.client.clone();
        let mut req = tonic::Request::new(pb::HealthRequest { generation });
        // The server-side deadline is a little later than ours, so the message is ours.
        req.set_timeout(timeout + Duration::from_millis(500));
        match tokio::time::timeout(timeout, c.health(req)).await {
            Err(_) => Err(format!(
                "{} did not answer a health check within {} ms",
                self.name(),
                timeout.as_millis()
            )),
            Ok(Err(s)) => Err(format!("{}: {}", self.name(), describe(&s))),
            Ok(Ok(r)) => Ok(r.into_inner()),
        }
    }
}

/// A status as a short phrase for messages; a failed TLS handshake says what was refused.
pub fn describe(s: &Status) -> String {
    if let Some(failure) = tessera_tls::HandshakeFailure::find(s) {
        return format!("{:?}: {}", s.code(), failure.describe("the worker"));
    }
    if s.message().is_empty() {
        format!("{:?}", s.code())
    } else {
        format!("{:?}: {}", s.code(), s.message())
    }
}

/// Every worker of the cluster, in plan order.
#[derive(Clone)]
pub struct ShardedClient {
    /// The workers, ordered by `(stage, tp_rank)`.
    pub workers: Vec<WorkerClient>,
    generation: u64,
}

/// What one step gave back.
pub struct StepReply {
    /// The sampled tokens, from the worker that reports them.
    pub results: Vec<pb::SeqResult>,
    /// Each worker's compute time, in plan order.
    pub compute: Vec<Duration>,
    /// Wall time of the whole fan-out.
    pub wall: Duration,
}

impl StepReply {
    /// The longest compute time any worker reported.
    pub fn max_compute(&self) -> Duration {
        self.compute.iter().copied().max().unwrap_or_default()
    }
}

/// A failed step: the message names the worker to blame, and `invalid` tells a request
/// that the workers refused (nothing changed) from a broken cluster.
#[derive(Debug, Clone)]
pub struct StepFailure {
    pub message: String,
    pub invalid: bool,
}

impl ShardedClient {
    /// The cluster's workers for generation `generation`.
    pub fn new(workers: Vec<WorkerClient>, generation: u64) -> Self {
        ShardedClient {
            workers,
            generation,
        }
    }

    /// The cluster generation.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Calls `f` on every worker at once; the error names the first worker that failed.
    pub async fn all<T, F, Fut>(&self, what: &str, f: F) -> Result<Vec<T>, String>
    where
        F: Fn(RawClient<Channel>, &WorkerClient) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let every: Vec<usize> = (0..self.workers.len()).collect();
        self.only(what, &every, f).await
    }

    /// Calls `f` on the workers at `indices` at once; returns their answers in that
    /// order, or an error naming the first worker that failed.
    pub async fn only<T, F, Fut>(
        &self,
        what: &str,
        indices: &[usize],
        f: F,
    ) -> Result<Vec<T>, String>
    where
        F: Fn(RawClient<Channel>, &WorkerClient) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let chosen: Vec<&WorkerClient> = indices.iter().map(|&i| &self.workers[i]).collect();
        let calls = chosen.iter().map(|w| f(w.raw(), w));
        let results = join_all(calls).await;
        let mut out = Vec::with_capacity(results.len());
        for (w, r) in chosen.iter().zip(results) {
            match r {
                Ok(r) => out.push(r.into_inner()),
                Err(s) => return Err(format!("{what} on {}: {}", w.name(), describe(&s))),
            }
        }
        Ok(out)
    }

    /// Sends one step to every worker and waits for all of them.
    pub async fn step(&self, step: pb::StepRequest) -> Result<StepReply, StepFailure> {
        let start = Instant::now();
        let calls = self.workers.iter().map(|w| {
            let mut c = w.raw();
            let req = step.clone();
            async move { c.step(req).await }
        });
        let results = join_all(calls).await;
        let wall = start.elapsed();
        let mut reply = StepReply {
            results: Vec::new(),
            compute: Vec::with_capacity(self.workers.len()),
            wall,
        };
        let mut failed = Vec::new();
        let mut reported = false;
        for (i, r) in results.into_iter().enumerate() {
            match r {
                Ok(r) => {
                    let r = r.into_inner();
                    reply.compute.push(Duration::from_micros(r.compute_us));
                    if r.reports {
                        reported = true;
                        reply.results = r.results;
                    }
                }
                Err(s) => {
                    reply.compute.push(Duration::ZERO);
                    failed.push((i, s))
                }
            }
        }
        if failed.is_empty() {
            if !reported {
                return Err(StepFailure {
                    message: "no worker reported the step's tokens".into(),
                    invalid: false,
                });
            }
            return Ok(reply);
        }
        if failed
            .iter()
            .all(|(_, s)| s.code() == Code::InvalidArgument)
        {
            let (i, s) = &failed[0];
            return Err(StepFailure {
                message: format!(
                    "{} refused the step: {}",
                    self.workers[*i].name(),
                    s.message()
                ),
                invalid: true,
            });
        }
        Err(StepFailure {
            message: self.blame(&failed).await,
            invalid: false,
        })
    }

    /// Names the worker behind a failed step. When one worker dies its peers fail too
    /// (their collectives lose a member), so the dead one is found by asking every worker
    /// that failed for its health: the one that cannot answer is to blame.
    async fn blame(&self, failed: &[(usize, Status)]) -> String {
        let probes = failed
            .iter()
            .map(|(i, _)| self.workers[*i].probe(self.generation, Duration::from_millis(1000)));
        let answers = join_all(probes).await;
        for ((i, s), a) in failed.iter().zip(&answers) {
            if let Err(probe) = a {
                return format!(
                    "{} is unreachable (step: {}; health: {probe})",
                    self.workers[*i].name(),
                    describe(s)
                );
            }
        }
        let (i, s) = &failed[0];
        format!(
            "{} failed the step: {}",
            self.workers[*i].name(),
            describe(s)
        )
    }

    /// Checks every worker's health at once. The error names a worker that did not
    /// answer, if any did not (its peers report failures of their own when it dies), else
    /// the first that reports a failure.
    pub async fn health(&self, timeout: Duration) -> Result<(), String> {
        let probes = self
            .workers
            .iter()
            .map(|w| w.probe(self.generation, timeout));
        let answers = join_all(probes).await;
        let mut reported = None;
        for (w, a) in self.workers.iter().zip(answers) {
            match a {
                Err(silent) => return Err(silent),
                Ok(h) if h.state == pb::WorkerState::Failed as i32 => {
                    reported
                        .get_or_insert_with(|| format!("{} has failed: {}", w.name(), h.message));
                }
                Ok(_) => {}
            }
        }
        reported.map_or(Ok(()), Err)
    }

    /// The workers that do not answer a health check within `timeout` (in plan order):
    /// those to take out of the cluster after a failure. A worker that answers is alive,
    /// whatever state it reports; its peers fail their steps when one of them dies.
    pub async fn unreachable(&self, timeout: Duration) -> Vec<usize> {
        let probes = self
            .workers
            .iter()
            .map(|w| w.probe(self.generation, timeout));
        let answers = join_all(probes).await;
        answers
            .iter()
            .enumerate()
            .filter_map(|(i, a)| a.is_err().then_some(i))
            .collect()
    }

    /// Asks every worker to drop its shard, or with `keep_weights` to keep it loaded for
    /// the same assignment; errors are ignored (the worker may be gone).
    pub async fn release(&self, keep_weights: bool) {
        self.release_only(&(0..self.workers.len()).collect::<Vec<_>>(), keep_weights)
            .await;
    }

    /// Asks the workers at `indices` to break their collectives and drop their shards, or
    /// with `keep_weights` to keep them loaded for the same assignment; errors are ignored
    /// (a worker may be gone).
    pub async fn release_only(&self, indices: &[usize], keep_weights: bool) {
        let calls = indices.iter().map(|&i| {
            let w = &self.workers[i];
            let mut c = w.raw();
            let mut req = tonic::Request::new(pb::ReleaseRequest {
                generation: self.generation,
                keep_weights,
            });
            req.set_timeout(Duration::from_secs(2));
            async move { c.release(req).await }
        });
        let _ = tokio::time::timeout(Duration::from_secs(3), join_all(calls)).await;
    }
}
