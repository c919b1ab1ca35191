//! tollgate: a proxy-wasm filter that authenticates requests (JWT/JWKS,
//! introspection, custom endpoint), enforces per-route scopes and counts
//! per-client quotas, shaped like Llama Stack's `server.auth` / `server.quota`.
//!
//! The decisions live in plain modules that know nothing of the host; `filter`
//! is the proxy-wasm glue.
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

pub mod json;
pub mod policy;
pub mod quota;
