//! OGX's `kubernetes` provider (`ogx/core/server/auth_providers.py`
//! `KubernetesAuthProvider`, ogx 1.5.0): a service-account or user token is
//! valid when the API server accepts it for a `SelfSubjectReview`
//! (`POST /apis/authentication.k8s.io/v1/selfsubjectreviews`, Kubernetes
//! API reference, authentication.k8s.io/v1), and the review's
//! `status.userInfo` is the identity: `username` the principal, the
//! attributes by `claims_mapping` (OGX's default: `username` and `groups` →
//! `roles`), the tenant by `tenant_claim`.
//!
//! Answers: 201 with a `userInfo` that has a `username` → the identity;
//! 401 → 401 `Invalid token`; another status → 401 `Token validation
//! failed: <status>` (OGX's messages); 429 (the API server's priority and
//! fairness throttling), 5xx, no answer, a timeout → 503.

use super::{api_endpoint, http_outcome, Answer, CalloutRequest, ProviderError, Upstream};
use crate::claims::{ClaimsMapping, Identity};
use crate::json::{ConfigError, Obj};
use serde_json::Value;

/// The review's path on the API server.
pub const REVIEW_PATH: &str = "/apis/authentication.k8s.io/v1/selfsubjectreviews";
/// OGX's default `api_server_url`.
pub const DEFAULT_API_SERVER: &str = "https://kubernetes.default.svc";
/// Default `cache_ttl` (seconds) of an accepted token.
pub const DEFAULT_CACHE_TTL: u64 = 30;

/// `kubernetes`.
#[derive(Debug, Clone)]
pub struct Kubernetes {
    pub endpoint: Upstream,
    pub claims_mapping: ClaimsMapping,
    /// Seconds an accepted token is cached (0: never).
    pub cache_ttl: u64,
}

impl Kubernetes {
    pub fn parse(mut o: Obj) -> Result<Kubernetes, ConfigError> {
        let endpoint = api_endpoint(&mut o, "api_server_url", DEFAULT_API_SERVER, REVIEW_PATH)?;
        let mut claims_mapping = match o.obj("claims_mapping")? {
            Some(m) => ClaimsMapping::parse(m)?,
            // OGX's default, in its order.
            None => ClaimsMapping::from_pairs(&[("username", "roles"), ("groups", "roles")]),
        };
        claims_mapping.tenant_claim = o.nonempty_str("tenant_claim")?.map(str::to_string);
        let cache_ttl = o
            .u64_max("cache_ttl", super::MAX_CACHE_TTL)?
            .unwrap_or(DEFAULT_CACHE_TTL);
        // OGX's TLS settings belong to the Envoy cluster here.
        if o.bool("verify_tls")?.is_some() || o.str("tls_cafile")?.is_some() {
            log::warn!(
                "{}: TLS to the API server is configured on the Envoy cluster",
                o.own_path()
            );
        }
        o.finish()?;
        Ok(Kubernetes {
            endpoint,
            claims_mapping,
            cache_ttl,
        })
    }

    /// The review request, sent with the caller's token.
    pub fn request(&self, token: &str) -> CalloutRequest {
        CalloutRequest {
            method: super::Method::Post,
            path: None,
            headers: vec![
                ("authorization".into(), format!("Bearer {token}")),
                ("content-type".into(), "application/json".into()),
                ("accept".into(), "application/json".into()),
            ],
            body: br#"{"apiVersion":"authentication.k8s.io/v1","kind":"SelfSubjectReview"}"#
                .to_vec(),
        }
    }

    /// Reads the API server's answer.
    pub fn interpret(&self, answer: Answer) -> Result<Identity, ProviderError> {
        if let Answer::Throttled { status: 429, .. } = answer {
            // API Priority and Fairness turned the review away: the token
            // was not judged (OGX: 401 `Token validation failed: 429`).
            return Err(ProviderError::Unavailable);
        }
        let (status, body) = http_outcome(answer)?;
        match status {
            201 => {}
            401 => return Err(ProviderError::KubernetesInvalid),
            other => return Err(ProviderError::KubernetesFailed(other)),
        }
        let review =
            crate::json::parse_strict(body).map_err(|_| ProviderError::KubernetesReview)?;
        let user = review
            .get("status")
            .and_then(|s| s.get("userInfo"))
            .and_then(Value::as_object)
            .ok_or(ProviderError::KubernetesReview)?;
        let username = match user.get("username") {
            Some(Value::String(u)) if !u.is_empty() => u.clone(),
            _ => return Err(ProviderError::KubernetesReview),
        };
        let attributes = self.claims_mapping.apply(user);
        let tenant = self
            .claims_mapping
            .tenant(user)
            .map_err(|_| ProviderError::InvalidTenant)?;
        Identity::new(username, attributes)
            .map(|id| id.with_tenant(tenant))
            .map_err(|_| ProviderError::KubernetesReview)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<Kubernetes, ConfigError> {
        Kubernetes::parse(Obj::new(&v, "auth.provider_config").unwrap())
    }

    fn answer(status: u16, body: &str) -> Result<Identity, ProviderError> {
        parse(json!({"tenant_claim": "extra.tenant"}))
            .unwrap()
            .interpret(Answer::Response {
                status,
                body: body.as_bytes(),
            })
    }

    #[test]
    fn ogx_defaults_and_the_request() {
        let k = parse(json!({})).unwrap();
        assert_eq!(
            k.endpoint.url,
            "https://kubernetes.default.svc/apis/authentication.k8s.io/v1/selfsubjectreviews"
        );
        assert_eq!(k.endpoint.cluster, "kubernetes.default.svc");
        let r = k.request("tok");
        assert_eq!(r.headers[0], ("authorization".into(), "Bearer tok".into()));
        let body: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(
            body,
            json!({"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"})
        );
        assert!(!format!("{r:?}").contains("tok"));
        let k = parse(json!({"api_server_url": "https://api.cluster:6443/", "cluster": "k8s"}))
            .unwrap();
        assert_eq!(k.endpoint.path, REVIEW_PATH);
        assert_eq!(k.endpoint.cluster, "k8s");
    }

    #[test]
    fn reviews_are_read_as_ogx_reads_them() {
        let id = answer(
            201,
            r#"{"kind": "SelfSubjectReview", "status": {"userInfo": {
                "username": "system:serviceaccount:ml:runner", "uid": "u1",
                "groups": ["system:serviceaccounts", "system:serviceaccounts:ml"],
                "extra": {"tenant": ["Acme"]}}}}"#,
        )
        .unwrap();
        assert_eq!(id.principal, "system:serviceaccount:ml:runner");
        assert_eq!(
            id.attributes["roles"],
            [
                "system:serviceaccount:ml:runner",
                "system:serviceaccounts",
                "system:serviceaccounts:ml"
            ]
        );
        // A list claim is no tenant in tollgate (OGX would take its first value).
        assert_eq!(id.tenant, None);
        assert_eq!(answer(401, "{}").unwrap_err().to_string(), "Invalid token");
        assert_eq!(
            answer(403, "{}").unwrap_err().to_string(),
            "Token validation failed: 403"
        );
        for bad in [
            "{}",
            r#"{"status": {}}"#,
            r#"{"status": {"userInfo": {"groups": ["g"]}}}"#,
            r#"{"status": {"userInfo": {"username": ""}}}"#,
            "not json",
        ] {
            assert_eq!(
                answer(201, bad).unwrap_err(),
                ProviderError::KubernetesReview,
                "{bad}"
            );
        }
        assert_eq!(answer(503, "").unwrap_err(), ProviderError::Unavailable);
        let k = parse(json!({})).unwrap();
        let throttled = Answer::Throttled {
            status: 429,
            body: b"{}",
        };
        assert_eq!(
            k.interpret(throttled).unwrap_err(),
            ProviderError::Unavailable
        );
    }
}
