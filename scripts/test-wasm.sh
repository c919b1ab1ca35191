#!/usr/bin/env bash
# Runs the lib's unit tests inside wasm (wasm32-wasip1 under Node's WASI, see
# .cargo/config.toml and scripts/wasm-test-runner.mjs) and refuses a run that
# proves nothing: it fails if cargo fails, if no `test result:` summary
# appears, if any summary reports 0 passed, or if no `tests::crypto::` test is
# listed as ok (the signature checks of src/tests/crypto.rs must really have
# run in wasm).
#
#   bash scripts/test-wasm.sh [cargo test args...] [-- test binary args...]
#   e.g. bash scripts/test-wasm.sh -- tests::crypto --nocapture
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1

log="$(mktemp)"
trap 'rm -f "$log"' EXIT

start=$SECONDS
cargo test --target wasm32-wasip1 --lib "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
elapsed=$((SECONDS - start))

fail() {
  echo "test-wasm: FAILED: $*" >&2
  exit 1
}

if [ "$status" -ne 0 ]; then
  # A panic aborts the whole wasm test binary before the harness prints the
  # captured output: rerun the test it died in, alone and uncaptured, so
  # its panic message shows.
  aborted="$(tail -n 30 "$log" | sed -nE 's/^test ([^ ]+) \.\.\. ?$/\1/p' | tail -n 1)"
  if [ -n "$aborted" ]; then
    cargo_args=()
    for a in "$@"; do
      [ "$a" = "--" ] && break
      cargo_args+=("$a")
    done
    echo "test-wasm: the run aborted in $aborted; rerunning it alone with --nocapture:" >&2
    cargo test --target wasm32-wasip1 --lib "${cargo_args[@]}" -- --exact --nocapture "$aborted" >&2
  fi
  fail "cargo test exited with status $status${aborted:+ (aborted in $aborted)}"
fi

summaries="$(grep -E '^test result: ' "$log")"
if [ -z "$summaries" ]; then
  fail "no 'test result:' summary in the output (did any test binary run?)"
fi
if grep -vqE '^test result: ok\. [0-9]+ passed' <<<"$summaries"; then
  fail "a summary is not 'test result: ok. N passed'"
fi
total=0
while read -r n; do
  if [ "$n" -eq 0 ]; then
    fail "a test run passed 0 tests"
  fi
  total=$((total + n))
done < <(sed -nE 's/^test result: ok\. ([0-9]+) passed.*/\1/p' <<<"$summaries")

crypto_ok="$(grep -cE '^test (tollgate::)?tests::crypto::[^ ]+ \.\.\. ok$' "$log")"
if [ "$crypto_ok" -eq 0 ]; then
  fail "no tests::crypto:: test ran ok in wasm"
fi

echo "test-wasm: ok: $total tests passed in wasm ($crypto_ok in tests::crypto), ${elapsed}s"
