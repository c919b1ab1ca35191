"""Helpers for the callout providers (`oauth2_token` with `introspection`, and
`custom`): their plugin configurations, and a scripted endpoint that answers
per token and counts the calls it gets for each one."""

from __future__ import annotations

import collections
import dataclasses
import json
import socket
import threading
import uuid
from typing import Callable, Union
from urllib.parse import parse_qs

from harness.config import CLAIMS_MAPPING, ISSUER, _merge
from harness.server import Reply, Request

CLIENT_ID = "gw"
CLIENT_SECRET = "s3cret"


def introspection_config(port: int, *, cluster: str = "idp", path: str = "/introspect",
                         introspection: dict | None = None, **auth_config) -> dict:
    """`oauth2_token` with introspection at `http://127.0.0.1:<port><path>`.

    `introspection` is merged into the contract's example; other keyword
    arguments override keys of `auth.config` (`harness.config.OMIT` removes
    one); `public_paths`, `forward` and `log_level` are top-level."""
    top = {k: auth_config.pop(k) for k in ("public_paths", "forward", "log_level") if k in auth_config}
    config = _merge({
        "introspection": _merge({
            "url": f"http://127.0.0.1:{port}{path}",
            "cluster": cluster,
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "send_secret_in_body": False,
            "timeout_ms": 10000,
        }, introspection),
        "issuer": ISSUER,
        "claims_mapping": CLAIMS_MAPPING,
        "cache_ttl": 30,
    }, auth_config)
    return _top_level({"provider_type": "oauth2_token", "config": config}, top)


def custom_config(port: int, *, cluster: str = "authsvc", path: str = "/validate",
                  **auth_config) -> dict:
    """`custom` with its endpoint at `http://127.0.0.1:<port><path>`; keyword
    arguments as for `introspection_config`."""
    top = {k: auth_config.pop(k) for k in ("public_paths", "forward", "log_level") if k in auth_config}
    config = _merge({
        "endpoint": f"http://127.0.0.1:{port}{path}",
        "cluster": cluster,
        "timeout_ms": 10000,
        "cache_ttl": 30,
    }, auth_config)
    return _top_level({"provider_type": "custom", "config": config}, top)


def _top_level(auth: dict, top: dict) -> dict:
    out = {
        "auth": auth,
        "public_paths": top.get("public_paths", ["/v1/health"]),
        "forward": _merge({
            "principal_header": "x-auth-principal",
            "attributes_header": "x-auth-attributes",
            "strip_authorization": False,
        }, top.get("forward")),
    }
    if "log_level" in top:
        out["log_level"] = top["log_level"]
    return out


def new_token(label: str = "tok") -> str:
    """A token nobody has used yet."""
    return f"{label}-{uuid.uuid4().hex}"


def free_port() -> int:
    """A port nothing listens on (bound then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def form_token(req: Request) -> str | None:
    """The `token` form field of an introspection request."""
    values = parse_qs(req.body.decode("latin-1")).get("token")
    return values[0] if values else None


def json_api_key(req: Request) -> str | None:
    """The `api_key` of a custom endpoint request."""
    try:
        doc = json.loads(req.body)
    except ValueError:
        return None
    return doc.get("api_key") if isinstance(doc, dict) else None


Answer = Union[Reply, Callable[[Request], Reply]]


class Scripted:
    """An endpoint handler (for `IdP.route`) answering per token.

    `answer(token, reply)` scripts a token: `reply` is a `Reply` (copied on each
    call) or a function `request -> Reply`. Unscripted tokens get `default`.
    `calls(token)` is how many requests carried that token; `requests(token)`
    are those requests."""

    def __init__(self, token_of: Callable[[Request], str | None], default: Answer):
        self._token_of = token_of
        self._default = default
        self._answers: dict[str, Answer] = {}
        self._seen: dict[str | None, list[Request]] = collections.defaultdict(list)
        self._lock = threading.Lock()

    def answer(self, token: str, reply: Answer) -> str:
        with self._lock:
            self._answers[token] = reply
        return token

    def calls(self, token: str) -> int:
        with self._lock:
            return len(self._seen.get(token, ()))

    def requests(self, token: str) -> list[Request]:
        with self._lock:
            return list(self._seen.get(token, ()))

    def __call__(self, req: Request) -> Reply:
        token = self._token_of(req)
        with self._lock:
            self._seen[token].append(req)
            reply = self._answers.get(token, self._default)
        if callable(reply):
            return reply(req)
        return dataclasses.replace(reply, headers=dict(reply.headers))


def sequence(*replies: Reply) -> Callable[[Request], Reply]:
    """Answers each reply in turn, then repeats the last one."""
    queue = list(replies)
    lock = threading.Lock()

    def next_reply(_req: Request) -> Reply:
        with lock:
            r = queue.pop(0) if len(queue) > 1 else queue[0]
        return dataclasses.replace(r, headers=dict(r.headers))

    return next_reply


def error_body(message: str) -> bytes:
    """The exact body of a local answer: `{"error":{"message":M}}`."""
    return json.dumps({"error": {"message": message}}, separators=(",", ":")).encode()


def assert_denied(resp, status: int, message: str, challenge: str | None = None) -> None:
    """The exact JSON error answer; `challenge` is the exact `WWW-Authenticate`
    expected (None: not checked)."""
    assert resp.status == status, resp
    assert resp.headers.get("content-type") == "application/json", resp
    assert resp.body == error_body(message), resp
    if challenge is not None:
        assert resp.headers.get("www-authenticate") == challenge, resp


def assert_bearer_denied(resp, status: int, message: str,
                         token_presented: bool | None = None) -> None:
    """The exact JSON error answer; for 401 also a Bearer challenge, with
    `error="invalid_token"` when a token was presented (True), without any
    `error=` when none was (False), either way when None."""
    assert resp.status == status, resp
    assert resp.headers.get("content-type") == "application/json", resp
    assert resp.body == error_body(message), resp
    if status == 401:
        challenge = resp.headers.get("www-authenticate", "")
        assert challenge.startswith("Bearer"), resp
        if token_presented is True:
            assert 'error="invalid_token"' in challenge, resp
        elif token_presented is False:
            assert "error=" not in challenge, resp


def forwarded(resp) -> dict[str, str]:
    """The request headers the echo upstream received (the answer must be 200)."""
    assert resp.status == 200, resp
    return resp.json()["headers"]


def identity(resp) -> tuple[str, dict]:
    """(principal, attributes) as forwarded to the upstream."""
    h = forwarded(resp)
    return h["x-auth-principal"], json.loads(h["x-auth-attributes"])
