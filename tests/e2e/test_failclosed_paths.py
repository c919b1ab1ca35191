"""End-to-end tests of issue 16, items 2, 4 and 5, through a real Envoy.

- Item 2, `;` path parameters: servlet stacks drop `;params` from every
  segment and then resolve dot segments, so `..;` must not walk out of a
  public prefix or around a rule; ordinary parameters keep working, and rules
  and public paths hold for the path with and without its parameters.
- Item 4: the custom endpoint is asked about exactly the path its answer is
  cached under (the normalised one).
- Item 5: with the custom provider's `cache_ttl: 0` concurrent requests share
  no callout (the endpoint also sees the query).

The harness bootstrap does not set Envoy's `normalize_path`/`merge_slashes`,
so the filter and the upstream get the path as the client sent it."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from harness import tokens
from harness.config import jwt_config
from harness.envoy import Envoy
from harness.idp import IdP
from harness.providers import Scripted, assert_denied, custom_config, json_api_key, new_token
from harness.server import Reply, Request

PUBLIC = ["/v1/health", "/static/*"]
RULES = [
    {"path": "/v1/docs/report", "required_scope": "secret"},
    {"path_prefix": "/v1/docs/", "required_scope": "read"},
    {"path": "/v1/files/{id}", "required_scope": "files"},
    {"path_prefix": "/v1/admin/", "required_scope": "admin"},
]
MSG_BAD_PATH = "Invalid request path"


def forbidden_body(message: str) -> bytes:
    err = {"message": message, "detail": message}
    return json.dumps({"error": err}, separators=(",", ":")).encode()


def assert_scope_denied(resp, scope: str) -> None:
    msg = f"Access denied: user does not have required scope: {scope}"
    assert resp.status == 403 and resp.body == forbidden_body(msg), resp


def assert_passed(resp, upstream, path: str) -> None:
    """200 from the echo upstream, which got exactly `path`."""
    assert resp.status == 200, resp
    assert resp.json()["path"] == path, resp
    assert [r.path for r in upstream.received()] == [path]


@pytest.fixture(scope="module")
def key() -> tokens.SigningKey:
    return tokens.rsa_key("paths-1")


@pytest.fixture(scope="module")
def tok(key):
    def make(scope: str | None = None, sub: str = "alice") -> str:
        return key.sign(tokens.claims(sub=sub, scope=scope))
    return make


@pytest.fixture(scope="module")
def gw(module_idp, module_envoy, key, tok) -> Envoy:
    """JWT, public paths `/v1/health` and `/static/*`, the rules above."""
    module_idp.set_keys(key)
    cfg = jwt_config(module_idp.port, public_paths=PUBLIC)
    cfg["route_scopes"] = RULES
    e = module_envoy(cfg)
    deadline = time.monotonic() + 15
    while e.get("/v1/other", token=tok()).status != 200:
        assert time.monotonic() < deadline, "keys never loaded"
        time.sleep(0.1)
    return e


# -- item 2: `;` path parameters ---------------------------------------------------------------

@pytest.mark.parametrize("path", [
    "/static/..;/v1/admin/x",            # the example
    "/static/..;jsessionid=1/v1/admin/x",
    "/static/%2e%2e;/v1/admin/x",
    "/static/x/.;/..;/..;/v1/admin/x",
])
def test_dot_dot_with_parameters_cannot_leave_a_public_prefix(gw, upstream, path):
    """Without a token, `..;` out of `/static/*` is the filter's 400, never the
    upstream (a servlet serves `/static/..;/v1/admin/x` as `/v1/admin/x`)."""
    assert_denied(gw.get(path), 400, MSG_BAD_PATH)
    assert upstream.received() == []


@pytest.mark.parametrize("path", [
    "/v1/x/..;/admin/y",                 # the example
    "/v1/x/..;v=1/admin/y",
    "/v1/x/%2E%2e;/admin/y",
    "/v1/admin/.;/y",
])
def test_dot_dot_with_parameters_cannot_walk_around_a_rule(gw, tok, upstream, path):
    """A caller without `admin` cannot reach `/v1/admin/` with `..;`; the path is
    refused whoever asks."""
    assert_denied(gw.get(path, token=tok("read")), 400, MSG_BAD_PATH)
    assert_denied(gw.get(path, token=tok("admin")), 400, MSG_BAD_PATH)
    assert upstream.received() == []


@pytest.mark.parametrize("path", ["/v1/files/;x", "/v1/files/;", "/;x/v1/admin/y"])
def test_segment_empty_without_its_parameters_is_400(gw, tok, upstream, path):
    """`{id}` would match `;x` literally, while a servlet sees `/v1/files/`."""
    assert_denied(gw.get(path, token=tok("files admin")), 400, MSG_BAD_PATH)
    assert upstream.received() == []


def test_ordinary_parameters_keep_working(gw, tok, upstream):
    """`;v=2` reaches the upstream as sent when every rule allows it."""
    r = gw.get("/v1/admin/report;v=2", token=tok("admin"))
    assert_passed(r, upstream, "/v1/admin/report;v=2")
    upstream.reset_log()
    assert_scope_denied(gw.get("/v1/admin/report;v=2", token=tok("read")), "admin")
    r = gw.get("/v1/files/a.txt;v=1", token=tok("files"))
    assert_passed(r, upstream, "/v1/files/a.txt;v=1")
    upstream.reset_log()
    assert_scope_denied(gw.get("/v1/files/a.txt;v=1", token=tok("read")), "files")
    assert upstream.received() == []


def test_rules_also_see_the_path_without_parameters(gw, tok, upstream):
    """The exact rule on `/v1/docs/report` (scope `secret`) holds for
    `/v1/docs/report;v=2`, which a servlet routes as `/v1/docs/report`, although
    the literal path only falls under the `/v1/docs/` prefix (scope `read`)."""
    assert_scope_denied(gw.get("/v1/docs/report;v=2", token=tok("read")), "secret")
    assert_scope_denied(gw.get("/v1/admin;x/y", token=tok("read")), "admin")
    assert upstream.received() == []
    r = gw.get("/v1/docs/report;v=2", token=tok("read secret"))
    assert_passed(r, upstream, "/v1/docs/report;v=2")
    upstream.reset_log()
    r = gw.get("/v1/docs/other;v=2", token=tok("read"))
    assert_passed(r, upstream, "/v1/docs/other;v=2")


def test_public_paths_with_parameters(gw, upstream):
    """Public only when public with and without the parameters."""
    assert_passed(gw.get("/static/app.js;v=1"), upstream, "/static/app.js;v=1")
    upstream.reset_log()
    for path in ("/v1/health;x", "/static;x/app.js"):
        r = gw.get(path)
        assert r.status == 401, (path, r)
    assert upstream.received() == []


@pytest.mark.parametrize("where", ["public_paths", "path", "path_prefix"])
def test_semicolon_in_configured_paths_is_refused(expect_config_rejected, idp, where):
    cfg = jwt_config(idp.port, public_paths=["/v1/health;v=1"] if where == "public_paths" else PUBLIC)
    if where == "public_paths":
        key = "public_paths[0]"
    else:
        cfg["route_scopes"] = [{where: "/v1/a;b/", "required_scope": "s"}]
        key = f"route_scopes[0].{where}"
    log = expect_config_rejected(cfg)
    assert any(f"configuration key `{key}`: must not contain `;`" in line and "wasm log" in line
               for line in log.splitlines()), log


# -- items 4 and 5: the custom provider ----------------------------------------------------------

@pytest.fixture
def authsvc():
    """A fresh custom-endpoint service for this test."""
    with IdP() as server:
        yield server


def scripted(svc: IdP) -> Scripted:
    s = Scripted(json_api_key, Reply(401, {"detail": "unknown key"}))
    svc.route("/validate", s)
    return s


def endpoint_paths(s: Scripted, token: str) -> list[str]:
    return [json.loads(r.body)["request"]["path"] for r in s.requests(token)]


def test_custom_endpoint_is_asked_about_the_path_it_is_cached_under(envoy, authsvc, upstream):
    """Item 4: the endpoint refuses `/v1/admin/…` to this key. `/v1//admin/x`
    is cached under `/v1/admin/x`, so the endpoint must judge `/v1/admin/x`
    (before the fix it judged `/v1//admin/x`, allowed it, and the answer then
    let `/v1/admin/x` through from the cache)."""
    s = scripted(authsvc)

    def not_admin(req: Request) -> Reply:
        path = json.loads(req.body)["request"]["path"]
        if path.startswith("/v1/admin/"):
            return Reply(403, {"detail": "no"})
        return Reply(200, {"principal": "alice"})

    t = s.answer(new_token("k"), not_admin)
    gw = envoy(custom_config(authsvc.port, cache_ttl=30), clusters={"authsvc": authsvc.port},
               concurrency=1)
    assert_denied(gw.get("/v1//admin/x", token=t), 401, "Authentication failed: 403")
    assert_denied(gw.get("/v1/admin/x", token=t), 401, "Authentication failed: 403")
    assert upstream.received() == []
    assert set(endpoint_paths(s, t)) == {"/v1/admin/x"}
    # Allowed answers: the endpoint sees the normalised path, the upstream the raw one.
    r = gw.get("/v1//models/./m1", token=t)
    assert r.status == 200 and r.json()["path"] == "/v1//models/./m1", r
    assert endpoint_paths(s, t)[-1] == "/v1/models/m1"


def test_custom_cache_ttl_zero_shares_no_callout(envoy, authsvc, upstream):
    """Item 5: one token, one path, different queries, all at once, with a slow
    endpoint that allows `project=mine` only: each request gets its own answer,
    and no refusal is remembered for the next request either."""
    s = scripted(authsvc)

    def mine_only(req: Request) -> Reply:
        params = json.loads(req.body)["request"]["params"]
        if params.get("project") == ["mine"]:
            return Reply(200, {"principal": "alice"}, delay=1.0)
        return Reply(401, {"detail": "not your project"}, delay=1.0)

    t = s.answer(new_token("k"), mine_only)
    gw = envoy(custom_config(authsvc.port, cache_ttl=0), clusters={"authsvc": authsvc.port},
               concurrency=1)
    queries = ["mine", "victim"] * 4
    with ThreadPoolExecutor(len(queries)) as pool:
        results = list(pool.map(
            lambda q: (q, gw.get(f"/v1/models?project={q}", token=t, timeout=20)), queries))
    for q, r in results:
        if q == "mine":
            assert r.status == 200 and r.json()["path"] == "/v1/models?project=mine", r
        else:
            assert_denied(r, 401, "Authentication failed: 401")
    assert s.calls(t) == len(queries)
    assert sorted(r.path for r in upstream.received()) == ["/v1/models?project=mine"] * 4
    # Right after a refusal, the other query is asked about afresh.
    assert_denied(gw.get("/v1/models?project=victim", token=t), 401, "Authentication failed: 401")
    assert gw.get("/v1/models?project=mine", token=t).status == 200
    assert s.calls(t) == len(queries) + 2
