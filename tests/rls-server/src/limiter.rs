//! envoyproxy/ratelimit's fixed-window answer, as pure functions; Redis does the counting
//! (main.rs runs the INCRBY/EXPIRE pipeline between [`cache_key`] and [`status`]).

use crate::config::Limit;
use crate::proto::{
    DescriptorStatus, Duration, Entry, RateLimit, RateLimitRequest, CODE_OK, CODE_OVER_LIMIT,
};

/// Hits to add per descriptor (src/utils/utilities.go GetHitsAddends): the descriptor's own
/// `hits_addend` when set (0 allowed: check without counting), else the request's, 0 meaning 1.
pub fn hits_addends(request: &RateLimitRequest) -> Vec<u64> {
    request
        .descriptors
        .iter()
        .map(|d| match &d.hits_addend {
            Some(h) => h.value,
            None => u64::from(request.hits_addend.max(1)),
        })
        .collect()
}

/// The Redis key (src/limiter/cache_key.go GenerateCacheKey):
/// `prefix + domain + "_" + (key + "_" + value + "_")* + window start`.
pub fn cache_key(prefix: &str, domain: &str, entries: &[Entry], limit: &Limit, now: i64) -> String {
    let mut k = String::with_capacity(64);
    k.push_str(prefix);
    k.push_str(domain);
    k.push('_');
    for e in entries {
        k.push_str(&e.key);
        k.push('_');
        k.push_str(&e.value);
        k.push('_');
    }
    let divider = limit.unit.divider();
    k.push_str(&((now / divider) * divider).to_string());
    k
}

/// Seconds to the end of the window (src/utils/utilities.go CalculateReset).
pub fn reset(limit: &Limit, now: i64) -> Duration {
    let sec = limit.unit.divider();
    Duration {
        seconds: sec - now.rem_euclid(sec),
        nanos: 0,
    }
}

/// The status of a limited descriptor whose counter is `after` once this request's hits are
/// added (src/limiter/base_limiter.go GetResponseDescriptorStatus, local cache off).
pub fn status(limit: &Limit, after: u64, now: i64) -> DescriptorStatus {
    let threshold = u64::from(limit.requests_per_unit);
    let (code, remaining) = if after > threshold {
        (CODE_OVER_LIMIT, 0)
    } else {
        // after <= threshold <= u32::MAX
        (
            CODE_OK,
            u32::try_from(threshold - after).unwrap_or(u32::MAX),
        )
    };
    DescriptorStatus {
        code,
        current_limit: Some(RateLimit {
            name: limit.name.clone(),
            requests_per_unit: limit.requests_per_unit,
            unit: limit.unit as i32,
        }),
        limit_remaining: remaining,
        duration_until_reset: Some(reset(limit, now)),
    }
}

/// A descriptor no rule matches: OK, no limit, limit_remaining 0.
pub fn no_limit() -> DescriptorStatus {
    DescriptorStatus {
        code: CODE_OK,
        current_limit: None,
        limit_remaining: 0,
        duration_until_reset: None,
    }
}

/// An `unlimited` rule (src/service/ratelimit.go shouldRateLimitWorker): OK, u32::MAX remaining.
pub fn unlimited() -> DescriptorStatus {
    DescriptorStatus {
        limit_remaining: u32::MAX,
        ..no_limit()
    }
}

/// OVER_LIMIT if any descriptor is over its limit (quota mode and shadow mode not supported).
pub fn overall(statuses: &[DescriptorStatus]) -> i32 {
    if statuses.iter().any(|s| s.code == CODE_OVER_LIMIT) {
        CODE_OVER_LIMIT
    } else {
        CODE_OK
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{RateLimitDescriptor, UInt64Value, Unit};

    fn limit(n: u32, unit: Unit) -> Limit {
        Limit {
            requests_per_unit: n,
            unit,
            name: String::new(),
        }
    }

    #[test]
    fn key_is_envoyproxy_ratelimits() {
        let entries = [
            Entry {
                key: "client".into(),
                value: "alice".into(),
            },
            Entry {
                key: "route".into(),
                value: "/a".into(),
            },
        ];
        assert_eq!(
            cache_key(
                "",
                "tollgate",
                &entries,
                &limit(5, Unit::Minute),
                1_000_000_007
            ),
            "tollgate_client_alice_route_/a_999999960"
        );
        assert_eq!(
            cache_key("p:", "d", &entries[..1], &limit(5, Unit::Second), 42),
            "p:d_client_alice_42"
        );
    }

    #[test]
    fn status_ok_until_the_limit_then_over() {
        let l = limit(3, Unit::Hour);
        let now = 3600 * 10 + 100;
        let s = status(&l, 3, now);
        assert_eq!((s.code, s.limit_remaining), (CODE_OK, 0));
        assert_eq!(s.duration_until_reset.map(|d| d.seconds), Some(3500));
        let s = status(&l, 4, now);
        assert_eq!((s.code, s.limit_remaining), (CODE_OVER_LIMIT, 0));
        assert_eq!(status(&l, 1, now).limit_remaining, 2);
    }

    #[test]
    fn hits_addends_default_to_one() {
        let d = |h: Option<u64>| RateLimitDescriptor {
            entries: vec![],
            limit: None,
            hits_addend: h.map(|value| UInt64Value { value }),
        };
        let mut r = RateLimitRequest {
            domain: "d".into(),
            descriptors: vec![d(None), d(Some(0)), d(Some(7))],
            hits_addend: 0,
        };
        assert_eq!(hits_addends(&r), vec![1, 0, 7]);
        r.hits_addend = 4;
        assert_eq!(hits_addends(&r), vec![4, 0, 7]);
    }
}
