"""End-to-end tests of route rules (required scopes and attributes, issue 4)
through a real Envoy at `--concurrency 2`.

Most tests share one Envoy (`gw`) configured with the contract's example rules.
The harness bootstrap does not set `normalize_path`/`merge_slashes`, so Envoy
hands the filter (and the upstream) the raw path: the filter's own
normalisation is what stands between an odd path and a rule. One test repeats
the bypass attempts with Envoy normalising as `envoy/envoy.yaml` does."""

from __future__ import annotations

import json
import socket
import time

import pytest

from harness import tokens
from harness.client import Response
from harness.config import ISSUER, jwt_config
from harness.envoy import Envoy

RULES = [
    {"path": "/v1/telemetry/traces/{trace_id}", "methods": ["GET"], "required_scope": "telemetry.read"},
    {"path": "/v1/telemetry/traces", "required_scope": "telemetry.read"},
    {"path_prefix": "/v1/admin/", "required_scope": "admin"},
    {"path_prefix": "/v1/models/", "methods": ["POST", "DELETE"],
     "required_attributes": {"roles": ["admin", "ml-eng"], "teams": ["ml-team"]}},
]
PUBLIC = ["/v1/health", "/public/*"]

MSG_REQUIRED = f"Authentication required. Please provide a valid OAuth2 Bearer token from {ISSUER}"
MSG_ATTRIBUTES = "Access denied: user does not have required attributes for this route"
MSG_BAD_PATH = "Invalid request path"


def msg_scope(scope: str) -> str:
    return f"Access denied: user does not have required scope: {scope}"


def error_body(message: str, detail: bool = False) -> bytes:
    err = {"message": message, "detail": message} if detail else {"message": message}
    return json.dumps({"error": err}, separators=(",", ":")).encode()


def assert_forbidden(resp: Response, message: str) -> None:
    """403 with exactly `{"error":{"message":M,"detail":M}}`."""
    assert resp.status == 403, resp
    assert resp.headers.get("content-type") == "application/json", resp
    assert resp.body == error_body(message, detail=True), resp
    assert "www-authenticate" not in resp.headers, resp


def assert_bad_path(resp: Response) -> None:
    """The filter's own 400 for a path it cannot normalise safely."""
    assert resp.status == 400, resp
    assert resp.headers.get("content-type") == "application/json", resp
    assert resp.body == error_body(MSG_BAD_PATH), resp


def assert_passed(resp: Response, upstream, principal: str | None = None) -> dict:
    """200 from the echo upstream, which saw exactly this one request."""
    assert resp.status == 200, resp
    echo = resp.json()
    assert len(upstream.received()) == 1, upstream.received()
    if principal is not None:
        assert echo["headers"]["x-auth-principal"] == principal
    return echo


def raw_request(gw: Envoy, target: bytes, method: bytes = b"GET", token: str | None = None) -> tuple[int, bytes]:
    """Sends a request line byte for byte (no client-side checks or encoding);
    returns the status and the body."""
    head = method + b" " + target + b" HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n"
    if token:
        head += f"Authorization: Bearer {token}\r\n".encode()
    with socket.create_connection(("127.0.0.1", gw.port), timeout=15) as s:
        s.sendall(head + b"\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    status_line, _, rest = data.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


def wait_until_serving(gw: Envoy, token: str, path: str = "/v1/other", timeout: float = 15.0) -> None:
    """Waits until the JWKS is loaded (a valid token passes on `path`)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = gw.get(path, token=token)
        if last.status == 200:
            return
        time.sleep(0.1)
    pytest.fail(f"Envoy not serving valid tokens within {timeout}s: {last!r}")


# -- shared gateway -----------------------------------------------------------

@pytest.fixture(scope="module")
def key() -> tokens.SigningKey:
    return tokens.rsa_key("access-1")


@pytest.fixture(scope="module")
def tok(key):
    """`tok(sub=, scope=, groups=)` -> a valid token (None leaves a claim out)."""
    def make(sub: str = "alice", scope: str | None = None, groups: list[str] | None = None, **extra) -> str:
        return key.sign(tokens.claims(sub=sub, scope=scope, groups=groups, **extra))
    return make


@pytest.fixture(scope="module")
def gw(module_idp, module_envoy, key, tok):
    """The contract's rules; public paths `/v1/health` and `/public/*`."""
    module_idp.set_keys(key)
    cfg = jwt_config(module_idp.port, public_paths=PUBLIC)
    cfg["route_scopes"] = RULES
    e = module_envoy(cfg)
    wait_until_serving(e, tok())
    return e


# -- required_scope ---------------------------------------------------------------

@pytest.mark.parametrize("scope", ["admin", "read admin write", "admin telemetry.read"])
def test_scope_present_allows(gw, tok, upstream, scope):
    r = gw.get("/v1/admin/users", token=tok(sub="root", scope=scope))
    echo = assert_passed(r, upstream, principal="root")
    assert "admin" in json.loads(echo["headers"]["x-auth-attributes"])["scopes"]


@pytest.mark.parametrize("scope", [None, "", "read", "read write", "administrator", "admin.read",
                                   "ADMIN", "xadmin", "ad min"],
                         ids=["no_scope_claim", "empty", "read", "read_write", "administrator",
                              "admin.read", "upper_case", "xadmin", "split"])
def test_scope_missing_is_403_with_exact_body(gw, tok, upstream, scope):
    """Scopes are whole, case-sensitive words of the `scope` claim."""
    assert_forbidden(gw.get("/v1/admin/users", token=tok(scope=scope)), msg_scope("admin"))
    assert upstream.received() == []


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
def test_rule_without_methods_covers_every_method(gw, tok, upstream, method):
    r = gw.request("/v1/admin/users", method, token=tok(scope="read"), body=b"{}")
    assert_forbidden(r, msg_scope("admin"))
    r = gw.request("/v1/admin/users", method, token=tok(scope="admin"), body=b"{}")
    assert r.status == 200 and r.json()["method"] == method, r


def test_head_on_rule_without_methods_is_denied(gw, tok, upstream):
    r = gw.request("/v1/admin/users", "HEAD", token=tok(scope="read"))
    assert r.status == 403 and r.body == b"", r
    assert upstream.received() == []


def test_no_token_is_401_before_any_rule(gw, upstream):
    """Rules apply after authentication: no token is 401, not 403."""
    r = gw.get("/v1/admin/users")
    assert r.status == 401, r
    assert r.body == error_body(MSG_REQUIRED), r
    assert r.headers.get("www-authenticate", "").startswith("Bearer"), r
    assert upstream.received() == []


def test_invalid_token_with_the_scope_is_401(gw, key, tok, upstream):
    """A token that fails verification is 401 even if it claims the scope."""
    now = int(time.time())
    expired = key.sign(tokens.claims(scope="admin", now=now - 600, lifetime=300))
    other_key = tokens.rsa_key("access-1").sign(tokens.claims(scope="admin"))
    for bad in (expired, tokens.tamper(tok(scope="admin")), other_key):
        r = gw.get("/v1/admin/users", token=bad)
        assert r.status == 401 and r.body == error_body("Invalid JWT token"), r
    r = gw.get("/v1/admin/users", headers={"Authorization": "Basic YWRtaW46YWRtaW4="})
    assert r.status == 401, r
    assert upstream.received() == []


def test_public_path_needs_no_scope(gw, tok, upstream):
    """Public paths are anonymous: no rule can apply (config refuses one there)."""
    assert gw.get("/v1/health").status == 200
    assert gw.get("/public/admin/x", token=tok(scope="read")).status == 200


# -- required_attributes ------------------------------------------------------------

UNMET = {
    "role_not_listed": ("bob", ["ml-team"]),
    "no_teams_claim": ("admin", None),
    "empty_teams": ("ml-eng", []),
    "other_team": ("admin", ["research"]),
    "team_case_differs": ("admin", ["ML-Team"]),
    "neither": ("bob", ["research"]),
}


@pytest.mark.parametrize("method", ["POST", "DELETE"])
@pytest.mark.parametrize("case", list(UNMET))
def test_attributes_unmet_is_403(gw, tok, upstream, case, method):
    """Every category needs one of its values: roles (from `sub`) and teams (from `groups`)."""
    sub, groups = UNMET[case]
    r = gw.request("/v1/models/llama-3", method, token=tok(sub=sub, groups=groups), body=b"{}")
    assert_forbidden(r, MSG_ATTRIBUTES)
    assert upstream.received() == []


@pytest.mark.parametrize("method", ["POST", "DELETE"])
@pytest.mark.parametrize("sub,groups", [("admin", ["ml-team"]), ("ml-eng", ["research", "ml-team"])])
def test_attributes_satisfied_passes(gw, tok, upstream, sub, groups, method):
    r = gw.request("/v1/models/llama-3", method, token=tok(sub=sub, groups=groups), body=b"{}")
    echo = assert_passed(r, upstream, principal=sub)
    assert echo["method"] == method
    attrs = json.loads(echo["headers"]["x-auth-attributes"])
    assert attrs["roles"] == [sub] and "ml-team" in attrs["teams"]


def test_scope_is_not_an_attribute_of_another_category(gw, tok, upstream):
    """A scope named like a role does not satisfy `roles`."""
    r = gw.request("/v1/models/x", "POST", token=tok(sub="bob", scope="admin ml-eng", groups=["ml-team"]))
    assert_forbidden(r, MSG_ATTRIBUTES)


@pytest.mark.parametrize("method", ["GET", "PUT", "PATCH", "OPTIONS"])
def test_method_not_listed_passes(gw, tok, upstream, method):
    """The models rule names POST and DELETE only: other methods pass without attributes."""
    r = gw.request("/v1/models/llama-3", method, token=tok(sub="bob"))
    assert assert_passed(r, upstream, principal="bob")["method"] == method


# -- no matching rule -------------------------------------------------------------------

@pytest.mark.parametrize("path", [
    "/v1/other", "/v1/models", "/v1/admin", "/v1/adminx/y", "/v1/ADMIN/x", "/v2/admin/x",
    "/v1/telemetry", "/v1/telemetry/tracesx", "/admin/x", "/",
])
def test_no_matching_rule_passes(gw, tok, upstream, path):
    """No rule matches: allowed (prefixes are literal and case-sensitive)."""
    r = gw.get(path, token=tok(sub="nobody"))
    assert assert_passed(r, upstream, principal="nobody")["path"] == path


# -- templates and exact paths -------------------------------------------------------------

@pytest.mark.parametrize("path", [
    "/v1/telemetry/traces/abc",
    "/v1/telemetry/traces/0af7651916cd43dd8448eb211c80319c",
    "/v1/telemetry/traces/a.b-c_d~e",
    "/v1/telemetry/traces/%C3%A9t%C3%A9",
    "/v1/telemetry/traces/abc?limit=5",
])
def test_template_matches_one_segment(gw, tok, upstream, path):
    assert_forbidden(gw.get(path, token=tok(scope="read")), msg_scope("telemetry.read"))
    assert upstream.received() == []
    assert gw.get(path, token=tok(scope="telemetry.read")).status == 200


@pytest.mark.parametrize("method,path", [
    ("GET", "/v1/telemetry/traces/"),          # empty segment
    ("GET", "/v1/telemetry/traces/abc/def"),   # extra segment
    ("GET", "/v1/telemetry/traces/abc/"),      # trailing slash: an extra, empty segment
    ("GET", "/v1/telemetry/traces/abc/spans"),
    ("POST", "/v1/telemetry/traces/abc"),      # method not listed, and no later rule matches
    ("DELETE", "/v1/telemetry/traces/abc"),
], ids=["empty_segment", "extra_segment", "trailing_slash", "sub_resource", "post", "delete"])
def test_template_non_matches_pass(gw, tok, upstream, method, path):
    r = gw.request(path, method, token=tok(scope="read"))
    assert assert_passed(r, upstream)["path"] == path


def test_get_rule_covers_head(gw, tok, upstream):
    """Starlette serves HEAD on every GET route, so a GET rule covers HEAD."""
    r = gw.request("/v1/telemetry/traces/abc", "HEAD", token=tok(scope="read"))
    assert r.status == 403
    assert upstream.received() == []
    ok = gw.request("/v1/telemetry/traces/abc", "HEAD", token=tok(scope="telemetry.read"))
    assert ok.status == 200


@pytest.mark.parametrize("method", ["GET", "POST", "DELETE"])
def test_exact_rule_covers_every_method(gw, tok, upstream, method):
    r = gw.request("/v1/telemetry/traces", method, token=tok(scope="read"))
    assert_forbidden(r, msg_scope("telemetry.read"))
    assert gw.request("/v1/telemetry/traces", method, token=tok(scope="telemetry.read")).status == 200


# -- path normalisation --------------------------------------------------------------------

# Each of these means /v1/admin/... to an upstream that normalises the path.
ADMIN_IN_DISGUISE = [
    "/v1/admin/../admin/x",
    "/v1/%61dmin/x",
    "/v1//admin/x",
    "/v1/x/%2e%2e/admin/x",
    "/v1/x/%2E%2E/admin/x",
    "/v1/x/%2E./admin/x",
    "/v1/x/.%2e/admin/x",
    "/v1/./admin/x",
    "/v1/admin/./x",
    "/v1/admin/x/..",                # -> /v1/admin/
    "/%76%31/%41dmin/../admin/x",
    "/v1/%2e%2e/v1/admin/x",
    "//v1/admin/x",
    "/v1/admin/x?a=b",
    "/v1/admin/x?",
    "/v1/admin///x",
]


@pytest.mark.parametrize("path", ADMIN_IN_DISGUISE)
def test_disguised_admin_paths_need_the_admin_scope(gw, tok, upstream, path):
    """The rule sees the normalised path: without `admin` the upstream never sees
    the request; with it, the request passes unchanged."""
    assert_forbidden(gw.get(path, token=tok(scope="read")), msg_scope("admin"))
    assert upstream.received() == []
    r = gw.get(path, token=tok(sub="root", scope="admin"))
    assert_passed(r, upstream, principal="root")


def test_disguised_template_path_needs_the_scope(gw, tok, upstream):
    for path in ("/v1/telemetry/traces/x/../abc", "/v1/telemetry//traces/abc",
                 "/v1/telemetry/%74races/abc", "/v1/telemetry/traces/./abc"):
        assert_forbidden(gw.get(path, token=tok(scope="read")), msg_scope("telemetry.read"))
    assert upstream.received() == []


def test_absolute_form_target_is_matched_on_its_path(gw, tok, upstream):
    """`GET http://host/v1/admin/x`: Envoy turns it into path /v1/admin/x."""
    status, body = raw_request(gw, b"http://gateway/v1/admin/x", token=tok(scope="read"))
    assert status == 403 and body == error_body(msg_scope("admin"), detail=True), body
    assert upstream.received() == []


BAD_PATHS = [
    "/v1/admin%2Fx", "/v1/admin%2fx", "/v1%2Fadmin/x", "/v1/admin%5Cx", "/v1/admin%5cx",
    "/v1\\admin/x", "/..", "/../v1/admin/x", "/v1/../..", "/v1/x/%2e%2e/%2e%2e/%2e%2e",
    "/v1//../admin/x", "/v1/admin/%00x", "/v1/admin/%1Fx", "/v1/admin/%7Fx",
    "/v1/admin/x%G1", "/v1/admin/x%4", "/v1/admin/x%",
]


@pytest.mark.parametrize("path", BAD_PATHS)
def test_unsafe_paths_are_400(gw, tok, upstream, path):
    """Paths that cannot be normalised safely: the filter's 400, with or without
    a token, whatever the token's scopes; never the upstream."""
    assert_bad_path(gw.get(path, token=tok(scope="admin telemetry.read")))
    assert_bad_path(gw.get(path))
    assert upstream.received() == []


@pytest.mark.parametrize("target", [b"/v1/admin/x#frag", b"/v1/\xc3\xa0dmin/x", b"/v1/admin/\x7f",
                                    b"/v1/admin/\x01x", b"/v1/ad min/x", b"*"],
                         ids=["fragment", "raw_non_ascii", "raw_del", "raw_control", "space", "asterisk"])
def test_paths_envoy_refuses_itself(gw, tok, upstream, target):
    """With the harness bootstrap Envoy's codec answers these 400 before the
    filter runs; the upstream never sees them."""
    status, _ = raw_request(gw, target, token=tok(scope="read"))
    assert status == 400
    assert upstream.received() == []


def test_query_string_is_ignored(gw, tok, upstream):
    """The query plays no part in matching and reaches the upstream intact."""
    assert_forbidden(gw.get("/v1/admin/x?a=b", token=tok(scope="read")), msg_scope("admin"))
    assert_forbidden(gw.get("/v1/admin/x?scope=admin&x=/v1/other", token=tok(scope="read")),
                     msg_scope("admin"))
    r = gw.request("/v1/models/x?_method=GET", "POST", token=tok(sub="bob"))
    assert_forbidden(r, MSG_ATTRIBUTES)
    assert upstream.received() == []
    # A query that looks like a path does not move the request under a rule,
    # nor out of a public path.
    r = gw.get("/v1/admin?/x", token=tok(scope="read"))
    assert r.status == 200 and r.json()["path"] == "/v1/admin?/x", r
    r = gw.get("/v1/health?next=/v1/admin/x")
    assert r.status == 200, r
    r = gw.get("/v1/admin/x?a=b&c=%2F", token=tok(sub="root", scope="admin"))
    assert r.status == 200 and r.json()["path"] == "/v1/admin/x?a=b&c=%2F", r


def test_bypass_attempts_with_envoy_normalising(module_idp, key, tok, upstream, tmp_path):
    """The same attempts behind Envoy's own `normalize_path` and `merge_slashes`
    (as `envoy/envoy.yaml` sets them): still denied, and what passes reaches
    the upstream normalised."""
    cfg = jwt_config(module_idp.port, public_paths=PUBLIC)
    cfg["route_scopes"] = RULES
    e = Envoy(cfg, upstream_port=upstream.port, clusters={"idp": module_idp.port}, workdir=tmp_path)
    boot = json.loads(e.config_path.read_text())
    hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["normalize_path"] = True
    hcm["merge_slashes"] = True
    e.config_path.write_text(json.dumps(boot))
    try:
        e.start()
        wait_until_serving(e, tok())
        upstream.reset_log()
        for path in ADMIN_IN_DISGUISE:
            r = e.get(path, token=tok(scope="read"))
            assert r.status == 403 and r.body == error_body(msg_scope("admin"), detail=True), (path, r)
        assert upstream.received() == []
        for path in ("/v1/admin/../admin/x", "/v1/%61dmin/x", "/v1//admin/x", "/v1/x/%2e%2e/admin/x"):
            r = e.get(path, token=tok(sub="root", scope="admin"))
            assert r.status == 200 and r.json()["path"] == "/v1/admin/x", (path, r)
        for path in ("/v1/admin%2Fx", "/v1/admin%5Cx"):
            r = e.get(path, token=tok(sub="root", scope="admin"))
            assert r.status == 400, (path, r)
        assert len(upstream.received()) == 4
    finally:
        e.stop()
        traps = e.traps()
        assert not traps, "VM trap:\n" + "\n".join(traps)


# -- rule order, and the Llama Stack configuration form ----------------------------------------

@pytest.fixture(scope="module")
def llama_gw(module_idp, module_envoy, key, tok):
    """Llama Stack's `provider_config` form; a narrower rule before a broader one."""
    module_idp.set_keys(key)
    cfg = jwt_config(module_idp.port, llama_form=True, public_paths=["/v1/health"])
    cfg["route_scopes"] = [
        {"path_prefix": "/v1/admin/reports/", "methods": ["get"], "required_scope": "reports.read"},
        {"path_prefix": "/v1/admin/", "required_scope": "admin"},
        {"path": "/v1/telemetry/traces", "required_scope": "telemetry.read"},
    ]
    e = module_envoy(cfg)
    wait_until_serving(e, tok())
    return e


def test_llama_stack_telemetry_example(llama_gw, module_idp, upstream):
    """Tokens from the IdP's token endpoint, as a Llama Stack client would get them."""
    def idp_token(scope: str) -> str:
        from harness.client import request
        r = request(module_idp.base_url, f"/token?sub=alice&scope={scope}&format=json")
        assert r.status == 200, r
        return r.json()["access_token"]

    r = llama_gw.get("/v1/telemetry/traces", token=idp_token("telemetry.read"))
    assert_passed(r, upstream, principal="alice")
    upstream.reset_log()
    r = llama_gw.get("/v1/telemetry/traces", token=idp_token("inference"))
    assert_forbidden(r, msg_scope("telemetry.read"))
    assert upstream.received() == []


def test_first_matching_rule_decides(llama_gw, tok, upstream):
    # The narrow rule matches: its scope is enough, and `admin` does not help.
    assert llama_gw.get("/v1/admin/reports/1", token=tok(scope="reports.read")).status == 200
    assert_forbidden(llama_gw.get("/v1/admin/reports/1", token=tok(scope="admin")), msg_scope("reports.read"))
    # Its method list is lower-case in the config and still matches GET.
    # For POST it does not match, so the broader rule decides.
    assert_forbidden(llama_gw.request("/v1/admin/reports/1", "POST", token=tok(scope="reports.read")),
                     msg_scope("admin"))
    assert llama_gw.request("/v1/admin/reports/1", "POST", token=tok(scope="admin")).status == 200
    assert_forbidden(llama_gw.get("/v1/admin/other", token=tok(scope="reports.read")), msg_scope("admin"))


# -- configuration errors -------------------------------------------------------------------------

GOOD_RULE = {"path_prefix": "/v1/admin/", "required_scope": "admin"}

CONFIG_ERRORS = {
    "rule_on_public_path": ([{"path": "/v1/health", "required_scope": "s"}], "route_scopes[0].path"),
    "rule_under_public_prefix": ([GOOD_RULE, {"path_prefix": "/public/docs/", "required_scope": "s"}],
                                 "route_scopes[1].path_prefix"),
    "empty_scope": ([GOOD_RULE, {"path": "/v1/x", "required_scope": ""}], "route_scopes[1].required_scope"),
    "empty_category_list": ([{"path_prefix": "/v1/models/", "required_attributes": {"roles": []}}],
                            "route_scopes[0].required_attributes.roles"),
    "bad_template_unbalanced": ([{"path": "/v1/traces/{trace_id", "required_scope": "s"}], "route_scopes[0].path"),
    "bad_template_partial_segment": ([{"path": "/v1/traces/t{id}", "required_scope": "s"}], "route_scopes[0].path"),
    "method_not_a_token": ([GOOD_RULE, {"path": "/v1/x", "methods": ["GET", "GE T"], "required_scope": "s"}],
                           "route_scopes[1].methods[1]"),
    "path_not_normalised": ([{"path_prefix": "/v1/../admin/", "required_scope": "s"}],
                            "route_scopes[0].path_prefix"),
    "no_requirement": ([{"path": "/v1/x"}], "route_scopes[0]"),
}


@pytest.mark.parametrize("case", list(CONFIG_ERRORS))
def test_bad_rule_refused(expect_config_rejected, idp, case):
    """Envoy refuses to start; the filter's log line names the offending key."""
    rules, key = CONFIG_ERRORS[case]
    cfg = jwt_config(idp.port, public_paths=PUBLIC)
    cfg["route_scopes"] = rules
    log = expect_config_rejected(cfg)
    lines = [line for line in log.splitlines() if "wasm log" in line and "refused its configuration" in line]
    assert any(f"configuration key `{key}`:" in line for line in lines), log


def test_rules_without_auth_refused(expect_config_rejected):
    log = expect_config_rejected({"route_scopes": [GOOD_RULE]}, clusters={})
    assert any("configuration key `route_scopes`:" in line and "wasm log" in line
               for line in log.splitlines()), log
