#![no_main]
//! `cargo fuzz run route_policy -s none`: see fuzz/README.md and fuzz/targets.rs.

libfuzzer_sys::fuzz_target!(|data: &[u8]| tollgate_fuzz::route_policy(data));
