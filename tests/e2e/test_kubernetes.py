"""OGX's `kubernetes` provider (issue #21) through a real Envoy, against a mock
API server answering `POST /apis/authentication.k8s.io/v1/selfsubjectreviews`
with the shapes of the Kubernetes API reference (authentication.k8s.io/v1
SelfSubjectReview: 201 with `status.userInfo` {username, uid, groups,
extra}; 401 for a token it does not accept) and OGX 1.5.0's reading of them
(`ogx/core/server/auth_providers.py` `KubernetesAuthProvider.validate_token`)."""

from __future__ import annotations

import json
import time

import pytest

from harness.idp import IdP
from harness.providers import Scripted, new_token
from harness.server import Reply, Request

API = "/v1/models"
REVIEW = "/apis/authentication.k8s.io/v1/selfsubjectreviews"


def bearer(req: Request) -> str | None:
    value = req.headers.get("authorization", "")
    return value[len("Bearer "):] if value.startswith("Bearer ") else None


def review(username: str, groups: list[str], **extra) -> Reply:
    return Reply(201, {"kind": "SelfSubjectReview", "apiVersion": "authentication.k8s.io/v1",
                       "metadata": {"creationTimestamp": None},
                       "status": {"userInfo": {"username": username, "uid": "u-1",
                                               "groups": groups, **extra}}})


@pytest.fixture(scope="module")
def apiserver():
    with IdP() as server:
        yield server


@pytest.fixture(scope="module")
def reviews(apiserver) -> Scripted:
    s = Scripted(bearer, Reply(401, {"kind": "Status", "status": "Failure", "code": 401,
                                     "reason": "Unauthorized", "message": "Unauthorized"}))
    apiserver.route(REVIEW, s)
    return s


@pytest.fixture(scope="module")
def gw(module_envoy, apiserver, reviews):
    return module_envoy({
        "auth": {"provider_config": {
            "type": "kubernetes", "api_server_url": f"http://127.0.0.1:{apiserver.port}",
            "cluster": "apiserver", "tenant_claim": "tenant", "verify_tls": True}},
        "route_policy": [{"permit": {"paths": "*"},
                          "when": "user with system:serviceaccounts:ml in roles"}],
    }, clusters={"apiserver": apiserver.port}, concurrency=1)


def test_a_service_account_token_is_reviewed_once_and_mapped(gw, reviews, upstream):
    t = reviews.answer(new_token("sa"), review(
        "system:serviceaccount:ml:runner", ["system:serviceaccounts", "system:serviceaccounts:ml"],
        tenant="Acme"))
    for _ in range(3):
        assert gw.get(API, token=t).status == 200
    assert reviews.calls(t) == 1  # cached (one worker)
    (req,) = reviews.requests(t)
    assert req.method == "POST" and req.route == REVIEW
    assert json.loads(req.body) == {"apiVersion": "authentication.k8s.io/v1",
                                    "kind": "SelfSubjectReview"}
    sent = upstream.received()[0].headers
    assert sent["x-auth-principal"] == "system:serviceaccount:ml:runner"
    assert json.loads(sent["x-auth-attributes"]) == {"roles": [
        "system:serviceaccount:ml:runner", "system:serviceaccounts", "system:serviceaccounts:ml"]}
    assert sent["x-auth-tenant"] == "acme"


@pytest.mark.parametrize("reply,status,message", [
    (None, 401, "Invalid token"),                              # the API server's 401
    (Reply(403, {"kind": "Status"}), 401, "Token validation failed: 403"),
    (Reply(201, {"status": {"userInfo": {"groups": ["g"]}}}), 401,
     "Invalid SelfSubjectReview response"),                    # no username
    (Reply(503, {}), 503, "Authentication service unavailable"),
    # API Priority and Fairness: 429 with Retry-After (the token was not judged).
    (Reply(429, {"kind": "Status", "code": 429, "reason": "TooManyRequests"},
           {"retry-after": "1"}), 503, "Authentication service unavailable"),
    (Reply(drop=True), 503, "Authentication service unavailable"),  # down
])
def test_refusals_and_failures(gw, reviews, upstream, reply, status, message):
    t = new_token("bad")
    if reply is not None:
        reviews.answer(t, reply)
    r = gw.get(API, token=t)
    assert r.status == status, r
    assert json.loads(r.body)["error"]["message"] == message
    assert upstream.received() == []


def test_route_policy_sees_the_groups(gw, reviews):
    t = reviews.answer(new_token("dev"), review("jane", ["system:authenticated"]))
    assert gw.get(API, token=t).status == 403


def test_no_token_and_a_slow_api_server(module_envoy, apiserver, reviews, gw):
    r = gw.get(API)
    assert r.status == 401 and json.loads(r.body)["error"]["message"] == "Authentication required"
    slow = module_envoy({"auth": {"provider_config": {
        "type": "kubernetes", "api_server_url": f"http://127.0.0.1:{apiserver.port}",
        "cluster": "apiserver", "timeout_ms": 300}}}, clusters={"apiserver": apiserver.port})

    def late(req):
        time.sleep(1.0)
        return review("late", [])
    t = reviews.answer(new_token("slow"), late)
    r = slow.get(API, token=t)
    assert r.status == 503
    assert json.loads(r.body)["error"]["message"] == "Authentication service timeout"
