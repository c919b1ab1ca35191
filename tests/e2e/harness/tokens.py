"""Signing keys, their public JWKs, and JWTs good and bad."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

RSA_ALGS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
EC_CURVES = {"ES256": (ec.SECP256R1, "P-256", 32), "ES384": (ec.SECP384R1, "P-384", 48)}


def b64url(data: bytes) -> str:
    """Base64url without padding."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _uint(n: int, size: int | None = None) -> bytes:
    size = size or max(1, (n.bit_length() + 7) // 8)
    return n.to_bytes(size, "big")


@dataclass
class SigningKey:
    """A private key with its `kid` and `alg`; signs tokens, exports its JWK."""

    kid: str
    alg: str
    private_key: Any

    @property
    def public_key(self):
        return self.private_key.public_key()

    def jwk(self, **extra) -> dict:
        """The public JWK (`kty`, `kid`, `alg`, `use` and the key fields)."""
        pub = self.public_key
        out: dict[str, Any] = {"kid": self.kid, "alg": self.alg, "use": "sig"}
        if isinstance(pub, rsa.RSAPublicKey):
            nums = pub.public_numbers()
            out.update(kty="RSA", n=b64url(_uint(nums.n)), e=b64url(_uint(nums.e)))
        elif isinstance(pub, ec.EllipticCurvePublicKey):
            _, crv, size = EC_CURVES[self.alg]
            nums = pub.public_numbers()
            out.update(kty="EC", crv=crv, x=b64url(_uint(nums.x, size)), y=b64url(_uint(nums.y, size)))
        elif isinstance(pub, ed25519.Ed25519PublicKey):
            raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            out.update(kty="OKP", crv="Ed25519", x=b64url(raw))
        else:  # pragma: no cover
            raise TypeError(f"unsupported key {pub!r}")
        out.update(extra)
        return out

    def public_pem(self) -> bytes:
        return self.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def private_pem(self) -> bytes:
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def sign(self, claims: dict, headers: dict | None = None, alg: str | None = None,
             kid: str | None = ...) -> str:
        """A JWT over `claims`. `headers` adds or overrides header fields;
        `kid=None` leaves the kid out, any other value replaces it."""
        hdr = {"kid": self.kid if kid is ... else kid}
        if hdr["kid"] is None:
            del hdr["kid"]
        hdr.update(headers or {})
        return jwt.encode(claims, self.private_key, algorithm=alg or self.alg, headers=hdr)


def rsa_key(kid: str = "rsa-1", alg: str = "RS256", bits: int = 2048) -> SigningKey:
    assert alg in RSA_ALGS, alg
    return SigningKey(kid, alg, rsa.generate_private_key(public_exponent=65537, key_size=bits))


def ec_key(kid: str = "ec-1", alg: str = "ES256") -> SigningKey:
    curve = EC_CURVES[alg][0]
    return SigningKey(kid, alg, ec.generate_private_key(curve()))


def ed25519_key(kid: str = "ed-1") -> SigningKey:
    return SigningKey(kid, "EdDSA", ed25519.Ed25519PrivateKey.generate())


def load_key(pem: bytes, kid: str, alg: str) -> SigningKey:
    """A SigningKey from a PEM private key."""
    return SigningKey(kid, alg, serialization.load_pem_private_key(pem, password=None))


def new_key(kid: str, alg: str) -> SigningKey:
    """A new key for `alg` (RSA 2048 bits, P-256/P-384, Ed25519)."""
    if alg in RSA_ALGS:
        return rsa_key(kid, alg)
    if alg in EC_CURVES:
        return ec_key(kid, alg)
    if alg == "EdDSA":
        return ed25519_key(kid)
    raise ValueError(f"no key type for {alg}")


def key_file(path: Path, kid: str, alg: str) -> SigningKey:
    """The key kept in `path` (PEM, PKCS#8), made and written there first if missing."""
    path = Path(path)
    if path.exists():
        return load_key(path.read_bytes(), kid, alg)
    key = new_key(kid, alg)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(key.private_pem())
    return key


def jwks(*keys: SigningKey) -> dict:
    """A JWKS document holding the public keys."""
    return {"keys": [k.jwk() for k in keys]}


def claims(sub: str | None = "alice", aud: Any = "llama-stack", iss: str | None = "https://idp.example",
           lifetime: int = 300, now: int | None = None, **extra) -> dict:
    """Standard claims valid for `lifetime` seconds; a `None` value drops a claim
    (also among `extra`, e.g. `exp=None`)."""
    now = int(time.time()) if now is None else now
    out = {"sub": sub, "aud": aud, "iss": iss, "iat": now, "exp": now + lifetime}
    out.update(extra)
    return {k: v for k, v in out.items() if v is not None}


def encode_raw(header: dict, payload: dict | bytes, signature: bytes = b"") -> str:
    """A JWT assembled by hand: no checks at all."""
    p = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return ".".join([b64url(json.dumps(header).encode()), b64url(p), b64url(signature)])


def tamper(token: str) -> str:
    """The same token with one bit of its signature flipped."""
    head, body, sig = token.split(".")
    raw = bytearray(b64url_decode(sig))
    raw[len(raw) // 2] ^= 0x01
    return ".".join([head, body, b64url(bytes(raw))])


def tamper_payload(token: str, **changes) -> str:
    """The token with claims changed but the original signature kept."""
    head, body, sig = token.split(".")
    payload = json.loads(b64url_decode(body))
    payload.update(changes)
    return ".".join([head, b64url(json.dumps(payload).encode()), sig])


def alg_none(claims_: dict, kid: str | None = None, alg: str = "none") -> str:
    """An unsigned token (`alg: none`, empty signature)."""
    header = {"alg": alg, "typ": "JWT"}
    if kid:
        header["kid"] = kid
    return encode_raw(header, claims_)


def hs256_with_public_key(claims_: dict, key: SigningKey, alg: str = "HS256") -> str:
    """The classic key-confusion token: HMAC keyed with the RSA public key PEM."""
    header = {"alg": alg, "typ": "JWT", "kid": key.kid}
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims_).encode())}"
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    mac = hmac.new(key.public_pem(), signing_input.encode(), digest).digest()
    return f"{signing_input}.{b64url(mac)}"
