//! JSON Web Key Sets: parsed once per fetched document into ready-to-use
//! verification keys.
//!
//! Keys that cannot be used are skipped (and logged), never fatal: a key set
//! that mixes unknown key types, weak RSA keys or encryption keys with good
//! signing keys keeps working with the good ones.

use crate::jwt::Alg;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jwt_simple::prelude::*;
use serde_json::Value;
use std::fmt;

/// A verification key, built for one algorithm.
pub enum PublicKey {
    Rs256(RS256PublicKey),
    Rs384(RS384PublicKey),
    Rs512(RS512PublicKey),
    Ps256(PS256PublicKey),
    Ps384(PS384PublicKey),
    Ps512(PS512PublicKey),
    Es256(ES256PublicKey),
    Es384(ES384PublicKey),
    EdDsa(Ed25519PublicKey),
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({:?})", self.alg())
    }
}

impl PublicKey {
    pub fn alg(&self) -> Alg {
        match self {
            PublicKey::Rs256(_) => Alg::RS256,
            PublicKey::Rs384(_) => Alg::RS384,
            PublicKey::Rs512(_) => Alg::RS512,
            PublicKey::Ps256(_) => Alg::PS256,
            PublicKey::Ps384(_) => Alg::PS384,
            PublicKey::Ps512(_) => Alg::PS512,
            PublicKey::Es256(_) => Alg::ES256,
            PublicKey::Es384(_) => Alg::ES384,
            PublicKey::EdDsa(_) => Alg::EdDSA,
        }
    }

    /// Verifies signature and standard claims (jwt-simple does both).
    pub fn verify(
        &self,
        token: &str,
        options: VerificationOptions,
    ) -> Result<JWTClaims<NoCustomClaims>, jwt_simple::Error> {
        let o = Some(options);
        match self {
            PublicKey::Rs256(k) => k.verify_token(token, o),
            PublicKey::Rs384(k) => k.verify_token(token, o),
            PublicKey::Rs512(k) => k.verify_token(token, o),
            PublicKey::Ps256(k) => k.verify_token(token, o),
            PublicKey::Ps384(k) => k.verify_token(token, o),
            PublicKey::Ps512(k) => k.verify_token(token, o),
            PublicKey::Es256(k) => k.verify_token(token, o),
            PublicKey::Es384(k) => k.verify_token(token, o),
            PublicKey::EdDsa(k) => k.verify_token(token, o),
        }
    }
}

/// One usable key of the set.
#[derive(Debug)]
pub struct Key {
    pub kid: Option<String>,
    pub key: PublicKey,
}

/// A parsed key set.
#[derive(Debug, Default)]
pub struct KeySet {
    pub keys: Vec<Key>,
}

/// Why a whole JWKS document is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksError {
    NotJson,
    NoKeysArray,
    NoUsableKey,
}

impl fmt::Display for JwksError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            JwksError::NotJson => "the JWKS is not a JSON object",
            JwksError::NoKeysArray => "the JWKS has no `keys` list",
            JwksError::NoUsableKey => "the JWKS has no usable signing key",
        })
    }
}

/// Most keys a set may hold; more are ignored (a JWKS is a handful of keys).
pub const MAX_KEYS: usize = 64;

impl KeySet {
    /// Parses a JWKS document. Unusable keys are skipped with a warning.
    pub fn parse(body: &[u8]) -> Result<KeySet, JwksError> {
        let doc: Value = serde_json::from_slice(body).map_err(|_| JwksError::NotJson)?;
        let list = doc
            .as_object()
            .ok_or(JwksError::NotJson)?
            .get("keys")
            .and_then(Value::as_array)
            .ok_or(JwksError::NoKeysArray)?;
        let mut keys = Vec::new();
        for (i, jwk) in list.iter().enumerate().take(MAX_KEYS) {
            match parse_jwk(jwk) {
                Ok(mut ks) => keys.append(&mut ks),
                Err(why) => log::warn!("JWKS key #{i} skipped: {why}"),
            }
        }
        if list.len() > MAX_KEYS {
            log::warn!(
                "JWKS has {} keys; only the first {MAX_KEYS} are used",
                list.len()
            );
        }
        if keys.is_empty() {
            return Err(JwksError::NoUsableKey);
        }
        Ok(KeySet { keys })
    }

    pub fn has_kid(&self, kid: &str) -> bool {
        self.keys.iter().any(|k| k.kid.as_deref() == Some(kid))
    }

    /// Keys that may verify a token with this `alg` and `kid`: with a `kid`,
    /// only keys carrying that `kid`; without, every key of the algorithm.
    pub fn candidates<'a>(
        &'a self,
        alg: Alg,
        kid: Option<&'a str>,
    ) -> impl Iterator<Item = &'a Key> + 'a {
        self.keys
            .iter()
            .filter(move |k| k.key.alg() == alg && (kid.is_none() || k.kid.as_deref() == kid))
    }
}

fn b64(v: &serde_json::Map<String, Value>, field: &str) -> Result<Vec<u8>, String> {
    let s = v
        .get(field)
        .and_then(Value::as_str)
        .ok_or_else(|| format!("missing `{field}`"))?;
    URL_SAFE_NO_PAD
        .decode(s.trim_end_matches('='))
        .map_err(|_| format!("`{field}` is not base64url"))
}

/// Turns one JWK into the keys it can serve (one per algorithm it allows).
fn parse_jwk(jwk: &Value) -> Result<Vec<Key>, String> {
    let o = jwk.as_object().ok_or("not an object")?;
    let text = |f: &str| -> Result<Option<&str>, String> {
        match o.get(f) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(_) => Err(format!("`{f}` is not a string")),
        }
    };
    let kty = text("kty")?.ok_or("missing `kty`")?;
    let kid = text("kid")?.map(str::to_string);
    if let Some(u) = text("use")? {
        if u != "sig" {
            return Err(format!("`use` is {u:?}, not \"sig\""));
        }
    }
    if let Some(ops) = o.get("key_ops") {
        let verifies = ops
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x.as_str() == Some("verify")));
        if !verifies {
            return Err("`key_ops` does not allow verify".into());
        }
    }
    let alg = match text("alg")? {
        None => None,
        Some(a) => Some(Alg::parse(a).ok_or_else(|| format!("unsupported alg {a:?}"))?),
    };
    let fits = |a: Alg| alg.is_none_or(|x| x == a);
    let mut keys = Vec::new();
    let mut push = |key: PublicKey| {
        keys.push(Key {
            kid: kid.clone(),
            key,
        })
    };
    let weak = |e: jwt_simple::Error| format!("RSA key refused: {e}");
    match kty {
        "RSA" => {
            let n = b64(o, "n")?;
            let e = b64(o, "e")?;
            // Every RSA algorithm shares the same key policy (2048-4096 bits, e = 65537).
            RS256PublicKey::from_components(&n, &e).map_err(weak)?;
            if fits(Alg::RS256) {
                push(PublicKey::Rs256(
                    RS256PublicKey::from_components(&n, &e).map_err(weak)?,
                ));
            }
            if fits(Alg::RS384) {
                push(PublicKey::Rs384(
                    RS384PublicKey::from_components(&n, &e).map_err(weak)?,
                ));
            }
            if fits(Alg::RS512) {
                push(PublicKey::Rs512(
                    RS512PublicKey::from_components(&n, &e).map_err(weak)?,
                ));
            }
            if fits(Alg::PS256) {
                push(PublicKey::Ps256(
                    PS256PublicKey::from_components(&n, &e).map_err(weak)?,
                ));
            }
            if fits(Alg::PS384) {
                push(PublicKey::Ps384(
                    PS384PublicKey::from_components(&n, &e).map_err(weak)?,
                ));
            }
            if fits(Alg::PS512) {
                push(PublicKey::Ps512(
                    PS512PublicKey::from_components(&n, &e).map_err(weak)?,
                ));
            }
        }
        "EC" => {
            let crv = text("crv")?.ok_or("missing `crv`")?;
            let x = b64(o, "x")?;
            let y = b64(o, "y")?;
            let (alg_for_curve, len) = match crv {
                "P-256" => (Alg::ES256, 32),
                "P-384" => (Alg::ES384, 48),
                other => return Err(format!("unsupported curve {other:?}")),
            };
            if !fits(alg_for_curve) {
                return Err("`alg` does not fit the curve".into());
            }
            if x.len() != len || y.len() != len {
                return Err("coordinates of the wrong length".into());
            }
            let mut point = Vec::with_capacity(1 + 2 * len);
            point.push(0x04);
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            let bad = |_| "not a valid point on the curve".to_string();
            push(match alg_for_curve {
                Alg::ES256 => PublicKey::Es256(ES256PublicKey::from_bytes(&point).map_err(bad)?),
                _ => PublicKey::Es384(ES384PublicKey::from_bytes(&point).map_err(bad)?),
            });
        }
        "OKP" => {
            let crv = text("crv")?.ok_or("missing `crv`")?;
            if crv != "Ed25519" {
                return Err(format!("unsupported curve {crv:?}"));
            }
            if !fits(Alg::EdDSA) {
                return Err("`alg` does not fit the curve".into());
            }
            let x = b64(o, "x")?;
            if x.len() != 32 {
                return Err("`x` of the wrong length".into());
            }
            push(PublicKey::EdDsa(
                Ed25519PublicKey::from_bytes(&x).map_err(|_| "not a valid Ed25519 key")?,
            ));
        }
        other => return Err(format!("unsupported kty {other:?}")),
    }
    if keys.is_empty() {
        return Err("`alg` does not fit the key type".into());
    }
    Ok(keys)
}
