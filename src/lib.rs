//! tollgate: a proxy-wasm filter that authenticates requests (JWT/JWKS,
//! introspection, custom endpoint), enforces per-route scopes and counts
//! per-client quotas, shaped like Llama Stack's `server.auth` / `server.quota`.
//!
//! The decisions live in plain modules that know nothing of the host
//! (`config`, `jwks`, `jwt`, `claims`, `policy`, `quota`, `auth`, `response`);
//! `driver` owns every request's lifecycle (parking, callouts, the tick),
//! also without the host; `filter` is the proxy-wasm glue that pumps host
//! callbacks into the driver and performs its effects, through `host`.
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

pub mod auth;
pub mod claims;
pub mod config;
#[cfg(test)]
mod crypto_tests;
pub mod custom;
pub mod driver;
pub mod filter;
mod host;
pub mod introspection;
pub mod json;
pub mod jwks;
pub mod jwt;
pub mod metrics;
pub mod policy;
pub mod quota;
pub mod response;
pub mod rsa;

#[cfg(target_arch = "wasm32")]
proxy_wasm::main! {{
    proxy_wasm::set_log_level(proxy_wasm::types::LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn proxy_wasm::traits::RootContext> {
        Box::new(filter::Root::default())
    });
}}
