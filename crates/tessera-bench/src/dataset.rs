//! Workloads: the prompts a benchmark sends and how many tokens each asks for.
//!
//! - `random`: random token ids, lengths uniform in `[len·(1−R), len·(1+R)]` (vLLM's
//!   random dataset).
//! - `sharegpt`: real conversations from a ShareGPT JSON file: the first human turn is
//!   the prompt, the turn after it sets the output length; vLLM's filter applies.
//! - `shared-prefix`: K random prefixes shared by all prompts, each followed by a random
//!   suffix, to measure what prefix reuse buys.
//!
//! Everything drawn comes from one generator seeded by `seed`, so a workload is the same
//! on every run and every machine.

use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::Deserialize;
use tessera_model::{Tokenizer, GPT2_EOS, GPT2_VOCAB};

use crate::BenchError;

/// ShareGPT filter (vLLM's): prompts and outputs shorter than this are dropped.
pub const SHAREGPT_MIN_TOKENS: usize = 4;
/// ShareGPT filter: prompts longer than this are dropped.
pub const SHAREGPT_MAX_PROMPT_TOKENS: usize = 1024;
/// ShareGPT filter: prompt + output longer than this is dropped.
pub const SHAREGPT_MAX_TOTAL_TOKENS: usize = 2048;

/// Which workload to draw.
#[derive(Debug, Clone, PartialEq)]
pub enum Dataset {
    /// Random token ids of random lengths.
    Random,
    /// Conversations from a ShareGPT JSON file.
    ShareGpt {
        /// The file.
        path: PathBuf,
    },
    /// `num_prefixes` random prefixes of `prefix_len` tokens, each prompt one of them
    /// followed by a random suffix of `input_len` tokens.
    SharedPrefix {
        /// Tokens in each shared prefix.
        prefix_len: usize,
        /// How many distinct prefixes.
        num_prefixes: usize,
    },
}

impl Dataset {
    /// The name used on the command line and in the JSON results.
    pub fn name(&self) -> &'static str {
        match self {
            Dataset::Random => "random",
            Dataset::ShareGpt { .. } => "sharegpt",
            Dataset::SharedPrefix { .. } => "shared-prefix",
        }
    }
}

/// A workload: which dataset, how many prompts, what lengths, which seed.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkloadSpec {
    /// The dataset.
    pub dataset: Dataset,
    /// Prompts to send.
    pub num_prompts: usize,
    /// Prompt tokens (random), or suffix tokens (shared-prefix); unused for ShareGPT.
    pub input_len: usize,
    /// Tokens to generate per request; `None` for ShareGPT means the length of the
    /// conversation's answer.
    pub output_len: Option<u32>,
    /// Spread of the random lengths: uniform in `[len·(1−R), len·(1+R)]`, R in `[0, 1)`.
    pub range_ratio: f64,
    /// Seed of everything random in the workload.
    pub seed: u64,
}

/// How prompts travel to the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptForm {
    /// Token ids (Tessera's gRPC API): random ids are below `vocab_size` and never
    /// `eos_token_id`.
    Ids {
        /// The served model's vocabulary size.
        vocab_size: u32,
        /// Its end-of-text id, never drawn.
        eos_token_id: u32,
    },
    /// Text (OpenAI-compatible servers): random ids are GPT-2 ids (not `<|endoftext|>`)
    /// decoded to text; input lengths are counted by re-encoding that text.
    Text,
}

/// What a request sends as its prompt.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptBody {
    /// Token ids.
    Ids(Vec<u32>),
    /// Text.
    Text(String),
}

/// One request of a workload.
#[derive(Debug, Clone, PartialEq)]
pub struct Prompt {
    /// The prompt.
    pub body: PromptBody,
    /// Its length in tokens.
    pub input_len: usize,
    /// Tokens to ask for (`max_tokens`).
    pub output_len: u32,
}

impl WorkloadSpec {
    /// Refuses settings no workload can be drawn from, naming the flag.
    pub fn validate(&self) -> Result<(), BenchError> {
        if !(0.0..1.0).contains(&self.range_ratio) {
            return Err(BenchError::invalid(
                "--range-ratio",
                format!("must be in [0, 1), got {}", self.range_ratio),
            ));
        }
        if self.num_prompts == 0 {
            return Err(BenchError::invalid("--num-prompts", "must be at least 1"));
        }
        if self.output_len == Some(0) {
            return Err(BenchError::invalid("--output-len", "must be at least 1"));
        }
        match &self.dataset {
            Dataset::Random | Dataset::SharedPrefix { .. } if self.input_len == 0 => {
                Err(BenchError::invalid("--input-len", "must be at least 1"))
            }
            Dataset::SharedPrefix { prefix_len: 0, .. } => {
                Err(BenchError::invalid("--prefix-len", "must be at least 1"))
            }
            Dataset::SharedPrefix {
                num_prefixes: 0, ..
            } => Err(BenchError::invalid("--num-prefixes", "must be at least 1")),
            _ => Ok(()),
        }
    }

    /// Draws the workload's prompts. `tokenizer` encodes ShareGPT text and, for
    /// [`PromptForm::Text`], decodes random ids and counts tokens.
    pub fn generate(
        &self,
        tokenizer: &Tokenizer,
        form: PromptForm,
    ) -> Result<Vec<Prompt>, BenchError> {
        self.validate()?;
        let mut rng = StdRng::seed_from_u64(self.seed);
        let output_len = self.output_len.unwrap_or(DEFAULT_OUTPUT_LEN) as usize;
        match &self.dataset {
            Dataset::Random => (0..self.num_prompts)
                .map(|_| {
                    let n = draw_len(&mut rng, self.input_len, self.range_ratio);
                    let out = draw_len(&mut rng, output_len, self.range_ratio);
                    let ids = random_ids(&mut rng, n, form)?;
                    prompt(tokenizer, form, ids, out as u32)
                })
                .collect(),
            Dataset::SharedPrefix {
                prefix_len,
                num_prefixes,
            } => {
                let prefixes: Vec<Vec<u32>> = (0..*num_prefixes)
                    .map(|_| random_ids(&mut rng, *prefix_len, form))
                    .collect::<Result<_, _>>()?;
                let mut prompts = (0..self.num_prompts)
                    .map(|i| {
                        let n = draw_len(&mut rng, self.input_len, self.range_ratio);
                        let out = draw_len(&mut rng, output_len, self.range_ratio);
                        let suffix = random_ids(&mut rng, n, form)?;
                        let prefix = &prefixes[i % prefixes.len()];
                        match form {
                            PromptForm::Ids { .. } => {
                                let ids = [prefix.as_slice(), &suffix].concat();
                                prompt(tokenizer, form, ids, out as u32)
                            }
                            // Decoded separately so that every prompt's prefix text is
                            // the same characters, whatever its suffix.
                            PromptForm::Text => {
                                let text =
                                    tokenizer.decode(prefix)? + &tokenizer.decode(&suffix)?;
                                text_prompt(tokenizer, text, out as u32)
                            }
                        }
                    })
                    .collect::<Result<Vec<_>, BenchError>>()?;
                prompts.shuffle(&mut rng);
                Ok(prompts)
            }
            Dataset::ShareGpt { path } => sharegpt(
                path,
                tokenizer,
                form,
                self.num_prompts,
                self.output_len,
                &mut rng,
            ),
        }
    }
}

/// The output length of the random workloads when none is given.
pub const DEFAULT_OUTPUT_LEN: u32 = 128;

/// A length uniform in `[len·(1−R), len·(1+R)]` (integers inside that range), at least 1.
pub fn draw_len(rng: &mut impl Rng, len: usize, range_ratio: f64) -> usize {
    let lo = ((len as f64) * (1.0 - range_ratio)).ceil().max(1.0) as usize;
    let hi = (((len as f64) * (1.0 + range_ratio)).floor() as usize).max(lo);
    rng.random_range(lo..=hi)
}

/// `n` random ids valid for `form`, never the end-of-text id.
fn random_ids(rng: &mut impl Rng, n: usize, form: PromptForm) -> Result<Vec<u32>, BenchError> {
    let (vocab, eos) = match form {
        PromptForm::Ids {
            vocab_size,
            eos_token_id,
        } => (vocab_size, eos_token_id),
        PromptForm::Text => (GPT2_VOCAB as u32, GPT2_EOS),
    };
    let choices = if eos < vocab { vocab - 1 } else { vocab };
    if choices == 0 {
        return Err(BenchError::invalid(
            "--dataset",
            format!("a vocabulary of {vocab} leaves no token id to draw"),
        ));
    }
    // Draw from the vocabulary less one id, then step over the end-of-text id.
    Ok((0..n)
        .map(|_| {
            let id = rng.random_range(0..choices);
            if id >= eos {
                id + 1
            } else {
                id
            }
        })
        .collect())
}

/// A prompt of `ids` in `form`.
fn prompt(
    tokenizer: &Tokenizer,
    form: PromptForm,
    ids: Vec<u32>,
    output_len: u32,
) -> Result<Prompt, BenchError> {
    match form {
        PromptForm::Ids { .. } => Ok(Prompt {
            input_len: ids.len(),
            body: PromptBody::Ids(ids),
            output_len,
        }),
        PromptForm::Text => text_prompt(tokenizer, tokenizer.decode(&ids)?, output_len),
    }
}

/// A text prompt, its length counted by `tokenizer`.
fn text_prompt(tokenizer: &Tokenizer, text: String, output_len: u32) -> Result<Prompt, BenchError> {
    Ok(Prompt {
        input_len: tokenizer.encode(&text)?.len(),
        body: PromptBody::Text(text),
        output_len,
    })
}

/// One conversation of a ShareGPT file; other fields are ignored.
#[derive(Debug, Deserialize)]
struct Conversation {
    #[serde(default)]
    conversations: Vec<Turn>,
}

#[derive(Debug, Deserialize)]
struct Turn {
    from: String,
    value: String,
}

/// vLLM's ShareGPT filter: whether a (prompt, output) pair of these token counts is kept.
/// With a fixed output length (`--output-len`) the output's minimum is not checked.
pub fn sharegpt_keeps(prompt_len: usize, output_len: usize, fixed_output: bool) -> bool {
    if prompt_len < SHAREGPT_MIN_TOKENS || (!fixed_output && output_len < SHAREGPT_MIN_TOKENS) {
        return false;
    }
    prompt_len <= SHAREGPT_MAX_PROMPT_TOKENS && prompt_len + output_len <= SHAREGPT_MAX_TOTAL_TOKENS
}

/// Prompts from a ShareGPT file: conversations in an order shuffled by `rng`, those that
/// pass the filter, until `n` are found. A file with fewer usable conversations than `n`
/// has them used again, in the same order.
fn sharegpt(
    path: &Path,
    tokenizer: &Tokenizer,
    form: PromptForm,
    n: usize,
    output_len: Option<u32>,
    rng: &mut StdRng,
) -> Result<Vec<Prompt>, BenchError> {
    let error = |reason: String| BenchError::Dataset {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| error(format!("cannot read it: {e}")))?;
    let conversations: Vec<Conversation> = serde_json::from_slice(&bytes).map_err(|e| {
        error(format!(
            "not ShareGPT JSON ([{{\"conversations\": [{{\"from\", \"value\"}}, …]}}, …]): {e}"
        ))
    })?;
    let mut order: Vec<usize> = (0..conversations.len()).collect();
    order.shuffle(rng);
    let mut prompts = Vec::with_capacity(n);
    for i in order {
        if prompts.len() == n {
            break;
        }
        let turns = &conversations[i].conversations;
        if turns.len() < 2 {
            continue;
        }
        let Some(h) = turns
            .iter()
            .position(|t| t.from == "human" || t.from == "user")
        else {
            continue;
        };
        let Some(answer) = turns.get(h + 1) else {
            continue;
        };
        let ids = tokenizer.encode(&turns[h].value)?;
        let out = match output_len {
            Some(n) => n as usize,
            None => tokenizer.encode(&answer.value)?.len(),
        };
        if !sharegpt_keeps(ids.len(), out, output_len.is_some()) {
            continue;
        }
        prompts.push(Prompt {
            input_len: ids.len(),
            body: match form {
                PromptForm::Ids { .. } => PromptBody::Ids(ids),
                PromptForm::Text => PromptBody::Text(turns[h].value.clone()),
            },
            output_len: out as u32,
        });
    }
    if prompts.is_empty() {
        return Err(error(format!(
            "none of its {} conversations has a prompt of {SHAREGPT_MIN_TOKENS} to \
             {SHAREGPT_MAX_PROMPT_TOKENS} tokens followed by an answer (prompt + output at most \
             {SHAREGPT_MAX_TOTAL_TOKENS} tokens)",
            conversations.len()
        )));
    }
    let usable = prompts.len();
    if usable < n {
        tracing::warn!(
            "{}: only {usable} conversations pass the filter; each is used more than once to make {n} prompts",
            path.display()
        );
        for i in usable..n {
            prompts.push(prompts[i % usable].clone());
        }
    }
    Ok(prompts)
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDS: PromptForm = PromptForm::Ids {
        vocab_size: 1000,
        eos_token_id: 999,
    };

    fn spec(dataset: Dataset) -> WorkloadSpec {
        WorkloadSpec {
            dataset,
            num_prompts: 200,
            input_len: 100,
            output_len: Some(50),
            range_ratio: 0.25,
            seed: 7,
        }
    }

    #[test]
    fn random_lengths_stay_within_the_range_ratio_and_cover_it() {
        let t = Tokenizer::gpt2();
        let prompts = spec(Dataset::Random).generate(&t, IDS).unwrap();
        assert_eq!(prompts.len(), 200);
        let inputs: Vec<usize> = prompts.iter().map(|p| p.input_len).collect();
        let outputs: Vec<u32> = prompts.iter().map(|p| p.output_len).collect();
        assert!(
            inputs.iter().all(|&n| (75..=125).contains(&n)),
            "{inputs:?}"
        );
        assert!(
            outputs.iter().all(|&n| (38..=62).contains(&n)),
            "{outputs:?}"
        );
        // 200 uniform draws over 51 values reach both ends' neighbourhoods.
        assert!(inputs.iter().any(|&n| n < 80) && inputs.iter().any(|&n| n > 120));
        for p in &prompts {
            let PromptBody::Ids(ids) = &p.body else {
                panic!("ids expected")
            };
            assert_eq!(ids.len(), p.input_len);
            assert!(ids.iter().all(|&id| id < 999), "below the vocab, never eos");
        }
    }

    #[test]
    fn a_zero_range_ratio_gives_exact_lengths() {
        let t = Tokenizer::gpt2();
        let mut s = spec(Dataset::Random);
        s.range_ratio = 0.0;
        for p in s.generate(&t, IDS).unwrap() {
            assert_eq!((p.input_len, p.output_len), (100, 50));
        }
    }

    #[test]
    fn the_seed_decides_everything() {
        let t = Tokenizer::gpt2();
        let a = spec(Dataset::Random).generate(&t, IDS).unwrap();
        let b = spec(Dataset::Random).generate(&t, IDS).unwrap();
        assert_eq!(a, b);
        let mut other = spec(Dataset::Random);
        other.seed = 8;
        assert_ne!(a, other.generate(&t, IDS).unwrap());
    }

    #[test]
    fn text_prompts_are_counted_by_the_tokenizer() {
        let t = Tokenizer::gpt2();
        let mut s = spec(Dataset::Random);
        s.num_prompts = 5;
        s.input_len = 32;
        s.range_ratio = 0.0;
        for p in s.generate(&t, PromptForm::Text).unwrap() {
            let PromptBody::Text(text) = &p.body else {
                panic!("text expected")
            };
            assert_eq!(p.input_len, t.encode(text).unwrap().len());
            // Re-encoding decoded random ids gives about as many tokens.
            assert!((16..=64).contains(&p.input_len), "{}", p.input_len);
        }
    }

    #[test]
    fn shared_prefix_prompts_start_with_one_of_k_prefixes() {
        let t = Tokenizer::gpt2();
        let mut s = spec(Dataset::SharedPrefix {
            prefix_len: 20,
            num_prefixes: 3,
        });
        s.range_ratio = 0.0;
        s.input_len = 5;
        let prompts = s.generate(&t, IDS).unwrap();
        let mut prefixes: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| match &p.body {
                PromptBody::Ids(ids) => {
                    assert_eq!(ids.len(), 25);
                    ids[..20].to_vec()
                }
                PromptBody::Text(_) => panic!("ids expected"),
            })
            .collect();
        prefixes.sort();
        prefixes.dedup();
        assert_eq!(prefixes.len(), 3);
    }

    #[test]
    fn bad_settings_name_their_flag() {
        let t = Tokenizer::gpt2();
        let mut s = spec(Dataset::Random);
        s.range_ratio = 1.0;
        let e = s.generate(&t, IDS).unwrap_err().to_string();
        assert_eq!(e, "--range-ratio must be in [0, 1), got 1");
        let mut s = spec(Dataset::Random);
        s.num_prompts = 0;
        assert!(s
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("--num-prompts"));
        let s = spec(Dataset::SharedPrefix {
            prefix_len: 4,
            num_prefixes: 0,
        });
        assert!(s
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("--num-prefixes"));
    }

    #[test]
    fn the_sharegpt_filter_is_vllms() {
        assert!(sharegpt_keeps(4, 4, false));
        assert!(!sharegpt_keeps(3, 100, false), "short prompt");
        assert!(!sharegpt_keeps(100, 3, false), "short answer");
        assert!(
            sharegpt_keeps(100, 3, true),
            "no answer minimum with --output-len"
        );
        assert!(sharegpt_keeps(1024, 1024, false));
        assert!(!sharegpt_keeps(1025, 10, false), "long prompt");
        assert!(!sharegpt_keeps(1000, 1049, false), "long total");
    }

    #[test]
    fn sharegpt_files_are_read_filtered_and_sampled() {
        let dir = std::env::temp_dir().join(format!("tessera-sharegpt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("sharegpt.json");
        let long = "word ".repeat(1100);
        let data = serde_json::json!([
            {"id": "a", "conversations": [
                {"from": "human", "value": "Tell me a story about a lighthouse keeper."},
                {"from": "gpt", "value": "Once upon a time a keeper lived by the sea."}]},
            {"id": "one turn", "conversations": [
                {"from": "human", "value": "Only a question with no answer at all here."}]},
            {"id": "short prompt", "conversations": [
                {"from": "human", "value": "Hi"},
                {"from": "gpt", "value": "Hello there, how can I help you today?"}]},
            {"id": "short answer", "conversations": [
                {"from": "human", "value": "What is the capital city of France?"},
                {"from": "gpt", "value": "Paris."}]},
            {"id": "long prompt", "conversations": [
                {"from": "human", "value": long},
                {"from": "gpt", "value": "That was a long message to read."}]},
            {"id": "b", "conversations": [
                {"from": "system", "value": "You are terse."},
                {"from": "human", "value": "Name three colours of the rainbow please."},
                {"from": "gpt", "value": "Red, orange and yellow are three of them."},
                {"from": "human", "value": "And the rest?"}]},
        ]);
        std::fs::write(&path, data.to_string()).unwrap();
        let t = Tokenizer::gpt2();
        let mut s = spec(Dataset::ShareGpt { path: path.clone() });
        s.num_prompts = 2;
        s.output_len = None;
        let prompts = s.generate(&t, PromptForm::Text).unwrap();
        let mut texts: Vec<String> = prompts
            .iter()
            .map(|p| match &p.body {
                PromptBody::Text(t) => t.clone(),
                PromptBody::Ids(_) => panic!("text expected"),
            })
            .collect();
        texts.sort();
        assert_eq!(
            texts,
            [
                "Name three colours of the rainbow please.",
                "Tell me a story about a lighthouse keeper."
            ]
        );
        for p in &prompts {
            let PromptBody::Text(text) = &p.body else {
                unreachable!()
            };
            assert_eq!(p.input_len, t.encode(text).unwrap().len());
        }
        let story = prompts
            .iter()
            .find(|p| p.input_len == 9)
            .expect("the story prompt");
        assert_eq!(
            story.output_len as usize,
            t.encode("Once upon a time a keeper lived by the sea.")
                .unwrap()
                .len()
        );
        // More prompts than usable conversations: they are used again.
        s.num_prompts = 5;
        s.output_len = Some(10);
        let prompts = s.generate(&t, IDS).unwrap();
        assert_eq!(prompts.len(), 5);
        assert!(prompts.iter().all(|p| p.output_len == 10));
        // The "short answer" conversation passes with a fixed output length.
        assert!(prompts.iter().any(|p| p.input_len
            == t.encode("What is the capital city of France?")
                .unwrap()
                .len()));

        let missing = dir.join("missing.json");
        let e = spec(Dataset::ShareGpt {
            path: missing.clone(),
        })
        .generate(&t, IDS)
        .unwrap_err()
        .to_string();
        assert!(
            e.contains(&missing.display().to_string()) && e.contains("cannot read"),
            "{e}"
        );
        std::fs::write(&path, "{\"not\": \"a list\"}").unwrap();
        let e = s.generate(&t, IDS).unwrap_err().to_string();
        assert!(e.contains("not ShareGPT JSON"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
