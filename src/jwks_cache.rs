//! Fetching and sharing the key set across the VMs of one Envoy process.
//!
//! Every VM (one per worker, plus the main thread's) needs the key set, but one
//! fetch per refresh period per process is enough. The state of the last fetch
//! — its times, its failures and the last good document — is one record in
//! proxy-wasm shared data; a short lease (also in shared data, with an expiry
//! so a dead VM cannot block the others) says which VM fetches. The others read
//! the record on their tick and parse a document once per version.
//!
//! The key set itself is [`crate::key_set`]'s; this module holds when to
//! fetch ([`FetchRecord`]), who fetches ([`take_lease`]), the record in shared
//! data ([`read_record`], [`write_record`]) and this VM's view ([`JwksState`]).

use crate::key_set::{JwksError, KeySet};
use crate::store::{SharedStore, StoreError, CREATE_CAS};

/// Why a key set fetch failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchError {
    Unavailable,
    Timeout,
}

/// Longest pause between failed fetches (ms).
pub const MAX_BACKOFF_MS: u64 = 10_000;
const FIRST_BACKOFF_MS: u64 = 500;

/// The shared record of the last fetch (times in ms since the epoch).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FetchRecord {
    /// When the last fetch started.
    pub started: u64,
    /// When the last fetch ended (a fetch is under way while `started > finished`).
    pub finished: u64,
    /// When a fetch last succeeded (0: never).
    pub fetched: u64,
    /// Failures since the last success.
    pub failures: u32,
    /// No new fetch before this time (backoff).
    pub retry_at: u64,
    pub error: Option<FetchError>,
    /// The last good JWKS document (empty: none yet).
    pub body: Vec<u8>,
}

impl FetchRecord {
    pub fn encode(&self) -> Vec<u8> {
        let err = match self.error {
            None => "ok",
            Some(FetchError::Unavailable) => "unavailable",
            Some(FetchError::Timeout) => "timeout",
        };
        let mut out = format!(
            "v1 {} {} {} {} {} {}\n",
            self.started, self.finished, self.fetched, self.failures, self.retry_at, err
        )
        .into_bytes();
        out.extend_from_slice(&self.body);
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<FetchRecord> {
        let nl = bytes.iter().position(|&b| b == b'\n')?;
        let (head, rest) = bytes.split_at(nl);
        let body = rest.get(1..)?.to_vec();
        let head = std::str::from_utf8(head).ok()?;
        let mut f = head.split(' ');
        if f.next()? != "v1" {
            return None;
        }
        let started = f.next()?.parse().ok()?;
        let finished = f.next()?.parse().ok()?;
        let fetched = f.next()?.parse().ok()?;
        let failures = f.next()?.parse().ok()?;
        let retry_at = f.next()?.parse().ok()?;
        let error = match f.next()? {
            "ok" => None,
            "unavailable" => Some(FetchError::Unavailable),
            "timeout" => Some(FetchError::Timeout),
            _ => return None,
        };
        if f.next().is_some() {
            return None;
        }
        Some(FetchRecord {
            started,
            finished,
            fetched,
            failures,
            retry_at,
            error,
            body,
        })
    }

    /// The record when a fetch starts.
    pub fn start(&self, now: u64) -> FetchRecord {
        FetchRecord {
            started: now,
            ..self.clone()
        }
    }

    /// The record after a successful fetch of `body`.
    pub fn success(&self, body: Vec<u8>, now: u64) -> FetchRecord {
        FetchRecord {
            started: self.started,
            finished: now,
            fetched: now,
            failures: 0,
            retry_at: 0,
            error: None,
            body,
        }
    }

    /// The record after a failed fetch: the last good document is kept.
    pub fn failure(&self, why: FetchError, now: u64) -> FetchRecord {
        let failures = self.failures.saturating_add(1);
        let exp = failures.saturating_sub(1).min(10);
        let backoff = FIRST_BACKOFF_MS
            .saturating_mul(1u64 << exp)
            .min(MAX_BACKOFF_MS);
        FetchRecord {
            started: self.started,
            finished: now,
            fetched: self.fetched,
            failures,
            retry_at: now.saturating_add(backoff),
            error: Some(why),
            body: self.body.clone(),
        }
    }
}

/// Shared-data keys for one JWKS URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedKeys {
    pub record: String,
    pub lease: String,
}

impl SharedKeys {
    pub fn for_url(url: &str) -> SharedKeys {
        let h = hmac_sha256::Hash::hash(url.as_bytes());
        let tag: String = h.iter().take(8).map(|b| format!("{b:02x}")).collect();
        SharedKeys {
            record: format!("tollgate/jwks/{tag}/record"),
            lease: format!("tollgate/jwks/{tag}/lease"),
        }
    }
}

/// Tries to take the fetch lease until `until`; true when this VM may fetch.
pub fn take_lease(store: &dyn SharedStore, key: &str, now: u64, until: u64) -> bool {
    let (value, cas) = match store.get(key) {
        Ok(v) => v,
        Err(_) => return false,
    };
    let held_until = value
        .as_deref()
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(0);
    if held_until > now {
        return false;
    }
    let cas = match (value, cas) {
        (Some(_), Some(c)) => c,
        _ => CREATE_CAS,
    };
    store
        .set(key, until.to_string().as_bytes(), Some(cas))
        .is_ok()
}

/// Gives the lease back (best effort: it expires anyway).
pub fn release_lease(store: &dyn SharedStore, key: &str) {
    if let Ok((Some(_), Some(cas))) = store.get(key) {
        let _ = store.set(key, b"0", Some(cas));
    }
}

/// Reads the shared record if it changed since `seen_cas`.
pub fn read_record(
    store: &dyn SharedStore,
    key: &str,
    seen_cas: Option<u32>,
) -> Option<(FetchRecord, u32)> {
    match store.get(key) {
        Ok((Some(bytes), Some(cas))) if Some(cas) != seen_cas => {
            FetchRecord::decode(&bytes).map(|r| (r, cas))
        }
        _ => None,
    }
}

/// Writes the record (only the lease holder writes it).
pub fn write_record(
    store: &dyn SharedStore,
    key: &str,
    record: &FetchRecord,
) -> Result<(), StoreError> {
    let bytes = record.encode();
    for _ in 0..8 {
        let cas = match store.get(key)? {
            (Some(_), Some(c)) => c,
            _ => CREATE_CAS,
        };
        match store.set(key, &bytes, Some(cas)) {
            Err(StoreError::CasMismatch) => continue,
            other => return other,
        }
    }
    Err(StoreError::CasMismatch)
}

/// This VM's view of the key set (times in ms).
#[derive(Debug, Default)]
pub struct JwksState {
    pub keys: Option<std::rc::Rc<KeySet>>,
    digest: Option<[u8; 32]>,
    /// The record this view was built from.
    pub record: FetchRecord,
    record_cas: Option<u32>,
    /// This VM's fetch under way, since when.
    pub in_flight_since: Option<u64>,
    /// A request asked for a fetch (no keys, or an unknown `kid`) at this time.
    pub wanted_since: Option<u64>,
    /// Bumped whenever a new key set document is installed; the verified-token
    /// cache empties itself then ([`crate::token_cache::TokenCache`]), so tokens of a removed
    /// key are verified again, and refused, on their next request.
    pub generation: u64,
}

impl JwksState {
    /// Whether a fetch is due (by time, or asked for) and allowed (backoff).
    pub fn fetch_due(&self, now: u64, ttl_ms: u64) -> bool {
        if self.in_flight_since.is_some() || now < self.record.retry_at {
            return false;
        }
        self.wanted_since.is_some()
            || self.keys.is_none()
            || now.saturating_sub(self.record.fetched) >= ttl_ms
    }

    /// Keys, unless older than `max_age_ms` since the last successful fetch.
    pub fn usable_keys(&self, now: u64, max_age_ms: u64) -> Option<std::rc::Rc<KeySet>> {
        if now.saturating_sub(self.record.fetched) > max_age_ms {
            return None;
        }
        self.keys.clone()
    }

    /// Applies a record (from shared data or from this VM's own fetch);
    /// returns whether the usable keys changed.
    pub fn apply(&mut self, record: FetchRecord, cas: Option<u32>) -> bool {
        if let Some(w) = self.wanted_since {
            if record.started >= w {
                self.wanted_since = None;
            }
        }
        let changed = !record.body.is_empty() && self.install(&record.body).unwrap_or(false);
        self.record = record;
        self.record_cas = cas;
        changed
    }

    /// Makes a document's keys this VM's keys, unless they already are;
    /// returns whether they changed.
    fn install(&mut self, body: &[u8]) -> Result<bool, JwksError> {
        let digest = hmac_sha256::Hash::hash(body);
        if self.digest == Some(digest) {
            return Ok(false);
        }
        match KeySet::parse(body) {
            Ok(keys) => {
                log::info!("JWKS loaded: {} usable keys", keys.keys.len());
                self.keys = Some(std::rc::Rc::new(keys));
                self.digest = Some(digest);
                self.generation = self.generation.wrapping_add(1);
                Ok(true)
            }
            Err(e) => {
                log::warn!("JWKS refused: {e}");
                Err(e)
            }
        }
    }

    /// The record after this VM fetched `body` (a 200): a JWKS document
    /// becomes the keys at once (parsed once), even with no usable key (a key
    /// removed from the set is revoked); anything else (not JSON, no `keys`
    /// list) counts as a failed fetch and the old keys stay.
    pub fn fetched(&mut self, body: Vec<u8>, now: u64) -> FetchRecord {
        match self.install(&body) {
            Ok(_) => self.record.success(body, now),
            Err(_) => self.record.failure(FetchError::Unavailable, now),
        }
    }

    pub fn record_cas(&self) -> Option<u32> {
        self.record_cas
    }

    /// Whether an unknown `kid` may start a refresh now: the last fetch (by
    /// any VM) started and ended at least `cooldown_ms` ago. (Counting from
    /// its end too means a request that waited for a slow refresh is answered
    /// when it ends, instead of starting another.)
    pub fn kid_refresh_allowed(&self, now: u64, cooldown_ms: u64) -> bool {
        let last = self.record.started.max(self.record.finished);
        now.saturating_sub(last) >= cooldown_ms && now >= self.record.retry_at
    }

    /// Asks for a fetch (keeps the earliest ask).
    pub fn want(&mut self, now: u64) {
        self.wanted_since.get_or_insert(now);
    }

    /// Whether a fetch is under way in this VM or, by the shared record, in
    /// another (a record older than `lease_ms` no longer counts: that VM died).
    pub fn in_flight(&self, now: u64, lease_ms: u64) -> bool {
        self.in_flight_since.is_some()
            || (self.record.started > self.record.finished
                && now.saturating_sub(self.record.started) < lease_ms)
    }
}

#[cfg(test)]
mod share_tests {
    use super::*;
    use crate::store::fake::FakeStore;

    #[test]
    fn record_round_trip() {
        let r = FetchRecord {
            started: 1,
            finished: 7,
            fetched: 2,
            failures: 3,
            retry_at: 4,
            error: Some(FetchError::Timeout),
            body: b"{\"keys\":[]}\nx".to_vec(),
        };
        assert_eq!(FetchRecord::decode(&r.encode()), Some(r));
        assert_eq!(FetchRecord::decode(b"garbage"), None);
        assert_eq!(FetchRecord::decode(b"v1 1 1 2 3 4 bad\n"), None);
        assert_eq!(FetchRecord::decode(b"v1 1 2 3\n"), None);
    }

    #[test]
    fn backoff_doubles_to_ten_seconds_and_keeps_the_body() {
        let mut r = FetchRecord {
            body: b"good".to_vec(),
            ..Default::default()
        };
        r = r.failure(FetchError::Unavailable, 1000);
        assert_eq!(r.retry_at, 1500);
        r = r.failure(FetchError::Timeout, 1000);
        assert_eq!(r.retry_at, 2000);
        for _ in 0..20 {
            r = r.failure(FetchError::Timeout, 1000);
        }
        assert_eq!(r.retry_at, 1000 + MAX_BACKOFF_MS);
        assert_eq!(r.body, b"good");
        let ok = r.success(b"new".to_vec(), 5000);
        assert_eq!(
            (ok.failures, ok.retry_at, ok.error, ok.fetched),
            (0, 0, None, 5000)
        );
    }

    #[test]
    fn one_lease_holder_at_a_time_and_expiry() {
        let store = FakeStore::new();
        assert!(take_lease(&store, "l", 100, 1100));
        assert!(!take_lease(&store, "l", 200, 1200));
        assert!(
            take_lease(&store, "l", 1100, 2100),
            "expired lease is taken over"
        );
        release_lease(&store, "l");
        assert!(take_lease(&store, "l", 1200, 2200));
    }

    #[test]
    fn lease_creation_race_has_one_winner() {
        let store = FakeStore::new();
        // Another VM creates the lease between our read and our write.
        store.before_next_set(|s| {
            assert!(take_lease(s, "l", 0, 5000));
        });
        assert!(!take_lease(&store, "l", 0, 5000));
    }

    #[test]
    fn records_are_read_once_per_version() {
        let store = FakeStore::new();
        let rec = FetchRecord {
            started: 5,
            ..Default::default()
        };
        write_record(&store, "r", &rec).unwrap();
        let (got, cas) = read_record(&store, "r", None).unwrap();
        assert_eq!(got, rec);
        assert!(read_record(&store, "r", Some(cas)).is_none());
        write_record(&store, "r", &rec.failure(FetchError::Timeout, 9)).unwrap();
        assert!(read_record(&store, "r", Some(cas)).is_some());
    }

    #[test]
    fn wanted_clears_when_a_later_fetch_is_recorded() {
        let mut s = JwksState::default();
        s.want(100);
        s.apply(
            FetchRecord {
                started: 50,
                ..Default::default()
            },
            Some(1),
        );
        assert!(
            s.wanted_since.is_some(),
            "a fetch that started before the ask does not count"
        );
        s.apply(
            FetchRecord {
                started: 150,
                ..Default::default()
            },
            Some(2),
        );
        assert!(s.wanted_since.is_none());
    }

    #[test]
    fn fetch_due_rules() {
        let mut s = JwksState::default();
        assert!(s.fetch_due(0, 1000), "no keys");
        s.in_flight_since = Some(0);
        assert!(!s.fetch_due(0, 1000), "already fetching");
        s.in_flight_since = None;
        s.record.retry_at = 500;
        assert!(!s.fetch_due(499, 1000), "backing off");
        assert!(s.fetch_due(500, 1000));
        assert!(s.kid_refresh_allowed(10_000, 10_000));
        s.record.started = 5_000;
        assert!(!s.kid_refresh_allowed(10_000, 10_000));
        s.record.started = 0;
        s.record.finished = 5_000;
        assert!(
            !s.kid_refresh_allowed(10_000, 10_000),
            "a slow fetch ended 5 s ago"
        );
        s.record.started = 5_000;
        s.record.finished = 0;
        assert!(s.in_flight(6_000, 2_000), "another VM started a fetch");
        assert!(!s.in_flight(7_000, 2_000), "its lease ran out");
        s.record = s.record.failure(FetchError::Timeout, 6_500);
        assert!(!s.in_flight(6_600, 2_000), "it ended");
    }
}

#[cfg(test)]
mod tests {
    //! The fetch record and the key-set state machine (the key sets
    //! themselves, with real keys, are in `tests::crypto`).
    use super::*;

    const JWKS: &[u8] = br#"{"keys": [{"kty": "OKP", "crv": "Ed25519", "kid": "ed-1",
        "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}]}"#;

    /// The state after this VM fetched `body` at `now`.
    fn fetch(s: &mut JwksState, body: &[u8], now: u64) {
        let started = s.record.start(now);
        s.apply(started, None);
        let record = s.fetched(body.to_vec(), now);
        s.apply(record, None);
    }

    #[test]
    fn a_fetched_set_without_usable_keys_replaces_the_old_one() {
        for empty in [
            &br#"{"keys": []}"#[..],
            br#"{"keys": [{"kty": "oct", "k": "AA"}]}"#,
        ] {
            let mut s = JwksState::default();
            fetch(&mut s, JWKS, 1_000);
            let generation = s.generation;
            assert!(s.usable_keys(1_000, 60_000).unwrap().has_kid("ed-1"));
            fetch(&mut s, empty, 2_000);
            assert_eq!(s.record.error, None, "a successful fetch");
            assert_eq!((s.record.fetched, &s.record.body[..]), (2_000, empty));
            let keys = s.usable_keys(2_000, 60_000).expect("a key set, empty");
            assert!(keys.keys.is_empty() && !keys.has_kid("ed-1"));
            assert_ne!(s.generation, generation, "the token cache empties");
            // Not fetched again before cache_ttl (it is not "no keys yet").
            assert!(!s.fetch_due(2_000 + 59_999, 60_000));
            // An unknown kid still waits for the cooldown.
            assert!(!s.kid_refresh_allowed(2_000 + 9_999, 10_000));
            assert!(s.kid_refresh_allowed(2_000 + 10_000, 10_000));
            // Another VM takes the same record in: the same empty set.
            let mut other = JwksState::default();
            fetch(&mut other, JWKS, 1_000);
            assert!(other.apply(s.record.clone(), Some(3)));
            assert!(other.usable_keys(2_000, 60_000).unwrap().keys.is_empty());
        }
    }

    #[test]
    fn a_fetched_set_that_is_no_jwks_keeps_the_old_keys() {
        for garbage in [
            &b"not json"[..],
            b"[]",
            br#"{"keys": {}}"#,
            br#"{"kty": "OKP"}"#,
        ] {
            let mut s = JwksState::default();
            fetch(&mut s, JWKS, 1_000);
            let generation = s.generation;
            fetch(&mut s, garbage, 2_000);
            assert_eq!(s.record.error, Some(FetchError::Unavailable));
            assert_eq!((s.record.fetched, &s.record.body[..]), (1_000, JWKS));
            assert!(s.usable_keys(2_000, 60_000).unwrap().has_kid("ed-1"));
            assert_eq!(s.generation, generation);
        }
    }

    #[test]
    fn records_survive_shared_data() {
        let mut r = FetchRecord::default().start(5).success(JWKS.to_vec(), 7);
        for error in [
            None,
            Some(FetchError::Unavailable),
            Some(FetchError::Timeout),
        ] {
            r.error = error;
            r.failures = 3;
            r.retry_at = 9;
            assert_eq!(FetchRecord::decode(&r.encode()), Some(r.clone()));
        }
        for bad in [
            &b""[..],
            b"v1 1 2 3 4 5 ok",
            b"v2 1 2 3 4 5 ok\n",
            b"v1 1 2 3 4 5 maybe\n",
            b"v1 1 2 3 4 5 ok extra\n",
            b"v1 1 2 3 4 ok\n",
            b"v1 -1 2 3 4 5 ok\n",
        ] {
            assert_eq!(
                FetchRecord::decode(bad),
                None,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn a_fetch_starts_succeeds_or_backs_off() {
        let started = FetchRecord::default().start(1_000);
        assert_eq!((started.started, started.finished), (1_000, 0));
        let ok = started.success(JWKS.to_vec(), 1_200);
        assert_eq!((ok.started, ok.finished, ok.fetched), (1_000, 1_200, 1_200));
        // Failures keep the last good document, back off 0.5 s doubling to 10 s.
        let mut r = ok.clone();
        let mut waits = Vec::new();
        for i in 0..8 {
            let now = 2_000 + i * 100;
            r = r.start(now).failure(FetchError::Timeout, now);
            waits.push(r.retry_at - now);
            assert_eq!((r.fetched, &r.body[..]), (1_200, JWKS));
        }
        assert_eq!(
            waits,
            [500, 1_000, 2_000, 4_000, 8_000, 10_000, 10_000, 10_000]
        );
        assert_eq!(r.failures, 8);
        assert_eq!(r.error, Some(FetchError::Timeout));
        assert_eq!(r.success(JWKS.to_vec(), 9_000).failures, 0);
    }

    #[test]
    fn when_a_fetch_is_due() {
        let ttl = 60_000;
        let mut s = JwksState::default();
        assert!(s.fetch_due(0, ttl), "no keys yet");
        s.in_flight_since = Some(0);
        assert!(!s.fetch_due(0, ttl), "one at a time");
        s.in_flight_since = None;
        assert!(s.apply(
            FetchRecord::default()
                .start(0)
                .success(JWKS.to_vec(), 1_000),
            Some(7)
        ));
        assert_eq!(s.record_cas(), Some(7));
        assert!(!s.fetch_due(1_000 + ttl - 1, ttl));
        assert!(s.fetch_due(1_000 + ttl, ttl), "cache_ttl reached");
        s.want(1_500);
        assert!(s.fetch_due(1_500, ttl), "asked for (unknown kid)");
        // Backoff holds even an asked-for fetch.
        s.record.retry_at = 2_000;
        assert!(!s.fetch_due(1_999, ttl));
        assert!(s.fetch_due(2_000, ttl));
        // The same document again changes nothing.
        assert!(!s.apply(
            FetchRecord::default()
                .start(0)
                .success(JWKS.to_vec(), 3_000),
            None
        ));
        assert_eq!(s.record_cas(), None);
    }

    #[test]
    fn keys_are_usable_up_to_max_age_in_flight_up_to_the_lease() {
        let mut s = JwksState::default();
        assert!(s.usable_keys(0, 1_000).is_none());
        s.apply(
            FetchRecord::default()
                .start(0)
                .success(JWKS.to_vec(), 5_000),
            None,
        );
        assert!(s.usable_keys(6_000, 1_000).is_some());
        assert!(s.usable_keys(6_001, 1_000).is_none());
        // Another VM's fetch counts as under way until its lease ends.
        s.apply(s.record.start(10_000), None);
        assert!(s.in_flight(10_000 + 1_999, 2_000));
        assert!(!s.in_flight(10_000 + 2_000, 2_000));
        // An unknown kid refreshes once the last fetch is cooldown old.
        s.apply(s.record.success(JWKS.to_vec(), 11_000), None);
        assert!(!s.kid_refresh_allowed(11_000 + 9_999, 10_000));
        assert!(s.kid_refresh_allowed(11_000 + 10_000, 10_000));
    }
}
