//! Per-client quotas counted in shared data.
//!
//! Shaped like Llama Stack's `server.quota`:
//!
//! ```json
//! {"quota": {"authenticated_max_requests": 1000, "anonymous_max_requests": 100,
//!            "period": "day", "headers": true}}
//! ```
//!
//! Windows are fixed and aligned to UTC (`minute`, `hour`, `day`). An
//! authenticated request is counted by its principal against
//! `authenticated_max_requests`; an anonymous one by its client address
//! prefix (`anonymous_ipv4_prefix`, `anonymous_ipv6_prefix`) against
//! `anonymous_max_requests`.
//!
//! This module is a sans-IO core: the host's shared data is reached through
//! [`SharedStore`], which the proxy-wasm glue implements. Counting is exact
//! across Envoy's worker VMs: every write is a compare-and-swap, retried on
//! mismatch, and never unconditional (see [`check`]).
//!
//! # Memory
//!
//! Shared data has no delete in the proxy-wasm ABI: an entry stays for the
//! life of the Envoy process.
//!
//! * Principals: one entry per principal, `tollgate/quota/a/<principal>` =
//!   `"<window_start> <count>"`; a new window overwrites the old one.
//! * Anonymous clients: a fixed table of `anonymous_slots` entries
//!   `tollgate/quota/anon/<n>` = `"<window_start> <fingerprint> <count>"`,
//!   reused across windows, plus one entry `tollgate/quota/anon/key` (the
//!   table's hash key). However many addresses are seen, the table never has
//!   more entries (see [`check`] for how slots are claimed).

use crate::json::{ConfigError, Obj};
use crate::store::{SharedStore, StoreError, CREATE_CAS};
use serde_json::Value;
use std::cell::OnceCell;
use std::net::IpAddr;

/// Where one kind of count lives in shared data: the key prefix of
/// authenticated clients' counters and of the anonymous table's slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ledger {
    principal_prefix: &'static str,
    slot_prefix: &'static str,
}

/// Requests (`quota`).
pub const REQUESTS: Ledger = Ledger {
    principal_prefix: "tollgate/quota/a/",
    slot_prefix: "tollgate/quota/anon/",
};

/// Tokens (`quota.tokens`): `tollgate/tokens/a/<principal>` and
/// `tollgate/tokens/anon/<n>`, in a table of the same size and hash key.
pub const TOKENS: Ledger = Ledger {
    principal_prefix: "tollgate/tokens/a/",
    slot_prefix: "tollgate/tokens/anon/",
};
/// The anonymous table's hash key, the same for every VM of the process.
pub const TABLE_KEY: &str = "tollgate/quota/anon/key";

/// How many slots an anonymous client may look at (its home slot first).
pub const PROBES: u64 = 8;
/// The most `anonymous_slots` accepted.
pub const MAX_SLOTS: u64 = 1 << 22;

/// How many read-and-compare-and-swap rounds one request may take before it
/// gives up and fails closed with [`QuotaDecision::Contended`].
pub const MAX_ATTEMPTS: u32 = 32;

/// The accepted values of `period`, for error messages.
use crate::period::PERIODS;

pub use crate::period::Period;

/// The `quota` configuration.
///
/// A maximum of 0 is allowed and means that nobody of that kind passes: every
/// such request is answered [`QuotaDecision::Exceeded`] without touching the
/// shared data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaConfig {
    pub authenticated_max_requests: u64,
    pub anonymous_max_requests: u64,
    pub period: Period,
    /// Whether to send `RateLimit-Limit`, `RateLimit-Remaining` and
    /// `RateLimit-Reset`.
    pub headers: bool,
    /// gRPC callers over quota get `RESOURCE_EXHAUSTED` (true, the default)
    /// or `UNAVAILABLE`, as Envoy's `local_ratelimit` option of this name.
    pub rate_limited_as_resource_exhausted: bool,
    /// Anonymous IPv4 clients are counted per prefix of this length (0–32).
    pub anonymous_ipv4_prefix: u8,
    /// Anonymous IPv6 clients are counted per prefix of this length (0–128).
    pub anonymous_ipv6_prefix: u8,
    /// Slots in the anonymous table (1–[`MAX_SLOTS`]).
    pub anonymous_slots: u64,
    /// Where requests are counted: `None` in this Envoy's shared data; with a
    /// backend, in a rate-limit service shared by every Envoy.
    pub backend: Option<Backend>,
    /// Whether requests are counted: always, except with `tokens` and
    /// neither `authenticated_max_requests` nor `anonymous_max_requests`.
    pub count_requests: bool,
    /// Token budgets (`tokens`).
    pub tokens: Option<crate::token_quota::TokenQuota>,
    /// Whom an authenticated request is counted for (`key`).
    pub key: QuotaKey,
    /// Not configuration: this VM's copy of the anonymous table's hash key,
    /// read once from shared data. Leave it at its default.
    pub table_key: KeyCache,
}

/// A VM's copy of the anonymous table's hash key: not configuration, so it
/// takes no part in comparisons.
#[derive(Clone, Default)]
pub struct KeyCache(OnceCell<(u64, u64)>);

impl PartialEq for KeyCache {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for KeyCache {}

impl std::fmt::Debug for KeyCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyCache")
    }
}

impl Default for QuotaConfig {
    /// Llama Stack's defaults: 1000 authenticated, 100 anonymous, per day,
    /// with headers; anonymous clients per IPv4 address and IPv6 /64, in
    /// 65,536 slots.
    fn default() -> Self {
        QuotaConfig {
            authenticated_max_requests: 1000,
            anonymous_max_requests: 100,
            period: Period::Day,
            headers: true,
            rate_limited_as_resource_exhausted: true,
            anonymous_ipv4_prefix: 32,
            anonymous_ipv6_prefix: 64,
            anonymous_slots: 65_536,
            backend: None,
            count_requests: true,
            tokens: None,
            key: QuotaKey::Principal,
            table_key: KeyCache::default(),
        }
    }
}

/// `quota.key`: whom an authenticated request is counted for, by request
/// and token quotas alike. A request without a tenant is counted for its
/// principal whatever the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaKey {
    /// `"principal"` (the default): each principal.
    Principal,
    /// `"tenant"`: the whole tenant shares one count.
    Tenant,
    /// `"tenant_principal"`: each principal within its tenant.
    TenantPrincipal,
}

impl QuotaKey {
    /// The name an identity is counted under: its principal, or with a
    /// tenant key `tenant␟<tenant>` / `<tenant>␟<principal>` (U+001F, which
    /// no principal contains, keeps them apart from every principal).
    pub fn client_name<'a>(
        self,
        principal: &'a str,
        tenant: Option<&str>,
    ) -> std::borrow::Cow<'a, str> {
        match (self, tenant) {
            (QuotaKey::Tenant, Some(t)) => format!("tenant\u{1f}{t}").into(),
            (QuotaKey::TenantPrincipal, Some(t)) => format!("{t}\u{1f}{principal}").into(),
            _ => principal.into(),
        }
    }
}

/// `quota.backend`: a rate-limit service (`envoy.service.ratelimit.v3`, e.g.
/// envoyproxy/ratelimit on Redis) counting for every Envoy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// The Envoy cluster of the service (HTTP/2).
    pub cluster: String,
    /// The rate-limit domain.
    pub domain: String,
    pub timeout_ms: u64,
    pub failure_mode: FailureMode,
    /// Most requests counted in one call (`max_batch`, 1 to
    /// [`MAX_BATCH`]; default 1: one call per request). With more than one,
    /// each Envoy worker has one call under way at a time and the requests
    /// counted meanwhile go together in the next, one descriptor each; only
    /// for services that answer every descriptor from its own count
    /// (envoyproxy/ratelimit; not Limitador).
    pub max_batch: usize,
}

/// Largest `quota.backend.max_batch`: a batch's answers are sent from one
/// host callback (see [`crate::driver::RESUME_BATCH`]).
pub const MAX_BATCH: u64 = 64;

/// What a request gets when the service cannot answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureMode {
    /// 503 `Quota service unavailable`.
    Deny,
    /// Counted in this Envoy's shared data instead (logged and counted).
    Local,
}

/// Default `quota.backend.timeout_ms`: Envoy's `ratelimit` filter uses 20,
/// but the first call of each Envoy worker also opens the HTTP/2 connection,
/// which took longer than 20 ms on a busy 2-core machine (a 503 with
/// `failure_mode: deny`).
pub const DEFAULT_BACKEND_TIMEOUT_MS: u64 = 100;

impl Backend {
    fn parse(v: &Value, key: &str) -> Result<Backend, ConfigError> {
        let mut o = Obj::new(v, key)?;
        match o.str("type")? {
            Some("rls") => {}
            Some(other) => {
                return Err(ConfigError::new(
                    o.path("type"),
                    format!("must be \"rls\", found {other:?}"),
                ))
            }
            None => return Err(ConfigError::new(o.path("type"), "is required (\"rls\")")),
        }
        let cluster = o
            .str("cluster")?
            .ok_or_else(|| ConfigError::new(o.path("cluster"), "is required"))?
            .to_string();
        if cluster.is_empty() || cluster.len() > 120 || !cluster.is_ascii() {
            return Err(ConfigError::new(
                o.path("cluster"),
                "must be an ASCII cluster name of 1 to 120 bytes",
            ));
        }
        let domain = o
            .str("domain")?
            .ok_or_else(|| ConfigError::new(o.path("domain"), "is required"))?
            .to_string();
        if domain.is_empty() {
            return Err(ConfigError::new(o.path("domain"), "must not be empty"));
        }
        let timeout_ms = match o.u64_max("timeout_ms", 60_000)? {
            None => DEFAULT_BACKEND_TIMEOUT_MS,
            Some(0) => return Err(ConfigError::new(o.path("timeout_ms"), "must be at least 1")),
            Some(n) => n,
        };
        let failure_mode = match o.str("failure_mode")? {
            None | Some("deny") => FailureMode::Deny,
            Some("local") => FailureMode::Local,
            Some(other) => {
                return Err(ConfigError::new(
                    o.path("failure_mode"),
                    format!("must be \"deny\" or \"local\", found {other:?}"),
                ))
            }
        };
        let max_batch = match o.u64_max("max_batch", MAX_BATCH)? {
            None => 1,
            Some(0) => return Err(ConfigError::new(o.path("max_batch"), "must be at least 1")),
            Some(n) => usize::try_from(n).unwrap_or(1),
        };
        o.finish()?;
        Ok(Backend {
            cluster,
            domain,
            timeout_ms,
            failure_mode,
            max_batch,
        })
    }
}

/// A request to count in the rate-limit service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteCount {
    /// The descriptor entry: [`crate::rls::PRINCIPAL_KEY`] or
    /// [`crate::rls::ANONYMOUS_KEY`], and the client.
    pub key: &'static str,
    pub value: String,
    pub limit: u64,
    /// Seconds to the window's end, when the service does not say.
    pub reset: u64,
    /// The window's length (seconds).
    pub period: u64,
    /// Hits to add (`None`: one request).
    pub hits: Option<u64>,
}

impl RemoteCount {
    pub fn new(cfg: &QuotaConfig, client: &Client, now_secs: u64) -> RemoteCount {
        let (key, value) = match client {
            Client::Principal(p) => (crate::rls::PRINCIPAL_KEY, p.to_string()),
            Client::Anonymous(ip) => (crate::rls::ANONYMOUS_KEY, anonymous_prefix(cfg, ip)),
        };
        let start = cfg.period.window_start(now_secs);
        RemoteCount {
            key,
            value,
            limit: cfg.limit_for(client),
            reset: reset_after(start, cfg.period, now_secs),
            period: cfg.period.seconds(),
            hits: None,
        }
    }

    /// A token budget in the service (tokens as hits): `hits` tokens added
    /// for `client`, whose budget is `budget` per `t.period`. Sent with
    /// `hits` 0 before a request, the service's OVER_LIMIT says the budget
    /// is spent: its limit is `budget − 1`, as it answers OVER_LIMIT when
    /// the count after the hits is above its limit.
    pub fn tokens(
        cfg: &QuotaConfig,
        t: &crate::token_quota::TokenQuota,
        client: &Client,
        budget: u64,
        hits: u64,
        now_secs: u64,
    ) -> RemoteCount {
        let (key, value) = match client {
            Client::Principal(p) => (crate::rls::TOKENS_PRINCIPAL_KEY, p.to_string()),
            Client::Anonymous(ip) => (crate::rls::TOKENS_ANONYMOUS_KEY, anonymous_prefix(cfg, ip)),
        };
        let start = t.period.window_start(now_secs);
        RemoteCount {
            key,
            value,
            limit: budget.saturating_sub(1),
            reset: reset_after(start, t.period, now_secs),
            period: t.period.seconds(),
            hits: Some(hits),
        }
    }

    /// The descriptor of this count.
    pub fn hit(&self) -> crate::rls::Hit<'_> {
        crate::rls::Hit {
            key: self.key,
            value: &self.value,
            limit: self.limit,
            period: self.period,
            hits: self.hits,
        }
    }

    /// What the service's answer means for the request.
    pub fn decide(&self, v: &crate::rls::Verdict) -> QuotaDecision {
        let reset = v.reset.unwrap_or(self.reset).max(1);
        if v.over_limit {
            return QuotaDecision::Exceeded {
                limit: self.limit,
                reset,
            };
        }
        // Without numbers, the best tollgate knows: one used.
        let remaining = v
            .remaining
            .unwrap_or(self.limit.saturating_sub(1))
            .min(self.limit);
        QuotaDecision::Allowed {
            limit: self.limit,
            remaining,
            reset,
        }
    }
}

/// An anonymous client's address prefix as text (`2001:db8:1:2::/64`,
/// `192.0.2.7/32`, or `unknown`): the service's descriptor value.
pub fn anonymous_prefix(cfg: &QuotaConfig, ip: &str) -> String {
    let c = anonymous_client(cfg, ip);
    let (family, bytes) = c.split_first().unwrap_or((&0, &[]));
    match family {
        4 => {
            let a: [u8; 4] = bytes
                .get(..4)
                .and_then(|b| b.try_into().ok())
                .unwrap_or([0; 4]);
            format!(
                "{}/{}",
                std::net::Ipv4Addr::from(a),
                cfg.anonymous_ipv4_prefix
            )
        }
        6 => {
            let a: [u8; 16] = bytes
                .get(..16)
                .and_then(|b| b.try_into().ok())
                .unwrap_or([0; 16]);
            format!(
                "{}/{}",
                std::net::Ipv6Addr::from(a),
                cfg.anonymous_ipv6_prefix
            )
        }
        _ => "unknown".to_string(),
    }
}

impl QuotaConfig {
    /// Reads the `quota` object found at `key` (e.g. `"quota"`); absent keys
    /// take the defaults, unknown keys are refused.
    pub fn parse(v: &Value, key: &str) -> Result<QuotaConfig, ConfigError> {
        let mut o = Obj::new(v, key)?;
        let d = QuotaConfig::default();
        let authenticated = o.u64_max("authenticated_max_requests", u64::MAX)?;
        let anonymous = o.u64_max("anonymous_max_requests", u64::MAX)?;
        let tokens = match o.get("tokens") {
            Some(v) => Some(crate::token_quota::TokenQuota::parse(v, &o.path("tokens"))?),
            None => None,
        };
        let count_requests = tokens.is_none() || authenticated.is_some() || anonymous.is_some();
        let key = match o.str("key")? {
            None | Some("principal") => QuotaKey::Principal,
            Some("tenant") => QuotaKey::Tenant,
            Some("tenant_principal") => QuotaKey::TenantPrincipal,
            Some(other) => {
                return Err(ConfigError::new(
                    o.path("key"),
                    format!(
                    "must be \"principal\", \"tenant\" or \"tenant_principal\", found {other:?}"
                ),
                ))
            }
        };
        let authenticated_max_requests = authenticated.unwrap_or(d.authenticated_max_requests);
        let anonymous_max_requests = anonymous.unwrap_or(d.anonymous_max_requests);
        let period = match o.str("period")? {
            None => d.period,
            Some(name) => Period::from_name(name).ok_or_else(|| {
                ConfigError::new(
                    o.path("period"),
                    format!("must be {PERIODS}, found {name:?}"),
                )
            })?,
        };
        let headers = o.bool("headers")?.unwrap_or(d.headers);
        let rate_limited_as_resource_exhausted = o
            .bool("rate_limited_as_resource_exhausted")?
            .unwrap_or(d.rate_limited_as_resource_exhausted);
        let prefix = |o: &mut Obj, name: &str, max: u8, default: u8| {
            o.u64_max(name, u64::from(max))
                .map(|n| n.and_then(|n| u8::try_from(n).ok()).unwrap_or(default))
        };
        let anonymous_ipv4_prefix = prefix(&mut o, "anonymous_ipv4_prefix", 32, 32)?;
        let anonymous_ipv6_prefix = prefix(&mut o, "anonymous_ipv6_prefix", 128, 64)?;
        let anonymous_slots = match o.u64_max("anonymous_slots", MAX_SLOTS)? {
            None => d.anonymous_slots,
            Some(0) => {
                return Err(ConfigError::new(
                    o.path("anonymous_slots"),
                    "must be at least 1",
                ))
            }
            Some(n) => n,
        };
        let backend = match o.get("backend") {
            Some(v) => Some(Backend::parse(v, &o.path("backend"))?),
            None => None,
        };
        // Llama Stack keeps counts in a kvstore; here they live in Envoy's
        // shared data. Accepted so its settings move over unchanged.
        if o.obj("kvstore")?.is_some() {
            log::warn!(
                "{}: quota counts live in Envoy's shared data; the kvstore is not used",
                o.path("kvstore")
            );
        }
        o.finish()?;
        Ok(QuotaConfig {
            authenticated_max_requests,
            anonymous_max_requests,
            period,
            headers,
            rate_limited_as_resource_exhausted,
            anonymous_ipv4_prefix,
            anonymous_ipv6_prefix,
            anonymous_slots,
            backend,
            count_requests,
            tokens,
            key,
            table_key: KeyCache::default(),
        })
    }

    /// The limit that applies to this kind of client.
    pub fn limit_for(&self, client: &Client) -> u64 {
        match client {
            Client::Principal(_) => self.authenticated_max_requests,
            Client::Anonymous(_) => self.anonymous_max_requests,
        }
    }
}

/// Who is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Client<'a> {
    /// An authenticated request, by its verified principal.
    Principal(&'a str),
    /// An anonymous request, by client IP (without the port; anything that
    /// does not parse as an address is one shared "unknown" client).
    Anonymous(&'a str),
}

/// The shared-data key of a principal's counter:
/// `tollgate/quota/a/<principal>` for requests.
fn principal_key(ledger: &Ledger, principal: &str) -> String {
    [ledger.principal_prefix, principal].concat()
}

/// The first shared-data entry a client's count reads: a principal's counter,
/// or for anonymous clients the table's key [`TABLE_KEY`] (which places them
/// in the table's slots).
pub fn key_for(client: &Client) -> String {
    match client {
        Client::Principal(p) => principal_key(&REQUESTS, p),
        Client::Anonymous(_) => TABLE_KEY.to_string(),
    }
}

/// The shared-data key of anonymous slot `n`: `tollgate/quota/anon/<n>`
/// for requests.
fn slot_key(ledger: &Ledger, n: u64) -> String {
    let mut digits = [0; 20];
    let mut key = String::with_capacity(ledger.slot_prefix.len() + 7);
    key.push_str(ledger.slot_prefix);
    // ASCII digits only.
    key.push_str(std::str::from_utf8(decimal(n, &mut digits)).unwrap_or_default());
    key
}

/// The `RateLimit-*` values of a counted (or refused) request: numbers until
/// the answer goes out, so a request allocates no header strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub limit: u64,
    pub remaining: u64,
    /// Seconds until the window ends.
    pub reset: u64,
}

impl RateLimit {
    /// The three headers' names (lower-case) and values.
    pub fn values(&self) -> [(&'static str, u64); 3] {
        [
            ("ratelimit-limit", self.limit),
            ("ratelimit-remaining", self.remaining),
            ("ratelimit-reset", self.reset),
        ]
    }

    /// The three headers, names lower-case.
    pub fn headers(&self) -> [(&'static str, String); 3] {
        self.values().map(|(name, value)| (name, value.to_string()))
    }
}

/// `n` in decimal ASCII, written into `buf` (a `u64` has at most 20 digits):
/// a header value without allocating.
pub fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut start = buf.len();
    for slot in buf.iter_mut().rev() {
        // n % 10 < 10: the cast keeps every bit.
        *slot = b'0' + (n % 10) as u8;
        n /= 10;
        start -= 1;
        if n == 0 {
            break;
        }
    }
    buf.get(start..).unwrap_or_default()
}

/// The answer for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QuotaDecision {
    /// Counted. `remaining` is after this request; `reset` is the seconds to
    /// the window's end (at least 1).
    Allowed {
        limit: u64,
        remaining: u64,
        reset: u64,
    },
    /// Over the limit; not counted. The glue answers 429 with
    /// `Retry-After: <reset>`.
    Exceeded { limit: u64, reset: u64 },
    /// The compare-and-swap kept losing ([`MAX_ATTEMPTS`] rounds): fail
    /// closed. The glue answers 429 with `Retry-After: 1`.
    Contended,
    /// The shared data failed otherwise: fail closed. The glue answers 503.
    Unavailable,
}

/// Encodes a counter value: ASCII `"<window_start> <count>"`.
fn encode(window_start: u64, count: u64) -> Vec<u8> {
    // Without `format!`: its machinery costs more than the rest of the quota's
    // own work inside wasm.
    let mut digits = [0; 20];
    let mut value = Vec::with_capacity(41);
    value.extend_from_slice(decimal(window_start, &mut digits));
    value.push(b' ');
    value.extend_from_slice(decimal(count, &mut digits));
    value
}

/// Reads a decimal `u64` made of ASCII digits only (no sign, no spaces).
fn parse_digits(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Reads exactly 16 lower-case hex digits.
fn parse_hex16(s: &str) -> Option<u64> {
    if s.len() != 16 || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    u64::from_str_radix(s, 16).ok()
}

/// Writes `n` as 16 lower-case hex digits.
fn push_hex16(out: &mut Vec<u8>, n: u64) {
    for shift in (0..16).rev() {
        // Masked to 0..=15: the cast keeps every bit.
        let nibble = ((n >> (shift * 4)) & 0xf) as u8;
        out.push(if nibble < 10 {
            b'0' + nibble
        } else {
            b'a' + nibble - 10
        });
    }
}

/// Decodes a counter value; `None` if it does not parse.
fn decode(bytes: &[u8]) -> Option<(u64, u64)> {
    let s = std::str::from_utf8(bytes).ok()?;
    let (start, count) = s.split_once(' ')?;
    Some((parse_digits(start)?, parse_digits(count)?))
}

/// Encodes an anonymous slot: ASCII `"<window_start> <fingerprint> <count>"`,
/// the fingerprint as 16 hex digits.
fn encode_slot(window_start: u64, fingerprint: u64, count: u64) -> Vec<u8> {
    let mut digits = [0; 20];
    let mut value = Vec::with_capacity(58);
    value.extend_from_slice(decimal(window_start, &mut digits));
    value.push(b' ');
    push_hex16(&mut value, fingerprint);
    value.push(b' ');
    value.extend_from_slice(decimal(count, &mut digits));
    value
}

/// Decodes an anonymous slot: `(window_start, fingerprint, count)`.
fn decode_slot(bytes: &[u8]) -> Option<(u64, u64, u64)> {
    let s = std::str::from_utf8(bytes).ok()?;
    let mut parts = s.split(' ');
    let start = parse_digits(parts.next()?)?;
    let fingerprint = parse_hex16(parts.next()?)?;
    let count = parse_digits(parts.next()?)?;
    if parts.next().is_some() {
        return None;
    }
    Some((start, fingerprint, count))
}

/// Seconds from `now_secs` to the end of the window starting at `start`, at
/// least 1.
fn reset_after(start: u64, period: Period, now_secs: u64) -> u64 {
    start
        .saturating_add(period.seconds())
        .saturating_sub(now_secs)
        .max(1)
}

/// The window a stored `start` counts in, seen at window `current`: itself if
/// it is the current window, or exactly one period ahead (another worker's
/// clock already crossed the boundary: adopted rather than rewound, so its
/// increments are not lost); `None` for an older window (the entry starts
/// afresh) or one further ahead (garbage, logged at warn).
fn live_window(start: u64, current: u64, period: Period, key: &str) -> Option<u64> {
    if start == current || start == current.saturating_add(period.seconds()) {
        Some(start)
    } else {
        if start > current {
            log::warn!("quota: window {start} at {key} is in the future; starting a fresh window");
        }
        None
    }
}

/// Who an anonymous request is counted as: the client address masked to the
/// configured prefix. A tag byte (0 unknown, 4 IPv4, 6 IPv6) then the masked
/// address (IPv4 in the first 4 bytes). An IPv4-mapped IPv6 address
/// (`::ffff:a.b.c.d`) is IPv4; anything that does not parse as an address
/// (no address, a zone index, garbage) is the one shared "unknown" client, so
/// it is limited rather than unlimited.
pub fn anonymous_client(cfg: &QuotaConfig, ip: &str) -> [u8; 17] {
    let mut out = [0; 17];
    let v4 = |out: &mut [u8; 17], a: std::net::Ipv4Addr| {
        let mask = u32::MAX
            .checked_shl(32 - u32::from(cfg.anonymous_ipv4_prefix.min(32)))
            .unwrap_or(0);
        out[0] = 4;
        for (o, b) in out
            .iter_mut()
            .skip(1)
            .zip((u32::from(a) & mask).to_be_bytes())
        {
            *o = b;
        }
    };
    match ip.parse::<IpAddr>() {
        Ok(IpAddr::V4(a)) => v4(&mut out, a),
        Ok(IpAddr::V6(a)) => match a.to_ipv4_mapped() {
            Some(a) => v4(&mut out, a),
            None => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(cfg.anonymous_ipv6_prefix.min(128)))
                    .unwrap_or(0);
                out[0] = 6;
                for (o, b) in out
                    .iter_mut()
                    .skip(1)
                    .zip((u128::from(a) & mask).to_be_bytes())
                {
                    *o = b;
                }
            }
        },
        Err(_) => {}
    }
    out
}

/// An anonymous client's place in the table: a 64-bit fingerprint stored in
/// its slot, and the seed of its probe sequence. Both from one keyed
/// SipHash-1-3 (128-bit) of the client, with the process's table key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    pub fingerprint: u64,
    pub seed: u64,
}

impl Placement {
    pub fn new(key: (u64, u64), client: &[u8]) -> Placement {
        use siphasher::sip128::{Hasher128, SipHasher13};
        use std::hash::Hasher;
        let mut h = SipHasher13::new_with_keys(key.0, key.1);
        h.write(client);
        let out = h.finish128();
        Placement {
            fingerprint: out.h1,
            seed: out.h2,
        }
    }

    /// The `i`th slot to look at (0 is the home slot) in a table of `slots`:
    /// SplitMix64 of the seed and `i`, so that the probes of two clients
    /// sharing a home slot go separate ways (no clustering).
    pub fn probe(&self, i: u64, slots: u64) -> u64 {
        let mut z = self
            .seed
            .wrapping_add(i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        z.checked_rem(slots).unwrap_or(0)
    }
}

/// A fresh random table key: two outputs of std's randomly keyed SipHash (its
/// keys come from the host's random source, WASI `random_get`).
fn random_key() -> (u64, u64) {
    use std::hash::BuildHasher;
    let random = std::collections::hash_map::RandomState::new();
    (random.hash_one(0u8), random.hash_one(1u8))
}

/// The anonymous table's hash key, the same in every VM of the process: read
/// from [`TABLE_KEY`] (and kept in this VM's configuration), or created there
/// at random with a create-only CAS (losing a race means reading the winner's).
/// Random rather than a constant, so that nobody can compute which addresses
/// share a victim's slots and fill them to have the victim refused.
fn table_key(cfg: &QuotaConfig, store: &dyn SharedStore) -> Result<(u64, u64), QuotaDecision> {
    if let Some(k) = cfg.table_key.0.get() {
        return Ok(*k);
    }
    for _ in 0..MAX_ATTEMPTS {
        let (value, cas) = store.get(TABLE_KEY).map_err(|e| {
            log::warn!("quota: reading {TABLE_KEY}: {e:?}");
            QuotaDecision::Unavailable
        })?;
        let found = value.as_deref().and_then(|v| {
            let s = std::str::from_utf8(v).ok()?;
            let (a, b) = s.split_once(' ')?;
            Some((parse_hex16(a)?, parse_hex16(b)?))
        });
        if let Some(k) = found {
            return Ok(*cfg.table_key.0.get_or_init(|| k));
        }
        if value.is_some() || cas.is_some() {
            // Nobody can have used it: it never parsed.
            log::warn!("quota: unreadable value at {TABLE_KEY}; replacing it");
        }
        let fresh = random_key();
        let mut v = Vec::with_capacity(33);
        push_hex16(&mut v, fresh.0);
        v.push(b' ');
        push_hex16(&mut v, fresh.1);
        let cas = match cas {
            Some(c) if c != 0 => c,
            _ => CREATE_CAS,
        };
        match store.set(TABLE_KEY, &v, Some(cas)) {
            Ok(()) => return Ok(*cfg.table_key.0.get_or_init(|| fresh)),
            Err(StoreError::CasMismatch) => continue,
            Err(StoreError::Other) => {
                log::warn!("quota: writing {TABLE_KEY}: store error");
                return Err(QuotaDecision::Unavailable);
            }
        }
    }
    Err(QuotaDecision::Contended)
}

/// Counts one request of `client` at `now_secs` (seconds since the Unix
/// epoch), if its quota allows.
///
/// Each round reads the client's counter and writes it back incremented with
/// a compare-and-swap: with the CAS read when the key exists, with
/// [`CREATE_CAS`] when it is missing; never unconditionally. A CAS mismatch
/// means another worker wrote in between: read again, up to [`MAX_ATTEMPTS`]
/// rounds, then [`QuotaDecision::Contended`]. Any other store error is
/// [`QuotaDecision::Unavailable`]. Both fail closed.
///
/// The stored window decides the count: the current window's count is used;
/// an older window (or a value that does not parse, logged at warn) starts a
/// fresh window at 0; see `live_window` for windows ahead.
///
/// A principal's counter is its own entry. An anonymous client (see
/// [`anonymous_client`]) is counted in the table of `anonymous_slots`: it
/// looks at up to [`PROBES`] slots in its own pseudo-random order (see
/// [`Placement`]) and counts in the first that is its own this window (same
/// fingerprint) or free (missing, unreadable, or from an older window: it
/// claims it); slots held this window by other clients are passed over. When
/// all are held by others it counts in its home slot (the first), sharing
/// that counter: it may be refused early, never admitted past its limit.
/// Slots are only ever freed by the window changing, so within a window every
/// request of a client lands in the same slot.
pub fn check(
    cfg: &QuotaConfig,
    store: &dyn SharedStore,
    client: &Client,
    now_secs: u64,
) -> QuotaDecision {
    let tally = Tally {
        ledger: &REQUESTS,
        period: cfg.period,
        limit: cfg.limit_for(client),
        amount: 1,
        refund: 0,
    };
    count(cfg, store, client, &tally, now_secs)
}

/// Settles what [`count`] added for `client` in the window starting at
/// `window` (`reserved`, with `tally.ledger` and `tally.period`) to what was
/// spent (`charged`): within that window the count becomes count −
/// `reserved` + `charged` (never below 0); once the window has ended, only
/// a charge above the reservation is added, to the current window (a refund
/// has nowhere to go). A store failure is logged and the count left as it
/// is.
pub fn settle(
    cfg: &QuotaConfig,
    store: &dyn SharedStore,
    client: &Client,
    tally: &Tally,
    window: u64,
    charged: u64,
    now_secs: u64,
) {
    let reserved = tally.amount;
    let (amount, refund) = if tally.period.window_start(now_secs) == window {
        (charged, reserved)
    } else {
        (charged.saturating_sub(reserved), 0)
    };
    if amount == refund {
        return;
    }
    let settling = Tally {
        limit: u64::MAX,
        amount,
        refund,
        ..*tally
    };
    match count(cfg, store, client, &settling, now_secs) {
        QuotaDecision::Allowed { .. } => {}
        other => log::warn!("quota: settling {reserved} → {charged} failed: {other:?}"),
    }
}

/// What a token reservation adds for a client with this budget.
pub fn token_tally(t: &crate::token_quota::TokenQuota, limit: u64) -> Tally<'static> {
    Tally {
        ledger: &TOKENS,
        period: t.period,
        limit,
        amount: t.reserve_tokens,
        refund: 0,
    }
}

/// What one count adds, where and against which limit.
#[derive(Debug, Clone, Copy)]
pub struct Tally<'a> {
    pub ledger: &'a Ledger,
    pub period: Period,
    pub limit: u64,
    /// Added when the count so far is below `limit` (saturating).
    pub amount: u64,
    /// Taken off with it (never below 0): settling a reservation.
    pub refund: u64,
}

/// Adds `tally.amount` to `client`'s count in `tally.ledger` if that count
/// is below `tally.limit` (as [`check`] does for one request).
pub fn count(
    cfg: &QuotaConfig,
    store: &dyn SharedStore,
    client: &Client,
    tally: &Tally,
    now_secs: u64,
) -> QuotaDecision {
    let current = tally.period.window_start(now_secs);
    if tally.limit == 0 {
        return QuotaDecision::Exceeded {
            limit: 0,
            reset: reset_after(current, tally.period, now_secs),
        };
    }
    match client {
        Client::Principal(p) => {
            count_principal(store, &principal_key(tally.ledger, p), tally, now_secs)
        }
        Client::Anonymous(ip) => match table_key(cfg, store) {
            Ok(key) => {
                let placement = Placement::new(key, &anonymous_client(cfg, ip));
                count_anonymous(cfg, store, placement, tally, now_secs)
            }
            Err(d) => d,
        },
    }
}

/// Writes the counter at `key` incremented (see [`check`]); `None` on a CAS
/// mismatch (read again).
#[allow(clippy::too_many_arguments)]
fn increment(
    store: &dyn SharedStore,
    key: &str,
    value: impl FnOnce(u64) -> Vec<u8>,
    cas: u32,
    count: u64,
    limit: u64,
    (amount, refund): (u64, u64),
    reset: u64,
) -> Option<QuotaDecision> {
    if count >= limit {
        return Some(QuotaDecision::Exceeded { limit, reset });
    }
    let counted = count.saturating_add(amount).saturating_sub(refund);
    match store.set(key, &value(counted), Some(cas)) {
        Ok(()) => Some(QuotaDecision::Allowed {
            limit,
            remaining: limit.saturating_sub(counted),
            reset,
        }),
        Err(StoreError::CasMismatch) => None,
        Err(StoreError::Other) => {
            log::warn!("quota: writing {key}: store error");
            Some(QuotaDecision::Unavailable)
        }
    }
}

/// The CAS to write a key with: the one read, or [`CREATE_CAS`] if missing.
fn write_cas(read: Option<u32>) -> u32 {
    match read {
        Some(c) if c != 0 => c,
        _ => CREATE_CAS,
    }
}

fn count_principal(
    store: &dyn SharedStore,
    key: &str,
    tally: &Tally,
    now_secs: u64,
) -> QuotaDecision {
    let (period, limit) = (tally.period, tally.limit);
    let current = period.window_start(now_secs);
    for _ in 0..MAX_ATTEMPTS {
        let (value, cas) = match store.get(key) {
            Ok(found) => found,
            Err(e) => {
                log::warn!("quota: reading {key}: {e:?}");
                return QuotaDecision::Unavailable;
            }
        };
        let (start, count) = match value.as_deref().map(decode) {
            // Missing key (or an empty value).
            None => (current, 0),
            Some(None) => {
                log::warn!("quota: unreadable value at {key}; starting a fresh window");
                (current, 0)
            }
            Some(Some((start, count))) => match live_window(start, current, period, key) {
                Some(start) => (start, count),
                None => (current, 0),
            },
        };
        let reset = reset_after(start, period, now_secs);
        let value = |counted| encode(start, counted);
        let cas = write_cas(cas);
        let change = (tally.amount, tally.refund);
        if let Some(d) = increment(store, key, value, cas, count, limit, change, reset) {
            return d;
        }
    }
    log::warn!("quota: {key} still contended after {MAX_ATTEMPTS} attempts");
    QuotaDecision::Contended
}

/// One slot as read: its key, CAS to write with, and the counter to use.
struct Slot {
    key: String,
    cas: u32,
    start: u64,
    holder: u64,
    count: u64,
}

fn count_anonymous(
    cfg: &QuotaConfig,
    store: &dyn SharedStore,
    me: Placement,
    tally: &Tally,
    now_secs: u64,
) -> QuotaDecision {
    let (period, limit) = (tally.period, tally.limit);
    let current = period.window_start(now_secs);
    let slots = cfg.anonymous_slots;
    for _ in 0..MAX_ATTEMPTS {
        let mut target: Option<Slot> = None;
        let mut home: Option<Slot> = None;
        for i in 0..PROBES {
            let key = slot_key(tally.ledger, me.probe(i, slots));
            let (value, cas) = match store.get(&key) {
                Ok(found) => found,
                Err(e) => {
                    log::warn!("quota: reading {key}: {e:?}");
                    return QuotaDecision::Unavailable;
                }
            };
            let cas = write_cas(cas);
            let held = match value.as_deref().map(decode_slot) {
                None => None,
                Some(None) => {
                    log::warn!("quota: unreadable value at {key}; reusing the slot");
                    None
                }
                Some(Some((start, holder, count))) => {
                    live_window(start, current, period, &key).map(|start| (start, holder, count))
                }
            };
            match held {
                // Free: claim it.
                None => {
                    target = Some(Slot {
                        key,
                        cas,
                        start: current,
                        holder: me.fingerprint,
                        count: 0,
                    });
                    break;
                }
                Some((start, holder, count)) => {
                    let slot = Slot {
                        key,
                        cas,
                        start,
                        holder,
                        count,
                    };
                    if holder == me.fingerprint {
                        target = Some(slot);
                        break;
                    }
                    if home.is_none() {
                        home = Some(slot);
                    }
                }
            }
        }
        // Every probe held by others: share the home slot's counter.
        let Some(slot) = target.or(home) else {
            return QuotaDecision::Unavailable;
        };
        let reset = reset_after(slot.start, period, now_secs);
        let (start, holder) = (slot.start, slot.holder);
        let value = |counted| encode_slot(start, holder, counted);
        let (key, cas, count) = (&slot.key, slot.cas, slot.count);
        let change = (tally.amount, tally.refund);
        if let Some(d) = increment(store, key, value, cas, count, limit, change, reset) {
            return d;
        }
    }
    log::warn!("quota: anonymous slots still contended after {MAX_ATTEMPTS} attempts");
    QuotaDecision::Contended
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::fake::FakeStore;

    #[test]
    fn decimal_writes_every_u64_as_to_string_does() {
        let mut buf = [0; 20];
        let cases = [0, 1, 9, 10, 99, 100, 12345, 999_999_999, u64::MAX - 1];
        for n in cases.into_iter().chain([u64::MAX]) {
            assert_eq!(decimal(n, &mut buf), n.to_string().as_bytes());
        }
        let r = RateLimit {
            limit: 1000,
            remaining: 0,
            reset: 86400,
        };
        for ((name, value), (hname, hvalue)) in r.values().into_iter().zip(r.headers()) {
            assert_eq!(name, hname);
            assert_eq!(decimal(value, &mut buf), hvalue.as_bytes());
        }
    }
    use serde_json::json;
    use std::sync::{Arc, Mutex};

    const DAY: u64 = 86_400;
    /// 2024-06-01T00:00:00Z, a day boundary.
    const T0: u64 = 1_717_200_000;

    fn cfg(auth: u64, anon: u64, period: Period) -> QuotaConfig {
        QuotaConfig {
            authenticated_max_requests: auth,
            anonymous_max_requests: anon,
            period,
            ..QuotaConfig::default()
        }
    }

    fn allowed(limit: u64, remaining: u64, reset: u64) -> QuotaDecision {
        QuotaDecision::Allowed {
            limit,
            remaining,
            reset,
        }
    }

    const ALICE: Client<'static> = Client::Principal("alice");
    const ALICE_KEY: &str = "tollgate/quota/a/alice";

    // --- windows ---

    #[test]
    fn periods_and_alignment() {
        assert_eq!(Period::Minute.seconds(), 60);
        assert_eq!(Period::Hour.seconds(), 3600);
        assert_eq!(Period::Day.seconds(), 86400);
        assert_eq!(Period::Day.window_start(0), 0);
        assert_eq!(Period::Day.window_start(86_399), 0);
        assert_eq!(Period::Day.window_start(86_400), 86_400);
        assert_eq!(Period::Day.window_start(T0 + 12_345), T0);
        assert_eq!(Period::Hour.window_start(3_599), 0);
        assert_eq!(Period::Hour.window_start(T0 + 7_250), T0 + 7_200);
        assert_eq!(Period::Minute.window_start(59), 0);
        assert_eq!(Period::Minute.window_start(T0 + 61), T0 + 60);
        assert_eq!(
            Period::Day.window_start(u64::MAX),
            u64::MAX - u64::MAX % DAY
        );
    }

    #[test]
    fn reset_is_seconds_to_window_end() {
        for (period, now, reset) in [
            (Period::Day, 86_399, 1),
            (Period::Day, 0, 86_400),
            (Period::Day, T0 + 86_000, 400),
            (Period::Hour, 3_599, 1),
            (Period::Hour, T0 + 600, 3_000),
            (Period::Minute, 59, 1),
            (Period::Minute, T0 + 15, 45),
        ] {
            let store = FakeStore::new();
            assert_eq!(
                check(&cfg(10, 10, period), &store, &ALICE, now),
                allowed(10, 9, reset),
                "{period:?} at {now}"
            );
            let start = period.window_start(now);
            assert_eq!(store.value(ALICE_KEY).unwrap(), format!("{start} 1"));
        }
    }

    #[test]
    fn reset_never_below_one_near_u64_max() {
        let store = FakeStore::new();
        let now = u64::MAX;
        match check(&cfg(10, 10, Period::Day), &store, &ALICE, now) {
            QuotaDecision::Allowed { reset, .. } => assert!(reset >= 1),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn rollover_overwrites_the_old_window() {
        let c = cfg(2, 2, Period::Minute);
        let store = FakeStore::new();
        assert_eq!(check(&c, &store, &ALICE, T0 + 10), allowed(2, 1, 50));
        assert_eq!(check(&c, &store, &ALICE, T0 + 20), allowed(2, 0, 40));
        assert_eq!(
            check(&c, &store, &ALICE, T0 + 59),
            QuotaDecision::Exceeded { limit: 2, reset: 1 }
        );
        assert_eq!(check(&c, &store, &ALICE, T0 + 60), allowed(2, 1, 60));
        assert_eq!(store.value(ALICE_KEY).unwrap(), format!("{} 1", T0 + 60));
        // Much later: still one entry, restarted.
        assert_eq!(
            check(&c, &store, &ALICE, T0 + 10 * DAY + 5),
            allowed(2, 1, 55)
        );
        assert_eq!(store.entries(), 1);
        assert_eq!(
            store.value(ALICE_KEY).unwrap(),
            format!("{} 1", T0 + 10 * DAY)
        );
    }

    #[test]
    fn next_window_written_by_a_faster_clock_is_adopted() {
        let c = cfg(5, 5, Period::Minute);
        let store = FakeStore::new();
        // Another worker already counted 3 in the next minute.
        store.put_raw(ALICE_KEY, format!("{} 3", T0 + 60).as_bytes());
        assert_eq!(check(&c, &store, &ALICE, T0 + 59), allowed(5, 1, 61));
        assert_eq!(store.value(ALICE_KEY).unwrap(), format!("{} 4", T0 + 60));
    }

    #[test]
    fn far_future_window_is_garbage() {
        let c = cfg(5, 5, Period::Minute);
        let store = FakeStore::new();
        store.put_raw(ALICE_KEY, format!("{} 5", T0 + 120).as_bytes());
        assert_eq!(check(&c, &store, &ALICE, T0), allowed(5, 4, 60));
        assert_eq!(store.value(ALICE_KEY).unwrap(), format!("{T0} 1"));
    }

    // --- counting ---

    #[test]
    fn exact_counting_then_exceeded() {
        let c = cfg(5, 1, Period::Day);
        let store = FakeStore::new();
        let now = T0 + 100;
        for i in 1..=5 {
            assert_eq!(check(&c, &store, &ALICE, now), allowed(5, 5 - i, DAY - 100));
        }
        for _ in 0..3 {
            assert_eq!(
                check(&c, &store, &ALICE, now + 50),
                QuotaDecision::Exceeded {
                    limit: 5,
                    reset: DAY - 150
                }
            );
        }
        // Refusals are not counted.
        assert_eq!(store.value(ALICE_KEY).unwrap(), format!("{T0} 5"));
        assert_eq!(store.sets(), 5);
        assert_eq!(store.unconditional_sets(), 0);
    }

    #[test]
    fn clients_are_independent() {
        let c = cfg(1, 1, Period::Hour);
        let store = FakeStore::new();
        let bob = Client::Principal("bob");
        let ip = Client::Anonymous("10.0.0.1");
        let ip2 = Client::Anonymous("10.0.0.2");
        assert_eq!(check(&c, &store, &ALICE, T0), allowed(1, 0, 3600));
        assert_eq!(check(&c, &store, &bob, T0), allowed(1, 0, 3600));
        assert_eq!(check(&c, &store, &ip, T0), allowed(1, 0, 3600));
        assert_eq!(check(&c, &store, &ip2, T0), allowed(1, 0, 3600));
        assert!(matches!(
            check(&c, &store, &ALICE, T0),
            QuotaDecision::Exceeded { .. }
        ));
        assert!(matches!(
            check(&c, &store, &ip, T0),
            QuotaDecision::Exceeded { .. }
        ));
        // Two principals, two slots and the table's key.
        assert_eq!(store.entries(), 5);
    }

    #[test]
    fn principal_and_ip_never_share_a_key() {
        // A principal that looks like an IP is still counted apart.
        let c = cfg(1, 1, Period::Hour);
        let store = FakeStore::new();
        let p = Client::Principal("10.0.0.1");
        let ip = Client::Anonymous("10.0.0.1");
        assert_eq!(check(&c, &store, &p, T0), allowed(1, 0, 3600));
        assert_eq!(check(&c, &store, &ip, T0), allowed(1, 0, 3600));
        assert_eq!(
            store.value("tollgate/quota/a/10.0.0.1").unwrap(),
            format!("{T0} 1")
        );
    }

    #[test]
    fn keys() {
        assert_eq!(principal_key(&REQUESTS, "alice"), "tollgate/quota/a/alice");
        assert_eq!(
            principal_key(&REQUESTS, "user/with/slashes"),
            "tollgate/quota/a/user/with/slashes"
        );
        assert_eq!(key_for(&ALICE), "tollgate/quota/a/alice");
        assert_eq!(key_for(&Client::Anonymous("::1")), TABLE_KEY);
        assert_eq!(slot_key(&REQUESTS, 0), "tollgate/quota/anon/0");
        assert_eq!(slot_key(&REQUESTS, 65_535), "tollgate/quota/anon/65535");
    }

    #[test]
    fn anonymous_uses_the_anonymous_limit() {
        let c = cfg(1000, 2, Period::Day);
        let store = FakeStore::new();
        let ip = Client::Anonymous("192.0.2.7");
        assert_eq!(check(&c, &store, &ip, T0), allowed(2, 1, DAY));
        assert_eq!(check(&c, &store, &ip, T0), allowed(2, 0, DAY));
        assert_eq!(
            check(&c, &store, &ip, T0),
            QuotaDecision::Exceeded {
                limit: 2,
                reset: DAY
            }
        );
        assert_eq!(check(&c, &store, &ALICE, T0), allowed(1000, 999, DAY));
    }

    #[test]
    fn zero_max_refuses_everyone_without_touching_the_store() {
        let c = cfg(0, 0, Period::Hour);
        let store = FakeStore::new();
        assert_eq!(
            check(&c, &store, &ALICE, T0 + 600),
            QuotaDecision::Exceeded {
                limit: 0,
                reset: 3000
            }
        );
        assert_eq!(
            check(&c, &store, &Client::Anonymous("::1"), T0),
            QuotaDecision::Exceeded {
                limit: 0,
                reset: 3600
            }
        );
        assert_eq!(store.gets() + store.sets(), 0);
        // Zero only for anonymous: authenticated still pass.
        let c = cfg(3, 0, Period::Hour);
        assert_eq!(check(&c, &store, &ALICE, T0), allowed(3, 2, 3600));
    }

    #[test]
    fn max_u64_limit_does_not_overflow() {
        let c = cfg(u64::MAX, 1, Period::Day);
        let store = FakeStore::new();
        store.put_raw(ALICE_KEY, format!("{T0} {}", u64::MAX - 1).as_bytes());
        assert_eq!(check(&c, &store, &ALICE, T0), allowed(u64::MAX, 0, DAY));
        assert_eq!(
            check(&c, &store, &ALICE, T0),
            QuotaDecision::Exceeded {
                limit: u64::MAX,
                reset: DAY
            }
        );
    }

    // --- CAS, creation, contention, errors ---

    #[test]
    fn creation_uses_the_sentinel_and_updates_the_read_cas() {
        let c = cfg(10, 10, Period::Day);
        let store = FakeStore::new();
        check(&c, &store, &ALICE, T0);
        assert_eq!(store.cas(ALICE_KEY), Some(1));
        check(&c, &store, &ALICE, T0);
        assert_eq!(store.cas(ALICE_KEY), Some(2));
        assert_eq!(store.unconditional_sets(), 0);
    }

    #[test]
    fn creation_race_loses_no_increment() {
        // Both workers see the key missing; the other creates it (count 1)
        // between our get and our set; our sentinel create fails; we retry.
        let c = cfg(10, 10, Period::Day);
        let store = FakeStore::new();
        store.before_next_set(move |s| {
            assert_eq!(s.get(ALICE_KEY).unwrap(), (None, None));
            s.set(ALICE_KEY, format!("{T0} 1").as_bytes(), Some(CREATE_CAS))
                .unwrap();
        });
        assert_eq!(check(&c, &store, &ALICE, T0), allowed(10, 8, DAY));
        assert_eq!(store.value(ALICE_KEY).unwrap(), format!("{T0} 2"));
        // Our sentinel create, the other's create, our retry.
        assert_eq!(store.sets(), 3);
        assert_eq!(store.unconditional_sets(), 0);
    }

    #[test]
    fn creation_race_with_a_whole_other_check() {
        let c = cfg(10, 10, Period::Day);
        let store = FakeStore::new();
        let other = Arc::new(Mutex::new(None));
        let seen = other.clone();
        let c2 = c.clone();
        store.before_next_set(move |s| {
            *seen.lock().unwrap() = Some(check(&c2, s, &ALICE, T0));
        });
        assert_eq!(check(&c, &store, &ALICE, T0), allowed(10, 8, DAY));
        assert_eq!(*other.lock().unwrap(), Some(allowed(10, 9, DAY)));
        assert_eq!(store.value(ALICE_KEY).unwrap(), format!("{T0} 2"));
    }

    #[test]
    fn fake_store_matches_envoy() {
        let s = FakeStore::new();
        assert_eq!(s.get("k").unwrap(), (None, None));
        // Non-zero CAS on a missing key creates it.
        s.set("k", b"a", Some(77)).unwrap();
        assert_eq!(s.get("k").unwrap(), (Some(b"a".to_vec()), Some(1)));
        // Wrong CAS on an existing key: mismatch, value unchanged.
        assert_eq!(
            s.set("k", b"b", Some(CREATE_CAS)),
            Err(StoreError::CasMismatch)
        );
        assert_eq!(s.set("k", b"b", Some(2)), Err(StoreError::CasMismatch));
        s.set("k", b"b", Some(1)).unwrap();
        assert_eq!(s.get("k").unwrap(), (Some(b"b".to_vec()), Some(2)));
        // None is unconditional.
        s.set("k", b"c", None).unwrap();
        assert_eq!(s.get("k").unwrap(), (Some(b"c".to_vec()), Some(3)));
        assert_eq!(s.unconditional_sets(), 1);
        // The counter skips 0 on wrap-around.
        let w = FakeStore::with_next_cas(u32::MAX - 1);
        w.set("x", b"1", Some(5)).unwrap();
        assert_eq!(w.cas("x"), Some(u32::MAX - 1));
        w.set("x", b"2", Some(u32::MAX - 1)).unwrap();
        assert_eq!(w.cas("x"), Some(u32::MAX));
        w.set("x", b"3", Some(u32::MAX)).unwrap();
        assert_eq!(w.cas("x"), Some(1));
    }

    #[test]
    fn key_whose_cas_is_the_sentinel_still_counts() {
        // The counter hands out u32::MAX: our update must use the read CAS.
        let c = cfg(10, 10, Period::Day);
        let store = FakeStore::with_next_cas(u32::MAX);
        assert_eq!(check(&c, &store, &ALICE, T0), allowed(10, 9, DAY));
        assert_eq!(store.cas(ALICE_KEY), Some(u32::MAX));
        assert_eq!(check(&c, &store, &ALICE, T0), allowed(10, 8, DAY));
        assert_eq!(store.cas(ALICE_KEY), Some(1));
        assert_eq!(store.value(ALICE_KEY).unwrap(), format!("{T0} 2"));
    }

    #[test]
    fn cas_retries_then_succeeds() {
        let c = cfg(10, 10, Period::Day);
        for k in [1, 5, MAX_ATTEMPTS - 1] {
            let store = FakeStore::new();
            check(&c, &store, &ALICE, T0);
            store.inject_mismatches(k);
            assert_eq!(check(&c, &store, &ALICE, T0), allowed(10, 8, DAY), "k={k}");
            assert_eq!(store.value(ALICE_KEY).unwrap(), format!("{T0} 2"));
            assert_eq!(store.sets(), 1 + k + 1);
        }
    }

    #[test]
    fn persistent_contention_is_contended() {
        let c = cfg(10, 10, Period::Day);
        let store = FakeStore::new();
        store.inject_mismatches(MAX_ATTEMPTS);
        assert_eq!(check(&c, &store, &ALICE, T0), QuotaDecision::Contended);
        assert_eq!(store.sets(), MAX_ATTEMPTS);
        assert_eq!(store.entries(), 0);

        // Another worker always wins in between: also Contended, and its
        // writes are all there.
        let store = FakeStore::new();
        store.before_every_set(|s| {
            let (v, cas) = s.get(ALICE_KEY).unwrap();
            let n = v.map_or(0, |v| decode(&v).unwrap().1);
            s.set(
                ALICE_KEY,
                &encode(T0, n + 1),
                Some(cas.unwrap_or(CREATE_CAS)),
            )
            .unwrap();
        });
        assert_eq!(
            check(&cfg(1000, 1000, Period::Day), &store, &ALICE, T0),
            QuotaDecision::Contended
        );
        assert_eq!(
            store.value(ALICE_KEY).unwrap(),
            format!("{T0} {MAX_ATTEMPTS}")
        );
    }

    #[test]
    fn store_errors_are_unavailable() {
        let c = cfg(10, 10, Period::Day);
        let store = FakeStore::new();
        store.fail_get(true);
        assert_eq!(check(&c, &store, &ALICE, T0), QuotaDecision::Unavailable);
        store.fail_get(false);
        store.fail_set(true);
        assert_eq!(check(&c, &store, &ALICE, T0), QuotaDecision::Unavailable);
        assert_eq!(store.sets(), 1);
        store.fail_set(false);
        assert_eq!(check(&c, &store, &ALICE, T0), allowed(10, 9, DAY));
    }

    #[test]
    fn garbage_is_a_fresh_window() {
        let c = cfg(10, 10, Period::Day);
        for garbage in [
            &b"nonsense"[..],
            b"",
            b"123",
            b"1717200000 x",
            b"1717200000  5",
            b"1717200000 +5",
            b"-1 5",
            b"1717200000 5 6",
            b"1717200000 99999999999999999999999",
            b"\xff\xfe 1",
        ] {
            let store = FakeStore::new();
            store.put_raw(ALICE_KEY, garbage);
            let cas = store.cas(ALICE_KEY);
            assert_eq!(
                check(&c, &store, &ALICE, T0 + 5),
                allowed(10, 9, DAY - 5),
                "{garbage:?}"
            );
            assert_eq!(store.value(ALICE_KEY).unwrap(), format!("{T0} 1"));
            // Overwritten by CAS, not unconditionally.
            assert_ne!(store.cas(ALICE_KEY), cas);
            assert_eq!(store.unconditional_sets(), 0);
        }
    }

    #[test]
    fn encoding_round_trips() {
        assert_eq!(encode(T0, 42), b"1717200000 42".to_vec());
        assert_eq!(decode(&encode(T0, 42)), Some((T0, 42)));
        assert_eq!(
            decode(&encode(u64::MAX, u64::MAX)),
            Some((u64::MAX, u64::MAX))
        );
    }

    #[test]
    fn two_workers_interleave_exactly() {
        // Worker A runs checks; at each of its writes, a deterministic
        // pseudo-random schedule lets worker B run 0–2 whole checks between
        // A's read and A's write. Every admitted request is in the count.
        for limit in [u64::MAX, 150] {
            let c = cfg(limit, limit, Period::Day);
            let store = FakeStore::new();
            let b_allowed = Arc::new(Mutex::new((0u64, 0u64)));
            let b = b_allowed.clone();
            let c2 = c.clone();
            let mut rng: u32 = 0x1234_5678;
            store.before_every_set(move |s| {
                rng = rng.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                for _ in 0..(rng >> 30) % 3 {
                    let d = check(&c2, s, &ALICE, T0 + 7);
                    let mut b = b.lock().unwrap();
                    b.1 += 1;
                    if matches!(d, QuotaDecision::Allowed { .. }) {
                        b.0 += 1;
                    }
                }
            });
            let mut a_allowed = 0u64;
            let mut contended = 0u64;
            for _ in 0..200 {
                match check(&c, &store, &ALICE, T0 + 7) {
                    QuotaDecision::Allowed { .. } => a_allowed += 1,
                    QuotaDecision::Contended => contended += 1,
                    QuotaDecision::Exceeded { .. } => {}
                    QuotaDecision::Unavailable => panic!("unavailable"),
                }
            }
            let (b_allowed, b_total) = *b_allowed.lock().unwrap();
            assert!(b_total > 50, "B ran {b_total}");
            let total = a_allowed + b_allowed;
            assert_eq!(store.value(ALICE_KEY).unwrap(), format!("{T0} {total}"));
            assert_eq!(contended, 0);
            if limit == 150 {
                assert_eq!(total, 150);
            } else {
                assert_eq!(total, 200 + b_total);
            }
            assert_eq!(store.unconditional_sets(), 0);
        }
    }

    #[test]
    #[cfg_attr(target_family = "wasm", ignore = "no threads on wasm32-wasip1")]
    fn threads_count_exactly() {
        let c = cfg(u64::MAX, 1, Period::Day);
        let store = Arc::new(FakeStore::new());
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let store = store.clone();
                let c = c.clone();
                std::thread::spawn(move || {
                    let mut allowed = 0u64;
                    for _ in 0..500 {
                        match check(&c, store.as_ref(), &ALICE, T0) {
                            QuotaDecision::Allowed { .. } => allowed += 1,
                            QuotaDecision::Contended => {}
                            other => panic!("{other:?}"),
                        }
                    }
                    allowed
                })
            })
            .collect();
        let allowed: u64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(store.value(ALICE_KEY).unwrap(), format!("{T0} {allowed}"));
    }

    // --- anonymous clients: prefixes ---

    fn anon(ip: &str) -> [u8; 17] {
        anonymous_client(&QuotaConfig::default(), ip)
    }

    #[test]
    fn ipv4_addresses_are_their_own_clients_by_default() {
        assert_eq!(anon("192.0.2.7"), anon("192.0.2.7"));
        assert_ne!(anon("192.0.2.7"), anon("192.0.2.8"));
        let mut want = [0; 17];
        want[..5].copy_from_slice(&[4, 192, 0, 2, 7]);
        assert_eq!(anon("192.0.2.7"), want);
    }

    #[test]
    fn ipv6_addresses_share_their_64_by_default() {
        let a = anon("2001:db8:1:2::1");
        for same in [
            "2001:db8:1:2::2",
            "2001:db8:1:2:ffff:ffff:ffff:ffff",
            "2001:0db8:0001:0002:1234:5678:9abc:def0",
            "2001:DB8:1:2::abcd",
        ] {
            assert_eq!(anon(same), a, "{same}");
        }
        for other in ["2001:db8:1:3::1", "2001:db8:2:2::1", "::1", "fe80::1"] {
            assert_ne!(anon(other), a, "{other}");
        }
        assert_eq!(a[0], 6);
        assert_eq!(&a[9..], &[0; 8]);
    }

    #[test]
    fn ipv4_mapped_addresses_are_ipv4() {
        assert_eq!(anon("::ffff:192.0.2.7"), anon("192.0.2.7"));
        assert_eq!(anon("::ffff:c000:207"), anon("192.0.2.7"));
        assert_ne!(anon("::ffff:192.0.2.8"), anon("192.0.2.7"));
        // Not mapped (IPv4-compatible, NAT64): IPv6, grouped by /64.
        assert_eq!(anon("::192.0.2.7")[0], 6);
        assert_eq!(anon("64:ff9b::192.0.2.7")[0], 6);
    }

    #[test]
    fn configured_prefixes() {
        let c = |v4: u8, v6: u8| QuotaConfig {
            anonymous_ipv4_prefix: v4,
            anonymous_ipv6_prefix: v6,
            ..QuotaConfig::default()
        };
        let c24 = c(24, 48);
        assert_eq!(
            anonymous_client(&c24, "198.51.100.1"),
            anonymous_client(&c24, "198.51.100.254")
        );
        assert_eq!(
            anonymous_client(&c24, "::ffff:198.51.100.9"),
            anonymous_client(&c24, "198.51.100.254")
        );
        assert_ne!(
            anonymous_client(&c24, "198.51.101.1"),
            anonymous_client(&c24, "198.51.100.1")
        );
        assert_eq!(
            anonymous_client(&c24, "2001:db8:1:2::1"),
            anonymous_client(&c24, "2001:db8:1:ffff::1")
        );
        assert_ne!(
            anonymous_client(&c24, "2001:db8:2::1"),
            anonymous_client(&c24, "2001:db8:1::1")
        );
        // Odd lengths mask inside a byte.
        let c = c(23, 63);
        assert_eq!(
            anonymous_client(&c, "198.51.100.1"),
            anonymous_client(&c, "198.51.101.1")
        );
        assert_ne!(
            anonymous_client(&c, "198.51.102.1"),
            anonymous_client(&c, "198.51.100.1")
        );
        assert_eq!(
            anonymous_client(&c, "2001:db8:1:2::1"),
            anonymous_client(&c, "2001:db8:1:3::1")
        );
        assert_ne!(
            anonymous_client(&c, "2001:db8:1:4::1"),
            anonymous_client(&c, "2001:db8:1:2::1")
        );
        // Full length: every address apart; zero: one client per family.
        let full = QuotaConfig {
            anonymous_ipv6_prefix: 128,
            ..QuotaConfig::default()
        };
        assert_ne!(
            anonymous_client(&full, "2001:db8::1"),
            anonymous_client(&full, "2001:db8::2")
        );
        let zero = QuotaConfig {
            anonymous_ipv4_prefix: 0,
            anonymous_ipv6_prefix: 0,
            ..QuotaConfig::default()
        };
        assert_eq!(
            anonymous_client(&zero, "1.2.3.4"),
            anonymous_client(&zero, "250.0.0.1")
        );
        assert_eq!(
            anonymous_client(&zero, "2001:db8::1"),
            anonymous_client(&zero, "::1")
        );
        assert_ne!(
            anonymous_client(&zero, "2001:db8::1"),
            anonymous_client(&zero, "1.2.3.4")
        );
    }

    #[test]
    fn unparsable_addresses_are_one_unknown_client() {
        let unknown = anon("unknown");
        assert_eq!(unknown, [0; 17]);
        for bad in [
            "",
            "garbage",
            "1.2.3.4:80",
            "[::1]",
            "fe80::1%eth0",
            "1.2.3",
            "256.1.1.1",
            " 1.2.3.4",
        ] {
            assert_eq!(anon(bad), unknown, "{bad:?}");
        }
        // Never the same as an address, IPv4 0.0.0.0 and IPv6 :: included.
        assert_ne!(anon("0.0.0.0"), unknown);
        assert_ne!(anon("::"), unknown);
        assert_ne!(anon("0.0.0.0"), anon("::"));
    }

    #[test]
    fn rotating_ipv6_addresses_in_one_64_share_one_quota() {
        let c = cfg(100, 3, Period::Day);
        let store = FakeStore::new();
        for (i, ip) in ["2001:db8:5:6::1", "2001:db8:5:6::2", "2001:db8:5:6:abcd::9"]
            .iter()
            .enumerate()
        {
            let left = 2 - i as u64;
            assert_eq!(
                check(&c, &store, &Client::Anonymous(ip), T0),
                allowed(3, left, DAY)
            );
        }
        for i in 0..50 {
            let ip = format!("2001:db8:5:6:{i:x}::{i:x}");
            assert_eq!(
                check(&c, &store, &Client::Anonymous(&ip), T0),
                QuotaDecision::Exceeded {
                    limit: 3,
                    reset: DAY
                }
            );
        }
        // The next /64 has its own budget.
        assert_eq!(
            check(&c, &store, &Client::Anonymous("2001:db8:5:7::1"), T0),
            allowed(3, 2, DAY)
        );
        // One slot each (and the key).
        assert_eq!(store.entries(), 3);
    }

    #[test]
    fn unparsable_addresses_share_one_quota() {
        let c = cfg(100, 2, Period::Day);
        let store = FakeStore::new();
        assert_eq!(
            check(&c, &store, &Client::Anonymous("unknown"), T0),
            allowed(2, 1, DAY)
        );
        assert_eq!(
            check(&c, &store, &Client::Anonymous("not an address"), T0),
            allowed(2, 0, DAY)
        );
        assert!(matches!(
            check(&c, &store, &Client::Anonymous(""), T0),
            QuotaDecision::Exceeded { .. }
        ));
    }

    // --- anonymous clients: the table ---

    const KEY: (u64, u64) = (0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210);

    /// A store whose table key is [`KEY`], so that tests know the slots.
    fn keyed_store() -> FakeStore {
        let store = FakeStore::new();
        store.put_raw(TABLE_KEY, b"0123456789abcdef fedcba9876543210");
        store
    }

    fn table(anon: u64, slots: u64, period: Period) -> QuotaConfig {
        QuotaConfig {
            anonymous_max_requests: anon,
            anonymous_slots: slots,
            period,
            ..QuotaConfig::default()
        }
    }

    fn placement(c: &QuotaConfig, ip: &str) -> Placement {
        Placement::new(KEY, &anonymous_client(c, ip))
    }

    /// The key of `ip`'s `i`th probe.
    fn probe_key(c: &QuotaConfig, ip: &str, i: u64) -> String {
        slot_key(&REQUESTS, placement(c, ip).probe(i, c.anonymous_slots))
    }

    fn slot_value(start: u64, fingerprint: u64, count: u64) -> String {
        String::from_utf8(encode_slot(start, fingerprint, count)).unwrap()
    }

    #[test]
    fn slot_encoding_round_trips() {
        assert_eq!(slot_value(T0, 0xab, 7), format!("{T0} 00000000000000ab 7"));
        for (start, fp, count) in [(T0, 0, 0), (T0, u64::MAX, 5), (u64::MAX, 1, u64::MAX)] {
            assert_eq!(
                decode_slot(&encode_slot(start, fp, count)),
                Some((start, fp, count))
            );
        }
        for bad in [
            &b""[..],
            b"1717200000 00000000000000ab",
            b"1717200000 00000000000000AB 7",
            b"1717200000 0000000000000ab 7",
            b"1717200000 00000000000000ab 7 8",
            b"1717200000  00000000000000ab 7",
            b"1717200000 00000000000000ab -7",
            b"x 00000000000000ab 7",
        ] {
            assert_eq!(decode_slot(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn probes_spread_over_the_table() {
        let c = table(10, 1 << 16, Period::Day);
        let p = placement(&c, "192.0.2.1");
        let slots: Vec<u64> = (0..PROBES).map(|i| p.probe(i, c.anonymous_slots)).collect();
        let mut distinct = slots.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), slots.len(), "{slots:?}");
        assert!(slots.iter().all(|s| *s < 1 << 16));
        // Two clients with one home slot probe apart afterwards.
        let q = Placement {
            fingerprint: 1,
            seed: p.seed,
        };
        assert_eq!(q.probe(3, 1000), p.probe(3, 1000));
        assert!(p.probe(0, 1) == 0 && p.probe(5, 1) == 0);
    }

    #[test]
    fn first_request_claims_the_home_slot() {
        let c = table(10, 1024, Period::Day);
        let store = keyed_store();
        let ip = Client::Anonymous("192.0.2.1");
        assert_eq!(check(&c, &store, &ip, T0 + 5), allowed(10, 9, DAY - 5));
        let fp = placement(&c, "192.0.2.1").fingerprint;
        assert_eq!(
            store.value(&probe_key(&c, "192.0.2.1", 0)).unwrap(),
            slot_value(T0, fp, 1)
        );
        assert_eq!(check(&c, &store, &ip, T0 + 6), allowed(10, 8, DAY - 6));
        assert_eq!(
            store.value(&probe_key(&c, "192.0.2.1", 0)).unwrap(),
            slot_value(T0, fp, 2)
        );
        assert_eq!(store.entries(), 2);
        assert_eq!(store.unconditional_sets(), 0);
    }

    #[test]
    fn slots_held_this_window_are_passed_over() {
        let c = table(3, 1024, Period::Day);
        let store = keyed_store();
        let ip = "192.0.2.1";
        let fp = placement(&c, ip).fingerprint;
        let taken = [
            slot_value(T0, fp ^ 1, 3),
            // Held by a client whose clock is already in the next window.
            slot_value(T0 + DAY, fp ^ 2, 1),
        ];
        for (i, v) in taken.iter().enumerate() {
            store.put_raw(&probe_key(&c, ip, i as u64), v.as_bytes());
        }
        for left in [2, 1, 0] {
            assert_eq!(
                check(&c, &store, &Client::Anonymous(ip), T0),
                allowed(3, left, DAY)
            );
        }
        assert!(matches!(
            check(&c, &store, &Client::Anonymous(ip), T0),
            QuotaDecision::Exceeded { limit: 3, .. }
        ));
        // Counted in the third probe; the others untouched.
        assert_eq!(
            store.value(&probe_key(&c, ip, 2)).unwrap(),
            slot_value(T0, fp, 3)
        );
        for (i, v) in taken.iter().enumerate() {
            assert_eq!(&store.value(&probe_key(&c, ip, i as u64)).unwrap(), v);
        }
    }

    #[test]
    fn slots_of_older_windows_are_reused() {
        let c = table(5, 1024, Period::Minute);
        let store = keyed_store();
        let ip = "192.0.2.1";
        let fp = placement(&c, ip).fingerprint;
        // Every probe held by someone else, but in older windows.
        for i in 0..PROBES {
            let v = slot_value(T0 - 60 * (i + 1), fp ^ (i + 1), 5);
            store.put_raw(&probe_key(&c, ip, i), v.as_bytes());
        }
        assert_eq!(
            check(&c, &store, &Client::Anonymous(ip), T0 + 1),
            allowed(5, 4, 59)
        );
        assert_eq!(
            store.value(&probe_key(&c, ip, 0)).unwrap(),
            slot_value(T0, fp, 1)
        );
        // Its own slot from the last window starts afresh too.
        let c2 = table(5, 1024, Period::Minute);
        let ip2 = "192.0.2.2";
        let fp2 = placement(&c2, ip2).fingerprint;
        store.put_raw(
            &probe_key(&c2, ip2, 0),
            slot_value(T0 - 60, fp2, 5).as_bytes(),
        );
        assert_eq!(
            check(&c2, &store, &Client::Anonymous(ip2), T0),
            allowed(5, 4, 60)
        );
        assert_eq!(
            store.value(&probe_key(&c2, ip2, 0)).unwrap(),
            slot_value(T0, fp2, 1)
        );
    }

    #[test]
    fn free_slots_unreadable_or_far_future_are_claimed() {
        let c = table(5, 1024, Period::Minute);
        for junk in [
            b"nonsense".to_vec(),
            b"".to_vec(),
            encode(T0, 3),
            encode_slot(T0 + 120, 42, 5),
        ] {
            let store = keyed_store();
            let ip = "192.0.2.1";
            store.put_raw(&probe_key(&c, ip, 0), &junk);
            let cas = store.cas(&probe_key(&c, ip, 0));
            assert_eq!(
                check(&c, &store, &Client::Anonymous(ip), T0),
                allowed(5, 4, 60),
                "{junk:?}"
            );
            let fp = placement(&c, ip).fingerprint;
            assert_eq!(
                store.value(&probe_key(&c, ip, 0)).unwrap(),
                slot_value(T0, fp, 1)
            );
            assert_ne!(store.cas(&probe_key(&c, ip, 0)), cas);
            assert_eq!(store.unconditional_sets(), 0);
        }
    }

    #[test]
    fn own_slot_in_the_next_window_is_adopted() {
        let c = table(5, 1024, Period::Minute);
        let store = keyed_store();
        let ip = "192.0.2.1";
        let fp = placement(&c, ip).fingerprint;
        store.put_raw(&probe_key(&c, ip, 0), slot_value(T0 + 60, fp, 3).as_bytes());
        assert_eq!(
            check(&c, &store, &Client::Anonymous(ip), T0 + 59),
            allowed(5, 1, 61)
        );
        assert_eq!(
            store.value(&probe_key(&c, ip, 0)).unwrap(),
            slot_value(T0 + 60, fp, 4)
        );
    }

    #[test]
    fn all_probes_held_share_the_home_slot_and_over_count() {
        let c = table(10, 1024, Period::Day);
        let store = keyed_store();
        let ip = "192.0.2.1";
        let fp = placement(&c, ip).fingerprint;
        for i in 0..PROBES {
            let v = slot_value(T0, fp ^ (i + 1), 6);
            store.put_raw(&probe_key(&c, ip, i), v.as_bytes());
        }
        // Counted on top of the home slot's holder: 6 + 1.
        assert_eq!(
            check(&c, &store, &Client::Anonymous(ip), T0),
            allowed(10, 3, DAY)
        );
        assert_eq!(
            store.value(&probe_key(&c, ip, 0)).unwrap(),
            slot_value(T0, fp ^ 1, 7)
        );
        for _ in 0..3 {
            assert!(matches!(
                check(&c, &store, &Client::Anonymous(ip), T0),
                QuotaDecision::Allowed { .. }
            ));
        }
        // Refused after 4 of its own (a false refusal), never past 10.
        assert_eq!(
            check(&c, &store, &Client::Anonymous(ip), T0),
            QuotaDecision::Exceeded {
                limit: 10,
                reset: DAY
            }
        );
        assert_eq!(store.entries() as u64, PROBES + 1);
    }

    /// Runs `rounds` requests for each of `clients` addresses, interleaved,
    /// and checks that nobody is admitted past the limit and that every
    /// admitted request is in some slot's count. Returns each client's
    /// admitted requests.
    fn flood(c: &QuotaConfig, store: &FakeStore, clients: u32, rounds: u32) -> Vec<u64> {
        let mut admitted = vec![0u64; clients as usize];
        for _ in 0..rounds {
            for (n, a) in admitted.iter_mut().enumerate() {
                let ip = format!("10.{}.{}.{}", n >> 16, (n >> 8) & 0xff, n & 0xff);
                match check(c, store, &Client::Anonymous(&ip), T0) {
                    QuotaDecision::Allowed { .. } => *a += 1,
                    QuotaDecision::Exceeded { .. } => {}
                    other => panic!("{other:?}"),
                }
            }
        }
        assert!(admitted.iter().all(|a| *a <= c.anonymous_max_requests));
        let counted: u64 = (0..c.anonymous_slots)
            .filter_map(|n| store.value(&slot_key(&REQUESTS, n)))
            .map(|v| decode_slot(v.as_bytes()).unwrap().2)
            .sum();
        assert_eq!(counted, admitted.iter().sum::<u64>());
        admitted
    }

    #[test]
    fn exact_for_every_client_below_capacity() {
        // 300 clients in 4096 slots (7 % load): nobody shares a counter.
        let c = table(5, 4096, Period::Day);
        let store = keyed_store();
        let admitted = flood(&c, &store, 300, 8);
        assert!(admitted.iter().all(|a| *a == 5), "{admitted:?}");
        assert_eq!(store.entries(), 301);
        // Remaining counts down exactly for a newcomer.
        for left in (0..5).rev() {
            assert_eq!(
                check(&c, &store, &Client::Anonymous("192.0.2.99"), T0),
                allowed(5, left, DAY)
            );
        }
    }

    #[test]
    fn collisions_over_count_but_never_under_count() {
        // 200 clients in 16 slots: most share counters.
        let c = table(3, 16, Period::Day);
        let store = keyed_store();
        let admitted = flood(&c, &store, 200, 5);
        // Refused early (some before their first request passed)...
        assert!(admitted.contains(&0));
        // ...but every slot's counter stopped exactly at the limit.
        assert_eq!(admitted.iter().sum::<u64>(), 16 * 3);
    }

    #[test]
    fn the_table_never_grows_past_its_slots() {
        let c = table(u64::MAX, 64, Period::Minute);
        let store = keyed_store();
        flood(&c, &store, 10_000, 1);
        assert_eq!(store.entries(), 65);
        // Later windows reuse the same slots.
        for minute in 1..4 {
            for n in 0..2_000u32 {
                let ip = format!("2001:db8:{minute:x}:{n:x}::1");
                let d = check(&c, &store, &Client::Anonymous(&ip), T0 + 60 * minute);
                assert!(matches!(d, QuotaDecision::Allowed { .. }), "{d:?}");
            }
            assert_eq!(store.entries(), 65);
        }
        let c = table(u64::MAX, 1, Period::Minute);
        let store = keyed_store();
        flood(&c, &store, 100, 2);
        assert_eq!(store.entries(), 2);
    }

    #[test]
    fn table_key_is_created_once_and_shared_by_every_vm() {
        // Two VMs: each parses its own configuration.
        let vm_a = table(3, 1024, Period::Day);
        let vm_b = table(3, 1024, Period::Day);
        let store = FakeStore::new();
        let ip = Client::Anonymous("192.0.2.1");
        assert_eq!(check(&vm_a, &store, &ip, T0), allowed(3, 2, DAY));
        let stored = store.value(TABLE_KEY).unwrap();
        assert_eq!(stored.len(), 33);
        assert_eq!(check(&vm_b, &store, &ip, T0), allowed(3, 1, DAY));
        assert_eq!(check(&vm_a, &store, &ip, T0), allowed(3, 0, DAY));
        assert_eq!(vm_a.table_key.0.get(), vm_b.table_key.0.get());
        assert_eq!(store.value(TABLE_KEY).unwrap(), stored);
        assert_eq!(store.entries(), 2);
        // Read once per VM: a counted request is one read and one write.
        let (gets, sets) = (store.gets(), store.sets());
        assert_eq!(
            check(&vm_b, &store, &Client::Anonymous("192.0.2.2"), T0),
            allowed(3, 2, DAY)
        );
        assert_eq!((store.gets() - gets, store.sets() - sets), (1, 1));
        // Another process (another store) draws another key.
        let other = FakeStore::new();
        let vm_c = table(3, 1024, Period::Day);
        check(&vm_c, &other, &ip, T0);
        assert_ne!(other.value(TABLE_KEY).unwrap(), stored);
    }

    #[test]
    fn table_key_race_adopts_the_winner() {
        let c = table(3, 1024, Period::Day);
        let store = FakeStore::new();
        // Another VM creates the key between our read and our write.
        store.before_next_set(|s| {
            s.set(
                TABLE_KEY,
                b"0123456789abcdef fedcba9876543210",
                Some(CREATE_CAS),
            )
            .unwrap();
        });
        assert_eq!(
            check(&c, &store, &Client::Anonymous("192.0.2.1"), T0),
            allowed(3, 2, DAY)
        );
        assert_eq!(c.table_key.0.get(), Some(&KEY));
        assert_eq!(
            store.value(TABLE_KEY).unwrap(),
            "0123456789abcdef fedcba9876543210"
        );
        let fp = placement(&c, "192.0.2.1").fingerprint;
        assert_eq!(
            store.value(&probe_key(&c, "192.0.2.1", 0)).unwrap(),
            slot_value(T0, fp, 1)
        );
    }

    #[test]
    fn unreadable_table_key_is_replaced() {
        for junk in [
            &b"junk"[..],
            b"",
            b"0123456789abcdef",
            b"0123456789ABCDEF fedcba9876543210",
        ] {
            let c = table(3, 1024, Period::Day);
            let store = FakeStore::new();
            store.put_raw(TABLE_KEY, junk);
            assert_eq!(
                check(&c, &store, &Client::Anonymous("192.0.2.1"), T0),
                allowed(3, 2, DAY)
            );
            let (k0, k1) = *c.table_key.0.get().unwrap();
            assert_eq!(
                store.value(TABLE_KEY).unwrap(),
                format!("{k0:016x} {k1:016x}")
            );
            assert_eq!(store.unconditional_sets(), 0);
        }
    }

    #[test]
    fn anonymous_store_failures_fail_closed() {
        let c = table(3, 1024, Period::Day);
        let ip = Client::Anonymous("192.0.2.1");
        // Reading or writing the key.
        let store = FakeStore::new();
        store.fail_get(true);
        assert_eq!(check(&c, &store, &ip, T0), QuotaDecision::Unavailable);
        store.fail_get(false);
        store.fail_set(true);
        assert_eq!(check(&c, &store, &ip, T0), QuotaDecision::Unavailable);
        store.fail_set(false);
        store.inject_mismatches(MAX_ATTEMPTS);
        assert_eq!(check(&c, &store, &ip, T0), QuotaDecision::Contended);
        assert!(c.table_key.0.get().is_none());
        // Reading or writing a slot.
        let store = keyed_store();
        store.fail_get(true);
        assert_eq!(check(&c, &store, &ip, T0), QuotaDecision::Unavailable);
        store.fail_get(false);
        store.fail_set(true);
        assert_eq!(check(&c, &store, &ip, T0), QuotaDecision::Unavailable);
        store.fail_set(false);
        store.inject_mismatches(MAX_ATTEMPTS);
        assert_eq!(check(&c, &store, &ip, T0), QuotaDecision::Contended);
        store.inject_mismatches(MAX_ATTEMPTS - 1);
        assert_eq!(check(&c, &store, &ip, T0), allowed(3, 2, DAY));
        assert_eq!(store.unconditional_sets(), 0);
    }

    #[test]
    fn racing_claims_of_one_slot_count_apart() {
        // Another client claims our home slot between our read and write: we
        // read again and take the next probe.
        let c = table(3, 1024, Period::Day);
        let store = keyed_store();
        let home = probe_key(&c, "192.0.2.1", 0);
        let mine = placement(&c, "192.0.2.1").fingerprint;
        let h = home.clone();
        store.before_next_set(move |s| {
            s.set(&h, &encode_slot(T0, mine ^ 7, 1), Some(CREATE_CAS))
                .unwrap();
        });
        assert_eq!(
            check(&c, &store, &Client::Anonymous("192.0.2.1"), T0),
            allowed(3, 2, DAY)
        );
        assert_eq!(store.value(&home).unwrap(), slot_value(T0, mine ^ 7, 1));
        assert_eq!(
            store.value(&probe_key(&c, "192.0.2.1", 1)).unwrap(),
            slot_value(T0, mine, 1)
        );
    }

    #[test]
    #[cfg_attr(target_family = "wasm", ignore = "no threads on wasm32-wasip1")]
    fn threads_count_anonymous_clients_within_limits() {
        // Four workers, 40 clients, 16 slots: shared counters, and yet every
        // admitted request is counted and nobody passes its limit.
        let c = table(10, 16, Period::Day);
        let store = Arc::new(keyed_store());
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let store = store.clone();
                let c = c.clone();
                std::thread::spawn(move || {
                    let mut admitted = vec![0u64; 40];
                    for round in 0..30 {
                        for n in 0..40 {
                            let n = (n + t * 7 + round) % 40;
                            let ip = format!("10.0.0.{n}");
                            match check(&c, store.as_ref(), &Client::Anonymous(&ip), T0) {
                                QuotaDecision::Allowed { .. } => admitted[n] += 1,
                                QuotaDecision::Exceeded { .. } | QuotaDecision::Contended => {}
                                other => panic!("{other:?}"),
                            }
                        }
                    }
                    admitted
                })
            })
            .collect();
        let mut admitted = vec![0u64; 40];
        for h in handles {
            for (a, b) in admitted.iter_mut().zip(h.join().unwrap()) {
                *a += b;
            }
        }
        assert!(admitted.iter().all(|a| *a <= 10), "{admitted:?}");
        let counted: u64 = (0..16)
            .filter_map(|n| store.value(&slot_key(&REQUESTS, n)))
            .map(|v| decode_slot(v.as_bytes()).unwrap().2)
            .sum();
        assert_eq!(counted, admitted.iter().sum::<u64>());
        assert!(store.entries() <= 17);
    }

    // --- configuration ---

    #[test]
    fn config_defaults() {
        let d = QuotaConfig::default();
        assert_eq!(
            d,
            QuotaConfig {
                authenticated_max_requests: 1000,
                anonymous_max_requests: 100,
                period: Period::Day,
                headers: true,
                rate_limited_as_resource_exhausted: true,
                anonymous_ipv4_prefix: 32,
                anonymous_ipv6_prefix: 64,
                anonymous_slots: 65_536,
                backend: None,
                count_requests: true,
                tokens: None,
                key: QuotaKey::Principal,
                table_key: KeyCache::default(),
            }
        );
        assert_eq!(QuotaConfig::parse(&json!({}), "quota").unwrap(), d);
        let unavailable = json!({"rate_limited_as_resource_exhausted": false});
        assert!(
            !QuotaConfig::parse(&unavailable, "quota")
                .unwrap()
                .rate_limited_as_resource_exhausted
        );
        let bad = json!({"rate_limited_as_resource_exhausted": "no"});
        assert!(QuotaConfig::parse(&bad, "quota")
            .unwrap_err()
            .to_string()
            .contains("quota.rate_limited_as_resource_exhausted"));
        assert_eq!(
            QuotaConfig::parse(
                &json!({"authenticated_max_requests": null, "period": null}),
                "quota"
            )
            .unwrap(),
            d
        );
    }

    #[test]
    fn config_each_key() {
        let full = json!({"authenticated_max_requests": 5, "anonymous_max_requests": 0,
                          "period": "minute", "headers": false,
                          "rate_limited_as_resource_exhausted": false,
                          "anonymous_ipv4_prefix": 24, "anonymous_ipv6_prefix": 48,
                          "anonymous_slots": 1000});
        assert_eq!(
            QuotaConfig::parse(&full, "quota").unwrap(),
            QuotaConfig {
                authenticated_max_requests: 5,
                anonymous_max_requests: 0,
                period: Period::Minute,
                headers: false,
                rate_limited_as_resource_exhausted: false,
                anonymous_ipv4_prefix: 24,
                anonymous_ipv6_prefix: 48,
                anonymous_slots: 1000,
                backend: None,
                count_requests: true,
                tokens: None,
                key: QuotaKey::Principal,
                table_key: KeyCache::default(),
            }
        );
        for (v, want) in [
            (json!({"anonymous_ipv4_prefix": 0}), (0, 64, 65_536)),
            (json!({"anonymous_ipv4_prefix": 32}), (32, 64, 65_536)),
            (json!({"anonymous_ipv6_prefix": 0}), (32, 0, 65_536)),
            (json!({"anonymous_ipv6_prefix": 128}), (32, 128, 65_536)),
            (json!({"anonymous_slots": 1}), (32, 64, 1)),
            (json!({"anonymous_slots": MAX_SLOTS}), (32, 64, MAX_SLOTS)),
        ] {
            let q = QuotaConfig::parse(&v, "quota").unwrap();
            let got = (
                q.anonymous_ipv4_prefix,
                q.anonymous_ipv6_prefix,
                q.anonymous_slots,
            );
            assert_eq!(got, want, "{v}");
        }
        let p = |v| QuotaConfig::parse(&v, "quota").unwrap();
        assert_eq!(
            p(json!({"authenticated_max_requests": 7})).authenticated_max_requests,
            7
        );
        assert_eq!(
            p(json!({"anonymous_max_requests": 3})).anonymous_max_requests,
            3
        );
        assert_eq!(p(json!({"period": "hour"})).period, Period::Hour);
        assert_eq!(p(json!({"period": "day"})).period, Period::Day);
        assert_eq!(p(json!({"period": "minute"})).period, Period::Minute);
        assert!(!p(json!({"headers": false})).headers);
        assert_eq!(
            p(json!({"authenticated_max_requests": u64::MAX})).authenticated_max_requests,
            u64::MAX
        );
        for period in [Period::Minute, Period::Hour, Period::Day] {
            assert_eq!(Period::from_name(period.as_str()), Some(period));
        }
    }

    #[test]
    fn config_bad_period() {
        let e = QuotaConfig::parse(&json!({"period": "week"}), "quota").unwrap_err();
        assert_eq!(e.key, "quota.period");
        assert_eq!(
            e.to_string(),
            "configuration key `quota.period`: must be \"minute\", \"hour\" or \"day\", found \"week\""
        );
        for bad in ["Day", "DAY", "", " day", "days"] {
            let e = QuotaConfig::parse(&json!({"period": bad}), "quota").unwrap_err();
            assert_eq!(e.key, "quota.period", "{bad}");
        }
        let e = QuotaConfig::parse(&json!({"period": 86400}), "server.quota").unwrap_err();
        assert_eq!(e.key, "server.quota.period");
        assert_eq!(e.reason, "expected a string, found a number");
    }

    #[test]
    fn config_unknown_key() {
        let e =
            QuotaConfig::parse(&json!({"period": "day", "max_requests": 5}), "quota").unwrap_err();
        assert_eq!(e.key, "quota.max_requests");
        assert_eq!(e.reason, "unknown key");
    }

    #[test]
    fn config_wrong_types() {
        for (v, key, reason) in [
            (
                json!({"authenticated_max_requests": "1000"}),
                "quota.authenticated_max_requests",
                "expected a non-negative integer, found a string",
            ),
            (
                json!({"authenticated_max_requests": -1}),
                "quota.authenticated_max_requests",
                "expected a non-negative integer, found a number",
            ),
            (
                json!({"anonymous_max_requests": 1.5}),
                "quota.anonymous_max_requests",
                "expected a non-negative integer, found a number",
            ),
            (
                json!({"anonymous_max_requests": true}),
                "quota.anonymous_max_requests",
                "expected a non-negative integer, found a boolean",
            ),
            (
                json!({"headers": "yes"}),
                "quota.headers",
                "expected true or false, found a string",
            ),
            (
                json!({"period": ["day"]}),
                "quota.period",
                "expected a string, found a list",
            ),
            (
                json!({"anonymous_ipv4_prefix": 33}),
                "quota.anonymous_ipv4_prefix",
                "must be at most 32",
            ),
            (
                json!({"anonymous_ipv6_prefix": 129}),
                "quota.anonymous_ipv6_prefix",
                "must be at most 128",
            ),
            (
                json!({"anonymous_ipv6_prefix": -1}),
                "quota.anonymous_ipv6_prefix",
                "expected a non-negative integer, found a number",
            ),
            (
                json!({"anonymous_ipv4_prefix": "24"}),
                "quota.anonymous_ipv4_prefix",
                "expected a non-negative integer, found a string",
            ),
            (
                json!({"anonymous_slots": 0}),
                "quota.anonymous_slots",
                "must be at least 1",
            ),
            (
                json!({"anonymous_slots": MAX_SLOTS + 1}),
                "quota.anonymous_slots",
                "must be at most 4194304",
            ),
            (
                json!({"anonymous_slots": 1.5}),
                "quota.anonymous_slots",
                "expected a non-negative integer, found a number",
            ),
            (json!([]), "quota", "expected an object, found a list"),
            (json!("day"), "quota", "expected an object, found a string"),
        ] {
            let e = QuotaConfig::parse(&v, "quota").unwrap_err();
            assert_eq!((e.key.as_str(), e.reason.as_str()), (key, reason), "{v}");
        }
    }

    #[test]
    fn the_backend_is_read_strictly_naming_the_key() {
        let base = json!({"type": "rls", "cluster": "ratelimit", "domain": "tollgate"});
        let b = QuotaConfig::parse(&json!({ "backend": base }), "quota")
            .unwrap()
            .backend
            .unwrap();
        assert_eq!(
            (b.timeout_ms, b.failure_mode, b.max_batch),
            (DEFAULT_BACKEND_TIMEOUT_MS, FailureMode::Deny, 1)
        );
        let with = |k: &str, v: Value| {
            let mut o = base.clone();
            o[k] = v;
            json!({ "backend": o })
        };
        let b = QuotaConfig::parse(&with("max_batch", json!(64)), "quota")
            .unwrap()
            .backend
            .unwrap();
        assert_eq!(b.max_batch, 64);
        for (v, key, reason) in [
            (
                with("max_batch", json!(0)),
                "quota.backend.max_batch",
                "must be at least 1",
            ),
            (
                with("max_batch", json!(65)),
                "quota.backend.max_batch",
                "must be at most 64",
            ),
            (
                with("max_batch", json!("8")),
                "quota.backend.max_batch",
                "expected a non-negative integer, found a string",
            ),
            (
                with("timeout_ms", json!(0)),
                "quota.backend.timeout_ms",
                "must be at least 1",
            ),
            (
                with("failure_mode", json!("allow")),
                "quota.backend.failure_mode",
                "must be \"deny\" or \"local\", found \"allow\"",
            ),
            (
                with("type", json!("redis")),
                "quota.backend.type",
                "must be \"rls\", found \"redis\"",
            ),
            (
                with("domain", json!("")),
                "quota.backend.domain",
                "must not be empty",
            ),
            (
                with("cluster", json!("")),
                "quota.backend.cluster",
                "must be an ASCII cluster name of 1 to 120 bytes",
            ),
            (
                with("batch", json!(2)),
                "quota.backend.batch",
                "unknown key",
            ),
        ] {
            let e = QuotaConfig::parse(&v, "quota").unwrap_err();
            assert_eq!((e.key.as_str(), e.reason.as_str()), (key, reason), "{v}");
        }
    }

    fn tokens(reserve: u64) -> crate::token_quota::TokenQuota {
        crate::token_quota::TokenQuota::parse(
            &json!({"authenticated_max_tokens": 100, "anonymous_max_tokens": 50,
                    "reserve_tokens": reserve}),
            "quota.tokens",
        )
        .unwrap()
    }

    #[test]
    fn token_reservations_are_settled_to_what_was_spent() {
        let c = cfg(1000, 1000, Period::Day);
        let t = tokens(30);
        let store = FakeStore::new();
        let tally = token_tally(&t, 100);
        let window = Period::Day.window_start(T0);
        // Reserved while the count is below the budget, even past it.
        for (n, remaining) in [(30, 70), (60, 40), (90, 10), (120, 0)] {
            assert_eq!(
                count(&c, &store, &ALICE, &tally, T0),
                allowed(100, remaining, DAY),
                "{n}"
            );
            assert_eq!(
                store.value("tollgate/tokens/a/alice").as_deref(),
                Some(format!("{window} {n}").as_str())
            );
        }
        assert_eq!(
            count(&c, &store, &ALICE, &tally, T0),
            QuotaDecision::Exceeded {
                limit: 100,
                reset: DAY
            }
        );
        // Settled: 30 reserved, 5 spent; 30 reserved, 45 spent.
        settle(&c, &store, &ALICE, &tally, window, 5, T0 + 1);
        assert_eq!(
            store.value("tollgate/tokens/a/alice").as_deref(),
            Some(format!("{window} 95").as_str())
        );
        settle(&c, &store, &ALICE, &tally, window, 45, T0 + 2);
        assert_eq!(
            store.value("tollgate/tokens/a/alice").as_deref(),
            Some(format!("{window} 110").as_str())
        );
        // Requests are counted apart.
        assert_eq!(store.value(ALICE_KEY), None);
        // After the window: only a charge above the reservation moves on.
        let next = window + DAY;
        settle(&c, &store, &ALICE, &tally, window, 10, next + 5);
        assert_eq!(
            store.value("tollgate/tokens/a/alice").as_deref(),
            Some(format!("{window} 110").as_str())
        );
        settle(&c, &store, &ALICE, &tally, window, 70, next + 5);
        assert_eq!(
            store.value("tollgate/tokens/a/alice").as_deref(),
            Some(format!("{next} 40").as_str())
        );
        // Never below zero.
        let bob = Client::Principal("bob");
        settle(&c, &store, &bob, &tally, next, 0, next + 6);
        assert_eq!(
            store.value("tollgate/tokens/a/bob").as_deref(),
            Some(format!("{next} 0").as_str())
        );
    }

    #[test]
    fn anonymous_tokens_are_settled_in_their_own_slot() {
        let c = cfg(1000, 1000, Period::Day);
        let t = tokens(20);
        let store = FakeStore::new();
        let tally = token_tally(&t, 50);
        let window = Period::Day.window_start(T0);
        let me = Client::Anonymous("198.51.100.7");
        assert_eq!(count(&c, &store, &me, &tally, T0), allowed(50, 30, DAY));
        settle(&c, &store, &me, &tally, window, 3, T0);
        let held: Vec<String> = (0..c.anonymous_slots)
            .filter_map(|n| store.value(&slot_key(&TOKENS, n)))
            .collect();
        assert_eq!(held.len(), 1);
        assert!(held[0].ends_with(" 3"), "{held:?}");
        // The request counters' table is untouched.
        assert!((0..c.anonymous_slots).all(|n| store.value(&slot_key(&REQUESTS, n)).is_none()));
    }

    #[test]
    fn quota_keys_name_principals_tenants_or_both() {
        let key = |k: &str| {
            QuotaConfig::parse(&json!({ "key": k }), "quota")
                .map(|q| q.key)
                .map_err(|e| (e.key, e.reason))
        };
        assert_eq!(key("principal"), Ok(QuotaKey::Principal));
        assert_eq!(key("tenant"), Ok(QuotaKey::Tenant));
        assert_eq!(key("tenant_principal"), Ok(QuotaKey::TenantPrincipal));
        assert_eq!(
            key("org"),
            Err((
                "quota.key".to_string(),
                "must be \"principal\", \"tenant\" or \"tenant_principal\", found \"org\""
                    .to_string()
            ))
        );
        let name = |k: QuotaKey, t: Option<&str>| k.client_name("alice", t).into_owned();
        assert_eq!(name(QuotaKey::Principal, Some("acme")), "alice");
        assert_eq!(name(QuotaKey::Tenant, Some("acme")), "tenant\u{1f}acme");
        assert_eq!(
            name(QuotaKey::TenantPrincipal, Some("acme")),
            "acme\u{1f}alice"
        );
        // Without a tenant, the principal.
        assert_eq!(name(QuotaKey::Tenant, None), "alice");
        assert_eq!(name(QuotaKey::TenantPrincipal, None), "alice");
    }
}
