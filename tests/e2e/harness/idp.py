"""A scriptable identity provider: serves a JWKS at /jwks, mints tokens at
/token, and takes any other handler a test plugs in (e.g. /introspect).

Run standalone as a demo IdP:

    python tests/e2e/harness/idp.py --port 9000
    curl 'http://127.0.0.1:9000/token?sub=alice&scope=read%20write'
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):  # run as a script: make `harness` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import tokens  # noqa: E402
from harness.server import Handler, LoopbackServer, Reply, Request  # noqa: E402

DEFAULT_ISSUER = "https://idp.example"
DEFAULT_AUDIENCE = "llama-stack"


@dataclass
class Fault:
    """Scripted misbehaviour for one path: applied on top of its handler's reply."""

    status: int | None = None
    body: bytes | str | dict | None = None
    delay: float = 0.0
    drop: bool = False


class IdP(LoopbackServer):
    """The identity provider. All setters are safe to call while serving."""

    def __init__(self, port: int = 0, keys: list[tokens.SigningKey] | None = None,
                 issuer: str = DEFAULT_ISSUER, audience: str = DEFAULT_AUDIENCE,
                 default_claims: Callable[[str], dict] | None = None):
        """`default_claims(sub)` gives the claims a minted token for `sub`
        carries unless the caller sets them (e.g. the demo users' scopes)."""
        super().__init__(port)
        self.issuer = issuer
        self.audience = audience
        self.default_claims = default_claims
        self.keys: list[tokens.SigningKey] = list(keys or [])
        self.jwks_doc: dict | None = None  # when set, served instead of `keys`
        self.down = False  # when True every request is dropped with no answer
        self._faults: dict[str, Fault] = {}
        self._routes: dict[str, Handler] = {"/jwks": self._jwks, "/token": self._token}

    # -- scripting ---------------------------------------------------------
    def set_keys(self, *keys: tokens.SigningKey) -> None:
        """Serves exactly these public keys at /jwks."""
        self.keys = list(keys)
        self.jwks_doc = None

    def set_jwks(self, doc: dict) -> None:
        """Serves this JWKS document verbatim."""
        self.jwks_doc = doc

    def route(self, path: str, handler: Handler) -> None:
        """Plugs `handler(request) -> Reply` in at `path` (replacing any)."""
        self._routes[path] = handler

    def set_fault(self, path: str = "/jwks", *, status: int | None = None,
                  body: bytes | str | dict | None = None, delay: float = 0.0,
                  drop: bool = False) -> None:
        """Makes `path` answer `status`/`body`, after `delay` seconds, or hang up."""
        self._faults[path] = Fault(status, body, delay, drop)

    def clear_faults(self) -> None:
        self._faults.clear()
        self.down = False

    # -- handlers ----------------------------------------------------------
    def handle(self, req: Request) -> Reply:
        if self.down:
            return Reply(drop=True)
        handler = self._routes.get(req.route)
        reply = handler(req) if handler else Reply(404, {"error": "not found"})
        fault = self._faults.get(req.route)
        if fault:
            if fault.status is not None:
                reply.status = fault.status
            if fault.body is not None:
                reply.body = fault.body
                reply.headers = {}
            reply.delay = fault.delay
            reply.drop = fault.drop
        return reply

    def _jwks(self, req: Request) -> Reply:
        doc = self.jwks_doc if self.jwks_doc is not None else tokens.jwks(*self.keys)
        return Reply(200, doc)

    def mint(self, sub: str = "alice", ttl: int = 3600, **claims) -> str:
        """A token signed with the first key, valid for `ttl` seconds: this
        IdP's issuer and audience, then `default_claims(sub)`, then `claims`."""
        extra = dict(self.default_claims(sub)) if self.default_claims else {}
        extra.update(claims)
        aud = extra.pop("aud", self.audience)
        return self.keys[0].sign(tokens.claims(sub=sub, aud=aud, iss=self.issuer, lifetime=ttl,
                                               **extra))

    def _token(self, req: Request) -> Reply:
        """Mints a token with the first key: ?sub=&scope=&groups=a,b&aud=&ttl=&format=json."""
        if not self.keys:
            return Reply(500, {"error": "no signing key"})
        q = req.query
        extra = {}
        if "scope" in q:
            extra["scope"] = q["scope"]
        if "groups" in q:
            extra["groups"] = [g for g in q["groups"].split(",") if g]
        if "aud" in q:
            extra["aud"] = q["aud"]
        ttl = int(q.get("ttl", "3600"))
        token = self.mint(q.get("sub", "alice"), ttl, **extra)
        if q.get("format") == "json":
            return Reply(200, {"access_token": token, "token_type": "Bearer", "expires_in": ttl})
        return Reply(200, token + "\n", {"content-type": "text/plain"})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="tollgate demo identity provider")
    ap.add_argument("--port", type=int, default=9000)
    ap.add_argument("--issuer", default=DEFAULT_ISSUER)
    ap.add_argument("--audience", default=DEFAULT_AUDIENCE)
    ap.add_argument("--kid", default="demo-rs256")
    ap.add_argument("--key-file", type=Path,
                    help="PEM private key to use; created when missing (default: a new key per run)")
    args = ap.parse_args(argv)

    if args.key_file:
        key = tokens.key_file(args.key_file, args.kid, "RS256")
    else:
        key = tokens.rsa_key(args.kid, "RS256")

    idp = IdP(args.port, [key], issuer=args.issuer, audience=args.audience).start()
    print(f"demo IdP on {idp.base_url}: GET /jwks, GET /token?sub=alice&scope=read%20write "
          f"(kid {key.kid}, issuer {args.issuer}, audience {args.audience})", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    idp.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
