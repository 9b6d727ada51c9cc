//! The worker's one error type, and the one place that maps it to gRPC status codes.

use std::time::Duration;

use tessera_model::ModelError;
use tessera_runtime::RuntimeError;
use tonic::{Code, Status};

/// Everything that can go wrong in a worker: a refused RPC, a failed shard, or the
/// process losing its coordinator.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// A request field with an unusable value; `field` names it (`model.config.n_embd`).
    #[error("invalid {field}: {reason}")]
    InvalidArgument { field: String, reason: String },
    /// The worker has not finished registering, so it cannot check a call's generation.
    #[error("this worker has not registered with a coordinator yet")]
    NotRegistered,
    /// A call from another coordinator's cluster (or a stale one of this coordinator).
    #[error("generation {got} is not this worker's; it registered with generation {expected}")]
    StaleGeneration { got: u64, expected: u64 },
    /// A call the worker's state does not allow, e.g. `Step` before `Load`.
    #[error("{rpc} is not allowed while the worker is {state}")]
    WrongState { rpc: &'static str, state: String },
    /// A step that repeats or skips a step id.
    #[error("step {got} is out of order: the next step is {expected}")]
    StepOutOfOrder { got: u64, expected: u64 },
    /// The checkpoint on this machine describes another model than the one assigned.
    #[error(
        "the checkpoint's config differs from the assigned model: {field} is {checkpoint} \
         in the checkpoint, {assigned} in the assignment"
    )]
    ConfigMismatch {
        field: &'static str,
        checkpoint: String,
        assigned: String,
    },
    /// The assignment needs more memory than this machine has.
    #[error("{0}")]
    OutOfMemory(String),
    /// The coordinator asked for NCCL and this worker cannot use it: the build has no
    /// CUDA, the worker runs another backend, or libnccl is missing. The message says
    /// which and what to do.
    #[error("NCCL is not available on this worker: {0}")]
    NcclUnavailable(String),
    /// Loading the model or running a step failed in the runtime.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// Describing or reading the model failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The shard broke (a peer went away, a kernel failed); the worker is now failed and
    /// needs `Release`.
    #[error("the shard failed: {0}")]
    ShardFailed(String),
    /// A worker option that cannot work, e.g. an unknown backend.
    #[error("{0}")]
    InvalidOptions(String),
    /// The worker's gRPC listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    /// The coordinator did not answer `Register` in time.
    #[error("cannot reach the coordinator at {addr} within {} s: {last_error}", secs(*.waited))]
    CoordinatorUnreachable {
        addr: String,
        waited: Duration,
        last_error: String,
    },
    /// The coordinator answered `Register` with a refusal (e.g. the cluster is full).
    #[error("the coordinator at {addr} refused to register this worker: {message} ({code:?})")]
    RegistrationRefused {
        addr: String,
        code: Code,
        message: String,
    },
    /// The TLS handshake with the coordinator failed: a certificate was refused, or one
    /// side does not speak TLS.
    #[error("cannot register with the coordinator at {addr}: {failure}")]
    Handshake { addr: String, failure: String },
    /// A certificate or key of `--cluster-ca`, `--cluster-cert`, `--cluster-key` could not
    /// be loaded, or cannot serve.
    #[error("cluster TLS: {0}")]
    Tls(#[from] tessera_tls::TlsError),
    /// The coordinator stopped calling.
    #[error("lost the coordinator at {addr}: no contact for {} s", secs(*.silent))]
    LostCoordinator { addr: String, silent: Duration },
    /// The gRPC server failed.
    #[error("serving gRPC: {}", chain(.0))]
    Serve(#[from] tonic::transport::Error),
    /// The gRPC server's task ended on its own.
    #[error("the gRPC server stopped: {0}")]
    ServerStopped(String),
    /// A gRPC status from a peer.
    #[error(transparent)]
    Status(#[from] Status),
}

/// An error and its sources, `outer: inner: innermost` (tonic's transport errors say
/// little at the top).
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut last = out.clone();
    let mut next = e.source();
    while let Some(s) = next {
        // hyper repeats a layer's message in the layer below.
        let text = s.to_string();
        if text != last {
            out.push_str(": ");
            out.push_str(&text);
        }
        last = text;
        next = s.source();
    }
    out
}

/// Whole seconds as `15`, fractions as `0.5`.
fn secs(d: Duration) -> String {
    format!("{}", d.as_secs_f64())
}

impl WorkerError {
    /// Shorthand for [`WorkerError::InvalidArgument`].
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        WorkerError::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// The gRPC code a caller sees for this error.
    pub fn code(&self) -> Code {
        match self {
            WorkerError::InvalidArgument { .. } => Code::InvalidArgument,
            WorkerError::NotRegistered
            | WorkerError::StaleGeneration { .. }
            | WorkerError::WrongState { .. }
            | WorkerError::StepOutOfOrder { .. }
            | WorkerError::ConfigMismatch { .. }
            | WorkerError::NcclUnavailable(_) => Code::FailedPrecondition,
            WorkerError::OutOfMemory(_) => Code::ResourceExhausted,
            WorkerError::Runtime(e) => runtime_code(e),
            WorkerError::Model(e) => model_code(e),
            WorkerError::ShardFailed(_) => Code::Unavailable,
            WorkerError::InvalidOptions(_) | WorkerError::Tls(_) => Code::InvalidArgument,
            WorkerError::Handshake { .. } => Code::Unauthenticated,
            WorkerError::Listen { .. }
            | WorkerError::CoordinatorUnreachable { .. }
            | WorkerError::LostCoordinator { .. }
            | WorkerError::Serve(_)
            | WorkerError::ServerStopped(_) => Code::Unavailable,
            WorkerError::RegistrationRefused { code, .. } => *code,
            WorkerError::Status(s) => s.code(),
        }
    }

    /// Whether the error is the request's fault and leaves a ready shard able to serve
    /// the next step.
    pub fn is_request_error(&self) -> bool {
        matches!(
            self.code(),
            Code::InvalidArgument | Code::ResourceExhausted | Code::FailedPrecondition
        )
    }
}

fn runtime_code(e: &RuntimeError) -> Code {
    match e {
        RuntimeError::InvalidInput { .. } => Code::InvalidArgument,
        RuntimeError::KvExhausted { .. } => Code::ResourceExhausted,
        RuntimeError::Model(m) => model_code(m),
        RuntimeError::Collective(_)
        | RuntimeError::Backend(_)
        | RuntimeError::CudaUnavailable(_)
        | RuntimeError::KernelCompile { .. } => Code::Unavailable,
    }
}

fn model_code(e: &ModelError) -> Code {
    match e {
        ModelError::UnknownPreset { .. }
        | ModelError::InvalidConfig { .. }
        | ModelError::ImpossibleSplit { .. } => Code::InvalidArgument,
        // The files on this machine are not what the assignment needs.
        ModelError::Io { .. }
        | ModelError::Corrupt { .. }
        | ModelError::MissingTensor { .. }
        | ModelError::ShapeMismatch { .. }
        | ModelError::UnsupportedDtype { .. }
        | ModelError::Tokenizer(_) => Code::FailedPrecondition,
    }
}

impl From<WorkerError> for Status {
    fn from(e: WorkerError) -> Status {
        match e {
            WorkerError::Status(s) => s,
            e => Status::new(e.code(), e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_faults_and_shard_faults_get_different_codes() {
        let bad_token = WorkerError::from(RuntimeError::invalid("tokens", "id 99999"));
        assert_eq!(bad_token.code(), Code::InvalidArgument);
        assert!(bad_token.is_request_error());
        let peer_gone = WorkerError::from(RuntimeError::Collective("rank 1 closed".into()));
        assert_eq!(peer_gone.code(), Code::Unavailable);
        assert!(!peer_gone.is_request_error());
        let status = Status::from(WorkerError::StaleGeneration {
            got: 3,
            expected: 7,
        });
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert!(
            status.message().contains("generation 3"),
            "{}",
            status.message()
        );
    }

    #[test]
    fn lost_coordinator_names_the_address_and_the_silence() {
        let e = WorkerError::LostCoordinator {
            addr: "10.0.0.1:7000".into(),
            silent: Duration::from_secs(15),
        };
        assert_eq!(
            e.to_string(),
            "lost the coordinator at 10.0.0.1:7000: no contact for 15 s"
        );
    }
}
