"""Metrics at Envoy's /stats/prometheus: each counter moves with the requests
that should move it, and the labels come out as Prometheus labels."""

from __future__ import annotations

import re
import time
import urllib.request
import uuid

import pytest

from harness import tokens
from harness.config import jwt_config

API = "/v1/models"


def scrape(gw) -> dict[str, float]:
    """`name{labels}` → value, for tollgate's metrics."""
    with urllib.request.urlopen(gw.admin_url + "/stats/prometheus", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        m = re.match(r"^(tollgate_\w+)(\{[^}]*\})? (\S+)$", line)
        if m:
            out[m.group(1) + (m.group(2) or "{}")] = float(m.group(3))
    return out


@pytest.fixture
def gw(envoy, idp):
    key = tokens.rsa_key("k1")
    idp.set_keys(key)
    config = jwt_config(idp.port)
    config["route_scopes"] = [{"path_prefix": "/v1/admin/", "required_scope": "admin"}]
    config["quota"] = {"authenticated_max_requests": 2, "period": "day"}
    g = envoy(config, concurrency=1)
    g.key = key
    return g


def test_counters_follow_the_requests(gw):
    key = gw.key
    user = f"u-{uuid.uuid4().hex[:8]}"
    ok = key.sign(tokens.claims(sub=user))
    assert gw.get(API, token=ok).status == 200
    assert gw.get(API, token=ok).status == 200
    assert gw.get(API, token=ok).status == 429  # quota of 2
    assert gw.get(API).status == 401  # missing
    expired = key.sign(tokens.claims(sub=user, lifetime=-3600))
    assert gw.get(API, token=expired).status == 401
    assert gw.get(API, token=key.sign(tokens.claims(sub="x", aud="other"))).status == 401
    other = key.sign(tokens.claims(sub=f"v-{uuid.uuid4().hex[:8]}"))
    assert gw.get("/v1/admin/users", token=other).status == 403
    assert gw.get(API, token=tokens.tamper(ok)).status == 401
    time.sleep(1.5)  # cache counters and the key set age are reported on the 1 s tick
    m = scrape(gw)
    assert m["tollgate_requests_allowed_total{}"] == 2
    assert m['tollgate_requests_denied_total{reason="quota"}'] == 1
    assert m["tollgate_quota_rejections_total{}"] == 1
    assert m['tollgate_requests_denied_total{reason="missing"}'] == 1
    assert m['tollgate_requests_denied_total{reason="expired"}'] == 1
    assert m['tollgate_requests_denied_total{reason="wrong_audience"}'] == 1
    assert m['tollgate_requests_denied_total{reason="scope"}'] == 1
    assert m['tollgate_requests_denied_total{reason="invalid_token"}'] == 1
    assert m["tollgate_jwks_fetches_total{}"] == 1
    assert m["tollgate_jwks_fetch_failures_total{}"] == 0
    assert m["tollgate_config_loads_total{}"] >= 2  # main thread and worker VMs
    assert m["tollgate_config_failures_total{}"] == 0
    # ok was verified once and then served from the cache.
    assert m['tollgate_cache_hits_total{cache="token"}'] >= 2
    assert m['tollgate_cache_misses_total{cache="token"}'] >= 1
    assert m["tollgate_jwks_age_seconds{}"] >= 0


def test_jwks_failures_are_counted(envoy, idp):
    idp.set_fault("/jwks", status=500)
    gw = envoy(jwt_config(idp.port), concurrency=1)
    key = tokens.rsa_key("k1")
    assert gw.get(API, token=key.sign(tokens.claims())).status == 503
    m = scrape(gw)
    assert m["tollgate_jwks_fetch_failures_total{}"] >= 1
    assert m['tollgate_requests_denied_total{reason="auth_unavailable"}'] >= 1


def test_logs_one_debug_line_per_denial_and_info_for_jwks(envoy, idp):
    """`log_level: debug`: each denial is one debug line with status, reason,
    method and path (the principal for 403); JWKS fetches log at info; the
    token never appears."""
    key = tokens.rsa_key("k1")
    idp.set_keys(key)
    config = jwt_config(idp.port)
    config["log_level"] = "debug"
    config["route_scopes"] = [{"path_prefix": "/v1/admin/", "required_scope": "admin"}]
    gw = envoy(config, concurrency=1, log_level="debug")
    expired = key.sign(tokens.claims(lifetime=-3600))
    assert gw.get(API, token=expired).status == 401
    assert gw.get("/v1/admin/x", token=key.sign(tokens.claims(sub="bob"))).status == 403
    time.sleep(0.5)
    log = gw.log_text()
    wasm = [line for line in log.splitlines() if "wasm log" in line]
    assert any("denied 401 expired: GET /v1/models" in line for line in wasm), "\n".join(wasm)
    assert any("denied 403 scope: GET /v1/admin/x" in line for line in wasm), "\n".join(wasm)
    assert any('(principal "bob")' in line for line in wasm), "\n".join(wasm)
    assert any("[info]" in line and "JWKS fetched" in line for line in wasm), "\n".join(wasm)
    # (Envoy's own debug lines print request headers; tollgate's never do.)
    assert not [line for line in wasm if expired in line]


def test_info_level_hides_denials(envoy, idp):
    """At the default `log_level` (info) denials are not logged."""
    key = tokens.rsa_key("k1")
    idp.set_keys(key)
    gw = envoy(jwt_config(idp.port), concurrency=1, log_level="debug")
    assert gw.get(API).status == 401
    time.sleep(0.5)
    assert not [line for line in gw.log_text().splitlines()
                if "wasm log" in line and "denied" in line]
