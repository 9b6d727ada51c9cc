//! API keys: the bearer tokens the public APIs require when `api_key_file` is set.
//!
//! The gRPC `tessera.v1.Generation` service checks metadata `authorization: Bearer <key>`
//! in an interceptor ([`GrpcAuth`]), before the request message is read; the HTTP API
//! checks the same header on every `/v1/*` route. Left open, on purpose: the health probes
//! (`grpc.health.v1.Health`, `GET /health`), which load balancers and orchestrators call
//! without credentials; `GET /metrics`, for a Prometheus scraper on a private network
//! (bind `--http-listen` where only it reaches, or put the endpoint behind a proxy); gRPC
//! reflection, which describes the public `.proto` and nothing else; and worker
//! registration (`tessera.worker.v1.Cluster`), which API keys do not cover: the
//! cluster's own network and transport security are its protection.
//!
//! Keys are compared in constant time ([`ApiKeys::check`]): how long a check takes
//! depends on the lengths of the keys, never on their bytes.

use std::path::Path;
use std::sync::Arc;

use tonic::{Request, Status};

use crate::error::StartError;

/// The keys a server accepts; never empty.
pub struct ApiKeys {
    keys: Vec<Vec<u8>>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeys({} keys)", self.keys.len())
    }
}

/// Why a request was refused; the message never contains the key presented.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `authorization` header.
    #[error("authorization: no API key; send the header `authorization: Bearer <key>`")]
    Missing,
    /// An `authorization` header that is not `Bearer <key>`.
    #[error("authorization: the header is not `Bearer <key>`")]
    Malformed,
    /// A well-formed header whose key is not one of the server's.
    #[error("authorization: the API key is not valid")]
    Invalid,
}

impl AuthError {
    /// The `reason` label of `tessera_requests_unauthenticated_total`.
    pub fn label(self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Malformed => "malformed",
            AuthError::Invalid => "invalid",
        }
    }
}

impl ApiKeys {
    /// Reads a key file: one key per line; blank lines and lines starting with `#` are
    /// ignored, as is whitespace around a key. A missing or unreadable file, a file with
    /// no key, or a key that cannot travel in an HTTP header is an error naming the file
    /// (and the line), never the key.
    pub fn load(path: &Path) -> Result<ApiKeys, StartError> {
        let named =
            |why: String| StartError::Config(format!("api_key_file {}: {why}", path.display()));
        let text = std::fs::read_to_string(path).map_err(|e| named(e.to_string()))?;
        ApiKeys::parse(&text).map_err(named)
    }

    /// Parses the text of a key file (see [`ApiKeys::load`]).
    pub fn parse(text: &str) -> Result<ApiKeys, String> {
        let mut keys = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let key = line.trim();
            if key.is_empty() || key.starts_with('#') {
                continue;
            }
            // A bearer token is visible ASCII with no spaces (RFC 6750's b64token is
            // narrower still); anything else could not be sent in the header.
            if !key.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(format!(
                    "line {}: a key must be printable ASCII without spaces",
                    i + 1
                ));
            }
            keys.push(key.as_bytes().to_vec());
        }
        if keys.is_empty() {
            return Err("no API key in the file (one key per line; `#` starts a comment)".into());
        }
        Ok(ApiKeys { keys })
    }

    /// How many keys are accepted.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Always false: a key set has at least one key.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Checks the value of an `authorization` header (`None`: no header). The scheme is
    /// matched without regard to case, as HTTP's are; every key is compared, whichever
    /// matches.
    pub fn check(&self, header: Option<&[u8]>) -> Result<(), AuthError> {
        let header = header.ok_or(AuthError::Missing)?;
        let presented = bearer_token(header).ok_or(AuthError::Malformed)?;
        let matched = self
            .keys
            .iter()
            .fold(false, |found, key| found | constant_time_eq(key, presented));
        if matched {
            Ok(())
        } else {
            Err(AuthError::Invalid)
        }
    }
}

/// The token of `Bearer <token>`: the scheme in any case, then one or more spaces.
fn bearer_token(header: &[u8]) -> Option<&[u8]> {
    const SCHEME: &[u8] = b"bearer ";
    if header.len() <= SCHEME.len() || !header[..SCHEME.len()].eq_ignore_ascii_case(SCHEME) {
        return None;
    }
    let token = header[SCHEME.len()..].trim_ascii();
    (!token.is_empty() && token.iter().all(u8::is_ascii_graphic)).then_some(token)
}

/// Whether `a == b`, in a time that depends on the lengths only: every byte is compared,
/// with no early exit. The lengths are not secret (a key's length says little, and the
/// presented one is the client's own).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // Keeps the compiler from turning the fold back into a comparison that stops early.
    std::hint::black_box(diff) == 0
}

/// The tonic interceptor in front of `tessera.v1.Generation`: with keys, a request
/// without a valid `authorization: Bearer <key>` gets UNAUTHENTICATED before its message
/// is read; without keys, every request passes.
#[derive(Debug, Clone, Default)]
pub struct GrpcAuth {
    keys: Option<Arc<ApiKeys>>,
}

impl GrpcAuth {
    /// Checks against `keys`; `None` lets everything through.
    pub fn new(keys: Option<Arc<ApiKeys>>) -> Self {
        GrpcAuth { keys }
    }
}

impl tonic::service::Interceptor for GrpcAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(keys) = &self.keys else {
            return Ok(request);
        };
        let header = request
            .metadata()
            .get("authorization")
            .map(|v| v.as_bytes());
        match keys.check(header) {
            Ok(()) => Ok(request),
            Err(e) => {
                count_refusal("grpc", e);
                Err(Status::unauthenticated(e.to_string()))
            }
        }
    }
}

/// Counts a refused request in `tessera_requests_unauthenticated_total`.
pub fn count_refusal(api: &'static str, e: AuthError) {
    metrics::counter!(
        crate::metrics::REQUESTS_UNAUTHENTICATED,
        "api" => api,
        "reason" => e.label()
    )
    .increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor;
    use tonic::Code;

    fn keys() -> ApiKeys {
        ApiKeys::parse("# staging\n\n  key-one  \nsecond_KEY.2\n# old-key\n").unwrap()
    }

    #[test]
    fn key_files_skip_blanks_and_comments() {
        let k = keys();
        assert_eq!(k.len(), 2);
        assert!(k.check(Some(b"Bearer key-one")).is_ok());
        assert!(k.check(Some(b"Bearer second_KEY.2")).is_ok());
        assert_eq!(k.check(Some(b"Bearer old-key")), Err(AuthError::Invalid));
        assert_eq!(
            k.check(Some(b"Bearer # staging")),
            Err(AuthError::Malformed),
            "a comment is not a key"
        );
    }

    #[test]
    fn files_without_keys_or_with_unsendable_keys_are_refused() {
        for text in ["", "\n\n", "# only a comment\n   \n"] {
            let e = ApiKeys::parse(text).unwrap_err();
            assert!(e.contains("no API key"), "{text:?}: {e}");
        }
        let e = ApiKeys::parse("good\nbad key\n").unwrap_err();
        assert!(e.starts_with("line 2:"), "{e}");
        assert!(!e.contains("bad key"), "the key is not echoed: {e}");
        assert!(ApiKeys::parse("clé\n").is_err());
    }

    #[test]
    fn a_missing_file_is_named() {
        let path = Path::new("/nonexistent/tessera-keys.txt");
        let e = ApiKeys::load(path).unwrap_err().to_string();
        assert!(
            e.contains("api_key_file") && e.contains("tessera-keys.txt"),
            "{e}"
        );
    }

    #[test]
    fn headers_are_told_apart() {
        let k = keys();
        assert_eq!(k.check(None), Err(AuthError::Missing));
        for bad in [
            &b""[..],
            b"key-one",
            b"Bearer",
            b"Bearer ",
            b"Bearer    ",
            b"Basic a2V5LW9uZQ==",
            b"Bearerkey-one",
            b"Bearer key one",
            b"Bearer key-\xffone",
        ] {
            assert_eq!(
                k.check(Some(bad)),
                Err(AuthError::Malformed),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        for good in [&b"bearer key-one"[..], b"BEARER   key-one  "] {
            assert!(k.check(Some(good)).is_ok());
        }
        for wrong in [&b"Bearer key-onE"[..], b"Bearer key-on", b"Bearer key-one1"] {
            assert_eq!(k.check(Some(wrong)), Err(AuthError::Invalid));
        }
    }

    #[test]
    fn constant_time_eq_is_equality() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(!constant_time_eq(b"\x00", b"\x80"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn the_interceptor_refuses_with_unauthenticated_and_never_echoes_the_key() {
        let mut auth = GrpcAuth::new(Some(Arc::new(keys())));
        let with = |value: Option<&str>| {
            let mut r = Request::new(());
            if let Some(v) = value {
                r.metadata_mut().insert("authorization", v.parse().unwrap());
            }
            r
        };
        assert!(auth.call(with(Some("Bearer key-one"))).is_ok());
        let s = auth.call(with(None)).unwrap_err();
        assert_eq!(s.code(), Code::Unauthenticated);
        assert!(s.message().contains("no API key"), "{s:?}");
        let s = auth.call(with(Some("Bearer not-a-key-xyz"))).unwrap_err();
        assert_eq!(s.code(), Code::Unauthenticated);
        assert!(s.message().contains("not valid"), "{s:?}");
        assert!(!s.message().contains("not-a-key-xyz"), "{s:?}");
        let mut open = GrpcAuth::new(None);
        assert!(open.call(with(None)).is_ok(), "no keys: nothing is checked");
    }
}
