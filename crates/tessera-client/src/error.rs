//! What can go wrong talking to a Tessera cluster, in words a person can act on.

use std::fmt;

use tonic::{Code, Status};

/// Errors of [`Client`](crate::Client) calls.
///
/// The `Display` of a server's answer is `CODE: message` (`INVALID_ARGUMENT: max_tokens:
/// …`), the way gRPC tools print statuses, so a CLI can print `error: {e}` as it is.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The endpoint string is not `host:port`, `http://host:port` or `https://host:port`.
    #[error("invalid endpoint `{endpoint}`: {reason}")]
    InvalidEndpoint {
        /// The endpoint as given.
        endpoint: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The API key cannot be sent (the message says why; it never contains the key).
    #[error("invalid API key: {0}")]
    InvalidApiKey(&'static str),
    /// Nothing answered at the endpoint (refused, unreachable, or no answer in time).
    #[error("cannot connect to {endpoint}: {reason}")]
    Connect {
        /// The endpoint as given.
        endpoint: String,
        /// The cause, e.g. `connection refused` or `no answer within 5 s`.
        reason: String,
    },
    /// TLS could not be set up: an unreadable CA certificate, or one given for a plaintext
    /// endpoint.
    #[error("TLS: {0}")]
    Tls(String),
    /// The call ended with a gRPC status other than OK (from the server, or
    /// `DEADLINE_EXCEEDED` from this client's own per-call timeout).
    #[error("{}", StatusLine(.0))]
    Status(Status),
    /// The server broke the protocol, e.g. a stream that ended without its last message.
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl ClientError {
    /// The gRPC status, when the call got as far as one.
    pub fn status(&self) -> Option<&Status> {
        match self {
            ClientError::Status(s) => Some(s),
            _ => None,
        }
    }

    /// The gRPC status code, when the call got as far as one.
    pub fn code(&self) -> Option<Code> {
        self.status().map(Status::code)
    }
}

// Not `#[from]`: that would make the `Status` the error's `source()`, and `{:#}` printers
// (anyhow) would append tonic's debug-like `Display` of it after our own line.
impl From<Status> for ClientError {
    fn from(status: Status) -> Self {
        ClientError::Status(status)
    }
}

/// `CODE: message`, or just `CODE` when the message is empty. A status this client made
/// from a local failure (a connection reset, a broken HTTP/2 stream) carries that failure as
/// its source, and tonic's message for it is only `transport error`; the innermost cause
/// follows it then, since that is the part that says what happened.
struct StatusLine<'a>(&'a Status);

impl fmt::Display for StatusLine<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let code = code_name(self.0.code());
        match self.0.message() {
            "" => f.write_str(code)?,
            message => write!(f, "{code}: {message}")?,
        }
        if let Some(cause) = innermost_cause(self.0) {
            if !self.0.message().contains(&cause) {
                write!(f, ": {cause}")?;
            }
        }
        Ok(())
    }
}

/// The last error in the source chain of `status`, if it has one.
fn innermost_cause(status: &Status) -> Option<String> {
    let mut cause = std::error::Error::source(status)?;
    while let Some(next) = cause.source() {
        cause = next;
    }
    Some(cause.to_string())
}

/// The canonical name of a gRPC status code, as in the gRPC spec and `grpcurl`'s output:
/// `INVALID_ARGUMENT`, `UNAVAILABLE`, ….
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_prints_as_code_and_message() {
        let e = ClientError::from(Status::invalid_argument("max_tokens: must be at least 1"));
        assert_eq!(
            e.to_string(),
            "INVALID_ARGUMENT: max_tokens: must be at least 1"
        );
        assert_eq!(e.code(), Some(Code::InvalidArgument));
        assert!(
            std::error::Error::source(&e).is_none(),
            "no source, so `{{:#}}` prints one clean line"
        );
        let e = ClientError::from(Status::cancelled(""));
        assert_eq!(e.to_string(), "CANCELLED");
    }

    #[test]
    fn a_local_failure_names_its_cause() {
        // What tonic makes of a broken connection: an UNKNOWN `transport error` whose
        // source chain ends at the I/O error.
        #[derive(Debug)]
        struct Transport(std::io::Error);
        impl fmt::Display for Transport {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("transport error")
            }
        }
        impl std::error::Error for Transport {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let reset = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "connection reset");
        let e = ClientError::from(Status::from_error(Box::new(Transport(reset))));
        assert_eq!(e.code(), Some(Code::Unknown));
        assert_eq!(e.to_string(), "UNKNOWN: transport error: connection reset");
    }

    #[test]
    fn every_code_has_its_canonical_name() {
        // The names are the spec's: the numeric code's position in this list.
        let names = [
            "OK",
            "CANCELLED",
            "UNKNOWN",
            "INVALID_ARGUMENT",
            "DEADLINE_EXCEEDED",
            "NOT_FOUND",
            "ALREADY_EXISTS",
            "PERMISSION_DENIED",
            "RESOURCE_EXHAUSTED",
            "FAILED_PRECONDITION",
            "ABORTED",
            "OUT_OF_RANGE",
            "UNIMPLEMENTED",
            "INTERNAL",
            "UNAVAILABLE",
            "DATA_LOSS",
            "UNAUTHENTICATED",
        ];
        for (i, name) in names.iter().enumerate() {
            assert_eq!(code_name(Code::from_i32(i as i32)), *name);
        }
    }
}
