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
