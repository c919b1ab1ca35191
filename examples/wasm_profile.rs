//! Where a request's wasm-side time goes, measured inside wasm under Node's
//! V8 with TurboFan only (as Envoy runs it): token parsing, RS256 checks
//! (tollgate's prepared moduli, ring, jwt-simple), the warm decision path.
//! Host calls are not in here: `make bench` measures those inside Envoy.
//!
//!   cargo build --release --target wasm32-wasip1 --example wasm_profile
//!   node --no-liftoff scripts/wasm-test-runner.mjs \
//!       target/wasm32-wasip1/release/examples/wasm_profile.wasm
//!
//! The machine's noise is large: run it several times and read the minimum.
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jwt_simple::prelude::*;
use serde_json::{json, Map, Value};
use std::hint::black_box;
use std::time::Instant;
use tollgate::auth::{Core, RequestFacts, Step};
use tollgate::claims::ClaimsMapping;
use tollgate::jwt::{self, Rules};
use tollgate::key_set::KeySet;
use tollgate::store::fake::FakeStore;
use tollgate::token_cache::TokenHasher;

const RSA_PEM: &str = include_str!("../src/testdata/rsa2048.pem");
const NOW: u64 = 1_700_000_000;
const TOKENS: usize = 20;
const ROUNDS: usize = 30;

/// Runs `f` over every token `ROUNDS` times to warm up, then as many times
/// measured, and prints the mean per call.
fn per(label: &str, tokens: &[String], f: &mut dyn FnMut(&str)) {
    for _ in 0..ROUNDS {
        tokens.iter().for_each(|t| f(t));
    }
    let t0 = Instant::now();
    for _ in 0..ROUNDS {
        tokens.iter().for_each(|t| f(t));
    }
    let us = t0.elapsed().as_secs_f64() * 1e6 / (ROUNDS * tokens.len()) as f64;
    println!("{label:40} {us:8.2} us");
}

fn main() {
    let kp = RS256KeyPair::from_pem(RSA_PEM)
        .unwrap()
        .with_key_id("rsa-1");
    let c = kp.public_key().to_components();
    let jwks = json!({"keys": [{"kty": "RSA", "kid": "rsa-1",
        "n": URL_SAFE_NO_PAD.encode(&c.n), "e": URL_SAFE_NO_PAD.encode(&c.e)}]});
    let keys = KeySet::parse(jwks.to_string().as_bytes()).unwrap();
    let tokens: Vec<String> = (0..TOKENS)
        .map(|i| {
            let custom = json!({"groups": ["admins", "ops"], "scope": "models:read models:write"});
            let mut cl = Claims::with_custom_claims(
                custom.as_object().unwrap().clone(),
                Duration::from_secs(3600),
            )
            .with_audience("llama-stack")
            .with_issuer("https://idp.example")
            .with_subject(format!("user-{i}"));
            cl.issued_at = Some(UnixTimeStamp::from_secs(NOW - 60));
            cl.invalid_before = Some(UnixTimeStamp::from_secs(NOW - 60));
            cl.expires_at = Some(UnixTimeStamp::from_secs(NOW + 3600));
            kp.sign(cl).unwrap()
        })
        .collect();
    let audiences = vec!["llama-stack".to_string()];
    let mapping = ClaimsMapping::llama_stack_default();
    let rules = Rules {
        audiences: &audiences,
        issuer: Some("https://idp.example"),
        clock_skew_seconds: 30,
        claims_mapping: &mapping,
    };

    per("jwt::parse", &tokens, &mut |t| {
        jwt::parse(t, &rules, NOW).unwrap();
    });
    per("jwt::verify RS256 (prepared modulus)", &tokens, &mut |t| {
        jwt::verify(t, &keys, &rules, NOW).unwrap();
    });
    per("ring RsaPublicKeyComponents::verify", &tokens, &mut |t| {
        let (signed, sig) = t.rsplit_once('.').unwrap();
        let sig = URL_SAFE_NO_PAD.decode(sig).unwrap();
        ring::signature::RsaPublicKeyComponents { n: &c.n, e: &c.e }
            .verify(
                &ring::signature::RSA_PKCS1_2048_8192_SHA256,
                signed.as_bytes(),
                &sig,
            )
            .unwrap();
    });
    let options = VerificationOptions {
        artificial_time: Some(UnixTimeStamp::from_secs(NOW)),
        ..Default::default()
    };
    per("jwt-simple verify_token RS256", &tokens, &mut |t| {
        kp.public_key()
            .verify_token::<Map<String, Value>>(t, Some(options.clone()))
            .unwrap();
    });

    // The warm path: the same tokens, answered from the cache.
    let config = r#"{"auth": {"provider_type": "oauth2_token", "config": {
        "audience": "llama-stack", "issuer": "https://idp.example",
        "claims_mapping": {"sub": "roles", "groups": "teams", "scope": "scopes"},
        "jwks": {"uri": "http://127.0.0.1:1/jwks", "cluster": "idp", "cache_ttl": 3600}}}}"#;
    let config = tollgate::config::Config::parse(config.as_bytes()).unwrap();
    let mut core = Core::new(std::rc::Rc::new(config));
    let now_ms = NOW * 1000;
    let record = core.jwks[0].fetched(jwks.to_string().into_bytes(), now_ms);
    core.jwks[0].apply(record, None);
    let facts: Vec<RequestFacts> = tokens
        .iter()
        .map(|t| RequestFacts {
            method: String::new(),
            path: "/v1/models".into(),
            authorization: Some(format!("Bearer {t}").into_bytes()),
            credentials: vec![],
            source_ip: None,
            raw_path: String::new(),
            headers: vec![],
        })
        .collect();
    // No quota is configured: the store is never used.
    let unused = FakeStore::new();
    let mut i = 0;
    per("warm Core::decide", &tokens, &mut |_| {
        let step = core.decide(&facts[i % facts.len()], now_ms, &unused);
        assert!(matches!(step, Step::Allow(_)), "{step:?}");
        i += 1;
    });
    // The quota's work around the two shared-data calls (an in-memory store stands in).
    let store = FakeStore::new();
    let quota = tollgate::quota::QuotaConfig {
        authenticated_max_requests: u64::MAX,
        ..Default::default()
    };
    per("quota::check (map store)", &tokens, &mut |_| {
        black_box(tollgate::quota::check(
            &quota,
            &store,
            &tollgate::quota::Client::Principal("alice"),
            NOW,
        ));
    });
    let hasher = TokenHasher::default();
    per("TokenHasher::key", &tokens, &mut |t| {
        black_box(hasher.key(&[t.as_bytes()]));
    });
}
