//! The servers a benchmark talks to: a Tessera cluster over its gRPC API, or any
//! OpenAI-compatible server over `POST /v1/completions` with `stream: true`.
//!
//! Each request is timed here, at the client: sent, every chunk that carries tokens,
//! end of stream. Whatever goes wrong with one request (a status, a broken connection,
//! an unparsable chunk, the timeout) becomes its [`Failure`]; only [`Target::connect`]
//! returns errors.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};
use tessera_client::{code_name, ApiKey, Client, ClientError, FinishReason, GenerateRequest};

use crate::dataset::{Prompt, PromptBody, PromptForm};
use crate::record::{Chunk, Failure, RequestRecord};
use crate::BenchError;

/// How long to wait for a server to accept a connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where to send requests.
#[derive(Debug, Clone, PartialEq)]
pub enum TargetSpec {
    /// A Tessera cluster's gRPC endpoint, `host:port` or `https://host:port`.
    Tessera {
        /// The endpoint.
        endpoint: String,
        /// The key of a cluster that requires one.
        api_key: Option<ApiKey>,
        /// For `https://`: a PEM file of the CA to trust instead of the system's roots.
        ca_cert: Option<PathBuf>,
    },
    /// An OpenAI-compatible server.
    OpenAi {
        /// The API's base URL, e.g. `http://127.0.0.1:8000/v1` or `https://…`.
        base_url: String,
        /// The model to ask for; `None`: the first of `GET {base}/models`.
        model: Option<String>,
        /// Sent as `Authorization: Bearer <key>` on every request, when given.
        api_key: Option<ApiKey>,
        /// For `https://`: a PEM file of the CA to trust instead of the system's roots.
        ca_cert: Option<PathBuf>,
    },
}

/// What the benchmark learnt about the target when it connected.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetInfo {
    /// `tessera` or `openai`.
    pub backend: &'static str,
    /// The endpoint or base URL.
    pub address: String,
    /// The model's name.
    pub model_id: String,
    /// Tensor-parallel degree, when the target says.
    pub tp: Option<u32>,
    /// Pipeline stages, when the target says.
    pub pp: Option<u32>,
    /// How prompts are sent to it.
    pub form: PromptForm,
}

impl TargetInfo {
    /// The API spoken, in words.
    pub fn api(&self) -> &'static str {
        match self.backend {
            "tessera" => "Tessera gRPC API",
            _ => "OpenAI-compatible API",
        }
    }
}

/// A connected target.
pub struct Target {
    info: TargetInfo,
    client: Connection,
}

enum Connection {
    Tessera(Client),
    OpenAi {
        http: reqwest::Client,
        completions_url: String,
    },
}

impl Target {
    /// Connects and reads what the report needs: the model's name and, for Tessera, the
    /// split and the vocabulary.
    pub async fn connect(spec: &TargetSpec) -> Result<Target, BenchError> {
        match spec {
            TargetSpec::Tessera {
                endpoint,
                api_key,
                ca_cert,
            } => {
                let error = |e: ClientError| BenchError::Target {
                    target: endpoint.clone(),
                    reason: e.to_string(),
                };
                let options = tessera_client::ClientOptions {
                    connect_timeout: CONNECT_TIMEOUT,
                    api_key: api_key.clone(),
                    ca_cert: ca_cert.clone(),
                    ..Default::default()
                };
                let mut client = Client::connect_with(endpoint, options)
                    .await
                    .map_err(error)?;
                let info = client.model_info().await.map_err(error)?;
                Ok(Target {
                    info: TargetInfo {
                        backend: "tessera",
                        address: endpoint.clone(),
                        model_id: info.name,
                        tp: Some(info.tp),
                        pp: Some(info.pp),
                        form: PromptForm::Ids {
                            vocab_size: info.vocab_size,
                            eos_token_id: info.eos_token_id,
                        },
                    },
                    client: Connection::Tessera(client),
                })
            }
            TargetSpec::OpenAi {
                base_url,
                model,
                api_key,
                ca_cert,
            } => {
                let error = |reason: String| BenchError::Target {
                    target: base_url.clone(),
                    reason,
                };
                let base = base_url.trim().trim_end_matches('/').to_string();
                let https = base.starts_with("https://");
                if !https && !base.starts_with("http://") {
                    return Err(error(
                        "the base URL must start with http:// or https://, e.g. \
                         http://127.0.0.1:8000/v1"
                            .into(),
                    ));
                }
                let mut headers = reqwest::header::HeaderMap::new();
                if let Some(key) = api_key {
                    let mut bearer =
                        reqwest::header::HeaderValue::try_from(format!("Bearer {}", key.expose()))
                            .map_err(|_| error("the API key cannot be sent in a header".into()))?;
                    bearer.set_sensitive(true);
                    headers.insert(reqwest::header::AUTHORIZATION, bearer);
                }
                let mut builder = reqwest::Client::builder()
                    .connect_timeout(CONNECT_TIMEOUT)
                    .default_headers(headers);
                match (https, ca_cert) {
                    (true, Some(path)) => {
                        let pem = std::fs::read(path)
                            .map_err(|e| error(format!("{}: {e}", path.display())))?;
                        let ca = reqwest::Certificate::from_pem(&pem).map_err(|e| {
                            error(format!("{}: {}", path.display(), error_text(&e)))
                        })?;
                        builder = builder
                            .tls_built_in_root_certs(false)
                            .add_root_certificate(ca);
                    }
                    (false, Some(_)) => {
                        return Err(error(
                            "a CA certificate is for https:// base URLs; this one is plaintext"
                                .into(),
                        ))
                    }
                    (_, None) => {}
                }
                let http = builder.build().map_err(|e| error(error_text(&e)))?;
                let models = http
                    .get(format!("{base}/models"))
                    .timeout(CONNECT_TIMEOUT * 2)
                    .send()
                    .await
                    .map_err(|e| error(format!("cannot be reached: {}", error_text(&e))))?;
                if models.status() == reqwest::StatusCode::UNAUTHORIZED {
                    let why = if api_key.is_some() {
                        "the server refused the API key (401)"
                    } else {
                        "the server requires an API key (401); give it with --api-key"
                    };
                    return Err(error(why.into()));
                }
                let model_id = match model {
                    Some(m) => m.clone(),
                    None => first_model(models).await.map_err(error)?,
                };
                Ok(Target {
                    info: TargetInfo {
                        backend: "openai",
                        address: base.clone(),
                        model_id,
                        tp: None,
                        pp: None,
                        form: PromptForm::Text,
                    },
                    client: Connection::OpenAi {
                        http,
                        completions_url: format!("{base}/completions"),
                    },
                })
            }
        }
    }

    /// What was learnt when connecting.
    pub fn info(&self) -> &TargetInfo {
        &self.info
    }

    /// Sends one prompt and times it; `run_start` is the run's time zero.
    pub async fn send(
        &self,
        prompt: &Prompt,
        ignore_eos: bool,
        timeout: Duration,
        run_start: Instant,
    ) -> RequestRecord {
        let sent = Instant::now();
        let mut reply = Reply::default();
        let outcome = tokio::time::timeout(timeout, async {
            match &self.client {
                Connection::Tessera(client) => {
                    tessera_stream(client.clone(), prompt, ignore_eos, sent, &mut reply).await
                }
                Connection::OpenAi {
                    http,
                    completions_url,
                } => {
                    let body = self.openai_body(prompt, ignore_eos);
                    openai_stream(http, completions_url, &body, sent, &mut reply).await
                }
            }
        })
        .await;
        let e2el_s = sent.elapsed().as_secs_f64();
        let failure = match outcome {
            Err(_) => Some(Failure::new(
                Failure::TIMEOUT,
                format!("no complete answer within {} s", timeout.as_secs_f64()),
            )),
            Ok(Err(f)) => Some(f),
            Ok(Ok(())) if reply.chunks.is_empty() => {
                Some(Failure::new(Failure::EMPTY, "the answer had no token"))
            }
            Ok(Ok(())) => None,
        };
        let counted: u32 = reply.chunks.iter().map(|c| c.tokens).sum();
        RequestRecord {
            input_len: prompt.input_len,
            output_len: if failure.is_some() {
                0
            } else {
                reply.server_count.unwrap_or(counted) as usize
            },
            start_s: sent.duration_since(run_start).as_secs_f64(),
            chunks: reply.chunks,
            e2el_s,
            failure,
        }
    }

    fn openai_body(&self, prompt: &Prompt, ignore_eos: bool) -> Value {
        let mut body = json!({
            "model": self.info.model_id,
            "prompt": match &prompt.body {
                PromptBody::Text(t) => json!(t),
                PromptBody::Ids(ids) => json!(ids),
            },
            "max_tokens": prompt.output_len,
            "temperature": 0,
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        if ignore_eos {
            body["ignore_eos"] = json!(true);
        }
        body
    }
}

/// What came back so far.
#[derive(Default)]
struct Reply {
    chunks: Vec<Chunk>,
    /// The server's count of output tokens, when it gave one.
    server_count: Option<u32>,
}

async fn tessera_stream(
    mut client: Client,
    prompt: &Prompt,
    ignore_eos: bool,
    sent: Instant,
    reply: &mut Reply,
) -> Result<(), Failure> {
    let (text, ids) = match &prompt.body {
        PromptBody::Text(t) => (t.clone(), Vec::new()),
        PromptBody::Ids(ids) => (String::new(), ids.clone()),
    };
    let request = GenerateRequest {
        prompt: text,
        prompt_ids: ids,
        max_tokens: Some(prompt.output_len),
        temperature: Some(0.0),
        ignore_eos,
        ..Default::default()
    };
    let mut stream = client
        .generate_stream(request)
        .await
        .map_err(grpc_failure)?;
    while let Some(m) = stream.message().await.map_err(grpc_failure)? {
        if !m.token_ids.is_empty() {
            reply.chunks.push(Chunk {
                at_s: sent.elapsed().as_secs_f64(),
                tokens: m.token_ids.len() as u32,
            });
        }
        if m.finish_reason != FinishReason::Unspecified as i32 {
            reply.server_count = Some(m.completion_tokens);
        }
    }
    Ok(())
}

fn grpc_failure(e: ClientError) -> Failure {
    let status = match &e {
        ClientError::Status(s) => code_name(s.code()),
        ClientError::Protocol(_) => Failure::PROTOCOL,
        ClientError::Connect { .. }
        | ClientError::InvalidEndpoint { .. }
        | ClientError::InvalidApiKey(_)
        | ClientError::Tls(_) => Failure::TRANSPORT,
    };
    Failure::new(status, e.to_string())
}

async fn openai_stream(
    http: &reqwest::Client,
    url: &str,
    body: &Value,
    sent: Instant,
    reply: &mut Reply,
) -> Result<(), Failure> {
    let response = http
        .post(url)
        .json(body)
        .send()
        .await
        .map_err(http_failure)?;
    let status = response.status();
    if !status.is_success() {
        let text = response.text().await.unwrap_or_default();
        let message = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
            .unwrap_or(text);
        return Err(Failure::new(status.as_u16().to_string(), message));
    }
    let mut body = response.bytes_stream();
    let mut events = SseLines::default();
    while let Some(bytes) = body.next().await {
        let bytes = bytes.map_err(http_failure)?;
        let at_s = sent.elapsed().as_secs_f64();
        for data in events.push(&bytes) {
            if data == "[DONE]" {
                return Ok(());
            }
            on_openai_chunk(&data, at_s, reply)?;
        }
    }
    Err(Failure::new(
        Failure::PROTOCOL,
        "the event stream ended before `data: [DONE]`",
    ))
}

/// Reads one `data:` payload of a completion stream into `reply`.
fn on_openai_chunk(data: &str, at_s: f64, reply: &mut Reply) -> Result<(), Failure> {
    let v: Value = serde_json::from_str(data).map_err(|e| {
        Failure::new(
            Failure::PROTOCOL,
            format!("a chunk is not JSON ({e}): {}", clip(data)),
        )
    })?;
    if let Some(error) = v.get("error") {
        let message = error["message"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| error.to_string());
        return Err(Failure::new(Failure::STREAM, message));
    }
    if v["choices"].as_array().is_some_and(|c| !c.is_empty()) {
        reply.chunks.push(Chunk { at_s, tokens: 1 });
    }
    if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
        reply.server_count = Some(n as u32);
    }
    Ok(())
}

/// Splits a server-sent event stream into its `data:` payloads, across reads.
#[derive(Default)]
struct SseLines {
    pending: Vec<u8>,
}

impl SseLines {
    /// The payloads of every line completed by `bytes`.
    fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        self.pending.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end_matches(['\n', '\r']);
            if let Some(data) = line.strip_prefix("data:") {
                out.push(data.trim().to_string());
            }
        }
        out
    }
}

/// The first model of a `GET /models` answer.
async fn first_model(response: reqwest::Response) -> Result<String, String> {
    let status = response.status();
    if !status.is_success() {
        return Err(format!(
            "GET /models answered {status}; name the model with --model"
        ));
    }
    let v: Value = response
        .json()
        .await
        .map_err(|e| format!("GET /models: {}", error_text(&e)))?;
    v["data"][0]["id"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| "GET /models lists no model; name it with --model".into())
}

fn http_failure(e: reqwest::Error) -> Failure {
    let status = if e.is_timeout() {
        Failure::TIMEOUT
    } else {
        Failure::TRANSPORT
    };
    Failure::new(status, error_text(&e))
}

/// An error with its causes, which say what actually happened (`connection refused`).
fn error_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// The first 200 characters of a server's text, for messages.
fn clip(s: &str) -> String {
    match s.char_indices().nth(200) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_payloads_are_split_across_reads() {
        let mut s = SseLines::default();
        assert!(s.push(b"data: {\"a\"").is_empty());
        assert_eq!(
            s.push(b": 1}\r\n\r\ndata:[DONE]\n"),
            ["{\"a\": 1}", "[DONE]"]
        );
        assert!(s.push(b": keep-alive comment\nevent: x\n").is_empty());
    }

    #[test]
    fn openai_chunks_count_tokens_usage_and_errors() {
        let mut r = Reply::default();
        on_openai_chunk(r#"{"choices":[{"text":"a"}],"usage":null}"#, 0.1, &mut r).unwrap();
        on_openai_chunk(r#"{"choices":[{"text":""}]}"#, 0.2, &mut r).unwrap();
        on_openai_chunk(
            r#"{"choices":[],"usage":{"completion_tokens":3}}"#,
            0.3,
            &mut r,
        )
        .unwrap();
        assert_eq!(r.chunks.len(), 2);
        assert_eq!(r.server_count, Some(3));
        let f = on_openai_chunk(r#"{"error":{"message":"worker lost"}}"#, 0.4, &mut r).unwrap_err();
        assert_eq!(
            (f.status.as_str(), f.message.as_str()),
            ("stream_error", "worker lost")
        );
        let f = on_openai_chunk("not json", 0.5, &mut r).unwrap_err();
        assert_eq!(f.status, "protocol");
    }
}
