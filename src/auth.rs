//! The request decision, without the host: credentials → identity → route
//! rules → quota. A small state machine for the key set says when keys must
//! be fetched; the glue (`filter`) performs the callouts and parks requests
//! that have to wait for them.

use crate::claims::Identity;
use crate::config::{AuthConfig, Config, JwtConfig};
use crate::jwks::{JwksError, KeySet};
use crate::jwt::{self, Rules, TokenError};
use crate::quota::{self, Client, QuotaDecision, SharedStore};
use crate::response::Denial;
use std::collections::HashMap;
use std::rc::Rc;

/// What the decision needs to know of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestFacts {
    pub method: String,
    /// The normalised path (see `policy::normalize_path`).
    pub path: String,
    /// The raw `Authorization` value, if any.
    pub authorization: Option<Vec<u8>>,
    /// The client's address without the port, if known.
    pub source_ip: Option<String>,
}

/// The outcome for an allowed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowed {
    /// Absent for anonymous requests (public paths, no `auth`).
    pub identity: Option<Rc<Identity>>,
    /// `RateLimit-*` headers for the response, when quotas send them.
    pub response_headers: Vec<(String, String)>,
}

/// What to do with a request now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Allow(Allowed),
    Deny(Denial),
    /// Park the request until the key set fetch ends, then decide again.
    WaitForKeys,
}

/// Why a key set fetch failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchError {
    Unavailable,
    Timeout,
}

impl FetchError {
    pub fn denial(self) -> Denial {
        match self {
            FetchError::Unavailable => Denial::AuthUnavailable,
            FetchError::Timeout => Denial::AuthTimeout,
        }
    }
}

/// Longest pause between failed fetches.
pub const MAX_BACKOFF_MS: u64 = 10_000;
const FIRST_BACKOFF_MS: u64 = 500;

/// The key set and when to fetch it (all times in milliseconds).
#[derive(Debug, Default)]
pub struct JwksState {
    pub keys: Option<Rc<KeySet>>,
    /// SHA-256 of the document the keys came from.
    digest: Option<[u8; 32]>,
    fetched_at: u64,
    /// When the fetch under way started.
    pub in_flight_since: Option<u64>,
    /// A fetch should start as soon as possible.
    pub wanted: bool,
    failures: u32,
    retry_at: u64,
    pub last_error: Option<FetchError>,
    last_kid_refresh: Option<u64>,
    /// Bumped whenever the usable keys change.
    pub generation: u64,
}

impl JwksState {
    /// Whether the glue should start a fetch now.
    pub fn should_fetch(&self, now: u64, ttl_ms: u64) -> bool {
        if self.in_flight_since.is_some() || now < self.retry_at {
            return false;
        }
        self.wanted || self.keys.is_none() || now.saturating_sub(self.fetched_at) >= ttl_ms
    }

    pub fn started(&mut self, now: u64) {
        self.in_flight_since = Some(now);
        self.wanted = false;
    }

    /// A fetch answered with a document; returns whether the keys changed.
    pub fn succeeded(&mut self, body: &[u8], now: u64) -> Result<bool, JwksError> {
        self.in_flight_since = None;
        let digest = hmac_sha256::Hash::hash(body);
        if self.keys.is_some() && self.digest == Some(digest) {
            self.fetched_at = now;
            self.failures = 0;
            self.last_error = None;
            return Ok(false);
        }
        match KeySet::parse(body) {
            Ok(keys) => {
                self.keys = Some(Rc::new(keys));
                self.digest = Some(digest);
                self.fetched_at = now;
                self.failures = 0;
                self.last_error = None;
                self.generation = self.generation.wrapping_add(1);
                Ok(true)
            }
            Err(e) => {
                self.failed(FetchError::Unavailable, now);
                Err(e)
            }
        }
    }

    /// A fetch failed: keep any keys, back off before the next try.
    pub fn failed(&mut self, why: FetchError, now: u64) {
        self.in_flight_since = None;
        self.failures = self.failures.saturating_add(1);
        let exp = self.failures.saturating_sub(1).min(10);
        let backoff = FIRST_BACKOFF_MS
            .saturating_mul(1u64 << exp)
            .min(MAX_BACKOFF_MS);
        self.retry_at = now.saturating_add(backoff);
        self.last_error = Some(why);
    }

    /// Whether an unknown `kid` may trigger a refresh now (one per cooldown).
    fn kid_refresh(&mut self, now: u64, cooldown_ms: u64) -> bool {
        let allowed = self
            .last_kid_refresh
            .is_none_or(|t| now.saturating_sub(t) >= cooldown_ms)
            && now >= self.retry_at;
        if allowed {
            self.last_kid_refresh = Some(now);
            self.wanted = true;
        }
        allowed
    }
}

/// Verified tokens, keyed by SHA-256 of the token, bounded.
#[derive(Debug, Default)]
pub struct TokenCache {
    map: HashMap<[u8; 32], (Rc<Identity>, u64)>,
    generation: u64,
    pub hits: u64,
    pub misses: u64,
}

/// Most tokens a worker remembers.
pub const TOKEN_CACHE_CAPACITY: usize = 10_000;

impl TokenCache {
    fn get(&mut self, key: &[u8; 32], generation: u64, now_s: u64) -> Option<Rc<Identity>> {
        if generation != self.generation {
            self.map.clear();
            self.generation = generation;
        }
        match self.map.get(key) {
            Some((id, exp)) if now_s <= *exp => {
                self.hits += 1;
                Some(id.clone())
            }
            Some(_) => {
                self.map.remove(key);
                self.misses += 1;
                None
            }
            None => {
                self.misses += 1;
                None
            }
        }
    }

    fn put(&mut self, key: [u8; 32], id: Rc<Identity>, valid_until: u64, now_s: u64) {
        if self.map.len() >= TOKEN_CACHE_CAPACITY {
            self.map.retain(|_, (_, exp)| *exp >= now_s);
            if self.map.len() >= TOKEN_CACHE_CAPACITY {
                // Still full of live tokens: drop an arbitrary eighth.
                let drop: Vec<[u8; 32]> = self
                    .map
                    .keys()
                    .take(TOKEN_CACHE_CAPACITY / 8)
                    .copied()
                    .collect();
                for k in drop {
                    self.map.remove(&k);
                }
            }
        }
        self.map.insert(key, (id, valid_until));
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// Per-VM decision state.
#[derive(Debug)]
pub struct Core {
    pub config: Rc<Config>,
    pub jwks: JwksState,
    pub tokens: TokenCache,
    missing_message: String,
}

/// What `Authorization` holds.
#[derive(Debug, PartialEq, Eq)]
enum Credentials<'a> {
    Missing,
    BadFormat,
    Bearer(&'a str),
}

fn credentials(value: Option<&[u8]>) -> Credentials<'_> {
    let Some(v) = value else {
        return Credentials::Missing;
    };
    let Some((scheme, rest)) = v.split_at_checked(6) else {
        return Credentials::BadFormat;
    };
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return Credentials::BadFormat;
    }
    let Some((&b' ', token)) = rest.split_first() else {
        return Credentials::BadFormat;
    };
    let token = token.trim_ascii();
    // A non-UTF-8 token is no token: the verifier refuses it.
    Credentials::Bearer(std::str::from_utf8(token).unwrap_or("\u{fffd}"))
}

impl Core {
    pub fn new(config: Rc<Config>) -> Core {
        let missing_message = match &config.auth {
            Some(AuthConfig::Jwt(j)) => {
                let mut m = "Authentication required. Please provide a valid OAuth2 Bearer token"
                    .to_string();
                if let Some(iss) = &j.issuer {
                    m.push_str(" from ");
                    m.push_str(iss);
                }
                m
            }
            None => String::new(),
        };
        Core {
            config,
            jwks: JwksState::default(),
            tokens: TokenCache::default(),
            missing_message,
        }
    }

    /// The JWT settings, when that is the provider.
    pub fn jwt_config(&self) -> Option<&JwtConfig> {
        match &self.config.auth {
            Some(AuthConfig::Jwt(j)) => Some(j),
            None => None,
        }
    }

    /// Decides a request at `now_ms`. Idempotent until it allows: a parked
    /// request is decided again from the start when keys arrive.
    pub fn decide(&mut self, req: &RequestFacts, now_ms: u64, store: &dyn SharedStore) -> Step {
        let config = self.config.clone();
        let public = config.public_paths.matches(&req.path);
        let identity = match (&config.auth, public) {
            (None, _) | (_, true) => None,
            (Some(AuthConfig::Jwt(j)), false) => {
                match self.authenticate_jwt(j, req.authorization.as_deref(), now_ms) {
                    Ok(id) => Some(id),
                    Err(step) => return step,
                }
            }
        };
        if let Some(id) = &identity {
            if let Err(why) = config
                .route_rules
                .check(&req.method, &req.path, &id.attributes)
            {
                return Step::Deny(Denial::Forbidden(why));
            }
        }
        let mut response_headers = Vec::new();
        if let Some(q) = &config.quota {
            let client = match (&identity, &req.source_ip) {
                (Some(id), _) => Client::Principal(&id.principal),
                (None, Some(ip)) => Client::Anonymous(ip),
                (None, None) => Client::Anonymous("unknown"),
            };
            let headers = |limit: u64, remaining: u64, reset: u64| {
                if q.headers {
                    vec![
                        ("ratelimit-limit".to_string(), limit.to_string()),
                        ("ratelimit-remaining".to_string(), remaining.to_string()),
                        ("ratelimit-reset".to_string(), reset.to_string()),
                    ]
                } else {
                    Vec::new()
                }
            };
            match quota::check(q, store, &client, now_ms / 1000) {
                QuotaDecision::Allowed {
                    limit,
                    remaining,
                    reset,
                } => response_headers = headers(limit, remaining, reset),
                QuotaDecision::Exceeded { limit, reset } => {
                    return Step::Deny(Denial::QuotaExceeded {
                        retry_after: reset,
                        headers: headers(limit, 0, reset),
                    })
                }
                QuotaDecision::Contended => return Step::Deny(Denial::QuotaContended),
                QuotaDecision::Unavailable => return Step::Deny(Denial::QuotaUnavailable),
            }
        }
        Step::Allow(Allowed {
            identity,
            response_headers,
        })
    }

    fn authenticate_jwt(
        &mut self,
        j: &JwtConfig,
        authorization: Option<&[u8]>,
        now_ms: u64,
    ) -> Result<Rc<Identity>, Step> {
        let token = match credentials(authorization) {
            Credentials::Missing => {
                return Err(Step::Deny(Denial::MissingCredentials(
                    self.missing_message.clone(),
                )))
            }
            Credentials::BadFormat => return Err(Step::Deny(Denial::InvalidHeaderFormat)),
            Credentials::Bearer(t) => t,
        };
        let now_s = now_ms / 1000;
        let key = hmac_sha256::Hash::hash(token.as_bytes());
        if let Some(id) = self.tokens.get(&key, self.jwks.generation, now_s) {
            return Ok(id);
        }
        let rules = Rules {
            audiences: &j.audiences,
            issuer: j.issuer.as_deref(),
            clock_skew_seconds: j.clock_skew_seconds,
            claims_mapping: &j.claims_mapping,
        };
        let Some(keys) = self.jwks.keys.clone() else {
            // No keys yet: refuse what is refused without keys, else wait.
            if let Err(e) = jwt::parse(token, &rules, now_s) {
                return Err(Step::Deny(Denial::InvalidToken(e)));
            }
            if self.jwks.in_flight_since.is_some() {
                return Err(Step::WaitForKeys);
            }
            if self.jwks.should_fetch(now_ms, u64::MAX) {
                self.jwks.wanted = true;
                return Err(Step::WaitForKeys);
            }
            let why = self.jwks.last_error.unwrap_or(FetchError::Unavailable);
            return Err(Step::Deny(why.denial()));
        };
        match jwt::verify(token, &keys, &rules, now_s) {
            Ok(v) => {
                let id = Rc::new(v.identity);
                let until = v.exp.saturating_add(j.clock_skew_seconds);
                self.tokens.put(key, id.clone(), until, now_s);
                Ok(id)
            }
            Err(TokenError::UnknownKid) => {
                if self.jwks.in_flight_since.is_some()
                    || self
                        .jwks
                        .kid_refresh(now_ms, j.refresh_cooldown_seconds.saturating_mul(1000))
                {
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

    #[test]
    fn credentials_parsing() {
        assert_eq!(credentials(None), Credentials::Missing);
        assert_eq!(credentials(Some(b"Basic abc")), Credentials::BadFormat);
        assert_eq!(credentials(Some(b"Bearer")), Credentials::BadFormat);
        assert_eq!(credentials(Some(b"Bearerabc")), Credentials::BadFormat);
        assert_eq!(credentials(Some(b"Bearer abc")), Credentials::Bearer("abc"));
        assert_eq!(
            credentials(Some(b"bearer  abc ")),
            Credentials::Bearer("abc")
        );
        assert_eq!(credentials(Some(b"Bearer ")), Credentials::Bearer(""));
        assert_eq!(
            credentials(Some(b"Bearer \xff\xfe")),
            Credentials::Bearer("\u{fffd}")
        );
    }

    #[test]
    fn backoff_grows_to_ten_seconds() {
        let mut s = JwksState::default();
        assert!(s.should_fetch(0, 1000));
        s.started(0);
        assert!(!s.should_fetch(0, 1000));
        s.failed(FetchError::Timeout, 0);
        assert!(!s.should_fetch(499, 1000));
        assert!(s.should_fetch(500, 1000));
        for _ in 0..20 {
            s.started(0);
            s.failed(FetchError::Unavailable, 0);
        }
        assert!(!s.should_fetch(9_999, 1000));
        assert!(s.should_fetch(10_000, 1000));
        assert_eq!(s.last_error, Some(FetchError::Unavailable));
    }

    #[test]
    fn kid_refresh_is_rate_limited() {
        let mut s = JwksState::default();
        assert!(s.kid_refresh(1_000, 10_000));
        assert!(!s.kid_refresh(5_000, 10_000));
        assert!(s.kid_refresh(11_000, 10_000));
    }
}
