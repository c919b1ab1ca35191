"""End-to-end tests of the callout providers through a real Envoy:
`oauth2_token` with RFC 7662 `introspection`, and `custom` (Llama Stack's
custom authentication endpoint). The endpoints are scripted per token on
harness IdPs: `idp` serves /introspect, a second instance (`authsvc`) serves
/validate."""

from __future__ import annotations

import base64
import json
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import parse_qs, unquote_plus

import pytest

from harness.config import ISSUER, OMIT
from harness.envoy import Envoy
from harness.idp import IdP
from harness.providers import (CLIENT_ID, CLIENT_SECRET, Scripted, assert_denied, custom_config,
                               form_token, forwarded, free_port, identity, introspection_config,
                               json_api_key, new_token, sequence)
from harness.server import Reply

API = "/v1/models"
INVALID = 'Bearer error="invalid_token"'
MSG_NOT_ACTIVE = "Token not active"
MSG_INTROSPECTION_ERROR = "Token introspection error"
MSG_UNAVAILABLE = "Authentication service unavailable"
MSG_TIMEOUT = "Authentication service timeout"
MSG_BAD_FORMAT = "Invalid authentication response format"
MSG_OAUTH_REQUIRED = "Authentication required. Please provide a valid OAuth2 Bearer token"

# The filter's own log lines at every level, while Envoy's other loggers stay at info.
TRACE = {"extra_args": ("--component-log-level", "wasm:trace")}

# Everything secret this module sends, and every Envoy it starts: the last
# test checks that none of it reached a log.
_TOKENS: list[str] = []
_ENVOYS: list[Envoy] = []


def token(label: str = "tok") -> str:
    t = new_token(label)
    _TOKENS.append(t)
    return t


def started(e: Envoy) -> Envoy:
    _ENVOYS.append(e)
    return e


def active(sub: str | None = "alice", **fields) -> Reply:
    """A 200 introspection answer for an active token (exp in an hour)."""
    doc = {"active": True, "exp": int(time.time()) + 3600, **fields}
    if sub is not None:
        doc["sub"] = sub
    return Reply(200, doc)


INACTIVE = Reply(200, {"active": False})


def wait_until(predicate, timeout: float, pause: float = 0.2, what: str = "condition"):
    """Polls `predicate()` until it returns something true; returns it and the
    seconds it took."""
    start = time.monotonic()
    while True:
        got = predicate()
        if got:
            return got, time.monotonic() - start
        if time.monotonic() - start > timeout:
            pytest.fail(f"{what} not reached within {timeout}s")
        time.sleep(pause)


# -- fixtures -------------------------------------------------------------------

@pytest.fixture(scope="module")
def introspector(module_idp) -> Scripted:
    """The module IdP's /introspect, scripted per token (default: inactive)."""
    s = Scripted(form_token, INACTIVE)
    module_idp.route("/introspect", s)
    return s


@pytest.fixture(scope="module")
def igw(module_idp, module_envoy, introspector) -> Envoy:
    """The contract's introspection configuration, one worker (exact call counts)."""
    return started(module_envoy(introspection_config(module_idp.port, log_level="trace"),
                                concurrency=1, **TRACE))


@pytest.fixture(scope="module")
def module_authsvc():
    """A second IdP instance: the custom endpoint's service."""
    with IdP() as server:
        yield server


@pytest.fixture(scope="module")
def validator(module_authsvc) -> Scripted:
    """The module authsvc's /validate, scripted per token (default: 401)."""
    s = Scripted(json_api_key, Reply(401, {"detail": "unknown key"}))
    module_authsvc.route("/validate", s)
    return s


@pytest.fixture(scope="module")
def cgw(module_authsvc, module_envoy, validator) -> Envoy:
    """The contract's custom configuration, two workers."""
    return started(module_envoy(custom_config(module_authsvc.port, log_level="trace"),
                                clusters={"authsvc": module_authsvc.port}, concurrency=2, **TRACE))


@pytest.fixture
def authsvc():
    """A fresh custom-endpoint service for this test."""
    with IdP() as server:
        yield server


def scripted_idp(idp: IdP) -> Scripted:
    s = Scripted(form_token, INACTIVE)
    idp.route("/introspect", s)
    return s


def scripted_authsvc(svc: IdP) -> Scripted:
    s = Scripted(json_api_key, Reply(401, {"detail": "unknown key"}))
    svc.route("/validate", s)
    return s


# -- introspection: answers --------------------------------------------------------

def _big_answer():
    return Reply(200, {"active": True, "sub": "alice", "pad": "x" * (1024 * 1024 + 1000)})


INTROSPECTION_ALLOWED = {
    "sub_with_scope_and_groups": (
        lambda: active("alice", username="al", scope="read write", groups=["g1", "g2"]),
        "alice", {"roles": ["alice"], "scopes": ["read", "write"], "teams": ["g1", "g2"]}),
    "username_when_no_sub": (
        lambda: active(None, username="bob", scope="read"), "bob", {"scopes": ["read"]}),
    "no_exp": (lambda: Reply(200, {"active": True, "sub": "carol"}), "carol", {"roles": ["carol"]}),
}


@pytest.mark.parametrize("case", list(INTROSPECTION_ALLOWED))
def test_introspection_active_token_passes(igw, introspector, upstream, case):
    """`active: true`: allowed; principal = sub, else username; claims_mapping
    applied to the answer (`scope` string split into scopes)."""
    reply, principal, attributes = INTROSPECTION_ALLOWED[case]
    t = introspector.answer(token(), reply())
    r = igw.get(API, token=t)
    assert identity(r) == (principal, attributes)
    assert forwarded(r)["authorization"] == f"Bearer {t}"
    assert upstream.count(API) == 1
    assert introspector.calls(t) == 1


INTROSPECTION_DENIED = {
    "active_false": (lambda: Reply(200, {"active": False, "sub": "alice"}), 401, MSG_NOT_ACTIVE),
    "active_missing": (lambda: Reply(200, {"sub": "alice", "scope": "read"}), 401, MSG_NOT_ACTIVE),
    "active_string_true": (lambda: Reply(200, {"active": "true", "sub": "alice"}), 401, MSG_NOT_ACTIVE),
    "exp_past": (lambda: active("alice", exp=int(time.time()) - 3600), 401, MSG_NOT_ACTIVE),
    "not_json": (lambda: Reply(200, "this is not json {", {"content-type": "application/json"}),
                 401, MSG_INTROSPECTION_ERROR),
    "empty_body": (lambda: Reply(200, b"", {"content-type": "application/json"}), 401,
                   MSG_INTROSPECTION_ERROR),
    "json_array": (lambda: Reply(200, [{"active": True, "sub": "alice"}]), 401, MSG_INTROSPECTION_ERROR),
    "no_principal": (lambda: active(None, scope="read"), 401, MSG_INTROSPECTION_ERROR),
    "principal_with_crlf": (lambda: active("alice\r\nx-admin: 1"), 401, MSG_INTROSPECTION_ERROR),
    **{f"status_{s}": (lambda s=s: Reply(s, {"error": "x"}), 401, f"Token introspection failed: {s}")
       for s in (201, 301, 400, 401, 403, 404, 429)},
    "status_204": (lambda: Reply(204), 401, "Token introspection failed: 204"),
    **{f"status_{s}": (lambda s=s: Reply(s, {"active": True, "sub": "alice"}), 503, MSG_UNAVAILABLE)
       for s in (500, 502, 503, 504)},
    "no_answer": (lambda: Reply(drop=True), 503, MSG_UNAVAILABLE),
    "answer_over_1MiB": (_big_answer, 503, MSG_UNAVAILABLE),
}


@pytest.mark.parametrize("case", list(INTROSPECTION_DENIED))
def test_introspection_denied(igw, introspector, upstream, case):
    """Each answer gives its exact status and message; 401s carry the
    invalid_token challenge; nothing reaches the upstream."""
    reply, status, message = INTROSPECTION_DENIED[case]
    t = introspector.answer(token(), reply())
    r = igw.get(API, token=t)
    assert_denied(r, status, message, INVALID if status == 401 else None)
    if status == 503:
        assert "www-authenticate" not in r.headers, r
    assert t not in r.text
    assert upstream.received() == []
    assert introspector.calls(t) == 1


def test_introspection_missing_header(igw, introspector, upstream):
    r = igw.get(API)
    assert_denied(r, 401, f"{MSG_OAUTH_REQUIRED} from {ISSUER}", "Bearer")
    assert upstream.received() == []


def test_introspection_public_path_needs_no_callout(igw, module_idp):
    before = module_idp.count("/introspect")
    assert igw.get("/v1/health").status == 200
    assert module_idp.count("/introspect") == before


# -- introspection: the request the endpoint receives ------------------------------

def test_introspection_request_is_a_form_post_with_basic_credentials(igw, introspector, module_idp):
    """POST, application/x-www-form-urlencoded, exactly `token=<token>` properly
    encoded (the token holds `+ / = & % ~` and a space), client credentials in
    HTTP Basic."""
    t = token("a+b c/d=e&f%41~!*'()")
    introspector.answer(t, active("alice"))
    assert identity(igw.get(API, token=t))[0] == "alice"
    [req] = introspector.requests(t)
    assert req.method == "POST"
    assert req.route == "/introspect"
    assert req.headers["content-type"].split(";")[0].strip() == "application/x-www-form-urlencoded"
    body = req.body.decode("ascii")
    assert parse_qs(body, keep_blank_values=True, strict_parsing=True) == {"token": [t]}, body
    expected = base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
    assert req.headers["authorization"] == f"Basic {expected}"
    assert [n for n, _ in req.header_list].count("authorization") == 1


def test_introspection_credentials_in_body(envoy, idp):
    """`send_secret_in_body`: client_id and client_secret as form fields, no Basic."""
    s = scripted_idp(idp)
    gw = started(envoy(introspection_config(idp.port, introspection={"send_secret_in_body": True},
                                            log_level="trace"), concurrency=1, **TRACE))
    t = s.answer(token("x/y+z="), active("alice"))
    assert identity(gw.get(API, token=t))[0] == "alice"
    [req] = s.requests(t)
    assert req.method == "POST"
    assert req.headers["content-type"].split(";")[0].strip() == "application/x-www-form-urlencoded"
    form = parse_qs(req.body.decode("ascii"), keep_blank_values=True, strict_parsing=True)
    assert form == {"token": [t], "client_id": [CLIENT_ID], "client_secret": [CLIENT_SECRET]}
    assert "authorization" not in req.headers


def test_introspection_basic_credentials_are_form_encoded(envoy, idp):
    """RFC 6749 §2.3.1: client id and secret are form-encoded before Basic, so
    a `:` in the id cannot be confused with the separator."""
    client_id, secret = "gw:special", "s3 cr+t&%/~"
    s = scripted_idp(idp)
    gw = started(envoy(introspection_config(idp.port, introspection={
        "client_id": client_id, "client_secret": secret}), concurrency=1))
    t = s.answer(token(), active("alice"))
    assert gw.get(API, token=t).status == 200
    [req] = s.requests(t)
    scheme, _, value = req.headers["authorization"].partition(" ")
    assert scheme == "Basic"
    user, sep, password = base64.b64decode(value, validate=True).decode("ascii").partition(":")
    assert sep and (unquote_plus(user), unquote_plus(password)) == (client_id, secret)


# -- custom: answers ------------------------------------------------------------------

CUSTOM_ALLOWED = {
    "attributes": (
        {"principal": "alice", "attributes": {"roles": ["admin", "user"], "teams": ["ml"]},
         "message": "ok"},
        "alice", {"roles": ["admin", "user"], "teams": ["ml"]}),
    "access_attributes": (
        {"principal": "bob", "access_attributes": {"namespaces": ["n1"]}},
        "bob", {"namespaces": ["n1"]}),
    "no_attributes": ({"principal": "carol"}, "carol", {"roles": ["carol"]}),
    "message_only": ({"principal": "dave", "message": "welcome"}, "dave", {"roles": ["dave"]}),
}


@pytest.mark.parametrize("case", list(CUSTOM_ALLOWED))
def test_custom_allowed(cgw, validator, upstream, case):
    body, principal, attributes = CUSTOM_ALLOWED[case]
    t = validator.answer(token(), Reply(200, body))
    r = cgw.get(API, token=t)
    assert identity(r) == (principal, attributes)
    assert upstream.count(API) == 1
    assert validator.calls(t) == 1


CUSTOM_DENIED = {
    **{f"status_{s}": (Reply(s, {"detail": "no"}), 401, f"Authentication failed: {s}")
       for s in (201, 400, 401, 403, 404, 429)},
    **{f"status_{s}": (Reply(s, {"principal": "alice"}), 503, MSG_UNAVAILABLE)
       for s in (500, 502, 503, 504)},
    "not_json": (Reply(200, "<html>ok</html>", {"content-type": "text/html"}), 401, MSG_BAD_FORMAT),
    "no_principal": (Reply(200, {"attributes": {"roles": ["admin"]}}), 401, MSG_BAD_FORMAT),
    "empty_principal": (Reply(200, {"principal": ""}), 401, MSG_BAD_FORMAT),
    "principal_not_a_string": (Reply(200, {"principal": ["alice"]}), 401, MSG_BAD_FORMAT),
    "principal_with_crlf": (Reply(200, {"principal": "alice\r\nx-admin: 1"}), 401, MSG_BAD_FORMAT),
    "no_answer": (Reply(drop=True), 503, MSG_UNAVAILABLE),
}


@pytest.mark.parametrize("case", list(CUSTOM_DENIED))
def test_custom_denied(cgw, validator, upstream, case):
    reply, status, message = CUSTOM_DENIED[case]
    t = validator.answer(token(), reply)
    r = cgw.get(API, token=t)
    assert_denied(r, status, message, INVALID if status == 401 else None)
    assert t not in r.text
    assert upstream.received() == []
    assert validator.calls(t) == 1


def test_custom_missing_header(cgw, module_authsvc, upstream):
    r = cgw.get(API)
    assert_denied(r, 401, "Authentication required. Please provide your API key as a Bearer token "
                          f"(validated by 127.0.0.1:{module_authsvc.port})", "Bearer")
    assert upstream.received() == []


# -- custom: the request the endpoint receives ------------------------------------------

CUSTOM_PATH = "/v1/models/llama-3?limit=10&tag=x&tag=y%2Fz&q=a+b%20c&name=%E2%82%AC&tag=w"
CUSTOM_HEADERS = {
    "X-Trace-Id": "Abc-123",
    "Content-Type": "application/json",
    "User-Agent": "tollgate-e2e/1",
    "X-Auth-Principal": "root",  # spoofed: removed before anything sees it
    "X-Auth-Attributes": '{"roles":["admin"]}',
}
# Headers the router adds on the way to the upstream, and tollgate's own.
_ADDED_AFTER = {"x-auth-principal", "x-auth-attributes", "x-envoy-expected-rq-timeout-ms"}


def _custom_call(cgw, validator, t):
    validator.answer(t, Reply(200, {"principal": "alice"}))
    r = cgw.get(CUSTOM_PATH, token=t, headers=CUSTOM_HEADERS)
    [req] = validator.requests(t)
    return r, req


def test_custom_request_json(cgw, validator):
    """POST application/json `{"api_key", "request": {"path", "headers", "params"}}`:
    path without the query; headers lower-case, without authorization, pseudo-
    headers or spoofed identity headers; params percent-decoded lists with repeats."""
    t = token("k+y/=")
    r, req = _custom_call(cgw, validator, t)
    assert identity(r) == ("alice", {"roles": ["alice"]})
    assert req.method == "POST"
    assert req.route == "/validate"
    assert req.headers["content-type"].split(";")[0].strip() == "application/json"
    doc = json.loads(req.body)
    assert set(doc) == {"api_key", "request"}
    assert doc["api_key"] == t
    assert set(doc["request"]) == {"path", "headers", "params"}
    assert doc["request"]["path"] == "/v1/models/llama-3"
    assert doc["request"]["params"] == {"limit": ["10"], "tag": ["x", "y/z", "w"],
                                        "q": ["a b c"], "name": ["\u20ac"]}
    headers = doc["request"]["headers"]
    assert all(isinstance(v, str) for v in headers.values()), headers
    assert all(k == k.lower() and not k.startswith(":") for k in headers), headers
    assert "authorization" not in headers
    assert "x-auth-principal" not in headers and "x-auth-attributes" not in headers
    assert headers["x-trace-id"] == "Abc-123"
    assert headers["content-type"] == "application/json"
    assert headers["user-agent"] == "tollgate-e2e/1"
    # The same request headers the upstream got (less what was added after tollgate).
    up = forwarded(r)
    assert "bearer" not in json.dumps(headers).lower()
    for k, v in headers.items():
        assert up.get(k) == v, (k, v, up)
    missing = set(up) - set(headers) - _ADDED_AFTER - {"authorization", "host"}
    assert not missing, (missing, headers)


def test_custom_request_headers_include_host(cgw, validator):
    """The client's Host header is a request header (Llama Stack's custom
    provider sees it); Envoy turns it into `:authority`, which must not make it
    vanish from `request.headers`."""
    t = token()
    r, req = _custom_call(cgw, validator, t)
    headers = json.loads(req.body)["request"]["headers"]
    assert headers.get("host") == f"127.0.0.1:{cgw.port}" == forwarded(r)["host"], headers


# -- decision cache ----------------------------------------------------------------------

def test_introspection_cache_one_call_for_sequential_requests(igw, introspector):
    t = introspector.answer(token(), active("alice"))
    statuses = [igw.get(API, token=t).status for _ in range(20)]
    assert statuses == [200] * 20
    assert introspector.calls(t) == 1


def test_custom_cache_per_worker_and_per_path(cgw, validator):
    """Each worker caches on its own (≤ 2 calls at concurrency 2); the key is
    token and path, so another path is another call."""
    t = validator.answer(token(), Reply(200, {"principal": "alice"}))
    assert [cgw.get(API, token=t).status for _ in range(20)] == [200] * 20
    assert 1 <= validator.calls(t) <= 2
    assert [cgw.get("/v1/files", token=t).status for _ in range(10)] == [200] * 10
    paths = [json.loads(r.body)["request"]["path"] for r in validator.requests(t)]
    assert 1 <= paths.count(API) <= 2 and 1 <= paths.count("/v1/files") <= 2, paths


def test_introspection_cache_expires_after_ttl(envoy, idp):
    s = scripted_idp(idp)
    gw = started(envoy(introspection_config(idp.port, cache_ttl=2), concurrency=1))
    t = s.answer(token(), active("alice"))
    start = time.monotonic()
    assert gw.get(API, token=t).status == 200
    assert gw.get(API, token=t).status == 200
    assert s.calls(t) == 1

    def refetched():
        assert gw.get(API, token=t).status == 200
        return s.calls(t) >= 2

    wait_until(refetched, timeout=8, pause=0.2, what="a second introspection call")
    took = time.monotonic() - start
    assert 1.0 <= took <= 6.0, f"cached answer reused for {took:.1f}s with cache_ttl 2"
    assert s.calls(t) == 2


def test_introspection_cache_ttl_zero_calls_every_time(envoy, idp):
    """cache_ttl 0: a call per request. (Also: without `issuer`, the
    missing-header message has no ` from <issuer>`.)"""
    s = scripted_idp(idp)
    gw = started(envoy(introspection_config(idp.port, cache_ttl=0, issuer=OMIT), concurrency=1))
    t = s.answer(token(), active("alice"))
    assert [gw.get(API, token=t).status for _ in range(5)] == [200] * 5
    assert s.calls(t) == 5
    assert_denied(gw.get(API), 401, MSG_OAUTH_REQUIRED, "Bearer")


def test_custom_cache_ttl_zero_calls_every_time(envoy, authsvc):
    s = scripted_authsvc(authsvc)
    gw = started(envoy(custom_config(authsvc.port, cache_ttl=0), clusters={"authsvc": authsvc.port},
                       concurrency=1))
    t = s.answer(token(), Reply(200, {"principal": "alice"}))
    assert [gw.get(API, token=t).status for _ in range(5)] == [200] * 5
    assert s.calls(t) == 5


def test_introspection_exp_bounds_the_cache(envoy, idp):
    """cache_ttl 30 but the answer's exp is 3 s away (no clock skew): the answer
    is not reused past exp, and the next answer (same exp) is refused."""
    s = scripted_idp(idp)
    gw = started(envoy(introspection_config(idp.port, cache_ttl=30, clock_skew_seconds=0),
                       concurrency=1))
    exp = int(time.time()) + 3
    t = s.answer(token(), Reply(200, {"active": True, "sub": "alice", "exp": exp}))
    assert gw.get(API, token=t).status == 200
    last = {}

    def refused():
        last["r"] = gw.get(API, token=t)
        return last["r"].status != 200

    _, took = wait_until(refused, timeout=12, what="the end of the cached answer")
    assert took < 9, took
    assert_denied(last["r"], 401, MSG_NOT_ACTIVE, INVALID)
    assert s.calls(t) == 2
    assert time.time() >= exp


def test_introspection_errors_not_cached(igw, introspector):
    """A 503 then a 200: the second request passes."""
    t = introspector.answer(token(), sequence(Reply(503, "busy"), active("alice")))
    assert_denied(igw.get(API, token=t), 503, MSG_UNAVAILABLE)
    assert identity(igw.get(API, token=t))[0] == "alice"
    assert introspector.calls(t) == 2


def test_introspection_no_answer_not_cached(igw, introspector):
    t = introspector.answer(token(), sequence(Reply(drop=True), active("alice")))
    assert_denied(igw.get(API, token=t), 503, MSG_UNAVAILABLE)
    assert igw.get(API, token=t).status == 200
    assert introspector.calls(t) == 2


def test_custom_errors_not_cached(cgw, validator):
    """An error answer (500, garbage, 404) is not remembered: the next request
    for the same token asks again and passes."""
    for first, status, message in [(Reply(500, "oops"), 503, MSG_UNAVAILABLE),
                                   (Reply(200, "garbage"), 401, MSG_BAD_FORMAT),
                                   (Reply(404, "no"), 401, "Authentication failed: 404")]:
        t = validator.answer(token(), sequence(first, Reply(200, {"principal": "alice"})))
        assert_denied(cgw.get(API, token=t), status, message)
        assert identity(cgw.get(API, token=t))[0] == "alice", message
        assert validator.calls(t) == 2, message


def test_introspection_negative_answer_cached_briefly(igw, introspector):
    """"Token not active" is remembered (no second call right away), but for
    at most 5 s: once the IdP says active, the token passes."""
    t = introspector.answer(token(), INACTIVE)
    assert_denied(igw.get(API, token=t), 401, MSG_NOT_ACTIVE, INVALID)
    assert_denied(igw.get(API, token=t), 401, MSG_NOT_ACTIVE, INVALID)
    assert introspector.calls(t) == 1
    introspector.answer(t, active("alice"))
    _, took = wait_until(lambda: igw.get(API, token=t).status == 200, timeout=10, pause=0.25,
                         what="the token passing once active")
    assert took <= 7.5, f"negative answer remembered for {took:.1f}s"
    assert introspector.calls(t) == 2


def test_custom_401_403_cached_briefly_404_not(cgw, validator):
    """Custom 401/403 are definite answers (remembered briefly: ≤ 2 calls for 6
    requests at concurrency 2); a 404 is asked again every time."""
    for status, bound in [(401, 2), (403, 2), (404, 6)]:
        t = validator.answer(token(), Reply(status, {"detail": "no"}))
        for _ in range(6):
            assert_denied(cgw.get(API, token=t), 401, f"Authentication failed: {status}", INVALID)
        if bound == 6:
            assert validator.calls(t) == 6
        else:
            assert 1 <= validator.calls(t) <= bound


def test_introspection_concurrent_requests_share_one_callout(igw, introspector):
    t = introspector.answer(token(), Reply(200, {"active": True, "sub": "alice"}, delay=1.0))
    with ThreadPoolExecutor(10) as pool:
        results = list(pool.map(lambda _: igw.get(API, token=t, timeout=20), range(10)))
    assert [r.status for r in results] == [200] * 10, results
    assert all(identity(r)[0] == "alice" for r in results)
    assert introspector.calls(t) == 1


def test_introspection_concurrent_denials_share_one_callout(igw, introspector, upstream):
    t = introspector.answer(token(), Reply(200, {"active": False}, delay=1.0))
    with ThreadPoolExecutor(10) as pool:
        results = list(pool.map(lambda _: igw.get(API, token=t, timeout=20), range(10)))
    for r in results:
        assert_denied(r, 401, MSG_NOT_ACTIVE, INVALID)
    assert introspector.calls(t) == 1
    assert upstream.received() == []


def test_custom_concurrent_requests_share_one_callout_per_worker(cgw, validator):
    t = validator.answer(token(), Reply(200, {"principal": "alice"}, delay=1.0))
    with ThreadPoolExecutor(10) as pool:
        statuses = list(pool.map(lambda _: cgw.get(API, token=t, timeout=20).status, range(10)))
    assert statuses == [200] * 10
    assert 1 <= validator.calls(t) <= 2


def test_introspection_request_paused_until_answer(igw, introspector, upstream):
    """The request (and its body) waits for the answer: a refused token's body
    never reaches the upstream; an allowed one arrives whole."""
    body = b"0123456789" * 20_000
    bad = introspector.answer(token(), Reply(200, {"active": False}, delay=0.5))
    assert_denied(igw.request(API, "POST", token=bad, body=body), 401, MSG_NOT_ACTIVE, INVALID)
    assert upstream.received() == []
    good = introspector.answer(token(), Reply(200, {"active": True, "sub": "alice"}, delay=0.5))
    r = igw.request(API, "POST", token=good, body=body)
    assert r.status == 200 and r.json()["body"] == body.decode()
    assert upstream.count(API) == 1


# -- failures of the endpoint ------------------------------------------------------------

def test_introspection_timeout(envoy, idp):
    """No answer within timeout_ms 500: 503 timeout within about a second; not
    cached, so the next request (answered fast) passes."""
    s = scripted_idp(idp)
    gw = started(envoy(introspection_config(idp.port, introspection={"timeout_ms": 500}),
                       concurrency=1))
    t = s.answer(token(), Reply(200, {"active": True, "sub": "alice"}, delay=4))
    start = time.monotonic()
    r = gw.get(API, token=t)
    took = time.monotonic() - start
    assert_denied(r, 503, MSG_TIMEOUT)
    assert 0.4 <= took < 2.5, took
    s.answer(t, active("alice"))
    assert identity(gw.get(API, token=t))[0] == "alice"
    assert s.calls(t) == 2


def test_custom_timeout(envoy, authsvc):
    s = scripted_authsvc(authsvc)
    gw = started(envoy(custom_config(authsvc.port, timeout_ms=500), clusters={"authsvc": authsvc.port},
                       concurrency=1))
    t = s.answer(token(), Reply(200, {"principal": "alice"}, delay=4))
    start = time.monotonic()
    r = gw.get(API, token=t)
    took = time.monotonic() - start
    assert_denied(r, 503, MSG_TIMEOUT)
    assert 0.4 <= took < 2.5, took
    s.answer(t, Reply(200, {"principal": "alice"}))
    assert identity(gw.get(API, token=t))[0] == "alice"
    assert s.calls(t) == 2


def test_introspection_connection_refused(envoy, idp, upstream):
    port = free_port()
    gw = started(envoy(introspection_config(port), clusters={"idp": port}, concurrency=1))
    t = token()
    for _ in range(2):
        assert_denied(gw.get(API, token=t), 503, MSG_UNAVAILABLE)
    assert upstream.received() == []


def test_custom_connection_refused(envoy, upstream):
    port = free_port()
    gw = started(envoy(custom_config(port), clusters={"authsvc": port}, concurrency=1))
    t = token()
    for _ in range(2):
        assert_denied(gw.get(API, token=t), 503, MSG_UNAVAILABLE)
    assert upstream.received() == []


def test_introspection_cluster_missing(envoy, idp, upstream):
    """No `idp` cluster in Envoy: 503, never a trap; public paths still work."""
    scripted_idp(idp)
    gw = started(envoy(introspection_config(idp.port), clusters={}, concurrency=1))
    t = token()
    for _ in range(2):
        assert_denied(gw.get(API, token=t), 503, MSG_UNAVAILABLE)
    assert upstream.received() == []
    assert idp.received() == []
    assert gw.get("/v1/health").status == 200


def test_custom_cluster_missing(envoy, authsvc, upstream):
    scripted_authsvc(authsvc)
    gw = started(envoy(custom_config(authsvc.port), clusters={}, concurrency=1))
    t = token()
    for _ in range(2):
        assert_denied(gw.get(API, token=t), 503, MSG_UNAVAILABLE)
    assert upstream.received() == []
    assert authsvc.received() == []


# -- logs (keep last: it reads the logs of every Envoy this module started) ---------------

def test_no_secret_or_token_in_envoy_logs(igw, cgw):
    """Neither the client secret (nor its Basic form) nor any token used in this
    module appears in any Envoy log, the filter logging at trace level."""
    time.sleep(0.3)  # --file-flush-interval-msec 100
    basic = base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
    assert len(_ENVOYS) >= 2
    for e in _ENVOYS:
        text = e.log_text() + e.access_log_text()
        assert text, e.workdir
        for secret in [CLIENT_SECRET, basic, *_TOKENS]:
            assert secret not in text, f"{secret!r} in {e.workdir}"
