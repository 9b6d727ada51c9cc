//! Incremental detokenisation with stop strings.
//!
//! The coordinator receives one token at a time as raw bytes (GPT-2 byte-level
//! BPE, so a token may carry only part of a UTF-8 character). [`TextStream`]
//! turns that byte stream into text deltas that are safe to send to a client:
//!
//! * only whole characters are released; bytes that can never form a valid
//!   character are released as U+FFFD exactly as [`String::from_utf8_lossy`]
//!   renders them, while an incomplete (but still possibly valid) tail is held
//!   until the next token completes or invalidates it;
//! * generation ends at the first stop string, which is never released, nor is
//!   anything after it;
//! * text that could still be the start of a stop string is held back until it
//!   is ruled out, and nothing else is held back. This is judged on whole
//!   decoded characters: an incomplete character tail is not text yet (it may
//!   still become U+FFFD), so a possible stop prefix before it stays held until
//!   that character is completed or invalidated.
//!
//! # Stop-matching rule
//!
//! Generation stops as soon as any stop string is complete, so the match is the
//! occurrence that **ends earliest** in the decoded text. If several stop
//! strings end at that same position (one is a suffix of another), the one
//! that **starts earliest** (the longest) wins. Consequences:
//!
//! * two stops starting at the same place (one a prefix of the other): the
//!   shorter wins, because it completes first;
//! * a stop lying strictly inside an occurrence of a longer stop wins, because
//!   it completes first and generation cannot continue past a completed stop
//!   just to see whether the longer one would also complete.
//!
//! The concatenation of every [`Delta::text`] and the final [`TextStream::finish`]
//! equals `String::from_utf8_lossy(all_bytes)` truncated before that match (or
//! untruncated when no stop string occurs).
//!
//! Matching is done with an Aho-Corasick automaton over the stop strings'
//! UTF-8 bytes, so each pushed byte costs amortised O(1) and the text is never
//! rescanned. UTF-8 is self-synchronising, so byte-level occurrences of a stop
//! string in valid UTF-8 text always fall on character boundaries.

const REPLACEMENT: &str = "\u{FFFD}";

/// Turns a stream of token bytes into text deltas, ending at the first stop string.
///
/// Held-back state is bounded: at most `longest_stop_len - 1` bytes of decoded
/// text (a proper prefix of some stop string) plus at most 3 bytes of an
/// incomplete UTF-8 character.
#[derive(Debug, Clone)]
pub struct TextStream {
    matcher: StopMatcher,
    state: u32,
    /// Incomplete but still possibly valid UTF-8 tail (at most 3 bytes).
    pending: Vec<u8>,
    /// Decoded text not yet released; between pushes it is exactly the text
    /// of `state`, i.e. the longest suffix that is a proper prefix of a stop.
    held: String,
    stopped: Option<usize>,
    finished: bool,
}

/// What one token added.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Delta {
    /// Text released by this token; may be empty when everything new is held
    /// back (an incomplete character or a possible stop-string prefix).
    pub text: String,
    /// The stop string matched, if generation must end here. `text` then holds
    /// only what preceded the match, and the stream releases nothing further.
    pub stopped: Option<String>,
}

impl TextStream {
    /// Creates a stream that ends at the first occurrence of any of `stop`
    /// (see the module docs for the rule). Empty stop strings are ignored;
    /// duplicates are harmless.
    pub fn new(stop: Vec<String>) -> Self {
        Self {
            matcher: StopMatcher::new(stop),
            state: 0,
            pending: Vec::with_capacity(4),
            held: String::new(),
            stopped: None,
            finished: false,
        }
    }

    /// Feeds the raw bytes of one token and returns what can be released now.
    ///
    /// Once a stop string has matched, or after [`finish`](Self::finish), every
    /// further push returns an empty [`Delta`] and ignores its bytes.
    pub fn push(&mut self, token_bytes: &[u8]) -> Delta {
        if self.stopped.is_some() || self.finished {
            return Delta::default();
        }
        let scan_from = self.held.len();
        let mut bytes = std::mem::take(&mut self.pending);
        bytes.extend_from_slice(token_bytes);
        let mut rest = &bytes[..];
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    self.held.push_str(s);
                    break;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    self.held
                        .push_str(std::str::from_utf8(&rest[..valid]).unwrap_or_default());
                    match e.error_len() {
                        Some(bad) => {
                            self.held.push_str(REPLACEMENT);
                            rest = &rest[valid + bad..];
                        }
                        None => {
                            self.pending.extend_from_slice(&rest[valid..]);
                            break;
                        }
                    }
                }
            }
        }
        match self.scan(scan_from) {
            Some((start, idx)) => {
                self.held.truncate(start);
                self.pending.clear();
                Delta {
                    text: std::mem::take(&mut self.held),
                    stopped: Some(self.matcher.stops[idx].clone()),
                }
            }
            None => {
                let keep = self.matcher.depth(self.state);
                let release = self.held.len() - keep;
                let tail = self.held.split_off(release);
                Delta {
                    text: std::mem::replace(&mut self.held, tail),
                    stopped: None,
                }
            }
        }
    }

    /// Ends the stream (EOS or length limit) and returns everything still held:
    /// possible stop-string prefixes (they never completed) and, if the last
    /// token left an incomplete character, one U+FFFD in its place.
    ///
    /// If that final U+FFFD completes a stop string, the text is truncated
    /// before the match and [`is_stopped`](Self::is_stopped) becomes true.
    /// Returns an empty string after a stop or a previous `finish`.
    pub fn finish(&mut self) -> String {
        if self.stopped.is_some() || self.finished {
            return String::new();
        }
        self.finished = true;
        if !self.pending.is_empty() {
            self.pending.clear();
            let scan_from = self.held.len();
            self.held.push_str(REPLACEMENT);
            if let Some((start, _)) = self.scan(scan_from) {
                self.held.truncate(start);
            }
        }
        std::mem::take(&mut self.held)
    }

    /// Whether a stop string has matched, so generation must end.
    pub fn is_stopped(&self) -> bool {
        self.stopped.is_some()
    }

    /// Runs the automaton over `held[from..]`; on the first match records it
    /// and returns `(byte offset of the match start in held, stop index)`.
    fn scan(&mut self, from: usize) -> Option<(usize, usize)> {
        for (i, &b) in self.held.as_bytes()[from..].iter().enumerate() {
            self.state = self.matcher.step(self.state, b);
            if let Some(idx) = self.matcher.output(self.state) {
                self.stopped = Some(idx);
                return Some((from + i + 1 - self.matcher.stops[idx].len(), idx));
            }
        }
        None
    }
}

/// Aho-Corasick automaton over the stop strings' bytes.
#[derive(Debug, Clone)]
struct StopMatcher {
    stops: Vec<String>,
    nodes: Vec<Node>,
}

#[derive(Debug, Clone, Default)]
struct Node {
    children: Vec<(u8, u32)>,
    fail: u32,
    depth: u32,
    /// Own stop index if this node spells a whole stop string.
    terminal: Option<u32>,
    /// Longest stop string that is a suffix of this node's text.
    output: Option<u32>,
}

impl StopMatcher {
    fn new(stop: Vec<String>) -> Self {
        let stops: Vec<String> = stop.into_iter().filter(|s| !s.is_empty()).collect();
        let mut nodes = vec![Node::default()];
        for (idx, s) in stops.iter().enumerate() {
            let mut cur = 0u32;
            for &b in s.as_bytes() {
                cur = match Self::child_of(&nodes[cur as usize], b) {
                    Some(n) => n,
                    None => {
                        let n = nodes.len() as u32;
                        let depth = nodes[cur as usize].depth + 1;
                        nodes.push(Node {
                            depth,
                            ..Node::default()
                        });
                        nodes[cur as usize].children.push((b, n));
                        n
                    }
                };
            }
            let node = &mut nodes[cur as usize];
            node.terminal.get_or_insert(idx as u32);
        }

        let mut queue = std::collections::VecDeque::new();
        nodes[0].output = nodes[0].terminal;
        queue.extend(nodes[0].children.iter().map(|&(_, c)| c));
        while let Some(n) = queue.pop_front() {
            let node = &nodes[n as usize];
            let fail = node.fail as usize;
            let output = node.terminal.or(nodes[fail].output);
            nodes[n as usize].output = output;
            let children = nodes[n as usize].children.clone();
            for (b, c) in children {
                let mut f = nodes[n as usize].fail;
                let target = loop {
                    if let Some(t) = Self::child_of(&nodes[f as usize], b) {
                        break t;
                    }
                    if f == 0 {
                        break 0;
                    }
                    f = nodes[f as usize].fail;
                };
                nodes[c as usize].fail = target;
                queue.push_back(c);
            }
        }
        Self { stops, nodes }
    }

    fn child_of(node: &Node, b: u8) -> Option<u32> {
        node.children
            .iter()
            .find(|&&(cb, _)| cb == b)
            .map(|&(_, c)| c)
    }

    fn step(&self, mut state: u32, b: u8) -> u32 {
        loop {
            if let Some(n) = Self::child_of(&self.nodes[state as usize], b) {
                return n;
            }
            if state == 0 {
                return 0;
            }
            state = self.nodes[state as usize].fail;
        }
    }

    fn output(&self, state: u32) -> Option<usize> {
        self.nodes[state as usize].output.map(|i| i as usize)
    }

    fn depth(&self, state: u32) -> usize {
        self.nodes[state as usize].depth as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stops(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    /// One-shot reference: lossy decode, then the earliest-ending match
    /// (longest among those ending at the same place).
    fn reference(bytes: &[u8], stop: &[String]) -> (String, Option<String>) {
        let text = String::from_utf8_lossy(bytes).into_owned();
        let mut by_len: Vec<&String> = stop.iter().filter(|s| !s.is_empty()).collect();
        by_len.sort_by_key(|s| std::cmp::Reverse(s.len()));
        for end in 0..=text.len() {
            if !text.is_char_boundary(end) {
                continue;
            }
            for s in &by_len {
                if text[..end].ends_with(s.as_str()) {
                    return (text[..end - s.len()].to_string(), Some((*s).clone()));
                }
            }
        }
        (text, None)
    }

    /// Streams `tokens`, checking the hold-back invariants after every push.
    fn stream(tokens: &[&[u8]], stop: &[String]) -> (String, Option<String>) {
        let mut ts = TextStream::new(stop.to_vec());
        let max_stop = stop.iter().map(|s| s.len()).max().unwrap_or(0);
        let mut out = String::new();
        let mut matched = None;
        for t in tokens {
            let d = ts.push(t);
            out.push_str(&d.text);
            if d.stopped.is_some() {
                assert!(matched.is_none(), "stopped twice");
                matched = d.stopped;
                assert!(ts.is_stopped());
                continue;
            }
            if ts.is_stopped() {
                continue;
            }
            assert!(ts.pending.len() <= 3);
            assert!(ts.held.len() < max_stop.max(1));
            assert!(
                ts.held.is_empty()
                    || stop
                        .iter()
                        .any(|s| s.len() > ts.held.len() && s.starts_with(ts.held.as_str())),
                "held {:?} is not a proper stop prefix",
                ts.held
            );
            let seen = format!("{out}{}", ts.held);
            let longest = (0..=seen.len())
                .filter(|&i| seen.is_char_boundary(i))
                .map(|i| &seen[i..])
                .find(|suf| {
                    suf.is_empty()
                        || stop
                            .iter()
                            .any(|s| s.len() > suf.len() && s.starts_with(suf))
                })
                .unwrap();
            assert_eq!(ts.held, longest, "held back more than necessary");
            if !ts.pending.is_empty() {
                let err = std::str::from_utf8(&ts.pending).unwrap_err();
                assert!(err.error_len().is_none(), "pending bytes are invalid");
            }
        }
        let was_stopped = ts.is_stopped();
        let tail = ts.finish();
        if was_stopped {
            assert!(tail.is_empty());
        }
        out.push_str(&tail);
        if matched.is_none() && ts.is_stopped() {
            matched = ts.stopped.map(|i| ts.matcher.stops[i].clone());
        }
        (out, matched)
    }

    fn bytewise(s: &[u8]) -> Vec<&[u8]> {
        s.chunks(1).collect()
    }

    #[test]
    fn emoji_and_cjk_split_byte_by_byte() {
        let text = "hi 😀 中文 ok 👩‍💻!";
        let mut ts = TextStream::new(vec![]);
        let mut out = String::new();
        for b in text.as_bytes() {
            let d = ts.push(std::slice::from_ref(b));
            assert!(!d.text.contains('\u{FFFD}'));
            out.push_str(&d.text);
        }
        assert_eq!(ts.finish(), "");
        assert_eq!(out, text);

        let mut ts = TextStream::new(vec![]);
        let e = "😀".as_bytes();
        assert_eq!(ts.push(&e[..1]).text, "");
        assert_eq!(ts.push(&e[1..3]).text, "");
        assert_eq!(ts.push(&e[3..]).text, "😀");
    }

    #[test]
    fn stop_spanning_three_tokens() {
        let st = stops(&["<|end|>"]);
        let mut ts = TextStream::new(st.clone());
        assert_eq!(ts.push(b"Hello <|").text, "Hello ");
        assert_eq!(ts.push(b"en").text, "");
        let d = ts.push(b"d|> trailing");
        assert_eq!(d.text, "");
        assert_eq!(d.stopped.as_deref(), Some("<|end|>"));
        assert!(ts.is_stopped());
        assert_eq!(ts.push(b"more"), Delta::default());
        assert_eq!(ts.finish(), "");
    }

    #[test]
    fn released_prefix_that_did_not_complete() {
        let mut ts = TextStream::new(stops(&["<|end|>"]));
        assert_eq!(ts.push(b"a <|en").text, "a ");
        assert_eq!(ts.push(b"x").text, "<|enx");
        assert_eq!(ts.push(b"<|e").text, "");
        assert_eq!(ts.finish(), "<|e");
        assert!(!ts.is_stopped());
    }

    #[test]
    fn prefix_overlap_aab_in_aaab() {
        let st = stops(&["aab"]);
        let mut ts = TextStream::new(st.clone());
        assert_eq!(ts.push(b"a").text, "");
        assert_eq!(ts.push(b"a").text, "");
        assert_eq!(ts.push(b"a").text, "a");
        let d = ts.push(b"b");
        assert_eq!(d.text, "");
        assert_eq!(d.stopped.as_deref(), Some("aab"));
        assert_eq!(stream(&bytewise(b"xaaab"), &st), reference(b"xaaab", &st));
        assert_eq!(stream(&[b"xaaabzz"], &st).0, "xa");
    }

    #[test]
    fn stop_at_first_token() {
        let mut ts = TextStream::new(stops(&["STOP"]));
        let d = ts.push(b"STOP and more");
        assert_eq!(
            d,
            Delta {
                text: String::new(),
                stopped: Some("STOP".into())
            }
        );
        assert_eq!(ts.finish(), "");
    }

    #[test]
    fn stop_that_is_prefix_of_another() {
        let st = stops(&["abcd", "ab"]);
        let (out, m) = stream(&[b"xa", b"bcd"], &st);
        assert_eq!((out.as_str(), m.as_deref()), ("x", Some("ab")));

        let st = stops(&["bc", "abcd"]);
        let (out, m) = stream(&bytewise(b"zabcd"), &st);
        assert_eq!((out.as_str(), m.as_deref()), ("za", Some("bc")));

        let st = stops(&["b", "ab"]);
        let (out, m) = stream(&[b"xab"], &st);
        assert_eq!((out.as_str(), m.as_deref()), ("x", Some("ab")));
        assert_eq!(reference(b"xab", &st), (out, m));
    }

    #[test]
    fn invalid_byte_in_the_middle() {
        let bytes = b"ab\xFFcd";
        let mut ts = TextStream::new(vec![]);
        let mut out = String::new();
        for t in bytewise(bytes) {
            out.push_str(&ts.push(t).text);
        }
        out.push_str(&ts.finish());
        assert_eq!(out, "ab\u{FFFD}cd");

        let mut ts = TextStream::new(vec![]);
        assert_eq!(ts.push(b"\xF0\x9F").text, "");
        assert_eq!(ts.push(b"A").text, "\u{FFFD}A");

        let st = stops(&["\u{FFFD}c"]);
        assert_eq!(
            stream(&bytewise(bytes), &st),
            ("ab".to_string(), Some(st[0].clone()))
        );
    }

    #[test]
    fn finish_with_dangling_partial_character() {
        let mut ts = TextStream::new(stops(&["zz"]));
        let e = "中".as_bytes();
        assert_eq!(ts.push(b"ok z").text, "ok ");
        assert_eq!(ts.push(&e[..2]).text, "");
        assert_eq!(ts.finish(), "z\u{FFFD}");
        assert_eq!(ts.finish(), "");
        assert_eq!(ts.push(b"x"), Delta::default());

        let st = stops(&["a\u{FFFD}"]);
        let (out, m) = stream(&[b"xa", &e[..1]], &st);
        assert_eq!((out.as_str(), m.as_deref()), ("x", Some("a\u{FFFD}")));
    }

    #[test]
    fn multibyte_stop_split_across_tokens() {
        let st = stops(&["😀中"]);
        let text = "a😀b😀中c".as_bytes();
        let (out, m) = stream(&bytewise(text), &st);
        assert_eq!((out.as_str(), m.as_deref()), ("a😀b", Some("😀中")));
    }

    #[test]
    fn hold_back_bound() {
        let st = stops(&["0123456789", "x😀"]);
        let bound = 10 - 1 + 3;
        let mut ts = TextStream::new(st);
        let text = "0123456780123456780123x";
        for b in text.as_bytes() {
            ts.push(std::slice::from_ref(b));
            assert!(ts.held.len() + ts.pending.len() <= bound);
        }
        let e = "😀".as_bytes();
        ts.push(b"012345678");
        ts.push(&e[..3]);
        assert_eq!(ts.held, "012345678");
        assert_eq!(ts.pending.len(), 3);
        assert!(ts.held.len() + ts.pending.len() <= bound);
    }

    #[test]
    fn no_stops_releases_immediately() {
        let mut ts = TextStream::new(vec![String::new()]);
        assert_eq!(ts.push(b"abc").text, "abc");
        assert_eq!(ts.push(b"").text, "");
        assert_eq!(ts.finish(), "");
        assert!(!ts.is_stopped());
    }

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[test]
    fn random_splits_match_one_shot() {
        let pieces: &[&[u8]] = &[
            b"a",
            b"a",
            b"b",
            b"c",
            b" ",
            "é".as_bytes(),
            "中".as_bytes(),
            "😀".as_bytes(),
            b"\xFF",
            b"\x80",
            b"\xF0\x9F",
            b"\xE4\xB8",
            b"\xED\xA0\x80",
        ];
        let stop_pool = [
            "ab",
            "aab",
            "abc",
            "b",
            "cc",
            "😀a",
            "中中",
            "é",
            "a😀",
            "\u{FFFD}b",
            "abab",
            "ba a",
            "c中😀",
        ];
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let mut stopped_cases = 0;
        for case in 0..600 {
            let mut bytes = Vec::new();
            for _ in 0..rng.below(40) {
                bytes.extend_from_slice(pieces[rng.below(pieces.len())]);
            }
            let st: Vec<String> = (0..rng.below(4))
                .map(|_| stop_pool[rng.below(stop_pool.len())].to_string())
                .collect();
            let mut tokens: Vec<&[u8]> = Vec::new();
            let mut i = 0;
            while i < bytes.len() {
                let n = rng.below(6).min(bytes.len() - i);
                tokens.push(&bytes[i..i + n]);
                i += n;
            }
            let want = reference(&bytes, &st);
            let got = stream(&tokens, &st);
            assert_eq!(got, want, "case {case}: bytes {bytes:?} stops {st:?}");
            let one = stream(&[&bytes[..]], &st);
            assert_eq!(one, want, "case {case} single token");
            if want.1.is_some() {
                stopped_cases += 1;
            }
        }
        assert!(stopped_cases > 100, "only {stopped_cases} cases hit a stop");
    }
}
