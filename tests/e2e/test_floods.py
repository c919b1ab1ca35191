"""Hardening: floods. Unknown-kid tokens must not turn into a JWKS fetch storm,
distinct tokens (garbage or valid) must not grow memory without bound, and
distinct opaque tokens must not open more provider callouts than the
per-worker cap (MAX_PROVIDER_CALLOUTS = 256).

Memory figures are printed (run with `-s` or `-rA` to see them): Envoy's
process RSS (/proc/<pid>/status; it includes the V8 wasm linear memories,
which are mmapped outside the C++ heap) and the admin `/memory` figures
(tcmalloc: `allocated`, `heap_size`). Envoy exposes no per-VM memory stat
(`/stats?filter=wasm` has VM counts and tollgate's counters only)."""

from __future__ import annotations

import http.client
import http.server
import json
import os
import threading
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import parse_qs

import pytest

from harness import tokens
from harness.config import jwt_config

API = "/v1/models"
MIB = 1024 * 1024


def hammer(port: int, values: list[str], threads: int = 8, timeout: float = 30.0,
           duration: float | None = None) -> Counter:
    """Sends one GET per token over `threads` keep-alive connections; returns
    a Counter of statuses (`"error"` for a request that failed three times).
    With `duration`, the requests are spread evenly over that many seconds."""
    begin = time.monotonic()

    def worker(chunk: list[str]) -> Counter:
        seen: Counter = Counter()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        for k, value in enumerate(chunk):
            if duration:
                pause = begin + duration * k / len(chunk) - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
            for _ in range(3):
                try:
                    conn.request("GET", API, headers={"Authorization": f"Bearer {value}"})
                    resp = conn.getresponse()
                    resp.read()
                    seen[resp.status] += 1
                    if resp.will_close:
                        conn.close()
                    break
                except (OSError, http.client.HTTPException):
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
            else:
                seen["error"] += 1
        conn.close()
        return seen

    chunks = [values[i::threads] for i in range(threads)]
    total: Counter = Counter()
    with ThreadPoolExecutor(threads) as pool:
        for c in pool.map(worker, chunks):
            total.update(c)
    return total


def memory(gw) -> dict[str, int]:
    """Envoy's RSS (KiB) and the admin /memory figures (bytes)."""
    out: dict[str, int] = {}
    with open(f"/proc/{gw.proc.pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "RssAnon:", "VmHWM:")):
                name, value = line.split(":", 1)
                out[name] = int(value.split()[0])
    with urllib.request.urlopen(f"{gw.admin_url}/memory", timeout=5) as r:
        doc = json.load(r)
    out["allocated"] = int(doc["allocated"])
    out["heap_size"] = int(doc["heap_size"])
    return out


def fmt(m: dict[str, int]) -> str:
    return (f"RSS {m['VmRSS'] / 1024:.1f} MiB (anon {m['RssAnon'] / 1024:.1f} MiB, peak {m['VmHWM'] / 1024:.1f} MiB), "
            f"heap allocated {m['allocated'] / MIB:.1f} MiB, heap size {m['heap_size'] / MIB:.1f} MiB")


def growth(before: dict[str, int], after: dict[str, int]) -> str:
    return (f"RSS {(after['VmRSS'] - before['VmRSS']) / 1024:+.1f} MiB, "
            f"heap allocated {(after['allocated'] - before['allocated']) / MIB:+.1f} MiB")


def unknown_kid_token(i: int) -> str:
    """Well-formed, valid claims, a random unknown kid, a random signature: the
    kid lookup is what refuses it."""
    header = {"alg": "RS256", "typ": "JWT", "kid": f"rnd-{os.urandom(8).hex()}-{i}"}
    return tokens.encode_raw(header, tokens.claims(), os.urandom(256))


def garbage_token(i: int, known_kid: str) -> str:
    """Distinct refused tokens of three kinds: random text, broken JSON, and a
    well-formed token with the known kid and a wrong signature."""
    kind = i % 3
    if kind == 0:
        return tokens.b64url(os.urandom(60)) + "." + tokens.b64url(os.urandom(90)) + "." + tokens.b64url(os.urandom(40))
    if kind == 1:
        return tokens.b64url(b'{"alg":"RS256","kid":') + "." + tokens.b64url(os.urandom(30)) + ".c2ln"
    header = {"alg": "RS256", "typ": "JWT", "kid": known_kid}
    return tokens.encode_raw(header, tokens.claims(jti=f"g{i}"), os.urandom(256))


@pytest.fixture(scope="module")
def gw(module_idp, module_envoy, rsa, ec):
    module_idp.set_keys(rsa, ec)
    e = module_envoy(jwt_config(module_idp.port, jwks={"refresh_cooldown_seconds": 10}), concurrency=2)
    token = rsa.sign(tokens.claims())
    deadline = time.monotonic() + 15
    while e.get(API, token=token).status != 200:
        assert time.monotonic() < deadline, "the gateway never got its keys"
        time.sleep(0.2)
    return e


def test_unknown_kid_flood_fetches_once_per_cooldown(gw, module_idp, rsa):
    """10,000 tokens with random unknown kids over 8 keep-alive connections,
    spread over ~12 s and starting once the cooldown since the last fetch is
    over: all 401, and at most one JWKS refresh per 10 s cooldown window for
    the whole process (the fetch is shared by the workers): at most
    1 + run_seconds // 10, and at least the one the flood's start allows."""
    values = [unknown_kid_token(i) for i in range(10_000)]
    time.sleep(10.5)  # the warm-up fetch is now more than a cooldown ago
    before = module_idp.count("/jwks")
    start = time.monotonic()
    statuses = hammer(gw.port, values, duration=12)
    run = time.monotonic() - start
    time.sleep(0.5)  # a refresh started at the very end is counted too
    fetches = module_idp.count("/jwks") - before
    print(f"unknown-kid flood: {sum(statuses.values())} requests in {run:.1f}s "
          f"({sum(statuses.values()) / run:.0f}/s), statuses {dict(statuses)}, {fetches} JWKS fetches")
    assert statuses == Counter({401: 10_000}), statuses
    assert 1 <= fetches <= 1 + int(run // 10), f"{fetches} fetches in {run:.1f}s"
    assert gw.get(API, token=rsa.sign(tokens.claims())).status == 200


def test_distinct_garbage_tokens_do_not_grow_memory(gw, rsa):
    """10,000 distinct refused tokens, twice over: memory stays bounded."""
    before = memory(gw)
    first = hammer(gw.port, [garbage_token(i, rsa.kid) for i in range(10_000)])
    mid = memory(gw)
    second = hammer(gw.port, [garbage_token(i, rsa.kid) for i in range(10_000, 20_000)])
    after = memory(gw)
    print(f"\ngarbage tokens: before      {fmt(before)}")
    print(f"garbage tokens: after 10k   {fmt(mid)}  ({growth(before, mid)})")
    print(f"garbage tokens: after 20k   {fmt(after)}  ({growth(before, after)})")
    assert first == Counter({401: 10_000}) and second == Counter({401: 10_000}), (first, second)
    assert after["VmRSS"] - before["VmRSS"] < 64 * 1024, growth(before, after)
    assert after["allocated"] - before["allocated"] < 64 * MIB, growth(before, after)
    assert gw.get(API, token=rsa.sign(tokens.claims())).status == 200


def test_distinct_valid_tokens_do_not_grow_memory(gw, rsa, ec, upstream):
    """2,000 distinct valid tokens (each cached per worker until exp), twice:
    memory stays bounded."""
    def batch(offset: int) -> list[str]:
        return [ec.sign(tokens.claims(sub=f"user-{offset + i}", scope="read write", groups=["g1", "g2"]))
                for i in range(2_000)]
    before = memory(gw)
    first = hammer(gw.port, batch(0))
    mid = memory(gw)
    second = hammer(gw.port, batch(2_000))
    after = memory(gw)
    print(f"\nvalid tokens: before      {fmt(before)}")
    print(f"valid tokens: after 2k    {fmt(mid)}  ({growth(before, mid)})")
    print(f"valid tokens: after 4k    {fmt(after)}  ({growth(before, after)})")
    assert first == Counter({200: 2_000}) and second == Counter({200: 2_000}), (first, second)
    assert after["VmRSS"] - before["VmRSS"] < 64 * 1024, growth(before, after)
    assert after["allocated"] - before["allocated"] < 64 * MIB, growth(before, after)


# -- introspection: the per-worker callout cap ---------------------------------------------------

class SlowIntrospection:
    """An introspection endpoint that holds every answer `delay` seconds and
    records the most requests it had in flight at once. Its own server (not
    the harness IdP) so that its listen backlog takes a burst of ~500
    connections."""

    def __init__(self, delay: float):
        owner = self
        self.delay = delay
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        self.calls = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_POST(self):
                length = int(self.headers.get("content-length") or 0)
                form = {k: v[-1] for k, v in parse_qs(self.rfile.read(length).decode()).items()}
                with owner.lock:
                    owner.calls += 1
                    owner.in_flight += 1
                    owner.max_in_flight = max(owner.max_in_flight, owner.in_flight)
                try:
                    time.sleep(owner.delay)
                finally:
                    with owner.lock:
                        owner.in_flight -= 1
                token = form.get("token", "")
                doc = ({"active": True, "sub": token, "exp": int(time.time()) + 300}
                       if token.startswith("ok-") else {"active": False})
                body = json.dumps(doc).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 2048

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def introspection_config(port: int) -> dict:
    return {
        "auth": {"provider_type": "oauth2_token", "config": {
            "introspection": {"url": f"http://127.0.0.1:{port}/introspect", "cluster": "introspect",
                              "client_id": "gw", "client_secret": "flood-secret", "timeout_ms": 10000},
            "issuer": "https://idp.example",
            "claims_mapping": {"sub": "roles"},
            "cache_ttl": 30}},
        "public_paths": ["/v1/health"],
    }


def test_introspection_callouts_capped_per_worker(envoy):
    """600 concurrent requests with distinct opaque tokens against an endpoint
    that takes 2 s: at most 256 callouts in flight per worker VM (512 at
    --concurrency 2); the excess gets 503 `Authentication service
    unavailable` at once; every answer is 200, 401 or 503, none hangs."""
    slow = SlowIntrospection(delay=2.0)
    try:
        gw = envoy(introspection_config(slow.port), clusters={"introspect": slow.port}, concurrency=2)
        n = 600
        barrier = threading.Barrier(n)
        results: list = [None] * n

        def one(i: int):
            token = f"ok-{i}" if i % 4 else f"bad-{i}"
            conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)
            try:
                conn.connect()
                barrier.wait(30)
                start = time.monotonic()
                conn.request("GET", API, headers={"Authorization": f"Bearer {token}"})
                resp = conn.getresponse()
                body = resp.read()
                results[i] = (resp.status, body, time.monotonic() - start)
            except Exception as e:  # noqa: BLE001 - recorded and asserted on below
                results[i] = ("error", repr(e).encode(), None)
            finally:
                conn.close()

        threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
        start = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        run = time.monotonic() - start
        statuses = Counter(r[0] for r in results if r)
        slowest = max((r[2] for r in results if r and r[2] is not None), default=None)
        print(f"\nintrospection flood: {n} concurrent distinct tokens in {run:.1f}s, statuses {dict(statuses)}, "
              f"endpoint calls {slow.calls}, max in flight at the endpoint {slow.max_in_flight}, "
              f"slowest answer {slowest:.2f}s")
        assert all(r is not None for r in results), "a request thread never finished"
        assert set(statuses) <= {200, 401, 503}, statuses
        assert slow.max_in_flight <= 256 * 2, slow.max_in_flight
        unavailable = [r for r in results if r[0] == 503]
        assert unavailable, "no request was refused: the cap was never reached"
        assert all(r[1] == b'{"error":{"message":"Authentication service unavailable"}}' for r in unavailable)
        assert all(r[2] < 1.5 for r in unavailable), "refused requests were parked"
        assert slowest < 12
        # The worker VMs are alive: a new token is introspected and passes.
        assert gw.get(API, token="ok-after-the-flood").status == 200
    finally:
        slow.stop()
