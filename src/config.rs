//! Plugin configuration: parsed once in `on_configure`, refused with a message
//! naming the key when anything is wrong.
//!
//! The shape follows Llama Stack's `server.auth` / `server.quota`, so a team
//! can move its settings over unchanged in meaning. Both the older form
//! `{"auth": {"provider_type": T, "config": {...}}}` and the current
//! `{"auth": {"provider_config": {"type": T, ...}}}` are accepted.

use crate::alg::{Alg, AlgSet};
use crate::claims::ClaimsMapping;
use crate::json::{is_tchar, ConfigError, Obj};
use crate::provider::api_keys::ApiKeys;
use crate::provider::custom::Custom;
use crate::provider::github::GitHub;
use crate::provider::introspection::{Introspection, IntrospectionConfig};
use crate::provider::kubernetes::Kubernetes;
use crate::provider::{upstream_with, Upstream, CREDENTIALS_JWKS};
use crate::quota::QuotaConfig;
use crate::route_policy::RoutePolicy;
use crate::route_rules::{PublicPaths, RouteRules};
use serde_json::Value;

/// The whole plugin configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub auth: Option<Auth>,
    pub public_paths: PublicPaths,
    pub forward: Forward,
    /// Where a request's credential is read (`auth.credentials`), in order.
    pub credentials: Vec<CredentialSource>,
    /// OGX's `route_policy` (top level, or inside `auth`).
    pub route_policy: RoutePolicy,
    pub route_rules: RouteRules,
    pub quota: Option<QuotaConfig>,
    pub log_level: log::LevelFilter,
}

/// The authentication providers: one (`provider_config`), or several
/// (`auth.providers`), chosen per token by [`Auth::route`].
#[derive(Debug, Clone)]
pub struct Auth {
    /// In the configured order; never empty.
    pub providers: Vec<AuthConfig>,
}

/// Which provider a token goes to ([`Auth::route`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// The JWT provider of this index among [`Auth::jwts`].
    Jwt(usize),
    /// The fallbacks: the API keys, then the callout provider.
    Fallback,
}

impl Auth {
    /// One provider.
    pub fn single(provider: AuthConfig) -> Auth {
        Auth {
            providers: vec![provider],
        }
    }

    /// The JWT providers, in order: their index is their key set's.
    pub fn jwts(&self) -> impl Iterator<Item = &JwtConfig> {
        self.providers.iter().filter_map(AuthConfig::jwt)
    }

    /// The provider that answers by callout (at most one).
    pub fn callout(&self) -> Option<CalloutProvider<'_>> {
        self.providers.iter().find_map(AuthConfig::callout)
    }

    /// The static API keys (at most one provider).
    pub fn api_keys(&self) -> Option<&ApiKeys> {
        self.providers.iter().find_map(AuthConfig::api_keys)
    }

    /// Whether a provider is sent the request (the custom endpoint).
    pub fn sees_request(&self) -> bool {
        self.providers.iter().any(AuthConfig::sees_request)
    }

    /// The 401 message for a request without a token: the first provider's.
    pub fn missing_message(&self) -> String {
        self.providers
            .first()
            .map_or_else(String::new, AuthConfig::missing_message)
    }

    /// Where a token goes. One provider takes every token. With several, a
    /// JWT whose `iss` is a JWT provider's `issuer` goes to that provider;
    /// any other token to the fallbacks (`iss` of `None`: not a JWT).
    pub fn route(&self, iss: Option<&str>) -> Route {
        if self.providers.len() == 1 {
            return match self.providers.first() {
                Some(AuthConfig::Jwt(_)) => Route::Jwt(0),
                _ => Route::Fallback,
            };
        }
        iss.and_then(|iss| self.jwts().position(|j| j.issuer.as_deref() == Some(iss)))
            .map_or(Route::Fallback, Route::Jwt)
    }

    /// The one provider (tests).
    #[cfg(test)]
    pub fn only(self) -> AuthConfig {
        self.providers.into_iter().next().unwrap()
    }

    /// Whether tokens are routed by their `iss` (several providers, one of
    /// them a JWT provider).
    pub fn routes_by_issuer(&self) -> bool {
        self.providers.len() > 1 && self.jwts().next().is_some()
    }
}

/// One authentication provider.
#[derive(Debug, Clone)]
pub enum AuthConfig {
    /// `oauth2_token` with a JWKS.
    Jwt(JwtConfig),
    /// `oauth2_token` with RFC 7662 introspection.
    Introspection(IntrospectionConfig),
    /// `custom`: an endpoint that validates the token.
    Custom(Custom),
    /// `local_api_key`: static API keys.
    ApiKeys(ApiKeys),
    /// `kubernetes`: a `SelfSubjectReview` with the token.
    Kubernetes(Kubernetes),
    /// `github_token`: GitHub's `/user` and `/user/orgs` with the token.
    GitHub(GitHub),
}

/// Where a credential is read from (Envoy `jwt_authn`'s `from_headers`,
/// `from_cookies`, `from_params`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialPlace {
    /// A header (name lower case), with the prefix before the token
    /// (compared without regard to ASCII case).
    Header {
        name: String,
        prefix: Option<String>,
    },
    /// A cookie of the `Cookie` header.
    Cookie(String),
    /// A query parameter of the request target.
    Query(String),
}

/// One entry of `auth.credentials`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialSource {
    pub place: CredentialPlace,
}

impl CredentialSource {
    /// `Authorization: Bearer <token>`, the default, read with the
    /// Bearer rules of Llama Stack and OGX.
    pub fn is_bearer(&self) -> bool {
        matches!(&self.place, CredentialPlace::Header { name, prefix: Some(p) }
            if name == "authorization" && p.trim().eq_ignore_ascii_case("bearer"))
    }

    /// The header this source reads, if it is one.
    pub fn header(&self) -> Option<&str> {
        match &self.place {
            CredentialPlace::Header { name, .. } => Some(name),
            _ => None,
        }
    }

    /// The token of a value read from this source: a header's prefix (when
    /// there is one) removed, outer white space trimmed; `None` when the
    /// prefix is missing.
    pub fn token<'a>(&self, value: &'a [u8]) -> Option<&'a [u8]> {
        let v = value.trim_ascii();
        let rest = match &self.place {
            CredentialPlace::Header {
                prefix: Some(p), ..
            } => {
                let (head, rest) = v.split_at_checked(p.len())?;
                if !head.eq_ignore_ascii_case(p.as_bytes()) {
                    return None;
                }
                rest
            }
            _ => v,
        };
        Some(rest.trim_ascii())
    }
}

fn default_credentials() -> Vec<CredentialSource> {
    vec![CredentialSource {
        place: CredentialPlace::Header {
            name: "authorization".into(),
            prefix: Some("Bearer ".into()),
        },
    }]
}

fn parse_credentials(v: &Value, key: &str) -> Result<Vec<CredentialSource>, ConfigError> {
    let Value::Array(items) = v else {
        return Err(ConfigError::new(
            key,
            "must be a list of credential sources",
        ));
    };
    if items.is_empty() {
        return Err(ConfigError::new(key, "must not be empty"));
    }
    let mut out: Vec<CredentialSource> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let mut o = Obj::new(item, &format!("{key}[{i}]"))?;
        let header = o.nonempty_str("header")?.map(str::to_ascii_lowercase);
        let cookie = o.nonempty_str("cookie")?.map(str::to_string);
        let query = o.nonempty_str("query")?.map(str::to_string);
        let prefix = o.nonempty_str("prefix")?.map(str::to_string);
        let place = match (header, cookie, query) {
            (Some(name), None, None) => {
                if !name.bytes().all(is_tchar) || matches!(name.as_str(), "host" | "content-length")
                {
                    return Err(ConfigError::new(
                        o.path("header"),
                        "not a header a credential can be in",
                    ));
                }
                if prefix
                    .as_deref()
                    .is_some_and(|p| !p.bytes().all(|b| (0x20..0x7f).contains(&b)))
                {
                    return Err(ConfigError::new(
                        o.path("prefix"),
                        "must be printable ASCII",
                    ));
                }
                CredentialPlace::Header { name, prefix }
            }
            (None, Some(name), None) | (None, None, Some(name)) => {
                if prefix.is_some() {
                    return Err(ConfigError::new(
                        o.path("prefix"),
                        "only a header has a prefix",
                    ));
                }
                // RFC 6265 cookie-name / a query name: no separators.
                if !name.bytes().all(is_tchar) {
                    return Err(ConfigError::new(
                        format!("{key}[{i}]"),
                        "the name must be a token (letters, digits, !#$%&'*+-.^_`|~)",
                    ));
                }
                if o.has("cookie") {
                    CredentialPlace::Cookie(name)
                } else {
                    CredentialPlace::Query(name)
                }
            }
            (None, None, None) => {
                return Err(ConfigError::new(
                    format!("{key}[{i}]"),
                    "needs one of header, cookie or query",
                ))
            }
            _ => {
                return Err(ConfigError::new(
                    format!("{key}[{i}]"),
                    "give one of header, cookie or query",
                ))
            }
        };
        o.finish()?;
        if out.iter().any(|s| s.place == place) {
            return Err(ConfigError::new(
                format!("{key}[{i}]"),
                "the source is given twice",
            ));
        }
        out.push(CredentialSource { place });
    }
    Ok(out)
}

/// The 401 message for a request without a token (OAuth2 providers).
const OAUTH2_MISSING: &str = "Authentication required. Please provide a valid OAuth2 Bearer token";

/// A provider that answers through a callout.
#[derive(Debug, Clone, Copy)]
pub enum CalloutProvider<'a> {
    Introspection(&'a IntrospectionConfig),
    Custom(&'a Custom),
    Kubernetes(&'a Kubernetes),
    GitHub(&'a GitHub),
}

impl CalloutProvider<'_> {
    /// Its name in metrics (`provider` label).
    pub fn name(self) -> &'static str {
        match self {
            CalloutProvider::Introspection(_) => "introspection",
            CalloutProvider::Custom(_) => "custom",
            CalloutProvider::Kubernetes(_) => "kubernetes",
            CalloutProvider::GitHub(_) => "github",
        }
    }
}

/// The one place `AuthConfig` is taken apart: what the rest of the filter
/// asks of the provider.
impl AuthConfig {
    /// The JWT settings, when that is the provider.
    pub fn jwt(&self) -> Option<&JwtConfig> {
        match self {
            AuthConfig::Jwt(j) => Some(j),
            _ => None,
        }
    }

    /// The static API keys, when that is the provider.
    pub fn api_keys(&self) -> Option<&ApiKeys> {
        match self {
            AuthConfig::ApiKeys(k) => Some(k),
            _ => None,
        }
    }

    /// The callout provider, when it is one.
    pub fn callout(&self) -> Option<CalloutProvider<'_>> {
        match self {
            AuthConfig::Jwt(_) | AuthConfig::ApiKeys(_) => None,
            AuthConfig::Introspection(i) => Some(CalloutProvider::Introspection(i)),
            AuthConfig::Custom(c) => Some(CalloutProvider::Custom(c)),
            AuthConfig::Kubernetes(k) => Some(CalloutProvider::Kubernetes(k)),
            AuthConfig::GitHub(g) => Some(CalloutProvider::GitHub(g)),
        }
    }

    /// The claims mapping (the custom endpoint names attributes itself).
    pub fn claims_mapping(&self) -> Option<&ClaimsMapping> {
        match self {
            AuthConfig::Jwt(j) => Some(&j.claims_mapping),
            AuthConfig::Introspection(i) => Some(&i.claims_mapping),
            AuthConfig::Kubernetes(k) => Some(&k.claims_mapping),
            AuthConfig::GitHub(g) => Some(&g.claims_mapping),
            AuthConfig::Custom(_) | AuthConfig::ApiKeys(_) => None,
        }
    }

    /// The issuer named in the 401 for a missing token (OAuth2 providers).
    pub fn issuer(&self) -> Option<&str> {
        match self {
            AuthConfig::Jwt(j) => j.issuer.as_deref(),
            AuthConfig::Introspection(i) => i.issuer.as_deref(),
            AuthConfig::Custom(_)
            | AuthConfig::ApiKeys(_)
            | AuthConfig::Kubernetes(_)
            | AuthConfig::GitHub(_) => None,
        }
    }

    /// The 401 message for a request without a token.
    pub fn missing_message(&self) -> String {
        match (self, self.issuer()) {
            (AuthConfig::Custom(c), _) => c.missing_message(),
            (AuthConfig::GitHub(_), _) => crate::provider::github::MISSING.to_string(),
            // OGX's base provider message.
            (AuthConfig::ApiKeys(_) | AuthConfig::Kubernetes(_), _) => {
                "Authentication required".to_string()
            }
            (_, Some(iss)) => format!("{OAUTH2_MISSING} from {iss}"),
            (_, None) => OAUTH2_MISSING.to_string(),
        }
    }

    /// Whether the provider is sent the request's path, query and headers
    /// (the custom endpoint).
    pub fn sees_request(&self) -> bool {
        matches!(self, AuthConfig::Custom(_))
    }
}

/// `oauth2_token` with a JWKS.
#[derive(Debug, Clone)]
pub struct JwtConfig {
    pub audiences: Vec<String>,
    pub issuer: Option<String>,
    pub claims_mapping: ClaimsMapping,
    pub clock_skew_seconds: u64,
    /// The `alg`s a token may have (`algorithms`; default: every supported one).
    pub algorithms: AlgSet,
    pub jwks: Upstream,
    /// Seconds a fetched key set is used before it is fetched again.
    pub cache_ttl: u64,
    /// Minimum seconds between refreshes caused by an unknown `kid`.
    pub refresh_cooldown_seconds: u64,
    /// Bearer token sent to the JWKS endpoint, if any.
    pub jwks_token: Option<String>,
    /// How long past `cache_ttl` the last good key set is still used while
    /// refreshes fail.
    pub max_stale_seconds: u64,
}

/// Identity forwarded to the upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    pub principal_header: String,
    pub attributes_header: String,
    /// Carries the tenant id (OGX's `upstream_header` `tenant_header`).
    pub tenant_header: String,
    /// Per-category headers (OGX's `attribute_headers`): header → category;
    /// those categories then leave `attributes_header`.
    pub attribute_headers: Vec<(String, String)>,
    /// Removes the credential before the upstream: `Authorization` and
    /// every header of `auth.credentials`.
    pub strip_authorization: bool,
    /// The headers of `auth.credentials` (not configuration of `forward`).
    pub credential_headers: Vec<String>,
}

impl Default for Forward {
    fn default() -> Self {
        Forward {
            principal_header: "x-auth-principal".into(),
            attributes_header: "x-auth-attributes".into(),
            tenant_header: "x-auth-tenant".into(),
            attribute_headers: Vec::new(),
            strip_authorization: false,
            credential_headers: vec!["authorization".into()],
        }
    }
}

impl Forward {
    /// Every header tollgate forwards an identity in: clients' copies of
    /// them (in any spelling) never reach the upstream.
    pub fn identity_headers(&self) -> impl Iterator<Item = &str> {
        [
            self.principal_header.as_str(),
            self.attributes_header.as_str(),
            self.tenant_header.as_str(),
        ]
        .into_iter()
        .chain(self.attribute_headers.iter().map(|(h, _)| h.as_str()))
    }
}

pub const DEFAULT_AUDIENCE: &str = "llama-stack";
pub const DEFAULT_CACHE_TTL: u64 = 3600;
pub const DEFAULT_TIMEOUT_MS: u64 = 5000;
/// No leeway for `exp`, `nbf`, `iat` unless configured (Llama Stack's and OGX's meaning).
pub const DEFAULT_CLOCK_SKEW: u64 = 0;
pub const DEFAULT_REFRESH_COOLDOWN: u64 = 10;
pub const DEFAULT_MAX_STALE: u64 = 86400;
/// Seconds an introspection or custom answer is cached by default.
pub const DEFAULT_DECISION_CACHE_TTL: u64 = 30;
const MAX_SECONDS: u64 = 10 * 365 * 86400;
const MAX_TIMEOUT_MS: u64 = 600_000;

impl Config {
    /// Whether a decision reads the request path: public paths, route rules,
    /// token budgets and the custom provider (which forwards it) do. Without them the path
    /// is not read or checked at all (see the README's path normalisation).
    pub fn needs_path(&self) -> bool {
        !self.public_paths.is_empty()
            || !self.route_rules.is_empty()
            || !self.route_policy.is_empty()
            || self
                .credentials
                .iter()
                .any(|c| matches!(c.place, CredentialPlace::Query(_)))
            || self.auth.as_ref().is_some_and(Auth::sees_request)
            || self.counts_tokens()
    }

    /// Whether a decision reads the request method: route rules and token
    /// budgets do.
    pub fn needs_method(&self) -> bool {
        !self.route_rules.is_empty() || self.counts_tokens()
    }

    /// The metric labels of the token budget's paths (none without one).
    pub fn token_path_labels(&self) -> Vec<String> {
        self.quota
            .as_ref()
            .and_then(|q| q.tokens.as_ref())
            .map(|t| t.path_labels())
            .unwrap_or_default()
    }

    /// Whether `quota.tokens` is configured.
    pub fn counts_tokens(&self) -> bool {
        self.quota.as_ref().is_some_and(|q| q.tokens.is_some())
    }

    /// Whether a request to this (normalised) path is counted by the
    /// client's address: with quotas on, anonymous requests are (no `auth`,
    /// or a public path); authenticated ones are counted by principal.
    pub fn counts_by_address(&self, path: &str) -> bool {
        self.quota.is_some() && (self.auth.is_none() || self.public_paths.matches(path))
    }

    /// Parses the plugin configuration bytes (a JSON object; empty means `{}`).
    pub fn parse(bytes: &[u8]) -> Result<Config, ConfigError> {
        let text = std::str::from_utf8(bytes)
            .map_err(|_| ConfigError::new("", "the configuration is not UTF-8"))?;
        let value: Value = if text.trim().is_empty() {
            Value::Object(Default::default())
        } else {
            serde_json::from_str(text)
                .map_err(|e| ConfigError::new("", format!("invalid JSON: {e}")))?
        };
        Self::from_value(&value)
    }

    pub fn from_value(value: &Value) -> Result<Config, ConfigError> {
        let mut top = Obj::new(value, "")?;
        let log_level = match top.str("log_level")? {
            None => log::LevelFilter::Info,
            Some(s) => parse_log_level(s).ok_or_else(|| {
                ConfigError::new(
                    "log_level",
                    "expected one of trace, debug, info, warn, error, off",
                )
            })?,
        };
        let public_list = top.str_list("public_paths")?.unwrap_or_default();
        let public_paths = PublicPaths::parse(&public_list, "public_paths")?;
        let forward = match top.obj("forward")? {
            None => Forward::default(),
            Some(o) => parse_forward(o)?,
        };
        let (auth, auth_route_policy, credentials) = match top.obj("auth")? {
            None => (None, None, default_credentials()),
            Some(o) => {
                let (auth, policy, credentials) = parse_auth(o)?;
                (Some(auth), policy, credentials)
            }
        };
        let mut forward = forward;
        forward.credential_headers = std::iter::once("authorization".to_string())
            .chain(
                credentials
                    .iter()
                    .filter_map(|c| c.header().map(str::to_string)),
            )
            .fold(Vec::new(), |mut all, h| {
                if !all.contains(&h) {
                    all.push(h);
                }
                all
            });
        let route_policy = match (top.get("route_policy"), auth_route_policy) {
            (Some(_), Some(inner)) if !inner.is_empty() => {
                return Err(ConfigError::new(
                    "route_policy",
                    "given both here and in auth.route_policy: keep one",
                ))
            }
            (Some(v), _) => RoutePolicy::parse(v, "route_policy")?,
            (None, inner) => inner.unwrap_or_default(),
        };
        let route_rules = match top.get("route_scopes") {
            None => RouteRules::default(),
            Some(v) => RouteRules::parse(v, "route_scopes", &public_paths)?,
        };
        if !route_rules.is_empty() && auth.is_none() {
            return Err(ConfigError::new(
                "route_scopes",
                "route rules need an `auth` provider to identify callers",
            ));
        }
        for warning in rule_warnings(auth.as_ref(), top.get("route_scopes")) {
            log::warn!("{warning}");
        }
        let quota = match top.get("quota") {
            None => None,
            Some(v) => Some(QuotaConfig::parse(v, "quota")?),
        };
        top.finish()?;
        Ok(Config {
            auth,
            public_paths,
            forward,
            credentials,
            route_policy,
            route_rules,
            quota,
            log_level,
        })
    }
}

/// Configure-time warnings about the route rules (`route_scopes`, already
/// parsed): a rule requiring `roles` while the default `claims_mapping`,
/// which maps the caller's own name into `roles`, is in force.
fn rule_warnings(auth: Option<&Auth>, route_scopes: Option<&Value>) -> Vec<String> {
    let defaulted = auth
        .into_iter()
        .flat_map(|a| a.providers.iter())
        .filter_map(AuthConfig::claims_mapping)
        .any(ClaimsMapping::is_default);
    if !defaulted {
        return Vec::new();
    }
    let rules = route_scopes.and_then(Value::as_array);
    rules
        .into_iter()
        .flatten()
        .enumerate()
        .filter(|(_, rule)| {
            rule.get("required_attributes")
                .and_then(Value::as_object)
                .is_some_and(|a| a.contains_key("roles"))
        })
        .map(|(i, _)| {
            format!(
                "route_scopes[{i}].required_attributes.roles: the default claims_mapping puts the \
                 caller's `sub` and `username` into `roles`, so a user named e.g. `admin` \
                 satisfies `\"roles\": [\"admin\"]`; set `claims_mapping` to take \
                 roles from a claim the identity provider controls (e.g. \
                 {{\"realm_access.roles\": \"roles\"}})"
            )
        })
        .collect()
}

fn parse_log_level(s: &str) -> Option<log::LevelFilter> {
    Some(match s.to_ascii_lowercase().as_str() {
        "trace" => log::LevelFilter::Trace,
        "debug" => log::LevelFilter::Debug,
        "info" => log::LevelFilter::Info,
        "warn" | "warning" => log::LevelFilter::Warn,
        "error" | "critical" => log::LevelFilter::Error,
        "off" => log::LevelFilter::Off,
        _ => return None,
    })
}

fn parse_forward(mut o: Obj) -> Result<Forward, ConfigError> {
    let d = Forward::default();
    let principal_header = header_name(&mut o, "principal_header")?.unwrap_or(d.principal_header);
    let attributes_header =
        header_name(&mut o, "attributes_header")?.unwrap_or(d.attributes_header);
    if principal_header == attributes_header {
        return Err(ConfigError::new(
            o.path("attributes_header"),
            "must differ from principal_header",
        ));
    }
    let tenant_header = header_name(&mut o, "tenant_header")?.unwrap_or(d.tenant_header);
    let mut attribute_headers = Vec::new();
    if let Some(mut map) = o.obj("attribute_headers")? {
        for header in map.keys() {
            let path = map.path(&header);
            let category = map
                .nonempty_str(&header)?
                .ok_or_else(|| ConfigError::new(path.clone(), "must be a category name"))?
                .to_string();
            if header.is_empty() || !header.bytes().all(is_tchar) {
                return Err(ConfigError::new(path, "not a valid header name"));
            }
            let lower = header.to_ascii_lowercase();
            if matches!(lower.as_str(), "authorization" | "host" | "content-length") {
                return Err(ConfigError::new(path, "this header cannot be used"));
            }
            attribute_headers.push((lower, category));
        }
        map.finish()?;
    }
    let strip_authorization = o.bool("strip_authorization")?.unwrap_or(false);
    let forward = Forward {
        principal_header,
        attributes_header,
        tenant_header,
        attribute_headers,
        strip_authorization,
        credential_headers: d.credential_headers,
    };
    // Each identity header carries one thing.
    let names: Vec<&str> = forward.identity_headers().collect();
    for (i, name) in names.iter().enumerate() {
        if names.iter().take(i).any(|n| n == name) {
            return Err(ConfigError::new(
                o.own_path(),
                format!("the header {name:?} is given twice"),
            ));
        }
    }
    o.finish()?;
    Ok(forward)
}

/// A header name: an RFC 9110 token, stored lower-case; never a pseudo-header
/// or `authorization`.
fn header_name(o: &mut Obj, key: &str) -> Result<Option<String>, ConfigError> {
    let Some(name) = o.nonempty_str(key)? else {
        return Ok(None);
    };
    if !name.bytes().all(is_tchar) {
        return Err(ConfigError::new(o.path(key), "not a valid header name"));
    }
    let lower = name.to_ascii_lowercase();
    if matches!(lower.as_str(), "authorization" | "host" | "content-length") {
        return Err(ConfigError::new(o.path(key), "this header cannot be used"));
    }
    Ok(Some(lower))
}

/// `auth`, the `route_policy` pasted inside it (OGX's `server.auth`) and
/// where credentials are read (`credentials`).
type ParsedAuth = (Auth, Option<RoutePolicy>, Vec<CredentialSource>);

fn parse_auth(mut o: Obj) -> Result<ParsedAuth, ConfigError> {
    // Their dumps carry empty lists (no rules); only rules are refused.
    if o.array("access_policy")?
        .is_some_and(|rules| !rules.is_empty())
    {
        return Err(ConfigError::new(
            o.path("access_policy"),
            "Llama Stack's resource access policies are not supported; use `route_policy` or `route_scopes` per route",
        ));
    }
    let route_policy = match o.get("route_policy") {
        Some(v) => Some(RoutePolicy::parse(v, &o.path("route_policy"))?),
        None => None,
    };
    let credentials = match o.get("credentials") {
        Some(v) => parse_credentials(v, &o.path("credentials"))?,
        None => default_credentials(),
    };
    if o.has("providers") {
        if o.has("provider_config") || o.has("provider_type") || o.has("config") {
            return Err(ConfigError::new(
                o.path("providers"),
                "use either providers or one provider (provider_config, provider_type), not both",
            ));
        }
        let auth = parse_providers(&mut o)?;
        o.finish()?;
        return Ok((auth, route_policy, credentials));
    }
    parse_provider_of(o).map(|auth| (Auth::single(auth), route_policy, credentials))
}

/// `auth.providers`: a list of OGX `provider_config` objects. JWT providers
/// are told apart by `issuer`; the others are fallbacks, tried in order, and
/// the one that answers by callout (its answer is final) must come last.
fn parse_providers(o: &mut Obj) -> Result<Auth, ConfigError> {
    let key = o.path("providers");
    let Some(items) = o.array("providers")? else {
        return Err(ConfigError::new(
            key,
            "must be a list of provider configurations",
        ));
    };
    if items.is_empty() {
        return Err(ConfigError::new(key, "must not be empty"));
    }
    let mut providers: Vec<AuthConfig> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let at = format!("{key}[{i}]");
        let mut inner = Obj::new(item, &at)?;
        let kind = inner
            .nonempty_str("type")?
            .ok_or_else(|| ConfigError::new(inner.path("type"), "missing"))?;
        let provider = parse_provider(kind, &inner.path("type"), inner)?;
        if providers.iter().any(|p| p.callout().is_some()) {
            return Err(ConfigError::new(
                at,
                "comes after a provider that answers by callout (introspection, custom, kubernetes, github_token), whose answer is final: put that one last",
            ));
        }
        if provider.api_keys().is_some() && providers.iter().any(|p| p.api_keys().is_some()) {
            return Err(ConfigError::new(
                at,
                "a second local_api_key provider: put all keys in one",
            ));
        }
        providers.push(provider);
    }
    if providers.len() > 1 {
        let mut seen: Vec<&str> = Vec::new();
        for (i, p) in providers.iter().enumerate() {
            let Some(jwt) = p.jwt() else { continue };
            let at = format!("{key}[{i}].issuer");
            let Some(iss) = jwt.issuer.as_deref() else {
                return Err(ConfigError::new(
                    at,
                    "missing: with several providers a JWT is routed by its `iss`, so every oauth2_token provider with jwks names its issuer",
                ));
            };
            if seen.contains(&iss) {
                return Err(ConfigError::new(at, "another provider has this issuer"));
            }
            seen.push(iss);
        }
    }
    Ok(Auth { providers })
}

fn parse_provider_of(mut o: Obj) -> Result<AuthConfig, ConfigError> {
    // Llama Stack's current form: {"provider_config": {"type": T, ...}}.
    if o.has("provider_config") {
        if o.has("provider_type") || o.has("config") {
            return Err(ConfigError::new(
                o.path("provider_config"),
                "use either provider_config or provider_type/config, not both",
            ));
        }
        let Some(mut inner) = o.obj("provider_config")? else {
            return Err(ConfigError::new(o.path("provider_config"), "missing"));
        };
        o.finish()?;
        let kind = inner
            .nonempty_str("type")?
            .ok_or_else(|| ConfigError::new(inner.path("type"), "missing"))?;
        return parse_provider(kind, &inner.path("type"), inner);
    }
    let kind = o
        .nonempty_str("provider_type")?
        .ok_or_else(|| ConfigError::new(o.path("provider_type"), "missing"))?;
    let kind_path = o.path("provider_type");
    let config_path = o.path("config");
    let empty = Value::Object(Default::default());
    let inner = match o.get("config") {
        None => Obj::new(&empty, &config_path)?,
        Some(v) => Obj::new(v, &config_path)?,
    };
    let auth = parse_provider(kind, &kind_path, inner)?;
    o.finish()?;
    Ok(auth)
}

fn parse_provider(kind: &str, kind_path: &str, o: Obj) -> Result<AuthConfig, ConfigError> {
    match kind {
        "oauth2_token" => parse_oauth2(o),
        "custom" => Ok(AuthConfig::Custom(Custom::parse(o)?)),
        "local_api_key" => Ok(AuthConfig::ApiKeys(ApiKeys::parse(o)?)),
        "kubernetes" => Ok(AuthConfig::Kubernetes(Kubernetes::parse(o)?)),
        "github_token" => Ok(AuthConfig::GitHub(GitHub::parse(o)?)),
        other => Err(ConfigError::new(
            kind_path,
            format!(
                "unknown provider `{other}`; expected oauth2_token, custom, local_api_key, kubernetes or github_token"
            ),
        )),
    }
}

fn parse_oauth2(mut o: Obj) -> Result<AuthConfig, ConfigError> {
    let has_jwks = o.has("jwks");
    let has_introspection = o.has("introspection");
    if has_jwks == has_introspection {
        return Err(ConfigError::new(
            o.own_path(),
            "exactly one of `jwks` and `introspection` must be set",
        ));
    }
    // Set explicitly, it is checked by both sources; the default only by JWT.
    let audience = o.str_or_list("audience")?;
    if audience.as_ref().is_some_and(Vec::is_empty) {
        return Err(ConfigError::new(o.path("audience"), "must not be empty"));
    }
    let issuer = o.nonempty_str("issuer")?.map(str::to_string);
    let mut claims_mapping = match o.obj("claims_mapping")? {
        None => ClaimsMapping::llama_stack_default(),
        Some(m) => ClaimsMapping::parse(m)?,
    };
    // OGX: the claim (or introspection field) holding the tenant id.
    claims_mapping.tenant_claim = o.nonempty_str("tenant_claim")?.map(str::to_string);
    // No leeway unless asked, as in Llama Stack and OGX.
    let clock_skew_seconds = o
        .u64_max("clock_skew_seconds", 86400)?
        .unwrap_or(DEFAULT_CLOCK_SKEW);
    let algorithms = parse_algorithms(&mut o, has_introspection)?;
    // Llama Stack's TLS settings belong to the Envoy cluster here.
    if let Some(v) = o.bool("verify_tls")? {
        log::warn!("auth.config.verify_tls={v}: TLS to the identity provider is configured on the Envoy cluster");
    }
    if o.str("tls_cafile")?.is_some() {
        log::warn!("auth.config.tls_cafile: TLS to the identity provider is configured on the Envoy cluster");
    }
    if has_introspection {
        let Some(i) = o.obj("introspection")? else {
            return Err(ConfigError::new(o.path("introspection"), "missing"));
        };
        let mut introspection = Introspection::parse(i)?;
        introspection.audiences = audience;
        let cache_ttl = o
            .u64_max("cache_ttl", MAX_SECONDS)?
            .unwrap_or(DEFAULT_DECISION_CACHE_TTL);
        o.finish()?;
        return Ok(AuthConfig::Introspection(IntrospectionConfig {
            introspection,
            claims_mapping,
            clock_skew_seconds,
            cache_ttl,
            issuer,
        }));
    }
    let Some(mut j) = o.obj("jwks")? else {
        return Err(ConfigError::new(o.path("jwks"), "missing"));
    };
    let uri = j
        .nonempty_str("uri")?
        .ok_or_else(|| ConfigError::new(j.path("uri"), "missing"))?;
    let uri_path = j.path("uri");
    let cluster = j.nonempty_str("cluster")?.map(str::to_string);
    let timeout_ms = j
        .u64_max("timeout_ms", MAX_TIMEOUT_MS)?
        .unwrap_or(DEFAULT_TIMEOUT_MS);
    if timeout_ms == 0 {
        return Err(ConfigError::new(j.path("timeout_ms"), "must be at least 1"));
    }
    let jwks = upstream_with(uri, &uri_path, cluster, timeout_ms, CREDENTIALS_JWKS)?;
    let ttl = j.u64_max("cache_ttl", MAX_SECONDS)?;
    let recheck = j.u64_max("key_recheck_period", MAX_SECONDS)?;
    if ttl.is_some() && recheck.is_some() {
        return Err(ConfigError::new(
            j.path("key_recheck_period"),
            "an alias of cache_ttl; set only one of them",
        ));
    }
    let cache_ttl = ttl.or(recheck).unwrap_or(DEFAULT_CACHE_TTL).max(1);
    let refresh_cooldown_seconds = j
        .u64_max("refresh_cooldown_seconds", 86400)?
        .unwrap_or(DEFAULT_REFRESH_COOLDOWN);
    if refresh_cooldown_seconds == 0 {
        // A request that waited for a refresh must not start another one.
        return Err(ConfigError::new(
            j.path("refresh_cooldown_seconds"),
            "must be at least 1",
        ));
    }
    let jwks_token = j.nonempty_str("token")?.map(str::to_string);
    let max_stale_seconds = j
        .u64_max("max_stale_seconds", MAX_SECONDS)?
        .unwrap_or(DEFAULT_MAX_STALE);
    j.finish()?;
    o.finish()?;
    Ok(AuthConfig::Jwt(JwtConfig {
        audiences: audience.unwrap_or_else(|| vec![DEFAULT_AUDIENCE.to_string()]),
        issuer,
        claims_mapping,
        clock_skew_seconds,
        algorithms,
        jwks,
        cache_ttl,
        refresh_cooldown_seconds,
        jwks_token,
        max_stale_seconds,
    }))
}

/// `algorithms`: a non-empty list of supported `alg` names (JWKS only).
fn parse_algorithms(o: &mut Obj, has_introspection: bool) -> Result<AlgSet, ConfigError> {
    let key = o.path("algorithms");
    let Some(names) = o.str_list("algorithms")? else {
        return Ok(AlgSet::ALL);
    };
    if has_introspection {
        return Err(ConfigError::new(key, "applies to `jwks` only"));
    }
    if names.is_empty() {
        return Err(ConfigError::new(key, "must not be empty"));
    }
    let mut set = AlgSet::NONE;
    for (i, name) in names.iter().enumerate() {
        let alg = Alg::parse(name).ok_or_else(|| {
            ConfigError::new(
                format!("{key}[{i}]"),
                format!(
                    "`{name}` is not supported; expected some of {}",
                    Alg::NAMES.join(", ")
                ),
            )
        })?;
        set = set.with(alg);
    }
    Ok(set)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn jwt_example() -> Value {
        json!({"auth": {"provider_type": "oauth2_token",
          "config": {"audience": "llama-stack", "issuer": "https://idp.example",
                     "claims_mapping": {"sub": "roles", "groups": "teams", "scope": "scopes"},
                     "clock_skew_seconds": 60,
                     "jwks": {"uri": "https://idp.example/jwks", "cluster": "idp",
                              "cache_ttl": 3600, "timeout_ms": 5000, "token": null}}},
         "public_paths": ["/v1/health"],
         "forward": {"principal_header": "x-auth-principal", "attributes_header": "x-auth-attributes",
                     "strip_authorization": false}})
    }

    fn err(v: Value) -> ConfigError {
        Config::from_value(&v).unwrap_err()
    }

    #[test]
    fn several_providers_and_their_errors() {
        let jwt = |iss: Option<&str>| {
            let mut p = json!({"type": "oauth2_token", "jwks": {"uri": "http://idp/jwks"}});
            if let Some(i) = iss {
                p["issuer"] = json!(i);
            }
            p
        };
        let keys = json!({"type": "local_api_key", "api_keys": ["k"]});
        let intro = json!({"type": "oauth2_token", "introspection": {"url": "http://idp/i"}});
        let gh = json!({"type": "github_token"});
        let ok = Config::from_value(&json!({"auth": {"providers": [
            jwt(Some("a")), jwt(Some("b")), keys, gh]}}))
        .unwrap();
        let auth = ok.auth.unwrap();
        assert_eq!(auth.jwts().count(), 2);
        assert_eq!(auth.route(Some("b")), Route::Jwt(1));
        assert_eq!(auth.route(Some("c")), Route::Fallback);
        assert_eq!(auth.route(None), Route::Fallback);
        assert!(matches!(auth.callout(), Some(CalloutProvider::GitHub(_))));
        // One JWT provider alone takes every token, issuer or not.
        let one = Config::from_value(&json!({"auth": {"providers": [jwt(None)]}})).unwrap();
        assert_eq!(one.auth.unwrap().route(Some("x")), Route::Jwt(0));
        for (providers, key) in [
            (json!([]), "auth.providers"),
            (json!({}), "auth.providers"),
            (
                json!([jwt(Some("a")), jwt(None)]),
                "auth.providers[1].issuer",
            ),
            (json!([jwt(None), keys]), "auth.providers[0].issuer"),
            (
                json!([jwt(Some("a")), jwt(Some("a"))]),
                "auth.providers[1].issuer",
            ),
            (json!([intro, gh]), "auth.providers[1]"),
            (json!([gh, keys]), "auth.providers[1]"),
            (json!([keys, keys]), "auth.providers[1]"),
            (json!([{"type": "saml"}]), "auth.providers[0].type"),
            (
                json!([{"type": "github_token", "x": 1}]),
                "auth.providers[0].x",
            ),
        ] {
            let e = err(json!({"auth": {"providers": providers}}));
            assert_eq!(e.key, key, "{e}");
        }
        let both = err(json!({"auth": {"providers": [keys],
            "provider_config": {"type": "local_api_key", "api_keys": ["k"]}}}));
        assert_eq!(both.key, "auth.providers");
    }

    #[test]
    fn every_log_level_name() {
        use log::LevelFilter::*;
        for (name, level) in [
            ("trace", Trace),
            ("debug", Debug),
            ("info", Info),
            ("warn", Warn),
            ("warning", Warn),
            ("error", Error),
            ("critical", Error),
            ("off", Off),
        ] {
            let mut v = jwt_example();
            v["log_level"] = json!(name);
            assert_eq!(Config::from_value(&v).unwrap().log_level, level, "{name}");
        }
    }

    #[test]
    fn durations_are_capped_at_ten_years() {
        let ten_years = 10 * 365 * 86400;
        let mut v = jwt_example();
        v["auth"]["config"]["jwks"]["cache_ttl"] = json!(ten_years);
        assert!(Config::from_value(&v).is_ok());
        v["auth"]["config"]["jwks"]["cache_ttl"] = json!(ten_years + 1);
        assert_eq!(err(v).key, "auth.config.jwks.cache_ttl");
        let custom = |ttl: u64| {
            json!({"auth": {"provider_type": "custom", "config": {
                "endpoint": "http://authsvc/validate", "cache_ttl": ttl}}})
        };
        assert!(Config::from_value(&custom(ten_years)).is_ok());
        assert_eq!(err(custom(ten_years + 1)).key, "auth.config.cache_ttl");
    }

    #[test]
    fn oauth2_needs_exactly_one_of_jwks_and_introspection() {
        let mut v = jwt_example();
        v["auth"]["config"].as_object_mut().unwrap().remove("jwks");
        let e = err(v);
        assert_eq!(e.key, "auth.config");
        assert!(
            e.to_string()
                .contains("exactly one of `jwks` and `introspection`"),
            "{e}"
        );
        let mut v = jwt_example();
        v["auth"]["config"]["introspection"] = json!({"url": "http://idp/introspect",
            "client_id": "c", "client_secret": "s"});
        assert_eq!(err(v).key, "auth.config");
    }

    #[test]
    fn provider_config_excludes_both_other_forms() {
        for other in ["provider_type", "config"] {
            let mut v = json!({"auth": {"provider_config": {"type": "custom",
                "endpoint": "http://authsvc/validate"}}});
            v["auth"][other] = json!("x");
            assert_eq!(err(v).key, "auth.provider_config", "{other}");
        }
    }

    #[test]
    fn urls_need_a_valid_host_and_a_printable_path() {
        let with_uri = |uri: &str| {
            let mut v = jwt_example();
            v["auth"]["config"]["jwks"]["uri"] = json!(uri);
            Config::from_value(&v)
        };
        assert!(with_uri("https://idp.example:8443/jwks?x=1").is_ok());
        for bad in [
            "https:///jwks",
            "https://idp example/jwks",
            "https://idp.example/a b",
            "https://idp.example/jwks#frag",
            "https://idp.example/\u{e9}",
        ] {
            assert_eq!(
                with_uri(bad).unwrap_err().key,
                "auth.config.jwks.uri",
                "{bad}"
            );
        }
    }

    #[test]
    fn urls_with_credentials_are_refused_without_repeating_them() {
        let jwks = |uri: &str| {
            let mut v = jwt_example();
            v["auth"]["config"]["jwks"]["uri"] = json!(uri);
            v
        };
        let introspection = |url: &str| {
            json!({"auth": {"provider_config": {"type": "oauth2_token",
                "introspection": {"url": url}}}})
        };
        let custom =
            |url: &str| json!({"auth": {"provider_type": "custom", "config": {"endpoint": url}}});
        type Build = fn(&str) -> Value;
        let cases: [(Build, &str, &str); 3] = [
            (jwks, "auth.config.jwks.uri", "`jwks.token`"),
            (
                introspection,
                "auth.provider_config.introspection.url",
                "`introspection.client_id` and `client_secret`",
            ),
            (custom, "auth.config.endpoint", "no credentials of its own"),
        ];
        for (build, key, instead) in cases {
            for url in [
                "https://alice:pa55word@idp.example/x",
                "https://alice:pa55word@idp.example",
                "http://alice@idp.example:8080/x",
                "https://@idp.example/x",
                "https://alice:pa55word@[::1]:8443/x",
                "https://alice:pa%40ss@idp.example/x",
            ] {
                let e = err(build(url));
                assert_eq!(e.key, key, "{url}");
                let shown = e.to_string();
                assert!(shown.contains("must not carry credentials"), "{shown}");
                assert!(shown.contains(instead), "{shown}");
                assert!(
                    !shown.contains("pa55") && !shown.contains("alice"),
                    "{shown}"
                );
            }
            // `@` in the path or query is no userinfo.
            assert!(Config::from_value(&build("https://idp.example/x@y?u=a@b")).is_ok());
        }
    }

    #[test]
    fn url_authorities_are_host_and_port() {
        let with_uri = |uri: &str| {
            let mut v = jwt_example();
            v["auth"]["config"]["jwks"]["uri"] = json!(uri);
            Config::from_value(&v)
        };
        for good in [
            "http://idp/jwks",
            "http://idp_1.local:8080/jwks",
            "http://127.0.0.1:65535/jwks",
            "http://[::1]/jwks",
            "http://[2001:db8::1]:8443/jwks",
        ] {
            assert!(with_uri(good).is_ok(), "{good}");
        }
        for bad in [
            "http://idp:/jwks",
            "http://idp:port/jwks",
            "http://idp:123456/jwks",
            "http://idp:80:80/jwks",
            "http://:80/jwks",
            "http://[::1/jwks",
            "http://[]/jwks",
            "http://[::1]x/jwks",
            "http://[fe80::1%eth0]/jwks",
            "http://user:pa/ss@idp/jwks",
            "http://idp?x=1",
        ] {
            let e = with_uri(bad).unwrap_err();
            assert_eq!(e.key, "auth.config.jwks.uri", "{bad}");
            assert_eq!(e.reason, "the URL has no valid host", "{bad}");
        }
    }

    #[test]
    fn an_explicit_audience_is_checked_by_introspection() {
        let with = |audience: Value| {
            let v = json!({"auth": {"provider_config": {"type": "oauth2_token",
                "introspection": {"url": "http://idp/i"}, "audience": audience}}});
            match Config::from_value(&v).unwrap().auth.map(Auth::only) {
                Some(AuthConfig::Introspection(i)) => i.introspection.audiences,
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(with(Value::Null), None, "unset: not checked");
        assert_eq!(with(json!("llama-stack")), Some(vec!["llama-stack".into()]));
        assert_eq!(
            with(json!(["a", "b"])),
            Some(vec!["a".to_string(), "b".to_string()])
        );
        let v = json!({"auth": {"provider_config": {"type": "oauth2_token",
            "introspection": {"url": "http://idp/i"}, "audience": []}}});
        assert_eq!(err(v).key, "auth.provider_config.audience");
    }

    #[test]
    fn roles_rules_under_the_default_mapping_are_warned_about() {
        let warnings = |v: &Value| {
            let c = Config::from_value(v).unwrap();
            rule_warnings(c.auth.as_ref(), v.get("route_scopes"))
        };
        let rules = json!([
            {"path_prefix": "/v1/admin/", "required_scope": "admin"},
            {"path": "/v1/models", "required_attributes": {"roles": ["admin"]}},
            {"path": "/v1/teams", "required_attributes": {"teams": ["ml"]}},
            {"path": "/v1/x", "required_attributes": {"teams": ["ml"], "roles": ["ops"]}}
        ]);
        let mut v = jwt_example();
        v["route_scopes"] = rules.clone();
        assert!(warnings(&v).is_empty(), "claims_mapping is set");
        v["auth"]["config"]["claims_mapping"] = Value::Null;
        let w = warnings(&v);
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].starts_with("route_scopes[1].required_attributes.roles: "));
        assert!(w[1].starts_with("route_scopes[3].required_attributes.roles: "));
        assert!(w[0].contains("the default claims_mapping puts"), "{}", w[0]);
        assert!(
            w[0].contains("`sub` and `username` into `roles`"),
            "{}",
            w[0]
        );
        assert!(w[0].contains("set `claims_mapping`"), "{}", w[0]);
        let intro = json!({"auth": {"provider_config": {"type": "oauth2_token",
            "introspection": {"url": "http://idp/i"}}}, "route_scopes": rules});
        assert_eq!(warnings(&intro).len(), 2);
        let mut no_roles = jwt_example();
        no_roles["auth"]["config"]["claims_mapping"] = Value::Null;
        no_roles["route_scopes"] = json!([{"path": "/a", "required_attributes": {"teams": ["t"]}}]);
        assert!(warnings(&no_roles).is_empty());
        let custom = json!({"auth": {"provider_type": "custom",
            "config": {"endpoint": "http://a/v"}}, "route_scopes": rules});
        assert!(warnings(&custom).is_empty(), "no claims_mapping there");
    }

    #[test]
    fn parses_the_documented_example() {
        let c = Config::from_value(&jwt_example()).unwrap();
        let Some(AuthConfig::Jwt(j)) = c.auth.map(Auth::only) else {
            panic!("no jwt")
        };
        assert_eq!(j.audiences, vec!["llama-stack"]);
        assert_eq!(j.issuer.as_deref(), Some("https://idp.example"));
        assert_eq!(j.jwks.cluster, "idp");
        assert_eq!(j.jwks.path, "/jwks");
        assert_eq!(j.jwks.authority, "idp.example");
        assert_eq!(j.cache_ttl, 3600);
        assert_eq!(j.jwks_token, None);
        assert!(c.public_paths.matches("/v1/health"));
        assert_eq!(c.forward, Forward::default());
    }

    #[test]
    fn the_path_is_needed_only_by_public_paths_rules_and_the_custom_provider() {
        let mut v = jwt_example();
        assert!(Config::from_value(&v).unwrap().needs_path());
        v["public_paths"] = json!([]);
        assert!(!Config::from_value(&v).unwrap().needs_path());
        v["route_scopes"] = json!([{"path": "/v1/admin", "required_scope": "admin"}]);
        assert!(Config::from_value(&v).unwrap().needs_path());
        let custom = json!({"auth": {"provider_config": {"type": "custom",
            "endpoint": "http://auth.local/check", "cluster": "auth"}}});
        assert!(Config::from_value(&custom).unwrap().needs_path());
        assert!(!Config::from_value(&json!({})).unwrap().needs_path());
    }

    #[test]
    fn anonymous_requests_are_counted_by_address() {
        let mut v = jwt_example();
        v["quota"] = json!({"authenticated_max_requests": 5});
        let c = Config::from_value(&v).unwrap();
        assert!(c.counts_by_address("/v1/health"));
        assert!(!c.counts_by_address("/v1/models"));
        let no_auth = Config::from_value(&json!({"quota": {}})).unwrap();
        assert!(no_auth.counts_by_address("") && no_auth.counts_by_address("/v1/models"));
        v["quota"] = Value::Null;
        assert!(!Config::from_value(&v)
            .unwrap()
            .counts_by_address("/v1/health"));
    }

    #[test]
    fn accepts_the_provider_config_form_and_aliases() {
        let v = json!({"auth": {"provider_config": {"type": "oauth2_token",
            "audience": ["a", "b"],
            "jwks": {"uri": "http://keys.local:8080/certs", "key_recheck_period": 60}}}});
        let c = Config::from_value(&v).unwrap();
        let Some(AuthConfig::Jwt(j)) = c.auth.map(Auth::only) else {
            panic!("no jwt")
        };
        assert_eq!(j.audiences, vec!["a", "b"]);
        assert_eq!(j.cache_ttl, 60);
        assert_eq!(j.jwks.cluster, "keys.local:8080");
        assert_eq!(j.jwks.path, "/certs");
        assert_eq!(j.clock_skew_seconds, DEFAULT_CLOCK_SKEW);
        assert_eq!(j.refresh_cooldown_seconds, DEFAULT_REFRESH_COOLDOWN);
    }

    #[test]
    fn empty_configuration_is_no_auth() {
        let c = Config::parse(b"").unwrap();
        assert!(c.auth.is_none());
        assert!(c.quota.is_none());
    }

    #[test]
    fn refuses_unknown_keys_with_their_path() {
        let mut v = jwt_example();
        v["auth"]["config"]["jwks"]["urii"] = json!("x");
        assert_eq!(err(v).key, "auth.config.jwks.urii");
        let mut v = jwt_example();
        v["bogus"] = json!(1);
        assert_eq!(err(v).to_string(), "configuration key `bogus`: unknown key");
    }

    #[test]
    fn refuses_wrong_types() {
        let mut v = jwt_example();
        v["auth"]["config"]["clock_skew_seconds"] = json!("60");
        let e = err(v);
        assert_eq!(e.key, "auth.config.clock_skew_seconds");
        let mut v = jwt_example();
        v["forward"]["strip_authorization"] = json!("yes");
        assert_eq!(err(v).key, "forward.strip_authorization");
        let mut v = jwt_example();
        v["auth"]["config"]["audience"] = json!(5);
        assert_eq!(err(v).key, "auth.config.audience");
    }

    #[test]
    fn refuses_neither_or_both_key_sources() {
        let mut v = jwt_example();
        v["auth"]["config"].as_object_mut().unwrap().remove("jwks");
        let e = err(v);
        assert!(e.reason.contains("exactly one"), "{e}");
        let mut v = jwt_example();
        v["auth"]["config"]["introspection"] = json!({"url": "http://x/i"});
        assert!(err(v).reason.contains("exactly one"));
    }

    #[test]
    fn null_keys_are_absent_at_every_depth() {
        // OAuth2TokenAuthProviderConfig (Llama Stack 0.2.12) dumps both
        // sources, the unused one as null, and every unset option as null.
        let introspection = json!({"provider_type": "oauth2_token", "config": {
            "audience": "llama-stack", "verify_tls": true, "tls_cafile": null,
            "issuer": null, "claims_mapping": {"sub": "roles"}, "jwks": null,
            "introspection": {"url": "http://idp/i", "client_id": "c",
                              "client_secret": "s", "send_secret_in_body": false}},
            "access_policy": []});
        let c = Config::from_value(&json!({"auth": introspection})).unwrap();
        assert!(matches!(
            c.auth.map(Auth::only),
            Some(AuthConfig::Introspection(_))
        ));
        let jwks = json!({"provider_config": {"type": "oauth2_token", "audience": "ogx",
            "verify_tls": true, "tls_cafile": null, "issuer": null, "tenant_claim": null,
            "jwks": {"uri": "http://idp/jwks", "token": null, "key_recheck_period": 3600},
            "introspection": null}, "route_policy": [], "access_policy": []});
        let c = Config::from_value(&json!({"auth": jwks, "quota": null})).unwrap();
        assert!(matches!(c.auth.map(Auth::only), Some(AuthConfig::Jwt(_))));
        // Only non-null values count for the exactly-one-of rules.
        let neither = json!({"auth": {"provider_type": "oauth2_token",
            "config": {"jwks": null, "introspection": null}}});
        assert!(err(neither).reason.contains("exactly one"));
        let both = json!({"auth": {"provider_config": {"type": "oauth2_token",
            "jwks": {"uri": "http://idp/jwks"}, "introspection": {"url": "http://idp/i"}},
            "provider_type": null, "config": null}});
        assert!(err(both).reason.contains("exactly one"));
        // A non-null unknown key is still refused.
        let mut v = jwt_example();
        v["auth"]["config"]["tenant_field"] = json!("org");
        assert_eq!(err(v).key, "auth.config.tenant_field");
    }

    #[test]
    fn empty_policies_load_and_rules_are_refused() {
        for key in ["access_policy", "route_policy"] {
            let mut v = jwt_example();
            v["auth"][key] = json!([]);
            assert!(Config::from_value(&v).is_ok(), "{key}");
            let mut v = jwt_example();
            v["auth"][key] = json!({});
            assert_eq!(err(v).key, format!("auth.{key}"));
        }
        // Resource policies are refused; a resource rule is no route rule.
        let mut v = jwt_example();
        v["auth"]["access_policy"] = json!([{"permit": {"actions": ["read"]}}]);
        assert_eq!(err(v).key, "auth.access_policy");
        let mut v = jwt_example();
        v["auth"]["route_policy"] = json!([{"permit": {"actions": ["read"]}}]);
        assert_eq!(err(v).key, "auth.route_policy[0].permit.actions");
    }

    #[test]
    fn route_policy_at_the_top_or_in_auth_but_not_both() {
        let rules = json!([{"permit": {"paths": "*"}, "when": "user with admin in roles"}]);
        let mut v = jwt_example();
        v["auth"]["route_policy"] = rules.clone();
        let c = Config::from_value(&v).unwrap();
        assert!(!c.route_policy.is_empty() && c.needs_path());
        let mut v = jwt_example();
        v["route_policy"] = rules.clone();
        assert!(!Config::from_value(&v).unwrap().route_policy.is_empty());
        // Without auth: allowed (its conditions never hold for anonymous requests).
        assert!(Config::from_value(&json!({"route_policy": rules.clone()})).is_ok());
        v["auth"]["route_policy"] = rules;
        let e = err(v);
        assert_eq!(
            (e.key.as_str(), e.reason.as_str()),
            (
                "route_policy",
                "given both here and in auth.route_policy: keep one"
            )
        );
    }

    #[test]
    fn no_clock_skew_unless_configured() {
        let mut v = jwt_example();
        v["auth"]["config"]["clock_skew_seconds"] = Value::Null;
        let Some(AuthConfig::Jwt(j)) = Config::from_value(&v).unwrap().auth.map(Auth::only) else {
            panic!("no jwt")
        };
        assert_eq!(j.clock_skew_seconds, 0);
    }

    #[test]
    fn algorithms_allow_list() {
        let with = |algs: Value| {
            let mut v = jwt_example();
            v["auth"]["config"]["algorithms"] = algs;
            Config::from_value(&v)
        };
        let algs = |c: Config| match c.auth.map(Auth::only) {
            Some(AuthConfig::Jwt(j)) => j.algorithms,
            other => panic!("{other:?}"),
        };
        assert_eq!(algs(with(Value::Null).unwrap()), AlgSet::ALL);
        let ogx = algs(
            with(json!([
                "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384"
            ]))
            .unwrap(),
        );
        assert!(ogx.contains(Alg::PS512) && !ogx.contains(Alg::EdDSA));
        let e = with(json!(["RS256", "ES512"])).unwrap_err();
        assert_eq!(e.key, "auth.config.algorithms[1]");
        assert!(e.reason.contains("`ES512` is not supported"), "{e}");
        assert_eq!(with(json!([])).unwrap_err().key, "auth.config.algorithms");
        assert_eq!(
            with(json!("RS256")).unwrap_err().key,
            "auth.config.algorithms"
        );
        let intro = json!({"auth": {"provider_config": {"type": "oauth2_token",
            "introspection": {"url": "http://idp/i"}, "algorithms": ["RS256"]}}});
        assert_eq!(err(intro).key, "auth.provider_config.algorithms");
    }

    #[test]
    fn llama_stack_keys_moved_over() {
        let v = json!({"quota": {"kvstore": {"type": "sqlite", "db_path": "/tmp/q.db"},
                                 "anonymous_max_requests": 5, "period": "hour"}});
        let c = Config::from_value(&v).unwrap();
        assert_eq!(c.quota.unwrap().anonymous_max_requests, 5);
        let mut v = jwt_example();
        v["auth"]["access_policy"] = json!([{"forbid": {"actions": ["delete"]}}]);
        let e = err(v);
        assert_eq!(e.key, "auth.access_policy");
        assert!(e.reason.contains("route_scopes"));
    }

    #[test]
    fn parses_introspection_and_custom() {
        let v = json!({"auth": {"provider_type": "oauth2_token", "config":
            {"introspection": {"url": "http://idp/introspect", "client_id": "gw", "client_secret": "s3cret"},
             "cache_ttl": 5, "claims_mapping": {"scope": "scopes"}}}});
        let c = Config::from_value(&v).unwrap();
        let Some(AuthConfig::Introspection(i)) = c.auth.map(Auth::only) else {
            panic!("not introspection")
        };
        assert_eq!(i.cache_ttl, 5);
        assert_eq!(i.introspection.endpoint.cluster, "idp");
        assert!(!format!("{i:?}").contains("s3cret"));
        let v = json!({"auth": {"provider_type": "custom", "config": {"endpoint": "http://a/v"}}});
        assert!(matches!(
            Config::from_value(&v).unwrap().auth.map(Auth::only),
            Some(AuthConfig::Custom(_))
        ));
        let v = json!({"auth": {"provider_type": "oauth2_token", "config":
            {"introspection": {"url": "http://idp/i"}, "cache_ttl": 5, "bogus": 1}}});
        assert_eq!(err(v).key, "auth.config.bogus");
    }

    #[test]
    fn refuses_bad_values() {
        let mut v = jwt_example();
        v["auth"]["config"]["claims_mapping"]["groups"] = json!("");
        assert_eq!(err(v).key, "auth.config.claims_mapping.groups");
        let mut v = jwt_example();
        v["auth"]["config"]["jwks"]["uri"] = json!("ftp://x/jwks");
        assert_eq!(err(v).key, "auth.config.jwks.uri");
        let mut v = jwt_example();
        v["auth"]["config"]["jwks"]["timeout_ms"] = json!(0);
        assert_eq!(err(v).key, "auth.config.jwks.timeout_ms");
        let mut v = jwt_example();
        v["auth"]["provider_type"] = json!("basic");
        assert_eq!(err(v).key, "auth.provider_type");
        let mut v = jwt_example();
        v["forward"]["principal_header"] = json!("bad header");
        assert_eq!(err(v).key, "forward.principal_header");
        let mut v = jwt_example();
        v["forward"]["attributes_header"] = json!("X-Auth-Principal");
        assert_eq!(err(v).key, "forward.attributes_header");
        let mut v = jwt_example();
        v["auth"]["config"]["jwks"]["refresh_cooldown_seconds"] = json!(0);
        assert_eq!(err(v).key, "auth.config.jwks.refresh_cooldown_seconds");
        let mut v = jwt_example();
        v["auth"]["config"]["jwks"]["key_recheck_period"] = json!(5);
        assert_eq!(err(v).key, "auth.config.jwks.key_recheck_period");
        let mut v = jwt_example();
        v["log_level"] = json!("loud");
        assert_eq!(err(v).key, "log_level");
        assert!(Config::parse(b"{")
            .unwrap_err()
            .reason
            .starts_with("invalid JSON"));
        assert!(Config::parse(b"[]").is_err());
        assert!(Config::parse(&[0xff]).is_err());
    }

    #[test]
    fn tenancy_and_forward_options() {
        let mut v = jwt_example();
        v["auth"]["config"]["tenant_claim"] = json!("org");
        v["forward"]["tenant_header"] = json!("X-Tenant-Id");
        v["forward"]["attribute_headers"] = json!({"X-MaaS-Group": "teams"});
        let c = Config::from_value(&v).unwrap();
        let Some(AuthConfig::Jwt(j)) = &c.auth.clone().map(Auth::only) else {
            panic!("jwt")
        };
        assert_eq!(j.claims_mapping.tenant_claim.as_deref(), Some("org"));
        assert_eq!(c.forward.tenant_header, "x-tenant-id");
        assert_eq!(
            c.forward.attribute_headers,
            [("x-maas-group".to_string(), "teams".to_string())]
        );
        for (forward, key, reason) in [
            (
                json!({"tenant_header": "x-auth-principal"}),
                "forward",
                "the header \"x-auth-principal\" is given twice",
            ),
            (
                json!({"attribute_headers": {"x-auth-tenant": "teams"}}),
                "forward",
                "the header \"x-auth-tenant\" is given twice",
            ),
            (
                json!({"attribute_headers": {"x teams": "teams"}}),
                "forward.attribute_headers.x teams",
                "not a valid header name",
            ),
            (
                json!({"attribute_headers": {"authorization": "teams"}}),
                "forward.attribute_headers.authorization",
                "this header cannot be used",
            ),
            (
                json!({"attribute_headers": {"x-t": 3}}),
                "forward.attribute_headers.x-t",
                "expected a string, found a number",
            ),
            (
                json!({"tenant_header": "bad header"}),
                "forward.tenant_header",
                "not a valid header name",
            ),
        ] {
            let e = err(json!({ "forward": forward }));
            assert_eq!(
                (e.key.as_str(), e.reason.as_str()),
                (key, reason),
                "{forward}"
            );
        }
    }

    #[test]
    fn credential_sources() {
        let c = Config::from_value(&jwt_example()).unwrap();
        assert!(matches!(c.credentials.as_slice(), [s] if s.is_bearer()));
        let mut v = jwt_example();
        v["auth"]["credentials"] = json!([
            {"header": "Authorization", "prefix": "Bearer "},
            {"header": "X-API-Key"},
            {"header": "api-key", "prefix": "Key "}
        ]);
        let c = Config::from_value(&v).unwrap();
        assert_eq!(
            c.forward.credential_headers,
            ["authorization", "x-api-key", "api-key"]
        );
        let key = &c.credentials[2];
        assert_eq!(key.token(b" key abc "), Some(&b"abc"[..]));
        assert_eq!(key.token(b"abc"), None);
        assert_eq!(c.credentials[1].token(b" k1 "), Some(&b"k1"[..]));
        for (creds, path, reason) in [
            (json!([]), "auth.credentials", "must not be empty"),
            (
                json!({}),
                "auth.credentials",
                "must be a list of credential sources",
            ),
            (
                json!([{"prefix": "x"}]),
                "auth.credentials[0]",
                "needs one of header, cookie or query",
            ),
            (
                json!([{"header": "host"}]),
                "auth.credentials[0].header",
                "not a header a credential can be in",
            ),
            (
                json!([{"header": "x-k"}, {"header": "X-K"}]),
                "auth.credentials[1]",
                "the source is given twice",
            ),
            (
                json!([{"cookie": "s", "prefix": "x"}]),
                "auth.credentials[0].prefix",
                "only a header has a prefix",
            ),
            (
                json!([{"query": "a b"}]),
                "auth.credentials[0]",
                "the name must be a token (letters, digits, !#$%&'*+-.^_`|~)",
            ),
            (
                json!([{"header": "x-k", "prefix": "é"}]),
                "auth.credentials[0].prefix",
                "must be printable ASCII",
            ),
            (
                json!([{"header": "x-k", "cookie": "c"}]),
                "auth.credentials[0]",
                "give one of header, cookie or query",
            ),
            (
                json!([{"query": "k", "x": 1}]),
                "auth.credentials[0].x",
                "unknown key",
            ),
        ] {
            let mut v = jwt_example();
            v["auth"]["credentials"] = creds.clone();
            let e = err(v);
            assert_eq!(
                (e.key.as_str(), e.reason.as_str()),
                (path, reason),
                "{creds}"
            );
        }
    }
}
