"""Quotas across Envoy replicas (`quota.backend`, type `rls`): two real Envoys
(`--concurrency 2` each, their own base ids) count in one Redis through the
rate-limit service of tests/rls-server (envoyproxy/ratelimit's keys and
answers). Faults of the service and of Redis, and answers that are not
answers, end as `failure_mode` says; nothing is allowed by accident."""

from __future__ import annotations

import time
import uuid
from concurrent import futures

import grpc
import pytest

from harness import rls, tokens
from harness.config import jwt_config
from harness.rls import RlsServer

_reason = rls.skip_reason()
pytestmark = pytest.mark.skipif(_reason is not None, reason=_reason or "")

API = "/v1/models"
UNAVAILABLE = b'{"error":{"message":"Quota service unavailable"}}'


def http2(cluster: str):
    """A bootstrap transform: the cluster speaks HTTP/2 (gRPC)."""
    def transform(doc: dict) -> dict:
        for c in doc["static_resources"]["clusters"]:
            if c["name"] == cluster:
                c["typed_extension_protocol_options"] = {
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                        "explicit_http_config": {"http2_protocol_options": {}},
                    }}
        return doc
    return transform


def config(idp_port: int, limit: int, failure_mode: str = "deny", timeout_ms: int = 200,
           max_batch: int | None = None) -> dict:
    c = jwt_config(idp_port)
    c["quota"] = {"authenticated_max_requests": limit, "anonymous_max_requests": limit,
                  "period": "day",
                  "backend": {"type": "rls", "cluster": "ratelimit", "domain": "tollgate",
                              "timeout_ms": timeout_ms, "failure_mode": failure_mode}}
    if max_batch is not None:
        c["quota"]["backend"]["max_batch"] = max_batch
    return c


@pytest.fixture
def redis():
    r = rls.Redis().start()
    yield r
    r.close()


@pytest.fixture
def service(redis):
    s = RlsServer(redis.url).start()
    yield s
    s.close()


def gateways(envoy, idp, rls_port: int, n: int = 2, **kw) -> list:
    return [envoy(config(idp.port, **kw), clusters={"idp": idp.port, "ratelimit": rls_port},
                  transform=http2("ratelimit")) for _ in range(n)]


def who() -> str:
    return f"user-{uuid.uuid4().hex[:10]}"


def rls_calls(g) -> int:
    """gRPC calls the gateway made to the rate-limit service."""
    return g.counters().get("cluster.ratelimit.upstream_rq_total", 0)


@pytest.mark.parametrize("max_batch", [None, 16])
def test_two_envoys_share_one_quota_and_it_survives_restarts(envoy, idp, rsa, service, max_batch):
    idp.set_keys(rsa)
    a, b = gateways(envoy, idp, service.port, limit=6, max_batch=max_batch)
    alice = rsa.sign(tokens.claims(sub=who()))
    statuses = [(a if i % 2 else b).get(API, token=alice).status for i in range(8)]
    assert statuses == [200] * 6 + [429] * 2, statuses
    r = a.get(API, token=alice)
    assert r.status == 429 and int(r.headers["retry-after"]) >= 1, r
    assert r.headers["ratelimit-remaining"] == "0", r
    # Another client is unaffected, and its RateLimit values come from the service.
    bob = rsa.sign(tokens.claims(sub=who()))
    r = b.get(API, token=bob)
    assert r.status == 200 and r.headers["ratelimit-remaining"] == "5", r
    # The count lives in Redis: new Envoys still refuse alice.
    for g in (a, b):
        g.stop()
    a2, b2 = gateways(envoy, idp, service.port, limit=6, max_batch=max_batch)
    assert a2.get(API, token=alice).status == 429
    assert b2.get(API, token=alice).status == 429
    assert a2.get(API, token=bob).status == 200


@pytest.mark.parametrize("max_batch", [None, 16])
def test_two_hundred_at_once_across_both_envoys_admit_exactly_the_limit(envoy, idp, rsa, service,
                                                                         max_batch):
    idp.set_keys(rsa)
    a, b = gateways(envoy, idp, service.port, limit=50, max_batch=max_batch)
    carol = rsa.sign(tokens.claims(sub=who()))
    with futures.ThreadPoolExecutor(40) as pool:
        statuses = list(pool.map(lambda i: (a if i % 2 else b).get(API, token=carol).status,
                                 range(200)))
    assert statuses.count(200) == 50, sorted(set(statuses))
    assert statuses.count(429) == 150
    calls = rls_calls(a) + rls_calls(b)
    if max_batch is None:
        assert calls == 200, calls
    else:
        # Requests counted while a call was under way went together.
        assert calls < 200, calls


def test_batched_clients_each_get_their_own_count(envoy, idp, rsa, service):
    """max_batch: many clients at once through one Envoy, several requests
    of each in one call: each client is admitted exactly its limit, with its
    own RateLimit-Remaining."""
    idp.set_keys(rsa)
    (a,) = gateways(envoy, idp, service.port, n=1, limit=5, max_batch=32)
    users = [rsa.sign(tokens.claims(sub=who())) for _ in range(8)]
    jobs = [u for u in users for _ in range(8)]
    with futures.ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda t: (t, a.get(API, token=t)), jobs))
    for u in users:
        mine = [r for t, r in answers if t == u]
        assert [r.status for r in mine].count(200) == 5, [r.status for r in mine]
        remaining = sorted(int(r.headers["ratelimit-remaining"]) for r in mine if r.status == 200)
        assert remaining == [0, 1, 2, 3, 4], remaining
    assert rls_calls(a) < len(jobs), rls_calls(a)


def test_anonymous_clients_are_counted_per_prefix(envoy, idp, rsa, service, redis):
    idp.set_keys(rsa)
    (a,) = gateways(envoy, idp, service.port, n=1, limit=2)
    assert [a.get("/v1/health").status for _ in range(3)] == [200, 200, 429]
    keys = redis.command("KEYS", "tollgate_tollgate_anonymous_*")
    assert keys and all("127.0.0.1/32" in k for k in keys), keys


def test_denied_requests_are_never_counted(envoy, idp, rsa, service, redis):
    idp.set_keys(rsa)
    (a,) = gateways(envoy, idp, service.port, n=1, limit=2)
    for _ in range(3):
        assert a.get(API, token="not-a-token").status == 401
    assert a.get(API).status == 401
    assert redis.command("KEYS", "*") == []


@pytest.mark.parametrize("mode", ["deny", "local"])
def test_service_down_at_start_killed_and_back(envoy, idp, rsa, redis, mode):
    idp.set_keys(rsa)
    port = rls.free_port()
    (a,) = gateways(envoy, idp, port, n=1, limit=3, failure_mode=mode)
    dave = rsa.sign(tokens.claims(sub=who()))
    down = a.get(API, token=dave)
    if mode == "deny":
        assert down.status == 503 and down.body == UNAVAILABLE, down
    else:
        assert down.status == 200, down
        stats = a.stats()
        assert stats.get("wasmcustom.tollgate_quota_fallbacks_total", 0) >= 1
    s = RlsServer(redis.url, port=port).start()
    try:
        # Back by itself (Envoy reconnects): counted in Redis again.
        deadline = time.monotonic() + 10
        while a.get(API, token=rsa.sign(tokens.claims(sub=who()))).status != 200:
            assert time.monotonic() < deadline, "never recovered"
            time.sleep(0.2)
        s.kill()
        r = a.get(API, token=dave)
        assert r.status == (503 if mode == "deny" else 200), r
    finally:
        s.close()


def test_a_slow_service_answers_within_the_timeout(envoy, idp, rsa, service):
    idp.set_keys(rsa)
    (a,) = gateways(envoy, idp, service.port, n=1, limit=3, timeout_ms=200)
    erin = rsa.sign(tokens.claims(sub=who()))
    assert a.get(API, token=erin).status == 200
    service.pause()
    try:
        begin = time.monotonic()
        r = a.get(API, token=erin)
        took = time.monotonic() - begin
        assert r.status == 503 and r.body == UNAVAILABLE, r
        assert took < 0.2 + 1.0, took
    finally:
        service.resume()
    assert a.get(API, token=erin).status == 200


def test_redis_stopped_then_back(envoy, idp, rsa, service, redis):
    idp.set_keys(rsa)
    (a,) = gateways(envoy, idp, service.port, n=1, limit=3)
    frank = rsa.sign(tokens.claims(sub=who()))
    assert a.get(API, token=frank).status == 200
    redis.stop()
    assert a.get(API, token=frank).status == 503
    redis.start()
    deadline = time.monotonic() + 10
    while a.get(API, token=frank).status != 200:
        assert time.monotonic() < deadline, "never recovered"
        time.sleep(0.2)


class FakeRls:
    """A gRPC server at the service's name that answers raw bytes."""

    def __init__(self, answer: bytes | None, code: grpc.StatusCode | None = None):
        def handle(request: bytes, context):
            if code is not None:
                context.abort(code, "scripted")
            return answer

        handler = grpc.method_handlers_generic_handler(
            "envoy.service.ratelimit.v3.RateLimitService",
            {"ShouldRateLimit": grpc.unary_unary_rpc_method_handler(handle)})
        self.server = grpc.server(futures.ThreadPoolExecutor(4), handlers=[handler])
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def stop(self):
        self.server.stop(0)


def _response(code: int, statuses: int = 1) -> bytes:
    status = rls._field(1, code) + rls._field(3, 5)
    body = rls._field(1, code)
    for _ in range(statuses):
        body += rls._field(2, status)
    return body


@pytest.mark.parametrize("answer,code", [
    (b"\xff\xfe\xfd garbage", None),
    (_response(0), None),          # UNKNOWN overall code
    (_response(9), None),          # a code that does not exist
    (_response(1, statuses=2), None),  # one descriptor sent, two statuses back
    (b"", None),                   # empty: code 0
    (None, grpc.StatusCode.INTERNAL),
    (None, grpc.StatusCode.RESOURCE_EXHAUSTED),
], ids=["garbage", "unknown-code", "no-such-code", "two-statuses", "empty", "internal",
        "resource-exhausted"])
def test_bad_answers_never_allow(envoy, idp, rsa, answer, code):
    idp.set_keys(rsa)
    fake = FakeRls(answer, code)
    try:
        (a,) = gateways(envoy, idp, fake.port, n=1, limit=3)
        for _ in range(3):
            r = a.get(API, token=rsa.sign(tokens.claims(sub=who())))
            assert r.status == 503 and r.body == UNAVAILABLE, r
    finally:
        fake.stop()


def test_a_batch_answered_with_one_status_never_allows_the_rest(envoy, idp, rsa):
    """max_batch: a service that answers every call OK with a single status
    (as if it had counted one descriptor): only requests alone in their call
    may pass; the others in a batch are refused, never allowed."""
    idp.set_keys(rsa)
    limit = rls._field(1, 5) + rls._field(2, 4)  # RateLimit{requests_per_unit 5, DAY}
    one_ok = rls._field(1, 1) + rls._field(2, rls._field(1, 1) + rls._field(2, limit)
                                             + rls._field(3, 4))
    fake = FakeRls(one_ok)
    try:
        (a,) = gateways(envoy, idp, fake.port, n=1, limit=5, max_batch=8)
        users = [rsa.sign(tokens.claims(sub=who())) for _ in range(24)]
        with futures.ThreadPoolExecutor(24) as pool:
            statuses = [r.status for r in pool.map(lambda t: a.get(API, token=t), users)]
        calls = rls_calls(a)
        assert set(statuses) <= {200, 503}, statuses
        assert statuses.count(200) <= calls, (statuses, calls)
        if calls < len(users):
            assert 503 in statuses, (statuses, calls)
    finally:
        fake.stop()
