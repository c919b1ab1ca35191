# tollgate — the two commands a newcomer needs:
#   make run    build, then run the filter in a real Envoy with a demo IdP
#   make test   everything: format, lints, unit tests (native and in wasm), end-to-end tests
# Both install what they need (wasm32-wasip1 target, a pinned Envoy in build/venv).

SHELL   := bash
VENV    := build/venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
TARGET  := wasm32-wasip1
WASM    := target/$(TARGET)/release/tollgate.wasm
PYTEST_ARGS ?=

.PHONY: all build run test setup wrk rust-target lint unit wasm-test e2e bench bench-smoke fuzz fuzz-smoke mutants oci deny clean

all: build

# The wasm32-wasip1 target, and clang to compile ring's C parts for it.
rust-target:
	@rustup target list --installed | grep -qx $(TARGET) || rustup target add $(TARGET)
	@command -v clang >/dev/null || { \
	  echo "installing clang (ring is compiled for wasm32 with it)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q clang lld llvm; }

$(STAMP): tests/requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r tests/requirements.txt
	touch $@

# Llama Stack 0.2.12 in its own venv: the e2e tests build configurations with its models.
LLAMA_VENV  := build/llama-venv
LLAMA_STAMP := $(LLAMA_VENV)/.installed

# OGX's own code (ogx 1.5.0, Python >= 3.12, so not installed): the wheel, from
# which tests/e2e/harness/ogx.py loads the functions that read what tollgate
# forwards (UpstreamHeaderAuthProvider and friends).
OGX_WHEEL := build/ogx/ogx-1.5.0-py3-none-any.whl

$(OGX_WHEEL): $(STAMP)
	$(PY) -m pip download --quiet --disable-pip-version-check --no-deps \
		--python-version 3.12 --only-binary=:all: --dest build/ogx ogx==1.5.0

$(LLAMA_STAMP): tests/requirements-llama-stack.txt
	python3 -m venv $(LLAMA_VENV)
	$(LLAMA_VENV)/bin/pip install --quiet --disable-pip-version-check --no-deps -r tests/requirements-llama-stack.txt
	touch $@

OIDC    := tests/oidc/node_modules/.package-lock.json

# A real OpenID provider (npm `oidc-provider`) for the interoperability tests.
$(OIDC): tests/oidc/package.json tests/oidc/package-lock.json
	cd tests/oidc && npm ci --no-audit --no-fund --loglevel=error
	touch $@

# wrk: the end-to-end floods (100,000+ distinct clients) and the benchmarks.
wrk:
	@command -v wrk >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q wrk; }

# The global-quota engine for the tests (tests/rls-server/README.md): Debian's
# redis-server and the rate-limit service of tests/rls-server (its own workspace and
# lock; target dir under build/, apart from tollgate's target/). ~2 min clean build.
RLS_TARGET := build/rls-server-target
.PHONY: rls-server
rls-server:
	@command -v redis-server >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q redis-server; }
	cd tests/rls-server && CARGO_TARGET_DIR=$(CURDIR)/$(RLS_TARGET) cargo build --release --locked

SCHEMAS := build/schema-check/node_modules/.package-lock.json

# Istio's CRD schemas (npm `@kubernetes-models/istio`) and TypeScript, for
# tests/e2e/test_deploy.py's check of the manifests in envoy/. Installed under
# build/ (deploy/schema-check/ holds only the pinned package files).
$(SCHEMAS): deploy/schema-check/package.json deploy/schema-check/package-lock.json
	mkdir -p build/schema-check
	cp deploy/schema-check/package.json deploy/schema-check/package-lock.json build/schema-check/
	cd build/schema-check && npm ci --no-audit --no-fund --loglevel=error
	touch $@

setup: rust-target $(STAMP) $(LLAMA_STAMP) $(OGX_WHEEL) $(OIDC) $(SCHEMAS) wrk rls-server

build: rust-target
	cargo build --release --target $(TARGET)
	@echo "$(WASM): $$(stat -c %s $(WASM)) bytes, sha256 $$(sha256sum $(WASM) | cut -d' ' -f1)"

run: build $(STAMP)
	$(PY) scripts/demo.py

lint: rust-target
	cargo fmt --check
	cd tests/rls-server && cargo fmt --check
	cargo clippy --all-targets -- -D warnings
	cargo clippy --release --target $(TARGET) -- -D warnings

# Host unit tests, and the committed fuzz corpus replayed as regular tests.
unit:
	cargo test

wasm-test: rust-target
	bash scripts/test-wasm.sh

e2e: build $(STAMP) $(LLAMA_STAMP) $(OGX_WHEEL) $(OIDC) $(SCHEMAS)
	$(PY) -m pytest tests/e2e -q $(PYTEST_ARGS)

# Benchmarks (bench/README.md): tollgate vs plain Envoy, a do-nothing wasm
# filter and native jwt_authn; one pinned Envoy worker, wrk on the other core.
#   make bench         10 s per configuration (BENCH_SECONDS=5 make bench: shorter),
#                      results in build/bench.md and build/bench.json
#   make bench-smoke   ~1 s per configuration: checks that the tooling still works
bench: build $(STAMP)
	$(PY) bench/run.py
	$(PY) bench/stream.py 10 200

bench-smoke: build $(STAMP)
	$(PY) bench/run.py --smoke
	$(PY) bench/stream.py 1 20

# Fuzzing (fuzz/README.md): cargo-fuzz on stable (`-s none`), installed if missing.
#   make fuzz          every target for FUZZ_SECONDS (default 600) each
#   make fuzz-smoke    every target for a few seconds (part of make test)
FUZZ_SECONDS ?= 600
fuzz:
	bash scripts/fuzz.sh long $(FUZZ_SECONDS)

fuzz-smoke:
	bash scripts/fuzz.sh smoke

# Mutation testing of the sans-IO core (cargo-mutants, installed if missing):
# each mutant is a small change to the code that the host unit tests should
# catch; the ones they miss are listed in build/mutants/mutants.out/missed.txt.
# ~20-40 min; not part of make test. MUTANTS_FILES narrows it (-f per file).
MUTANTS_FILES ?= src/alg.rs src/auth.rs src/claims.rs src/config.rs src/json.rs src/jwks_cache.rs \
  src/jwt.rs src/key_set.rs src/path.rs src/provider/mod.rs src/provider/custom.rs \
  src/provider/introspection.rs src/quota.rs src/response.rs src/route_rules.rs src/rsa.rs \
  src/store.rs src/token_cache.rs
mutants:
	@command -v cargo-mutants >/dev/null || cargo install cargo-mutants --locked --version 27.1.0
	cargo mutants --timeout 60 -o build/mutants $(addprefix -f ,$(MUTANTS_FILES))

# OCI image layout of the filter in build/oci/, no Docker needed: tag <version>
# (Wasm "oci" variant) and <version>-compat (/plugin.wasm, as ./Dockerfile builds).
oci: build
	bash scripts/oci.sh

# Licences, bans and sources of the dependency tree (deny.toml); works offline.
# Advisories need the RustSec database from GitHub: cargo deny check advisories
deny:
	@command -v cargo-deny >/dev/null || cargo install cargo-deny --locked --version 0.20.2
	cargo deny --log-level error check licenses bans sources

test: setup lint unit wasm-test fuzz-smoke e2e bench-smoke

clean:
	cargo clean
	rm -rf build
