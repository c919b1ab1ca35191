//! Writes the seed corpus under `fuzz/corpus/<target>/` from the fixture
//! keys in `src/testdata/`, and checks that the constants embedded in
//! `fuzz/targets.rs` (the JWKS and the good tokens) still match those keys.
//!
//!     cd fuzz && cargo run --example make_seeds
//!
//! Files it writes are named `seed-*`; files with other names (inputs the
//! fuzzer found and someone kept, `cargo fuzz cmin` output) are left alone.
//! Every time is relative to `targets::NOW_S` (2023-11-14T22:13:20Z), so the
//! seeds never expire.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jwt_simple::prelude::*;
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};
use tollgate_fuzz as t;

const RSA_PEM: &str = include_str!("../../src/testdata/rsa2048.pem");
const RSA_1024_TOKEN: &str = include_str!("../../src/testdata/rsa1024_rs256.jwt");
const EC_PEM: &str = include_str!("../../src/testdata/ec_p256.pem");
const ED_PEM: &str = include_str!("../../src/testdata/ed25519.pem");

const NOW: u64 = t::NOW_S;
const IAT: u64 = NOW - 60;
const EXP: u64 = NOW + 3600;
const ISSUER: &str = "https://issuer.example";
const AUDIENCE: &str = "llama-stack";

fn b64(bytes: impl AsRef<[u8]>) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

struct Keys {
    rs256: RS256KeyPair,
    ps256: PS256KeyPair,
    es256: ES256KeyPair,
    ed: Ed25519KeyPair,
}

fn keys() -> Keys {
    Keys {
        rs256: RS256KeyPair::from_pem(RSA_PEM)
            .unwrap()
            .with_key_id("rsa-1"),
        ps256: PS256KeyPair::from_pem(RSA_PEM)
            .unwrap()
            .with_key_id("rsa-1"),
        es256: ES256KeyPair::from_pem(EC_PEM).unwrap().with_key_id("ec-1"),
        ed: Ed25519KeyPair::from_pem(ED_PEM)
            .unwrap()
            .with_key_id("ed-1"),
    }
}

fn rsa_jwk(k: &Keys) -> Value {
    let c = k.rs256.public_key().to_components();
    json!({"kty": "RSA", "kid": "rsa-1", "use": "sig", "n": b64(&c.n), "e": b64(&c.e)})
}

fn ec_jwk(k: &Keys) -> Value {
    let p = k.es256.public_key().public_key().to_bytes_uncompressed();
    json!({"kty": "EC", "crv": "P-256", "kid": "ec-1", "x": b64(&p[1..33]), "y": b64(&p[33..65])})
}

fn ed_jwk(k: &Keys) -> Value {
    json!({"kty": "OKP", "crv": "Ed25519", "kid": "ed-1", "alg": "EdDSA",
           "x": b64(k.ed.public_key().to_bytes())})
}

type TokenClaims = JWTClaims<Map<String, Value>>;

/// alice's claims, as in `src/tests/fixtures.rs`.
fn claims() -> TokenClaims {
    claims_with(json!({
        "groups": ["admins", "ops"],
        "project": "llama",
        "tenant": "acme",
        "scope": "models:read models:write telemetry.read admin",
    }))
}

fn claims_with(custom: Value) -> TokenClaims {
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

/// Any header and payload text, signed with the fixture Ed25519 key.
fn eddsa_raw(k: &Keys, header: &str, payload: &str) -> String {
    let input = format!("{}.{}", b64(header), b64(payload));
    let sig = k.ed.key_pair().as_ref().sk.sign(input.as_bytes(), None);
    format!("{input}.{}", b64(*sig))
}

fn good_payload() -> String {
    format!(
        r#"{{"iss":"{ISSUER}","aud":"{AUDIENCE}","sub":"alice","iat":{IAT},"exp":{EXP},"scope":"models:read telemetry.read"}}"#
    )
}

fn payload_with(extra: &str) -> String {
    // `extra` replaces the whole object body after `iss`.
    format!(r#"{{"iss":"{ISSUER}",{extra}}}"#)
}

struct Seeds {
    dir: PathBuf,
    count: usize,
    written: Vec<String>,
}

impl Seeds {
    fn new(root: &Path, target: &str) -> Seeds {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).unwrap();
        Seeds {
            dir,
            count: 0,
            written: Vec::new(),
        }
    }

    fn put(&mut self, name: &str, bytes: impl AsRef<[u8]>) {
        let name = format!("seed-{name}");
        std::fs::write(self.dir.join(&name), bytes).unwrap();
        self.written.push(name);
        self.count += 1;
    }

    /// For inputs whose signature is randomised: an existing file is kept.
    fn put_once(&mut self, name: &str, bytes: impl FnOnce() -> String) {
        let file = format!("seed-{name}");
        if self.dir.join(&file).exists() {
            self.written.push(file);
            self.count += 1;
        } else {
            self.put(name, bytes());
        }
    }
}

/// Removes the `seed-*` files this run did not write (seeds since dropped).
impl Drop for Seeds {
    fn drop(&mut self) {
        for e in std::fs::read_dir(&self.dir).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            if name.starts_with("seed-") && !self.written.contains(&name) {
                std::fs::remove_file(p).unwrap();
            }
        }
    }
}

/// Fields joined by the 0xFF separator the targets split on.
fn fields(parts: &[&[u8]]) -> Vec<u8> {
    parts.join(&t::SEP[..])
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let k = keys();

    // The embedded constants must be what these keys give.
    let jwks = json!({"keys": [rsa_jwk(&k), ec_jwk(&k), ed_jwk(&k)]});
    let embedded: Value = serde_json::from_str(t::JWKS).unwrap();
    if embedded != jwks {
        eprintln!("targets.rs JWKS is stale; use:\n{jwks}");
        std::process::exit(1);
    }
    // Signatures from fresh signing are randomised (ECDSA, PSS, jwt-simple's
    // EdDSA noise): seeds use the embedded tokens so that they stay the same.
    let (rs256, es256, eddsa) = (t::TOKEN_RS256, t::TOKEN_ES256, t::TOKEN_EDDSA);
    let unknown_kid = eddsa_raw(&k, r#"{"alg":"EdDSA","kid":"ed-9"}"#, &good_payload());
    if let Err(e) = t::self_check() {
        let rs256 = k.rs256.sign(claims()).unwrap();
        let es256 = k.es256.sign(claims()).unwrap();
        let eddsa = k.ed.sign(claims()).unwrap();
        eprintln!(
            "targets.rs tokens do not verify ({e}); use:\nTOKEN_RS256 {rs256}\nTOKEN_ES256 {es256}\nTOKEN_EDDSA {eddsa}\nTOKEN_UNKNOWN_KID {unknown_kid}"
        );
        std::process::exit(1);
    }
    assert_eq!(
        t::TOKEN_UNKNOWN_KID,
        unknown_kid,
        "TOKEN_UNKNOWN_KID is stale"
    );

    token_seeds(&root, &k, rs256, es256, eddsa);
    jwks_seeds(&root, &k, &jwks);
    config_seeds(&root);
    provider_seeds(&root);
    route_seeds(&root);
    decision_seeds(&root, es256, eddsa);
}

fn token_seeds(root: &Path, k: &Keys, rs256: &str, es256: &str, eddsa: &str) {
    let mut s = Seeds::new(root, "token");
    s.put("valid-rs256", rs256);
    s.put_once("valid-ps256", || k.ps256.sign(claims()).unwrap());
    s.put("valid-es256", es256);
    s.put("valid-eddsa", eddsa);
    let no_kid = ES256KeyPair::from_pem(EC_PEM).unwrap();
    s.put_once("valid-es256-no-kid", || no_kid.sign(claims()).unwrap());
    let at_jwt = HeaderOptions {
        signature_type: Some("at+jwt".into()),
        ..Default::default()
    };
    s.put_once("valid-at-jwt-typ", || {
        k.es256.sign_with_options(claims(), &at_jwt).unwrap()
    });
    s.put(
        "valid-jose-typ",
        eddsa_raw(
            k,
            r#"{"alg":"EdDSA","typ":"JOSE","kid":"ed-1"}"#,
            &good_payload(),
        ),
    );
    s.put(
        "valid-nested-claims",
        eddsa_raw(
            k,
            r#"{"alg":"EdDSA","kid":"ed-1"}"#,
            &payload_with(&format!(
                r#""aud":["x","{AUDIENCE}"],"sub":"svc-1","exp":{EXP},"realm_access":{{"roles":["admin",7,true,null,""]}},"groups":[1,2.5,"ops"],"team":"a  b\tc","username":"Zoë"}}"#
            )),
        ),
    );

    // Attacks on the header.
    let p = b64(good_payload());
    s.put(
        "alg-none-empty-sig",
        format!("{}.{p}.", b64(r#"{"alg":"none"}"#)),
    );
    s.put(
        "alg-none-sig",
        format!("{}.{p}.AAAA", b64(r#"{"alg":"none","typ":"JWT"}"#)),
    );
    s.put(
        "alg-None-case",
        format!("{}.{p}.AAAA", b64(r#"{"alg":"None"}"#)),
    );
    // HS256 "signed" with the RSA public key: the classic algorithm confusion.
    let pem = k.rs256.public_key().to_pem().unwrap();
    let hs = HS256Key::from_bytes(pem.as_bytes()).with_key_id("rsa-1");
    s.put("alg-hs256-confusion", hs.authenticate(claims()).unwrap());
    s.put(
        "alg-rs256-lowercase",
        eddsa_raw(k, r#"{"alg":"rs256","kid":"rsa-1"}"#, &good_payload()),
    );
    s.put(
        "alg-eddsa-with-rsa-kid",
        eddsa_raw(k, r#"{"alg":"EdDSA","kid":"rsa-1"}"#, &good_payload()),
    );
    s.put(
        "header-crit",
        eddsa_raw(
            k,
            r#"{"alg":"EdDSA","kid":"ed-1","crit":["exp"]}"#,
            &good_payload(),
        ),
    );
    s.put(
        "header-b64-false",
        eddsa_raw(
            k,
            r#"{"alg":"EdDSA","kid":"ed-1","b64":false}"#,
            &good_payload(),
        ),
    );
    s.put(
        "header-enc-jwe",
        eddsa_raw(
            k,
            r#"{"alg":"EdDSA","enc":"A256GCM","zip":"DEF"}"#,
            &good_payload(),
        ),
    );
    // An attacker's own key, embedded (jwk) or pointed to (jku, x5u).
    let evil = ed25519_compact::KeyPair::from_seed(ed25519_compact::Seed::new([9u8; 32]));
    let evil_x = b64(*evil.pk);
    let header = format!(
        r#"{{"alg":"EdDSA","jwk":{{"kty":"OKP","crv":"Ed25519","x":"{evil_x}"}},"jku":"https://evil.example/jwks","x5u":"https://evil.example/c","x5c":["AAAA"]}}"#
    );
    let input = format!("{}.{}", b64(&header), b64(good_payload()));
    let sig = evil.sk.sign(input.as_bytes(), None);
    s.put("header-embedded-jwk", format!("{input}.{}", b64(*sig)));
    s.put(
        "header-kid-unknown",
        eddsa_raw(k, r#"{"alg":"EdDSA","kid":"ed-9"}"#, &good_payload()),
    );
    s.put(
        "header-kid-long",
        eddsa_raw(
            k,
            &format!(r#"{{"alg":"EdDSA","kid":"{}"}}"#, "k".repeat(300)),
            &good_payload(),
        ),
    );
    s.put(
        "header-kid-number",
        eddsa_raw(k, r#"{"alg":"EdDSA","kid":1}"#, &good_payload()),
    );
    s.put(
        "header-typ-object",
        eddsa_raw(k, r#"{"alg":"EdDSA","typ":{}}"#, &good_payload()),
    );
    s.put(
        "header-duplicate-alg",
        eddsa_raw(k, r#"{"alg":"none","alg":"EdDSA"}"#, &good_payload()),
    );
    s.put(
        "header-array",
        eddsa_raw(k, r#"["EdDSA"]"#, &good_payload()),
    );
    s.put(
        "header-deep",
        eddsa_raw(
            k,
            &format!("{}{}", "[".repeat(200), "]".repeat(200)),
            &good_payload(),
        ),
    );

    // Claims.
    let hdr = r#"{"alg":"EdDSA","kid":"ed-1"}"#;
    let claim_cases: &[(&str, String)] = &[
        (
            "claims-expired",
            format!(r#""aud":"{AUDIENCE}","sub":"alice","exp":{}"#, NOW - 3600),
        ),
        (
            "claims-exp-at-skew",
            format!(r#""aud":"{AUDIENCE}","sub":"alice","exp":{}"#, NOW - 30),
        ),
        (
            "claims-nbf-future",
            format!(
                r#""aud":"{AUDIENCE}","sub":"alice","exp":{EXP},"nbf":{}"#,
                NOW + 600
            ),
        ),
        (
            "claims-iat-future",
            format!(
                r#""aud":"{AUDIENCE}","sub":"alice","exp":{EXP},"iat":{}"#,
                NOW + 600
            ),
        ),
        (
            "claims-no-exp",
            format!(r#""aud":"{AUDIENCE}","sub":"alice""#),
        ),
        (
            "claims-exp-float",
            format!(r#""aud":"{AUDIENCE}","sub":"alice","exp":{EXP}.5"#),
        ),
        (
            "claims-exp-string",
            format!(r#""aud":"{AUDIENCE}","sub":"alice","exp":"{EXP}""#),
        ),
        (
            "claims-exp-negative",
            format!(r#""aud":"{AUDIENCE}","sub":"alice","exp":-1"#),
        ),
        (
            "claims-exp-huge",
            format!(r#""aud":"{AUDIENCE}","sub":"alice","exp":18446744073709551615"#),
        ),
        (
            "claims-exp-bignum",
            format!(r#""aud":"{AUDIENCE}","sub":"alice","exp":1e400"#),
        ),
        (
            "claims-wrong-aud",
            format!(r#""aud":"other","sub":"alice","exp":{EXP}"#),
        ),
        (
            "claims-aud-number",
            format!(r#""aud":5,"sub":"alice","exp":{EXP}"#),
        ),
        (
            "claims-aud-mixed-list",
            format!(r#""aud":["{AUDIENCE}",5],"sub":"alice","exp":{EXP}"#),
        ),
        (
            "claims-no-sub",
            format!(r#""aud":"{AUDIENCE}","exp":{EXP}"#),
        ),
        (
            "claims-empty-sub",
            format!(r#""aud":"{AUDIENCE}","sub":"","exp":{EXP}"#),
        ),
        (
            "claims-sub-number",
            format!(r#""aud":"{AUDIENCE}","sub":42,"exp":{EXP}"#),
        ),
        (
            "claims-sub-newline",
            format!(r#""aud":"{AUDIENCE}","sub":"alice\nx-auth-principal: admin","exp":{EXP}"#),
        ),
        (
            "claims-sub-outer-space",
            format!(r#""aud":"{AUDIENCE}","sub":" admin","exp":{EXP}"#),
        ),
        (
            "claims-sub-nul",
            format!(r#""aud":"{AUDIENCE}","sub":"a\u0000b","exp":{EXP}"#),
        ),
        (
            "claims-sub-unicode",
            format!(r#""aud":"{AUDIENCE}","sub":"Zoë\u2028😀","exp":{EXP}"#),
        ),
        (
            "claims-duplicate-sub",
            format!(r#""aud":"{AUDIENCE}","sub":"alice","sub":"admin","exp":{EXP}"#),
        ),
        (
            "claims-scope-control",
            format!(
                r#""aud":"{AUDIENCE}","sub":"alice","exp":{EXP},"scope":"a\u0007b","groups":["x\r\ny"]"#
            ),
        ),
        (
            "claims-iss-number",
            format!(r#""aud":"{AUDIENCE}","sub":"alice","exp":{EXP},"jti":7"#),
        ),
    ];
    for (name, body) in claim_cases {
        s.put(name, eddsa_raw(k, hdr, &payload_with(body)));
    }
    s.put(
        "claims-wrong-iss",
        eddsa_raw(
            k,
            hdr,
            &format!(
                r#"{{"iss":"https://evil.example","aud":"{AUDIENCE}","sub":"alice","exp":{EXP}}}"#
            ),
        ),
    );
    s.put("claims-not-object", eddsa_raw(k, hdr, "[1,2]"));
    s.put("claims-not-json", eddsa_raw(k, hdr, "alice"));
    s.put(
        "claims-trailing",
        eddsa_raw(k, hdr, &format!("{} x", good_payload())),
    );

    // Signatures and structure.
    let mut flipped = es256.to_string().into_bytes();
    let last = flipped.len() - 5;
    flipped[last] = if flipped[last] == b'A' { b'B' } else { b'A' };
    s.put("sig-flipped", flipped);
    let (signed, sig) = es256.rsplit_once('.').unwrap();
    s.put(
        "sig-truncated",
        format!("{signed}.{}", &sig[..sig.len() / 2]),
    );
    s.put(
        "sig-of-other-alg",
        format!("{signed}.{}", rs256.rsplit_once('.').unwrap().1),
    );
    s.put("sig-empty", format!("{signed}."));
    s.put("sig-padded", format!("{es256}=="));
    s.put("std-base64", es256.replace('-', "+").replace('_', "/"));
    s.put("four-parts", format!("{es256}.AAAA"));
    s.put(
        "five-parts-jwe",
        "eyJhbGciOiJSU0EtT0FFUCJ9.AAAA.BBBB.CCCC.DDDD",
    );
    s.put("two-parts", signed);
    s.put("dots", "..");
    s.put("empty", "");
    s.put("trailing-newline", format!("{eddsa}\n"));
    s.put("non-utf8", b"eyJ\xff\xfe.eyJ.AA");
    s.put("weak-rsa1024", RSA_1024_TOKEN.trim());
    let (_, rest) = RSA_1024_TOKEN.trim().split_once('.').unwrap();
    s.put(
        "weak-rsa1024-no-kid",
        format!("{}.{rest}", b64(r#"{"alg":"RS256","typ":"JWT"}"#)),
    );
    s.put(
        "too-long",
        format!("{}.{}.AAAA", b64(r#"{"alg":"EdDSA"}"#), "A".repeat(17_000)),
    );
    println!("token: {} seeds", s.count);
}

fn jwks_seeds(root: &Path, k: &Keys, jwks: &Value) {
    let mut s = Seeds::new(root, "jwks");
    s.put("standard", jwks.to_string());
    let (rsa, ec, ed) = (rsa_jwk(k), ec_jwk(k), ed_jwk(k));
    let c = k.rs256.public_key().to_components();

    // What real issuers publish: Keycloak / Auth0 / Okta shapes.
    let mut keycloak = rsa.clone();
    keycloak["alg"] = json!("RS256");
    keycloak["x5c"] = json!(["MIIC+zCCAeOgAwIBAgIJAK..."]);
    keycloak["x5t"] = json!("3Qm8dPbq0sNQ8oK0x8w");
    keycloak["x5t#S256"] = json!("b3JpZ2luYWw");
    let mut enc = rsa.clone();
    enc["use"] = json!("enc");
    enc["kid"] = json!("rsa-enc");
    s.put(
        "issuer-shaped",
        json!({"keys": [keycloak, enc]}).to_string(),
    );

    let mut ps = rsa.clone();
    ps["alg"] = json!("PS512");
    let mut key_ops = ec.clone();
    key_ops["key_ops"] = json!(["sign"]);
    let mut verify_ops = ed.clone();
    verify_ops["key_ops"] = json!(["verify"]);
    s.put(
        "alg-and-key-ops",
        json!({"keys": [ps, key_ops, verify_ops]}).to_string(),
    );

    // Unusable keys next to one good key.
    let (n1024, e1024) = weak_n_e();
    let weak = json!({"kty":"RSA","kid":"weak","n": b64(&n1024),"e": b64(&e1024)});
    let e3 = json!({"kty":"RSA","kid":"e3","n": b64(&c.n),"e": b64([3])});
    let mut padded = rsa.clone();
    padded["n"] = json!(format!("{}==", b64(&c.n)));
    padded["kid"] = json!("padded");
    let mut zeros = rsa.clone();
    zeros["n"] = json!(b64([&[0u8, 0][..], &c.n].concat()));
    zeros["e"] = json!(b64([0u8, 1, 0, 1]));
    zeros["kid"] = json!("leading-zeros");
    let mut off_curve = ec.clone();
    off_curve["y"] = json!(b64([1u8; 32]));
    let mut short_x = ec.clone();
    short_x["x"] = json!(b64([1u8; 31]));
    let mut wrong_alg = ec.clone();
    wrong_alg["alg"] = json!("ES384");
    let p384 = ES384KeyPair::from_bytes(&[7u8; 48]).unwrap();
    let pt = p384.public_key().public_key().to_bytes_uncompressed();
    let p384_jwk =
        json!({"kty":"EC","crv":"P-384","kid":"ec-384","x": b64(&pt[1..49]),"y": b64(&pt[49..97])});
    let oct = json!({"kty":"oct","kid":"hs","k": b64(b"secret"),"alg":"HS256"});
    let mixed = json!({"keys": [weak, e3, padded, zeros, off_curve, short_x, wrong_alg, p384_jwk,
        oct, {"kty":"OKP","crv":"X25519","x": b64([9u8; 32])}, {"kty":"OKP","crv":"Ed25519","x":"AAAA"},
        {"kty":"RSA"}, {"kty": 5}, {"kid":"no-kty"}, "a string", null, [], ed]});
    s.put("mixed-unusable", mixed.to_string());
    s.put(
        "only-unusable",
        json!({"keys": [{"kty":"oct","k":"AAAA"}, {"kty":"RSA","n":"AQAB","e":"AQAB"}]})
            .to_string(),
    );
    let many: Vec<Value> = (0..70)
        .map(|i| {
            let mut e = ed.clone();
            e["kid"] = json!(format!("ed-{i}"));
            e
        })
        .collect();
    s.put("seventy-keys", json!({ "keys": many }).to_string());
    s.put("empty-keys", r#"{"keys":[]}"#);
    s.put("keys-not-list", r#"{"keys":{"kty":"RSA"}}"#);
    s.put("not-object", "[]");
    s.put("not-json", "<html>502 Bad Gateway</html>");
    s.put(
        "duplicate-keys",
        format!(r#"{{"keys":[],"keys":{}}}"#, jwks["keys"]),
    );
    s.put(
        "deep",
        format!(r#"{{"keys":[{}{}]}}"#, "[".repeat(150), "]".repeat(150)),
    );

    // Shared fetch records (`FetchRecord::encode`), as other VMs write them.
    let body = jwks.to_string();
    s.put(
        "record-ok",
        format!("v1 1700000000000 1700000000100 1700000000100 0 0 ok\n{body}"),
    );
    s.put(
        "record-timeout",
        format!("v1 1700000000000 1700000005000 1699990000000 3 1700000007000 timeout\n{body}"),
    );
    s.put(
        "record-in-flight",
        "v1 1700000009000 1700000000000 0 0 0 ok\n",
    );
    s.put(
        "record-unavailable-empty",
        "v1 0 0 0 4294967295 18446744073709551615 unavailable\n",
    );
    s.put("record-overflow", "v1 18446744073709551616 0 0 0 0 ok\n{}");
    s.put("record-extra-field", "v1 1 2 3 4 5 ok extra\n");
    s.put("record-bad-version", "v2 1 2 3 4 5 ok\n");
    s.put("record-no-newline", "v1 1 2 3 4 5 ok");
    s.put("record-garbage-body", b"v1 1 2 3 4 5 ok\n\x00\xff{\"keys\"");
    println!("jwks: {} seeds", s.count);
}

/// `n` and `e` of the weak 1024-bit fixture key (PKCS#1 DER, read by hand:
/// jwt-simple refuses to load it).
fn weak_n_e() -> (Vec<u8>, Vec<u8>) {
    use base64::engine::general_purpose::STANDARD;
    let pem = include_str!("../../src/testdata/rsa1024.pem");
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = STANDARD.decode(body).unwrap();
    fn read<'a>(der: &mut &'a [u8]) -> &'a [u8] {
        let (len, header) = match der[1] {
            l if l < 0x80 => (usize::from(l), 2),
            0x81 => (usize::from(der[2]), 3),
            _ => ((usize::from(der[2]) << 8) | usize::from(der[3]), 4),
        };
        let v = &der[header..header + len];
        *der = &der[header + len..];
        v
    }
    let mut outer = der.as_slice();
    let mut seq = read(&mut outer);
    let _version = read(&mut seq);
    let strip = |x: &[u8]| x[x.iter().position(|&b| b != 0).unwrap()..].to_vec();
    let n = strip(read(&mut seq));
    let e = strip(read(&mut seq));
    (n, e)
}

fn config_seeds(root: &Path) {
    let mut s = Seeds::new(root, "config");
    // The examples of README.md.
    s.put(
        "readme-jwt",
        r#"{"auth": {"provider_type": "oauth2_token",
          "config": {"audience": "llama-stack", "issuer": "https://idp.example",
                     "claims_mapping": {"sub": "roles", "groups": "teams", "scope": "scopes"},
                     "clock_skew_seconds": 60,
                     "jwks": {"uri": "https://idp.example/jwks", "cluster": "idp",
                              "cache_ttl": 3600, "timeout_ms": 5000, "token": null}}}}"#,
    );
    s.put(
        "readme-route-scopes",
        r#"{"auth": {"provider_config": {"type": "oauth2_token", "jwks": {"uri": "https://idp.example/jwks"}}},
 "route_scopes": [
   {"path": "/v1/telemetry/traces/{trace_id}", "methods": ["GET"], "required_scope": "telemetry.read"},
   {"path": "/v1/telemetry/traces", "required_scope": "telemetry.read"},
   {"path_prefix": "/v1/admin/", "required_scope": "admin"},
   {"path_prefix": "/v1/models/", "methods": ["POST", "DELETE"],
    "required_attributes": {"roles": ["admin", "ml-eng"], "teams": ["ml-team"]}}
 ]}"#,
    );
    s.put(
        "readme-quota",
        r#"{"quota": {"authenticated_max_requests": 1000, "anonymous_max_requests": 100,
           "period": "day", "headers": true}}"#,
    );
    for (kind, name) in ["jwt", "introspection", "custom", "no-auth"]
        .iter()
        .enumerate()
    {
        s.put(&format!("fixture-{name}"), t::fixture_config(kind as u8));
    }

    s.put(
        "everything",
        r#"{"log_level": "debug", "public_paths": ["/v1/health", "/static/*", "/"],
 "forward": {"principal_header": "X-User", "attributes_header": "x-attrs", "strip_authorization": true},
 "auth": {"provider_type": "oauth2_token", "config": {"audience": ["a", "b"], "verify_tls": false,
   "tls_cafile": "/etc/ca.pem", "clock_skew_seconds": 86400,
   "jwks": {"uri": "http://[::1]:8080/certs?x=1", "key_recheck_period": 60, "refresh_cooldown_seconds": 0,
            "max_stale_seconds": 0, "timeout_ms": 600000, "token": "s3cret"}}},
 "route_scopes": [{"path": "/v1/{a}/x/{b}", "methods": ["get", "PoSt", "GET"], "required_scope": "x",
                   "required_attributes": {"teams": ["t"]}}],
 "quota": {"authenticated_max_requests": 0, "anonymous_max_requests": 18446744073709551615, "period": "minute", "headers": false}}"#,
    );
    s.put("empty", "");
    s.put("whitespace", " \n\t ");
    s.put("empty-object", "{}");
    s.put("nulls", r#"{"auth": null, "public_paths": null, "route_scopes": null, "quota": null, "forward": null, "log_level": null}"#);
    // Refused ones, each naming a key.
    s.put(
        "unknown-key",
        r#"{"auth": {"provider_type": "oauth2_token", "config": {"jwks": {"urii": "x"}}}}"#,
    );
    s.put(
        "both-forms",
        r#"{"auth": {"provider_config": {"type": "custom"}, "provider_type": "custom"}}"#,
    );
    s.put("both-sources", r#"{"auth": {"provider_type": "oauth2_token", "config": {"jwks": {"uri": "http://a/j"}, "introspection": {"url": "http://a/i"}}}}"#);
    s.put("rule-on-public", r#"{"auth": {"provider_type": "custom", "config": {"endpoint": "http://a/v"}}, "public_paths": ["/v1/*"], "route_scopes": [{"path_prefix": "/v1/x", "required_scope": "s"}]}"#);
    s.put("rule-bad-template", r#"{"auth": {"provider_type": "custom", "config": {"endpoint": "http://a/v"}}, "route_scopes": [{"path": "/v1/{a}/{a}/{b:path}/{", "required_scope": "s"}]}"#);
    s.put(
        "rules-without-auth",
        r#"{"route_scopes": [{"path": "/x", "required_scope": "s"}]}"#,
    );
    s.put(
        "public-not-normal",
        r#"{"public_paths": ["/a/../b", "/%61", "/a//b", "/a/*/b", "x"]}"#,
    );
    s.put("numbers", r#"{"quota": {"authenticated_max_requests": -1, "anonymous_max_requests": 1.5e300, "period": "week"}}"#);
    s.put("bad-url", r#"{"auth": {"provider_type": "oauth2_token", "config": {"jwks": {"uri": "https://user@/p#frag"}}}}"#);
    s.put(
        "bad-header",
        r#"{"forward": {"principal_header": "Authorization"}}"#,
    );
    s.put(
        "duplicate-key",
        r#"{"log_level": "info", "log_level": "off"}"#,
    );
    s.put("not-object", "[1, 2]");
    s.put("truncated", r#"{"auth": {"provider_type": "#);
    s.put("non-utf8", b"{\"log_level\": \"\xff\"}");
    s.put("deep", format!("{}{}", "[".repeat(200), "]".repeat(200)));
    println!("config: {} seeds", s.count);
}

fn provider_seeds(root: &Path) {
    let mut s = Seeds::new(root, "provider_answers");
    // status, body, token, raw path, then header name/value pairs.
    let req: &[&[u8]] = &[
        b"tok en&=+%",
        b"/v1/models/%7Bid%7D?limit=10&limit=20&q=a+b%20c&empty=&flag&%ZZ=1",
        b"Content-Type",
        b"application/json",
        b"X-Multi",
        b"a",
        b"x-multi",
        b"b\xff\xfe",
        b"authorization",
        b"Bearer secret",
        b":path",
        b"/v1/models",
    ];
    let mut put = |name: &str, status: &str, body: &str| {
        let mut parts: Vec<&[u8]> = vec![status.as_bytes(), body.as_bytes()];
        parts.extend_from_slice(req);
        s.put(name, fields(&parts));
    };
    // Llama Stack's custom endpoint answers (AuthResponse).
    put(
        "custom-ok",
        "200",
        r#"{"principal": "alice", "attributes": {"roles": ["admin"], "teams": ["ml-team"], "scopes": "telemetry.read"}, "message": "ok"}"#,
    );
    put(
        "custom-access-attributes",
        "200",
        r#"{"principal": "bob", "access_attributes": {"roles": ["user"]}}"#,
    );
    put(
        "custom-both-attributes",
        "200",
        r#"{"principal": "bob", "attributes": {}, "access_attributes": {}}"#,
    );
    put(
        "custom-no-attributes",
        "200",
        r#"{"principal": "carol", "attributes": null}"#,
    );
    put(
        "custom-bad-attributes",
        "200",
        r#"{"principal": "carol", "attributes": {"roles": [1, {"x": 2}]}}"#,
    );
    put(
        "custom-empty-principal",
        "200",
        r#"{"principal": "", "message": 5}"#,
    );
    put(
        "custom-principal-control",
        "200",
        r#"{"principal": "alice\r\nx-auth-principal: root", "attributes": {"roles\u0000": ["x"]}}"#,
    );
    put("custom-401", "401", r#"{"detail": "Invalid API key"}"#);
    put("custom-403", "403", "");
    // RFC 7662 introspection answers.
    put(
        "introspection-active",
        "200",
        &format!(
            r#"{{"active": true, "sub": "alice", "username": "alice", "scope": "models:read telemetry.read", "client_id": "cli", "exp": {}, "iat": {}, "groups": ["ml-team"], "realm_access": {{"roles": ["admin"]}}}}"#,
            NOW + 600,
            NOW - 60
        ),
    );
    put(
        "introspection-username-only",
        "200",
        r#"{"active": true, "username": "svc", "exp": null}"#,
    );
    put("introspection-inactive", "200", r#"{"active": false}"#);
    put(
        "introspection-active-string",
        "200",
        r#"{"active": "true", "sub": "alice"}"#,
    );
    put(
        "introspection-expired",
        "200",
        &format!(
            r#"{{"active": true, "sub": "alice", "exp": {}}}"#,
            NOW - 3600
        ),
    );
    put(
        "introspection-exp-float",
        "200",
        r#"{"active": true, "sub": "alice", "exp": 1.7e9}"#,
    );
    put(
        "introspection-exp-max",
        "200",
        r#"{"active": true, "sub": "alice", "exp": 18446744073709551615}"#,
    );
    put(
        "introspection-duplicate",
        "200",
        r#"{"active": false, "active": true, "sub": "alice"}"#,
    );
    put(
        "introspection-sub-space",
        "200",
        r#"{"active": true, "sub": "alice "}"#,
    );
    put("unavailable-500", "500", "upstream connect error");
    put("unavailable-503", "503", "");
    put("redirect", "302", "");
    put("status-0", "0", "");
    put("status-max", "65535", "{}");
    put("timeout", "timeout", "");
    put("no-answer", "none", "");
    put("array", "200", "[]");
    put("not-json", "200", "<html>");
    put(
        "deep",
        "200",
        &format!("{}{}", "[".repeat(200), "]".repeat(200)),
    );
    println!("provider_answers: {} seeds", s.count);
}

fn route_seeds(root: &Path) {
    let mut s = Seeds::new(root, "route");
    let cases: &[(&str, &[&[u8]])] = &[
        (
            "trace-get-scoped",
            &[
                b"GET",
                b"/v1/telemetry/traces/abc",
                b"scopes=telemetry.read",
            ],
        ),
        (
            "trace-get-unscoped",
            &[b"get", b"/v1/telemetry/traces/abc?x=1", b"scopes=other"],
        ),
        (
            "trace-list-trailing-slash",
            &[b"GET", b"/v1/telemetry/traces/", b""],
        ),
        (
            "admin-dot-segments",
            &[b"POST", b"/v1/models/../admin/./users", b"scopes=admin"],
        ),
        (
            "admin-escaped",
            &[
                b"DELETE",
                b"/v1/%61dmin/x",
                b"roles=admin",
                b"teams=ml-team",
            ],
        ),
        ("admin-escaped-dots", &[b"GET", b"/v1/x/%2e%2E/admin/", b""]),
        ("double-encoded", &[b"GET", b"/v1/%252e%252e/admin", b""]),
        ("encoded-slash", &[b"GET", b"/v1/admin%2Fx", b""]),
        ("encoded-backslash", &[b"GET", b"/v1/admin%5cx", b""]),
        ("backslash", &[b"GET", b"/v1\\admin", b""]),
        ("above-root", &[b"GET", b"/../v1/admin", b""]),
        ("dotdot-after-empty", &[b"GET", b"/v1/a//../admin", b""]),
        (
            "merge-slashes",
            &[
                b"PUT",
                b"//v1///models//m1/",
                b"roles=ml-eng",
                b"teams=ml-team",
            ],
        ),
        (
            "models-post",
            &[
                b"POST",
                b"/v1/models/llama",
                b"roles=admin",
                b"teams=ml-team",
            ],
        ),
        (
            "models-post-no-team",
            &[b"POST", b"/v1/models/llama", b"roles=admin"],
        ),
        ("control-raw", &[b"GET", b"/v1/a\x00b", b""]),
        ("control-encoded", &[b"GET", b"/v1/a%0ab%7F", b""]),
        ("bad-escape", &[b"GET", b"/v1/%G1/%4", b""]),
        ("non-ascii", &[b"GET", "/v1/caf\u{e9}".as_bytes(), b""]),
        ("upper-hex", &[b"GET", b"/v1/caf%c3%a9/%7e", b""]),
        ("not-absolute", &[b"GET", b"v1/admin", b""]),
        ("asterisk", &[b"OPTIONS", b"*", b""]),
        ("absolute-url", &[b"GET", b"http://h/v1/admin", b""]),
        ("fragment", &[b"GET", b"/v1/admin#frag/../..", b""]),
        ("query-dots", &[b"GET", b"/v1/health?/../admin", b""]),
        ("root-dot", &[b"GET", b"/.", b""]),
        (
            "trailing-dotdot",
            &[b"GET", b"/v1/admin/x/..", b"scopes=admin"],
        ),
        (
            "template-empty-segment",
            &[b"GET", b"/v1/telemetry/traces//", b"scopes=telemetry.read"],
        ),
        (
            "odd-method",
            &[
                b"M-SEARCH",
                b"/v1/admin/",
                b"scopes=admin admin2",
                b"=empty",
                b"noequals",
            ],
        ),
    ];
    for (name, parts) in cases {
        s.put(name, fields(parts));
    }
    s.put(
        "long",
        format!("GET\u{ff}/{}", "a/".repeat(4100)).into_bytes(),
    );
    println!("route: {} seeds", s.count);
}

fn decision_seeds(root: &Path, es256: &str, eddsa: &str) {
    let mut s = Seeds::new(root, "decision");
    let bearer_es = format!("Bearer {es256}");
    let unknown_kid = format!("Bearer {}", t::TOKEN_UNKNOWN_KID);
    let bearer_ed = format!("bearer  {eddsa} ");
    let custom_ok: &[u8] =
        br#"{"principal": "alice", "attributes": {"roles": ["admin"], "teams": ["ml-team"], "scopes": ["telemetry.read", "admin"]}}"#;
    let intro_ok = format!(
        r#"{{"active": true, "sub": "alice", "scope": "telemetry.read admin", "groups": ["ml-team"], "exp": {}}}"#,
        NOW + 600
    );
    // Control bytes: see `decision` in targets.rs.
    type Case<'a> = (&'a str, [u8; 2], Vec<&'a [u8]>);
    let cases: Vec<Case> = vec![
        (
            "jwt-ok",
            [0x04 | 0x08, 0x08],
            vec![
                b"GET",
                b"/v1/models",
                bearer_es.as_bytes(),
                b"10.0.0.1",
                b"",
                b"",
            ],
        ),
        (
            "jwt-ok-repeat-quota",
            [0x04, 0x18 | 0x20],
            vec![
                b"GET",
                b"/v1/telemetry/traces/t1",
                bearer_ed.as_bytes(),
                b"",
                b"",
                b"",
            ],
        ),
        (
            "jwt-admin-scope",
            [0x04, 0x00],
            vec![
                b"DELETE",
                b"/v1/admin/../admin/users",
                bearer_es.as_bytes(),
                b"",
                b"",
                b"",
            ],
        ),
        (
            "jwt-missing",
            [0x08, 0x00],
            vec![b"GET", b"/v1/models", b"", b"192.0.2.1", b"", b""],
        ),
        (
            "jwt-basic",
            [0x04, 0x00],
            vec![b"GET", b"/v1/models", b"Basic YWxpY2U6cHc=", b"", b"", b""],
        ),
        (
            "jwt-garbage-token",
            [0x04, 0x00],
            vec![b"GET", b"/v1/models", b"Bearer a.b.c", b"", b"", b""],
        ),
        (
            "jwt-unknown-kid",
            [0x04, 0x08 | 0x80],
            vec![b"GET", b"/v1/models", unknown_kid.as_bytes(), b"", b"", b""],
        ),
        (
            "jwt-forbidden-attributes",
            [0x04, 0x00],
            vec![
                b"POST",
                b"/v1/models/llama",
                bearer_es.as_bytes(),
                b"",
                b"",
                b"",
            ],
        ),
        (
            "jwt-forbidden-scope",
            [0x04, 0x00],
            vec![
                b"GET",
                b"/v1/acme/secrets/db",
                bearer_ed.as_bytes(),
                b"",
                b"",
                b"",
            ],
        ),
        (
            "jwt-non-utf8-token",
            [0x04, 0x00],
            vec![b"GET", b"/v1/models", b"Bearer \xfe\xfd", b"", b"", b""],
        ),
        (
            "public-health",
            [0x08, 0x08],
            vec![b"GET", b"/v1/health?probe=1", b"", b"2001:db8::1", b"", b""],
        ),
        (
            "public-static-escaped",
            [0x08, 0x18],
            vec![b"GET", b"/static/%61/../b", b"", b"10.0.0.2", b"", b""],
        ),
        (
            "bad-path",
            [0x04, 0x00],
            vec![b"GET", b"/v1/%2F", bearer_es.as_bytes(), b"", b"", b""],
        ),
        (
            "quota-garbage-value",
            [0x04 | 0x08, 0x00],
            vec![
                b"GET",
                b"/v1/models",
                bearer_es.as_bytes(),
                b"10.0.0.1",
                b"",
                b"99999999999999999999 x",
            ],
        ),
        (
            "quota-future-window",
            [0x04 | 0x08, 0x00],
            vec![
                b"GET",
                b"/v1/models",
                bearer_es.as_bytes(),
                b"10.0.0.1",
                b"",
                b"1700000040 2",
            ],
        ),
        (
            "quota-store-fails-get",
            [0x04, 0x05],
            vec![b"GET", b"/v1/models", bearer_es.as_bytes(), b"", b"", b""],
        ),
        (
            "quota-store-fails-set",
            [0x04, 0x06],
            vec![b"GET", b"/v1/models", bearer_es.as_bytes(), b"", b"", b""],
        ),
        (
            "quota-store-contended",
            [0x04, 0x07],
            vec![b"GET", b"/v1/models", bearer_es.as_bytes(), b"", b"", b""],
        ),
        (
            "introspection-ok",
            [0x01 | 0x04, 0x18],
            vec![
                b"GET",
                b"/v1/admin/x",
                b"Bearer opaque-token",
                b"",
                intro_ok.as_bytes(),
                b"",
            ],
        ),
        (
            "introspection-inactive",
            [0x01 | 0x04, 0x08],
            vec![
                b"GET",
                b"/v1/models",
                b"Bearer opaque",
                b"",
                br#"{"active": false}"#,
                b"",
            ],
        ),
        (
            "introspection-timeout",
            [0x01 | 0x04 | 0xF0, 0x00],
            vec![b"GET", b"/v1/models", b"Bearer opaque", b"", b"", b""],
        ),
        (
            "custom-ok",
            [0x02 | 0x04, 0x18],
            vec![
                b"POST",
                b"/v1/models/m?limit=1&limit=2",
                b"Bearer key-123",
                b"",
                custom_ok,
                b"",
                b"Content-Type",
                b"application/json",
                b"X-Custom",
                b"\xff\x80",
            ],
        ),
        (
            "custom-401",
            [0x02 | 0x04 | 0x80, 0x08],
            vec![
                b"GET",
                b"/v1/models",
                b"Bearer bad-key",
                b"",
                br#"{"detail": "nope"}"#,
                b"",
            ],
        ),
        (
            "introspection-401",
            [0x01 | 0x04 | 0x80, 0x00],
            vec![
                b"GET",
                b"/v1/models",
                b"Bearer opaque",
                b"",
                br#"{"error": "invalid_client"}"#,
                b"",
            ],
        ),
        (
            "custom-no-answer-then-day",
            [0x02 | 0x04 | 0xE0, 0x08 | 0xC0],
            vec![b"GET", b"/v1/models", b"Bearer k", b"", b"", b""],
        ),
        (
            "custom-unsafe",
            [0x02 | 0x04, 0x00],
            vec![
                b"GET",
                b"/v1/models",
                b"Bearer k",
                b"",
                br#"{"principal": "a\nb"}"#,
                b"",
            ],
        ),
    ];
    for (name, ctl, parts) in cases {
        let mut bytes = ctl.to_vec();
        bytes.extend(fields(&parts));
        s.put(name, bytes);
    }
    println!("decision: {} seeds", s.count);
}
