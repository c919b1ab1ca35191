//! A do-nothing proxy-wasm HTTP filter: the baseline ("wasm floor") that
//! tollgate's warm path is compared with in `make bench`. Per request it does
//! what every authenticating filter must do at least — cross into the VM and
//! read the `authorization` header out of Envoy — and lets the request go on.
//!
//! Its plugin configuration, when not empty, adds work per request, one line
//! each: `name: value` sets a request header (with tollgate's two identity
//! headers: the floor of a filter that forwards an identity, `b2`), and
//! `count key` reads a counter in shared data and writes it back with its CAS
//! (the floor of exact counting across workers, `b3`), `clock` reads the
//! host's clock (a cache that honours expiry to the second must), and
//! `response name: value` sets a response header. `clock` plus the two
//! identity headers is the least a filter that authenticates from a cache and
//! forwards the identity does on a warm request (`b4`); with `count` and the
//! three `RateLimit-*` response headers as well, the least with tollgate's
//! quota as configured by default (`b5`).

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use std::rc::Rc;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

enum Work {
    SetHeader(String, String),
    Count(String),
    Clock,
    SetResponseHeader(String, String),
}

#[derive(Default)]
struct Root {
    work: Rc<Vec<Work>>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let config = self.get_plugin_configuration().unwrap_or_default();
        let work = String::from_utf8_lossy(&config)
            .lines()
            .filter_map(|l| {
                if let Some(key) = l.strip_prefix("count ") {
                    return Some(Work::Count(key.trim().to_string()));
                }
                if l.trim() == "clock" {
                    return Some(Work::Clock);
                }
                let (header, response) = match l.strip_prefix("response ") {
                    Some(h) => (h, true),
                    None => (l, false),
                };
                let (k, v) = header.split_once(':')?;
                let (k, v) = (k.trim().to_string(), v.trim().to_string());
                Some(if response {
                    Work::SetResponseHeader(k, v)
                } else {
                    Work::SetHeader(k, v)
                })
            })
            .collect();
        self.work = Rc::new(work);
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Noop {
            work: self.work.clone(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Noop {
    work: Rc<Vec<Work>>,
}

impl Context for Noop {}

impl HttpContext for Noop {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        // Bytes, not the string getter: that one traps on non-UTF-8 values.
        let authorization = self.get_http_request_header_bytes("authorization");
        std::hint::black_box(authorization);
        for w in self.work.iter() {
            match w {
                Work::SetHeader(name, value) => self.set_http_request_header(name, Some(value)),
                Work::Clock => {
                    let _ = std::hint::black_box(hostcalls::get_current_time());
                }
                Work::Count(key) => {
                    // A counter as tollgate stores one: "<window>:<count>".
                    if let Ok((value, cas)) = hostcalls::get_shared_data(key) {
                        let n = value
                            .and_then(|v| String::from_utf8(v).ok())
                            .and_then(|v| v.rsplit(':').next()?.parse::<u64>().ok())
                            .unwrap_or(0);
                        let next = format!("20415:{}", n + 1);
                        let _ = hostcalls::set_shared_data(key, Some(next.as_bytes()), cas);
                    }
                }
                Work::SetResponseHeader(..) => {}
            }
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        for w in self.work.iter() {
            if let Work::SetResponseHeader(name, value) = w {
                self.set_http_response_header(name, Some(value));
            }
        }
        Action::Continue
    }
}
