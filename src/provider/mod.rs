//! What the callout providers share: where a callout goes ([`Upstream`],
//! also the JWKS endpoint's), what is sent ([`CalloutRequest`]), what came
//! back ([`Answer`]) and why a token was refused ([`ProviderError`]). One
//! file per provider, each with its settings, its request and its reading of
//! the answer: [`introspection`] (RFC 7662, `oauth2_token` with
//! `introspection`) and [`custom`] (Llama Stack's custom endpoint).
//!
//! # A provider's answer, stage by stage
//!
//! 1. `driver::CalloutReply`: what the host handed back (status, body read
//!    or too large), built by `filter`.
//! 2. `Reply` (private to `driver`): that reply classified against the
//!    callout's timeout (response, timed out, no answer, too large).
//! 3. [`Answer`]: what a provider reads (`Introspection::interpret`,
//!    `Custom::interpret`): an HTTP response, no answer or a timeout.
//! 4. [`crate::token_cache::Verdict`]: the decision taken from it (an
//!    identity or a denial), as `auth` caches it per token.

use crate::json::{ConfigError, Obj};
use std::fmt;

pub mod api_keys;
pub mod custom;
pub mod github;
pub mod introspection;
pub mod kubernetes;

/// Default callout timeout of both callout providers (Llama Stack's 10 s).
pub const DEFAULT_TIMEOUT_MS: u64 = 10_000;
/// The longest `cache_ttl` of a callout provider (ten years).
pub const MAX_CACHE_TTL: u64 = 10 * 365 * 86400;
/// Longest callout timeout accepted.
pub const MAX_TIMEOUT_MS: u64 = 600_000;

/// A callout's HTTP method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Post,
    Get,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Post => "POST",
            Method::Get => "GET",
        }
    }
}

/// What to send to a provider: the method, the path when it is not the
/// [`Upstream`]'s, the regular headers and the body. The driver adds the
/// pseudo-headers (`:authority` from the provider's [`Upstream`]); Envoy
/// sets `content-length` from the body.
#[derive(Clone, PartialEq, Eq)]
pub struct CalloutRequest {
    pub method: Method,
    /// `None`: the upstream's path.
    pub path: Option<String>,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// Redacts the `authorization` header and the body (both may carry secrets or
/// the caller's token).
impl fmt::Debug for CalloutRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let headers: Vec<(&str, &str)> = self
            .headers
            .iter()
            .map(|(k, v)| {
                if k.eq_ignore_ascii_case("authorization") {
                    (k.as_str(), "<redacted>")
                } else {
                    (k.as_str(), v.as_str())
                }
            })
            .collect();
        f.debug_struct("CalloutRequest")
            .field("method", &self.method)
            .field("path", &self.path)
            .field("headers", &headers)
            .field("body", &format_args!("<{} bytes>", self.body.len()))
            .finish()
    }
}

/// Outcome of a provider callout, before HTTP: everything the glue saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer<'a> {
    /// An HTTP answer (any status) and its body.
    Response { status: u16, body: &'a [u8] },
    /// An HTTP answer that says the caller is rate limited: 429, or 403
    /// with `retry-after` or `x-ratelimit-remaining: 0` (GitHub's rule).
    /// Read as a `Response` by every provider but `github_token`.
    Throttled { status: u16, body: &'a [u8] },
    /// No answer: connection refused or reset, unknown cluster, dispatch
    /// failure, body too large to read.
    NoAnswer,
    /// Nothing within the configured timeout.
    TimedOut,
}

/// Which provider refused, for the message of [`ProviderError::UnsafeIdentity`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderKind {
    Introspection,
    Custom,
}

/// Why a callout provider refused a token. `Display` is the exact message the
/// caller sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProviderError {
    /// 401 "Token not active": `active` is not `true`.
    NotActive,
    /// 401 "Token not active": the answer's `exp` (plus skew) is past.
    Expired,
    /// 401 "Token introspection error": a 200 that is not a JSON object, or
    /// has no principal, or a malformed `exp` (or `aud`, when checked).
    IntrospectionError,
    /// 401 "Token audience not accepted": `audience` is configured and the
    /// active answer's `aud` names none of its values.
    WrongAudience,
    /// 401 "Token introspection failed: `<status>`": a non-200, non-5xx answer.
    IntrospectionFailed(u16),
    /// 401 "Authentication failed: `<status>`" (custom endpoint).
    AuthFailed(u16),
    /// 401 "Invalid authentication response format" (custom endpoint).
    InvalidResponse,
    /// 503 "Authentication service unavailable": 5xx or no answer.
    Unavailable,
    /// 503 "Authentication service timeout".
    Timeout,
    /// 401 with the provider's generic message: the identity would carry
    /// control characters into a header.
    UnsafeIdentity(ProviderKind),
    /// 401 [`crate::claims::TENANT_RULE`]: the answer's tenant is one OGX
    /// would refuse.
    InvalidTenant,
    /// 401 "Invalid or missing API key" (`local_api_key`, OGX's message).
    InvalidApiKey,
    /// 401 "Invalid token": the API server refused the token (`kubernetes`).
    KubernetesInvalid,
    /// 401 "Token validation failed: `<status>`" (`kubernetes`).
    KubernetesFailed(u16),
    /// 401 "Invalid SelfSubjectReview response" (`kubernetes`: no
    /// `status.userInfo.username`, or an answer that is not JSON).
    KubernetesReview,
    /// 401 with OGX's message: GitHub refused the token (401 or 403).
    GitHubInvalid,
    /// 401 "Invalid GitHub user response": `/user` answered 200 without a
    /// string `login` and an `id`.
    GitHubUser,
}

impl ProviderError {
    /// The HTTP status of the local answer.
    pub fn status(&self) -> u32 {
        match self {
            ProviderError::Unavailable | ProviderError::Timeout => 503,
            _ => 401,
        }
    }

    /// The reason label used in metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            ProviderError::Expired => "expired",
            ProviderError::WrongAudience => "wrong_audience",
            ProviderError::Unavailable => "auth_unavailable",
            ProviderError::Timeout => "auth_timeout",
            _ => "invalid_token",
        }
    }
}

impl fmt::Display for ProviderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProviderError::NotActive | ProviderError::Expired => f.write_str("Token not active"),
            ProviderError::IntrospectionError
            | ProviderError::UnsafeIdentity(ProviderKind::Introspection) => {
                f.write_str("Token introspection error")
            }
            ProviderError::WrongAudience => f.write_str("Token audience not accepted"),
            ProviderError::IntrospectionFailed(s) => write!(f, "Token introspection failed: {s}"),
            ProviderError::AuthFailed(s) => write!(f, "Authentication failed: {s}"),
            ProviderError::InvalidResponse
            | ProviderError::UnsafeIdentity(ProviderKind::Custom) => {
                f.write_str("Invalid authentication response format")
            }
            ProviderError::Unavailable => f.write_str("Authentication service unavailable"),
            ProviderError::Timeout => f.write_str("Authentication service timeout"),
            ProviderError::InvalidTenant => f.write_str(crate::claims::TENANT_RULE),
            ProviderError::InvalidApiKey => f.write_str("Invalid or missing API key"),
            ProviderError::KubernetesInvalid => f.write_str("Invalid token"),
            ProviderError::KubernetesFailed(s) => write!(f, "Token validation failed: {s}"),
            ProviderError::KubernetesReview => f.write_str("Invalid SelfSubjectReview response"),
            ProviderError::GitHubInvalid => f.write_str(
                "GitHub token validation failed. Please check your token and try again.",
            ),
            ProviderError::GitHubUser => f.write_str("Invalid GitHub user response"),
        }
    }
}

/// The transport-level part of interpreting an answer: timeouts, no answer
/// and 5xx are the same for every provider. Returns the status and body of
/// any other answer.
pub(crate) fn http_outcome<'a>(answer: Answer<'a>) -> Result<(u16, &'a [u8]), ProviderError> {
    match answer {
        Answer::TimedOut => Err(ProviderError::Timeout),
        Answer::NoAnswer => Err(ProviderError::Unavailable),
        Answer::Response { status, .. } | Answer::Throttled { status, .. }
            if (500..=599).contains(&status) =>
        {
            Err(ProviderError::Unavailable)
        }
        Answer::Response { status, body } | Answer::Throttled { status, body } => {
            Ok((status, body))
        }
    }
}

/// Reads the callout timeout (`timeout_ms`, default 10 s, 1 ms to 600 s).
pub(crate) fn timeout_ms(o: &mut Obj) -> Result<u64, ConfigError> {
    let t = o
        .u64_max("timeout_ms", MAX_TIMEOUT_MS)?
        .unwrap_or(DEFAULT_TIMEOUT_MS);
    if t == 0 {
        return Err(ConfigError::new(o.path("timeout_ms"), "must be at least 1"));
    }
    Ok(t)
}

/// The endpoint `<base URL><path>` of a provider whose configuration names an
/// API's base URL under `key` (`default` when absent; a trailing `/` is
/// dropped), with its `cluster` and `timeout_ms`.
pub(crate) fn api_endpoint(
    o: &mut Obj,
    key: &str,
    default: &str,
    path: &str,
) -> Result<Upstream, ConfigError> {
    let base = o
        .nonempty_str(key)?
        .unwrap_or(default)
        .trim_end_matches('/');
    let url = format!("{base}{path}");
    let url_key = o.path(key);
    let cluster = o.nonempty_str("cluster")?.map(str::to_string);
    let timeout = timeout_ms(o)?;
    upstream(&url, &url_key, cluster, timeout)
}

/// Where a callout goes: an Envoy cluster and the request's path and authority.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    pub url: String,
    pub cluster: String,
    pub authority: String,
    pub path: String,
    pub timeout_ms: u64,
}

/// Where the credentials of a URL's userinfo go instead, for the refusal:
/// the custom endpoint gets none from tollgate.
pub const CREDENTIALS_NONE: &str = "tollgate sends this endpoint no credentials of its own; TLS and authentication to it are set on the Envoy cluster";
/// See [`CREDENTIALS_NONE`]: the JWKS endpoint's bearer token.
pub const CREDENTIALS_JWKS: &str =
    "send a bearer token to the JWKS endpoint with `jwks.token`; TLS is set on the Envoy cluster";
/// See [`CREDENTIALS_NONE`]: the introspection client's credentials.
pub const CREDENTIALS_INTROSPECTION: &str = "set the client's credentials with `introspection.client_id` and `client_secret`; TLS is set on the Envoy cluster";

/// Splits an `http(s)://host[:port]/path` URL that gets no credentials from
/// tollgate (the custom endpoint); `cluster` defaults to the authority.
pub fn upstream(
    url: &str,
    key: &str,
    cluster: Option<String>,
    timeout_ms: u64,
) -> Result<Upstream, ConfigError> {
    upstream_with(url, key, cluster, timeout_ms, CREDENTIALS_NONE)
}

/// [`upstream`] for a URL whose credentials have their own keys, named by
/// `credentials_go` when the URL carries userinfo (`user:password@`), which is
/// refused: the authority is shown in 401 messages and logs. The refusal never
/// repeats the URL.
pub fn upstream_with(
    url: &str,
    key: &str,
    cluster: Option<String>,
    timeout_ms: u64,
    credentials_go: &str,
) -> Result<Upstream, ConfigError> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| ConfigError::new(key, "must be an http:// or https:// URL"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, "/"),
    };
    if authority.contains('@') {
        return Err(ConfigError::new(
            key,
            format!("the URL must not carry credentials (`user:password@` before the host): {credentials_go}"),
        ));
    }
    if !valid_authority(authority) {
        return Err(ConfigError::new(key, "the URL has no valid host"));
    }
    if !path.bytes().all(|b| (0x21..0x7f).contains(&b)) || path.contains('#') {
        return Err(ConfigError::new(
            key,
            "the URL path must be printable ASCII without spaces or fragment",
        ));
    }
    Ok(Upstream {
        url: url.to_string(),
        cluster: cluster.unwrap_or_else(|| authority.to_string()),
        authority: authority.to_string(),
        path: path.to_string(),
        timeout_ms,
    })
}

/// `host[:port]`: a name or IPv4 address (letters, digits, `-._`) or a
/// bracketed IPv6 address; the port 1 to 5 digits.
fn valid_authority(authority: &str) -> bool {
    let (host_ok, port) = match authority.strip_prefix('[') {
        Some(inner) => match inner.split_once(']') {
            Some((ip, port)) => (
                !ip.is_empty()
                    && ip
                        .bytes()
                        .all(|b| b.is_ascii_hexdigit() || b":.".contains(&b)),
                port,
            ),
            None => return false,
        },
        None => {
            let (host, port) = authority.split_at(authority.find(':').unwrap_or(authority.len()));
            (
                !host.is_empty()
                    && host
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b)),
                port,
            )
        }
    };
    let port_ok = port.is_empty()
        || port
            .strip_prefix(':')
            .is_some_and(|p| (1..=5).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()));
    host_ok && port_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_hides_credentials_and_body() {
        let r = CalloutRequest {
            method: Method::Post,
            path: None,
            headers: vec![
                ("Authorization".into(), "Basic c2VjcmV0".into()),
                (
                    "content-type".into(),
                    "application/x-www-form-urlencoded".into(),
                ),
            ],
            body: b"token=the.caller.token".to_vec(),
        };
        let shown = format!("{r:?}");
        assert_eq!(
            shown,
            "CalloutRequest { method: Post, path: None, headers: [(\"Authorization\", \"<redacted>\"), \
             (\"content-type\", \"application/x-www-form-urlencoded\")], body: <22 bytes> }"
        );
    }
}
