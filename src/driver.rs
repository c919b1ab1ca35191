//! Every request's lifecycle, without the host: reading the request head,
//! parking requests that wait for a callout, de-duplicating provider
//! callouts, the dispatch queue, key set upkeep (refresh, lease, cooldown),
//! holding bodies until the decision, and every limit on all of that.
//!
//! The driver takes events with the time passed in (`on_request_headers`,
//! `on_callout_reply`, `on_tick`, `on_log`, …) and queues [`Effect`]s for the
//! glue (`filter`) to perform, polled with [`Driver::poll`]. It calls the
//! host only through [`SharedStore`] (shared data).
//!
//! Callouts are sent by the root context only (on a tick), so a fetch never
//! dies with the request that asked for it: a request that needs keys or a
//! provider's answer is parked, a tick is asked for in 1 ms, and the request
//! is resumed (by context id) when the callout ends.
//!
//! Nothing reaches the upstream undecided: until its decision allows it, a
//! request's body and trailers are held ([`RequestHandle::may_continue`]),
//! whether Envoy calls the body callbacks while headers are paused
//! (`allow_on_headers_stop_iteration`) or not.

use crate::auth::{
    self, Answered, AuthResult, Core, Counting, RequestFacts, Step, LEASE_MARGIN_MS,
};
use crate::claims::Identity;
use crate::config::{Auth, CalloutProvider, Config, CredentialPlace, JwtConfig};
use crate::jwks_cache::{self, FetchError, SharedKeys};
use crate::path::normalize_path;
use crate::provider::{github, Answer, Method};
use crate::quota::RateLimit;
use crate::response::{is_grpc, Denial};
use crate::store::SharedStore;
use crate::token_cache::CacheKey;
use crate::token_quota::{ietf_fields, openai_headers, Policy, TokenGrant};
use crate::usage::{UsageReader, DEFAULT_MAX_BYTES};
use std::cell::Cell;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::rc::Rc;

/// Largest callout answer read (bytes); larger answers count as a failure.
pub const MAX_CALLOUT_BODY: usize = 1024 * 1024;
/// Most requests parked per VM while keys are fetched; more get 503.
pub const MAX_WAITERS: usize = 4096;
/// Most requests parked per VM on provider callouts (all callouts together);
/// more get 503.
pub const MAX_CALLOUT_WAITERS: usize = 4096;
/// Largest request body read for the output maximum that sizes a token
/// reservation (bytes); a longer body reserves `reserve_tokens`.
pub const MAX_SCANNED_BODY: usize = 256 * 1024;
/// Most requests per VM waiting for the rate-limit service; more get 503.
pub const MAX_COUNT_WAITERS: usize = 4096;
/// Calls to the rate-limit service under way at once per VM when they are
/// batched (`quota.backend.max_batch` above 1): the requests counted while
/// one is under way go together in the next.
pub const MAX_BATCHED_CALLS: usize = 1;
/// Most distinct provider callouts (introspection, custom) queued or under way
/// per VM; requests needing another one get 503 until one ends.
pub const MAX_PROVIDER_CALLOUTS: usize = 256;
/// Most parked requests answered or resumed in one host callback; the rest
/// wait for the next tick. Envoy 1.40 runs a local answer's response
/// callbacks inside the call that sends it, and V8 ran out of stack
/// ("Maximum call stack size exceeded", a trap) after ~300 local answers
/// sent from one `on_http_call_response`.
pub const RESUME_BATCH: usize = 64;
/// A callout that got no answer (or Envoy's own 504) within this much of its
/// timeout timed out (Envoy's timer and ours differ by a few ms).
pub const TIMEOUT_SLACK_MS: u64 = 50;
/// Tick periods, milliseconds: idle, soon (work to do), and while requests
/// wait for another VM's fetch (look for its result this often).
pub const IDLE_TICK_MS: u32 = 1000;
pub const SOON_TICK_MS: u32 = 1;
pub const POLL_TICK_MS: u32 = 20;

/// Where a request stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Its headers have not been decided yet (or are being decided).
    Undecided,
    /// Parked until a callout ends.
    Waiting,
    /// Allowed: with these `RateLimit-*` values for its response.
    Allowed(Option<RateLimit>),
    /// Answered locally.
    Answered,
}

/// A request as both its HTTP context and the driver see it: its context id
/// and its phase (shared, so a parked request's context sees it resumed).
#[derive(Debug, Clone)]
pub struct RequestHandle {
    id: u32,
    phase: Rc<Cell<Phase>>,
}

impl RequestHandle {
    pub fn new(id: u32) -> RequestHandle {
        RequestHandle {
            id,
            phase: Rc::new(Cell::new(Phase::Undecided)),
        }
    }

    pub fn id(&self) -> u32 {
        self.id
    }

    pub fn phase(&self) -> Phase {
        self.phase.get()
    }

    /// Whether the request's body and trailers may go on: only once it is
    /// allowed (until then, and after a local answer, they are held).
    pub fn may_continue(&self) -> bool {
        matches!(self.phase.get(), Phase::Allowed(_))
    }

    fn set(&self, phase: Phase) {
        self.phase.set(phase);
    }
}

/// A request's headers, as the glue reads them (names lower case).
pub trait RequestHead {
    /// The first value of a header.
    fn get(&self, name: &str) -> Option<&[u8]>;
    /// Every header, in order.
    fn pairs(&self) -> impl Iterator<Item = (&[u8], &[u8])>;
}

/// How a denial is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnswerAs {
    /// The JSON error body.
    Http,
    /// A gRPC status and plain message (Envoy makes it a trailers-only answer).
    Grpc { quota_unavailable: bool },
}

/// A callout to send. Header values are redacted in `Debug` (they carry
/// credentials).
#[derive(Clone, PartialEq, Eq)]
pub struct Dispatch {
    /// Report the host's token for it with [`Driver::dispatched`].
    pub id: u64,
    pub cluster: String,
    pub headers: Vec<(String, String)>,
    pub body: Option<Vec<u8>>,
    pub timeout_ms: u64,
}

impl fmt::Debug for Dispatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.headers.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("Dispatch")
            .field("id", &self.id)
            .field("cluster", &self.cluster)
            .field("headers", &names)
            .field("body_len", &self.body.as_ref().map(Vec::len))
            .field("timeout_ms", &self.timeout_ms)
            .finish()
    }
}

/// A unary gRPC call to the rate-limit service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrpcDispatch {
    pub id: u64,
    /// A serialized `GrpcService` naming the cluster.
    pub service: Vec<u8>,
    pub message: Vec<u8>,
    pub timeout_ms: u64,
}

/// What a metric should count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    Allowed(u64),
    Denied(&'static str),
    Callout {
        provider: &'static str,
        outcome: &'static str,
    },
    JwksFetch {
        failed: bool,
    },
    Cache {
        cache: &'static str,
        hits: u64,
        misses: u64,
    },
    JwksAgeSeconds(u64),
    /// A request counted locally because the rate-limit service failed.
    QuotaFallback,
    /// Tokens charged for an answer on counted path number `path`;
    /// `usage`: what it reported, if anything.
    Tokens {
        charged: u64,
        path: usize,
        usage: Option<crate::usage::Usage>,
    },
}

/// What the glue must do.
#[derive(Debug)]
pub enum Effect {
    /// Let the request go on with its identity: set the identity headers
    /// (removed when `identity` is `None`), remove `spoofed`, and, when
    /// `resume`, resume it (it was parked). If any header write fails, call
    /// [`Driver::forward_failed`] instead of resuming.
    Allow {
        req: RequestHandle,
        identity: Option<Rc<Identity>>,
        spoofed: Vec<String>,
        /// With an identity and `strip_authorization`: headers to set
        /// (`None`: remove) that take a cookie or query credential out
        /// (`cookie`, `:path`).
        rewrite: Vec<(String, Option<Vec<u8>>)>,
        grpc: bool,
        resume: bool,
    },
    /// Answer the request locally.
    Deny {
        id: u32,
        denial: Denial,
        answer_as: AnswerAs,
    },
    /// Send a callout, then report its token with [`Driver::dispatched`].
    Dispatch(Dispatch),
    /// Send a gRPC call to the rate-limit service from the current
    /// callback, then report its token with [`Driver::dispatched_grpc`].
    DispatchGrpc(GrpcDispatch),
    /// Call `on_tick` every this many milliseconds.
    SetTick(u32),
    /// Set up waking (once, from the root context; see [`Effect::Wake`]);
    /// when that fails, call [`Driver::wake_unavailable`].
    OpenWake,
    /// Call [`Driver::on_wake`] soon from the root context (a callback of
    /// this VM's own, not a request's: calls sent there outlive every
    /// request); when that fails, call [`Driver::wake_unavailable`].
    Wake,
    Count(Metric),
}

/// A callout's answer as the glue read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CalloutReply {
    /// `:status`; `None` when there was no answer (no header map at all, as
    /// for an answer cut off after its headers).
    pub status: Option<u16>,
    pub body: ReplyBody,
    /// The answer says the caller is rate limited: 429, or 403 with
    /// `retry-after` or `x-ratelimit-remaining: 0`.
    pub throttled: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyBody {
    Read(Vec<u8>),
    /// Over [`MAX_CALLOUT_BODY`]: not read.
    TooLarge(usize),
}

/// A callout's answer as the driver classifies it.
enum Reply {
    Response {
        status: u16,
        body: Vec<u8>,
        throttled: bool,
    },
    TooLarge,
    NoAnswer,
    TimedOut,
}

/// How a parked request goes on once its wait ended.
enum Resume {
    /// Keys arrived: decide it again.
    Decide,
    /// Its provider callout answered.
    Finish(AuthResult),
    /// It waited too long: refuse it.
    Refuse(Denial),
}

/// A request parked until a callout ends.
struct Parked {
    req: RequestHandle,
    facts: RequestFacts,
    /// Client headers that spell an identity header another way.
    spoofed: Vec<String>,
    /// See [`Effect::Allow`].
    rewrite: Vec<(String, Option<Vec<u8>>)>,
    /// A gRPC call: denials are answered with gRPC statuses.
    grpc: bool,
    /// When its headers arrived (ms).
    arrived: u64,
}

/// A request's token reservation while its answer passes.
struct Meter {
    grant: TokenGrant,
    /// Reads the answer's usage, once its content type is known.
    reader: Option<UsageReader>,
}

/// A counted request's body, read as it passes for the most output tokens
/// it allows (at most [`MAX_SCANNED_BODY`]; a longer body keeps the default
/// reservation).
#[derive(Default)]
struct BodyScan {
    buf: Vec<u8>,
    too_large: bool,
    /// Once the body ended: its output maximum, if it names one.
    ended: Option<Option<u64>>,
}

/// A request waiting for the rate-limit service.
struct Counted {
    parked: Parked,
    counting: Counting,
    /// When it started waiting (ms).
    since: u64,
    /// Its descriptor's place in its call.
    slot: usize,
}

/// A call to the rate-limit service: how many descriptors it sent, and the
/// requests still waiting for it.
struct CountCall {
    descriptors: usize,
    waiting: Vec<Counted>,
}

/// What a sent callout is for.
#[derive(Debug, Clone)]
enum Pending {
    Jwks {
        /// The key set's index (its JWT provider's, [`Auth::jwts`]).
        set: usize,
        started_ms: u64,
    },
    Provider {
        key: CacheKey,
        started_ms: u64,
        timeout_ms: u64,
        /// What the exchange read before this call (`github_token`).
        progress: Option<Box<github::Progress>>,
    },
}

/// One VM's requests and callouts.
pub struct Driver {
    core: Core,
    /// Where each key set is shared with the other VMs.
    shared_keys: Vec<SharedKeys>,
    /// Requests parked for keys, to decide again.
    waiters: Vec<Parked>,
    /// Requests parked on a provider callout, by decision cache key.
    callout_waiters: HashMap<CacheKey, Vec<Parked>>,
    /// How many requests wait on provider callouts in all (in
    /// `callout_waiters`, or in `ready` with a provider's answer).
    callout_waiting: usize,
    /// Parked requests whose wait ended, carried on a batch at a time (see
    /// [`RESUME_BATCH`]).
    ready: VecDeque<(Parked, Resume)>,
    /// Provider callouts to send on the next tick.
    queued: Vec<auth::Callout>,
    /// Callouts handed to the glue, by [`Dispatch::id`], until it reports
    /// their token.
    dispatching: HashMap<u64, Pending>,
    /// Callouts under way, by the host's token.
    callouts: HashMap<u32, Pending>,
    /// Requests waiting for a call to the rate-limit service to be sent
    /// (`max_batch` above 1 and a call under way).
    count_queue: VecDeque<Counted>,
    /// Calls to the rate-limit service and the requests each counts: by
    /// [`GrpcDispatch::id`] until the glue reports the token, then by token.
    /// A request that ended leaves its call's list, not the call.
    counting_sent: HashMap<u64, CountCall>,
    counting: HashMap<u32, CountCall>,
    /// Requests in `count_queue`, `counting_sent` and `counting`.
    count_waiting: usize,
    /// Token charges sent to the rate-limit service, by
    /// [`GrpcDispatch::id`], until the glue reports them sent.
    charging: std::collections::HashSet<u64>,
    /// Allowed requests with a token reservation, by context id, until
    /// their answer ends.
    meters: HashMap<u32, Meter>,
    /// Requests to token-budget paths whose body is read (by context id).
    bodies: HashMap<u32, BodyScan>,
    /// An [`Effect::Wake`] is under way.
    wake_pending: bool,
    /// Waking failed: the tick wakes instead.
    wake_by_tick: bool,
    next_dispatch: u64,
    tick_soon: bool,
    /// Allowed requests not yet counted (counted on the tick).
    allowed: u64,
    /// Cache counters already counted.
    reported_hits: u64,
    reported_misses: u64,
    effects: VecDeque<Effect>,
}

impl Driver {
    /// A VM's driver for a configuration; asks for a first tick at once.
    pub fn new(config: Rc<Config>) -> Driver {
        let core = Core::new(config);
        let shared_keys = core
            .jwt_configs()
            .iter()
            .map(|j| SharedKeys::for_url(&j.jwks.url))
            .collect();
        let mut effects = VecDeque::new();
        effects.push_back(Effect::SetTick(SOON_TICK_MS));
        let batched = core
            .config
            .quota
            .as_ref()
            .and_then(|q| q.backend.as_ref())
            .is_some_and(|b| b.max_batch > 1);
        if batched {
            effects.push_back(Effect::OpenWake);
        }
        Driver {
            core,
            shared_keys,
            waiters: Vec::new(),
            callout_waiters: HashMap::new(),
            callout_waiting: 0,
            ready: VecDeque::new(),
            queued: Vec::new(),
            dispatching: HashMap::new(),
            callouts: HashMap::new(),
            count_queue: VecDeque::new(),
            counting_sent: HashMap::new(),
            counting: HashMap::new(),
            count_waiting: 0,
            charging: std::collections::HashSet::new(),
            meters: HashMap::new(),
            bodies: HashMap::new(),
            wake_pending: false,
            wake_by_tick: false,
            next_dispatch: 0,
            tick_soon: false,
            allowed: 0,
            reported_hits: 0,
            reported_misses: 0,
            effects,
        }
    }

    pub fn config(&self) -> &Rc<Config> {
        &self.core.config
    }

    /// The next thing to do, in order.
    pub fn poll(&mut self) -> Option<Effect> {
        self.effects.pop_front()
    }

    // ----- events -----

    /// A request's headers arrived. `source_ip` reads the client's address
    /// without the port (asked only when the quota counts by address);
    /// `now` is `None` when the host clock failed (the request is refused:
    /// read as 0 it would accept expired tokens). The request's phase says
    /// whether it may go on at once once the effects are performed.
    pub fn on_request_headers(
        &mut self,
        req: &RequestHandle,
        head: &impl RequestHead,
        source_ip: impl FnOnce() -> Option<String>,
        now: Option<u64>,
        store: &dyn SharedStore,
    ) {
        let config = self.core.config.clone();
        let forward = &config.forward;
        // One pass over the headers: the first `authorization` (Envoy joins
        // several into one value, never a valid token), the first
        // `content-type`, and the identity headers' other spellings.
        let (mut authorization, mut content_type) = (None, None);
        let mut spoofed: Vec<String> = Vec::new();
        // Other credential headers than `Authorization: Bearer`, when
        // `auth.credentials` names some.
        let sources = &config.credentials;
        let other_sources = !matches!(sources.as_slice(), [s] if s.is_bearer());
        let mut credentials: Vec<(usize, Vec<u8>)> = Vec::new();
        let mut cookie_header: Option<&[u8]> = None;
        for (name, value) in head.pairs() {
            match name {
                b"authorization" if authorization.is_none() => authorization = Some(value),
                b"content-type" if content_type.is_none() => content_type = Some(value),
                _ => {}
            }
            if other_sources {
                let source = sources.iter().position(|s| {
                    !s.is_bearer() && s.header().is_some_and(|h| name == h.as_bytes())
                });
                if let Some(i) = source.filter(|i| !credentials.iter().any(|(j, _)| j == i)) {
                    credentials.push((i, value.to_vec()));
                }
                if name == b"cookie" && cookie_header.is_none() {
                    cookie_header = Some(value);
                    for (i, s) in sources.iter().enumerate() {
                        if let CredentialPlace::Cookie(c) = &s.place {
                            if let Some(v) = crate::credentials::cookie(value, c) {
                                credentials.push((i, v.to_vec()));
                            }
                        }
                    }
                }
            }
            // The tenant and per-category headers are only written when
            // there is something to write: a client's own copy is removed.
            let own_copy = forward
                .identity_headers()
                .skip(2)
                .any(|h| name == h.as_bytes());
            if own_copy || forward.identity_headers().any(|h| spells_header(name, h)) {
                if let Ok(name) = std::str::from_utf8(name) {
                    spoofed.push(name.to_string());
                }
            }
        }
        let grpc = content_type.is_some_and(is_grpc);
        let authorization = authorization.map(<[u8]>::to_vec);
        let parked = |facts| Parked {
            req: req.clone(),
            facts,
            spoofed,
            rewrite: Vec::new(),
            grpc,
            arrived: now.unwrap_or_default(),
        };
        let Some(now) = now else {
            log::error!("the host clock failed: request refused");
            self.refuse(&parked(RequestFacts::default()), Denial::Internal);
            return;
        };
        let debug = log::log_enabled!(log::Level::Debug);
        if !config.needs_path() && !debug {
            let facts = RequestFacts {
                authorization,
                credentials,
                source_ip: config.counts_by_address("").then(source_ip).flatten(),
                ..RequestFacts::default()
            };
            let step = self.core.decide(&facts, now, store);
            self.carry_out(parked(facts), step, now, store);
            return;
        }
        let raw_path = head.get(":path").unwrap_or_default();
        // Query credentials, and (to strip them) the request without them.
        let target = std::str::from_utf8(raw_path).unwrap_or_default();
        let mut rewrite = Vec::new();
        if other_sources {
            let mut in_query: Vec<&str> = Vec::new();
            let mut in_cookie: Vec<&str> = Vec::new();
            for (i, s) in sources.iter().enumerate() {
                match &s.place {
                    CredentialPlace::Query(q) => {
                        if let Some(v) = crate::credentials::query(target, q) {
                            credentials.push((i, v.into_bytes()));
                            in_query.push(q);
                        }
                    }
                    CredentialPlace::Cookie(c) => {
                        if credentials.iter().any(|(j, _)| *j == i) {
                            in_cookie.push(c);
                        }
                    }
                    CredentialPlace::Header { .. } => {}
                }
            }
            if forward.strip_authorization {
                if !in_query.is_empty() {
                    let stripped = crate::credentials::without_query(target, &in_query);
                    rewrite.push((":path".to_string(), Some(stripped.into_bytes())));
                }
                if let (false, Some(h)) = (in_cookie.is_empty(), cookie_header) {
                    let kept = crate::credentials::without_cookies(h, &in_cookie);
                    rewrite.push(("cookie".to_string(), kept));
                }
            }
        }
        let path = match std::str::from_utf8(raw_path).ok().map(normalize_path) {
            Some(Ok(p)) => p,
            // Read for debug lines only: nothing matches on it, so a path
            // that cannot be normalised changes no answer.
            _ if !config.needs_path() => String::new(),
            // The raw path (and its query) is not logged: it may carry secrets.
            _ => return self.refuse(&parked(RequestFacts::default()), Denial::BadPath),
        };
        // The method matters to route rules and debug lines only.
        let method = if !config.needs_method() && !debug {
            String::new()
        } else {
            head.get(":method")
                .and_then(|m| std::str::from_utf8(m).ok())
                .unwrap_or_default()
                .to_string()
        };
        let source_ip = config.counts_by_address(&path).then(source_ip).flatten();
        let (raw_path, headers) = if config.auth.as_ref().is_some_and(Auth::sees_request) {
            // The endpoint sees the request as the client sent it, less any
            // identity headers the client made up (in any spelling).
            let headers = head
                .pairs()
                .filter(|(name, _)| {
                    !forward
                        .identity_headers()
                        .any(|h| name.eq_ignore_ascii_case(h.as_bytes()) || spells_header(name, h))
                })
                .map(|(k, v)| (String::from_utf8_lossy(k).into_owned(), v.to_vec()))
                .collect();
            (String::from_utf8_lossy(raw_path).into_owned(), headers)
        } else {
            (String::new(), Vec::new())
        };
        let facts = RequestFacts {
            method,
            path,
            authorization,
            credentials,
            source_ip,
            raw_path,
            headers,
        };
        let tokens = config.quota.as_ref().and_then(|q| q.tokens.as_ref());
        if tokens.is_some_and(|t| t.counts(&facts.method, &facts.path)) {
            self.bodies.insert(req.id, BodyScan::default());
        }
        let step = self.core.decide(&facts, now, store);
        let mut parked = parked(facts);
        parked.rewrite = rewrite;
        self.carry_out(parked, step, now, store);
    }

    /// An identity header could not be written for an allowed request: it
    /// is refused instead of going on.
    pub fn forward_failed(
        &mut self,
        req: &RequestHandle,
        grpc: bool,
        now: u64,
        store: &dyn SharedStore,
    ) {
        log::error!("an identity header could not be set: request refused");
        self.allowed = self.allowed.saturating_sub(1);
        if let Some(meter) = self.meters.remove(&req.id) {
            self.core.refund_tokens(&meter.grant, now, store);
        }
        let parked = Parked {
            req: req.clone(),
            facts: RequestFacts::default(),
            spoofed: Vec::new(),
            rewrite: Vec::new(),
            grpc,
            arrived: 0,
        };
        self.refuse(&parked, Denial::Internal);
    }

    /// The answer's headers of an allowed request arrived, with its
    /// `content-type`: the token headers to add (none without a token
    /// reservation). Its body then goes to [`Driver::on_response_body`]
    /// while [`Driver::meters`] says so.
    pub fn on_response_headers(
        &mut self,
        req: &RequestHandle,
        content_type: Option<&[u8]>,
    ) -> Vec<(&'static str, String)> {
        let Some(meter) = self.meters.get_mut(&req.id) else {
            return Vec::new();
        };
        meter.reader = content_type
            .and_then(|c| std::str::from_utf8(c).ok())
            .and_then(|c| UsageReader::for_content_type(c, DEFAULT_MAX_BYTES));
        let tokens = meter.grant.policy();
        let mut policies = Vec::with_capacity(2);
        if let (Phase::Allowed(Some(rl)), Some(q)) = (req.phase(), &self.core.config.quota) {
            policies.push(Policy {
                name: "requests",
                quota: rl.limit,
                window: q.period.seconds(),
                remaining: rl.remaining,
                reset: rl.reset,
            });
        }
        policies.push(tokens);
        let mut headers: Vec<_> = openai_headers(&tokens).into_iter().collect();
        headers.extend(ietf_fields(&policies));
        headers
    }

    /// Whether request `req`'s body is read (for the output maximum that
    /// sizes its token reservation).
    pub fn reads_request_body(&self, req: &RequestHandle) -> bool {
        self.bodies
            .get(&req.id)
            .is_some_and(|b| b.ended.is_none() && !b.too_large)
    }

    /// A chunk of request `req`'s body (each byte once), as it passes; at
    /// its end the reservation is sized to the output maximum it names.
    pub fn on_request_body(
        &mut self,
        req: &RequestHandle,
        chunk: &[u8],
        end: bool,
        now: Option<u64>,
        store: &dyn SharedStore,
    ) {
        let Some(scan) = self.bodies.get_mut(&req.id) else {
            return;
        };
        if scan.ended.is_some() {
            return;
        }
        if scan.too_large {
            return;
        }
        if scan.buf.len().saturating_add(chunk.len()) > MAX_SCANNED_BODY {
            // Not read further: the default reservation stays.
            scan.too_large = true;
            scan.buf = Vec::new();
            return;
        }
        scan.buf.extend_from_slice(chunk);
        if !end {
            return;
        }
        let max_output = crate::token_quota::max_output_tokens(&scan.buf);
        scan.buf = Vec::new();
        scan.ended = Some(max_output);
        // Allowed already: size its reservation now; else when it is.
        let (Some(meter), Some(now)) = (self.meters.get_mut(&req.id), now) else {
            return;
        };
        self.bodies.remove(&req.id);
        self.core
            .resize_reservation(&mut meter.grant, max_output, now, store);
    }

    /// Whether request `req`'s answer is counted against a token budget
    /// (its headers get the token headers, its body is read).
    pub fn counts_answer(&self, req: &RequestHandle) -> bool {
        self.meters.contains_key(&req.id)
    }

    /// Whether effects wait to be performed.
    pub fn has_effects(&self) -> bool {
        !self.effects.is_empty()
    }

    /// Whether request `req`'s answer body is read (for its token usage).
    pub fn meters(&self, req: &RequestHandle) -> bool {
        self.meters.get(&req.id).is_some_and(|m| m.reader.is_some())
    }

    /// A chunk of request `req`'s answer body, as it passes (never held or
    /// changed); at the end of the answer its reservation is settled.
    pub fn on_response_body(
        &mut self,
        req: &RequestHandle,
        chunk: &[u8],
        end: bool,
        now: Option<u64>,
        store: &dyn SharedStore,
    ) {
        if let Some(reader) = self.meters.get_mut(&req.id).and_then(|m| m.reader.as_mut()) {
            reader.feed(chunk);
        }
        if end {
            self.settle(req, now, store);
        }
    }

    /// Settles request `req`'s token reservation, if it has one, with the
    /// usage its answer reported so far.
    fn settle(&mut self, req: &RequestHandle, now: Option<u64>, store: &dyn SharedStore) {
        let Some(meter) = self.meters.remove(&req.id) else {
            return;
        };
        let Some(now) = now else {
            log::error!("the host clock failed: the token reservation stays as charged");
            return;
        };
        let usage = meter.reader.and_then(UsageReader::finish);
        let charged = self.core.settle_tokens(&meter.grant, usage, now, store);
        // Tokens as hits in the rate-limit service: the charge is added
        // there too (its answer is not waited for).
        let backend = self.backend().cloned();
        if let (Some(count), Some(backend)) = (
            self.core.remote_token_charge(&meter.grant, charged, now),
            backend,
        ) {
            let id = self.next_id();
            self.charging.insert(id);
            self.effects.push_back(Effect::DispatchGrpc(GrpcDispatch {
                id,
                service: crate::rls::grpc_service(&backend.cluster),
                message: crate::rls::request(&backend.domain, &[count.hit()]),
                timeout_ms: backend.timeout_ms,
            }));
        }
        if usage.is_none() {
            log::debug!("an answer reported no token usage: charged {charged}");
        }
        self.effects.push_back(Effect::Count(Metric::Tokens {
            charged,
            path: meter.grant.path,
            usage,
        }));
    }

    /// A request ended (`on_log`): its token reservation is settled (with
    /// what its answer reported, if anything) and it is forgotten wherever
    /// it waits.
    /// `now` is asked only when something is settled or given back (the
    /// common request needs no clock here).
    pub fn on_log(
        &mut self,
        req: &RequestHandle,
        now: impl FnOnce() -> Option<u64>,
        store: &dyn SharedStore,
    ) {
        self.bodies.remove(&req.id);
        let waiting = req.phase() == Phase::Waiting;
        if !waiting && !self.meters.contains_key(&req.id) {
            return;
        }
        let now = now();
        self.settle(req, now, store);
        if !waiting {
            return;
        }
        let id = req.id;
        self.waiters.retain(|p| p.req.id != id);
        let mut removed: usize = 0;
        for list in self.callout_waiters.values_mut() {
            let before = list.len();
            list.retain(|p| p.req.id != id);
            removed = removed.saturating_add(before.saturating_sub(list.len()));
        }
        self.ready.retain(|(p, how)| {
            let gone = p.req.id == id;
            if gone && matches!(how, Resume::Finish(_)) {
                removed = removed.saturating_add(1);
            }
            !gone
        });
        self.callout_waiting = self.callout_waiting.saturating_sub(removed);
        // Waiting for the rate-limit service: forgotten, and a token
        // reservation it holds (a budget's check) given back.
        let mut gone: Vec<Counted> = Vec::new();
        let (keep, left): (VecDeque<Counted>, VecDeque<Counted>) =
            std::mem::take(&mut self.count_queue)
                .into_iter()
                .partition(|c| c.parked.req.id != id);
        self.count_queue = keep;
        gone.extend(left);
        for call in self
            .counting_sent
            .values_mut()
            .chain(self.counting.values_mut())
        {
            let (keep, left): (Vec<Counted>, Vec<Counted>) = std::mem::take(&mut call.waiting)
                .into_iter()
                .partition(|c| c.parked.req.id != id);
            call.waiting = keep;
            gone.extend(left);
        }
        self.count_waiting = self.count_waiting.saturating_sub(gone.len());
        if let Some(now) = now {
            for c in gone {
                if let Some(grant) = c.counting.tokens_for.and_then(|a| a.tokens) {
                    self.core.refund_tokens(&grant, now, store);
                }
            }
        }
    }

    /// The glue sent the callout [`Dispatch`] `id`: with the host's token, or
    /// it could not be sent.
    pub fn dispatched(
        &mut self,
        id: u64,
        token: Result<u32, ()>,
        now: u64,
        store: &dyn SharedStore,
    ) {
        let Some(pending) = self.dispatching.remove(&id) else {
            return;
        };
        match (token, pending) {
            (Ok(token), pending) => {
                self.callouts.insert(token, pending);
            }
            (Err(()), Pending::Jwks { set, .. }) => {
                let cluster = self
                    .core
                    .jwt_config(set)
                    .map(|j| j.jwks.cluster.clone())
                    .unwrap_or_default();
                log::error!(
                    "JWKS fetch could not start (is cluster `{cluster}` defined in Envoy?)"
                );
                let Some(jw) = self.core.jwks.get(set) else {
                    return;
                };
                let record = jw.record.failure(FetchError::Unavailable, now);
                self.finish_fetch(set, record, store);
                self.resume_waiters(now, store);
            }
            (Err(()), Pending::Provider { key, progress, .. }) => {
                log::error!(
                    "a provider callout could not start (is its cluster defined in Envoy?)"
                );
                self.complete_callout(key, Answer::NoAnswer, progress, now, store);
            }
        }
    }

    /// The answer to the callout with this token. `now` is `None` when the
    /// host clock failed: a provider's waiters get 503; a key set fetch is
    /// retried once its lease runs out.
    pub fn on_callout_reply(
        &mut self,
        token: u32,
        reply: CalloutReply,
        now: Option<u64>,
        store: &dyn SharedStore,
    ) {
        let Some(pending) = self.callouts.remove(&token) else {
            return;
        };
        let Some(now) = now else {
            log::error!("the host clock failed: callout answer dropped");
            if let Pending::Provider { key, progress, .. } = pending {
                // Never cached (an error), so the time does not matter.
                self.complete_callout(key, Answer::NoAnswer, progress, 0, store);
            }
            return;
        };
        match pending {
            Pending::Provider {
                key,
                started_ms,
                timeout_ms,
                progress,
            } => {
                let reply = classify(reply, started_ms, timeout_ms, now);
                let answer = match &reply {
                    Reply::Response {
                        status,
                        body,
                        throttled: false,
                    } => Answer::Response {
                        status: *status,
                        body,
                    },
                    Reply::Response {
                        status,
                        body,
                        throttled: true,
                    } => Answer::Throttled {
                        status: *status,
                        body,
                    },
                    Reply::TimedOut => Answer::TimedOut,
                    Reply::NoAnswer | Reply::TooLarge => Answer::NoAnswer,
                };
                self.complete_callout(key, answer, progress, now, store);
            }
            Pending::Jwks { set, started_ms } => {
                let timeout_ms = self.core.jwt_config(set).map_or(0, |j| j.jwks.timeout_ms);
                let Some(jw) = self.core.jwks.get_mut(set) else {
                    return;
                };
                let record = match classify(reply, started_ms, timeout_ms, now) {
                    Reply::Response {
                        status: 200, body, ..
                    } => jw.fetched(body, now),
                    Reply::Response { status, .. } => {
                        log::warn!("JWKS endpoint answered {status}");
                        jw.record.failure(FetchError::Unavailable, now)
                    }
                    Reply::TimedOut => jw.record.failure(FetchError::Timeout, now),
                    Reply::NoAnswer | Reply::TooLarge => {
                        jw.record.failure(FetchError::Unavailable, now)
                    }
                };
                self.finish_fetch(set, record, store);
                self.resume_waiters(now, store);
            }
        }
    }

    /// The tick: count metrics, carry on ready requests, send queued
    /// callouts, keep the key set up, and set the next tick.
    pub fn on_tick(&mut self, now: u64, store: &dyn SharedStore) {
        self.tick_soon = false;
        self.wake_pending = false;
        self.send_counts(now, store);
        self.report(now);
        self.expire_waiters(now);
        self.drain_ready(now, store);
        self.dispatch_queued(now);
        let mut changed = false;
        for (set, j) in self.core.jwt_configs().iter().enumerate() {
            changed |= self.tick_jwks(set, j, now, store);
        }
        if changed {
            self.resume_waiters(now, store);
        }
        if !self.tick_soon {
            let period = if self.waiters.is_empty() && self.queued.is_empty() {
                IDLE_TICK_MS
            } else {
                POLL_TICK_MS
            };
            self.effects.push_back(Effect::SetTick(period));
        }
    }

    // ----- carrying decisions out -----

    /// Carries out a decision: allow, deny, or park; records the request's
    /// new phase.
    fn carry_out(&mut self, parked: Parked, step: Step, now: u64, store: &dyn SharedStore) {
        self.carry_out_as(parked, step, false, now, store);
    }

    fn carry_out_as(
        &mut self,
        parked: Parked,
        step: Step,
        resumed: bool,
        now: u64,
        store: &dyn SharedStore,
    ) {
        match step {
            Step::WaitForKeys => {
                if self.waiters.len().saturating_add(self.ready.len()) >= MAX_WAITERS {
                    return self.refuse(&parked, Denial::AuthUnavailable);
                }
                parked.req.set(Phase::Waiting);
                self.waiters.push(parked);
                self.tick_soon();
            }
            Step::Callout(c) => {
                if self.callout_waiting >= MAX_CALLOUT_WAITERS {
                    return self.refuse(&parked, Denial::AuthUnavailable);
                }
                if let Some(list) = self.callout_waiters.get_mut(&c.key) {
                    parked.req.set(Phase::Waiting);
                    list.push(parked);
                } else if self.callout_waiters.len() >= MAX_PROVIDER_CALLOUTS {
                    return self.refuse(&parked, Denial::AuthUnavailable);
                } else {
                    parked.req.set(Phase::Waiting);
                    self.callout_waiters.insert(c.key, vec![parked]);
                    self.queued.push(*c);
                    self.tick_soon();
                }
                self.callout_waiting = self.callout_waiting.saturating_add(1);
            }
            Step::Allow(mut allowed) => {
                if let Some(grant) = allowed.tokens.take() {
                    let mut grant = *grant;
                    let id = parked.req.id;
                    if let Some(Some(max_output)) = self.bodies.get(&id).map(|b| b.ended) {
                        self.bodies.remove(&id);
                        self.core
                            .resize_reservation(&mut grant, max_output, now, store);
                    }
                    let meter = Meter {
                        grant,
                        reader: None,
                    };
                    self.meters.insert(id, meter);
                }
                self.allowed = self.allowed.saturating_add(1);
                parked.req.set(Phase::Allowed(allowed.rate_limit));
                self.effects.push_back(Effect::Allow {
                    req: parked.req,
                    identity: allowed.identity,
                    spoofed: parked.spoofed,
                    rewrite: parked.rewrite,
                    grpc: parked.grpc,
                    resume: resumed,
                });
            }
            Step::Deny(denial) => self.refuse(&parked, denial),
            Step::Count(counting) => self.count_remotely(parked, *counting, now, store),
        }
    }

    /// Asks the rate-limit service to count a request, which waits for it.
    fn count_remotely(
        &mut self,
        parked: Parked,
        counting: Counting,
        now: u64,
        store: &dyn SharedStore,
    ) {
        if self.backend().is_none() || self.count_waiting >= MAX_COUNT_WAITERS {
            return self.refuse(&parked, Denial::QuotaUnavailable);
        }
        parked.req.set(Phase::Waiting);
        self.count_waiting = self.count_waiting.saturating_add(1);
        self.count_queue.push_back(Counted {
            parked,
            counting,
            since: now,
            slot: 0,
        });
        if self.backend().is_some_and(|b| b.max_batch > 1) {
            // A call sent from a request's callback is lost to the others
            // in it when that request ends first.
            self.wake();
        } else {
            self.send_counts(now, store);
        }
    }

    /// Asks for [`Driver::on_wake`] (or, when waking failed, a tick).
    fn wake(&mut self) {
        if self.wake_by_tick {
            self.tick_soon();
        } else if !self.wake_pending {
            self.wake_pending = true;
            self.effects.push_back(Effect::Wake);
        }
    }

    /// Called from the root context after [`Effect::Wake`]: sends what
    /// waits for the rate-limit service.
    pub fn on_wake(&mut self, now: u64, store: &dyn SharedStore) {
        self.wake_pending = false;
        self.send_counts(now, store);
    }

    /// [`Effect::OpenWake`] or [`Effect::Wake`] failed: the tick wakes
    /// from now on.
    pub fn wake_unavailable(&mut self) {
        if !self.wake_by_tick {
            log::warn!("waking the root context failed: batched counts go on the tick");
        }
        self.wake_by_tick = true;
        self.wake_pending = false;
        self.tick_soon();
    }

    fn backend(&self) -> Option<&crate::quota::Backend> {
        self.core.config.quota.as_ref()?.backend.as_ref()
    }

    /// Sends the queued requests to the rate-limit service: each in its own
    /// call (`max_batch` 1), or, batched, in calls of up to `max_batch` while
    /// fewer than [`MAX_BATCHED_CALLS`] are under way. A call's timeout is
    /// what is left of `timeout_ms` for its longest-waiting request, so no
    /// request waits longer than `timeout_ms` in all; one that already did
    /// ends as the service failing.
    fn send_counts(&mut self, now: u64, store: &dyn SharedStore) {
        let config = self.core.config.clone();
        let Some(backend) = config.quota.as_ref().and_then(|q| q.backend.as_ref()) else {
            return;
        };
        let most_calls = if backend.max_batch > 1 {
            MAX_BATCHED_CALLS
        } else {
            usize::MAX
        };
        while self.counting_sent.len().saturating_add(self.counting.len()) < most_calls {
            let Some(first) = self.count_queue.front() else {
                return;
            };
            let waited = now.saturating_sub(first.since);
            if waited >= backend.timeout_ms {
                if let Some(late) = self.count_queue.pop_front() {
                    log::warn!("rate-limit service: no call free within timeout_ms");
                    self.end_count(late, None, now, store);
                }
                continue;
            }
            let take = backend.max_batch.min(self.count_queue.len());
            let mut batch: Vec<Counted> = self.count_queue.drain(..take).collect();
            for (slot, c) in batch.iter_mut().enumerate() {
                c.slot = slot;
            }
            let hits: Vec<crate::rls::Hit<'_>> =
                batch.iter().map(|c| c.counting.count.hit()).collect();
            let message = crate::rls::request(&backend.domain, &hits);
            let id = self.next_id();
            self.counting_sent.insert(
                id,
                CountCall {
                    descriptors: take,
                    waiting: batch,
                },
            );
            self.effects.push_back(Effect::DispatchGrpc(GrpcDispatch {
                id,
                service: crate::rls::grpc_service(&backend.cluster),
                message,
                timeout_ms: backend.timeout_ms.saturating_sub(waited),
            }));
        }
    }

    /// The glue sent the rate-limit call [`GrpcDispatch`] `id`: with the
    /// host's token, or it could not be sent (counted as a failed call).
    pub fn dispatched_grpc(
        &mut self,
        id: u64,
        token: Result<u32, ()>,
        now: u64,
        store: &dyn SharedStore,
    ) {
        if self.charging.remove(&id) {
            if token.is_err() {
                log::warn!("rate-limit service: a token charge could not be sent");
                self.effects.push_back(Effect::Count(Metric::Callout {
                    provider: "rls",
                    outcome: "error",
                }));
            }
            return;
        }
        let Some(call) = self.counting_sent.remove(&id) else {
            return;
        };
        match token {
            Ok(token) => {
                self.counting.insert(token, call);
            }
            Err(()) => {
                for counted in call.waiting {
                    self.end_count(counted, None, now, store);
                }
                if !self.count_queue.is_empty() {
                    self.wake();
                }
            }
        }
    }

    /// The rate-limit service's answer to the call with this token: gRPC
    /// `status` (0 OK; Envoy's own for a timeout or a refused connection)
    /// and the message. `now` is `None` when the host clock failed.
    pub fn on_grpc_reply(
        &mut self,
        token: u32,
        status: u32,
        message: &[u8],
        now: Option<u64>,
        store: &dyn SharedStore,
    ) {
        let Some(call) = self.counting.remove(&token) else {
            return;
        };
        let Some(now) = now else {
            log::error!("the host clock failed: request refused");
            for counted in call.waiting {
                self.count_waiting = self.count_waiting.saturating_sub(1);
                self.refuse(&counted.parked, Denial::Internal);
            }
            return;
        };
        let verdicts = match status {
            0 => crate::rls::read(message, call.descriptors)
                .map_err(|e| log::warn!("rate-limit service: unusable answer: {e:?}"))
                .ok(),
            status => {
                log::warn!("rate-limit service: gRPC status {status}");
                None
            }
        };
        match verdicts {
            Some(verdicts) => {
                for counted in call.waiting {
                    let verdict = verdicts.get(counted.slot).copied();
                    self.end_count(counted, verdict, now, store);
                }
            }
            None => {
                for counted in call.waiting {
                    self.end_count(counted, None, now, store);
                }
            }
        }
        if !self.count_queue.is_empty() {
            self.wake();
        }
    }

    fn end_count(
        &mut self,
        counted: Counted,
        verdict: Option<crate::rls::Verdict>,
        now: u64,
        store: &dyn SharedStore,
    ) {
        self.count_waiting = self.count_waiting.saturating_sub(1);
        let outcome = match verdict {
            Some(v) if v.over_limit => "rejected",
            Some(_) => "ok",
            None => "error",
        };
        self.effects.push_back(Effect::Count(Metric::Callout {
            provider: "rls",
            outcome,
        }));
        let local = self
            .backend()
            .is_some_and(|b| b.failure_mode == crate::quota::FailureMode::Local);
        if verdict.is_none() && local {
            log::warn!("rate-limit service failed: counted in this Envoy instead");
            self.effects.push_back(Effect::Count(Metric::QuotaFallback));
        }
        let Counted {
            parked, counting, ..
        } = counted;
        let step = self
            .core
            .counted(&parked.facts, counting, verdict, now, store);
        self.carry_out_as(parked, step, true, now, store);
    }

    /// Answers a request locally: the denial, its metric, its debug line.
    fn refuse(&mut self, parked: &Parked, denial: Denial) {
        self.bodies.remove(&parked.req.id);
        let facts = &parked.facts;
        log::debug!(
            "denied {} {}: {} {}",
            denial.status(),
            denial.reason(),
            facts.method,
            facts.path
        );
        parked.req.set(Phase::Answered);
        self.effects
            .push_back(Effect::Count(Metric::Denied(denial.reason())));
        let answer_as = if parked.grpc {
            let quota = &self.core.config.quota;
            AnswerAs::Grpc {
                quota_unavailable: quota
                    .as_ref()
                    .is_some_and(|q| !q.rate_limited_as_resource_exhausted),
            }
        } else {
            AnswerAs::Http
        };
        self.effects.push_back(Effect::Deny {
            id: parked.req.id,
            denial,
            answer_as,
        });
    }

    /// Requests that waited for keys longer than [`key_wait_limit_ms`] are
    /// refused (503): whatever happened to the fetch (a lease never freed,
    /// shared data failing), no request waits for keys without end.
    fn expire_waiters(&mut self, now: u64) {
        let Some(limit) = self.core.jwt_configs().iter().map(key_wait_limit_ms).max() else {
            return;
        };
        if self.waiters.is_empty() {
            return;
        }
        let (expired, kept): (Vec<Parked>, Vec<Parked>) = std::mem::take(&mut self.waiters)
            .into_iter()
            .partition(|p| now.saturating_sub(p.arrived) > limit);
        self.waiters = kept;
        if !expired.is_empty() {
            log::warn!(
                "{} requests waited over {limit} ms for keys: refused",
                expired.len()
            );
        }
        self.ready.extend(
            expired
                .into_iter()
                .map(|p| (p, Resume::Refuse(Denial::AuthUnavailable))),
        );
    }

    fn tick_soon(&mut self) {
        if !self.tick_soon {
            self.tick_soon = true;
            self.effects.push_back(Effect::SetTick(SOON_TICK_MS));
        }
    }

    /// Queues every request parked for keys to be decided again.
    fn resume_waiters(&mut self, now: u64, store: &dyn SharedStore) {
        let waiters = std::mem::take(&mut self.waiters);
        self.ready
            .extend(waiters.into_iter().map(|p| (p, Resume::Decide)));
        self.drain_ready(now, store);
    }

    /// A provider callout ended: queues every request that waited on it.
    fn complete_callout(
        &mut self,
        key: CacheKey,
        answer: Answer,
        progress: Option<Box<github::Progress>>,
        now: u64,
        store: &dyn SharedStore,
    ) {
        let result = match self.core.provider_answer(key, answer, progress, now) {
            Answered::Done(result) => result,
            Answered::Next(next) => {
                // The same requests wait on the exchange's next call.
                self.queued.push(*next);
                self.tick_soon();
                return;
            }
        };
        let provider = self
            .core
            .config
            .auth
            .as_ref()
            .and_then(Auth::callout)
            .map_or("introspection", CalloutProvider::name);
        let outcome = match &result {
            Ok(_) => "ok",
            Err(d) if d.status() == 401 => "rejected",
            Err(_) => "error",
        };
        self.effects
            .push_back(Effect::Count(Metric::Callout { provider, outcome }));
        let waiting = self.callout_waiters.remove(&key).unwrap_or_default();
        self.ready.extend(
            waiting
                .into_iter()
                .map(|p| (p, Resume::Finish(result.clone()))),
        );
        self.drain_ready(now, store);
    }

    /// Answers or resumes up to [`RESUME_BATCH`] requests whose wait ended;
    /// asks for a tick for the rest.
    fn drain_ready(&mut self, now: u64, store: &dyn SharedStore) {
        for _ in 0..RESUME_BATCH {
            let Some((parked, how)) = self.ready.pop_front() else {
                return;
            };
            let step = match how {
                Resume::Decide => self.core.decide(&parked.facts, now, store),
                Resume::Finish(result) => {
                    self.callout_waiting = self.callout_waiting.saturating_sub(1);
                    self.core.finish(&parked.facts, result, now, store)
                }
                Resume::Refuse(denial) => Step::Deny(denial),
            };
            self.carry_out_as(parked, step, true, now, store);
        }
        if !self.ready.is_empty() {
            self.tick_soon();
        }
    }

    // ----- callouts -----

    fn dispatch(&mut self, pending: Pending, d: Dispatch) {
        self.dispatching.insert(d.id, pending);
        self.effects.push_back(Effect::Dispatch(d));
    }

    fn next_id(&mut self) -> u64 {
        self.next_dispatch = self.next_dispatch.wrapping_add(1);
        self.next_dispatch
    }

    /// Sends the queued provider callouts.
    fn dispatch_queued(&mut self, now: u64) {
        for c in std::mem::take(&mut self.queued) {
            let path = c.request.path.as_ref().unwrap_or(&c.upstream.path);
            let mut headers = vec![
                (":method".to_string(), c.request.method.as_str().to_string()),
                (":path".to_string(), path.clone()),
                (":authority".to_string(), c.upstream.authority.clone()),
            ];
            headers.extend(c.request.headers.iter().cloned());
            let body = match c.request.method {
                Method::Post => Some(c.request.body.clone()),
                Method::Get => None,
            };
            let pending = Pending::Provider {
                key: c.key,
                started_ms: now,
                timeout_ms: c.upstream.timeout_ms,
                progress: c.progress,
            };
            let d = Dispatch {
                id: self.next_id(),
                cluster: c.upstream.cluster.clone(),
                headers,
                body,
                timeout_ms: c.upstream.timeout_ms,
            };
            self.dispatch(pending, d);
        }
    }

    /// Ends this VM's fetch: shares the record, gives the lease back, applies it.
    fn finish_fetch(
        &mut self,
        set: usize,
        record: jwks_cache::FetchRecord,
        store: &dyn SharedStore,
    ) {
        if let Some(keys) = self.shared_keys.get(set) {
            if jwks_cache::write_record(store, &keys.record, &record).is_err() {
                log::warn!("could not share the JWKS with the other workers");
            }
            jwks_cache::release_lease(store, &keys.lease);
        }
        let Some(jw) = self.core.jwks.get_mut(set) else {
            return;
        };
        jw.in_flight_since = None;
        let failed = record.error.is_some();
        if !failed {
            log::info!("JWKS fetched ({} bytes)", record.body.len());
        }
        jw.apply(record, None);
        self.effects
            .push_back(Effect::Count(Metric::JwksFetch { failed }));
    }

    /// Key set upkeep on every tick: take in what another VM fetched, and
    /// fetch when due and this VM holds the lease. True when parked requests
    /// should be decided again.
    fn tick_jwks(&mut self, set: usize, j: &JwtConfig, now: u64, store: &dyn SharedStore) -> bool {
        let Some(keys) = self.shared_keys.get(set).cloned() else {
            return false;
        };
        let Some(jw) = self.core.jwks.get_mut(set) else {
            return false;
        };
        let mut changed = false;
        if jw.in_flight_since.is_none() {
            if let Some((record, cas)) =
                jwks_cache::read_record(store, &keys.record, jw.record_cas())
            {
                jw.apply(record, Some(cas));
                changed = true;
            }
        }
        let ttl_ms = j.cache_ttl.saturating_mul(1000);
        let lease_ms = j.jwks.timeout_ms.saturating_add(LEASE_MARGIN_MS);
        if !jw.fetch_due(now, ttl_ms) {
            return changed;
        }
        let refresh_due = jw.keys.is_none() || now.saturating_sub(jw.record.fetched) >= ttl_ms;
        let cooldown_ms = j.refresh_cooldown_seconds.saturating_mul(1000);
        if !refresh_due && !jw.kid_refresh_allowed(now, cooldown_ms) {
            // An unknown kid asked, but a fetch started within the cooldown.
            jw.wanted_since = None;
            return true;
        }
        if jw.in_flight(now, lease_ms)
            || !jwks_cache::take_lease(store, &keys.lease, now, now.saturating_add(lease_ms))
        {
            return changed; // another VM is fetching; its record will tell
        }
        let record = jw.record.start(now);
        if jwks_cache::write_record(store, &keys.record, &record).is_err() {
            log::warn!("could not share the JWKS fetch state");
        }
        jw.apply(record, None);
        jw.in_flight_since = Some(now);
        let mut headers = vec![
            (":method".to_string(), "GET".to_string()),
            (":path".to_string(), j.jwks.path.clone()),
            (":authority".to_string(), j.jwks.authority.clone()),
            ("accept".to_string(), "application/json".to_string()),
        ];
        if let Some(t) = &j.jwks_token {
            headers.push(("authorization".to_string(), format!("Bearer {t}")));
        }
        let d = Dispatch {
            id: self.next_id(),
            cluster: j.jwks.cluster.clone(),
            headers,
            body: None,
            timeout_ms: j.jwks.timeout_ms,
        };
        self.dispatch(
            Pending::Jwks {
                set,
                started_ms: now,
            },
            d,
        );
        changed
    }

    /// Counts the allowed requests, the cache counters and the key set's age.
    fn report(&mut self, now: u64) {
        let allowed = std::mem::take(&mut self.allowed);
        if allowed > 0 {
            self.effects
                .push_back(Effect::Count(Metric::Allowed(allowed)));
        }
        let cache = if !self.core.jwks.is_empty() {
            "token"
        } else {
            "decision"
        };
        let (hits, misses) = (self.core.tokens.hits, self.core.tokens.misses);
        let (new_hits, new_misses) = (
            hits.saturating_sub(self.reported_hits),
            misses.saturating_sub(self.reported_misses),
        );
        if new_hits > 0 || new_misses > 0 {
            self.effects.push_back(Effect::Count(Metric::Cache {
                cache,
                hits: new_hits,
                misses: new_misses,
            }));
        }
        self.reported_hits = hits;
        self.reported_misses = misses;
        // The oldest key set's age.
        let fetched = self
            .core
            .jwks
            .iter()
            .map(|jw| jw.record.fetched)
            .filter(|&f| f > 0)
            .min()
            .unwrap_or(0);
        if fetched > 0 {
            self.effects.push_back(Effect::Count(Metric::JwksAgeSeconds(
                now.saturating_sub(fetched) / 1000,
            )));
        }
    }
}

/// The longest a request waits for keys: two fetches' leases (one by a VM
/// that may have died holding it, then ours).
pub fn key_wait_limit_ms(j: &JwtConfig) -> u64 {
    j.jwks
        .timeout_ms
        .saturating_add(LEASE_MARGIN_MS)
        .saturating_mul(2)
}

/// Classifies a callout's answer: no answer (or Envoy's own 504) once the
/// timeout has run out is a timeout.
fn classify(reply: CalloutReply, started_ms: u64, timeout_ms: u64, now: u64) -> Reply {
    let elapsed = now.saturating_sub(started_ms);
    let out_of_time = elapsed.saturating_add(TIMEOUT_SLACK_MS) >= timeout_ms;
    let reply = match (reply.status, reply.body) {
        (None | Some(504), _) if out_of_time => Reply::TimedOut,
        (None, _) => Reply::NoAnswer,
        (Some(_), ReplyBody::TooLarge(size)) => {
            log::warn!("callout answer of {size} bytes is over the {MAX_CALLOUT_BODY}-byte limit");
            Reply::TooLarge
        }
        (Some(status), ReplyBody::Read(body)) => Reply::Response {
            status,
            body,
            throttled: reply.throttled,
        },
    };
    match &reply {
        Reply::Response { status, .. } => {
            log::debug!("callout answered {status} after {elapsed} ms")
        }
        Reply::TooLarge => {}
        Reply::NoAnswer => log::warn!("callout got no answer after {elapsed} ms"),
        Reply::TimedOut => log::warn!("callout timed out after {elapsed} ms"),
    }
    reply
}

/// Whether a client header `name` is another spelling of the identity header
/// `identity`: equal once lower-cased with `_` read as `-` (as WSGI/CGI,
/// Rails, PHP and others read header names), but not the same bytes.
pub fn spells_header(name: &[u8], identity: &str) -> bool {
    let norm = |b: u8| match b {
        b'_' => b'-',
        b => b.to_ascii_lowercase(),
    };
    name.len() == identity.len()
        && name != identity.as_bytes()
        && name
            .iter()
            .zip(identity.bytes())
            .all(|(&a, b)| norm(a) == norm(b))
}

#[cfg(test)]
mod tests {
    //! Whole scenarios on a virtual clock and a fake shared-data store, as
    //! the host would drive them.
    use super::*;
    use crate::store::fake::FakeStore;

    const NOW: u64 = 1_700_000_000_000;

    const INTROSPECTION: &str = r#"{"auth": {"provider_type": "oauth2_token", "config": {
        "introspection": {"url": "http://idp/introspect", "client_id": "c",
                          "client_secret": "s", "timeout_ms": 10000},
        "cache_ttl": 30}}}"#;

    const JWKS: &str = r#"{"auth": {"provider_type": "oauth2_token", "config": {
        "jwks": {"uri": "http://idp/jwks", "cluster": "idp", "token": "jwks-secret"}}}}"#;

    /// Request headers.
    struct Head(Vec<(&'static str, Vec<u8>)>);

    impl RequestHead for Head {
        fn get(&self, name: &str) -> Option<&[u8]> {
            self.0
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.as_slice())
        }
        fn pairs(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
            self.0.iter().map(|(k, v)| (k.as_bytes(), v.as_slice()))
        }
    }

    /// A well-formed RS256 token whose key (`kid` `k1`) is not known yet.
    fn unverified_jwt() -> String {
        use base64::engine::general_purpose::URL_SAFE_NO_PAD;
        use base64::Engine;
        let part = |json: &str| URL_SAFE_NO_PAD.encode(json);
        format!(
            "{}.{}.{}",
            part(r#"{"alg":"RS256","kid":"k1","typ":"JWT"}"#),
            part(r#"{"sub":"alice","aud":"llama-stack","exp":4102444800}"#),
            URL_SAFE_NO_PAD.encode([7u8; 256])
        )
    }

    fn bearer(token: &str) -> Head {
        Head(vec![
            (":path", b"/v1/models".to_vec()),
            (":method", b"POST".to_vec()),
            ("authorization", format!("Bearer {token}").into_bytes()),
        ])
    }

    fn driver(config: &str) -> Driver {
        let mut d = Driver::new(Rc::new(Config::parse(config.as_bytes()).unwrap()));
        assert!(matches!(d.poll(), Some(Effect::SetTick(SOON_TICK_MS))));
        d
    }

    fn drain(d: &mut Driver) -> Vec<Effect> {
        std::iter::from_fn(|| d.poll()).collect()
    }

    fn headers(d: &mut Driver, id: u32, head: &Head, store: &FakeStore) -> RequestHandle {
        let req = RequestHandle::new(id);
        d.on_request_headers(&req, head, || None, Some(NOW), store);
        req
    }

    /// The one dispatch among the queued effects, reported sent as `token`.
    fn send(d: &mut Driver, token: u32, store: &FakeStore) -> Dispatch {
        let mut sent: Vec<Dispatch> = drain(d)
            .into_iter()
            .filter_map(|e| match e {
                Effect::Dispatch(x) => Some(x),
                _ => None,
            })
            .collect();
        assert_eq!(sent.len(), 1, "{sent:?}");
        let x = sent.remove(0);
        d.dispatched(x.id, Ok(token), NOW, store);
        x
    }

    /// The id of the one callout among the queued effects (not reported sent).
    fn dispatch_id(d: &mut Driver) -> u64 {
        drain(d)
            .iter()
            .find_map(|e| match e {
                Effect::Dispatch(x) => Some(x.id),
                _ => None,
            })
            .unwrap()
    }

    fn active(sub: &str) -> CalloutReply {
        let body = format!(r#"{{"active": true, "sub": "{sub}", "exp": 99999999999}}"#);
        CalloutReply {
            status: Some(200),
            body: ReplyBody::Read(body.into_bytes()),
            throttled: false,
        }
    }

    /// Allowed ids and whether resumed; denied ids and their status.
    type Outcomes = (Vec<(u32, bool)>, Vec<(u32, u32)>);

    fn outcomes(effects: &[Effect]) -> Outcomes {
        let mut allowed = Vec::new();
        let mut denied = Vec::new();
        for e in effects {
            match e {
                Effect::Allow { req, resume, .. } => allowed.push((req.id(), *resume)),
                Effect::Deny { id, denial, .. } => denied.push((*id, denial.status())),
                _ => {}
            }
        }
        (allowed, denied)
    }

    #[test]
    fn requests_with_one_token_share_one_callout_and_are_resumed_by_its_answer() {
        let store = FakeStore::new();
        let mut d = driver(INTROSPECTION);
        let a = headers(&mut d, 1, &bearer("tok"), &store);
        let b = headers(&mut d, 2, &bearer("tok"), &store);
        // Parked, bodies held; one tick asked for.
        assert_eq!((a.phase(), b.phase()), (Phase::Waiting, Phase::Waiting));
        assert!(!a.may_continue() && !b.may_continue());
        let effects = drain(&mut d);
        assert!(matches!(
            effects.as_slice(),
            [Effect::SetTick(SOON_TICK_MS)]
        ));
        d.on_tick(NOW, &store);
        let sent = send(&mut d, 7, &store);
        assert_eq!(sent.cluster, "idp");
        assert!(sent
            .headers
            .contains(&(":path".into(), "/introspect".into())));
        d.on_callout_reply(7, active("alice"), Some(NOW + 5), &store);
        let effects = drain(&mut d);
        assert_eq!(outcomes(&effects), (vec![(1, true), (2, true)], vec![]));
        assert!(a.may_continue() && b.may_continue());
        assert!(effects.iter().any(|e| matches!(
            e,
            Effect::Count(Metric::Callout {
                provider: "introspection",
                outcome: "ok"
            })
        )));
        // Cached now: decided at once, no callout.
        let c = headers(&mut d, 3, &bearer("tok"), &store);
        assert_eq!(outcomes(&drain(&mut d)), (vec![(3, false)], vec![]));
        assert!(c.may_continue());
    }

    #[test]
    fn waiters_beyond_the_cap_get_503_at_once() {
        let store = FakeStore::new();
        let mut d = driver(INTROSPECTION);
        for id in 0..MAX_CALLOUT_WAITERS {
            headers(&mut d, id as u32, &bearer("tok"), &store);
        }
        drain(&mut d);
        let late = headers(&mut d, 99_999, &bearer("tok"), &store);
        assert_eq!(outcomes(&drain(&mut d)), (vec![], vec![(99_999, 503)]));
        assert_eq!(late.phase(), Phase::Answered);
        assert!(!late.may_continue());
    }

    #[test]
    fn distinct_callouts_beyond_the_cap_get_503() {
        let store = FakeStore::new();
        let mut d = driver(INTROSPECTION);
        for id in 0..MAX_PROVIDER_CALLOUTS {
            headers(&mut d, id as u32, &bearer(&format!("tok-{id}")), &store);
        }
        drain(&mut d);
        headers(&mut d, 5000, &bearer("one-more"), &store);
        assert_eq!(outcomes(&drain(&mut d)), (vec![], vec![(5000, 503)]));
    }

    #[test]
    fn waiters_are_answered_a_batch_per_callback() {
        let store = FakeStore::new();
        let mut d = driver(INTROSPECTION);
        let reqs: Vec<RequestHandle> = (0..100)
            .map(|id| headers(&mut d, id, &bearer("tok"), &store))
            .collect();
        drain(&mut d);
        d.on_tick(NOW, &store);
        send(&mut d, 1, &store);
        let refused = CalloutReply {
            status: Some(200),
            body: ReplyBody::Read(br#"{"active": false}"#.to_vec()),
            throttled: false,
        };
        d.on_callout_reply(1, refused, Some(NOW), &store);
        let effects = drain(&mut d);
        assert_eq!(outcomes(&effects).1.len(), RESUME_BATCH);
        assert!(effects
            .iter()
            .any(|e| matches!(e, Effect::SetTick(SOON_TICK_MS))));
        d.on_tick(NOW + 1, &store);
        assert_eq!(outcomes(&drain(&mut d)).1.len(), 100 - RESUME_BATCH);
        assert!(reqs.iter().all(|r| r.phase() == Phase::Answered));
    }

    #[test]
    fn a_request_that_ended_while_waiting_is_forgotten() {
        let store = FakeStore::new();
        let mut d = driver(INTROSPECTION);
        let a = headers(&mut d, 1, &bearer("tok"), &store);
        headers(&mut d, 2, &bearer("tok"), &store);
        d.on_log(&a, || Some(NOW), &store);
        d.on_tick(NOW, &store);
        send(&mut d, 3, &store);
        d.on_callout_reply(3, active("alice"), Some(NOW), &store);
        assert_eq!(outcomes(&drain(&mut d)), (vec![(2, true)], vec![]));
        // Both gone: the cap counts nobody.
        assert_eq!(d.callout_waiting, 0);
    }

    #[test]
    fn no_answer_within_the_timeout_is_a_timeout_earlier_it_is_unavailable() {
        for (after, message) in [
            (10_000, "Authentication service timeout"),
            (100, "Authentication service unavailable"),
        ] {
            let store = FakeStore::new();
            let mut d = driver(INTROSPECTION);
            headers(&mut d, 1, &bearer("tok"), &store);
            d.on_tick(NOW, &store);
            send(&mut d, 4, &store);
            let none = CalloutReply {
                status: None,
                body: ReplyBody::Read(Vec::new()),
                throttled: false,
            };
            d.on_callout_reply(4, none, Some(NOW + after), &store);
            let effects = drain(&mut d);
            let denial = effects.iter().find_map(|e| match e {
                Effect::Deny { denial, .. } => Some(denial.to_string()),
                _ => None,
            });
            assert_eq!(denial.as_deref(), Some(message));
        }
    }

    #[test]
    fn a_callout_that_cannot_be_sent_answers_503_and_is_not_cached() {
        let store = FakeStore::new();
        let mut d = driver(INTROSPECTION);
        headers(&mut d, 1, &bearer("tok"), &store);
        d.on_tick(NOW, &store);
        let id = dispatch_id(&mut d);
        d.dispatched(id, Err(()), NOW, &store);
        assert_eq!(outcomes(&drain(&mut d)), (vec![], vec![(1, 503)]));
        headers(&mut d, 2, &bearer("tok"), &store);
        assert_eq!(outcomes(&drain(&mut d)), (vec![], vec![]));
    }

    #[test]
    fn a_failed_clock_refuses_with_500() {
        let store = FakeStore::new();
        let mut d = driver(INTROSPECTION);
        let req = RequestHandle::new(1);
        d.on_request_headers(&req, &bearer("tok"), || None, None, &store);
        assert_eq!(outcomes(&drain(&mut d)), (vec![], vec![(1, 500)]));
        assert_eq!(req.phase(), Phase::Answered);
    }

    #[test]
    fn a_failed_identity_header_write_refuses_the_request() {
        let store = FakeStore::new();
        let mut d = driver(r#"{}"#);
        let req = headers(&mut d, 1, &bearer("tok"), &store);
        assert!(req.may_continue());
        drain(&mut d);
        d.forward_failed(&req, false, NOW, &store);
        assert_eq!(outcomes(&drain(&mut d)), (vec![], vec![(1, 500)]));
        assert!(!req.may_continue());
    }

    #[test]
    fn grpc_calls_are_denied_as_grpc_and_other_spellings_are_removed() {
        let store = FakeStore::new();
        let mut d = driver(INTROSPECTION);
        let mut head = bearer("");
        head.0.push(("content-type", b"application/grpc".to_vec()));
        headers(&mut d, 1, &head, &store);
        assert!(drain(&mut d).iter().any(|e| matches!(
            e,
            Effect::Deny {
                answer_as: AnswerAs::Grpc { .. },
                ..
            }
        )));
        let mut d = driver("{}");
        let mut head = bearer("tok");
        head.0.push(("x_auth_principal", b"mallory".to_vec()));
        head.0.push(("X-Auth_Attributes", b"{}".to_vec()));
        head.0.push(("x-auth-principal", b"mallory".to_vec()));
        headers(&mut d, 1, &head, &store);
        let spoofed = drain(&mut d).into_iter().find_map(|e| match e {
            Effect::Allow { spoofed, .. } => Some(spoofed),
            _ => None,
        });
        assert_eq!(
            spoofed,
            Some(vec![
                "x_auth_principal".to_string(),
                "X-Auth_Attributes".to_string()
            ])
        );
    }

    #[test]
    fn requests_wait_for_the_first_key_set_and_are_decided_when_it_arrives() {
        let store = FakeStore::new();
        let mut d = driver(JWKS);
        let req = headers(&mut d, 1, &bearer(&unverified_jwt()), &store);
        assert_eq!(req.phase(), Phase::Waiting, "{:?}", drain(&mut d));
        drain(&mut d);
        d.on_tick(NOW, &store);
        let sent = send(&mut d, 9, &store);
        assert_eq!(sent.cluster, "idp");
        // The fetch's bearer token never shows in Debug output.
        assert!(!format!("{sent:?}").contains("jwks-secret"));
        assert!(sent
            .headers
            .contains(&("authorization".into(), "Bearer jwks-secret".into())));
        let keys = CalloutReply {
            status: Some(200),
            body: ReplyBody::Read(br#"{"keys": []}"#.to_vec()),
            throttled: false,
        };
        d.on_callout_reply(9, keys, Some(NOW + 3), &store);
        let effects = drain(&mut d);
        assert_eq!(outcomes(&effects), (vec![], vec![(1, 401)]));
        assert!(effects
            .iter()
            .any(|e| matches!(e, Effect::Count(Metric::JwksFetch { failed: false }))));
    }

    const SEVERAL: &str = r#"{"auth": {"providers": [
        {"type": "oauth2_token", "issuer": "https://a", "jwks": {"uri": "http://a/jwks", "cluster": "ia"}},
        {"type": "oauth2_token", "issuer": "https://b", "jwks": {"uri": "http://b/jwks", "cluster": "ib"}},
        {"type": "local_api_key", "api_keys": ["key-1"]}]}}"#;

    /// An RS256 token of `iss` whose key (`kid` `k1`) no key set has.
    fn jwt_of(iss: &str) -> String {
        use base64::engine::general_purpose::URL_SAFE_NO_PAD;
        use base64::Engine;
        let part = |json: &str| URL_SAFE_NO_PAD.encode(json);
        format!(
            "{}.{}.{}",
            part(r#"{"alg":"RS256","kid":"k1"}"#),
            part(&format!(
                r#"{{"sub":"alice","iss":"{iss}","aud":"llama-stack","exp":4102444800}}"#
            )),
            URL_SAFE_NO_PAD.encode([7u8; 256])
        )
    }

    #[test]
    fn several_providers_each_issuer_its_own_key_set_other_tokens_the_fallback() {
        let store = FakeStore::new();
        let mut d = driver(SEVERAL);
        // Both key sets are fetched, each from its own cluster.
        d.on_tick(NOW, &store);
        let sent: Vec<Dispatch> = drain(&mut d)
            .into_iter()
            .filter_map(|e| match e {
                Effect::Dispatch(x) => Some(x),
                _ => None,
            })
            .collect();
        let clusters: Vec<&str> = sent.iter().map(|x| x.cluster.as_str()).collect();
        assert_eq!(clusters, ["ia", "ib"]);
        d.dispatched(sent[0].id, Ok(1), NOW, &store);
        d.dispatched(sent[1].id, Ok(2), NOW, &store);
        // A's keys arrive; B's are still on their way.
        let keys = CalloutReply {
            status: Some(200),
            body: ReplyBody::Read(br#"{"keys": []}"#.to_vec()),
            throttled: false,
        };
        d.on_callout_reply(1, keys.clone(), Some(NOW + 1), &store);
        drain(&mut d);
        // A's token is decided by A's keys (none has `k1`; the refresh is
        // in its cooldown); B's waits for B's.
        let a = headers(&mut d, 10, &bearer(&jwt_of("https://a")), &store);
        let b = headers(&mut d, 11, &bearer(&jwt_of("https://b")), &store);
        assert_eq!(a.phase(), Phase::Answered);
        assert_eq!(b.phase(), Phase::Waiting);
        d.on_callout_reply(2, keys, Some(NOW + 2), &store);
        assert_eq!(b.phase(), Phase::Answered);
        drain(&mut d);
        // Any other token: the API keys, whose 401 is the last word.
        let key = headers(&mut d, 12, &bearer("key-1"), &store);
        assert!(matches!(key.phase(), Phase::Allowed(_)));
        for (id, token) in [(13, jwt_of("https://c")), (14, "nope".to_string())] {
            headers(&mut d, id, &bearer(&token), &store);
            let effects = drain(&mut d);
            let denial = effects.iter().find_map(|e| match e {
                Effect::Deny { denial, .. } => Some(denial.to_string()),
                _ => None,
            });
            assert_eq!(denial.as_deref(), Some("Invalid or missing API key"));
        }
        // No token: the first provider's message.
        let none = Head(vec![(":path", b"/v1/models".to_vec())]);
        headers(&mut d, 15, &none, &store);
        let effects = drain(&mut d);
        assert!(effects
            .iter()
            .any(|e| matches!(e, Effect::Deny { denial, .. }
            if denial.to_string().ends_with("OAuth2 Bearer token from https://a"))));
    }

    const GITHUB: &str = r#"{"auth": {"provider_config": {"type": "github_token",
        "github_api_base_url": "http://gh/api", "cluster": "gh"}}}"#;

    fn reply(status: u16, body: &str, throttled: bool) -> CalloutReply {
        CalloutReply {
            status: Some(status),
            body: ReplyBody::Read(body.as_bytes().to_vec()),
            throttled,
        }
    }

    fn header<'a>(x: &'a Dispatch, name: &str) -> &'a str {
        x.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .unwrap()
    }

    #[test]
    fn a_github_exchange_is_chained_calls_that_its_waiters_share() {
        let store = FakeStore::new();
        let mut d = driver(GITHUB);
        let a = headers(&mut d, 1, &bearer("ghp_x"), &store);
        let b = headers(&mut d, 2, &bearer("ghp_x"), &store);
        d.on_tick(NOW, &store);
        let user = send(&mut d, 7, &store);
        assert_eq!(
            (
                header(&user, ":method"),
                header(&user, ":path"),
                user.cluster.as_str()
            ),
            ("GET", "/api/user", "gh")
        );
        assert_eq!(header(&user, "authorization"), "Bearer ghp_x");
        assert_eq!(user.body, None);
        d.on_callout_reply(
            7,
            reply(200, r#"{"login": "octocat", "id": 1}"#, false),
            Some(NOW + 1),
            &store,
        );
        assert_eq!((a.phase(), b.phase()), (Phase::Waiting, Phase::Waiting));
        d.on_tick(NOW + 2, &store);
        let orgs = send(&mut d, 8, &store);
        assert_eq!(header(&orgs, ":path"), "/api/user/orgs?per_page=100&page=1");
        assert_eq!(header(&orgs, "authorization"), "Bearer ghp_x");
        d.on_callout_reply(
            8,
            reply(200, r#"[{"login": "github"}]"#, false),
            Some(NOW + 3),
            &store,
        );
        let effects = drain(&mut d);
        assert_eq!(outcomes(&effects), (vec![(1, true), (2, true)], vec![]));
        assert!(effects.iter().any(|e| matches!(
            e,
            Effect::Count(Metric::Callout {
                provider: "github",
                outcome: "ok"
            })
        )));
        // Cached: no call.
        let c = headers(&mut d, 3, &bearer("ghp_x"), &store);
        assert!(matches!(c.phase(), Phase::Allowed(_)));
    }

    #[test]
    fn github_rate_limits_are_503_and_never_cached() {
        let store = FakeStore::new();
        let mut d = driver(GITHUB);
        for (round, at_orgs) in [(0u32, false), (1, true)] {
            let id = 10 + round;
            let req = headers(&mut d, id, &bearer("ghp_y"), &store);
            d.on_tick(NOW, &store);
            let token = 20 + round * 2;
            send(&mut d, token, &store);
            if at_orgs {
                d.on_callout_reply(
                    token,
                    reply(200, r#"{"login": "o", "id": 1}"#, false),
                    Some(NOW),
                    &store,
                );
                d.on_tick(NOW, &store);
                send(&mut d, token + 1, &store);
                d.on_callout_reply(token + 1, reply(403, "{}", true), Some(NOW), &store);
            } else {
                d.on_callout_reply(token, reply(429, "{}", true), Some(NOW), &store);
            }
            let effects = drain(&mut d);
            assert_eq!(outcomes(&effects), (vec![], vec![(id, 503)]));
            assert_eq!(req.phase(), Phase::Answered);
        }
        // A plain 403 is GitHub refusing the token: 401, remembered briefly.
        headers(&mut d, 30, &bearer("ghp_z"), &store);
        d.on_tick(NOW, &store);
        send(&mut d, 40, &store);
        d.on_callout_reply(40, reply(403, "{}", false), Some(NOW), &store);
        assert_eq!(outcomes(&drain(&mut d)), (vec![], vec![(30, 401)]));
        let again = headers(&mut d, 31, &bearer("ghp_z"), &store);
        assert_eq!(again.phase(), Phase::Answered);
    }

    #[test]
    fn a_key_set_fetch_that_cannot_be_sent_answers_503() {
        let store = FakeStore::new();
        let mut d = driver(JWKS);
        headers(&mut d, 1, &bearer(&unverified_jwt()), &store);
        d.on_tick(NOW, &store);
        let id = dispatch_id(&mut d);
        d.dispatched(id, Err(()), NOW, &store);
        let effects = drain(&mut d);
        assert_eq!(outcomes(&effects), (vec![], vec![(1, 503)]));
        assert!(effects
            .iter()
            .any(|e| matches!(e, Effect::Count(Metric::JwksFetch { failed: true }))));
    }

    #[test]
    fn no_request_waits_for_keys_without_end() {
        // Every write loses its race: no VM ever holds the fetch lease.
        let store = FakeStore::new();
        store.inject_mismatches(u32::MAX);
        let mut d = driver(JWKS);
        let req = headers(&mut d, 1, &bearer(&unverified_jwt()), &store);
        let limit = key_wait_limit_ms(d.core.jwt_config(0).unwrap());
        d.on_tick(NOW, &store);
        d.on_tick(NOW + limit, &store);
        let effects = drain(&mut d);
        assert!(!effects.iter().any(|e| matches!(e, Effect::Dispatch(_))));
        assert_eq!(outcomes(&effects), (vec![], vec![]));
        assert_eq!(req.phase(), Phase::Waiting);
        d.on_tick(NOW + limit + 1, &store);
        assert_eq!(outcomes(&drain(&mut d)), (vec![], vec![(1, 503)]));
        assert_eq!(req.phase(), Phase::Answered);
    }

    fn rls_config(failure_mode: &str) -> String {
        format!(
            r#"{{"quota": {{"anonymous_max_requests": 5, "period": "minute",
                "backend": {{"type": "rls", "cluster": "ratelimit", "domain": "tollgate",
                             "failure_mode": "{failure_mode}"}}}}}}"#
        )
    }

    fn anonymous() -> Head {
        Head(vec![(":path", b"/v1/models".to_vec())])
    }

    /// Sends the request's rate-limit call (reported as `token`); the call.
    fn send_grpc(d: &mut Driver, token: u32, store: &FakeStore) -> GrpcDispatch {
        let call = drain(d)
            .into_iter()
            .find_map(|e| match e {
                Effect::DispatchGrpc(g) => Some(g),
                _ => None,
            })
            .expect("a rate-limit call");
        d.dispatched_grpc(call.id, Ok(token), NOW, store);
        call
    }

    fn rls_answer(code: i32, remaining: u32, reset_s: i64) -> Vec<u8> {
        use crate::rls::{DescriptorStatus, Duration, RateLimit, RateLimitResponse};
        use prost::Message;
        RateLimitResponse {
            overall_code: code,
            statuses: vec![DescriptorStatus {
                code,
                current_limit: Some(RateLimit {
                    requests_per_unit: 5,
                    unit: 2,
                }),
                limit_remaining: remaining,
                duration_until_reset: Some(Duration {
                    seconds: reset_s,
                    nanos: 0,
                }),
            }],
        }
        .encode_to_vec()
    }

    #[test]
    fn the_rate_limit_service_counts_and_its_answer_decides() {
        let store = FakeStore::new();
        let mut d = driver(&rls_config("deny"));
        let head = Head(vec![(":path", b"/v1/models".to_vec())]);
        let req = RequestHandle::new(1);
        d.on_request_headers(
            &req,
            &head,
            || Some("2001:db8:1:2::9".into()),
            Some(NOW),
            &store,
        );
        assert_eq!(req.phase(), Phase::Waiting);
        let call = send_grpc(&mut d, 11, &store);
        assert_eq!(call.service, crate::rls::grpc_service("ratelimit"));
        let sent =
            <crate::rls::RateLimitRequest as prost::Message>::decode(call.message.as_slice())
                .unwrap();
        let entry = &sent.descriptors[0].entries[0];
        assert_eq!(
            (entry.key.as_str(), entry.value.as_str()),
            ("tollgate_anonymous", "2001:db8:1:2::/64")
        );
        assert_eq!(
            sent.descriptors[0]
                .limit
                .as_ref()
                .unwrap()
                .requests_per_unit,
            5
        );
        d.on_grpc_reply(11, 0, &rls_answer(1, 3, 42), Some(NOW + 1), &store);
        assert_eq!(outcomes(&drain(&mut d)), (vec![(1, true)], vec![]));
        assert_eq!(
            req.phase(),
            Phase::Allowed(Some(RateLimit {
                limit: 5,
                remaining: 3,
                reset: 42
            }))
        );
        // Over the limit: 429 with the service's reset.
        let req = RequestHandle::new(2);
        d.on_request_headers(&req, &anonymous(), || None, Some(NOW), &store);
        send_grpc(&mut d, 12, &store);
        d.on_grpc_reply(12, 0, &rls_answer(2, 0, 7), Some(NOW), &store);
        let effects = drain(&mut d);
        assert_eq!(outcomes(&effects), (vec![], vec![(2, 429)]));
        assert!(effects.iter().any(|e| matches!(
            e,
            Effect::Deny {
                denial: Denial::QuotaExceeded { retry_after: 7, .. },
                ..
            }
        )));
        // Nothing was counted here.
        assert_eq!(store.entries(), 0);
    }

    #[test]
    fn a_failing_rate_limit_service_denies_or_falls_back_as_configured() {
        for (mode, expected) in [
            ("deny", (vec![], vec![(1, 503)])),
            ("local", (vec![(1, true)], vec![])),
        ] {
            // A gRPC error, garbage, an unknown code, a call that cannot start.
            for failure in 0..4 {
                let store = FakeStore::new();
                let mut d = driver(&rls_config(mode));
                let req = RequestHandle::new(1);
                d.on_request_headers(
                    &req,
                    &anonymous(),
                    || Some("192.0.2.1".into()),
                    Some(NOW),
                    &store,
                );
                match failure {
                    0 => {
                        send_grpc(&mut d, 5, &store);
                        d.on_grpc_reply(5, 14, b"", Some(NOW), &store);
                    }
                    1 => {
                        send_grpc(&mut d, 5, &store);
                        d.on_grpc_reply(5, 0, b"\xff\xff", Some(NOW), &store);
                    }
                    2 => {
                        send_grpc(&mut d, 5, &store);
                        d.on_grpc_reply(5, 0, &rls_answer(0, 1, 1), Some(NOW), &store);
                    }
                    _ => {
                        let id = drain(&mut d)
                            .into_iter()
                            .find_map(|e| match e {
                                Effect::DispatchGrpc(g) => Some(g.id),
                                _ => None,
                            })
                            .unwrap();
                        d.dispatched_grpc(id, Err(()), NOW, &store);
                    }
                }
                let effects = drain(&mut d);
                assert_eq!(outcomes(&effects), expected, "{mode} {failure}");
                let fell_back = effects
                    .iter()
                    .any(|e| matches!(e, Effect::Count(Metric::QuotaFallback)));
                assert_eq!(fell_back, mode == "local", "{mode} {failure}");
                // Counted locally only when falling back.
                assert_eq!(store.entries() > 0, mode == "local", "{mode} {failure}");
            }
        }
    }

    #[test]
    fn a_request_that_ended_while_counted_is_forgotten() {
        let store = FakeStore::new();
        let mut d = driver(&rls_config("deny"));
        let req = headers(&mut d, 1, &anonymous(), &store);
        send_grpc(&mut d, 9, &store);
        d.on_log(&req, || Some(NOW), &store);
        d.on_grpc_reply(9, 0, &rls_answer(1, 1, 1), Some(NOW), &store);
        assert_eq!(outcomes(&drain(&mut d)), (vec![], vec![]));
        assert!(d.counting.is_empty() && d.counting_sent.is_empty());
    }

    fn batched_config(max_batch: usize, timeout_ms: u64) -> String {
        format!(
            r#"{{"quota": {{"anonymous_max_requests": 5, "period": "minute",
                "backend": {{"type": "rls", "cluster": "ratelimit", "domain": "tollgate",
                             "timeout_ms": {timeout_ms}, "max_batch": {max_batch}}}}}}}"#
        )
    }

    /// Drains the effects, waking the driver as the root context would
    /// whenever it asks to be.
    fn pump(d: &mut Driver, now: u64, store: &FakeStore) -> Vec<Effect> {
        let mut all = Vec::new();
        loop {
            let effects = drain(d);
            let woken = effects.iter().any(|e| matches!(e, Effect::Wake));
            all.extend(effects);
            if !woken {
                return all;
            }
            d.on_wake(now, store);
        }
    }

    /// The rate-limit calls among the effects.
    fn grpc_calls(effects: &[Effect]) -> Vec<&GrpcDispatch> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::DispatchGrpc(g) => Some(g),
                _ => None,
            })
            .collect()
    }

    /// The clients of a rate-limit call's descriptors, in order.
    fn clients(call: &GrpcDispatch) -> Vec<String> {
        <crate::rls::RateLimitRequest as prost::Message>::decode(call.message.as_slice())
            .unwrap()
            .descriptors
            .iter()
            .map(|d| d.entries[0].value.clone())
            .collect()
    }

    /// An envoyproxy/ratelimit answer: one status per descriptor, OVER_LIMIT
    /// overall when any is.
    fn statuses_answer(over: &[bool]) -> Vec<u8> {
        use crate::rls::{DescriptorStatus, Duration, RateLimit, RateLimitResponse};
        use prost::Message;
        let code = |o: bool| if o { 2 } else { 1 };
        RateLimitResponse {
            overall_code: code(over.iter().any(|o| *o)),
            statuses: over
                .iter()
                .map(|o| DescriptorStatus {
                    code: code(*o),
                    current_limit: Some(RateLimit {
                        requests_per_unit: 5,
                        unit: 2,
                    }),
                    limit_remaining: 1,
                    duration_until_reset: Some(Duration {
                        seconds: 30,
                        nanos: 0,
                    }),
                })
                .collect(),
        }
        .encode_to_vec()
    }

    /// Request `id` from the anonymous client `192.0.2.<id>`.
    fn counted_request(d: &mut Driver, id: u32, now: u64, store: &FakeStore) -> RequestHandle {
        let req = RequestHandle::new(id);
        d.on_request_headers(
            &req,
            &anonymous(),
            || Some(format!("192.0.2.{id}")),
            Some(now),
            store,
        );
        req
    }

    #[test]
    fn batched_counts_go_one_call_at_a_time_and_each_request_gets_its_own_verdict() {
        let store = FakeStore::new();
        let mut d = driver(&batched_config(3, 100));
        pump(&mut d, NOW, &store);
        // The first goes alone, sent from the root context; the next four
        // wait for its answer.
        let first = counted_request(&mut d, 1, NOW, &store);
        let effects = drain(&mut d);
        assert!(grpc_calls(&effects).is_empty() && matches!(effects[..], [Effect::Wake]));
        d.on_wake(NOW, &store);
        let effects = pump(&mut d, NOW, &store);
        let calls = grpc_calls(&effects);
        assert_eq!(calls.len(), 1);
        assert_eq!(clients(calls[0]), ["192.0.2.1/32"]);
        assert_eq!(calls[0].timeout_ms, 100);
        d.dispatched_grpc(calls[0].id, Ok(1), NOW, &store);
        let mut reqs: Vec<_> = (2..=5)
            .map(|id| counted_request(&mut d, id, NOW, &store))
            .collect();
        assert!(grpc_calls(&pump(&mut d, NOW, &store)).is_empty());
        reqs.push(first);
        assert!(reqs.iter().all(|r| r.phase() == Phase::Waiting));
        // Its answer ends it, and the next three go in one call, each with
        // its own descriptor, with what is left of their timeout.
        d.on_grpc_reply(1, 0, &statuses_answer(&[false]), Some(NOW + 30), &store);
        let effects = pump(&mut d, NOW + 30, &store);
        assert_eq!(outcomes(&effects), (vec![(1, true)], vec![]));
        let calls = grpc_calls(&effects);
        assert_eq!(calls.len(), 1);
        assert_eq!(clients(calls[0]).len(), 3);
        assert_eq!(calls[0].timeout_ms, 70);
        d.dispatched_grpc(calls[0].id, Ok(2), NOW + 30, &store);
        // Each request gets its descriptor's verdict; the fifth goes next.
        d.on_grpc_reply(
            2,
            0,
            &statuses_answer(&[false, true, false]),
            Some(NOW + 40),
            &store,
        );
        let effects = pump(&mut d, NOW + 40, &store);
        assert_eq!(
            outcomes(&effects),
            (vec![(2, true), (4, true)], vec![(3, 429)])
        );
        let calls = grpc_calls(&effects);
        assert_eq!(calls.len(), 1);
        assert_eq!(clients(calls[0]).len(), 1);
        assert_eq!(calls[0].timeout_ms, 60);
        d.dispatched_grpc(calls[0].id, Ok(3), NOW + 40, &store);
        d.on_grpc_reply(3, 0, &statuses_answer(&[true]), Some(NOW + 41), &store);
        assert_eq!(
            outcomes(&pump(&mut d, NOW, &store)),
            (vec![], vec![(5, 429)])
        );
        assert_eq!(
            (d.count_waiting, d.counting.len(), d.count_queue.len()),
            (0, 0, 0)
        );
        assert_eq!(store.entries(), 0);
    }

    #[test]
    fn a_batch_answered_badly_or_late_fails_every_request_in_it() {
        for mode in ["deny", "local"] {
            let cfg = batched_config(4, 50).replace(
                r#""max_batch""#,
                &format!(r#""failure_mode": "{mode}", "max_batch""#),
            );
            let store = FakeStore::new();
            let mut d = driver(&cfg);
            pump(&mut d, NOW, &store);
            counted_request(&mut d, 1, NOW, &store);
            let first = grpc_calls(&pump(&mut d, NOW, &store))[0].id;
            d.dispatched_grpc(first, Ok(1), NOW, &store);
            counted_request(&mut d, 2, NOW, &store);
            counted_request(&mut d, 3, NOW, &store);
            // A status for one of the two descriptors only: both fail.
            d.on_grpc_reply(1, 0, &statuses_answer(&[false]), Some(NOW + 1), &store);
            let effects = pump(&mut d, NOW, &store);
            let second = grpc_calls(&effects)[0].id;
            d.dispatched_grpc(second, Ok(2), NOW + 1, &store);
            d.on_grpc_reply(2, 0, &statuses_answer(&[false]), Some(NOW + 2), &store);
            let mut effects = effects;
            effects.extend(pump(&mut d, NOW, &store));
            let expected = if mode == "deny" {
                (vec![(1, true)], vec![(2, 503), (3, 503)])
            } else {
                (vec![(1, true), (2, true), (3, true)], vec![])
            };
            assert_eq!(outcomes(&effects), expected, "{mode}");
            // A request that waited all of timeout_ms for a call ends as the
            // service failing, without a call of its own.
            counted_request(&mut d, 7, NOW, &store);
            let call = grpc_calls(&pump(&mut d, NOW, &store))[0].id;
            d.dispatched_grpc(call, Ok(3), NOW, &store);
            counted_request(&mut d, 8, NOW, &store);
            d.on_grpc_reply(3, 4, b"", Some(NOW + 50), &store);
            let effects = pump(&mut d, NOW + 50, &store);
            assert!(grpc_calls(&effects).is_empty(), "{mode}");
            let expected = if mode == "deny" {
                (vec![], vec![(7, 503), (8, 503)])
            } else {
                (vec![(7, true), (8, true)], vec![])
            };
            assert_eq!(outcomes(&effects), expected, "{mode}");
            assert_eq!(d.count_waiting, 0, "{mode}");
        }
    }

    #[test]
    fn batched_counts_wake_the_root_context_or_else_go_on_the_tick() {
        let store = FakeStore::new();
        let mut d = driver(&batched_config(4, 100));
        assert!(drain(&mut d).iter().any(|e| matches!(e, Effect::OpenWake)));
        // Unbatched, nothing to set up: the call goes from the request's
        // own callback.
        let mut plain = driver(&rls_config("deny"));
        assert!(!drain(&mut plain)
            .iter()
            .any(|e| matches!(e, Effect::OpenWake)));
        counted_request(&mut plain, 1, NOW, &store);
        assert_eq!(grpc_calls(&drain(&mut plain)).len(), 1);
        // Waking failed: a soon tick sends the call instead.
        d.wake_unavailable();
        drain(&mut d);
        counted_request(&mut d, 1, NOW, &store);
        let effects = drain(&mut d);
        assert!(!effects.iter().any(|e| matches!(e, Effect::Wake)));
        assert!(grpc_calls(&effects).is_empty());
        d.on_tick(NOW + 1, &store);
        assert_eq!(grpc_calls(&drain(&mut d)).len(), 1);
    }

    #[test]
    fn a_request_that_ended_in_a_batch_leaves_the_others_their_verdicts() {
        let store = FakeStore::new();
        let mut d = driver(&batched_config(8, 100));
        pump(&mut d, NOW, &store);
        counted_request(&mut d, 1, NOW, &store);
        let first = grpc_calls(&pump(&mut d, NOW, &store))[0].id;
        d.dispatched_grpc(first, Ok(1), NOW, &store);
        let reqs: Vec<_> = (2..=4)
            .map(|id| counted_request(&mut d, id, NOW, &store))
            .collect();
        // One leaves while queued, one while its batch is under way.
        d.on_log(&reqs[0], || Some(NOW), &store);
        d.on_grpc_reply(1, 0, &statuses_answer(&[false]), Some(NOW), &store);
        let effects = pump(&mut d, NOW, &store);
        assert_eq!(outcomes(&effects), (vec![(1, true)], vec![]));
        let call = grpc_calls(&effects)[0];
        assert_eq!(clients(call), ["192.0.2.3/32", "192.0.2.4/32"]);
        d.dispatched_grpc(call.id, Ok(2), NOW, &store);
        d.on_log(&reqs[1], || Some(NOW), &store);
        assert_eq!(d.count_waiting, 1);
        d.on_grpc_reply(2, 0, &statuses_answer(&[true, false]), Some(NOW), &store);
        assert_eq!(
            outcomes(&pump(&mut d, NOW, &store)),
            (vec![(4, true)], vec![])
        );
        assert_eq!(d.count_waiting, 0);
    }

    fn token_config() -> &'static str {
        r#"{"quota": {"tokens": {"authenticated_max_tokens": 1000, "anonymous_max_tokens": 100,
                                 "reserve_tokens": 30, "unreported_tokens": 25}}}"#
    }

    fn chat(method: &str) -> Head {
        Head(vec![
            (":path", b"/v1/chat/completions".to_vec()),
            (":method", method.as_bytes().to_vec()),
        ])
    }

    /// Request `id` from 192.0.2.1 to the chat completions path.
    fn chat_request(d: &mut Driver, id: u32, method: &str, store: &FakeStore) -> RequestHandle {
        let req = RequestHandle::new(id);
        d.on_request_headers(
            &req,
            &chat(method),
            || Some("192.0.2.1".into()),
            Some(NOW),
            store,
        );
        req
    }

    fn token_count(store: &FakeStore) -> Option<u64> {
        (0..65_536)
            .find_map(|n| store.value(&format!("tollgate/tokens/anon/{n}")))
            .and_then(|v| v.rsplit(' ').next().and_then(|n| n.parse().ok()))
    }

    fn charged(effects: &[Effect]) -> Vec<(u64, bool)> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Count(Metric::Tokens { charged, usage, .. }) => {
                    Some((*charged, usage.is_some()))
                }
                _ => None,
            })
            .collect()
    }

    #[test]
    fn token_budgets_reserve_before_and_settle_after_the_answer() {
        let store = FakeStore::new();
        let mut d = driver(token_config());
        drain(&mut d);
        // A JSON answer: 30 reserved, then 12 charged from its usage.
        let req = chat_request(&mut d, 1, "POST", &store);
        assert_eq!(outcomes(&drain(&mut d)), (vec![(1, false)], vec![]));
        assert_eq!(token_count(&store), Some(30));
        let headers = d.on_response_headers(&req, Some(b"application/json; charset=utf-8"));
        let h = |k: &str| {
            headers
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(h("x-ratelimit-limit-tokens").as_deref(), Some("100"));
        assert_eq!(h("x-ratelimit-remaining-tokens").as_deref(), Some("70"));
        assert_eq!(
            h("ratelimit-policy").as_deref(),
            Some(r#""tokens";q=100;w=86400"#)
        );
        assert!(d.meters(&req));
        let body =
            br#"{"id":"x","usage":{"prompt_tokens":5,"completion_tokens":7,"total_tokens":12}}"#;
        let (a, b) = body.split_at(20);
        d.on_response_body(&req, a, false, None, &store);
        assert_eq!(token_count(&store), Some(30));
        d.on_response_body(&req, b, true, Some(NOW + 5), &store);
        assert_eq!(token_count(&store), Some(12));
        assert_eq!(charged(&drain(&mut d)), [(12, true)]);
        assert!(!d.meters(&req));
        // An answer that ended without usage (the client hung up before
        // the body): unreported_tokens.
        let req = chat_request(&mut d, 2, "POST", &store);
        d.on_log(&req, || Some(NOW + 6), &store);
        assert_eq!(token_count(&store), Some(12 + 25));
        assert_eq!(charged(&drain(&mut d)), [(25, false)]);
        // A stream with usage in its last chunk, read across chunks.
        let req = chat_request(&mut d, 3, "POST", &store);
        drain(&mut d);
        d.on_response_headers(&req, Some(b"text/event-stream"));
        for chunk in [
            &b"data: {\"choices\":[{\"delta\":{}}],\"usage\":null}\r\n\r\ndata: {\"choices\":[],\"us"[..],
            b"age\":{\"prompt_tokens\":3,\"completion_tokens\":40,\"total_tokens\":43}}\r\n\r\n",
            b"data: [DONE]\r\n\r\n",
        ] {
            d.on_response_body(&req, chunk, false, None, &store);
        }
        d.on_response_body(&req, b"", true, Some(NOW + 7), &store);
        assert_eq!(token_count(&store), Some(37 + 43));
        assert_eq!(charged(&drain(&mut d)), [(43, true)]);
        // GETs are not counted.
        chat_request(&mut d, 4, "GET", &store);
        assert_eq!(outcomes(&drain(&mut d)), (vec![(4, false)], vec![]));
        assert_eq!(token_count(&store), Some(80));
        // 80 + 30 reserved: admitted (below 100 before); then 110 ≥ 100: 429.
        let over = chat_request(&mut d, 5, "POST", &store);
        chat_request(&mut d, 6, "POST", &store);
        let effects = drain(&mut d);
        assert_eq!(outcomes(&effects), (vec![(5, false)], vec![(6, 429)]));
        assert!(effects.iter().any(|e| matches!(
            e,
            Effect::Deny {
                denial: Denial::TokensExceeded(Policy {
                    quota: 100,
                    remaining: 0,
                    ..
                }),
                ..
            }
        )));
        // An identity header that cannot be written: the reservation is
        // given back whole.
        d.forward_failed(&over, false, NOW, &store);
        assert_eq!(token_count(&store), Some(80));
    }

    #[test]
    fn a_request_body_naming_its_output_maximum_resizes_the_reservation() {
        let store = FakeStore::new();
        let mut d = driver(token_config());
        drain(&mut d);
        let req = chat_request(&mut d, 1, "POST", &store);
        assert!(d.reads_request_body(&req));
        let body = br#"{"model": "m", "messages": [], "max_completion_tokens": 50}"#;
        let (a, b) = body.split_at(30);
        d.on_request_body(&req, a, false, None, &store);
        assert_eq!(token_count(&store), Some(30));
        d.on_request_body(&req, b, true, Some(NOW), &store);
        assert!(!d.reads_request_body(&req));
        // reserve_tokens (its input) + 50 (its output at most).
        assert_eq!(token_count(&store), Some(80));
        let headers = d.on_response_headers(&req, Some(b"application/json"));
        assert!(headers.contains(&("x-ratelimit-remaining-tokens", "20".to_string())));
        let usage = br#"{"usage":{"prompt_tokens":5,"completion_tokens":7,"total_tokens":12}}"#;
        d.on_response_body(&req, usage, true, Some(NOW), &store);
        assert_eq!(token_count(&store), Some(12));
        // A body past MAX_SCANNED_BODY keeps the default reservation and is
        // not read further.
        let req = chat_request(&mut d, 2, "POST", &store);
        d.on_request_body(&req, br#"{"max_tokens": 50, "x": ""#, false, None, &store);
        d.on_request_body(&req, &vec![b'a'; MAX_SCANNED_BODY], false, None, &store);
        assert!(!d.reads_request_body(&req));
        d.on_request_body(&req, br#""}"#, true, Some(NOW), &store);
        assert_eq!(token_count(&store), Some(12 + 30));
        // Bodies of refused requests are not kept.
        for id in 3..10 {
            chat_request(&mut d, id, "POST", &store);
        }
        // 42 counted: 3 and 4 are admitted (72, 102), the rest refused.
        let (allowed, denied) = outcomes(&drain(&mut d));
        assert_eq!(allowed, [(1, false), (2, false), (3, false), (4, false)]);
        assert_eq!(
            denied.iter().map(|d| d.0).collect::<Vec<_>>(),
            [5, 6, 7, 8, 9]
        );
        // Kept until the request ends: 2 (too large, not read), 3 and 4.
        let mut kept: Vec<u32> = d.bodies.keys().copied().collect();
        kept.sort_unstable();
        assert_eq!(kept, [2, 3, 4]);
        d.on_log(&RequestHandle::new(3), || Some(NOW), &store);
        assert!(!d.bodies.contains_key(&3));
    }

    #[test]
    fn token_budgets_go_through_the_rate_limit_service_as_hits() {
        let store = FakeStore::new();
        let mut d = driver(
            r#"{"quota": {"tokens": {"authenticated_max_tokens": 1000, "anonymous_max_tokens": 100,
                                     "reserve_tokens": 30},
                          "backend": {"type": "rls", "cluster": "ratelimit", "domain": "tollgate"}}}"#,
        );
        drain(&mut d);
        let decode = |call: &GrpcDispatch| {
            <crate::rls::RateLimitRequest as prost::Message>::decode(call.message.as_slice())
                .unwrap()
        };
        // Before: the local reservation, then a check with 0 hits.
        let req = chat_request(&mut d, 1, "POST", &store);
        assert_eq!(token_count(&store), Some(30));
        let check = send_grpc(&mut d, 7, &store);
        let sent = decode(&check);
        let desc = &sent.descriptors[0];
        assert_eq!(desc.entries[0].key, "tollgate_tokens_anonymous");
        assert_eq!(desc.hits_addend.as_ref().map(|h| h.value), Some(0));
        assert_eq!(desc.limit.as_ref().map(|l| l.requests_per_unit), Some(99));
        assert_eq!(req.phase(), Phase::Waiting);
        d.on_grpc_reply(7, 0, &statuses_answer(&[false]), Some(NOW), &store);
        assert_eq!(outcomes(&drain(&mut d)), (vec![(1, true)], vec![]));
        // After: the charge added there too, as hits.
        d.on_response_headers(&req, Some(b"application/json"));
        let usage = br#"{"usage":{"prompt_tokens":5,"completion_tokens":7,"total_tokens":12}}"#;
        d.on_response_body(&req, usage, true, Some(NOW), &store);
        let effects = drain(&mut d);
        let charge = grpc_calls(&effects)[0];
        let sent = decode(charge);
        assert_eq!(
            sent.descriptors[0].hits_addend.as_ref().map(|h| h.value),
            Some(12)
        );
        d.dispatched_grpc(charge.id, Err(()), NOW, &store);
        assert_eq!(token_count(&store), Some(12));
        // Spent there: 429, and the local reservation given back.
        chat_request(&mut d, 2, "POST", &store);
        assert_eq!(token_count(&store), Some(42));
        send_grpc(&mut d, 8, &store);
        d.on_grpc_reply(8, 0, &statuses_answer(&[true]), Some(NOW), &store);
        let effects = drain(&mut d);
        assert_eq!(outcomes(&effects), (vec![], vec![(2, 429)]));
        assert!(effects.iter().any(|e| matches!(
            e,
            Effect::Deny {
                denial: Denial::TokensExceeded(Policy { quota: 100, .. }),
                ..
            }
        )));
        assert_eq!(token_count(&store), Some(12));
        // The service failing (failure_mode deny): 503, given back too.
        chat_request(&mut d, 3, "POST", &store);
        send_grpc(&mut d, 9, &store);
        d.on_grpc_reply(9, 14, b"", Some(NOW), &store);
        assert_eq!(outcomes(&drain(&mut d)), (vec![], vec![(3, 503)]));
        assert_eq!(token_count(&store), Some(12));
        // A request that ends while its check is under way: given back too.
        let gone = chat_request(&mut d, 4, "POST", &store);
        send_grpc(&mut d, 10, &store);
        assert_eq!(token_count(&store), Some(42));
        d.on_log(&gone, || Some(NOW), &store);
        assert_eq!(token_count(&store), Some(12));
        assert_eq!(d.count_waiting, 0);
        d.on_grpc_reply(10, 0, &statuses_answer(&[false]), Some(NOW), &store);
        assert_eq!(outcomes(&drain(&mut d)), (vec![], vec![]));
    }

    #[test]
    fn identity_header_spellings() {
        for name in [
            "x_auth_principal",
            "x-auth_principal",
            "X_Auth_Principal",
            "X-AUTH-PRINCIPAL",
        ] {
            assert!(spells_header(name.as_bytes(), "x-auth-principal"), "{name}");
        }
        for name in [
            "x-auth-principal",
            "x-auth-principals",
            "x.auth.principal",
            "xauthprincipal",
            "",
        ] {
            assert!(
                !spells_header(name.as_bytes(), "x-auth-principal"),
                "{name}"
            );
        }
        // A configured name with underscores: dashes spell it too.
        assert!(spells_header(b"x-user-id", "x_user_id"));
    }
}
