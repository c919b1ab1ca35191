//! The request decision (`auth::Core`) with real tokens: the verified-token
//! cache.

use super::fixtures::*;
use crate::auth::{Core, RequestFacts, Step};
use crate::config::Config;
use crate::jwt::TokenError;
use crate::response::Denial;
use crate::store::fake::FakeStore;
use serde_json::{json, Value};
use std::rc::Rc;

fn core() -> Core {
    let config = json!({"auth": {"provider_config": {"type": "oauth2_token",
        "jwks": {"uri": "http://idp/jwks", "cache_ttl": 3600},
        "audience": AUDIENCE, "issuer": ISSUER, "clock_skew_seconds": SKEW}}});
    let mut core = Core::new(Rc::new(
        Config::parse(config.to_string().as_bytes()).unwrap(),
    ));
    install(&mut core, standard_jwks(), NOW);
    core
}

/// The key set `jwks`, as fetched by this VM at `now_s`.
fn install(core: &mut Core, jwks: Vec<Value>, now_s: u64) {
    let body = json!({ "keys": jwks }).to_string().into_bytes();
    let record = core.jwks[0].fetched(body, now_s * 1000);
    core.jwks[0].apply(record, None);
}

/// Decides at `now_s` (plus 999 ms: the cache works in whole seconds).
fn decide(core: &mut Core, token: &str, now_s: u64) -> Step {
    let req = RequestFacts {
        path: "/v1/models".into(),
        authorization: Some(format!("Bearer {token}").into_bytes()),
        ..RequestFacts::default()
    };
    core.decide(&req, now_s * 1000 + 999, &FakeStore::new())
}

#[test]
fn a_verified_token_is_served_from_the_cache_until_it_expires() {
    let mut core = core();
    let token = eddsa(claims());
    assert_eq!(decide(&mut core, &token, NOW).principal(), Some("alice"));
    assert_eq!((core.tokens.hits, core.tokens.misses), (0, 1));
    assert_eq!(
        decide(&mut core, &token, NOW + 1).principal(),
        Some("alice")
    );
    // Cached up to `exp` + clock skew, to the second.
    assert_eq!(
        decide(&mut core, &token, EXP + SKEW).principal(),
        Some("alice")
    );
    assert_eq!((core.tokens.hits, core.tokens.misses), (2, 1));
    assert_eq!(
        decide(&mut core, &token, EXP + SKEW + 1),
        Step::Deny(Denial::InvalidToken(TokenError::Expired))
    );
    assert_eq!((core.tokens.hits, core.tokens.misses), (2, 2));
}

#[test]
fn a_new_key_set_empties_the_cache() {
    let mut core = core();
    let token = eddsa(claims());
    assert_eq!(decide(&mut core, &token, NOW).principal(), Some("alice"));
    // The issuer drops the Ed25519 key: the cached answer goes with it.
    install(&mut core, vec![rsa_2048_jwk(None)], NOW + 1);
    let step = decide(&mut core, &token, NOW + 2);
    assert_eq!(step.principal(), None, "{step:?}");
    assert_eq!((core.tokens.hits, core.tokens.misses), (0, 2));
    // And back: verified again, then cached again.
    install(&mut core, standard_jwks(), NOW + 3);
    assert_eq!(
        decide(&mut core, &token, NOW + 4).principal(),
        Some("alice")
    );
    assert_eq!(
        decide(&mut core, &token, NOW + 5).principal(),
        Some("alice")
    );
    assert_eq!((core.tokens.hits, core.tokens.misses), (1, 3));
}

/// The document `body`, answered 200 to this VM's fetch at `now_s`.
fn fetched(core: &mut Core, body: &[u8], now_s: u64) {
    let started = core.jwks[0].record.start(now_s * 1000);
    core.jwks[0].apply(started, None);
    let record = core.jwks[0].fetched(body.to_vec(), now_s * 1000);
    core.jwks[0].apply(record, None);
}

fn unknown_kid() -> Step {
    Step::Deny(Denial::InvalidToken(TokenError::UnknownKid))
}

#[test]
fn a_removed_key_is_revoked_at_once_the_others_keep_working() {
    let mut core = core();
    let (ed, es) = (eddsa(claims()), es256(claims()));
    for now in [NOW, NOW + 1] {
        assert_eq!(decide(&mut core, &ed, now).principal(), Some("alice"));
        assert_eq!(decide(&mut core, &es, now).principal(), Some("alice"));
    }
    assert_eq!(core.tokens.hits, 2, "both tokens cached");
    // The issuer removes the Ed25519 key (the refresh cooldown runs).
    install(
        &mut core,
        vec![rsa_2048_jwk(None), ec_jwk("ec-1", &ec_point())],
        NOW + 2,
    );
    for now in [NOW + 2, NOW + 3] {
        assert_eq!(decide(&mut core, &ed, now), unknown_kid());
        assert_eq!(decide(&mut core, &es, now).principal(), Some("alice"));
    }
}

#[test]
fn a_set_without_usable_keys_revokes_every_key() {
    let no_kid = eddsa_raw(r#"{"alg":"EdDSA"}"#, &good_payload_json());
    for empty in [
        json!({"keys": []}),
        json!({"keys": [{"kty": "oct", "kid": "ed-1", "k": b64(b"secret")}]}),
    ] {
        let mut core = core();
        let ed = eddsa(claims());
        assert_eq!(decide(&mut core, &ed, NOW).principal(), Some("alice"));
        assert_eq!(decide(&mut core, &no_kid, NOW).principal(), Some("alice"));
        fetched(&mut core, empty.to_string().as_bytes(), NOW + 1);
        assert_eq!(decide(&mut core, &ed, NOW + 1), unknown_kid());
        assert_eq!(
            decide(&mut core, &no_kid, NOW + 1),
            Step::Deny(Denial::InvalidToken(TokenError::NoKey))
        );
        // Once the cooldown has run, an unknown kid asks for one refresh...
        assert_eq!(decide(&mut core, &ed, NOW + 10), unknown_kid());
        assert_eq!(decide(&mut core, &ed, NOW + 11), Step::WaitForKeys);
        // ...which still has no key: 401, not another wait.
        fetched(&mut core, empty.to_string().as_bytes(), NOW + 12);
        assert_eq!(decide(&mut core, &ed, NOW + 12), unknown_kid());
        // Garbage afterwards keeps the empty set; a good set brings keys back.
        fetched(&mut core, b"garbage", NOW + 13);
        assert_eq!(decide(&mut core, &ed, NOW + 13), unknown_kid());
        install(&mut core, standard_jwks(), NOW + 14);
        assert_eq!(decide(&mut core, &ed, NOW + 14).principal(), Some("alice"));
    }
}

#[test]
fn a_first_set_without_keys_answers_401_not_503() {
    let config = json!({"auth": {"provider_config": {"type": "oauth2_token",
        "jwks": {"uri": "http://idp/jwks"}, "audience": AUDIENCE, "issuer": ISSUER}}});
    let mut core = Core::new(Rc::new(
        Config::parse(config.to_string().as_bytes()).unwrap(),
    ));
    let ed = eddsa(claims());
    assert_eq!(decide(&mut core, &ed, NOW), Step::WaitForKeys);
    fetched(&mut core, br#"{"keys": []}"#, NOW);
    assert_eq!(decide(&mut core, &ed, NOW), unknown_kid());
}

#[test]
fn a_set_that_is_no_jwks_keeps_the_old_keys() {
    let mut core = core();
    let ed = eddsa(claims());
    assert_eq!(decide(&mut core, &ed, NOW).principal(), Some("alice"));
    for garbage in [
        &b"not json"[..],
        b"[]",
        br#"{"keys": {}}"#,
        br#"{"kid": "x"}"#,
    ] {
        fetched(&mut core, garbage, NOW + 1);
        assert_eq!(decide(&mut core, &ed, NOW + 1).principal(), Some("alice"));
    }
    assert_eq!(core.tokens.misses, 1, "still cached: nothing changed");
}

#[test]
fn bad_signatures_are_never_cached_as_good() {
    let mut core = core();
    let good = eddsa(claims());
    let (signed, _) = good.rsplit_once('.').unwrap();
    let (_, other_sig) = eddsa(claims().with_subject("mallory"))
        .rsplit_once('.')
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .unwrap();
    let forged = format!("{signed}.{other_sig}");
    assert_eq!(decide(&mut core, &good, NOW).principal(), Some("alice"));
    for _ in 0..2 {
        assert_eq!(
            decide(&mut core, &forged, NOW),
            Step::Deny(Denial::InvalidToken(TokenError::BadSignature))
        );
    }
    assert_eq!((core.tokens.hits, core.tokens.misses), (0, 3));
}

/// The cache is looked up by the token's raw bytes: a cached token with a
/// non-UTF-8 byte added (or in place of one of its own) is another token,
/// and refused.
#[test]
fn a_cached_token_with_a_non_utf8_byte_is_refused() {
    let mut core = core();
    let good = eddsa(claims());
    assert_eq!(decide(&mut core, &good, NOW).principal(), Some("alice"));
    let mut appended = format!("Bearer {good}").into_bytes();
    appended.push(0xff);
    let mut replaced = format!("Bearer {good}").into_bytes();
    if let Some(last) = replaced.last_mut() {
        *last = 0xff;
    }
    for authorization in [appended, replaced] {
        let req = RequestFacts {
            path: "/v1/models".into(),
            authorization: Some(authorization),
            ..RequestFacts::default()
        };
        assert_eq!(
            core.decide(&req, NOW * 1000, &FakeStore::new()),
            Step::Deny(Denial::InvalidToken(TokenError::Malformed))
        );
    }
    assert_eq!(decide(&mut core, &good, NOW).principal(), Some("alice"));
    assert_eq!((core.tokens.hits, core.tokens.misses), (1, 3));
}
