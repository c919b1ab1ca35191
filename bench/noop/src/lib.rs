//! A do-nothing proxy-wasm HTTP filter: the baseline ("wasm floor") that
//! tollgate's warm path is compared with in `make bench`. Per request it does
//! what every authenticating filter must do at least — cross into the VM and
//! read the `authorization` header out of Envoy — and lets the request go on.

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root) });
}}

struct Root;

impl Context for Root {}

impl RootContext for Root {
    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Noop))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Noop;

impl Context for Noop {}

impl HttpContext for Noop {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        // Bytes, not the string getter: that one traps on non-UTF-8 values.
        let authorization = self.get_http_request_header_bytes("authorization");
        std::hint::black_box(authorization);
        Action::Continue
    }
}
