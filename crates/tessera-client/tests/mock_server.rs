//! The client against an in-process mock of the `Generation` service: connection
//! failures, status mapping, deadlines, streaming and the decode size limit.

use std::pin::Pin;
use std::time::{Duration, Instant};

use tessera_client::proto::generation_server::{Generation, GenerationServer};
use tessera_client::proto::{ModelInfoRequest, TokenizeRequest};
use tessera_client::{
    Client, ClientError, ClientOptions, Code, FinishReason, GenerateRequest, GenerateResponse,
    GenerateStreamResponse, ModelInfoResponse, Stream, TokenizeResponse,
};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

/// Behaviour is chosen by the prompt: `invalid`, `slow`, `big`, `truncated`; anything
/// else is echoed back.
struct Mock;

type MessageStream =
    Pin<Box<dyn Stream<Item = Result<GenerateStreamResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Generation for Mock {
    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<GenerateResponse>, Status> {
        let deadline_sent = request.metadata().get("grpc-timeout").is_some();
        let r = request.into_inner();
        match r.prompt.as_str() {
            "invalid" => Err(Status::invalid_argument("max_tokens: must be at least 1")),
            "slow" => {
                tokio::time::sleep(Duration::from_secs(10)).await;
                Err(Status::internal("the client should have given up"))
            }
            "big" => Ok(Response::new(GenerateResponse {
                text: "x".repeat(6 << 20),
                finish_reason: FinishReason::Length as i32,
                ..Default::default()
            })),
            prompt => Ok(Response::new(GenerateResponse {
                text: format!("{prompt}!"),
                token_ids: r.prompt_ids.clone(),
                finish_reason: FinishReason::Stop as i32,
                // Reports which optional fields arrived set, and whether a deadline did.
                matched_stop: format!(
                    "max_tokens={:?} temperature={:?} top_k={:?} top_p={:?} \
                     repetition_penalty={:?} stop={:?} deadline={deadline_sent}",
                    r.max_tokens, r.temperature, r.top_k, r.top_p, r.repetition_penalty, r.stop
                ),
                prompt_tokens: r.prompt_ids.len() as u32,
                completion_tokens: r.prompt_ids.len() as u32,
                seed: r.seed.unwrap_or(7),
                ..Default::default()
            })),
        }
    }

    type GenerateStreamStream = MessageStream;

    async fn generate_stream(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<MessageStream>, Status> {
        let r = request.into_inner();
        if r.prompt == "invalid" {
            return Err(Status::out_of_range("max_tokens: 5000 past the context"));
        }
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let chars: Vec<char> = r.prompt.chars().collect();
            let n = chars.len();
            for (i, c) in chars.into_iter().enumerate() {
                let last = i + 1 == n && r.prompt != "truncated";
                let message = GenerateStreamResponse {
                    token_ids: vec![c as u32],
                    text: c.to_string(),
                    logprobs: vec![-(i as f32)],
                    finish_reason: if last { FinishReason::Length as i32 } else { 0 },
                    prompt_tokens: if last { 3 } else { 0 },
                    completion_tokens: if last { n as u32 } else { 0 },
                    seed: if last { 99 } else { 0 },
                    ..Default::default()
                };
                if tx.send(Ok(message)).await.is_err() {
                    return;
                }
                if r.prompt == "slow" {
                    tokio::time::sleep(Duration::from_secs(10)).await;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn tokenize(
        &self,
        request: Request<TokenizeRequest>,
    ) -> Result<Response<TokenizeResponse>, Status> {
        let token_ids = request.into_inner().text.bytes().map(u32::from).collect();
        Ok(Response::new(TokenizeResponse { token_ids }))
    }

    async fn model_info(
        &self,
        _: Request<ModelInfoRequest>,
    ) -> Result<Response<ModelInfoResponse>, Status> {
        Ok(Response::new(ModelInfoResponse {
            name: "mock".into(),
            vocab_size: 50257,
            ..Default::default()
        }))
    }
}

/// Serves the mock on a free port; returns `host:port`.
async fn serve() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(GenerationServer::new(Mock))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    addr.to_string()
}

#[tokio::test]
async fn nothing_listening_is_a_connect_error_naming_the_endpoint() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = listener.local_addr().unwrap().to_string();
    drop(listener);
    let e = Client::connect(&endpoint).await.unwrap_err();
    assert!(matches!(e, ClientError::Connect { .. }), "{e:?}");
    let message = e.to_string();
    assert!(message.contains(&endpoint), "{message}");
    assert!(message.contains("refused"), "{message}");
}

#[tokio::test]
async fn a_peer_that_never_answers_times_out() {
    // Accepts TCP connections and never speaks HTTP/2.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let options = ClientOptions {
        connect_timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let started = Instant::now();
    let result = Client::connect_with(&endpoint, options).await;
    let elapsed = started.elapsed();
    // tonic may finish connecting before the HTTP/2 handshake; then the first call must
    // still fail rather than hang.
    if let Ok(mut client) = result {
        client.set_timeout(Some(Duration::from_millis(300)));
        let e = client.model_info().await.unwrap_err();
        assert!(
            matches!(e.code(), Some(Code::DeadlineExceeded | Code::Unavailable)),
            "{e:?}"
        );
    } else {
        let message = result.unwrap_err().to_string();
        assert!(message.contains(&endpoint), "{message}");
        assert!(message.contains("no answer within 0.3 s"), "{message}");
    }
    assert!(elapsed < Duration::from_secs(3), "took {elapsed:?}");
}

#[tokio::test]
async fn an_invalid_endpoint_is_refused_before_connecting() {
    let e = Client::connect("https://host").await.unwrap_err();
    assert!(matches!(e, ClientError::InvalidEndpoint { .. }), "{e:?}");
}

#[tokio::test]
async fn generate_round_trips_and_unset_fields_stay_unset() {
    let endpoint = serve().await;
    let mut client = Client::connect(&format!("http://{endpoint}"))
        .await
        .unwrap();
    let r = client
        .generate(GenerateRequest {
            prompt: "hi".into(),
            prompt_ids: vec![5, 6],
            max_tokens: Some(3),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(r.text, "hi!");
    assert_eq!(r.token_ids, [5, 6]);
    assert_eq!(r.finish_reason(), FinishReason::Stop);
    assert_eq!(r.seed, 7);
    assert_eq!(
        r.matched_stop,
        "max_tokens=Some(3) temperature=None top_k=None top_p=None \
         repetition_penalty=None stop=[] deadline=false"
    );
}

#[tokio::test]
async fn a_status_keeps_its_code_and_message() {
    let endpoint = serve().await;
    let mut client = Client::connect(&endpoint).await.unwrap();
    let e = client
        .generate(GenerateRequest {
            prompt: "invalid".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::InvalidArgument));
    assert_eq!(
        e.to_string(),
        "INVALID_ARGUMENT: max_tokens: must be at least 1"
    );
    let e = client
        .generate_stream(GenerateRequest {
            prompt: "invalid".into(),
            ..Default::default()
        })
        .await
        .err()
        .expect("a request error comes back from generate_stream itself");
    assert_eq!(
        e.to_string(),
        "OUT_OF_RANGE: max_tokens: 5000 past the context"
    );
}

#[tokio::test]
async fn the_call_timeout_is_sent_and_enforced() {
    let endpoint = serve().await;
    let mut client = Client::connect(&endpoint).await.unwrap();
    client.set_timeout(Some(Duration::from_secs(5)));
    let r = client
        .generate(GenerateRequest {
            prompt: "hi".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(
        r.matched_stop.ends_with("deadline=true"),
        "{}",
        r.matched_stop
    );

    client.set_timeout(Some(Duration::from_millis(200)));
    let started = Instant::now();
    let e = client
        .generate(GenerateRequest {
            prompt: "slow".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::DeadlineExceeded), "{e:?}");
    assert!(started.elapsed() < Duration::from_secs(3));

    // For a stream the deadline covers the whole stream, not just its start.
    let started = Instant::now();
    let mut stream = client
        .generate_stream(GenerateRequest {
            prompt: "slow".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(stream.message().await.unwrap().unwrap().text, "s");
    let e = stream.message().await.unwrap_err();
    assert_eq!(e.code(), Some(Code::DeadlineExceeded), "{e:?}");
    assert!(e.to_string().contains("0.2 s"), "{e}");
    assert!(
        stream.message().await.unwrap().is_none(),
        "ends after the error"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn a_stream_assembles_into_the_whole_completion() {
    let endpoint = serve().await;
    let mut client = Client::connect(&endpoint).await.unwrap();
    let mut stream = client
        .generate_stream(GenerateRequest {
            prompt: "héllo".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut pieces = Vec::new();
    let mut whole = GenerateResponse::default();
    while let Some(m) = stream.message().await.unwrap() {
        pieces.push(m.text.clone());
        tessera_client::accumulate(&mut whole, m);
    }
    assert_eq!(pieces, ["h", "é", "l", "l", "o"]);
    assert_eq!(whole.text, "héllo");
    assert_eq!(whole.logprobs, [0.0, -1.0, -2.0, -3.0, -4.0]);
    assert_eq!(whole.finish_reason(), FinishReason::Length);
    assert_eq!(
        (whole.prompt_tokens, whole.completion_tokens, whole.seed),
        (3, 5, 99)
    );

    let collected = client
        .generate_stream(GenerateRequest {
            prompt: "héllo".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .collect_response()
        .await
        .unwrap();
    assert_eq!(collected, whole);
}

#[tokio::test]
async fn a_stream_cut_short_is_an_error_not_a_short_completion() {
    let endpoint = serve().await;
    let mut client = Client::connect(&endpoint).await.unwrap();
    let e = client
        .generate_stream(GenerateRequest {
            prompt: "truncated".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .collect_response()
        .await
        .unwrap_err();
    assert!(matches!(e, ClientError::Protocol(_)), "{e:?}");
}

#[tokio::test]
async fn responses_past_tonics_default_4_mib_decode() {
    let endpoint = serve().await;
    let mut client = Client::connect(&endpoint).await.unwrap();
    let r = client
        .generate(GenerateRequest {
            prompt: "big".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(r.text.len(), 6 << 20);

    let options = ClientOptions {
        max_decoding_message_bytes: 1 << 20,
        ..Default::default()
    };
    let mut small = Client::connect_with(&endpoint, options).await.unwrap();
    let e = small
        .generate(GenerateRequest {
            prompt: "big".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::OutOfRange), "{e:?}");
}

#[tokio::test]
async fn tokenize_and_model_info() {
    let endpoint = serve().await;
    let mut client = Client::connect(&endpoint).await.unwrap();
    assert_eq!(client.tokenize("AB").await.unwrap(), [65, 66]);
    let info = client.model_info().await.unwrap();
    assert_eq!((info.name.as_str(), info.vocab_size), ("mock", 50257));
}
