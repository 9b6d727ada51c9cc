//! The bad-input catalogue: one small cluster (gpt2-tiny, TP=1) started with API keys and
//! a short HTTP read timeout, and every malformed or abusive request we know of, over
//! gRPC and HTTP, each with the status it must get. Afterwards the cluster must serve
//! normally and hold nothing: no running request, no KV block in use.
//!
//! The table in [`catalogue`] is the documentation; `docs/architecture.md` summarises it.
//! Every case runs at once, as a crowd of bad clients would.

mod cluster_common;

use std::future::Future;
use std::pin::Pin;
use std::process::Stdio;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cluster_common::{metric, tessera, wait_idle, Serve};
use futures::StreamExt;
use prost::Message;
use serde_json::{json, Value};
use tessera_client::proto::generation_client::GenerationClient;
use tessera_client::{ApiKey, Client, ClientOptions, Code, GenerateRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::transport::Channel;

/// The keys the cluster accepts (the file also has a comment and a blank line).
const KEY: &str = "tessera-test-key-0123456789";
const SECOND_KEY: &str = "second.key_ABC";
/// The cluster's `--http-read-timeout-ms`: short, so that the slow cases end quickly.
const READ_TIMEOUT: Duration = Duration::from_millis(1000);
/// How long a case waits for an answer before calling it "no answer".
const WAIT: Duration = Duration::from_secs(5);
/// gpt2-tiny's context and vocabulary.
const CONTEXT: usize = 1024;
const VOCAB: u32 = 50257;
/// The server's limits (`tessera_coordinator::config::defaults`).
const MAX_PROMPT_BYTES: usize = 1 << 20;
const MAX_PROMPT_TOKENS: usize = 1 << 20;
const MAX_MESSAGE_BYTES: usize = 16 << 20;
const MAX_HTTP_BODY_BYTES: usize = 16 << 20;
const MAX_HTTP_HEADER_BYTES: usize = 64 << 10;

/// What a case sends as `authorization`.
#[derive(Debug, Clone, Copy)]
enum Auth {
    /// `Bearer <a valid key>`.
    Key,
    /// No header.
    Missing,
    /// This value as it is.
    Header(&'static str),
}

/// How a case reaches the server.
enum Req {
    /// gRPC `Generate`.
    Generate(Auth, GenerateRequest),
    /// gRPC `GenerateStream`, read to the end.
    Stream(Auth, GenerateRequest),
    /// gRPC `Tokenize`, with the key.
    Tokenize(String),
    /// `grpc.health.v1.Health/Check` of the public service, without a key.
    Health,
    /// One gRPC message over raw HTTP/2, with the key: `message` framed with its
    /// `compressed` flag and length (`declared_len`, else the real one), the stream left
    /// open unless `finish`.
    Frame {
        method: &'static str,
        content_type: &'static str,
        message: Vec<u8>,
        compressed: bool,
        declared_len: Option<u32>,
        finish: bool,
        grpc_timeout: Option<&'static str>,
    },
    /// Bytes written to the gRPC port as they are.
    GrpcBytes(Vec<u8>),
    /// `POST /v1/completions` with this JSON body and the key.
    Completion(Value),
    /// An HTTP request as given.
    Http {
        method: &'static str,
        path: &'static str,
        auth: Auth,
        content_type: Option<&'static str>,
        headers: Vec<(String, String)>,
        body: HttpBody,
    },
    /// Bytes written to the HTTP port piece by piece, `pause` apart.
    HttpBytes {
        pieces: Vec<Vec<u8>>,
        pause: Duration,
    },
    /// A long gRPC stream whose reader never reads; dropped after a while.
    StalledStream,
    /// A long gRPC stream whose client reads a few messages, then closes its connection.
    HungUpStream,
    /// A long SSE stream whose reader never reads; dropped after a while.
    StalledSse,
    /// A long SSE stream whose client reads its first event, then goes.
    HungUpSse,
}

/// An HTTP body.
enum HttpBody {
    Bytes(Vec<u8>),
    /// Sent chunked (no Content-Length), in pieces of this size.
    Chunked(Vec<u8>, usize),
}

/// What a case must get.
#[derive(Debug)]
enum Expect {
    /// A gRPC status, whose message contains the text.
    Grpc(Code, &'static str),
    /// An HTTP status, whose body contains the text.
    Http(u16, &'static str),
    /// The server closes the connection without an answer.
    Closed,
}

/// What a case got.
#[derive(Debug)]
// `Failed`'s reason is read through `Debug`, in the report of the cases that failed.
#[allow(dead_code)]
enum Outcome {
    Grpc(Code, String),
    Http(u16, String),
    Closed,
    /// Nothing within [`WAIT`].
    NoAnswer,
    /// The test's own side failed (not an answer of the server).
    Failed(String),
}

impl Expect {
    fn met_by(&self, got: &Outcome) -> bool {
        match (self, got) {
            (Expect::Grpc(code, text), Outcome::Grpc(c, m)) => c == code && m.contains(text),
            (Expect::Http(status, text), Outcome::Http(s, body)) => {
                s == status && body.contains(text)
            }
            (Expect::Closed, Outcome::Closed) => true,
            _ => false,
        }
    }
}

struct Case {
    name: &'static str,
    req: Req,
    expect: Expect,
}

fn case(name: &'static str, req: Req, expect: Expect) -> Case {
    Case { name, req, expect }
}

/// A request that is fine but for what a case changes.
fn ok_request() -> GenerateRequest {
    GenerateRequest {
        prompt_ids: vec![464, 3290, 318],
        max_tokens: Some(2),
        ..Default::default()
    }
}

fn with(f: impl FnOnce(&mut GenerateRequest)) -> GenerateRequest {
    let mut r = ok_request();
    f(&mut r);
    r
}

/// A completion body that is fine but for what a case changes.
fn ok_body() -> Value {
    json!({"model": "gpt2-tiny", "prompt": [464, 3290, 318], "max_tokens": 2})
}

fn body_with(key: &str, value: Value) -> Value {
    let mut b = ok_body();
    b[key] = value;
    b
}

/// A protobuf field key: field number and wire type.
fn field_key(field: u32, wire_type: u32) -> Vec<u8> {
    varint(u64::from(field << 3 | wire_type))
}

fn varint(mut v: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return out;
        }
        out.push(byte | 0x80);
    }
}

/// The valid request's bytes followed by `extra` (a later field wins or adds).
fn message_with(extra: &[u8]) -> Vec<u8> {
    let mut m = ok_request().encode_to_vec();
    m.extend_from_slice(extra);
    m
}

fn frame(message: Vec<u8>) -> Req {
    Req::Frame {
        method: "/tessera.v1.Generation/Generate",
        content_type: "application/grpc",
        message,
        compressed: false,
        declared_len: None,
        finish: true,
        grpc_timeout: None,
    }
}

fn http(
    method: &'static str,
    path: &'static str,
    auth: Auth,
    content_type: Option<&'static str>,
    body: Vec<u8>,
) -> Req {
    Req::Http {
        method,
        path,
        auth,
        content_type,
        headers: Vec::new(),
        body: HttpBody::Bytes(body),
    }
}

/// A raw HTTP/1.1 request to `POST /v1/completions` with the key and this body.
fn raw_completion(body: &str) -> Vec<u8> {
    format!(
        "POST /v1/completions HTTP/1.1\r\nHost: tessera\r\nAuthorization: Bearer {KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Every case: name, transport and request, expected status.
fn catalogue() -> Vec<Case> {
    use Expect::{Closed, Grpc, Http};
    let ok = ok_request;
    let long_ids = |n: usize| with(|r| r.prompt_ids = vec![1; n]);
    vec![
        // ── gRPC: API keys ───────────────────────────────────────────────────────────
        case(
            "grpc: no authorization",
            Req::Generate(Auth::Missing, ok()),
            Grpc(Code::Unauthenticated, "no API key"),
        ),
        case(
            "grpc: a wrong key",
            Req::Generate(Auth::Header("Bearer not-the-key"), ok()),
            Grpc(Code::Unauthenticated, "not valid"),
        ),
        case(
            "grpc: a key without `Bearer`",
            Req::Generate(Auth::Header(KEY), ok()),
            Grpc(Code::Unauthenticated, "not `Bearer <key>`"),
        ),
        case(
            "grpc: Basic credentials",
            Req::Generate(Auth::Header("Basic dXNlcjpwYXNz"), ok()),
            Grpc(Code::Unauthenticated, "not `Bearer <key>`"),
        ),
        case(
            "grpc: stream with a wrong key",
            Req::Stream(Auth::Header("Bearer x"), ok()),
            Grpc(Code::Unauthenticated, "not valid"),
        ),
        case(
            "grpc: the second key works",
            Req::Generate(Auth::Header("Bearer second.key_ABC"), ok()),
            Grpc(Code::Ok, ""),
        ),
        case(
            "grpc: health needs no key",
            Req::Health,
            Grpc(Code::Ok, "Serving"),
        ),
        // HTTP/2 header lists over 16 KiB get HTTP 431, which gRPC clients report as
        // UNKNOWN (no grpc-status); the key check never runs.
        case(
            "grpc: a 32 KiB authorization header",
            Req::Generate(
                Auth::Header(Box::leak(
                    format!("Bearer {}", "k".repeat(32 << 10)).into_boxed_str(),
                )),
                ok(),
            ),
            Grpc(Code::Unknown, "431"),
        ),
        // ── gRPC: fields out of range ────────────────────────────────────────────────
        case(
            "grpc: no prompt",
            Req::Generate(Auth::Key, GenerateRequest::default()),
            Grpc(Code::InvalidArgument, "prompt:"),
        ),
        case(
            "grpc: prompt and prompt_ids",
            Req::Generate(Auth::Key, with(|r| r.prompt = "a".into())),
            Grpc(Code::InvalidArgument, "prompt:"),
        ),
        case(
            "grpc: a token id at the vocabulary size",
            Req::Generate(Auth::Key, with(|r| r.prompt_ids = vec![VOCAB])),
            Grpc(Code::InvalidArgument, "prompt_ids:"),
        ),
        case(
            "grpc: token id u32::MAX",
            Req::Generate(Auth::Key, with(|r| r.prompt_ids = vec![u32::MAX])),
            Grpc(Code::InvalidArgument, "prompt_ids:"),
        ),
        case(
            "grpc: a prompt as long as the context",
            Req::Generate(Auth::Key, long_ids(CONTEXT)),
            Grpc(Code::OutOfRange, "prompt_ids:"),
        ),
        case(
            "grpc: more token ids than the limit",
            Req::Generate(Auth::Key, long_ids(MAX_PROMPT_TOKENS + 1)),
            Grpc(Code::OutOfRange, "over the limit"),
        ),
        case(
            "grpc: prompt text over 1 MiB",
            Req::Generate(
                Auth::Key,
                GenerateRequest {
                    prompt: "a".repeat(MAX_PROMPT_BYTES + 1),
                    ..Default::default()
                },
            ),
            Grpc(Code::OutOfRange, "prompt:"),
        ),
        // The slowest text to tokenize (one 1 MiB piece, most of a second), which is
        // why long texts are tokenized off the async runtime.
        case(
            "grpc: 1 MiB of one letter",
            Req::Generate(
                Auth::Key,
                GenerateRequest {
                    prompt: "a".repeat(MAX_PROMPT_BYTES),
                    ..Default::default()
                },
            ),
            Grpc(Code::OutOfRange, "prompt:"),
        ),
        case(
            "grpc: prompt text that fills the context",
            Req::Generate(
                Auth::Key,
                GenerateRequest {
                    prompt: "hello ".repeat(2000),
                    ..Default::default()
                },
            ),
            Grpc(Code::OutOfRange, "prompt:"),
        ),
        case(
            "grpc: 600 emoji that fill the context",
            Req::Generate(
                Auth::Key,
                GenerateRequest {
                    prompt: "\u{1F600}".repeat(600),
                    max_tokens: Some(1),
                    ..Default::default()
                },
            ),
            Grpc(Code::OutOfRange, "prompt:"),
        ),
        case(
            "grpc: max_tokens 0",
            Req::Generate(Auth::Key, with(|r| r.max_tokens = Some(0))),
            Grpc(Code::InvalidArgument, "max_tokens:"),
        ),
        case(
            "grpc: max_tokens u32::MAX",
            Req::Generate(Auth::Key, with(|r| r.max_tokens = Some(u32::MAX))),
            Grpc(Code::OutOfRange, "max_tokens:"),
        ),
        case(
            "grpc: negative temperature",
            Req::Generate(Auth::Key, with(|r| r.temperature = Some(-1.0))),
            Grpc(Code::InvalidArgument, "temperature:"),
        ),
        case(
            "grpc: NaN temperature",
            Req::Generate(Auth::Key, with(|r| r.temperature = Some(f32::NAN))),
            Grpc(Code::InvalidArgument, "temperature:"),
        ),
        case(
            "grpc: infinite temperature",
            Req::Generate(Auth::Key, with(|r| r.temperature = Some(f32::INFINITY))),
            Grpc(Code::InvalidArgument, "temperature:"),
        ),
        case(
            "grpc: top_p 0",
            Req::Generate(Auth::Key, with(|r| r.top_p = Some(0.0))),
            Grpc(Code::InvalidArgument, "top_p:"),
        ),
        case(
            "grpc: top_k above the vocabulary",
            Req::Generate(Auth::Key, with(|r| r.top_k = Some(VOCAB + 1))),
            Grpc(Code::InvalidArgument, "top_k:"),
        ),
        case(
            "grpc: negative repetition_penalty",
            Req::Generate(Auth::Key, with(|r| r.repetition_penalty = Some(-1.0))),
            Grpc(Code::InvalidArgument, "repetition_penalty:"),
        ),
        case(
            "grpc: 17 stop strings",
            Req::Generate(Auth::Key, with(|r| r.stop = vec!["x".into(); 17])),
            Grpc(Code::InvalidArgument, "stop:"),
        ),
        case(
            "grpc: 100000 stop strings",
            Req::Generate(Auth::Key, with(|r| r.stop = vec!["x".into(); 100_000])),
            Grpc(Code::InvalidArgument, "100000 stop strings"),
        ),
        case(
            "grpc: an empty stop string",
            Req::Generate(Auth::Key, with(|r| r.stop = vec![String::new()])),
            Grpc(Code::InvalidArgument, "stop:"),
        ),
        case(
            "grpc: a 257-byte stop string",
            Req::Generate(Auth::Key, with(|r| r.stop = vec!["x".repeat(257)])),
            Grpc(Code::InvalidArgument, "stop:"),
        ),
        case(
            "grpc: Tokenize over 1 MiB",
            Req::Tokenize("a".repeat(MAX_PROMPT_BYTES + 1)),
            Grpc(Code::OutOfRange, "text:"),
        ),
        case(
            "grpc: a stream with a bad field",
            Req::Stream(Auth::Key, with(|r| r.max_tokens = Some(0))),
            Grpc(Code::InvalidArgument, "max_tokens:"),
        ),
        // ── gRPC: the wire ───────────────────────────────────────────────────────────
        case(
            "grpc: a message over 16 MiB",
            Req::Generate(
                Auth::Key,
                GenerateRequest {
                    prompt: "a".repeat(MAX_MESSAGE_BYTES + 1),
                    ..Default::default()
                },
            ),
            Grpc(Code::OutOfRange, "message length too large"),
        ),
        case(
            "grpc: a frame that declares 1 GiB",
            Req::Frame {
                method: "/tessera.v1.Generation/Generate",
                content_type: "application/grpc",
                message: vec![0; 16],
                compressed: false,
                declared_len: Some(1 << 30),
                finish: false,
                grpc_timeout: None,
            },
            Grpc(Code::OutOfRange, "message length too large"),
        ),
        // gRPC's status-code table prescribes INTERNAL for a request message that does
        // not parse.
        case(
            "grpc: invalid UTF-8 in `prompt`",
            frame([field_key(1, 2), vec![2, 0xff, 0xfe]].concat()),
            Grpc(Code::Internal, ""),
        ),
        case(
            "grpc: a truncated field",
            frame(message_with(
                &[field_key(1, 2), vec![100], b"abc".to_vec()].concat(),
            )),
            Grpc(Code::Internal, ""),
        ),
        case(
            "grpc: max_tokens with the wrong wire type",
            frame(message_with(&[field_key(3, 2), vec![1, 5]].concat())),
            Grpc(Code::Internal, ""),
        ),
        case(
            "grpc: a varint of 11 bytes",
            frame(message_with(&[field_key(3, 0), vec![0xff; 11]].concat())),
            Grpc(Code::Internal, ""),
        ),
        case(
            "grpc: an unknown field is ignored",
            frame(message_with(&[field_key(99, 0), vec![1]].concat())),
            Grpc(Code::Ok, ""),
        ),
        case(
            "grpc: the compressed flag without an encoding",
            Req::Frame {
                method: "/tessera.v1.Generation/Generate",
                content_type: "application/grpc",
                message: ok().encode_to_vec(),
                compressed: true,
                declared_len: None,
                finish: true,
                grpc_timeout: None,
            },
            Grpc(Code::Internal, "compress"),
        ),
        case(
            "grpc: an unknown method",
            Req::Frame {
                method: "/tessera.v1.Generation/Nope",
                content_type: "application/grpc",
                message: ok().encode_to_vec(),
                compressed: false,
                declared_len: None,
                finish: true,
                grpc_timeout: None,
            },
            Grpc(Code::Unimplemented, ""),
        ),
        case(
            "grpc: an unknown service",
            Req::Frame {
                method: "/tessera.v9.Nope/Generate",
                content_type: "application/grpc",
                message: ok().encode_to_vec(),
                compressed: false,
                declared_len: None,
                finish: true,
                grpc_timeout: None,
            },
            Grpc(Code::Unimplemented, ""),
        ),
        // Half a message, then nothing: the call's deadline ends it (tonic reports a
        // deadline that passes before the request is whole as CANCELLED).
        case(
            "grpc: half a message, then silence",
            Req::Frame {
                method: "/tessera.v1.Generation/Generate",
                content_type: "application/grpc",
                message: ok().encode_to_vec()[..4].to_vec(),
                compressed: false,
                declared_len: Some(40),
                finish: false,
                grpc_timeout: Some("500m"),
            },
            Grpc(Code::Cancelled, "Timeout expired"),
        ),
        case(
            "grpc: garbage bytes to the port",
            Req::GrpcBytes(b"\x16\x03\x01\x00\xa5\x01garbage garbage garbage\r\n\r\n".repeat(8)),
            Closed,
        ),
        case(
            "grpc: HTTP/1.1 to the gRPC port",
            Req::GrpcBytes(b"GET / HTTP/1.1\r\nHost: tessera\r\n\r\n".to_vec()),
            Closed,
        ),
        case(
            "grpc: a stream never read, then dropped",
            Req::StalledStream,
            Grpc(Code::Ok, ""),
        ),
        case(
            "grpc: a client that hangs up mid-stream",
            Req::HungUpStream,
            Grpc(Code::Ok, ""),
        ),
        // ── HTTP: API keys ───────────────────────────────────────────────────────────
        case(
            "http: no Authorization",
            http(
                "POST",
                "/v1/completions",
                Auth::Missing,
                Some("application/json"),
                ok_body().to_string().into(),
            ),
            Http(401, "invalid_api_key"),
        ),
        case(
            "http: a wrong key",
            http(
                "POST",
                "/v1/completions",
                Auth::Header("Bearer not-the-key"),
                Some("application/json"),
                ok_body().to_string().into(),
            ),
            Http(401, "not valid"),
        ),
        case(
            "http: Basic credentials",
            http(
                "POST",
                "/v1/completions",
                Auth::Header("Basic dXNlcjpwYXNz"),
                Some("application/json"),
                ok_body().to_string().into(),
            ),
            Http(401, "not `Bearer <key>`"),
        ),
        case(
            "http: models need the key",
            http("GET", "/v1/models", Auth::Missing, None, Vec::new()),
            Http(401, "invalid_api_key"),
        ),
        case(
            "http: a wrong key on an 8 MiB body",
            http(
                "POST",
                "/v1/completions",
                Auth::Header("Bearer nope"),
                Some("application/json"),
                vec![b' '; 8 << 20],
            ),
            Http(401, "invalid_api_key"),
        ),
        case(
            "http: /health needs no key",
            http("GET", "/health", Auth::Missing, None, Vec::new()),
            Http(200, "serving"),
        ),
        case(
            "http: /metrics needs no key",
            http("GET", "/metrics", Auth::Missing, None, Vec::new()),
            Http(200, "tessera_generated_tokens_total"),
        ),
        // ── HTTP: the JSON ───────────────────────────────────────────────────────────
        case(
            "http: prompt of the wrong type",
            Req::Completion(body_with("prompt", json!({"a": 1}))),
            Http(400, "body:"),
        ),
        case(
            "http: max_tokens as a string",
            Req::Completion(body_with("max_tokens", json!("many"))),
            Http(400, "body:"),
        ),
        case(
            "http: negative max_tokens",
            Req::Completion(body_with("max_tokens", json!(-1))),
            Http(400, "body:"),
        ),
        case(
            "http: max_tokens 1e20",
            Req::Completion(body_with("max_tokens", json!(1e20))),
            Http(400, "body:"),
        ),
        case(
            "http: max_tokens past the context",
            Req::Completion(body_with("max_tokens", json!(5000))),
            Http(400, "\"param\":\"max_tokens\""),
        ),
        case(
            "http: temperature that overflows f32",
            Req::Completion(body_with("temperature", json!(1e39))),
            Http(400, "\"param\":\"temperature\""),
        ),
        case(
            "http: a negative token id",
            Req::Completion(body_with("prompt", json!([1, -2]))),
            Http(400, "body:"),
        ),
        case(
            "http: a token id over u32",
            Req::Completion(body_with("prompt", json!([5_000_000_000u64]))),
            Http(400, "body:"),
        ),
        case(
            "http: a fractional token id",
            Req::Completion(body_with("prompt", json!([1.5]))),
            Http(400, "body:"),
        ),
        case(
            "http: a token id past the vocabulary",
            Req::Completion(body_with("prompt", json!([VOCAB]))),
            Http(400, "\"param\":\"prompt\""),
        ),
        case(
            "http: an empty prompt",
            Req::Completion(body_with("prompt", json!(""))),
            Http(400, "\"param\":\"prompt\""),
        ),
        case(
            "http: an empty prompt list",
            Req::Completion(body_with("prompt", json!([]))),
            Http(400, "\"param\":\"prompt\""),
        ),
        case(
            "http: 100000 prompts",
            Req::Completion(body_with("prompt", json!(vec!["a"; 100_000]))),
            Http(400, "a list of 100000 prompts"),
        ),
        case(
            "http: more token ids than the limit",
            Req::Completion(body_with("prompt", json!(vec![1; MAX_PROMPT_TOKENS + 1]))),
            Http(400, "over the limit"),
        ),
        case(
            "http: 100000 stop strings",
            Req::Completion(body_with("stop", json!(vec!["x"; 100_000]))),
            Http(400, "100000 stop strings"),
        ),
        case(
            "http: stop of the wrong type",
            Req::Completion(body_with("stop", json!(7))),
            Http(400, "body:"),
        ),
        case(
            "http: n = 2",
            Req::Completion(body_with("n", json!(2))),
            Http(400, "\"param\":\"n\""),
        ),
        case(
            "http: logprobs 5",
            Req::Completion(body_with("logprobs", json!(5))),
            Http(400, "\"param\":\"logprobs\""),
        ),
        case(
            "http: a 1 MiB model name is not echoed",
            Req::Completion(body_with("model", json!("m".repeat(1 << 20)))),
            Http(404, "model_not_found"),
        ),
        case(
            "http: unknown fields are ignored",
            Req::Completion(body_with("frobnicate", json!({"x": [1, 2, 3]}))),
            Http(200, "text_completion"),
        ),
        case(
            "http: an unknown field nested 100000 deep",
            http(
                "POST",
                "/v1/completions",
                Auth::Key,
                Some("application/json"),
                format!(
                    "{{\"model\":\"gpt2-tiny\",\"prompt\":[1],\"max_tokens\":1,\"x\":{}{}}}",
                    "[".repeat(100_000),
                    "]".repeat(100_000)
                )
                .into(),
            ),
            Http(200, "text_completion"),
        ),
        case(
            "http: a prompt nested 100000 deep",
            http(
                "POST",
                "/v1/completions",
                Auth::Key,
                Some("application/json"),
                format!(
                    "{{\"model\":\"gpt2-tiny\",\"prompt\":{}{}}}",
                    "[".repeat(100_000),
                    "]".repeat(100_000)
                )
                .into(),
            ),
            Http(400, "body:"),
        ),
        case(
            "http: truncated JSON",
            http(
                "POST",
                "/v1/completions",
                Auth::Key,
                Some("application/json"),
                b"{\"model\": \"gpt2-tiny\", \"prompt\": [1, 2".to_vec(),
            ),
            Http(400, "body:"),
        ),
        case(
            "http: invalid UTF-8 in the JSON",
            http(
                "POST",
                "/v1/completions",
                Auth::Key,
                Some("application/json"),
                b"{\"model\": \"gpt2-tiny\", \"prompt\": \"\xff\xfe\"}".to_vec(),
            ),
            Http(400, "body:"),
        ),
        case(
            "http: a lone surrogate escape",
            http(
                "POST",
                "/v1/completions",
                Auth::Key,
                Some("application/json"),
                br#"{"model": "gpt2-tiny", "prompt": "\ud800"}"#.to_vec(),
            ),
            Http(400, "body:"),
        ),
        case(
            "http: JSON as text/plain",
            http(
                "POST",
                "/v1/completions",
                Auth::Key,
                Some("text/plain"),
                ok_body().to_string().into(),
            ),
            Http(415, "body:"),
        ),
        case(
            "http: no content type",
            http(
                "POST",
                "/v1/completions",
                Auth::Key,
                None,
                ok_body().to_string().into(),
            ),
            Http(415, "body:"),
        ),
        case(
            "http: a body over 16 MiB",
            http(
                "POST",
                "/v1/completions",
                Auth::Key,
                Some("application/json"),
                vec![b' '; MAX_HTTP_BODY_BYTES + 1],
            ),
            Http(413, "over the limit"),
        ),
        case(
            "http: a chunked body over 16 MiB",
            Req::Http {
                method: "POST",
                path: "/v1/completions",
                auth: Auth::Key,
                content_type: Some("application/json"),
                headers: Vec::new(),
                body: HttpBody::Chunked(vec![b' '; MAX_HTTP_BODY_BYTES + 1], 1 << 20),
            },
            Http(413, "over the limit"),
        ),
        case(
            "http: GET on completions",
            http("GET", "/v1/completions", Auth::Key, None, Vec::new()),
            Http(405, "method not allowed"),
        ),
        case(
            "http: an unknown path",
            http("GET", "/v1/chat/completions", Auth::Key, None, Vec::new()),
            Http(404, "no such endpoint"),
        ),
        // ── HTTP: the connection ─────────────────────────────────────────────────────
        case(
            "http: a header over 64 KiB",
            Req::Http {
                method: "GET",
                path: "/health",
                auth: Auth::Missing,
                content_type: None,
                headers: vec![("x-big".into(), "a".repeat(MAX_HTTP_HEADER_BYTES + 1))],
                body: HttpBody::Bytes(Vec::new()),
            },
            Http(431, ""),
        ),
        case(
            "http: 200 headers",
            Req::Http {
                method: "GET",
                path: "/health",
                auth: Auth::Missing,
                content_type: None,
                headers: (0..200).map(|i| (format!("x-h{i}"), "v".into())).collect(),
                body: HttpBody::Bytes(Vec::new()),
            },
            Http(431, ""),
        ),
        case(
            "http: garbage bytes",
            Req::HttpBytes {
                pieces: vec![b"\x00\x01\x02 garbage \xff\r\n\r\n".to_vec()],
                pause: Duration::ZERO,
            },
            Http(400, ""),
        ),
        case(
            "http: HTTP/2 prior knowledge",
            Req::HttpBytes {
                pieces: vec![b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec()],
                pause: Duration::ZERO,
            },
            Closed,
        ),
        case(
            "http: a slow client, byte by byte",
            Req::HttpBytes {
                pieces: raw_completion(&ok_body().to_string())
                    .chunks(8)
                    .map(<[u8]>::to_vec)
                    .collect(),
                pause: Duration::from_millis(10),
            },
            Http(200, "text_completion"),
        ),
        case(
            "http: half the headers, then silence",
            Req::HttpBytes {
                pieces: vec![
                    b"POST /v1/completions HTTP/1.1\r\nHost: tessera\r\nContent-Ty".to_vec(),
                ],
                pause: Duration::ZERO,
            },
            Closed,
        ),
        case(
            "http: a connection that sends nothing",
            Req::HttpBytes {
                pieces: Vec::new(),
                pause: Duration::ZERO,
            },
            Closed,
        ),
        case(
            "http: half the body, then silence",
            Req::HttpBytes {
                pieces: vec![raw_completion(&format!("{:<200}", ok_body()))[..200].to_vec()],
                pause: Duration::ZERO,
            },
            Http(408, "request_timeout"),
        ),
        case(
            "http: an SSE stream never read, then dropped",
            Req::StalledSse,
            Http(200, ""),
        ),
        case(
            "http: a client that hangs up mid-stream",
            Req::HungUpSse,
            Http(200, ""),
        ),
    ]
}

/// Everything a case needs to reach the cluster.
#[derive(Clone)]
struct Target {
    grpc: String,
    http: String,
    channel: Channel,
}

fn authorize<T>(request: &mut tonic::Request<T>, auth: Auth) {
    let value = match auth {
        Auth::Key => format!("Bearer {KEY}"),
        Auth::Missing => return,
        Auth::Header(v) => v.to_string(),
    };
    request
        .metadata_mut()
        .insert("authorization", value.parse().unwrap());
}

fn long_request() -> GenerateRequest {
    GenerateRequest {
        prompt_ids: vec![464, 3290, 318],
        max_tokens: Some(900),
        ignore_eos: true,
        ..Default::default()
    }
}

fn status(s: tonic::Status) -> Outcome {
    Outcome::Grpc(s.code(), s.message().to_string())
}

impl Target {
    fn client(&self) -> GenerationClient<Channel> {
        GenerationClient::new(self.channel.clone()).max_decoding_message_size(64 << 20)
    }

    async fn run(&self, req: Req) -> Outcome {
        match req {
            Req::Generate(auth, r) => {
                let mut request = tonic::Request::new(r);
                authorize(&mut request, auth);
                match self.client().generate(request).await {
                    Ok(_) => Outcome::Grpc(Code::Ok, String::new()),
                    Err(s) => status(s),
                }
            }
            Req::Stream(auth, r) => {
                let mut request = tonic::Request::new(r);
                authorize(&mut request, auth);
                let mut stream = match self.client().generate_stream(request).await {
                    Ok(s) => s.into_inner(),
                    Err(s) => return status(s),
                };
                loop {
                    match stream.message().await {
                        Ok(Some(_)) => {}
                        Ok(None) => return Outcome::Grpc(Code::Ok, String::new()),
                        Err(s) => return status(s),
                    }
                }
            }
            Req::Tokenize(text) => {
                let mut request =
                    tonic::Request::new(tessera_client::proto::TokenizeRequest { text });
                authorize(&mut request, Auth::Key);
                match self.client().tokenize(request).await {
                    Ok(_) => Outcome::Grpc(Code::Ok, String::new()),
                    Err(s) => status(s),
                }
            }
            Req::Health => {
                use tonic_health::pb::health_client::HealthClient;
                use tonic_health::pb::HealthCheckRequest;
                let request = HealthCheckRequest {
                    service: "tessera.v1.Generation".into(),
                };
                match HealthClient::new(self.channel.clone()).check(request).await {
                    Ok(r) => Outcome::Grpc(Code::Ok, format!("{:?}", r.into_inner().status())),
                    Err(s) => status(s),
                }
            }
            Req::Frame {
                method,
                content_type,
                message,
                compressed,
                declared_len,
                finish,
                grpc_timeout,
            } => {
                let mut framed = vec![u8::from(compressed)];
                let len = declared_len.unwrap_or(message.len() as u32);
                framed.extend_from_slice(&len.to_be_bytes());
                framed.extend_from_slice(&message);
                raw_grpc(
                    &self.grpc,
                    method,
                    content_type,
                    grpc_timeout,
                    framed,
                    finish,
                )
                .await
            }
            Req::GrpcBytes(bytes) => raw_tcp(&self.grpc, vec![bytes], Duration::ZERO, false).await,
            Req::Completion(body) => {
                self.http_request(
                    "POST",
                    "/v1/completions",
                    Auth::Key,
                    Some("application/json"),
                    Vec::new(),
                    HttpBody::Bytes(body.to_string().into_bytes()),
                )
                .await
            }
            Req::Http {
                method,
                path,
                auth,
                content_type,
                headers,
                body,
            } => {
                self.http_request(method, path, auth, content_type, headers, body)
                    .await
            }
            Req::HttpBytes { pieces, pause } => raw_tcp(&self.http, pieces, pause, true).await,
            Req::StalledStream => {
                let mut request = tonic::Request::new(long_request());
                authorize(&mut request, Auth::Key);
                let stream = match self.client().generate_stream(request).await {
                    Ok(s) => s.into_inner(),
                    Err(s) => return status(s),
                };
                tokio::time::sleep(Duration::from_secs(1)).await;
                drop(stream);
                Outcome::Grpc(Code::Ok, String::new())
            }
            Req::HungUpStream => {
                // A connection of its own, so that hanging up closes it.
                let channel = Channel::from_shared(format!("http://{}", self.grpc))
                    .unwrap()
                    .connect()
                    .await
                    .unwrap();
                let mut request = tonic::Request::new(long_request());
                authorize(&mut request, Auth::Key);
                let mut stream = match GenerationClient::new(channel)
                    .generate_stream(request)
                    .await
                {
                    Ok(s) => s.into_inner(),
                    Err(s) => return status(s),
                };
                for _ in 0..3 {
                    if let Err(s) = stream.message().await {
                        return status(s);
                    }
                }
                Outcome::Grpc(Code::Ok, String::new())
            }
            Req::StalledSse | Req::HungUpSse => {
                let stalled = matches!(req, Req::StalledSse);
                let resp = reqwest::Client::new()
                    .post(format!("{}/v1/completions", self.http))
                    .bearer_auth(KEY)
                    .json(&json!({
                        "model": "gpt2-tiny", "prompt": "The cluster", "max_tokens": 900,
                        "ignore_eos": true, "stream": true,
                    }))
                    .send()
                    .await;
                let resp = match resp {
                    Ok(r) => r,
                    Err(e) => return Outcome::Failed(e.to_string()),
                };
                let code = resp.status().as_u16();
                if stalled {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                } else {
                    let mut body = resp.bytes_stream();
                    if body.next().await.is_none() {
                        return Outcome::Failed("no event".into());
                    }
                }
                Outcome::Http(code, String::new())
            }
        }
    }

    async fn http_request(
        &self,
        method: &str,
        path: &str,
        auth: Auth,
        content_type: Option<&str>,
        headers: Vec<(String, String)>,
        body: HttpBody,
    ) -> Outcome {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut rb = reqwest::Client::new().request(method, format!("{}{path}", self.http));
        match auth {
            Auth::Key => rb = rb.bearer_auth(KEY),
            Auth::Missing => {}
            Auth::Header(v) => rb = rb.header("authorization", v),
        }
        if let Some(ct) = content_type {
            rb = rb.header("content-type", ct);
        }
        for (k, v) in headers {
            rb = rb.header(k, v);
        }
        rb = match body {
            HttpBody::Bytes(b) => rb.body(b),
            HttpBody::Chunked(b, piece) => {
                let pieces: Vec<Result<Bytes, std::io::Error>> = b
                    .chunks(piece)
                    .map(|c| Ok(Bytes::copy_from_slice(c)))
                    .collect();
                rb.body(reqwest::Body::wrap_stream(futures::stream::iter(pieces)))
            }
        };
        match tokio::time::timeout(WAIT, rb.send()).await {
            Err(_) => Outcome::NoAnswer,
            Ok(Err(e)) => Outcome::Failed(format!("{e:?}")),
            Ok(Ok(resp)) => {
                let code = resp.status().as_u16();
                let www = resp
                    .headers()
                    .get("www-authenticate")
                    .map(|v| format!(" [www-authenticate: {}]", v.to_str().unwrap_or("?")))
                    .unwrap_or_default();
                let text = resp.text().await.unwrap_or_default();
                if code == 401 && www != " [www-authenticate: Bearer]" {
                    return Outcome::Failed(format!(
                        "401 without `WWW-Authenticate: Bearer`: {text}"
                    ));
                }
                Outcome::Http(code, text)
            }
        }
    }
}

/// Writes `pieces` to `addr`, `pause` apart, then reads until the server closes the
/// connection or [`WAIT`] passes. With `http1`, an answer is an HTTP status line;
/// without, anything the server sends before closing counts as its way of closing (an
/// HTTP/2 GOAWAY).
async fn raw_tcp(addr: &str, pieces: Vec<Vec<u8>>, pause: Duration, http1: bool) -> Outcome {
    let addr = addr.trim_start_matches("http://");
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    for piece in pieces {
        if tcp.write_all(&piece).await.is_err() {
            break;
        }
        tokio::time::sleep(pause).await;
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + WAIT;
    let closed = loop {
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Err(_) => break false,
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    };
    let text = String::from_utf8_lossy(&got).into_owned();
    match text.strip_prefix("HTTP/1.1 ").filter(|_| http1) {
        Some(rest) => Outcome::Http(
            rest.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0),
            text,
        ),
        None if closed => Outcome::Closed,
        None => Outcome::NoAnswer,
    }
}

/// One gRPC call over raw HTTP/2, with the key: `framed` is the request body as sent.
async fn raw_grpc(
    addr: &str,
    method: &str,
    content_type: &str,
    grpc_timeout: Option<&str>,
    framed: Vec<u8>,
    finish: bool,
) -> Outcome {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (client, connection) = match h2::client::handshake(tcp).await {
        Ok(x) => x,
        Err(e) => return Outcome::Failed(e.to_string()),
    };
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut client = client.ready().await.unwrap();
    let mut request = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}{method}"))
        .header("content-type", content_type)
        .header("te", "trailers")
        .header("authorization", format!("Bearer {KEY}"));
    if let Some(t) = grpc_timeout {
        request = request.header("grpc-timeout", t);
    }
    let (response, mut send) = client
        .send_request(request.body(()).unwrap(), false)
        .unwrap();
    // A server that refuses the call on its headers alone may end the stream before the
    // body goes out; its answer is still what the case checks.
    let _ = send.send_data(framed.into(), finish);
    let response = match tokio::time::timeout(WAIT, response).await {
        Err(_) => return Outcome::NoAnswer,
        Ok(Err(e)) => return Outcome::Failed(e.to_string()),
        Ok(Ok(r)) => r,
    };
    let (parts, mut body) = response.into_parts();
    if parts.status != 200 {
        return Outcome::Http(parts.status.as_u16(), String::new());
    }
    if let Some(s) = grpc_status(&parts.headers) {
        return s;
    }
    while let Some(chunk) = body.data().await {
        match chunk {
            Ok(c) => {
                let _ = body.flow_control().release_capacity(c.len());
            }
            Err(e) => return Outcome::Failed(e.to_string()),
        }
    }
    let outcome = match body.trailers().await {
        Ok(Some(t)) => grpc_status(&t).unwrap_or(Outcome::Failed("no grpc-status".into())),
        Ok(None) => Outcome::Failed("no trailers".into()),
        Err(e) => Outcome::Failed(e.to_string()),
    };
    drop(send);
    outcome
}

fn grpc_status(headers: &http::HeaderMap) -> Option<Outcome> {
    let code: i32 = headers.get("grpc-status")?.to_str().ok()?.parse().ok()?;
    let message = headers
        .get("grpc-message")
        .and_then(|m| m.to_str().ok())
        .map(percent_decode)
        .unwrap_or_default();
    Some(Outcome::Grpc(Code::from_i32(code), message))
}

/// gRPC's percent-encoding of `grpc-message`.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn write_key_file(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("api-keys");
    std::fs::write(
        &path,
        format!("# keys of the bad-input test\n{KEY}\n\n  {SECOND_KEY}  \n# retired-key\n"),
    )
    .unwrap();
    path
}

type Pending = Pin<Box<dyn Future<Output = (&'static str, Expect, Outcome, Duration)> + Send>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_input_gets_its_status_and_the_cluster_serves_on() {
    let dir = tempfile::tempdir().unwrap();
    let keys = write_key_file(dir.path());
    let read_timeout = READ_TIMEOUT.as_millis().to_string();
    let serve = Serve::start(&[
        "--tp",
        "1",
        "--api-key-file",
        keys.to_str().unwrap(),
        "--http-read-timeout-ms",
        &read_timeout,
    ]);
    let channel = Channel::from_shared(format!("http://{}", serve.endpoint))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let target = Target {
        grpc: serve.endpoint.clone(),
        http: serve.http.clone(),
        channel,
    };

    let cases = catalogue();
    assert!(cases.len() >= 30, "{} cases", cases.len());
    let pending: Vec<Pending> = cases
        .into_iter()
        .map(|c| {
            let target = target.clone();
            Box::pin(async move {
                let start = Instant::now();
                let got = target.run(c.req).await;
                (c.name, c.expect, got, start.elapsed())
            }) as Pending
        })
        .collect();
    let results = futures::future::join_all(pending).await;
    let wrong: Vec<String> = results
        .iter()
        .filter(|(_, expect, got, _)| !expect.met_by(got))
        .map(|(name, expect, got, took)| {
            let mut got = format!("{got:?}");
            got.truncate(400);
            format!("{name}: expected {expect:?}, got {got} after {took:?}")
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "{} of {} cases failed:\n{}",
        wrong.len(),
        results.len(),
        wrong.join("\n")
    );
    let model_404 = results.iter().find(|r| r.0.contains("model name")).unwrap();
    assert!(
        matches!(&model_404.2, Outcome::Http(_, body) if body.len() < 1000),
        "a client's value is clipped in the message"
    );
    // The read timeout, not the client, ended the silent connections.
    for (name, _, _, took) in &results {
        if name.contains("silence") || name.contains("sends nothing") {
            assert!(
                *took < READ_TIMEOUT + Duration::from_secs(2),
                "{name}: closed after {took:?}"
            );
        }
    }

    // The cluster serves normally afterwards, and holds nothing.
    let options = ClientOptions {
        api_key: Some(ApiKey::new(KEY).unwrap()),
        ..ClientOptions::default()
    };
    let mut client = Client::connect_with(&serve.endpoint, options)
        .await
        .unwrap();
    let r = client.generate(ok_request()).await.unwrap();
    assert_eq!(r.token_ids.len(), 2);
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/completions", serve.http))
        .bearer_auth(SECOND_KEY)
        .json(&ok_body())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    wait_idle(&serve.http, Duration::from_secs(5)).await;
    assert_eq!(metric(&serve.http, "tessera_kv_blocks_used").await, 0.0);
    assert_eq!(metric(&serve.http, "tessera_requests_running").await, 0.0);
    let text = reqwest::get(format!("{}/metrics", serve.http))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let refused = |api: &str| -> f64 {
        let series = format!("tessera_requests_unauthenticated_total{{api=\"{api}\"");
        text.lines()
            .filter(|l| l.starts_with(&series))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    // Every refused case was counted: five on each API.
    assert!(refused("grpc") >= 5.0, "{text}");
    assert!(refused("http") >= 5.0, "{text}");
    assert!(
        cluster_common::alive(serve.proc.pid()),
        "the coordinator is still running"
    );

    // The command-line clients send the key from the environment.
    let endpoint = serve.endpoint.clone();
    let out = tokio::task::spawn_blocking(move || {
        tessera()
            .args([
                "generate",
                "--endpoint",
                &endpoint,
                "--prompt-ids",
                "464,3290",
            ])
            .args(["--max-tokens", "3", "--json"])
            .env("TESSERA_API_KEY", KEY)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "tessera generate with TESSERA_API_KEY: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let endpoint = serve.endpoint.clone();
    let out = tokio::task::spawn_blocking(move || {
        tessera()
            .args(["generate", "--endpoint", &endpoint, "--prompt-ids", "464"])
            .env_remove("TESSERA_API_KEY")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("UNAUTHENTICATED"),
        "without a key: {stderr}"
    );
    let base = format!("{}/v1", serve.http);
    let out = tokio::task::spawn_blocking(move || {
        tessera()
            .args(["bench", "--openai-base-url", &base, "--num-prompts", "2"])
            .args([
                "--input-len",
                "4",
                "--output-len",
                "2",
                "--api-key",
                SECOND_KEY,
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "tessera bench against the OpenAI API with --api-key: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_idle(&serve.http, Duration::from_secs(5)).await;
}

#[test]
fn a_missing_or_empty_key_file_stops_start_up_and_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty-keys");
    std::fs::write(&empty, "# no key yet\n\n").unwrap();
    let missing = dir.path().join("missing-keys");
    for (file, why) in [(&empty, "no API key"), (&missing, "No such file")] {
        let out = tessera()
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--http-listen",
                "127.0.0.1:0",
            ])
            .args(["--tp", "1", "--api-key-file", file.to_str().unwrap()])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{file:?}: serve started");
        assert!(
            stderr.contains(file.to_str().unwrap()) && stderr.contains(why),
            "{file:?}: {stderr}"
        );
    }
}
