//! The OpenAI-compatible HTTP API (axum): `POST /v1/completions` (with `stream: true` as
//! server-sent events), `GET /v1/models`, `GET /health` and `GET /metrics` (Prometheus).
//!
//! A completion request becomes the same [`GenerateRequest`] the gRPC API takes and goes
//! through the same validation and scheduler; only the wire format differs. Errors are
//! OpenAI-style JSON bodies, `{"error": {"message", "type", "param", "code"}}`, with the
//! status that matches the gRPC code. Fields that OpenAI defines and Tessera does not
//! implement (`n` > 1, `echo`, `suffix`, penalties, `logit_bias`) are refused by name
//! rather than ignored; fields nobody defines are ignored, as OpenAI does.

use std::convert::Infallible;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tessera_proto::v1::{FinishReason, GenerateRequest, GenerateStreamResponse};
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::api::GenerationService;
use crate::config::defaults;
use crate::error::CoordinatorError;
use crate::state::ClusterState;

/// OpenAI's default for `max_tokens` on completions.
const OPENAI_DEFAULT_MAX_TOKENS: u32 = 16;
/// OpenAI's default sampling temperature.
const OPENAI_DEFAULT_TEMPERATURE: f32 = 1.0;

/// The router of the HTTP API over `api`.
pub fn router(api: GenerationService) -> Router {
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(defaults::MAX_MESSAGE_BYTES))
        .with_state(api)
}

/// An error as OpenAI clients expect it.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
    param: Option<&'static str>,
    code: Option<&'static str>,
}

impl ApiError {
    fn invalid(param: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            message: message.into(),
            param: Some(param),
            code: None,
        }
    }

    fn body(&self) -> Value {
        json!({ "error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

impl From<CoordinatorError> for ApiError {
    fn from(e: CoordinatorError) -> Self {
        use CoordinatorError as E;
        let (status, kind, param, code) = match &e {
            E::InvalidArgument { field, .. } | E::OutOfRange { field, .. } => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some(openai_field(field)),
                None,
            ),
            E::ResourceExhausted(_) => (
                StatusCode::TOO_MANY_REQUESTS,
                "server_overloaded",
                None,
                Some("queue_full"),
            ),
            E::Unavailable(_) | E::Cancelled(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                None,
                None,
            ),
            E::DeadlineExceeded(_) => (
                StatusCode::GATEWAY_TIMEOUT,
                "timeout",
                None,
                Some("deadline_exceeded"),
            ),
            E::Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                None,
                None,
            ),
        };
        ApiError {
            status,
            kind,
            message: e.to_string(),
            param,
            code,
        }
    }
}

/// The OpenAI name of a field the shared validation names.
fn openai_field(field: &'static str) -> &'static str {
    match field {
        "prompt_ids" => "prompt",
        f => f,
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        let status = match r.status() {
            StatusCode::PAYLOAD_TOO_LARGE => StatusCode::PAYLOAD_TOO_LARGE,
            StatusCode::UNSUPPORTED_MEDIA_TYPE => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            _ => StatusCode::BAD_REQUEST,
        };
        ApiError {
            status,
            kind: "invalid_request_error",
            message: format!("body: {}", r.body_text()),
            param: None,
            code: None,
        }
    }
}

async fn not_found() -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        kind: "invalid_request_error",
        message: "no such endpoint; Tessera serves POST /v1/completions, GET /v1/models, \
                  GET /health and GET /metrics"
            .into(),
        param: None,
        code: Some("not_found"),
    }
}

async fn method_not_allowed() -> ApiError {
    ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        kind: "invalid_request_error",
        message: "method not allowed on this endpoint".into(),
        param: None,
        code: None,
    }
}

/// A string or a list of them.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

/// The forms OpenAI accepts for `prompt`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
    Texts(Vec<String>),
    TokenLists(Vec<Vec<u32>>),
}

#[derive(Debug, Default, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// `POST /v1/completions` as OpenAI defines it, plus `top_k`, `ignore_eos` and
/// `repetition_penalty` as vLLM does.
#[derive(Debug, Deserialize)]
struct CompletionRequest {
    model: Option<String>,
    prompt: Option<Prompt>,
    max_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    seed: Option<u64>,
    stop: Option<OneOrMany<String>>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    logprobs: Option<u32>,
    #[serde(default)]
    ignore_eos: bool,
    repetition_penalty: Option<f32>,
    n: Option<u32>,
    best_of: Option<u32>,
    #[serde(default)]
    echo: bool,
    suffix: Option<String>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    logit_bias: Option<serde_json::Map<String, Value>>,
}

impl CompletionRequest {
    /// The gRPC request this asks for; refuses what Tessera does not implement.
    fn to_generate(&self, served: &str) -> Result<GenerateRequest, ApiError> {
        match &self.model {
            None => return Err(ApiError::invalid("model", "model: required")),
            Some(m) if m != served => {
                return Err(ApiError {
                    status: StatusCode::NOT_FOUND,
                    kind: "invalid_request_error",
                    message: format!(
                        "model: `{m}` is not served here; this cluster serves `{served}`"
                    ),
                    param: Some("model"),
                    code: Some("model_not_found"),
                })
            }
            Some(_) => {}
        }
        if self.n.unwrap_or(1) != 1 || self.best_of.unwrap_or(1) != 1 {
            return Err(ApiError::invalid(
                "n",
                "n, best_of: only 1 completion per request is supported; send several requests",
            ));
        }
        if self.echo {
            return Err(ApiError::invalid("echo", "echo: not supported"));
        }
        if self.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
            return Err(ApiError::invalid("suffix", "suffix: not supported"));
        }
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if v.is_some_and(|v| v != 0.0) {
                return Err(ApiError::invalid(
                    name,
                    format!("{name}: not supported; use repetition_penalty"),
                ));
            }
        }
        if self.logit_bias.as_ref().is_some_and(|b| !b.is_empty()) {
            return Err(ApiError::invalid("logit_bias", "logit_bias: not supported"));
        }
        let logprobs = match self.logprobs {
            None => false,
            Some(0 | 1) => true,
            Some(n) => {
                return Err(ApiError::invalid(
                    "logprobs",
                    format!(
                        "logprobs: {n} alternatives asked; Tessera returns the chosen token's \
                         log-probability only (logprobs 0 or 1)"
                    ),
                ))
            }
        };
        let (prompt, prompt_ids) = match &self.prompt {
            None => return Err(ApiError::invalid("prompt", "prompt: required")),
            Some(Prompt::Text(t)) => (t.clone(), Vec::new()),
            Some(Prompt::Tokens(ids)) => (String::new(), ids.clone()),
            Some(Prompt::Texts(v)) if v.len() == 1 => (v[0].clone(), Vec::new()),
            Some(Prompt::TokenLists(v)) if v.len() == 1 => (String::new(), v[0].clone()),
            Some(_) => {
                return Err(ApiError::invalid(
                    "prompt",
                    "prompt: one prompt per request; send a request for each",
                ))
            }
        };
        let top_k = match self.top_k {
            None | Some(-1) | Some(0) => None,
            Some(k) if k > 0 && k <= u32::MAX as i64 => Some(k as u32),
            Some(k) => {
                return Err(ApiError::invalid(
                    "top_k",
                    format!("top_k: {k} is not a positive count (or -1 for all)"),
                ))
            }
        };
        let stop = match &self.stop {
            None => Vec::new(),
            Some(OneOrMany::One(s)) => vec![s.clone()],
            Some(OneOrMany::Many(v)) => v.clone(),
        };
        Ok(GenerateRequest {
            prompt,
            prompt_ids,
            max_tokens: Some(self.max_tokens.unwrap_or(OPENAI_DEFAULT_MAX_TOKENS)),
            temperature: Some(self.temperature.unwrap_or(OPENAI_DEFAULT_TEMPERATURE)),
            top_k,
            top_p: self.top_p,
            seed: self.seed,
            repetition_penalty: self.repetition_penalty,
            stop,
            ignore_eos: self.ignore_eos,
            logprobs,
        })
    }
}

/// Reads a `/v1/completions` body as the handler does and returns the gRPC request it asks
/// for, or the error the client would get.
pub(crate) fn completion_request(body: &[u8], served: &str) -> Result<GenerateRequest, ApiError> {
    let Json(req) = Json::<CompletionRequest>::from_bytes(body)?;
    req.to_generate(served)
}

#[derive(Debug, Default, Serialize)]
struct Logprobs {
    tokens: Vec<String>,
    token_logprobs: Vec<f32>,
    top_logprobs: Vec<serde_json::Map<String, Value>>,
    text_offset: Vec<usize>,
}

/// What a response says about one request, shared by the unary and streaming forms.
struct Completion {
    id: String,
    created: u64,
    model: String,
}

impl Completion {
    fn new(model: &str) -> Self {
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Completion {
            id: format!("cmpl-{:032x}", rand::random::<u128>()),
            created,
            model: model.to_string(),
        }
    }

    fn body(&self, choice: Value, usage: Value) -> Value {
        json!({
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choice,
            "usage": usage,
        })
    }
}

fn finish_reason(code: i32) -> Option<&'static str> {
    match FinishReason::try_from(code) {
        Ok(FinishReason::Length) => Some("length"),
        Ok(FinishReason::Stop) => Some("stop"),
        _ => None,
    }
}

fn usage(m: &GenerateStreamResponse) -> Value {
    json!({
        "prompt_tokens": m.prompt_tokens,
        "completion_tokens": m.completion_tokens,
        "total_tokens": m.prompt_tokens + m.completion_tokens,
    })
}

/// Appends one message's tokens to `lp`. `offset` counts the characters of every token
/// string so far (OpenAI's `text_offset` is in characters of the concatenated tokens).
fn add_logprobs(
    api: &GenerationService,
    lp: &mut Logprobs,
    m: &GenerateStreamResponse,
    offset: &mut usize,
) {
    for (&id, &p) in m.token_ids.iter().zip(&m.logprobs) {
        let bytes = api.tokenizer().decode_bytes(&[id]).unwrap_or_default();
        let token = String::from_utf8_lossy(&bytes).into_owned();
        let mut top = serde_json::Map::new();
        top.insert(token.clone(), json!(p));
        lp.text_offset.push(*offset);
        *offset += token.chars().count();
        lp.tokens.push(token);
        lp.token_logprobs.push(p);
        lp.top_logprobs.push(top);
    }
}

async fn completions(
    State(api): State<GenerationService>,
    body: Result<Json<CompletionRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(req) = body?;
    let served = api.model_name().to_string();
    let grpc = req.to_generate(&served)?;
    let params = api.validate(&grpc)?;
    let events = api.submit(params)?;
    let completion = Completion::new(&served);
    let want_logprobs = grpc.logprobs;
    if req.stream {
        let include_usage = req.stream_options.unwrap_or_default().include_usage;
        let stream = sse_events(api, events, completion, want_logprobs, include_usage);
        return Ok(Sse::new(stream)
            .keep_alive(KeepAlive::default())
            .into_response());
    }
    let mut events = events;
    let mut text = String::new();
    let mut lp = Logprobs::default();
    let mut offset = 0;
    while let Some(msg) = events.recv().await {
        let m = msg.map_err(|s| ApiError::from(CoordinatorError::from_status(&s)))?;
        if want_logprobs {
            add_logprobs(&api, &mut lp, &m, &mut offset);
        }
        text.push_str(&m.text);
        if let Some(reason) = finish_reason(m.finish_reason) {
            let choice = json!([{
                "index": 0,
                "text": text,
                "logprobs": if want_logprobs { json!(lp) } else { Value::Null },
                "finish_reason": reason,
            }]);
            return Ok(Json(completion.body(choice, usage(&m))).into_response());
        }
    }
    Err(CoordinatorError::Internal("the sequence ended without a finish reason".into()).into())
}

/// The server-sent events of a streamed completion: a chunk per message, an error object
/// if the request fails midway, the usage chunk when asked, then `[DONE]`.
fn sse_events(
    api: GenerationService,
    events: crate::scheduler::EventRx,
    completion: Completion,
    want_logprobs: bool,
    include_usage: bool,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let mut offset = 0usize;
    let mut done = false;
    UnboundedReceiverStream::new(events)
        .map(move |msg| {
            let mut out = Vec::new();
            match msg {
                Err(s) => {
                    let e = ApiError::from(CoordinatorError::from_status(&s));
                    out.push(Event::default().data(e.body().to_string()));
                    done = true;
                }
                Ok(m) => {
                    let mut lp = Logprobs::default();
                    if want_logprobs {
                        add_logprobs(&api, &mut lp, &m, &mut offset);
                    }
                    let reason = finish_reason(m.finish_reason);
                    let choice = json!([{
                        "index": 0,
                        "text": m.text,
                        "logprobs": if want_logprobs { json!(lp) } else { Value::Null },
                        "finish_reason": reason,
                    }]);
                    out.push(
                        Event::default().data(completion.body(choice, Value::Null).to_string()),
                    );
                    if reason.is_some() {
                        if include_usage {
                            out.push(
                                Event::default()
                                    .data(completion.body(json!([]), usage(&m)).to_string()),
                            );
                        }
                        done = true;
                    }
                }
            }
            if done {
                out.push(Event::default().data("[DONE]"));
            }
            futures::stream::iter(out.into_iter().map(Ok))
        })
        .flatten()
}

async fn models(State(api): State<GenerationService>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": api.model_name(),
            "object": "model",
            "created": api.started_unix(),
            "owned_by": "tessera",
            "max_model_len": api.context_length(),
        }],
    }))
}

async fn health(State(api): State<GenerationService>) -> Response {
    let state = api.cluster_state();
    let (status, word, message) = match &state {
        ClusterState::Serving => (StatusCode::OK, "serving", String::new()),
        ClusterState::Starting(s) => (StatusCode::SERVICE_UNAVAILABLE, "starting", s.clone()),
        ClusterState::Failed(s) => (StatusCode::SERVICE_UNAVAILABLE, "failed", s.clone()),
        ClusterState::Stopping => (StatusCode::SERVICE_UNAVAILABLE, "stopping", String::new()),
    };
    (status, Json(json!({ "status": word, "message": message }))).into_response()
}

async fn metrics() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::metrics::render(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: Value) -> CompletionRequest {
        serde_json::from_value(body).unwrap()
    }

    #[test]
    fn openai_defaults_apply() {
        let g = parse(json!({"model": "m", "prompt": "hi"}))
            .to_generate("m")
            .unwrap();
        assert_eq!(g.prompt, "hi");
        assert_eq!(g.max_tokens, Some(OPENAI_DEFAULT_MAX_TOKENS));
        assert_eq!(g.temperature, Some(1.0));
        assert!(!g.logprobs);
    }

    #[test]
    fn every_prompt_form_is_read() {
        let g = parse(json!({"model": "m", "prompt": [1, 2, 3], "stop": "x", "top_k": -1}))
            .to_generate("m")
            .unwrap();
        assert_eq!(g.prompt_ids, vec![1, 2, 3]);
        assert_eq!(g.stop, vec!["x".to_string()]);
        assert_eq!(g.top_k, None);
        let g = parse(json!({"model": "m", "prompt": ["a"], "stop": ["x", "y"], "logprobs": 1}))
            .to_generate("m")
            .unwrap();
        assert_eq!(g.prompt, "a");
        assert_eq!(g.stop.len(), 2);
        assert!(g.logprobs);
        let g = parse(json!({"model": "m", "prompt": [[5, 6]]}))
            .to_generate("m")
            .unwrap();
        assert_eq!(g.prompt_ids, vec![5, 6]);
    }

    #[test]
    fn unsupported_fields_are_refused_by_name() {
        let cases = [
            (json!({"model": "m", "prompt": "a", "n": 2}), "n"),
            (json!({"model": "m", "prompt": "a", "echo": true}), "echo"),
            (
                json!({"model": "m", "prompt": "a", "suffix": "z"}),
                "suffix",
            ),
            (
                json!({"model": "m", "prompt": "a", "presence_penalty": 0.5}),
                "presence_penalty",
            ),
            (
                json!({"model": "m", "prompt": "a", "logit_bias": {"1": 2}}),
                "logit_bias",
            ),
            (
                json!({"model": "m", "prompt": "a", "logprobs": 3}),
                "logprobs",
            ),
            (json!({"model": "m", "prompt": ["a", "b"]}), "prompt"),
            (json!({"model": "m"}), "prompt"),
            (json!({"prompt": "a"}), "model"),
            (json!({"model": "m", "prompt": "a", "top_k": -5}), "top_k"),
        ];
        for (body, param) in cases {
            let e = parse(body.clone()).to_generate("m").unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(e.param, Some(param), "{body}: {e:?}");
        }
        let e = parse(json!({"model": "other", "prompt": "a"}))
            .to_generate("m")
            .unwrap_err();
        assert_eq!(e.status, StatusCode::NOT_FOUND);
    }

    #[test]
    fn coordinator_errors_map_to_http_statuses() {
        let cases = [
            (
                CoordinatorError::invalid("top_p", "x"),
                StatusCode::BAD_REQUEST,
            ),
            (
                CoordinatorError::out_of_range("max_tokens", "x"),
                StatusCode::BAD_REQUEST,
            ),
            (
                CoordinatorError::ResourceExhausted("x".into()),
                StatusCode::TOO_MANY_REQUESTS,
            ),
            (
                CoordinatorError::Unavailable("x".into()),
                StatusCode::SERVICE_UNAVAILABLE,
            ),
            (
                CoordinatorError::DeadlineExceeded("x".into()),
                StatusCode::GATEWAY_TIMEOUT,
            ),
            (
                CoordinatorError::Internal("x".into()),
                StatusCode::INTERNAL_SERVER_ERROR,
            ),
        ];
        for (e, status) in cases {
            let a = ApiError::from(e);
            assert_eq!(a.status, status);
            let body = a.body();
            assert!(body["error"]["message"].is_string());
        }
        let a = ApiError::from(CoordinatorError::invalid("prompt_ids", "x"));
        assert_eq!(a.param, Some("prompt"));
    }
}
