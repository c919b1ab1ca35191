"""Interoperability with a real OpenID provider: `tests/oidc/server.mjs`
(npm `oidc-provider`). Client-credentials access tokens from its token
endpoint go through tollgate as JWTs (checked against its JWKS) and as opaque
tokens (checked at its RFC 7662 introspection endpoint)."""

from __future__ import annotations

import base64
import json
import queue
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote_plus, urlencode, urlsplit

import pytest

from harness import tokens
from harness.client import request
from harness.config import jwt_config
from harness.envoy import REPO_ROOT, Envoy
from harness.providers import CLIENT_SECRET, assert_denied, identity, introspection_config, new_token

OIDC_DIR = REPO_ROOT / "tests" / "oidc"
API = "/v1/models"
INVALID = 'Bearer error="invalid_token"'
TRACE = {"extra_args": ("--component-log-level", "wasm:trace")}

_SECRETS: list[str] = []  # client secrets and tokens: none may reach a log
_ENVOYS: list[Envoy] = []


@dataclass
class OIDCServer:
    proc: subprocess.Popen
    port: int
    meta: dict
    log_path: Path

    @property
    def issuer(self) -> str:
        return self.meta["issuer"]

    def client(self, kind: str) -> tuple[str, str]:
        client_id, secret = self.meta["clients"][kind]
        return client_id, secret

    def token(self, resource: str | None = None, client: str = "basic", scope: str | None = None) -> str:
        """A client-credentials access token (client `basic` authenticates with
        HTTP Basic, `post` with form fields)."""
        client_id, secret = self.client(client)
        form = {"grant_type": "client_credentials"}
        if resource:
            form["resource"] = resource
        if scope:
            form["scope"] = scope
        headers = {"content-type": "application/x-www-form-urlencoded"}
        if client == "post":
            form.update(client_id=client_id, client_secret=secret)
        else:
            pair = f"{quote_plus(client_id)}:{quote_plus(secret)}"
            headers["authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        r = request(self.issuer, urlsplit(self.meta["token_endpoint"]).path, "POST", headers,
                    urlencode(form), timeout=30)
        assert r.status == 200, f"token endpoint: {r!r}\n{self.log_tail()}"
        doc = r.json()
        assert doc["token_type"].lower() == "bearer", doc
        _SECRETS.append(doc["access_token"])
        return doc["access_token"]

    def revoke(self, token: str) -> None:
        client_id, secret = self.client("basic")
        basic = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
        r = request(self.issuer, "/token/revocation", "POST",
                    {"content-type": "application/x-www-form-urlencoded",
                     "authorization": f"Basic {basic}"},
                    urlencode({"token": token}), timeout=30)
        assert r.status == 200, r

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def _read_lines(stream, out: queue.Queue) -> None:
    for line in stream:
        out.put(line)
    out.put(None)


@pytest.fixture(scope="module")
def oidc(tmp_path_factory):
    """The OpenID provider on a free port, stopped with SIGTERM at the end."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("Node.js is not installed: the OIDC interoperability tests need `node` "
                    "(>= 20.19) and `cd tests/oidc && npm ci` (run by `make setup`)", pytrace=False)
    if not (OIDC_DIR / "node_modules" / "oidc-provider" / "package.json").exists():
        pytest.fail("npm package oidc-provider missing from tests/oidc/node_modules: "
                    "run `make setup` or `cd tests/oidc && npm ci`", pytrace=False)
    # One start normally takes < 1 s. Once in CI a start hung past a minute
    # before the provider was even built (stderr ended after the import): a
    # second process is then started rather than failing the whole module.
    failures = []
    for attempt in (1, 2):
        log_path = tmp_path_factory.mktemp("oidc") / "oidc.log"
        proc, server, why = _start_oidc(node, log_path, timeout=30)
        if server is not None:
            break
        failures.append(f"attempt {attempt}: {why}")
    else:
        pytest.fail("the OIDC server did not start:\n" + "\n".join(failures), pytrace=False)
    try:
        yield server
    finally:
        _stop(proc)


def _start_oidc(node: str, log_path, timeout: float):
    """(process, server, None) once READY and the metadata line are read, else
    (process, None, why) with the process stopped."""
    with open(log_path, "wb") as err:
        proc = subprocess.Popen([node, str(OIDC_DIR / "server.mjs"), "0"], cwd=OIDC_DIR,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
                                text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_read_lines, args=(proc.stdout, lines), daemon=True).start()
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < 2:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            line = None
        if line is None:
            code = proc.poll()
            _stop(proc)
            log = log_path.read_text(errors="replace")
            return proc, None, f"exit {code}; stdout {got!r}; stderr:\n{log}"
        got.append(line.strip())
    ready, meta = got
    assert ready.startswith("READY "), got
    server = OIDCServer(proc, int(ready.split()[1]), json.loads(meta), log_path)
    assert server.issuer == f"http://127.0.0.1:{server.port}"
    return proc, server, None


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _gateway(module_envoy, oidc: OIDCServer, config: dict) -> Envoy:
    e = module_envoy(config, clusters={"idp": oidc.port}, concurrency=1, **TRACE)
    _ENVOYS.append(e)
    return e


def _introspection(oidc: OIDCServer, client: str, **introspection) -> dict:
    client_id, secret = oidc.client(client)
    _SECRETS.append(secret)
    return introspection_config(
        oidc.port, path=urlsplit(oidc.meta["introspection_endpoint"]).path,
        introspection={"client_id": client_id, "client_secret": secret, **introspection},
        issuer=oidc.issuer, log_level="trace")


@pytest.fixture(scope="module")
def jwt_gw(oidc, module_envoy) -> Envoy:
    """oauth2_token with the provider's JWKS, audience and issuer."""
    config = jwt_config(oidc.port, jwks={"uri": oidc.meta["jwks_uri"]},
                        audience=oidc.meta["audience"], issuer=oidc.issuer)
    config["log_level"] = "trace"
    return _gateway(module_envoy, oidc, config)


@pytest.fixture(scope="module")
def basic_gw(oidc, module_envoy) -> Envoy:
    """oauth2_token with introspection, client gw (HTTP Basic)."""
    return _gateway(module_envoy, oidc, _introspection(oidc, "basic"))


# -- JWT access tokens ----------------------------------------------------------------

@pytest.mark.parametrize("scope,attributes", [
    ("read write", {"roles": ["gw"], "scopes": ["read", "write"]}),
    (None, {"roles": ["gw"]}),
], ids=["with_scope", "without_scope"])
def test_jwt_access_token_passes(oidc, jwt_gw, upstream, scope, attributes):
    t = oidc.token(oidc.meta["jwt_resource"], scope=scope)
    header = json.loads(tokens.b64url_decode(t.split(".")[0]))
    assert header["kid"] == oidc.meta["kid"] and header["alg"] == "RS256", header
    r = jwt_gw.get(API, token=t)
    assert identity(r) == ("gw", attributes)
    assert upstream.count(API) == 1


@pytest.mark.parametrize("bad", [
    lambda t: tokens.tamper(t),
    lambda t: tokens.tamper_payload(t, sub="root"),
    lambda t: tokens.tamper_payload(t, scope="read write admin"),
], ids=["signature", "sub", "scope"])
def test_tampered_jwt_refused(oidc, jwt_gw, upstream, bad):
    t = bad(oidc.token(oidc.meta["jwt_resource"], scope="read"))
    _SECRETS.append(t)
    assert_denied(jwt_gw.get(API, token=t), 401, "Invalid JWT token", INVALID)
    assert upstream.received() == []


def test_opaque_token_refused_by_jwks_config(oidc, jwt_gw, upstream):
    t = oidc.token(oidc.meta["opaque_resource"])
    assert_denied(jwt_gw.get(API, token=t), 401, "Invalid JWT token", INVALID)
    assert upstream.received() == []


def test_jwt_missing_header_names_the_issuer(oidc, jwt_gw):
    assert_denied(jwt_gw.get(API), 401, "Authentication required. Please provide a valid OAuth2 "
                                        f"Bearer token from {oidc.issuer}", "Bearer")


# -- opaque tokens and introspection ------------------------------------------------------

def test_opaque_token_passes_with_basic_client(oidc, basic_gw, upstream):
    t = oidc.token(oidc.meta["opaque_resource"], scope="read write")
    r = basic_gw.get(API, token=t)
    assert identity(r) == ("gw", {"roles": ["gw"], "scopes": ["read", "write"]})
    assert basic_gw.get(API, token=t).status == 200  # and again, from the cache
    assert upstream.count(API) == 2


def test_opaque_token_passes_with_secret_in_body(oidc, module_envoy):
    """`send_secret_in_body` with client gw-post (client_secret_post), which
    the provider refuses to authenticate with HTTP Basic."""
    gw = _gateway(module_envoy, oidc, _introspection(oidc, "post", send_secret_in_body=True))
    t = oidc.token(oidc.meta["opaque_resource"], client="post", scope="read")
    assert identity(gw.get(API, token=t)) == ("gw-post", {"roles": ["gw-post"], "scopes": ["read"]})


def test_opaque_token_passes_with_credentials_needing_encoding(oidc, module_envoy):
    """Client `gw:special` / `s3 cr+t&%/~`: the Basic credentials are form-encoded
    first (RFC 6749 §2.3.1), as the provider decodes them."""
    gw = _gateway(module_envoy, oidc, _introspection(oidc, "special"))
    t = oidc.token(oidc.meta["opaque_resource"])
    assert identity(gw.get(API, token=t))[0] == "gw"


def test_unknown_opaque_token_not_active(basic_gw, upstream):
    t = new_token("unknown")
    _SECRETS.append(t)
    assert_denied(basic_gw.get(API, token=t), 401, "Token not active", INVALID)
    assert upstream.received() == []


def test_revoked_opaque_token_not_active(oidc, basic_gw, upstream):
    t = oidc.token(oidc.meta["opaque_resource"])
    oidc.revoke(t)
    assert_denied(basic_gw.get(API, token=t), 401, "Token not active", INVALID)
    assert upstream.received() == []


def test_jwt_sent_to_introspection_is_refused(oidc, basic_gw, upstream):
    """oidc-provider does not introspect structured tokens (400
    unsupported_token_type): a 401 with the status, never a pass."""
    t = oidc.token(oidc.meta["jwt_resource"])
    assert_denied(basic_gw.get(API, token=t), 401, "Token introspection failed: 400", INVALID)
    assert upstream.received() == []


def test_wrong_client_secret(oidc, module_envoy, upstream):
    """The provider answers 401 invalid_client: tollgate answers 401
    `Token introspection failed: 401`."""
    config = _introspection(oidc, "basic")
    config["auth"]["config"]["introspection"]["client_secret"] = "not-the-secret"
    gw = _gateway(module_envoy, oidc, config)
    t = oidc.token(oidc.meta["opaque_resource"])
    assert_denied(gw.get(API, token=t), 401, "Token introspection failed: 401", INVALID)
    assert upstream.received() == []


# -- logs (keep last) -----------------------------------------------------------------

def test_no_secret_or_token_in_envoy_logs(jwt_gw, basic_gw):
    time.sleep(0.3)  # --file-flush-interval-msec 100
    secrets = sorted(set(_SECRETS + ["not-the-secret"]))
    assert len(_ENVOYS) >= 2 and CLIENT_SECRET in secrets
    for e in _ENVOYS:
        text = e.log_text() + e.access_log_text()
        assert text, e.workdir
        for s in secrets:
            assert s not in text, f"{s[:12]!r}... in {e.workdir}"
