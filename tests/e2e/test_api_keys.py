"""`local_api_key` (issue #21) through a real Envoy: OGX 1.5.0's configuration
shape pasted as is (`ogx/core/datatypes.py` `LocalApiKeyAuthConfig`,
`api_keys`), and named keys given as SHA-256 digests with their own
principal and attributes. Wrong and missing keys are 401 with OGX's
messages (`LocalApiKeyAuthProvider.validate_token`; the base
`get_auth_error_message`); no key reaches a forwarded header."""

from __future__ import annotations

import hashlib
import json

import pytest

API = "/v1/models"
CI_KEY = "ci-0123456789abcdef"
OGX_KEY = "sk-ogx-plain-key"


@pytest.fixture(scope="module")
def gw(module_envoy):
    return module_envoy({
        "auth": {"provider_config": {
            "type": "local_api_key",
            "api_keys": [OGX_KEY],
            "keys": [{"name": "ci", "sha256": hashlib.sha256(CI_KEY.encode()).hexdigest(),
                      "attributes": {"roles": ["ci"], "teams": ["build"]}}]}},
        "forward": {"strip_authorization": True},
        "route_policy": [{"permit": {"paths": "*"}, "when": "user with ci in roles"},
                         {"permit": {"paths": "/v1/models"}, "when": "user with admin in roles"}],
    })


def identity(upstream) -> tuple[str, dict, list[str]]:
    (req,) = upstream.received()
    h = req.headers
    return h["x-auth-principal"], json.loads(h["x-auth-attributes"]), list(h)


def test_ogx_shaped_keys_are_admins_without_the_key_in_any_header(gw, upstream):
    r = gw.get(API, token=OGX_KEY)
    assert r.status == 200, r
    principal, attributes, names = identity(upstream)
    short = hashlib.sha256(OGX_KEY.encode()).hexdigest()[:12]
    assert principal == f"api-key-{short}"
    assert attributes == {"roles": ["admin", "owner"], "teams": [principal]}
    assert "authorization" not in names
    (req,) = upstream.received()
    assert OGX_KEY not in json.dumps(req.headers)


def test_named_keys_by_digest(gw, upstream):
    assert gw.get("/v1/anything", token=CI_KEY).status == 200
    principal, attributes, _ = identity(upstream)
    assert (principal, attributes) == ("ci", {"roles": ["ci"], "teams": ["build"]})


@pytest.mark.parametrize("token", ["nope", OGX_KEY + "x", OGX_KEY.upper(), CI_KEY[:-1]])
def test_wrong_keys_are_401(gw, upstream, token):
    r = gw.get(API, token=token)
    assert r.status == 401
    assert json.loads(r.body) == {"error": {"message": "Invalid or missing API key"}}
    assert upstream.received() == []


def test_missing_key_is_401(gw, upstream):
    r = gw.get(API)
    assert r.status == 401
    assert json.loads(r.body) == {"error": {"message": "Authentication required"}}
    # route_policy applies to the key's identity: the OGX key is not ci.
    assert gw.get("/v1/other", token=OGX_KEY).status == 403


@pytest.mark.parametrize("provider,key", [
    ({"type": "local_api_key"}, "auth.provider_config"),
    ({"type": "local_api_key", "keys": [{"name": "x", "sha256": "00"}]},
     "auth.provider_config.keys[0].sha256"),
])
def test_bad_key_configurations_refuse_to_load(expect_config_rejected, provider, key):
    log = expect_config_rejected({"auth": {"provider_config": provider}})
    assert key in log, log


# -- where the credential comes from (auth.credentials) ------------------------

SDK_HEADERS = [  # the headers LLM SDKs send keys in
    {"header": "authorization", "prefix": "Bearer "},
    {"header": "x-api-key"},                 # Anthropic's SDK
    {"header": "api-key"},                   # Azure OpenAI
    {"header": "x-goog-api-key"},            # Google's
]


@pytest.fixture(scope="module")
def sdk_gw(module_envoy):
    return module_envoy({
        "auth": {"provider_config": {"type": "local_api_key",
                                     "keys": [{"name": "ci", "key": CI_KEY},
                                              {"name": "ops", "key": "ops-key"}]},
                 "credentials": SDK_HEADERS},
        "forward": {"strip_authorization": True},
    })


@pytest.mark.parametrize("header,value", [
    ("Authorization", f"Bearer {CI_KEY}"),
    ("x-api-key", CI_KEY),
    ("api-key", f"  {CI_KEY} "),
    ("x-goog-api-key", CI_KEY),
])
def test_every_configured_header_carries_the_key_and_is_stripped(sdk_gw, upstream, header, value):
    r = sdk_gw.get(API, headers={header: value})
    assert r.status == 200, r
    (req,) = upstream.received()
    assert req.headers["x-auth-principal"] == "ci"
    assert not any(h in req.headers for h in ("authorization", "x-api-key", "api-key",
                                              "x-goog-api-key"))


def test_two_different_credentials_are_refused(sdk_gw, upstream):
    r = sdk_gw.get(API, headers={"x-api-key": CI_KEY, "Authorization": "Bearer ops-key"})
    assert r.status == 401
    assert json.loads(r.body) == {"error": {"message": "More than one credential in the request"}}
    # The same key twice is one credential.
    assert sdk_gw.get(API, headers={"x-api-key": CI_KEY, "api-key": CI_KEY}).status == 200
    assert len(upstream.received()) == 1


def test_a_header_outside_the_list_is_not_read(sdk_gw, upstream):
    r = sdk_gw.get(API, headers={"x-other-key": CI_KEY})
    assert r.status == 401
    assert json.loads(r.body) == {"error": {"message": "Authentication required"}}
    assert sdk_gw.get(API, headers={"x-api-key": ""}).status == 401


@pytest.fixture(scope="module")
def cookie_query_gw(module_envoy):
    return module_envoy({
        "auth": {"provider_config": {"type": "local_api_key",
                                     "keys": [{"name": "ci", "key": CI_KEY},
                                              {"name": "ops", "key": "ops-key"}]},
                 "credentials": [{"header": "authorization", "prefix": "Bearer "},
                                 {"cookie": "session"}, {"query": "key"}]},
        "forward": {"strip_authorization": True},
    })


def test_a_cookie_credential_is_read_and_stripped(cookie_query_gw, upstream):
    r = cookie_query_gw.get(API, headers={"Cookie": f"theme=dark; session={CI_KEY}; lang=en"})
    assert r.status == 200, r
    (req,) = upstream.received()
    assert req.headers["x-auth-principal"] == "ci"
    assert req.headers["cookie"] == "theme=dark; lang=en"
    upstream.reset_log()
    assert cookie_query_gw.get(API, headers={"Cookie": f'session="{CI_KEY}"'}).status == 200
    (req,) = upstream.received()
    assert "cookie" not in req.headers


def test_a_query_credential_is_read_and_never_reaches_the_upstream_or_the_log(cookie_query_gw,
                                                                                upstream):
    import time

    r = cookie_query_gw.get(f"/v1/models?limit=5&key={CI_KEY}&x=1")
    assert r.status == 200, r
    (req,) = upstream.received()
    assert req.headers["x-auth-principal"] == "ci"
    assert req.path == "/v1/models?limit=5&x=1"
    time.sleep(0.3)  # the access log flushes every 100 ms
    assert CI_KEY not in cookie_query_gw.access_log_text()
    assert CI_KEY not in cookie_query_gw.log_text()


def test_credentials_in_two_places_must_agree(cookie_query_gw, upstream):
    r = cookie_query_gw.get(f"{API}?key={CI_KEY}", headers={"Authorization": "Bearer ops-key"})
    assert r.status == 401
    assert json.loads(r.body) == {"error": {"message": "More than one credential in the request"}}
    r = cookie_query_gw.get(f"{API}?key=ops-key", headers={"Cookie": "session=ops-key"})
    assert r.status == 200
    r = cookie_query_gw.get(f"{API}?key=nope")
    assert r.status == 401 and json.loads(r.body)["error"]["message"] == "Invalid or missing API key"
