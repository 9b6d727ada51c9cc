//! Flags shared by `tessera coordinator` and `tessera serve`: the model, the split, the
//! scheduler's limits and TLS. Unset flags leave the config file's value or the default.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::Args;
use tessera_coordinator::{CoordinatorConfig, ModelSource};
use tessera_tls::ServerTlsFiles;

use crate::tls_args::ClusterTlsArgs;

/// The model and the cluster's shape.
#[derive(Debug, Clone, Args)]
pub struct ClusterArgs {
    /// Hugging Face GPT-2 checkpoint directory, at the same path on every worker.
    #[arg(long, value_name = "DIR", conflicts_with = "preset")]
    pub model: Option<PathBuf>,
    /// A preset served with synthetic weights (see `tessera model list`).
    #[arg(long, value_name = "NAME")]
    pub preset: Option<String>,
    /// Seed of a preset's synthetic weights.
    #[arg(long, value_name = "S")]
    pub synth_seed: Option<u64>,
    /// Storage dtype of the weight matrices: f32 or bf16 (compute is f32 on the CPU), or
    /// bf16 or f16 on cuda workers (activations and KV cache then use the same dtype).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Tensor-parallel ranks per stage: must divide the attention heads and 4·d.
    #[arg(long)]
    pub tp: Option<usize>,
    /// Pipeline stages: at most the number of layers.
    #[arg(long)]
    pub pp: Option<usize>,
    /// Tokens per KV-cache block (default 16).
    #[arg(long, value_name = "N")]
    pub kv_block_tokens: Option<usize>,
    /// KV-cache bytes on each worker; the block count follows from it. Default: sized from
    /// --kv-memory-fraction of the memory the workers report.
    #[arg(long, value_name = "BYTES")]
    pub kv_cache_bytes: Option<u64>,
    /// Share of each machine's available memory (as its workers report it when they
    /// register) that its workers' weights and KV caches may take together (default 0.5).
    #[arg(long, value_name = "F")]
    pub kv_memory_fraction: Option<f64>,
    /// Sequences in one step at most (default 64).
    #[arg(long, value_name = "N")]
    pub max_batch_seqs: Option<usize>,
    /// New tokens in one step at most (prompts and decodes together, default 2048); longer
    /// prompts are prefilled in chunks so that running sequences keep decoding.
    #[arg(long, value_name = "N")]
    pub max_batch_tokens: Option<usize>,
    /// Requests waiting for the batch at most (default 256); beyond it they get
    /// RESOURCE_EXHAUSTED (HTTP 429).
    #[arg(long, value_name = "N")]
    pub max_queued: Option<usize>,
    /// Address of the OpenAI-compatible HTTP API (POST /v1/completions, GET /v1/models,
    /// /health, /metrics). `serve` listens on 127.0.0.1:8000 unless told otherwise;
    /// `coordinator` only when given.
    #[arg(long, value_name = "HOST:PORT")]
    pub http_listen: Option<String>,
    /// Milliseconds a worker may go without answering a health check before it is
    /// declared failed (default 5000).
    #[arg(long, value_name = "MS")]
    pub worker_timeout_ms: Option<u64>,
    /// Milliseconds the requests of a lost worker wait for a replacement to take over its
    /// shard (their sequences are then prefilled again and go on) before they end with
    /// UNAVAILABLE (default 60000). The cluster keeps waiting for a replacement after that.
    #[arg(long, value_name = "MS")]
    pub recovery_timeout_ms: Option<u64>,
    /// Require an API key on the public APIs: FILE holds the accepted keys, one per line
    /// (blank lines and `#` comments ignored). gRPC clients send metadata
    /// `authorization: Bearer KEY`, HTTP clients the header `Authorization: Bearer KEY`
    /// on /v1/*. Health (gRPC and /health), /metrics, reflection and worker registration
    /// stay open. Default: no keys, the APIs are open.
    #[arg(long, value_name = "FILE")]
    pub api_key_file: Option<PathBuf>,
    /// Milliseconds an HTTP client may take to send a request's headers, and then its
    /// body, before the connection is closed (408 for a late body); also closes idle
    /// keep-alive connections (default 30000).
    #[arg(long, value_name = "MS")]
    pub http_read_timeout_ms: Option<u64>,
    /// The public API's TLS certificate (PEM, leaf first): the gRPC and HTTP APIs then
    /// speak TLS only (https://). Needs --tls-key.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    #[command(flatten)]
    pub cluster_tls: ClusterTlsArgs,
    /// Where workers register, on a listener of its own. Without it workers register on
    /// the gRPC API's listener, unless --cluster-ca is given: then on 0.0.0.0:50052
    /// (`coordinator`) or a free port of 127.0.0.1 (`serve`).
    #[arg(long, value_name = "HOST:PORT")]
    pub cluster_listen: Option<String>,
}

impl ClusterArgs {
    /// The model these flags name, if they name one.
    pub fn model_source(&self) -> Option<ModelSource> {
        if let Some(dir) = &self.model {
            return Some(ModelSource::Checkpoint(dir.clone()));
        }
        self.preset.as_ref().map(|p| ModelSource::Synthetic {
            preset: p.clone(),
            seed: self.synth_seed.unwrap_or(0),
        })
    }

    /// Applies every flag that was given on top of `c`.
    pub fn apply(&self, c: &mut CoordinatorConfig) -> Result<()> {
        if let Some(m) = self.model_source() {
            c.model = m;
        } else if let Some(seed) = self.synth_seed {
            match &mut c.model {
                ModelSource::Synthetic { seed: s, .. } => *s = seed,
                ModelSource::Checkpoint(_) => {
                    bail!("--synth-seed applies to a preset, not to a checkpoint")
                }
            }
        }
        if let Some(v) = &self.dtype {
            c.dtype = v.clone();
        }
        if let Some(v) = self.tp {
            c.tp = v;
        }
        if let Some(v) = self.pp {
            c.pp = v;
        }
        if let Some(v) = self.kv_block_tokens {
            c.kv_block_tokens = v;
        }
        if let Some(v) = self.kv_cache_bytes {
            c.kv_cache_bytes = Some(v);
        }
        if let Some(v) = self.kv_memory_fraction {
            c.kv_memory_fraction = v;
        }
        if let Some(v) = self.max_batch_seqs {
            c.max_batch_seqs = v;
        }
        if let Some(v) = self.max_batch_tokens {
            c.max_batch_tokens = v;
        }
        if let Some(v) = self.max_queued {
            c.max_queued = v;
        }
        if let Some(v) = &self.http_listen {
            c.http_listen = Some(v.clone());
        }
        if let Some(v) = self.worker_timeout_ms {
            c.worker_timeout = Duration::from_millis(v);
        }
        if let Some(v) = self.recovery_timeout_ms {
            c.recovery_timeout = Duration::from_millis(v);
        }
        if let Some(v) = &self.api_key_file {
            c.api_key_file = Some(v.clone());
        }
        if let Some(v) = self.http_read_timeout_ms {
            c.http_read_timeout = Duration::from_millis(v);
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            c.tls = Some(ServerTlsFiles {
                cert: cert.clone(),
                key: key.clone(),
            });
        }
        if let Some(files) = self.cluster_tls.files() {
            c.cluster_tls = Some(files);
        }
        if let Some(v) = &self.cluster_listen {
            c.cluster_listen = Some(v.clone());
        }
        Ok(())
    }
}
