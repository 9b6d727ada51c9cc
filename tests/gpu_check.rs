//! `tessera gpu-check` and `scripts/gpu-check.sh` where there is no GPU: clear failures,
//! never a panic, and the floor arithmetic of `--dry-run` against `tessera model info`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn tessera(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("tessera runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn has_nvidia_driver() -> bool {
    Path::new("/proc/driver/nvidia").exists()
}

/// Without a driver (or in a build without CUDA) the command exits 1 with a message
/// that names CUDA and says what is missing.
#[test]
fn gpu_check_without_a_driver_says_so() {
    if has_nvidia_driver() {
        eprintln!("skipped: this machine has an NVIDIA driver");
        return;
    }
    let o = tessera(&["gpu-check", "--out", "/nonexistent/never-written"]);
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains("CUDA"), "{err}");
    if err.contains("built without CUDA support") {
        assert!(err.contains("--features cuda"), "{err}");
    } else {
        assert!(err.contains("no CUDA driver found"), "{err}");
        assert!(err.contains("libcuda.so.1"), "{err}");
    }
    // Nothing ran, so nothing was written and no table was printed.
    assert!(text(&o.stdout).is_empty(), "{}", text(&o.stdout));
}

fn json(o: &Output) -> serde_json::Value {
    assert!(o.status.success(), "{}", text(&o.stderr));
    serde_json::from_slice(&o.stdout).expect("JSON")
}

/// The bytes a decode step of gpt3-175b TP=8 rank 0 reads are the rank's bf16 weights as
/// `tessera model info` counts them, less the position table (a step reads only its
/// tokens' rows), plus those rows and the embedding rows, plus the KV cache; the floors
/// follow from the ceilings given.
#[test]
fn dry_run_floors_agree_with_model_info() {
    let info = json(&tessera(&[
        "model",
        "info",
        "gpt3-175b",
        "--tp",
        "8",
        "--json",
    ]));
    let rank0 = info["workers"][0]["bytes_bf16"].as_u64().unwrap();
    let d = info["n_embd"].as_u64().unwrap();
    let positions = info["n_positions"].as_u64().unwrap();
    let layers = info["n_layer"].as_u64().unwrap();
    // The model's KV bytes per token, over eight ranks.
    let kv_per_token = info["kv_bytes_per_token_bf16"].as_u64().unwrap() / 8;
    assert_eq!(rank0, 43_707_555_840);

    let dir = tempfile::tempdir().unwrap();
    let o = tessera(&[
        "gpu-check",
        "--dry-run",
        "--memory-gbps",
        "4300",
        "--matrix-tflops",
        "780",
        "--out",
        dir.path().to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let table = text(&o.stdout);
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("gpu-check.json")).unwrap())
            .unwrap();
    let timings = report["timings"].as_array().unwrap();
    let context = 256u64;
    for batch in [1u64, 8, 64] {
        let t = timings
            .iter()
            .find(|t| {
                t["section"] == "decode"
                    && t["name"]
                        .as_str()
                        .unwrap()
                        .ends_with(&format!(" b{batch} ctx{context}"))
            })
            .unwrap_or_else(|| panic!("no decode timing at batch {batch}: {table}"));
        let weights = rank0 - 2 * positions * d + 2 * 2 * batch * d;
        let kv = batch * (context + 1) * kv_per_token;
        let bytes = t["work"]["bytes"].as_f64().unwrap();
        assert_eq!(bytes, (weights + kv) as f64, "batch {batch}");
        let floor_ms = t["floor_ms"].as_f64().unwrap();
        assert!((floor_ms - bytes / 4.3e12 * 1e3).abs() < 1e-9, "{floor_ms}");
        assert_eq!(t["bound"], "memory");
    }
    let prefill = timings.iter().find(|t| t["section"] == "prefill").unwrap();
    let flops = prefill["work"]["flops"].as_f64().unwrap();
    // Layer GEMMs over 2048 tokens, causal attention, the LM head for the last token.
    let gemm = 2.0 * 2048.0 * layers as f64 * 226_492_416.0;
    let attention = layers as f64 * 12.0 * 2.0 * 128.0 * 2048.0 * 2049.0;
    let lm_head = 2.0 * 6283.0 * d as f64;
    assert_eq!(flops, gemm + attention + lm_head);
    assert_eq!(prefill["bound"], "compute");
    assert!(
        table.contains("decode/gpt3-175b tp8 r0 (96 layers) b1 ctx256"),
        "{table}"
    );
    assert!(table.contains("10.19 ms"), "{table}");
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/gpu-check.sh")
}

/// A copy of the script in an empty tree, so no prebuilt binary is found beside it, run
/// with `path` as PATH.
fn run_script(tree: &Path, bin: Option<&str>, path: &str) -> Output {
    let scripts = tree.join("scripts");
    std::fs::create_dir_all(&scripts).unwrap();
    let copy = scripts.join("gpu-check.sh");
    std::fs::copy(script(), &copy).unwrap();
    let mut c = Command::new(which("bash").expect("bash is installed"));
    c.arg(&copy).env("PATH", path).env("OUT", tree.join("out"));
    match bin {
        Some(b) => c.env("TESSERA_BIN", b),
        None => c.env_remove("TESSERA_BIN"),
    };
    c.output().expect("bash runs")
}

#[test]
fn the_script_is_valid_bash() {
    let o = Command::new(which("bash").expect("bash is installed"))
        .arg("-n")
        .arg(script())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o.stderr));
}

/// Without a binary the script says how to build one; without nvidia-smi it says there
/// is no NVIDIA driver; both exit 1 before running anything.
#[test]
fn the_script_fails_clearly_without_a_binary_or_a_gpu() {
    let tree = tempfile::tempdir().unwrap();
    let o = run_script(tree.path(), None, "/usr/bin:/bin");
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("no tessera binary"), "{err}");
    assert!(
        err.contains("cargo build --release -p tessera --features cuda"),
        "{err}"
    );

    if has_nvidia_driver() {
        eprintln!("skipped the no-GPU half: this machine has an NVIDIA driver");
        return;
    }
    // A PATH with bash and coreutils but no nvidia-smi.
    let bin_dir = tree.path().join("bin");
    std::fs::create_dir_all(&bin_dir).unwrap();
    for tool in ["dirname", "printf", "cat"] {
        if let Ok(p) = which(tool) {
            let _ = std::os::unix::fs::symlink(p, bin_dir.join(tool));
        }
    }
    let o = run_script(
        tree.path(),
        Some(env!("CARGO_BIN_EXE_tessera")),
        bin_dir.to_str().unwrap(),
    );
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("nvidia-smi not found"), "{err}");
    assert!(err.contains(env!("CARGO_BIN_EXE_tessera")), "{err}");
}

fn which(tool: &str) -> Result<PathBuf, ()> {
    for dir in ["/usr/bin", "/bin", "/usr/local/bin"] {
        let p = Path::new(dir).join(tool);
        if p.exists() {
            return Ok(p);
        }
    }
    Err(())
}
