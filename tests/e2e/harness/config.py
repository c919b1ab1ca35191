"""Plugin configurations for the tests, built from the contract's example."""

from __future__ import annotations

import copy

ISSUER = "https://idp.example"
AUDIENCE = "llama-stack"
CLAIMS_MAPPING = {"sub": "roles", "groups": "teams", "scope": "scopes"}


class _Omit:
    def __repr__(self):
        return "OMIT"


OMIT = _Omit()  # pass as a value to leave the key out entirely


def _merge(base: dict, changes: dict | None) -> dict:
    """`base` updated with `changes`, recursively; OMIT removes a key."""
    out = copy.deepcopy(base)
    for k, v in (changes or {}).items():
        if v is OMIT:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def jwt_config(idp_port: int, *, jwks: dict | None = None, forward: dict | None = None,
               llama_form: bool = False, **auth_config) -> dict:
    """The oauth2_token configuration pointing at the IdP on `idp_port`.

    `jwks` and `forward` are merged into their defaults (`forward=OMIT` leaves
    `forward` out); other keyword arguments
    override keys of `auth.config` (e.g. `issuer=OMIT`, `clock_skew_seconds=0`),
    except `public_paths`, which is top-level. `llama_form=True` writes
    `auth.provider_config` with `type` instead of `provider_type` + `config`."""
    public_paths = auth_config.pop("public_paths", ["/v1/health"])
    config = _merge({
        "audience": AUDIENCE,
        "issuer": ISSUER,
        "claims_mapping": CLAIMS_MAPPING,
        "clock_skew_seconds": 60,
        "jwks": _merge({
            "uri": f"http://127.0.0.1:{idp_port}/jwks",
            "cluster": "idp",
            "cache_ttl": 3600,
            "timeout_ms": 5000,
            "token": None,
            "refresh_cooldown_seconds": 10,
        }, jwks),
    }, auth_config)
    if llama_form:
        auth = {"provider_config": {"type": "oauth2_token", **config}}
    else:
        auth = {"provider_type": "oauth2_token", "config": config}
    out = {"auth": auth, "public_paths": public_paths}
    if forward is not OMIT:
        out["forward"] = _merge({
            "principal_header": "x-auth-principal",
            "attributes_header": "x-auth-attributes",
            "strip_authorization": False,
        }, forward)
    if public_paths is OMIT:
        del out["public_paths"]
    return out
