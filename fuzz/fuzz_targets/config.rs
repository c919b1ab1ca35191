#![no_main]
//! `cargo fuzz run config -s none`: see fuzz/README.md and fuzz/targets.rs.

libfuzzer_sys::fuzz_target!(|data: &[u8]| tollgate_fuzz::config(data));
