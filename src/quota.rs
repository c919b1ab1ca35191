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
//! `authenticated_max_requests`; an anonymous one by its client IP against
//! `anonymous_max_requests`.
//!
//! This module is a sans-IO core: the host's shared data is reached through
//! [`SharedStore`], which the proxy-wasm glue implements. Counting is exact
//! across Envoy's worker VMs: every write is a compare-and-swap, retried on
//! mismatch, and never unconditional (see [`check`]).
//!
//! # Memory per client
//!
//! One shared-data entry per client, whatever the number of windows: the entry
//! holds the current window's start and count, and a new window overwrites the
//! old one. Per client that is
//!
//! * key: `tollgate/quota/a/<principal>` = 17 bytes + the principal, or
//!   `tollgate/quota/ip/<ip>` = 18 bytes + the IP (7–15 bytes for IPv4, up to
//!   39 for IPv6, 45 for an IPv4-mapped IPv6 address): 25–63 bytes for an IP;
//! * value: ASCII `"<window_start> <count>"`: the window start has 10 digits
//!   until the year 2286, plus a space, plus the count's digits (at most the
//!   limit's digits: 4 for the default 1000): 12–15 bytes with the defaults,
//!   31 bytes at most;
//!
//! plus the host's own bookkeeping (a hash-map slot with two strings and a
//! 32-bit CAS: on the order of 100 bytes in Envoy). So roughly 150–200 bytes
//! per client. Shared data has no delete in the proxy-wasm ABI, so entries stay
//! for the life of the Envoy process: memory grows with the number of distinct
//! clients ever seen, never with the number of windows.

use crate::json::{ConfigError, Obj};
use serde_json::Value;

/// Key prefix of authenticated clients' counters.
const PRINCIPAL_PREFIX: &str = "tollgate/quota/a/";
/// Key prefix of anonymous clients' counters.
const IP_PREFIX: &str = "tollgate/quota/ip/";

/// How many read-and-compare-and-swap rounds one request may take before it
/// gives up and fails closed with [`QuotaDecision::Contended`].
pub const MAX_ATTEMPTS: u32 = 32;

/// The CAS used to create a key that was missing when read.
///
/// Envoy accepts a non-zero CAS on a missing key (and creates it), but refuses
/// it with a CAS mismatch when the key exists with another CAS. So creating
/// with this sentinel succeeds only if nobody created the key since we read it
/// (or, astronomically unlikely, its CAS is exactly this value). A CAS of 0
/// (`None`) would be an unconditional write, which could lose an increment
/// when two workers create the same key at once.
pub const CREATE_CAS: u32 = u32::MAX;

/// The accepted values of `period`, for error messages.
const PERIODS: &str = "\"minute\", \"hour\" or \"day\"";

/// A fixed window, aligned to UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    Minute,
    Hour,
    Day,
}

impl Period {
    /// The window's length in seconds.
    pub fn seconds(self) -> u64 {
        match self {
            Period::Minute => 60,
            Period::Hour => 3_600,
            Period::Day => 86_400,
        }
    }

    /// The start (seconds since the Unix epoch) of the window holding
    /// `now_secs`.
    pub fn window_start(self, now_secs: u64) -> u64 {
        now_secs - now_secs % self.seconds()
    }

    /// The configuration name of the period.
    pub fn as_str(self) -> &'static str {
        match self {
            Period::Minute => "minute",
            Period::Hour => "hour",
            Period::Day => "day",
        }
    }

    /// Reads a configuration name (`minute`, `hour`, `day`).
    pub fn from_name(name: &str) -> Option<Period> {
        match name {
            "minute" => Some(Period::Minute),
            "hour" => Some(Period::Hour),
            "day" => Some(Period::Day),
            _ => None,
        }
    }
}

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
}

impl Default for QuotaConfig {
    /// Llama Stack's defaults: 1000 authenticated, 100 anonymous, per day,
    /// with headers.
    fn default() -> Self {
        QuotaConfig {
            authenticated_max_requests: 1000,
            anonymous_max_requests: 100,
            period: Period::Day,
            headers: true,
        }
    }
}

impl QuotaConfig {
    /// Reads the `quota` object found at `key` (e.g. `"quota"`); absent keys
    /// take the defaults, unknown keys are refused.
    pub fn parse(v: &Value, key: &str) -> Result<QuotaConfig, ConfigError> {
        let mut o = Obj::new(v, key)?;
        let d = QuotaConfig::default();
        let authenticated_max_requests = o
            .u64_max("authenticated_max_requests", u64::MAX)?
            .unwrap_or(d.authenticated_max_requests);
        let anonymous_max_requests = o
            .u64_max("anonymous_max_requests", u64::MAX)?
            .unwrap_or(d.anonymous_max_requests);
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

/// A shared-data operation's failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreError {
    /// The key's CAS is not the one given.
    CasMismatch,
    /// Anything else.
    Other,
}

/// The host's shared data, as proxy-wasm exposes it.
///
/// `get` of a missing key returns `(None, None)`; an existing key returns its
/// non-zero CAS. `set` with `cas` `None` is unconditional; with `Some(c)` it
/// fails with [`StoreError::CasMismatch`] when the key exists with another
/// CAS, and creates the key when it is missing.
pub trait SharedStore {
    fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), StoreError>;
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError>;
}

/// Who is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Client<'a> {
    /// An authenticated request, by its verified principal.
    Principal(&'a str),
    /// An anonymous request, by client IP (without the port).
    Anonymous(&'a str),
}

/// The shared-data key of a client's counter: `tollgate/quota/a/<principal>`
/// or `tollgate/quota/ip/<ip>`.
pub fn key_for(client: &Client) -> String {
    match client {
        Client::Principal(p) => [PRINCIPAL_PREFIX, p].concat(),
        Client::Anonymous(ip) => [IP_PREFIX, ip].concat(),
    }
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

/// Decodes a counter value; `None` if it does not parse.
fn decode(bytes: &[u8]) -> Option<(u64, u64)> {
    let s = std::str::from_utf8(bytes).ok()?;
    let (start, count) = s.split_once(' ')?;
    Some((parse_digits(start)?, parse_digits(count)?))
}

/// Seconds from `now_secs` to the end of the window starting at `start`, at
/// least 1.
fn reset_after(start: u64, period: Period, now_secs: u64) -> u64 {
    start
        .saturating_add(period.seconds())
        .saturating_sub(now_secs)
        .max(1)
}

/// Counts one request of `client` at `now_secs` (seconds since the Unix
/// epoch), if its quota allows.
///
/// Each round reads the client's entry and writes it back incremented with a
/// compare-and-swap: with the CAS read when the key exists, with
/// [`CREATE_CAS`] when it is missing; never unconditionally. A CAS mismatch
/// means another worker wrote in between: read again, up to [`MAX_ATTEMPTS`]
/// rounds, then [`QuotaDecision::Contended`]. Any other store error is
/// [`QuotaDecision::Unavailable`]. Both fail closed.
///
/// The stored window decides the count: the current window's count is used;
/// an older window (or a value that does not parse, logged at warn) starts a
/// fresh window at 0. A window exactly one period ahead (another worker's
/// clock already crossed the boundary) is adopted rather than rewound, so its
/// increments are not lost; anything further ahead is treated as garbage.
pub fn check(
    cfg: &QuotaConfig,
    store: &dyn SharedStore,
    client: &Client,
    now_secs: u64,
) -> QuotaDecision {
    let limit = cfg.limit_for(client);
    let period = cfg.period;
    let current = period.window_start(now_secs);
    if limit == 0 {
        return QuotaDecision::Exceeded {
            limit,
            reset: reset_after(current, period, now_secs),
        };
    }
    let key = key_for(client);
    for _ in 0..MAX_ATTEMPTS {
        let (value, cas) = match store.get(&key) {
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
            Some(Some((start, count))) if start == current => (start, count),
            Some(Some((start, _))) if start < current => (current, 0),
            Some(Some((start, count))) if start == current.saturating_add(period.seconds()) => {
                (start, count)
            }
            Some(Some((start, _))) => {
                log::warn!(
                    "quota: window {start} at {key} is in the future; starting a fresh window"
                );
                (current, 0)
            }
        };
        let reset = reset_after(start, period, now_secs);
        if count >= limit {
            return QuotaDecision::Exceeded { limit, reset };
        }
        // count < limit <= u64::MAX, so this cannot overflow.
        let counted = count.saturating_add(1);
        let cas = match cas {
            Some(c) if c != 0 => c,
            _ => CREATE_CAS,
        };
        match store.set(&key, &encode(start, counted), Some(cas)) {
            Ok(()) => {
                return QuotaDecision::Allowed {
                    limit,
                    remaining: limit.saturating_sub(counted),
                    reset,
                }
            }
            Err(StoreError::CasMismatch) => continue,
            Err(StoreError::Other) => {
                log::warn!("quota: writing {key}: store error");
                return QuotaDecision::Unavailable;
            }
        }
    }
    log::warn!("quota: {key} still contended after {MAX_ATTEMPTS} attempts");
    QuotaDecision::Contended
}

/// A shared-data store with Envoy's semantics, for tests.
#[cfg(test)]
pub mod fake {
    use super::{SharedStore, StoreError};
    use std::collections::HashMap;
    use std::sync::Mutex;

    /// Runs inside a `set`, before it applies: another worker's work between
    /// our `get` and our `set`.
    pub type Hook = Box<dyn FnMut(&FakeStore) + Send>;

    #[derive(Default)]
    struct State {
        map: HashMap<String, (Vec<u8>, u32)>,
        /// The next CAS Envoy hands out; starts at 1 and skips 0.
        next_cas: u32,
        /// How many coming `set`s fail with a CAS mismatch regardless.
        inject_mismatches: u32,
        /// Whether `get` fails with `Other`.
        fail_get: bool,
        /// Whether `set` fails with `Other`.
        fail_set: bool,
        gets: u32,
        sets: u32,
        unconditional_sets: u32,
    }

    /// Envoy's shared data (proxy-wasm-cpp-host), as measured on Envoy 1.40:
    /// a global CAS counter starting at 1 that skips 0; `get` of a missing
    /// key is `(None, None)`; `set` with CAS 0 is unconditional; a non-zero
    /// CAS on a missing key creates it; a CAS different from an existing
    /// key's is a mismatch.
    pub struct FakeStore {
        state: Mutex<State>,
        /// Run (once, then dropped) at the start of the next `set`.
        before_next_set: Mutex<Option<Hook>>,
        /// Run at the start of every `set` (not while it runs itself).
        before_every_set: Mutex<Option<Hook>>,
    }

    impl Default for FakeStore {
        fn default() -> Self {
            Self::new()
        }
    }

    impl FakeStore {
        pub fn new() -> Self {
            FakeStore {
                state: Mutex::new(State {
                    next_cas: 1,
                    ..State::default()
                }),
                before_next_set: Mutex::new(None),
                before_every_set: Mutex::new(None),
            }
        }

        /// Starts the CAS counter at `cas` (to test its wrap-around).
        pub fn with_next_cas(cas: u32) -> Self {
            let s = Self::new();
            s.state.lock().unwrap().next_cas = cas;
            s
        }

        /// The next `n` writes fail with a CAS mismatch.
        pub fn inject_mismatches(&self, n: u32) {
            self.state.lock().unwrap().inject_mismatches = n;
        }

        pub fn fail_get(&self, fail: bool) {
            self.state.lock().unwrap().fail_get = fail;
        }

        pub fn fail_set(&self, fail: bool) {
            self.state.lock().unwrap().fail_set = fail;
        }

        /// Runs `hook` once, at the start of the next `set`.
        pub fn before_next_set(&self, hook: impl FnMut(&FakeStore) + Send + 'static) {
            *self.before_next_set.lock().unwrap() = Some(Box::new(hook));
        }

        /// Runs `hook` at the start of every `set`, except the ones it makes.
        pub fn before_every_set(&self, hook: impl FnMut(&FakeStore) + Send + 'static) {
            *self.before_every_set.lock().unwrap() = Some(Box::new(hook));
        }

        /// Writes a raw value as the host would (unconditionally, new CAS).
        pub fn put_raw(&self, key: &str, value: &[u8]) {
            let mut s = self.state.lock().unwrap();
            let cas = Self::next_cas(&mut s);
            s.map.insert(key.to_string(), (value.to_vec(), cas));
        }

        /// The stored value, as a string.
        pub fn value(&self, key: &str) -> Option<String> {
            let s = self.state.lock().unwrap();
            s.map
                .get(key)
                .map(|(v, _)| String::from_utf8_lossy(v).into_owned())
        }

        /// The stored CAS.
        pub fn cas(&self, key: &str) -> Option<u32> {
            self.state.lock().unwrap().map.get(key).map(|(_, c)| *c)
        }

        pub fn entries(&self) -> usize {
            self.state.lock().unwrap().map.len()
        }

        pub fn gets(&self) -> u32 {
            self.state.lock().unwrap().gets
        }

        pub fn sets(&self) -> u32 {
            self.state.lock().unwrap().sets
        }

        pub fn unconditional_sets(&self) -> u32 {
            self.state.lock().unwrap().unconditional_sets
        }

        fn next_cas(s: &mut State) -> u32 {
            let cas = s.next_cas;
            s.next_cas = s.next_cas.wrapping_add(1);
            if s.next_cas == 0 {
                s.next_cas = 1;
            }
            cas
        }

        fn run_hooks(&self) {
            let once = self.before_next_set.lock().unwrap().take();
            if let Some(mut hook) = once {
                hook(self);
            }
            // Taken out while it runs, so that its own writes do not re-enter.
            let every = self.before_every_set.lock().unwrap().take();
            if let Some(mut hook) = every {
                hook(self);
                let mut slot = self.before_every_set.lock().unwrap();
                if slot.is_none() {
                    *slot = Some(hook);
                }
            }
        }
    }

    impl SharedStore for FakeStore {
        fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), StoreError> {
            let mut s = self.state.lock().unwrap();
            s.gets += 1;
            if s.fail_get {
                return Err(StoreError::Other);
            }
            Ok(match s.map.get(key) {
                None => (None, None),
                // The SDK reports an empty value as no bytes.
                Some((v, cas)) if v.is_empty() => (None, Some(*cas)),
                Some((v, cas)) => (Some(v.clone()), Some(*cas)),
            })
        }

        fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
            self.run_hooks();
            let mut s = self.state.lock().unwrap();
            s.sets += 1;
            if s.fail_set {
                return Err(StoreError::Other);
            }
            if s.inject_mismatches > 0 {
                s.inject_mismatches -= 1;
                return Err(StoreError::CasMismatch);
            }
            let cas = cas.unwrap_or(0);
            if cas == 0 {
                s.unconditional_sets += 1;
            }
            if let Some((_, current)) = s.map.get(key) {
                if cas != 0 && cas != *current {
                    return Err(StoreError::CasMismatch);
                }
            }
            let new_cas = Self::next_cas(&mut s);
            s.map.insert(key.to_string(), (value.to_vec(), new_cas));
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::FakeStore;
    use super::*;

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
            headers: true,
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
        assert_eq!(store.entries(), 4);
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
        assert_ne!(key_for(&p), key_for(&ip));
    }

    #[test]
    fn keys() {
        assert_eq!(key_for(&ALICE), "tollgate/quota/a/alice");
        assert_eq!(
            key_for(&Client::Anonymous("2001:db8::1")),
            "tollgate/quota/ip/2001:db8::1"
        );
        assert_eq!(
            key_for(&Client::Principal("user/with/slashes")),
            "tollgate/quota/a/user/with/slashes"
        );
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
        assert_eq!(
            store.value("tollgate/quota/ip/192.0.2.7").unwrap(),
            format!("{T0} 2")
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
            }
        );
        assert_eq!(QuotaConfig::parse(&json!({}), "quota").unwrap(), d);
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
                          "period": "minute", "headers": false});
        assert_eq!(
            QuotaConfig::parse(&full, "quota").unwrap(),
            QuotaConfig {
                authenticated_max_requests: 5,
                anonymous_max_requests: 0,
                period: Period::Minute,
                headers: false,
            }
        );
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
            (json!([]), "quota", "expected an object, found a list"),
            (json!("day"), "quota", "expected an object, found a string"),
        ] {
            let e = QuotaConfig::parse(&v, "quota").unwrap_err();
            assert_eq!((e.key.as_str(), e.reason.as_str()), (key, reason), "{v}");
        }
    }
}
