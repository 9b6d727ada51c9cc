//! Clusters of real processes on 127.0.0.1 give exactly the tokens of `tessera run`, at
//! every split, one request at a time or sixteen at once; malformed requests are refused
//! with a status naming the field while the cluster keeps serving.

mod cluster_common;
mod common;

use std::time::Duration;

use cluster_common::{run_json, token_ids, wait_serving, Serve};
use common::fixture;
use tessera_client::{Code, GenerateRequest};
use tessera_model::Tokenizer;

const MODEL: &str = "tiny-gpt2";

/// A prompt, a length, and sampling flags as `tessera run` takes them.
struct Case {
    prompt_ids: Vec<u32>,
    max_tokens: u32,
    sampled: bool,
}

impl Case {
    fn run_args(&self) -> Vec<String> {
        let ids: Vec<String> = self.prompt_ids.iter().map(|t| t.to_string()).collect();
        let mut a = vec![
            "--model".into(),
            fixture(MODEL).display().to_string(),
            "--prompt-ids".into(),
            ids.join(","),
            "--max-tokens".into(),
            self.max_tokens.to_string(),
            "--ignore-eos".into(),
        ];
        if self.sampled {
            a.extend(
                [
                    "--temperature",
                    "0.9",
                    "--top-k",
                    "40",
                    "--top-p",
                    "0.95",
                    "--seed",
                    "11",
                ]
                .map(String::from),
            );
        }
        a
    }

    fn request(&self) -> GenerateRequest {
        GenerateRequest {
            prompt_ids: self.prompt_ids.clone(),
            max_tokens: Some(self.max_tokens),
            ignore_eos: true,
            temperature: self.sampled.then_some(0.9),
            top_k: self.sampled.then_some(40),
            top_p: self.sampled.then_some(0.95),
            seed: Some(11),
            ..Default::default()
        }
    }

    fn expected(&self) -> Vec<u32> {
        let args = self.run_args();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        token_ids(&run_json(&args))
    }
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            prompt_ids: vec![464, 13, 7, 99, 250],
            max_tokens: 24,
            sampled: false,
        },
        Case {
            prompt_ids: vec![1],
            max_tokens: 12,
            sampled: false,
        },
        Case {
            prompt_ids: (0..30).map(|i| (i * 37 % 1000) as u32).collect(),
            max_tokens: 20,
            sampled: true,
        },
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_split_gives_the_tokens_of_run() {
    let cases = cases();
    let expected: Vec<Vec<u32>> = cases.iter().map(Case::expected).collect();
    let model = fixture(MODEL).display().to_string();
    for (tp, pp) in [(2, 1), (1, 2), (2, 2), (3, 1)] {
        let (tp_s, pp_s) = (tp.to_string(), pp.to_string());
        let serve = Serve::start(&["--model", &model, "--tp", &tp_s, "--pp", &pp_s]);
        assert_eq!(serve.workers().len(), tp * pp, "one process per shard");
        let mut client = wait_serving(&serve.endpoint, Duration::from_secs(30)).await;
        let info = client.model_info().await.unwrap();
        assert_eq!((info.tp, info.pp), (tp as u32, pp as u32));
        assert_eq!(info.workers.len(), tp * pp);
        for (case, want) in cases.iter().zip(&expected) {
            let got = client.generate(case.request()).await.unwrap();
            assert_eq!(&got.token_ids, want, "tp={tp} pp={pp} unary");
            let streamed = client
                .generate_stream(case.request())
                .await
                .unwrap()
                .collect_response()
                .await
                .unwrap();
            assert_eq!(&streamed.token_ids, want, "tp={tp} pp={pp} stream");
            assert_eq!(streamed.completion_tokens as usize, want.len());
            assert_eq!(streamed.prompt_tokens as usize, case.prompt_ids.len());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_concurrent_streams_each_get_their_own_tokens() {
    let model = fixture(MODEL).display().to_string();
    let serve = Serve::start(&["--model", &model, "--tp", "2"]);
    wait_serving(&serve.endpoint, Duration::from_secs(30)).await;
    let cases: Vec<Case> = (0..16u32)
        .map(|i| Case {
            prompt_ids: (0..(1 + i * 3 % 17))
                .map(|j| (i * 61 + j * 7) % 1000)
                .collect(),
            max_tokens: 8 + (i * 5) % 30,
            sampled: i % 3 == 0,
        })
        .collect();
    let expected: Vec<Vec<u32>> = cases.iter().map(Case::expected).collect();
    let tokenizer = Tokenizer::gpt2();
    let mut tasks = Vec::new();
    for case in &cases {
        let endpoint = serve.endpoint.clone();
        let req = case.request();
        tasks.push(tokio::spawn(async move {
            let mut c = tessera_client::Client::connect(&endpoint).await.unwrap();
            let mut stream = c.generate_stream(req).await.unwrap();
            let mut ids = Vec::new();
            let mut text = String::new();
            let mut messages = 0;
            while let Some(m) = stream.message().await.unwrap() {
                messages += 1;
                ids.extend(m.token_ids);
                text.push_str(&m.text);
            }
            (ids, text, messages)
        }));
    }
    for (i, (task, want)) in tasks.into_iter().zip(&expected).enumerate() {
        let (ids, text, messages) = task.await.unwrap();
        assert_eq!(&ids, want, "request {i}");
        assert_eq!(
            messages,
            want.len(),
            "one message per token for request {i}"
        );
        assert_eq!(text, tokenizer.decode(want).unwrap(), "request {i} text");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_are_refused_naming_the_field() {
    let model = fixture(MODEL).display().to_string();
    let serve = Serve::start(&["--model", &model, "--tp", "2"]);
    let mut client = wait_serving(&serve.endpoint, Duration::from_secs(30)).await;
    let info = client.model_info().await.unwrap();
    let ctx = info.context_length;
    let ok = || GenerateRequest {
        prompt_ids: vec![5, 6, 7],
        max_tokens: Some(4),
        ..Default::default()
    };
    let bad: Vec<(&str, GenerateRequest, Code, &str)> = vec![
        (
            "no prompt",
            GenerateRequest::default(),
            Code::InvalidArgument,
            "prompt",
        ),
        (
            "max_tokens 0",
            GenerateRequest {
                max_tokens: Some(0),
                ..ok()
            },
            Code::InvalidArgument,
            "max_tokens",
        ),
        (
            "max_tokens past the context",
            GenerateRequest {
                max_tokens: Some(ctx),
                ..ok()
            },
            Code::OutOfRange,
            "max_tokens",
        ),
        (
            "negative temperature",
            GenerateRequest {
                temperature: Some(-1.0),
                ..ok()
            },
            Code::InvalidArgument,
            "temperature",
        ),
        (
            "NaN temperature",
            GenerateRequest {
                temperature: Some(f32::NAN),
                ..ok()
            },
            Code::InvalidArgument,
            "temperature",
        ),
        (
            "top_p 0",
            GenerateRequest {
                top_p: Some(0.0),
                ..ok()
            },
            Code::InvalidArgument,
            "top_p",
        ),
        (
            "top_p above 1",
            GenerateRequest {
                top_p: Some(1.01),
                ..ok()
            },
            Code::InvalidArgument,
            "top_p",
        ),
        (
            "token id at the vocabulary size",
            GenerateRequest {
                prompt_ids: vec![5, info.vocab_size],
                ..ok()
            },
            Code::InvalidArgument,
            "prompt_ids",
        ),
        (
            "empty stop string",
            GenerateRequest {
                stop: vec!["x".into(), String::new()],
                ..ok()
            },
            Code::InvalidArgument,
            "stop",
        ),
        (
            "10 MB prompt",
            GenerateRequest {
                prompt: "word ".repeat(2 << 20),
                max_tokens: Some(4),
                ..Default::default()
            },
            Code::OutOfRange,
            "prompt",
        ),
    ];
    for (what, req, code, field) in bad {
        for stream in [false, true] {
            let err = if stream {
                match client.generate_stream(req.clone()).await {
                    Ok(s) => s.collect_response().await.unwrap_err(),
                    Err(e) => e,
                }
            } else {
                client.generate(req.clone()).await.unwrap_err()
            };
            let status = err.status().unwrap_or_else(|| panic!("{what}: {err}"));
            assert_eq!(status.code(), code, "{what}: {}", status.message());
            assert!(
                status.message().starts_with(field),
                "{what}: `{}` should name {field}",
                status.message()
            );
        }
        // The cluster still serves.
        let good = client.generate(ok()).await.unwrap();
        assert_eq!(good.token_ids.len(), 4, "after {what}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reflection_and_the_generate_command() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let model = fixture(MODEL).display().to_string();
    let serve = Serve::start(&["--model", &model, "--tp", "2"]);
    wait_serving(&serve.endpoint, Duration::from_secs(30)).await;
    let url = format!("http://{}", serve.endpoint);

    let channel = tonic::transport::Endpoint::from_shared(url)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel.clone());
    for service in ["", "tessera.v1.Generation"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status();
        assert_eq!(status, ServingStatus::Serving, "service `{service}`");
    }

    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let answer = answers.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        panic!("not a service list: {answer:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in ["tessera.v1.Generation", "grpc.health.v1.Health"] {
        assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
    }
    assert!(
        !names.iter().any(|n| n.starts_with("tessera.worker")),
        "the internal worker protocol is not advertised: {names:?}"
    );

    // `tessera generate --stream` prints the completion as it streams; `--json` the report.
    let case = &cases()[0];
    let want = case.expected();
    let ids: Vec<String> = case.prompt_ids.iter().map(|t| t.to_string()).collect();
    let max = case.max_tokens.to_string();
    let base = [
        "generate",
        "--endpoint",
        &serve.endpoint,
        "--prompt-ids",
        &ids.join(","),
        "--max-tokens",
        &max,
        "--ignore-eos",
    ];
    let out = cluster_common::tessera()
        .args(base)
        .arg("--stream")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = Tokenizer::gpt2().decode(&want).unwrap();
    assert_eq!(String::from_utf8(out.stdout).unwrap(), format!("{text}\n"));
    let out = cluster_common::tessera()
        .args(base)
        .args(["--json", "--logprobs"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .last()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(token_ids(&report), want);
    assert_eq!(report["finish_reason"], "length");
    assert_eq!(report["logprobs"].as_array().unwrap().len(), want.len());
    let out = cluster_common::tessera()
        .args([
            "generate",
            "--endpoint",
            &serve.endpoint,
            "--prompt-ids",
            "1",
            "--max-tokens",
            "0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("INVALID_ARGUMENT") && err.contains("max_tokens"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_from_the_example_config_serves_tp2_pp2() {
    let config = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../cluster/local-tp2-pp2.toml")
        .display()
        .to_string();
    let cluster = cluster_common::Manual::start(&["--config", &config], 4, &[]);
    let mut client = wait_serving(&cluster.endpoint, Duration::from_secs(60)).await;
    let info = client.model_info().await.unwrap();
    assert_eq!((info.tp, info.pp, info.name.as_str()), (2, 2, "gpt2-tiny"));
    let stages: Vec<(u32, u32)> = info.workers.iter().map(|w| (w.stage, w.tp_rank)).collect();
    assert_eq!(stages, vec![(0, 0), (0, 1), (1, 0), (1, 1)]);
    let want = token_ids(&run_json(&[
        "--preset",
        "gpt2-tiny",
        "--prompt-ids",
        "11,12,13",
        "--max-tokens",
        "6",
        "--ignore-eos",
    ]));
    let got = client
        .generate(GenerateRequest {
            prompt_ids: vec![11, 12, 13],
            max_tokens: Some(6),
            ignore_eos: true,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(got.token_ids, want);
}
