//! The proxy-wasm glue: turns host callbacks into [`Driver`] events and
//! performs the [`Effect`]s it queues — nothing else. Every host call goes
//! through `host`.

use crate::config::Config;
use crate::driver::{AnswerAs, Driver, Effect, Phase, RequestHandle};
use crate::host::{
    self, HeaderPairs, HostStore, BUFFER_HTTP_REQUEST_BODY, BUFFER_HTTP_RESPONSE_BODY,
    BUFFER_PLUGIN_CONFIGURATION, MAP_REQUEST_HEADERS, MAP_RESPONSE_HEADERS,
};
use crate::metrics::Metrics;
use crate::quota;
use crate::response::Denial;
use crate::rls;
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
                rewrite,
                grpc,
                resume,
            } => {
                if !focus(req.id(), current) {
                    continue;
                }
                let h = &mut host::Live;
                if !crate::forward::forward_identity(
                    h,
                    &config.forward,
                    identity.as_deref(),
                    &spoofed,
                    &rewrite,
                ) {
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
                vm.wake = host::register_wake_queue();
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

/// Makes request `id`'s context the effective one; false when it is gone.
fn focus(id: u32, current: Option<u32>) -> bool {
    current == Some(id) || host::set_effective_context(id)
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
                let mut metrics = metrics;
                metrics.define_token_paths(config.token_path_labels());
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
        let Some(vm) = guard
            .as_mut()
            .filter(|vm| vm.driver.counts_answer(&self.req))
        else {
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
            vm.driver.on_log(&self.req, now_ms, &HostStore);
            if vm.driver.has_effects() {
                perform(vm, Some(self.req.id()), now_ms().unwrap_or_default());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::fake::FakeHost;

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
