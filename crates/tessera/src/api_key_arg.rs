//! `--api-key` (or `TESSERA_API_KEY`): the key the commands that call a running cluster
//! send to one started with `--api-key-file`.

use clap::Args;
use tessera_client::{ApiKey, ClientOptions};

/// The API key flag.
#[derive(Debug, Clone, Args)]
pub struct ApiKeyArg {
    /// API key for a server started with --api-key-file, sent as `authorization: Bearer
    /// KEY`. Prefer the environment variable: a flag's value shows in the process list.
    #[arg(
        long = "api-key",
        env = "TESSERA_API_KEY",
        value_name = "KEY",
        hide_env_values = true
    )]
    pub api_key: Option<ApiKey>,
}

impl ApiKeyArg {
    /// Client options that send the key, if one was given, and trust the CA of `tls`,
    /// if one was given.
    pub fn client_options(&self, tls: &crate::tls_args::CaCertArg) -> ClientOptions {
        ClientOptions {
            api_key: self.api_key.clone(),
            ca_cert: tls.ca_cert.clone(),
            ..ClientOptions::default()
        }
    }
}
