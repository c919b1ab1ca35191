//! The fuzz targets' bodies live in `fuzz/targets.rs`, shared with the
//! corpus replay test of the main crate (`tests/fuzz_corpus.rs`).
#[path = "../targets.rs"]
mod targets;

pub use targets::*;
