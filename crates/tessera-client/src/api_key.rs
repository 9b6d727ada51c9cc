//! [`ApiKey`]: the key a server that requires one is sent, as `authorization: Bearer <key>`.

use std::fmt;
use std::str::FromStr;

use tonic::metadata::{AsciiMetadataValue, MetadataValue};

use crate::ClientError;

/// An API key. Its `Debug` hides the key, so options and errors can be logged; only
/// [`ApiKey::expose`] gives it out.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    /// A key as a server's key file holds it: printable ASCII without spaces, which is
    /// what a bearer token in an HTTP header can carry. Surrounding whitespace (a key
    /// read from a file or an environment variable with its newline) is dropped.
    pub fn new(key: impl Into<String>) -> Result<ApiKey, ClientError> {
        let key = key.into();
        let key = key.trim();
        if key.is_empty() {
            return Err(ClientError::InvalidApiKey("it is empty"));
        }
        if !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ClientError::InvalidApiKey(
                "it must be printable ASCII without spaces",
            ));
        }
        Ok(ApiKey(key.to_string()))
    }

    /// The key itself, for a transport that sets its own header (an HTTP client's bearer
    /// authentication).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The `authorization` metadata value, marked sensitive so that tonic and HTTP/2 never
    /// log it or put it in a compression table.
    pub(crate) fn bearer(&self) -> AsciiMetadataValue {
        let mut value: AsciiMetadataValue = MetadataValue::try_from(format!("Bearer {}", self.0))
            .expect("printable ASCII is a valid metadata value");
        value.set_sensitive(true);
        value
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(…)")
    }
}

impl FromStr for ApiKey {
    type Err = ClientError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ApiKey::new(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_checked_trimmed_and_never_shown() {
        let k = ApiKey::new("  sk-abc.123\n").unwrap();
        assert_eq!(k.expose(), "sk-abc.123");
        assert_eq!(format!("{k:?}"), "ApiKey(…)");
        assert_eq!(k.bearer().to_str().unwrap(), "Bearer sk-abc.123");
        assert!(k.bearer().is_sensitive());
        for bad in ["", "   ", "two words", "clé"] {
            let e = ApiKey::new(bad).unwrap_err();
            assert!(matches!(e, ClientError::InvalidApiKey(_)), "{bad:?}");
            assert!(!e.to_string().contains(bad.trim()) || bad.trim().is_empty());
        }
    }
}
