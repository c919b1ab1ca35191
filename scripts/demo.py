"""The `make run` demo: a demo identity provider, an echo upstream and a real
Envoy running tollgate with envoy/envoy.yaml, all on loopback.

    build/venv/bin/python scripts/demo.py          # what `make run` does

The demo IdP serves its JWKS at http://127.0.0.1:9100/jwks and mints RS256
tokens at /token?sub=alice&scope=telemetry.read+admin (see scripts/token).
Ctrl-C stops everything.
"""

import glob
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IDP_PORT, UPSTREAM_PORT, LISTEN_PORT, ADMIN_PORT = 9100, 9200, 10000, 9901
ISSUER = f"http://127.0.0.1:{IDP_PORT}"
KID = "demo-1"

# Demo users and the scopes their tokens carry by default.
USERS = {
    "alice": ["telemetry.read", "admin"],
    "bob": ["telemetry.read"],
    "carol": [],
}

_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _b64(n: int) -> str:
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return jwt.utils.base64url_encode(raw).decode()


def jwks() -> dict:
    pub = _key.public_key().public_numbers()
    return {"keys": [{"kty": "RSA", "kid": KID, "alg": "RS256", "use": "sig",
                      "n": _b64(pub.n), "e": _b64(pub.e)}]}


def mint(sub: str, scopes, ttl: int = 3600) -> str:
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": "llama-stack", "sub": sub, "iat": now,
              "exp": now + ttl, "scope": " ".join(scopes), "groups": ["demo"]}
    return jwt.encode(claims, _key, algorithm="RS256", headers={"kid": KID})


class Idp(BaseHTTPRequestHandler):
    def do_GET(self):
        url = urllib.parse.urlparse(self.path)
        if url.path == "/jwks":
            self._send(200, json.dumps(jwks()))
        elif url.path == "/token":
            q = urllib.parse.parse_qs(url.query)
            sub = q.get("sub", ["alice"])[0]
            scopes = q["scope"][0].split() if "scope" in q else USERS.get(sub, [])
            self._send(200, mint(sub, scopes), "text/plain")
        else:
            self._send(404, '{"error":"not found"}')

    def _send(self, status, body, ctype="application/json"):
        data = body.encode()
        self.send_response(status)
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


class Echo(BaseHTTPRequestHandler):
    """Answers with what it received, so the forwarded identity shows."""

    def _echo(self):
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        body = json.dumps({"method": self.command, "path": self.path,
                           "headers": {k.lower(): v for k, v in self.headers.items()}},
                          indent=2).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _echo

    def log_message(self, *args):
        pass


def envoy_binary() -> str:
    if os.environ.get("ENVOY_BIN"):
        return os.environ["ENVOY_BIN"]
    found = glob.glob(os.path.join(ROOT, "build/venv/lib/python3*/site-packages/envoy/_bin/envoy"))
    if not found:
        sys.exit("Envoy not found: run `make envoy` (or set ENVOY_BIN)")
    return found[0]


def serve(handler, port):
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main():
    servers = [serve(Idp, IDP_PORT), serve(Echo, UPSTREAM_PORT)]
    log_path = os.path.join(ROOT, "build", "envoy-demo.log")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    envoy = subprocess.Popen(
        [envoy_binary(), "-c", "envoy/envoy.yaml", "--concurrency", "2",
         "--use-dynamic-base-id", "-l", "info", "--log-path", log_path],
        cwd=ROOT)

    def stop(*_):
        if envoy.poll() is None:
            envoy.send_signal(signal.SIGINT)
            try:
                envoy.wait(15)
            except subprocess.TimeoutExpired:
                envoy.kill()
        for s in servers:
            s.shutdown()
        sys.exit(0)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    deadline = time.time() + 30
    while time.time() < deadline:
        if envoy.poll() is not None:
            sys.exit(f"Envoy exited; see {log_path}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{ADMIN_PORT}/ready", timeout=1) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(0.2)
    else:
        stop()
    base = f"http://127.0.0.1:{LISTEN_PORT}"
    alice, bob = mint("alice", USERS["alice"]), mint("bob", USERS["bob"])
    carol = mint("carol", USERS["carol"])
    print(f"""
tollgate is running in Envoy on {base} (admin http://127.0.0.1:{ADMIN_PORT}, log {log_path}).

An allowed call (alice has the scopes telemetry.read and admin):
  curl -s {base}/v1/telemetry/traces -H "Authorization: Bearer {alice}"

401, no token:
  curl -si {base}/v1/models

403, bob lacks the scope `admin`:
  curl -si {base}/v1/admin/users -H "Authorization: Bearer {bob}"

A public path, no token needed:
  curl -si {base}/v1/health

Quota headers (RateLimit-*) on every counted answer; 1000 a day per user:
  curl -si {base}/v1/models -H "Authorization: Bearer {bob}" | grep -i ratelimit

Hit the quota (carol's 1000 requests of the day, then a 429 with Retry-After):
  for i in $(seq 1000); do curl -s -o /dev/null {base}/v1/models -H "Authorization: Bearer {carol}"; done
  curl -si {base}/v1/models -H "Authorization: Bearer {carol}"

Mint more tokens:  scripts/token alice "telemetry.read admin"
Prometheus stats:  curl -s http://127.0.0.1:{ADMIN_PORT}/stats/prometheus | grep tollgate
Ctrl-C stops Envoy, the demo IdP and the echo upstream.
""", flush=True)
    while envoy.poll() is None:
        time.sleep(0.5)
    stop()


if __name__ == "__main__":
    main()
