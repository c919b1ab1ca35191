//! Replays the committed fuzz inputs as regular tests: every file of
//! `fuzz/corpus/<target>/` (seeds and kept finds) and `fuzz/regressions/<target>/`
//! (inputs that once crashed a target) goes through the same target body the
//! fuzzer runs (`fuzz/targets.rs`, included below), natively, without
//! cargo-fuzz or a nightly toolchain: `cargo test --test fuzz_corpus`.
//!
//! An input listed in `fuzz/regressions/KNOWN_FAILING` (`<target>/<file>`
//! per line) is a crash found and not fixed yet: it must still fail, and the
//! test says so once it passes (then delete its line). Each target must
//! replay at least one corpus file: an empty or missing corpus fails.

#[path = "../fuzz/targets.rs"]
mod targets;

use std::collections::BTreeSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// `<target>/<file>` entries of `fuzz/regressions/KNOWN_FAILING`.
fn known_failing() -> BTreeSet<String> {
    let text =
        std::fs::read_to_string(fuzz_dir().join("regressions/KNOWN_FAILING")).unwrap_or_default();
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect()
}

/// The input files of a directory, sorted; none if it does not exist.
/// Hidden files (libFuzzer's temporary `.tmp*`) are skipped.
fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("readable directory entry").path())
        .filter(|p| p.is_file())
        .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .collect();
    files.sort();
    files
}

fn replay(target: &str) {
    let (_, body) = targets::TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .unwrap_or_else(|| panic!("no target {target}"));
    let known = known_failing();
    let corpus = inputs(&fuzz_dir().join("corpus").join(target));
    let regressions = inputs(&fuzz_dir().join("regressions").join(target));
    assert!(
        !corpus.is_empty(),
        "fuzz/corpus/{target}/ has no inputs: the replay would prove nothing"
    );
    let mut problems = Vec::new();
    for file in corpus.iter().chain(&regressions) {
        let data = std::fs::read(file).unwrap();
        let id = format!("{target}/{}", file.file_name().unwrap().to_string_lossy());
        let panicked = catch_unwind(AssertUnwindSafe(|| body(&data))).is_err();
        match (panicked, known.contains(&id)) {
            (true, false) => problems.push(format!("{} panicked", file.display())),
            (false, true) => problems.push(format!(
                "{} passes now: remove `{id}` from fuzz/regressions/KNOWN_FAILING",
                file.display()
            )),
            _ => {}
        }
    }
    println!(
        "{target}: replayed {} corpus and {} regression inputs",
        corpus.len(),
        regressions.len()
    );
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn token() {
    replay("token");
}

#[test]
fn jwks() {
    replay("jwks");
}

#[test]
fn config() {
    replay("config");
}

#[test]
fn provider_answers() {
    replay("provider_answers");
}

#[test]
fn route() {
    replay("route");
}

#[test]
fn decision() {
    replay("decision");
}

#[test]
fn usage() {
    replay("usage");
}

#[test]
fn route_policy() {
    replay("route_policy");
}

/// Every target is replayed by a test above, and every corpus directory
/// belongs to a target.
#[test]
fn every_target_is_replayed() {
    let names: BTreeSet<&str> = targets::TARGETS.iter().map(|(n, _)| *n).collect();
    let tested: BTreeSet<&str> = [
        "token",
        "jwks",
        "config",
        "provider_answers",
        "route",
        "decision",
        "usage",
        "route_policy",
    ]
    .into();
    assert_eq!(names, tested);
    let dirs: BTreeSet<String> = std::fs::read_dir(fuzz_dir().join("corpus"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let names: BTreeSet<String> = names.iter().map(|n| n.to_string()).collect();
    assert_eq!(dirs, names, "fuzz/corpus/ directories and targets differ");
}

/// The fixtures the targets fuzz against are meaningful: the embedded tokens
/// verify against the embedded JWKS, the fixture configurations load.
#[test]
fn fixtures_are_valid() {
    targets::self_check().unwrap();
}
