"""OGX's own code for reading what tollgate forwards, loaded from the ogx 1.5.0
wheel (`make setup` downloads it to build/ogx/; OGX needs Python >= 3.12, so
it is not installed, and its modules import a server's worth of packages).

The functions and the class below are taken from the wheel's source as they
are — not copied or re-written here — and run with small stand-ins for what
they reference (the `User` model, the provider base class, a logger):

- `ogx/core/server/auth_providers.py`: `UpstreamHeaderAuthProvider`
  (`validate_token`: the gateway's headers → `User`), `_resolve_tenant_id`,
  `get_attributes_from_claims` (what OGX's own `oauth2_token` provider builds
  from a token's claims);
- `ogx/core/datatypes.py`: `_TENANT_ID_RE`, `_validate_tenant_id`.

    ogx = load()
    user = ogx.upstream_user(headers, principal_header="x-auth-principal", ...)
    user.principal, user.attributes, user.tenant_id"""

from __future__ import annotations

import ast
import asyncio
import hashlib
import ipaddress
import json
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[3]
WHEEL = REPO_ROOT / "build" / "ogx" / "ogx-1.5.0-py3-none-any.whl"
WHEEL_SHA256 = "8812a6f2ed353cb0fc6474956e5b0050cc221633ee2f0b184942c132edb46a78"

AUTH_PROVIDERS = "ogx/core/server/auth_providers.py"
DATATYPES = "ogx/core/datatypes.py"


def skip_reason() -> str | None:
    if not WHEEL.exists():
        return f"{WHEEL.relative_to(REPO_ROOT)} is missing (make setup downloads it)"
    return None


@dataclass
class User:
    """Stand-in for ogx.core.datatypes.User (principal, attributes, tenant_id)."""
    principal: str
    attributes: dict[str, list[str]] | None = None
    tenant_id: str | None = None


class UntrustedProxyError(Exception):
    pass


class _Logger:
    def __getattr__(self, name):
        return lambda *a, **k: None


def _pick(source: str, names: set[str]) -> list[ast.stmt]:
    """The top-level definitions and assignments of `names` in `source`."""
    out = []
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name in names:
            out.append(node)
        elif isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id in names for t in node.targets):
            out.append(node)
    found = {getattr(n, "name", None) or n.targets[0].id for n in out}
    missing = names - found
    if missing:
        raise LookupError(f"not in the wheel's source: {sorted(missing)}")
    return out


def load() -> SimpleNamespace:
    data = WHEEL.read_bytes()
    if hashlib.sha256(data).hexdigest() != WHEEL_SHA256:
        raise RuntimeError(f"{WHEEL} is not the ogx 1.5.0 wheel this was checked against")
    with zipfile.ZipFile(WHEEL) as z:
        providers = z.read(AUTH_PROVIDERS).decode()
        datatypes = z.read(DATATYPES).decode()
    ns: dict[str, Any] = {
        "json": json, "ipaddress": ipaddress, "re": re, "Any": Any, "Scope": dict,
        "User": User, "UntrustedProxyError": UntrustedProxyError, "logger": _Logger(),
        "AuthProvider": object, "UpstreamHeaderAuthConfig": SimpleNamespace,
    }
    nodes = _pick(datatypes, {"_TENANT_ID_RE", "_validate_tenant_id"})
    nodes += _pick(providers, {"_resolve_tenant_id", "get_attributes_from_claims",
                               "UpstreamHeaderAuthProvider"})
    exec(compile(ast.Module(body=nodes, type_ignores=[]), f"ogx-1.5.0:{AUTH_PROVIDERS}", "exec"), ns)

    def upstream_user(headers: list[tuple[str, str | bytes]], **config) -> User:
        """What OGX's `upstream_header` provider makes of these request
        headers (as an ASGI server hands them over: names lower-case bytes)."""
        cfg = SimpleNamespace(principal_header=None, tenant_header=None, attributes_header=None,
                              attribute_headers=None, trusted_proxy_cidrs=None)
        for k, v in config.items():
            setattr(cfg, k, v)
        provider = ns["UpstreamHeaderAuthProvider"](cfg)
        scope = {"type": "http", "client": ("127.0.0.1", 1),
                 "headers": [(k.lower().encode(), v if isinstance(v, bytes) else v.encode("latin-1"))
                             for k, v in headers]}
        return asyncio.run(provider.validate_token("", scope))

    return SimpleNamespace(upstream_user=upstream_user,
                           resolve_tenant_id=ns["_resolve_tenant_id"],
                           attributes_from_claims=ns["get_attributes_from_claims"])
