//! Host calls without the SDK's wrappers, which `panic!` (and so trap the VM)
//! on any host status they do not expect — Envoy answers otherwise, for one,
//! for a callout answer cut off mid-way. Here every status is mapped: reads
//! give "none", shared data a store error, writes `false`.
//!
//! The SDK is still used for `dispatch_http_call` (see [`dispatch_http_call`]):
//! its dispatcher must register the callout's token, or it traps on the answer.
//! The ABI's serialized header maps are read and written here too.

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
    fn proxy_register_shared_queue(
        name_data: *const u8,
        name_size: usize,
        return_id: *mut u32,
    ) -> u32;
    fn proxy_enqueue_shared_queue(queue_id: u32, value_data: *const u8, value_size: usize) -> u32;
    fn proxy_dequeue_shared_queue(
        queue_id: u32,
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

use crate::driver::{CalloutReply, ReplyBody, MAX_CALLOUT_BODY};
use crate::store::{SharedStore, StoreError};

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
/// [`HeaderPairs`]): one host call for every header.
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

/// Registers a shared queue whose `on_queue_ready` goes to the current root
/// context (call it from a root callback); its id, or `None`.
pub fn register_queue(name: &str) -> Option<u32> {
    let mut id: u32 = 0;
    // SAFETY: the name is a live slice; the out-pointer is a valid local.
    let status = unsafe { proxy_register_shared_queue(name.as_ptr(), name.len(), &mut id) };
    (status == OK).then_some(id)
}

/// Adds a one-byte item to a queue; false when the host refused.
pub fn enqueue(queue: u32) -> bool {
    let item = b"w";
    // SAFETY: a live slice.
    unsafe { proxy_enqueue_shared_queue(queue, item.as_ptr(), item.len()) == OK }
}

/// Takes every item off a queue (their contents are not used).
pub fn drain_queue(queue: u32) {
    // Bounded: the host could keep answering OK.
    for _ in 0..1024 {
        let mut data: *mut u8 = std::ptr::null_mut();
        let mut size: usize = 0;
        // SAFETY: the out-pointers are valid locals.
        let status = unsafe { proxy_dequeue_shared_queue(queue, &mut data, &mut size) };
        // Frees what the host allocated, if anything.
        drop(owned(status, data, size));
        if status != OK {
            return;
        }
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
    buffer_from(buffer_type, 0, max_size)
}

/// Up to `max_size` bytes of a buffer from byte `start` on.
pub fn buffer_from(buffer_type: u32, start: usize, max_size: usize) -> Option<Vec<u8>> {
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut size: usize = 0;
    // SAFETY: the out-pointers are valid locals.
    let status =
        unsafe { proxy_get_buffer_bytes(buffer_type, start, max_size, &mut data, &mut size) };
    owned(status, data, size)
}

/// proxy-wasm ABI numbers of the maps and buffers tollgate uses.
pub const MAP_REQUEST_HEADERS: u32 = 0;
pub const MAP_RESPONSE_HEADERS: u32 = 2;
pub const MAP_CALLOUT_RESPONSE_HEADERS: u32 = 6;
pub const BUFFER_HTTP_REQUEST_BODY: u32 = 0;
pub const BUFFER_HTTP_RESPONSE_BODY: u32 = 1;
pub const BUFFER_CALLOUT_RESPONSE_BODY: u32 = 4;
pub const BUFFER_GRPC_RECEIVE: u32 = 5;
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

/// Shared data through the host.
pub struct HostStore;

impl SharedStore for HostStore {
    fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), StoreError> {
        get_shared_data(key)
    }
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
        set_shared_data(key, value, cas)
    }
}

/// Registers this VM's own queue, whose items wake its root context (call
/// from a root callback): a name no other VM uses (queues are named per
/// plugin VM id, which every worker's VM shares).
pub fn register_wake_queue() -> Option<u32> {
    use std::hash::{BuildHasher, Hasher};
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    register_queue(&format!("tollgate.wake.{random:016x}"))
}

#[cfg(test)]
pub(crate) mod fake {
    use super::RequestHost;

    /// A host whose calls can be made to fail; it records what it was asked.
    #[derive(Default)]
    pub struct FakeHost {
        /// Header names whose writes fail.
        pub failing: Vec<&'static str>,
        pub headers: Vec<(String, Option<Vec<u8>>)>,
        pub answers: Vec<(u32, Option<u32>, String)>,
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

/// Pairs serialized as the proxy-wasm ABI has them (see [`HeaderPairs`]).
pub fn serialize_pairs<'a>(pairs: impl Iterator<Item = (&'a [u8], &'a [u8])> + Clone) -> Vec<u8> {
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

impl crate::driver::RequestHead for HeaderPairs<'_> {
    fn get(&self, name: &str) -> Option<&[u8]> {
        HeaderPairs::get(self, name)
    }
    fn pairs(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.iter()
    }
}

/// The answer to the callout being delivered, as the host has it. An answer
/// cut off after its headers arrives with no header map at all.
pub fn callout_reply(num_headers: usize, body_size: usize) -> CalloutReply {
    let status = (num_headers > 0)
        .then(|| header_map_value(MAP_CALLOUT_RESPONSE_HEADERS, ":status"))
        .flatten()
        .and_then(|s| std::str::from_utf8(&s).ok()?.parse().ok());
    let body = if body_size > MAX_CALLOUT_BODY {
        ReplyBody::TooLarge(body_size)
    } else if status.is_none() {
        ReplyBody::Read(Vec::new())
    } else {
        ReplyBody::Read(buffer(BUFFER_CALLOUT_RESPONSE_BODY, body_size).unwrap_or_default())
    };
    // GitHub's rule ("Rate limits for the REST API"); 429 is everyone's.
    let throttled = match status {
        Some(429) => true,
        Some(403) => {
            header_map_value(MAP_CALLOUT_RESPONSE_HEADERS, "retry-after").is_some()
                || header_map_value(MAP_CALLOUT_RESPONSE_HEADERS, "x-ratelimit-remaining")
                    .is_some_and(|v| v.trim_ascii() == b"0")
        }
        _ => false,
    };
    CalloutReply {
        status,
        body,
        throttled,
    }
}

/// A rate-limit service's answer (gRPC `status` 0) as the host has it.
pub fn grpc_reply(status: u32, size: usize) -> Vec<u8> {
    if status != 0 || size > MAX_CALLOUT_BODY {
        return Vec::new();
    }
    buffer(BUFFER_GRPC_RECEIVE, size).unwrap_or_default()
}

/// The client's address without the port.
pub fn source_ip() -> Option<String> {
    let raw = property(b"source\0address")?;
    let s = String::from_utf8(raw).ok()?;
    Some(strip_port(&s).to_string())
}

/// Sends a unary gRPC call through the SDK (its dispatcher must learn the
/// token, as for [`dispatch_http_call`]) to the service named by `service`
/// (a serialized `GrpcService`); the host's token, or `Err` when Envoy
/// refused (logged: usually an undefined cluster).
pub fn dispatch_grpc_call(
    service: &[u8],
    service_name: &str,
    method: &str,
    message: &[u8],
    timeout_ms: u64,
) -> Result<u32, ()> {
    let upstream =
        std::str::from_utf8(service).map_err(|_| log::error!("gRPC service name is not text"))?;
    proxy_wasm::hostcalls::dispatch_grpc_call(
        upstream,
        service_name,
        method,
        vec![],
        Some(message),
        std::time::Duration::from_millis(timeout_ms),
    )
    .map_err(|e| log::error!("gRPC call to {service_name} could not start: {e:?}"))
}

/// Sends a callout through the SDK (its dispatcher must learn the token, or
/// it traps on the answer); the host's token, or `Err` when Envoy refused
/// (logged: usually an undefined cluster).
pub fn dispatch_http_call(
    cluster: &str,
    headers: &[(String, String)],
    body: Option<&[u8]>,
    timeout_ms: u64,
) -> Result<u32, ()> {
    let pairs: Vec<(&str, &str)> = headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    proxy_wasm::hostcalls::dispatch_http_call(
        cluster,
        pairs,
        body,
        vec![],
        std::time::Duration::from_millis(timeout_ms),
    )
    .map_err(|e| log::error!("callout to cluster `{cluster}` could not start: {e:?}"))
}

#[cfg(all(test, not(target_arch = "wasm32")))]
mod tests {
    /// The SDK's host-call wrappers `panic!` on statuses they do not expect
    /// (a trap in the VM): only `dispatch_http_call` and `dispatch_grpc_call`
    /// may be called through the SDK (from this module), and no SDK context
    /// method that calls the host may be used at all.
    #[test]
    fn only_dispatch_http_call_goes_through_the_sdk() {
        let mut files = Vec::new();
        let mut dirs = vec![std::path::PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/src"
        ))];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    dirs.push(path);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    files.push(path);
                }
            }
        }
        let mut checked = 0;
        for path in files {
            let text = std::fs::read_to_string(&path).unwrap();
            // This test's own text names what it looks for.
            let code = text.split("#[cfg(all(test, not(").next().unwrap();
            for (i, line) in code.lines().enumerate() {
                let at = format!("{}:{}", path.display(), i + 1);
                for (n, _) in line.match_indices("hostcalls::") {
                    let rest = &line[n + "hostcalls::".len()..];
                    assert!(
                        rest.starts_with("dispatch_http_call")
                            || rest.starts_with("dispatch_grpc_call"),
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
        assert!(checked >= 25, "read only {checked} source files");
    }
}

#[cfg(test)]
mod abi_tests {
    use super::*;

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

    #[test]
    fn ports_are_stripped() {
        assert_eq!(strip_port("1.2.3.4:5678"), "1.2.3.4");
        assert_eq!(strip_port("[::1]:5678"), "::1");
        assert_eq!(strip_port("2001:db8::1"), "2001:db8::1");
        assert_eq!(strip_port("1.2.3.4"), "1.2.3.4");
    }
}
