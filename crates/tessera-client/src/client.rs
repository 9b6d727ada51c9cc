//! [`Client`]: one connection to a Tessera coordinator's public API.

use std::error::Error as _;
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use tessera_proto::v1::generation_client::GenerationClient;
use tessera_proto::v1::{
    GenerateRequest, GenerateResponse, ModelInfoRequest, ModelInfoResponse, TokenizeRequest,
};
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};

use crate::api_key::ApiKey;
use crate::endpoint::endpoint_uri;
use crate::stream::{deadline_exceeded, GenerateStream};
use crate::ClientError;

/// How a [`Client`] connects and calls. The defaults suit a coordinator on the network.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// How long to wait for the coordinator to accept the connection.
    pub connect_timeout: Duration,
    /// Deadline of each call, sent to the server as `grpc-timeout` and enforced here too
    /// (for `GenerateStream`, the whole stream). `None`: no deadline.
    pub call_timeout: Option<Duration>,
    /// Largest response message accepted. tonic's default of 4 MiB is too small for a long
    /// completion with logprobs, or a `Tokenize` of a large text.
    pub max_decoding_message_bytes: usize,
    /// The key to send, as `authorization: Bearer <key>`, to a server that requires one
    /// (`tessera serve --api-key-file`). `None`: no key is sent.
    pub api_key: Option<ApiKey>,
    /// For `https://` endpoints: a PEM file of the CA to trust (a private CA, such as the
    /// one `tessera certs` makes), in place of the system's root certificates.
    pub ca_cert: Option<PathBuf>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            connect_timeout: Duration::from_secs(5),
            call_timeout: None,
            max_decoding_message_bytes: 16 << 20,
            api_key: None,
            ca_cert: None,
        }
    }
}

/// A connection to a Tessera coordinator's `tessera.v1.Generation` service.
///
/// Cheap to clone: clones share one HTTP/2 connection, and tonic reconnects it if it
/// drops. Calls take `&mut self` (tonic's clients do); clone it to call concurrently.
#[derive(Debug, Clone)]
pub struct Client {
    inner: GenerationClient<Channel>,
    call_timeout: Option<Duration>,
    /// `Bearer <key>`, marked sensitive (its `Debug` is hidden).
    authorization: Option<AsciiMetadataValue>,
}

impl Client {
    /// Connects to `host:port`, `http://host:port` or `https://host:port` with the default
    /// [`ClientOptions`].
    pub async fn connect(endpoint: &str) -> Result<Client, ClientError> {
        Client::connect_with(endpoint, ClientOptions::default()).await
    }

    /// Connects with explicit options.
    ///
    /// Fails with [`ClientError::Connect`], naming the endpoint, when nothing listens there,
    /// nothing answers within `connect_timeout`, or the TLS handshake fails (the reason
    /// then says which certificate was refused and why); with [`ClientError::Tls`] when
    /// `ca_cert` cannot be read or is given for a plaintext endpoint.
    pub async fn connect_with(
        endpoint: &str,
        options: ClientOptions,
    ) -> Result<Client, ClientError> {
        let uri = endpoint_uri(endpoint)?;
        let connect_error = |reason: String| ClientError::Connect {
            endpoint: endpoint.trim().to_string(),
            reason,
        };
        let timed_out = || {
            connect_error(format!(
                "no answer within {} s",
                options.connect_timeout.as_secs_f64()
            ))
        };
        let https = uri.starts_with("https://");
        let mut channel_endpoint = Endpoint::from_shared(uri)
            .map_err(|e| connect_error(error_chain(&e)))?
            .connect_timeout(options.connect_timeout);
        match (https, &options.ca_cert) {
            (true, ca_cert) => {
                let tls = tessera_tls::client_tls(ca_cert.as_deref())
                    .map_err(|e| ClientError::Tls(e.to_string()))?;
                channel_endpoint = channel_endpoint
                    .tls_config(tls)
                    .map_err(|e| ClientError::Tls(error_chain(&e)))?;
            }
            (false, Some(_)) => {
                return Err(ClientError::Tls(format!(
                    "a CA certificate is for https:// endpoints; `{}` is plaintext",
                    endpoint.trim()
                )))
            }
            (false, None) => {}
        }
        // `connect_timeout` bounds the TCP connect; the outer timeout also bounds a peer
        // that accepts the connection but never completes the HTTP/2 handshake.
        let channel =
            match tokio::time::timeout(options.connect_timeout, channel_endpoint.connect()).await {
                Err(_) => return Err(timed_out()),
                Ok(Err(e)) if is_timeout(&e) => return Err(timed_out()),
                Ok(Err(e)) => return Err(connect_error(error_chain(&e))),
                Ok(Ok(channel)) => channel,
            };
        Ok(Client {
            inner: GenerationClient::new(channel)
                .max_decoding_message_size(options.max_decoding_message_bytes),
            call_timeout: options.call_timeout,
            authorization: options.api_key.as_ref().map(ApiKey::bearer),
        })
    }

    /// Sets the deadline of the calls that follow (`None`: no deadline).
    pub fn set_timeout(&mut self, timeout: Option<Duration>) {
        self.call_timeout = timeout;
    }

    /// Generates the whole completion and answers once.
    pub async fn generate(
        &mut self,
        request: GenerateRequest,
    ) -> Result<GenerateResponse, ClientError> {
        let timeout = self.call_timeout;
        let call = self.inner.generate(self.request(request));
        Ok(with_deadline(timeout, call).await?.into_inner())
    }

    /// Starts a completion whose tokens stream back as they are produced.
    ///
    /// Returns once the server has accepted the request; errors the server finds in the
    /// request itself (`INVALID_ARGUMENT`, `OUT_OF_RANGE`) come back here rather than from
    /// the stream. The call's deadline, if set, covers the whole stream.
    pub async fn generate_stream(
        &mut self,
        request: GenerateRequest,
    ) -> Result<GenerateStream, ClientError> {
        let timeout = self.call_timeout;
        let started = tokio::time::Instant::now();
        let call = self.inner.generate_stream(self.request(request));
        let streaming = with_deadline(timeout, call).await?.into_inner();
        let deadline = timeout.map(|t| (started + t, t));
        Ok(GenerateStream::new(streaming, deadline))
    }

    /// Turns text into the model's token ids, with the tokenizer the cluster uses.
    pub async fn tokenize(&mut self, text: impl Into<String>) -> Result<Vec<u32>, ClientError> {
        let timeout = self.call_timeout;
        let request = self.request(TokenizeRequest { text: text.into() });
        let call = self.inner.tokenize(request);
        Ok(with_deadline(timeout, call).await?.into_inner().token_ids)
    }

    /// Describes the model and the workers serving it.
    pub async fn model_info(&mut self) -> Result<ModelInfoResponse, ClientError> {
        let timeout = self.call_timeout;
        let call = self.inner.model_info(self.request(ModelInfoRequest {}));
        Ok(with_deadline(timeout, call).await?.into_inner())
    }

    /// A request carrying the call's deadline as `grpc-timeout`, so the server can stop
    /// work nobody waits for any more, and the API key if there is one.
    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        if let Some(timeout) = self.call_timeout {
            request.set_timeout(timeout);
        }
        if let Some(value) = &self.authorization {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        request
    }
}

/// Runs a call, ending it with `DEADLINE_EXCEEDED` if it outlives `timeout`: the server
/// is told the deadline, but a stuck server or network must not hang the caller.
///
/// tonic's channel enforces the `grpc-timeout` it sends too, and reports it as
/// `CANCELLED: Timeout expired`; a `CANCELLED` at or past the deadline is reported as the
/// `DEADLINE_EXCEEDED` it is.
async fn with_deadline<T>(
    timeout: Option<Duration>,
    call: impl Future<Output = Result<T, Status>>,
) -> Result<T, ClientError> {
    let Some(t) = timeout else {
        return Ok(call.await?);
    };
    let started = tokio::time::Instant::now();
    match tokio::time::timeout(t, call).await {
        Ok(Err(status)) if status.code() == Code::Cancelled && started.elapsed() >= t => {
            Err(deadline_exceeded(t).into())
        }
        Ok(result) => Ok(result?),
        Err(_) => Err(deadline_exceeded(t).into()),
    }
}

/// Whether a transport error is tonic's connect timeout.
fn is_timeout(error: &tonic::transport::Error) -> bool {
    let mut source = error.source();
    while let Some(e) = source {
        if e.to_string().contains("timed out") || e.to_string().contains("timeout expired") {
            return true;
        }
        source = e.source();
    }
    false
}

/// The innermost cause of a transport error, which is the one that says what happened
/// (`Connection refused (os error 111)`), lower-cased the way Rust error messages read.
/// The outer layers ("transport error", "client error (Connect)") add nothing a person
/// can act on. A failed TLS handshake says which certificate was refused and why.
fn error_chain(error: &tonic::transport::Error) -> String {
    if let Some(failure) = tessera_tls::HandshakeFailure::find(error) {
        return failure.describe("the server");
    }
    let mut innermost: &dyn std::error::Error = error;
    while let Some(e) = innermost.source() {
        innermost = e;
    }
    let message = innermost.to_string();
    let mut chars = message.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => message,
    }
}
