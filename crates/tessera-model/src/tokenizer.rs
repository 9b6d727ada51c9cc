//! The GPT-2 BPE tokenizer (r50k_base, embedded in the binary so it works offline).

use tiktoken_rs::CoreBPE;

use crate::error::{ModelError, Result};

/// GPT-2 / GPT-3 byte-level BPE.
pub struct Tokenizer {
    bpe: &'static CoreBPE,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tokenizer(r50k_base)")
    }
}

impl Tokenizer {
    /// The embedded GPT-2 BPE (`<|endoftext|>` = 50256).
    pub fn gpt2() -> Self {
        Tokenizer {
            bpe: tiktoken_rs::r50k_base_singleton(),
        }
    }

    /// Encodes text; `<|endoftext|>` in the text is the special token.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        self.bpe.encode_with_special_tokens(text)
    }

    /// Decodes ids to bytes. A byte-level BPE token can end inside a UTF-8 character, so
    /// streaming callers work on bytes and emit text at character boundaries.
    pub fn decode_bytes(&self, ids: &[u32]) -> Result<Vec<u8>> {
        self.bpe
            .decode_bytes(ids)
            .map_err(|e| ModelError::Tokenizer(format!("cannot decode token ids: {e:?}")))
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
        assert_eq!(t.encode("Hello world"), vec![15496, 995]);
        assert_eq!(t.encode("<|endoftext|>"), vec![50256]);
        assert_eq!(t.decode(&[15496, 995]).unwrap(), "Hello world");
    }
}
