//! tokenrelay: a reverse-proxy sidecar for apps that must call an OAuth2-protected API but
//! cannot do OAuth2 themselves. Each upstream gets a local listener; every request is
//! forwarded with the credential's current access token attached, and a background
//! refresher keeps that token fresh without ever losing or double-spending a rotating
//! refresh token.
//!
//! # Layout
//! - [`config`]: YAML → validated [`config::Config`]; every error names its key path.
//! - [`secret`]: the redacting string type that carries every token and secret.
//! - Leaves shared by config and the layers above it: [`keys`] (signing and encryption
//!   keys read from files), [`http_names`] (hop-by-hop and credential header rules),
//!   [`target`] (an upstream's resolved base), [`watched_files`] (files re-read when
//!   they change), [`clock`], [`shutdown`].
//! - [`oauth`]: token endpoint requests and strict answer parsing; authorization server
//!   discovery (an `issuer`'s metadata fills endpoints at start and reload).
//! - [`credential`]: the lock-free token cell, state, and the single-flight refresher.
//! - [`store`]: durable shared state (`load`, CAS, lease, watch); file backend; encryption.
//! - [`proxy`]: the forwarding path (headers, bodies, 401 retry, errors).
//! - [`server`]: inbound listeners with limits and graceful drain, the listener worker
//!   threads, and the hyper plumbing of inbound connections.
//! - [`metrics`]: the Prometheus families.
//! - [`instance`]: the running process: its credentials and listeners and how a config
//!   (the first or a reloaded one) is applied to them, what asks for a reload, the
//!   admin listener (`/healthz`, `/readyz`, `/status`, `/metrics`, the status page),
//!   and the wiring and shutdown of it all ([`instance::run`]).
//! - [`commands`]: the CLI.

#![forbid(unsafe_code)]

// The public API: what the binary and the tests use. Everything else is private.
pub mod config;
pub mod oauth;
pub mod secret;
pub mod store;

mod clock;
mod commands;
mod credential;
mod http_names;
mod instance;
mod keys;
mod logging;
mod metrics;
mod proxy;
mod server;
mod shutdown;
mod target;
mod tls;
mod watched_files;

pub use clock::Instant;
pub use commands::{main, Cli};
pub use credential::refresher::{lease_ttl, Refresher};
pub use credential::Credential;
pub use instance::run::{run, run_with, Bound, Loader, ReloadOptions};
pub use keys::fingerprint;
pub use logging::init as init_logging;
pub use metrics::Metrics;
pub use tls::install_crypto_provider;
