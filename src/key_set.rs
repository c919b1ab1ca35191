//! JSON Web Key Sets: parsed once per fetched document into ready-to-use
//! verification keys ([`KeySet`]). Fetching the document and sharing it
//! across VMs is [`crate::jwks_cache`]'s.
//!
//! Keys that cannot be used are skipped (and logged), never fatal: a key set
//! that mixes unknown key types, weak RSA keys or encryption keys with good
//! signing keys keeps working with the good ones. A document with a `keys`
//! list is the identity provider's current truth even when none of its keys
//! is usable: it replaces the old set, and every token is refused.

use crate::alg::Alg;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jwt_simple::prelude::*;
use serde_json::Value;
use std::fmt;
use std::sync::Arc;

/// A verification key, built for one algorithm.
///
/// Keys are vetted with jwt-simple when the key set is parsed (RSA size and
/// exponent, EC points on their curve, Ed25519 keys); signatures are checked
/// with `crate::rsa` (RS*) and `ring` (PS*, ES*, EdDSA), the fastest inside
/// wasm: jwt-simple's pure-Rust RSA uses 64-bit big-number digits that wasm32
/// has to emulate, and through ring a cold EdDSA request costs Envoy ~40 %
/// less CPU, ES256 ~20 % (README, Performance). The token's structure and
/// claims are `jwt::parse`'s.
pub enum PublicKey {
    /// RS256/384/512 or PS256/384/512: modulus and exponent, big-endian,
    /// without leading zeros; 2048–4096 bits and e = 65537 (checked on parse).
    Rsa {
        alg: Alg,
        n: Vec<u8>,
        e: Vec<u8>,
        /// Prepared once per key for RS256/384/512 (shared by the entries
        /// of one JWK); PS* and any key it refuses go to ring.
        modulus: Option<Arc<crate::rsa::Modulus>>,
    },
    /// ES256 or ES384: the uncompressed SEC1 point (`04 ‖ x ‖ y`).
    Ec { alg: Alg, point: Vec<u8> },
    /// EdDSA (Ed25519): the 32-byte public key.
    EdDsa { x: Vec<u8> },
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({:?})", self.alg())
    }
}

impl PublicKey {
    pub fn alg(&self) -> Alg {
        match self {
            PublicKey::Rsa { alg, .. } => *alg,
            PublicKey::Ec { alg, .. } => *alg,
            PublicKey::EdDsa { .. } => Alg::EdDSA,
        }
    }

    /// Verifies the signature of a compact JWS whose structure and claims
    /// `jwt::parse` already checked.
    pub fn verify(&self, token: &str) -> bool {
        use ring::signature as sig;
        let Some((signed, signature)) = signed_part_and_signature(token) else {
            return false;
        };
        let (algorithm, key): (&'static dyn sig::VerificationAlgorithm, &[u8]) = match self {
            PublicKey::Rsa { alg, n, e, modulus } => {
                return verify_rsa(*alg, n, e, modulus.as_deref(), signed, &signature)
            }
            PublicKey::Ec {
                alg: Alg::ES256,
                point,
            } => (&sig::ECDSA_P256_SHA256_FIXED, point),
            PublicKey::Ec {
                alg: Alg::ES384,
                point,
            } => (&sig::ECDSA_P384_SHA384_FIXED, point),
            PublicKey::Ec { .. } => return false,
            PublicKey::EdDsa { x } => (&sig::ED25519, x),
        };
        sig::UnparsedPublicKey::new(algorithm, key)
            .verify(signed, &signature)
            .is_ok()
    }
}

/// A compact JWS's signed part (`header.payload`) and its decoded signature.
fn signed_part_and_signature(token: &str) -> Option<(&[u8], Vec<u8>)> {
    let (signed, signature) = token.rsplit_once('.')?;
    let signature = URL_SAFE_NO_PAD.decode(signature).ok()?;
    Some((signed.as_bytes(), signature))
}

fn verify_rsa(
    alg: Alg,
    n: &[u8],
    e: &[u8],
    modulus: Option<&crate::rsa::Modulus>,
    signed: &[u8],
    signature: &[u8],
) -> bool {
    use crate::rsa::Hash;
    use ring::signature as sig;
    // PKCS#1 v1.5 through the prepared modulus when there is one; ring
    // otherwise (PSS, or a key `rsa::Modulus` refused).
    let (pkcs1, params): (Option<Hash>, &sig::RsaParameters) = match alg {
        Alg::RS256 => (Some(Hash::Sha256), &sig::RSA_PKCS1_2048_8192_SHA256),
        Alg::RS384 => (Some(Hash::Sha384), &sig::RSA_PKCS1_2048_8192_SHA384),
        Alg::RS512 => (Some(Hash::Sha512), &sig::RSA_PKCS1_2048_8192_SHA512),
        Alg::PS256 => (None, &sig::RSA_PSS_2048_8192_SHA256),
        Alg::PS384 => (None, &sig::RSA_PSS_2048_8192_SHA384),
        Alg::PS512 => (None, &sig::RSA_PSS_2048_8192_SHA512),
        _ => return false,
    };
    if let (Some(hash), Some(m)) = (pkcs1, modulus) {
        return m.verify(hash, signed, signature);
    }
    sig::RsaPublicKeyComponents { n, e }
        .verify(params, signed, signature)
        .is_ok()
}

fn strip_leading_zeros(b: &[u8]) -> Vec<u8> {
    let start = b.iter().position(|&x| x != 0).unwrap_or(b.len());
    b.get(start..).unwrap_or_default().to_vec()
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

/// Why a whole JWKS document is refused (a failed fetch: the old keys stay).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksError {
    NotJson,
    NoKeysArray,
}

impl fmt::Display for JwksError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            JwksError::NotJson => "the JWKS is not a JSON object",
            JwksError::NoKeysArray => "the JWKS has no `keys` list",
        })
    }
}

/// Most keys a set may hold; more are ignored (a JWKS is a handful of keys).
pub const MAX_KEYS: usize = 64;

impl KeySet {
    /// Parses a JWKS document. Unusable keys are skipped with a warning; a
    /// set without usable keys (`{"keys": []}`, or only unusable ones) is a
    /// set, empty, that refuses every token.
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
            log::warn!("JWKS has no usable keys: every token is refused until the identity provider serves one");
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
            // Every RSA algorithm shares jwt-simple's key policy (2048-4096
            // bits, e = 65537); `rsa` (RS*) or ring (PS*) then checks signatures.
            RS256PublicKey::from_components(&n, &e).map_err(weak)?;
            let (n, e) = (strip_leading_zeros(&n), strip_leading_zeros(&e));
            let modulus = crate::rsa::Modulus::new(&n, &e).map(Arc::new);
            for alg in [
                Alg::RS256,
                Alg::RS384,
                Alg::RS512,
                Alg::PS256,
                Alg::PS384,
                Alg::PS512,
            ] {
                if fits(alg) {
                    push(PublicKey::Rsa {
                        alg,
                        n: n.clone(),
                        e: e.clone(),
                        modulus: modulus.clone(),
                    });
                }
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
            let on_curve = match alg_for_curve {
                Alg::ES256 => ES256PublicKey::from_bytes(&point).is_ok(),
                _ => ES384PublicKey::from_bytes(&point).is_ok(),
            };
            if !on_curve {
                return Err("not a valid point on the curve".into());
            }
            push(PublicKey::Ec {
                alg: alg_for_curve,
                point,
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
            Ed25519PublicKey::from_bytes(&x).map_err(|_| "not a valid Ed25519 key")?;
            push(PublicKey::EdDsa { x });
        }
        other => return Err(format!("unsupported kty {other:?}")),
    }
    if keys.is_empty() {
        return Err("`alg` does not fit the key type".into());
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    //! Parse errors (the keys themselves, real ones, are tested in
    //! `tests::crypto`).
    use super::*;

    #[test]
    fn refused_documents_say_why() {
        let why = |body: &[u8]| KeySet::parse(body).unwrap_err().to_string();
        assert_eq!(why(b"[1]"), "the JWKS is not a JSON object");
        assert_eq!(why(b"not json"), "the JWKS is not a JSON object");
        assert_eq!(why(br#"{"keys": {}}"#), "the JWKS has no `keys` list");
        assert_eq!(why(br#"{"kty": "OKP"}"#), "the JWKS has no `keys` list");
        // A `keys` list without a usable key is a set, empty.
        for empty in [&br#"{"keys": []}"#[..], br#"{"keys": [{"kty": "oct"}]}"#] {
            assert!(KeySet::parse(empty).unwrap().keys.is_empty());
        }
    }
}
