"""Hardening: secrets stay secret. Bearer tokens, the introspection
`client_secret` (also in its HTTP Basic form) and `jwks.token` never appear in
an answer (status line, headers, body), in Envoy's log at info level, in the
access log or in the admin stats; at debug level tollgate's own log lines
(`wasm log ...`) carry reasons, never tokens or secrets.

(At debug level Envoy itself prints the plugin configuration and request
headers, secrets and tokens included: that is Envoy's logging, not the
filter's, so the debug checks look at tollgate's lines only.)"""

from __future__ import annotations

import base64
import json
import os
import time
import urllib.request

import pytest

from harness import tokens
from harness.config import CLAIMS_MAPPING, ISSUER, jwt_config
from harness.server import Reply

API = "/v1/models"
TAG = os.urandom(6).hex()
JWKS_TOKEN = f"jwks-bearer-{TAG}-Zq8"
CLIENT_ID = "gw-client"
CLIENT_SECRET = f"client-secret-{TAG}-Xw3"
BASIC = base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
USER_BASIC = base64.b64encode(f"alice:pa55-{TAG}".encode()).decode()
SECRETS = {"jwks.token": JWKS_TOKEN, "client_secret": CLIENT_SECRET, "client_secret (Basic)": BASIC,
           "a caller's Basic credentials": USER_BASIC}


def introspection_config(port: int, *, cluster: str = "idp", log_level: str | None = None) -> dict:
    cfg = {
        "auth": {"provider_type": "oauth2_token", "config": {
            "introspection": {"url": f"http://127.0.0.1:{port}/introspect", "cluster": cluster,
                              "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET, "timeout_ms": 5000},
            "issuer": ISSUER,
            "claims_mapping": CLAIMS_MAPPING,
            "cache_ttl": 30}},
        "public_paths": ["/v1/health"],
        "forward": {"strip_authorization": True},
    }
    if log_level:
        cfg["log_level"] = log_level
    return cfg


def jwks_config(port: int, log_level: str | None = None) -> dict:
    cfg = jwt_config(port, jwks={"token": JWKS_TOKEN}, forward={"strip_authorization": True})
    if log_level:
        cfg["log_level"] = log_level
    return cfg


class Traffic:
    """Sends requests and keeps every answer as text, and every token used."""

    def __init__(self, gw):
        self.gw = gw
        self.answers: list[str] = []
        self.tokens: list[str] = []
        self.url_tokens: list[str] = []  # sent in the query string, not as credentials
        self.statuses: list[int] = []

    def send(self, token: str | None = None, path: str = API, authorization: str | None = None) -> int:
        headers = {}
        if token is not None:
            self.tokens.append(token)
            headers["Authorization"] = f"Bearer {token}"
        if authorization is not None:
            headers["Authorization"] = authorization
        r = self.gw.get(path, headers=headers)
        head = "\n".join(f"{k}: {v}" for k, v in r.header_list)
        self.answers.append(f"{r.status}\n{head}\n\n{r.text}")
        self.statuses.append(r.status)
        return r.status


def needles(traffic: Traffic, url_tokens: bool = True) -> dict[str, str]:
    """What must not leak: the secrets, each token, and each token's signature
    part (a distinctive piece of it); with `url_tokens`, also the tokens sent
    in a query string."""
    out = dict(SECRETS)
    for i, t in enumerate(traffic.tokens + (traffic.url_tokens if url_tokens else [])):
        out[f"token #{i}"] = t
        parts = t.split(".")
        if len(parts) == 3 and len(parts[2]) >= 24:
            out[f"token #{i} signature"] = parts[2]
    return out


def leaks(texts: dict[str, str], what: dict[str, str]) -> list[str]:
    found = []
    for where, text in texts.items():
        for name, value in what.items():
            if value and value in text:
                line = next((ln for ln in text.splitlines() if value in ln), "")
                found.append(f"{name} in {where}: {line[:300]}")
    return found


def admin_stats(gw) -> str:
    with urllib.request.urlopen(f"{gw.admin_url}/stats", timeout=5) as r:
        return r.read().decode(errors="replace")


def wasm_lines(log: str) -> str:
    return "\n".join(line for line in log.splitlines() if "wasm log" in line)


@pytest.fixture
def rsa():
    return tokens.rsa_key("rs-secret", "RS256")


def drive_jwt(gw, rsa, idp) -> Traffic:
    t = Traffic(gw)
    now = int(time.time())
    deadline = time.monotonic() + 15
    while t.send(rsa.sign(tokens.claims(jti=f"warm-{time.monotonic()}"))) != 200:
        assert time.monotonic() < deadline, t.answers[-1]
        time.sleep(0.2)
    assert t.send(rsa.sign(tokens.claims(sub="alice", jti=TAG))) == 200
    assert t.send(tokens.tamper(rsa.sign(tokens.claims(jti="tampered")))) == 401
    assert t.send(rsa.sign(tokens.claims(now=now - 900, lifetime=300))) == 401  # expired
    assert t.send(tokens.rsa_key("stranger").sign(tokens.claims())) == 401  # unknown kid
    assert t.send(tokens.hs256_with_public_key(tokens.claims(), rsa)) == 401
    assert t.send(f"garbage-{TAG}-token") == 401
    assert t.send(rsa.sign(tokens.claims(aud="other"))) == 401
    qs_token = rsa.sign(tokens.claims(jti="in-query"))
    t.url_tokens.append(qs_token)
    assert t.send(path=f"{API}?access_token={qs_token}") == 401
    assert t.send(authorization=f"Basic {USER_BASIC}") == 401
    return t


def drive_introspection(gw, idp) -> Traffic:
    def introspect(req):
        token = req.form().get("token", "")
        now = int(time.time())
        if token.startswith("ok-"):
            return Reply(200, {"active": True, "sub": "alice", "scope": "read", "exp": now + 300})
        if token.startswith("exp-"):
            return Reply(200, {"active": True, "sub": "alice", "exp": now - 900})
        if token.startswith("err-"):
            return Reply(500, "internal error")
        if token.startswith("weird-"):
            return Reply(200, "<html>not json</html>")
        return Reply(200, {"active": False})

    idp.route("/introspect", introspect)
    t = Traffic(gw)
    assert t.send(f"ok-{TAG}-valid") == 200
    assert t.send(f"ok-{TAG}-valid") == 200  # from the decision cache
    assert t.send(f"bad-{TAG}-inactive") == 401
    assert t.send(f"exp-{TAG}-expired") == 401
    assert t.send(f"weird-{TAG}-answer") == 401
    assert t.send(f"err-{TAG}-idp-error") == 503
    assert t.send(authorization=f"Basic {USER_BASIC}") == 401
    assert t.send(path="/v1/health") == 200
    calls = idp.received("/introspect")
    assert calls and all(c.headers.get("authorization") == f"Basic {BASIC}" for c in calls), \
        "the client secret was not sent to the introspection endpoint"
    return t


def assert_nothing_leaks(gw, traffic: Traffic, *, log_filter=None) -> None:
    time.sleep(0.3)  # log flush
    log = gw.log_text()
    if log_filter:
        log = log_filter(log)
    texts = {f"answer #{i}": a for i, a in enumerate(traffic.answers)}
    texts["Envoy log"] = log
    texts["admin /stats"] = admin_stats(gw)
    found = leaks(texts, needles(traffic))
    # Envoy's default access log format records the request path with its
    # query: a token a client puts in the URL is there (Envoy's doing, and no
    # credential for tollgate); Authorization values and secrets never are.
    found += leaks({"access log": gw.access_log_text()}, needles(traffic, url_tokens=False))
    assert not found, "\n".join(found)


def test_jwks_token_and_bearer_tokens_never_leak(envoy, idp, rsa, upstream):
    """JWT provider with `jwks.token`, Envoy at -l info: valid, tampered,
    expired, unknown-kid, HS256-confused, garbage, wrong-audience tokens, a
    token in the query string and a Basic header."""
    idp.set_keys(rsa)
    gw = envoy(jwks_config(idp.port))
    traffic = drive_jwt(gw, rsa, idp)
    fetches = idp.received("/jwks")
    assert fetches and all(f.headers.get("authorization") == f"Bearer {JWKS_TOKEN}" for f in fetches)
    # The upstream got no Authorization (strip_authorization) either.
    assert all("authorization" not in r.headers for r in upstream.received())
    assert_nothing_leaks(gw, traffic)


def test_client_secret_and_opaque_tokens_never_leak(envoy, idp, upstream):
    """Introspection with a client secret, Envoy at -l info: active, inactive,
    expired, garbage-answer and IdP-error tokens."""
    gw = envoy(introspection_config(idp.port))
    traffic = drive_introspection(gw, idp)
    assert all("authorization" not in r.headers for r in upstream.received())
    assert_nothing_leaks(gw, traffic)


def test_missing_introspection_cluster_logs_no_secret(envoy, idp):
    """A runtime configuration error (the introspection cluster is not in
    Envoy): 503, the log names the cluster and carries no secret or token."""
    gw = envoy(introspection_config(idp.port, cluster="introspection-cluster-missing"), clusters={})
    t = Traffic(gw)
    assert t.send(f"ok-{TAG}-no-cluster") == 503
    time.sleep(0.3)
    assert "introspection-cluster-missing" in gw.log_text()
    assert_nothing_leaks(gw, t)


def _with(cfg: dict, path: list[str], value) -> dict:
    cfg = json.loads(json.dumps(cfg))
    node = cfg
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return cfg


INTRO = ["auth", "config", "introspection"]
JWKS = ["auth", "config", "jwks"]

CONFIG_ERRORS = {
    "introspection_unknown_top_level_key": lambda p: _with(introspection_config(p), ["bogus"], 1),
    "introspection_secret_under_typo_key": lambda p: _with(introspection_config(p), INTRO + ["client_secrett"], CLIENT_SECRET),
    "introspection_secret_wrong_type": lambda p: _with(introspection_config(p), INTRO + ["client_secret"], [CLIENT_SECRET]),
    "introspection_secret_without_client_id": lambda p: _with(introspection_config(p), INTRO + ["client_id"], None),
    "introspection_bad_url": lambda p: _with(introspection_config(p), INTRO + ["url"], "ftp://idp/introspect"),
    "introspection_invalid_json": lambda p: json.dumps(introspection_config(p))[:-1] + ",}",
    "jwks_unknown_nested_key": lambda p: _with(jwks_config(p), JWKS + ["bogus"], True),
    "jwks_token_under_typo_key": lambda p: _with(jwks_config(p), JWKS + ["tokenn"], JWKS_TOKEN),
    "jwks_token_wrong_type": lambda p: _with(jwks_config(p), JWKS + ["token"], {"value": JWKS_TOKEN}),
    "jwks_invalid_json": lambda p: json.dumps(jwks_config(p)).replace(JWKS_TOKEN, JWKS_TOKEN + '"x', 1),
}


@pytest.mark.parametrize("case", list(CONFIG_ERRORS))
def test_config_error_does_not_log_secrets(expect_config_rejected, idp, case):
    """Envoy refuses the configuration; the log says why without the secret."""
    def no_none(v):  # `client_id: None` above means "left out"
        if isinstance(v, dict):
            return {k: no_none(x) for k, x in v.items() if x is not None}
        return v
    cfg = CONFIG_ERRORS[case](idp.port)
    log = expect_config_rejected(no_none(cfg) if isinstance(cfg, dict) else cfg)
    assert "tollgate refused its configuration" in log, log[-2000:]
    found = leaks({"Envoy log": log}, SECRETS)
    assert not found, "\n".join(found)


def test_debug_level_filter_lines_carry_no_secrets(envoy, idp, rsa, upstream):
    """Envoy at -l debug and the plugin's `log_level: debug`: tollgate logs its
    reasons (`denied 401 ...`), never a token or a secret."""
    idp.set_keys(rsa)
    gw = envoy(jwks_config(idp.port, log_level="debug"), log_level="debug")
    traffic = drive_jwt(gw, rsa, idp)
    time.sleep(0.3)
    lines = wasm_lines(gw.log_text())
    assert "denied 401" in lines, "no debug line from tollgate: the check would prove nothing"
    found = leaks({"tollgate debug lines": lines}, needles(traffic))
    assert not found, "\n".join(found)
    assert_nothing_leaks(gw, traffic, log_filter=wasm_lines)


def test_debug_level_introspection_lines_carry_no_secrets(envoy, idp, upstream):
    idp_cfg = introspection_config(idp.port, log_level="debug")
    gw = envoy(idp_cfg, log_level="debug")
    traffic = drive_introspection(gw, idp)
    time.sleep(0.3)
    lines = wasm_lines(gw.log_text())
    assert "denied" in lines, "no debug line from tollgate: the check would prove nothing"
    assert_nothing_leaks(gw, traffic, log_filter=wasm_lines)
