//! A Rust client of Tessera's public gRPC API, `tessera.v1.Generation`
//! (`proto/tessera/v1/generate.proto`).
//!
//! ```no_run
//! # async fn demo() -> Result<(), tessera_client::ClientError> {
//! use tessera_client::{Client, GenerateRequest};
//!
//! let mut client = Client::connect("127.0.0.1:50051").await?;
//! let response = client
//!     .generate(GenerateRequest {
//!         prompt: "Hello, my name is".into(),
//!         max_tokens: Some(16),
//!         ..Default::default()
//!     })
//!     .await?;
//! println!("{}", response.text);
//!
//! let mut stream = client
//!     .generate_stream(GenerateRequest {
//!         prompt: "Once upon a time".into(),
//!         ..Default::default()
//!     })
//!     .await?;
//! while let Some(message) = stream.message().await? {
//!     print!("{}", message.text);
//! }
//! # Ok(())
//! # }
//! ```
//!
//! Fields of [`GenerateRequest`] left `None` take the server's defaults. Errors print as
//! `CODE: message` ([`ClientError`]). A server started with `--api-key-file` needs
//! [`ClientOptions::api_key`]; without it every call is `UNAUTHENTICATED`.

mod api_key;
mod client;
mod endpoint;
mod error;
mod stream;

pub use api_key::ApiKey;
pub use client::{Client, ClientOptions};
pub use endpoint::endpoint_uri;
pub use error::{code_name, ClientError};
pub use stream::{accumulate, GenerateStream};

/// The whole generated package, for what the curated re-exports above leave out (the raw
/// tonic client and server).
pub use tessera_proto::v1 as proto;
/// The messages of the API, as generated from the `.proto`.
pub use tessera_proto::v1::{
    FinishReason, GenerateRequest, GenerateResponse, GenerateStreamResponse, ModelInfoResponse,
    TokenizeResponse, WorkerInfo,
};
/// The trait [`GenerateStream`] implements.
pub use tokio_stream::Stream;
/// gRPC status codes, to match on [`ClientError::code`].
pub use tonic::Code;
