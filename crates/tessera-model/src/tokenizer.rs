//! Tokenizers: the GPT-2 BPE (r50k_base, embedded in the binary so it works offline), or a
//! checkpoint's own `tokenizer.json` when it ships one.

use std::path::Path;

use tiktoken_rs::CoreBPE;

use crate::error::{ModelError, Result};

enum Inner {
    Gpt2(&'static CoreBPE),
    HuggingFace(Box<tokenizers::Tokenizer>),
}

/// Text ↔ token ids.
pub struct Tokenizer {
    inner: Inner,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.inner {
            Inner::Gpt2(_) => "Tokenizer(gpt2 r50k_base)",
            Inner::HuggingFace(_) => "Tokenizer(tokenizer.json)",
        })
    }
}

impl Tokenizer {
    /// The embedded GPT-2 BPE (`<|endoftext|>` = 50256).
    pub fn gpt2() -> Self {
        Tokenizer {
            inner: Inner::Gpt2(tiktoken_rs::r50k_base_singleton()),
        }
    }

    /// Reads a Hugging Face `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let t = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", path.display())))?;
        Ok(Tokenizer {
            inner: Inner::HuggingFace(Box::new(t)),
        })
    }

    /// The checkpoint's `tokenizer.json` if it has one, else the GPT-2 BPE.
    pub fn for_checkpoint(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if path.is_file() {
            Self::from_file(&path)
        } else {
            Ok(Self::gpt2())
        }
    }

    /// Which tokenizer this is, for logs.
    pub fn kind(&self) -> &'static str {
        match self.inner {
            Inner::Gpt2(_) => "gpt2",
            Inner::HuggingFace(_) => "tokenizer.json",
        }
    }

    /// Encodes text; special tokens written in the text (`<|endoftext|>`) are recognised.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match &self.inner {
            Inner::Gpt2(bpe) => Ok(bpe.encode_with_special_tokens(text)),
            Inner::HuggingFace(t) => t
                .encode(text, false)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| ModelError::Tokenizer(format!("cannot encode: {e}"))),
        }
    }

    /// Decodes ids to bytes. A byte-level BPE token can end inside a UTF-8 character, so
    /// streaming callers work on bytes and emit text at character boundaries.
    pub fn decode_bytes(&self, ids: &[u32]) -> Result<Vec<u8>> {
        match &self.inner {
            Inner::Gpt2(bpe) => bpe
                .decode_bytes(ids)
                .map_err(|e| ModelError::Tokenizer(format!("cannot decode token ids: {e:?}"))),
            Inner::HuggingFace(t) => t
                .decode(ids, false)
                .map(String::into_bytes)
                .map_err(|e| ModelError::Tokenizer(format!("cannot decode token ids: {e}"))),
        }
    }

    /// Decodes ids to text, replacing incomplete UTF-8 sequences with U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        Ok(String::from_utf8_lossy(&self.decode_bytes(ids)?).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_gpt2_ids() {
        let t = Tokenizer::gpt2();
        // "Hello world" is [15496, 995] in GPT-2's BPE.
        assert_eq!(t.encode("Hello world").unwrap(), vec![15496, 995]);
        assert_eq!(t.encode("<|endoftext|>").unwrap(), vec![50256]);
        assert_eq!(t.decode(&[15496, 995]).unwrap(), "Hello world");
        assert!(t.decode(&[u32::MAX]).is_err());
    }

    #[test]
    fn a_checkpoint_tokenizer_json_is_used() {
        // A word-level tokenizer.json: three words, unknown → [UNK].
        let json = r#"{
          "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
          "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
          "decoder": null,
          "model": {"type": "WordLevel", "vocab": {"[UNK]": 0, "hello": 1, "world": 2}, "unk_token": "[UNK]"}
        }"#;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tokenizer.json"), json).unwrap();
        let t = Tokenizer::for_checkpoint(dir.path()).unwrap();
        assert_eq!(t.kind(), "tokenizer.json");
        assert_eq!(t.encode("hello world nope").unwrap(), vec![1, 2, 0]);
        let none = tempfile::tempdir().unwrap();
        assert_eq!(
            Tokenizer::for_checkpoint(none.path()).unwrap().kind(),
            "gpt2"
        );
        std::fs::write(none.path().join("tokenizer.json"), "{").unwrap();
        assert!(Tokenizer::for_checkpoint(none.path()).is_err());
    }
}
