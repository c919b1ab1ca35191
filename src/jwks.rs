//! JSON Web Key Sets: parsed once per fetched document into ready-to-use
//! verification keys.
//!
//! Keys that cannot be used are skipped (and logged), never fatal: a key set
//! that mixes unknown key types, weak RSA keys or encryption keys with good
//! signing keys keeps working with the good ones. A document with a `keys`
//! list is the identity provider's current truth even when none of its keys
//! is usable: it replaces the old set, and every token is refused.

use crate::jwt::Alg;
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

// ---------------------------------------------------------------------------
// Fetching and sharing the key set across the VMs of one Envoy process.
//
// Every VM (one per worker, plus the main thread's) needs the key set, but one
// fetch per refresh period per process is enough. The state of the last fetch
// — its times, its failures and the last good document — is one record in
// proxy-wasm shared data; a short lease (also in shared data, with an expiry
// so a dead VM cannot block the others) says which VM fetches. The others read
// the record on their tick and parse a document once per version.
// ---------------------------------------------------------------------------

use crate::quota::{SharedStore, StoreError};

/// Why a key set fetch failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchError {
    Unavailable,
    Timeout,
}

/// Longest pause between failed fetches (ms).
pub const MAX_BACKOFF_MS: u64 = 10_000;
const FIRST_BACKOFF_MS: u64 = 500;

/// The shared record of the last fetch (times in ms since the epoch).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FetchRecord {
    /// When the last fetch started.
    pub started: u64,
    /// When the last fetch ended (a fetch is under way while `started > finished`).
    pub finished: u64,
    /// When a fetch last succeeded (0: never).
    pub fetched: u64,
    /// Failures since the last success.
    pub failures: u32,
    /// No new fetch before this time (backoff).
    pub retry_at: u64,
    pub error: Option<FetchError>,
    /// The last good JWKS document (empty: none yet).
    pub body: Vec<u8>,
}

impl FetchRecord {
    pub fn encode(&self) -> Vec<u8> {
        let err = match self.error {
            None => "ok",
            Some(FetchError::Unavailable) => "unavailable",
            Some(FetchError::Timeout) => "timeout",
        };
        let mut out = format!(
            "v1 {} {} {} {} {} {}\n",
            self.started, self.finished, self.fetched, self.failures, self.retry_at, err
        )
        .into_bytes();
        out.extend_from_slice(&self.body);
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<FetchRecord> {
        let nl = bytes.iter().position(|&b| b == b'\n')?;
        let (head, rest) = bytes.split_at(nl);
        let body = rest.get(1..)?.to_vec();
        let head = std::str::from_utf8(head).ok()?;
        let mut f = head.split(' ');
        if f.next()? != "v1" {
            return None;
        }
        let started = f.next()?.parse().ok()?;
        let finished = f.next()?.parse().ok()?;
        let fetched = f.next()?.parse().ok()?;
        let failures = f.next()?.parse().ok()?;
        let retry_at = f.next()?.parse().ok()?;
        let error = match f.next()? {
            "ok" => None,
            "unavailable" => Some(FetchError::Unavailable),
            "timeout" => Some(FetchError::Timeout),
            _ => return None,
        };
        if f.next().is_some() {
            return None;
        }
        Some(FetchRecord {
            started,
            finished,
            fetched,
            failures,
            retry_at,
            error,
            body,
        })
    }

    /// The record when a fetch starts.
    pub fn start(&self, now: u64) -> FetchRecord {
        FetchRecord {
            started: now,
            ..self.clone()
        }
    }

    /// The record after a successful fetch of `body`.
    pub fn success(&self, body: Vec<u8>, now: u64) -> FetchRecord {
        FetchRecord {
            started: self.started,
            finished: now,
            fetched: now,
            failures: 0,
            retry_at: 0,
            error: None,
            body,
        }
    }

    /// The record after a failed fetch: the last good document is kept.
    pub fn failure(&self, why: FetchError, now: u64) -> FetchRecord {
        let failures = self.failures.saturating_add(1);
        let exp = failures.saturating_sub(1).min(10);
        let backoff = FIRST_BACKOFF_MS
            .saturating_mul(1u64 << exp)
            .min(MAX_BACKOFF_MS);
        FetchRecord {
            started: self.started,
            finished: now,
            fetched: self.fetched,
            failures,
            retry_at: now.saturating_add(backoff),
            error: Some(why),
            body: self.body.clone(),
        }
    }
}

/// Shared-data keys for one JWKS URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedKeys {
    pub record: String,
    pub lease: String,
}

impl SharedKeys {
    pub fn for_url(url: &str) -> SharedKeys {
        let h = hmac_sha256::Hash::hash(url.as_bytes());
        let tag: String = h.iter().take(8).map(|b| format!("{b:02x}")).collect();
        SharedKeys {
            record: format!("tollgate/jwks/{tag}/record"),
            lease: format!("tollgate/jwks/{tag}/lease"),
        }
    }
}

/// CAS used to create a key only if it does not exist yet (see `quota`).
const CREATE_CAS: u32 = u32::MAX;

/// Tries to take the fetch lease until `until`; true when this VM may fetch.
pub fn take_lease(store: &dyn SharedStore, key: &str, now: u64, until: u64) -> bool {
    let (value, cas) = match store.get(key) {
        Ok(v) => v,
        Err(_) => return false,
    };
    let held_until = value
        .as_deref()
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(0);
    if held_until > now {
        return false;
    }
    let cas = match (value, cas) {
        (Some(_), Some(c)) => c,
        _ => CREATE_CAS,
    };
    store
        .set(key, until.to_string().as_bytes(), Some(cas))
        .is_ok()
}

/// Gives the lease back (best effort: it expires anyway).
pub fn release_lease(store: &dyn SharedStore, key: &str) {
    if let Ok((Some(_), Some(cas))) = store.get(key) {
        let _ = store.set(key, b"0", Some(cas));
    }
}

/// Reads the shared record if it changed since `seen_cas`.
pub fn read_record(
    store: &dyn SharedStore,
    key: &str,
    seen_cas: Option<u32>,
) -> Option<(FetchRecord, u32)> {
    match store.get(key) {
        Ok((Some(bytes), Some(cas))) if Some(cas) != seen_cas => {
            FetchRecord::decode(&bytes).map(|r| (r, cas))
        }
        _ => None,
    }
}

/// Writes the record (only the lease holder writes it).
pub fn write_record(
    store: &dyn SharedStore,
    key: &str,
    record: &FetchRecord,
) -> Result<(), StoreError> {
    let bytes = record.encode();
    for _ in 0..8 {
        let cas = match store.get(key)? {
            (Some(_), Some(c)) => c,
            _ => CREATE_CAS,
        };
        match store.set(key, &bytes, Some(cas)) {
            Err(StoreError::CasMismatch) => continue,
            other => return other,
        }
    }
    Err(StoreError::CasMismatch)
}

/// This VM's view of the key set (times in ms).
#[derive(Debug, Default)]
pub struct JwksState {
    pub keys: Option<std::rc::Rc<KeySet>>,
    digest: Option<[u8; 32]>,
    /// The record this view was built from.
    pub record: FetchRecord,
    record_cas: Option<u32>,
    /// This VM's fetch under way, since when.
    pub in_flight_since: Option<u64>,
    /// A request asked for a fetch (no keys, or an unknown `kid`) at this time.
    pub wanted_since: Option<u64>,
    /// Bumped whenever a new key set document is installed; the verified-token
    /// cache empties itself then (`auth::TokenCache`), so tokens of a removed
    /// key are verified again, and refused, on their next request.
    pub generation: u64,
}

impl JwksState {
    /// Whether a fetch is due (by time, or asked for) and allowed (backoff).
    pub fn fetch_due(&self, now: u64, ttl_ms: u64) -> bool {
        if self.in_flight_since.is_some() || now < self.record.retry_at {
            return false;
        }
        self.wanted_since.is_some()
            || self.keys.is_none()
            || now.saturating_sub(self.record.fetched) >= ttl_ms
    }

    /// Keys, unless older than `max_age_ms` since the last successful fetch.
    pub fn usable_keys(&self, now: u64, max_age_ms: u64) -> Option<std::rc::Rc<KeySet>> {
        if now.saturating_sub(self.record.fetched) > max_age_ms {
            return None;
        }
        self.keys.clone()
    }

    /// Applies a record (from shared data or from this VM's own fetch);
    /// returns whether the usable keys changed.
    pub fn apply(&mut self, record: FetchRecord, cas: Option<u32>) -> bool {
        if let Some(w) = self.wanted_since {
            if record.started >= w {
                self.wanted_since = None;
            }
        }
        let changed = !record.body.is_empty() && self.install(&record.body).unwrap_or(false);
        self.record = record;
        self.record_cas = cas;
        changed
    }

    /// Makes a document's keys this VM's keys, unless they already are;
    /// returns whether they changed.
    fn install(&mut self, body: &[u8]) -> Result<bool, JwksError> {
        let digest = hmac_sha256::Hash::hash(body);
        if self.digest == Some(digest) {
            return Ok(false);
        }
        match KeySet::parse(body) {
            Ok(keys) => {
                log::info!("JWKS loaded: {} usable keys", keys.keys.len());
                self.keys = Some(std::rc::Rc::new(keys));
                self.digest = Some(digest);
                self.generation = self.generation.wrapping_add(1);
                Ok(true)
            }
            Err(e) => {
                log::warn!("JWKS refused: {e}");
                Err(e)
            }
        }
    }

    /// The record after this VM fetched `body` (a 200): a JWKS document
    /// becomes the keys at once (parsed once), even with no usable key (a key
    /// removed from the set is revoked); anything else (not JSON, no `keys`
    /// list) counts as a failed fetch and the old keys stay.
    pub fn fetched(&mut self, body: Vec<u8>, now: u64) -> FetchRecord {
        match self.install(&body) {
            Ok(_) => self.record.success(body, now),
            Err(_) => self.record.failure(FetchError::Unavailable, now),
        }
    }

    pub fn record_cas(&self) -> Option<u32> {
        self.record_cas
    }

    /// Whether an unknown `kid` may start a refresh now: the last fetch (by
    /// any VM) started and ended at least `cooldown_ms` ago. (Counting from
    /// its end too means a request that waited for a slow refresh is answered
    /// when it ends, instead of starting another.)
    pub fn kid_refresh_allowed(&self, now: u64, cooldown_ms: u64) -> bool {
        let last = self.record.started.max(self.record.finished);
        now.saturating_sub(last) >= cooldown_ms && now >= self.record.retry_at
    }

    /// Asks for a fetch (keeps the earliest ask).
    pub fn want(&mut self, now: u64) {
        self.wanted_since.get_or_insert(now);
    }

    /// Whether a fetch is under way in this VM or, by the shared record, in
    /// another (a record older than `lease_ms` no longer counts: that VM died).
    pub fn in_flight(&self, now: u64, lease_ms: u64) -> bool {
        self.in_flight_since.is_some()
            || (self.record.started > self.record.finished
                && now.saturating_sub(self.record.started) < lease_ms)
    }
}

#[cfg(test)]
mod share_tests {
    use super::*;
    use crate::quota::fake::FakeStore;

    #[test]
    fn record_round_trip() {
        let r = FetchRecord {
            started: 1,
            finished: 7,
            fetched: 2,
            failures: 3,
            retry_at: 4,
            error: Some(FetchError::Timeout),
            body: b"{\"keys\":[]}\nx".to_vec(),
        };
        assert_eq!(FetchRecord::decode(&r.encode()), Some(r));
        assert_eq!(FetchRecord::decode(b"garbage"), None);
        assert_eq!(FetchRecord::decode(b"v1 1 1 2 3 4 bad\n"), None);
        assert_eq!(FetchRecord::decode(b"v1 1 2 3\n"), None);
    }

    #[test]
    fn backoff_doubles_to_ten_seconds_and_keeps_the_body() {
        let mut r = FetchRecord {
            body: b"good".to_vec(),
            ..Default::default()
        };
        r = r.failure(FetchError::Unavailable, 1000);
        assert_eq!(r.retry_at, 1500);
        r = r.failure(FetchError::Timeout, 1000);
        assert_eq!(r.retry_at, 2000);
        for _ in 0..20 {
            r = r.failure(FetchError::Timeout, 1000);
        }
        assert_eq!(r.retry_at, 1000 + MAX_BACKOFF_MS);
        assert_eq!(r.body, b"good");
        let ok = r.success(b"new".to_vec(), 5000);
        assert_eq!(
            (ok.failures, ok.retry_at, ok.error, ok.fetched),
            (0, 0, None, 5000)
        );
    }

    #[test]
    fn one_lease_holder_at_a_time_and_expiry() {
        let store = FakeStore::new();
        assert!(take_lease(&store, "l", 100, 1100));
        assert!(!take_lease(&store, "l", 200, 1200));
        assert!(
            take_lease(&store, "l", 1100, 2100),
            "expired lease is taken over"
        );
        release_lease(&store, "l");
        assert!(take_lease(&store, "l", 1200, 2200));
    }

    #[test]
    fn lease_creation_race_has_one_winner() {
        let store = FakeStore::new();
        // Another VM creates the lease between our read and our write.
        store.before_next_set(|s| {
            assert!(take_lease(s, "l", 0, 5000));
        });
        assert!(!take_lease(&store, "l", 0, 5000));
    }

    #[test]
    fn records_are_read_once_per_version() {
        let store = FakeStore::new();
        let rec = FetchRecord {
            started: 5,
            ..Default::default()
        };
        write_record(&store, "r", &rec).unwrap();
        let (got, cas) = read_record(&store, "r", None).unwrap();
        assert_eq!(got, rec);
        assert!(read_record(&store, "r", Some(cas)).is_none());
        write_record(&store, "r", &rec.failure(FetchError::Timeout, 9)).unwrap();
        assert!(read_record(&store, "r", Some(cas)).is_some());
    }

    #[test]
    fn wanted_clears_when_a_later_fetch_is_recorded() {
        let mut s = JwksState::default();
        s.want(100);
        s.apply(
            FetchRecord {
                started: 50,
                ..Default::default()
            },
            Some(1),
        );
        assert!(
            s.wanted_since.is_some(),
            "a fetch that started before the ask does not count"
        );
        s.apply(
            FetchRecord {
                started: 150,
                ..Default::default()
            },
            Some(2),
        );
        assert!(s.wanted_since.is_none());
    }

    #[test]
    fn fetch_due_rules() {
        let mut s = JwksState::default();
        assert!(s.fetch_due(0, 1000), "no keys");
        s.in_flight_since = Some(0);
        assert!(!s.fetch_due(0, 1000), "already fetching");
        s.in_flight_since = None;
        s.record.retry_at = 500;
        assert!(!s.fetch_due(499, 1000), "backing off");
        assert!(s.fetch_due(500, 1000));
        assert!(s.kid_refresh_allowed(10_000, 10_000));
        s.record.started = 5_000;
        assert!(!s.kid_refresh_allowed(10_000, 10_000));
        s.record.started = 0;
        s.record.finished = 5_000;
        assert!(
            !s.kid_refresh_allowed(10_000, 10_000),
            "a slow fetch ended 5 s ago"
        );
        s.record.started = 5_000;
        s.record.finished = 0;
        assert!(s.in_flight(6_000, 2_000), "another VM started a fetch");
        assert!(!s.in_flight(7_000, 2_000), "its lease ran out");
        s.record = s.record.failure(FetchError::Timeout, 6_500);
        assert!(!s.in_flight(6_600, 2_000), "it ended");
    }
}

#[cfg(test)]
mod tests {
    //! The fetch record and the key-set state machine (the key sets
    //! themselves, with real keys, are in `crypto_tests`).
    use super::*;

    const JWKS: &[u8] = br#"{"keys": [{"kty": "OKP", "crv": "Ed25519", "kid": "ed-1",
        "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}]}"#;

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

    /// The state after this VM fetched `body` at `now`.
    fn fetch(s: &mut JwksState, body: &[u8], now: u64) {
        let started = s.record.start(now);
        s.apply(started, None);
        let record = s.fetched(body.to_vec(), now);
        s.apply(record, None);
    }

    #[test]
    fn a_fetched_set_without_usable_keys_replaces_the_old_one() {
        for empty in [
            &br#"{"keys": []}"#[..],
            br#"{"keys": [{"kty": "oct", "k": "AA"}]}"#,
        ] {
            let mut s = JwksState::default();
            fetch(&mut s, JWKS, 1_000);
            let generation = s.generation;
            assert!(s.usable_keys(1_000, 60_000).unwrap().has_kid("ed-1"));
            fetch(&mut s, empty, 2_000);
            assert_eq!(s.record.error, None, "a successful fetch");
            assert_eq!((s.record.fetched, &s.record.body[..]), (2_000, empty));
            let keys = s.usable_keys(2_000, 60_000).expect("a key set, empty");
            assert!(keys.keys.is_empty() && !keys.has_kid("ed-1"));
            assert_ne!(s.generation, generation, "the token cache empties");
            // Not fetched again before cache_ttl (it is not "no keys yet").
            assert!(!s.fetch_due(2_000 + 59_999, 60_000));
            // An unknown kid still waits for the cooldown.
            assert!(!s.kid_refresh_allowed(2_000 + 9_999, 10_000));
            assert!(s.kid_refresh_allowed(2_000 + 10_000, 10_000));
            // Another VM takes the same record in: the same empty set.
            let mut other = JwksState::default();
            fetch(&mut other, JWKS, 1_000);
            assert!(other.apply(s.record.clone(), Some(3)));
            assert!(other.usable_keys(2_000, 60_000).unwrap().keys.is_empty());
        }
    }

    #[test]
    fn a_fetched_set_that_is_no_jwks_keeps_the_old_keys() {
        for garbage in [
            &b"not json"[..],
            b"[]",
            br#"{"keys": {}}"#,
            br#"{"kty": "OKP"}"#,
        ] {
            let mut s = JwksState::default();
            fetch(&mut s, JWKS, 1_000);
            let generation = s.generation;
            fetch(&mut s, garbage, 2_000);
            assert_eq!(s.record.error, Some(FetchError::Unavailable));
            assert_eq!((s.record.fetched, &s.record.body[..]), (1_000, JWKS));
            assert!(s.usable_keys(2_000, 60_000).unwrap().has_kid("ed-1"));
            assert_eq!(s.generation, generation);
        }
    }

    #[test]
    fn records_survive_shared_data() {
        let mut r = FetchRecord::default().start(5).success(JWKS.to_vec(), 7);
        for error in [
            None,
            Some(FetchError::Unavailable),
            Some(FetchError::Timeout),
        ] {
            r.error = error;
            r.failures = 3;
            r.retry_at = 9;
            assert_eq!(FetchRecord::decode(&r.encode()), Some(r.clone()));
        }
        for bad in [
            &b""[..],
            b"v1 1 2 3 4 5 ok",
            b"v2 1 2 3 4 5 ok\n",
            b"v1 1 2 3 4 5 maybe\n",
            b"v1 1 2 3 4 5 ok extra\n",
            b"v1 1 2 3 4 ok\n",
            b"v1 -1 2 3 4 5 ok\n",
        ] {
            assert_eq!(
                FetchRecord::decode(bad),
                None,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn a_fetch_starts_succeeds_or_backs_off() {
        let started = FetchRecord::default().start(1_000);
        assert_eq!((started.started, started.finished), (1_000, 0));
        let ok = started.success(JWKS.to_vec(), 1_200);
        assert_eq!((ok.started, ok.finished, ok.fetched), (1_000, 1_200, 1_200));
        // Failures keep the last good document, back off 0.5 s doubling to 10 s.
        let mut r = ok.clone();
        let mut waits = Vec::new();
        for i in 0..8 {
            let now = 2_000 + i * 100;
            r = r.start(now).failure(FetchError::Timeout, now);
            waits.push(r.retry_at - now);
            assert_eq!((r.fetched, &r.body[..]), (1_200, JWKS));
        }
        assert_eq!(
            waits,
            [500, 1_000, 2_000, 4_000, 8_000, 10_000, 10_000, 10_000]
        );
        assert_eq!(r.failures, 8);
        assert_eq!(r.error, Some(FetchError::Timeout));
        assert_eq!(r.success(JWKS.to_vec(), 9_000).failures, 0);
    }

    #[test]
    fn when_a_fetch_is_due() {
        let ttl = 60_000;
        let mut s = JwksState::default();
        assert!(s.fetch_due(0, ttl), "no keys yet");
        s.in_flight_since = Some(0);
        assert!(!s.fetch_due(0, ttl), "one at a time");
        s.in_flight_since = None;
        assert!(s.apply(
            FetchRecord::default()
                .start(0)
                .success(JWKS.to_vec(), 1_000),
            Some(7)
        ));
        assert_eq!(s.record_cas(), Some(7));
        assert!(!s.fetch_due(1_000 + ttl - 1, ttl));
        assert!(s.fetch_due(1_000 + ttl, ttl), "cache_ttl reached");
        s.want(1_500);
        assert!(s.fetch_due(1_500, ttl), "asked for (unknown kid)");
        // Backoff holds even an asked-for fetch.
        s.record.retry_at = 2_000;
        assert!(!s.fetch_due(1_999, ttl));
        assert!(s.fetch_due(2_000, ttl));
        // The same document again changes nothing.
        assert!(!s.apply(
            FetchRecord::default()
                .start(0)
                .success(JWKS.to_vec(), 3_000),
            None
        ));
        assert_eq!(s.record_cas(), None);
    }

    #[test]
    fn keys_are_usable_up_to_max_age_in_flight_up_to_the_lease() {
        let mut s = JwksState::default();
        assert!(s.usable_keys(0, 1_000).is_none());
        s.apply(
            FetchRecord::default()
                .start(0)
                .success(JWKS.to_vec(), 5_000),
            None,
        );
        assert!(s.usable_keys(6_000, 1_000).is_some());
        assert!(s.usable_keys(6_001, 1_000).is_none());
        // Another VM's fetch counts as under way until its lease ends.
        s.apply(s.record.start(10_000), None);
        assert!(s.in_flight(10_000 + 1_999, 2_000));
        assert!(!s.in_flight(10_000 + 2_000, 2_000));
        // An unknown kid refreshes once the last fetch is cooldown old.
        s.apply(s.record.success(JWKS.to_vec(), 11_000), None);
        assert!(!s.kid_refresh_allowed(11_000 + 9_999, 10_000));
        assert!(s.kid_refresh_allowed(11_000 + 10_000, 10_000));
    }
}
