//! Hugging Face GPT-2 checkpoints: `config.json` with `model.safetensors`, or a sharded
//! `model.safetensors.index.json`. Files are memory-mapped and read region by region, so a
//! worker touches only the pages of its own slices.

use std::collections::HashMap;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::weights::{check_region, for_each_run, WeightSource};

/// One memory-mapped `.safetensors` file.
struct MappedFile {
    path: PathBuf,
    map: Mmap,
    /// Start of the data section: 8 bytes of header length plus the header.
    data_start: usize,
}

/// Where one tensor lives.
#[derive(Debug, Clone)]
struct TensorEntry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Byte range inside the file's data section.
    offsets: (usize, usize),
}

/// An opened Hugging Face GPT-2 checkpoint directory.
pub struct Checkpoint {
    dir: PathBuf,
    config: ModelConfig,
    files: Vec<MappedFile>,
    tensors: HashMap<String, TensorEntry>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("dir", &self.dir)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

/// The GPT-2 name without the optional `transformer.` prefix.
fn canonical(name: &str) -> &str {
    name.strip_prefix("transformer.").unwrap_or(name)
}

impl Checkpoint {
    /// Opens `dir`: reads `config.json` and maps every safetensors file it names.
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(ModelError::io(
                dir,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such checkpoint directory"),
            ));
        }
        let config = ModelConfig::from_hf_dir(dir)?;
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let file_names: Vec<String> = if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| ModelError::corrupt(&index, format!("not JSON: {e}")))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ModelError::corrupt(&index, "no `weight_map` object"))?;
            let mut names: Vec<String> = Vec::new();
            for file in map.values() {
                let file = file.as_str().ok_or_else(|| {
                    ModelError::corrupt(&index, "weight_map values must be file names")
                })?;
                if file.contains('/') || file.contains("..") {
                    return Err(ModelError::corrupt(
                        &index,
                        format!("file `{file}` is outside the checkpoint"),
                    ));
                }
                if !names.iter().any(|n| n == file) {
                    names.push(file.to_string());
                }
            }
            names
        } else if single.exists() {
            vec!["model.safetensors".to_string()]
        } else {
            return Err(ModelError::io(
                &single,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no model.safetensors or model.safetensors.index.json",
                ),
            ));
        };

        let mut files = Vec::new();
        let mut tensors = HashMap::new();
        for (file_index, file_name) in file_names.iter().enumerate() {
            let path = dir.join(file_name);
            let file = File::open(&path).map_err(|e| ModelError::io(&path, e))?;
            // SAFETY: the map is read-only and private to this process. Checkpoints are
            // immutable inputs; a file truncated under a running worker is outside the contract
            // (the same contract every mmap-based model loader has).
            let map = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(&path, e))?;
            let (header_len, metadata) = SafeTensors::read_metadata(&map)
                .map_err(|e| ModelError::corrupt(&path, format!("{e:?}")))?;
            for (name, info) in metadata.tensors() {
                if name == "__metadata__" {
                    continue;
                }
                tensors.insert(
                    canonical(&name).to_string(),
                    TensorEntry {
                        file: file_index,
                        dtype: info.dtype,
                        shape: info.shape.clone(),
                        offsets: info.data_offsets,
                    },
                );
            }
            files.push(MappedFile {
                path,
                map,
                data_start: 8 + header_len,
            });
        }
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            config,
            files,
            tensors,
        })
    }

    /// The model config read from `config.json`.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The checkpoint directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn entry(&self, name: &str) -> Result<&TensorEntry> {
        self.tensors
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                path: self.dir.clone(),
                name: name.to_string(),
            })
    }
}

impl WeightSource for Checkpoint {
    fn shape(&self, name: &str) -> Result<Vec<usize>> {
        Ok(self.entry(name)?.shape.clone())
    }

    fn read_f32(&self, name: &str, region: &[Range<usize>]) -> Result<Vec<f32>> {
        let entry = self.entry(name)?;
        check_region(name, &entry.shape, region)?;
        let file = &self.files[entry.file];
        let elem = match entry.dtype {
            Dtype::F32 => 4,
            Dtype::BF16 | Dtype::F16 => 2,
            other => {
                return Err(ModelError::UnsupportedDtype {
                    name: name.to_string(),
                    dtype: format!("{other:?}"),
                })
            }
        };
        let start = file.data_start + entry.offsets.0;
        let end = file.data_start + entry.offsets.1;
        let bytes = file.map.get(start..end).ok_or_else(|| {
            ModelError::corrupt(
                &file.path,
                format!("tensor `{name}` lies past the end of the file"),
            )
        })?;
        let len: usize = region.iter().map(|r| r.len()).product();
        let mut out = vec![0f32; len];
        for_each_run(&entry.shape, region, |flat, n, o| {
            let src = &bytes[flat * elem..(flat + n) * elem];
            let dst = &mut out[o..o + n];
            match entry.dtype {
                Dtype::F32 => {
                    for (d, s) in dst.iter_mut().zip(src.chunks_exact(4)) {
                        *d = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
                    }
                }
                Dtype::BF16 => {
                    for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
                        *d = bf16::from_bits(u16::from_le_bytes([s[0], s[1]])).to_f32();
                    }
                }
                _ => {
                    for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
                        *d = f16::from_bits(u16::from_le_bytes([s[0], s[1]])).to_f32();
                    }
                }
            }
        });
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::SyntheticWeights;
    use crate::weights::check_source;

    fn tiny_checkpoint() -> (tempfile::TempDir, SyntheticWeights) {
        let dir = tempfile::tempdir().unwrap();
        let synth = SyntheticWeights::new(ModelConfig::preset("gpt2-tiny").unwrap(), 3);
        synth.write_checkpoint(dir.path()).unwrap();
        (dir, synth)
    }

    #[test]
    fn synth_checkpoint_reads_back_slice_by_slice() {
        let (dir, synth) = tiny_checkpoint();
        let ckpt = Checkpoint::open(dir.path()).unwrap();
        check_source(&ckpt, ckpt.config()).unwrap();
        let region = [5..9, 100..140];
        assert_eq!(
            ckpt.read_f32("h.2.mlp.c_fc.weight", &region).unwrap(),
            synth.read_f32("h.2.mlp.c_fc.weight", &region).unwrap()
        );
    }

    #[test]
    fn missing_and_corrupt_checkpoints_say_what_is_wrong() {
        let e = Checkpoint::open(Path::new("/nonexistent/ckpt"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/ckpt"), "{e}");

        let (dir, _) = tiny_checkpoint();
        let path = dir.path().join("model.safetensors");
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        let e = Checkpoint::open(dir.path()).unwrap_err().to_string();
        assert!(e.contains("corrupt checkpoint"), "{e}");

        std::fs::write(&path, b"garbage").unwrap();
        assert!(Checkpoint::open(dir.path()).is_err());
    }

    #[test]
    fn wrong_shape_is_named() {
        let (dir, _) = tiny_checkpoint();
        let ckpt = Checkpoint::open(dir.path()).unwrap();
        let mut config = ckpt.config().clone();
        config.n_inner = 512;
        let e = check_source(&ckpt, &config).unwrap_err().to_string();
        assert!(
            e.contains("h.0.mlp.c_fc.weight") && e.contains("[256, 512]"),
            "{e}"
        );
    }
}
