//! OAuth 2.0 token introspection (RFC 7662), as Llama Stack's `oauth2_token`
//! provider does it with `introspection` configured: its settings
//! ([`Introspection`], [`IntrospectionConfig`]), its request and its reading of
//! the answer. The types it shares with [`crate::provider::custom`] are
//! [`crate::provider`]'s.
//!
//! A sans-IO core: [`Introspection::request`] says what to send,
//! [`Introspection::interpret`] reads what came back. The glue dispatches the
//! callout (`POST` to `endpoint.path` on `endpoint.cluster`, `:authority`
//! `endpoint.authority`, within `endpoint.timeout_ms`) and reports the outcome
//! as an [`Answer`].
//!
//! The client secret is never logged and never shown by `Debug`.

use crate::claims::{ClaimsMapping, Identity};
use crate::json::{ConfigError, Obj};
use crate::jwt::Verified;
use crate::provider::{
    http_outcome, timeout_ms, upstream_with, Answer, CalloutRequest, ProviderError, ProviderKind,
    Upstream, CREDENTIALS_INTROSPECTION,
};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::{Map, Value};
use std::fmt;

/// `application/x-www-form-urlencoded` serialisation of one name or value
/// (WHATWG URL standard): ASCII alphanumerics and `*-._` are kept, space is
/// `+`, every other byte of the UTF-8 encoding is `%XX` (upper-case hex).
pub fn form_urlencode(s: &str) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(s.len() + s.len() / 2);
    for b in s.bytes() {
        match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'*' | b'-' | b'.' | b'_' => {
                out.push(char::from(b))
            }
            b' ' => out.push('+'),
            _ => {
                let _ = write!(out, "%{b:02X}");
            }
        }
    }
    out
}

/// Client credentials for the introspection endpoint.
#[derive(Clone, PartialEq, Eq)]
struct Credentials {
    client_id: String,
    client_secret: String,
}

/// The `introspection` settings of an `oauth2_token` provider.
#[derive(Clone, PartialEq, Eq)]
pub struct Introspection {
    pub endpoint: Upstream,
    credentials: Option<Credentials>,
    /// Credentials as `client_id`/`client_secret` form fields instead of
    /// HTTP Basic.
    pub send_secret_in_body: bool,
    /// `auth.config.audience` when set: an active answer's `aud` must name
    /// one of them (RFC 7662 §4). None: `aud` is not read.
    pub audiences: Option<Vec<String>>,
}

/// Shows everything but the client secret.
impl fmt::Debug for Introspection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (id, secret) = match &self.credentials {
            Some(c) => (Some(c.client_id.as_str()), Some("<redacted>")),
            None => (None, None),
        };
        f.debug_struct("Introspection")
            .field("endpoint", &self.endpoint)
            .field("client_id", &id)
            .field("client_secret", &secret)
            .field("send_secret_in_body", &self.send_secret_in_body)
            .field("audiences", &self.audiences)
            .finish()
    }
}

/// `oauth2_token` with introspection.
#[derive(Debug, Clone)]
pub struct IntrospectionConfig {
    pub introspection: Introspection,
    pub claims_mapping: ClaimsMapping,
    pub clock_skew_seconds: u64,
    /// Seconds an allowed answer is cached (0: never).
    pub cache_ttl: u64,
    /// Named in the 401 for a request without credentials.
    pub issuer: Option<String>,
}

impl Introspection {
    /// Reads the `introspection` object `o`; errors name
    /// `auth.config.introspection.<key>`. Keys: `url` (required), `cluster`,
    /// `client_id`, `client_secret` (both or neither), `send_secret_in_body`
    /// (default false; needs credentials), `timeout_ms` (default 10000).
    pub fn parse(mut o: Obj) -> Result<Introspection, ConfigError> {
        let url = o
            .nonempty_str("url")?
            .ok_or_else(|| ConfigError::new(o.path("url"), "missing"))?;
        let url_path = o.path("url");
        let cluster = o.nonempty_str("cluster")?.map(str::to_string);
        let timeout = timeout_ms(&mut o)?;
        let endpoint = upstream_with(url, &url_path, cluster, timeout, CREDENTIALS_INTROSPECTION)?;
        let client_id = o.nonempty_str("client_id")?;
        let client_secret = o.nonempty_str("client_secret")?;
        let credentials = match (client_id, client_secret) {
            (Some(id), Some(secret)) => Some(Credentials {
                client_id: id.to_string(),
                client_secret: secret.to_string(),
            }),
            (None, None) => None,
            (Some(_), None) => {
                return Err(ConfigError::new(
                    o.path("client_secret"),
                    "missing: client_id needs client_secret",
                ))
            }
            (None, Some(_)) => {
                return Err(ConfigError::new(
                    o.path("client_id"),
                    "missing: client_secret needs client_id",
                ))
            }
        };
        let send_secret_in_body = o.bool("send_secret_in_body")?.unwrap_or(false);
        if send_secret_in_body && credentials.is_none() {
            return Err(ConfigError::new(
                o.path("send_secret_in_body"),
                "needs client_id and client_secret",
            ));
        }
        o.finish()?;
        Ok(Introspection {
            endpoint,
            credentials,
            send_secret_in_body,
            audiences: None,
        })
    }

    /// The client id, if credentials are configured.
    pub fn client_id(&self) -> Option<&str> {
        self.credentials.as_ref().map(|c| c.client_id.as_str())
    }

    /// The introspection request for `token`: a form `token=<token>`, the
    /// client credentials in HTTP Basic (RFC 6749 §2.3.1: each part
    /// form-encoded first) or, with `send_secret_in_body`, as form fields.
    pub fn request(&self, token: &str) -> CalloutRequest {
        let mut body = format!("token={}", form_urlencode(token));
        let mut headers = vec![
            (
                "content-type".to_string(),
                "application/x-www-form-urlencoded".to_string(),
            ),
            ("accept".to_string(), "application/json".to_string()),
        ];
        if let Some(c) = &self.credentials {
            let id = form_urlencode(&c.client_id);
            let secret = form_urlencode(&c.client_secret);
            if self.send_secret_in_body {
                body.push_str(&format!("&client_id={id}&client_secret={secret}"));
            } else {
                let basic = STANDARD.encode(format!("{id}:{secret}"));
                headers.push(("authorization".to_string(), format!("Basic {basic}")));
            }
        }
        CalloutRequest {
            method: super::Method::Post,
            path: None,
            headers,
            body: body.into_bytes(),
        }
    }

    /// Reads the introspection answer. `skew` seconds of tolerance apply to
    /// `exp`; `now_s` is the current time in seconds. `Verified.exp` is the
    /// answer's `exp`, or `u64::MAX` when it has none.
    pub fn interpret(
        &self,
        answer: Answer,
        mapping: &ClaimsMapping,
        skew: u64,
        now_s: u64,
    ) -> Result<Verified, ProviderError> {
        let (status, body) = http_outcome(answer)?;
        if status != 200 {
            return Err(ProviderError::IntrospectionFailed(status));
        }
        let fields = match crate::json::parse_strict(body) {
            Ok(Value::Object(m)) => m,
            _ => return Err(ProviderError::IntrospectionError),
        };
        if fields.get("active") != Some(&Value::Bool(true)) {
            return Err(ProviderError::NotActive);
        }
        let exp = match fields.get("exp") {
            None | Some(Value::Null) => None,
            Some(v) => Some(v.as_u64().ok_or(ProviderError::IntrospectionError)?),
        };
        if exp.is_some_and(|exp| now_s > exp.saturating_add(skew)) {
            return Err(ProviderError::Expired);
        }
        if let Some(accepted) = &self.audiences {
            if !audience_accepted(fields.get("aud"), accepted)? {
                return Err(ProviderError::WrongAudience);
            }
        }
        let principal = nonempty_str(&fields, "sub")
            .or_else(|| nonempty_str(&fields, "username"))
            .ok_or(ProviderError::IntrospectionError)?;
        let attributes = mapping.apply(&fields);
        let tenant = mapping
            .tenant(&fields)
            .map_err(|_| ProviderError::InvalidTenant)?;
        let identity = Identity::new(principal.to_string(), attributes)
            .map_err(|_| ProviderError::UnsafeIdentity(ProviderKind::Introspection))?
            .with_tenant(tenant);
        Ok(Verified {
            identity,
            exp: exp.unwrap_or(u64::MAX),
        })
    }
}

/// Whether an answer's `aud` (a string or a list of strings; absent names
/// nothing) names one of the `accepted` audiences.
fn audience_accepted(aud: Option<&Value>, accepted: &[String]) -> Result<bool, ProviderError> {
    let named = |s: &str| accepted.iter().any(|a| a == s);
    match aud {
        None | Some(Value::Null) => Ok(false),
        Some(Value::String(s)) => Ok(named(s)),
        Some(Value::Array(items)) => {
            let mut found = false;
            for item in items {
                let s = item.as_str().ok_or(ProviderError::IntrospectionError)?;
                found = found || named(s);
            }
            Ok(found)
        }
        Some(_) => Err(ProviderError::IntrospectionError),
    }
}

fn nonempty_str<'a>(m: &'a Map<String, Value>, key: &str) -> Option<&'a str> {
    match m.get(key) {
        Some(Value::String(s)) if !s.is_empty() => Some(s.as_str()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::DEFAULT_TIMEOUT_MS;
    use serde_json::json;

    fn parse(v: Value) -> Result<Introspection, ConfigError> {
        Introspection::parse(Obj::new(&v, "auth.config.introspection").unwrap())
    }

    fn example() -> Introspection {
        parse(
            json!({"url": "https://idp.example/introspect", "cluster": "idp",
                     "client_id": "gw", "client_secret": "s3cret",
                     "send_secret_in_body": false, "timeout_ms": 10000}),
        )
        .unwrap()
    }

    fn header<'a>(r: &'a CalloutRequest, name: &str) -> Option<&'a str> {
        r.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn ok(body: &str) -> Result<Verified, ProviderError> {
        interpret(200, body)
    }

    fn interpret(status: u16, body: &str) -> Result<Verified, ProviderError> {
        example().interpret(
            Answer::Response {
                status,
                body: body.as_bytes(),
            },
            &ClaimsMapping::llama_stack_default(),
            60,
            1_000_000,
        )
    }

    #[test]
    fn form_encoding() {
        assert_eq!(form_urlencode("a b"), "a+b");
        assert_eq!(form_urlencode("a+b"), "a%2Bb");
        assert_eq!(form_urlencode("a&b=c"), "a%26b%3Dc");
        assert_eq!(form_urlencode("100%"), "100%25");
        assert_eq!(form_urlencode("*-._~!'()/:"), "*-._%7E%21%27%28%29%2F%3A");
        assert_eq!(form_urlencode("zoë €"), "zo%C3%AB+%E2%82%AC");
        assert_eq!(form_urlencode("\n\0"), "%0A%00");
        assert_eq!(form_urlencode(""), "");
        let jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhIn0.c2ln-_Q";
        assert_eq!(form_urlencode(jwt), jwt);
        let all: String = (0u8..128).map(char::from).collect();
        let enc = form_urlencode(&all);
        assert!(enc
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"*-._+%".contains(&b)));
    }

    #[test]
    fn request_with_basic_credentials() {
        let r = example().request("tok en+/=");
        assert_eq!(r.body, b"token=tok+en%2B%2F%3D");
        assert_eq!(
            header(&r, "content-type"),
            Some("application/x-www-form-urlencoded")
        );
        assert_eq!(header(&r, "accept"), Some("application/json"));
        // base64("gw:s3cret")
        assert_eq!(header(&r, "authorization"), Some("Basic Z3c6czNjcmV0"));
        assert_eq!(r.headers.len(), 3);
    }

    #[test]
    fn basic_credentials_are_form_encoded_first() {
        let i = parse(json!({"url": "http://idp/i", "client_id": "gw:x y",
                             "client_secret": "p@ss:w+rd%é"}))
        .unwrap();
        let r = i.request("t");
        let value = header(&r, "authorization").unwrap();
        let decoded = STANDARD
            .decode(value.strip_prefix("Basic ").unwrap())
            .unwrap();
        assert_eq!(
            String::from_utf8(decoded).unwrap(),
            "gw%3Ax+y:p%40ss%3Aw%2Brd%25%C3%A9"
        );
    }

    #[test]
    fn request_with_credentials_in_body() {
        let i = parse(json!({"url": "http://idp/i", "client_id": "gw",
                             "client_secret": "s3 cret&x", "send_secret_in_body": true}))
        .unwrap();
        let r = i.request("abc");
        assert_eq!(
            String::from_utf8(r.body.clone()).unwrap(),
            "token=abc&client_id=gw&client_secret=s3+cret%26x"
        );
        assert_eq!(header(&r, "authorization"), None);
        assert_eq!(r.headers.len(), 2);
    }

    #[test]
    fn request_without_credentials() {
        let i = parse(json!({"url": "http://idp:8080/i"})).unwrap();
        let r = i.request("abc");
        assert_eq!(r.body, b"token=abc");
        assert_eq!(header(&r, "authorization"), None);
        assert_eq!(i.endpoint.cluster, "idp:8080");
        assert_eq!(i.endpoint.timeout_ms, DEFAULT_TIMEOUT_MS);
        assert_eq!(i.client_id(), None);
    }

    #[test]
    fn parses_the_documented_example() {
        let i = example();
        assert_eq!(i.endpoint.cluster, "idp");
        assert_eq!(i.endpoint.authority, "idp.example");
        assert_eq!(i.endpoint.path, "/introspect");
        assert_eq!(i.endpoint.timeout_ms, 10000);
        assert_eq!(i.client_id(), Some("gw"));
        assert!(!i.send_secret_in_body);
    }

    #[test]
    fn secret_is_never_in_debug_output() {
        let i = example();
        let all = format!("{i:?} {i:#?} {:?}", i.request("tok"));
        assert!(!all.contains("s3cret"), "{all}");
        // Nor its base64 form in the Basic header.
        assert!(!all.contains("czNjcmV0"), "{all}");
        assert!(all.contains("<redacted>"));
        assert!(all.contains("gw"));
        let cfg = json!({"url": "http://idp/i", "client_id": "gw", "client_secret": "s3cret",
                         "send_secret_in_body": true});
        let i = parse(cfg).unwrap();
        let all = format!("{i:?} {:?}", i.request("tok"));
        assert!(!all.contains("s3cret"), "{all}");
    }

    #[test]
    fn config_errors_name_the_key() {
        let p = "auth.config.introspection";
        let e = parse(json!({})).unwrap_err();
        assert_eq!(e.key, format!("{p}.url"));
        let e = parse(json!({"url": "ftp://x/i"})).unwrap_err();
        assert_eq!(e.key, format!("{p}.url"));
        let e = parse(json!({"url": "http://x/i", "client_id": "gw"})).unwrap_err();
        assert_eq!(e.key, format!("{p}.client_secret"));
        let e = parse(json!({"url": "http://x/i", "client_secret": "s"})).unwrap_err();
        assert_eq!(e.key, format!("{p}.client_id"));
        assert!(!e.to_string().contains("\"s\""));
        let e =
            parse(json!({"url": "http://x/i", "client_id": "", "client_secret": "s"})).unwrap_err();
        assert_eq!(e.key, format!("{p}.client_id"));
        let e = parse(json!({"url": "http://x/i", "send_secret_in_body": true})).unwrap_err();
        assert_eq!(e.key, format!("{p}.send_secret_in_body"));
        let e = parse(json!({"url": "http://x/i", "send_secret_in_body": "yes"})).unwrap_err();
        assert_eq!(e.key, format!("{p}.send_secret_in_body"));
        let e = parse(json!({"url": "http://x/i", "timeout_ms": 0})).unwrap_err();
        assert_eq!(e.key, format!("{p}.timeout_ms"));
        let e = parse(json!({"url": "http://x/i", "timeout_ms": 600_001})).unwrap_err();
        assert_eq!(e.key, format!("{p}.timeout_ms"));
        let e = parse(json!({"url": "http://x/i", "cluster": 3})).unwrap_err();
        assert_eq!(e.key, format!("{p}.cluster"));
        let e = parse(json!({"url": "http://x/i", "cache_ttl": 30})).unwrap_err();
        assert_eq!(e.key, format!("{p}.cache_ttl"));
        assert_eq!(e.reason, "unknown key");
        let e =
            parse(json!({"url": "http://x/i", "client_id": "gw", "client_secret": 5})).unwrap_err();
        assert_eq!(e.key, format!("{p}.client_secret"));
    }

    #[test]
    fn active_token_gives_identity() {
        let v = ok(r#"{"active": true, "sub": "alice", "username": "al",
                       "scope": "read write", "groups": ["g"], "exp": 1000500}"#)
        .unwrap();
        assert_eq!(v.identity.principal, "alice");
        assert_eq!(v.identity.attributes["scopes"], vec!["read", "write"]);
        assert_eq!(v.identity.attributes["roles"], vec!["alice", "al"]);
        assert_eq!(v.identity.attributes["teams"], vec!["g"]);
        assert_eq!(v.exp, 1000500);
    }

    #[test]
    fn custom_claims_mapping_applies_to_the_answer() {
        let m = json!({"scope": "scopes", "ext.team": "teams"});
        let mapping = ClaimsMapping::parse(Obj::new(&m, "m").unwrap()).unwrap();
        let v = example()
            .interpret(
                Answer::Response {
                    status: 200,
                    body: br#"{"active":true,"sub":"a","scope":"x","ext":{"team":"t"}}"#,
                },
                &mapping,
                0,
                0,
            )
            .unwrap();
        assert_eq!(v.identity.attributes["scopes"], vec!["x"]);
        assert_eq!(v.identity.attributes["teams"], vec!["t"]);
        assert!(!v.identity.attributes.contains_key("roles"));
    }

    #[test]
    fn principal_is_sub_else_username() {
        let v = ok(r#"{"active": true, "username": "bob"}"#).unwrap();
        assert_eq!(v.identity.principal, "bob");
        assert_eq!(v.exp, u64::MAX);
        let v = ok(r#"{"active": true, "sub": "", "username": "bob"}"#).unwrap();
        assert_eq!(v.identity.principal, "bob");
        let v = ok(r#"{"active": true, "sub": 7, "username": "bob"}"#).unwrap();
        assert_eq!(v.identity.principal, "bob");
        assert_eq!(
            ok(r#"{"active": true}"#),
            Err(ProviderError::IntrospectionError)
        );
        assert_eq!(
            ok(r#"{"active": true, "sub": "", "username": ""}"#),
            Err(ProviderError::IntrospectionError)
        );
        assert_eq!(
            ok(r#"{"active": true, "sub": ["a"]}"#),
            Err(ProviderError::IntrospectionError)
        );
    }

    #[test]
    fn inactive_tokens() {
        for body in [
            r#"{"active": false, "sub": "a"}"#,
            r#"{"sub": "a"}"#,
            r#"{"active": "true", "sub": "a"}"#,
            r#"{"active": 1, "sub": "a"}"#,
            r#"{"active": null, "sub": "a"}"#,
            r#"{}"#,
        ] {
            let e = ok(body).unwrap_err();
            assert_eq!(e, ProviderError::NotActive, "{body}");
            assert_eq!(e.to_string(), "Token not active");
            assert_eq!(e.status(), 401);
        }
    }

    #[test]
    fn exp_is_checked_with_skew() {
        // now = 1_000_000, skew = 60.
        let e = ok(r#"{"active": true, "sub": "a", "exp": 999939}"#).unwrap_err();
        assert_eq!(e, ProviderError::Expired);
        assert_eq!(e.to_string(), "Token not active");
        assert_eq!(e.reason(), "expired");
        assert_eq!(e.status(), 401);
        assert_eq!(
            ok(r#"{"active": true, "sub": "a", "exp": 999940}"#)
                .unwrap()
                .exp,
            999940
        );
        assert!(ok(r#"{"active": true, "sub": "a", "exp": 2000000}"#).is_ok());
        assert!(ok(r#"{"active": true, "sub": "a", "exp": null}"#).is_ok());
        for bad in ["1000500.0", "1.5e6", "-1", "\"1000500\"", "true", "{}"] {
            let body = format!(r#"{{"active": true, "sub": "a", "exp": {bad}}}"#);
            assert_eq!(
                ok(&body),
                Err(ProviderError::IntrospectionError),
                "exp {bad}"
            );
        }
        // An inactive token is "not active" whatever its exp.
        assert_eq!(
            ok(r#"{"active": false, "exp": "x"}"#),
            Err(ProviderError::NotActive)
        );
    }

    #[test]
    fn an_explicit_audience_must_be_in_aud() {
        let check = |audiences: Option<Vec<&str>>, aud: &str| {
            let mut i = example();
            i.audiences = audiences.map(|a| a.into_iter().map(str::to_string).collect());
            let body = format!(r#"{{"active": true, "sub": "a"{aud}}}"#);
            i.interpret(
                Answer::Response {
                    status: 200,
                    body: body.as_bytes(),
                },
                &ClaimsMapping::llama_stack_default(),
                0,
                0,
            )
            .map(|v| v.identity.principal)
        };
        let both = || Some(vec!["llama-stack", "api"]);
        for aud in [r#", "aud": "api""#, r#", "aud": ["other", "llama-stack"]"#] {
            assert_eq!(check(both(), aud), Ok("a".into()), "{aud}");
        }
        for aud in [
            "",
            r#", "aud": null"#,
            r#", "aud": "other""#,
            r#", "aud": ["other"]"#,
            r#", "aud": []"#,
            r#", "aud": "llama-stack api""#,
            r#", "aud": "LLAMA-STACK""#,
        ] {
            let e = check(both(), aud).unwrap_err();
            assert_eq!(e, ProviderError::WrongAudience, "{aud}");
            assert_eq!(e.to_string(), "Token audience not accepted");
            assert_eq!((e.status(), e.reason()), (401, "wrong_audience"));
        }
        for aud in [r#", "aud": 5"#, r#", "aud": ["api", 5]"#, r#", "aud": {}"#] {
            assert_eq!(
                check(both(), aud),
                Err(ProviderError::IntrospectionError),
                "{aud}"
            );
        }
        // Unset: `aud` is not read at all (Llama Stack's behaviour).
        for aud in ["", r#", "aud": ["other"]"#, r#", "aud": 5"#] {
            assert_eq!(check(None, aud), Ok("a".into()), "{aud}");
        }
        // An inactive or expired answer says so first.
        let mut i = example();
        i.audiences = Some(vec!["api".into()]);
        let m = ClaimsMapping::llama_stack_default();
        let answer = |body: &'static str| Answer::Response {
            status: 200,
            body: body.as_bytes(),
        };
        assert_eq!(
            i.interpret(answer(r#"{"active": false}"#), &m, 0, 10),
            Err(ProviderError::NotActive)
        );
        assert_eq!(
            i.interpret(
                answer(r#"{"active": true, "sub": "a", "exp": 5}"#),
                &m,
                0,
                10
            ),
            Err(ProviderError::Expired)
        );
    }

    #[test]
    fn unparseable_answers_are_introspection_errors() {
        for body in [
            "",
            "garbage",
            "[]",
            "[{\"active\": true}]",
            "null",
            "\"active\"",
            "{\"active\": true, \"sub\": \"a\"",
            "{\"active\": true, \"sub\": \"a\", \"sub\": \"b\"}",
        ] {
            let e = ok(body).unwrap_err();
            assert_eq!(e, ProviderError::IntrospectionError, "{body:?}");
            assert_eq!(e.to_string(), "Token introspection error");
            assert_eq!(e.status(), 401);
            assert_eq!(e.reason(), "invalid_token");
        }
        let e = example()
            .interpret(
                Answer::Response {
                    status: 200,
                    body: &[0xff, 0xfe],
                },
                &ClaimsMapping::llama_stack_default(),
                0,
                0,
            )
            .unwrap_err();
        assert_eq!(e, ProviderError::IntrospectionError);
    }

    #[test]
    fn http_failures() {
        let e = interpret(404, "not found").unwrap_err();
        assert_eq!(e, ProviderError::IntrospectionFailed(404));
        assert_eq!(e.to_string(), "Token introspection failed: 404");
        assert_eq!(e.status(), 401);
        assert_eq!(
            interpret(401, r#"{"error":"invalid_client"}"#)
                .unwrap_err()
                .to_string(),
            "Token introspection failed: 401"
        );
        assert_eq!(
            interpret(204, "").unwrap_err(),
            ProviderError::IntrospectionFailed(204)
        );
        assert_eq!(
            interpret(499, "").unwrap_err(),
            ProviderError::IntrospectionFailed(499)
        );
        for status in [500, 502, 503, 504, 599] {
            let e = interpret(status, r#"{"active": true, "sub": "a"}"#).unwrap_err();
            assert_eq!(e, ProviderError::Unavailable);
            assert_eq!(e.to_string(), "Authentication service unavailable");
            assert_eq!(e.status(), 503);
            assert_eq!(e.reason(), "auth_unavailable");
        }
        let m = ClaimsMapping::llama_stack_default();
        let e = example().interpret(Answer::NoAnswer, &m, 0, 0).unwrap_err();
        assert_eq!(e, ProviderError::Unavailable);
        let e = example().interpret(Answer::TimedOut, &m, 0, 0).unwrap_err();
        assert_eq!(e, ProviderError::Timeout);
        assert_eq!(e.to_string(), "Authentication service timeout");
        assert_eq!(e.status(), 503);
        assert_eq!(e.reason(), "auth_timeout");
    }

    #[test]
    fn control_characters_are_refused() {
        let e = ok(r#"{"active": true, "sub": "a\r\nx-admin: 1"}"#).unwrap_err();
        assert_eq!(
            e,
            ProviderError::UnsafeIdentity(ProviderKind::Introspection)
        );
        assert_eq!(e.to_string(), "Token introspection error");
        assert_eq!(e.status(), 401);
        let e = ok(r#"{"active": true, "sub": "a", "scope": ["x\u0000"]}"#).unwrap_err();
        assert_eq!(
            e,
            ProviderError::UnsafeIdentity(ProviderKind::Introspection)
        );
    }

    #[test]
    fn messages_are_exact() {
        let cases = [
            (ProviderError::NotActive, 401, "Token not active"),
            (ProviderError::Expired, 401, "Token not active"),
            (
                ProviderError::IntrospectionError,
                401,
                "Token introspection error",
            ),
            (
                ProviderError::IntrospectionFailed(404),
                401,
                "Token introspection failed: 404",
            ),
            (
                ProviderError::AuthFailed(403),
                401,
                "Authentication failed: 403",
            ),
            (
                ProviderError::InvalidResponse,
                401,
                "Invalid authentication response format",
            ),
            (
                ProviderError::Unavailable,
                503,
                "Authentication service unavailable",
            ),
            (
                ProviderError::Timeout,
                503,
                "Authentication service timeout",
            ),
            (
                ProviderError::UnsafeIdentity(ProviderKind::Introspection),
                401,
                "Token introspection error",
            ),
            (
                ProviderError::UnsafeIdentity(ProviderKind::Custom),
                401,
                "Invalid authentication response format",
            ),
            (
                ProviderError::WrongAudience,
                401,
                "Token audience not accepted",
            ),
        ];
        for (e, status, message) in cases {
            assert_eq!(e.status(), status, "{e:?}");
            assert_eq!(e.to_string(), message, "{e:?}");
        }
    }

    #[test]
    fn the_tenant_comes_from_tenant_claim() {
        let mut mapping = ClaimsMapping::llama_stack_default();
        mapping.tenant_claim = Some("org".into());
        let read = |body: &str| {
            example().interpret(
                Answer::Response {
                    status: 200,
                    body: body.as_bytes(),
                },
                &mapping,
                60,
                1_000_000,
            )
        };
        let v = read(r#"{"active": true, "sub": "a", "org": " Acme "}"#).unwrap();
        assert_eq!(v.identity.tenant.as_deref(), Some("acme"));
        let v = read(r#"{"active": true, "sub": "a", "org": 5}"#).unwrap();
        assert_eq!(v.identity.tenant, None);
        assert_eq!(
            read(r#"{"active": true, "sub": "a", "org": "no way"}"#).unwrap_err(),
            ProviderError::InvalidTenant
        );
        assert_eq!(
            ProviderError::InvalidTenant.to_string(),
            crate::claims::TENANT_RULE
        );
    }
}
