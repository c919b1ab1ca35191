"""gRPC callers get gRPC answers (issue "deploy it for real", gRPC): a real
`grpcio` client through Envoy. A denial is a trailers-only answer with the
gRPC status and the plain message as `grpc-message`: UNAUTHENTICATED,
PERMISSION_DENIED, RESOURCE_EXHAUSTED over quota (UNAVAILABLE with
`rate_limited_as_resource_exhausted: false`), UNAVAILABLE when the identity
provider is down. Envoy's own mapping would make a 429 UNAVAILABLE, which
gRPC retry policies retry straight into the exhausted quota."""

from __future__ import annotations

import grpc
import pytest

from harness import tokens
from harness.config import jwt_config

SERVICE = "/tollgate.test.Models/List"
ADMIN = "/tollgate.admin.Users/Delete"


def call(gw, method: str = SERVICE, token: str | None = None) -> grpc.RpcError | bytes:
    """One unary call with raw bytes; the RpcError when it fails."""
    metadata = [("authorization", f"Bearer {token}")] if token is not None else []
    with grpc.insecure_channel(f"127.0.0.1:{gw.port}") as channel:
        stub = channel.unary_unary(method)
        try:
            return stub(b"", metadata=metadata, timeout=10)
        except grpc.RpcError as e:
            return e


def assert_status(result, code: grpc.StatusCode, message: str) -> None:
    assert isinstance(result, grpc.RpcError), result
    assert result.code() == code, (result.code(), result.details())
    assert result.details() == message


def config(idp_port: int, **quota) -> dict:
    c = jwt_config(idp_port)
    c["route_scopes"] = [{"path_prefix": "/tollgate.admin.", "required_scope": "admin"}]
    c["quota"] = {"authenticated_max_requests": 1, "period": "day", **quota}
    return c


@pytest.mark.parametrize("as_exhausted", [True, False])
def test_denials_are_native_grpc_statuses(envoy, idp, rsa, as_exhausted):
    idp.set_keys(rsa)
    quota = {} if as_exhausted else {"rate_limited_as_resource_exhausted": False}
    gw = envoy(config(idp.port, **quota))
    assert_status(call(gw), grpc.StatusCode.UNAUTHENTICATED,
                  "Authentication required. Please provide a valid OAuth2 Bearer token "
                  "from https://idp.example")
    good = rsa.sign(tokens.claims(sub="alice", scope="read"))
    assert_status(call(gw, token=tokens.tamper(good)), grpc.StatusCode.UNAUTHENTICATED,
                  "Invalid JWT token")
    assert_status(call(gw, ADMIN, token=good), grpc.StatusCode.PERMISSION_DENIED,
                  "Access denied: user does not have required scope: admin")
    # The first call is allowed (the echo upstream is no gRPC server: whatever
    # it answers, it is not tollgate's); the second is over quota.
    first = call(gw, token=good)
    assert not (isinstance(first, grpc.RpcError)
                and first.details() == "Quota exceeded"), first
    expected = grpc.StatusCode.RESOURCE_EXHAUSTED if as_exhausted else grpc.StatusCode.UNAVAILABLE
    assert_status(call(gw, token=good), expected, "Quota exceeded")


def test_identity_provider_down_is_unavailable(envoy, idp, rsa):
    idp.down = True
    gw = envoy(jwt_config(idp.port))
    assert_status(call(gw, token=rsa.sign(tokens.claims(sub="alice"))),
                  grpc.StatusCode.UNAVAILABLE, "Authentication service unavailable")


def test_http_callers_still_get_json(envoy, idp, rsa):
    idp.set_keys(rsa)
    gw = envoy(config(idp.port))
    r = gw.get("/v1/models", token="x.y.z")
    assert r.status == 401
    assert r.headers.get("content-type") == "application/json"
    assert r.body == b'{"error":{"message":"Invalid JWT token"}}'
