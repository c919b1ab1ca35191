//! JWT verification: strict structural and claim checks first (cheap, before
//! any signature work), then the signature ([`crate::key_set::PublicKey::verify`]), then
//! the identity from the claims.
//!
//! Following RFC 8725 and Envoy's `jwt_authn`: only the compact
//! serialisation; `alg` from an allow-list (never `none`, never HS*); the key
//! must fit the algorithm; `jku`, `jwk`, `x5u`, `x5c` are never used; `crit`
//! and `b64` are refused; duplicate JSON keys are refused; `exp` is required;
//! times may have fractions (cut off to whole seconds).

use crate::alg::{Alg, AlgSet};
use crate::claims::{ClaimsMapping, Identity};
use crate::key_set::KeySet;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::{Map, Value};
use std::fmt;

/// Why a token was refused. Every variant answers 401 "Invalid JWT token";
/// the variant names the reason in metrics and debug logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenError {
    /// Not a well-formed compact JWS (parts, base64url, JSON, types).
    Malformed,
    /// Longer than [`MAX_TOKEN_BYTES`].
    TooLong,
    /// `alg` not allowed (`none`, HS*, unknown).
    UnsupportedAlg,
    /// A header parameter tollgate refuses (`crit`, `b64`, JWE fields).
    UnsupportedHeader,
    /// `kid` not in the key set.
    UnknownKid,
    /// No key of the token's algorithm.
    NoKey,
    /// The signature does not verify.
    BadSignature,
    Expired,
    NotYetValid,
    IssuedInFuture,
    WrongAudience,
    WrongIssuer,
    MissingExp,
    MissingSub,
    /// The identity would carry control characters into a header.
    UnsafeIdentity,
    /// `tenant_claim` names a tenant id OGX would refuse.
    InvalidTenant,
}

impl TokenError {
    /// The reason label used in metrics and logs.
    pub fn reason(self) -> &'static str {
        match self {
            TokenError::Malformed | TokenError::TooLong | TokenError::UnsupportedHeader => {
                "malformed"
            }
            TokenError::Expired => "expired",
            TokenError::WrongAudience => "wrong_audience",
            TokenError::UnknownKid => "unknown_kid",
            _ => "invalid_token",
        }
    }
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            TokenError::Malformed => "malformed token",
            TokenError::TooLong => "token too long",
            TokenError::UnsupportedAlg => "algorithm not allowed",
            TokenError::UnsupportedHeader => "unsupported header parameter",
            TokenError::UnknownKid => "unknown kid",
            TokenError::NoKey => "no key for the algorithm",
            TokenError::BadSignature => "bad signature",
            TokenError::Expired => "expired",
            TokenError::NotYetValid => "not yet valid",
            TokenError::IssuedInFuture => "issued in the future",
            TokenError::WrongAudience => "wrong audience",
            TokenError::WrongIssuer => "wrong issuer",
            TokenError::MissingExp => "no exp claim",
            TokenError::MissingSub => "no sub claim",
            TokenError::UnsafeIdentity => "control characters in the identity",
            TokenError::InvalidTenant => "an invalid tenant id",
        };
        f.write_str(s)
    }
}

/// Longest token accepted (bytes).
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// Longest `kid` accepted (bytes).
pub const MAX_KID_BYTES: usize = 256;
/// Latest plausible time value (year 3000): larger ones are refused.
const MAX_TIME: u64 = 32_503_680_000;

/// What the checks need from the configuration.
#[derive(Debug, Clone)]
pub struct Rules<'a> {
    pub audiences: &'a [String],
    pub issuer: Option<&'a str>,
    pub clock_skew_seconds: u64,
    pub claims_mapping: &'a ClaimsMapping,
}

/// A token taken apart, checked for structure and claims but not yet for
/// its signature.
#[derive(Debug)]
pub struct Parsed {
    pub alg: Alg,
    pub kid: Option<String>,
    pub claims: Map<String, Value>,
    pub exp: u64,
    pub sub: String,
}

/// A verified token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub identity: Identity,
    /// `exp` of the token (seconds since the epoch).
    pub exp: u64,
}

fn decode_json_object(part: &str) -> Result<Map<String, Value>, TokenError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| TokenError::Malformed)?;
    match crate::json::parse_strict(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(TokenError::Malformed),
    }
}

/// The `iss` of a token shaped as a JWT (three parts, the payload a JSON
/// object with a string `iss`), not verified: it only chooses the provider
/// that verifies the token (`auth.providers`).
pub fn unverified_issuer(token: &[u8]) -> Option<String> {
    if token.len() > MAX_TOKEN_BYTES {
        return None;
    }
    let token = std::str::from_utf8(token).ok()?;
    let mut parts = token.split('.');
    let (_, payload, _) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    match decode_json_object(payload).ok()?.remove("iss") {
        Some(Value::String(iss)) => Some(iss),
        _ => None,
    }
}

/// A NumericDate claim: absent, or a non-negative number no later than year
/// 3000. A fraction (RFC 7519 §2 allows one) is cut off, as PyJWT and
/// python-jose do; the clock is read in whole seconds too.
fn time_claim(claims: &Map<String, Value>, name: &str) -> Result<Option<u64>, TokenError> {
    let Some(v) = claims.get(name) else {
        return Ok(None);
    };
    let Value::Number(n) = v else {
        return Err(TokenError::Malformed);
    };
    if let Some(t) = n.as_u64() {
        return if t <= MAX_TIME {
            Ok(Some(t))
        } else {
            Err(TokenError::Malformed)
        };
    }
    match n.as_f64() {
        // Finite, in range: the cast cannot saturate.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        Some(f) if f.is_finite() && (0.0..=MAX_TIME as f64).contains(&f) => Ok(Some(f as u64)),
        _ => Err(TokenError::Malformed),
    }
}

/// Structural and claim checks: everything but the signature.
pub fn parse(token: &str, rules: &Rules, now: u64) -> Result<Parsed, TokenError> {
    parse_allowing(token, rules, AlgSet::ALL, now)
}

/// [`parse`], with only the algorithms in `allowed` (else `UnsupportedAlg`).
pub fn parse_allowing(
    token: &str,
    rules: &Rules,
    allowed: AlgSet,
    now: u64,
) -> Result<Parsed, TokenError> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(TokenError::TooLong);
    }
    if !token
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        return Err(TokenError::Malformed);
    }
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed);
    };
    if h.is_empty() || p.is_empty() || s.is_empty() {
        return Err(TokenError::Malformed);
    }
    let header = decode_json_object(h)?;
    let alg = match header.get("alg") {
        Some(Value::String(a)) => Alg::parse(a)
            .filter(|alg| allowed.contains(*alg))
            .ok_or(TokenError::UnsupportedAlg)?,
        _ => return Err(TokenError::Malformed),
    };
    for refused in ["crit", "b64", "enc", "zip"] {
        if header.contains_key(refused) {
            return Err(TokenError::UnsupportedHeader);
        }
    }
    // `typ` is informational (RFC 7519 §5.1; `JWT`, `JOSE`, `at+jwt`, ...),
    // but a string when present.
    if header.get("typ").is_some_and(|t| !t.is_string()) {
        return Err(TokenError::Malformed);
    }
    let kid = match header.get("kid") {
        None => None,
        Some(Value::String(k)) if !k.is_empty() && k.len() <= MAX_KID_BYTES => Some(k.clone()),
        Some(_) => return Err(TokenError::Malformed),
    };
    let claims = decode_json_object(p)?;
    // Registered claims must have their registered types (as jwt-simple,
    // which the verifier once was, insisted).
    for name in ["iss", "sub", "jti", "nonce"] {
        if claims.get(name).is_some_and(|v| !v.is_string()) {
            return Err(TokenError::Malformed);
        }
    }
    match claims.get("aud") {
        None | Some(Value::String(_)) => {}
        Some(Value::Array(list)) if list.iter().all(Value::is_string) => {}
        Some(_) => return Err(TokenError::Malformed),
    }
    let exp = time_claim(&claims, "exp")?.ok_or(TokenError::MissingExp)?;
    let nbf = time_claim(&claims, "nbf")?;
    let iat = time_claim(&claims, "iat")?;
    let skew = rules.clock_skew_seconds;
    if now > exp.saturating_add(skew) {
        return Err(TokenError::Expired);
    }
    if nbf.is_some_and(|nbf| nbf > now.saturating_add(skew)) {
        return Err(TokenError::NotYetValid);
    }
    if iat.is_some_and(|iat| iat > now.saturating_add(skew)) {
        return Err(TokenError::IssuedInFuture);
    }
    let audience_ok = match claims.get("aud") {
        Some(Value::String(a)) => rules.audiences.contains(a),
        Some(Value::Array(list)) => list.iter().any(|a| {
            a.as_str()
                .is_some_and(|a| rules.audiences.iter().any(|x| x == a))
        }),
        _ => false,
    };
    if !audience_ok {
        return Err(TokenError::WrongAudience);
    }
    if let Some(issuer) = rules.issuer {
        if claims.get("iss").and_then(Value::as_str) != Some(issuer) {
            return Err(TokenError::WrongIssuer);
        }
    }
    let sub = match claims.get("sub") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        _ => return Err(TokenError::MissingSub),
    };
    Ok(Parsed {
        alg,
        kid,
        claims,
        exp,
        sub,
    })
}

/// Verifies a token against a key set at time `now` (seconds).
pub fn verify(token: &str, keys: &KeySet, rules: &Rules, now: u64) -> Result<Verified, TokenError> {
    verify_allowing(token, keys, rules, AlgSet::ALL, now)
}

/// [`verify`], with only the algorithms in `allowed`.
pub fn verify_allowing(
    token: &str,
    keys: &KeySet,
    rules: &Rules,
    allowed: AlgSet,
    now: u64,
) -> Result<Verified, TokenError> {
    let parsed = parse_allowing(token, rules, allowed, now)?;
    // A `kid` must name a key of the set; keys without a `kid` are tried too
    // (as Envoy's jwt_authn does) when no key carries one.
    let mut kid = parsed.kid.as_deref();
    if let Some(k) = kid {
        if !keys.has_kid(k) {
            if keys
                .candidates(parsed.alg, None)
                .any(|key| key.kid.is_none())
            {
                kid = None;
            } else {
                return Err(TokenError::UnknownKid);
            }
        }
    }
    let mut tried = false;
    let mut verified = false;
    for key in keys.candidates(parsed.alg, kid) {
        if kid.is_none() && parsed.kid.is_some() && key.kid.is_some() {
            continue;
        }
        tried = true;
        if key.key.verify(token) {
            verified = true;
            break;
        }
    }
    if verified {
        return identity(parsed, rules);
    }
    Err(if tried {
        TokenError::BadSignature
    } else {
        TokenError::NoKey
    })
}

fn identity(parsed: Parsed, rules: &Rules) -> Result<Verified, TokenError> {
    let attributes = rules.claims_mapping.apply(&parsed.claims);
    let tenant = rules
        .claims_mapping
        .tenant(&parsed.claims)
        .map_err(|_| TokenError::InvalidTenant)?;
    let identity = Identity::new(parsed.sub, attributes)
        .map_err(|_| TokenError::UnsafeIdentity)?
        .with_tenant(tenant);
    Ok(Verified {
        identity,
        exp: parsed.exp,
    })
}

#[cfg(test)]
mod tests {
    //! `parse`'s limits, exactly at and past each bound (signatures are not
    //! checked here: see `tests::crypto`).
    use super::*;
    use serde_json::json;

    const NOW: u64 = 1_700_000_000;
    const SKEW: u64 = 30;

    fn with_rules<T>(f: impl FnOnce(&Rules) -> T) -> T {
        let audiences = vec!["api".to_string()];
        let mapping = ClaimsMapping::llama_stack_default();
        f(&Rules {
            audiences: &audiences,
            issuer: Some("https://iss"),
            clock_skew_seconds: SKEW,
            claims_mapping: &mapping,
        })
    }

    fn b64(v: &Value) -> String {
        URL_SAFE_NO_PAD.encode(v.to_string())
    }

    fn claims() -> Value {
        json!({"sub": "alice", "aud": "api", "iss": "https://iss", "exp": NOW + 60})
    }

    /// `header.claims.sig`, with `header` merged over `{"alg": "ES256"}`.
    fn token(header: Value, claims: &Value) -> String {
        let mut h = json!({"alg": "ES256"});
        for (k, v) in header.as_object().unwrap() {
            h[k] = v.clone();
        }
        format!("{}.{}.c2ln", b64(&h), b64(claims))
    }

    fn parse_at(token: &str, now: u64) -> Result<Parsed, TokenError> {
        with_rules(|r| parse(token, r, now))
    }

    fn with(claim: &str, v: Value) -> Value {
        let mut c = claims();
        c[claim] = v;
        c
    }

    #[test]
    fn length_limit() {
        let base = token(json!({}), &claims());
        let at_limit = format!("{base}{}", "A".repeat(MAX_TOKEN_BYTES - base.len()));
        assert_eq!(at_limit.len(), 16 * 1024);
        assert!(parse_at(&at_limit, NOW).is_ok());
        let over = format!("{at_limit}A");
        assert_eq!(parse_at(&over, NOW).unwrap_err(), TokenError::TooLong);
    }

    #[test]
    fn three_non_empty_parts() {
        let t = token(json!({}), &claims());
        let (h, rest) = t.split_once('.').unwrap();
        let (p, _) = rest.split_once('.').unwrap();
        for bad in [
            format!(".{p}.c2ln"),
            format!("{h}..c2ln"),
            format!("{h}.{p}."),
            format!("{h}.{p}"),
            format!("{t}.c2ln"),
        ] {
            assert_eq!(
                parse_at(&bad, NOW).unwrap_err(),
                TokenError::Malformed,
                "{bad}"
            );
        }
    }

    #[test]
    fn kid_limits() {
        let kid = |k: Value| parse_at(&token(json!({ "kid": k }), &claims()), NOW);
        let longest = "k".repeat(MAX_KID_BYTES);
        assert_eq!(kid(json!(longest)).unwrap().kid.as_deref(), Some(&*longest));
        assert_eq!(kid(json!("k1")).unwrap().kid.as_deref(), Some("k1"));
        for bad in [json!(""), json!("k".repeat(MAX_KID_BYTES + 1)), json!(7)] {
            assert_eq!(kid(bad).unwrap_err(), TokenError::Malformed);
        }
    }

    #[test]
    fn typ_is_any_string() {
        let typ = |t: Value| parse_at(&token(json!({ "typ": t }), &claims()), NOW);
        for ok in ["JOSE", "jose", "JWT", "at+jwt", ""] {
            assert!(typ(json!(ok)).is_ok(), "{ok}");
        }
        for bad in [json!(1), json!(null), json!(["JWT"])] {
            assert_eq!(typ(bad).unwrap_err(), TokenError::Malformed);
        }
    }

    #[test]
    fn audience_lists() {
        let aud = |a: Value| parse_at(&token(json!({}), &with("aud", a)), NOW);
        assert!(aud(json!(["other", "api"])).is_ok());
        assert_eq!(
            aud(json!(["other"])).unwrap_err(),
            TokenError::WrongAudience
        );
        assert_eq!(aud(json!(["api", 7])).unwrap_err(), TokenError::Malformed);
        assert_eq!(aud(json!(7)).unwrap_err(), TokenError::Malformed);
    }

    #[test]
    fn time_claims_at_their_bounds() {
        let t = |name: &str, v: u64| token(json!({}), &with(name, json!(v)));
        // exp: valid through exp + skew.
        assert!(parse_at(&t("exp", NOW - SKEW), NOW).is_ok());
        assert_eq!(
            parse_at(&t("exp", NOW - SKEW - 1), NOW).unwrap_err(),
            TokenError::Expired
        );
        // nbf and iat: up to now + skew.
        assert!(parse_at(&t("nbf", NOW + SKEW), NOW).is_ok());
        assert_eq!(
            parse_at(&t("nbf", NOW + SKEW + 1), NOW).unwrap_err(),
            TokenError::NotYetValid
        );
        assert!(parse_at(&t("iat", NOW + SKEW), NOW).is_ok());
        assert_eq!(
            parse_at(&t("iat", NOW + SKEW + 1), NOW).unwrap_err(),
            TokenError::IssuedInFuture
        );
        // Year 3000 is the latest time accepted.
        assert!(parse_at(&t("exp", MAX_TIME), NOW).is_ok());
        assert_eq!(
            parse_at(&t("exp", MAX_TIME + 1), NOW).unwrap_err(),
            TokenError::Malformed
        );
    }

    #[test]
    fn fractional_times_are_cut_to_whole_seconds() {
        let t = |name: &str, v: Value| token(json!({}), &with(name, v));
        let exp = |v: Value| parse_at(&t("exp", v), NOW).map(|p| p.exp);
        assert_eq!(exp(json!(1_796_450_000.5)), Ok(1_796_450_000));
        assert_eq!(exp(json!(1_796_450_000.0)), Ok(1_796_450_000));
        assert_eq!(exp(json!(1.6e9)), Err(TokenError::Expired));
        // exp + skew + 0.9 is already past: the fraction is never rounded up.
        assert_eq!(
            exp(json!((NOW - SKEW) as f64 - 0.1)),
            Err(TokenError::Expired)
        );
        assert_eq!(exp(json!((NOW - SKEW) as f64 + 0.9)), Ok(NOW - SKEW));
        // nbf and iat compare in whole seconds too.
        assert!(parse_at(&t("nbf", json!((NOW + SKEW) as f64 + 0.9)), NOW).is_ok());
        assert_eq!(
            parse_at(&t("iat", json!((NOW + SKEW + 1) as f64 + 0.1)), NOW).unwrap_err(),
            TokenError::IssuedInFuture
        );
        for bad in [
            json!(-0.5),
            json!(-1.0),
            json!(1e30),
            json!(MAX_TIME as f64 + 1.5),
            json!(f64::MAX),
            json!("1796450000.5"),
        ] {
            assert_eq!(exp(bad.clone()), Err(TokenError::Malformed), "{bad}");
        }
        // Non-finite numbers cannot be written in JSON; 1e400 is refused.
        let payload = br#"{"sub":"alice","aud":"api","iss":"https://iss","exp":1e400}"#;
        let head = URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256"}"#);
        let raw = format!("{head}.{}.c2ln", URL_SAFE_NO_PAD.encode(payload));
        assert!(parse_at(&raw, NOW).is_err());
    }

    #[test]
    fn the_allow_list_limits_algorithms() {
        let only_rs = AlgSet::NONE.with(Alg::RS256).with(Alg::PS256);
        assert!(only_rs.contains(Alg::RS256) && only_rs.contains(Alg::PS256));
        assert!(!only_rs.contains(Alg::EdDSA) && !only_rs.contains(Alg::RS384));
        for name in Alg::NAMES {
            let alg = Alg::parse(name).unwrap();
            assert!(AlgSet::ALL.contains(alg), "{name}");
            assert!(!AlgSet::NONE.contains(alg), "{name}");
        }
        with_rules(|rules| {
            let ed = token(json!({"alg": "EdDSA"}), &claims());
            assert!(parse_allowing(&ed, rules, AlgSet::ALL, NOW).is_ok());
            assert_eq!(
                parse_allowing(&ed, rules, only_rs, NOW).unwrap_err(),
                TokenError::UnsupportedAlg
            );
            let rs = token(json!({"alg": "RS256"}), &claims());
            assert!(parse_allowing(&rs, rules, only_rs, NOW).is_ok());
        });
    }

    #[test]
    fn every_registered_alg_parses() {
        for (name, alg) in [
            ("RS256", Alg::RS256),
            ("RS384", Alg::RS384),
            ("RS512", Alg::RS512),
            ("PS256", Alg::PS256),
            ("PS384", Alg::PS384),
            ("PS512", Alg::PS512),
            ("ES256", Alg::ES256),
            ("ES384", Alg::ES384),
            ("EdDSA", Alg::EdDSA),
        ] {
            assert_eq!(Alg::parse(name), Some(alg));
            let t = token(json!({ "alg": name }), &claims());
            assert_eq!(parse_at(&t, NOW).unwrap().alg, alg);
        }
        for refused in ["none", "HS256", "rs256", "ES512", ""] {
            assert_eq!(Alg::parse(refused), None);
        }
    }

    #[test]
    fn reason_labels() {
        use TokenError::*;
        for (e, label) in [
            (Malformed, "malformed"),
            (TooLong, "malformed"),
            (UnsupportedHeader, "malformed"),
            (Expired, "expired"),
            (WrongAudience, "wrong_audience"),
            (UnknownKid, "unknown_kid"),
            (BadSignature, "invalid_token"),
            (WrongIssuer, "invalid_token"),
        ] {
            assert_eq!(e.reason(), label, "{e}");
        }
    }
}
