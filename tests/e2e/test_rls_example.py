"""The shipped global-quota example, run as README.md's "Quotas across replicas"
tells a newcomer: two Envoys from envoy/envoy-rls.yaml, one Redis, and the
rate-limit service loaded with envoy/ratelimit-config.yaml (tests/rls-server,
which answers like envoyproxy/ratelimit; tests/rls-server/README.md).

The example is adapted only where one machine and a quick test need it: free
ports instead of 10001/9911, 9100, 9200 and 8081, the built .wasm by absolute
path, and the quota lowered to 6 authenticated and 3 anonymous requests a
day. Everything else — the `quota.backend` object and the HTTP/2 `ratelimit`
cluster — is the file's own."""

from __future__ import annotations

import json
import uuid

import pytest

from harness import rls
from harness.envoy import REPO_ROOT, EnvoyProcess, wasm_path
from harness.idp import IdP
from harness.rls import RlsServer

yaml = pytest.importorskip("yaml")
_reason = rls.skip_reason()
pytestmark = pytest.mark.skipif(_reason is not None, reason=_reason or "")

EXAMPLE = REPO_ROOT / "envoy/envoy-rls.yaml"
SERVICE_CONFIG = REPO_ROOT / "envoy/ratelimit-config.yaml"
ISSUER = "http://127.0.0.1:9100"  # the example's issuer: tokens carry it
API = "/v1/models"


def example_bootstrap(ports: dict[str, int], authenticated: int, anonymous: int) -> dict:
    with open(EXAMPLE, encoding="utf-8") as f:
        b = yaml.safe_load(f)
    b["admin"]["address"]["socket_address"]["port_value"] = 0
    (listener,) = b["static_resources"]["listeners"]
    listener["address"]["socket_address"]["port_value"] = 0
    names = set()
    for c in b["static_resources"]["clusters"]:
        names.add(c["name"])
        for e in c["load_assignment"]["endpoints"][0]["lb_endpoints"]:
            e["endpoint"]["address"]["socket_address"]["port_value"] = ports[c["name"]]
    assert names == set(ports), names
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    (wasm,) = [f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.wasm"]
    cfg = wasm["typed_config"]["config"]
    cfg["vm_config"]["code"] = {"local": {"filename": str(wasm_path())}}
    plugin = json.loads(cfg["configuration"]["value"])
    assert plugin["quota"]["backend"]["cluster"] == "ratelimit"
    plugin["quota"]["authenticated_max_requests"] = authenticated
    plugin["quota"]["anonymous_max_requests"] = anonymous
    cfg["configuration"]["value"] = json.dumps(plugin)
    return b


@pytest.fixture
def engine():
    """Redis and the service with the shipped envoyproxy/ratelimit configuration."""
    redis = rls.Redis().start()
    with open(SERVICE_CONFIG, encoding="utf-8") as f:
        service_config = yaml.safe_load(f)
    service = RlsServer(redis.url, config=service_config).start()
    yield redis, service
    service.close()
    redis.close()


@pytest.fixture
def issuer_idp(rsa):
    with IdP(issuer=ISSUER, audience="llama-stack") as idp:
        idp.set_keys(rsa)
        yield idp


@pytest.fixture
def example(engine, issuer_idp, upstream, tmp_path):
    """Starts N Envoys from the example; stops them afterwards and fails on any VM trap."""
    started: list[EnvoyProcess] = []
    _, service = engine
    ports = {"idp": issuer_idp.port, "upstream": upstream.port, "ratelimit": service.port}

    def start(n: int, authenticated: int = 6, anonymous: int = 3) -> list[EnvoyProcess]:
        out = []
        for _ in range(n):
            e = EnvoyProcess(example_bootstrap(ports, authenticated, anonymous), workdir=tmp_path,
                             concurrency=2).start()
            started.append(e)
            out.append(e)
        return out

    yield start
    traps = [line for e in started for line in e.traps()]
    for e in started:
        e.stop()
    assert not traps, traps


def who() -> str:
    return f"user-{uuid.uuid4().hex[:10]}"


def test_two_envoys_from_the_example_share_one_quota(example, issuer_idp, engine):
    redis, _ = engine
    a, b = example(2)
    alice = issuer_idp.mint(who())
    answers = [(a if i % 2 else b).get(API, token=alice) for i in range(8)]
    assert [r.status for r in answers] == [200] * 6 + [429] * 2, [r.status for r in answers]
    # The numbers come from the service, with tollgate's limit (the override),
    # not the file's fallback of 1000.
    assert [r.headers["ratelimit-remaining"] for r in answers[:6]] == ["5", "4", "3", "2", "1", "0"]
    assert all(r.headers["ratelimit-limit"] == "6" for r in answers)
    assert int(answers[-1].headers["retry-after"]) >= 1
    # Another client is unaffected.
    assert a.get(API, token=issuer_idp.mint(who())).status == 200
    # Anonymous clients (the public path) share one count per address too.
    assert [(a if i % 2 else b).get("/v1/health").status for i in range(4)] == [200, 200, 200, 429]
    # The counts are Redis's, under envoyproxy/ratelimit's keys.
    assert redis.command("KEYS", "tollgate_tollgate_principal_*")
    assert redis.command("KEYS", "tollgate_tollgate_anonymous_127.0.0.1/32_*")
    # Both Envoys called the service; none fell back.
    for g in (a, b):
        c = g.counters()
        assert c.get("wasmcustom.tollgate_callouts_total.provider.rls.outcome.ok", 0) >= 1, c
        assert c.get("wasmcustom.tollgate_callouts_total.provider.rls.outcome.rejected", 0) >= 1, c
        assert c.get("wasmcustom.tollgate_quota_fallbacks_total", 0) == 0


def test_the_example_denies_when_the_service_is_down(example, issuer_idp, engine):
    """failure_mode "deny", the example's: no service, 503, never an allow."""
    _, service = engine
    (a,) = example(1)
    alice = issuer_idp.mint(who())
    assert a.get(API, token=alice).status == 200
    service.kill()
    r = a.get(API, token=alice)
    assert r.status == 503 and b"Quota service unavailable" in r.body, r
    assert a.get(API).status == 401  # denied before counting, as always
