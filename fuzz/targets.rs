//! The bodies of tollgate's fuzz targets, shared by the cargo-fuzz crate
//! (`fuzz/src/lib.rs`, one binary per target in `fuzz/fuzz_targets/`) and
//! the corpus replay test of the main crate (`tests/fuzz_corpus.rs`, which
//! includes this file with `#[path]`). So it uses only `std` and tollgate's
//! public API.
//!
//! Every target must return normally for every input: tollgate's parsers
//! answer hostile input with `Err`, never with a panic (a panic in the filter
//! is a trap that takes the Envoy worker's VM down). Besides "no panic", the
//! targets assert a few properties the code documents (noted where they are
//! checked); a failed assertion is a finding like a panic.
//!
//! Inputs made of several fields separate them with the byte 0xFF ([`SEP`]),
//! which never occurs in UTF-8 text, so text fields can be anything.
//! Times are fixed ([`NOW_S`]); fixture keys are `src/testdata/`'s (the
//! constants below are checked by `cargo run --example make_seeds`).

use std::rc::Rc;
use tollgate::claims::Attributes;
use tollgate::claims::{header_safe, Identity};
use tollgate::config::{AuthConfig, Config, JwtConfig};
use tollgate::driver::{
    CalloutReply, Driver, Effect, Phase, ReplyBody, RequestHandle, RequestHead,
};
use tollgate::jwks_cache::{self, FetchRecord, JwksState};
use tollgate::jwt::{self, Rules, TokenError};
use tollgate::key_set::KeySet;
use tollgate::path::normalize_path;
use tollgate::provider::introspection::form_urlencode;
use tollgate::provider::Answer;
use tollgate::response::Denial;
use tollgate::route_policy::RoutePolicy;
use tollgate::store::fake::FakeStore;
use tollgate::usage::{self, Count, Kind, Usage, UsageReader};

/// Field separator of multi-field inputs.
pub const SEP: [u8; 1] = [0xFF];

/// "Now" of every target, in seconds (2023-11-14T22:13:20Z): the fixture
/// tokens were issued a minute before and expire an hour after.
pub const NOW_S: u64 = 1_700_000_000;
const NOW_MS: u64 = NOW_S * 1000;

/// The JWKS of the fixture keys (`rsa2048.pem` as `rsa-1`, `ec_p256.pem` as
/// `ec-1`, `ed25519.pem` as `ed-1`).
pub const JWKS: &str = r#"{"keys":[
{"kty":"RSA","kid":"rsa-1","use":"sig","e":"AQAB",
 "n":"yOkgwtUTio18XUqgmLQlOtuJSYkQN2OY_4Aw8gQH7I9p7xfF6NSHVZIVUgXe0UHVzDD7zL4Mm2jfSO4RBXIAMHcRl8sQB_9lfelWU5Z5n79Nxm_bL1xDPgJLc81uFR6AsE0T-I_hUH1XPUFDu5UC-MlxJgnj4GvjzzOwNYggbbVu0-FAZS_AFuGpaO36XKsjLKjScjFzpdYc-li4eNbD8da9gNvu-b_IWu2XmeoUAaZ7nallz5UwJIbVkqUv0xSPhhDDRq8CYN1ZV1C2PJiCutaExAY4QK_uHZaqRGR55JYY5-dp93cSTXSUUrekiX1MeKDHfo-jjiwZ34hukgH3MQ"},
{"kty":"EC","kid":"ec-1","crv":"P-256",
 "x":"170k_ex6NsIL2F49NnkcRfuY90C7zGyaUNfleYkT4Ec","y":"arwpQfpVs0tsDZK7YWCRX6tYk0QfBWPEKpBNmpvm51U"},
{"kty":"OKP","kid":"ed-1","crv":"Ed25519","alg":"EdDSA","x":"Ex_K8W2IAC6lQnEpCJwj-q6yrjU-nR9xD4V4Brpt93k"}]}"#;

/// alice's token (issuer `https://issuer.example`, audience `llama-stack`,
/// scopes `models:read models:write telemetry.read admin`, groups `admins
/// ops`), signed with each fixture key.
pub const TOKEN_RS256: &str = "eyJhbGciOiJSUzI1NiIsImtpZCI6InJzYS0xIiwidHlwIjoiSldUIn0.eyJpYXQiOjE2OTk5OTk5NDAsImV4cCI6MTcwMDAwMzYwMCwibmJmIjoxNjk5OTk5OTQwLCJpc3MiOiJodHRwczovL2lzc3Vlci5leGFtcGxlIiwic3ViIjoiYWxpY2UiLCJhdWQiOiJsbGFtYS1zdGFjayIsImdyb3VwcyI6WyJhZG1pbnMiLCJvcHMiXSwicHJvamVjdCI6ImxsYW1hIiwic2NvcGUiOiJtb2RlbHM6cmVhZCBtb2RlbHM6d3JpdGUgdGVsZW1ldHJ5LnJlYWQgYWRtaW4iLCJ0ZW5hbnQiOiJhY21lIn0.ZG0OUZIAQig0OH-8xALm22i6aziqOzg1uuXl_ZCop2m95ZJb1dDb47QTLwhxiLncxE5ia0uEq9JpccLahgYXCkApeSKNgpBjLVAcWvxbTD-eL2AfFiTNlFxMEojA2dIIfHQD6pgrVHLaFYBmUlBT_ep6u-yfeziDJbcztons6P9GgQp8j0fLdOyLpjDyqUWhw2ztWld8C-gpkvjAiZCIJFKqY4OM6R_PnwffK-2F3zluxd9NjH9vn0N_IQUSDs2NbShPiJJbnY38vRjgcoSnoEvq_jF23Tvlg6WLaCjoxDpGh2TuyKIhI6ssj7hmk2VONuw_qyQf9kZhHvTXu-BvBg";
pub const TOKEN_ES256: &str = "eyJhbGciOiJFUzI1NiIsImtpZCI6ImVjLTEiLCJ0eXAiOiJKV1QifQ.eyJpYXQiOjE2OTk5OTk5NDAsImV4cCI6MTcwMDAwMzYwMCwibmJmIjoxNjk5OTk5OTQwLCJpc3MiOiJodHRwczovL2lzc3Vlci5leGFtcGxlIiwic3ViIjoiYWxpY2UiLCJhdWQiOiJsbGFtYS1zdGFjayIsImdyb3VwcyI6WyJhZG1pbnMiLCJvcHMiXSwicHJvamVjdCI6ImxsYW1hIiwic2NvcGUiOiJtb2RlbHM6cmVhZCBtb2RlbHM6d3JpdGUgdGVsZW1ldHJ5LnJlYWQgYWRtaW4iLCJ0ZW5hbnQiOiJhY21lIn0.CJNj_FcetqkSHBdlMnPLVynU7os2GXV2pWaWQkg-WxGO97rnKWYvLx1O1yYBI9uhl67gqU4A_7uzdRlvJH5BGA";
pub const TOKEN_EDDSA: &str = "eyJhbGciOiJFZERTQSIsImtpZCI6ImVkLTEiLCJ0eXAiOiJKV1QifQ.eyJpYXQiOjE2OTk5OTk5NDAsImV4cCI6MTcwMDAwMzYwMCwibmJmIjoxNjk5OTk5OTQwLCJpc3MiOiJodHRwczovL2lzc3Vlci5leGFtcGxlIiwic3ViIjoiYWxpY2UiLCJhdWQiOiJsbGFtYS1zdGFjayIsImdyb3VwcyI6WyJhZG1pbnMiLCJvcHMiXSwicHJvamVjdCI6ImxsYW1hIiwic2NvcGUiOiJtb2RlbHM6cmVhZCBtb2RlbHM6d3JpdGUgdGVsZW1ldHJ5LnJlYWQgYWRtaW4iLCJ0ZW5hbnQiOiJhY21lIn0.9oirYhaj8WrLBaEbwK_ZhP7YeR54Ji9u_J0yAxCDa1VlPaa898ndaxuqYogMHkwzRfZ4lDE41UEfBZbAFFZJDA";
/// alice's claims under a `kid` (`ed-9`) the fixture JWKS lacks.
pub const TOKEN_UNKNOWN_KID: &str = "eyJhbGciOiJFZERTQSIsImtpZCI6ImVkLTkifQ.eyJpc3MiOiJodHRwczovL2lzc3Vlci5leGFtcGxlIiwiYXVkIjoibGxhbWEtc3RhY2siLCJzdWIiOiJhbGljZSIsImlhdCI6MTY5OTk5OTk0MCwiZXhwIjoxNzAwMDAzNjAwLCJzY29wZSI6Im1vZGVsczpyZWFkIHRlbGVtZXRyeS5yZWFkIn0.hF7N77f66ohCGb0kQpr7GVJ5xhHrFMwJ-afnmX4OJm-_e8Yv5GU4jYve6Vgruq9Bg5g8tODkWPBsjwDut8WhBA";

const PUBLIC_RULES_QUOTA: &str = r#"
 "public_paths": ["/v1/health", "/static/*"],
 "route_scopes": [
   {"path": "/v1/telemetry/traces/{trace_id}", "methods": ["GET"], "required_scope": "telemetry.read"},
   {"path": "/v1/telemetry/traces", "required_scope": "telemetry.read"},
   {"path_prefix": "/v1/admin/", "required_scope": "admin"},
   {"path_prefix": "/v1/models/", "methods": ["POST", "DELETE"],
    "required_attributes": {"roles": ["admin", "ml-eng"], "teams": ["ml-team"]}},
   {"path": "/v1/{tenant}/secrets/{name}", "required_scope": "secrets",
    "required_attributes": {"namespaces": ["acme"]}}
 ],
 "quota": {"authenticated_max_requests": 3, "anonymous_max_requests": 2,
           "period": "minute", "headers": true}}"#;

const MAPPING: &str = r#"{"sub": "roles", "username": "roles", "groups": "teams",
  "team": "teams", "project": "projects", "tenant": "namespaces", "scope": "scopes",
  "realm_access.roles": "roles"}"#;

/// Authenticated requests the fixture configurations count per minute.
const QUOTA_AUTHENTICATED: usize = 3;
/// Anonymous requests the fixture configurations count per minute.
const QUOTA_ANONYMOUS: usize = 2;

/// The API key of fixture configuration 0.
pub const FUZZ_API_KEY: &str = "fuzz-api-key";

/// The fixture configurations: 0 two JWT providers (`auth.providers`) and
/// an API key, 1 introspection, 2
/// custom endpoint, 3 no `auth` (quota and public paths only). All but 3
/// share public paths, route rules and a small per-minute quota.
pub fn fixture_config(kind: u8) -> String {
    let auth = match kind % 4 {
        // Several providers: tokens of `issuer.example` go to the first,
        // of `other.example` to the second (same keys, another audience),
        // any other to the API key.
        0 => format!(
            r#"{{"providers": [{{"type": "oauth2_token",
              "audience": ["other-service", "llama-stack"], "issuer": "https://issuer.example",
              "claims_mapping": {MAPPING}, "clock_skew_seconds": 30,
              "jwks": {{"uri": "https://issuer.example/jwks", "cluster": "idp", "cache_ttl": 300,
                       "refresh_cooldown_seconds": 10, "max_stale_seconds": 600}}}},
              {{"type": "oauth2_token", "audience": "elsewhere", "issuer": "https://other.example",
               "jwks": {{"uri": "https://other.example/jwks", "cluster": "idp2"}}}},
              {{"type": "local_api_key", "keys": [{{"name": "fuzz", "key": "{FUZZ_API_KEY}"}}]}}]}}"#
        ),
        1 => format!(
            r#"{{"provider_config": {{"type": "oauth2_token", "issuer": "https://idp.example",
              "introspection": {{"url": "https://idp.example/introspect?x=1", "cluster": "idp",
                                "client_id": "gw:1", "client_secret": "s3cr&t %"}},
              "claims_mapping": {MAPPING}, "clock_skew_seconds": 30, "cache_ttl": 30}}}}"#
        ),
        2 => r#"{"provider_type": "custom", "config": {"endpoint": "http://auth:9000/validate",
              "cache_ttl": 30, "timeout_ms": 2000}}"#
            .to_string(),
        _ => {
            return r#"{"public_paths": ["/v1/health"], "log_level": "off",
              "route_policy": [{"forbid": {"paths": "regex:/v1/admin(/.*)?$"}},
                               {"permit": {"paths": "*"}}],
              "quota": {"anonymous_max_requests": 2, "period": "minute",
                        "tokens": {"authenticated_max_tokens": 100, "anonymous_max_tokens": 50,
                                   "reserve_tokens": 20}}}"#
                .to_string()
        }
    };
    format!(r#"{{"auth": {auth}, {}"#, PUBLIC_RULES_QUOTA.trim_start())
}

thread_local! {
    static CONFIGS: Vec<Rc<Config>> = (0..4)
        .map(|k| match Config::parse(fixture_config(k).as_bytes()) {
            Ok(c) => Rc::new(c),
            Err(e) => panic!("fixture configuration {k} refused: {e}"),
        })
        .collect();
}

fn config_of(kind: u8) -> Rc<Config> {
    CONFIGS.with(|c| c[usize::from(kind % 4)].clone())
}

fn jwt_config(c: &Config) -> &JwtConfig {
    match c.auth.as_ref().and_then(|a| a.providers.first()) {
        Some(AuthConfig::Jwt(j)) => j,
        _ => panic!("the fixture is not a JWT configuration"),
    }
}

fn rules(j: &JwtConfig) -> Rules<'_> {
    Rules {
        audiences: &j.audiences,
        issuer: j.issuer.as_deref(),
        clock_skew_seconds: j.clock_skew_seconds,
        claims_mapping: &j.claims_mapping,
    }
}

thread_local! {
    /// The fixture key set, and the same keys without their `kid`s.
    static KEYS: (Rc<KeySet>, Rc<KeySet>) = {
        let with = KeySet::parse(JWKS.as_bytes()).expect("the fixture JWKS parses");
        let without = JWKS
            .replace(r#""kid":"rsa-1","#, "")
            .replace(r#""kid":"ec-1","#, "")
            .replace(r#""kid":"ed-1","#, "");
        let without = KeySet::parse(without.as_bytes()).expect("the kid-less JWKS parses");
        (Rc::new(with), Rc::new(without))
    };
}

/// Checks the fixtures: the configurations load and each embedded token
/// verifies against the embedded JWKS, as alice. Fuzzing against fixtures
/// that accept nothing would prove little.
pub fn self_check() -> Result<(), String> {
    let config = Config::parse(fixture_config(0).as_bytes()).map_err(|e| e.to_string())?;
    for k in 1..4 {
        Config::parse(fixture_config(k).as_bytes()).map_err(|e| e.to_string())?;
    }
    let j = jwt_config(&config);
    let keys = KeySet::parse(JWKS.as_bytes()).map_err(|e| e.to_string())?;
    for token in [TOKEN_RS256, TOKEN_ES256, TOKEN_EDDSA] {
        let v = jwt::verify(token, &keys, &rules(j), NOW_S).map_err(|e| format!("{e}"))?;
        if v.identity.principal != "alice" {
            return Err(format!("principal {}", v.identity.principal));
        }
    }
    Ok(())
}

/// Splits on [`SEP`]; always at least one field.
fn split(data: &[u8]) -> Vec<&[u8]> {
    data.split(|&b| b == SEP[0]).collect()
}

fn field<'a>(fields: &[&'a [u8]], i: usize) -> &'a [u8] {
    fields.get(i).copied().unwrap_or_default()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Attributes from fields `category=value value …`, in order.
fn attributes_of(fields: &[&[u8]]) -> Attributes {
    let mut attrs = Attributes::new();
    for a in fields {
        let a = text(a);
        let (category, values) = a.split_once('=').unwrap_or((&a, ""));
        attrs
            .entry(category.to_string())
            .or_default()
            .extend(values.split(' ').map(str::to_string));
    }
    attrs
}

/// An identity may reach upstream headers: no control characters, no outer
/// spaces in the principal, an ASCII JSON attributes header.
fn check_identity(id: &Identity) {
    assert!(!id.principal.is_empty(), "empty principal");
    assert_eq!(
        id.principal.trim(),
        id.principal,
        "principal with outer spaces"
    );
    assert!(header_safe(&id.principal), "control character in principal");
    for (k, vs) in &id.attributes {
        assert!(header_safe(k) && vs.iter().all(|v| header_safe(v)));
    }
    assert!(
        id.attributes_header.is_ascii() && header_safe(&id.attributes_header),
        "attributes header not ASCII: {:?}",
        id.attributes_header
    );
    assert!(tollgate::json::parse_strict(id.attributes_header.as_bytes()).is_ok());
}

/// Every local answer: a known status, a JSON body, headers that can be sent.
fn check_denial(d: &Denial) {
    let r = d.response();
    assert!(
        [400, 401, 403, 429, 503].contains(&r.status),
        "status {} for {d:?}",
        r.status
    );
    assert!(
        tollgate::json::parse_strict(r.body.as_bytes()).is_ok(),
        "body is not JSON: {}",
        r.body
    );
    for (k, v) in &r.headers {
        assert!(header_safe(k) && header_safe(v), "header {k}: {v:?}");
    }
    assert!(!d.reason().is_empty());
}

// ---------------------------------------------------------------------------
// token

/// Bytes (lossy UTF-8) as a token through `jwt::parse` and `jwt::verify`,
/// against the fixture keys with and without `kid`s, at the fixture time and
/// a day later.
///
/// Properties: `verify` fails exactly as `parse` does when `parse` fails
/// (it starts with it); when `parse` succeeds, `verify` fails only for key
/// and signature reasons, and on success agrees with `parse` on `sub` and
/// `exp`.
pub fn token(data: &[u8]) {
    let token = String::from_utf8_lossy(data);
    let config = config_of(0);
    let rules = rules(jwt_config(&config));
    let (with_kids, without_kids) = KEYS.with(|k| (k.0.clone(), k.1.clone()));
    for now in [NOW_S, NOW_S + 86_400] {
        let parsed = jwt::parse(&token, &rules, now);
        for keys in [&with_kids, &without_kids] {
            let verified = jwt::verify(&token, keys, &rules, now);
            match (&parsed, &verified) {
                (Err(p), Err(v)) => assert_eq!(p, v, "verify and parse disagree"),
                (Err(p), Ok(_)) => panic!("verify accepted a token parse refused ({p:?})"),
                (Ok(p), Ok(v)) => {
                    assert_eq!(v.identity.principal, p.sub);
                    assert_eq!(v.exp, p.exp);
                    assert!(now <= p.exp.saturating_add(rules.clock_skew_seconds));
                    check_identity(&v.identity);
                }
                (Ok(_), Err(e)) => assert!(
                    matches!(
                        e,
                        TokenError::UnknownKid
                            | TokenError::NoKey
                            | TokenError::BadSignature
                            | TokenError::UnsafeIdentity
                    ),
                    "verify failed with {e:?} after parse succeeded"
                ),
            }
            if let Err(e) = verified {
                assert!(!e.reason().is_empty() && !e.to_string().is_empty());
            }
        }
    }
    rsa_agrees_with_ring(&token, &with_kids);
    ec_and_eddsa_agree_with_rustcrypto(&token, &with_kids);
}

/// Every ES256/ES384 and EdDSA key's verdict (`PublicKey::verify`: ring) is
/// the one of the crates jwt-simple checks with (p256/p384, ed25519-compact)
/// on the token's signing input and signature, whatever the header.
fn ec_and_eddsa_agree_with_rustcrypto(token: &str, keys: &KeySet) {
    use p256::ecdsa::signature::Verifier;
    use tollgate::key_set::PublicKey;
    let Some((signed, signature)) = signing_input_and_signature(token) else {
        return;
    };
    let msg = signed.as_bytes();
    for key in &keys.keys {
        let theirs = match &key.key {
            PublicKey::Ec {
                alg: tollgate::alg::Alg::ES256,
                point,
            } => {
                let vk = p256::ecdsa::VerifyingKey::from_sec1_bytes(point).unwrap();
                p256::ecdsa::Signature::from_slice(&signature)
                    .is_ok_and(|s| vk.verify(msg, &s).is_ok())
            }
            PublicKey::Ec {
                alg: tollgate::alg::Alg::ES384,
                point,
            } => {
                let vk = p384::ecdsa::VerifyingKey::from_sec1_bytes(point).unwrap();
                p384::ecdsa::Signature::from_slice(&signature)
                    .is_ok_and(|s| vk.verify(msg, &s).is_ok())
            }
            PublicKey::EdDsa { x } => {
                let pk = ed25519_compact::PublicKey::from_slice(x).unwrap();
                ed25519_compact::Signature::from_slice(&signature)
                    .is_ok_and(|s| pk.verify(msg, &s).is_ok())
            }
            _ => continue,
        };
        let alg = key.key.alg();
        assert_eq!(
            key.key.verify(token),
            theirs,
            "{alg:?}: ring and RustCrypto/ed25519-compact disagree"
        );
    }
}

/// A compact JWS's signing input and decoded signature, split here (not by
/// tollgate) for the cross-checks below.
fn signing_input_and_signature(token: &str) -> Option<(&str, Vec<u8>)> {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    let (signed, signature) = token.rsplit_once('.')?;
    Some((signed, URL_SAFE_NO_PAD.decode(signature).ok()?))
}

/// Every RS256/384/512 key's prepared modulus (`tollgate::rsa`) gives ring's
/// verdict on the token's signing input and signature, whatever the header.
fn rsa_agrees_with_ring(token: &str, keys: &KeySet) {
    use ring::signature as sig;
    use tollgate::key_set::PublicKey;
    use tollgate::rsa::Hash;
    let Some((signed, signature)) = signing_input_and_signature(token) else {
        return;
    };
    for key in &keys.keys {
        let PublicKey::Rsa {
            alg,
            n,
            e,
            modulus: Some(m),
        } = &key.key
        else {
            continue;
        };
        let (hash, params) = match alg {
            tollgate::alg::Alg::RS256 => (Hash::Sha256, &sig::RSA_PKCS1_2048_8192_SHA256),
            tollgate::alg::Alg::RS384 => (Hash::Sha384, &sig::RSA_PKCS1_2048_8192_SHA384),
            tollgate::alg::Alg::RS512 => (Hash::Sha512, &sig::RSA_PKCS1_2048_8192_SHA512),
            _ => continue,
        };
        let ours = m.verify(hash, signed.as_bytes(), &signature);
        let ring = sig::RsaPublicKeyComponents { n, e }
            .verify(params, signed.as_bytes(), &signature)
            .is_ok();
        assert_eq!(ours, ring, "{alg:?}: tollgate::rsa and ring disagree");
    }
}

// ---------------------------------------------------------------------------
// jwks

/// Bytes as a JWKS document (`KeySet::parse`) and as a shared fetch record
/// (`FetchRecord::decode`).
///
/// Properties: every key of a parsed set (which may be empty: a `keys` list
/// without usable keys) is found by its algorithm and kid; a decoded record
/// encodes back to itself, also through the shared store
/// (`write_record`/`read_record`).
pub fn jwks(data: &[u8]) {
    let config = config_of(0);
    let rules = rules(jwt_config(&config));
    if let Ok(set) = KeySet::parse(data) {
        for token in [TOKEN_RS256, TOKEN_ES256, TOKEN_EDDSA] {
            if let Ok(v) = jwt::verify(token, &set, &rules, NOW_S) {
                assert_eq!(v.identity.principal, "alice");
            }
        }
        for k in &set.keys {
            assert!(set.candidates(k.key.alg(), k.kid.as_deref()).count() > 0);
            if let Some(kid) = &k.kid {
                assert!(set.has_kid(kid));
            }
        }
    }
    if let Some(record) = FetchRecord::decode(data) {
        assert_eq!(
            FetchRecord::decode(&record.encode()).as_ref(),
            Some(&record)
        );
        let store = mem_store(StoreMode::Normal);
        assert!(jwks_cache::write_record(&store, "r", &record).is_ok());
        let (read, cas) =
            jwks_cache::read_record(&store, "r", None).expect("the record reads back");
        assert_eq!(read, record);
        assert!(jwks_cache::read_record(&store, "r", Some(cas)).is_none());
        let mut state = JwksState::default();
        state.want(NOW_MS);
        state.apply(record.clone(), Some(cas));
        for now in [0, NOW_MS, u64::MAX] {
            let _ = state.fetch_due(now, 300_000);
            let _ = state.usable_keys(now, 900_000);
            let _ = state.kid_refresh_allowed(now, 10_000);
            let _ = state.in_flight(now, 6_000);
        }
        let failed = record.failure(jwks_cache::FetchError::Timeout, NOW_MS);
        assert_eq!(failed.body, record.body);
        assert!(failed.retry_at > NOW_MS);
        let _ = record.start(NOW_MS).success(data.to_vec(), NOW_MS).encode();
        let until = record.retry_at;
        let _ = jwks_cache::take_lease(&store, "l", record.started, until);
        jwks_cache::release_lease(&store, "l");
    }
}

// ---------------------------------------------------------------------------
// config

/// Bytes as the plugin configuration. A configuration that loads then
/// decides a few fixed requests (with the fixture keys loaded, for a JWT
/// provider).
pub fn config(data: &[u8]) {
    let config = match Config::parse(data) {
        Ok(c) => Rc::new(c),
        Err(e) => {
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    let _ = format!("{config:?}");
    let mut driver = Driver::new(config);
    while driver.poll().is_some() {}
    let store = mem_store(StoreMode::Normal);
    let es256 = format!("Bearer {TOKEN_ES256}");
    let eddsa = format!("Bearer {TOKEN_EDDSA}");
    let unknown_kid = format!("Bearer {TOKEN_UNKNOWN_KID}");
    let requests: [(&str, &str, Option<&str>); 5] = [
        ("GET", "/v1/health", None),
        ("GET", "/v1/models?limit=1", Some(&es256)),
        ("POST", "/v1/admin/../admin/x", Some(&eddsa)),
        ("DELETE", "/static/%61/b", Some("Basic x")),
        ("GET", "/v1/models", Some(&unknown_kid)),
    ];
    let answer = br#"{"active": true, "principal": "alice", "sub": "alice", "scope": "admin"}"#;
    for (id, (method, path, authorization)) in (1..).zip(requests) {
        let mut head = vec![
            (b":method".to_vec(), method.as_bytes().to_vec()),
            (b":path".to_vec(), path.as_bytes().to_vec()),
            (b"x-request-id".to_vec(), b"1".to_vec()),
        ];
        if let Some(a) = authorization {
            head.push((b"authorization".to_vec(), a.as_bytes().to_vec()));
        }
        let answers = Answers::Response(200, answer);
        let ip = Some("192.0.2.1".to_string());
        run_to_end(&mut driver, id, &Head(head), ip, NOW_MS, &store, answers);
    }
}

// ---------------------------------------------------------------------------
// provider_answers

/// An introspection or custom endpoint answer through both providers'
/// `interpret`, and the custom endpoint's request built from an arbitrary
/// token, path and headers.
///
/// Fields: status (decimal, or `timeout`; anything else is no answer), body,
/// token, raw `:path`, then header name / value pairs.
///
/// Properties: an accepted answer gives a header-safe identity; refusals are
/// 401 or 503; the introspection form body is form-urlencoded; the custom
/// request body is strict JSON.
pub fn provider_answers(data: &[u8]) {
    let f = split(data);
    let status = std::str::from_utf8(field(&f, 0)).unwrap_or_default();
    let body = field(&f, 1);
    let answer = match status.parse::<u16>() {
        Ok(status) => Answer::Response { status, body },
        Err(_) if status == "timeout" => Answer::TimedOut,
        Err(_) => Answer::NoAnswer,
    };
    let token = text(field(&f, 2));
    let raw_path = text(field(&f, 3));
    let headers: Vec<(String, Vec<u8>)> = f
        .get(4..)
        .unwrap_or_default()
        .chunks(2)
        .map(|kv| (text(kv[0]), kv.get(1).copied().unwrap_or_default().to_vec()))
        .collect();

    let intro_config = config_of(1);
    let Some(AuthConfig::Introspection(i)) =
        intro_config.auth.as_ref().and_then(|a| a.providers.first())
    else {
        panic!("fixture 1 is not introspection");
    };
    let default_mapping = tollgate::claims::ClaimsMapping::llama_stack_default();
    for (mapping, now) in [
        (&i.claims_mapping, NOW_S),
        (&default_mapping, NOW_S + 86_400),
    ] {
        match i
            .introspection
            .interpret(answer, mapping, i.clock_skew_seconds, now)
        {
            Ok(v) => {
                check_identity(&v.identity);
                assert!(now <= v.exp.saturating_add(i.clock_skew_seconds));
            }
            Err(e) => check_denial(&Denial::Provider(e)),
        }
    }
    let request = i.introspection.request(&token);
    let form_ok = |b: &u8| b.is_ascii_alphanumeric() || b"*-._+%=&".contains(b);
    assert!(
        request.body.iter().all(form_ok),
        "introspection body not form-encoded"
    );
    assert!(request.body.starts_with(b"token="));
    assert_eq!(form_urlencode(&token).len() + 6, request.body.len());

    let custom_config = config_of(2);
    let Some(AuthConfig::Custom(c)) = custom_config
        .auth
        .as_ref()
        .and_then(|a| a.providers.first())
    else {
        panic!("fixture 2 is not custom");
    };
    match c.interpret(answer, &token) {
        Ok(id) => check_identity(&id),
        Err(e) => check_denial(&Denial::Provider(e)),
    }
    let path = tollgate::provider::custom::endpoint_path(&raw_path);
    let request = c.request(&token, &path, &raw_path, &headers);
    assert!(
        tollgate::json::parse_strict(&request.body).is_ok(),
        "custom request body is not strict JSON"
    );
    let _ = format!("{request:?}");
}

// ---------------------------------------------------------------------------
// route

/// A path through `normalize_path`, then the fixture route rules and public
/// paths with an arbitrary method and attributes.
///
/// Fields: method, raw `:path`, then attributes, one `category=v1 v2 ...`
/// per field.
///
/// Properties of a normalised path (module docs of `policy`): absolute, no
/// empty, `.` or `..` segment (nor one once its `;` parameters are removed), printable ASCII (space included) without
/// `\`, `?`, `#`; escapes
/// upper-case and never of an unreserved character or a separator;
/// normalising is idempotent and ignores the query.
pub fn route(data: &[u8]) {
    let f = split(data);
    let method = text(field(&f, 0));
    let raw = text(field(&f, 1));
    let attrs = attributes_of(f.get(2..).unwrap_or_default());
    let config = config_of(0);
    let _ = config.route_rules.check(&method, &raw, &attrs);
    let path = match normalize_path(&raw) {
        Ok(p) => p,
        Err(e) => {
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    check_normal_form(&path);
    assert_eq!(normalize_path(&path).as_ref(), Ok(&path), "not idempotent");
    assert_eq!(
        normalize_path(&format!("{raw}?q=/../x#f")).as_ref(),
        Ok(&path),
        "the query changed the path"
    );
    let _ = config.public_paths.matches(&path);
    if let Err(e) = config.route_rules.check(&method, &path, &attrs) {
        assert!(!e.to_string().is_empty());
    }
}

fn check_normal_form(p: &str) {
    assert!(p.starts_with('/'), "{p:?}");
    let b = p.as_bytes();
    assert!(
        b.iter()
            .all(|&c| (0x20..0x7f).contains(&c) && !b"\\?#".contains(&c)),
        "{p:?}"
    );
    let inner = p.strip_suffix('/').unwrap_or(p);
    for seg in inner.split('/').skip(1) {
        assert!(
            !seg.is_empty() && seg != "." && seg != "..",
            "segment {seg:?} in {p:?}"
        );
        let base = seg.split(';').next().unwrap_or_default();
        assert!(
            !base.is_empty() && base != "." && base != "..",
            "segment {seg:?} without its parameters in {p:?}"
        );
    }
    let mut i = 0;
    while let Some(pos) = b.get(i..).and_then(|r| r.iter().position(|&c| c == b'%')) {
        let at = i + pos;
        let hex = p.get(at + 1..at + 3).unwrap_or_default();
        assert!(
            hex.len() == 2
                && hex
                    .bytes()
                    .all(|c| c.is_ascii_digit() || (b'A'..=b'F').contains(&c)),
            "escape {hex:?} in {p:?}"
        );
        let v = u8::from_str_radix(hex, 16).unwrap_or_default();
        assert!(
            !(v.is_ascii_alphanumeric() || b"-._~/\\".contains(&v) || v < 0x20 || v == 0x7f),
            "escape %{hex} in {p:?} should have been decoded or refused"
        );
        i = at + 3;
    }
}

// ---------------------------------------------------------------------------
// decision

/// How the decision target's shared data behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreMode {
    Normal,
    FailGet,
    FailSet,
    /// Every `set` loses the race.
    Contended,
}

/// Shared data with Envoy's semantics (`tollgate::store::fake::FakeStore`),
/// failing as `mode` says.
pub fn mem_store(mode: StoreMode) -> FakeStore {
    let store = FakeStore::new();
    match mode {
        StoreMode::Normal => {}
        StoreMode::FailGet => store.fail_get(true),
        StoreMode::FailSet => store.fail_set(true),
        StoreMode::Contended => store.inject_mismatches(u32::MAX),
    }
    store
}

/// Request headers as the driver reads them.
struct Head(Vec<(Vec<u8>, Vec<u8>)>);

impl RequestHead for Head {
    fn get(&self, name: &str) -> Option<&[u8]> {
        self.0
            .iter()
            .find(|(k, _)| k.as_slice() == name.as_bytes())
            .map(|(_, v)| v.as_slice())
    }
    fn pairs(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.0.iter().map(|(k, v)| (k.as_slice(), v.as_slice()))
    }
}

/// The bearer token of an `Authorization` value, as `auth` reads it.
fn bearer(value: &[u8]) -> Option<&str> {
    let (scheme, rest) = value.split_at_checked(6)?;
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    let (&b' ', token) = rest.split_first()? else {
        return None;
    };
    std::str::from_utf8(token.trim_ascii()).ok()
}

/// How the fuzzed provider answers a callout.
#[derive(Debug, Clone, Copy)]
enum Answers<'a> {
    Response(u16, &'a [u8]),
    NoAnswer,
    TimedOut,
}

/// Runs one request through the driver to its end, doing what the glue and
/// the host would: performing dispatches, answering the key set fetch with
/// the fixture JWKS and provider callouts with `answers`, ticking when asked
/// (a tick with nothing to answer is a second later: a request stuck waiting
/// must be refused in time). Returns the identity of an allowed request
/// (`Some(None)` when anonymous) and when it was allowed, `None` when denied.
fn run_to_end(
    driver: &mut Driver,
    id: u32,
    head: &Head,
    source_ip: Option<String>,
    now_ms: u64,
    store: &FakeStore,
    answers: Answers,
) -> Option<(Option<Rc<Identity>>, u64)> {
    let req = RequestHandle::new(id);
    let mut now = now_ms;
    driver.on_request_headers(&req, head, || source_ip, Some(now_ms), store);
    let (mut jwks_fetches, mut provider_calls): (Vec<String>, u32) = (Vec::new(), 0);
    let mut token = 0u32;
    for _ in 0..32 {
        let mut tick = false;
        let mut sent = Vec::new();
        while let Some(effect) = driver.poll() {
            match effect {
                Effect::Allow {
                    req: r, identity, ..
                } => {
                    assert_eq!(r.id(), id);
                    assert!(req.may_continue(), "allowed but its body is held");
                    if let Some(id) = &identity {
                        check_identity(id);
                    }
                    if let Phase::Allowed(Some(rl)) = req.phase() {
                        for (k, v) in rl.headers() {
                            assert!(header_safe(k) && v.bytes().all(|b| b.is_ascii_digit()));
                        }
                    }
                    return Some((identity, now));
                }
                Effect::Deny {
                    id: denied, denial, ..
                } => {
                    assert_eq!(denied, id);
                    assert!(!req.may_continue(), "denied but its body may go on");
                    check_denial(&denial);
                    return None;
                }
                Effect::Dispatch(d) => {
                    token += 1;
                    driver.dispatched(d.id, Ok(token), now, store);
                    sent.push((token, d));
                }
                // No fixture counts remotely; a call would find no service.
                Effect::DispatchGrpc(d) => driver.dispatched_grpc(d.id, Err(()), now, store),
                Effect::SetTick(_) => tick = true,
                Effect::OpenWake => {}
                Effect::Wake => driver.on_wake(now, store),
                Effect::Count(_) => {}
            }
        }
        assert_eq!(req.phase(), Phase::Waiting, "undecided without waiting");
        assert!(!req.may_continue(), "a waiting request's body may go on");
        let idle = sent.is_empty();
        for (token, d) in sent {
            let is_jwks = d.headers.iter().any(|(k, v)| k == ":method" && v == "GET");
            let (reply, at) = if is_jwks {
                assert!(
                    !jwks_fetches.contains(&d.cluster),
                    "one key set fetched twice"
                );
                jwks_fetches.push(d.cluster.clone());
                let body = ReplyBody::Read(JWKS.as_bytes().to_vec());
                (
                    CalloutReply {
                        status: Some(200),
                        body,
                        throttled: false,
                    },
                    now,
                )
            } else {
                provider_calls += 1;
                let body = d.body.as_deref().unwrap_or_default();
                assert!(tollgate::json::parse_strict(body).is_ok() || body.starts_with(b"token="));
                match answers {
                    Answers::Response(status, body) => {
                        let body = ReplyBody::Read(body.to_vec());
                        (
                            CalloutReply {
                                status: Some(status),
                                body,
                                throttled: false,
                            },
                            now,
                        )
                    }
                    Answers::NoAnswer => (
                        CalloutReply {
                            status: None,
                            body: ReplyBody::Read(Vec::new()),
                            throttled: false,
                        },
                        now,
                    ),
                    Answers::TimedOut => (
                        CalloutReply {
                            status: None,
                            body: ReplyBody::Read(Vec::new()),
                            throttled: false,
                        },
                        now + d.timeout_ms,
                    ),
                }
            };
            driver.on_callout_reply(token, reply, Some(at), store);
        }
        // A request waits for one fetch per key set and one callout at most.
        assert!(provider_calls <= 1, "waited twice");
        if idle {
            now += 1000;
        }
        if tick || idle {
            driver.on_tick(now, store);
        }
    }
    panic!("a request was never decided");
}

/// A whole request through the driver (`Driver::on_request_headers`, then
/// what the glue and the host do for a parked request), repeated on the same
/// driver for up to four rounds (caches, quota counting).
///
/// Input: two control bytes, then fields: method, raw `:path`,
/// `Authorization` value, source IP, provider answer body, a value planted
/// at the caller's quota key, then header name / value pairs.
///
/// - byte 0, bits 0-1: configuration (0 two JWT issuers and an API key,
///   1 introspection, 2 custom, 3
///   none); bit 2: send `Authorization`; bit 3: a source IP is known;
///   bits 4-7: provider answer (0-7: 200, then 401, 403, 404, 500, 503, 302,
///   no answer, timeout).
/// - byte 1, bits 0-2: store (5 fails reads, 6 fails writes, 7 always
///   contended, else works); bits 3-4: rounds - 1; bits 5-7: time between
///   rounds (0, 1 ms, 999 ms, 1 s, 1 min, 1 h, 1 day, 10 days).
///
/// Properties: every request ends allowed or denied (never left waiting),
/// its body held until it is allowed; allowed identities are header-safe and
/// every answer is well-formed; a request waits for keys or a callout at
/// most once; with the JWT provider an allowed caller's token verifies at
/// that time (the token cache never admits what verification refuses); at
/// one instant, no client is allowed more requests than its quota.
pub fn decision(data: &[u8]) {
    let (ctl, rest) = data.split_at_checked(2).unwrap_or((&[0, 0], data));
    let (c0, c1) = (ctl[0], ctl[1]);
    let f = split(rest);
    let kind = c0 & 3;
    let store_mode = match c1 & 7 {
        5 => StoreMode::FailGet,
        6 => StoreMode::FailSet,
        7 => StoreMode::Contended,
        _ => StoreMode::Normal,
    };
    let rounds = usize::from((c1 >> 3) & 3) + 1;
    let step_ms: u64 =
        [0, 1, 999, 1000, 60_000, 3_600_000, 86_400_000, 864_000_000][usize::from(c1 >> 5)];
    let body = field(&f, 4);
    let answers = match c0 >> 4 {
        0..=7 => Answers::Response(200, body),
        8 => Answers::Response(401, body),
        9 => Answers::Response(403, body),
        10 => Answers::Response(404, body),
        11 => Answers::Response(500, body),
        12 => Answers::Response(503, body),
        13 => Answers::Response(302, body),
        14 => Answers::NoAnswer,
        _ => Answers::TimedOut,
    };

    let config = config_of(kind);
    let authorization = (c0 & 4 != 0).then(|| field(&f, 2).to_vec());
    let source_ip = (c0 & 8 != 0).then(|| text(field(&f, 3)));
    let mut head = vec![
        (b":method".to_vec(), field(&f, 0).to_vec()),
        (b":path".to_vec(), field(&f, 1).to_vec()),
    ];
    if let Some(a) = &authorization {
        head.push((b"authorization".to_vec(), a.clone()));
    }
    head.extend(f.get(6..).unwrap_or_default().chunks(2).map(|kv| {
        (
            kv[0].to_ascii_lowercase(),
            kv.get(1).copied().unwrap_or_default().to_vec(),
        )
    }));
    let head = Head(head);

    let store = mem_store(store_mode);
    let planted = field(&f, 5);
    if !planted.is_empty() {
        let ip = source_ip.as_deref().unwrap_or("unknown");
        for client in [
            tollgate::quota::Client::Principal("alice"),
            tollgate::quota::Client::Anonymous(ip),
        ] {
            store.put_raw(&tollgate::quota::key_for(&client), planted);
        }
    }
    let mut driver = Driver::new(config.clone());
    while driver.poll().is_some() {}

    let (mut authenticated, mut anonymous) = (0, 0);
    for round in 0..rounds {
        let now_ms = NOW_MS + step_ms * round as u64;
        let id = u32::try_from(round).unwrap_or(0) + 1;
        let Some((identity, decided_ms)) = run_to_end(
            &mut driver,
            id,
            &head,
            source_ip.clone(),
            now_ms,
            &store,
            answers,
        ) else {
            continue;
        };
        match &identity {
            Some(_) => authenticated += 1,
            None => anonymous += 1,
        }
        let auth = config.auth.as_ref();
        if let (Some(id), Some(auth)) = (&identity, auth.filter(|a| a.jwts().next().is_some())) {
            let token = authorization.as_deref().and_then(bearer);
            let token = token.expect("allowed with a JWT provider but no bearer token");
            let iss = jwt::unverified_issuer(token.as_bytes());
            match auth.jwts().find(|j| j.issuer.is_some() && j.issuer == iss) {
                Some(j) => {
                    let keys = KEYS.with(|k| k.0.clone());
                    let v = jwt::verify(token, &keys, &rules(j), decided_ms / 1000);
                    let v = v.expect("allowed a token that does not verify now");
                    assert_eq!(v.identity.principal, id.principal);
                }
                None => assert_eq!(token, FUZZ_API_KEY, "allowed {iss:?} by no provider"),
            }
        }
    }
    if step_ms == 0 && store_mode == StoreMode::Normal {
        assert!(
            authenticated <= QUOTA_AUTHENTICATED,
            "{authenticated} allowed"
        );
        assert!(
            anonymous <= QUOTA_ANONYMOUS,
            "{anonymous} anonymous allowed"
        );
    }
}

/// The caps the `usage` target reads with: tiny ones make events overflow.
const USAGE_CAPS: [usize; 8] = [0, 1, 8, 32, 64, 256, 4096, usage::DEFAULT_MAX_BYTES];

/// `usage`: byte 0 chooses the kind (bit 0: event stream or JSON) and the
/// cap (bits 1-3, [`USAGE_CAPS`]); byte 1 seeds the chunk sizes; the rest is
/// the response body. Asserts: the same usage and `too_large` whether the
/// body comes whole, in pseudo-random chunks or byte by byte; the reader
/// never holds more than its cap; a usage's total is at least input +
/// output (saturating), which a 1:1 weighted count never exceeds.
pub fn usage(data: &[u8]) {
    let (control, seed, body) = match data {
        [c, s, rest @ ..] => (*c, *s, rest),
        _ => return,
    };
    let kind = if control & 1 == 0 {
        Kind::Sse
    } else {
        Kind::Json
    };
    let cap = USAGE_CAPS[usize::from(control >> 1) % USAGE_CAPS.len()];
    let run = |chunks: &mut dyn Iterator<Item = &[u8]>| -> (Option<Usage>, bool) {
        let mut r = UsageReader::new(kind, cap);
        for chunk in chunks {
            r.feed(chunk);
            assert!(r.buffered() <= cap, "{} held, cap {cap}", r.buffered());
        }
        let so_far = r.usage_so_far();
        let too_large = r.too_large();
        let got = r.finish();
        if kind == Kind::Sse {
            assert_eq!(so_far, got, "a stream's usage so far is its usage");
        }
        (got, too_large)
    };
    let whole = run(&mut std::iter::once(body));
    let mut state = u32::from(seed) | 1;
    let mut rest = body;
    let mut chunks = Vec::new();
    while !rest.is_empty() {
        state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        let n = ((state >> 16) as usize % 13).min(rest.len());
        let (a, b) = rest.split_at(n);
        chunks.push(a);
        rest = b;
    }
    assert_eq!(run(&mut chunks.into_iter()), whole, "chunked (seed {seed})");
    assert_eq!(run(&mut body.chunks(1)), whole, "byte by byte");
    if let (Some(u), _) = whole {
        assert!(u.total >= u.input.saturating_add(u.output), "{u:?}");
        let one_to_one = Count::Weighted {
            input_per_mille: 1000,
            output_per_mille: 1000,
        };
        assert!(u.count(one_to_one) <= u.count(Count::Total), "{u:?}");
    }
}

/// A target's body.
pub type Target = fn(&[u8]);

/// Every target, by name (the directory names under `fuzz/corpus/`).
/// Fields: `route_policy` JSON, the normalised path, then attributes
/// (`category=v1 v2`). A policy that loads decides the same twice, ignores
/// trailing slashes, allows everything when empty, and refuses an anonymous
/// request whenever it refuses one with attributes and no rule is without
/// conditions.
pub fn route_policy(data: &[u8]) {
    let f = split(data);
    let config = format!(r#"{{"route_policy": {}}}"#, text(field(&f, 0)));
    let Ok(config) = Config::parse(config.as_bytes()) else {
        return;
    };
    let policy: &RoutePolicy = &config.route_policy;
    let path = text(field(&f, 1));
    let attrs = attributes_of(f.get(2..).unwrap_or_default());
    for user in [Some(&attrs), None] {
        let first = policy.check(&path, user);
        assert_eq!(first, policy.check(&path, user), "not deterministic");
        if !path.is_empty() && !path.ends_with('/') {
            assert_eq!(
                first,
                policy.check(&format!("{path}/"), user),
                "a trailing slash"
            );
        }
        if policy.is_empty() {
            assert!(first.is_ok());
        }
        if let Err(refused) = &first {
            assert!(refused.to_string().starts_with("Access denied: "));
        }
    }
}

pub const TARGETS: &[(&str, Target)] = &[
    ("token", token),
    ("jwks", jwks),
    ("config", config),
    ("provider_answers", provider_answers),
    ("route", route),
    ("decision", decision),
    ("usage", usage),
    ("route_policy", route_policy),
];
