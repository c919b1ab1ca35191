//! Every answer tollgate gives instead of the upstream's, in one place.
//!
//! `Denial`'s `Display` is the exact message the caller sees; [`Denial::response`]
//! turns it into status, headers and the JSON body `{"error":{"message":M}}`.

use crate::jwt::TokenError;
use crate::provider::ProviderError;
use crate::quota::RateLimit;
use crate::route_rules::AccessDenied;
use crate::token_quota::{ietf_fields, openai_headers, Policy};
use std::fmt;

/// Why a request is not passed to the upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    /// No `Authorization` header; carries the provider's message.
    MissingCredentials(String),
    /// `Authorization` is not `Bearer <token>`.
    InvalidHeaderFormat,
    /// Two different credentials in one request (`auth.credentials`).
    MultipleCredentials,
    /// The token failed verification.
    InvalidToken(TokenError),
    /// The introspection or custom endpoint refused, or could not answer.
    Provider(ProviderError),
    /// The identity provider could not be reached or answered garbage.
    AuthUnavailable,
    /// The identity provider did not answer in time.
    AuthTimeout,
    /// A route rule refused the caller.
    Forbidden(AccessDenied),
    /// Over quota; seconds until the window ends, and the rate-limit headers.
    QuotaExceeded {
        retry_after: u64,
        rate_limit: Option<RateLimit>,
    },
    /// A token budget is spent (`quota.tokens`): the budget, with nothing
    /// left and the seconds to the window's end.
    TokensExceeded(Policy),
    /// The quota counter could not be updated (contention); fail closed.
    QuotaContended,
    /// The quota store failed; fail closed.
    QuotaUnavailable,
    /// The request path cannot be normalised safely.
    BadPath,
    /// A host call the decision depends on failed (the clock, an
    /// identity-header write): fail closed.
    Internal,
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Denial::MissingCredentials(m) => f.write_str(m),
            Denial::InvalidHeaderFormat => f.write_str("Invalid Authorization header format"),
            Denial::MultipleCredentials => f.write_str("More than one credential in the request"),
            Denial::InvalidToken(crate::jwt::TokenError::InvalidTenant) => {
                f.write_str(crate::claims::TENANT_RULE)
            }
            Denial::InvalidToken(_) => f.write_str("Invalid JWT token"),
            Denial::Provider(e) => write!(f, "{e}"),
            Denial::AuthUnavailable => f.write_str("Authentication service unavailable"),
            Denial::AuthTimeout => f.write_str("Authentication service timeout"),
            Denial::Forbidden(why) => write!(f, "{why}"),
            Denial::QuotaExceeded { .. } | Denial::TokensExceeded(_) | Denial::QuotaContended => {
                f.write_str("Quota exceeded")
            }
            Denial::QuotaUnavailable => f.write_str("Quota service unavailable"),
            Denial::BadPath => f.write_str("Invalid request path"),
            Denial::Internal => f.write_str("Internal error"),
        }
    }
}

/// A complete local answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalResponse {
    pub status: u32,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Denial {
    pub fn status(&self) -> u32 {
        match self {
            Denial::MissingCredentials(_)
            | Denial::InvalidHeaderFormat
            | Denial::MultipleCredentials
            | Denial::InvalidToken(_) => 401,
            Denial::AuthUnavailable | Denial::AuthTimeout | Denial::QuotaUnavailable => 503,
            Denial::Forbidden(_) => 403,
            Denial::QuotaExceeded { .. } | Denial::TokensExceeded(_) | Denial::QuotaContended => {
                429
            }
            Denial::BadPath => 400,
            Denial::Internal => 500,
            Denial::Provider(e) => e.status(),
        }
    }

    /// The reason label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Denial::MissingCredentials(_) => "missing",
            Denial::InvalidHeaderFormat | Denial::MultipleCredentials => "malformed",
            Denial::InvalidToken(e) => e.reason(),
            Denial::Provider(e) => e.reason(),
            Denial::AuthUnavailable => "auth_unavailable",
            Denial::AuthTimeout => "auth_timeout",
            Denial::Forbidden(AccessDenied::Scope(_)) => "scope",
            Denial::Forbidden(AccessDenied::Attributes) => "attributes",
            Denial::Forbidden(AccessDenied::Route(_)) => "route",
            Denial::QuotaExceeded { .. }
            | Denial::TokensExceeded(_)
            | Denial::QuotaContended
            | Denial::QuotaUnavailable => "quota",
            Denial::BadPath => "bad_path",
            Denial::Internal => "internal",
        }
    }

    pub fn response(&self) -> LocalResponse {
        // Written by hand so the keys keep the documented order.
        let m = serde_json::Value::String(self.to_string()).to_string();
        let body = match self {
            // Llama Stack answers 403 with `detail`; OpenAI-style clients read `message`.
            Denial::Forbidden(_) => format!(r#"{{"error":{{"message":{m},"detail":{m}}}}}"#),
            _ => format!(r#"{{"error":{{"message":{m}}}}}"#),
        };
        let mut headers = vec![("content-type".to_string(), "application/json".to_string())];
        match self {
            Denial::MissingCredentials(_) | Denial::InvalidHeaderFormat => {
                headers.push(("www-authenticate".into(), "Bearer".into()));
            }
            Denial::Provider(e) if e.status() == 401 => {
                headers.push((
                    "www-authenticate".into(),
                    "Bearer error=\"invalid_token\"".into(),
                ));
            }
            Denial::InvalidToken(_) => {
                headers.push((
                    "www-authenticate".into(),
                    "Bearer error=\"invalid_token\"".into(),
                ));
            }
            Denial::QuotaExceeded {
                retry_after,
                rate_limit,
            } => {
                headers.push(("retry-after".into(), retry_after.to_string()));
                let extra = rate_limit.iter().flat_map(RateLimit::headers);
                headers.extend(extra.map(|(k, v)| (k.to_string(), v)));
            }
            Denial::TokensExceeded(p) => {
                headers.push(("retry-after".into(), p.reset.to_string()));
                let fields = openai_headers(p).into_iter().chain(ietf_fields(&[*p]));
                headers.extend(fields.map(|(k, v)| (k.to_string(), v)));
            }
            Denial::QuotaContended => headers.push(("retry-after".into(), "1".into())),
            _ => {}
        }
        LocalResponse {
            status: self.status(),
            headers,
            body,
        }
    }
}

/// gRPC status codes (`google.rpc.Code`) tollgate answers gRPC callers with.
pub mod grpc {
    pub const INVALID_ARGUMENT: u32 = 3;
    pub const PERMISSION_DENIED: u32 = 7;
    pub const RESOURCE_EXHAUSTED: u32 = 8;
    pub const INTERNAL: u32 = 13;
    pub const UNAVAILABLE: u32 = 14;
    pub const UNAUTHENTICATED: u32 = 16;
}

/// Whether request headers are a gRPC call's: `content-type` is
/// `application/grpc` or `application/grpc+<codec>` (as Envoy decides).
pub fn is_grpc(content_type: &[u8]) -> bool {
    let prefix = b"application/grpc";
    match content_type.split_at_checked(prefix.len()) {
        Some((head, rest)) => {
            head.eq_ignore_ascii_case(prefix) && (rest.is_empty() || rest.starts_with(b"+"))
        }
        None => false,
    }
}

impl Denial {
    /// The status a gRPC caller gets. Over quota is `RESOURCE_EXHAUSTED`,
    /// which gRPC retry policies do not retry (Envoy's own HTTP → gRPC
    /// mapping would make a 429 `UNAVAILABLE`); `quota_unavailable` asks for
    /// `UNAVAILABLE`, as `local_ratelimit` does unless
    /// `rate_limited_as_resource_exhausted`.
    pub fn grpc_status(&self, quota_unavailable: bool) -> u32 {
        match self.status() {
            400 => grpc::INVALID_ARGUMENT,
            401 => grpc::UNAUTHENTICATED,
            403 => grpc::PERMISSION_DENIED,
            429 if quota_unavailable => grpc::UNAVAILABLE,
            429 => grpc::RESOURCE_EXHAUSTED,
            500 => grpc::INTERNAL,
            _ => grpc::UNAVAILABLE,
        }
    }

    /// The answer for a gRPC caller: the plain message as the body (Envoy
    /// sends it as `grpc-message` in a trailers-only answer), no JSON, and
    /// the same `WWW-Authenticate`, `Retry-After` and `RateLimit-*` headers.
    pub fn grpc_response(&self) -> LocalResponse {
        let mut r = self.response();
        r.headers.retain(|(k, _)| k != "content-type");
        r.body = self.to_string();
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_callers_get_grpc_statuses_and_plain_messages() {
        use crate::provider::ProviderError;
        for (d, code) in [
            (
                Denial::MissingCredentials("m".into()),
                grpc::UNAUTHENTICATED,
            ),
            (
                Denial::InvalidToken(TokenError::Expired),
                grpc::UNAUTHENTICATED,
            ),
            (
                Denial::Provider(ProviderError::NotActive),
                grpc::UNAUTHENTICATED,
            ),
            (Denial::Provider(ProviderError::Timeout), grpc::UNAVAILABLE),
            (
                Denial::Forbidden(AccessDenied::Attributes),
                grpc::PERMISSION_DENIED,
            ),
            (Denial::QuotaContended, grpc::RESOURCE_EXHAUSTED),
            (Denial::QuotaUnavailable, grpc::UNAVAILABLE),
            (Denial::AuthUnavailable, grpc::UNAVAILABLE),
            (Denial::BadPath, grpc::INVALID_ARGUMENT),
            (Denial::Internal, grpc::INTERNAL),
        ] {
            assert_eq!(d.grpc_status(false), code, "{d:?}");
        }
        let over = Denial::QuotaExceeded {
            retry_after: 7,
            rate_limit: None,
        };
        assert_eq!(over.grpc_status(false), grpc::RESOURCE_EXHAUSTED);
        assert_eq!(over.grpc_status(true), grpc::UNAVAILABLE);
        let r = over.grpc_response();
        assert_eq!(r.body, "Quota exceeded");
        assert_eq!(r.headers, vec![("retry-after".into(), "7".into())]);
        let spent = Denial::TokensExceeded(Policy {
            name: "tokens",
            quota: 100,
            window: 86400,
            remaining: 0,
            reset: 30,
        });
        assert_eq!(spent.grpc_status(false), grpc::RESOURCE_EXHAUSTED);
        let r = spent.response();
        assert_eq!(
            (r.status, r.body.as_str()),
            (429, r#"{"error":{"message":"Quota exceeded"}}"#)
        );
        let h = |k: &str| {
            r.headers
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(h("retry-after"), Some("30"));
        assert_eq!(h("x-ratelimit-remaining-tokens"), Some("0"));
        assert_eq!(h("x-ratelimit-reset-tokens"), Some("30s"));
        assert_eq!(h("ratelimit"), Some(r#""tokens";r=0;t=30"#));
        assert_eq!(spent.reason(), "quota");
        let r = Denial::InvalidToken(TokenError::Expired).grpc_response();
        assert_eq!(r.body, "Invalid JWT token");
        assert!(r.headers.iter().all(|(k, _)| k != "content-type"));
    }

    #[test]
    fn grpc_content_types() {
        for ct in [
            "application/grpc",
            "application/grpc+proto",
            "Application/GRPC+json",
        ] {
            assert!(is_grpc(ct.as_bytes()), "{ct}");
        }
        for ct in [
            "application/grpc-web",
            "application/grpcx",
            "application/json",
            "",
            "application/grp",
        ] {
            assert!(!is_grpc(ct.as_bytes()), "{ct}");
        }
    }

    fn challenge(d: &Denial) -> Option<String> {
        d.response()
            .headers
            .into_iter()
            .find(|(k, _)| k == "www-authenticate")
            .map(|(_, v)| v)
    }

    #[test]
    fn provider_denials_challenge_only_on_401() {
        use crate::provider::ProviderError;
        let invalid = Some("Bearer error=\"invalid_token\"".to_string());
        assert_eq!(
            challenge(&Denial::Provider(ProviderError::NotActive)),
            invalid
        );
        assert_eq!(
            challenge(&Denial::Provider(ProviderError::AuthFailed(401))),
            invalid
        );
        // Any refusal by the endpoint is a 401 (as in Llama Stack); only
        // an unreachable or slow provider is not.
        assert_eq!(
            challenge(&Denial::Provider(ProviderError::AuthFailed(403))),
            invalid
        );
        assert_eq!(
            challenge(&Denial::Provider(ProviderError::Unavailable)),
            None
        );
        assert_eq!(challenge(&Denial::Provider(ProviderError::Timeout)), None);
        assert_eq!(challenge(&Denial::QuotaUnavailable), None);
    }

    #[test]
    fn contended_quota_asks_to_retry_in_a_second() {
        let r = Denial::QuotaContended.response();
        assert_eq!(r.status, 429);
        assert!(r.headers.contains(&("retry-after".into(), "1".into())));
        assert!(!Denial::QuotaUnavailable
            .response()
            .headers
            .iter()
            .any(|(k, _)| k == "retry-after"));
    }

    #[test]
    fn reason_labels() {
        for (d, label) in [
            (Denial::MissingCredentials(String::new()), "missing"),
            (Denial::InvalidHeaderFormat, "malformed"),
            (Denial::InvalidToken(TokenError::Expired), "expired"),
            (Denial::AuthUnavailable, "auth_unavailable"),
            (Denial::AuthTimeout, "auth_timeout"),
            (Denial::Forbidden(AccessDenied::Scope("s".into())), "scope"),
            (Denial::Forbidden(AccessDenied::Attributes), "attributes"),
            (Denial::QuotaContended, "quota"),
            (Denial::QuotaUnavailable, "quota"),
            (Denial::BadPath, "bad_path"),
            (Denial::Internal, "internal"),
        ] {
            assert_eq!(d.reason(), label, "{d:?}");
        }
    }

    #[test]
    fn bodies_and_headers_are_exact() {
        let r = Denial::InvalidToken(TokenError::Expired).response();
        assert_eq!(r.status, 401);
        assert_eq!(r.body, r#"{"error":{"message":"Invalid JWT token"}}"#);
        assert!(r.headers.contains(&(
            "www-authenticate".into(),
            "Bearer error=\"invalid_token\"".into()
        )));
        let r = Denial::MissingCredentials("Authentication required.".into()).response();
        assert!(r
            .headers
            .contains(&("www-authenticate".into(), "Bearer".into())));
        let r = Denial::Forbidden(AccessDenied::Scope("admin".into())).response();
        assert_eq!(r.status, 403);
        let m = "Access denied: user does not have required scope: admin";
        assert_eq!(
            r.body,
            format!(r#"{{"error":{{"message":"{m}","detail":"{m}"}}}}"#)
        );
        let r = Denial::QuotaExceeded {
            retry_after: 42,
            rate_limit: Some(RateLimit {
                limit: 5,
                remaining: 0,
                reset: 42,
            }),
        }
        .response();
        assert_eq!(r.status, 429);
        assert_eq!(r.body, r#"{"error":{"message":"Quota exceeded"}}"#);
        let pairs: Vec<(&str, &str)> = r
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            pairs,
            [
                ("content-type", "application/json"),
                ("retry-after", "42"),
                ("ratelimit-limit", "5"),
                ("ratelimit-remaining", "0"),
                ("ratelimit-reset", "42"),
            ]
        );
        let r = Denial::QuotaExceeded {
            retry_after: 7,
            rate_limit: None,
        }
        .response();
        assert_eq!(r.headers.len(), 2);
        assert_eq!(Denial::AuthTimeout.response().status, 503);
        assert_eq!(Denial::BadPath.response().status, 400);
    }
}
