#!/usr/bin/env bash
# Fuzzes tollgate's sans-IO core with cargo-fuzz (libFuzzer), on the stable
# toolchain: `-s none` (no sanitizer) needs no nightly flag. See fuzz/README.md.
#
#   scripts/fuzz.sh smoke              every target for 5 s (≈ 50 s in all with a warm build)
#   scripts/fuzz.sh long [SECONDS]     every target for SECONDS each (default 600), one after another
#   scripts/fuzz.sh run TARGET [SECONDS] [libFuzzer args...]   one target
#   scripts/fuzz.sh build              build every target (installs cargo-fuzz if missing)
#
# Targets run one at a time, single-process. New inputs go to a scratch corpus
# (fuzz/target/corpus/<target>/, git-ignored); the committed corpus
# fuzz/corpus/<target>/ is read as seeds and never written. Crashes are saved
# under fuzz/artifacts/<target>/; to keep one as a regression test, copy it to
# fuzz/regressions/<target>/ (see fuzz/README.md). Exit status: 0 when no
# target crashed, 1 otherwise (every target still runs).
#
# Environment: FUZZ_TARGETS="token jwks" to run only some; SMOKE_SECONDS
# (default 5) for the smoke pass; FUZZ_SANITIZER=address for AddressSanitizer
# (nightly flags on stable through RUSTC_BOOTSTRAP=1; about 4x slower; own
# build in fuzz/target/address/).
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../fuzz" || exit 1

ALL_TARGETS="token jwks config provider_answers route decision usage route_policy"
TARGETS="${FUZZ_TARGETS:-$ALL_TARGETS}"
CARGO_FUZZ_VERSION="0.13.2"
SANITIZER="${FUZZ_SANITIZER:-none}"
FUZZ_FLAGS=(-s "$SANITIZER")
if [ "$SANITIZER" != none ]; then
  # -Zsanitizer is a nightly flag: allow it on the stable toolchain.
  export RUSTC_BOOTSTRAP=1
  FUZZ_FLAGS+=(--target-dir "target/$SANITIZER")
fi

ensure_cargo_fuzz() {
  if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz $CARGO_FUZZ_VERSION (about 40 s)..." >&2
    cargo install --locked cargo-fuzz --version "$CARGO_FUZZ_VERSION" >&2 || exit 1
  fi
}

build() {
  ensure_cargo_fuzz
  # One build for every target; `cargo fuzz run` below finds it up to date.
  cargo fuzz build "${FUZZ_FLAGS[@]}" >&2 || { echo "fuzz: build failed" >&2; exit 1; }
}

# The dictionary of a target (libFuzzer takes one): fuzz/dicts/*.dict merged.
dict_for() {
  local t=$1 out="target/dicts/$1.dict"
  mkdir -p target/dicts
  case "$t" in
    token) cat dicts/token.dict ;;
    jwks | config) cat dicts/json.dict ;;
    route) cat dicts/paths.dict ;;
    usage) cat dicts/json.dict dicts/usage.dict ;;
    *) cat dicts/json.dict dicts/paths.dict ;;
  esac >"$out"
  echo "$out"
}

failed=()

# run_target TARGET SECONDS [libFuzzer args...]: one run, a summary line.
run_target() {
  local t=$1 secs=$2
  shift 2
  local log="target/logs/$t.log" scratch="target/corpus/$t"
  mkdir -p target/logs "$scratch" "artifacts/$t"
  local start=$SECONDS
  cargo fuzz run "${FUZZ_FLAGS[@]}" "$t" "$scratch" "corpus/$t" -- \
    -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    -dict="$(dict_for "$t")" -artifact_prefix="artifacts/$t/" "$@" >"$log" 2>&1
  local status=$?
  local elapsed=$((SECONDS - start))
  local execs rate cov ft corp
  execs=$(sed -nE 's/^stat::number_of_executed_units: *([0-9]+).*/\1/p' "$log" | tail -n 1)
  rate=$(sed -nE 's/^stat::average_exec_per_sec: *([0-9]+).*/\1/p' "$log" | tail -n 1)
  cov=$(grep -oE 'cov: [0-9]+' "$log" | tail -n 1 | cut -d' ' -f2)
  ft=$(grep -oE 'ft: [0-9]+' "$log" | tail -n 1 | cut -d' ' -f2)
  corp=$(grep -oE 'corp: [0-9]+' "$log" | tail -n 1 | cut -d' ' -f2)
  if [ "$status" -eq 0 ]; then
    printf 'fuzz: %-17s ok     %10s execs %7s/s  cov %5s  ft %6s  corpus %5s  (%ss)\n' \
      "$t" "${execs:-?}" "${rate:-?}" "${cov:-?}" "${ft:-?}" "${corp:-?}" "$elapsed"
  else
    failed+=("$t")
    printf 'fuzz: %-17s CRASH  %10s execs (exit %s, %ss); log: fuzz/%s\n' \
      "$t" "${execs:-?}" "$status" "$elapsed" "$log"
    grep -E '^(thread .* panicked|.*panicked at|==[0-9]+== ?ERROR|SUMMARY|Test unit written to)' "$log" | head -n 8 | sed 's/^/      /'
    grep -A3 'panicked at' "$log" | head -n 8 | sed 's/^/      /'
  fi
}

finish() {
  if [ "${#failed[@]}" -gt 0 ]; then
    echo "fuzz: FAILED: ${failed[*]} (crashing inputs in fuzz/artifacts/<target>/)" >&2
    exit 1
  fi
  echo "fuzz: ok: no crash in $(wc -w <<<"$TARGETS") targets"
}

case "${1:-}" in
  smoke)
    build
    for t in $TARGETS; do run_target "$t" "${SMOKE_SECONDS:-5}"; done
    finish
    ;;
  long)
    secs="${2:-600}"
    build
    for t in $TARGETS; do run_target "$t" "$secs"; done
    finish
    ;;
  run)
    [ -n "${2:-}" ] || { echo "usage: $0 run TARGET [SECONDS] [libFuzzer args...]" >&2; exit 2; }
    t=$2
    secs="${3:-600}"
    shift $(($# < 3 ? $# : 3))
    build
    run_target "$t" "$secs" "$@"
    finish
    ;;
  build)
    build
    ;;
  *)
    sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
