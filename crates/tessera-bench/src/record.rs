//! What one request saw, timed at the client: when it was sent, when each chunk of
//! tokens arrived, when it ended, or how it failed.

/// A streamed chunk that carried tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Chunk {
    /// Seconds from the request being sent to the chunk being read.
    pub at_s: f64,
    /// Tokens it carried (1 for an OpenAI chunk with a choice).
    pub tokens: u32,
}

/// Why a request failed, by the status it ended with: a gRPC code name
/// (`RESOURCE_EXHAUSTED`), an HTTP status (`429`), or one of [`Failure::TRANSPORT`],
/// [`Failure::TIMEOUT`], [`Failure::STREAM`], [`Failure::PROTOCOL`], [`Failure::EMPTY`].
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    /// The status, used to count failures.
    pub status: String,
    /// What the server or the client said.
    pub message: String,
}

impl Failure {
    /// The connection failed or broke.
    pub const TRANSPORT: &'static str = "transport";
    /// No complete answer within the request timeout.
    pub const TIMEOUT: &'static str = "timeout";
    /// The server sent an error inside a stream it had started (HTTP 200 then an error).
    pub const STREAM: &'static str = "stream_error";
    /// The answer broke the protocol (unparsable chunk, a stream cut short).
    pub const PROTOCOL: &'static str = "protocol";
    /// The request ended without any token.
    pub const EMPTY: &'static str = "empty";

    /// A failure with `status` and `message`.
    pub fn new(status: impl Into<String>, message: impl Into<String>) -> Failure {
        Failure {
            status: status.into(),
            message: message.into(),
        }
    }
}

/// One request of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestRecord {
    /// Prompt tokens.
    pub input_len: usize,
    /// Tokens generated: the server's count when it gives one, else the chunks' sum.
    pub output_len: usize,
    /// Seconds from the start of the run to the request being sent.
    pub start_s: f64,
    /// The chunks that carried tokens, in order.
    pub chunks: Vec<Chunk>,
    /// Seconds from the request being sent to its stream's end (E2EL).
    pub e2el_s: f64,
    /// Why it failed; `None` for a completed request.
    pub failure: Option<Failure>,
}

impl RequestRecord {
    /// Whether the request completed.
    pub fn ok(&self) -> bool {
        self.failure.is_none()
    }

    /// Seconds from the start of the run to the request's end.
    pub fn end_s(&self) -> f64 {
        self.start_s + self.e2el_s
    }

    /// Time to first token: sent → first chunk with a token.
    pub fn ttft_s(&self) -> Option<f64> {
        self.chunks.first().map(|c| c.at_s)
    }

    /// Time per output token after the first: `(E2EL − TTFT) / (output tokens − 1)`,
    /// for requests with more than one output token.
    pub fn tpot_s(&self) -> Option<f64> {
        let ttft = self.ttft_s()?;
        (self.output_len > 1).then(|| (self.e2el_s - ttft) / (self.output_len - 1) as f64)
    }

    /// Inter-token latencies: the gap between each chunk and the one before.
    pub fn itls_s(&self) -> impl Iterator<Item = f64> + '_ {
        self.chunks.windows(2).map(|w| w[1].at_s - w[0].at_s)
    }
}

/// Appends the records of another run of the same point to `records`, as if it had started
/// when the last of them ended: a point run several times (`tessera bench --repeat`) then
/// reads as one run whose duration is the sum of the runs', so its throughput is over its
/// own time and not over the other points' runs in between.
pub fn append_run(records: &mut Vec<RequestRecord>, run: Vec<RequestRecord>) {
    let offset = records.iter().map(RequestRecord::end_s).fold(0.0, f64::max);
    records.extend(run.into_iter().map(|mut r| {
        r.start_s += offset;
        r
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(start_s: f64, e2el_s: f64) -> RequestRecord {
        RequestRecord {
            input_len: 4,
            output_len: 2,
            start_s,
            chunks: vec![Chunk {
                at_s: e2el_s / 2.0,
                tokens: 2,
            }],
            e2el_s,
            failure: None,
        }
    }

    #[test]
    fn a_second_run_starts_where_the_first_ended() {
        let mut records = vec![record(0.0, 2.0), record(0.5, 3.0)];
        append_run(&mut records, vec![record(0.0, 1.0), record(0.25, 1.0)]);
        let starts: Vec<f64> = records.iter().map(|r| r.start_s).collect();
        assert_eq!(starts, [0.0, 0.5, 3.5, 3.75]);
        assert_eq!(records[3].end_s(), 4.75);
        // Per-request figures are untouched.
        assert_eq!(records[2].e2el_s, 1.0);
        assert_eq!(records[2].ttft_s(), Some(0.5));
    }
}
