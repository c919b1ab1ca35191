//! rls-server: Envoy's rate-limit service (`envoy.service.ratelimit.v3.RateLimitService`)
//! answering like envoyproxy/ratelimit with its Redis fixed-window cache, for tollgate's tests.
//! See README.md for what it matches and where it differs.

mod config;
mod limiter;
mod proto;

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tonic::{Request, Response, Status};

use config::{Config, Resolved};
use proto::rate_limit_service_server::{RateLimitService, RateLimitServiceServer};
use proto::{RateLimitRequest, RateLimitResponse, Unit};

const USAGE: &str = "usage: rls-server [--host 127.0.0.1] [--port 8081] \
[--redis-url redis://127.0.0.1:6379] [--domain tollgate | --config limits.json] \
[--redis-timeout-ms 10000] [--expiration-jitter-max-seconds 300] [--cache-key-prefix '']";

struct Args {
    host: String,
    port: u16,
    redis_url: String,
    domain: Option<String>,
    config: Option<String>,
    redis_timeout: Duration,
    jitter_max: u64,
    prefix: String,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        host: "127.0.0.1".into(),
        port: 8081,
        redis_url: "redis://127.0.0.1:6379".into(),
        domain: None,
        config: None,
        redis_timeout: Duration::from_secs(10),
        jitter_max: 300,
        prefix: String::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--help" || flag == "-h" {
            return Err(USAGE.into());
        }
        let value = it.next().ok_or(format!("{flag} needs a value\n{USAGE}"))?;
        let number = |what: &str| -> Result<u64, String> {
            value
                .parse::<u64>()
                .map_err(|_| format!("{what}: not a number: {value}"))
        };
        match flag.as_str() {
            "--host" => a.host = value.clone(),
            "--port" => {
                a.port = u16::try_from(number("--port")?).map_err(|_| "--port: too large")?
            }
            "--redis-url" => a.redis_url = value.clone(),
            "--domain" => a.domain = Some(value.clone()),
            "--config" => a.config = Some(value.clone()),
            "--redis-timeout-ms" => {
                a.redis_timeout = Duration::from_millis(number("--redis-timeout-ms")?)
            }
            "--expiration-jitter-max-seconds" => {
                a.jitter_max = number("--expiration-jitter-max-seconds")?
            }
            "--cache-key-prefix" => a.prefix = value.clone(),
            _ => return Err(format!("unknown flag {flag}\n{USAGE}")),
        }
    }
    Ok(a)
}

struct Service {
    config: Config,
    redis: ConnectionManager,
    jitter_max: u64,
    prefix: String,
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn random_below(n: u64) -> u64 {
    if n == 0 {
        return 0;
    }
    RandomState::new().build_hasher().finish() % n
}

impl Service {
    /// The limit for each descriptor (src/config/config_impl.go GetLimit): none for another
    /// domain; else the descriptor's `limit` override; else the limits file.
    fn limits(&self, request: &RateLimitRequest) -> Result<Vec<Resolved>, Status> {
        request
            .descriptors
            .iter()
            .map(|d| {
                if request.domain != self.config.domain {
                    return Ok(Resolved::NoLimit);
                }
                match &d.limit {
                    Some(o) => match Unit::from_i32(o.unit) {
                        Some(unit) => Ok(Resolved::Limited(config::Limit {
                            requests_per_unit: o.requests_per_unit,
                            unit,
                            name: String::new(),
                        })),
                        // envoyproxy/ratelimit panics here (UnitToDivider) and the process dies.
                        None => Err(Status::unknown(format!(
                            "invalid rate limit unit {} in a descriptor's limit override",
                            o.unit
                        ))),
                    },
                    None => Ok(self.config.lookup(&d.entries)),
                }
            })
            .collect()
    }
}

#[tonic::async_trait]
impl RateLimitService for Service {
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        let request = request.into_inner();
        // src/service/ratelimit.go shouldRateLimitWorker: a plain Go error, which grpc-go
        // sends as status UNKNOWN.
        if request.domain.is_empty() {
            return Err(Status::unknown("rate limit domain must not be empty"));
        }
        if request.descriptors.is_empty() {
            return Err(Status::unknown(
                "rate limit descriptor list must not be empty",
            ));
        }
        let now = unix_now();
        let limits = self.limits(&request)?;
        let hits = limiter::hits_addends(&request);

        // src/redis/fixed_cache_impl.go DoLimit: one pipeline of INCRBY key hits; EXPIRE key
        // window+jitter for every limited descriptor.
        let mut pipe = redis::pipe();
        let mut limited = 0usize;
        for ((d, limit), hits) in request.descriptors.iter().zip(&limits).zip(&hits) {
            if let Resolved::Limited(limit) = limit {
                let key = limiter::cache_key(&self.prefix, &request.domain, &d.entries, limit, now);
                let ttl = limit.unit.divider().unsigned_abs() + random_below(self.jitter_max);
                pipe.cmd("INCRBY").arg(&key).arg(*hits);
                pipe.cmd("EXPIRE").arg(&key).arg(ttl).ignore();
                limited += 1;
            }
        }
        let counts: Vec<u64> = if limited == 0 {
            Vec::new()
        } else {
            let mut conn = self.redis.clone();
            pipe.query_async(&mut conn).await.map_err(|e| {
                eprintln!("rls-server: redis error: {e}");
                Status::unknown(format!("redis error: {e}"))
            })?
        };
        if counts.len() != limited {
            return Err(Status::unknown(
                "redis answered the wrong number of replies",
            ));
        }

        let mut counts = counts.into_iter();
        let statuses: Vec<_> = limits
            .iter()
            .map(|limit| match limit {
                Resolved::NoLimit => limiter::no_limit(),
                Resolved::Unlimited => limiter::unlimited(),
                Resolved::Limited(limit) => {
                    limiter::status(limit, counts.next().unwrap_or(u64::MAX), now)
                }
            })
            .collect();
        Ok(Response::new(RateLimitResponse {
            overall_code: limiter::overall(&statuses),
            statuses,
        }))
    }
}

async fn run(args: Args) -> Result<(), String> {
    let config = match (&args.config, &args.domain) {
        (Some(_), Some(_)) => return Err("give --domain or --config, not both".into()),
        (Some(path), None) => {
            let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
            Config::parse(&text).map_err(|e| format!("{path}: {e}"))?
        }
        (None, domain) => Config::empty(domain.as_deref().unwrap_or("tollgate")),
    };
    let client =
        redis::Client::open(args.redis_url.as_str()).map_err(|e| format!("--redis-url: {e}"))?;
    let redis_config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(args.redis_timeout))
        .set_response_timeout(Some(args.redis_timeout))
        .set_number_of_retries(1);
    // Like envoyproxy/ratelimit, refuse to start without Redis.
    let redis = ConnectionManager::new_with_config(client, redis_config)
        .await
        .map_err(|e| format!("cannot connect to Redis at {}: {e}", args.redis_url))?;

    let addr: SocketAddr = format!("{}:{}", args.host, args.port)
        .parse()
        .map_err(|e| format!("--host/--port: {e}"))?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("bind {addr}: {e}"))?;
    let bound = listener.local_addr().map_err(|e| e.to_string())?;
    println!(
        "rls-server listening on {bound} (domain {}, redis {})",
        config.domain, args.redis_url
    );

    let service = Service {
        config,
        redis,
        jitter_max: args.jitter_max,
        prefix: args.prefix,
    };
    tonic::transport::Server::builder()
        .add_service(RateLimitServiceServer::new(service))
        // Go (envoyproxy/ratelimit) sets TCP_NODELAY on every connection; without it an
        // answer written in two parts waits ~40 ms for the client's delayed ACK.
        .serve_with_incoming(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
        )
        .await
        .map_err(|e| format!("serve: {e}"))
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rls-server: {e}");
            ExitCode::FAILURE
        }
    }
}
