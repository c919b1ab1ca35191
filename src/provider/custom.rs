//! The `custom` provider: Llama Stack's custom authentication endpoint.
//!
//! A sans-IO core. [`Custom::request`] builds the JSON Llama Stack sends
//! (`AuthRequest`):
//!
//! ```json
//! {"api_key": "<token>",
//!  "request": {"path": "/v1/models",
//!              "headers": {"content-type": "application/json", ...},
//!              "params": {"limit": ["10"], ...}}}
//! ```
//!
//! - `path` is the request's normalised path (`path::normalize_path`: no
//!   query, dot segments resolved, slashes merged, `;` parameters kept),
//!   percent-decoded like the ASGI `scope["path"]` Llama Stack reads (`+`
//!   stays `+`; bytes that do not form UTF-8 become U+FFFD): see
//!   [`endpoint_path`]. The decision cache keys an answer by exactly this
//!   string, so a cached answer is only reused for the path it was given for.
//! - `headers` holds every request header except `authorization` and the
//!   pseudo-headers, names lower-cased. Values that are not UTF-8 are passed
//!   lossily (U+FFFD for each bad sequence). A repeated header (Llama Stack
//!   builds a dict) is one entry, its values joined with `, ` in order.
//! - `params` is the query as Python's `parse_qs` reads it: split on `&`,
//!   names and values form-decoded (`+` is a space, `%XX` decoded, lossy
//!   UTF-8, malformed `%` kept as is), each name a list of its values in
//!   order; pairs with an empty value or without `=` are left out.
//!
//! [`Custom::interpret`] reads Llama Stack's `AuthResponse`
//! `{"principal": ..., "attributes": {...}, "message": ...}`.

use crate::claims::Attributes;
use crate::claims::Identity;
use crate::json::{ConfigError, Obj};
use crate::provider::{
    http_outcome, timeout_ms, upstream, Answer, CalloutRequest, ProviderError, ProviderKind,
    Upstream,
};
use serde_json::{json, Map, Value};

/// Default seconds an endpoint's answer is reused for the same token.
pub const DEFAULT_CACHE_TTL: u64 = 30;
use super::MAX_CACHE_TTL;
use crate::path::percent_decode;

/// The `custom` provider's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Custom {
    pub endpoint: Upstream,
    /// Seconds an allowed answer is cached (0: never cached).
    pub cache_ttl: u64,
    /// OGX's `tenant_field`: the answer's field holding the tenant id.
    pub tenant_field: Option<String>,
}

impl Custom {
    /// Reads the provider's `config` object `o`: `endpoint` (required),
    /// `cluster`, `timeout_ms` (default 10000), `cache_ttl` (default 30).
    /// Unknown keys are refused.
    pub fn parse(mut o: Obj) -> Result<Custom, ConfigError> {
        let url = o
            .nonempty_str("endpoint")?
            .ok_or_else(|| ConfigError::new(o.path("endpoint"), "missing"))?;
        let url_path = o.path("endpoint");
        let cluster = o.nonempty_str("cluster")?.map(str::to_string);
        let timeout = timeout_ms(&mut o)?;
        let endpoint = upstream(url, &url_path, cluster, timeout)?;
        let cache_ttl = o
            .u64_max("cache_ttl", MAX_CACHE_TTL)?
            .unwrap_or(DEFAULT_CACHE_TTL);
        let tenant_field = o.nonempty_str("tenant_field")?.map(str::to_string);
        o.finish()?;
        Ok(Custom {
            endpoint,
            cache_ttl,
            tenant_field,
        })
    }

    /// The message of the 401 for a request without credentials.
    pub fn missing_message(&self) -> String {
        format!(
            "Authentication required. Please provide your API key as a Bearer token (validated by {})",
            self.endpoint.authority
        )
    }

    /// The endpoint request: `path` is what [`endpoint_path`] gives for the
    /// request, `raw_path` the request's `:path` (read for its query only),
    /// `headers` the request headers as the host gives them.
    pub fn request(
        &self,
        token: &str,
        path: &str,
        raw_path: &str,
        headers: &[(String, Vec<u8>)],
    ) -> CalloutRequest {
        let query = raw_path.split_once('?').map_or("", |(_, q)| q);
        let body = json!({
            "api_key": token,
            "request": {
                "path": path,
                "headers": Value::Object(forwarded_headers(headers)),
                "params": Value::Object(query_params(query)),
            }
        });
        CalloutRequest {
            method: super::Method::Post,
            path: None,
            headers: vec![
                ("content-type".to_string(), "application/json".to_string()),
                ("accept".to_string(), "application/json".to_string()),
            ],
            body: body.to_string().into_bytes(),
        }
    }

    /// Reads the endpoint's answer. A 200 must carry a non-empty string
    /// `principal`; `attributes` (or `access_attributes`, not both) maps
    /// categories to lists of strings (a bare string is refused, as Llama
    /// Stack's `dict[str, list[str]]` model refuses it); with
    /// neither, the identity has `{"roles": [<principal>]}`. `message`, if
    /// present, must be a string and is otherwise ignored, as are other keys.
    /// The token is not used: nothing of it goes into the identity.
    pub fn interpret(&self, answer: Answer, _token: &str) -> Result<Identity, ProviderError> {
        let (status, body) = http_outcome(answer)?;
        if status != 200 {
            return Err(ProviderError::AuthFailed(status));
        }
        let fields = match crate::json::parse_strict(body) {
            Ok(Value::Object(m)) => m,
            _ => return Err(ProviderError::InvalidResponse),
        };
        let principal = match fields.get("principal") {
            Some(Value::String(p)) if !p.is_empty() => p.clone(),
            _ => return Err(ProviderError::InvalidResponse),
        };
        match fields.get("message") {
            None | Some(Value::Null) | Some(Value::String(_)) => {}
            Some(_) => return Err(ProviderError::InvalidResponse),
        }
        let given = |k: &str| fields.get(k).filter(|v| !v.is_null());
        let attributes = match (given("attributes"), given("access_attributes")) {
            (Some(_), Some(_)) => return Err(ProviderError::InvalidResponse),
            (Some(a), None) | (None, Some(a)) => read_attributes(a)?,
            (None, None) => {
                let mut a = Attributes::new();
                a.insert("roles".to_string(), vec![principal.clone()]);
                a
            }
        };
        // OGX reads a string field only; anything else is no tenant.
        let tenant = match self.tenant_field.as_ref().and_then(|f| fields.get(f)) {
            Some(Value::String(s)) => {
                crate::claims::resolve_tenant(s).map_err(|_| ProviderError::InvalidTenant)?
            }
            _ => None,
        };
        Identity::new(principal, attributes)
            .map_err(|_| ProviderError::UnsafeIdentity(ProviderKind::Custom))
            .map(|id| id.with_tenant(tenant))
    }
}

/// The `path` the endpoint is sent for a request whose normalised path (see
/// [`crate::path::normalize_path`]) is `normalized_path`: that path percent-decoded,
/// as ASGI's `scope["path"]`.
pub fn endpoint_path(normalized_path: &str) -> String {
    percent_decode(normalized_path, false)
}

/// `{"category": ["v", ...], ...}` as attributes.
fn read_attributes(v: &Value) -> Result<Attributes, ProviderError> {
    let Value::Object(m) = v else {
        return Err(ProviderError::InvalidResponse);
    };
    let mut attrs = Attributes::new();
    for (category, values) in m {
        let list = match values {
            Value::Array(items) => items
                .iter()
                .map(|i| match i {
                    Value::String(s) => Ok(s.clone()),
                    _ => Err(ProviderError::InvalidResponse),
                })
                .collect::<Result<Vec<_>, _>>()?,
            _ => return Err(ProviderError::InvalidResponse),
        };
        attrs.insert(category.clone(), list);
    }
    Ok(attrs)
}

/// Every header but `authorization` and pseudo-headers; names lower-case,
/// values lossy UTF-8, repeats joined with `, `.
fn forwarded_headers(headers: &[(String, Vec<u8>)]) -> Map<String, Value> {
    let mut out = Map::new();
    for (name, value) in headers {
        let mut name = name.to_ascii_lowercase();
        // HTTP/1 `Host` arrives as `:authority`; Llama Stack's endpoint sees `host`.
        if name == ":authority" {
            name = "host".to_string();
        }
        if name.starts_with(':') || name == "authorization" {
            continue;
        }
        let value = String::from_utf8_lossy(value);
        match out.get_mut(&name) {
            Some(Value::String(joined)) => {
                joined.push_str(", ");
                joined.push_str(&value);
            }
            _ => {
                out.insert(name, Value::String(value.into_owned()));
            }
        }
    }
    out
}

/// The query as Python's `urllib.parse.parse_qs` reads it (blank values left
/// out), each name with the list of its values in order.
fn query_params(query: &str) -> Map<String, Value> {
    let mut out = Map::new();
    for pair in query.split('&') {
        let Some((name, value)) = pair.split_once('=') else {
            continue;
        };
        if value.is_empty() {
            continue;
        }
        let name = percent_decode(name, true);
        let value = Value::String(percent_decode(value, true));
        match out.get_mut(&name) {
            Some(Value::Array(list)) => list.push(value),
            _ => {
                out.insert(name, Value::Array(vec![value]));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: Value) -> Result<Custom, ConfigError> {
        Custom::parse(Obj::new(&v, "auth.config").unwrap())
    }

    fn example() -> Custom {
        parse(
            json!({"endpoint": "https://auth.example/validate", "cluster": "authsvc",
                     "timeout_ms": 10000, "cache_ttl": 30}),
        )
        .unwrap()
    }

    fn hdrs(list: &[(&str, &[u8])]) -> Vec<(String, Vec<u8>)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_vec()))
            .collect()
    }

    fn body(r: &CalloutRequest) -> Value {
        serde_json::from_slice(&r.body).unwrap()
    }

    fn answer(status: u16, body: &str) -> Result<Identity, ProviderError> {
        example().interpret(
            Answer::Response {
                status,
                body: body.as_bytes(),
            },
            "the-token",
        )
    }

    #[test]
    fn parses_the_documented_example() {
        let c = example();
        assert_eq!(c.endpoint.cluster, "authsvc");
        assert_eq!(c.endpoint.authority, "auth.example");
        assert_eq!(c.endpoint.path, "/validate");
        assert_eq!(c.endpoint.timeout_ms, 10000);
        assert_eq!(c.cache_ttl, 30);
        let c = parse(json!({"endpoint": "http://auth:9000/v"})).unwrap();
        assert_eq!(c.endpoint.cluster, "auth:9000");
        assert_eq!(c.endpoint.timeout_ms, 10000);
        assert_eq!(c.cache_ttl, DEFAULT_CACHE_TTL);
        let c = parse(json!({"endpoint": "http://auth/v", "cache_ttl": 0})).unwrap();
        assert_eq!(c.cache_ttl, 0);
    }

    #[test]
    fn config_errors_name_the_key() {
        let key = |v| parse(v).unwrap_err().key;
        assert_eq!(key(json!({})), "auth.config.endpoint");
        assert_eq!(key(json!({"endpoint": ""})), "auth.config.endpoint");
        assert_eq!(key(json!({"endpoint": "auth/v"})), "auth.config.endpoint");
        assert_eq!(key(json!({"endpoint": 1})), "auth.config.endpoint");
        assert_eq!(
            key(json!({"endpoint": "http://a/v", "cluster": ""})),
            "auth.config.cluster"
        );
        assert_eq!(
            key(json!({"endpoint": "http://a/v", "timeout_ms": 0})),
            "auth.config.timeout_ms"
        );
        assert_eq!(
            key(json!({"endpoint": "http://a/v", "timeout_ms": "5"})),
            "auth.config.timeout_ms"
        );
        assert_eq!(
            key(json!({"endpoint": "http://a/v", "cache_ttl": -1})),
            "auth.config.cache_ttl"
        );
        let e = parse(json!({"endpoint": "http://a/v", "verify_tls": true})).unwrap_err();
        assert_eq!(e.key, "auth.config.verify_tls");
        assert_eq!(e.reason, "unknown key");
    }

    #[test]
    fn missing_message_names_the_host() {
        assert_eq!(
            example().missing_message(),
            "Authentication required. Please provide your API key as a Bearer token (validated by auth.example)"
        );
        let c = parse(json!({"endpoint": "http://auth.local:8080/v"})).unwrap();
        assert!(c
            .missing_message()
            .ends_with("(validated by auth.local:8080)"));
    }

    #[test]
    fn request_json_is_exact() {
        let headers = hdrs(&[
            (":authority", b"api.example"),
            (":path", b"/v1/models?limit=10"),
            (":method", b"GET"),
            ("Authorization", b"Bearer the-token"),
            ("X-Trace", b"a"),
            ("accept", b"application/json"),
            ("x-trace", b"b"),
            ("x-bin", b"ok\xffok"),
        ]);
        let r = example().request(
            "the-token",
            "/v1/models",
            "/v1/models?limit=10&tag=a+b&tag=c%2Fd&empty=&flag&=x&q=%E2%82%AC%zz",
            &headers,
        );
        assert_eq!(
            r.headers,
            vec![
                ("content-type".to_string(), "application/json".to_string()),
                ("accept".to_string(), "application/json".to_string()),
            ]
        );
        assert_eq!(
            body(&r),
            json!({
                "api_key": "the-token",
                "request": {
                    "path": "/v1/models",
                    "headers": {
                        "host": "api.example",
                        "x-trace": "a, b",
                        "accept": "application/json",
                        "x-bin": "ok\u{fffd}ok",
                    },
                    "params": {
                        "limit": ["10"],
                        "tag": ["a b", "c/d"],
                        "": ["x"],
                        "q": ["€%zz"],
                    },
                }
            })
        );
        // Exactly these bytes (serde_json sorts object keys).
        let text = String::from_utf8(r.body).unwrap();
        assert!(
            text.starts_with(r#"{"api_key":"the-token","request":{"headers":{"accept":"#),
            "{text}"
        );
        assert!(!text.contains("Bearer"));
    }

    #[test]
    fn request_without_query_or_headers() {
        let r = example().request("t", "/v1/health", "/v1/health", &[]);
        assert_eq!(
            String::from_utf8(r.body).unwrap(),
            r#"{"api_key":"t","request":{"headers":{},"params":{},"path":"/v1/health"}}"#
        );
        let r = example().request("t", "/x", "/x?", &[]);
        assert_eq!(body(&r)["request"]["params"], json!({}));
        assert_eq!(body(&r)["request"]["path"], "/x");
    }

    #[test]
    fn path_is_percent_decoded_without_plus() {
        let raw = "/v1/files/a%3Bb+c%20d%C3%A9;v=1?x=1%2B1";
        let path = endpoint_path(&crate::path::normalize_path(raw).unwrap());
        assert_eq!(path, "/v1/files/a;b+c d\u{e9};v=1");
        let b = body(&example().request("t", &path, raw, &[]));
        assert_eq!(b["request"]["path"], "/v1/files/a;b+c d\u{e9};v=1");
        assert_eq!(b["request"]["params"], json!({"x": ["1+1"]}));
        assert_eq!(endpoint_path("/a/%FF"), "/a/\u{fffd}");
    }

    #[test]
    fn the_endpoint_gets_the_normalised_path_not_the_raw_one() {
        for raw in [
            "/v1//admin/x?p=1",
            "/v1/x/../admin/x?p=1",
            "/v1/%61dmin/./x?p=1",
        ] {
            let path = endpoint_path(&crate::path::normalize_path(raw).unwrap());
            assert_eq!(path, "/v1/admin/x", "{raw}");
            let b = body(&example().request("t", &path, raw, &[]));
            assert_eq!(b["request"]["path"], "/v1/admin/x", "{raw}");
            assert_eq!(b["request"]["params"], json!({"p": ["1"]}), "{raw}");
        }
    }

    #[test]
    fn token_with_json_specials_is_escaped() {
        let r = example().request("a\"b\\c", "/", "/", &[]);
        assert_eq!(body(&r)["api_key"], "a\"b\\c");
    }

    #[test]
    fn attributes_from_the_answer() {
        let id = answer(
            200,
            r#"{"principal": "alice", "attributes": {"roles": ["admin", "user"], "teams": ["ml"]},
                "message": "ok", "extra": 1}"#,
        )
        .unwrap();
        assert_eq!(id.principal, "alice");
        assert_eq!(id.attributes["roles"], vec!["admin", "user"]);
        assert_eq!(id.attributes["teams"], vec!["ml"]);
        assert_eq!(id.attributes.len(), 2);
        let id = answer(
            200,
            r#"{"principal": "bob", "access_attributes": {"namespaces": ["n1"]}}"#,
        )
        .unwrap();
        assert_eq!(id.attributes["namespaces"], vec!["n1"]);
        assert!(!id.attributes.contains_key("roles"));
        let id = answer(200, r#"{"principal": "bob", "attributes": {}}"#).unwrap();
        assert!(id.attributes.is_empty());
    }

    #[test]
    fn no_attributes_gives_the_principal_as_role() {
        for body in [
            r#"{"principal": "alice"}"#,
            r#"{"principal": "alice", "attributes": null}"#,
            r#"{"principal": "alice", "message": null}"#,
        ] {
            let id = answer(200, body).unwrap();
            assert_eq!(id.principal, "alice");
            assert_eq!(id.attributes.len(), 1);
            assert_eq!(id.attributes["roles"], vec!["alice"]);
            assert!(!id.attributes_header.contains("the-token"));
        }
    }

    #[test]
    fn invalid_answers() {
        for body in [
            "",
            "garbage",
            "[]",
            "null",
            r#"{"attributes": {}}"#,
            r#"{"principal": ""}"#,
            r#"{"principal": 7}"#,
            r#"{"principal": null}"#,
            r#"{"principal": ["a"]}"#,
            r#"{"principal": "a", "attributes": {"roles": [1]}}"#,
            r#"{"principal": "a", "attributes": {"roles": null}}"#,
            r#"{"principal": "a", "attributes": {"roles": {"x": "y"}}}"#,
            r#"{"principal": "a", "attributes": {"roles": 3}}"#,
            r#"{"principal": "a", "attributes": {"roles": "admin"}}"#,
            r#"{"principal": "a", "access_attributes": {"teams": "ml"}}"#,
            r#"{"principal": "a", "attributes": ["roles"]}"#,
            r#"{"principal": "a", "attributes": "roles"}"#,
            r#"{"principal": "a", "attributes": {}, "access_attributes": {}}"#,
            r#"{"principal": "a", "message": 5}"#,
            r#"{"principal": "a", "principal": "b"}"#,
        ] {
            let e = answer(200, body).unwrap_err();
            assert_eq!(e, ProviderError::InvalidResponse, "{body}");
            assert_eq!(e.to_string(), "Invalid authentication response format");
            assert_eq!(e.status(), 401);
        }
    }

    #[test]
    fn http_failures() {
        for status in [201, 204, 301, 400, 401, 403, 404, 429] {
            let e = answer(status, r#"{"principal": "a"}"#).unwrap_err();
            assert_eq!(e, ProviderError::AuthFailed(status));
            assert_eq!(e.to_string(), format!("Authentication failed: {status}"));
            assert_eq!(e.status(), 401);
        }
        for status in [500, 502, 503, 504] {
            let e = answer(status, "").unwrap_err();
            assert_eq!(e, ProviderError::Unavailable);
            assert_eq!(e.to_string(), "Authentication service unavailable");
            assert_eq!(e.status(), 503);
        }
        let c = example();
        assert_eq!(
            c.interpret(Answer::NoAnswer, "t").unwrap_err(),
            ProviderError::Unavailable
        );
        let e = c.interpret(Answer::TimedOut, "t").unwrap_err();
        assert_eq!(e, ProviderError::Timeout);
        assert_eq!(e.to_string(), "Authentication service timeout");
        assert_eq!(e.status(), 503);
    }

    #[test]
    fn control_characters_are_refused() {
        for body in [
            r#"{"principal": "alice\r\nx-admin: yes"}"#,
            r#"{"principal": "alice", "attributes": {"roles": ["a\nb"]}}"#,
            r#"{"principal": "alice", "attributes": {"ro\tles": ["a"]}}"#,
        ] {
            let e = answer(200, body).unwrap_err();
            assert_eq!(
                e,
                ProviderError::UnsafeIdentity(ProviderKind::Custom),
                "{body}"
            );
            assert_eq!(e.to_string(), "Invalid authentication response format");
            assert_eq!(e.status(), 401);
        }
    }

    #[test]
    fn percent_decoding_edges() {
        assert_eq!(percent_decode("%", true), "%");
        assert_eq!(percent_decode("%4", true), "%4");
        assert_eq!(percent_decode("%41%4a%4A", true), "AJJ");
        assert_eq!(percent_decode("%ff", true), "\u{fffd}");
        assert_eq!(percent_decode("a+b", false), "a+b");
        assert_eq!(percent_decode("a+b", true), "a b");
        assert_eq!(percent_decode("é%C3%A9", true), "éé");
    }

    #[test]
    fn the_tenant_comes_from_tenant_field() {
        let c = parse(json!({"endpoint": "https://auth.example/validate",
                             "tenant_field": "tenant_id"}))
        .unwrap();
        let read = |body: &str| {
            c.interpret(
                Answer::Response {
                    status: 200,
                    body: body.as_bytes(),
                },
                "t",
            )
        };
        let id = read(r#"{"principal": "p", "tenant_id": "Team-A"}"#).unwrap();
        assert_eq!(id.tenant.as_deref(), Some("team-a"));
        assert_eq!(read(r#"{"principal": "p"}"#).unwrap().tenant, None);
        assert_eq!(
            read(r#"{"principal": "p", "tenant_id": ["x"]}"#)
                .unwrap()
                .tenant,
            None
        );
        assert_eq!(
            read(r#"{"principal": "p", "tenant_id": "a.b"}"#).unwrap_err(),
            ProviderError::InvalidTenant
        );
        // Without tenant_field the answer's field is ignored.
        assert_eq!(
            example()
                .interpret(
                    Answer::Response {
                        status: 200,
                        body: br#"{"principal": "p", "tenant_id": "x"}"#,
                    },
                    "t"
                )
                .unwrap()
                .tenant,
            None
        );
    }
}
