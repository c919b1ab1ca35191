"""Several authentication providers at once (`auth.providers`) through a real Envoy.

Two identity providers with their own signing keys (A: RS256, B: ES256),
issuers and audiences. A JWT whose `iss` names one of the oauth2_token
providers goes to that provider alone (its JWKS, audience, claims_mapping;
its refusal is 401 `Invalid JWT token`). Any other token goes to the
fallbacks in order: `local_api_key` (an unknown key passes on), then at most
one callout provider, whose answer is final. With no fallback accepting, the
401 is the one of the provider tried last; a request without a credential
gets the first provider's missing message."""

from __future__ import annotations

import hashlib
import json

import jwt
import pytest

from harness import tokens
from harness.idp import IdP
from harness.providers import Scripted, identity, json_api_key, new_token
from harness.providers import assert_bearer_denied as assert_denied
from harness.server import Reply

API = "/v1/models"

ISS_A, AUD_A = "https://a.example", "aud-a"
ISS_B, AUD_B = "https://b.example", "aud-b"
MAPPING_A = {"sub": "roles", "groups": "teams"}
MAPPING_B = {"sub": "roles"}

MSG_INVALID_JWT = "Invalid JWT token"
MSG_INVALID_KEY = "Invalid or missing API key"
MSG_UNAVAILABLE = "Authentication service unavailable"
MSG_KEY_REQUIRED = "Authentication required"


def msg_required(issuer: str) -> str:
    return f"Authentication required. Please provide a valid OAuth2 Bearer token from {issuer}"


CI_KEY = "ci-0123456789abcdef"
OGX_KEY = "sk-ogx-plain-key"
OGX_PRINCIPAL = f"api-key-{hashlib.sha256(OGX_KEY.encode()).hexdigest()[:12]}"


# -- configurations ----------------------------------------------------------------

def jwt_provider(idp: IdP, cluster: str, mapping: dict, **changes) -> dict:
    """An oauth2_token/jwks provider for `idp` (its issuer and audience);
    a `None` in `changes` drops a key."""
    p = {"type": "oauth2_token", "issuer": idp.issuer, "audience": idp.audience,
         "jwks": {"uri": f"http://127.0.0.1:{idp.port}/jwks", "cluster": cluster},
         "claims_mapping": mapping}
    p.update(changes)
    return {k: v for k, v in p.items() if v is not None}


def api_key_provider() -> dict:
    return {"type": "local_api_key", "api_keys": [OGX_KEY],
            "keys": [{"name": "ci", "key": CI_KEY,
                      "attributes": {"roles": ["ci"], "teams": ["build"]}}]}


def custom_provider(port: int) -> dict:
    return {"type": "custom", "endpoint": f"http://127.0.0.1:{port}/validate",
            "cluster": "authsvc"}


def introspection_provider(port: int) -> dict:
    return {"type": "oauth2_token", "issuer": "https://i.example",
            "introspection": {"url": f"http://127.0.0.1:{port}/introspect", "cluster": "authsvc",
                              "client_id": "gw", "client_secret": "s3cret"}}


def multi(*providers: dict) -> dict:
    return {"auth": {"providers": list(providers)}, "public_paths": ["/v1/health"]}


# -- fixtures ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def key_a() -> tokens.SigningKey:
    return tokens.rsa_key("a-1", "RS256")


@pytest.fixture(scope="module")
def key_b() -> tokens.SigningKey:
    return tokens.ec_key("b-1", "ES256")


@pytest.fixture(scope="module")
def idp_a(key_a):
    with IdP(keys=[key_a], issuer=ISS_A, audience=AUD_A) as server:
        yield server


@pytest.fixture(scope="module")
def idp_b(key_b):
    with IdP(keys=[key_b], issuer=ISS_B, audience=AUD_B) as server:
        yield server


@pytest.fixture(scope="module")
def clusters(idp_a, idp_b) -> dict[str, int]:
    return {"idp_a": idp_a.port, "idp_b": idp_b.port}


@pytest.fixture(scope="module")
def gw(module_envoy, idp_a, idp_b, clusters):
    """[A, B], no fallback; one worker (JWKS counts are asserted)."""
    return module_envoy(multi(jwt_provider(idp_a, "idp_a", MAPPING_A),
                              jwt_provider(idp_b, "idp_b", MAPPING_B)),
                        clusters=clusters, concurrency=1)


@pytest.fixture(scope="module")
def gw_keys(module_envoy, idp_a, idp_b, clusters):
    """[A, B, local_api_key]."""
    return module_envoy(multi(jwt_provider(idp_a, "idp_a", MAPPING_A),
                              jwt_provider(idp_b, "idp_b", MAPPING_B),
                              api_key_provider()),
                        clusters=clusters, concurrency=1)


@pytest.fixture(scope="module")
def authsvc():
    """The custom endpoint's service."""
    with IdP() as server:
        yield server


@pytest.fixture(scope="module")
def validator(authsvc) -> Scripted:
    s = Scripted(json_api_key, Reply(401, {"detail": "unknown key"}))
    authsvc.route("/validate", s)
    return s


@pytest.fixture(scope="module")
def gw_callout(module_envoy, idp_a, idp_b, authsvc, validator):
    """[A, local_api_key, custom]."""
    return module_envoy(multi(jwt_provider(idp_a, "idp_a", MAPPING_A),
                              api_key_provider(),
                              custom_provider(authsvc.port)),
                        clusters={"idp_a": idp_a.port, "idp_b": idp_b.port,
                                  "authsvc": authsvc.port},
                        concurrency=1)


def sign_raw(key: tokens.SigningKey, claims: dict) -> str:
    """A JWT over `claims` without PyJWT's claim checks (e.g. a non-string `iss`)."""
    return jwt.PyJWS().encode(json.dumps(claims).encode(), key.private_key, algorithm=key.alg,
                              headers={"kid": key.kid})


def unknown_issuer_token(key_a) -> str:
    """A well-formed JWT (signed with A's key, A's audience) of an issuer nobody configured."""
    return key_a.sign(tokens.claims(sub="carol", iss="https://c.example", aud=AUD_A))


# -- 1. both issuers accepted, each with its own claims_mapping ----------------------

def test_tokens_of_both_issuers_pass_with_their_own_claims_mapping(gw, idp_a, idp_b, upstream):
    r = gw.get(API, token=idp_a.mint("alice", groups=["g1", "g2"], scope="read"))
    assert identity(r) == ("alice", {"roles": ["alice"], "teams": ["g1", "g2"]})
    # B maps only `sub`: its groups are not attributes.
    r = gw.get(API, token=idp_b.mint("bob", groups=["g3"], scope="write"))
    assert identity(r) == ("bob", {"roles": ["bob"]})
    assert upstream.count(API) == 2


def test_alternating_issuers_keep_passing(gw, idp_a, idp_b):
    for i in range(4):
        assert identity(gw.get(API, token=idp_a.mint(f"a{i}")))[0] == f"a{i}"
        assert identity(gw.get(API, token=idp_b.mint(f"b{i}")))[0] == f"b{i}"


# -- 2. a token is verified by its issuer's provider only ------------------------------

def test_cross_issuer_tokens_refused(gw, key_a, key_b, idp_b, upstream):
    cases = {
        "A's key, iss B, aud B": key_a.sign(tokens.claims(sub="mallory", iss=ISS_B, aud=AUD_B)),
        "A's key, iss A, aud B": key_a.sign(tokens.claims(sub="mallory", iss=ISS_A, aud=AUD_B)),
        "B's key, iss A, aud A": key_b.sign(tokens.claims(sub="mallory", iss=ISS_A, aud=AUD_A)),
        "B's key, iss B, aud A": key_b.sign(tokens.claims(sub="mallory", iss=ISS_B, aud=AUD_A)),
        "A's key with B's kid, iss B": key_a.sign(tokens.claims(sub="mallory", iss=ISS_B, aud=AUD_B),
                                                  kid="b-1"),
    }
    for name, token in cases.items():
        r = gw.get(API, token=token)
        assert r.status == 401, (name, r)
        assert_denied(r, 401, MSG_INVALID_JWT, token_presented=True)
    assert upstream.received() == []
    # B's own tokens are unaffected.
    assert identity(gw.get(API, token=idp_b.mint("bob"))) == ("bob", {"roles": ["bob"]})


def test_bad_token_of_a_known_issuer_refused_by_that_provider(gw, key_a, idp_a, upstream):
    expired = idp_a.mint("alice", ttl=-600)
    assert_denied(gw.get(API, token=expired), 401, MSG_INVALID_JWT, token_presented=True)
    assert_denied(gw.get(API, token=tokens.tamper(idp_a.mint("alice"))), 401, MSG_INVALID_JWT,
                  token_presented=True)
    assert upstream.received() == []


# -- 3. tokens no JWT provider claims, with no fallback ---------------------------------

@pytest.mark.parametrize("case", ["unknown_issuer", "no_iss", "iss_not_a_string", "opaque",
                                  "three_garbage_parts"])
def test_unclaimed_token_without_fallback_is_invalid_jwt(gw, key_a, case, upstream):
    token = {
        "unknown_issuer": lambda: unknown_issuer_token(key_a),
        "no_iss": lambda: key_a.sign(tokens.claims(iss=None, aud=AUD_A)),
        "iss_not_a_string": lambda: sign_raw(key_a, {**tokens.claims(aud=AUD_A), "iss": 7}),
        "opaque": lambda: "sk-opaque-0123456789",
        "three_garbage_parts": lambda: "aaa.bbb.ccc",
    }[case]()
    r = gw.get(API, token=token)
    assert_denied(r, 401, MSG_INVALID_JWT, token_presented=True)
    assert upstream.received() == []


# -- 4. fallbacks -----------------------------------------------------------------------

def test_api_key_fallback(gw_keys, idp_a, idp_b, key_a, upstream):
    assert identity(gw_keys.get(API, token=CI_KEY)) == ("ci", {"roles": ["ci"], "teams": ["build"]})
    assert identity(gw_keys.get(API, token=OGX_KEY))[0] == OGX_PRINCIPAL
    # JWT providers still get their own tokens.
    r = gw_keys.get(API, token=idp_a.mint("alice", groups=["g1"]))
    assert identity(r) == ("alice", {"roles": ["alice"], "teams": ["g1"]})
    assert identity(gw_keys.get(API, token=idp_b.mint("bob"))) == ("bob", {"roles": ["bob"]})
    assert upstream.count(API) == 4


def test_api_key_fallback_refusals(gw_keys, idp_a, key_a, upstream):
    # Tokens no JWT provider claims end at local_api_key, the last one tried.
    for token in [unknown_issuer_token(key_a), "sk-unknown-key", CI_KEY + "x", "aaa.bbb.ccc"]:
        assert_denied(gw_keys.get(API, token=token), 401, MSG_INVALID_KEY)
    # A token of A's issuer is A's alone: its refusal is A's, no key lookup.
    assert_denied(gw_keys.get(API, token=idp_a.mint("alice", aud=AUD_B)), 401, MSG_INVALID_JWT,
                  token_presented=True)
    assert upstream.received() == []


def test_callout_fallback_answers_last(gw_callout, idp_a, key_a, validator, upstream):
    """[A, local_api_key, custom]: a key local_api_key does not know goes to the
    custom endpoint, whose answer is final; keys and A's tokens never reach it."""
    hank = validator.answer(new_token("hank"), Reply(200, {"principal": "hank"}))
    assert identity(gw_callout.get(API, token=hank))[0] == "hank"
    assert validator.calls(hank) == 1

    refused = new_token("nobody")
    assert_denied(gw_callout.get(API, token=refused), 401, "Authentication failed: 401")
    assert validator.calls(refused) == 1

    stranger = unknown_issuer_token(key_a)
    assert_denied(gw_callout.get(API, token=stranger), 401, "Authentication failed: 401")
    assert validator.calls(stranger) == 1

    assert identity(gw_callout.get(API, token=CI_KEY))[0] == "ci"
    assert validator.calls(CI_KEY) == 0
    a_token = idp_a.mint("alice")
    assert identity(gw_callout.get(API, token=a_token))[0] == "alice"
    bad_a = idp_a.mint("alice", aud=AUD_B)
    assert_denied(gw_callout.get(API, token=bad_a), 401, MSG_INVALID_JWT, token_presented=True)
    assert validator.calls(a_token) == 0 and validator.calls(bad_a) == 0


# -- 5. a request without a credential -------------------------------------------------

def test_missing_credential_gets_first_providers_message(gw, gw_keys, upstream):
    for g in (gw, gw_keys):
        assert_denied(g.get(API), 401, msg_required(ISS_A), token_presented=False)
    assert upstream.received() == []
    assert gw.get("/v1/health").status == 200


@pytest.mark.parametrize("order", ["b_first", "api_key_first"])
def test_missing_credential_message_follows_the_order(envoy, idp_a, idp_b, clusters, key_a,
                                                      order, upstream):
    a = jwt_provider(idp_a, "idp_a", MAPPING_A)
    b = jwt_provider(idp_b, "idp_b", MAPPING_B)
    if order == "b_first":
        g = envoy(multi(b, a), clusters=clusters, concurrency=1)
        assert_denied(g.get(API), 401, msg_required(ISS_B), token_presented=False)
        assert identity(g.get(API, token=idp_b.mint("bob"))) == ("bob", {"roles": ["bob"]})
        assert_denied(g.get(API, token="opaque-token"), 401, MSG_INVALID_JWT, token_presented=True)
    else:
        g = envoy(multi(api_key_provider(), a), clusters=clusters, concurrency=1)
        assert_denied(g.get(API), 401, MSG_KEY_REQUIRED)
        assert identity(g.get(API, token=CI_KEY))[0] == "ci"
        assert_denied(g.get(API, token=unknown_issuer_token(key_a)), 401, MSG_INVALID_KEY)
    assert identity(g.get(API, token=idp_a.mint("alice")))[0] == "alice"


# -- 6. each provider's own JWKS ---------------------------------------------------------

def test_each_idps_jwks_is_fetched(gw, idp_a, idp_b):
    assert gw.get(API, token=idp_a.mint("alice")).status == 200
    assert gw.get(API, token=idp_b.mint("bob")).status == 200
    assert idp_a.count("/jwks") >= 1
    assert idp_b.count("/jwks") >= 1


def test_one_jwks_down_leaves_the_other_provider_working(envoy, idp_a, key_b, upstream):
    """B's JWKS unreachable from the start: B's tokens get 503, A's pass."""
    with IdP(keys=[key_b], issuer=ISS_B, audience=AUD_B) as b:
        b.down = True
        g = envoy(multi(jwt_provider(idp_a, "idp_a", MAPPING_A), jwt_provider(b, "idp_b", MAPPING_B)),
                  clusters={"idp_a": idp_a.port, "idp_b": b.port}, concurrency=1)
        assert_denied(g.get(API, token=b.mint("bob")), 503, MSG_UNAVAILABLE)
        assert identity(g.get(API, token=idp_a.mint("alice")))[0] == "alice"
        assert_denied(g.get(API, token=b.mint("bob")), 503, MSG_UNAVAILABLE)
        assert identity(g.get(API, token=idp_a.mint("alice2")))[0] == "alice2"
        assert [q.headers["x-auth-principal"] for q in upstream.received()] == ["alice", "alice2"]


# -- 7. the single-provider forms ---------------------------------------------------------

@pytest.mark.parametrize("form", ["provider_config", "provider_type"])
def test_single_provider_forms_unchanged(envoy, idp_a, idp_b, clusters, form):
    a = jwt_provider(idp_a, "idp_a", MAPPING_A)
    if form == "provider_config":
        auth = {"provider_config": a}
    else:
        auth = {"provider_type": "oauth2_token", "config": {k: v for k, v in a.items() if k != "type"}}
    g = envoy({"auth": auth}, clusters=clusters, concurrency=1)
    r = g.get(API, token=idp_a.mint("alice", groups=["g1"]))
    assert identity(r) == ("alice", {"roles": ["alice"], "teams": ["g1"]})
    assert_denied(g.get(API, token=idp_b.mint("bob")), 401, MSG_INVALID_JWT, token_presented=True)
    assert_denied(g.get(API, token="opaque-token"), 401, MSG_INVALID_JWT, token_presented=True)
    assert_denied(g.get(API), 401, msg_required(ISS_A), token_presented=False)


# -- 8. configuration errors ---------------------------------------------------------------

def _bad_configs(idp_a, idp_b, port):
    a = jwt_provider(idp_a, "idp_a", MAPPING_A)
    b = jwt_provider(idp_b, "idp_b", MAPPING_B)
    keys = api_key_provider()
    return {
        # name: (auth, acceptable keys)
        "empty": ({"providers": []}, ["auth.providers"]),
        "with_provider_config": ({"providers": [a, b], "provider_config": a}, ["auth.providers"]),
        "first_lacks_issuer": ({"providers": [{k: v for k, v in a.items() if k != "issuer"}, b]},
                               ["auth.providers[0].issuer"]),
        "second_lacks_issuer": ({"providers": [a, {k: v for k, v in b.items() if k != "issuer"}]},
                                ["auth.providers[1].issuer"]),
        "same_issuer": ({"providers": [a, {**b, "issuer": ISS_A}]}, ["auth.providers[1].issuer"]),
        "two_callouts": ({"providers": [a, custom_provider(port), introspection_provider(port)]},
                         ["auth.providers[2]"]),
        "callout_not_last": ({"providers": [a, custom_provider(port), keys]},
                             ["auth.providers[2]"]),
        "two_local_api_key": ({"providers": [a, keys, api_key_provider()]},
                              ["auth.providers[2]"]),
        "unknown_type": ({"providers": [a, {"type": "bogus"}]}, ["auth.providers[1].type"]),
    }


BAD = ["empty", "with_provider_config", "first_lacks_issuer", "second_lacks_issuer", "same_issuer",
       "two_callouts", "callout_not_last", "two_local_api_key", "unknown_type"]


@pytest.mark.parametrize("case", BAD)
def test_bad_providers_configuration_refused(expect_config_rejected, idp_a, idp_b, authsvc, case):
    auth, keys = _bad_configs(idp_a, idp_b, authsvc.port)[case]
    log = expect_config_rejected({"auth": auth},
                                 clusters={"idp_a": idp_a.port, "idp_b": idp_b.port,
                                           "authsvc": authsvc.port})
    assert any(f"configuration key `{k}`:" in log for k in keys), (keys, log)
