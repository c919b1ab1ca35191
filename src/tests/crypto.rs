//! Token verification with real keys and real signatures: good tokens per
//! algorithm, key selection, signatures, claims, and `crate::rsa` against
//! ring.

use super::fixtures::*;
use crate::jwt::{self, Rules, TokenError};
use crate::key_set::{JwksError, KeySet};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jwt_simple::prelude::*;
use serde_json::{json, Value};

// ---------------------------------------------------------------------------
// Good tokens, one per algorithm

#[test]
fn rs256_token_verifies() {
    let (h, _, _) = parts(rs256_token());
    assert_eq!(
        decode_json(&h),
        json!({"alg": "RS256", "typ": "JWT", "kid": "rsa-1"})
    );
    assert_alice(&verify(rs256_token()).unwrap());
}

#[test]
fn ps256_token_verifies() {
    assert_eq!(decode_json(&parts(ps256_token()).0)["alg"], "PS256");
    assert_alice(&verify(ps256_token()).unwrap());
}

/// PS384 and PS512 (and RS384/RS512) with the same key, natively only: RSA
/// signing is slow in an unoptimised wasm build.
#[cfg(not(target_arch = "wasm32"))]
#[test]
fn every_rsa_digest_verifies() {
    let tokens = [
        (
            "RS384",
            RS384KeyPair::from_pem(RSA_PEM)
                .unwrap()
                .with_key_id("rsa-1")
                .sign(claims()),
        ),
        (
            "RS512",
            RS512KeyPair::from_pem(RSA_PEM)
                .unwrap()
                .with_key_id("rsa-1")
                .sign(claims()),
        ),
        (
            "PS384",
            PS384KeyPair::from_pem(RSA_PEM)
                .unwrap()
                .with_key_id("rsa-1")
                .sign(claims()),
        ),
        (
            "PS512",
            PS512KeyPair::from_pem(RSA_PEM)
                .unwrap()
                .with_key_id("rsa-1")
                .sign(claims()),
        ),
    ];
    for (alg, token) in tokens {
        let token = token.unwrap();
        assert_eq!(decode_json(&parts(&token).0)["alg"], alg);
        assert_alice(&verify(&token).unwrap());
        assert_eq!(
            verify(&tamper_signature(&token)).unwrap_err(),
            TokenError::BadSignature,
            "{alg}"
        );
    }
}

/// The token with the last signature byte changed.
fn tamper_signature(token: &str) -> String {
    let (signed, sig) = token.rsplit_once('.').unwrap();
    let mut sig = URL_SAFE_NO_PAD.decode(sig).unwrap();
    *sig.last_mut().unwrap() ^= 1;
    format!("{signed}.{}", b64(sig))
}

#[test]
fn ec_coordinates_must_both_have_the_curves_length() {
    let point = ec_point();
    let (x, y) = (&point[1..33], &point[33..65]);
    let jwk = |x: &[u8], y: &[u8]| json!({"kty": "EC", "crv": "P-256", "kid": "ec-1", "x": b64(x), "y": b64(y)});
    let parse = |x: &[u8], y: &[u8]| {
        KeySet::parse(json!({"keys": [jwk(x, y)]}).to_string().as_bytes()).unwrap()
    };
    assert_eq!(parse(x, y).keys.len(), 1);
    for (x, y) in [(&x[1..], y), (x, &y[1..]), (&x[1..], &y[1..])] {
        assert!(
            parse(x, y).keys.is_empty(),
            "x {} bytes, y {} bytes",
            x.len(),
            y.len()
        );
    }
}

#[test]
fn es256_token_verifies() {
    let token = es256(claims());
    assert_eq!(decode_json(&parts(&token).0)["kid"], "ec-1");
    assert_alice(&verify(&token).unwrap());
}

#[test]
fn es384_token_verifies_and_its_tampered_twin_does_not() {
    let kp = ES384KeyPair::generate().with_key_id("ec384-1");
    let point = kp.public_key().public_key().to_bytes_uncompressed();
    assert_eq!((point.len(), point[0]), (97, 4));
    let jwk = json!({"kty": "EC", "crv": "P-384", "kid": "ec384-1",
                     "x": b64(&point[1..49]), "y": b64(&point[49..97])});
    let set = key_set(vec![jwk]);
    let token = kp.sign(claims()).unwrap();
    assert_alice(&jwt::verify(&token, &set, &rules(), NOW).unwrap());
    let check = |t: &str| jwt::verify(t, &set, &rules(), NOW).map(|_| ());
    assert_eq!(
        check(&tamper_signature(&token)),
        Err(TokenError::BadSignature)
    );
    // A P-256 signature under a P-384 key's kid: the wrong length.
    let (signed, _) = token.rsplit_once('.').unwrap();
    let es256_token = es256(claims());
    let (_, p256_sig) = es256_token.rsplit_once('.').unwrap();
    assert_eq!(
        check(&format!("{signed}.{p256_sig}")),
        Err(TokenError::BadSignature)
    );
}

#[test]
fn eddsa_token_verifies() {
    let token = eddsa(claims());
    assert_eq!(decode_json(&parts(&token).0)["alg"], "EdDSA");
    assert_alice(&verify(&token).unwrap());
}

#[test]
fn access_token_typ_is_accepted() {
    // RFC 9068 access tokens are typed `at+jwt`.
    let options = HeaderOptions {
        signature_type: Some("at+jwt".into()),
        ..Default::default()
    };
    let token = keys().es256.sign_with_options(claims(), &options).unwrap();
    assert_eq!(decode_json(&parts(&token).0)["typ"], "at+jwt");
    assert_alice(&verify(&token).unwrap());
}

#[test]
fn typ_is_informational_for_every_algorithm() {
    // As for RSA (and in jwt_authn and PyJWT): any string `typ` verifies;
    // jwt-simple, which checked EC and EdDSA tokens before ring did, refused
    // anything but `JWT`, `*+jwt` and `JOSE`.
    for typ in ["JWT", "at+jwt", "JOSE", "application/custom", ""] {
        let header = format!(r#"{{"alg":"EdDSA","kid":"ed-1","typ":"{typ}"}}"#);
        let v = verify(&eddsa_raw(&header, &good_payload_json())).unwrap();
        assert_eq!(v.identity.principal, "alice", "{typ}");
    }
    let header = r#"{"alg":"EdDSA","kid":"ed-1","typ":7}"#;
    assert_eq!(
        verify(&eddsa_raw(header, &good_payload_json())).unwrap_err(),
        TokenError::Malformed
    );
}

#[test]
fn hand_built_eddsa_token_verifies() {
    // The raw signer used by the malformed-payload tests makes good tokens.
    let token = eddsa_raw(r#"{"alg":"EdDSA","kid":"ed-1"}"#, &good_payload_json());
    let v = verify(&token).unwrap();
    assert_eq!(v.identity.principal, "alice");
    assert_eq!(v.identity.attributes["roles"], ["alice"]);
}

#[test]
fn no_issuer_rule_accepts_any_issuer() {
    let token = es256(claims().with_issuer("https://elsewhere.example"));
    let rules = Rules {
        issuer: None,
        ..rules()
    };
    assert!(jwt::verify(&token, standard_keys(), &rules, NOW).is_ok());
    assert_eq!(verify(&token), Err(TokenError::WrongIssuer));
}

#[test]
fn audience_list_needs_one_allowed_audience() {
    let both = es256(claims().with_audiences(HashSet::from_strings(&["x", AUDIENCE])));
    assert_alice(&verify(&both).unwrap());
    let neither = es256(claims().with_audiences(HashSet::from_strings(&["x", "y"])));
    assert_eq!(verify(&neither), Err(TokenError::WrongAudience));
}

// ---------------------------------------------------------------------------
// Key selection

#[test]
fn token_without_kid_is_tried_against_every_key_of_its_type() {
    // Another P-256 key (a fixed scalar) comes first in the set.
    let other = ES256KeyPair::from_bytes(&[7u8; 32]).unwrap();
    let other_point = other.public_key().public_key().to_bytes_uncompressed();
    let set = key_set(vec![
        ec_jwk("ec-0", &other_point),
        rsa_2048_jwk(None),
        ec_jwk("ec-1", &ec_point()),
    ]);
    let no_kid = ES256KeyPair::from_pem(EC_PEM).unwrap();
    let token = no_kid.sign(claims()).unwrap();
    assert!(decode_json(&parts(&token).0).get("kid").is_none());
    assert_alice(&jwt::verify(&token, &set, &rules(), NOW).unwrap());

    // Signed by a key the standard set lacks: its only EC key is tried and
    // fails.
    let token = other.sign(claims()).unwrap();
    assert!(jwt::verify(&token, &set, &rules(), NOW).is_ok());
    assert_eq!(verify(&token), Err(TokenError::BadSignature));

    // No key of the type at all.
    let rsa_only = key_set(vec![rsa_2048_jwk(None)]);
    let token = no_kid.sign(claims()).unwrap();
    assert_eq!(
        jwt::verify(&token, &rsa_only, &rules(), NOW),
        Err(TokenError::NoKey)
    );
}

#[test]
fn unknown_kid_is_refused() {
    let kp = ES256KeyPair::from_pem(EC_PEM).unwrap().with_key_id("ec-9");
    assert_eq!(
        verify(&kp.sign(claims()).unwrap()),
        Err(TokenError::UnknownKid)
    );
    // A kid of the set, but of another key type: no candidate.
    let kp = ES256KeyPair::from_pem(EC_PEM).unwrap().with_key_id("ed-1");
    assert_eq!(verify(&kp.sign(claims()).unwrap()), Err(TokenError::NoKey));
    // The fixture 1024-bit token names a kid that no usable key carries.
    assert_eq!(verify(RSA_1024_TOKEN.trim()), Err(TokenError::UnknownKid));
}

#[test]
fn rsa_key_restricted_to_rs256_cannot_verify_ps256() {
    let set = key_set(vec![rsa_2048_jwk(Some("RS256"))]);
    assert_eq!(set.keys.len(), 1);
    assert_alice(&jwt::verify(rs256_token(), &set, &rules(), NOW).unwrap());
    assert_eq!(
        jwt::verify(ps256_token(), &set, &rules(), NOW),
        Err(TokenError::NoKey)
    );
    // An alg-less RSA JWK serves every RSA algorithm.
    assert_eq!(
        standard_keys()
            .candidates(crate::alg::Alg::PS512, None)
            .count(),
        1
    );
}

#[test]
fn weak_rsa_key_is_skipped_and_good_key_still_works() {
    // The hand-made DER reader agrees with jwt-simple on the good key.
    let good = keys().rs256.public_key().to_components();
    assert_eq!(pkcs1_n_e(RSA_PEM), (good.n, good.e));
    let weak = weak_rsa_jwk();
    assert!(RS256KeyPair::from_pem(RSA_1024_PEM).is_err());
    let set = key_set(vec![weak.clone(), rsa_2048_jwk(None)]);
    assert!(!set.has_kid("weak"));
    assert!(set.has_kid("rsa-1"));
    assert_alice(&jwt::verify(rs256_token(), &set, &rules(), NOW).unwrap());
    // A token really signed by the weak key is refused.
    assert_eq!(
        jwt::verify(RSA_1024_TOKEN.trim(), &set, &rules(), NOW),
        Err(TokenError::UnknownKid)
    );
    // Without its kid, the good RSA key is tried and fails.
    let (_, p, s) = parts(RSA_1024_TOKEN.trim());
    let no_kid = format!("{}.{p}.{s}", b64(r#"{"alg":"RS256","typ":"JWT"}"#));
    assert_eq!(
        jwt::verify(&no_kid, &set, &rules(), NOW),
        Err(TokenError::BadSignature)
    );
}

#[test]
fn jwks_with_only_unusable_keys_is_an_empty_set() {
    let point = ec_point();
    let mut off_curve = point.clone();
    off_curve[64] ^= 1;
    let mut enc = ec_jwk("ec-enc", &point);
    enc["use"] = json!("enc");
    let mut verify_not_allowed = ec_jwk("ec-ops", &point);
    verify_not_allowed["key_ops"] = json!(["sign"]);
    let mut rsa_es256 = rsa_2048_jwk(Some("ES256"));
    rsa_es256["kid"] = json!("rsa-es256");
    let unusable = vec![
        weak_rsa_jwk(),
        enc,
        verify_not_allowed,
        rsa_es256,
        ec_jwk("ec-off", &off_curve),
        json!({"kty": "oct", "kid": "hmac", "k": b64(b"secret")}),
        json!({"kty": "OKP", "crv": "X25519", "kid": "x", "x": b64([9u8; 32])}),
        json!({"kty": "EC", "crv": "P-521", "kid": "p521", "x": "AA", "y": "AA"}),
        json!("not an object"),
    ];
    let doc = json!({ "keys": unusable }).to_string();
    let set = KeySet::parse(doc.as_bytes()).unwrap();
    assert!(set.keys.is_empty());
    assert_eq!(
        jwt::verify(&eddsa(claims()), &set, &rules(), NOW),
        Err(TokenError::UnknownKid)
    );
    assert!(KeySet::parse(br#"{"keys": []}"#).unwrap().keys.is_empty());
    assert_eq!(
        KeySet::parse(br#"{"kty": "RSA"}"#).unwrap_err(),
        JwksError::NoKeysArray
    );
    assert_eq!(KeySet::parse(b"[1]").unwrap_err(), JwksError::NotJson);
}

#[test]
fn ec_point_off_the_curve_is_skipped() {
    let mut off_curve = ec_point();
    off_curve[64] ^= 1;
    assert!(ES256PublicKey::from_bytes(&off_curve).is_err());
    let set = key_set(vec![
        ec_jwk("ec-off", &off_curve),
        ec_jwk("ec-1", &ec_point()),
    ]);
    assert!(!set.has_kid("ec-off"));
    assert_eq!(set.keys.len(), 1);
    assert_alice(&jwt::verify(&es256(claims()), &set, &rules(), NOW).unwrap());
    let kp = ES256KeyPair::from_pem(EC_PEM)
        .unwrap()
        .with_key_id("ec-off");
    assert_eq!(
        jwt::verify(&kp.sign(claims()).unwrap(), &set, &rules(), NOW),
        Err(TokenError::UnknownKid)
    );
}

// ---------------------------------------------------------------------------
// Signatures

/// The token with its payload swapped for `claims` (re-encoded), signature kept.
fn with_payload(token: &str, claims: &Value) -> String {
    let (h, _, s) = parts(token);
    format!("{h}.{}.{s}", b64(claims.to_string()))
}

/// The token with one byte in the middle of its signature flipped.
fn with_flipped_signature(token: &str) -> String {
    let (h, p, s) = parts(token);
    let mut sig = URL_SAFE_NO_PAD.decode(s).unwrap();
    let i = sig.len() / 2;
    sig[i] ^= 0x01;
    format!("{h}.{p}.{}", b64(sig))
}

#[test]
fn tampered_payload_is_a_bad_signature() {
    for token in [
        rs256_token().to_string(),
        ps256_token().to_string(),
        es256(claims()),
        eddsa(claims()),
    ] {
        let (_, p, _) = parts(&token);
        let mut payload = decode_json(&p);
        payload["sub"] = json!("mallory");
        payload["groups"] = json!(["admins", "root"]);
        let forged = with_payload(&token, &payload);
        assert!(jwt::parse(&forged, &rules(), NOW).is_ok());
        assert_eq!(verify(&forged), Err(TokenError::BadSignature), "{forged}");
    }
}

#[test]
fn tampered_signature_is_a_bad_signature() {
    for token in [
        rs256_token().to_string(),
        ps256_token().to_string(),
        es256(claims()),
        eddsa(claims()),
    ] {
        let forged = with_flipped_signature(&token);
        assert_ne!(forged, token);
        assert_eq!(verify(&forged), Err(TokenError::BadSignature), "{forged}");
    }
    // A truncated signature too.
    let (h, p, s) = parts(&es256(claims()));
    let short = format!("{h}.{p}.{}", &s[..s.len() - 4]);
    assert_eq!(verify(&short), Err(TokenError::BadSignature));
}

#[test]
fn signature_does_not_carry_over_to_another_algorithm() {
    // RS256 signature relabelled PS256 (same key, same kid).
    let (_, p, s) = parts(rs256_token());
    let relabelled = format!("{}.{p}.{s}", b64(r#"{"alg":"PS256","kid":"rsa-1"}"#));
    assert_eq!(verify(&relabelled), Err(TokenError::BadSignature));
}

#[test]
fn alg_none_is_refused() {
    let payload = b64(good_payload_json());
    for alg in ["none", "None", "NONE"] {
        let header = b64(format!(r#"{{"alg":"{alg}","typ":"JWT"}}"#));
        assert_eq!(
            verify(&format!("{header}.{payload}.c2ln")),
            Err(TokenError::UnsupportedAlg),
            "{alg}"
        );
        // The usual unsecured form has an empty signature: refused as
        // malformed before the header is even read.
        assert_eq!(
            verify(&format!("{header}.{payload}.")),
            Err(TokenError::Malformed),
            "{alg}"
        );
    }
}

#[test]
fn hs256_with_the_rsa_public_key_as_secret_is_refused() {
    // The classic key-confusion attack: HMAC keyed with the public key PEM.
    let pem = keys().rs256.public_key().to_pem().unwrap();
    let public = RS256PublicKey::from_pem(&pem).unwrap().to_components();
    assert_eq!(public.n, keys().rs256.public_key().to_components().n);
    for header in [
        r#"{"alg":"HS256","typ":"JWT","kid":"rsa-1"}"#,
        r#"{"alg":"HS256","typ":"JWT"}"#,
    ] {
        let input = format!("{}.{}", b64(header), b64(good_payload_json()));
        let mac = hmac_sha256::HMAC::mac(input.as_bytes(), pem.as_bytes());
        let token = format!("{input}.{}", b64(mac));
        assert_eq!(verify(&token), Err(TokenError::UnsupportedAlg), "{header}");
    }
}

// ---------------------------------------------------------------------------
// Claims (with valid signatures, so only the claims can fail)

#[test]
fn expiry_honours_the_clock_skew_exactly() {
    let token = es256(claims());
    assert!(verify_at(&token, EXP).is_ok());
    assert!(verify_at(&token, EXP + SKEW).is_ok());
    assert_eq!(verify_at(&token, EXP + SKEW + 1), Err(TokenError::Expired));
    assert_eq!(
        verify_at(&token, EXP + 10 * 365 * 86_400),
        Err(TokenError::Expired)
    );
    let rsa = rs256_token();
    assert!(verify_at(rsa, EXP + SKEW).is_ok());
    assert_eq!(verify_at(rsa, EXP + SKEW + 1), Err(TokenError::Expired));
}

#[test]
fn future_nbf_is_not_yet_valid() {
    let nbf = NOW + 600;
    let mut c = claims();
    c.invalid_before = Some(UnixTimeStamp::from_secs(nbf));
    c.issued_at = None;
    let token = eddsa(c);
    assert_eq!(verify(&token), Err(TokenError::NotYetValid));
    assert_eq!(
        verify_at(&token, nbf - SKEW - 1),
        Err(TokenError::NotYetValid)
    );
    assert!(verify_at(&token, nbf - SKEW).is_ok());
    assert!(verify_at(&token, nbf).is_ok());
}

#[test]
fn future_iat_is_refused() {
    let mut c = claims();
    c.issued_at = Some(UnixTimeStamp::from_secs(NOW + SKEW + 1));
    assert_eq!(verify(&es256(c)), Err(TokenError::IssuedInFuture));
}

#[test]
fn wrong_audience_is_refused() {
    assert_eq!(
        verify(&es256(claims().with_audience("someone-else"))),
        Err(TokenError::WrongAudience)
    );
    let mut c = claims();
    c.audiences = None;
    assert_eq!(verify(&eddsa(c)), Err(TokenError::WrongAudience));
}

#[test]
fn wrong_issuer_is_refused() {
    assert_eq!(
        verify(&es256(claims().with_issuer("https://evil.example"))),
        Err(TokenError::WrongIssuer)
    );
    let mut c = claims();
    c.issuer = None;
    assert_eq!(verify(&eddsa(c)), Err(TokenError::WrongIssuer));
}

#[test]
fn missing_exp_is_refused() {
    let mut c = claims();
    c.expires_at = None;
    assert_eq!(verify(&es256(c)), Err(TokenError::MissingExp));
}

#[test]
fn missing_sub_is_refused() {
    let mut c = claims();
    c.subject = None;
    assert_eq!(verify(&es256(c)), Err(TokenError::MissingSub));
    let empty = claims().with_subject("");
    assert_eq!(verify(&eddsa(empty)), Err(TokenError::MissingSub));
}

#[test]
fn duplicate_json_keys_are_malformed() {
    let payload = format!(
        r#"{{"iss":"{ISSUER}","aud":"{AUDIENCE}","sub":"alice","sub":"admin","exp":{EXP}}}"#
    );
    let token = eddsa_raw(r#"{"alg":"EdDSA","kid":"ed-1"}"#, &payload);
    // Validly signed: serde_json alone would take the last `sub`.
    assert_eq!(decode_json(&parts(&token).1)["sub"], "admin");
    assert_eq!(verify(&token), Err(TokenError::Malformed));
    // Nested, and in the header.
    let nested = good_payload_json().replace(
        r#""sub":"alice""#,
        r#""sub":"alice","groups":{"x":1,"x":2}"#,
    );
    let token = eddsa_raw(r#"{"alg":"EdDSA","kid":"ed-1"}"#, &nested);
    assert_eq!(verify(&token), Err(TokenError::Malformed));
    let token = eddsa_raw(
        r#"{"alg":"EdDSA","kid":"ed-1","kid":"ed-1"}"#,
        &good_payload_json(),
    );
    assert_eq!(verify(&token), Err(TokenError::Malformed));
}

#[test]
fn control_characters_in_the_identity_are_refused() {
    let token = es256(claims().with_subject("alice\r\nx-admin: true"));
    assert_eq!(verify(&token), Err(TokenError::UnsafeIdentity));
    // In a mapped attribute (DEL is not whitespace, so it is not split off).
    let mut c = claims();
    c.custom
        .insert("groups".into(), json!(["ops", "ad\u{7f}min"]));
    assert_eq!(verify(&eddsa(c)), Err(TokenError::UnsafeIdentity));
    // In an unmapped claim it does not matter.
    let mut c = claims();
    c.custom.insert("note".into(), json!("a\r\nb"));
    assert_alice(&verify(&eddsa(c)).unwrap());
}

// ---------------------------------------------------------------------------
// RS256/384/512 through `crate::rsa` (prepared moduli), checked against ring

const RSA_WIDE: [(&str, &str, &str); 3] = [
    (
        include_str!("../testdata/rsa2560.pem"),
        include_str!("../testdata/rsa2560_rs256.jwt"),
        "rsa2560",
    ),
    (
        include_str!("../testdata/rsa3072.pem"),
        include_str!("../testdata/rsa3072_rs384.jwt"),
        "rsa3072",
    ),
    (
        include_str!("../testdata/rsa4096.pem"),
        include_str!("../testdata/rsa4096_rs512.jwt"),
        "rsa4096",
    ),
];

fn hash_of(alg: &str) -> crate::rsa::Hash {
    match alg {
        "RS256" => crate::rsa::Hash::Sha256,
        "RS384" => crate::rsa::Hash::Sha384,
        "RS512" => crate::rsa::Hash::Sha512,
        other => panic!("{other}"),
    }
}

/// ring's verdict on a PKCS#1 v1.5 signature (the reference).
fn ring_verdict(alg: &str, n: &[u8], e: &[u8], msg: &[u8], sig: &[u8]) -> bool {
    use ring::signature as s;
    let params = match alg {
        "RS256" => &s::RSA_PKCS1_2048_8192_SHA256,
        "RS384" => &s::RSA_PKCS1_2048_8192_SHA384,
        "RS512" => &s::RSA_PKCS1_2048_8192_SHA512,
        other => panic!("{other}"),
    };
    s::RsaPublicKeyComponents { n, e }
        .verify(params, msg, sig)
        .is_ok()
}

/// (n, e, alg, signed part, signature) of a fixture RSA token.
type RsaFixture = (Vec<u8>, Vec<u8>, String, String, Vec<u8>);

fn rsa_fixtures() -> Vec<RsaFixture> {
    let mut out = Vec::new();
    let c = keys().rs256.public_key().to_components();
    let (h, p, s) = parts(rs256_token());
    out.push((
        c.n,
        c.e,
        "RS256".to_string(),
        format!("{h}.{p}"),
        URL_SAFE_NO_PAD.decode(s).unwrap(),
    ));
    for (pem, token, _) in RSA_WIDE {
        let (n, e) = pkcs1_n_e(pem);
        let (h, p, s) = parts(token.trim());
        let alg = decode_json(&h)["alg"].as_str().unwrap().to_string();
        out.push((
            n,
            e,
            alg,
            format!("{h}.{p}"),
            URL_SAFE_NO_PAD.decode(s).unwrap(),
        ));
    }
    out
}

#[test]
fn wide_rsa_keys_verify_their_tokens_through_the_key_set() {
    for (pem, token, sub) in RSA_WIDE {
        let (n, e) = pkcs1_n_e(pem);
        let kid = format!("rsa-{}", n.len() * 8);
        let set = key_set(vec![rsa_jwk(&kid, &n, &e, None)]);
        let token = token.trim();
        let v = jwt::verify(token, &set, &rules(), NOW).unwrap();
        assert_eq!(v.identity.principal, sub);
        assert_eq!(
            jwt::verify(&with_flipped_signature(token), &set, &rules(), NOW),
            Err(TokenError::BadSignature)
        );
        // Every entry of an alg-less JWK got the prepared modulus.
        assert!(set.keys.iter().all(|k| matches!(
            &k.key,
            crate::key_set::PublicKey::Rsa {
                modulus: Some(_),
                ..
            }
        )));
    }
}

#[test]
fn prepared_modulus_agrees_with_ring() {
    for (n, e, alg, msg, sig) in rsa_fixtures() {
        let m = crate::rsa::Modulus::new(&n, &e).expect("a usable modulus");
        let hash = hash_of(&alg);
        let ours = |msg: &[u8], sig: &[u8]| m.verify(hash, msg, sig);
        let theirs = |msg: &[u8], sig: &[u8]| ring_verdict(&alg, &n, &e, msg, sig);
        assert!(ours(msg.as_bytes(), &sig), "{alg} {} bits", n.len() * 8);
        assert!(theirs(msg.as_bytes(), &sig));
        // Every single-bit flip of the signature, at a spread of positions.
        for i in (0..sig.len()).step_by(7) {
            for bit in [0x01, 0x80] {
                let mut bad = sig.clone();
                bad[i] ^= bit;
                assert_eq!(ours(msg.as_bytes(), &bad), theirs(msg.as_bytes(), &bad));
                assert!(!ours(msg.as_bytes(), &bad));
            }
        }
        // Another message, another digest, other lengths, out-of-range values.
        let mut other = msg.clone().into_bytes();
        other[0] ^= 1;
        assert!(!ours(&other, &sig));
        for wrong in ["RS256", "RS384", "RS512"] {
            if wrong != alg {
                assert!(!m.verify(hash_of(wrong), msg.as_bytes(), &sig));
            }
        }
        let k = n.len();
        let mut longer = vec![0u8];
        longer.extend_from_slice(&sig);
        for bad in [
            Vec::new(),
            sig[1..].to_vec(),
            longer,
            vec![0u8; k],
            {
                let mut one = vec![0u8; k];
                one[k - 1] = 1;
                one
            },
            n.clone(),
            vec![0xff; k],
        ] {
            assert_eq!(ours(msg.as_bytes(), &bad), theirs(msg.as_bytes(), &bad));
            assert!(!ours(msg.as_bytes(), &bad));
        }
        // n - 1 (in range, not a signature).
        let mut n_minus_1 = n.clone();
        n_minus_1[k - 1] -= 1; // n is odd: no borrow
        assert!(!ours(msg.as_bytes(), &n_minus_1));
    }
}

#[test]
fn prepared_modulus_refuses_what_it_does_not_handle() {
    let (n, e) = pkcs1_n_e(RSA_PEM);
    assert!(crate::rsa::Modulus::new(&n, &e).is_some());
    // Another exponent, an even modulus, a leading zero, sizes outside 2048-4096 bits.
    assert!(crate::rsa::Modulus::new(&n, &[3]).is_none());
    let mut even = n.clone();
    *even.last_mut().unwrap() &= 0xfe;
    assert!(crate::rsa::Modulus::new(&even, &e).is_none());
    let mut padded = vec![0u8];
    padded.extend_from_slice(&n);
    assert!(crate::rsa::Modulus::new(&padded, &e).is_none());
    let (weak_n, weak_e) = pkcs1_n_e(RSA_1024_PEM);
    assert!(crate::rsa::Modulus::new(&weak_n, &weak_e).is_none());
    assert!(crate::rsa::Modulus::new(&[0xff; 513], &e).is_none());
    assert!(crate::rsa::Modulus::new(&[], &e).is_none());
}
