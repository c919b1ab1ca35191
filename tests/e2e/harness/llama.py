"""Configurations written by the real Llama Stack 0.2.12 package.

`make setup` installs `llama-stack==0.2.12` (the newest that runs on Python
3.11) into its own venv, `build/llama-venv`, from tests/requirements-llama-stack.txt.
`dump_0_2_12(...)` builds `ServerConfig(auth=AuthenticationConfig(...),
quota=QuotaConfig(...))` objects there with the package's own pydantic models
(each provider's config model validated first, as `create_auth_provider`
does) and returns their `model_dump(mode="json")`, unchanged."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]


def llama_python() -> Path:
    """`$LLAMA_STACK_PYTHON`, else build/llama-venv/bin/python."""
    p = os.environ.get("LLAMA_STACK_PYTHON")
    return Path(p) if p else REPO_ROOT / "build/llama-venv/bin/python"


_SCRIPT = r'''
import json, sys
from importlib.metadata import version
from llama_stack.distribution.datatypes import AuthenticationConfig, QuotaConfig, ServerConfig
from llama_stack.distribution.server.auth_providers import (
    CustomAuthProviderConfig, OAuth2IntrospectionConfig, OAuth2JWKSConfig,
    OAuth2TokenAuthProviderConfig)
from llama_stack.providers.utils.kvstore.config import SqliteKVStoreConfig

args = json.loads(sys.argv[1])

def auth(provider_type, provider_config):
    # As a run.yaml holds it: the provider's own model, dumped into `config`.
    return AuthenticationConfig(provider_type=provider_type,
                                config=provider_config.model_dump(mode="json"))

quota = QuotaConfig(kvstore=SqliteKVStoreConfig(db_path="/tmp/tollgate-quota.db"),
                    anonymous_max_requests=args["anonymous_max_requests"],
                    authenticated_max_requests=args["authenticated_max_requests"],
                    period="day")
servers = {
    "jwks": ServerConfig(auth=auth("oauth2_token", OAuth2TokenAuthProviderConfig(
        issuer=args["issuer"],
        claims_mapping={"sub": "roles", "groups": "teams", "scope": "scopes"},
        jwks=OAuth2JWKSConfig(uri=args["jwks_uri"]))), quota=quota),
    "jwks_defaults": ServerConfig(auth=auth("oauth2_token", OAuth2TokenAuthProviderConfig(
        jwks=OAuth2JWKSConfig(uri=args["jwks_uri"], key_recheck_period=600)))),
    "introspection": ServerConfig(auth=auth("oauth2_token", OAuth2TokenAuthProviderConfig(
        jwks=None,
        introspection=OAuth2IntrospectionConfig(url=args["introspection_url"],
                                                client_id="gw", client_secret="s3cret")))),
    "introspection_secret_in_body": ServerConfig(auth=auth("oauth2_token",
        OAuth2TokenAuthProviderConfig(jwks=None, claims_mapping={"scope": "scopes"},
            introspection=OAuth2IntrospectionConfig(url=args["introspection_url"],
                client_id="gw", client_secret="s3cret", send_secret_in_body=True)))),
    "custom": ServerConfig(auth=auth("custom", CustomAuthProviderConfig(
        endpoint=args["custom_url"])), quota=quota),
    "quota_only": ServerConfig(quota=quota),
}
out = {name: s.model_dump(mode="json") for name, s in servers.items()}
out["_version"] = version("llama_stack")
print(json.dumps(out))
'''


def dump_0_2_12(*, jwks_uri: str, introspection_url: str, custom_url: str, issuer: str,
                anonymous_max_requests: int = 2, authenticated_max_requests: int = 3) -> dict:
    """`{name: ServerConfig(...).model_dump(mode="json")}` from llama-stack 0.2.12,
    plus `_version`. Names: jwks, jwks_defaults, introspection,
    introspection_secret_in_body, custom, quota_only."""
    py = llama_python()
    if not py.exists():
        raise FileNotFoundError(f"no Llama Stack venv at {py}: run `make setup`")
    args = json.dumps({
        "jwks_uri": jwks_uri, "introspection_url": introspection_url, "custom_url": custom_url,
        "issuer": issuer, "anonymous_max_requests": anonymous_max_requests,
        "authenticated_max_requests": authenticated_max_requests,
    })
    done = subprocess.run([str(py), "-c", _SCRIPT, args], capture_output=True, text=True,
                          timeout=120, cwd="/tmp")
    if done.returncode != 0:
        raise RuntimeError(f"llama-stack dump failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
