//! The `tessera` binary: output contracts and clear failures on bad input.

mod common;

use std::process::{Command, Output};

use common::*;

fn tessera(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("tessera runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Fails with exit code 1 and a message containing every needle, without a panic.
fn fails_with(args: &[&str], needles: &[&str]) {
    let o = tessera(args);
    let err = stderr(&o);
    assert_eq!(
        o.status.code(),
        Some(1),
        "{args:?} should fail cleanly; stderr: {err}"
    );
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    for n in needles {
        assert!(err.contains(n), "{args:?}: stderr lacks `{n}`: {err}");
    }
}

/// `tessera run --model DIR --prompt-ids IDS [extra…]` fails with every needle.
fn run_fails_with(dir: &std::path::Path, ids: &str, extra: &[&str], needles: &[&str]) {
    let mut args = vec!["run", "--model", dir.to_str().unwrap(), "--prompt-ids", ids];
    args.extend_from_slice(extra);
    fails_with(&args, needles);
}

#[test]
fn run_json_is_one_object_on_the_last_line() {
    let dir = fixture("tiny-gpt2");
    let case = &expected("tiny-gpt2").cases[0];
    let ids: Vec<String> = case.prompt_ids.iter().map(|i| i.to_string()).collect();
    let o = tessera(&[
        "run",
        "--model",
        dir.to_str().unwrap(),
        "--prompt-ids",
        &ids.join(","),
        "--max-tokens",
        "8",
        "--tp",
        "2",
        "--pp",
        "3",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let stdout = String::from_utf8(o.stdout).unwrap();
    let last = stdout.lines().last().expect("output");
    let v: serde_json::Value = serde_json::from_str(last).expect("last line is JSON");
    let tokens: Vec<u32> = serde_json::from_value(v["token_ids"].clone()).unwrap();
    assert_eq!(tokens, case.greedy_token_ids);
    assert_eq!(
        v["prompt_ids"].as_array().unwrap().len(),
        case.prompt_ids.len()
    );
    assert_eq!(v["logprobs"].as_array().unwrap().len(), 8);
    assert!(v["logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .all(|l| l.as_f64().unwrap() < 0.0));
    for field in ["prefill_ms", "decode_ms", "decode_tokens_per_s"] {
        assert!(v[field].as_f64().unwrap() > 0.0, "{field}");
    }
    assert!(v["text"].is_string());
}

#[test]
fn run_prints_text_from_a_text_prompt() {
    let o = tessera(&[
        "run",
        "--preset",
        "gpt2-tiny",
        "--prompt",
        "Hello world",
        "--max-tokens",
        "3",
        "--tp",
        "2",
        "--ignore-eos",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("Hello world"));
}

#[test]
fn missing_checkpoint_is_named() {
    run_fails_with(
        std::path::Path::new("/nonexistent/model"),
        "1",
        &[],
        &["/nonexistent/model"],
    );
}

#[test]
fn corrupt_checkpoint_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixture("tiny-gpt2");
    std::fs::copy(src.join("config.json"), tmp.path().join("config.json")).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    std::fs::write(
        tmp.path().join("model.safetensors"),
        &bytes[..bytes.len() / 3],
    )
    .unwrap();
    run_fails_with(
        tmp.path(),
        "1",
        &[],
        &["corrupt checkpoint", "model.safetensors"],
    );
    std::fs::write(tmp.path().join("config.json"), "{ not json").unwrap();
    run_fails_with(tmp.path(), "1", &[], &["config.json"]);
}

#[test]
fn tensor_of_the_wrong_shape_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixture("tiny-gpt2");
    std::fs::copy(
        src.join("model.safetensors"),
        tmp.path().join("model.safetensors"),
    )
    .unwrap();
    let config = std::fs::read_to_string(src.join("config.json"))
        .unwrap()
        .replace("\"n_inner\": null", "\"n_inner\": 192");
    std::fs::write(tmp.path().join("config.json"), config).unwrap();
    run_fails_with(
        tmp.path(),
        "1",
        &[],
        &["h.0.mlp.c_fc.weight", "[96, 384]", "[96, 192]"],
    );
}

#[test]
fn token_id_beyond_the_vocabulary_is_refused() {
    let dir = fixture("tiny-gpt2");
    run_fails_with(&dir, "1,1000", &[], &["1000", "vocabulary size 1000"]);
}

#[test]
fn prompt_longer_than_the_context_is_refused() {
    let dir = fixture("tiny-gpt2");
    let ids = vec!["5"; 65].join(",");
    run_fails_with(&dir, &ids, &[], &["65 tokens", "context", "64"]);
}

#[test]
fn impossible_splits_name_the_numbers() {
    let dir = fixture("tiny-gpt2");
    run_fails_with(&dir, "1", &["--tp", "5"], &["tp=5", "12 attention heads"]);
    run_fails_with(&dir, "1", &["--pp", "7"], &["pp=7", "6 layers"]);
    fails_with(
        &["model", "info", "gpt3-175b", "--tp", "7"],
        &["tp=7", "96 attention heads"],
    );
}

#[test]
fn bad_sampling_flags_name_the_field() {
    fails_with(
        &[
            "run",
            "--preset",
            "gpt2-tiny",
            "--prompt-ids",
            "1",
            "--top-p",
            "1.5",
        ],
        &["top_p", "1.5"],
    );
    fails_with(
        &[
            "run",
            "--preset",
            "gpt2-tiny",
            "--prompt-ids",
            "1",
            "--temperature=-1",
        ],
        &["temperature"],
    );
}

#[test]
fn model_info_sizes_gpt3_175b_on_16_workers() {
    let o = tessera(&[
        "model",
        "info",
        "gpt3-175b",
        "--tp",
        "8",
        "--pp",
        "2",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let params = v["params"].as_u64().unwrap();
    assert!(
        (174_000_000_000..176_000_000_000).contains(&params),
        "{params}"
    );
    assert_eq!(v["kv_bytes_per_token_bf16"].as_u64(), Some(4_718_592));
    let workers = v["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 16);
    // Each of 16 workers holds roughly 1/16 of the bf16 weights (~21.9 GB).
    for w in workers {
        let b = w["bytes_bf16"].as_u64().unwrap() as f64;
        assert!((20e9..24e9).contains(&b), "{w}");
    }
}

#[test]
fn synth_checkpoint_round_trips_through_the_reader() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("synth");
    let o = tessera(&[
        "model",
        "synth",
        "--preset",
        "gpt2-tiny",
        "--seed",
        "5",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let args = |src: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = [
            "run",
            "--prompt-ids",
            "464,2068,7586",
            "--max-tokens",
            "6",
            "--ignore-eos",
            "--json",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(src.iter().map(|s| s.to_string()));
        a
    };
    let tokens = |a: Vec<String>| -> serde_json::Value {
        let o = Command::new(env!("CARGO_BIN_EXE_tessera"))
            .args(&a)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value =
            serde_json::from_str(String::from_utf8(o.stdout).unwrap().lines().last().unwrap())
                .unwrap();
        v["token_ids"].clone()
    };
    let from_disk = tokens(args(&["--model", out.to_str().unwrap()]));
    let in_memory = tokens(args(&["--preset", "gpt2-tiny", "--synth-seed", "5"]));
    assert_eq!(from_disk, in_memory);
}

/// `--backend cuda` where there is no CUDA (this build lacks the feature, or the machine
/// has no driver or GPU) exits with a message that names CUDA and the CPU backend.
#[test]
fn a_cuda_worker_without_cuda_fails_with_a_message_not_a_panic() {
    if std::path::Path::new("/proc/driver/nvidia").exists() {
        eprintln!("skipped: this machine has an NVIDIA driver, so the probe may succeed");
        return;
    }
    fails_with(
        &[
            "worker",
            "--coordinator",
            "127.0.0.1:9",
            "--backend",
            "cuda",
            "--coordinator-timeout",
            "1",
        ],
        &["CUDA", "--backend cpu"],
    );
}

/// `tessera kernels` compiles every kernel source for sm_80 and sm_90 and counts every
/// kernel of `sources.rs`; without NVRTC (or in a build without CUDA) it says what to do.
#[test]
fn kernels_compile_for_sm80_and_sm90_or_say_what_is_missing() {
    let expected = tessera_runtime::cuda::sources::exported_names().len();
    for arch in ["sm_80", "sm_90"] {
        let o = tessera(&["kernels", "--arch", arch]);
        let err = stderr(&o);
        assert!(!err.contains("panicked"), "{err}");
        if !o.status.success() {
            assert_eq!(o.status.code(), Some(1), "{err}");
            if err.contains("built without CUDA support") {
                assert!(err.contains("--features cuda"), "{err}");
                eprintln!("skipped: this tessera was built without the cuda feature");
                return;
            }
            assert!(
                err.contains("pip install nvidia-cuda-nvrtc") && err.contains("LD_LIBRARY_PATH"),
                "{err}"
            );
            assert!(
                std::env::var_os("TESSERA_REQUIRE_NVRTC").is_none(),
                "TESSERA_REQUIRE_NVRTC is set but `tessera kernels` found no NVRTC: {err}"
            );
            eprintln!("skipped: libnvrtc is not on the loader's path");
            return;
        }
        let out = String::from_utf8_lossy(&o.stdout);
        let lines: Vec<&str> = out.lines().collect();
        assert!(
            lines[0].starts_with("NVRTC ") && lines[0].ends_with(arch),
            "{out}"
        );
        let files = &lines[1..lines.len() - 1];
        assert_eq!(
            files.len(),
            tessera_runtime::cuda::sources::FILES.len(),
            "{out}"
        );
        let mut listed = 0;
        for line in files {
            let (file, rest) = line.split_once(": ").expect("file: kernels");
            assert!(file.ends_with(".cu"), "{line}");
            listed += rest
                .split(' ')
                .next()
                .and_then(|n| n.parse::<usize>().ok())
                .expect("a kernel count");
            assert!(rest.ends_with("bytes of PTX"), "{line}");
        }
        assert_eq!(listed, expected, "{out}");
        assert_eq!(
            lines.last().copied(),
            Some(format!("{expected} kernels compiled").as_str()),
            "{out}"
        );
    }
    fails_with(&["kernels", "--arch", "compute_80"], &["compute_80"]);
}

/// `serve --backend cuda` refuses what cuda workers would refuse, before anything starts.
#[test]
fn serve_checks_the_cuda_flags_before_starting() {
    if !tessera_runtime::cuda::COMPILED {
        fails_with(
            &["serve", "--backend", "cuda"],
            &["built without CUDA support", "--features cuda"],
        );
        return;
    }
    fails_with(
        &["serve", "--backend", "cuda", "--dtype", "f32"],
        &["--dtype f32", "bf16"],
    );
    fails_with(
        &["serve", "--backend", "cuda", "--tp", "2", "--devices", "0"],
        &["--devices", "1 GPU(s) for 2 workers"],
    );
    fails_with(
        &[
            "serve",
            "--backend",
            "cuda",
            "--tp",
            "2",
            "--devices",
            "1,1",
        ],
        &["GPU 1 twice"],
    );
    fails_with(
        &["serve", "--backend", "cpu", "--devices", "0,1"],
        &["--devices", "--backend cuda"],
    );
}
