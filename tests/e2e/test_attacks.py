"""Hardening: a corpus of hostile tokens and Authorization values against one
Envoy (--concurrency 2) serving a good RSA and a good EC key.

Every attack gets the same 401 `{"error":{"message":"Invalid JWT token"}}`:
never a 2xx, never a 5xx, never a VM trap (conftest fails the test on a trap),
and nothing reaches the upstream. The served JWKS also holds keys tollgate
must skip (RSA under 2048 bits, RSA with e = 3, an EC point off the curve).
The last test checks that a valid token still passes after the whole corpus.

Not repeated here (test_jwt.py has them): plain `alg: none`, HS256 keyed with
the RSA PEM, tampered signature/claims, expired, wrong aud/iss, missing
claims, 30 KB of garbage, control characters in claims."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import re
import socket
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from cryptography.x509.oid import NameOID

from harness import tokens
from harness.config import jwt_config
from harness.server import Reply

API = "/v1/models"
INVALID_BODY = b'{"error":{"message":"Invalid JWT token"}}'

b64url = tokens.b64url


# -- signing by hand ---------------------------------------------------------------

_HASHES = {"256": hashes.SHA256, "384": hashes.SHA384, "512": hashes.SHA512}


def signature(key, alg: str, data: bytes) -> bytes:
    """The JWS signature of `data` with a cryptography private key (RS*, PS*, ES*)."""
    h = _HASHES[alg[2:]]()
    if alg.startswith("RS"):
        return key.sign(data, padding.PKCS1v15(), h)
    if alg.startswith("PS"):
        return key.sign(data, padding.PSS(padding.MGF1(h), h.digest_size), h)
    if alg.startswith("ES"):
        r, s = decode_dss_signature(key.sign(data, ec.ECDSA(h)))
        size = (key.curve.key_size + 7) // 8
        return r.to_bytes(size, "big") + s.to_bytes(size, "big")
    raise ValueError(alg)


def _json(part) -> bytes:
    return part if isinstance(part, bytes) else json.dumps(part).encode()


def sign_raw(key, header, payload, alg: str | None = None) -> str:
    """A compact JWS over exactly these header and payload bytes (dicts are
    JSON-encoded), signed with `key` (a SigningKey or a cryptography key)."""
    priv = key.private_key if isinstance(key, tokens.SigningKey) else key
    alg = alg or (key.alg if isinstance(key, tokens.SigningKey) else "RS256")
    signing_input = f"{b64url(_json(header))}.{b64url(_json(payload))}"
    return f"{signing_input}.{b64url(signature(priv, alg, signing_input.encode()))}"


def hdr(key: tokens.SigningKey, **extra) -> dict:
    return {"alg": key.alg, "typ": "JWT", "kid": key.kid, **extra}


def claims(**kw) -> dict:
    return tokens.claims(**kw)


def mac_token(alg: str, secret: bytes, kid: str) -> str:
    """An HS* token keyed with `secret` (the algorithm-confusion attack)."""
    header = {"alg": alg, "typ": "JWT", "kid": kid}
    signing_input = f"{b64url(_json(header))}.{b64url(_json(claims()))}"
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    return f"{signing_input}.{b64url(hmac.new(secret, signing_input.encode(), digest).digest())}"


def self_signed_cert(key: tokens.SigningKey) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "attacker.example")])
    now = time.time()
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key).serial_number(4242)
            .not_valid_before(dt.datetime.fromtimestamp(now - 3600, dt.timezone.utc))
            .not_valid_after(dt.datetime.fromtimestamp(now + 86400, dt.timezone.utc))
            .sign(key.private_key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.DER)


# -- the answers ---------------------------------------------------------------------

def assert_invalid(resp) -> None:
    """The exact 401 for a bad token."""
    assert resp.status == 401, resp
    assert resp.body == INVALID_BODY, resp
    assert resp.headers.get("content-type") == "application/json", resp
    assert resp.headers.get("www-authenticate", "").startswith("Bearer"), resp


def raw_request(port: int, head: bytes, timeout: float = 15.0) -> tuple[int, bytes, bytes]:
    """Sends `head` (a full request head, `Connection: close` added) on a raw
    socket; returns (status, response head, body)."""
    data = head.rstrip(b"\r\n") + b"\r\nConnection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        while True:
            c = s.recv(65536)
            if not c:
                break
            chunks.append(c)
    answer = b"".join(chunks)
    head_bytes, _, body = answer.partition(b"\r\n\r\n")
    m = re.match(rb"HTTP/1\.[01] (\d{3})", head_bytes)
    assert m, answer[:300]
    return int(m.group(1)), head_bytes, body


# -- keys and the gateway --------------------------------------------------------------

class Keys:
    """The served keys, the skipped ones, and the attacker's."""

    def __init__(self):
        self.rsa = tokens.rsa_key("rs-good", "RS256")
        self.ec = tokens.ec_key("ec-good", "ES256")
        self.weak1024 = tokens.SigningKey("weak-1024", "RS256",
                                          rsa.generate_private_key(65537, 1024))
        self.weak2047 = tokens.SigningKey("weak-2047", "RS256",
                                          rsa.generate_private_key(65537, 2047))
        self.e3 = tokens.SigningKey("weak-e3", "RS256", rsa.generate_private_key(3, 2048))
        self.off_curve = tokens.ec_key("bad-ec", "ES256")  # served with a point off the curve
        self.attacker = tokens.rsa_key("attacker-1", "RS256")
        self.attacker_ec = tokens.ec_key("attacker-ec", "ES256")

    def jwks(self) -> dict:
        good = self.off_curve.jwk()
        # Flip the low bit of y: (x, y') is not on P-256 (for any x, at most
        # y and p - y are, and p is odd so p - y has the other parity).
        y = bytearray(tokens.b64url_decode(good["y"]))
        y[-1] ^= 0x01
        off = dict(good, y=b64url(bytes(y)))
        return {"keys": [self.rsa.jwk(), self.ec.jwk(), self.weak1024.jwk(), self.weak2047.jwk(),
                         self.e3.jwk(), off]}


SKIPPED = {2: "weak-1024", 3: "weak-2047", 4: "weak-e3", 5: "bad-ec"}  # index in the JWKS


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys()


@pytest.fixture(scope="module", params=["all-headers", "authorization-only"])
def gw(request, module_idp, module_envoy, keys):
    """The gateway; the IdP also serves the attacker's JWKS and certificate on
    paths that `jku`/`x5u` point at (they must never be fetched). Every attack
    runs twice: with a public path (tollgate reads every request header in one
    call) and without (nothing needs the path: it reads `authorization` alone)."""
    module_idp.set_jwks(keys.jwks())
    module_idp.route("/attacker/jwks", lambda req: Reply(200, tokens.jwks(keys.attacker, keys.attacker_ec)))
    module_idp.route("/attacker/x5u", lambda req: Reply(
        200, base64.encodebytes(self_signed_cert(keys.attacker)), {"content-type": "application/pkix-cert"}))
    public = ["/v1/health"] if request.param == "all-headers" else []
    e = module_envoy(jwt_config(module_idp.port, public_paths=public), concurrency=2)
    # Warm up: the key set is loaded and the good keys work.
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if e.get(API, token=keys.rsa.sign(claims())).status == 200:
            break
        time.sleep(0.2)
    return e


def attacker_url(idp, path: str) -> str:
    return f"http://127.0.0.1:{idp.port}{path}"


# -- the corpus ---------------------------------------------------------------------------

def _alg_none(k: Keys, spelling: str, signed: bool) -> str:
    header = {"alg": spelling, "typ": "JWT", "kid": k.rsa.kid}
    signing_input = f"{b64url(_json(header))}.{b64url(_json(claims()))}"
    sig = b64url(signature(k.rsa.private_key, "RS256", signing_input.encode())) if signed else ""
    return f"{signing_input}.{sig}"


ALG_NONE = {f"alg_{name}_{'signed' if signed else 'unsigned'}":
            (lambda k, s=spelling, sg=signed: _alg_none(k, s, sg))
            for name, spelling in [("none", "none"), ("None", "None"), ("NONE", "NONE"), ("nOnE", "nOnE")]
            for signed in (False, True)}

ALG_ODD = {
    # Signed by the good key with RS256 but announcing another spelling of it.
    "alg_lowercase_rs256": lambda k: sign_raw(k.rsa, hdr(k.rsa, alg="rs256"), claims(), "RS256"),
    "alg_trailing_space": lambda k: sign_raw(k.rsa, hdr(k.rsa, alg="RS256 "), claims(), "RS256"),
    "alg_empty": lambda k: sign_raw(k.rsa, hdr(k.rsa, alg=""), claims(), "RS256"),
    "alg_list": lambda k: sign_raw(k.rsa, hdr(k.rsa, alg=["RS256"]), claims(), "RS256"),
    "alg_missing": lambda k: sign_raw(k.rsa, {"typ": "JWT", "kid": "rs-good"}, claims(), "RS256"),
    "alg_null": lambda k: sign_raw(k.rsa, hdr(k.rsa, alg=None), claims(), "RS256"),
    "alg_ES256_on_rsa_kid": lambda k: sign_raw(k.ec, hdr(k.ec, kid="rs-good"), claims()),
    "alg_PS256_on_rs256_key": lambda k: sign_raw(k.rsa, hdr(k.rsa, alg="PS256"), claims(), "PS256"),
    "alg_ES512": lambda k: sign_raw(k.ec, hdr(k.ec, alg="ES512"), claims(), "ES256"),
}


def _key_forms(key: tokens.SigningKey) -> dict[str, bytes]:
    pub = key.public_key
    forms = {
        "pem": key.public_pem(),
        "der": pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo),
        "jwk_json": json.dumps(key.jwk()).encode(),
        "jwk_json_compact": json.dumps(key.jwk(), separators=(",", ":")).encode(),
    }
    if isinstance(pub, rsa.RSAPublicKey):
        n = pub.public_numbers().n
        forms["raw_modulus"] = n.to_bytes((n.bit_length() + 7) // 8, "big")
        forms["pem_pkcs1"] = pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1)
        forms["der_pkcs1"] = pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
    else:
        forms["raw_point"] = pub.public_bytes(serialization.Encoding.X962,
                                              serialization.PublicFormat.UncompressedPoint)
    return forms


_CONFUSION_FORMS = {"rsa": ["pem", "pem_pkcs1", "der", "der_pkcs1", "jwk_json", "jwk_json_compact", "raw_modulus"],
                    "ec": ["pem", "der", "jwk_json", "jwk_json_compact", "raw_point"]}

CONFUSION = {f"{alg}_keyed_with_{which}_{form}":
             (lambda k, a=alg, w=which, f=form: mac_token(a, _key_forms(getattr(k, w))[f], getattr(k, w).kid))
             for alg in ("HS256", "HS384", "HS512")
             for which, forms in _CONFUSION_FORMS.items() for form in forms}


def _embedded_jwk(k: Keys, kid) -> str:
    header = {"alg": "RS256", "typ": "JWT", "jwk": k.attacker.jwk()}
    if kid is not None:
        header["kid"] = kid
    return sign_raw(k.attacker, header, claims())


HEADER_KEYS = {
    "jwk_embedded_no_kid": lambda k: _embedded_jwk(k, None),
    "jwk_embedded_attacker_kid": lambda k: _embedded_jwk(k, "attacker-1"),
    "jwk_embedded_good_kid": lambda k: _embedded_jwk(k, "rs-good"),
    "jwk_embedded_ec": lambda k: sign_raw(k.attacker_ec, {"alg": "ES256", "jwk": k.attacker_ec.jwk()}, claims()),
    "jwk_embedded_good_key_signed_by_attacker": lambda k: sign_raw(
        k.attacker, {"alg": "RS256", "kid": "rs-good", "jwk": k.rsa.jwk()}, claims()),
    "jku_attacker_kid": lambda k: sign_raw(k.attacker, hdr(k.attacker, jku=k.attacker_jku), claims()),
    "jku_good_kid": lambda k: sign_raw(k.attacker, hdr(k.attacker, kid="rs-good", jku=k.attacker_jku), claims()),
    "jku_no_kid": lambda k: sign_raw(k.attacker, {"alg": "RS256", "jku": k.attacker_jku}, claims()),
    "x5u_attacker": lambda k: sign_raw(k.attacker, hdr(k.attacker, x5u=k.attacker_x5u), claims()),
    "x5u_no_kid": lambda k: sign_raw(k.attacker, {"alg": "RS256", "x5u": k.attacker_x5u}, claims()),
    "x5c_attacker_cert": lambda k: sign_raw(
        k.attacker, {"alg": "RS256", "x5c": [base64.b64encode(self_signed_cert(k.attacker)).decode()]}, claims()),
    "x5c_attacker_cert_good_kid": lambda k: sign_raw(
        k.attacker, {"alg": "RS256", "kid": "rs-good",
                     "x5c": [base64.b64encode(self_signed_cert(k.attacker)).decode()]}, claims()),
}

KIDS = {
    "kid_path_traversal": "../../etc/passwd",
    "kid_path_traversal_dev_null": "../../../../../../dev/null",
    "kid_sql_injection": "' OR 1=1 --",
    "kid_sql_union": "x' UNION SELECT 'secret' --",
    "kid_10KiB": "A" * 10240,
    "kid_257_bytes": "k" * 257,
    "kid_256_bytes_unknown": "k" * 256,
    "kid_good_with_nul": "rs-good\x00",
    "kid_good_trailing_space": "rs-good ",
    "kid_good_uppercase": "RS-GOOD",
    "kid_empty": "",
    "kid_number": 1,
    "kid_list": ["rs-good"],
    "kid_object": {"kid": "rs-good"},
    "kid_null": None,
    "kid_weak_key": "weak-1024",
}
KID_CASES = {name: (lambda k, v=value: sign_raw(k.rsa, hdr(k.rsa, kid=v), claims())) for name, value in KIDS.items()}

REFUSED_HEADERS = {
    "crit_unknown_extension": lambda k: sign_raw(k.rsa, hdr(k.rsa, crit=["urn:example:ext"], **{"urn:example:ext": 1}), claims()),
    "crit_empty_list": lambda k: sign_raw(k.rsa, hdr(k.rsa, crit=[]), claims()),
    "crit_exp": lambda k: sign_raw(k.rsa, hdr(k.rsa, crit=["exp"], exp=1), claims()),
    "b64_false": lambda k: sign_raw(k.rsa, hdr(k.rsa, b64=False), claims()),
    "b64_false_crit": lambda k: sign_raw(k.rsa, hdr(k.rsa, b64=False, crit=["b64"]), claims()),
    "b64_true": lambda k: sign_raw(k.rsa, hdr(k.rsa, b64=True, crit=["b64"]), claims()),
    "enc_in_jws_header": lambda k: sign_raw(k.rsa, hdr(k.rsa, enc="A256GCM"), claims()),
    "zip_in_jws_header": lambda k: sign_raw(k.rsa, hdr(k.rsa, zip="DEF"), claims()),
}


def _unencoded_payload(k: Keys) -> str:
    """RFC 7797: `b64: false` with the payload as is in the signing input."""
    header = hdr(k.rsa, b64=False, crit=["b64"])
    payload = json.dumps(claims())
    h = b64url(_json(header))
    sig = signature(k.rsa.private_key, "RS256", f"{h}.{payload}".encode())
    return f"{h}.{payload}.{b64url(sig)}"


def _json_serialisation(k: Keys, flattened: bool) -> str:
    token = k.rsa.sign(claims())
    h, p, s = token.split(".")
    if flattened:
        doc = {"payload": p, "protected": h, "signature": s}
    else:
        doc = {"payload": p, "signatures": [{"protected": h, "signature": s}]}
    return json.dumps(doc, separators=(",", ":"))


def _jwe(k: Keys, **extra) -> str:
    header = {"alg": "RSA-OAEP-256", "enc": "A256GCM", "kid": k.rsa.kid, **extra}
    parts = [b64url(_json(header)), b64url(b"\x01" * 256), b64url(b"\x02" * 12),
             b64url(json.dumps(claims()).encode()), b64url(b"\x03" * 16)]
    return ".".join(parts)


SERIALISATIONS = {
    "unencoded_payload_rfc7797": _unencoded_payload,
    "jws_json_general": lambda k: _json_serialisation(k, False),
    "jws_json_flattened": lambda k: _json_serialisation(k, True),
    "jws_json_general_base64url": lambda k: b64url(_json_serialisation(k, False).encode()),
    "jwe_5_parts": lambda k: _jwe(k),
    "jwe_nested_jwt": lambda k: _jwe(k, cty="JWT"),
    "jwe_dir_empty_key": lambda k: ".".join([b64url(b'{"alg":"dir","enc":"A128GCM"}'), "",
                                            b64url(b"\x00" * 12), b64url(b"x" * 40), b64url(b"\x00" * 16)]),
    "valid_jws_plus_two_parts": lambda k: k.rsa.sign(claims()) + ".AAAA.AAAA",
    "valid_jws_plus_empty_part": lambda k: k.rsa.sign(claims()) + ".",
    "four_parts": lambda k: k.rsa.sign(claims()) + ".AAAA",
    "two_parts": lambda k: ".".join(k.rsa.sign(claims()).split(".")[:2]),
    "empty_signature": lambda k: ".".join(k.rsa.sign(claims()).split(".")[:2]) + ".",
    "empty_header": lambda k: "." + ".".join(k.rsa.sign(claims()).split(".")[1:]),
    "header_not_object": lambda k: sign_raw(k.rsa, b'["RS256"]', claims()),
    "header_json_string": lambda k: sign_raw(k.rsa, b'"RS256"', claims()),
    "header_trailing_garbage": lambda k: sign_raw(k.rsa, _json(hdr(k.rsa)) + b"x", claims()),
    "header_utf8_bom": lambda k: sign_raw(k.rsa, b"\xef\xbb\xbf" + _json(hdr(k.rsa)), claims()),
    "payload_not_object": lambda k: sign_raw(k.rsa, hdr(k.rsa), b"[1,2,3]"),
    "payload_not_json": lambda k: sign_raw(k.rsa, hdr(k.rsa), b"sub=alice"),
    "payload_invalid_utf8": lambda k: sign_raw(
        k.rsa, hdr(k.rsa), _json(claims())[:-1] + b',"x":"\xff\xfe"}'),
    "header_deeply_nested": lambda k: sign_raw(
        k.rsa, b'{"alg":"RS256","kid":"rs-good","x":' + b"[" * 3000 + b"]" * 3000 + b"}", claims()),
    "payload_deeply_nested": lambda k: sign_raw(
        k.rsa, hdr(k.rsa), _json(claims())[:-1] + b',"x":' + b"[" * 5000 + b"]" * 5000 + b"}"),
    "payload_deeply_nested_objects": lambda k: sign_raw(
        k.rsa, hdr(k.rsa), _json(claims())[:-1] + b',"x":' + b'{"a":' * 2000 + b"1" + b"}" * 2000 + b"}"),
}


def _dup(base: dict, key: str, first, last_wins=True) -> bytes:
    """`base` as JSON with `key` appearing twice: `first`, then base's value."""
    body = json.dumps({k: v for k, v in base.items() if k != key})[1:-1]
    return ("{" + f"{json.dumps(key)}:{json.dumps(first)}, {body}, {json.dumps(key)}:{json.dumps(base[key])}" + "}").encode()


DUPLICATES = {
    "dup_header_alg": lambda k: sign_raw(k.rsa, _dup(hdr(k.rsa), "alg", "none"), claims()),
    "dup_header_kid": lambda k: sign_raw(k.rsa, _dup(hdr(k.rsa), "kid", "attacker-1"), claims()),
    "dup_header_kid_same_value": lambda k: sign_raw(k.rsa, _dup(hdr(k.rsa), "kid", "rs-good"), claims()),
    "dup_payload_sub": lambda k: sign_raw(k.rsa, hdr(k.rsa), _dup(claims(sub="root"), "sub", "alice")),
    "dup_payload_aud": lambda k: sign_raw(k.rsa, hdr(k.rsa), _dup(claims(), "aud", "someone-else")),
    "dup_payload_exp": lambda k: sign_raw(k.rsa, hdr(k.rsa), _dup(claims(), "exp", 1)),
    "dup_payload_iss": lambda k: sign_raw(k.rsa, hdr(k.rsa), _dup(claims(), "iss", "https://evil.example")),
    # The same key twice once escapes are decoded: "s\u0075b" is "sub".
    "dup_payload_sub_escaped": lambda k: sign_raw(
        k.rsa, hdr(k.rsa), _json(claims(sub="alice"))[:-1] + b', "s\\u0075b": "root"}'),
    "dup_header_alg_escaped": lambda k: sign_raw(
        k.rsa, _json(hdr(k.rsa))[:-1] + b', "\\u0061lg": "none"}', claims()),
}


def _time_cases() -> dict:
    now = int(time.time())
    values = {
        "string": lambda base: str(base),
        "exponent_1e30": lambda base: 1e30,
        "two_pow_64": lambda base: 2 ** 64,
        "two_pow_63": lambda base: 2 ** 63,
        "year_3000_plus_1": lambda base: 32_503_680_001,
        "negative": lambda base: -1,
        "negative_huge": lambda base: -(2 ** 63),
        "bool": lambda base: True,
        "null": lambda base: None,
        "list": lambda base: [base],
    }
    base = {"exp": now + 300, "nbf": now - 60, "iat": now - 60}
    out = {}
    for claim in ("exp", "nbf", "iat"):
        for vname, make in values.items():
            def token(k, c=claim, mk=make):
                cl = claims()
                cl[c] = mk(base[c])
                return sign_raw(k.rsa, hdr(k.rsa), _json(cl))
            out[f"{claim}_{vname}"] = token
    return out


TIMES = _time_cases()

CLAIM_TYPES = {
    "aud_object": lambda k: sign_raw(k.rsa, hdr(k.rsa), claims(aud={"llama-stack": True})),
    "aud_list_with_number": lambda k: sign_raw(k.rsa, hdr(k.rsa), claims(aud=[1, "llama-stack"])),
    "aud_nested_list": lambda k: sign_raw(k.rsa, hdr(k.rsa), claims(aud=[["llama-stack"]])),
    "aud_empty_list": lambda k: sign_raw(k.rsa, hdr(k.rsa), claims(aud=[])),
    "sub_number": lambda k: sign_raw(k.rsa, hdr(k.rsa), claims(sub=12345)),
    "sub_object": lambda k: sign_raw(k.rsa, hdr(k.rsa), claims(sub={"id": "alice"})),
    "sub_empty": lambda k: sign_raw(k.rsa, hdr(k.rsa), claims(sub="")),
    "iss_list": lambda k: sign_raw(k.rsa, hdr(k.rsa), claims(iss=["https://idp.example"])),
}


def _rsa_sig_value(k: Keys, value: int) -> str:
    h, p, _ = k.rsa.sign(claims()).split(".")
    return f"{h}.{p}.{b64url(value.to_bytes(256, 'big'))}"


def _sig_edit(token: str, edit) -> str:
    h, p, s = token.split(".")
    return f"{h}.{p}.{b64url(edit(tokens.b64url_decode(s)))}"


def _ec_der_signature(k: Keys) -> str:
    h, p, s = k.ec.sign(claims()).split(".")
    raw = tokens.b64url_decode(s)
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    return f"{h}.{p}.{b64url(der)}"


SIGNATURES = {
    "rsa_sig_one_byte_short": lambda k: _sig_edit(k.rsa.sign(claims()), lambda s: s[:-1]),
    "rsa_sig_one_byte_long": lambda k: _sig_edit(k.rsa.sign(claims()), lambda s: s + b"\x00"),
    "rsa_sig_leading_zero": lambda k: _sig_edit(k.rsa.sign(claims()), lambda s: b"\x00" + s),
    "rsa_sig_doubled": lambda k: _sig_edit(k.rsa.sign(claims()), lambda s: s + s),
    "rsa_sig_zero": lambda k: _rsa_sig_value(k, 0),
    "rsa_sig_one": lambda k: _rsa_sig_value(k, 1),
    "rsa_sig_modulus": lambda k: _rsa_sig_value(k, k.rsa.public_key.public_numbers().n),
    "rsa_sig_modulus_plus_one": lambda k: _rsa_sig_value(k, k.rsa.public_key.public_numbers().n + 1),
    "rsa_sig_one_byte": lambda k: _sig_edit(k.rsa.sign(claims()), lambda s: b"\x01"),
    "ec_sig_63_bytes": lambda k: _sig_edit(k.ec.sign(claims()), lambda s: s[:-1]),
    "ec_sig_65_bytes": lambda k: _sig_edit(k.ec.sign(claims()), lambda s: s + b"\x00"),
    "ec_sig_der_encoded": _ec_der_signature,
    "ec_sig_all_zero": lambda k: _sig_edit(k.ec.sign(claims()), lambda s: b"\x00" * 64),  # CVE-2022-21449
    "ec_sig_r_zero": lambda k: _sig_edit(k.ec.sign(claims()), lambda s: b"\x00" * 32 + s[32:]),
    "ec_sig_order_n": lambda k: _sig_edit(k.ec.sign(claims()), lambda s: bytes.fromhex(
        "FFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551") * 2),
    "ec_signature_on_rsa_token": lambda k: ".".join(k.rsa.sign(claims()).split(".")[:2]
                                                    + k.ec.sign(claims()).split(".")[2:]),
}


def _std_b64(token: str) -> str:
    """The token with every part in the standard alphabet (`+/`), unpadded."""
    return ".".join(base64.b64encode(tokens.b64url_decode(p)).decode().rstrip("=") for p in token.split("."))


def _with_std_alphabet(k: Keys) -> str:
    for i in range(200):
        t = k.rsa.sign(claims(jti=f"j{i}"))
        std = _std_b64(t)
        if std != t and ("+" in std or "/" in std):
            return std
    raise AssertionError("no token with - or _ in 200 tries")


def _padded(token: str, part: int) -> str:
    parts = token.split(".")
    parts[part] += "=" * (-len(parts[part]) % 4 or 4)
    return ".".join(parts)


def _padded_header(k: Keys) -> str:
    # A header whose base64 needs padding (length not a multiple of 3).
    for pad in range(3):
        h = hdr(k.rsa, x="y" * pad)
        if len(_json(h)) % 3:
            return _padded(sign_raw(k.rsa, h, claims()), 0)
    raise AssertionError


ENCODINGS = {
    "b64_padding_header": _padded_header,
    "b64_padding_signature_rsa": lambda k: _padded(k.rsa.sign(claims()), 2),  # 256 bytes: needs 2 '='
    "b64_padding_signature_ec": lambda k: _padded(k.ec.sign(claims()), 2),  # 64 bytes: needs 2 '='
    "b64_standard_alphabet": _with_std_alphabet,
    "space_inside": lambda k: k.rsa.sign(claims()).replace(".", ". ", 1),
    "tab_inside": lambda k: k.rsa.sign(claims()).replace(".", ".\t", 1),
    "space_in_signature": lambda k: (lambda t: t[:-10] + " " + t[-10:])(k.rsa.sign(claims())),
    "percent_encoded": lambda k: k.rsa.sign(claims()).replace(".", "%2E"),
    "quoted": lambda k: '"' + k.rsa.sign(claims()) + '"',
    "ten_thousand_dots": lambda k: "." * 10000,
    "only_dots": lambda k: "..",
    "header_only": lambda k: k.rsa.sign(claims()).split(".")[0],
    "over_16KiB_validly_signed": lambda k: k.rsa.sign(claims(pad="x" * 17000)),
    "40KiB_validly_signed": lambda k: k.rsa.sign(claims(pad="x" * 40000)),
    "weak_rsa_1024_signed": lambda k: sign_raw(k.weak1024, hdr(k.weak1024), claims()),
    "weak_rsa_2047_signed": lambda k: sign_raw(k.weak2047, hdr(k.weak2047), claims()),
    "weak_rsa_e3_signed": lambda k: sign_raw(k.e3, hdr(k.e3), claims()),
    "off_curve_kid_signed": lambda k: sign_raw(k.off_curve, hdr(k.off_curve), claims()),
    "weak_rsa_1024_no_kid": lambda k: sign_raw(k.weak1024, {"alg": "RS256"}, claims()),
}

GROUPS = {
    "alg_none": ALG_NONE, "alg_odd": ALG_ODD, "confusion": CONFUSION, "header_keys": HEADER_KEYS,
    "kid": KID_CASES, "refused_headers": REFUSED_HEADERS, "serialisation": SERIALISATIONS,
    "duplicates": DUPLICATES, "time_claims": TIMES, "claim_types": CLAIM_TYPES,
    "signatures": SIGNATURES, "encoding": ENCODINGS,
}
CORPUS = {name: make for group in GROUPS.values() for name, make in group.items()}
assert len(CORPUS) == sum(len(g) for g in GROUPS.values()), "duplicate case names"


@pytest.fixture(scope="module")
def attack_keys(keys, module_idp):
    keys.attacker_jku = attacker_url(module_idp, "/attacker/jwks")
    keys.attacker_x5u = attacker_url(module_idp, "/attacker/x5u")
    return keys


CONTROLS = {
    # The corpus builders, used to make tokens that must pass: a 401 above is
    # then the attack's doing, not a broken builder.
    "sign_raw_rsa": lambda k: sign_raw(k.rsa, hdr(k.rsa), claims()),
    "sign_raw_ec": lambda k: sign_raw(k.ec, hdr(k.ec), claims()),
    "alg_builder_with_RS256": lambda k: _alg_none(k, "RS256", True),
    "time_claims_as_integers": lambda k: sign_raw(k.rsa, hdr(k.rsa), _json(claims(nbf=int(time.time()) - 60))),
    # RFC 7519's NumericDate may have a fraction (PyJWT and python-jose accept
    # it): cut to whole seconds.
    **{f"{c}_{kind}": (lambda k, c=c, f=f: sign_raw(k.rsa, hdr(k.rsa), _json(
        {**claims(), c: f(int(time.time()) + (300 if c == "exp" else -60))})))
       for c in ("exp", "nbf", "iat")
       for kind, f in (("float_fraction", lambda b: b + 0.5), ("float_integral", float))},
    "kid_builder_good_kid": lambda k: sign_raw(k.rsa, hdr(k.rsa, kid="rs-good"), claims()),
    "signature_edit_identity": lambda k: _sig_edit(k.rsa.sign(claims()), lambda s: s),
    "ec_signature_edit_identity": lambda k: _sig_edit(k.ec.sign(claims()), lambda s: s),
    "std_alphabet_of_a_token_without_dash": lambda k: next(
        t for t in (k.ec.sign(claims(jti=f"c{i}")) for i in range(500)) if _std_b64(t) == t),
    "typ_and_unknown_header_fields": lambda k: sign_raw(k.rsa, hdr(k.rsa, typ="at+jwt", foo="bar"), claims()),
}


@pytest.mark.parametrize("case", list(CONTROLS))
def test_control_token_passes(gw, attack_keys, case, upstream):
    """Positive controls for the builders of the corpus."""
    r = gw.get(API, token=CONTROLS[case](attack_keys))
    assert r.status == 200, r
    assert len(upstream.received()) == 1


@pytest.mark.parametrize("case", list(CORPUS))
def test_attack_gets_401(gw, attack_keys, case, upstream):
    """Each hostile token: the exact 401, nothing forwarded."""
    token = CORPUS[case](attack_keys)
    r = gw.get(API, headers={"Authorization": f"Bearer {token}"})
    assert_invalid(r)
    assert upstream.received() == []


def test_header_key_parameters_never_fetched(gw, attack_keys, module_idp):
    """`jku` and `x5u` point at live URLs on a cluster Envoy knows: tollgate
    never fetches them (the corpus above sent them; send them once more)."""
    for case in ("jku_attacker_kid", "jku_good_kid", "jku_no_kid", "x5u_attacker", "x5u_no_kid"):
        assert_invalid(gw.get(API, token=HEADER_KEYS[case](attack_keys)))
    time.sleep(0.5)
    assert module_idp.count("/attacker/jwks") == 0
    assert module_idp.count("/attacker/x5u") == 0
    assert {r.route for r in module_idp.received()} <= {"/jwks"}


def test_weak_and_off_curve_keys_skipped_good_keys_work(gw, attack_keys, upstream):
    """The JWKS mixes good keys with RSA keys under 2048 bits, an RSA key with
    e = 3 and an EC point off the curve: those are skipped (and logged), the
    good ones verify."""
    k = attack_keys
    assert gw.get(API, token=k.rsa.sign(claims(sub="rsa-user"))).status == 200
    assert gw.get(API, token=k.ec.sign(claims(sub="ec-user"))).status == 200
    log = gw.log_text()
    skipped = {int(m.group(1)): line for line in log.splitlines()
               if (m := re.search(r"JWKS key #(\d+) skipped", line))}
    for index, kid in SKIPPED.items():
        assert index in skipped, f"no log line for skipped key #{index} ({kid}):\n{gw.log_tail()}"
    for index in (2, 3, 4):
        assert "RSA key refused" in skipped[index], skipped[index]
    assert "not a valid point on the curve" in skipped[5], skipped[5]
    assert 0 not in skipped and 1 not in skipped


@pytest.mark.parametrize("size_kib", [64])
def test_token_over_envoy_header_limit(gw, attack_keys, upstream, size_kib):
    """A validly signed 64 KiB token. Envoy's default `max_request_headers_kb`
    is 60 (the harness bootstrap keeps it), so Envoy's codec answers
    431 Request Header Fields Too Large before the filter runs; the contract's
    401 is only reachable below that limit (see `40KiB_validly_signed` in the
    corpus). Whatever answers, it is neither 2xx nor 5xx, nothing is forwarded."""
    token = attack_keys.rsa.sign(claims(pad="x" * ((size_kib * 1024 - 600) * 3 // 4)))
    assert size_kib * 1024 - 1024 < len(token) <= size_kib * 1024, len(token)
    try:
        r = gw.get(API, token=token)
        status = r.status
    except ConnectionError:
        status = None  # a reset is not an acceptance either
    print(f"{size_kib} KiB token ({len(token)} bytes): answered {status}")
    assert status in (401, 431), status
    assert upstream.received() == []


@pytest.mark.parametrize("value", [
    b"Bearer \xff\xfe\xfd",
    b"Bearer \xff",
    b"Bearer eyJhbGciOiJSUzI1NiJ9\xff.eyJzdWIiOiJhIn0.c2ln",
    b"Bearer \xc3\xa9t\xc3\xa9.\xe2\x82\xac.x",  # valid UTF-8, not base64url
], ids=["ff_fe_fd", "ff", "ff_inside_token", "utf8_non_ascii"])
def test_non_utf8_authorization_value(gw, attack_keys, value, upstream):
    """Raw bytes >= 0x80 in the Authorization value (http.client refuses to
    send them, so a raw socket does): 401, nothing forwarded."""
    status, head, body = raw_request(gw.port, b"GET " + API.encode() + b" HTTP/1.1\r\nHost: x\r\n"
                                     b"Authorization: " + value)
    assert status == 401, (status, head, body)
    assert body == INVALID_BODY
    assert upstream.received() == []


def test_valid_token_with_non_utf8_suffix(gw, attack_keys, upstream):
    """A valid token followed by 0xff: not the valid token."""
    token = attack_keys.rsa.sign(claims()).encode()
    status, head, body = raw_request(gw.port, b"GET " + API.encode() + b" HTTP/1.1\r\nHost: x\r\n"
                                     b"Authorization: Bearer " + token + b"\xff")
    assert (status, body) == (401, INVALID_BODY), (status, head, body)
    assert upstream.received() == []


@pytest.mark.parametrize("order", ["bad_first", "good_first"])
def test_two_authorization_headers(gw, attack_keys, order, upstream):
    """Two Authorization headers, one valid and one not: 401 whatever the
    order. (Envoy's codec folds a repeated inline header such as
    `authorization` into one value joined with ",", which is not a token.)"""
    good = attack_keys.rsa.sign(claims()).encode()
    bad = tokens.tamper(attack_keys.rsa.sign(claims())).encode()
    first, second = (bad, good) if order == "bad_first" else (good, bad)
    status, head, body = raw_request(gw.port, b"GET " + API.encode() + b" HTTP/1.1\r\nHost: x\r\n"
                                     b"Authorization: Bearer " + first + b"\r\n"
                                     b"Authorization: Bearer " + second)
    assert (status, body) == (401, INVALID_BODY), (status, head, body)
    assert upstream.received() == []


def test_still_alive_after_the_corpus(gw, attack_keys, upstream):
    """After everything above: valid tokens still pass on both workers, and the
    log has no trap anywhere."""
    k = attack_keys
    statuses = [gw.get(API, token=key.sign(claims(sub=f"after-{i}"))).status
                for i in range(10) for key in (k.rsa, k.ec)]
    assert statuses == [200] * 20
    assert len(upstream.received()) == 20
    assert gw.alive
    assert gw.traps() == []
