//! The public `tessera.v1.Generation` service: validation, tokenization, and the bridge
//! between a client's call and its sequence in the scheduler.

use std::pin::Pin;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, Instant};

use futures::Stream;
use tessera_model::{ModelConfig, Tokenizer};
use tessera_proto::v1::generation_server::Generation;
use tessera_proto::v1::{
    GenerateRequest, GenerateResponse, GenerateStreamResponse, ModelInfoRequest, ModelInfoResponse,
    TokenizeRequest, TokenizeResponse,
};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status};
use tracing::instrument;

use crate::config::defaults;
use crate::error::CoordinatorError;
use crate::scheduler::{EventRx, GenerationParams, SchedulerHandle};
use crate::state::{ClusterState, StateRx};

/// New tokens when a request does not say.
pub const DEFAULT_MAX_TOKENS: usize = 16;

/// The public API over a scheduler that exists once bring-up is done.
#[derive(Clone)]
pub struct GenerationService {
    config: Arc<ModelConfig>,
    tokenizer: Arc<Tokenizer>,
    scheduler: Arc<OnceLock<SchedulerHandle>>,
    info: Arc<RwLock<Option<ModelInfoResponse>>>,
    state: StateRx,
    started_unix: u64,
}

impl GenerationService {
    /// The service for `config`; requests are refused until [`GenerationService::serve`]
    /// hands it the scheduler.
    pub fn new(config: Arc<ModelConfig>, tokenizer: Arc<Tokenizer>, state: StateRx) -> Self {
        GenerationService {
            config,
            tokenizer,
            scheduler: Arc::new(OnceLock::new()),
            info: Arc::new(RwLock::new(None)),
            state,
            started_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        }
    }

    /// Starts serving with `scheduler`; `info` is what `ModelInfo` answers.
    pub fn serve(&self, scheduler: SchedulerHandle, info: ModelInfoResponse) {
        self.set_info(info);
        let _ = self.scheduler.set(scheduler);
    }

    /// Replaces what `ModelInfo` answers (the workers change when the cluster recovers).
    pub fn set_info(&self, info: ModelInfoResponse) {
        if let Ok(mut slot) = self.info.write() {
            *slot = Some(info);
        }
    }

    fn scheduler(&self) -> Result<&SchedulerHandle, CoordinatorError> {
        if let Some(e) = self.state.borrow().refusal() {
            return Err(e);
        }
        self.scheduler
            .get()
            .ok_or_else(|| CoordinatorError::Unavailable("the cluster is starting".into()))
    }

    /// Checks a request and fills in the defaults; every error names its field.
    ///
    /// A long prompt text is tokenized on the blocking pool: a MiB of text takes a
    /// tokenizer long enough to hold up every other task of the runtime, the scheduler's
    /// among them.
    pub async fn validate(
        &self,
        req: &GenerateRequest,
    ) -> Result<GenerationParams, CoordinatorError> {
        if !tokenizes_slowly(&req.prompt) {
            return validate(&self.config, &self.tokenizer, req);
        }
        let (config, tokenizer, req) = (self.config.clone(), self.tokenizer.clone(), req.clone());
        tokio::task::spawn_blocking(move || validate(&config, &tokenizer, &req))
            .await
            .map_err(|e| CoordinatorError::Internal(format!("tokenizer: {e}")))?
    }

    /// [`encode_text`], on the blocking pool for a long text (see [`Self::validate`]).
    async fn tokenize_text(&self, text: String) -> Result<Vec<u32>, CoordinatorError> {
        if !tokenizes_slowly(&text) {
            return encode_text(&self.tokenizer, "text", &text);
        }
        let tokenizer = self.tokenizer.clone();
        tokio::task::spawn_blocking(move || encode_text(&tokenizer, "text", &text))
            .await
            .map_err(|e| CoordinatorError::Internal(format!("tokenizer: {e}")))?
    }

    /// Queues a validated request with the scheduler.
    pub fn submit(&self, params: GenerationParams) -> Result<EventRx, CoordinatorError> {
        self.scheduler()?.submit(params)
    }

    /// The served model's name.
    pub fn model_name(&self) -> &str {
        &self.config.name
    }

    /// The served model's context length in tokens.
    pub fn context_length(&self) -> usize {
        self.config.n_positions
    }

    /// The tokenizer of the served model.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// When this service was made, in seconds since the Unix epoch.
    pub fn started_unix(&self) -> u64 {
        self.started_unix
    }

    /// The cluster's state now.
    pub fn cluster_state(&self) -> ClusterState {
        self.state.borrow().clone()
    }
}

/// Text shorter than this is tokenized where the request is handled (well under a
/// millisecond); longer text goes to the blocking pool.
const INLINE_TOKENIZE_BYTES: usize = 16 << 10;

/// Whether `text` goes to the blocking pool: long enough to take a while, and not so
/// long that it is refused before the tokenizer sees it.
fn tokenizes_slowly(text: &str) -> bool {
    (INLINE_TOKENIZE_BYTES..=defaults::MAX_PROMPT_BYTES).contains(&text.len())
}

/// Tokenizes client text after checking its size; errors name `field`.
fn encode_text(
    tokenizer: &Tokenizer,
    field: &'static str,
    text: &str,
) -> Result<Vec<u32>, CoordinatorError> {
    if text.len() > defaults::MAX_PROMPT_BYTES {
        return Err(CoordinatorError::out_of_range(
            field,
            format!(
                "{} bytes is over the limit of {} bytes",
                text.len(),
                defaults::MAX_PROMPT_BYTES
            ),
        ));
    }
    tokenizer
        .encode(text)
        .map_err(|e| CoordinatorError::invalid(field, e.to_string()))
}

/// The error for a prompt of `n` token ids, over [`defaults::MAX_PROMPT_TOKENS`].
pub(crate) fn too_many_prompt_tokens(n: usize) -> CoordinatorError {
    CoordinatorError::out_of_range(
        "prompt_ids",
        format!(
            "{n} token ids is over the limit of {}",
            defaults::MAX_PROMPT_TOKENS
        ),
    )
}

/// The error for `n` stop strings, over [`defaults::MAX_STOP_STRINGS`].
pub(crate) fn too_many_stop_strings(n: usize) -> CoordinatorError {
    CoordinatorError::invalid(
        "stop",
        format!(
            "{n} stop strings; at most {} are allowed",
            defaults::MAX_STOP_STRINGS
        ),
    )
}

/// Checks a request against the model and fills in the defaults.
pub fn validate(
    config: &ModelConfig,
    tokenizer: &Tokenizer,
    req: &GenerateRequest,
) -> Result<GenerationParams, CoordinatorError> {
    use CoordinatorError as E;
    let context = config.n_positions;
    let prompt_ids = match (req.prompt.is_empty(), req.prompt_ids.is_empty()) {
        (true, true) => {
            return Err(E::invalid(
                "prompt",
                "no prompt: give `prompt` (text) or `prompt_ids`",
            ))
        }
        (false, false) => {
            return Err(E::invalid(
                "prompt",
                "give `prompt` or `prompt_ids`, not both",
            ))
        }
        (false, true) => {
            let ids = encode_text(tokenizer, "prompt", &req.prompt)?;
            if ids.is_empty() {
                return Err(E::invalid("prompt", "the text has no tokens"));
            }
            ids
        }
        (true, false) => {
            if req.prompt_ids.len() > defaults::MAX_PROMPT_TOKENS {
                return Err(too_many_prompt_tokens(req.prompt_ids.len()));
            }
            if let Some((i, &bad)) = req
                .prompt_ids
                .iter()
                .enumerate()
                .find(|(_, &t)| t as usize >= config.vocab_size)
            {
                return Err(E::invalid(
                    "prompt_ids",
                    format!(
                        "token id {bad} at index {i} is not below the vocabulary size {}",
                        config.vocab_size
                    ),
                ));
            }
            req.prompt_ids.clone()
        }
    };
    let field = if req.prompt_ids.is_empty() {
        "prompt"
    } else {
        "prompt_ids"
    };
    if prompt_ids.len() >= context {
        return Err(E::out_of_range(
            field,
            format!(
                "the prompt has {} tokens; the context of {context} leaves no room to generate",
                prompt_ids.len()
            ),
        ));
    }
    let room = context - prompt_ids.len();
    let max_new = match req.max_tokens {
        None => DEFAULT_MAX_TOKENS.min(room),
        Some(0) => return Err(E::invalid("max_tokens", "must be at least 1")),
        Some(n) if n as usize > room => {
            return Err(E::out_of_range(
                "max_tokens",
                format!(
                    "{n} new tokens after a prompt of {} exceed the context of {context} (at most {room})",
                    prompt_ids.len()
                ),
            ))
        }
        Some(n) => n as usize,
    };
    let temperature = req.temperature.unwrap_or(0.0);
    if !(temperature.is_finite() && temperature >= 0.0) {
        return Err(E::invalid(
            "temperature",
            format!("{temperature} is not a number ≥ 0"),
        ));
    }
    let top_k = req.top_k.unwrap_or(0);
    if top_k as usize > config.vocab_size {
        return Err(E::invalid(
            "top_k",
            format!("{top_k} exceeds the vocabulary size {}", config.vocab_size),
        ));
    }
    let top_p = req.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(E::invalid("top_p", format!("{top_p} is not in (0, 1]")));
    }
    let repetition_penalty = req.repetition_penalty.unwrap_or(1.0);
    if !(repetition_penalty.is_finite() && repetition_penalty > 0.0) {
        return Err(E::invalid(
            "repetition_penalty",
            format!("{repetition_penalty} is not a number > 0"),
        ));
    }
    if req.stop.len() > defaults::MAX_STOP_STRINGS {
        return Err(too_many_stop_strings(req.stop.len()));
    }
    for (i, s) in req.stop.iter().enumerate() {
        if s.is_empty() {
            return Err(E::invalid("stop", format!("stop string {i} is empty")));
        }
        if s.len() > defaults::MAX_STOP_BYTES {
            return Err(E::invalid(
                "stop",
                format!(
                    "stop string {i} has {} bytes; at most {} are allowed",
                    s.len(),
                    defaults::MAX_STOP_BYTES
                ),
            ));
        }
    }
    Ok(GenerationParams {
        prompt_ids,
        max_new,
        temperature,
        top_k,
        top_p,
        seed: req.seed.unwrap_or_else(rand::random),
        repetition_penalty,
        stop: req.stop.clone(),
        ignore_eos: req.ignore_eos,
        logprobs: req.logprobs,
        deadline: None,
    })
}

/// The deadline a gRPC client set (`grpc-timeout`), a little early: the transport cancels
/// a unary call at the deadline itself, and ending it first lets the client see
/// DEADLINE_EXCEEDED with the scheduler's message rather than a bare cancellation.
fn grpc_deadline<T>(req: &Request<T>) -> Option<Instant> {
    let value = req.metadata().get("grpc-timeout")?.to_str().ok()?;
    let timeout = parse_grpc_timeout(value)?;
    let margin = (timeout / 10).min(Duration::from_millis(50));
    Some(Instant::now() + timeout - margin)
}

/// Parses a `grpc-timeout` value: at most 8 digits and a unit (H, M, S, m, u, n).
fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

type GenerateStream = Pin<Box<dyn Stream<Item = Result<GenerateStreamResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Generation for GenerationService {
    #[instrument(skip_all)]
    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<GenerateResponse>, Status> {
        let mut params = self.validate(request.get_ref()).await?;
        let deadline = grpc_deadline(&request);
        params.deadline = deadline;
        let mut events = self.scheduler()?.submit(params)?;
        let mut out = GenerateResponse::default();
        // The scheduler ends a request between steps; the answer must not wait for a step
        // that ends past the deadline (dropping `events` cancels the sequence).
        let far = Instant::now() + Duration::from_secs(365 * 24 * 3600);
        let until = tokio::time::Instant::from_std(deadline.unwrap_or(far));
        loop {
            let msg = match tokio::time::timeout_at(until, events.recv()).await {
                Ok(Some(msg)) => msg,
                Ok(None) => break,
                Err(_) => {
                    return Err(CoordinatorError::DeadlineExceeded(format!(
                        "deadline: the request's deadline passed after {} new tokens",
                        out.token_ids.len()
                    ))
                    .into())
                }
            };
            let m = msg?;
            out.token_ids.extend(m.token_ids);
            out.logprobs.extend(m.logprobs);
            out.text.push_str(&m.text);
            if m.finish_reason != 0 {
                out.finish_reason = m.finish_reason;
                out.matched_stop = m.matched_stop;
                out.prompt_tokens = m.prompt_tokens;
                out.completion_tokens = m.completion_tokens;
                out.seed = m.seed;
                return Ok(Response::new(out));
            }
        }
        Err(CoordinatorError::Internal("the sequence ended without a finish reason".into()).into())
    }

    type GenerateStreamStream = GenerateStream;

    #[instrument(skip_all)]
    async fn generate_stream(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<Self::GenerateStreamStream>, Status> {
        let mut params = self.validate(request.get_ref()).await?;
        params.deadline = grpc_deadline(&request);
        let events = self.scheduler()?.submit(params)?;
        Ok(Response::new(Box::pin(UnboundedReceiverStream::new(
            events,
        ))))
    }

    #[instrument(skip_all)]
    async fn tokenize(
        &self,
        request: Request<TokenizeRequest>,
    ) -> Result<Response<TokenizeResponse>, Status> {
        let token_ids = self.tokenize_text(request.into_inner().text).await?;
        Ok(Response::new(TokenizeResponse { token_ids }))
    }

    #[instrument(skip_all)]
    async fn model_info(
        &self,
        _request: Request<ModelInfoRequest>,
    ) -> Result<Response<ModelInfoResponse>, Status> {
        let info = self.info.read().ok().and_then(|i| i.clone());
        match info {
            Some(info) => Ok(Response::new(info)),
            None => Err(self
                .state
                .borrow()
                .refusal()
                .unwrap_or_else(|| CoordinatorError::Unavailable("the cluster is starting".into()))
                .into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn check(req: GenerateRequest) -> Result<GenerationParams, CoordinatorError> {
        let config = ModelConfig::preset("gpt2-tiny").unwrap();
        validate(&config, &Tokenizer::gpt2(), &req)
    }

    fn ids(n: usize) -> GenerateRequest {
        GenerateRequest {
            prompt_ids: vec![1; n],
            ..Default::default()
        }
    }

    fn refused(req: GenerateRequest, code: Code, field: &str) {
        let e = check(req).unwrap_err();
        assert_eq!(e.code(), code, "{e}");
        assert!(e.to_string().starts_with(field), "{e} should name {field}");
    }

    #[test]
    fn grpc_timeouts_parse() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("5u"), Some(Duration::from_micros(5)));
        for bad in ["", "m", "123", "123456789S", "1x", "-1S", "1.5S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn defaults_fill_in() {
        let p = check(GenerateRequest {
            prompt: "Hello world".into(),
            seed: Some(3),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(p.prompt_ids, vec![15496, 995]);
        assert_eq!(p.max_new, DEFAULT_MAX_TOKENS);
        assert_eq!((p.temperature, p.top_k, p.top_p, p.seed), (0.0, 0, 1.0, 3));
        let ctx = ModelConfig::preset("gpt2-tiny").unwrap().n_positions;
        assert_eq!(
            check(ids(ctx - 3)).unwrap().max_new,
            3,
            "capped by the context"
        );
    }

    #[test]
    fn malformed_requests_name_the_field() {
        let ctx = ModelConfig::preset("gpt2-tiny").unwrap().n_positions;
        refused(GenerateRequest::default(), Code::InvalidArgument, "prompt");
        refused(
            GenerateRequest {
                prompt: "a".into(),
                prompt_ids: vec![1],
                ..Default::default()
            },
            Code::InvalidArgument,
            "prompt",
        );
        let big = GenerateRequest {
            prompt: "x".repeat(10 << 20),
            ..Default::default()
        };
        refused(big, Code::OutOfRange, "prompt");
        refused(ids(ctx), Code::OutOfRange, "prompt_ids");
        let e = check(ids(defaults::MAX_PROMPT_TOKENS + 1)).unwrap_err();
        assert_eq!(e.code(), Code::OutOfRange);
        assert!(
            e.to_string().starts_with("prompt_ids:") && e.to_string().contains("limit"),
            "the id count is checked before the model's context: {e}"
        );
        let mut r = ids(1);
        r.prompt_ids[0] = 50257;
        refused(r, Code::InvalidArgument, "prompt_ids");
        let with = |f: &dyn Fn(&mut GenerateRequest)| {
            let mut r = ids(4);
            f(&mut r);
            r
        };
        refused(
            with(&|r| r.max_tokens = Some(0)),
            Code::InvalidArgument,
            "max_tokens",
        );
        refused(
            with(&|r| r.max_tokens = Some(ctx as u32)),
            Code::OutOfRange,
            "max_tokens",
        );
        refused(
            with(&|r| r.temperature = Some(-0.1)),
            Code::InvalidArgument,
            "temperature",
        );
        refused(
            with(&|r| r.temperature = Some(f32::NAN)),
            Code::InvalidArgument,
            "temperature",
        );
        refused(
            with(&|r| r.top_p = Some(0.0)),
            Code::InvalidArgument,
            "top_p",
        );
        refused(
            with(&|r| r.top_p = Some(1.5)),
            Code::InvalidArgument,
            "top_p",
        );
        refused(
            with(&|r| r.top_p = Some(f32::NAN)),
            Code::InvalidArgument,
            "top_p",
        );
        refused(
            with(&|r| r.top_k = Some(60000)),
            Code::InvalidArgument,
            "top_k",
        );
        refused(
            with(&|r| r.repetition_penalty = Some(0.0)),
            Code::InvalidArgument,
            "repetition_penalty",
        );
        refused(
            with(&|r| r.stop = vec!["".into()]),
            Code::InvalidArgument,
            "stop",
        );
        refused(
            with(&|r| r.stop = vec!["a".into(); 17]),
            Code::InvalidArgument,
            "stop",
        );
    }
}
