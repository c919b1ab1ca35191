"""The `make run` demo: a demo identity provider, an echo upstream and a real
Envoy running tollgate with envoy/envoy.yaml, all on loopback.

    build/venv/bin/python scripts/demo.py          # what `make run` does

The demo IdP serves its JWKS at http://127.0.0.1:9100/jwks and mints RS256
tokens at /token?sub=alice&scope=telemetry.read+admin (see scripts/token).
The IdP, the echo upstream and the Envoy process are the e2e tests' harness
(tests/e2e/harness/). Ctrl-C stops everything.
"""

import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "e2e"))  # the one harness: tests/e2e/README.md

from harness import tokens  # noqa: E402
from harness.envoy import EnvoyProcess, EnvoyStartError  # noqa: E402
from harness.idp import IdP  # noqa: E402
from harness.upstream import EchoServer  # noqa: E402

# The ports envoy/envoy.yaml expects.
IDP_PORT, UPSTREAM_PORT = 9100, 9200
ISSUER = f"http://127.0.0.1:{IDP_PORT}"
KID = "demo-1"

# Demo users and the scopes their tokens carry by default.
USERS = {
    "alice": ["telemetry.read", "admin"],
    "bob": ["telemetry.read"],
    "carol": [],
}


def demo_claims(sub: str) -> dict:
    """What a demo token carries unless /token's query says otherwise."""
    return {"scope": " ".join(USERS.get(sub, [])), "groups": ["demo"]}


def start_backends() -> tuple[IdP, EchoServer]:
    """The demo IdP and the echo upstream (which shows the forwarded
    identity), started; docker-compose.yaml's demo service runs just these."""
    idp = IdP(IDP_PORT, [tokens.rsa_key(KID, "RS256")], issuer=ISSUER, audience="llama-stack",
              default_claims=demo_claims).start()
    upstream = EchoServer(UPSTREAM_PORT, pretty=True).start()
    return idp, upstream


def main():
    idp, upstream = start_backends()
    log_path = ROOT / "build" / "envoy-demo.log"
    envoy = None

    def stop(*_, status=0):
        if envoy is not None:
            envoy.stop(grace=15)
        idp.stop()
        upstream.stop()
        sys.exit(status)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:  # envoy/envoy.yaml names the .wasm relative to the repository
        envoy = EnvoyProcess(ROOT / "envoy" / "envoy.yaml", workdir=ROOT / "build", name="envoy-demo",
                             cwd=ROOT, log_path=log_path).start(timeout=30)
    except (EnvoyStartError, FileNotFoundError) as e:
        stop(status=f"{e}\n(log: {log_path})")
    base, admin = envoy.url, envoy.admin_url
    alice, bob, carol = idp.mint("alice"), idp.mint("bob"), idp.mint("carol")
    print(f"""
tollgate is running in Envoy on {base} (admin {admin}, log {log_path}).

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
Prometheus stats:  curl -s {admin}/stats/prometheus | grep tollgate
Ctrl-C stops Envoy, the demo IdP and the echo upstream.
""", flush=True)
    while envoy.alive:
        time.sleep(0.5)
    stop()


if __name__ == "__main__":
    main()
