"""End-to-end tests of the oauth2_token (JWT/JWKS) provider through a real Envoy."""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from harness import tokens
from harness.config import ISSUER, OMIT, jwt_config
from harness.providers import assert_bearer_denied as assert_denied
from harness.providers import forwarded

MSG_REQUIRED = f"Authentication required. Please provide a valid OAuth2 Bearer token from {ISSUER}"
MSG_FORMAT = "Invalid Authorization header format"
MSG_INVALID = "Invalid JWT token"
MSG_UNAVAILABLE = "Authentication service unavailable"
MSG_TIMEOUT = "Authentication service timeout"

ALGS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA"]
API = "/v1/models"


def make_key(alg: str, kid: str | None = None) -> tokens.SigningKey:
    kid = kid or f"{alg.lower()}-1"
    if alg == "EdDSA":
        return tokens.ed25519_key(kid)
    if alg.startswith("ES"):
        return tokens.ec_key(kid, alg)
    return tokens.rsa_key(kid, alg)


def wait_for_streak(gw, token: str, streak: int = 10, timeout: float = 15.0, pause: float = 0.2):
    """Sends requests until `streak` in a row pass; returns the seconds it took
    (or fails with the last answer)."""
    start = time.monotonic()
    ok, last = 0, None
    while time.monotonic() - start < timeout:
        last = gw.get(API, token=token)
        ok = ok + 1 if last.status == 200 else 0
        if ok >= streak:
            return time.monotonic() - start
        if last.status != 200:
            time.sleep(pause)
    pytest.fail(f"no {streak} passing requests in a row within {timeout}s; last: {last!r}")


# -- shared gateway -----------------------------------------------------------

@pytest.fixture(scope="module")
def keys() -> dict[str, tokens.SigningKey]:
    """One served key per algorithm."""
    return {alg: make_key(alg) for alg in ALGS}


@pytest.fixture(scope="module")
def rsa(keys) -> tokens.SigningKey:
    return keys["RS256"]


@pytest.fixture(scope="module")
def gw(module_idp, module_envoy, keys):
    """An Envoy with the contract's configuration and public paths
    `/v1/health` (exact) and `/public/*` (prefix)."""
    module_idp.set_keys(*keys.values())
    return module_envoy(jwt_config(module_idp.port, public_paths=["/v1/health", "/public/*"]))


# -- valid tokens ---------------------------------------------------------------

@pytest.mark.parametrize("alg", ALGS)
def test_valid_token_passes_with_forwarded_identity(gw, keys, alg, upstream):
    """A valid token reaches the upstream with principal and attributes headers."""
    token = keys[alg].sign(tokens.claims(sub="alice", groups=["g1"], scope="read write"))
    r = gw.get(API, token=token)
    h = forwarded(r)
    assert h["x-auth-principal"] == "alice"
    assert json.loads(h["x-auth-attributes"]) == {
        "roles": ["alice"], "scopes": ["read", "write"], "teams": ["g1"]}
    assert h["authorization"] == f"Bearer {token}"
    assert upstream.count(API) == 1


@pytest.mark.parametrize("alg", ALGS)
@pytest.mark.parametrize("typ", ["at+jwt", "JOSE", "application/custom"])
def test_typ_is_informational_for_every_algorithm(gw, keys, alg, typ):
    """Any string `typ` passes, whatever the algorithm (as in jwt_authn and
    PyJWT); a non-string one is a malformed token."""
    token = keys[alg].sign(tokens.claims(), headers={"typ": typ})
    assert forwarded(gw.get(API, token=token))["x-auth-principal"] == "alice"
    if typ == "JOSE":
        bad = keys[alg].sign(tokens.claims(), headers={"typ": 7})
        assert_denied(gw.get(API, token=bad), 401, MSG_INVALID, token_presented=True)


def test_audience_list_intersecting_passes(gw, rsa):
    token = rsa.sign(tokens.claims(aud=["other", "llama-stack"]))
    assert forwarded(gw.get(API, token=token))["x-auth-principal"] == "alice"


def test_expired_within_clock_skew_passes(gw, rsa):
    """exp 30 s ago is still inside the 60 s skew."""
    now = int(time.time())
    token = rsa.sign(tokens.claims(now=now - 300, lifetime=270))
    assert gw.get(API, token=token).status == 200


def test_nbf_within_clock_skew_passes(gw, rsa):
    token = rsa.sign(tokens.claims(nbf=int(time.time()) + 30))
    assert gw.get(API, token=token).status == 200


# -- rejected tokens --------------------------------------------------------------

def _expired(k):
    return k["RS256"].sign(tokens.claims(now=int(time.time()) - 600, lifetime=300))


REJECTED = {
    "expired": _expired,
    "not_yet_valid": lambda k: k["RS256"].sign(tokens.claims(nbf=int(time.time()) + 300)),
    "wrong_audience": lambda k: k["RS256"].sign(tokens.claims(aud="someone-else")),
    "wrong_audience_list": lambda k: k["RS256"].sign(tokens.claims(aud=["a", "b"])),
    "no_audience": lambda k: k["RS256"].sign(tokens.claims(aud=None)),
    "wrong_issuer": lambda k: k["RS256"].sign(tokens.claims(iss="https://evil.example")),
    "no_exp": lambda k: k["RS256"].sign(tokens.claims(exp=None)),
    "no_sub": lambda k: k["RS256"].sign(tokens.claims(sub=None)),
    "unknown_kid": lambda k: make_key("RS256", "not-served").sign(tokens.claims()),
    "signed_by_other_key_same_kid": lambda k: make_key("RS256", "rs256-1").sign(tokens.claims()),
    "tampered_signature": lambda k: tokens.tamper(k["RS256"].sign(tokens.claims())),
    "tampered_claims": lambda k: tokens.tamper_payload(k["ES256"].sign(tokens.claims()), sub="root"),
    "alg_none": lambda k: tokens.alg_none(tokens.claims()),
    "alg_none_with_kid": lambda k: tokens.alg_none(tokens.claims(), kid="rs256-1"),
    "hs256_with_rsa_public_key": lambda k: tokens.hs256_with_public_key(tokens.claims(), k["RS256"]),
    "alg_differs_from_jwk": lambda k: k["RS256"].sign(tokens.claims(), alg="RS512"),
    "ec_token_with_rsa_kid": lambda k: k["ES256"].sign(tokens.claims(), kid="rs256-1"),
    "garbage": lambda k: "not-a-jwt",
    "garbage_three_parts": lambda k: "aaa.bbb.ccc",
}


@pytest.mark.parametrize("case", list(REJECTED))
def test_rejected_token(gw, keys, case, upstream):
    """Every bad token gets the same 401, and nothing reaches the upstream."""
    token = REJECTED[case](keys)
    r = gw.get(API, token=token)
    assert_denied(r, 401, MSG_INVALID, token_presented=True)
    assert token not in r.text
    assert upstream.received() == []


@pytest.mark.parametrize("value", ["Bearer ", "Bearer", "bearer   "])
def test_empty_token(gw, upstream, value):
    """`Bearer` with no token is not `Bearer <token>`: the header's format is
    wrong, as Llama Stack and OGX say. (Envoy's codec trims `Bearer ` to
    `Bearer`.)"""
    r = gw.get(API, headers={"Authorization": value})
    assert_denied(r, 401, MSG_FORMAT, token_presented=False)
    assert upstream.received() == []


def test_token_in_query_string_not_accepted(gw, rsa, upstream):
    """Credentials come only from the Authorization header."""
    r = gw.get(f"{API}?access_token={rsa.sign(tokens.claims())}")
    assert_denied(r, 401, MSG_REQUIRED, token_presented=False)
    assert upstream.received() == []


def test_oversized_garbage_token(gw, upstream):
    r = gw.get(API, token="A" * 30000)
    assert_denied(r, 401, MSG_INVALID, token_presented=True)
    assert upstream.received() == []


@pytest.mark.parametrize("value", ["alice\r\nx-evil: 1", "alice\nx-evil: 1", "alice\rx", "alice\x00x"],
                         ids=["crlf", "lf", "cr", "nul"])
def test_claim_with_control_characters_rejected(gw, rsa, value, upstream):
    """A principal that cannot go into a header is a bad token, never an Envoy 503."""
    r = gw.get(API, token=rsa.sign(tokens.claims(sub=value)))
    assert_denied(r, 401, MSG_INVALID, token_presented=True)
    assert upstream.received() == []


# -- the Authorization header ---------------------------------------------------------

def test_missing_authorization_header(gw, upstream):
    r = gw.get(API)
    assert_denied(r, 401, MSG_REQUIRED, token_presented=False)
    assert upstream.received() == []


@pytest.mark.parametrize("value", ["Basic dXNlcjpwYXNz", "Token abc.def.ghi", "Bearerabc"])
def test_non_bearer_authorization_header(gw, value, upstream):
    r = gw.get(API, headers={"Authorization": value})
    assert_denied(r, 401, MSG_FORMAT)
    assert upstream.received() == []


def test_missing_header_message_without_issuer(envoy, idp, rsa):
    """Without `issuer` the message has no ` from <issuer>` part."""
    idp.set_keys(rsa)
    gw = envoy(jwt_config(idp.port, issuer=OMIT))
    r = gw.get(API)
    assert_denied(r, 401, "Authentication required. Please provide a valid OAuth2 Bearer token",
                  token_presented=False)
    assert gw.get(API, token=rsa.sign(tokens.claims(iss="https://anyone.example"))).status == 200


# -- public paths and forwarded headers ----------------------------------------------

def test_public_path_passes_without_token(gw):
    h = forwarded(gw.get("/v1/health"))
    assert "x-auth-principal" not in h and "x-auth-attributes" not in h


def test_public_prefix_path_passes_without_token(gw):
    assert gw.get("/public/docs/index.html").status == 200


@pytest.mark.parametrize("path", ["/v1/health/extra", "/v1/healthz", "/publicity"])
def test_non_public_lookalike_paths_need_a_token(gw, path):
    assert_denied(gw.get(path), 401, MSG_REQUIRED, token_presented=False)


SPOOF = {"x-auth-principal": "root", "x-auth-attributes": '{"roles":["admin"]}'}


def test_spoofed_identity_headers_replaced_on_authenticated_path(gw, rsa):
    r = gw.get(API, token=rsa.sign(tokens.claims(sub="alice")), headers=SPOOF)
    h = forwarded(r)
    assert h["x-auth-principal"] == "alice"
    assert json.loads(h["x-auth-attributes"]) == {"roles": ["alice"]}
    names = [n for n, _ in r.json()["header_list"]]
    assert names.count("x-auth-principal") == 1 and names.count("x-auth-attributes") == 1


def test_spoofed_identity_headers_removed_on_public_path(gw):
    h = forwarded(gw.get("/v1/health", headers=SPOOF))
    assert "x-auth-principal" not in h and "x-auth-attributes" not in h


# -- no public paths, no route rules: only `authorization` is read --------------

@pytest.fixture(scope="module")
def gw_no_paths(module_idp, module_envoy, keys):
    """The contract's configuration without public paths or route rules:
    nothing matches the path, so tollgate reads `authorization` alone."""
    module_idp.set_keys(*keys.values())
    return module_envoy(jwt_config(module_idp.port, public_paths=[]))


@pytest.mark.parametrize("alg", ["RS256", "PS256", "ES256", "EdDSA"])
def test_no_paths_valid_token_forwards_identity_over_spoofs(gw_no_paths, keys, alg, upstream):
    token = keys[alg].sign(tokens.claims(sub="alice", groups=["g1"], scope="read write"))
    r = gw_no_paths.get(API, token=token, headers=SPOOF)
    h = forwarded(r)
    assert h["x-auth-principal"] == "alice"
    assert json.loads(h["x-auth-attributes"]) == {
        "roles": ["alice"], "scopes": ["read", "write"], "teams": ["g1"]}
    names = [n for n, _ in r.json()["header_list"]]
    assert names.count("x-auth-principal") == 1 and names.count("x-auth-attributes") == 1
    assert upstream.count(API) == 1


@pytest.mark.parametrize("case", ["expired", "wrong_audience", "tampered_claims", "alg_none", "garbage"])
def test_no_paths_rejected_token(gw_no_paths, keys, case, upstream):
    r = gw_no_paths.get(API, token=REJECTED[case](keys))
    assert_denied(r, 401, MSG_INVALID, token_presented=True)
    assert upstream.received() == []


def test_no_paths_missing_or_malformed_authorization(gw_no_paths, upstream):
    assert_denied(gw_no_paths.get("/v1/health", headers=SPOOF), 401, MSG_REQUIRED,
                  token_presented=False)
    assert_denied(gw_no_paths.get(API, headers={"Authorization": "Basic dXNlcjpwYXNz"}), 401,
                  MSG_FORMAT)
    assert upstream.received() == []


@pytest.fixture(scope="module")
def gw_no_paths_debug(module_idp, module_envoy, keys):
    """`gw_no_paths` logging at debug: every header is read, for the log lines."""
    module_idp.set_keys(*keys.values())
    config = jwt_config(module_idp.port, public_paths=[])
    config["log_level"] = "debug"
    return module_envoy(config)


@pytest.mark.parametrize("gateway", ["gw_no_paths", "gw_no_paths_debug"])
def test_no_paths_the_path_is_not_checked(request, gateway, rsa, upstream):
    """With nothing matched against the path it is not normalised, so a path
    that route rules would refuse with 400 reaches the upstream (Envoy's own
    path options govern it); debug logging, which reads it, changes nothing."""
    gw = request.getfixturevalue(gateway)
    for path in ["/v1/models%2Fx", "/v1/%2e%2e/admin", "/v1/a%00b"]:
        r = gw.get(path, token=rsa.sign(tokens.claims(sub="alice")))
        assert forwarded(r)["x-auth-principal"] == "alice", path
    assert [q.route for q in upstream.received()] == [
        "/v1/models%2Fx", "/v1/%2e%2e/admin", "/v1/a%00b"]


def test_strip_authorization(envoy, idp, rsa):
    idp.set_keys(rsa)
    gw = envoy(jwt_config(idp.port, forward={"strip_authorization": True}))
    h = forwarded(gw.get(API, token=rsa.sign(tokens.claims())))
    assert "authorization" not in h
    assert h["x-auth-principal"] == "alice"


def test_llama_stack_provider_config_form(envoy, idp, rsa):
    """`auth.provider_config` with `type: oauth2_token` works like the native form."""
    idp.set_keys(rsa)
    gw = envoy(jwt_config(idp.port, llama_form=True))
    assert forwarded(gw.get(API, token=rsa.sign(tokens.claims())))["x-auth-principal"] == "alice"
    assert_denied(gw.get(API), 401, MSG_REQUIRED, token_presented=False)


# -- the JWKS endpoint ------------------------------------------------------------

def test_jwks_token_sent_to_idp(envoy, idp, rsa):
    """With `jwks.token` set, the JWKS request carries it as a bearer token."""
    idp.set_keys(rsa)
    gw = envoy(jwt_config(idp.port, jwks={"token": "jwks-s3cret"}))
    assert gw.get(API, token=rsa.sign(tokens.claims())).status == 200
    fetches = idp.received("/jwks")
    assert fetches and all(f.headers.get("authorization") == "Bearer jwks-s3cret" for f in fetches)


def test_jwks_fetched_a_bounded_number_of_times(envoy, idp, rsa):
    """300 requests with valid tokens: at most one JWKS fetch per VM (3 at concurrency 2)."""
    idp.set_keys(rsa)
    gw = envoy(jwt_config(idp.port), concurrency=2)
    token = rsa.sign(tokens.claims())
    statuses = [gw.get(API, token=token).status for _ in range(300)]
    assert statuses == [200] * 300
    assert 1 <= idp.count("/jwks") <= 3


def test_unknown_kid_refresh_is_rate_limited(envoy, idp, rsa):
    """Tokens with an unknown kid trigger at most one refresh per VM per cooldown."""
    idp.set_keys(rsa)
    gw = envoy(jwt_config(idp.port, jwks={"refresh_cooldown_seconds": 10}))
    wait_for_streak(gw, rsa.sign(tokens.claims()), streak=5)
    before = idp.count("/jwks")
    stranger = make_key("ES256", "stranger").sign(tokens.claims())
    for _ in range(30):
        assert_denied(gw.get(API, token=stranger), 401, MSG_INVALID, token_presented=True)
    assert idp.count("/jwks") - before <= 2  # one per worker VM


def test_key_rotation(envoy, idp):
    """The IdP switches to a new key with a new kid: its tokens pass within seconds."""
    old, new = make_key("RS256", "old"), make_key("ES256", "new")
    idp.set_keys(old)
    gw = envoy(jwt_config(idp.port, jwks={"refresh_cooldown_seconds": 1}))
    wait_for_streak(gw, old.sign(tokens.claims()), streak=5)
    idp.set_keys(new)
    took = wait_for_streak(gw, new.sign(tokens.claims()), streak=10, timeout=8)
    assert took < 5, f"rotation took {took:.1f}s"


def test_jwks_down_at_start_then_recovers(envoy, idp, rsa):
    """IdP down at Envoy start: 503; once it is back, tokens pass without restart."""
    idp.set_keys(rsa)
    idp.stop()
    gw = envoy(jwt_config(idp.port))
    token = rsa.sign(tokens.claims())
    assert_denied(gw.get(API, token=token), 503, MSG_UNAVAILABLE)
    time.sleep(1)
    assert_denied(gw.get(API, token=token), 503, MSG_UNAVAILABLE)
    idp.start()
    took = wait_for_streak(gw, token, streak=10, timeout=20)
    assert took < 15, f"recovery took {took:.1f}s"


FAULTS = {
    "status_500": {"status": 500, "body": "oops"},
    "status_503": {"status": 503, "body": {"error": "maintenance"}},
    "garbage_body": {"body": "this is not json {"},
    "not_a_jwks": {"body": {"keys": 42}},
    "connection_dropped": {"drop": True},
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_jwks_failure_answers_503(envoy, idp, rsa, fault, upstream):
    idp.set_keys(rsa)
    idp.set_fault("/jwks", **FAULTS[fault])
    gw = envoy(jwt_config(idp.port))
    assert_denied(gw.get(API, token=rsa.sign(tokens.claims())), 503, MSG_UNAVAILABLE)
    assert upstream.received() == []


def test_jwks_slow_answers_timeout(envoy, idp, rsa):
    """A JWKS answer slower than `timeout_ms` gives 503 `Authentication service timeout`."""
    idp.set_keys(rsa)
    idp.set_fault("/jwks", delay=3)
    gw = envoy(jwt_config(idp.port, jwks={"timeout_ms": 500}))
    start = time.monotonic()
    r = gw.get(API, token=rsa.sign(tokens.claims()))
    assert_denied(r, 503, MSG_TIMEOUT)
    assert time.monotonic() - start < 2.5


def test_jwks_cluster_missing_answers_503(envoy, idp, rsa):
    """No `idp` cluster in Envoy: requests needing the JWKS get 503, never a trap."""
    idp.set_keys(rsa)
    gw = envoy(jwt_config(idp.port), clusters={})
    assert_denied(gw.get(API, token=rsa.sign(tokens.claims())), 503, MSG_UNAVAILABLE)
    assert gw.get("/v1/health").status == 200


def test_jwks_with_unusable_entries_still_serves_usable_keys(envoy, idp, rsa):
    """Real JWKS documents hold keys tollgate cannot use (encryption keys,
    symmetric keys, other curves): they are skipped, the usable ones work."""
    enc = tokens.rsa_key("enc-1").jwk(alg="RSA-OAEP", use="enc")
    p521 = {"kty": "EC", "kid": "p521", "crv": "P-521", "alg": "ES512", "use": "sig",
            "x": tokens.b64url(b"\x01" * 66), "y": tokens.b64url(b"\x02" * 66)}
    sym = {"kty": "oct", "kid": "sym", "k": tokens.b64url(b"secret" * 6)}
    idp.set_jwks({"keys": [enc, p521, sym, rsa.jwk()]})
    gw = envoy(jwt_config(idp.port))
    assert forwarded(gw.get(API, token=rsa.sign(tokens.claims())))["x-auth-principal"] == "alice"


def test_cached_keys_survive_idp_outage(envoy, idp, rsa):
    """Within cache_ttl, keys already fetched keep working while the IdP is down."""
    idp.set_keys(rsa)
    gw = envoy(jwt_config(idp.port))
    token = rsa.sign(tokens.claims())
    wait_for_streak(gw, token, streak=5)
    idp.stop()
    assert [gw.get(API, token=token).status for _ in range(20)] == [200] * 20


def test_keys_refetched_after_cache_ttl(envoy, idp, rsa):
    idp.set_keys(rsa)
    gw = envoy(jwt_config(idp.port, jwks={"cache_ttl": 1}))
    token = rsa.sign(tokens.claims())
    wait_for_streak(gw, token, streak=3)
    before = idp.count("/jwks")
    deadline = time.monotonic() + 5
    while idp.count("/jwks") == before and time.monotonic() < deadline:
        assert gw.get(API, token=token).status == 200
        time.sleep(0.2)
    assert idp.count("/jwks") > before


def test_unknown_kid_with_slow_refresh_answers_401(envoy, idp, rsa, upstream):
    """A kid refresh that takes longer than the cooldown (but less than timeout_ms)
    and still lacks the kid: the waiting request gets its 401, it is not parked again."""
    idp.set_keys(rsa)
    gw = envoy(jwt_config(idp.port, jwks={"refresh_cooldown_seconds": 1, "timeout_ms": 5000}),
               concurrency=1)
    wait_for_streak(gw, rsa.sign(tokens.claims()), streak=3)
    idp.set_fault("/jwks", delay=1.5)
    time.sleep(1.1)  # past the cooldown
    upstream.reset_log()
    before = idp.count("/jwks")
    start = time.monotonic()
    r = gw.get(API, token=make_key("RS256", "stranger").sign(tokens.claims()), timeout=8)
    assert_denied(r, 401, MSG_INVALID, token_presented=True)
    assert time.monotonic() - start < 4
    assert idp.count("/jwks") - before == 1
    assert upstream.received() == []


# -- requests parked while keys are fetched --------------------------------------------

def test_request_body_held_while_keys_are_fetched(envoy, idp, rsa, upstream):
    """A request body arriving while the headers wait for the JWKS neither
    slips past the filter nor gets lost."""
    idp.set_keys(rsa)
    idp.set_fault("/jwks", delay=1)
    gw = envoy(jwt_config(idp.port))
    bad = gw.request(API, "POST", token=tokens.tamper(rsa.sign(tokens.claims())), body=b"x" * 200_000)
    assert_denied(bad, 401, MSG_INVALID, token_presented=True)
    assert upstream.received() == []
    gw2 = envoy(jwt_config(idp.port))  # cold again
    body = b"0123456789" * 20_000
    good = gw2.request(API, "POST", token=rsa.sign(tokens.claims()), body=body)
    assert good.status == 200 and good.json()["body"] == body.decode()


@pytest.mark.parametrize("public_paths", [["/v1/health"], []], ids=["all-headers", "authorization-only"])
def test_concurrent_requests_share_one_fetch(envoy, idp, rsa, public_paths):
    """Many requests arriving while the JWKS is fetched all pass, with one
    fetch per VM, and go on with the identity (parked requests keep what was
    read of them, whichever way it was read)."""
    idp.set_keys(rsa)
    idp.set_fault("/jwks", delay=1)
    gw = envoy(jwt_config(idp.port, public_paths=public_paths))
    token = rsa.sign(tokens.claims(sub="alice"))
    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda _: gw.get(API, token=token, headers=SPOOF), range(40)))
    assert [forwarded(r)["x-auth-principal"] for r in answers] == ["alice"] * 40
    assert idp.count("/jwks") <= 3


def test_client_gone_while_parked(envoy, idp, rsa):
    """A client that hangs up while its request waits for the JWKS leaves no trap,
    and the next requests are served."""
    idp.set_keys(rsa)
    idp.set_fault("/jwks", delay=1)
    gw = envoy(jwt_config(idp.port))
    token = rsa.sign(tokens.claims())
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", gw.port)) as s:
            s.sendall(f"GET {API} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
    time.sleep(1.5)
    idp.clear_faults()
    wait_for_streak(gw, token, streak=5)


# -- configuration ------------------------------------------------------------------

def _with_unknown_top_level(port):
    cfg = jwt_config(port)
    cfg["bogus_key"] = 1
    return cfg


def _with_unknown_nested(port):
    cfg = jwt_config(port)
    cfg["auth"]["config"]["jwks"]["uri_typo_key"] = "x"
    return cfg


@pytest.mark.parametrize("make,key", [(_with_unknown_top_level, "bogus_key"),
                                      (_with_unknown_nested, "uri_typo_key")],
                         ids=["top_level", "nested"])
def test_unknown_configuration_key_refused(expect_config_rejected, idp, make, key):
    """Envoy refuses to start, and the filter's log line names the key."""
    log = expect_config_rejected(make(idp.port))
    assert any(key in line and "wasm log" in line for line in log.splitlines()), log
