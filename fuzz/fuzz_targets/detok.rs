//! The incremental detokeniser against its contract (`tessera_coordinator::detok`): token
//! bytes of any kind, split anywhere, with any stop strings.
//!
//! - the concatenation of every delta's text and `finish()` equals the lossy UTF-8 decoding
//!   of all the bytes, truncated before the first stop string to complete (the one that
//!   ends earliest; of those ending together, the longest), and that stop is the one
//!   reported;
//! - what is released is never taken back: each delta extends a prefix of that text;
//! - little is held back: never more than the longest stop string less one byte, plus an
//!   incomplete character (which decodes to at most one U+FFFD).
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use tessera_coordinator::detok::TextStream;

#[derive(Debug, Arbitrary)]
struct Input {
    stops: Vec<String>,
    tokens: Vec<Vec<u8>>,
}

/// The one-shot rule of the module docs: decode, then cut at the earliest-ending stop,
/// the longest of those that end there.
fn reference(bytes: &[u8], stops: &[String]) -> (String, Option<String>) {
    let text = String::from_utf8_lossy(bytes).into_owned();
    let mut by_len: Vec<&String> = stops.iter().filter(|s| !s.is_empty()).collect();
    by_len.sort_by_key(|s| std::cmp::Reverse(s.len()));
    for end in (0..=text.len()).filter(|&i| text.is_char_boundary(i)) {
        for s in &by_len {
            if text[..end].ends_with(s.as_str()) {
                return (text[..end - s.len()].to_string(), Some((*s).clone()));
            }
        }
    }
    (text, None)
}

fuzz_target!(|input: Input| {
    let Input { stops, tokens } = input;
    let (want, want_stop) = reference(&tokens.concat(), &stops);
    let longest_stop = stops.iter().map(String::len).max().unwrap_or(0);

    let mut stream = TextStream::new(stops.clone());
    let mut out = String::new();
    let mut seen = Vec::new();
    let mut stopped = None;
    for token in &tokens {
        let delta = stream.push(token);
        out.push_str(&delta.text);
        assert!(
            want.starts_with(&out),
            "released {out:?}, not a prefix of {want:?}"
        );
        if let Some(stop) = delta.stopped {
            assert!(stopped.is_none(), "stopped twice");
            stopped = Some(stop);
        }
        if stopped.is_some() {
            assert!(stream.is_stopped());
            continue;
        }
        seen.extend_from_slice(token);
        let decoded = String::from_utf8_lossy(&seen).len();
        let held = decoded - out.len().min(decoded);
        assert!(
            held <= longest_stop.saturating_sub(1) + '\u{FFFD}'.len_utf8(),
            "{held} bytes held back with stops of at most {longest_stop} bytes"
        );
    }
    let was_stopped = stream.is_stopped();
    let tail = stream.finish();
    if was_stopped {
        assert!(tail.is_empty(), "text after a stop: {tail:?}");
    }
    out.push_str(&tail);
    assert_eq!(stream.finish(), "", "a second finish released text");
    if stopped.is_none() && stream.is_stopped() {
        // The U+FFFD of a dangling partial character completed a stop at `finish`, which
        // does not say which stop it was.
        assert!(
            want_stop.is_some(),
            "stopped at finish without a stop string"
        );
        stopped = want_stop.clone();
    }
    assert_eq!(out, want);
    assert_eq!(stopped, want_stop);
});
