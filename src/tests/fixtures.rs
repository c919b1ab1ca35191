//! Fixtures of the crypto tests: the keys of `src/testdata/`, their JWKs,
//! alice's claims and tokens minted with them, and a fixed [`NOW`]. RSA
//! signing is slow in an unoptimised wasm build, so each RSA token is minted
//! once ([`OnceLock`]); the claim checks use the cheap ES256 and EdDSA keys.

use crate::claims::ClaimsMapping;
use crate::jwt::{self, Rules, TokenError, Verified};
use crate::key_set::KeySet;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use jwt_simple::prelude::*;
use serde_json::{json, Map, Value};
use std::sync::OnceLock;

pub(crate) const RSA_PEM: &str = include_str!("../testdata/rsa2048.pem");
pub(crate) const RSA_1024_PEM: &str = include_str!("../testdata/rsa1024.pem");
pub(crate) const RSA_1024_TOKEN: &str = include_str!("../testdata/rsa1024_rs256.jwt");
pub(crate) const EC_PEM: &str = include_str!("../testdata/ec_p256.pem");
pub(crate) const ED_PEM: &str = include_str!("../testdata/ed25519.pem");

/// "Now" for every test (2023-11-14T22:13:20Z).
pub(crate) const NOW: u64 = 1_700_000_000;
/// Tokens are issued a minute before [`NOW`] and expire an hour after.
pub(crate) const IAT: u64 = NOW - 60;
pub(crate) const EXP: u64 = NOW + 3600;
pub(crate) const SKEW: u64 = 30;
pub(crate) const ISSUER: &str = "https://issuer.example";
pub(crate) const AUDIENCE: &str = "llama-stack";

pub(crate) struct Keys {
    pub(crate) rs256: RS256KeyPair,
    pub(crate) ps256: PS256KeyPair,
    pub(crate) es256: ES256KeyPair,
    pub(crate) ed25519: Ed25519KeyPair,
}

pub(crate) fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| Keys {
        rs256: RS256KeyPair::from_pem(RSA_PEM)
            .unwrap()
            .with_key_id("rsa-1"),
        ps256: PS256KeyPair::from_pem(RSA_PEM)
            .unwrap()
            .with_key_id("rsa-1"),
        es256: ES256KeyPair::from_pem(EC_PEM).unwrap().with_key_id("ec-1"),
        ed25519: Ed25519KeyPair::from_pem(ED_PEM)
            .unwrap()
            .with_key_id("ed-1"),
    })
}

pub(crate) fn b64(bytes: impl AsRef<[u8]>) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

pub(crate) fn rsa_jwk(kid: &str, n: &[u8], e: &[u8], alg: Option<&str>) -> Value {
    let mut jwk = json!({"kty": "RSA", "kid": kid, "use": "sig", "n": b64(n), "e": b64(e)});
    if let Some(alg) = alg {
        jwk["alg"] = json!(alg);
    }
    jwk
}

pub(crate) fn rsa_2048_jwk(alg: Option<&str>) -> Value {
    let c = keys().rs256.public_key().to_components();
    rsa_jwk("rsa-1", &c.n, &c.e, alg)
}

/// The uncompressed SEC1 point (`04 || x || y`) of the fixture EC key.
pub(crate) fn ec_point() -> Vec<u8> {
    let point = keys()
        .es256
        .public_key()
        .public_key()
        .to_bytes_uncompressed();
    assert_eq!((point.len(), point[0]), (65, 4));
    point
}

pub(crate) fn ec_jwk(kid: &str, point: &[u8]) -> Value {
    json!({"kty": "EC", "crv": "P-256", "kid": kid,
           "x": b64(&point[1..33]), "y": b64(&point[33..65])})
}

pub(crate) fn ed_jwk(kid: &str, x: &[u8]) -> Value {
    json!({"kty": "OKP", "crv": "Ed25519", "kid": kid, "alg": "EdDSA", "x": b64(x)})
}

/// The JWKS a well-behaved issuer would publish for the fixture keys.
pub(crate) fn standard_jwks() -> Vec<Value> {
    vec![
        rsa_2048_jwk(None),
        ec_jwk("ec-1", &ec_point()),
        ed_jwk("ed-1", &keys().ed25519.public_key().to_bytes()),
    ]
}

pub(crate) fn key_set(jwks: Vec<Value>) -> KeySet {
    KeySet::parse(json!({ "keys": jwks }).to_string().as_bytes()).unwrap()
}

pub(crate) fn standard_keys() -> &'static KeySet {
    static SET: OnceLock<KeySet> = OnceLock::new();
    SET.get_or_init(|| key_set(standard_jwks()))
}

/// `n` and `e` of a PKCS#1 `RSAPrivateKey` PEM, read by hand: jwt-simple
/// refuses to load keys under 2048 bits.
pub(crate) fn pkcs1_n_e(pem: &str) -> (Vec<u8>, Vec<u8>) {
    fn read<'a>(der: &mut &'a [u8], tag: u8) -> &'a [u8] {
        assert_eq!(der[0], tag, "unexpected DER tag");
        let (len, header) = match der[1] {
            l if l < 0x80 => (usize::from(l), 2),
            0x81 => (usize::from(der[2]), 3),
            0x82 => ((usize::from(der[2]) << 8) | usize::from(der[3]), 4),
            other => panic!("DER length form {other:#x}"),
        };
        let value = &der[header..header + len];
        *der = &der[header + len..];
        value
    }
    assert!(pem.starts_with("-----BEGIN RSA PRIVATE KEY-----"));
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = STANDARD.decode(body).unwrap();
    let mut outer = der.as_slice();
    let mut seq = read(&mut outer, 0x30);
    let _version = read(&mut seq, 0x02);
    let strip = |x: &[u8]| x[x.iter().position(|&b| b != 0).unwrap()..].to_vec();
    let n = strip(read(&mut seq, 0x02));
    let e = strip(read(&mut seq, 0x02));
    (n, e)
}

pub(crate) fn weak_rsa_jwk() -> Value {
    let (n, e) = pkcs1_n_e(RSA_1024_PEM);
    assert_eq!(n.len(), 128, "the weak fixture key is RSA 1024");
    assert_eq!(e, [1, 0, 1]);
    rsa_jwk("weak", &n, &e, None)
}

pub(crate) fn rules() -> Rules<'static> {
    static AUDIENCES: OnceLock<Vec<String>> = OnceLock::new();
    static MAPPING: OnceLock<ClaimsMapping> = OnceLock::new();
    Rules {
        audiences: AUDIENCES.get_or_init(|| vec!["other-service".into(), AUDIENCE.into()]),
        issuer: Some(ISSUER),
        clock_skew_seconds: SKEW,
        claims_mapping: MAPPING.get_or_init(ClaimsMapping::llama_stack_default),
    }
}

pub(crate) type TokenClaims = JWTClaims<Map<String, Value>>;

/// alice's claims: issued a minute ago, valid for an hour, with the claims
/// Llama Stack's default mapping reads.
pub(crate) fn claims() -> TokenClaims {
    let custom = json!({
        "groups": ["admins", "ops"],
        "project": "llama",
        "tenant": "acme",
        "scope": "models:read models:write",
        "unmapped": "ignored",
    });
    let mut c = Claims::with_custom_claims(
        custom.as_object().unwrap().clone(),
        Duration::from_secs(3600),
    )
    .with_audience(AUDIENCE)
    .with_issuer(ISSUER)
    .with_subject("alice");
    c.issued_at = Some(UnixTimeStamp::from_secs(IAT));
    c.invalid_before = Some(UnixTimeStamp::from_secs(IAT));
    c.expires_at = Some(UnixTimeStamp::from_secs(EXP));
    c
}

pub(crate) fn rs256_token() -> &'static str {
    static T: OnceLock<String> = OnceLock::new();
    T.get_or_init(|| keys().rs256.sign(claims()).unwrap())
}

pub(crate) fn ps256_token() -> &'static str {
    static T: OnceLock<String> = OnceLock::new();
    T.get_or_init(|| keys().ps256.sign(claims()).unwrap())
}

pub(crate) fn es256(c: TokenClaims) -> String {
    keys().es256.sign(c).unwrap()
}

pub(crate) fn eddsa(c: TokenClaims) -> String {
    keys().ed25519.sign(c).unwrap()
}

pub(crate) fn verify(token: &str) -> Result<Verified, TokenError> {
    verify_at(token, NOW)
}

pub(crate) fn verify_at(token: &str, now: u64) -> Result<Verified, TokenError> {
    jwt::verify(token, standard_keys(), &rules(), now)
}

pub(crate) fn parts(token: &str) -> (String, String, String) {
    let mut it = token.split('.').map(str::to_string);
    let t = (it.next().unwrap(), it.next().unwrap(), it.next().unwrap());
    assert!(it.next().is_none());
    t
}

pub(crate) fn decode_json(part: &str) -> Value {
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
}

/// A token with any header and payload bytes, signed with the fixture
/// Ed25519 key: for payloads jwt-simple would never produce.
pub(crate) fn eddsa_raw(header: &str, payload: &str) -> String {
    let input = format!("{}.{}", b64(header), b64(payload));
    let sig = keys()
        .ed25519
        .key_pair()
        .as_ref()
        .sk
        .sign(input.as_bytes(), None);
    format!("{input}.{}", b64(*sig))
}

pub(crate) fn good_payload_json() -> String {
    format!(r#"{{"iss":"{ISSUER}","aud":"{AUDIENCE}","sub":"alice","iat":{IAT},"exp":{EXP}}}"#)
}

pub(crate) fn assert_alice(v: &Verified) {
    assert_eq!(v.identity.principal, "alice");
    assert_eq!(v.exp, EXP);
    let a = &v.identity.attributes;
    assert_eq!(a["roles"], ["alice"]);
    assert_eq!(a["teams"], ["admins", "ops"]);
    assert_eq!(a["projects"], ["llama"]);
    assert_eq!(a["namespaces"], ["acme"]);
    assert_eq!(a["scopes"], ["models:read", "models:write"]);
    assert_eq!(a.len(), 5, "{a:?}");
    let header: Value = serde_json::from_str(&v.identity.attributes_header).unwrap();
    assert_eq!(header["teams"], json!(["admins", "ops"]));
}
