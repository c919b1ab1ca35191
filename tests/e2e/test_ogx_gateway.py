"""tollgate as the gateway in front of OGX (issue #20): what it forwards is
read by OGX 1.5.0's own `UpstreamHeaderAuthProvider.validate_token`
(`ogx/core/server/auth_providers.py`, loaded from the wheel by
harness/ogx.py) into the same user — principal, attributes, tenant — that
OGX's own `oauth2_token` provider builds from the token
(`get_attributes_from_claims`, `tenant_claim` through `_resolve_tenant_id`,
same file)."""

from __future__ import annotations

import json

import pytest

from harness import ogx as ogx_code
from harness import tokens
from harness.config import jwt_config

_reason = ogx_code.skip_reason()
pytestmark = pytest.mark.skipif(_reason is not None, reason=_reason or "")

MAPPING = {"sub": "roles", "groups": "teams", "scope": "scopes", "project": "projects"}

# The pair the README shows: tollgate's forward block and OGX's
# server.auth.provider_config (run.yaml), header for header.
FORWARD = {"principal_header": "x-auth-principal", "attributes_header": "x-auth-attributes",
           "tenant_header": "x-tenant-id", "strip_authorization": True}
OGX_PROVIDER = {"principal_header": "x-auth-principal", "attributes_header": "x-auth-attributes",
                "tenant_header": "x-tenant-id"}


@pytest.fixture(scope="module")
def ogx():
    return ogx_code.load()


def gateway(module_envoy, module_idp, key, forward=FORWARD, **auth):
    module_idp.set_keys(key)
    config = jwt_config(module_idp.port, claims_mapping=MAPPING, tenant_claim="org", **auth)
    config["forward"] = forward
    return module_envoy(config)


def forwarded(upstream) -> list[tuple[str, str]]:
    (req,) = upstream.received()
    return req.header_list


def as_ogx_would(ogx, claims: dict):
    """The user OGX's own oauth2_token provider builds from these claims."""
    tenant = claims.get("org")
    return (claims["sub"], ogx.attributes_from_claims(claims, MAPPING),
            ogx.resolve_tenant_id(tenant) if isinstance(tenant, str) else None)


@pytest.mark.parametrize("claims", [
    {"sub": "alice", "groups": ["ml", "ops"], "scope": "models.read files.write", "org": "Acme-Corp"},
    {"sub": "bob", "groups": ["ml"], "org": "  tenant_7 "},
    {"sub": "carol", "scope": "x", "project": "p1 p2"},            # no tenant claim
    {"sub": "dave@example.com", "groups": ["équipe", "ml"], "org": "acme"},  # non-ASCII value
])
def test_what_tollgate_forwards_ogx_reads_as_the_same_user(module_envoy, module_idp, rsa, upstream,
                                                          ogx, claims):
    e = gateway(module_envoy, module_idp, rsa)
    r = e.get("/v1/models", token=rsa.sign(tokens.claims(**claims)))
    assert r.status == 200, r
    headers = forwarded(upstream)
    assert "authorization" not in dict(headers)
    user = ogx.upstream_user(headers, **OGX_PROVIDER)
    principal, attributes, tenant = as_ogx_would(ogx, claims)
    assert (user.principal, user.attributes, user.tenant_id) == (principal, attributes, tenant)


def test_per_category_headers_merge_in_ogx_into_the_same_attributes(module_envoy, module_idp, rsa,
                                                                    upstream, ogx):
    forward = dict(FORWARD, attribute_headers={"X-MaaS-Group": "teams", "X-MaaS-Project": "projects"})
    e = gateway(module_envoy, module_idp, rsa, forward=forward)
    claims = {"sub": "erin", "groups": ["ml", "ops"], "scope": "a b", "org": "acme"}
    assert e.get("/v1/models", token=rsa.sign(tokens.claims(**claims))).status == 200
    headers = forwarded(upstream)
    assert json.loads(dict(headers)["x-maas-group"]) == ["ml", "ops"]
    assert "teams" not in json.loads(dict(headers)["x-auth-attributes"])
    assert "x-maas-project" not in dict(headers)  # no project claim: no header
    user = ogx.upstream_user(headers, **OGX_PROVIDER,
                             attribute_headers={"X-MaaS-Group": "teams", "X-MaaS-Project": "projects"})
    assert (user.principal, user.attributes, user.tenant_id) == as_ogx_would(ogx, claims)


def test_claim_values_of_every_json_type(module_envoy, module_idp, rsa, upstream, ogx):
    """Numbers and booleans in a list claim are forwarded as JSON text (1,
    2.5, true), objects and nulls left out; OGX reads them back as those
    strings (its own provider would hand pydantic the raw values, which its
    `dict[str, list[str]]` refuses)."""
    e = gateway(module_envoy, module_idp, rsa)
    claims = {"sub": "frank", "groups": ["a", 1, 2.5, True, None, {"x": 1}, ["n"]]}
    assert e.get("/v1/models", token=rsa.sign(tokens.claims(**claims))).status == 200
    user = ogx.upstream_user(forwarded(upstream), **OGX_PROVIDER)
    assert user.attributes["teams"] == ["a", "1", "2.5", "true"]


def test_a_tenant_ogx_would_refuse_is_a_401(module_envoy, module_idp, rsa, upstream, ogx):
    e = gateway(module_envoy, module_idp, rsa)
    for bad in ["Acme Corp", "-acme", "a" * 129, "acme!"]:
        with pytest.raises(ValueError):
            ogx.resolve_tenant_id(bad)
        r = e.get("/v1/models", token=rsa.sign(tokens.claims(sub="g", org=bad)))
        assert r.status == 401, (bad, r)
        assert json.loads(r.body) == {"error": {
            "message": "tenant_id must match [a-z0-9][a-z0-9-_]{0,127}"}}
    assert upstream.received() == []
    # Blank or not a string: no tenant (as OGX).
    for none in ["   ", 7]:
        upstream.reset_log()
        assert e.get("/v1/models", token=rsa.sign(tokens.claims(sub="g", org=none))).status == 200
        assert ogx.upstream_user(forwarded(upstream), **OGX_PROVIDER).tenant_id is None


def test_clients_cannot_forge_the_identity_headers(module_envoy, module_idp, rsa, upstream, ogx):
    forward = dict(FORWARD, attribute_headers={"X-MaaS-Group": "teams"})
    e = gateway(module_envoy, module_idp, rsa, forward=forward)
    forged = {"x-tenant-id": "other", "X_Tenant_Id": "other2", "x-maas-group": '["admins"]',
              "x-auth-principal": "root", "x-auth-attributes": '{"roles": ["admin"]}'}
    r = e.get("/v1/models", token=rsa.sign(tokens.claims(sub="henry")), headers=forged)
    assert r.status == 200
    headers = forwarded(upstream)
    names = [k for k, _ in headers]
    assert "x_tenant_id" not in names and "x-tenant-id" not in names
    assert "x-maas-group" not in names
    user = ogx.upstream_user(headers, **OGX_PROVIDER, attribute_headers={"X-MaaS-Group": "teams"})
    assert (user.principal, user.tenant_id) == ("henry", None)
    assert user.attributes == {"roles": ["henry"]}


def readme_pair() -> tuple[dict, dict]:
    """The README's pair: tollgate's JSON and OGX's run.yaml provider_config."""
    import re

    import yaml

    text = (ogx_code.REPO_ROOT / "README.md").read_text()
    section = text.split("## The gateway in front of OGX", 1)[1].split("\n## ", 1)[0]
    tollgate = json.loads(re.search(r"```json\n(.*?)```", section, re.S).group(1))
    run_yaml = yaml.safe_load(re.search(r"```yaml\n(.*?)```", section, re.S).group(1))
    return tollgate, run_yaml["server"]["auth"]["provider_config"]


def test_the_readme_pair_end_to_end(module_envoy, module_idp, rsa, upstream, ogx):
    """The README's migration pair as written, but for the IdP's address:
    tollgate in a real Envoy, OGX's upstream_header provider on what it
    forwards (its trusted_proxy_cidrs pointed at this machine)."""
    config, provider = readme_pair()
    jwt = config["auth"]["provider_config"]
    jwt["jwks"] = {"uri": f"http://127.0.0.1:{module_idp.port}/jwks", "cluster": "idp"}
    module_idp.set_keys(rsa)
    e = module_envoy(config)
    assert provider.pop("type") == "upstream_header"
    provider["trusted_proxy_cidrs"] = ["127.0.0.0/8"]
    claims = dict(sub="ivy", groups=["ogx-users"], scope="models.read", org="Acme",
                  aud=jwt["audience"], iss=jwt["issuer"])
    r = e.get("/v1/models", token=rsa.sign(tokens.claims(**claims)))
    assert r.status == 200, r
    user = ogx.upstream_user(forwarded(upstream), **provider)
    mapping = jwt["claims_mapping"]
    assert (user.principal, user.attributes, user.tenant_id) == (
        "ivy", ogx.attributes_from_claims(claims, mapping), "acme")
    # Its route_policy: not a member of ogx-users → 403; health passes.
    upstream.reset_log()
    outsider = rsa.sign(tokens.claims(sub="jay", groups=["others"], aud=jwt["audience"],
                                      iss=jwt["issuer"]))
    assert e.get("/v1/models", token=outsider).status == 403
    assert e.get("/v1/health", token=outsider).status == 200


@pytest.mark.parametrize("key", ["tenant", "tenant_principal"])
def test_quotas_can_be_keyed_by_tenant(module_envoy, module_idp, rsa, key):
    module_idp.set_keys(rsa)
    config = jwt_config(module_idp.port, claims_mapping=MAPPING, tenant_claim="org")
    config["quota"] = {"authenticated_max_requests": 3, "period": "day", "key": key}
    e = module_envoy(config)
    org = f"org-{key.replace('_', '-')}"

    def get(sub: str, tenant: str | None) -> int:
        return e.get("/v1/models", token=rsa.sign(tokens.claims(sub=sub, org=tenant))).status

    got = [get("alice", org), get("alice", org), get("bob", org), get("bob", org)]
    if key == "tenant":  # the tenant shares 3
        assert got == [200, 200, 200, 429], got
    else:  # each principal of the tenant has 3
        assert got == [200, 200, 200, 200], got
    assert get("alice", org + "-b") == 200   # another tenant
    assert get("alice", None) == 200         # no tenant: the principal's own count


def test_tenants_from_introspection_and_the_custom_endpoint(envoy, idp, upstream, ogx):
    """tenant_claim on an introspection answer (OGX introspect_token reads
    fields.get(tenant_claim)) and tenant_field on a custom endpoint's answer
    (OGX CustomAuthProvider reads response_data.get(tenant_field))."""
    from harness.idp import IdP
    from harness.providers import (Scripted, custom_config, form_token, introspection_config,
                                   json_api_key, new_token)
    from harness.server import Reply

    introspector = Scripted(form_token, Reply(200, {"active": False}))
    idp.route("/introspect", introspector)
    e = envoy(introspection_config(idp.port, tenant_claim="org",
                                   forward={"tenant_header": "x-tenant-id"}))
    t = introspector.answer(new_token(), Reply(200, {"active": True, "sub": "kim", "org": " ACME "}))
    assert e.get("/v1/models", token=t).status == 200
    user = ogx.upstream_user(forwarded(upstream), **OGX_PROVIDER)
    assert (user.principal, user.tenant_id) == ("kim", "acme")
    bad = introspector.answer(new_token(), Reply(200, {"active": True, "sub": "kim", "org": "A B"}))
    r = e.get("/v1/models", token=bad)
    assert r.status == 401 and b"tenant_id must match" in r.body

    with IdP() as svc:
        validator = Scripted(json_api_key, Reply(401, {"detail": "unknown key"}))
        svc.route("/validate", validator)
        c = envoy(custom_config(svc.port, tenant_field="tenant_id",
                                forward={"tenant_header": "x-tenant-id"}),
                  clusters={"authsvc": svc.port})
        key = validator.answer(new_token(), Reply(200, {"principal": "lee", "tenant_id": "Team-9"}))
        upstream.reset_log()
        assert c.get("/v1/models", token=key).status == 200
        user = ogx.upstream_user(forwarded(upstream), **OGX_PROVIDER)
        assert (user.principal, user.tenant_id) == ("lee", "team-9")
