//! The OpenAI-compatible HTTP API (axum): `POST /v1/completions` (with `stream: true` as
//! server-sent events), `GET /v1/models`, `GET /health` and `GET /metrics` (Prometheus).
//!
//! A completion request becomes the same [`GenerateRequest`] the gRPC API takes and goes
//! through the same validation and scheduler; only the wire format differs. Errors are
//! OpenAI-style JSON bodies, `{"error": {"message", "type", "param", "code"}}`, with the
//! status that matches the gRPC code. Fields that OpenAI defines and Tessera does not
//! implement (`n` > 1, `echo`, `suffix`, penalties, `logit_bias`) are refused by name
//! rather than ignored; fields nobody defines are ignored, as OpenAI does.
//!
//! With API keys, every `/v1/*` route needs `Authorization: Bearer <key>` (401 otherwise);
//! `/health` and `/metrics` stay open ([`crate::auth`] says why). The server speaks
//! HTTP/1.1, as OpenAI clients do, so that its read limits hold: headers within
//! `http_read_timeout` and [`defaults::MAX_HTTP_HEADER_BYTES`], then the body within the
//! same time and [`defaults::MAX_HTTP_BODY_BYTES`].

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::{Stream, StreamExt};
use serde::de::{self, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{json, Value};
use tessera_proto::v1::{FinishReason, GenerateRequest, GenerateStreamResponse};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tracing::debug;

use crate::api::{self, GenerationService};
use crate::auth::{count_refusal, ApiKeys, AuthError};
use crate::config::defaults;
use crate::error::CoordinatorError;
use crate::state::ClusterState;

/// OpenAI's default for `max_tokens` on completions.
const OPENAI_DEFAULT_MAX_TOKENS: u32 = 16;
/// OpenAI's default sampling temperature.
const OPENAI_DEFAULT_TEMPERATURE: f32 = 1.0;

/// The router of the HTTP API over `api`. With `keys`, every `/v1/*` route requires
/// `Authorization: Bearer <key>`, checked before the body is read; a body must arrive
/// whole within `read_timeout`.
pub fn router(
    api: GenerationService,
    keys: Option<Arc<ApiKeys>>,
    read_timeout: Duration,
) -> Router {
    let limits = Limits { keys, read_timeout };
    // The last route layer added runs first.
    let v1 = Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route_layer(middleware::from_fn_with_state(limits.clone(), read_body))
        .route_layer(middleware::from_fn_with_state(limits, require_api_key));
    Router::new()
        .merge(v1)
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(defaults::MAX_HTTP_BODY_BYTES))
        .with_state(api)
}

/// What the `/v1/*` route layers check.
#[derive(Clone)]
struct Limits {
    keys: Option<Arc<ApiKeys>>,
    read_timeout: Duration,
}

/// Serves `app` on `listener` until `stop` completes, then lets open requests finish.
///
/// The listener yields plain TCP connections (give them TCP_NODELAY with
/// [`axum::serve::ListenerExt::tap_io`]) or, with TLS, connections whose handshake has
/// finished (`tessera_tls::TlsIncoming`, which bounds the handshake itself).
///
/// HTTP/1.1 only: a client must send a request's headers within `read_timeout` (else the
/// connection is closed; that includes a connection that sends nothing, and an idle
/// keep-alive one) and in at most [`defaults::MAX_HTTP_HEADER_BYTES`] (else 431). The
/// routes' own layer bounds the body the same way (408, 413).
pub async fn serve<L>(
    mut listener: L,
    app: Router,
    read_timeout: Duration,
    stop: impl Future<Output = ()>,
) where
    L: axum::serve::Listener,
{
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::server::graceful::GracefulShutdown;
    use hyper_util::service::TowerToHyperService;

    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(read_timeout)
        .max_header_size(defaults::MAX_HTTP_HEADER_BYTES);
    let graceful = GracefulShutdown::new();
    tokio::pin!(stop);
    loop {
        // `accept` retries failed accepts (e.g. out of file descriptors) itself, pausing
        // between tries rather than spinning.
        let io = tokio::select! {
            (io, _) = listener.accept() => io,
            () = &mut stop => break,
        };
        let connection =
            http1.serve_connection(TokioIo::new(io), TowerToHyperService::new(app.clone()));
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                debug!("HTTP connection: {e}");
            }
        });
    }
    graceful.shutdown().await;
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

/// With keys, refuses a request without a valid `Authorization: Bearer <key>` with 401,
/// an OpenAI-style body (`code: invalid_api_key`) and `WWW-Authenticate: Bearer`.
async fn require_api_key(State(limits): State<Limits>, request: Request, next: Next) -> Response {
    if let Some(keys) = &limits.keys {
        let presented = request
            .headers()
            .get(header::AUTHORIZATION)
            .map(HeaderValue::as_bytes);
        if let Err(e) = keys.check(presented) {
            count_refusal("http", e);
            discard(request.into_body().into_data_stream(), limits.read_timeout);
            return unauthorized(e);
        }
    }
    next.run(request).await
}

/// Reads and drops what is left of a refused request's body in the background, up to
/// [`defaults::MAX_HTTP_BODY_BYTES`] and for at most `within`. Dropping the body would
/// close the connection as the answer leaves, and a client still sending would meet a
/// reset and lose the answer; draining keeps the connection reading meanwhile.
fn discard(mut body: axum::body::BodyDataStream, within: Duration) {
    tokio::spawn(async move {
        let drain = async {
            let mut n = 0;
            while let Some(Ok(chunk)) = body.next().await {
                n += chunk.len();
                if n > defaults::MAX_HTTP_BODY_BYTES {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(within, drain).await;
    });
}

fn unauthorized(e: AuthError) -> Response {
    let mut response = ApiError {
        status: StatusCode::UNAUTHORIZED,
        kind: "invalid_request_error",
        message: e.to_string(),
        param: None,
        code: Some("invalid_api_key"),
    }
    .into_response();
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

/// Reads a request's body whole before the handler sees it, within `read_timeout` and
/// [`defaults::MAX_HTTP_BODY_BYTES`]: a client that sends its body too slowly, or stops
/// halfway, gets 408 instead of holding a connection and a task for ever.
async fn read_body(State(limits): State<Limits>, request: Request, next: Next) -> Response {
    let read_timeout = limits.read_timeout;
    let limit = defaults::MAX_HTTP_BODY_BYTES;
    let too_large = |what: String| ApiError {
        status: StatusCode::PAYLOAD_TOO_LARGE,
        kind: "invalid_request_error",
        message: format!("body: {what} is over the limit of {limit} bytes"),
        param: None,
        code: None,
    };
    let (parts, body) = request.into_parts();
    let mut stream = body.into_data_stream();
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if let Some(n) = declared.filter(|&n| n > limit as u64) {
        discard(stream, read_timeout);
        return too_large(format!("a Content-Length of {n} bytes")).into_response();
    }
    let read = async {
        let mut bytes = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| ApiError {
                status: StatusCode::BAD_REQUEST,
                kind: "invalid_request_error",
                message: format!("body: cannot be read: {e}"),
                param: None,
                code: None,
            })?;
            if bytes.len() + chunk.len() > limit {
                return Err(too_large("the body".into()));
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(bytes)
    };
    let outcome = tokio::time::timeout(read_timeout, read).await;
    match outcome {
        Ok(Ok(bytes)) => {
            next.run(Request::from_parts(parts, Body::from(bytes)))
                .await
        }
        Ok(Err(e)) => {
            if e.status == StatusCode::PAYLOAD_TOO_LARGE {
                discard(stream, read_timeout);
            }
            e.into_response()
        }
        Err(_) => ApiError {
            status: StatusCode::REQUEST_TIMEOUT,
            kind: "invalid_request_error",
            message: format!(
                "body: not received whole within {} ms",
                read_timeout.as_millis()
            ),
            param: None,
            code: Some("request_timeout"),
        }
        .into_response(),
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

// The list-valued fields are read by hand rather than as serde's untagged enums, which
// copy a whole value before trying each form: a 16 MiB array would cost many times its
// size in memory before being refused. Here a list keeps what a request can use and only
// counts the rest, so a body costs no more than its bytes and the refusal names the field.

/// The forms OpenAI accepts for `prompt`: text, token ids, or a list of either.
#[derive(Debug)]
enum Prompt {
    Text(String),
    Tokens(TokenIds),
    /// A list of this many prompts (more than one); Tessera takes one per request.
    Batch(usize),
}

/// Prompt token ids as read: the first [`defaults::MAX_PROMPT_TOKENS`] kept, all counted.
#[derive(Debug, Default)]
struct TokenIds {
    ids: Vec<u32>,
    count: usize,
}

impl TokenIds {
    fn push(&mut self, id: u32) {
        self.count += 1;
        if self.ids.len() < defaults::MAX_PROMPT_TOKENS {
            self.ids.push(id);
        }
    }

    fn read_rest<'de, A: SeqAccess<'de>>(&mut self, mut seq: A) -> Result<(), A::Error> {
        while let Some(id) = seq.next_element::<u32>()? {
            self.push(id);
        }
        Ok(())
    }
}

/// One element of a `prompt` list, which decides the list's form.
enum PromptItem {
    Id(u32),
    Text(String),
    Ids(TokenIds),
}

impl<'de> Deserialize<'de> for PromptItem {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = PromptItem;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a token id, a text or a list of token ids")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<PromptItem, E> {
                u32::try_from(v)
                    .map(PromptItem::Id)
                    .map_err(|_| E::invalid_value(de::Unexpected::Unsigned(v), &"a u32 token id"))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<PromptItem, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Err(E::invalid_value(
                        de::Unexpected::Signed(v),
                        &"a u32 token id",
                    )),
                }
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<PromptItem, E> {
                Ok(PromptItem::Text(v.to_string()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<PromptItem, E> {
                Ok(PromptItem::Text(v))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<PromptItem, A::Error> {
                let mut ids = TokenIds::default();
                ids.read_rest(seq)?;
                Ok(PromptItem::Ids(ids))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for Prompt {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Prompt;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a text, a list of token ids, or a list of texts or of token-id lists")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Prompt, E> {
                Ok(Prompt::Text(v.to_string()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Prompt, E> {
                Ok(Prompt::Text(v))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Prompt, A::Error> {
                let single = match seq.next_element::<PromptItem>()? {
                    None => return Ok(Prompt::Tokens(TokenIds::default())),
                    Some(PromptItem::Id(first)) => {
                        let mut ids = TokenIds::default();
                        ids.push(first);
                        ids.read_rest(seq)?;
                        return Ok(Prompt::Tokens(ids));
                    }
                    Some(PromptItem::Text(t)) => Prompt::Text(t),
                    Some(PromptItem::Ids(ids)) => Prompt::Tokens(ids),
                };
                let mut n = 1;
                while seq.next_element::<IgnoredAny>()?.is_some() {
                    n += 1;
                }
                Ok(if n == 1 { single } else { Prompt::Batch(n) })
            }
        }
        d.deserialize_any(V)
    }
}

/// `stop` as read: a string or a list of them; strings past
/// [`defaults::MAX_STOP_STRINGS`] are counted, not kept.
#[derive(Debug, Default)]
struct StopStrings {
    kept: Vec<String>,
    count: usize,
}

impl<'de> Deserialize<'de> for StopStrings {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = StopStrings;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string or a list of strings")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<StopStrings, E> {
                Ok(StopStrings {
                    kept: vec![v.to_string()],
                    count: 1,
                })
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<StopStrings, A::Error> {
                let mut stop = StopStrings::default();
                while stop.kept.len() < defaults::MAX_STOP_STRINGS {
                    match seq.next_element::<String>()? {
                        Some(s) => stop.kept.push(s),
                        None => break,
                    }
                }
                stop.count = stop.kept.len();
                while seq.next_element::<IgnoredAny>()?.is_some() {
                    stop.count += 1;
                }
                Ok(stop)
            }
        }
        d.deserialize_any(V)
    }
}

/// A JSON object whose entries are only counted (`logit_bias`, which Tessera refuses
/// unless empty).
#[derive(Debug, Default)]
struct EntryCount(usize);

impl<'de> Deserialize<'de> for EntryCount {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = EntryCount;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<EntryCount, A::Error> {
                let mut n = 0;
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {
                    n += 1;
                }
                Ok(EntryCount(n))
            }
        }
        d.deserialize_map(V)
    }
}

/// At most `max` characters of `s`, for echoing a client's value in a message.
fn clip(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &s[..at]),
        None => s.to_string(),
    }
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
    stop: Option<StopStrings>,
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
    logit_bias: Option<EntryCount>,
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
                        "model: `{}` is not served here; this cluster serves `{served}`",
                        clip(m, 64)
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
        if self.logit_bias.as_ref().is_some_and(|b| b.0 > 0) {
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
            Some(Prompt::Tokens(t)) if t.count > defaults::MAX_PROMPT_TOKENS => {
                return Err(api::too_many_prompt_tokens(t.count).into())
            }
            Some(Prompt::Tokens(t)) => (String::new(), t.ids.clone()),
            Some(Prompt::Batch(n)) => {
                return Err(ApiError::invalid(
                    "prompt",
                    format!("prompt: a list of {n} prompts; one prompt per request, send a request for each"),
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
            Some(s) if s.count > defaults::MAX_STOP_STRINGS => {
                return Err(api::too_many_stop_strings(s.count).into())
            }
            Some(s) => s.kept.clone(),
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
    let params = api.validate(&grpc).await?;
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
        ClusterState::Recovering(s) => (StatusCode::SERVICE_UNAVAILABLE, "recovering", s.clone()),
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
    use tower::ServiceExt;

    fn parse(body: Value) -> CompletionRequest {
        serde_json::from_value(body).unwrap()
    }

    fn test_router(keys: Option<&str>, read_timeout: Duration) -> Router {
        let config = Arc::new(tessera_model::ModelConfig::preset("gpt2-tiny").unwrap());
        let tokenizer = Arc::new(tessera_model::Tokenizer::gpt2());
        let (_, state) = tokio::sync::watch::channel(ClusterState::Starting("test".into()));
        let api = GenerationService::new(config, tokenizer, state);
        let keys = keys.map(|k| Arc::new(ApiKeys::parse(k).unwrap()));
        router(api, keys, read_timeout)
    }

    async fn call(app: &Router, request: axum::http::Request<Body>) -> (StatusCode, Response) {
        let response = app.clone().oneshot(request).await.unwrap();
        (response.status(), response)
    }

    fn get(path: &str, authorization: Option<&str>) -> axum::http::Request<Body> {
        let mut b = axum::http::Request::get(path);
        if let Some(a) = authorization {
            b = b.header(header::AUTHORIZATION, a);
        }
        b.body(Body::empty()).unwrap()
    }

    async fn json_body(response: Response) -> Value {
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn v1_routes_need_a_key_and_probes_do_not() {
        let app = test_router(Some("k1\nk2\n"), Duration::from_secs(5));
        for auth in [None, Some("Bearer nope"), Some("Basic azE6")] {
            let (status, response) = call(&app, get("/v1/models", auth)).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{auth:?}");
            assert_eq!(response.headers()[header::WWW_AUTHENTICATE], "Bearer");
            let body = json_body(response).await;
            assert_eq!(body["error"]["code"], "invalid_api_key");
            assert_eq!(body["error"]["type"], "invalid_request_error");
            assert!(!body.to_string().contains("nope"), "the key is not echoed");
        }
        let (status, _) = call(&app, get("/v1/models", Some("Bearer k2"))).await;
        assert_eq!(status, StatusCode::OK);
        let (status, _) = call(&app, get("/health", None)).await;
        assert_eq!(
            status,
            StatusCode::SERVICE_UNAVAILABLE,
            "open: starting, not 401"
        );
        let (status, _) = call(&app, get("/metrics", None)).await;
        assert_eq!(status, StatusCode::OK);
        let open = test_router(None, Duration::from_secs(5));
        let (status, _) = call(&open, get("/v1/models", None)).await;
        assert_eq!(status, StatusCode::OK, "without keys nothing is checked");
    }

    #[tokio::test]
    async fn a_body_must_arrive_whole_in_time_and_under_the_limit() {
        let app = test_router(None, Duration::from_millis(50));
        let stalled = axum::http::Request::post("/v1/completions")
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from_stream(futures::stream::pending::<
                Result<axum::body::Bytes, std::io::Error>,
            >()))
            .unwrap();
        let (status, response) = call(&app, stalled).await;
        assert_eq!(status, StatusCode::REQUEST_TIMEOUT);
        assert_eq!(
            json_body(response).await["error"]["code"],
            "request_timeout"
        );
        let declared = axum::http::Request::post("/v1/completions")
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::CONTENT_LENGTH, defaults::MAX_HTTP_BODY_BYTES + 1)
            .body(Body::empty())
            .unwrap();
        let (status, _) = call(&app, declared).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        let chunks = (0..17).map(|_| Ok::<_, std::io::Error>(vec![b' '; 1 << 20]));
        let streamed = axum::http::Request::post("/v1/completions")
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from_stream(futures::stream::iter(chunks)))
            .unwrap();
        let (status, _) = call(&app, streamed).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[test]
    fn lists_are_counted_not_kept() {
        let many: Vec<&str> = vec!["a"; 1000];
        let e = parse(json!({"model": "m", "prompt": many}))
            .to_generate("m")
            .unwrap_err();
        assert_eq!(e.param, Some("prompt"));
        assert!(e.message.contains("1000 prompts"), "{}", e.message);
        let ids = vec![7u32; defaults::MAX_PROMPT_TOKENS + 5];
        let r = parse(json!({"model": "m", "prompt": ids}));
        match &r.prompt {
            Some(Prompt::Tokens(t)) => {
                assert_eq!(t.count, defaults::MAX_PROMPT_TOKENS + 5);
                assert_eq!(
                    t.ids.len(),
                    defaults::MAX_PROMPT_TOKENS,
                    "the rest only counted"
                );
            }
            other => panic!("{other:?}"),
        }
        let e = r.to_generate("m").unwrap_err();
        assert_eq!(
            (e.status, e.param),
            (StatusCode::BAD_REQUEST, Some("prompt"))
        );
        let stops = vec!["x"; 40];
        let r = parse(json!({"model": "m", "prompt": "a", "stop": stops}));
        let s = r.stop.as_ref().unwrap();
        assert_eq!((s.kept.len(), s.count), (defaults::MAX_STOP_STRINGS, 40));
        let e = r.to_generate("m").unwrap_err();
        assert!(
            e.message.starts_with("stop: 40 stop strings"),
            "{}",
            e.message
        );
        for bad in [
            json!({"model": "m", "prompt": [1, -1]}),
            json!({"model": "m", "prompt": [1, 1.5]}),
            json!({"model": "m", "prompt": [5_000_000_000u64]}),
            json!({"model": "m", "prompt": 3}),
            json!({"model": "m", "prompt": "a", "stop": 3}),
            json!({"model": "m", "prompt": "a", "logit_bias": [1]}),
        ] {
            assert!(
                serde_json::from_value::<CompletionRequest>(bad.clone()).is_err(),
                "{bad}"
            );
        }
        let e = parse(json!({"model": "x".repeat(1000), "prompt": "a"}))
            .to_generate("m")
            .unwrap_err();
        assert!(
            e.message.len() < 200,
            "a client's value is clipped: {}",
            e.message
        );
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
