//! `tessera generate`: one request to a running cluster's public API, text or JSON out.

use std::io::Write;
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use serde::Serialize;
use tessera_client::{Client, ClientOptions, FinishReason, GenerateRequest, GenerateResponse};

use crate::api_key_arg::ApiKeyArg;

/// Arguments of `tessera generate`.
///
/// The generation settings are options: one not given is left unset in the request, so
/// the server's default applies rather than a second copy of it kept here.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// The coordinator's public API: host:port, http://host:port, or https://host:port
    /// when it speaks TLS.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:50051")]
    pub endpoint: String,
    #[command(flatten)]
    pub tls: crate::tls_args::CaCertArg,
    /// Prompt text, tokenized by the server.
    #[arg(
        long,
        value_name = "TEXT",
        allow_hyphen_values = true,
        conflicts_with = "prompt_ids",
        required_unless_present = "prompt_ids"
    )]
    pub prompt: Option<String>,
    /// Prompt as comma-separated token ids.
    #[arg(long, value_delimiter = ',', value_name = "IDS")]
    pub prompt_ids: Option<Vec<u32>>,
    /// Print the text as it is generated (GenerateStream) rather than all at the end.
    #[arg(long)]
    pub stream: bool,
    /// Print one JSON object on the last line of stdout instead of the text: text,
    /// token_ids, logprobs (with --logprobs), finish_reason, matched_stop, prompt_tokens,
    /// completion_tokens, seed.
    #[arg(long)]
    pub json: bool,
    /// New tokens to generate at most (server default: 16).
    #[arg(long, value_name = "N")]
    pub max_tokens: Option<u32>,
    /// Softmax temperature, ≥ 0 (server default: 0, greedy decoding).
    #[arg(long, value_name = "T")]
    pub temperature: Option<f32>,
    /// Sample among the K most likely tokens (server default: 0, all tokens).
    #[arg(long, value_name = "K")]
    pub top_k: Option<u32>,
    /// Sample from the smallest set of tokens whose probability reaches P, in (0, 1]
    /// (server default: 1, all tokens).
    #[arg(long, value_name = "P")]
    pub top_p: Option<f32>,
    /// Sampler seed: the same seed gives the same tokens at every split of the cluster
    /// (server default: one it picks and reports; see --json).
    #[arg(long, value_name = "S")]
    pub seed: Option<u64>,
    /// Penalise tokens already in the sequence, > 0 (server default: 1, off; 1.1–1.3 is
    /// typical).
    #[arg(long, value_name = "R")]
    pub repetition_penalty: Option<f32>,
    /// End generation when the text contains STR, which is not printed; repeat the flag
    /// for several stop strings.
    #[arg(long = "stop", value_name = "STR", allow_hyphen_values = true)]
    pub stop: Vec<String>,
    /// Keep generating past the end-of-text token.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Ask for the log-probability of every generated token (shown with --json).
    #[arg(long)]
    pub logprobs: bool,
    /// Give up after SECS seconds (the whole stream, with --stream); the deadline is
    /// also sent to the server. Default: no limit.
    #[arg(long, value_name = "SECS", value_parser = parse_timeout)]
    pub timeout: Option<Duration>,
    #[command(flatten)]
    pub api_key: ApiKeyArg,
}

impl GenerateArgs {
    fn request(&self) -> GenerateRequest {
        GenerateRequest {
            prompt: self.prompt.clone().unwrap_or_default(),
            prompt_ids: self.prompt_ids.clone().unwrap_or_default(),
            max_tokens: self.max_tokens,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            seed: self.seed,
            repetition_penalty: self.repetition_penalty,
            stop: self.stop.clone(),
            ignore_eos: self.ignore_eos,
            logprobs: self.logprobs,
        }
    }
}

fn parse_timeout(s: &str) -> std::result::Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a number of seconds"))?;
    if secs.is_nan() || secs <= 0.0 {
        return Err(format!("the timeout must be more than 0 seconds, not {s}"));
    }
    Duration::try_from_secs_f64(secs).map_err(|e| format!("`{s}`: {e}"))
}

/// The `--json` line.
#[derive(Serialize)]
struct GenerateReport<'a> {
    text: &'a str,
    token_ids: &'a [u32],
    #[serde(skip_serializing_if = "Option::is_none")]
    logprobs: Option<&'a [f32]>,
    /// `length` or `stop`; null if the server left it unset.
    finish_reason: Option<&'static str>,
    /// The stop string that ended generation; null if none did.
    matched_stop: Option<&'a str>,
    prompt_tokens: u32,
    completion_tokens: u32,
    seed: u64,
}

impl<'a> GenerateReport<'a> {
    fn new(r: &'a GenerateResponse, with_logprobs: bool) -> Self {
        GenerateReport {
            text: &r.text,
            token_ids: &r.token_ids,
            logprobs: with_logprobs.then_some(r.logprobs.as_slice()),
            finish_reason: match FinishReason::try_from(r.finish_reason) {
                Ok(FinishReason::Length) => Some("length"),
                Ok(FinishReason::Stop) => Some("stop"),
                Ok(FinishReason::Unspecified) | Err(_) => None,
            },
            matched_stop: (!r.matched_stop.is_empty()).then_some(r.matched_stop.as_str()),
            prompt_tokens: r.prompt_tokens,
            completion_tokens: r.completion_tokens,
            seed: r.seed,
        }
    }
}

pub fn generate(args: GenerateArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(generate_async(args))
}

async fn generate_async(args: GenerateArgs) -> Result<()> {
    let options = ClientOptions {
        call_timeout: args.timeout,
        ..args.api_key.client_options(&args.tls)
    };
    let mut client = Client::connect_with(&args.endpoint, options).await?;
    let request = args.request();
    let response = if args.stream {
        let mut stream = client.generate_stream(request).await?;
        let mut response = GenerateResponse::default();
        let mut stdout = std::io::stdout().lock();
        let mut printed = false;
        loop {
            let message = match stream.message().await {
                Ok(Some(message)) => message,
                Ok(None) => break,
                Err(e) => {
                    // End the partial line so the error on stderr starts on its own.
                    if printed {
                        writeln!(stdout)?;
                    }
                    return Err(e.into());
                }
            };
            if !args.json && !message.text.is_empty() {
                stdout.write_all(message.text.as_bytes())?;
                stdout.flush()?;
                printed = true;
            }
            tessera_client::accumulate(&mut response, message);
        }
        if !args.json {
            writeln!(stdout)?;
        }
        response
    } else {
        let response = client.generate(request).await?;
        if !args.json {
            println!("{}", response.text);
        }
        response
    };
    if args.json {
        let report = GenerateReport::new(&response, args.logprobs);
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: GenerateArgs,
    }

    fn parse(args: &[&str]) -> std::result::Result<GenerateArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("generate").chain(args.iter().copied())).map(|c| c.args)
    }

    #[test]
    fn flags_not_given_stay_unset_in_the_request() {
        let a = parse(&["--prompt", "Hello"]).unwrap();
        assert_eq!(a.endpoint, "127.0.0.1:50051");
        let r = a.request();
        assert_eq!(r.prompt, "Hello");
        assert!(r.prompt_ids.is_empty());
        assert_eq!(
            (r.max_tokens, r.temperature, r.top_k, r.top_p),
            (None, None, None, None)
        );
        assert_eq!((r.seed, r.repetition_penalty), (None, None));
        assert!(r.stop.is_empty() && !r.ignore_eos && !r.logprobs);
        assert_eq!(a.timeout, None);
    }

    #[test]
    fn every_flag_reaches_the_request() {
        let a = parse(&[
            "--endpoint",
            "http://10.0.0.1:7000",
            "--prompt-ids",
            "1,2,3",
            "--max-tokens",
            "8",
            "--temperature",
            "0.7",
            "--top-k",
            "40",
            "--top-p",
            "0.9",
            "--seed",
            "42",
            "--repetition-penalty",
            "1.2",
            "--stop",
            "\n",
            "--stop",
            "---",
            "--ignore-eos",
            "--logprobs",
            "--timeout",
            "2.5",
        ])
        .unwrap();
        assert_eq!(a.endpoint, "http://10.0.0.1:7000");
        assert_eq!(a.timeout, Some(Duration::from_millis(2500)));
        let r = a.request();
        assert_eq!(r.prompt, "");
        assert_eq!(r.prompt_ids, [1, 2, 3]);
        assert_eq!(r.max_tokens, Some(8));
        assert_eq!(r.temperature, Some(0.7));
        assert_eq!(r.top_k, Some(40));
        assert_eq!(r.top_p, Some(0.9));
        assert_eq!(r.seed, Some(42));
        assert_eq!(r.repetition_penalty, Some(1.2));
        assert_eq!(r.stop, ["\n", "---"]);
        assert!(r.ignore_eos && r.logprobs);
    }

    #[test]
    fn exactly_one_prompt_form_and_a_positive_timeout() {
        assert!(parse(&[]).is_err());
        assert!(parse(&["--prompt", "a", "--prompt-ids", "1"]).is_err());
        assert!(parse(&["--prompt-ids", "1,x"]).is_err());
        for bad in ["0", "-1", "nan", "soon"] {
            assert!(
                parse(&["--prompt", "a", "--timeout", bad]).is_err(),
                "--timeout {bad}"
            );
        }
    }

    #[test]
    fn the_json_report_names_the_finish_reason_and_omits_unasked_logprobs() {
        let r = GenerateResponse {
            text: "Hi".into(),
            token_ids: vec![17, 18],
            logprobs: vec![-0.25, -1.5],
            finish_reason: FinishReason::Stop as i32,
            matched_stop: "\n".into(),
            prompt_tokens: 3,
            completion_tokens: 2,
            seed: 9,
        };
        let v: serde_json::Value =
            serde_json::from_str(&serde_json::to_string(&GenerateReport::new(&r, true)).unwrap())
                .unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "text": "Hi", "token_ids": [17, 18], "logprobs": [-0.25, -1.5],
                "finish_reason": "stop", "matched_stop": "\n", "prompt_tokens": 3,
                "completion_tokens": 2, "seed": 9
            })
        );
        let r = GenerateResponse {
            finish_reason: FinishReason::Length as i32,
            matched_stop: String::new(),
            ..r
        };
        let v = serde_json::to_value(GenerateReport::new(&r, false)).unwrap();
        assert!(v.get("logprobs").is_none());
        assert_eq!(v["finish_reason"], "length");
        assert!(v["matched_stop"].is_null());
    }
}
