//! The coordinator's configuration: a TOML file (`cluster/*.toml`), command-line flags on
//! top, and the defaults in one place.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use tessera_tls::{ClusterTlsFiles, ServerTlsFiles};

use crate::error::StartError;

/// Defaults of every tunable, in one place.
pub mod defaults {
    /// Address of the public gRPC API and of worker registration.
    pub const LISTEN: &str = "0.0.0.0:50051";
    /// Address of the OpenAI-compatible HTTP API of `tessera serve`.
    pub const SERVE_HTTP_LISTEN: &str = "127.0.0.1:8000";
    /// Address of worker registration when the cluster has a CA (mutual TLS) and no
    /// `cluster_listen` says otherwise.
    pub const CLUSTER_LISTEN: &str = "0.0.0.0:50052";
    /// Address of worker registration of `tessera serve` when the cluster has a CA: its
    /// workers run on this machine.
    pub const SERVE_CLUSTER_LISTEN: &str = "127.0.0.1:0";
    /// Weight storage dtype.
    pub const DTYPE: &str = "f32";
    /// Tokens per KV-cache block.
    pub const KV_BLOCK_TOKENS: usize = 16;
    /// Tokens per KV-cache block at most: the largest block a worker accepts.
    pub const MAX_KV_BLOCK_TOKENS: usize = 1 << 16;
    /// Share of the memory a machine has available when its workers register that its
    /// workers' weights and KV caches may take together (unless `kv_cache_bytes` is set).
    pub const KV_MEMORY_FRACTION: f64 = 0.5;
    /// Sequences in one step at most.
    pub const MAX_BATCH_SEQS: usize = 64;
    /// New tokens in one step at most (prefill chunks and decodes together): prompts
    /// longer than what is left after the decodes are prefilled in chunks across steps.
    pub const MAX_BATCH_TOKENS: usize = 2048;
    /// Requests waiting for a place in the batch at most; beyond, RESOURCE_EXHAUSTED.
    pub const MAX_QUEUED: usize = 256;
    /// A worker that does not answer a health check this long has failed.
    pub const WORKER_TIMEOUT_MS: u64 = 5_000;
    /// How often every worker's health is checked.
    pub const HEARTBEAT_MS: u64 = 1_000;
    /// After a worker is lost, how long its requests wait for a replacement to take over
    /// its shard before they end with UNAVAILABLE (the cluster keeps waiting after that).
    pub const RECOVERY_TIMEOUT_MS: u64 = 60_000;
    /// How long bring-up waits for every worker to register.
    pub const REGISTER_TIMEOUT_MS: u64 = 300_000;
    /// How long workers wait for their collective peers during bring-up.
    pub const CONNECT_TIMEOUT_MS: u64 = 30_000;
    /// Once formed, how long one collective read or write may wait on a peer: above the
    /// slowest step. A hung worker is found sooner by the health checks.
    pub const COLLECTIVE_IO_TIMEOUT_MS: u64 = 600_000;
    /// Largest prompt text accepted (and text to `Tokenize`), in bytes.
    pub const MAX_PROMPT_BYTES: usize = 1 << 20;
    /// Most prompt token ids accepted, whatever the model's context (which usually refuses
    /// far fewer, with its own error): it bounds the work and memory of a request before
    /// the model is consulted.
    pub const MAX_PROMPT_TOKENS: usize = 1 << 20;
    /// Largest gRPC message accepted, in bytes (above the prompt limits so an oversized
    /// prompt gets a precise error naming the field).
    pub const MAX_MESSAGE_BYTES: usize = 16 << 20;
    /// Largest HTTP request body accepted, in bytes (room for the largest prompt written
    /// as JSON escapes or as a token-id array).
    pub const MAX_HTTP_BODY_BYTES: usize = 16 << 20;
    /// Largest header block of an HTTP/1 request, in bytes (beyond it, 431). HTTP/2 header
    /// lists, on both listeners, keep hyper's limit of 16 KiB.
    pub const MAX_HTTP_HEADER_BYTES: usize = 64 << 10;
    /// How long an HTTP client may take to send a request's headers, and then its body:
    /// a client that sends too slowly, or stops halfway, does not hold a connection and
    /// a task for ever.
    pub const HTTP_READ_TIMEOUT_MS: u64 = 30_000;
    /// Stop strings per request at most.
    pub const MAX_STOP_STRINGS: usize = 16;
    /// Bytes of one stop string at most.
    pub const MAX_STOP_BYTES: usize = 256;
}

/// Where the weights come from.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// A Hugging Face checkpoint directory, at the same path on every worker.
    pub path: Option<PathBuf>,
    /// A preset with synthetic weights (when `path` is absent).
    pub preset: Option<String>,
    /// Seed of the synthetic weights.
    #[serde(default)]
    pub synthetic_seed: u64,
    /// Storage dtype of the weight matrices: f32 or bf16, or f16 (cuda workers only).
    pub dtype: Option<String>,
}

/// The `[cluster]` section.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    pub tp: Option<usize>,
    pub pp: Option<usize>,
    pub listen: Option<String>,
    pub http_listen: Option<String>,
    pub worker_timeout_ms: Option<u64>,
    pub recovery_timeout_ms: Option<u64>,
    pub register_timeout_ms: Option<u64>,
    /// Keys the public APIs require (one per line); none: the APIs are open.
    pub api_key_file: Option<PathBuf>,
    pub http_read_timeout_ms: Option<u64>,
    /// Where workers register, when not on `listen`.
    pub cluster_listen: Option<String>,
    /// The public API's certificate and key (PEM): gRPC and HTTP then speak TLS.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// The cluster CA and this coordinator's certificate and key (PEM): mutual TLS with
    /// the workers.
    pub cluster_ca: Option<PathBuf>,
    pub cluster_cert: Option<PathBuf>,
    pub cluster_key: Option<PathBuf>,
}

/// The `[scheduler]` section.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulerSection {
    pub kv_block_tokens: Option<usize>,
    pub kv_cache_bytes: Option<u64>,
    pub kv_memory_fraction: Option<f64>,
    pub max_batch_seqs: Option<usize>,
    pub max_batch_tokens: Option<usize>,
    pub max_queued: Option<usize>,
}

/// A cluster config file as written.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub model: ModelSection,
    #[serde(default)]
    pub cluster: ClusterSection,
    #[serde(default)]
    pub scheduler: SchedulerSection,
}

impl ConfigFile {
    /// Reads and parses a TOML cluster config; errors name the file and the field.
    pub fn load(path: &Path) -> Result<Self, StartError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| StartError::Config(format!("{}: {e}", path.display())))?;
        Self::parse(&text).map_err(|e| StartError::Config(format!("{}: {e}", path.display())))
    }

    /// Parses a TOML cluster config.
    pub fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }
}

/// The model a cluster serves.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    /// A checkpoint directory, at the same path on every worker.
    Checkpoint(PathBuf),
    /// A preset with synthetic weights.
    Synthetic { preset: String, seed: u64 },
}

/// Everything the coordinator runs with, defaults filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct CoordinatorConfig {
    pub model: ModelSource,
    pub dtype: String,
    pub tp: usize,
    pub pp: usize,
    pub listen: String,
    /// Address of the OpenAI-compatible HTTP API; none when absent.
    pub http_listen: Option<String>,
    pub kv_block_tokens: usize,
    /// KV-cache bytes on each worker; `None`: from `kv_memory_fraction`.
    pub kv_cache_bytes: Option<u64>,
    /// Share of each machine's available memory for its workers' weights and KV caches.
    pub kv_memory_fraction: f64,
    pub max_batch_seqs: usize,
    pub max_batch_tokens: usize,
    pub max_queued: usize,
    pub worker_timeout: Duration,
    pub recovery_timeout: Duration,
    pub heartbeat: Duration,
    pub register_timeout: Duration,
    pub connect_timeout: Duration,
    /// A file of API keys the public gRPC and HTTP APIs require; `None`: they are open.
    /// Read when the coordinator starts (see [`crate::auth::ApiKeys::load`]).
    pub api_key_file: Option<PathBuf>,
    /// How long an HTTP client may take to send a request's headers, and then its body.
    pub http_read_timeout: Duration,
    /// Where workers register: `None` shares `listen` with the public API, unless the
    /// cluster has a CA, which moves it to [`defaults::CLUSTER_LISTEN`].
    pub cluster_listen: Option<String>,
    /// TLS of the public gRPC and HTTP APIs; plaintext when absent.
    pub tls: Option<ServerTlsFiles>,
    /// Mutual TLS with the workers; plaintext when absent.
    pub cluster_tls: Option<ClusterTlsFiles>,
}

impl CoordinatorConfig {
    /// A config for `model` with every other field at its default.
    pub fn new(model: ModelSource) -> Self {
        CoordinatorConfig {
            model,
            dtype: defaults::DTYPE.into(),
            tp: 1,
            pp: 1,
            listen: defaults::LISTEN.into(),
            http_listen: None,
            kv_block_tokens: defaults::KV_BLOCK_TOKENS,
            kv_cache_bytes: None,
            kv_memory_fraction: defaults::KV_MEMORY_FRACTION,
            max_batch_seqs: defaults::MAX_BATCH_SEQS,
            max_batch_tokens: defaults::MAX_BATCH_TOKENS,
            max_queued: defaults::MAX_QUEUED,
            worker_timeout: Duration::from_millis(defaults::WORKER_TIMEOUT_MS),
            recovery_timeout: Duration::from_millis(defaults::RECOVERY_TIMEOUT_MS),
            heartbeat: Duration::from_millis(defaults::HEARTBEAT_MS),
            register_timeout: Duration::from_millis(defaults::REGISTER_TIMEOUT_MS),
            connect_timeout: Duration::from_millis(defaults::CONNECT_TIMEOUT_MS),
            api_key_file: None,
            http_read_timeout: Duration::from_millis(defaults::HTTP_READ_TIMEOUT_MS),
            cluster_listen: None,
            tls: None,
            cluster_tls: None,
        }
    }

    /// Where workers register, or `None` when they register on `listen`, next to the
    /// public API.
    ///
    /// With a cluster CA, registration always has a listener of its own, which requires a
    /// client certificate the CA signed. The public API cannot require one (its clients
    /// have none), and asking for certificates optionally on a shared listener would leave
    /// every RPC of the `Cluster` service to check the caller itself; on a listener of its
    /// own, a caller without a member's certificate never gets past the handshake.
    pub fn registration_listen(&self) -> Option<&str> {
        match (&self.cluster_listen, &self.cluster_tls) {
            (Some(at), _) => Some(at),
            (None, Some(_)) => Some(defaults::CLUSTER_LISTEN),
            (None, None) => None,
        }
    }

    /// The config a file describes, defaults filled in.
    pub fn from_file(file: &ConfigFile) -> Result<Self, StartError> {
        let model = match (&file.model.path, &file.model.preset) {
            (Some(p), None) => ModelSource::Checkpoint(p.clone()),
            (None, Some(name)) => ModelSource::Synthetic {
                preset: name.clone(),
                seed: file.model.synthetic_seed,
            },
            (Some(_), Some(_)) => {
                return Err(StartError::Config(
                    "model: give `path` or `preset`, not both".into(),
                ))
            }
            (None, None) => {
                return Err(StartError::Config(
                    "model: give `path` (a checkpoint directory) or `preset`".into(),
                ))
            }
        };
        let mut c = CoordinatorConfig::new(model);
        let (cl, s) = (&file.cluster, &file.scheduler);
        if let Some(d) = &file.model.dtype {
            c.dtype = d.clone();
        }
        c.tp = cl.tp.unwrap_or(c.tp);
        c.pp = cl.pp.unwrap_or(c.pp);
        if let Some(l) = &cl.listen {
            c.listen = l.clone();
        }
        if let Some(l) = &cl.http_listen {
            c.http_listen = Some(l.clone());
        }
        if let Some(ms) = cl.worker_timeout_ms {
            c.worker_timeout = Duration::from_millis(ms);
        }
        if let Some(ms) = cl.recovery_timeout_ms {
            c.recovery_timeout = Duration::from_millis(ms);
        }
        if let Some(ms) = cl.register_timeout_ms {
            c.register_timeout = Duration::from_millis(ms);
        }
        if let Some(f) = &cl.api_key_file {
            c.api_key_file = Some(f.clone());
        }
        if let Some(ms) = cl.http_read_timeout_ms {
            c.http_read_timeout = Duration::from_millis(ms);
        }
        if let Some(l) = &cl.cluster_listen {
            c.cluster_listen = Some(l.clone());
        }
        c.tls = match (&cl.tls_cert, &cl.tls_key) {
            (Some(cert), Some(key)) => Some(ServerTlsFiles {
                cert: cert.clone(),
                key: key.clone(),
            }),
            (None, None) => None,
            _ => {
                return Err(StartError::Config(
                    "cluster: give `tls_cert` and `tls_key` together".into(),
                ))
            }
        };
        c.cluster_tls = match (&cl.cluster_ca, &cl.cluster_cert, &cl.cluster_key) {
            (Some(ca), Some(cert), Some(key)) => Some(ClusterTlsFiles {
                ca: ca.clone(),
                cert: cert.clone(),
                key: key.clone(),
            }),
            (None, None, None) => None,
            _ => {
                return Err(StartError::Config(
                    "cluster: give `cluster_ca`, `cluster_cert` and `cluster_key` together".into(),
                ))
            }
        };
        c.kv_block_tokens = s.kv_block_tokens.unwrap_or(c.kv_block_tokens);
        c.kv_cache_bytes = s.kv_cache_bytes.or(c.kv_cache_bytes);
        c.kv_memory_fraction = s.kv_memory_fraction.unwrap_or(c.kv_memory_fraction);
        c.max_batch_seqs = s.max_batch_seqs.unwrap_or(c.max_batch_seqs);
        c.max_batch_tokens = s.max_batch_tokens.unwrap_or(c.max_batch_tokens);
        c.max_queued = s.max_queued.unwrap_or(c.max_queued);
        Ok(c)
    }

    /// Checks the values that are wrong whatever the model; the model-dependent checks
    /// (the split, the context) happen at bring-up.
    pub fn validate(&self) -> Result<(), StartError> {
        let bad = |field: &str, why: &str| Err(StartError::Config(format!("{field}: {why}")));
        if self.tp == 0 {
            return bad("tp", "must be at least 1");
        }
        if self.pp == 0 {
            return bad("pp", "must be at least 1");
        }
        if self.kv_block_tokens == 0 || self.kv_block_tokens > defaults::MAX_KV_BLOCK_TOKENS {
            return bad(
                "kv_block_tokens",
                &format!("must be in 1..={}", defaults::MAX_KV_BLOCK_TOKENS),
            );
        }
        if !(self.kv_memory_fraction > 0.0 && self.kv_memory_fraction <= 1.0) {
            return bad("kv_memory_fraction", "must be in (0, 1]");
        }
        if self.kv_cache_bytes == Some(0) {
            return bad("kv_cache_bytes", "must be above 0");
        }
        if self.max_batch_seqs == 0 {
            return bad("max_batch_seqs", "must be at least 1");
        }
        if self.max_batch_tokens == 0 {
            return bad("max_batch_tokens", "must be at least 1");
        }
        if !matches!(self.dtype.as_str(), "f32" | "bf16" | "f16") {
            return bad(
                "dtype",
                "must be f32, bf16 or f16 (f16 on cuda workers only)",
            );
        }
        if self.worker_timeout.is_zero() {
            return bad("worker_timeout_ms", "must be above 0");
        }
        if self.recovery_timeout.is_zero() {
            return bad("recovery_timeout_ms", "must be above 0");
        }
        if self.http_read_timeout.is_zero() {
            return bad("http_read_timeout_ms", "must be above 0");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_configs_parse() {
        for name in ["local-tp2-pp2.toml", "gpt3-175b-2x8.toml"] {
            let path = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../cluster")
                .join(name);
            let file = ConfigFile::load(&path).unwrap();
            let c = CoordinatorConfig::from_file(&file).unwrap();
            c.validate().unwrap();
        }
    }

    #[test]
    fn unknown_fields_and_bad_values_are_named() {
        let e = ConfigFile::parse("[model]\npreset = \"gpt2\"\n[cluster]\ntpp = 2\n").unwrap_err();
        assert!(e.contains("tpp"), "{e}");
        let file = ConfigFile::parse("[model]\npreset = \"gpt2\"\n[cluster]\ntp = 0\n").unwrap();
        let e = CoordinatorConfig::from_file(&file)
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("tp"), "{e}");
        let file = ConfigFile::parse("[model]\n").unwrap();
        assert!(CoordinatorConfig::from_file(&file).is_err());
        let file = ConfigFile::parse(
            "[model]\npreset = \"gpt2\"\n[cluster]\ncluster_ca = \"ca.pem\"\ncluster_cert = \"n.pem\"\n",
        )
        .unwrap();
        let e = CoordinatorConfig::from_file(&file).unwrap_err();
        assert!(e.to_string().contains("cluster_key"), "{e}");
    }

    #[test]
    fn a_cluster_ca_moves_registration_to_a_listener_of_its_own() {
        let file = ConfigFile::parse(
            "[model]\npreset = \"gpt2\"\n[cluster]\ntls_cert = \"s.pem\"\ntls_key = \"s-key.pem\"\n",
        )
        .unwrap();
        let c = CoordinatorConfig::from_file(&file).unwrap();
        assert!(c.tls.is_some());
        assert_eq!(
            c.registration_listen(),
            None,
            "public TLS alone shares the listener"
        );
        let file = ConfigFile::parse(
            "[model]\npreset = \"gpt2\"\n[cluster]\ncluster_ca = \"ca.pem\"\n\
             cluster_cert = \"n.pem\"\ncluster_key = \"n-key.pem\"\n",
        )
        .unwrap();
        let mut c = CoordinatorConfig::from_file(&file).unwrap();
        assert_eq!(c.registration_listen(), Some(defaults::CLUSTER_LISTEN));
        c.cluster_listen = Some("10.0.0.1:7000".into());
        assert_eq!(c.registration_listen(), Some("10.0.0.1:7000"));
    }

    #[test]
    fn the_cluster_section_names_the_api_key_file_and_the_read_timeout() {
        let file = ConfigFile::parse(
            "[model]\npreset = \"gpt2\"\n[cluster]\napi_key_file = \"/etc/tessera/keys\"\n\
             http_read_timeout_ms = 5000\n",
        )
        .unwrap();
        let c = CoordinatorConfig::from_file(&file).unwrap();
        assert_eq!(c.api_key_file, Some(PathBuf::from("/etc/tessera/keys")));
        assert_eq!(c.http_read_timeout, Duration::from_secs(5));
        c.validate().unwrap();
        let file = ConfigFile::parse("[model]\npreset = \"gpt2\"\n").unwrap();
        let c = CoordinatorConfig::from_file(&file).unwrap();
        assert_eq!(c.api_key_file, None, "open unless a key file is named");
    }

    #[test]
    fn blocks_past_what_workers_accept_are_refused() {
        let with_block = |tokens: usize| {
            let text =
                format!("[model]\npreset = \"gpt2\"\n[scheduler]\nkv_block_tokens = {tokens}\n");
            CoordinatorConfig::from_file(&ConfigFile::parse(&text).unwrap())
                .unwrap()
                .validate()
        };
        with_block(defaults::MAX_KV_BLOCK_TOKENS).unwrap();
        for tokens in [defaults::MAX_KV_BLOCK_TOKENS + 1, i64::MAX as usize] {
            let e = with_block(tokens).unwrap_err().to_string();
            assert!(e.contains("kv_block_tokens"), "{e}");
        }
    }
}
