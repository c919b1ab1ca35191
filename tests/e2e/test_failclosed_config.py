"""Fail closed in configuration and key handling (issue #16): URLs carrying
credentials refuse to load (item 7), keys removed from a fetched set are
revoked (item 9), an explicit `audience` is checked by introspection
(item 11), and rules on `roles` under the default claims mapping are warned
about (item 12)."""

from __future__ import annotations

import time

import pytest

from harness import tokens
from harness.config import OMIT, jwt_config
from harness.providers import (Scripted, assert_denied, custom_config, form_token, identity,
                               introspection_config, new_token)
from harness.server import Reply

API = "/v1/models"
INVALID = 'Bearer error="invalid_token"'
MSG_INVALID_JWT = "Invalid JWT token"
MSG_WRONG_AUDIENCE = "Token audience not accepted"


def wait_for(gw, token: str, status: int, streak: int = 5, timeout: float = 15.0,
             pause: float = 0.1):
    """Sends requests until `streak` in a row answer `status` (or fails)."""
    start = time.monotonic()
    run, last = 0, None
    while time.monotonic() - start < timeout:
        last = gw.get(API, token=token)
        run = run + 1 if last.status == status else 0
        if run >= streak:
            return
        time.sleep(pause)
    pytest.fail(f"no {streak} answers {status} in a row within {timeout}s; last: {last!r}")


# -- item 7: credentials in callout URLs -------------------------------------------------------

USER = "u5er-in-url"
PASSWORD = "Pa55-w0rd-in-url"
USERINFO = {
    "user_and_password": f"{USER}:{PASSWORD}@",
    "user_only": f"{USER}@",
    "empty": "@",
}


def _with_url(kind: str, port: int, userinfo: str) -> tuple[dict, str, str]:
    """(plugin config, the key named in the refusal, where credentials go instead)."""
    if kind == "jwks":
        url = f"http://{userinfo}127.0.0.1:{port}/jwks"
        return jwt_config(port, jwks={"uri": url}), "auth.config.jwks.uri", "`jwks.token`"
    if kind == "introspection":
        url = f"http://{userinfo}127.0.0.1:{port}/introspect"
        return (introspection_config(port, introspection={"url": url}),
                "auth.config.introspection.url", "`introspection.client_id` and `client_secret`")
    url = f"http://{userinfo}127.0.0.1:{port}/validate"
    return (custom_config(port, endpoint=url), "auth.config.endpoint",
            "tollgate sends this endpoint no credentials of its own")


@pytest.mark.parametrize("userinfo", list(USERINFO))
@pytest.mark.parametrize("kind", ["jwks", "introspection", "custom"])
def test_url_with_credentials_refuses_to_load(expect_config_rejected, idp, kind, userinfo):
    config, key, instead = _with_url(kind, idp.port, USERINFO[userinfo])
    log = expect_config_rejected(config, clusters={"idp": idp.port, "authsvc": idp.port})
    assert f"configuration key `{key}`: the URL must not carry credentials" in log, log
    assert instead in log, log
    assert PASSWORD not in log and USER not in log, log


# -- item 9: keys removed from a fetched set -----------------------------------------------------

FAST_REFRESH = {"cache_ttl": 1, "refresh_cooldown_seconds": 1}


def test_removed_key_is_refused_the_other_keeps_working(envoy, idp, upstream):
    """One of two keys leaves the set: its tokens (cached ones included) get
    401 after the refresh, the other key's tokens still pass."""
    gone, kept = tokens.rsa_key("gone", "RS256"), tokens.ec_key("kept", "ES256")
    idp.set_keys(gone, kept)
    gw = envoy(jwt_config(idp.port, jwks=FAST_REFRESH))
    t_gone, t_kept = gone.sign(tokens.claims()), kept.sign(tokens.claims())
    wait_for(gw, t_gone, 200)
    wait_for(gw, t_kept, 200)
    idp.set_keys(kept)
    wait_for(gw, t_gone, 401)
    time.sleep(1.5)  # every worker has taken the new set in by now
    for _ in range(10):
        assert_denied(gw.get(API, token=t_gone), 401, MSG_INVALID_JWT, INVALID)
        assert gw.get(API, token=t_kept).status == 200
    upstream.reset_log()
    gw.get(API, token=t_gone)
    assert upstream.received() == []


EMPTY_SETS = {
    "keys_empty_list": {"keys": []},
    "only_unusable_keys": {"keys": [{"kty": "oct", "kid": "k1", "k": "c2VjcmV0"},
                                    tokens.rsa_key("enc").jwk(use="enc")]},
}


@pytest.mark.parametrize("case", list(EMPTY_SETS))
def test_all_keys_removed_every_token_is_refused(envoy, idp, upstream, case):
    """The IdP serves a set without usable keys: it replaces the old set, and
    tokens that passed (and were cached) get 401, not 200 for another day."""
    key = tokens.rsa_key("k1", "RS256")
    idp.set_keys(key)
    gw = envoy(jwt_config(idp.port, jwks=FAST_REFRESH))
    token = key.sign(tokens.claims())
    wait_for(gw, token, 200)
    idp.set_jwks(EMPTY_SETS[case])
    wait_for(gw, token, 401)
    time.sleep(1.5)
    upstream.reset_log()
    for t in (token, key.sign(tokens.claims(sub="bob"))):
        for _ in range(5):
            assert_denied(gw.get(API, token=t), 401, MSG_INVALID_JWT, INVALID)
    assert upstream.received() == []
    assert "JWKS has no usable keys" in gw.log_text()
    # The IdP serves the key again: it passes again (an unknown kid refreshes).
    idp.set_keys(key)
    wait_for(gw, token, 200)


@pytest.mark.parametrize("case", list(EMPTY_SETS))
def test_first_set_without_keys_answers_401(envoy, idp, upstream, case):
    """A set without usable keys is an answer, not an outage: 401, not 503."""
    idp.set_jwks(EMPTY_SETS[case])
    gw = envoy(jwt_config(idp.port), concurrency=1)
    token = tokens.rsa_key("k1", "RS256").sign(tokens.claims())
    assert_denied(gw.get(API, token=token), 401, MSG_INVALID_JWT, INVALID)
    assert upstream.received() == []


# -- item 11: introspection and an explicit audience ---------------------------------------------

def _introspection_gateway(envoy, idp, **auth_config):
    s = Scripted(form_token, Reply(200, {"active": False}))
    idp.route("/introspect", s)
    return envoy(introspection_config(idp.port, **auth_config), concurrency=1), s


def _active(aud) -> Reply:
    doc = {"active": True, "sub": "alice", "exp": int(time.time()) + 3600}
    if aud is not None:
        doc["aud"] = aud
    return Reply(200, doc)


@pytest.mark.parametrize("audience", ["llama-stack", ["api", "llama-stack"]])
def test_explicit_audience_is_checked_by_introspection(envoy, idp, upstream, audience):
    gw, s = _introspection_gateway(envoy, idp, audience=audience)
    other = s.answer(new_token("other"), _active(["other"]))
    absent = s.answer(new_token("absent"), _active(None))
    string = s.answer(new_token("string"), _active("llama-stack"))
    listed = s.answer(new_token("listed"), _active(["other", "llama-stack"]))
    for t in (other, absent):
        assert_denied(gw.get(API, token=t), 401, MSG_WRONG_AUDIENCE, INVALID)
    assert upstream.received() == []
    for t in (string, listed):
        assert identity(gw.get(API, token=t))[0] == "alice"


def test_without_audience_introspection_does_not_read_aud(envoy, idp):
    gw, s = _introspection_gateway(envoy, idp, audience=OMIT)
    for aud in (["other"], None, 5):
        t = s.answer(new_token("t"), _active(aud))
        assert identity(gw.get(API, token=t))[0] == "alice"


# -- item 12: `roles` rules under the default claims mapping --------------------------------------

ROLES_RULE = {"path_prefix": "/v1/admin/", "required_attributes": {"roles": ["admin"]}}
WARNING = ("route_scopes[0].required_attributes.roles: the default claims_mapping puts the "
           "caller's `sub` and `username` into `roles`")


def test_roles_rule_under_default_mapping_is_warned_about(envoy, idp):
    key = tokens.rsa_key("k1", "RS256")
    idp.set_keys(key)
    config = jwt_config(idp.port, claims_mapping=OMIT)
    config["route_scopes"] = [ROLES_RULE]
    gw = envoy(config, concurrency=1)
    # The hazard itself: a user named `admin` satisfies the rule.
    assert gw.get("/v1/admin/x", token=key.sign(tokens.claims(sub="admin"))).status == 200
    assert gw.get("/v1/admin/x", token=key.sign(tokens.claims(sub="bob"))).status == 403
    time.sleep(0.2)
    lines = [l for l in gw.log_text().splitlines() if WARNING in l]
    assert lines, gw.log_tail()
    assert all("warn" in l.lower() for l in lines), lines


def test_no_warning_with_an_explicit_mapping(envoy, idp):
    idp.set_keys(tokens.rsa_key("k1", "RS256"))
    config = jwt_config(idp.port, claims_mapping={"realm_access.roles": "roles"})
    config["route_scopes"] = [ROLES_RULE]
    gw = envoy(config, concurrency=1)
    assert gw.get("/v1/health").status == 200
    time.sleep(0.2)
    assert "the default claims_mapping puts" not in gw.log_text()
