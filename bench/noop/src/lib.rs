//! A do-nothing proxy-wasm HTTP filter: the baseline ("wasm floor") that
//! tollgate's warm path is compared with in `make bench`. Per request it does
//! what every authenticating filter must do at least — cross into the VM and
//! read the `authorization` header out of Envoy — and lets the request go on.
//!
//! Its plugin configuration, when not empty, adds work per request, one line
//! each: `name: value` sets a request header (with tollgate's two identity
//! headers: the floor of a filter that forwards an identity, `b2`), and
//! `count key` reads a counter in shared data and writes it back with its CAS
//! (the floor of exact counting across workers, `b3`).

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
            .filter_map(|l| match l.strip_prefix("count ") {
                Some(key) => Some(Work::Count(key.trim().to_string())),
                None => l
                    .split_once(':')
                    .map(|(k, v)| Work::SetHeader(k.trim().to_string(), v.trim().to_string())),
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
            }
        }
        Action::Continue
    }
}
