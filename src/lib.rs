//! tollgate: a proxy-wasm filter that authenticates requests (JWT/JWKS,
//! introspection, custom endpoint), enforces per-route scopes and counts
//! per-client quotas, shaped like Llama Stack's `server.auth` / `server.quota`.
//!
//! The decisions live in plain modules that know nothing of the host (time is
//! passed in, shared data is a [`store::SharedStore`]):
//!
//! - [`config`]: the plugin configuration, refused naming the key; read
//!   through [`json`], the strict key-path reader.
//! - [`credentials`]: credentials in cookies and query parameters, and the
//!   request without them.
//! - [`path`]: request path normalisation; [`route_rules`]: public paths and
//!   the scopes and attributes each route requires; [`route_policy`]: OGX's
//!   route-level permit / forbid rules.
//! - [`alg`]: the accepted JWS algorithms; [`key_set`]: a parsed JWKS;
//!   [`rsa`]: RS256/384/512 with per-key precomputation; [`jwt`]: token
//!   checks and verification; [`jwks_cache`]: when the key set is fetched and
//!   how it is shared across VMs.
//! - [`provider`]: what the callout providers share (upstream, request,
//!   answer, errors), with [`provider::introspection`] (RFC 7662) and
//!   [`provider::custom`] (Llama Stack's custom endpoint).
//! - [`claims`]: from claims to an identity and its forwarded headers.
//! - [`token_cache`]: the per-VM cache of verdicts about tokens.
//! - [`quota`]: per-client counters in shared data, or through a rate-limit
//!   service ([`rls`]: its protocol), windowed by [`period`]; [`store`]:
//!   shared data as the core sees it (and the one fake store of the tests).
//! - [`usage`]: the token usage an OpenAI-compatible answer reports (JSON or
//!   an event stream), read incrementally with bounded memory.
//! - [`token_quota`]: per-client token budgets (`quota.tokens`): what is
//!   counted, reserved and charged.
//! - [`auth`]: the request decision (credentials → identity → route rules →
//!   quota); [`response`]: every local answer.
//! - [`driver`]: every request's lifecycle (parking, callouts, the tick), also
//!   without the host.
//!
//! The host glue: `filter` pumps proxy-wasm callbacks into the driver and
//! performs its effects, every host call through `host`; [`forward`] writes
//! an allowed request's identity headers; [`metrics`] defines and updates
//! the Prometheus metrics. Tests that span modules live in
//! `src/tests/`.
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

pub mod alg;
pub mod auth;
pub mod claims;
pub mod config;
pub mod credentials;
pub mod driver;
pub mod filter;
pub mod forward;
mod host;
pub mod json;
pub mod jwks_cache;
pub mod jwt;
pub mod key_set;
pub mod metrics;
pub mod path;
pub mod period;
pub mod provider;
pub mod quota;
pub mod response;
pub mod rls;
pub mod route_policy;
pub mod route_rules;
pub mod rsa;
pub mod store;
#[cfg(test)]
mod tests;
pub mod token_cache;
pub mod token_quota;
pub mod usage;

#[cfg(target_arch = "wasm32")]
proxy_wasm::main! {{
    proxy_wasm::set_log_level(proxy_wasm::types::LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn proxy_wasm::traits::RootContext> {
        Box::new(filter::Root::default())
    });
}}
