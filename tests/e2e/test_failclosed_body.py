"""Fail closed: nothing reaches the upstream before its decision, on any
callback (issue "fail closed everywhere", items 1, 3 and 6).

Item 1: a request whose decision waits (introspection, custom endpoint, the
first key set fetch, an unknown-`kid` refresh) sends its body while it waits.
With the wasm `PluginConfig.allow_on_headers_stop_iteration` on, Envoy 1.40
calls the body callback while the headers are paused; a body callback that
let it go on used to forward the request undecided. Every wait is covered with
the flag on and off, over HTTP/1.1 and HTTP/2 (curl, prior knowledge), for a
refused request (never reaches the upstream) and an allowed one (arrives with
its body intact)."""

from __future__ import annotations

import hashlib
import http.client
import json
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from harness import tokens
from harness.config import jwt_config
from harness.idp import IdP
from harness.providers import (Scripted, custom_config, form_token, introspection_config,
                               json_api_key, new_token)
from harness.server import Reply

API = "/v1/chat/completions"
WAIT = 0.6  # seconds each callout or fetch takes
BODY = json.dumps({"messages": [{"role": "user", "content": "x" * 100_000}]}).encode()
SPOOF = {"x-auth-principal": "mallory", "x_auth_principal": "mallory",
         "X_Auth_Attributes": '{"roles":["admin"]}'}

FLAGS = [pytest.param(True, id="allow_on_headers_stop_iteration"),
         pytest.param(False, id="default")]
PROTOCOLS = ["http1", "http2"]


def post(gw, protocol: str, token: str, body: bytes = BODY, path: str = API,
         extra: dict | None = None) -> tuple[int, bytes]:
    """POSTs `body` with the spoofed identity headers; (status, answer body)."""
    headers = {"authorization": f"Bearer {token}", "content-type": "application/json",
               **SPOOF, **(extra or {})}
    if protocol == "http1":
        conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)
        try:
            conn.request("POST", path, body=body, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()
    with tempfile.NamedTemporaryFile() as f, tempfile.NamedTemporaryFile() as out:
        f.write(body)
        f.flush()
        args = ["curl", "-sS", "--http2-prior-knowledge", "-o", out.name, "-w", "%{http_code}",
                "--max-time", "30", "--data-binary", f"@{f.name}", "-H", "expect:"]
        for k, v in headers.items():
            args += ["-H", f"{k}: {v}"]
        done = subprocess.run(args + [f"{gw.url}{path}"], capture_output=True, text=True,
                              check=False)
        assert done.returncode == 0, done.stderr
        return int(done.stdout), open(out.name, "rb").read()


def both(gw, protocol: str, refused: str, allowed: str, body: bytes = BODY):
    """Sends the refused and the allowed request at the same time."""
    with ThreadPoolExecutor(2) as pool:
        a = pool.submit(post, gw, protocol, refused, body)
        b = pool.submit(post, gw, protocol, allowed, body)
        return a.result(), b.result()


def check(upstream, refused_answer, allowed_answer, refused_status=401, body: bytes = BODY,
          principal: str = "alice") -> None:
    """The refused request got its 401 and never reached the upstream; the
    allowed one reached it once, with its body intact and tollgate's identity
    only."""
    status, answer = refused_answer
    assert status == refused_status, answer[:300]
    status, answer = allowed_answer
    assert status == 200, answer[:300]
    seen = upstream.received(API)
    assert len(seen) == 1, [r.headers.get("authorization") for r in seen]
    got = seen[0]
    assert hashlib.sha256(got.body).hexdigest() == hashlib.sha256(body).hexdigest()
    assert got.headers["x-auth-principal"] == principal
    names = [k for k, _ in got.header_list]
    assert "x_auth_principal" not in names and "x_auth_attributes" not in names, names


def start(envoy, config, flag: bool, clusters=None, **kw):
    return envoy(config, clusters=clusters,
                 plugin_extra={"allow_on_headers_stop_iteration": flag}, **kw)


def slow_introspection(idp) -> tuple[str, str]:
    """An introspection endpoint that takes WAIT seconds to answer; a token
    it refuses and one it allows (as alice)."""
    refused, allowed = new_token("no"), new_token("yes")
    endpoint = Scripted(form_token, Reply(200, {"active": False}, delay=WAIT))
    endpoint.answer(allowed, Reply(200, {"active": True, "sub": "alice",
                                         "exp": int(time.time()) + 600}, delay=WAIT))
    idp.route("/introspect", endpoint)
    return refused, allowed


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("flag", FLAGS)
def test_introspection_wait_holds_the_body(envoy, idp, upstream, flag, protocol):
    refused, allowed = slow_introspection(idp)
    gw = start(envoy, introspection_config(idp.port), flag)
    check(upstream, *both(gw, protocol, refused, allowed))


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("flag", FLAGS)
def test_custom_endpoint_wait_holds_the_body(envoy, upstream, flag, protocol):
    refused, allowed = new_token("no"), new_token("yes")
    endpoint = Scripted(json_api_key, Reply(401, {"detail": "no"}, delay=WAIT))
    endpoint.answer(allowed, Reply(200, {"principal": "alice", "attributes": {}}, delay=WAIT))
    with IdP() as authsvc:
        authsvc.route("/validate", endpoint)
        gw = start(envoy, custom_config(authsvc.port), flag, clusters={"authsvc": authsvc.port})
        check(upstream, *both(gw, protocol, refused, allowed))


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("flag", FLAGS)
def test_first_key_set_fetch_holds_the_body(envoy, idp, upstream, rsa, flag, protocol):
    idp.set_keys(rsa)
    idp.set_fault("/jwks", delay=WAIT)
    allowed = rsa.sign(tokens.claims(sub="alice"))
    refused = tokens.tamper(allowed)
    gw = start(envoy, jwt_config(idp.port), flag)
    check(upstream, *both(gw, protocol, refused, allowed))


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("flag", FLAGS)
def test_unknown_kid_refresh_holds_the_body(envoy, idp, upstream, rsa, flag, protocol):
    idp.set_keys(rsa)
    gw = start(envoy, jwt_config(idp.port, jwks={"refresh_cooldown_seconds": 1}), flag)
    # Every worker has the first key set before the rotation.
    for _ in range(4):
        assert gw.get("/v1/models", token=rsa.sign(tokens.claims(sub="alice"))).status == 200
    upstream.reset_log()
    time.sleep(1.2)  # past the refresh cooldown since the first fetch
    new = tokens.rsa_key("rs-new", "RS256")
    idp.set_keys(rsa, new)
    idp.set_fault("/jwks", delay=WAIT)
    allowed = new.sign(tokens.claims(sub="alice"))
    refused = tokens.tamper(allowed)
    check(upstream, *both(gw, protocol, refused, allowed))


@pytest.mark.parametrize("flag", FLAGS)
def test_a_body_over_the_buffer_limit_never_passes_undecided(envoy, idp, upstream, flag):
    """2 MiB, over Envoy's default 1 MiB per-connection buffer limit, while
    introspection takes its time. With `allow_on_headers_stop_iteration` the
    held body overflows Envoy's buffer: Envoy answers 413 `Payload Too Large`
    itself. Without it, Envoy holds the body back by flow control until the
    decision: the refused request gets its 401, the allowed one arrives whole."""
    big = b"{" + b" " * (2 * 1024 * 1024) + b"}"
    refused, allowed = slow_introspection(idp)
    gw = start(envoy, introspection_config(idp.port), flag)
    r_refused, r_allowed = both(gw, "http1", refused, allowed, body=big)
    if flag:
        assert r_refused[0] in (401, 413), r_refused
        assert r_allowed[0] == 413, r_allowed
        assert upstream.received(API) == []
    else:
        check(upstream, r_refused, r_allowed, body=big)


def h2_post_with_trailers(gw, token: str, body: bytes) -> int:
    """An HTTP/2 POST (h2, prior knowledge) whose body is followed by
    trailers; returns the answer's `:status`."""
    import socket

    import h2.config
    import h2.connection
    import h2.events

    sock = socket.create_connection(("127.0.0.1", gw.port), timeout=30)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    stream = conn.get_next_available_stream_id()
    conn.send_headers(stream, [(":method", "POST"), (":path", API), (":scheme", "http"),
                               (":authority", "tollgate"), ("authorization", f"Bearer {token}"),
                               ("x_auth_principal", "mallory")])
    sent = 0
    status = None
    while status is None:
        while sent < len(body) and conn.local_flow_control_window(stream) > 0:
            chunk = body[sent:sent + min(16384, conn.local_flow_control_window(stream))]
            conn.send_data(stream, chunk)
            sent += len(chunk)
            if sent == len(body):
                conn.send_headers(stream, [("x-checksum", "abc")], end_stream=True)
        sock.sendall(conn.data_to_send())
        data = sock.recv(65536)
        if not data:
            break
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived) and event.stream_id == stream:
                status = int(dict(event.headers)[b":status"])
            elif isinstance(event, h2.events.DataReceived):
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
    sock.close()
    return status


@pytest.mark.parametrize("flag", FLAGS)
def test_trailers_wait_for_the_decision(envoy, idp, upstream, flag):
    """HTTP/2 with request trailers, refused by introspection after a wait:
    body and trailers are held, nothing reaches the upstream."""
    refused = new_token("no")
    idp.route("/introspect", Scripted(form_token, Reply(200, {"active": False}, delay=WAIT)))
    gw = start(envoy, introspection_config(idp.port), flag)
    assert h2_post_with_trailers(gw, refused, BODY) == 401
    assert upstream.received(API) == []
