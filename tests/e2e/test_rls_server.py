"""tests/rls-server, the rate-limit service the global-quota tests talk to, answers
ShouldRateLimit like envoyproxy/ratelimit (src/service/ratelimit.go, src/limiter/
base_limiter.go, src/redis/fixed_cache_impl.go) and counts in Redis.

The expected values below are what envoyproxy/ratelimit's code computes; see
tests/rls-server/README.md for the citations and the differences."""

from __future__ import annotations

import time
import uuid

import grpc
import pytest

from harness import rls
from harness.rls import OK, OVER_LIMIT, Descriptor, RlsClient, RlsServer

_reason = rls.skip_reason()
pytestmark = pytest.mark.skipif(_reason is not None, reason=_reason or "")

DOMAIN = "tollgate"


@pytest.fixture(scope="module")
def redis():
    r = rls.Redis().start()
    yield r
    r.close()


@pytest.fixture(scope="module")
def server(redis):
    s = RlsServer(redis.url).start()
    yield s
    s.close()


@pytest.fixture
def client(server):
    with RlsClient(server.address) as c:
        yield c


def who() -> str:
    return f"client-{uuid.uuid4().hex[:12]}"


def window(unit: str, now: float) -> tuple[int, int]:
    """(window start, seconds until reset) at `now` (utils.go UnitToDivider, CalculateReset)."""
    div = rls.SECONDS[unit]
    t = int(now)
    return t - t % div, div - t % div


def one(c: RlsClient, key: str, n: int, unit: str, **kw) -> rls.Status:
    r = c.should_rate_limit(DOMAIN, [Descriptor([("client", key)], limit=(n, unit))], **kw)
    assert len(r.statuses) == 1
    return r.statuses[0]


def test_override_ok_until_the_limit_then_over_limit(client):
    key = who()
    got = [one(client, key, 3, "minute") for _ in range(5)]
    assert [s.code for s in got] == [OK, OK, OK, OVER_LIMIT, OVER_LIMIT]
    assert [s.limit_remaining for s in got] == [2, 1, 0, 0, 0]
    for s in got:
        assert (s.requests_per_unit, s.unit, s.limit_name) == (3, "minute", "")
    r = client.should_rate_limit(DOMAIN, [Descriptor([("client", key)], limit=(3, "minute"))])
    assert r.overall_code == OVER_LIMIT


@pytest.mark.parametrize("unit", ["second", "minute", "hour", "day"])
def test_window_key_ttl_and_duration_until_reset(client, redis, unit):
    key = who()
    before = time.time()
    s = one(client, key, 10, unit)
    after = time.time()
    assert (s.code, s.limit_remaining, s.unit) == (OK, 9, unit)
    # Seconds to the end of the fixed window, whole seconds (CalculateReset).
    assert s.duration_until_reset in {window(unit, before)[1], window(unit, after)[1]}
    # The counter envoyproxy/ratelimit would use: domain_key_value_<window start>, expiring
    # after the window plus up to EXPIRATION_JITTER_MAX_SECONDS (300) of jitter.
    starts = {window(unit, before)[0], window(unit, after)[0]}
    names = {f"{DOMAIN}_client_{key}_{start}" for start in starts}
    found = [n for n in names if redis.command("GET", n) == "1"]
    assert len(found) == 1, (names, redis.command("KEYS", f"*{key}*"))
    ttl = redis.command("TTL", found[0])
    assert rls.SECONDS[unit] - 2 <= ttl <= rls.SECONDS[unit] + 300


def test_requests_per_unit_zero_is_always_over_limit(client):
    s = one(client, who(), 0, "hour")
    assert (s.code, s.limit_remaining, s.requests_per_unit) == (OVER_LIMIT, 0, 0)


def test_hits_addend(client):
    key = who()
    # The request's hits_addend applies to descriptors without their own.
    assert one(client, key, 5, "minute", hits_addend=3).limit_remaining == 2
    # A descriptor's hits_addend wins; 0 checks without counting.
    d = Descriptor([("client", key)], limit=(5, "minute"), hits_addend=0)
    for _ in range(3):
        s = client.should_rate_limit(DOMAIN, [d], hits_addend=4).statuses[0]
        assert (s.code, s.limit_remaining) == (OK, 2)
    d = Descriptor([("client", key)], limit=(5, "minute"), hits_addend=2)
    s = client.should_rate_limit(DOMAIN, [d], hits_addend=4).statuses[0]
    assert (s.code, s.limit_remaining) == (OK, 0)
    # Over by part of the addend: OVER_LIMIT, and the hits are counted anyway.
    s = one(client, key, 5, "minute", hits_addend=2)
    assert (s.code, s.limit_remaining) == (OVER_LIMIT, 0)
    # The counter is now 7: OVER_LIMIT means "count > requests_per_unit".
    d = Descriptor([("client", key)], limit=(7, "minute"), hits_addend=0)
    s = client.should_rate_limit(DOMAIN, [d]).statuses[0]
    assert (s.code, s.limit_remaining) == (OK, 0)
    d = Descriptor([("client", key)], limit=(6, "minute"), hits_addend=0)
    assert client.should_rate_limit(DOMAIN, [d]).statuses[0].code == OVER_LIMIT


def test_two_descriptors_one_over(client, redis):
    a, b = who(), who()
    ds = [Descriptor([("client", a)], limit=(1, "minute")),
          Descriptor([("client", b)], limit=(10, "minute"))]
    r = client.should_rate_limit(DOMAIN, ds)
    assert r.overall_code == OK
    assert [s.limit_remaining for s in r.statuses] == [0, 9]
    r = client.should_rate_limit(DOMAIN, ds)
    assert r.overall_code == OVER_LIMIT
    assert [(s.code, s.limit_remaining) for s in r.statuses] == [(OVER_LIMIT, 0), (OK, 8)]
    # Every limited descriptor is counted, the one over its limit too (INCRBY for each).
    for key, n in ((a, "2"), (b, "2")):
        (name,) = redis.command("KEYS", f"{DOMAIN}_client_{key}_*")
        assert redis.command("GET", name) == n


def test_descriptor_entries_make_the_key(client):
    key = who()
    d1 = Descriptor([("client", key), ("route", "/a")], limit=(1, "minute"))
    d2 = Descriptor([("client", key), ("route", "/b")], limit=(1, "minute"))
    assert client.should_rate_limit(DOMAIN, [d1]).overall_code == OK
    assert client.should_rate_limit(DOMAIN, [d2]).overall_code == OK
    assert client.should_rate_limit(DOMAIN, [d1]).overall_code == OVER_LIMIT


def test_no_rule_no_override_is_ok_without_limit(client, redis):
    key = who()
    for _ in range(3):
        r = client.should_rate_limit(DOMAIN, [Descriptor([("client", key)])])
        assert r.overall_code == OK
        s = r.statuses[0]
        assert (s.code, s.requests_per_unit, s.limit_remaining, s.duration_until_reset) == \
            (OK, None, 0, None)
    assert redis.command("KEYS", f"*{key}*") == []


def test_other_domain_ignores_the_override(client, redis):
    # GetLimit returns no limit for a domain without configuration, override or not.
    key = who()
    d = Descriptor([("client", key)], limit=(1, "minute"))
    for _ in range(3):
        r = client.should_rate_limit("other", [d])
        assert r.overall_code == OK and r.statuses[0].requests_per_unit is None
    assert redis.command("KEYS", f"*{key}*") == []


def test_bad_requests_are_errors(client):
    for domain, ds in (("", [Descriptor([("client", "x")])]), (DOMAIN, [])):
        with pytest.raises(grpc.RpcError) as e:
            client.should_rate_limit(domain, ds)
        assert e.value.code() == grpc.StatusCode.UNKNOWN
    # Unit UNKNOWN in an override: envoyproxy/ratelimit's process panics; here an error.
    with pytest.raises(grpc.RpcError) as e:
        client.should_rate_limit(DOMAIN, [Descriptor([("client", "x")], limit=(1, 0))])
    assert e.value.code() == grpc.StatusCode.UNKNOWN


def test_limits_file(redis):
    config = {"domain": "files", "descriptors": [
        {"key": "client", "rate_limit": {"requests_per_unit": 2, "unit": "hour", "name": "per-client"}},
        {"key": "client", "value": "vip", "rate_limit": {"unlimited": True}},
    ]}
    with RlsServer(redis.url, config=config).start() as s, RlsClient(s.address) as c:
        key = who()
        got = [c.should_rate_limit("files", [Descriptor([("client", key)])]).statuses[0]
               for _ in range(3)]
        assert [(x.code, x.limit_remaining) for x in got] == [(OK, 1), (OK, 0), (OVER_LIMIT, 0)]
        assert (got[0].requests_per_unit, got[0].unit, got[0].limit_name) == (2, "hour", "per-client")
        # The override wins over the file.
        s2 = c.should_rate_limit("files", [Descriptor([("client", key)], limit=(5, "hour"))])
        assert (s2.overall_code, s2.statuses[0].limit_remaining) == (OK, 1)
        vip = c.should_rate_limit("files", [Descriptor([("client", "vip")])]).statuses[0]
        assert (vip.code, vip.limit_remaining, vip.requests_per_unit) == (OK, 2**32 - 1, None)
    # Unsupported keys are refused by name.
    bad = RlsServer(redis.url, config={"domain": "d", "descriptors": [
        {"key": "k", "shadow_mode": True}]})
    with pytest.raises(RuntimeError, match="shadow_mode"):
        bad.start()
    bad.close()


def test_two_servers_share_counts_exactly_under_concurrency(redis, server):
    with RlsServer(redis.url).start() as other, \
            RlsClient(server.address) as c1, RlsClient(other.address) as c2:
        key = who()
        d = [Descriptor([("client", key)], limit=(50, "hour"))]
        futures = [(c1 if i % 2 else c2).future(DOMAIN, d) for i in range(200)]
        codes = [rls.decode_response(f.result()).overall_code for f in futures]
        assert codes.count(OK) == 50 and codes.count(OVER_LIMIT) == 150
        # Both now answer OVER_LIMIT, and the count survives restarting a server.
        other.kill()
        other.start()
        for c in (c1, c2):
            assert c.should_rate_limit(DOMAIN, d, wait_for_ready=True).overall_code == OVER_LIMIT


def test_redis_down_is_an_error_and_service_recovers(redis):
    with RlsServer(redis.url).start() as s, RlsClient(s.address) as c:
        d = [Descriptor([("client", who())], limit=(5, "minute"))]
        assert c.should_rate_limit(DOMAIN, d).overall_code == OK
        redis.stop()
        try:
            for _ in range(3):
                with pytest.raises(grpc.RpcError) as e:
                    c.should_rate_limit(DOMAIN, d)
                assert e.value.code() == grpc.StatusCode.UNKNOWN
                assert "redis" in e.value.details()
            # Descriptors without a limit need no Redis: still answered.
            assert c.should_rate_limit(DOMAIN, [Descriptor([("client", "x")])]).overall_code == OK
        finally:
            redis.start()
        deadline = time.monotonic() + 5
        while True:
            try:
                r = c.should_rate_limit(DOMAIN, d)
                break
            except grpc.RpcError:
                assert time.monotonic() < deadline, s.log_text()
                time.sleep(0.1)
        # No persistence: Redis came back empty.
        assert (r.overall_code, r.statuses[0].limit_remaining) == (OK, 4)


def test_hung_redis_fails_after_the_redis_timeout(redis):
    with RlsServer(redis.url, redis_timeout_ms=300).start() as s, RlsClient(s.address) as c:
        d = [Descriptor([("client", who())], limit=(5, "minute"))]
        assert c.should_rate_limit(DOMAIN, d).overall_code == OK
        redis.pause()
        try:
            t = time.monotonic()
            with pytest.raises(grpc.RpcError) as e:
                c.should_rate_limit(DOMAIN, d, timeout=5)
            assert e.value.code() == grpc.StatusCode.UNKNOWN
            assert time.monotonic() - t < 3
        finally:
            redis.resume()
        deadline = time.monotonic() + 5
        while True:
            try:
                assert c.should_rate_limit(DOMAIN, d).overall_code == OK
                break
            except grpc.RpcError:
                assert time.monotonic() < deadline, s.log_text()
                time.sleep(0.1)


def test_server_refuses_to_start_without_redis():
    url = f"redis://127.0.0.1:{rls.free_port()}"
    s = RlsServer(url)
    with pytest.raises(RuntimeError, match="cannot connect to Redis"):
        s.start()
    s.close()
