//! The proxy-wasm glue: turns host callbacks into [`Driver`] events and
//! performs the [`Effect`]s it queues — nothing else. Every host call goes
//! through `host`.

use crate::claims::Identity;
use crate::config::{Config, Forward};
use crate::driver::{AnswerAs, Driver, Effect, Phase, RequestHandle};
use crate::host::{
    self, HeaderPairs, BUFFER_HTTP_REQUEST_BODY, BUFFER_HTTP_RESPONSE_BODY,
    BUFFER_PLUGIN_CONFIGURATION, MAP_REQUEST_HEADERS, MAP_RESPONSE_HEADERS,
};
use crate::metrics::Metrics;
use crate::quota;
use crate::response::Denial;
use crate::rls;
use crate::store::{SharedStore, StoreError};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};
use std::cell::RefCell;
use std::rc::Rc;

/// A VM's driver and its metrics, shared by the root and HTTP contexts.
struct Vm {
    driver: Driver,
    metrics: Metrics,
    /// This VM's own queue, whose items wake its root context.
    wake: Option<u32>,
}

type Shared = Rc<RefCell<Option<Vm>>>;

/// The host's clock in milliseconds; `None` when the host call failed.
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

/// Performs the driver's effects, in order. `current` is the request whose
/// callback this is (its context is already the effective one).
fn perform(vm: &mut Vm, current: Option<u32>, now: u64) {
    let config: Rc<Config> = vm.driver.config().clone();
    while let Some(effect) = vm.driver.poll() {
        match effect {
            Effect::Allow {
                req,
                identity,
                spoofed,
                grpc,
                resume,
            } => {
                if !focus(req.id(), current) {
                    continue;
                }
                let h = &mut host::Live;
                if !forward_identity(h, &config.forward, identity.as_deref(), &spoofed) {
                    vm.driver.forward_failed(&req, grpc, now, &HostStore);
                } else if resume {
                    host::continue_request();
                }
            }
            Effect::Deny {
                id,
                denial,
                answer_as,
            } => {
                if focus(id, current) {
                    deny(&mut host::Live, &denial, answer_as);
                }
            }
            Effect::Dispatch(d) => {
                let token = host::dispatch_http_call(
                    &d.cluster,
                    &d.headers,
                    d.body.as_deref(),
                    d.timeout_ms,
                );
                vm.driver.dispatched(d.id, token, now, &HostStore);
            }
            Effect::DispatchGrpc(d) => {
                let token = host::dispatch_grpc_call(
                    &d.service,
                    rls::SERVICE,
                    rls::METHOD,
                    &d.message,
                    d.timeout_ms,
                );
                vm.driver.dispatched_grpc(d.id, token, now, &HostStore);
            }
            Effect::SetTick(ms) => {
                host::set_tick_period_ms(ms);
            }
            Effect::OpenWake => {
                vm.wake = host::register_queue(&wake_queue_name());
                if vm.wake.is_none() {
                    vm.driver.wake_unavailable();
                }
            }
            Effect::Wake => {
                if !vm.wake.is_some_and(host::enqueue) {
                    vm.driver.wake_unavailable();
                }
            }
            Effect::Count(metric) => vm.metrics.count(metric),
        }
    }
}

/// A queue name no other VM uses (queues are named per plugin VM id, which
/// every worker's VM shares).
fn wake_queue_name() -> String {
    use std::hash::{BuildHasher, Hasher};
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    format!("tollgate.wake.{random:016x}")
}

/// Makes request `id`'s context the effective one; false when it is gone.
fn focus(id: u32, current: Option<u32>) -> bool {
    current == Some(id) || host::set_effective_context(id)
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
    let mut ok = true;
    for name in spoofed {
        ok &= h.set_request_header(name, None);
    }
    let Some(id) = identity else {
        ok &= h.set_request_header(&forward.principal_header, None);
        ok &= h.set_request_header(&forward.attributes_header, None);
        return ok;
    };
    ok &= h.set_request_header(&forward.principal_header, Some(id.principal.as_bytes()));
    if forward.attribute_headers.is_empty() {
        ok &= h.set_request_header(
            &forward.attributes_header,
            Some(id.attributes_header.as_bytes()),
        );
    } else {
        let split = id.split_attributes(&forward.attribute_headers);
        ok &= h.set_request_header(&forward.attributes_header, Some(split.rest.as_bytes()));
        for (header, value) in &split.per_header {
            ok &= h.set_request_header(header, Some(value.as_bytes()));
        }
    }
    if let Some(tenant) = &id.tenant {
        ok &= h.set_request_header(&forward.tenant_header, Some(tenant.as_bytes()));
    }
    if forward.strip_authorization {
        ok &= h.set_request_header("authorization", None);
    }
    ok
}

/// Answers the current request locally with a denial.
fn deny(h: &mut impl host::RequestHost, denial: &Denial, answer_as: AnswerAs) {
    let (r, grpc_status) = match answer_as {
        AnswerAs::Http => (denial.response(), None),
        AnswerAs::Grpc { quota_unavailable } => (
            denial.grpc_response(),
            Some(denial.grpc_status(quota_unavailable)),
        ),
    };
    let pairs = r.headers.iter().map(|(k, v)| (k.as_bytes(), v.as_bytes()));
    let headers = host::serialize_pairs(pairs);
    if !h.send_local_response(r.status, &headers, r.body.as_bytes(), grpc_status) {
        log::warn!("Envoy refused the {} answer", r.status);
    }
}

/// Delivers a rate-limit answer to the driver and performs what follows.
fn grpc_reply(vm: &Shared, current: Option<u32>, token: u32, status: u32, size: usize) {
    let now = now_ms();
    let mut guard = vm.borrow_mut();
    let Some(vm) = guard.as_mut() else {
        return;
    };
    let message = host::grpc_reply(status, size);
    vm.driver
        .on_grpc_reply(token, status, &message, now, &HostStore);
    perform(vm, current, now.unwrap_or_default());
}

/// The root context: configuration, callouts, the tick.
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
        let now = now_ms();
        let mut guard = self.vm.borrow_mut();
        let Some(vm) = guard.as_mut() else {
            return;
        };
        let reply = host::callout_reply(headers, body_size);
        vm.driver.on_callout_reply(token, reply, now, &HostStore);
        perform(vm, None, now.unwrap_or_default());
    }

    fn on_grpc_call_response(&mut self, token: u32, status: u32, size: usize) {
        grpc_reply(&self.vm, None, token, status, size);
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
                let driver = Driver::new(Rc::new(config));
                let mut guard = self.vm.borrow_mut();
                let vm = guard.insert(Vm {
                    driver,
                    metrics,
                    wake: None,
                });
                perform(vm, None, now_ms().unwrap_or_default());
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
        vm.driver.on_tick(now, &HostStore);
        perform(vm, None, now);
    }

    fn on_queue_ready(&mut self, queue: u32) {
        host::drain_queue(queue);
        let Some(now) = now_ms() else {
            log::error!("the host clock failed: wake skipped");
            return;
        };
        let mut guard = self.vm.borrow_mut();
        let Some(vm) = guard.as_mut() else {
            return;
        };
        vm.driver.on_wake(now, &HostStore);
        perform(vm, None, now);
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Request {
            req: RequestHandle::new(context_id),
            vm: self.vm.clone(),
            body_seen: 0,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// One HTTP request.
struct Request {
    req: RequestHandle,
    vm: Shared,
    /// Body bytes already read that the host still holds (the body was
    /// held at the last callback).
    body_seen: usize,
}

impl Request {
    /// Body and trailers go on only once the request is allowed.
    fn hold_until_allowed(&self) -> Action {
        if self.req.may_continue() {
            Action::Continue
        } else {
            Action::Pause
        }
    }
}

impl Context for Request {
    /// A rate-limit call sent while this request's callback ran.
    fn on_grpc_call_response(&mut self, token: u32, status: u32, size: usize) {
        grpc_reply(&self.vm, Some(self.req.id()), token, status, size);
    }
}

impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        let now = now_ms();
        let mut guard = self.vm.borrow_mut();
        let Some(vm) = guard.as_mut() else {
            deny(&mut host::Live, &Denial::AuthUnavailable, AnswerAs::Http);
            return Action::Pause;
        };
        // Every header in one host call (measured cheaper than one call per
        // header), read in place.
        let map = host::header_map_pairs(MAP_REQUEST_HEADERS).unwrap_or_default();
        let head = HeaderPairs::new(&map);
        vm.driver
            .on_request_headers(&self.req, &head, host::source_ip, now, &HostStore);
        perform(vm, Some(self.req.id()), now.unwrap_or_default());
        self.hold_until_allowed()
    }

    /// Held until allowed; on token-budget paths also read (each byte
    /// once: a held body comes back whole in the next callback).
    fn on_http_request_body(&mut self, size: usize, end: bool) -> Action {
        let action = self.hold_until_allowed();
        if let Some(vm) = self.vm.borrow_mut().as_mut() {
            if vm.driver.reads_request_body(&self.req) {
                let start = self.body_seen.min(size);
                let chunk = host::buffer_from(BUFFER_HTTP_REQUEST_BODY, start, size - start);
                let now = if end { now_ms() } else { None };
                vm.driver.on_request_body(
                    &self.req,
                    &chunk.unwrap_or_default(),
                    end,
                    now,
                    &HostStore,
                );
            }
        }
        self.body_seen = if action == Action::Pause { size } else { 0 };
        action
    }

    fn on_http_request_trailers(&mut self, _n: usize) -> Action {
        self.hold_until_allowed()
    }

    fn on_http_response_headers(&mut self, _n: usize, end: bool) -> Action {
        let Phase::Allowed(rate_limit) = self.req.phase() else {
            return Action::Continue;
        };
        if let Some(rate_limit) = rate_limit {
            let mut digits = [0; 20];
            for (name, value) in rate_limit.values() {
                let value = quota::decimal(value, &mut digits);
                host::set_header(MAP_RESPONSE_HEADERS, name, Some(value));
            }
        }
        let mut guard = self.vm.borrow_mut();
        let Some(vm) = guard.as_mut() else {
            return Action::Continue;
        };
        let content_type = host::header_map_value(MAP_RESPONSE_HEADERS, "content-type");
        let headers = vm
            .driver
            .on_response_headers(&self.req, content_type.as_deref());
        for (name, value) in headers {
            host::set_header(MAP_RESPONSE_HEADERS, name, Some(value.as_bytes()));
        }
        if end {
            let now = now_ms();
            vm.driver
                .on_response_body(&self.req, &[], true, now, &HostStore);
            perform(vm, Some(self.req.id()), now.unwrap_or_default());
        }
        Action::Continue
    }

    /// Answer bodies pass as they come; with a token reservation each chunk
    /// is also read for the usage it reports.
    fn on_http_response_body(&mut self, size: usize, end: bool) -> Action {
        let mut guard = self.vm.borrow_mut();
        let Some(vm) = guard.as_mut() else {
            return Action::Continue;
        };
        if vm.driver.meters(&self.req) {
            let chunk = host::buffer(BUFFER_HTTP_RESPONSE_BODY, size).unwrap_or_default();
            let now = if end { now_ms() } else { None };
            vm.driver
                .on_response_body(&self.req, &chunk, end, now, &HostStore);
            if end {
                perform(vm, Some(self.req.id()), now.unwrap_or_default());
            }
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        if let Some(vm) = self.vm.borrow_mut().as_mut() {
            let now = now_ms();
            vm.driver.on_log(&self.req, now, &HostStore);
            perform(vm, Some(self.req.id()), now.unwrap_or_default());
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
        /// Header names whose writes fail.
        failing: Vec<&'static str>,
        headers: Vec<(String, Option<Vec<u8>>)>,
        answers: Vec<(u32, Option<u32>, String)>,
    }

    impl RequestHost for FakeHost {
        fn now_ms(&self) -> Option<u64> {
            None
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
            tenant: None,
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
                ("x_auth_principal", None),
                ("x-auth_attributes", None),
                ("x-auth-principal", Some(&b"alice"[..])),
                ("x-auth-attributes", Some(&br#"{"roles":["alice"]}"#[..])),
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
    fn the_tenant_and_per_category_headers_follow_the_identity() {
        let forward = Forward {
            attribute_headers: vec![
                ("x-teams".into(), "teams".into()),
                ("x-projects".into(), "projects".into()),
            ],
            ..Forward::default()
        };
        let mut attributes = crate::claims::Attributes::new();
        attributes.insert("roles".into(), vec!["admin".into()]);
        attributes.insert("teams".into(), vec!["ml".into(), "ops".into()]);
        let id = Identity::new("bob".into(), attributes)
            .unwrap()
            .with_tenant(Some("acme".into()));
        let mut h = FakeHost::default();
        let spoofed = vec!["x-projects".to_string(), "x-auth-tenant".to_string()];
        assert!(forward_identity(&mut h, &forward, Some(&id), &spoofed));
        let set: Vec<(&str, Option<&[u8]>)> = h
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_deref()))
            .collect();
        assert_eq!(
            set,
            vec![
                ("x-projects", None),
                ("x-auth-tenant", None),
                ("x-auth-principal", Some(&b"bob"[..])),
                ("x-auth-attributes", Some(&br#"{"roles":["admin"]}"#[..])),
                ("x-teams", Some(&br#"["ml","ops"]"#[..])),
                ("x-auth-tenant", Some(&b"acme"[..])),
            ]
        );
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
}
