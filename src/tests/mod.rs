//! Tests that span modules, in their own house (`#[cfg(test)]` only; each
//! module's own tests stay in its `mod tests`):
//!
//! - [`fixtures`]: keys, JWKs, claims and tokens shared by the others (and
//!   by `rsa`'s tests);
//! - [`crypto`]: token verification with real keys and real signatures
//!   (tokens minted by jwt-simple, checked by `key_set`, `jwt` and `claims`),
//!   natively and inside wasm (`scripts/test-wasm.sh` requires some of them
//!   to pass there): per algorithm, key selection, signatures, claims, RSA
//!   against ring;
//! - [`core_cache`]: `auth::Core` with real tokens (the verified-token cache);
//! - [`layout`] (native only): no import cycles between the modules of `src/`.

mod core_cache;
mod crypto;
pub(crate) mod fixtures;
#[cfg(not(target_arch = "wasm32"))]
mod layout;
