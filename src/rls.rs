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

/// The request for one client: one descriptor with the client's entry and
/// the limit from tollgate's configuration (a `limit` override).
pub fn request(domain: &str, key: &str, value: &str, limit: u64, period_seconds: u64) -> Vec<u8> {
    RateLimitRequest {
        domain: domain.to_string(),
        descriptors: vec![RateLimitDescriptor {
            entries: vec![Entry {
                key: key.to_string(),
                value: value.to_string(),
            }],
            limit: Some(RateLimitOverride {
                requests_per_unit: u32::try_from(limit).unwrap_or(u32::MAX),
                unit: unit_of(period_seconds),
            }),
        }],
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
    /// `overall_code` neither OK nor OVER_LIMIT.
    UnknownCode(i32),
    /// Not exactly one status for the one descriptor sent.
    Statuses(usize),
    /// A status without a limit: the service did not apply the one sent
    /// (envoyproxy/ratelimit ignores overrides for a domain it has no
    /// configuration for, and would let everything pass).
    LimitIgnored,
}

/// Reads an answer to a [`request`] with one descriptor. Anything but a
/// clear OK or OVER_LIMIT is a bad answer (never an allow).
pub fn read(answer: &[u8]) -> Result<Verdict, BadAnswer> {
    let r = RateLimitResponse::decode(answer).map_err(|_| BadAnswer::Undecodable)?;
    let over_limit = match r.overall_code {
        1 => false,
        2 => true,
        code => return Err(BadAnswer::UnknownCode(code)),
    };
    // envoyproxy/ratelimit sends one status per descriptor; an empty list
    // (Limitador) carries no numbers but still decides.
    let limited = match r.statuses.as_slice() {
        [] => None,
        [s] if s.current_limit.is_none() => return Err(BadAnswer::LimitIgnored),
        [s] => Some(s),
        more => return Err(BadAnswer::Statuses(more.len())),
    };
    let remaining = limited.map(|s| u64::from(s.limit_remaining));
    let reset = limited
        .and_then(|s| s.duration_until_reset.as_ref())
        .map(|d| {
            let whole = u64::try_from(d.seconds).unwrap_or(0);
            whole.saturating_add(u64::from(d.nanos > 0))
        });
    Ok(Verdict {
        over_limit,
        remaining,
        reset,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_is_the_protos_wire_format() {
        let bytes = request("tollgate", PRINCIPAL_KEY, "alice", 50, 86400);
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
            read(&answer(1, vec![status(1, 3, (59, 500))])),
            Ok(Verdict {
                over_limit: false,
                remaining: Some(3),
                reset: Some(60)
            })
        );
        assert_eq!(
            read(&answer(2, vec![status(2, 0, (7, 0))])),
            Ok(Verdict {
                over_limit: true,
                remaining: Some(0),
                reset: Some(7)
            })
        );
        // No status (Limitador): decides, without numbers.
        assert_eq!(
            read(&answer(1, vec![])),
            Ok(Verdict {
                over_limit: false,
                remaining: None,
                reset: None
            })
        );
        // Never an allow by accident.
        assert_eq!(read(&answer(0, vec![])), Err(BadAnswer::UnknownCode(0)));
        assert_eq!(read(&answer(7, vec![])), Err(BadAnswer::UnknownCode(7)));
        let two = vec![status(1, 1, (1, 0)), status(1, 1, (1, 0))];
        assert_eq!(read(&answer(1, two)), Err(BadAnswer::Statuses(2)));
        assert_eq!(read(b"\xff\xff\xff"), Err(BadAnswer::Undecodable));
        // Empty bytes decode as code 0: unknown.
        assert_eq!(read(b""), Err(BadAnswer::UnknownCode(0)));
        // A status without a limit: the override was not applied.
        let mut ignored = status(1, 0, (0, 0));
        ignored.current_limit = None;
        assert_eq!(
            read(&answer(1, vec![ignored])),
            Err(BadAnswer::LimitIgnored)
        );
        // A negative reset is no reset.
        let v = read(&answer(1, vec![status(1, 1, (-5, 0))])).unwrap();
        assert_eq!(v.reset, Some(0));
    }
}
