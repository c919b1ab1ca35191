"""OGX's `route_policy` at the edge (issue #20) through a real Envoy: rules as
OGX 1.5.0 writes them (`ogx/core/access_control/datatypes.py`
`RouteAccessRule`, its docstring's examples; semantics of
`ogx/core/access_control/route_access.py` `is_route_allowed`), pasted at the
top level or inside `auth`, beside `route_scopes`."""

from __future__ import annotations

import json

import pytest

from harness import tokens
from harness.config import jwt_config

# The examples of OGX's RouteAccessRule docstring, then rules of every form.
OGX_EXAMPLES = [
    {"permit": {"paths": "/v1/chat/completions"}, "when": "user with developer in roles",
     "description": "developers can access chat completions"},
    {"permit": {"paths": ["/v1/files*", "/v1/models*"]}, "when": "user with user in roles",
     "description": "users can access files and models routes"},
    {"permit": {"paths": "*"}, "when": "user with admin in roles",
     "description": "admins have access to all routes"},
]
MORE = [
    {"forbid": {"paths": "/v1/secrets*"}, "unless": ["user with ops in teams"]},
    {"permit": {"paths": "regex:/v1/(vector_stores|inference)/[a-z0-9_]+$"},
     "when": ["user with rag in teams", "user with interns not in teams"]},
    {"permit": {"paths": ["/v1/health", "/v1/version"]}},
]


def refused(route: str) -> dict:
    m = f"Access denied: insufficient permissions for route {route}"
    return {"error": {"message": m, "detail": m}}


@pytest.fixture(scope="module")
def gw(module_envoy, module_idp, rsa):
    module_idp.set_keys(rsa)
    config = jwt_config(module_idp.port, claims_mapping={"roles": "roles", "groups": "teams",
                                                         "scope": "scopes"})
    config["route_policy"] = MORE[:2] + OGX_EXAMPLES + MORE[2:]
    return module_envoy(config)


def token(key, roles=(), teams=()) -> str:
    return key.sign(tokens.claims(sub="someone", roles=list(roles), groups=list(teams)))


@pytest.mark.parametrize("roles,path,allowed", [
    (["developer"], "/v1/chat/completions", True),
    (["developer"], "/v1/chat/completions/", True),       # trailing slash removed
    (["developer"], "/v1/models", False),
    (["user"], "/v1/files", True),
    (["user"], "/v1/files/file-1/content", True),          # prefix*
    (["user"], "/v1/models/llama", True),
    (["user"], "/v1/chat/completions", False),
    (["admin"], "/v1/anything/else", True),                # *
    ([], "/v1/models", False),                             # no rule matches: deny
])
def test_ogx_docstring_examples(gw, rsa, upstream, roles, path, allowed):
    before = len(upstream.received())
    r = gw.get(path, token=token(rsa, roles))
    if allowed:
        assert r.status == 200, r
    else:
        assert r.status == 403, r
        assert json.loads(r.body) == refused(path.rstrip("/"))
        assert len(upstream.received()) == before, "a refused request reached the upstream"


def test_forbid_unless_and_regex_rules(gw, rsa):
    # forbid ... unless: refused to all but ops, even to admins (first match decides).
    assert gw.get("/v1/secrets/x", token=token(rsa, ["admin"])).status == 403
    assert gw.get("/v1/secrets/x", token=token(rsa, ["admin"], ["ops"])).status == 200
    # regex, anchored at the start only as Python's re.match; `when` is a list: all hold.
    assert gw.get("/v1/vector_stores/vs_1", token=token(rsa, [], ["rag"])).status == 200
    assert gw.get("/v1/inference/chat", token=token(rsa, [], ["rag"])).status == 200
    assert gw.get("/v1/vector_stores/vs_1", token=token(rsa, [], ["rag", "interns"])).status == 403
    assert gw.get("/v1/vector_stores/vs_1/files", token=token(rsa, [], ["rag"])).status == 403


def test_rules_without_conditions_hold_for_everyone(gw, rsa):
    assert gw.get("/v1/health", token=token(rsa)).status == 200
    assert gw.get("/v1/version", token=token(rsa)).status == 200


def test_anonymous_requests_only_pass_rules_without_conditions(module_envoy, module_idp, rsa):
    config = jwt_config(module_idp.port, public_paths=["/v1/health", "/v1/public/*"])
    config["auth"]["route_policy"] = [  # pasted inside auth, as in OGX's server.auth
        {"permit": {"paths": "/v1/health"}},
        {"permit": {"paths": "/v1/public*"}, "when": "user with admin in roles"},
    ]
    e = module_envoy(config)
    assert e.get("/v1/health").status == 200
    r = e.get("/v1/public/x")
    assert r.status == 403 and json.loads(r.body) == refused("/v1/public/x")


def test_route_policy_and_route_scopes_both_apply(module_envoy, module_idp, rsa):
    config = jwt_config(module_idp.port, claims_mapping={"roles": "roles", "scope": "scopes"})
    config["route_policy"] = [{"permit": {"paths": "/v1/admin*"}, "when": "user with admin in roles"}]
    config["route_scopes"] = [{"path_prefix": "/v1/admin/", "required_scope": "admin.write"}]
    e = module_envoy(config)
    admin = rsa.sign(tokens.claims(roles=["admin"], scope="admin.write"))
    assert e.get("/v1/admin/x", token=admin).status == 200
    no_scope = rsa.sign(tokens.claims(roles=["admin"]))
    r = e.get("/v1/admin/x", token=no_scope)
    assert r.status == 403 and b"required scope: admin.write" in r.body
    r = e.get("/v1/admin/x", token=rsa.sign(tokens.claims(scope="admin.write")))
    assert r.status == 403 and json.loads(r.body) == refused("/v1/admin/x")


@pytest.mark.parametrize("rules,key", [
    ([{"permit": {"paths": "regex:(?<=v1)/x"}}], "route_policy[0].permit.paths"),
    ([{"permit": {"paths": "*"}, "when": "user is admin"}], "route_policy[0].when"),
    ([{"permit": {"paths": "*"}, "forbid": {"paths": "*"}}], "route_policy[0]"),
])
def test_bad_rules_refuse_to_load_naming_the_key(expect_config_rejected, module_idp, rules, key):
    config = jwt_config(module_idp.port)
    config["route_policy"] = rules
    log = expect_config_rejected(config)
    assert key in log, log
