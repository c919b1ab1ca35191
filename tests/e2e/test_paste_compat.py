"""Paste compatibility (issue #22): configurations written by the real Llama
Stack 0.2.12 package and taken from OGX 1.5.0's documentation load unchanged
into tollgate in Envoy, and every documented difference (README "Differences
from Llama Stack and OGX") behaves as documented.

Llama Stack 0.2.12: `harness.llama.dump_0_2_12` builds the configurations with
the package's own pydantic models in build/llama-venv and dumps them with
`model_dump(mode="json")`. They name no `cluster`: tollgate sends callouts to
the cluster named by the URL's authority (`127.0.0.1:<port>`), which these
Envoys define.

OGX 1.5.0 needs Python >= 3.12 and does not run here: its examples are copied
from docs/docs/distributions/configuration.mdx of github.com/ogx-ai/ogx
(commit 5a9cb55d8a8b898feb1627e80f7f1e39707d3888, the documentation snapshot
available; the model fields were checked against the ogx 1.5.0 wheel's
ogx/core/datatypes.py: OAuth2TokenAuthConfig, CustomAuthConfig,
AuthenticationConfig), with `${env...}` placeholders resolved as OGX resolves
them and the URLs pointed at the harness IdP."""

from __future__ import annotations

import time

import pytest

from harness import tokens
from harness.config import OMIT, jwt_config
from harness.idp import IdP
from harness.llama import dump_0_2_12
from harness.providers import (Scripted, assert_denied, custom_config, form_token, identity,
                               introspection_config, json_api_key, new_token)
from harness.server import Reply

API = "/v1/models"
ISSUER = "https://idp.example"
INVALID = 'Bearer error="invalid_token"'
MSG_BAD_HEADER = "Invalid Authorization header format"
MSG_INVALID_JWT = "Invalid JWT token"
MSG_NOT_ACTIVE = "Token not active"
MSG_BAD_FORMAT = "Invalid authentication response format"
MSG_UNAVAILABLE = "Authentication service unavailable"


def authority(port: int) -> str:
    return f"127.0.0.1:{port}"


# -- fixtures ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def keys():
    """rs-good (RS256), rs-pinned (a JWK that says RS256), ed-good (EdDSA)."""
    return {"rsa": tokens.rsa_key("rs-good", "RS256"),
            "pinned": tokens.rsa_key("rs-pinned", "RS256"),
            "ed": tokens.ed25519_key("ed-good")}


@pytest.fixture(scope="module")
def authsvc():
    """The custom endpoint's host (its own authority, hence its own cluster)."""
    with IdP() as server:
        yield server


@pytest.fixture(scope="module")
def introspector(module_idp):
    s = Scripted(form_token, Reply(200, {"active": False}))
    module_idp.route("/introspect", s)
    return s


@pytest.fixture(scope="module")
def validator(authsvc):
    s = Scripted(json_api_key, Reply(401, {"error": "unknown key"}))
    authsvc.route("/validate", s)
    return s


@pytest.fixture(scope="module")
def keyed_idp(module_idp, keys):
    module_idp.set_keys(keys["rsa"], keys["pinned"], keys["ed"])
    return module_idp


@pytest.fixture(scope="module")
def dumps(keyed_idp, authsvc, introspector, validator):
    module_idp = keyed_idp
    d = dump_0_2_12(jwks_uri=f"http://{authority(module_idp.port)}/jwks",
                    introspection_url=f"http://{authority(module_idp.port)}/introspect",
                    custom_url=f"http://{authority(authsvc.port)}/validate", issuer=ISSUER)
    assert d["_version"] == "0.2.12"
    return d


@pytest.fixture(scope="module")
def clusters(module_idp, authsvc):
    """Clusters named as tollgate defaults them (the URL authority), plus `idp`."""
    return {authority(module_idp.port): module_idp.port, authority(authsvc.port): authsvc.port,
            "idp": module_idp.port, "authsvc": authsvc.port}


def pasted(server_dump: dict, **top) -> dict:
    """The `server.auth` / `server.quota` blocks, unchanged."""
    out = {k: server_dump[k] for k in ("auth", "quota") if server_dump.get(k) is not None}
    out.update(top)
    return out


@pytest.fixture(scope="module")
def jwt_gw(module_envoy, keyed_idp):
    module_idp = keyed_idp
    """A JWT configuration as pasted: no clock_skew_seconds (the default)."""
    return module_envoy(jwt_config(module_idp.port, clock_skew_seconds=OMIT),
                        clusters={"idp": module_idp.port})


@pytest.fixture(scope="module")
def intro_gw(module_envoy, clusters, introspector, module_idp):
    return module_envoy(introspection_config(module_idp.port), clusters=clusters)


@pytest.fixture(scope="module")
def custom_gw(module_envoy, clusters, validator, authsvc):
    return module_envoy(custom_config(authsvc.port), clusters=clusters)


def good(keys, key="rsa", **kw) -> str:
    return keys[key].sign(tokens.claims(**kw))


# -- Llama Stack 0.2.12: its own dumps load unchanged --------------------------------

def test_0_2_12_dumps_carry_nulls_and_empty_policies(dumps):
    """What the package writes: both key sources with one null, every unset
    option null, `access_policy: []`, a kvstore with `namespace: null`."""
    intro = dumps["introspection"]["auth"]
    assert intro["config"]["jwks"] is None and intro["config"]["introspection"]
    assert dumps["jwks"]["auth"]["config"]["introspection"] is None
    assert dumps["jwks"]["auth"]["config"]["jwks"]["token"] is None
    assert intro["access_policy"] == []
    assert dumps["jwks"]["quota"]["kvstore"]["namespace"] is None


def test_0_2_12_jwks_dump_with_quota(envoy, dumps, clusters, keys, upstream):
    """The JWKS dump with its quota: allowed, the documented 401s and 403, and
    the quota counted per principal (authenticated_max_requests 3)."""
    gw = envoy(pasted(dumps["jwks"], route_scopes=[{"path_prefix": "/v1/admin/",
                                                       "required_scope": "admin"}]),
               clusters=clusters)
    r = gw.get(API, token=good(keys, sub="alice", scope="read"))
    assert identity(r) == ("alice", {"roles": ["alice"], "scopes": ["read"]})
    assert_denied(gw.get(API), 401,
                  f"Authentication required. Please provide a valid OAuth2 Bearer token from {ISSUER}")
    assert_denied(gw.get(API, token=tokens.tamper(good(keys))), 401, MSG_INVALID_JWT, INVALID)
    assert_denied(gw.get(API, headers={"Authorization": "Basic YTpi"}), 401, MSG_BAD_HEADER)
    r = gw.get("/v1/admin/x", token=good(keys, sub="alice"))
    assert r.status == 403, r
    assert r.json()["error"]["message"] == "Access denied: user does not have required scope: admin"
    # alice has used 1 of 3 (the 403 came before the quota): two more, then 429.
    assert gw.get(API, token=good(keys, sub="alice", jti="2")).status == 200
    assert gw.get(API, token=good(keys, sub="alice", jti="3")).status == 200
    r = gw.get(API, token=good(keys, sub="alice", jti="4"))
    assert r.status == 429, r
    assert gw.get(API, token=good(keys, sub="bob")).status == 200


def test_0_2_12_jwks_defaults_dump(envoy, dumps, clusters, keys):
    """Every default written out: audience llama-stack, no issuer, Llama
    Stack's claims_mapping (sub and username into roles)."""
    gw = envoy(pasted(dumps["jwks_defaults"]), clusters=clusters)
    r = gw.get(API, token=good(keys, sub="carol", iss=None, groups=["ml"]))
    assert identity(r) == ("carol", {"roles": ["carol"], "teams": ["ml"]})
    assert_denied(gw.get(API, token=good(keys, aud="other")), 401, MSG_INVALID_JWT, INVALID)
    assert_denied(gw.get(API), 401,
                  "Authentication required. Please provide a valid OAuth2 Bearer token")


def test_0_2_12_introspection_dump_loads_with_jwks_null(envoy, dumps, clusters, introspector):
    """Defect 1: `"jwks": null` beside `introspection` loads. The dump's
    explicit `"audience": "llama-stack"` is checked against the answer's `aud`
    (documented difference)."""
    intro_gw = envoy(pasted(dumps["introspection"]), clusters=clusters)
    exp = int(time.time()) + 600
    t = introspector.answer(new_token(), Reply(200, {"active": True, "sub": "dave",
                                                     "aud": "llama-stack", "exp": exp}))
    assert identity(intro_gw.get(API, token=t)) == ("dave", {"roles": ["dave"]})
    t = introspector.answer(new_token(), Reply(200, {"active": True, "sub": "dave", "exp": exp}))
    assert_denied(intro_gw.get(API, token=t), 401, "Token audience not accepted", INVALID)
    assert_denied(intro_gw.get(API, token=new_token()), 401, MSG_NOT_ACTIVE, INVALID)


def test_null_means_absent_in_the_provider_config(envoy, dumps, clusters, introspector):
    """Defect 1 alone: the provider's `config` as 0.2.12 writes it
    (`"jwks": null`, `"issuer": null`, `"tls_cafile": null`) loads."""
    config = dumps["introspection"]["auth"]["config"]
    assert config["jwks"] is None
    gw = envoy({"auth": {"provider_type": "oauth2_token", "config": config}}, clusters=clusters)
    assert_denied(gw.get(API, token=new_token()), 401, MSG_NOT_ACTIVE, INVALID)


def test_0_2_12_introspection_secret_in_body_dump(envoy, dumps, clusters, introspector):
    gw = envoy(pasted(dumps["introspection_secret_in_body"]), clusters=clusters)
    t = introspector.answer(new_token(), Reply(200, {"active": True, "sub": "erin",
                                                     "aud": ["llama-stack"], "scope": "a b"}))
    assert identity(gw.get(API, token=t)) == ("erin", {"scopes": ["a", "b"]})
    body = introspector.requests(t)[0].body.decode()
    assert "client_id=gw" in body and "client_secret=s3cret" in body


def test_0_2_12_custom_dump(envoy, dumps, clusters, validator, authsvc):
    # Its quota is tested with the JWKS dump.
    custom_gw = envoy(pasted(dumps["custom"] | {"quota": None}), clusters=clusters)
    t = validator.answer(new_token(), Reply(200, {"principal": "frank",
                                                  "attributes": {"teams": ["ml"]}}))
    assert identity(custom_gw.get(API, token=t)) == ("frank", {"teams": ["ml"]})
    assert_denied(custom_gw.get(API, token=new_token()), 401, "Authentication failed: 401",
                  INVALID)
    assert_denied(custom_gw.get(API), 401,
                  "Authentication required. Please provide your API key as a Bearer token "
                  f"(validated by {authority(authsvc.port)})")


def test_0_2_12_quota_without_auth(envoy, dumps, clusters):
    """Quota alone: every client anonymous, counted per address (anonymous_max_requests 2)."""
    gw = envoy(pasted(dumps["quota_only"]), clusters=clusters)
    assert [gw.get(API).status for _ in range(3)] == [200, 200, 429]


# -- OGX 1.5.0 documentation examples ------------------------------------------------

def ogx_examples(idp_port: int, authsvc_port: int) -> dict:
    """configuration.mdx examples (see the module docstring), URLs -> the harness."""
    idp, auth = f"http://{authority(idp_port)}", f"http://{authority(authsvc_port)}"
    return {
        # "Conditional Authentication", with AUTH_PROVIDER set and KEYCLOAK_URL=<idp>.
        "conditional_oauth2": {"provider_config": {
            "type": "oauth2_token", "audience": "ogx",
            "jwks": {"uri": f"{idp}/jwks"}, "issuer": ISSUER}},
        # "OAuth 2.0/OpenID Connect Provider with Kubernetes" (TOKEN unset: `${env.TOKEN:+}` is None).
        "kubernetes_jwks": {"provider_config": {
            "type": "oauth2_token",
            "jwks": {"uri": f"{idp}/jwks", "token": None, "key_recheck_period": 3600},
            "tls_cafile": "/path/to/ca.crt", "issuer": ISSUER, "audience": "ogx"}},
        # "Custom Provider".
        "custom": {"provider_config": {"type": "custom", "endpoint": f"{auth}/validate"}},
        # OAuth2TokenAuthConfig + AuthenticationConfig of ogx 1.5.0, model_dump(mode="json").
        "model_dump": {"provider_config": {
            "type": "oauth2_token", "audience": "ogx", "verify_tls": True, "tls_cafile": None,
            "issuer": None,
            "claims_mapping": {"sub": "roles", "username": "roles", "groups": "teams",
                               "team": "teams", "project": "projects", "tenant": "namespaces",
                               "namespace": "namespaces"},
            "tenant_claim": None,
            "jwks": {"uri": f"{idp}/jwks", "token": None, "key_recheck_period": 3600},
            "introspection": None},
            "route_policy": [], "access_policy": []},
    }


@pytest.mark.parametrize("name", ["conditional_oauth2", "kubernetes_jwks", "model_dump"])
def test_ogx_1_5_0_jwks_examples(envoy, keyed_idp, authsvc, clusters, keys, name):
    module_idp = keyed_idp
    gw = envoy({"auth": ogx_examples(module_idp.port, authsvc.port)[name]}, clusters=clusters)
    r = gw.get(API, token=good(keys, sub="gina", aud="ogx"))
    assert r.status == 200, r
    assert_denied(gw.get(API, token=good(keys, aud="llama-stack")), 401, MSG_INVALID_JWT, INVALID)
    assert_denied(gw.get(API, headers={"Authorization": "Token x"}), 401, MSG_BAD_HEADER)


def test_ogx_1_5_0_custom_example_with_quota(envoy, module_idp, authsvc, clusters, validator):
    """"Example with Authentication Enabled": custom plus quota (OGX 1.5.0
    defines QuotaConfig but enforces no quota; tollgate does)."""
    config = {"auth": ogx_examples(module_idp.port, authsvc.port)["custom"],
              "quota": {"kvstore": {"type": "sqlite", "db_path": "./quotas.db"},
                        "anonymous_max_requests": 100, "authenticated_max_requests": 2,
                        "period": "day"}}
    gw = envoy(config, clusters=clusters)
    t = validator.answer(new_token(), Reply(200, {"principal": "hank"}))
    assert [gw.get(API, token=t).status for _ in range(3)] == [200, 200, 429]


@pytest.mark.parametrize("provider", [
    # OGX's provider for a gateway in front of it: tollgate is that gateway.
    {"type": "upstream_header", "principal_header": "x-auth-principal"},
])
def test_ogx_providers_tollgate_lacks_refuse_to_load(expect_config_rejected, provider):
    log = expect_config_rejected({"auth": {"provider_config": provider}})
    assert f"unknown provider `{provider['type']}`" in log


def test_ogx_github_token_example_loads_unchanged(envoy):
    """OGX 1.5.0's `github_token` shape (datatypes.py `GitHubTokenAuthConfig`)
    loads as written; a request without a token gets OGX's own message."""
    gw = envoy({"auth": {"provider_config": {
        "type": "github_token", "github_api_base_url": "https://api.github.com",
        "claims_mapping": {"login": "roles", "organizations": "teams"}}}})
    resp = gw.get(API)
    assert resp.status == 401
    assert resp.json()["error"]["message"].startswith(
        "Authentication required. Please provide a valid GitHub access token")


# -- Defect 2: `Bearer` with nothing after it ------------------------------------------

@pytest.mark.parametrize("header", ["Bearer", "Bearer ", "Bearer    "])
def test_bearer_without_token_is_a_bad_header_for_every_provider(
        jwt_gw, intro_gw, custom_gw, introspector, validator, header, upstream):
    for gw in (jwt_gw, intro_gw, custom_gw):
        assert_denied(gw.get(API, headers={"Authorization": header}), 401, MSG_BAD_HEADER)
    assert upstream.received() == []


# -- Differences: JWT --------------------------------------------------------------

def test_no_clock_skew_by_default(jwt_gw, keys):
    """Llama Stack and OGX allow no leeway; neither does a pasted configuration."""
    now = int(time.time())
    expired = keys["rsa"].sign(tokens.claims(now=now - 300, lifetime=298))
    assert_denied(jwt_gw.get(API, token=expired), 401, MSG_INVALID_JWT, INVALID)
    early = good(keys, nbf=now + 5)
    assert_denied(jwt_gw.get(API, token=early), 401, MSG_INVALID_JWT, INVALID)


def test_clock_skew_is_configurable(envoy, keyed_idp, keys):
    module_idp = keyed_idp
    gw = envoy(jwt_config(module_idp.port, clock_skew_seconds=60), clusters={"idp": module_idp.port})
    now = int(time.time())
    assert gw.get(API, token=keys["rsa"].sign(tokens.claims(now=now - 300, lifetime=290))).status == 200


@pytest.mark.parametrize("header", ["bearer {t}", "BEARER {t}", "Bearer   {t}"])
def test_scheme_case_and_spaces_are_accepted(jwt_gw, keys, header):
    """RFC 9110 §11.1: the scheme is case-insensitive; RFC 6750: 1*SP."""
    r = jwt_gw.get(API, headers={"Authorization": header.format(t=good(keys))})
    assert r.status == 200, r


def test_eddsa_accepted_unless_algorithms_excludes_it(jwt_gw, envoy, keyed_idp, keys):
    module_idp = keyed_idp
    assert jwt_gw.get(API, token=good(keys, "ed")).status == 200
    ogx_algorithms = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384"]
    gw = envoy(jwt_config(module_idp.port, algorithms=ogx_algorithms),
               clusters={"idp": module_idp.port})
    assert_denied(gw.get(API, token=good(keys, "ed")), 401, MSG_INVALID_JWT, INVALID)
    assert gw.get(API, token=good(keys)).status == 200


def test_algorithms_naming_an_unsupported_alg_refuses_to_load(expect_config_rejected, module_idp):
    log = expect_config_rejected(jwt_config(module_idp.port, algorithms=["RS256", "ES512"]))
    assert "configuration key `auth.config.algorithms[1]`: `ES512` is not supported" in log


def test_token_without_kid_is_accepted(jwt_gw, keys):
    """RFC 7515 makes `kid` optional (Llama Stack and OGX require it)."""
    assert jwt_gw.get(API, token=keys["rsa"].sign(tokens.claims(), kid=None)).status == 200


def test_exp_is_required(jwt_gw, keys):
    assert_denied(jwt_gw.get(API, token=good(keys, exp=None)), 401, MSG_INVALID_JWT, INVALID)


def test_iat_in_the_future_is_refused(jwt_gw, keys):
    assert_denied(jwt_gw.get(API, token=good(keys, iat=int(time.time()) + 120)), 401,
                  MSG_INVALID_JWT, INVALID)


def test_fractional_times_are_accepted(jwt_gw, keys):
    """RFC 7519 NumericDate may have a fraction: cut to whole seconds."""
    now = time.time()
    t = keys["rsa"].sign(tokens.claims(exp=now + 300.5, iat=now - 0.25, nbf=now - 10.75))
    assert jwt_gw.get(API, token=t).status == 200
    t = keys["rsa"].sign(tokens.claims(exp=now - 5.5, iat=now - 60.5))
    assert_denied(jwt_gw.get(API, token=t), 401, MSG_INVALID_JWT, INVALID)


def test_a_jwk_alg_restricts_the_key(jwt_gw, keys):
    """rs-pinned's JWK says RS256: an RS384 signature by the same key is refused."""
    assert jwt_gw.get(API, token=good(keys, "pinned")).status == 200
    t = keys["pinned"].sign(tokens.claims(), alg="RS384")
    assert_denied(jwt_gw.get(API, token=t), 401, MSG_INVALID_JWT, INVALID)


# -- Differences: introspection ------------------------------------------------------

INTRO_CASES = {
    "active_with_past_exp": ({"active": True, "sub": "ivy", "aud": "llama-stack",
                              "exp": 1_000_000_000}, 401, MSG_NOT_ACTIVE),
    "no_active": ({"sub": "ivy", "aud": "llama-stack"}, 401, MSG_NOT_ACTIVE),
    "username_without_sub": ({"active": True, "username": "ivy", "aud": "llama-stack"}, 200, "ivy"),
}


@pytest.mark.parametrize("case", list(INTRO_CASES))
def test_introspection_answers(intro_gw, introspector, case):
    answer, status, expected = INTRO_CASES[case]
    t = introspector.answer(new_token(), Reply(200, answer))
    r = intro_gw.get(API, token=t)
    if status == 200:
        assert identity(r)[0] == expected
    else:
        assert_denied(r, status, expected, INVALID)


# -- Differences: custom endpoint -------------------------------------------------

CUSTOM_CASES = {
    "string_attribute": ({"principal": "jo", "attributes": {"roles": "admin"}}, 401, MSG_BAD_FORMAT),
    "empty_principal": ({"principal": ""}, 401, MSG_BAD_FORMAT),
    "no_attributes": ({"principal": "jo"}, 200, ("jo", {"roles": ["jo"]})),
    "access_attributes": ({"principal": "jo", "access_attributes": {"teams": ["t"]}}, 200,
                          ("jo", {"teams": ["t"]})),
}


@pytest.mark.parametrize("case", list(CUSTOM_CASES))
def test_custom_answers(custom_gw, validator, case):
    answer, status, expected = CUSTOM_CASES[case]
    t = validator.answer(new_token(), Reply(200, answer))
    r = custom_gw.get(API, token=t)
    if status == 200:
        assert identity(r) == expected
    else:
        assert_denied(r, status, expected, INVALID)


# -- Differences: answers ------------------------------------------------------------

def test_identity_provider_down_is_503(envoy, keyed_idp):
    """OGX's 503 (Llama Stack 0.2.12 answered 401): no cluster for the JWKS."""
    gw = envoy(jwt_config(keyed_idp.port), clusters={})
    r = gw.get(API, token="a.b.c")
    assert r.status == 401  # malformed: refused before any key is needed
    r = gw.get(API, token=tokens.rsa_key("x").sign(tokens.claims()))
    assert_denied(r, 503, MSG_UNAVAILABLE)
    assert "www-authenticate" not in r.headers


def test_extra_headers_and_the_quota_by_principal(envoy, keyed_idp, keys):
    module_idp = keyed_idp
    """401s carry `WWW-Authenticate`; a 429 `Retry-After` and `RateLimit-*`.
    The count is per principal: a new token of the same user does not reset
    it (Llama Stack keyed it by the raw token), and another user from the
    same address has their own (0.2.12 counted per address)."""
    cfg = jwt_config(module_idp.port)
    cfg["quota"] = {"authenticated_max_requests": 2, "anonymous_max_requests": 1}
    gw = envoy(cfg, clusters={"idp": module_idp.port})
    r = gw.get(API)
    assert r.status == 401 and r.headers["www-authenticate"].startswith("Bearer"), r
    ok = gw.get(API, token=good(keys, sub="kim", jti="1"))
    assert ok.status == 200 and ok.headers["ratelimit-limit"] == "2", ok
    assert gw.get(API, token=good(keys, sub="kim", jti="2")).status == 200
    r = gw.get(API, token=good(keys, sub="kim", jti="3"))
    assert r.status == 429 and "retry-after" in r.headers and r.headers["ratelimit-remaining"] == "0", r
    assert gw.get(API, token=good(keys, sub="lee")).status == 200
