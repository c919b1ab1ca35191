"""Hardening: the JWKS endpoint misbehaving, beyond what test_jwt.py covers
(down at start, 500/503, a non-JSON body, `{"keys": 42}`, a dropped
connection, one slow answer, the cluster missing, a few unusable keys).

Here: other statuses and bodies, answers over the 1 MiB callout limit, many
kinds of junk keys next to good ones, slow and trickling answers, stale keys
during an outage with bounded retries, `max_stale_seconds`, and the log line
for a missing cluster."""

from __future__ import annotations

import gzip
import json
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from harness import tokens
from harness.config import jwt_config

API = "/v1/models"
MSG_INVALID = "Invalid JWT token"
MSG_UNAVAILABLE = "Authentication service unavailable"
MSG_TIMEOUT = "Authentication service timeout"
MIB = 1024 * 1024


def body_of(message: str) -> bytes:
    return json.dumps({"error": {"message": message}}, separators=(",", ":")).encode()


def assert_denied(resp, status: int, message: str) -> None:
    assert resp.status == status, resp
    assert resp.body == body_of(message), resp


def wait_for_streak(gw, token: str, streak: int = 5, timeout: float = 15.0):
    start = time.monotonic()
    ok = 0
    last = None
    while time.monotonic() - start < timeout:
        last = gw.get(API, token=token)
        ok = ok + 1 if last.status == 200 else 0
        if ok >= streak:
            return
        if last.status != 200:
            time.sleep(0.2)
    pytest.fail(f"no {streak} passing requests in a row within {timeout}s; last: {last!r}")


# -- answers that are not a usable JWKS (cold start: nothing cached) -------------------------

def _padded_jwks(key: tokens.SigningKey, size: int) -> bytes:
    """A valid JWKS holding `key`, padded with spaces to exactly `size` bytes."""
    doc = json.dumps(tokens.jwks(key)).encode()
    assert len(doc) < size
    return doc[:-1] + b" " * (size - len(doc)) + b"}"


# A `keys` list without usable keys is a key set, not a failure: 401
# (test_failclosed_config.py).
BAD_ANSWERS = {
    "status_404": lambda k: {"status": 404, "body": {"error": "not found"}},
    "status_302_to_jwks": lambda k: {"status": 302, "body": ""},
    "status_401": lambda k: {"status": 401, "body": {"error": "unauthorized"}},
    "status_204_empty": lambda k: {"status": 204, "body": b""},
    "status_206_with_good_jwks": lambda k: {"status": 206, "body": tokens.jwks(k)},
    "html_body": lambda k: {"body": "<!doctype html><html><body><h1>Login</h1></body></html>"},
    "empty_body": lambda k: {"body": b""},
    "truncated_json": lambda k: {"body": json.dumps(tokens.jwks(k))[:-7]},
    "json_array": lambda k: {"body": [tokens.jwks(k)]},
    "json_null": lambda k: {"body": "null"},
    "keys_object": lambda k: {"body": {"keys": {"0": k.jwk()}}},
    "no_keys_member": lambda k: {"body": {"jwks": tokens.jwks(k)}},
    "trailing_garbage": lambda k: {"body": json.dumps(tokens.jwks(k)) + " trailing"},
    "deeply_nested": lambda k: {"body": b'{"keys":' + b"[" * 200_000 + b"]" * 200_000 + b"}"},
    "utf16_json": lambda k: {"body": json.dumps(tokens.jwks(k)).encode("utf-16")},
    "gzip_without_decoding": lambda k: {"body": gzip.compress(json.dumps(tokens.jwks(k)).encode())},
    "over_1MiB_by_one_byte": lambda k: {"body": _padded_jwks(k, MIB + 1)},
    "10MiB_valid_jwks": lambda k: {"body": _padded_jwks(k, 10 * MIB)},
}


@pytest.mark.parametrize("case", list(BAD_ANSWERS))
def test_bad_jwks_answer_gives_503(envoy, idp, rsa, case, upstream):
    """No usable key set ever arrived: 503 `Authentication service unavailable`
    (a body over the 1 MiB callout limit counts, even a valid JWKS)."""
    idp.set_keys(rsa)
    idp.set_fault("/jwks", **BAD_ANSWERS[case](rsa))
    gw = envoy(jwt_config(idp.port), concurrency=1)
    start = time.monotonic()
    r = gw.get(API, token=rsa.sign(tokens.claims()), timeout=20)
    assert time.monotonic() - start < 6, "answered only after the fetch timeout"
    assert_denied(r, 503, MSG_UNAVAILABLE)
    assert upstream.received() == []
    assert idp.count("/jwks") >= 1
    if "MiB" in case:
        time.sleep(0.2)
        assert "1048576-byte limit" in gw.log_text(), gw.log_tail()


def test_jwks_of_exactly_1MiB_is_used(envoy, idp, rsa):
    """The limit is inclusive: a JWKS of exactly 1 MiB is read and used."""
    idp.set_fault("/jwks", body=_padded_jwks(rsa, MIB))
    gw = envoy(jwt_config(idp.port), concurrency=1)
    assert gw.get(API, token=rsa.sign(tokens.claims())).status == 200


def test_oversized_answer_after_good_keys_keeps_the_good_keys(envoy, idp, rsa):
    """A refresh that answers 10 MiB is a failed refresh: the cached keys stay."""
    idp.set_keys(rsa)
    gw = envoy(jwt_config(idp.port, jwks={"cache_ttl": 1}), concurrency=1)
    token = rsa.sign(tokens.claims())
    wait_for_streak(gw, token)
    idp.set_fault("/jwks", body=_padded_jwks(rsa, 10 * MIB))
    before = idp.count("/jwks")
    deadline = time.monotonic() + 6
    while idp.count("/jwks") < before + 2 and time.monotonic() < deadline:
        assert gw.get(API, token=token).status == 200
        time.sleep(0.1)
    assert idp.count("/jwks") >= before + 2, "no refresh was tried"
    assert [gw.get(API, token=token).status for _ in range(5)] == [200] * 5


# -- junk keys next to good ones --------------------------------------------------------------

def _junk_keys() -> list:
    good_ec = tokens.ec_key("x", "ES256").jwk()
    rsa_jwk = tokens.rsa_key("x").jwk()
    return [
        {"kty": "foo", "kid": "j-foo"},
        {"kid": "j-no-kty", "n": rsa_jwk["n"], "e": "AQAB"},
        {"kty": None, "kid": "j-null-kty"},
        {"kty": 7, "kid": "j-number-kty"},
        "a string",
        42,
        None,
        ["RSA"],
        {"kty": "RSA", "kid": "j-no-n", "e": "AQAB"},
        {"kty": "RSA", "kid": "j-bad-n", "n": "!!!not base64!!!", "e": "AQAB"},
        {"kty": "RSA", "kid": "j-n-number", "n": 12345, "e": "AQAB"},
        {"kty": "RSA", "kid": "j-empty-n", "n": "", "e": "AQAB"},
        dict(rsa_jwk, kid="j-e-1", e="AQ"),
        dict(rsa_jwk, kid="j-huge-e", e=tokens.b64url(b"\xff" * 64)),
        dict(good_ec, kid="j-ec-short-x", x=tokens.b64url(b"\x01" * 31)),
        dict(good_ec, kid="j-ec-no-y", y=None),
        dict(good_ec, kid="j-ec-zero", x=tokens.b64url(b"\x00" * 32), y=tokens.b64url(b"\x00" * 32)),
        dict(good_ec, kid="j-ec-wrong-crv", crv="P-384"),
        dict(good_ec, kid="j-ec-crv-secp256k1", crv="secp256k1"),
        {"kty": "OKP", "kid": "j-x25519", "crv": "X25519", "x": tokens.b64url(b"\x09" * 32)},
        {"kty": "OKP", "kid": "j-ed448", "crv": "Ed448", "x": tokens.b64url(b"\x09" * 57)},
        {"kty": "oct", "kid": "j-oct", "k": tokens.b64url(b"secret" * 8), "alg": "HS256"},
        dict(rsa_jwk, kid="j-use-enc", use="enc"),
        dict(rsa_jwk, kid="j-key-ops-encrypt", key_ops=["encrypt"]),
        dict(rsa_jwk, kid="j-alg-hs256", alg="HS256"),
        dict(rsa_jwk, kid="j-alg-none", alg="none"),
        dict(rsa_jwk, kid="j-alg-es256", alg="ES256"),
        dict(rsa_jwk, kid=12345),
        {"kty": "RSA", "kid": "rs-good", "n": "AAAA", "e": "AQAB"},  # a broken key with the good kid, first
    ]


def test_junk_keys_skipped_good_keys_work(envoy, idp, rsa, ec, upstream):
    """Junk of every kind before and between the good keys (a broken key even
    shares the good RSA key's kid): the good keys verify, junk is logged."""
    junk = _junk_keys()
    doc = {"keys": junk[:15] + [rsa.jwk()] + junk[15:] + [ec.jwk()]}
    idp.set_jwks(doc)
    gw = envoy(jwt_config(idp.port), concurrency=1)
    assert gw.get(API, token=rsa.sign(tokens.claims(sub="r"))).status == 200
    assert gw.get(API, token=ec.sign(tokens.claims(sub="e"))).status == 200
    assert len(upstream.received()) == 2
    # A token naming a junk key's kid is refused.
    other = tokens.rsa_key("j-use-enc")
    r = gw.get(API, token=other.sign(tokens.claims()))
    assert_denied(r, 401, MSG_INVALID)
    time.sleep(0.2)
    skipped = gw.log_text().count("skipped")
    assert skipped >= len(junk), gw.log_tail(80)


def test_same_kid_on_two_good_keys(envoy, idp):
    """Two valid keys sharing a kid (a sloppy rotation): tokens of either verify."""
    old, new = tokens.rsa_key("shared"), tokens.rsa_key("shared")
    idp.set_keys(old, new)
    gw = envoy(jwt_config(idp.port), concurrency=1)
    assert gw.get(API, token=old.sign(tokens.claims())).status == 200
    assert gw.get(API, token=new.sign(tokens.claims())).status == 200


def test_keys_past_the_64th_are_ignored(envoy, idp, rsa):
    """A JWKS of 70 keys: the first 64 are used, the rest ignored (logged)."""
    filler = [tokens.ec_key(f"f{i}", "ES256") for i in range(64)]
    late = tokens.ec_key("late", "ES256")
    idp.set_keys(rsa, *filler[1:], late)  # rsa is #0, late is #64
    gw = envoy(jwt_config(idp.port), concurrency=1)
    assert gw.get(API, token=rsa.sign(tokens.claims())).status == 200
    assert gw.get(API, token=filler[5].sign(tokens.claims())).status == 200
    assert_denied(gw.get(API, token=late.sign(tokens.claims())), 401, MSG_INVALID)
    time.sleep(0.2)
    assert "only the first 64" in gw.log_text(), gw.log_tail()


# -- slow answers ---------------------------------------------------------------------------------

class CutServer:
    """Answers every request with its status line and headers at once
    (`content-length: 100000`), then `mode`:
    `trickle` one byte of body every 100 ms (never done in time);
    `reset` 10 bytes of body, then a TCP reset;
    `close` 10 bytes of body, then a plain close (a truncated body)."""

    def __init__(self, mode: str, length: int = 100_000):
        self.mode, self.length = mode, length
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.stopping = threading.Event()
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        self.sock.settimeout(0.1)
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn):
        try:
            conn.settimeout(5)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                data += chunk
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                         b"content-length: %d\r\n\r\n{" % self.length)
            if self.mode == "trickle":
                for _ in range(self.length - 1):
                    if self.stopping.wait(0.1):
                        return
                    conn.sendall(b" ")
            else:
                conn.sendall(b" " * 9)
                time.sleep(0.05)
                if self.mode == "reset":
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        finally:
            conn.close()

    def stop(self):
        self.stopping.set()
        self.sock.close()


def consume_traps(gw) -> list[str]:
    """Stops `gw` and returns the trap lines of its whole log, marking them seen
    so that conftest does not report them a second time: the test that calls
    this asserts on them itself. (A callout answer cut after its headers arrives
    with no header map; the SDK's header getters trap on that, so tollgate reads
    callout answers itself.)"""
    time.sleep(0.3)
    gw.stop()
    text = gw.log_text()
    gw._trap_checked = len(text)
    return gw.traps(text)


def _get(gw, token: str, timeout: float):
    """(status, body, seconds); status None when the client gave up."""
    start = time.monotonic()
    try:
        r = gw.get(API, token=token, timeout=timeout)
        return r.status, r.body, time.monotonic() - start
    except (TimeoutError, ConnectionError):
        return None, b"", time.monotonic() - start


@pytest.mark.parametrize("mode", ["trickle", "reset", "close"])
def test_jwks_answer_cut_after_headers(envoy, rsa, mode, upstream):
    """The JWKS answer starts (200 and headers) but its body never completes in
    time: the request gets 503 within timeout_ms + 1 s, and no trap."""
    cut = CutServer(mode)
    try:
        gw = envoy(jwt_config(cut.port, jwks={"timeout_ms": 1000}), clusters={"idp": cut.port})
        try:
            status, body, took = _get(gw, rsa.sign(tokens.claims()), timeout=6)
        finally:
            traps = consume_traps(gw)
    finally:
        cut.stop()
    assert cut.accepted >= 1
    assert not traps, "VM trap:\n" + "\n".join(traps[:4])
    assert status == 503 and body in (body_of(MSG_TIMEOUT), body_of(MSG_UNAVAILABLE)), (status, body)
    assert took < 2.0, f"answered after {took:.2f}s"
    assert upstream.received() == []


def introspection_config(port: int, timeout_ms: int = 1000) -> dict:
    return {
        "auth": {"provider_type": "oauth2_token", "config": {
            "introspection": {"url": f"http://127.0.0.1:{port}/introspect", "cluster": "idp",
                              "client_id": "gw", "client_secret": "s3cret", "timeout_ms": timeout_ms},
            "issuer": "https://idp.example",
            "claims_mapping": {"sub": "roles", "scope": "scopes"},
            "cache_ttl": 30}},
        "public_paths": ["/v1/health"],
    }


def test_introspection_answer_cut_after_headers(envoy, upstream):
    """The same cut answer from an introspection endpoint: 503, no trap."""
    cut = CutServer("reset")
    try:
        gw = envoy(introspection_config(cut.port), clusters={"idp": cut.port})
        try:
            status, body, took = _get(gw, "opaque-token-1", timeout=6)
        finally:
            traps = consume_traps(gw)
    finally:
        cut.stop()
    assert not traps, "VM trap:\n" + "\n".join(traps[:4])
    assert status == 503, (status, body)
    assert took < 2.0


def test_many_parked_requests_all_answered_by_the_timeout(envoy, idp, rsa, upstream):
    """60 requests parked on a JWKS fetch that never answers in time: every
    one gets its 503 within timeout_ms + 1 s."""
    idp.set_keys(rsa)
    idp.set_fault("/jwks", delay=30)
    gw = envoy(jwt_config(idp.port, jwks={"timeout_ms": 1000}))
    token = rsa.sign(tokens.claims())

    def one(i):
        start = time.monotonic()
        r = gw.get(API, token=token, timeout=10)
        return r, time.monotonic() - start

    with ThreadPoolExecutor(30) as pool:
        results = list(pool.map(one, range(60)))
    for r, took in results:
        assert r.status == 503 and r.body in (body_of(MSG_TIMEOUT), body_of(MSG_UNAVAILABLE)), r
        assert took < 2.5, f"answered after {took:.2f}s"
    assert upstream.received() == []
    idp.clear_faults()


def test_unknown_kid_refresh_against_hanging_idp(envoy, idp, rsa, upstream):
    """Keys cached; the IdP then hangs. A token with an unknown kid waits for
    the refresh at most timeout_ms + 1 s, then gets 401 (and known tokens keep
    passing meanwhile)."""
    idp.set_keys(rsa)
    gw = envoy(jwt_config(idp.port, jwks={"timeout_ms": 1000, "refresh_cooldown_seconds": 1}))
    good = rsa.sign(tokens.claims())
    wait_for_streak(gw, good)
    idp.set_fault("/jwks", delay=30)
    time.sleep(1.2)  # past the cooldown
    stranger = tokens.rsa_key("stranger").sign(tokens.claims())
    start = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        slow = pool.submit(gw.get, API, token=stranger, timeout=10)
        time.sleep(0.2)
        assert gw.get(API, token=good, timeout=5).status == 200, "a known token waited for the refresh"
        r = slow.result()
    took = time.monotonic() - start
    assert_denied(r, 401, MSG_INVALID)
    assert took < 2.5, f"answered after {took:.2f}s"
    idp.clear_faults()


# -- outages with keys cached ----------------------------------------------------------------------

def test_stale_keys_used_during_outage_with_bounded_retries(envoy, idp, rsa):
    """cache_ttl 1 s, then the IdP drops every connection: the last good keys
    keep serving (max_stale_seconds defaults to a day) while refreshes are
    retried with backoff (0.5 s doubling), not on every tick or request:
    at most 6 fetches in 5 s, from the whole process."""
    idp.set_keys(rsa)
    gw = envoy(jwt_config(idp.port, jwks={"cache_ttl": 1}))
    token = rsa.sign(tokens.claims())
    wait_for_streak(gw, token)
    idp.down = True
    before = idp.count("/jwks")
    start = time.monotonic()
    statuses = []
    while time.monotonic() - start < 5:
        statuses.append(gw.get(API, token=token).status)
        time.sleep(0.02)
    fetches = idp.count("/jwks") - before
    print(f"outage: {len(statuses)} requests in 5 s, {fetches} JWKS fetches")
    assert set(statuses) == {200}, statuses
    assert 2 <= fetches <= 6, fetches
    idp.down = False


class Fresh:
    """A new token (new jti) at every call: no answer comes from the
    verified-token cache, every request goes to the key set."""

    def __init__(self, key: tokens.SigningKey):
        self.key, self.n = key, 0

    def __call__(self) -> str:
        self.n += 1
        return self.key.sign(tokens.claims(jti=f"fresh-{self.n}-{time.time()}"))


def test_keys_expire_after_max_stale(envoy, idp, rsa, upstream):
    """cache_ttl 1 s and max_stale_seconds 1 s: during an outage the keys serve
    until they are ttl + stale (2 s) old, then 503; once the IdP is back the
    tokens pass again without a restart. (New tokens each time: see
    test_cached_token_not_served_past_max_stale for a token seen before.)"""
    idp.set_keys(rsa)
    gw = envoy(jwt_config(idp.port, jwks={"cache_ttl": 1, "max_stale_seconds": 1}))
    fresh = Fresh(rsa)
    wait_for_streak(gw, fresh())
    # Start the outage right after a periodic refresh, so the keys are ~0 s old.
    seen = idp.count("/jwks")
    deadline = time.monotonic() + 5
    while idp.count("/jwks") == seen:
        assert time.monotonic() < deadline, "no periodic refresh with cache_ttl 1"
        time.sleep(0.01)
    idp.set_fault("/jwks", status=503, body="down")
    outage = time.monotonic()
    first = gw.get(API, token=fresh())
    assert first.status == 200, first  # keys ~0 s old
    deadline = outage + 8
    r = None
    while time.monotonic() < deadline:
        r = gw.get(API, token=fresh())
        if r.status != 200:
            break
        time.sleep(0.05)
    took = time.monotonic() - outage
    print(f"keys refused {took:.2f}s into the outage")
    assert_denied(r, 503, MSG_UNAVAILABLE)
    assert 1.5 <= took < 4.5, took  # ttl + stale = 2 s
    assert [gw.get(API, token=fresh()).status for _ in range(3)] == [503] * 3
    idp.clear_faults()
    took_back = time.monotonic()
    wait_for_streak(gw, fresh(), timeout=15)
    print(f"recovered {time.monotonic() - took_back:.2f}s after the IdP came back")


def test_cached_token_not_served_past_max_stale(envoy, idp, rsa, upstream):
    """A token seen before the outage is no more trusted than a new one once the
    key set is too stale to use: 503 for both."""
    idp.set_keys(rsa)
    gw = envoy(jwt_config(idp.port, jwks={"cache_ttl": 1, "max_stale_seconds": 1}))
    seen = rsa.sign(tokens.claims(sub="seen-before"))
    wait_for_streak(gw, seen)
    fresh = Fresh(rsa)
    idp.set_fault("/jwks", status=503, body="down")
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline and gw.get(API, token=fresh()).status == 200:
        time.sleep(0.05)
    assert gw.get(API, token=fresh()).status == 503, "the key set never went stale"
    statuses = [gw.get(API, token=seen).status for _ in range(5)]
    print(f"token verified before the outage, after the keys expired: {statuses}")
    assert statuses == [503] * 5


def test_missing_cluster_is_named_in_the_log(envoy, idp, rsa):
    """The JWKS cluster is not in Envoy's configuration: 503, and the log says
    which cluster (the 503 itself is in test_jwt.py)."""
    idp.set_keys(rsa)
    gw = envoy(jwt_config(idp.port, jwks={"cluster": "jwks-cluster-not-in-envoy"}), clusters={})
    assert_denied(gw.get(API, token=rsa.sign(tokens.claims())), 503, MSG_UNAVAILABLE)
    time.sleep(0.3)
    lines = [line for line in gw.log_text().splitlines() if "jwks-cluster-not-in-envoy" in line
             and "wasm log" in line]
    assert lines, gw.log_tail()
    assert idp.count("/jwks") == 0
