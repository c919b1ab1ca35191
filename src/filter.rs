//! The proxy-wasm glue: turns host callbacks into calls on the decision core
//! (`auth::Core`) and its answers into host calls.
//!
//! Callouts are dispatched by the root context only (from `on_tick`), so a
//! fetch never dies with the request that asked for it: a request that needs
//! keys parks itself, asks for a tick in 1 ms, and is resumed (by context id)
//! when the fetch ends.
//!
//! Nothing reaches the upstream undecided: until its decision allows it, a
//! request's body and trailers are held (`Pause`), whether Envoy calls the
//! body callbacks while headers are paused (`allow_on_headers_stop_iteration`)
//! or not.

use crate::auth::{self, Core, RequestFacts, Step, LEASE_MARGIN_MS};
use crate::claims::Identity;
use crate::config::{AuthConfig, Config, Forward, JwtConfig};
use crate::host::{
    self, BUFFER_CALLOUT_RESPONSE_BODY, BUFFER_PLUGIN_CONFIGURATION, MAP_CALLOUT_RESPONSE_HEADERS,
    MAP_REQUEST_HEADERS, MAP_RESPONSE_HEADERS,
};
use crate::introspection::Answer;
use crate::jwks::{self, FetchError, SharedKeys};
use crate::metrics::Metrics;
use crate::policy;
use crate::quota::{self, RateLimit, SharedStore, StoreError};
use crate::response::{is_grpc, Denial};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::time::Duration;

/// Largest callout answer read (bytes); larger answers count as a failure.
pub const MAX_CALLOUT_BODY: usize = 1024 * 1024;
/// Most requests parked per VM while keys are fetched; more get 503.
pub const MAX_WAITERS: usize = 4096;
/// Most requests parked per VM on provider callouts (all callouts together);
/// more get 503.
pub const MAX_CALLOUT_WAITERS: usize = 4096;
/// Most distinct provider callouts (introspection, custom) queued or under way
/// per VM; requests needing another one get 503 until one ends.
pub const MAX_PROVIDER_CALLOUTS: usize = 256;
/// Most parked requests answered or resumed in one host callback; the rest
/// wait for the next tick. Envoy 1.40 runs a local answer's response
/// callbacks inside the call that sends it, and V8 ran out of stack
/// ("Maximum call stack size exceeded", a trap) after ~300 local answers
/// sent from one `on_http_call_response`.
const RESUME_BATCH: usize = 64;
/// Tick periods, milliseconds.
const IDLE_TICK_MS: u32 = 1000;
const SOON_TICK_MS: u32 = 1;
/// While requests wait for another VM's fetch, look for its result this often.
const POLL_TICK_MS: u32 = 20;

/// State shared by a VM's root context and its HTTP contexts.
struct Vm {
    core: Core,
    /// Requests parked for keys, to decide again.
    waiters: Vec<Parked>,
    /// Callout token → what it was for.
    callouts: HashMap<u32, Pending>,
    /// Requests parked on a provider callout, by decision cache key.
    callout_waiters: HashMap<auth::CacheKey, Vec<Parked>>,
    /// How many requests wait on provider callouts in all (in
    /// `callout_waiters`, or in `ready` with a provider's answer).
    callout_waiting: usize,
    /// Parked requests whose wait ended, to be carried on a batch at a time
    /// (see [`RESUME_BATCH`]).
    ready: VecDeque<(Parked, Resume)>,
    /// Provider callouts to dispatch on the next tick.
    queued: Vec<auth::Callout>,
    tick_soon: bool,
    /// Where the key set is shared with the other VMs.
    shared_keys: Option<SharedKeys>,
    metrics: Metrics,
    /// Allowed requests not yet reported as a metric (reported on the tick).
    allowed: u64,
    /// Cache counters already reported as metrics.
    reported_hits: u64,
    reported_misses: u64,
}

/// Where a request stands. Shared between its HTTP context and, while it is
/// parked, the root context that resumes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Its headers have not been decided yet (or are being decided).
    Undecided,
    /// Parked until a callout ends.
    Waiting,
    /// Allowed: with these `RateLimit-*` values for its response.
    Allowed(Option<RateLimit>),
    /// Answered locally.
    Answered,
}

/// How a parked request goes on once its wait ended.
enum Resume {
    /// Keys arrived: decide it again.
    Decide,
    /// Its provider callout answered.
    Finish(auth::AuthResult),
}

/// A request parked until a callout ends.
struct Parked {
    id: u32,
    facts: RequestFacts,
    phase: Rc<Cell<Phase>>,
    /// Client headers that spell an identity header another way.
    spoofed: Vec<String>,
    /// A gRPC call: denials are answered with gRPC statuses.
    grpc: bool,
}

/// What a dispatched callout was for.
#[derive(Debug, Clone, Copy)]
enum Pending {
    Jwks {
        started_ms: u64,
    },
    Provider {
        key: auth::CacheKey,
        started_ms: u64,
        timeout_ms: u64,
    },
}

/// What became of a request handed to [`handle`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Allowed: it goes on to the upstream, with these `RateLimit-*` values
    /// for its response.
    Continue(Option<RateLimit>),
    /// Answered locally.
    Answered,
    /// Parked until a callout ends.
    Parked,
}

type Shared = Rc<RefCell<Option<Vm>>>;

/// The host's clock in milliseconds; `None` when the host call fails (never
/// read as 0, which would accept expired tokens).
fn now_ms() -> Option<u64> {
    host::RequestHost::now_ms(&host::Live)
}

/// Shared data through the host.
struct HostStore;

impl SharedStore for HostStore {
    fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), StoreError> {
        host::get_shared_data(key)
    }
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
        host::set_shared_data(key, value, cas)
    }
}

/// The root context: configuration, key fetches, resuming parked requests.
pub struct Root {
    vm: Shared,
}

impl Default for Root {
    fn default() -> Self {
        Root {
            vm: Rc::new(RefCell::new(None)),
        }
    }
}

impl Context for Root {
    fn on_http_call_response(&mut self, token: u32, headers: usize, body_size: usize, _t: usize) {
        let clock = now_ms();
        let mut guard = self.vm.borrow_mut();
        let Some(vm) = guard.as_mut() else {
            return;
        };
        let Some(pending) = vm.callouts.remove(&token) else {
            return;
        };
        let Some(now) = clock else {
            log::error!("the host clock failed: callout answer dropped");
            if let Pending::Provider { key, .. } = pending {
                // Never cached (an error), so the time does not matter.
                complete_callout(vm, key, Answer::NoAnswer, 0);
            }
            // A key set fetch is retried once its lease runs out.
            return;
        };
        match pending {
            Pending::Provider {
                key,
                started_ms,
                timeout_ms,
            } => {
                let reply = read_reply(headers, body_size, started_ms, timeout_ms, now);
                let answer = match &reply {
                    Reply::Response { status, body } => Answer::Response {
                        status: *status,
                        body,
                    },
                    Reply::TimedOut => Answer::TimedOut,
                    Reply::NoAnswer | Reply::TooLarge => Answer::NoAnswer,
                };
                complete_callout(vm, key, answer, now);
            }
            Pending::Jwks { started_ms } => {
                let timeout_ms = vm.core.jwt_config().map_or(0, |j| j.jwks.timeout_ms);
                let record = match read_reply(headers, body_size, started_ms, timeout_ms, now) {
                    Reply::Response { status: 200, body } => vm.core.jwks.fetched(body, now),
                    Reply::Response { status, .. } => {
                        log::warn!("JWKS endpoint answered {status}");
                        vm.core.jwks.record.failure(FetchError::Unavailable, now)
                    }
                    Reply::TimedOut => vm.core.jwks.record.failure(FetchError::Timeout, now),
                    _ => vm.core.jwks.record.failure(FetchError::Unavailable, now),
                };
                finish_fetch(vm, record);
                resume_waiters(vm, now);
            }
        }
    }
}

/// A callout's answer as the glue reads it.
enum Reply {
    Response {
        status: u16,
        body: Vec<u8>,
    },
    /// Over [`MAX_CALLOUT_BODY`]: not read.
    TooLarge,
    NoAnswer,
    TimedOut,
}

/// Reads the answer to the callout being delivered. No answer (or Envoy's own
/// 504) once the timeout has run out is a timeout.
fn read_reply(
    num_headers: usize,
    body_size: usize,
    started_ms: u64,
    timeout_ms: u64,
    now: u64,
) -> Reply {
    // An answer cut off after its headers arrives with no header map at all.
    let status = if num_headers == 0 {
        None
    } else {
        response_status()
    };
    let elapsed = now.saturating_sub(started_ms);
    let reply = match status {
        _ if elapsed.saturating_add(50) >= timeout_ms && matches!(status, None | Some(504)) => {
            Reply::TimedOut
        }
        None => Reply::NoAnswer,
        Some(_) if body_size > MAX_CALLOUT_BODY => Reply::TooLarge,
        Some(status) => Reply::Response {
            status,
            body: response_body(body_size),
        },
    };
    match &reply {
        Reply::Response { status, .. } => {
            log::debug!("callout answered {status} after {elapsed} ms")
        }
        Reply::TooLarge => {
            log::warn!(
                "callout answer of {body_size} bytes is over the {MAX_CALLOUT_BODY}-byte limit"
            )
        }
        Reply::NoAnswer => log::warn!("callout got no answer after {elapsed} ms"),
        Reply::TimedOut => log::warn!("callout timed out after {elapsed} ms"),
    }
    reply
}

/// Ends this VM's fetch: shares the record, gives the lease back, applies it.
fn finish_fetch(vm: &mut Vm, record: jwks::FetchRecord) {
    if let Some(keys) = &vm.shared_keys {
        if jwks::write_record(&HostStore, &keys.record, &record).is_err() {
            log::warn!("could not share the JWKS with the other workers");
        }
        jwks::release_lease(&HostStore, &keys.lease);
    }
    vm.core.jwks.in_flight_since = None;
    vm.metrics.inc("tollgate_jwks_fetches_total");
    if record.error.is_some() {
        vm.metrics.inc("tollgate_jwks_fetch_failures_total");
    } else {
        log::info!("JWKS fetched ({} bytes)", record.body.len());
    }
    vm.core.jwks.apply(record, None);
}

/// The `:status` of a callout's answer.
fn response_status() -> Option<u16> {
    let s = host::header_map_value(MAP_CALLOUT_RESPONSE_HEADERS, ":status")?;
    std::str::from_utf8(&s).ok()?.parse().ok()
}

/// The body of a callout's answer (the caller checked its size).
fn response_body(size: usize) -> Vec<u8> {
    host::buffer(BUFFER_CALLOUT_RESPONSE_BODY, size).unwrap_or_default()
}

/// A header map as the proxy-wasm ABI serializes it: a little-endian `u32`
/// count, then each pair's key and value lengths (`u32` each), then each
/// key and value followed by a NUL. Read in place, every length checked:
/// a map that does not parse has no headers.
pub struct HeaderPairs<'a> {
    sizes: &'a [u8],
    data: &'a [u8],
}

impl<'a> HeaderPairs<'a> {
    pub fn new(buf: &'a [u8]) -> HeaderPairs<'a> {
        let empty = HeaderPairs {
            sizes: &[],
            data: &[],
        };
        let Some(count) = buf.get(..4).and_then(|b| b.try_into().ok()) else {
            return empty;
        };
        let Some(sizes_len) = usize::try_from(u32::from_le_bytes(count))
            .ok()
            .and_then(|n| n.checked_mul(8))
        else {
            return empty;
        };
        match buf
            .get(4..)
            .and_then(|rest| rest.split_at_checked(sizes_len))
        {
            Some((sizes, data)) => HeaderPairs { sizes, data },
            None => empty,
        }
    }

    /// The value of the first header named `name` (lower case, as Envoy
    /// keeps them).
    pub fn get(&self, name: &str) -> Option<&'a [u8]> {
        self.iter()
            .find(|(k, _)| *k == name.as_bytes())
            .map(|(_, v)| v)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&'a [u8], &'a [u8])> + 'a {
        let mut data = self.data;
        self.sizes.chunks_exact(8).map_while(move |lens| {
            let len = |b: &[u8]| {
                b.try_into()
                    .ok()
                    .and_then(|b: [u8; 4]| usize::try_from(u32::from_le_bytes(b)).ok())
            };
            let (k, v) = (len(lens.get(..4)?)?, len(lens.get(4..)?)?);
            let key = data.get(..k)?;
            let value = data.get(k.checked_add(1)?..k.checked_add(1)?.checked_add(v)?)?;
            data = data.get(k.checked_add(v)?.checked_add(2)?..)?;
            Some((key, value))
        })
    }
}

/// Queues every request parked for keys to be decided again.
fn resume_waiters(vm: &mut Vm, now: u64) {
    let waiters = std::mem::take(&mut vm.waiters);
    vm.ready
        .extend(waiters.into_iter().map(|p| (p, Resume::Decide)));
    drain_ready(vm, now);
}

/// A provider callout ended: queues every request that waited on it.
fn complete_callout(vm: &mut Vm, key: auth::CacheKey, answer: Answer, now: u64) {
    let result = vm.core.provider_answer(key, answer, now);
    let provider = match vm.core.config.auth {
        Some(AuthConfig::Custom(_)) => "custom",
        _ => "introspection",
    };
    let outcome = match &result {
        Ok(_) => "ok",
        Err(d) if d.status() == 401 => "rejected",
        Err(_) => "error",
    };
    vm.metrics.callout(provider, outcome);
    let waiting = vm.callout_waiters.remove(&key).unwrap_or_default();
    vm.ready.extend(
        waiting
            .into_iter()
            .map(|p| (p, Resume::Finish(result.clone()))),
    );
    drain_ready(vm, now);
}

/// Answers or resumes up to [`RESUME_BATCH`] requests whose wait ended; asks
/// for a tick for the rest.
fn drain_ready(vm: &mut Vm, now: u64) {
    for _ in 0..RESUME_BATCH {
        let Some((parked, how)) = vm.ready.pop_front() else {
            return;
        };
        if matches!(how, Resume::Finish(_)) {
            vm.callout_waiting = vm.callout_waiting.saturating_sub(1);
        }
        if !host::set_effective_context(parked.id) {
            continue;
        }
        let step = match how {
            Resume::Decide => vm.core.decide(&parked.facts, now, &HostStore),
            Resume::Finish(result) => vm.core.finish(&parked.facts, result, now, &HostStore),
        };
        let outcome = handle(vm, parked, step);
        resume(outcome);
    }
    if !vm.ready.is_empty() {
        tick_soon(vm);
    }
}

/// Lets a parked request that was allowed go on (its body, if held, with it).
fn resume(outcome: Outcome) {
    if let Outcome::Continue(_) = outcome {
        host::continue_request();
    }
}

/// Carries out a decision on the effective context: allow, deny, or park.
/// Records the request's new phase.
fn handle(vm: &mut Vm, parked: Parked, step: Step) -> Outcome {
    let phase = parked.phase.clone();
    let outcome = match step {
        Step::WaitForKeys => {
            if vm.waiters.len().saturating_add(vm.ready.len()) >= MAX_WAITERS {
                refuse(vm, &parked, &Denial::AuthUnavailable);
                Outcome::Answered
            } else {
                vm.waiters.push(parked);
                tick_soon(vm);
                Outcome::Parked
            }
        }
        Step::Callout(c) => {
            if vm.callout_waiting >= MAX_CALLOUT_WAITERS {
                refuse(vm, &parked, &Denial::AuthUnavailable);
                Outcome::Answered
            } else if let Some(list) = vm.callout_waiters.get_mut(&c.key) {
                list.push(parked);
                vm.callout_waiting = vm.callout_waiting.saturating_add(1);
                Outcome::Parked
            } else if vm.callout_waiters.len() >= MAX_PROVIDER_CALLOUTS {
                refuse(vm, &parked, &Denial::AuthUnavailable);
                Outcome::Answered
            } else {
                vm.callout_waiters.insert(c.key, vec![parked]);
                vm.callout_waiting = vm.callout_waiting.saturating_add(1);
                vm.queued.push(*c);
                tick_soon(vm);
                Outcome::Parked
            }
        }
        step => match apply(vm, step, &parked, &mut host::Live) {
            Some(rate_limit) => Outcome::Continue(rate_limit),
            None => Outcome::Answered,
        },
    };
    phase.set(match outcome {
        Outcome::Continue(rate_limit) => Phase::Allowed(rate_limit),
        Outcome::Answered => Phase::Answered,
        Outcome::Parked => Phase::Waiting,
    });
    outcome
}

/// The time a request is decided at; a failed clock refuses the request
/// (read as 0 it would accept expired tokens).
fn decision_time(h: &impl host::RequestHost) -> Result<u64, Denial> {
    h.now_ms().ok_or(Denial::Internal)
}

/// Decides a request just read and carries the decision out.
fn decide(vm: &mut Vm, parked: Parked) -> Action {
    let outcome = match decision_time(&host::Live) {
        Ok(now) => {
            let step = vm.core.decide(&parked.facts, now, &HostStore);
            handle(vm, parked, step)
        }
        Err(denial) => {
            log::error!("the host clock failed: request refused");
            refuse(vm, &parked, &denial);
            parked.phase.set(Phase::Answered);
            Outcome::Answered
        }
    };
    match outcome {
        Outcome::Continue(_) => Action::Continue,
        Outcome::Answered | Outcome::Parked => Action::Pause,
    }
}

/// Answers a request locally: the denial, its metric, its debug line.
fn refuse(vm: &Vm, parked: &Parked, denial: &Denial) {
    let facts = &parked.facts;
    refuse_request(vm, &facts.method, &facts.path, parked.grpc, denial);
}

/// [`refuse`] for a request not yet read into [`RequestFacts`].
fn refuse_request(vm: &Vm, method: &str, path: &str, grpc: bool, denial: &Denial) {
    vm.metrics.denied(denial.reason());
    log::debug!(
        "denied {} {}: {method} {path}",
        denial.status(),
        denial.reason()
    );
    let answer = match (grpc, &vm.core.config.quota) {
        (false, _) => AnswerAs::Http,
        (true, quota) => AnswerAs::Grpc {
            quota_unavailable: quota
                .as_ref()
                .is_some_and(|q| !q.rate_limited_as_resource_exhausted),
        },
    };
    deny(&mut host::Live, denial, answer);
}

/// Asks the root context for a tick in 1 ms (to fetch, or to dispatch).
fn tick_soon(vm: &mut Vm) {
    if !vm.tick_soon {
        vm.tick_soon = true;
        host::set_tick_period_ms(SOON_TICK_MS);
    }
}

/// Carries out an allow or a deny on the effective context: for a request
/// that should continue to the upstream, its `RateLimit-*` values.
fn apply(
    vm: &mut Vm,
    step: Step,
    parked: &Parked,
    h: &mut impl host::RequestHost,
) -> Option<Option<RateLimit>> {
    match step {
        Step::Allow(allowed) => {
            let forward = &vm.core.config.forward;
            if !forward_identity(h, forward, allowed.identity.as_deref(), &parked.spoofed) {
                log::error!("an identity header could not be set: request refused");
                refuse(vm, parked, &Denial::Internal);
                return None;
            }
            vm.allowed = vm.allowed.saturating_add(1);
            Some(allowed.rate_limit)
        }
        Step::Deny(denial) => {
            refuse(vm, parked, &denial);
            None
        }
        Step::WaitForKeys | Step::Callout(_) => None,
    }
}

/// Puts the identity on the request for the upstream. Identity headers come
/// only from tollgate: replaced for callers it identified, removed for
/// anonymous ones, and every other spelling a client sent (`spoofed`)
/// removed. False when any of these host calls failed: the request must then
/// not go on.
fn forward_identity(
    h: &mut impl host::RequestHost,
    forward: &Forward,
    identity: Option<&Identity>,
    spoofed: &[String],
) -> bool {
    let (principal, attributes) = match identity {
        Some(id) => (
            Some(id.principal.as_bytes()),
            Some(id.attributes_header.as_bytes()),
        ),
        None => (None, None),
    };
    let mut ok = h.set_request_header(&forward.principal_header, principal);
    ok &= h.set_request_header(&forward.attributes_header, attributes);
    for name in spoofed {
        ok &= h.set_request_header(name, None);
    }
    if identity.is_some() && forward.strip_authorization {
        ok &= h.set_request_header("authorization", None);
    }
    ok
}

/// Whether a client header `name` is another spelling of the identity header
/// `identity`: equal once lower-cased with `_` read as `-` (as WSGI/CGI,
/// Rails, PHP and others read header names), but not the same bytes.
fn spells_header(name: &[u8], identity: &str) -> bool {
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

/// How a denial is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AnswerAs {
    /// The JSON error body.
    Http,
    /// A gRPC status and plain message (Envoy makes it a trailers-only answer).
    Grpc { quota_unavailable: bool },
}

/// Answers the current request locally with a denial.
fn deny(h: &mut impl host::RequestHost, denial: &Denial, answer: AnswerAs) {
    let (r, grpc_status) = match answer {
        AnswerAs::Http => (denial.response(), None),
        AnswerAs::Grpc { quota_unavailable } => (
            denial.grpc_response(),
            Some(denial.grpc_status(quota_unavailable)),
        ),
    };
    let headers = serialize_pairs(r.headers.iter().map(|(k, v)| (k.as_bytes(), v.as_bytes())));
    if !h.send_local_response(r.status, &headers, r.body.as_bytes(), grpc_status) {
        log::warn!("Envoy refused the {} answer", r.status);
    }
}

/// Pairs serialized as the proxy-wasm ABI has them (see [`HeaderPairs`]).
fn serialize_pairs<'a>(pairs: impl Iterator<Item = (&'a [u8], &'a [u8])> + Clone) -> Vec<u8> {
    let as_u32 = |n: usize| u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes();
    let mut out = as_u32(pairs.clone().count()).to_vec();
    for (k, v) in pairs.clone() {
        out.extend_from_slice(&as_u32(k.len()));
        out.extend_from_slice(&as_u32(v.len()));
    }
    for (k, v) in pairs {
        out.extend_from_slice(k);
        out.push(0);
        out.extend_from_slice(v);
        out.push(0);
    }
    out
}

/// Key set upkeep on every tick: take in what another VM fetched, and fetch
/// when due and this VM holds the lease. True when parked requests should be
/// decided again.
fn tick_jwks(vm: &mut Vm, j: &JwtConfig, now: u64) -> bool {
    let Some(keys) = vm.shared_keys.clone() else {
        return false;
    };
    let jw = &mut vm.core.jwks;
    let mut changed = false;
    if jw.in_flight_since.is_none() {
        if let Some((record, cas)) = jwks::read_record(&HostStore, &keys.record, jw.record_cas()) {
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
    if !refresh_due && !jw.kid_refresh_allowed(now, j.refresh_cooldown_seconds.saturating_mul(1000))
    {
        // An unknown kid asked, but a fetch started within the cooldown.
        jw.wanted_since = None;
        return true;
    }
    if jw.in_flight(now, lease_ms)
        || !jwks::take_lease(&HostStore, &keys.lease, now, now.saturating_add(lease_ms))
    {
        return changed; // another VM is fetching; its record will tell
    }
    let record = jw.record.start(now);
    if jwks::write_record(&HostStore, &keys.record, &record).is_err() {
        log::warn!("could not share the JWKS fetch state");
    }
    jw.apply(record, None);
    jw.in_flight_since = Some(now);
    let mut headers = vec![
        (":method", "GET"),
        (":path", j.jwks.path.as_str()),
        (":authority", j.jwks.authority.as_str()),
        ("accept", "application/json"),
    ];
    let bearer;
    if let Some(t) = &j.jwks_token {
        bearer = format!("Bearer {t}");
        headers.push(("authorization", bearer.as_str()));
    }
    match hostcalls::dispatch_http_call(
        &j.jwks.cluster,
        headers,
        None,
        vec![],
        Duration::from_millis(j.jwks.timeout_ms),
    ) {
        Ok(token) => {
            vm.callouts.insert(token, Pending::Jwks { started_ms: now });
            changed
        }
        Err(e) => {
            log::error!(
                "JWKS fetch could not start (is cluster `{}` defined in Envoy?): {e:?}",
                j.jwks.cluster
            );
            let record = vm.core.jwks.record.failure(FetchError::Unavailable, now);
            finish_fetch(vm, record);
            true
        }
    }
}

/// Reports the cache counters and the key set's age as metrics.
fn report(vm: &mut Vm, now: u64) {
    vm.metrics.allowed(std::mem::take(&mut vm.allowed));
    let cache = if vm.core.jwt_config().is_some() {
        "token"
    } else {
        "decision"
    };
    let (hits, misses) = (vm.core.tokens.hits, vm.core.tokens.misses);
    vm.metrics.cache(
        cache,
        hits.saturating_sub(vm.reported_hits),
        misses.saturating_sub(vm.reported_misses),
    );
    vm.reported_hits = hits;
    vm.reported_misses = misses;
    let fetched = vm.core.jwks.record.fetched;
    if fetched > 0 {
        vm.metrics.set_gauge(
            "tollgate_jwks_age_seconds",
            now.saturating_sub(fetched) / 1000,
        );
    }
}

/// Sends the queued provider callouts.
fn dispatch_queued(vm: &mut Vm, now: u64) {
    for c in std::mem::take(&mut vm.queued) {
        let mut headers: Vec<(&str, &str)> = vec![
            (":method", "POST"),
            (":path", c.upstream.path.as_str()),
            (":authority", c.upstream.authority.as_str()),
        ];
        headers.extend(
            c.request
                .headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str())),
        );
        match hostcalls::dispatch_http_call(
            &c.upstream.cluster,
            headers,
            Some(&c.request.body),
            vec![],
            Duration::from_millis(c.upstream.timeout_ms),
        ) {
            Ok(token) => {
                vm.callouts.insert(
                    token,
                    Pending::Provider {
                        key: c.key,
                        started_ms: now,
                        timeout_ms: c.upstream.timeout_ms,
                    },
                );
            }
            Err(e) => {
                log::error!(
                    "callout to cluster `{}` could not start (is it defined in Envoy?): {e:?}",
                    c.upstream.cluster
                );
                complete_callout(vm, c.key, Answer::NoAnswer, now);
            }
        }
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, size: usize) -> bool {
        let bytes = host::buffer(BUFFER_PLUGIN_CONFIGURATION, size).unwrap_or_default();
        let metrics = Metrics::define();
        match Config::parse(&bytes) {
            Ok(config) => {
                metrics.inc("tollgate_config_loads_total");
                log::set_max_level(config.log_level);
                let core = Core::new(Rc::new(config));
                let shared_keys = core.jwt_config().map(|j| SharedKeys::for_url(&j.jwks.url));
                *self.vm.borrow_mut() = Some(Vm {
                    core,
                    waiters: Vec::new(),
                    callouts: HashMap::new(),
                    callout_waiters: HashMap::new(),
                    callout_waiting: 0,
                    ready: VecDeque::new(),
                    queued: Vec::new(),
                    tick_soon: false,
                    shared_keys,
                    metrics,
                    allowed: 0,
                    reported_hits: 0,
                    reported_misses: 0,
                });
                host::set_tick_period_ms(SOON_TICK_MS);
                true
            }
            Err(e) => {
                metrics.inc("tollgate_config_failures_total");
                log::error!("tollgate refused its configuration: {e}");
                false
            }
        }
    }

    fn on_tick(&mut self) {
        let Some(now) = now_ms() else {
            log::error!("the host clock failed: tick skipped");
            return;
        };
        let mut guard = self.vm.borrow_mut();
        let Some(vm) = guard.as_mut() else {
            return;
        };
        vm.tick_soon = false;
        report(vm, now);
        drain_ready(vm, now);
        dispatch_queued(vm, now);
        if let Some(j) = vm.core.jwt_config().cloned() {
            if tick_jwks(vm, &j, now) {
                resume_waiters(vm, now);
            }
        }
        if !vm.tick_soon {
            let period = if vm.waiters.is_empty() && vm.queued.is_empty() {
                IDLE_TICK_MS
            } else {
                POLL_TICK_MS
            };
            host::set_tick_period_ms(period);
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Request {
            id: context_id,
            vm: self.vm.clone(),
            phase: Rc::new(Cell::new(Phase::Undecided)),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// One HTTP request.
struct Request {
    id: u32,
    vm: Shared,
    phase: Rc<Cell<Phase>>,
}

impl Request {
    /// Body and trailers go on only once the request is allowed; until then
    /// (and after a local answer) they are held.
    fn hold_until_allowed(&self) -> Action {
        match self.phase.get() {
            Phase::Allowed(_) => Action::Continue,
            Phase::Undecided | Phase::Waiting | Phase::Answered => Action::Pause,
        }
    }
}

/// The client's address without the port, read only for a request the quota
/// counts by address (see [`Config::counts_by_address`]).
fn source_ip(config: &Config, path: &str) -> Option<String> {
    if !config.counts_by_address(path) {
        return None;
    }
    let raw = host::property(b"source\0address")?;
    let s = String::from_utf8(raw).ok()?;
    Some(strip_port(&s).to_string())
}

/// `1.2.3.4:5678` → `1.2.3.4`; `[::1]:5678` → `::1`.
pub fn strip_port(addr: &str) -> &str {
    if let Some(rest) = addr.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match addr.rsplit_once(':') {
        Some((host, _)) if !host.contains(':') => host,
        _ => addr,
    }
}

impl Context for Request {}

impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        let mut guard = self.vm.borrow_mut();
        let Some(vm) = guard.as_mut() else {
            self.phase.set(Phase::Answered);
            deny(&mut host::Live, &Denial::AuthUnavailable, AnswerAs::Http);
            return Action::Pause;
        };
        let config = vm.core.config.clone();
        let forward = &config.forward;

        // Every header in one host call (measured cheaper than one call per
        // header), read in place: the identity headers' other spellings must
        // be found whatever the configuration.
        let map = host::header_map_pairs(MAP_REQUEST_HEADERS).unwrap_or_default();
        let pairs = HeaderPairs::new(&map);
        let spoofed: Vec<String> = pairs
            .iter()
            .filter(|(name, _)| {
                spells_header(name, &forward.principal_header)
                    || spells_header(name, &forward.attributes_header)
            })
            .filter_map(|(name, _)| std::str::from_utf8(name).ok().map(str::to_string))
            .collect();
        let grpc = pairs.get("content-type").is_some_and(is_grpc);
        // Envoy joins several Authorization headers into one value (never a
        // valid token).
        let authorization = pairs.get("authorization").map(<[u8]>::to_vec);
        if !config.needs_path() && !log::log_enabled!(log::Level::Debug) {
            let facts = RequestFacts {
                authorization,
                source_ip: source_ip(&config, ""),
                ..RequestFacts::default()
            };
            return decide(vm, self.parked(facts, spoofed, grpc));
        }
        let raw_path = pairs.get(":path").unwrap_or_default();
        let path = match std::str::from_utf8(raw_path)
            .ok()
            .map(policy::normalize_path)
        {
            Some(Ok(p)) => p,
            // Read for debug lines only: nothing matches on it, so a path
            // that cannot be normalised changes no answer.
            _ if !config.needs_path() => String::new(),
            _ => {
                // The raw path (and its query) is not logged: it may carry secrets.
                self.phase.set(Phase::Answered);
                refuse_request(vm, "", "", grpc, &Denial::BadPath);
                return Action::Pause;
            }
        };
        // The method matters to route rules and debug lines only.
        let method = if config.route_rules.is_empty() && !log::log_enabled!(log::Level::Debug) {
            String::new()
        } else {
            pairs
                .get(":method")
                .and_then(|m| std::str::from_utf8(m).ok())
                .unwrap_or_default()
                .to_string()
        };
        let source_ip = source_ip(&config, &path);
        let (raw_path, headers) = if matches!(config.auth, Some(AuthConfig::Custom(_))) {
            // The endpoint sees the request as the client sent it, less any
            // identity headers the client made up (in any spelling).
            let headers = pairs
                .iter()
                .filter(|(name, _)| {
                    !name.eq_ignore_ascii_case(forward.principal_header.as_bytes())
                        && !name.eq_ignore_ascii_case(forward.attributes_header.as_bytes())
                        && !spells_header(name, &forward.principal_header)
                        && !spells_header(name, &forward.attributes_header)
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
            source_ip,
            raw_path,
            headers,
        };
        decide(vm, self.parked(facts, spoofed, grpc))
    }

    fn on_http_request_body(&mut self, _size: usize, _eos: bool) -> Action {
        self.hold_until_allowed()
    }

    fn on_http_request_trailers(&mut self, _n: usize) -> Action {
        self.hold_until_allowed()
    }

    fn on_http_response_headers(&mut self, _n: usize, _eos: bool) -> Action {
        if let Phase::Allowed(Some(rate_limit)) = self.phase.get() {
            let mut digits = [0; 20];
            for (name, value) in rate_limit.values() {
                let value = quota::decimal(value, &mut digits);
                host::set_header(MAP_RESPONSE_HEADERS, name, Some(value));
            }
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        if self.phase.get() != Phase::Waiting {
            return;
        }
        if let Some(vm) = self.vm.borrow_mut().as_mut() {
            vm.waiters.retain(|p| p.id != self.id);
            let mut removed = 0;
            for list in vm.callout_waiters.values_mut() {
                let before = list.len();
                list.retain(|p| p.id != self.id);
                removed += before.saturating_sub(list.len());
            }
            let before = vm.ready.len();
            vm.ready.retain(|(p, how)| {
                let gone = p.id == self.id;
                if gone && matches!(how, Resume::Finish(_)) {
                    removed += 1;
                }
                !gone
            });
            if before != vm.ready.len() {
                log::debug!("a request ended while queued to resume");
            }
            vm.callout_waiting = vm.callout_waiting.saturating_sub(removed);
        }
    }
}

impl Request {
    /// This request as the decision takes it (and parks it, if it must wait).
    fn parked(&self, facts: RequestFacts, spoofed: Vec<String>, grpc: bool) -> Parked {
        Parked {
            id: self.id,
            facts,
            phase: self.phase.clone(),
            spoofed,
            grpc,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::RequestHost;

    /// A host whose calls can be made to fail; it records what it was asked.
    #[derive(Default)]
    struct FakeHost {
        clock: Option<u64>,
        /// Header names whose writes fail.
        failing: Vec<&'static str>,
        headers: Vec<(String, Option<Vec<u8>>)>,
        answers: Vec<(u32, Option<u32>, String)>,
    }

    impl RequestHost for FakeHost {
        fn now_ms(&self) -> Option<u64> {
            self.clock
        }
        fn set_request_header(&mut self, name: &str, value: Option<&[u8]>) -> bool {
            self.headers
                .push((name.to_string(), value.map(<[u8]>::to_vec)));
            !self.failing.contains(&name)
        }
        fn send_local_response(
            &mut self,
            status: u32,
            _h: &[u8],
            body: &[u8],
            grpc_status: Option<u32>,
        ) -> bool {
            self.answers
                .push((status, grpc_status, String::from_utf8_lossy(body).into()));
            true
        }
    }

    fn alice() -> Identity {
        Identity {
            principal: "alice".into(),
            attributes: Default::default(),
            attributes_header: r#"{"roles":["alice"]}"#.into(),
        }
    }

    #[test]
    fn identity_headers_are_set_and_other_spellings_removed() {
        let forward = Forward {
            strip_authorization: true,
            ..Forward::default()
        };
        let mut h = FakeHost::default();
        let spoofed = vec![
            "x_auth_principal".to_string(),
            "x-auth_attributes".to_string(),
        ];
        assert!(forward_identity(&mut h, &forward, Some(&alice()), &spoofed));
        let set: Vec<(&str, Option<&[u8]>)> = h
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_deref()))
            .collect();
        assert_eq!(
            set,
            vec![
                ("x-auth-principal", Some(&b"alice"[..])),
                ("x-auth-attributes", Some(&br#"{"roles":["alice"]}"#[..])),
                ("x_auth_principal", None),
                ("x-auth_attributes", None),
                ("authorization", None),
            ]
        );
        // Anonymous: removed, the Authorization header kept.
        let mut h = FakeHost::default();
        assert!(forward_identity(&mut h, &forward, None, &spoofed));
        assert!(h
            .headers
            .iter()
            .all(|(k, v)| v.is_none() && k != "authorization"));
        assert_eq!(h.headers.len(), 4);
    }

    #[test]
    fn a_failed_identity_header_write_refuses_the_request() {
        let forward = Forward::default();
        for failing in ["x-auth-principal", "x-auth-attributes", "x_auth_principal"] {
            for identity in [Some(alice()), None] {
                let mut h = FakeHost {
                    failing: vec![failing],
                    ..FakeHost::default()
                };
                let spoofed = vec!["x_auth_principal".to_string()];
                assert!(
                    !forward_identity(&mut h, &forward, identity.as_ref(), &spoofed),
                    "{failing} {identity:?}"
                );
            }
        }
        let mut h = FakeHost {
            failing: vec!["authorization"],
            ..FakeHost::default()
        };
        let strip = Forward {
            strip_authorization: true,
            ..Forward::default()
        };
        assert!(!forward_identity(&mut h, &strip, Some(&alice()), &[]));
    }

    #[test]
    fn a_failed_clock_refuses_instead_of_reading_zero() {
        let h = FakeHost::default();
        assert_eq!(decision_time(&h), Err(Denial::Internal));
        assert_eq!(Denial::Internal.status(), 500);
        let h = FakeHost {
            clock: Some(1_700_000_000_123),
            ..FakeHost::default()
        };
        assert_eq!(decision_time(&h), Ok(1_700_000_000_123));
    }

    #[test]
    fn a_denial_is_sent_as_a_local_answer() {
        let mut h = FakeHost::default();
        deny(&mut h, &Denial::Internal, AnswerAs::Http);
        let quota = Denial::QuotaExceeded {
            retry_after: 1,
            rate_limit: None,
        };
        deny(
            &mut h,
            &quota,
            AnswerAs::Grpc {
                quota_unavailable: false,
            },
        );
        deny(
            &mut h,
            &quota,
            AnswerAs::Grpc {
                quota_unavailable: true,
            },
        );
        let json = r#"{"error":{"message":"Internal error"}}"#.to_string();
        assert_eq!(
            h.answers,
            vec![
                (500, None, json),
                (429, Some(8), "Quota exceeded".into()),
                (429, Some(14), "Quota exceeded".into()),
            ]
        );
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

    #[test]
    fn body_and_trailers_wait_for_the_decision() {
        let phase = Rc::new(Cell::new(Phase::Undecided));
        let r = Request {
            id: 1,
            vm: Rc::new(RefCell::new(None)),
            phase: phase.clone(),
        };
        for (p, expected) in [
            (Phase::Undecided, Action::Pause),
            (Phase::Waiting, Action::Pause),
            (Phase::Answered, Action::Pause),
            (Phase::Allowed(None), Action::Continue),
        ] {
            phase.set(p);
            assert_eq!(r.hold_until_allowed(), expected, "{p:?}");
        }
    }

    /// [`serialize_pairs`] of string names (its layout is pinned below).
    fn serialize(pairs: &[(&str, &[u8])]) -> Vec<u8> {
        serialize_pairs(pairs.iter().map(|(k, v)| (k.as_bytes(), *v)))
    }

    #[test]
    fn serialized_pairs_are_the_abi_format() {
        let pairs: Vec<(&[u8], &[u8])> = vec![
            (b"content-type", b"application/json"),
            (b"retry-after", b"7"),
            (b"empty", b""),
        ];
        let bytes = serialize_pairs(pairs.iter().copied());
        // Count, then (key, value) lengths, then key NUL value NUL each.
        let mut expected = vec![
            3, 0, 0, 0, 12, 0, 0, 0, 16, 0, 0, 0, 11, 0, 0, 0, 1, 0, 0, 0,
        ];
        expected.extend_from_slice(&[5, 0, 0, 0, 0, 0, 0, 0]);
        expected.extend_from_slice(b"content-type\0application/json\0retry-after\x007\0empty\0\0");
        assert_eq!(bytes, expected);
        let back: Vec<(&[u8], &[u8])> = HeaderPairs::new(&bytes).iter().collect();
        assert_eq!(back, pairs);
        assert_eq!(serialize_pairs(std::iter::empty()), 0u32.to_le_bytes());
    }

    #[test]
    fn header_pairs_are_read_in_place() {
        let map = serialize(&[
            (":path", b"/v1/models?x=1"),
            (":method", b"GET"),
            ("authorization", b"Bearer abc"),
            ("empty", b""),
            ("authorization", b"Bearer second"),
            ("bin", b"\xff\x00\xfe"),
        ]);
        let pairs = HeaderPairs::new(&map);
        assert_eq!(pairs.get(":path"), Some(&b"/v1/models?x=1"[..]));
        assert_eq!(pairs.get(":method"), Some(&b"GET"[..]));
        // The first of repeated headers, as Envoy's single-value getter.
        assert_eq!(pairs.get("authorization"), Some(&b"Bearer abc"[..]));
        assert_eq!(pairs.get("empty"), Some(&b""[..]));
        assert_eq!(pairs.get("bin"), Some(&b"\xff\x00\xfe"[..]));
        assert_eq!(pairs.get("missing"), None);
        assert_eq!(pairs.iter().count(), 6);
        assert_eq!(HeaderPairs::new(&serialize(&[])).iter().count(), 0);
    }

    #[test]
    fn broken_header_maps_never_panic_and_yield_only_whole_pairs() {
        let map = serialize(&[(":path", b"/a"), ("authorization", b"Bearer t")]);
        for cut in 0..map.len() {
            let pairs = HeaderPairs::new(&map[..cut]);
            for (k, v) in pairs.iter() {
                assert!(
                    (k, v) == (&b":path"[..], &b"/a"[..])
                        || (k, v) == (&b"authorization"[..], &b"Bearer t"[..])
                );
            }
        }
        // Counts and lengths far beyond the buffer.
        let mut huge = map.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(HeaderPairs::new(&huge).iter().count(), 0);
        let mut long_key = map.clone();
        long_key[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(HeaderPairs::new(&long_key).get(":path"), None);
        // Pseudo-random bytes.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for len in 0..400 {
            let buf: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x & 0x0f) as u8
                })
                .collect();
            let _ = HeaderPairs::new(&buf).iter().count();
            let _ = HeaderPairs::new(&buf).get("authorization");
        }
    }
}
