"""Self-tests of the harness (no Envoy): keys and tokens, the IdP, the echo server."""

from __future__ import annotations

import hashlib
import hmac
import http.client
import socket
import subprocess
import sys
import time
from pathlib import Path

import jwt
import pytest

from harness import tokens
from harness.client import request
from harness.idp import IdP
from harness.server import Reply


@pytest.mark.parametrize("make,alg", [
    (lambda: tokens.rsa_key("r", "RS256"), "RS256"),
    (lambda: tokens.rsa_key("r", "PS512"), "PS512"),
    (lambda: tokens.ec_key("e", "ES256"), "ES256"),
    (lambda: tokens.ec_key("e", "ES384"), "ES384"),
    (lambda: tokens.ed25519_key("d"), "EdDSA"),
])
def test_tokens_verify_against_exported_jwk(make, alg):
    key = make()
    token = key.sign(tokens.claims(scope="a b"), headers={"typ": "at+jwt"})
    public = jwt.PyJWK(key.jwk()).key
    decoded = jwt.decode(token, public, algorithms=[alg], audience="llama-stack",
                         issuer="https://idp.example")
    assert decoded["sub"] == "alice" and decoded["scope"] == "a b"
    assert jwt.get_unverified_header(token)["kid"] == key.kid
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(tokens.tamper(token), public, algorithms=[alg], audience="llama-stack")
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(tokens.tamper_payload(token, sub="root"), public, algorithms=[alg],
                   audience="llama-stack")


def test_bad_token_helpers():
    key = tokens.rsa_key()
    none = tokens.alg_none(tokens.claims(), kid="k")
    assert jwt.get_unverified_header(none) == {"alg": "none", "typ": "JWT", "kid": "k"}
    assert none.endswith(".")
    hs = tokens.hs256_with_public_key(tokens.claims(), key)
    # PyJWT refuses PEM keys for HMAC, so check the MAC by hand.
    head, body, sig = hs.split(".")
    mac = hmac.new(key.public_pem(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    assert tokens.b64url_decode(sig) == mac
    assert "exp" not in tokens.claims(exp=None)


def test_idp_serves_jwks_faults_and_restarts():
    key = tokens.ec_key()
    with IdP(keys=[key]) as idp:
        r = request(idp.base_url, "/jwks")
        assert r.status == 200 and r.json() == tokens.jwks(key)
        idp.set_fault("/jwks", status=503, body="nope")
        r = request(idp.base_url, "/jwks")
        assert (r.status, r.text) == (503, "nope")
        idp.set_fault("/jwks", delay=0.3)
        t = time.monotonic()
        assert request(idp.base_url, "/jwks").status == 200
        assert time.monotonic() - t >= 0.3
        idp.set_fault("/jwks", drop=True)
        with pytest.raises((http.client.HTTPException, ConnectionError)):
            request(idp.base_url, "/jwks")
        idp.clear_faults()
        idp.route("/introspect", lambda req: Reply(200, {"active": req.form().get("token") == "t"}))
        assert request(idp.base_url, "/introspect", "POST", body="token=t").json() == {"active": True}
        assert idp.count("/jwks") == 4 and idp.count("/introspect") == 1

        port = idp.port
        idp.stop()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=1)
        idp.start()
        assert idp.port == port and request(idp.base_url, "/jwks").status == 200


def test_idp_stop_closes_keep_alive_connections():
    with IdP(keys=[tokens.ed25519_key()]) as idp:
        conn = http.client.HTTPConnection("127.0.0.1", idp.port, timeout=2)
        conn.request("GET", "/jwks")
        conn.getresponse().read()
        idp.stop()
        with pytest.raises((http.client.HTTPException, ConnectionError, OSError)):
            conn.request("GET", "/jwks")
            conn.getresponse().read()
        conn.close()


def test_idp_token_endpoint_mints_verifiable_tokens():
    key = tokens.rsa_key("demo")
    with IdP(keys=[key]) as idp:
        token = request(idp.base_url, "/token?sub=bob&scope=read%20write&groups=a,b").text.strip()
        claims = jwt.decode(token, key.public_key, algorithms=["RS256"], audience="llama-stack")
        assert claims["sub"] == "bob" and claims["scope"] == "read write"
        assert claims["groups"] == ["a", "b"]


def test_echo_upstream(upstream):
    r = request(upstream.base_url, "/a?b=1", "POST", {"X-Thing": "1"}, body="hi")
    doc = r.json()
    assert (doc["method"], doc["path"], doc["body"]) == ("POST", "/a?b=1", "hi")
    assert doc["headers"]["x-thing"] == "1"
    assert upstream.count("/a") == 1


def test_idp_standalone_script():
    """`python tests/e2e/harness/idp.py --port N` serves /jwks and /token and stops on SIGINT."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = Path(__file__).parent / "harness" / "idp.py"
    proc = subprocess.Popen([sys.executable, str(script), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert "demo IdP" in proc.stdout.readline()
        base = f"http://127.0.0.1:{port}"
        jwk = request(base, "/jwks").json()["keys"][0]
        token = request(base, "/token?sub=alice&format=json").json()["access_token"]
        assert jwt.decode(token, jwt.PyJWK(jwk).key, algorithms=["RS256"],
                          audience="llama-stack")["sub"] == "alice"
    finally:
        proc.send_signal(2)
        assert proc.wait(10) == 0
