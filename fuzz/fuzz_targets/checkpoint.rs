//! A hostile `model.safetensors` beside a small valid `config.json`, opened and read as a
//! worker loads a checkpoint: `Checkpoint::open`, the shape check against the config, then
//! every expected tensor read whole and as a tensor-parallel slice (the second half of each
//! dimension). Errors are expected; a panic or an allocation out of proportion to the file
//! is a bug.
#![no_main]

use std::ops::Range;
use std::path::PathBuf;
use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use tessera_model::{check_source, expected_tensors, Checkpoint, WeightSource};

/// One layer, four dimensions, sixteen tokens: a whole valid checkpoint is about 2 KiB.
const CONFIG_JSON: &str = r#"{
  "model_type": "gpt2",
  "vocab_size": 16,
  "n_positions": 8,
  "n_embd": 4,
  "n_layer": 1,
  "n_head": 2,
  "n_inner": 16,
  "layer_norm_epsilon": 1e-5,
  "eos_token_id": 15
}"#;

/// A directory holding the config; each input replaces its `model.safetensors`.
static DIR: LazyLock<(tempfile::TempDir, PathBuf)> = LazyLock::new(|| {
    let dir = tempfile::tempdir().expect("a temporary directory");
    std::fs::write(dir.path().join("config.json"), CONFIG_JSON).expect("config.json written");
    let weights = dir.path().join("model.safetensors");
    (dir, weights)
});

fn count(region: &[Range<usize>]) -> usize {
    region.iter().map(|r| r.len()).product()
}

fuzz_target!(|data: &[u8]| {
    let (dir, weights) = &*DIR;
    std::fs::write(weights, data).expect("model.safetensors written");
    let Ok(ckpt) = Checkpoint::open(dir.path()) else {
        return;
    };
    let _ = check_source(&ckpt, ckpt.config());
    let file_bytes = data.len();
    for (name, _) in expected_tensors(ckpt.config()) {
        let Ok(shape) = ckpt.shape(&name) else {
            continue;
        };
        let whole: Vec<Range<usize>> = shape.iter().map(|&n| 0..n).collect();
        let half: Vec<Range<usize>> = shape.iter().map(|&n| n / 2..n).collect();
        for region in [whole, half] {
            if let Ok(values) = ckpt.read_f32(&name, &region) {
                assert_eq!(values.len(), count(&region), "{name} {region:?}");
                // Elements are at least 2 bytes in the file, 4 in memory.
                assert!(
                    values.len() * 2 <= file_bytes,
                    "{name}: {} values",
                    values.len()
                );
            }
        }
    }
});
