//! Host calls without the SDK's wrappers, which `panic!` (and so trap the VM)
//! on any host status they do not expect — Envoy answers otherwise, for one,
//! for a callout answer cut off mid-way. Here every status is mapped: reads
//! give "none", shared data a store error, writes `false`.
//!
//! The SDK is still used for `dispatch_http_call`: its dispatcher must
//! register the callout's token, or it traps on the answer.

extern "C" {
    fn proxy_replace_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_remove_header_map_value(map_type: u32, key_data: *const u8, key_size: usize) -> u32;
    fn proxy_get_current_time_nanoseconds(return_time: *mut u64) -> u32;
    fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
    fn proxy_continue_stream(stream_type: u32) -> u32;
    fn proxy_set_effective_context(context_id: u32) -> u32;
    fn proxy_define_metric(
        metric_type: u32,
        name_data: *const u8,
        name_size: usize,
        return_id: *mut u32,
    ) -> u32;
    fn proxy_increment_metric(metric_id: u32, offset: i64) -> u32;
    fn proxy_record_metric(metric_id: u32, value: u64) -> u32;
    fn proxy_get_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_get_header_map_pairs(
        map_type: u32,
        return_map_data: *mut *mut u8,
        return_map_size: *mut usize,
    ) -> u32;
    fn proxy_get_shared_data(
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
        return_cas: *mut u32,
    ) -> u32;
    fn proxy_set_shared_data(
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
        cas: u32,
    ) -> u32;
    #[allow(clippy::too_many_arguments)]
    fn proxy_send_local_response(
        status_code: u32,
        status_code_details_data: *const u8,
        status_code_details_size: usize,
        body_data: *const u8,
        body_size: usize,
        headers_data: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> u32;
    fn proxy_get_property(
        path_data: *const u8,
        path_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_get_buffer_bytes(
        buffer_type: u32,
        start: usize,
        max_size: usize,
        return_buffer_data: *mut *mut u8,
        return_buffer_size: *mut usize,
    ) -> u32;
}

use crate::quota::StoreError;

/// proxy-wasm statuses.
const OK: u32 = 0;
const NOT_FOUND: u32 = 1;
const CAS_MISMATCH: u32 = 8;

/// Takes ownership of memory the host allocated through the SDK's
/// `proxy_on_memory_allocate` (a `Vec<u8>` of that capacity).
fn owned(status: u32, data: *mut u8, size: usize) -> Option<Vec<u8>> {
    if status != OK || data.is_null() {
        return None;
    }
    // SAFETY: on Ok the host returned `size` bytes it allocated with the
    // module's allocator, as a Vec<u8> of capacity `size`; ownership is ours.
    Some(unsafe { Vec::from_raw_parts(data, size, size) })
}

pub fn header_map_value(map_type: u32, key: &str) -> Option<Vec<u8>> {
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut size: usize = 0;
    // SAFETY: the key is a live slice; the out-pointers are valid locals.
    let status = unsafe {
        proxy_get_header_map_value(map_type, key.as_ptr(), key.len(), &mut data, &mut size)
    };
    owned(status, data, size)
}

/// The whole header map, serialized as the ABI has it (see
/// [`crate::filter::HeaderPairs`]): one host call for every header.
pub fn header_map_pairs(map_type: u32) -> Option<Vec<u8>> {
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut size: usize = 0;
    // SAFETY: the out-pointers are valid locals.
    let status = unsafe { proxy_get_header_map_pairs(map_type, &mut data, &mut size) };
    owned(status, data, size)
}

/// Shared data: `(None, None)` for a missing key; any status other than
/// Ok and NotFound is a store error (the SDK would trap).
pub fn get_shared_data(key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), StoreError> {
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut size: usize = 0;
    let mut cas: u32 = 0;
    // SAFETY: the key is a live slice; the out-pointers are valid locals.
    let status =
        unsafe { proxy_get_shared_data(key.as_ptr(), key.len(), &mut data, &mut size, &mut cas) };
    match status {
        OK => Ok((owned(OK, data, size), (cas != 0).then_some(cas))),
        NOT_FOUND => Ok((None, None)),
        _ => Err(StoreError::Other),
    }
}

/// A write with CAS (`None`: unconditional).
pub fn set_shared_data(key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
    // SAFETY: key and value are live slices.
    let status = unsafe {
        proxy_set_shared_data(
            key.as_ptr(),
            key.len(),
            value.as_ptr(),
            value.len(),
            cas.unwrap_or(0),
        )
    };
    match status {
        OK => Ok(()),
        CAS_MISMATCH => Err(StoreError::CasMismatch),
        _ => Err(StoreError::Other),
    }
}

/// Answers the current request locally (`grpc_status` -1: none); false when
/// Envoy refused.
pub fn send_local_response(status: u32, headers: &[u8], body: &[u8], grpc_status: i32) -> bool {
    // SAFETY: headers and body are live slices; no details string.
    let status = unsafe {
        proxy_send_local_response(
            status,
            std::ptr::null(),
            0,
            body.as_ptr(),
            body.len(),
            headers.as_ptr(),
            headers.len(),
            grpc_status,
        )
    };
    status == OK
}

/// A property by its NUL-separated path.
pub fn property(path: &[u8]) -> Option<Vec<u8>> {
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut size: usize = 0;
    // SAFETY: the path is a live slice; the out-pointers are valid locals.
    let status = unsafe { proxy_get_property(path.as_ptr(), path.len(), &mut data, &mut size) };
    owned(status, data, size)
}

pub fn buffer(buffer_type: u32, max_size: usize) -> Option<Vec<u8>> {
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut size: usize = 0;
    // SAFETY: the out-pointers are valid locals.
    let status = unsafe { proxy_get_buffer_bytes(buffer_type, 0, max_size, &mut data, &mut size) };
    owned(status, data, size)
}

/// proxy-wasm ABI numbers of the maps and buffers tollgate uses.
pub const MAP_REQUEST_HEADERS: u32 = 0;
pub const MAP_RESPONSE_HEADERS: u32 = 2;
pub const MAP_CALLOUT_RESPONSE_HEADERS: u32 = 6;
pub const BUFFER_CALLOUT_RESPONSE_BODY: u32 = 4;
pub const BUFFER_PLUGIN_CONFIGURATION: u32 = 7;
/// proxy-wasm metric kinds.
pub const METRIC_COUNTER: u32 = 0;
pub const METRIC_GAUGE: u32 = 1;

/// Sets a header (replacing every value it had), or removes it with `None`;
/// false when the host refused.
pub fn set_header(map_type: u32, key: &str, value: Option<&[u8]>) -> bool {
    // SAFETY: key and value are live slices.
    let status = unsafe {
        match value {
            Some(v) => proxy_replace_header_map_value(
                map_type,
                key.as_ptr(),
                key.len(),
                v.as_ptr(),
                v.len(),
            ),
            None => proxy_remove_header_map_value(map_type, key.as_ptr(), key.len()),
        }
    };
    status == OK
}

/// The host calls that carry out a decision on the current request, as a
/// trait so that the glue's handling of their failures is unit-tested.
pub trait RequestHost {
    /// The clock in milliseconds since the Unix epoch; `None` when it failed.
    fn now_ms(&self) -> Option<u64>;
    /// Sets a request header (replacing every value), or removes it with
    /// `None`; false when the host refused.
    fn set_request_header(&mut self, name: &str, value: Option<&[u8]>) -> bool;
    /// Answers the request locally (with this gRPC status for a gRPC call);
    /// false when the host refused.
    fn send_local_response(
        &mut self,
        status: u32,
        headers: &[u8],
        body: &[u8],
        grpc_status: Option<u32>,
    ) -> bool;
}

/// The real host.
pub struct Live;

impl RequestHost for Live {
    fn now_ms(&self) -> Option<u64> {
        now_ns().map(|ns| ns / 1_000_000)
    }
    fn set_request_header(&mut self, name: &str, value: Option<&[u8]>) -> bool {
        set_header(MAP_REQUEST_HEADERS, name, value)
    }
    fn send_local_response(
        &mut self,
        status: u32,
        headers: &[u8],
        body: &[u8],
        grpc_status: Option<u32>,
    ) -> bool {
        let grpc = grpc_status
            .and_then(|g| i32::try_from(g).ok())
            .unwrap_or(-1);
        send_local_response(status, headers, body, grpc)
    }
}

/// The host's clock, in nanoseconds since the Unix epoch.
pub fn now_ns() -> Option<u64> {
    let mut t: u64 = 0;
    // SAFETY: the out-pointer is a valid local.
    let status = unsafe { proxy_get_current_time_nanoseconds(&mut t) };
    (status == OK).then_some(t)
}

/// Asks for `on_tick` every `ms` milliseconds (0 stops it).
pub fn set_tick_period_ms(ms: u32) -> bool {
    // SAFETY: no pointers.
    unsafe { proxy_set_tick_period_milliseconds(ms) == OK }
}

/// Lets the effective context's paused request go on.
pub fn continue_request() -> bool {
    // SAFETY: no pointers; 0 is the request stream.
    unsafe { proxy_continue_stream(0) == OK }
}

/// Makes a context the effective one (for host calls from a callback of
/// another context); false when it no longer exists.
pub fn set_effective_context(id: u32) -> bool {
    // SAFETY: no pointers.
    unsafe { proxy_set_effective_context(id) == OK }
}

/// Defines a metric; its id, or `None` when the host refused.
pub fn define_metric(kind: u32, name: &str) -> Option<u32> {
    let mut id: u32 = 0;
    // SAFETY: the name is a live slice; the out-pointer is a valid local.
    let status = unsafe { proxy_define_metric(kind, name.as_ptr(), name.len(), &mut id) };
    (status == OK).then_some(id)
}

pub fn increment_metric(id: u32, by: i64) -> bool {
    // SAFETY: no pointers.
    unsafe { proxy_increment_metric(id, by) == OK }
}

pub fn record_metric(id: u32, value: u64) -> bool {
    // SAFETY: no pointers.
    unsafe { proxy_record_metric(id, value) == OK }
}

#[cfg(all(test, not(target_arch = "wasm32")))]
mod tests {
    /// The SDK's host-call wrappers `panic!` on statuses they do not expect
    /// (a trap in the VM): outside this module only `dispatch_http_call` may
    /// be called through the SDK, and no SDK context method that calls the
    /// host may be used at all.
    #[test]
    fn only_dispatch_http_call_goes_through_the_sdk() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src");
        let mut checked = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            // This test's own text names what it looks for.
            let code = text.split("#[cfg(all(test, not(").next().unwrap();
            for (i, line) in code.lines().enumerate() {
                let at = format!("{}:{}", path.display(), i + 1);
                for (n, _) in line.match_indices("hostcalls::") {
                    let rest = &line[n + "hostcalls::".len()..];
                    assert!(
                        rest.starts_with("dispatch_http_call"),
                        "{at}: an SDK host call that can trap: {line}"
                    );
                }
                for method in [
                    "get_http_request_header",
                    "set_http_request_header",
                    "set_http_response_header",
                    "add_http_request_header",
                    "add_http_response_header",
                    "get_http_call_response",
                    "get_shared_data",
                    "set_shared_data",
                    "send_http_response",
                    "get_property",
                    "resume_http_request",
                    "get_plugin_configuration",
                    "get_current_time",
                    "set_tick_period",
                ] {
                    assert!(
                        !line.contains(&format!(".{method}")),
                        "{at}: the SDK's `{method}` can trap: {line}"
                    );
                }
            }
            checked += 1;
        }
        assert!(checked >= 15, "read only {checked} source files");
    }
}
