//! A do-nothing proxy-wasm HTTP filter: the baseline ("wasm floor") that
//! tollgate's warm path is compared with in `make bench`. Per request it does
//! what every authenticating filter must do at least — cross into the VM and
//! read the `authorization` header out of Envoy — and lets the request go on.
//!
//! Its plugin configuration, when not empty, lists request headers to set on
//! every request, one `name: value` per line: with tollgate's two identity
//! headers it is the floor of a filter that forwards an identity (`b2`).

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use std::rc::Rc;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

#[derive(Default)]
struct Root {
    set: Rc<Vec<(String, String)>>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let config = self.get_plugin_configuration().unwrap_or_default();
        let set = String::from_utf8_lossy(&config)
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        self.set = Rc::new(set);
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Noop {
            set: self.set.clone(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Noop {
    set: Rc<Vec<(String, String)>>,
}

impl Context for Noop {}

impl HttpContext for Noop {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        // Bytes, not the string getter: that one traps on non-UTF-8 values.
        let authorization = self.get_http_request_header_bytes("authorization");
        std::hint::black_box(authorization);
        for (name, value) in self.set.iter() {
            self.set_http_request_header(name, Some(value));
        }
        Action::Continue
    }
}
