//! The token stream of `GenerateStream`, with the call's deadline and the protocol's
//! "the last message carries the finish reason" rule enforced on the client side.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tessera_proto::v1::{FinishReason, GenerateResponse, GenerateStreamResponse};
use tokio::time::Instant;
use tokio_stream::Stream;
use tonic::{Status, Streaming};

use crate::ClientError;

/// The messages of one `GenerateStream` call, as they arrive.
///
/// A [`Stream`] of `Result<GenerateStreamResponse, ClientError>`; or call
/// [`message`](Self::message) in a loop, or [`collect_response`](Self::collect_response)
/// for the whole completion. The stream yields at most one error and then ends. A stream
/// the server closes before the message with the finish reason ends with
/// [`ClientError::Protocol`], so a truncated completion never looks like a whole one.
pub struct GenerateStream {
    inner: Streaming<GenerateStreamResponse>,
    deadline: Option<(Pin<Box<tokio::time::Sleep>>, Duration)>,
    finished: bool,
    done: bool,
}

impl GenerateStream {
    /// `deadline`: when the call must be over, and the timeout that set it (for the error).
    pub(crate) fn new(
        inner: Streaming<GenerateStreamResponse>,
        deadline: Option<(Instant, Duration)>,
    ) -> Self {
        GenerateStream {
            inner,
            deadline: deadline.map(|(at, t)| (Box::pin(tokio::time::sleep_until(at)), t)),
            finished: false,
            done: false,
        }
    }

    /// The next message; `Ok(None)` once the last one (with the finish reason) was read.
    pub async fn message(&mut self) -> Result<Option<GenerateStreamResponse>, ClientError> {
        poll_fn(|cx| Pin::new(&mut *self).poll_next(cx))
            .await
            .transpose()
    }

    /// Reads the rest of the stream into one response, as `Generate` would have answered.
    pub async fn collect_response(mut self) -> Result<GenerateResponse, ClientError> {
        let mut response = GenerateResponse::default();
        while let Some(message) = self.message().await? {
            accumulate(&mut response, message);
        }
        Ok(response)
    }
}

impl Stream for GenerateStream {
    type Item = Result<GenerateStreamResponse, ClientError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        if let Some((sleep, timeout)) = &mut this.deadline {
            if sleep.as_mut().poll(cx).is_ready() {
                this.done = true;
                let status = deadline_exceeded(*timeout);
                return Poll::Ready(Some(Err(status.into())));
            }
        }
        match Pin::new(&mut this.inner).poll_next(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(message))) => {
                if message.finish_reason != FinishReason::Unspecified as i32 {
                    this.finished = true;
                }
                Poll::Ready(Some(Ok(message)))
            }
            Poll::Ready(Some(Err(status))) => {
                this.done = true;
                Poll::Ready(Some(Err(status.into())))
            }
            Poll::Ready(None) => {
                this.done = true;
                if this.finished {
                    Poll::Ready(None)
                } else {
                    Poll::Ready(Some(Err(ClientError::Protocol(
                        "the stream ended before its last message (the one with the finish reason)"
                            .to_string(),
                    ))))
                }
            }
        }
    }
}

/// Adds one stream message to a response being assembled: text, token ids and logprobs
/// are appended; the last message's finish reason, stop string, counts and seed are kept.
pub fn accumulate(response: &mut GenerateResponse, message: GenerateStreamResponse) {
    response.text.push_str(&message.text);
    response.token_ids.extend_from_slice(&message.token_ids);
    response.logprobs.extend_from_slice(&message.logprobs);
    if message.finish_reason != FinishReason::Unspecified as i32 {
        response.finish_reason = message.finish_reason;
        response.matched_stop = message.matched_stop;
        response.prompt_tokens = message.prompt_tokens;
        response.completion_tokens = message.completion_tokens;
        response.seed = message.seed;
    }
}

/// The status of a call that ran past this client's per-call timeout.
pub(crate) fn deadline_exceeded(timeout: Duration) -> Status {
    Status::deadline_exceeded(format!(
        "no complete answer within the {} s timeout",
        timeout.as_secs_f64()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accumulate_appends_pieces_and_keeps_the_last_messages_summary() {
        let mut r = GenerateResponse::default();
        accumulate(
            &mut r,
            GenerateStreamResponse {
                token_ids: vec![1, 2],
                text: "Hel".into(),
                logprobs: vec![-0.5, -1.0],
                ..Default::default()
            },
        );
        assert_eq!(r.finish_reason, FinishReason::Unspecified as i32);
        accumulate(
            &mut r,
            GenerateStreamResponse {
                token_ids: vec![3],
                text: "lo".into(),
                logprobs: vec![-2.0],
                finish_reason: FinishReason::Stop as i32,
                matched_stop: "\n".into(),
                prompt_tokens: 4,
                completion_tokens: 3,
                seed: 42,
            },
        );
        assert_eq!(r.text, "Hello");
        assert_eq!(r.token_ids, [1, 2, 3]);
        assert_eq!(r.logprobs, [-0.5, -1.0, -2.0]);
        assert_eq!(r.finish_reason(), FinishReason::Stop);
        assert_eq!(r.matched_stop, "\n");
        assert_eq!((r.prompt_tokens, r.completion_tokens, r.seed), (4, 3, 42));
    }
}
