"""End-to-end tests of per-client quotas (issue 5) through a real Envoy at
`--concurrency 2`.

Quota counters live in Envoy's shared data for the life of the process, so the
Envoys here are module-scoped and every test that needs a fresh budget uses a
principal (`sub`) or a client address of its own. Client addresses: Linux
routes all of 127.0.0.0/8 to loopback, so a client socket bound to
127.x.y.z reaches the listener on 127.0.0.1 from an address no other test uses."""

from __future__ import annotations

import http.client
import json
import random
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from harness import tokens
from harness.client import Response
from harness.config import jwt_config

MSG_QUOTA = "Quota exceeded"
QUOTA_BODY = json.dumps({"error": {"message": MSG_QUOTA}}, separators=(",", ":")).encode()
RATELIMIT = ("ratelimit-limit", "ratelimit-remaining", "ratelimit-reset")
API = "/v1/models"
MINUTE, DAY = 60, 86_400

_used_ips: set[str] = set()


def fresh_ip() -> str:
    """A loopback address no other test in this run has used."""
    while True:
        ip = f"127.{random.randint(1, 254)}.{random.randint(0, 255)}.{random.randint(1, 254)}"
        if ip not in _used_ips:
            _used_ips.add(ip)
            return ip


def fresh_sub() -> str:
    return f"user-{uuid.uuid4().hex[:12]}"


def send(gw, path: str = API, token: str | None = None, method: str = "GET",
         source: str | None = None, headers: dict | None = None) -> Response:
    """One request on a new connection, from `source` (an address) if given."""
    headers = dict(headers or {})
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=15,
                                      source_address=(source, 0) if source else None)
    try:
        conn.request(method, path, headers=headers)
        resp = conn.getresponse()
        body = resp.read()
        header_list = [(k.lower(), v) for k, v in resp.getheaders()]
    finally:
        conn.close()
    joined: dict[str, str] = {}
    for k, v in header_list:
        joined[k] = f"{joined[k]}, {v}" if k in joined else v
    return Response(resp.status, joined, header_list, body)


def to_boundary(period: int, at: float | None = None) -> int:
    """Seconds from `at` (default now) to the end of its UTC-aligned window."""
    at = time.time() if at is None else at
    return period - int(at) % period


def avoid_boundary(period: int, margin: float) -> None:
    """Sleeps past the next window boundary if it is less than `margin` seconds away."""
    left = period - time.time() % period
    if left < margin:
        time.sleep(left + 0.3)


def assert_reset(value: str, period: int, before: float, after: float) -> None:
    """`value` is the seconds to the window end, as seen between `before` and `after` (±2 s)."""
    got = int(value)
    expected = {to_boundary(period, before), to_boundary(period, after)}
    assert min(abs(got - e) for e in expected) <= 2, (got, expected)


def timed(fn, *a, **kw):
    before = time.time()
    r = fn(*a, **kw)
    return r, before, time.time()


def assert_counted(r: Response, limit: int, remaining: int) -> None:
    """200 with `RateLimit-Limit`/`-Remaining`, each exactly once."""
    assert r.status == 200, r
    names = [k for k, _ in r.header_list]
    for h in RATELIMIT:
        assert names.count(h) == 1, r
    assert r.headers["ratelimit-limit"] == str(limit), r
    assert r.headers["ratelimit-remaining"] == str(remaining), r


def assert_exceeded(r: Response, limit: int | None = None) -> None:
    """429 with the exact body and a Retry-After; with `limit`, also the RateLimit headers."""
    assert r.status == 429, r
    assert r.headers.get("content-type") == "application/json", r
    assert r.body == QUOTA_BODY, r
    assert int(r.headers["retry-after"]) >= 1, r
    if limit is not None:
        assert r.headers["ratelimit-limit"] == str(limit), r
        assert r.headers["ratelimit-remaining"] == "0", r
        assert r.headers["ratelimit-reset"] == r.headers["retry-after"], r


def worker_connections(gw) -> dict[str, int]:
    """downstream_cx_total per listener worker."""
    out = {}
    for name, value in gw.stats().items():
        m = re.match(r"listener\..*\.(worker_\d+)\.downstream_cx_total$", name)
        if m:
            out[m.group(1)] = int(value)
    return out


def wait_until_serving(gw, token: str, timeout: float = 15.0) -> None:
    """Waits until the JWKS is loaded (`token` passes on a path without a rule)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = send(gw, "/v1/warmup", token=token)
        if last.status == 200:
            return
        time.sleep(0.1)
    pytest.fail(f"Envoy not serving valid tokens within {timeout}s: {last!r}")


def principal_requests(upstream, sub: str) -> list:
    return [q for q in upstream.received() if q.headers.get("x-auth-principal") == sub]


# -- gateways ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def key() -> tokens.SigningKey:
    return tokens.rsa_key("quota-1")


@pytest.fixture(scope="module")
def tok(key):
    """`tok(sub, scope=None)` -> a fresh valid token for `sub`."""
    def make(sub: str, scope: str | None = None, **extra) -> str:
        return key.sign(tokens.claims(sub=sub, scope=scope, **extra))
    return make


def quota_gateway(module_idp, module_envoy, key, tok, quota: dict, **kw):
    module_idp.set_keys(key)
    cfg = jwt_config(module_idp.port, public_paths=["/v1/health", "/public/*"], **kw)
    cfg["route_scopes"] = [{"path_prefix": "/v1/admin/", "required_scope": "admin"}]
    cfg["quota"] = quota
    e = module_envoy(cfg)
    wait_until_serving(e, tok(fresh_sub()))
    return e


@pytest.fixture(scope="module")
def gw(module_idp, module_envoy, key, tok):
    """5 per principal, 3 per anonymous address, per UTC day; `headers` left at its default."""
    return quota_gateway(module_idp, module_envoy, key, tok,
                         {"authenticated_max_requests": 5, "anonymous_max_requests": 3, "period": "day"})


@pytest.fixture(scope="module")
def burst(module_idp, module_envoy, key, tok):
    """50 per principal and per address, per day: for the concurrency tests."""
    return quota_gateway(module_idp, module_envoy, key, tok,
                         {"authenticated_max_requests": 50, "anonymous_max_requests": 50,
                          "period": "day", "headers": True})


@pytest.fixture(scope="module")
def minute_gw(module_idp, module_envoy, key, tok):
    return quota_gateway(module_idp, module_envoy, key, tok,
                         {"authenticated_max_requests": 5, "anonymous_max_requests": 3,
                          "period": "minute", "headers": True})


@pytest.fixture(scope="module")
def quiet(module_idp, module_envoy, key, tok):
    return quota_gateway(module_idp, module_envoy, key, tok,
                         {"authenticated_max_requests": 2, "anonymous_max_requests": 2,
                          "period": "day", "headers": False})


@pytest.fixture(scope="module")
def open_gw(module_envoy):
    """No `auth` at all: everyone is anonymous, counted by address."""
    return module_envoy({"quota": {"authenticated_max_requests": 1000, "anonymous_max_requests": 3,
                                   "period": "day"}}, clusters={})


# -- exact under concurrency ------------------------------------------------------------

def test_concurrent_requests_admit_exactly_the_limit(burst, tok, upstream):
    """200 concurrent requests of one principal, 16 at a time, each on its own
    connection so that both workers serve them: exactly 50 pass, each with its
    own `RateLimit-Remaining`, and the other 150 get 429."""
    avoid_boundary(DAY, 30)
    sub = fresh_sub()
    token = tok(sub)
    before = worker_connections(burst)
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda _: send(burst, token=token), range(200)))
    after = worker_connections(burst)
    statuses = [r.status for r in answers]
    assert statuses.count(200) == 50, sorted(set(statuses))
    assert statuses.count(429) == 150, sorted(set(statuses))
    ok = [r for r in answers if r.status == 200]
    assert sorted(int(r.headers["ratelimit-remaining"]) for r in ok) == list(range(50))
    for r in answers:
        if r.status == 429:
            assert_exceeded(r, limit=50)
    assert len(principal_requests(upstream, sub)) == 50
    served = {w: after.get(w, 0) - before.get(w, 0) for w in after}
    assert len(served) == 2 and all(n > 0 for n in served.values()), served


def test_concurrent_principals_each_get_exactly_their_limit(burst, tok, upstream):
    avoid_boundary(DAY, 30)
    subs = [fresh_sub(), fresh_sub()]
    toks = {s: tok(s) for s in subs}
    order = [subs[i % 2] for i in range(200)]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda s: (s, send(burst, token=toks[s])), order))
    for s in subs:
        mine = [r for who, r in answers if who == s]
        assert [r.status for r in mine].count(200) == 50, s
        assert sorted(int(r.headers["ratelimit-remaining"]) for r in mine if r.status == 200) == list(range(50))
        assert len(principal_requests(upstream, s)) == 50


def test_concurrent_anonymous_requests_admit_exactly_the_limit(burst):
    """One client address on a public path, 120 requests, 16 at a time."""
    avoid_boundary(DAY, 30)
    ip = fresh_ip()
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda _: send(burst, "/v1/health", source=ip), range(120)))
    statuses = [r.status for r in answers]
    assert statuses.count(200) == 50 and statuses.count(429) == 70, sorted(set(statuses))
    assert sorted(int(r.headers["ratelimit-remaining"]) for r in answers if r.status == 200) == list(range(50))


def test_requests_parked_for_keys_are_counted_exactly(envoy, idp, key, tok, upstream):
    """On a cold Envoy, requests that wait for the key set are counted when
    they are decided, exactly, and still get their RateLimit headers."""
    idp.set_keys(key)
    idp.set_fault("/jwks", delay=2)
    cfg = jwt_config(idp.port)
    cfg["quota"] = {"authenticated_max_requests": 5, "period": "day"}
    gw = envoy(cfg)
    token = tok(fresh_sub())
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda _: send(gw, token=token), range(12)))
    assert [r.status for r in answers].count(200) == 5, answers
    assert sorted(int(r.headers["ratelimit-remaining"]) for r in answers if r.status == 200) == list(range(5))
    for r in answers:
        if r.status != 200:
            assert_exceeded(r, limit=5)


# -- who is counted ------------------------------------------------------------------------

def test_principals_have_their_own_budgets(gw, tok, upstream):
    a, b = fresh_sub(), fresh_sub()
    for i in range(5):
        assert_counted(send(gw, token=tok(a)), 5, 4 - i)
    assert_exceeded(send(gw, token=tok(a)), limit=5)
    for i in range(5):
        assert_counted(send(gw, token=tok(b)), 5, 4 - i)
    assert_exceeded(send(gw, token=tok(b)), limit=5)
    assert_exceeded(send(gw, token=tok(a)), limit=5)
    assert len(principal_requests(upstream, a)) == 5
    assert len(principal_requests(upstream, b)) == 5


def test_budget_belongs_to_the_principal_not_the_token_or_address(gw, tok):
    """A new token (other iat/exp) or another client address: same budget."""
    sub = fresh_sub()
    now = int(time.time())
    for i in range(5):
        token = tok(sub, now=now - i, lifetime=600 + i)
        assert_counted(send(gw, token=token, source=fresh_ip()), 5, 4 - i)
    assert_exceeded(send(gw, token=tok(sub, lifetime=900), source=fresh_ip()), limit=5)


def test_denied_requests_do_not_count(gw, key, tok, upstream):
    """401s (bad, expired, missing tokens), 403s (a rule refuses) and 400s (bad
    path) leave both the principal's and the address's budgets whole."""
    sub, ip = fresh_sub(), fresh_ip()
    good = tok(sub)
    now = int(time.time())
    expired = key.sign(tokens.claims(sub=sub, now=now - 600, lifetime=300))
    for _ in range(6):
        assert send(gw, token=tokens.tamper(good), source=ip).status == 401
        assert send(gw, token=expired, source=ip).status == 401
        assert send(gw, source=ip).status == 401
        assert send(gw, headers={"Authorization": "Basic Zm9vOmJhcg=="}, source=ip).status == 401
        r = send(gw, "/v1/admin/users", token=good, source=ip)
        assert r.status == 403, r
        assert not any(k in r.headers for k in RATELIMIT), r
        assert send(gw, "/v1/admin%2Fusers", token=good, source=ip).status == 400
        assert send(gw, "/v1/health%2F..", source=ip).status == 400
    assert principal_requests(upstream, sub) == []
    for i in range(5):
        assert_counted(send(gw, token=good, source=ip), 5, 4 - i)
    assert_exceeded(send(gw, token=good, source=ip), limit=5)
    for i in range(3):
        assert_counted(send(gw, "/v1/health", source=ip), 3, 2 - i)
    assert_exceeded(send(gw, "/v1/health", source=ip), limit=3)


def test_anonymous_public_paths_counted_by_address(gw, tok):
    """Public paths share one budget per client address, with the anonymous
    limit, whatever the path and even with a valid token; the same client's
    authenticated requests are counted by principal instead."""
    ip, other_ip = fresh_ip(), fresh_ip()
    for i, path in enumerate(["/v1/health", "/public/a", "/public/b/c?x=1"]):
        assert_counted(send(gw, path, source=ip), 3, 2 - i)
    assert_exceeded(send(gw, "/v1/health", source=ip), limit=3)
    assert_exceeded(send(gw, "/public/z", source=ip), limit=3)
    assert_exceeded(send(gw, "/v1/health", token=tok(fresh_sub()), source=ip), limit=3)
    # The same address, authenticated on a protected path: its principal's budget.
    assert_counted(send(gw, token=tok(fresh_sub()), source=ip), 5, 4)
    # Another address: a budget of its own.
    assert_counted(send(gw, "/v1/health", source=other_ip), 3, 2)


def test_without_auth_everyone_is_counted_by_address(open_gw, tok, upstream):
    """No `auth`: every request is anonymous, whatever Authorization it carries."""
    ip, other_ip = fresh_ip(), fresh_ip()
    sends = [
        lambda: send(open_gw, "/v1/models", source=ip),
        lambda: send(open_gw, "/v1/admin/x", token=tok(fresh_sub()), source=ip),
        lambda: send(open_gw, "/anything", headers={"Authorization": "Bearer garbage"}, source=ip),
    ]
    for i, s in enumerate(sends):
        r = s()
        assert_counted(r, 3, 2 - i)
        assert "x-auth-principal" not in r.json()["headers"]
    assert_exceeded(send(open_gw, "/v1/models", token=tok(fresh_sub()), source=ip), limit=3)
    assert_counted(send(open_gw, "/v1/models", source=other_ip), 3, 2)
    assert len(upstream.received()) == 4


# -- headers and windows ----------------------------------------------------------------------

def test_ratelimit_headers_per_day(gw, tok):
    """Limit, Remaining = limit - count, Reset = seconds to the next UTC midnight;
    the 429 carries Retry-After equal to Reset (headers default to on)."""
    avoid_boundary(DAY, 10)
    sub = fresh_sub()
    for i in range(5):
        r, before, after = timed(send, gw, token=tok(sub))
        assert_counted(r, 5, 4 - i)
        assert_reset(r.headers["ratelimit-reset"], DAY, before, after)
    r, before, after = timed(send, gw, token=tok(sub))
    assert_exceeded(r, limit=5)
    assert_reset(r.headers["retry-after"], DAY, before, after)


def test_ratelimit_headers_per_minute(minute_gw, tok):
    avoid_boundary(MINUTE, 6)
    sub = fresh_sub()
    for i in range(5):
        r, before, after = timed(send, minute_gw, token=tok(sub))
        assert_counted(r, 5, 4 - i)
        assert_reset(r.headers["ratelimit-reset"], MINUTE, before, after)
    r, before, after = timed(send, minute_gw, token=tok(sub))
    assert_exceeded(r, limit=5)
    assert_reset(r.headers["retry-after"], MINUTE, before, after)
    ip = fresh_ip()
    r, before, after = timed(send, minute_gw, "/v1/health", source=ip)
    assert_counted(r, 3, 2)
    assert_reset(r.headers["ratelimit-reset"], MINUTE, before, after)


def test_headers_false_sends_no_ratelimit_headers(quiet, tok):
    avoid_boundary(DAY, 10)
    sub = fresh_sub()
    for _ in range(2):
        r = send(quiet, token=tok(sub))
        assert r.status == 200, r
        assert not any(k in r.headers for k in RATELIMIT), r
    r, before, after = timed(send, quiet, token=tok(sub))
    assert_exceeded(r)
    assert not any(k in r.headers for k in RATELIMIT), r
    assert_reset(r.headers["retry-after"], DAY, before, after)
    ip = fresh_ip()
    assert [send(quiet, "/v1/health", source=ip).status for _ in range(3)] == [200, 200, 429]


def test_window_rollover_per_minute(minute_gw, tok, upstream):
    """A principal over its limit passes again once the UTC minute turns, with
    a fresh count shared by both workers. Waits for the boundary (≤ 60 s)."""
    avoid_boundary(MINUTE, 5)
    sub = fresh_sub()
    for i in range(5):
        assert_counted(send(minute_gw, token=tok(sub)), 5, 4 - i)
    r, before, after = timed(send, minute_gw, token=tok(sub))
    assert_exceeded(r, limit=5)
    assert_reset(r.headers["retry-after"], MINUTE, before, after)
    boundary = (int(after) // MINUTE + 1) * MINUTE
    time.sleep(max(0.0, boundary + 1.0 - time.time()))
    start = time.time()
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: send(minute_gw, token=tok(sub)), range(12)))
    end = time.time()
    assert end < boundary + MINUTE - 1, "the new window ended during the test"
    ok = [r for r in answers if r.status == 200]
    assert len(ok) == 5, answers
    assert sorted(int(r.headers["ratelimit-remaining"]) for r in ok) == list(range(5))
    for r in ok:
        assert_reset(r.headers["ratelimit-reset"], MINUTE, start, end)
        assert int(r.headers["ratelimit-reset"]) > 30, r
    assert len(principal_requests(upstream, sub)) == 10


# -- configuration ------------------------------------------------------------------------------

@pytest.mark.parametrize("period", ["week", "Day", "", 3600], ids=["week", "capitalised", "empty", "number"])
def test_bad_period_refused(expect_config_rejected, idp, period):
    cfg = jwt_config(idp.port)
    cfg["quota"] = {"authenticated_max_requests": 10, "period": period}
    log = expect_config_rejected(cfg)
    assert any("wasm log" in line and "configuration key `quota.period`:" in line
               for line in log.splitlines()), log


# -- forged client addresses ---------------------------------------------------------------

def test_forged_forwarded_for_does_not_split_the_anonymous_budget(gw, upstream):
    """Envoy is an edge proxy here (`use_remote_address: true`): a made-up
    X-Forwarded-For does not give a client a fresh anonymous budget."""
    ip = fresh_ip()
    statuses = [send(gw, "/v1/health", source=ip, headers={"X-Forwarded-For": f"10.{i}.0.1"}).status
                for i in range(6)]
    assert statuses == [200, 200, 200, 429, 429, 429], statuses
