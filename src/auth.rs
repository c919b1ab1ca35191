//! The request decision, without the host: credentials → identity → route
//! rules → quota. A small state machine for the key set says when keys must
//! be fetched; the glue (`filter`) performs the callouts and parks requests
//! that have to wait for them.

use crate::claims::Identity;
use crate::config::{Auth, CalloutProvider, Config, JwtConfig, Route};
use crate::jwks_cache::{FetchError, JwksState};
use crate::jwt::{self, Rules, TokenError};
use crate::provider::{github, Answer, CalloutRequest, ProviderError, Upstream};
use crate::quota::{self, Client, QuotaDecision, RateLimit};
use crate::response::Denial;
use crate::route_rules::AccessDenied;
use crate::store::SharedStore;
use crate::token_cache::{CacheKey, TokenCache, TokenHasher, NEGATIVE_TTL};
use crate::token_quota::{Policy, TokenGrant};
use crate::usage::Usage;
use std::rc::Rc;

/// The name an authenticated request is counted under (`quota.key`).
fn counted_name<'a>(
    q: &quota::QuotaConfig,
    identity: Option<&'a Identity>,
) -> Option<std::borrow::Cow<'a, str>> {
    identity.map(|id| q.key.client_name(&id.principal, id.tenant.as_deref()))
}

/// Who a request is counted as: its counted name, else its address.
fn client_of<'a>(name: Option<&'a str>, source_ip: Option<&'a str>) -> Client<'a> {
    match (name, source_ip) {
        (Some(name), _) => Client::Principal(name),
        (None, Some(ip)) => Client::Anonymous(ip),
        (None, None) => Client::Anonymous("unknown"),
    }
}

/// What the decision needs to know of a request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestFacts {
    pub method: String,
    /// The normalised path (see [`crate::path::normalize_path`]); empty when the
    /// configuration needs no path (`Config::needs_path`).
    pub path: String,
    /// The raw `Authorization` value, if any.
    pub authorization: Option<Vec<u8>>,
    /// The values of the other credential headers (`auth.credentials`) the
    /// request has: the source's index and the raw value.
    pub credentials: Vec<(usize, Vec<u8>)>,
    /// The client's address without the port; filled for anonymous requests
    /// when quotas are on.
    pub source_ip: Option<String>,
    /// The raw `:path` (query included); filled for the custom provider only.
    pub raw_path: String,
    /// The request headers; filled for the custom provider only.
    pub headers: Vec<(String, Vec<u8>)>,
}

/// The outcome for an allowed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowed {
    /// Absent for anonymous requests (public paths, no `auth`).
    pub identity: Option<Rc<Identity>>,
    /// `RateLimit-*` values for the response, when quotas send them.
    pub rate_limit: Option<RateLimit>,
    /// The token reservation, on paths with a token budget.
    pub tokens: Option<Box<TokenGrant>>,
}

/// What to do with a request now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Allow(Allowed),
    Deny(Denial),
    /// Park the request until the key set fetch ends, then decide again.
    WaitForKeys,
    /// Park the request until this provider callout answers, then finish it
    /// with [`Core::provider_answer`] and [`Core::finish`].
    Callout(Box<Callout>),
    /// Authenticated and past the route rules: park the request until the
    /// rate-limit service counted it, then end it with [`Core::counted`].
    Count(Box<Counting>),
}

/// A request the rate-limit service must count (`quota.backend`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counting {
    pub identity: Option<Rc<Identity>>,
    pub count: quota::RemoteCount,
    /// A token budget's check (`hits` 0): the request allowed once the
    /// service says the budget is not spent. `None`: a request count.
    pub tokens_for: Option<Box<Allowed>>,
}

#[cfg(test)]
impl Step {
    /// The principal of an allowed, identified request (for tests).
    pub fn principal(&self) -> Option<&str> {
        match self {
            Step::Allow(a) => a.identity.as_ref().map(|id| id.principal.as_str()),
            _ => None,
        }
    }
}

/// A provider callout to make (introspection or custom endpoint).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Callout {
    /// The decision cache key: requests with the same key share the callout.
    pub key: CacheKey,
    pub upstream: Upstream,
    pub request: CalloutRequest,
    /// An exchange of several calls (`github_token`): what it has read.
    pub progress: Option<Box<github::Progress>>,
}

/// What a provider's answer leads to.
#[derive(Debug)]
pub enum Answered {
    /// The identity, or the denial, for every request that waited on it.
    Done(AuthResult),
    /// Another call of the same exchange, waited on by the same requests.
    Next(Box<Callout>),
}

#[cfg(test)]
impl Answered {
    /// The result; panics on a next call.
    pub fn done(self) -> AuthResult {
        match self {
            Answered::Done(r) => r,
            Answered::Next(c) => panic!("a next call: {c:?}"),
        }
    }
}

/// The identity of a caller, or why there is none.
pub type AuthResult = Result<Option<Rc<Identity>>, Denial>;

impl FetchError {
    pub fn denial(self) -> Denial {
        match self {
            FetchError::Unavailable => Denial::AuthUnavailable,
            FetchError::Timeout => Denial::AuthTimeout,
        }
    }
}

/// Extra time a fetch lease lives beyond the fetch timeout (ms).
pub const LEASE_MARGIN_MS: u64 = 1000;

/// Per-VM decision state.
#[derive(Debug)]
pub struct Core {
    pub config: Rc<Config>,
    /// One key set per JWT provider, in [`Auth::jwts`] order.
    pub jwks: Vec<JwksState>,
    pub tokens: TokenCache,
    hasher: TokenHasher,
    missing_message: String,
    /// Makes the cache key of an unshared custom-endpoint callout unique
    /// (its `cache_ttl` 0: see `authenticate_by_callout`).
    unshared: u64,
}

/// What `Authorization` holds.
#[derive(Debug, PartialEq, Eq)]
enum Credentials<'a> {
    Missing,
    BadFormat,
    /// The token's bytes: not yet checked to be UTF-8 (see [`as_token`]), so a
    /// cached token is found without reading it twice.
    Bearer(&'a [u8]),
}

/// A token as text; a non-UTF-8 token is no token (the verifier refuses it,
/// the providers are asked about U+FFFD).
fn as_token(bytes: &[u8]) -> &str {
    std::str::from_utf8(bytes).unwrap_or("\u{fffd}")
}

fn credentials(value: Option<&[u8]>) -> Credentials<'_> {
    let Some(v) = value else {
        return Credentials::Missing;
    };
    let v = v.trim_ascii();
    let Some((scheme, rest)) = v.split_at_checked(6) else {
        return Credentials::BadFormat;
    };
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return Credentials::BadFormat;
    }
    // `Bearer` alone is an empty token: Envoy trims `Bearer ` to `Bearer`.
    let token = match rest.split_first() {
        None => &[][..],
        Some((&b' ', token)) => token,
        Some(_) => return Credentials::BadFormat,
    };
    Credentials::Bearer(token.trim_ascii())
}

impl Core {
    pub fn new(config: Rc<Config>) -> Core {
        let missing_message = config
            .auth
            .as_ref()
            .map(Auth::missing_message)
            .unwrap_or_default();
        let key_sets = config.auth.as_ref().map_or(0, |a| a.jwts().count());
        Core {
            config,
            jwks: (0..key_sets).map(|_| JwksState::default()).collect(),
            tokens: TokenCache::default(),
            hasher: TokenHasher::default(),
            missing_message,
            unshared: 0,
        }
    }

    /// The JWT providers' settings, in key-set order.
    pub fn jwt_configs(&self) -> Vec<JwtConfig> {
        self.config
            .auth
            .as_ref()
            .map(|a| a.jwts().cloned().collect())
            .unwrap_or_default()
    }

    /// The settings of the JWT provider with key set `i`.
    pub fn jwt_config(&self, i: usize) -> Option<&JwtConfig> {
        self.config.auth.as_ref().and_then(|a| a.jwts().nth(i))
    }

    /// Decides a request at `now_ms`. Idempotent until it allows: a request
    /// parked for keys is decided again from the start when keys arrive.
    pub fn decide(&mut self, req: &RequestFacts, now_ms: u64, store: &dyn SharedStore) -> Step {
        let config = self.config.clone();
        let identity = if config.public_paths.matches(&req.path) {
            None
        } else {
            let Some(auth) = config.auth.as_ref() else {
                return self.finish(req, Ok(None), now_ms, store);
            };
            match self.authenticate(auth, req, now_ms) {
                Ok(id) => Some(id),
                Err(step) => return step,
            }
        };
        self.finish(req, Ok(identity), now_ms, store)
    }

    /// After authentication: route rules, then the quota.
    pub fn finish(
        &mut self,
        req: &RequestFacts,
        auth: AuthResult,
        now_ms: u64,
        store: &dyn SharedStore,
    ) -> Step {
        let identity = match auth {
            Ok(id) => id,
            Err(denial) => return Step::Deny(denial),
        };
        let config = self.config.clone();
        let attributes = identity.as_ref().map(|id| &id.attributes);
        if let Err(refused) = config.route_policy.check(&req.path, attributes) {
            log::debug!(
                "{refused} (principal {:?})",
                identity.as_ref().map(|id| id.principal.as_str())
            );
            return Step::Deny(Denial::Forbidden(AccessDenied::Route(refused.0)));
        }
        if let Some(id) = &identity {
            if let Err(why) = config
                .route_rules
                .check(&req.method, &req.path, &id.attributes)
            {
                log::debug!("{why} (principal {:?})", id.principal);
                return Step::Deny(Denial::Forbidden(why));
            }
        }
        let Some(q) = &config.quota else {
            return Step::Allow(Allowed {
                identity,
                rate_limit: None,
                tokens: None,
            });
        };
        if !q.count_requests {
            let allowed = Step::Allow(Allowed {
                identity,
                rate_limit: None,
                tokens: None,
            });
            return self.with_tokens(req, allowed, now_ms, store);
        }
        let name = counted_name(q, identity.as_deref());
        let client = client_of(name.as_deref(), req.source_ip.as_deref());
        if q.backend.is_some() {
            let count = quota::RemoteCount::new(q, &client, now_ms / 1000);
            return Step::Count(Box::new(Counting {
                identity,
                count,
                tokens_for: None,
            }));
        }
        let decision = quota::check(q, store, &client, now_ms / 1000);
        let step = self.quota_step(identity, decision);
        self.with_tokens(req, step, now_ms, store)
    }

    /// An allowed request to a path with a token budget: refused when its
    /// client's budget is spent, else its reservation is counted.
    fn with_tokens(
        &self,
        req: &RequestFacts,
        step: Step,
        now_ms: u64,
        store: &dyn SharedStore,
    ) -> Step {
        let Step::Allow(mut allowed) = step else {
            return step;
        };
        let config = self.config.clone();
        let Some((q, t)) = config
            .quota
            .as_ref()
            .and_then(|q| q.tokens.as_ref().map(|t| (q, t)))
        else {
            return Step::Allow(allowed);
        };
        if !t.counts(&req.method, &req.path) {
            return Step::Allow(allowed);
        }
        let name = counted_name(q, allowed.identity.as_deref());
        let authenticated = name.is_some();
        let who = match client_of(name.as_deref(), req.source_ip.as_deref()) {
            Client::Principal(n) | Client::Anonymous(n) => n.to_string(),
        };
        let client = if authenticated {
            Client::Principal(&who)
        } else {
            Client::Anonymous(&who)
        };
        let now_s = now_ms / 1000;
        let tally = quota::token_tally(t, t.limit(authenticated));
        match quota::count(q, store, &client, &tally, now_s) {
            QuotaDecision::Allowed {
                limit,
                remaining,
                reset,
            } => {
                // Tokens as hits in the rate-limit service, when there is
                // one: is the budget spent across every Envoy?
                let remote = q
                    .backend
                    .as_ref()
                    .map(|_| quota::RemoteCount::tokens(q, t, &client, limit, 0, now_s));
                let grant = TokenGrant {
                    who: who.clone(),
                    authenticated,
                    window: t.period.window_start(now_s),
                    limit,
                    reserved: t.reserve_tokens,
                    remaining,
                    reset,
                    period: t.period.seconds(),
                    path: t.path_index(&req.path),
                };
                allowed.tokens = Some(Box::new(grant));
                let Some(count) = remote else {
                    return Step::Allow(allowed);
                };
                Step::Count(Box::new(Counting {
                    identity: allowed.identity.clone(),
                    count,
                    tokens_for: Some(Box::new(allowed)),
                }))
            }
            QuotaDecision::Exceeded { limit, reset } => {
                log::debug!("token budget of {limit} used up");
                Step::Deny(Denial::TokensExceeded(Policy {
                    name: "tokens",
                    quota: limit,
                    window: t.period.seconds(),
                    remaining: 0,
                    reset,
                }))
            }
            QuotaDecision::Contended => Step::Deny(Denial::QuotaContended),
            QuotaDecision::Unavailable => Step::Deny(Denial::QuotaUnavailable),
        }
    }

    /// Ends a token budget's check in the rate-limit service: allowed; or
    /// the budget is spent there (429), or the service failed
    /// (`failure_mode`: 503, or allowed on this Envoy's own count) — the
    /// local reservation given back when refused.
    fn tokens_checked(
        &self,
        allowed: Allowed,
        count: &quota::RemoteCount,
        verdict: Option<crate::rls::Verdict>,
        now_ms: u64,
        store: &dyn SharedStore,
    ) -> Step {
        let local = self
            .config
            .quota
            .as_ref()
            .and_then(|q| q.backend.as_ref())
            .is_some_and(|b| b.failure_mode == quota::FailureMode::Local);
        let refuse = |denial: Denial| {
            if let Some(grant) = &allowed.tokens {
                self.refund_tokens(grant, now_ms, store);
            }
            Step::Deny(denial)
        };
        match verdict {
            Some(v) if v.over_limit => refuse(Denial::TokensExceeded(Policy {
                name: "tokens",
                quota: count.limit.saturating_add(1),
                window: count.period,
                remaining: 0,
                reset: v.reset.unwrap_or(count.reset).max(1),
            })),
            Some(_) => Step::Allow(allowed),
            None if local => {
                log::warn!("rate-limit service failed: the token budget counted in this Envoy");
                Step::Allow(allowed)
            }
            None => refuse(Denial::QuotaUnavailable),
        }
    }

    /// What a request's answer charges to its token budget in the
    /// rate-limit service (tokens as hits), when there is one; `None` for
    /// nothing to add.
    pub fn remote_token_charge(
        &self,
        grant: &TokenGrant,
        charge: u64,
        now_ms: u64,
    ) -> Option<quota::RemoteCount> {
        let q = self.config.quota.as_ref()?;
        let t = q.tokens.as_ref()?;
        q.backend.as_ref()?;
        if charge == 0 {
            return None;
        }
        let client = if grant.authenticated {
            Client::Principal(&grant.who)
        } else {
            Client::Anonymous(&grant.who)
        };
        Some(quota::RemoteCount::tokens(
            q,
            t,
            &client,
            grant.limit,
            charge,
            now_ms / 1000,
        ))
    }

    /// Replaces a request's token reservation by what its answer spent
    /// (`usage`, or `unreported_tokens` without one); the tokens charged.
    pub fn settle_tokens(
        &self,
        grant: &TokenGrant,
        usage: Option<Usage>,
        now_ms: u64,
        store: &dyn SharedStore,
    ) -> u64 {
        self.settle_at(grant, |t| t.charge(usage), now_ms, store)
    }

    /// Gives a reservation back whole: the request never went on.
    pub fn refund_tokens(&self, grant: &TokenGrant, now_ms: u64, store: &dyn SharedStore) {
        self.settle_at(grant, |_| 0, now_ms, store);
    }

    fn settle_at(
        &self,
        grant: &TokenGrant,
        charge: impl FnOnce(&crate::token_quota::TokenQuota) -> u64,
        now_ms: u64,
        store: &dyn SharedStore,
    ) -> u64 {
        let Some((q, t)) = self
            .config
            .quota
            .as_ref()
            .and_then(|q| q.tokens.as_ref().map(|t| (q, t)))
        else {
            return 0;
        };
        let charge = charge(t);
        let client = if grant.authenticated {
            Client::Principal(&grant.who)
        } else {
            Client::Anonymous(&grant.who)
        };
        let tally = quota::Tally {
            amount: grant.reserved,
            ..quota::token_tally(t, grant.limit)
        };
        quota::settle(
            q,
            store,
            &client,
            &tally,
            grant.window,
            charge,
            now_ms / 1000,
        );
        charge
    }

    /// Resizes a reservation to what the request body allows (see
    /// [`crate::token_quota::TokenQuota::reservation`]), once the body has
    /// been read; `remaining` follows.
    pub fn resize_reservation(
        &self,
        grant: &mut TokenGrant,
        max_output: Option<u64>,
        now_ms: u64,
        store: &dyn SharedStore,
    ) {
        let Some(t) = self.config.quota.as_ref().and_then(|q| q.tokens.as_ref()) else {
            return;
        };
        let new = t.reservation(max_output);
        if new == grant.reserved {
            return;
        }
        self.settle_at(grant, |_| new, now_ms, store);
        let counted = grant.limit.saturating_sub(grant.remaining);
        let counted = counted.saturating_sub(grant.reserved).saturating_add(new);
        grant.remaining = grant.limit.saturating_sub(counted);
        grant.reserved = new;
    }

    /// The step for a quota decision (counted here or by the service).
    pub fn quota_step(&self, identity: Option<Rc<Identity>>, decision: QuotaDecision) -> Step {
        let headers = self.config.quota.as_ref().is_some_and(|q| q.headers);
        // Only when the quota sends the `RateLimit-*` headers.
        let values = |limit: u64, remaining: u64, reset: u64| {
            headers.then_some(RateLimit {
                limit,
                remaining,
                reset,
            })
        };
        match decision {
            QuotaDecision::Allowed {
                limit,
                remaining,
                reset,
            } => Step::Allow(Allowed {
                identity,
                rate_limit: values(limit, remaining, reset),
                tokens: None,
            }),
            QuotaDecision::Exceeded { limit, reset } => {
                log::debug!("quota of {limit} used up");
                Step::Deny(Denial::QuotaExceeded {
                    retry_after: reset,
                    rate_limit: values(limit, 0, reset),
                })
            }
            QuotaDecision::Contended => Step::Deny(Denial::QuotaContended),
            QuotaDecision::Unavailable => Step::Deny(Denial::QuotaUnavailable),
        }
    }

    /// Ends a request the rate-limit service was asked to count: with its
    /// answer, or (`None`: no usable answer) as `quota.backend.failure_mode`
    /// says — 503, or counted in this Envoy's shared data.
    pub fn counted(
        &mut self,
        req: &RequestFacts,
        counting: Counting,
        verdict: Option<crate::rls::Verdict>,
        now_ms: u64,
        store: &dyn SharedStore,
    ) -> Step {
        let Counting {
            identity,
            count,
            tokens_for,
        } = counting;
        let config = self.config.clone();
        let Some(q) = &config.quota else {
            return Step::Deny(Denial::QuotaUnavailable);
        };
        if let Some(allowed) = tokens_for {
            return self.tokens_checked(*allowed, &count, verdict, now_ms, store);
        }
        let decision = match (verdict, q.backend.as_ref().map(|b| b.failure_mode)) {
            (Some(v), _) => count.decide(&v),
            (None, Some(quota::FailureMode::Local)) => {
                let name = counted_name(q, identity.as_deref());
                let client = client_of(name.as_deref(), req.source_ip.as_deref());
                quota::check(q, store, &client, now_ms / 1000)
            }
            (None, _) => QuotaDecision::Unavailable,
        };
        let step = self.quota_step(identity, decision);
        self.with_tokens(req, step, now_ms, store)
    }

    /// The bearer token, or the denial for a missing or malformed header.
    /// `Bearer` with no token after it (Envoy trims `Bearer ` to that) is
    /// not `Bearer <token>`: 401 `Invalid Authorization header format`, for
    /// every provider.
    fn bearer<'a>(&self, authorization: Option<&'a [u8]>) -> Result<&'a [u8], Step> {
        match credentials(authorization) {
            Credentials::Missing => Err(Step::Deny(Denial::MissingCredentials(
                self.missing_message.clone(),
            ))),
            Credentials::BadFormat | Credentials::Bearer(b"") => {
                Err(Step::Deny(Denial::InvalidHeaderFormat))
            }
            Credentials::Bearer(t) => Ok(t),
        }
    }

    /// The request's credential from the sources of `auth.credentials`:
    /// `Authorization: Bearer` read as [`Core::bearer`] does, other headers
    /// with their prefix removed. Two different credentials are refused
    /// (401), never chosen between; none is the provider's 401.
    fn credential<'a>(&self, req: &'a RequestFacts) -> Result<&'a [u8], Step> {
        let sources = &self.config.credentials;
        let mut found: Option<&[u8]> = None;
        if sources
            .iter()
            .any(crate::config::CredentialSource::is_bearer)
        {
            match self.bearer(req.authorization.as_deref()) {
                Ok(t) => found = Some(t),
                Err(Step::Deny(Denial::MissingCredentials(_))) => {}
                Err(step) => return Err(step),
            }
        }
        for (i, value) in &req.credentials {
            let token = sources
                .get(*i)
                .and_then(|s| s.token(value))
                .filter(|t| !t.is_empty())
                .ok_or(Step::Deny(Denial::InvalidHeaderFormat))?;
            match found {
                Some(f) if f != token => return Err(Step::Deny(Denial::MultipleCredentials)),
                _ => found = Some(token),
            }
        }
        found.ok_or_else(|| Step::Deny(Denial::MissingCredentials(self.missing_message.clone())))
    }

    /// The caller's identity by the provider its token goes to
    /// ([`Auth::route`]): a JWT provider, or the fallbacks: the API keys
    /// (an unknown key passes on), then the callout provider. A token no
    /// provider takes gets the 401 of the one tried last.
    fn authenticate(
        &mut self,
        auth: &Auth,
        req: &RequestFacts,
        now_ms: u64,
    ) -> Result<Rc<Identity>, Step> {
        let raw = self.credential(req)?;
        let iss = if auth.routes_by_issuer() {
            jwt::unverified_issuer(raw)
        } else {
            None
        };
        match auth.route(iss.as_deref()) {
            Route::Jwt(i) => match auth.jwts().nth(i) {
                Some(j) => self.authenticate_jwt(i, j, raw, now_ms),
                None => Err(Step::Deny(Denial::AuthUnavailable)),
            },
            Route::Fallback => {
                if let Some(k) = auth.api_keys() {
                    if let Some(id) = k.check(raw) {
                        return Ok(id);
                    }
                }
                if let Some(p) = auth.callout() {
                    return self.authenticate_by_callout(p, raw, req, now_ms);
                }
                Err(Step::Deny(if auth.api_keys().is_some() {
                    Denial::Provider(ProviderError::InvalidApiKey)
                } else if iss.is_some() {
                    Denial::InvalidToken(TokenError::WrongIssuer)
                } else {
                    Denial::InvalidToken(TokenError::Malformed)
                }))
            }
        }
    }

    /// Introspection and custom providers: a cached answer, or a callout.
    /// The custom endpoint is sent the normalised path (percent-decoded, see
    /// `provider::custom::endpoint_path`) and its answer is keyed by the token and
    /// exactly that path. With its `cache_ttl` 0 the key is unique to the
    /// request: the endpoint also sees the query and headers, so no callout
    /// is shared and no answer found again.
    fn authenticate_by_callout(
        &mut self,
        provider: CalloutProvider,
        raw: &[u8],
        req: &RequestFacts,
        now_ms: u64,
    ) -> Result<Rc<Identity>, Step> {
        let token = as_token(raw);
        if token.is_empty() {
            // Nothing to ask the provider about.
            return Err(Step::Deny(Denial::InvalidHeaderFormat));
        }
        let (key, upstream, request) = match provider {
            CalloutProvider::Introspection(i) => (
                self.hasher.key(&[token.as_bytes()]),
                &i.introspection.endpoint,
                i.introspection.request(token),
            ),
            CalloutProvider::Custom(c) => {
                let path = crate::provider::custom::endpoint_path(&req.path);
                let key = if c.cache_ttl == 0 {
                    self.unshared = self.unshared.wrapping_add(1);
                    let n = self.unshared.to_le_bytes();
                    self.hasher.key(&[token.as_bytes(), path.as_bytes(), &n])
                } else {
                    self.hasher.key(&[token.as_bytes(), path.as_bytes()])
                };
                let request = c.request(token, &path, &req.raw_path, &req.headers);
                (key, &c.endpoint, request)
            }
            CalloutProvider::Kubernetes(k) => (
                self.hasher.key(&[token.as_bytes()]),
                &k.endpoint,
                k.request(token),
            ),
            CalloutProvider::GitHub(g) => {
                let (request, progress) = g.start(token);
                let key = self.hasher.key(&[token.as_bytes()]);
                return match self.tokens.get(&key, 0, now_ms / 1000) {
                    Some(Ok(id)) => Ok(id),
                    Some(Err(denial)) => Err(Step::Deny(denial)),
                    None => Err(Step::Callout(Box::new(Callout {
                        key,
                        upstream: g.endpoint.clone(),
                        request,
                        progress: Some(progress),
                    }))),
                };
            }
        };
        match self.tokens.get(&key, 0, now_ms / 1000) {
            Some(Ok(id)) => Ok(id),
            Some(Err(denial)) => Err(Step::Deny(denial)),
            None => Err(Step::Callout(Box::new(Callout {
                key,
                upstream: upstream.clone(),
                request,
                progress: None,
            }))),
        }
    }

    /// Reads a provider's answer to the callout for `key` (`progress`: what
    /// its exchange read before), caches what may be cached, and returns
    /// the identity or the denial for every request that waited on it, or
    /// the exchange's next call.
    pub fn provider_answer(
        &mut self,
        key: CacheKey,
        answer: Answer,
        progress: Option<Box<github::Progress>>,
        now_ms: u64,
    ) -> Answered {
        let now_s = now_ms / 1000;
        let config = self.config.clone();
        let provider = config.auth.as_ref().and_then(Auth::callout);
        let (result, ttl) = match provider {
            Some(CalloutProvider::GitHub(g)) => {
                let step = match progress {
                    Some(p) => g.interpret(answer, p),
                    None => Err(ProviderError::Unavailable),
                };
                match step {
                    Ok(github::Step::Next(progress, request)) => {
                        return Answered::Next(Box::new(Callout {
                            key,
                            upstream: g.endpoint.clone(),
                            request,
                            progress: Some(progress),
                        }))
                    }
                    Ok(github::Step::Done(id)) => (
                        Ok(Rc::new(id)),
                        Some((g.cache_ttl, now_s.saturating_add(g.cache_ttl))),
                    ),
                    Err(e) => (Err(e), None),
                }
            }
            Some(CalloutProvider::Introspection(i)) => {
                match i.introspection.interpret(
                    answer,
                    &i.claims_mapping,
                    i.clock_skew_seconds,
                    now_s,
                ) {
                    Ok(v) => {
                        // Never past the token's own expiry.
                        let until = now_s
                            .saturating_add(i.cache_ttl)
                            .min(v.exp.saturating_add(i.clock_skew_seconds));
                        (Ok(Rc::new(v.identity)), Some((i.cache_ttl, until)))
                    }
                    Err(e) => (Err(e), None),
                }
            }
            Some(CalloutProvider::Custom(c)) => match c.interpret(answer, "") {
                Ok(id) => (
                    Ok(Rc::new(id)),
                    Some((c.cache_ttl, now_s.saturating_add(c.cache_ttl))),
                ),
                Err(e) => (Err(e), None),
            },
            Some(CalloutProvider::Kubernetes(k)) => match k.interpret(answer) {
                Ok(id) => (
                    Ok(Rc::new(id)),
                    Some((k.cache_ttl, now_s.saturating_add(k.cache_ttl))),
                ),
                Err(e) => (Err(e), None),
            },
            _ => (Err(ProviderError::Unavailable), None),
        };
        match result {
            Ok(id) => {
                if let Some((ttl, until)) = ttl {
                    if ttl > 0 && until >= now_s {
                        self.tokens.put(key, Ok(id.clone()), until, now_s);
                    }
                }
                Answered::Done(Ok(Some(id)))
            }
            Err(e) => {
                let denial = Denial::Provider(e.clone());
                // Definite "no"s are remembered briefly; errors never; a
                // custom endpoint's with `cache_ttl` 0 never (see
                // `authenticate_by_callout`).
                let definite = matches!(
                    e,
                    ProviderError::NotActive
                        | ProviderError::Expired
                        | ProviderError::WrongAudience
                        | ProviderError::AuthFailed(401 | 403)
                        | ProviderError::KubernetesInvalid
                        | ProviderError::GitHubInvalid
                );
                let uncached =
                    matches!(provider, Some(CalloutProvider::Custom(c)) if c.cache_ttl == 0);
                if definite && !uncached {
                    self.tokens.put(
                        key,
                        Err(denial.clone()),
                        now_s.saturating_add(NEGATIVE_TTL),
                        now_s,
                    );
                }
                Answered::Done(Err(denial))
            }
        }
    }

    fn authenticate_jwt(
        &mut self,
        i: usize,
        j: &JwtConfig,
        raw: &[u8],
        now_ms: u64,
    ) -> Result<Rc<Identity>, Step> {
        let Some(jw) = self.jwks.get_mut(i) else {
            return Err(Step::Deny(Denial::AuthUnavailable));
        };
        let now_s = now_ms / 1000;
        let rules = Rules {
            audiences: &j.audiences,
            issuer: j.issuer.as_deref(),
            clock_skew_seconds: j.clock_skew_seconds,
            claims_mapping: &j.claims_mapping,
        };
        let ttl_ms = j.cache_ttl.saturating_mul(1000);
        let lease_ms = j.jwks.timeout_ms.saturating_add(LEASE_MARGIN_MS);
        let max_age = ttl_ms.saturating_add(j.max_stale_seconds.saturating_mul(1000));
        // Keys first: a token verified with keys that are now too stale to
        // use is not served from the cache either.
        let Some(keys) = jw.usable_keys(now_ms, max_age) else {
            // No keys yet: refuse what is refused without keys, else wait.
            if let Err(e) = jwt::parse_allowing(as_token(raw), &rules, j.algorithms, now_s) {
                return Err(Step::Deny(Denial::InvalidToken(e)));
            }
            if jw.in_flight(now_ms, lease_ms) {
                return Err(Step::WaitForKeys);
            }
            if jw.fetch_due(now_ms, ttl_ms) {
                jw.want(now_ms);
                return Err(Step::WaitForKeys);
            }
            let why = jw.record.error.unwrap_or(FetchError::Unavailable);
            return Err(Step::Deny(why.denial()));
        };
        // Only verified tokens are cached, so a hit is a token that is UTF-8.
        let key = self.hasher.key(&[raw]);
        match self.tokens.get(&key, jw.generation, now_s) {
            Some(Ok(id)) => return Ok(id),
            Some(Err(denial)) => return Err(Step::Deny(denial)),
            None => {}
        }
        match jwt::verify_allowing(as_token(raw), &keys, &rules, j.algorithms, now_s) {
            Ok(v) => {
                let id = Rc::new(v.identity);
                let until = v.exp.saturating_add(j.clock_skew_seconds);
                self.tokens.put(key, Ok(id.clone()), until, now_s);
                Ok(id)
            }
            Err(TokenError::UnknownKid) => {
                if jw.in_flight(now_ms, lease_ms) {
                    Err(Step::WaitForKeys)
                } else if jw
                    .kid_refresh_allowed(now_ms, j.refresh_cooldown_seconds.saturating_mul(1000))
                {
                    jw.want(now_ms);
                    Err(Step::WaitForKeys)
                } else {
                    Err(Step::Deny(Denial::InvalidToken(TokenError::UnknownKid)))
                }
            }
            Err(e) => Err(Step::Deny(Denial::InvalidToken(e))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Anonymous requests of one address against a quota of 2 a day.
    fn anonymous_quota_steps(headers: bool) -> Vec<Step> {
        let config = Config::parse(
            format!(r#"{{"quota": {{"anonymous_max_requests": 2, "headers": {headers}}}}}"#)
                .as_bytes(),
        )
        .unwrap();
        let mut core = Core::new(Rc::new(config));
        let store = crate::store::fake::FakeStore::new();
        let req = RequestFacts {
            path: "/v1/models".into(),
            source_ip: Some("192.0.2.7".into()),
            ..RequestFacts::default()
        };
        // 1 s before a day boundary: the window resets in 1 s.
        let now_ms = (86_400 * 20_000 - 1) * 1000;
        (0..3).map(|_| core.decide(&req, now_ms, &store)).collect()
    }

    #[test]
    fn quota_rate_limit_values_follow_the_count() {
        let rl = |remaining| {
            Some(RateLimit {
                limit: 2,
                remaining,
                reset: 1,
            })
        };
        let allowed = |remaining| {
            Step::Allow(Allowed {
                identity: None,
                rate_limit: rl(remaining),
                tokens: None,
            })
        };
        let refused = Step::Deny(Denial::QuotaExceeded {
            retry_after: 1,
            rate_limit: rl(0),
        });
        assert_eq!(
            anonymous_quota_steps(true),
            [allowed(1), allowed(0), refused]
        );
        let steps = anonymous_quota_steps(false);
        assert!(matches!(
            steps.as_slice(),
            [
                Step::Allow(Allowed {
                    rate_limit: None,
                    ..
                }),
                Step::Allow(Allowed {
                    rate_limit: None,
                    ..
                }),
                Step::Deny(Denial::QuotaExceeded {
                    retry_after: 1,
                    rate_limit: None
                })
            ]
        ));
    }

    /// 2023-11-14T22:13:20Z, in seconds.
    const NOW: u64 = 1_700_000_000;

    fn core_for(auth: &str) -> Core {
        let config = Config::parse(format!(r#"{{"auth": {auth}}}"#).as_bytes()).unwrap();
        Core::new(Rc::new(config))
    }

    fn request(token: Option<&str>, path: &str) -> RequestFacts {
        RequestFacts {
            path: path.into(),
            raw_path: path.into(),
            authorization: token.map(|t| format!("Bearer {t}").into_bytes()),
            ..RequestFacts::default()
        }
    }

    /// Decides at `now_s` (plus 999 ms: the cache works in whole seconds).
    fn decide_at(core: &mut Core, req: &RequestFacts, now_s: u64) -> Step {
        core.decide(
            req,
            now_s * 1000 + 999,
            &crate::store::fake::FakeStore::new(),
        )
    }

    fn callout_key(step: &Step) -> CacheKey {
        match step {
            Step::Callout(c) => c.key,
            other => panic!("expected a callout, got {other:?}"),
        }
    }

    fn ok(body: &str) -> Answer<'_> {
        Answer::Response {
            status: 200,
            body: body.as_bytes(),
        }
    }

    const INTROSPECTION: &str = r#"{"provider_type": "oauth2_token", "config": {
        "introspection": {"url": "http://idp/introspect", "client_id": "c",
                          "client_secret": "s"},
        "clock_skew_seconds": 0, "cache_ttl": 30}}"#;

    #[test]
    fn introspection_answers_are_cached_for_cache_ttl() {
        let mut core = core_for(INTROSPECTION);
        let req = request(Some("tok-a"), "/v1/models");
        let key = callout_key(&decide_at(&mut core, &req, NOW));
        let exp = NOW + 3600;
        let body = format!(r#"{{"active": true, "sub": "alice", "exp": {exp}}}"#);
        let id = core
            .provider_answer(key, ok(&body), None, NOW * 1000 + 999)
            .done();
        assert_eq!(id.unwrap().unwrap().principal, "alice");
        assert_eq!(
            decide_at(&mut core, &req, NOW + 1).principal(),
            Some("alice")
        );
        assert_eq!(
            decide_at(&mut core, &req, NOW + 30).principal(),
            Some("alice")
        );
        assert_eq!(core.tokens.hits, 2);
        assert_eq!(callout_key(&decide_at(&mut core, &req, NOW + 31)), key);
        // Missing and malformed credentials never reach the provider.
        assert!(matches!(
            decide_at(&mut core, &request(None, "/"), NOW),
            Step::Deny(Denial::MissingCredentials(_))
        ));
        let basic = RequestFacts {
            authorization: Some(b"Basic abc".to_vec()),
            ..RequestFacts::default()
        };
        assert_eq!(
            decide_at(&mut core, &basic, NOW),
            Step::Deny(Denial::InvalidHeaderFormat)
        );
    }

    #[test]
    fn introspection_cache_never_outlives_the_token() {
        let mut core = core_for(INTROSPECTION);
        let req = request(Some("tok-b"), "/v1/models");
        let key = callout_key(&decide_at(&mut core, &req, NOW));
        let body = format!(r#"{{"active": true, "sub": "bob", "exp": {}}}"#, NOW + 10);
        assert!(core
            .provider_answer(key, ok(&body), None, NOW * 1000)
            .done()
            .is_ok());
        assert_eq!(
            decide_at(&mut core, &req, NOW + 10).principal(),
            Some("bob")
        );
        assert_eq!(callout_key(&decide_at(&mut core, &req, NOW + 11)), key);
    }

    #[test]
    fn a_wrong_audience_is_remembered_briefly() {
        let with_audience = INTROSPECTION.replace(
            r#""cache_ttl": 30"#,
            r#""cache_ttl": 30, "audience": "llama-stack""#,
        );
        let mut core = core_for(&with_audience);
        let req = request(Some("tok-aud"), "/v1/models");
        let key = callout_key(&decide_at(&mut core, &req, NOW));
        let answer = ok(r#"{"active": true, "sub": "a", "aud": "other", "exp": 99999999999}"#);
        let no = core.provider_answer(key, answer, None, NOW * 1000).done();
        let denied = Denial::Provider(ProviderError::WrongAudience);
        assert_eq!(no, Err(denied.clone()));
        assert_eq!(
            decide_at(&mut core, &req, NOW + NEGATIVE_TTL),
            Step::Deny(denied)
        );
        assert_eq!(
            callout_key(&decide_at(&mut core, &req, NOW + NEGATIVE_TTL + 1)),
            key
        );
    }

    #[test]
    fn definite_refusals_are_remembered_briefly_errors_never() {
        let mut core = core_for(INTROSPECTION);
        let req = request(Some("tok-c"), "/v1/models");
        let key = callout_key(&decide_at(&mut core, &req, NOW));
        let no = core
            .provider_answer(key, ok(r#"{"active": false}"#), None, NOW * 1000)
            .done();
        let denied = Step::Deny(Denial::Provider(ProviderError::NotActive));
        assert_eq!(no, Err(Denial::Provider(ProviderError::NotActive)));
        assert_eq!(decide_at(&mut core, &req, NOW + NEGATIVE_TTL), denied);
        assert_eq!(
            callout_key(&decide_at(&mut core, &req, NOW + NEGATIVE_TTL + 1)),
            key
        );
        // A provider error (here a 500) is not remembered at all.
        let err = Answer::Response {
            status: 500,
            body: b"",
        };
        assert!(core
            .provider_answer(key, err, None, NOW * 1000)
            .done()
            .is_err());
        assert_eq!(callout_key(&decide_at(&mut core, &req, NOW + 1)), key);
    }

    #[test]
    fn cache_ttl_zero_asks_every_time() {
        let mut core = core_for(&INTROSPECTION.replace(r#""cache_ttl": 30"#, r#""cache_ttl": 0"#));
        let req = request(Some("tok-d"), "/v1/models");
        let key = callout_key(&decide_at(&mut core, &req, NOW));
        let body = format!(r#"{{"active": true, "sub": "dan", "exp": {}}}"#, NOW + 60);
        assert!(core
            .provider_answer(key, ok(&body), None, NOW * 1000)
            .done()
            .is_ok());
        assert_eq!(callout_key(&decide_at(&mut core, &req, NOW)), key);
        assert!(core.tokens.is_empty());
    }

    #[test]
    fn custom_answers_are_cached_per_token_and_path() {
        let mut core = core_for(
            r#"{"provider_type": "custom", "config": {
                "endpoint": "http://authsvc/validate", "cache_ttl": 30}}"#,
        );
        let a = request(Some("key-1"), "/v1/a");
        let key = callout_key(&decide_at(&mut core, &a, NOW));
        let id = core
            .provider_answer(key, ok(r#"{"principal": "carol"}"#), None, NOW * 1000)
            .done();
        assert_eq!(id.unwrap().unwrap().principal, "carol");
        assert_eq!(
            decide_at(&mut core, &a, NOW + 30).principal(),
            Some("carol")
        );
        let b = request(Some("key-1"), "/v1/b");
        let other = callout_key(&decide_at(&mut core, &b, NOW));
        assert_ne!(other, key, "another path is another question");
        // The endpoint's 401 is a definite no; its 500 is not.
        let refused = Answer::Response {
            status: 401,
            body: b"",
        };
        assert!(core
            .provider_answer(other, refused, None, NOW * 1000)
            .done()
            .is_err());
        assert!(matches!(
            decide_at(&mut core, &b, NOW + 1),
            Step::Deny(Denial::Provider(ProviderError::AuthFailed(401)))
        ));
        let c = request(Some("key-2"), "/v1/a");
        let third = callout_key(&decide_at(&mut core, &c, NOW));
        let failed = Answer::Response {
            status: 500,
            body: b"",
        };
        assert!(core
            .provider_answer(third, failed, None, NOW * 1000)
            .done()
            .is_err());
        assert_eq!(callout_key(&decide_at(&mut core, &c, NOW)), third);
    }

    #[test]
    fn credentials_parsing() {
        assert_eq!(credentials(None), Credentials::Missing);
        assert_eq!(credentials(Some(b"Basic abc")), Credentials::BadFormat);
        assert_eq!(credentials(Some(b"Bearer")), Credentials::Bearer(b""));
        assert_eq!(credentials(Some(b"Bearerabc")), Credentials::BadFormat);
        assert_eq!(
            credentials(Some(b"Bearer abc")),
            Credentials::Bearer(b"abc")
        );
        assert_eq!(
            credentials(Some(b"bearer  abc ")),
            Credentials::Bearer(b"abc")
        );
        assert_eq!(credentials(Some(b"Bearer ")), Credentials::Bearer(b""));
        assert_eq!(
            credentials(Some(b"Bearer \xff\xfe")),
            Credentials::Bearer(b"\xff\xfe")
        );
        assert_eq!(as_token(b"abc"), "abc");
        assert_eq!(as_token(b"\xff\xfe"), "\u{fffd}");
    }

    #[test]
    fn bearer_without_a_token_is_a_bad_header_for_every_provider() {
        let jwt = r#"{"provider_type": "oauth2_token", "config": {
            "jwks": {"uri": "http://idp/jwks"}}}"#;
        for auth in [jwt, INTROSPECTION, CUSTOM] {
            let mut core = core_for(auth);
            for header in [&b"Bearer"[..], b"Bearer ", b"bearer", b"Bearer   "] {
                let req = RequestFacts {
                    authorization: Some(header.to_vec()),
                    ..RequestFacts::default()
                };
                assert_eq!(
                    decide_at(&mut core, &req, NOW),
                    Step::Deny(Denial::InvalidHeaderFormat),
                    "{auth} {header:?}"
                );
            }
        }
    }

    const CUSTOM: &str = r#"{"provider_type": "custom", "config": {
        "endpoint": "http://authsvc/validate", "cache_ttl": 30}}"#;

    /// A request as the filter builds it: `raw` is the `:path`.
    fn raw_request(token: &str, raw: &str) -> RequestFacts {
        RequestFacts {
            path: crate::path::normalize_path(raw).unwrap(),
            raw_path: raw.into(),
            authorization: Some(format!("Bearer {token}").into_bytes()),
            ..RequestFacts::default()
        }
    }

    /// The callout of `step` and the JSON body it sends.
    fn callout_body(step: &Step) -> (CacheKey, serde_json::Value) {
        match step {
            Step::Callout(c) => (c.key, serde_json::from_slice(&c.request.body).unwrap()),
            other => panic!("expected a callout, got {other:?}"),
        }
    }

    #[test]
    fn custom_endpoint_is_asked_about_the_path_its_answer_is_cached_under() {
        let mut core = core_for(CUSTOM);
        let odd = raw_request("key-1", "/v1//admin/x?p=1");
        let (key, body) = callout_body(&decide_at(&mut core, &odd, NOW));
        assert_eq!(body["request"]["path"], "/v1/admin/x");
        assert_eq!(body["request"]["params"], serde_json::json!({"p": ["1"]}));
        let plain = raw_request("key-1", "/v1/admin/x");
        assert_eq!(callout_key(&decide_at(&mut core, &plain, NOW)), key);
        let id = core
            .provider_answer(key, ok(r#"{"principal": "carol"}"#), None, NOW * 1000)
            .done();
        assert!(id.is_ok());
        // The answer given for `/v1/admin/x` serves every spelling of it.
        for raw in ["/v1/admin/x", "/v1//admin/x", "/v1/x/../%61dmin/x?q"] {
            let req = raw_request("key-1", raw);
            assert_eq!(decide_at(&mut core, &req, NOW).principal(), Some("carol"));
        }
        // Parameters are part of the path the endpoint sees.
        let (other, body) = callout_body(&decide_at(
            &mut core,
            &raw_request("key-1", "/v1/admin/x;v=2"),
            NOW,
        ));
        assert_ne!(other, key);
        assert_eq!(body["request"]["path"], "/v1/admin/x;v=2");
    }

    #[test]
    fn custom_cache_ttl_zero_shares_no_callout_and_remembers_nothing() {
        let mut core = core_for(&CUSTOM.replace(r#""cache_ttl": 30"#, r#""cache_ttl": 0"#));
        let mine = raw_request("key-1", "/v1/models?project=mine");
        let victim = raw_request("key-1", "/v1/models?project=victim");
        let k1 = callout_key(&decide_at(&mut core, &mine, NOW));
        let k2 = callout_key(&decide_at(&mut core, &victim, NOW));
        let k3 = callout_key(&decide_at(&mut core, &mine, NOW));
        assert!(k1 != k2 && k1 != k3 && k2 != k3, "one callout per request");
        // Neither a refusal nor an allowance is remembered.
        let refused = Answer::Response {
            status: 401,
            body: b"",
        };
        assert!(core
            .provider_answer(k2, refused, None, NOW * 1000)
            .done()
            .is_err());
        assert!(core
            .provider_answer(k1, ok(r#"{"principal": "carol"}"#), None, NOW * 1000)
            .done()
            .is_ok());
        assert!(core.tokens.is_empty());
        assert!(matches!(
            decide_at(&mut core, &victim, NOW),
            Step::Callout(_)
        ));
        assert!(matches!(decide_at(&mut core, &mine, NOW), Step::Callout(_)));
    }

    #[test]
    fn custom_callouts_are_shared_only_as_far_as_the_cache_reuses() {
        let mut core = core_for(CUSTOM);
        let key = |core: &mut Core, token: &str, raw: &str| {
            callout_key(&decide_at(core, &raw_request(token, raw), NOW))
        };
        let k = key(&mut core, "key-1", "/v1/models?project=mine");
        // Within `cache_ttl` the answer depends on token and path only.
        assert_eq!(key(&mut core, "key-1", "/v1/models?project=victim"), k);
        assert_eq!(key(&mut core, "key-1", "/v1//models"), k);
        assert_ne!(key(&mut core, "key-2", "/v1/models"), k);
        assert_ne!(key(&mut core, "key-1", "/v1/models/"), k);
    }
}
