//! The rate-limit service protocol (`envoy.service.ratelimit.v3`): the
//! messages tollgate sends and reads, and what an answer means. Fields and
//! tags follow `envoy/service/ratelimit/v3/rls.proto`,
//! `envoy/extensions/common/ratelimit/v3/ratelimit.proto` and
//! `envoy/config/core/v3/grpc_service.proto` (only the fields used).

use prost::Message;

/// The gRPC service and method called.
pub const SERVICE: &str = "envoy.service.ratelimit.v3.RateLimitService";
pub const METHOD: &str = "ShouldRateLimit";
/// The descriptor keys tollgate sends: one entry per request, the client.
pub const PRINCIPAL_KEY: &str = "tollgate_principal";
pub const ANONYMOUS_KEY: &str = "tollgate_anonymous";
/// The descriptor keys of token budgets (`quota.tokens`): tokens as hits.
pub const TOKENS_PRINCIPAL_KEY: &str = "tollgate_tokens_principal";
pub const TOKENS_ANONYMOUS_KEY: &str = "tollgate_tokens_anonymous";

#[derive(Clone, PartialEq, Message)]
pub struct RateLimitRequest {
    #[prost(string, tag = "1")]
    pub domain: String,
    #[prost(message, repeated, tag = "2")]
    pub descriptors: Vec<RateLimitDescriptor>,
    #[prost(uint32, tag = "3")]
    pub hits_addend: u32,
}

#[derive(Clone, PartialEq, Message)]
pub struct RateLimitDescriptor {
    #[prost(message, repeated, tag = "1")]
    pub entries: Vec<Entry>,
    #[prost(message, optional, tag = "2")]
    pub limit: Option<RateLimitOverride>,
    /// This descriptor's own hits (`google.protobuf.UInt64Value`; 0
    /// allowed: a check without counting), instead of the request's.
    #[prost(message, optional, tag = "3")]
    pub hits_addend: Option<UInt64Value>,
}

#[derive(Clone, PartialEq, Message)]
pub struct UInt64Value {
    #[prost(uint64, tag = "1")]
    pub value: u64,
}

#[derive(Clone, PartialEq, Message)]
pub struct Entry {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct RateLimitOverride {
    #[prost(uint32, tag = "1")]
    pub requests_per_unit: u32,
    /// `RateLimitUnit`: 1 second, 2 minute, 3 hour, 4 day.
    #[prost(int32, tag = "2")]
    pub unit: i32,
}

#[derive(Clone, PartialEq, Message)]
pub struct RateLimitResponse {
    /// `Code`: 0 unknown, 1 OK, 2 OVER_LIMIT.
    #[prost(int32, tag = "1")]
    pub overall_code: i32,
    #[prost(message, repeated, tag = "2")]
    pub statuses: Vec<DescriptorStatus>,
}

#[derive(Clone, PartialEq, Message)]
pub struct DescriptorStatus {
    #[prost(int32, tag = "1")]
    pub code: i32,
    #[prost(message, optional, tag = "2")]
    pub current_limit: Option<RateLimit>,
    #[prost(uint32, tag = "3")]
    pub limit_remaining: u32,
    #[prost(message, optional, tag = "4")]
    pub duration_until_reset: Option<Duration>,
}

#[derive(Clone, PartialEq, Message)]
pub struct RateLimit {
    #[prost(uint32, tag = "1")]
    pub requests_per_unit: u32,
    #[prost(int32, tag = "2")]
    pub unit: i32,
}

#[derive(Clone, PartialEq, Message)]
pub struct Duration {
    #[prost(int64, tag = "1")]
    pub seconds: i64,
    #[prost(int32, tag = "2")]
    pub nanos: i32,
}

/// `envoy.config.core.v3.GrpcService` with `envoy_grpc.cluster_name`: what
/// `proxy_grpc_call` takes to name the service's cluster.
#[derive(Clone, PartialEq, Message)]
pub struct GrpcService {
    #[prost(message, optional, tag = "1")]
    pub envoy_grpc: Option<EnvoyGrpc>,
}

#[derive(Clone, PartialEq, Message)]
pub struct EnvoyGrpc {
    #[prost(string, tag = "1")]
    pub cluster_name: String,
}

/// The serialized `GrpcService` for a cluster (ASCII for ASCII names shorter
/// than 128 bytes, as the SDK passes it as text).
pub fn grpc_service(cluster: &str) -> Vec<u8> {
    GrpcService {
        envoy_grpc: Some(EnvoyGrpc {
            cluster_name: cluster.to_string(),
        }),
    }
    .encode_to_vec()
}

/// `RateLimitUnit` of a quota period, in seconds.
pub fn unit_of(period_seconds: u64) -> i32 {
    match period_seconds {
        1 => 1,
        60 => 2,
        3600 => 3,
        _ => 4,
    }
}

/// One request to count: the client's descriptor entry and its limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hit<'a> {
    pub key: &'a str,
    pub value: &'a str,
    pub limit: u64,
    /// The window, seconds (its `RateLimitUnit`, see [`unit_of`]).
    pub period: u64,
    /// Hits to add (`None`: the request's, 1).
    pub hits: Option<u64>,
}

/// The request for a batch of counted requests: one descriptor per request,
/// in order, each with the client's entry and the limit from tollgate's
/// configuration (a `limit` override), one hit each. envoyproxy/ratelimit
/// adds each descriptor's hit with its own `INCRBY` and answers each from
/// its own count, so two requests of one client in a batch are counted as
/// two requests one after the other.
pub fn request(domain: &str, hits: &[Hit<'_>]) -> Vec<u8> {
    RateLimitRequest {
        domain: domain.to_string(),
        descriptors: hits
            .iter()
            .map(|h| RateLimitDescriptor {
                entries: vec![Entry {
                    key: h.key.to_string(),
                    value: h.value.to_string(),
                }],
                limit: Some(RateLimitOverride {
                    requests_per_unit: u32::try_from(h.limit).unwrap_or(u32::MAX),
                    unit: unit_of(h.period),
                }),
                hits_addend: h.hits.map(|value| UInt64Value { value }),
            })
            .collect(),
        hits_addend: 1,
    }
    .encode_to_vec()
}

/// What an answer says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub over_limit: bool,
    /// `limit_remaining`, when the service sent a status with a limit.
    pub remaining: Option<u64>,
    /// `duration_until_reset` in whole seconds (rounded up), when sent.
    pub reset: Option<u64>,
}

/// Why an answer is not one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadAnswer {
    /// Not a `RateLimitResponse`.
    Undecodable,
    /// A code (overall or a status's) neither OK nor OVER_LIMIT.
    UnknownCode(i32),
    /// Not exactly one status per descriptor sent.
    Statuses(usize),
    /// `overall_code` disagrees with the statuses.
    Inconsistent,
    /// A status without a limit: the service did not apply the one sent
    /// (envoyproxy/ratelimit ignores overrides for a domain it has no
    /// configuration for, and would let everything pass).
    LimitIgnored,
}

/// Reads an answer to a [`request`] of `descriptors` descriptors: one
/// verdict per descriptor, in order. Anything but a clear OK or OVER_LIMIT
/// for every one of them is a bad answer (never an allow).
pub fn read(answer: &[u8], descriptors: usize) -> Result<Vec<Verdict>, BadAnswer> {
    let r = RateLimitResponse::decode(answer).map_err(|_| BadAnswer::Undecodable)?;
    let over_limit = code(r.overall_code)?;
    // envoyproxy/ratelimit sends one status per descriptor; for a single
    // descriptor, an empty list (Limitador) carries no numbers but decides.
    if r.statuses.is_empty() && descriptors == 1 {
        return Ok(vec![Verdict {
            over_limit,
            remaining: None,
            reset: None,
        }]);
    }
    if r.statuses.len() != descriptors {
        return Err(BadAnswer::Statuses(r.statuses.len()));
    }
    let verdicts = r
        .statuses
        .iter()
        .map(|s| {
            if s.current_limit.is_none() {
                return Err(BadAnswer::LimitIgnored);
            }
            Ok(Verdict {
                over_limit: code(s.code)?,
                remaining: Some(u64::from(s.limit_remaining)),
                reset: s.duration_until_reset.as_ref().map(|d| {
                    let whole = u64::try_from(d.seconds).unwrap_or(0);
                    whole.saturating_add(u64::from(d.nanos > 0))
                }),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    // OVER_LIMIT overall exactly when a descriptor is over its limit.
    if verdicts.iter().any(|v| v.over_limit) != over_limit {
        return Err(BadAnswer::Inconsistent);
    }
    Ok(verdicts)
}

/// `Code`: OK (false) or OVER_LIMIT (true).
fn code(c: i32) -> Result<bool, BadAnswer> {
    match c {
        1 => Ok(false),
        2 => Ok(true),
        other => Err(BadAnswer::UnknownCode(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_is_the_protos_wire_format() {
        let alice = Hit {
            key: PRINCIPAL_KEY,
            value: "alice",
            limit: 50,
            period: 86400,
            hits: None,
        };
        let bytes = request("tollgate", &[alice]);
        let back = RateLimitRequest::decode(bytes.as_slice()).unwrap();
        assert_eq!(back.domain, "tollgate");
        assert_eq!(back.hits_addend, 1);
        let d = &back.descriptors[0];
        assert_eq!(d.entries[0].key, "tollgate_principal");
        assert_eq!(d.entries[0].value, "alice");
        assert_eq!(
            d.limit,
            Some(RateLimitOverride {
                requests_per_unit: 50,
                unit: 4
            })
        );
        // Hand-checked prefix: field 1 (domain), length 8, "tollgate".
        assert_eq!(&bytes[..10], b"\x0a\x08tollgate");
        assert_eq!(
            grpc_service("ratelimit"),
            b"\x0a\x0b\x0a\x09ratelimit".to_vec()
        );
        assert_eq!((unit_of(1), unit_of(60), unit_of(3600)), (1, 2, 3));
    }

    fn answer(code: i32, statuses: Vec<DescriptorStatus>) -> Vec<u8> {
        RateLimitResponse {
            overall_code: code,
            statuses,
        }
        .encode_to_vec()
    }

    fn status(code: i32, remaining: u32, reset: (i64, i32)) -> DescriptorStatus {
        DescriptorStatus {
            code,
            current_limit: Some(RateLimit {
                requests_per_unit: 5,
                unit: 4,
            }),
            limit_remaining: remaining,
            duration_until_reset: Some(Duration {
                seconds: reset.0,
                nanos: reset.1,
            }),
        }
    }

    #[test]
    fn answers_are_read_strictly() {
        assert_eq!(
            read(&answer(1, vec![status(1, 3, (59, 500))]), 1),
            Ok(vec![Verdict {
                over_limit: false,
                remaining: Some(3),
                reset: Some(60)
            }])
        );
        assert_eq!(
            read(&answer(2, vec![status(2, 0, (7, 0))]), 1),
            Ok(vec![Verdict {
                over_limit: true,
                remaining: Some(0),
                reset: Some(7)
            }])
        );
        // No status (Limitador): decides, without numbers.
        assert_eq!(
            read(&answer(1, vec![]), 1),
            Ok(vec![Verdict {
                over_limit: false,
                remaining: None,
                reset: None
            }])
        );
        // Never an allow by accident.
        assert_eq!(read(&answer(0, vec![]), 1), Err(BadAnswer::UnknownCode(0)));
        assert_eq!(read(&answer(7, vec![]), 1), Err(BadAnswer::UnknownCode(7)));
        let two = vec![status(1, 1, (1, 0)), status(1, 1, (1, 0))];
        assert_eq!(read(&answer(1, two), 1), Err(BadAnswer::Statuses(2)));
        assert_eq!(read(b"\xff\xff\xff", 1), Err(BadAnswer::Undecodable));
        // Empty bytes decode as code 0: unknown.
        assert_eq!(read(b"", 1), Err(BadAnswer::UnknownCode(0)));
        // A status without a limit: the override was not applied.
        let mut ignored = status(1, 0, (0, 0));
        ignored.current_limit = None;
        assert_eq!(
            read(&answer(1, vec![ignored]), 1),
            Err(BadAnswer::LimitIgnored)
        );
        // A negative reset is no reset.
        let v = read(&answer(1, vec![status(1, 1, (-5, 0))]), 1).unwrap();
        assert_eq!(v[0].reset, Some(0));
    }

    #[test]
    fn a_batch_is_one_descriptor_per_request_and_one_verdict_each() {
        let hits = [
            Hit {
                key: PRINCIPAL_KEY,
                value: "alice",
                limit: 2,
                period: 60,
                hits: None,
            },
            Hit {
                key: ANONYMOUS_KEY,
                value: "10.0.0.0/24",
                limit: 7,
                period: 60,
                hits: None,
            },
            Hit {
                key: PRINCIPAL_KEY,
                value: "alice",
                limit: 2,
                period: 60,
                hits: None,
            },
        ];
        let back = RateLimitRequest::decode(request("d", &hits).as_slice()).unwrap();
        let sent: Vec<_> = back
            .descriptors
            .iter()
            .map(|d| {
                let l = d.limit.as_ref().unwrap();
                (d.entries[0].value.as_str(), l.requests_per_unit, l.unit)
            })
            .collect();
        assert_eq!(
            sent,
            [("alice", 2, 2), ("10.0.0.0/24", 7, 2), ("alice", 2, 2)]
        );
        let three = vec![
            status(1, 1, (9, 0)),
            status(1, 6, (9, 0)),
            status(2, 0, (9, 0)),
        ];
        let v = read(&answer(2, three.clone()), 3).unwrap();
        assert_eq!(
            v.iter()
                .map(|v| (v.over_limit, v.remaining))
                .collect::<Vec<_>>(),
            [(false, Some(1)), (false, Some(6)), (true, Some(0))]
        );
        // Overall OK although a descriptor is over, or the reverse.
        assert_eq!(read(&answer(1, three), 3), Err(BadAnswer::Inconsistent));
        let ok = vec![status(1, 1, (9, 0)), status(1, 1, (9, 0))];
        assert_eq!(
            read(&answer(2, ok.clone()), 2),
            Err(BadAnswer::Inconsistent)
        );
        // Too few or too many statuses, none at all, or a status code unknown.
        assert_eq!(read(&answer(1, ok.clone()), 3), Err(BadAnswer::Statuses(2)));
        assert_eq!(read(&answer(1, ok.clone()), 1), Err(BadAnswer::Statuses(2)));
        assert_eq!(read(&answer(1, vec![]), 2), Err(BadAnswer::Statuses(0)));
        let odd = vec![status(1, 1, (9, 0)), status(0, 1, (9, 0))];
        assert_eq!(read(&answer(1, odd), 2), Err(BadAnswer::UnknownCode(0)));
        assert_eq!(read(&answer(1, ok), 2).map(|v| v.len()), Ok(2));
    }
}
