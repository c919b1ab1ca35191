"""OGX's `github_token` provider through a real Envoy, against a mock GitHub
REST API answering with the shapes of GitHub's documentation:

- "Get the authenticated user", `GET /user`
  (https://docs.github.com/en/rest/users/users#get-the-authenticated-user):
  200 with the user object (`login`, numeric `id`, ...); 401
  `{"message": "Bad credentials", ...}` for a token GitHub does not accept;
- "List organizations for the authenticated user", `GET /user/orgs`
  (https://docs.github.com/en/rest/orgs/orgs#list-organizations-for-the-authenticated-user):
  200 with a JSON list of organization objects (`login`, `id`, ...), paged
  by `per_page` (at most 100) and `page`;
- "Rate limits for the REST API"
  (https://docs.github.com/en/rest/using-the-rest-api/rate-limits-for-the-rest-api):
  the primary limit answers 403 or 429 with `x-ratelimit-remaining: 0`; a
  secondary limit answers 403 or 429, possibly with `retry-after`;

and OGX 1.5.0's reading of them (`ogx/core/server/auth_providers.py`
`GitHubTokenAuthProvider.validate_token`, `_get_github_user_info`,
`_fetch_github_organizations`; `GitHubTokenAuthConfig` in
`ogx/core/datatypes.py`): the caller's token is sent as `Authorization:
Bearer <token>` with `Accept: application/vnd.github.v3+json`; the principal
is the user's `login`; the attributes are `claims_mapping` (default `login`
→ `roles`, `organizations` → `teams`) applied to `{"login", "id" (as text),
"organizations"}`, the organization logins of every page in order without
duplicates, pages of `per_page=100` fetched while a page is full.

Where tollgate differs from OGX, on purpose: it sends `User-Agent: tollgate`;
it stops after 10 pages of organizations; a rate-limited GitHub is 503 (OGX:
401, as for any HTTPStatusError); a failing `/user/orgs` is 503 with nothing
cached (OGX goes on without organizations, or with the pages it got); and a
category with no values is left out (OGX's `get_attributes_from_claims`
keeps `"teams": []` for a user in no organization)."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest

from harness.idp import IdP
from harness.providers import Scripted, assert_denied, identity, new_token, sequence
from harness.server import Reply, Request

API = "/v1/models"
USER = "/user"
ORGS = "/user/orgs"
GHE = "/api/v3"  # GitHub Enterprise Server's REST API base path

INVALID = "GitHub token validation failed. Please check your token and try again."
BAD_USER = "Invalid GitHub user response"
UNAVAILABLE = "Authentication service unavailable"
TIMEOUT = "Authentication service timeout"

BAD_CREDENTIALS = {"message": "Bad credentials",
                   "documentation_url": "https://docs.github.com/rest", "status": "401"}
RATE_DOCS = ("https://docs.github.com/rest/overview/rate-limits-for-the-rest-api"
             "#about-secondary-rate-limits")


def bearer(req: Request) -> str | None:
    value = req.headers.get("authorization", "")
    return value[len("Bearer "):] if value.startswith("Bearer ") else None


def user(login: str, uid: int = 583231) -> Reply:
    """`GET /user`'s 200 (a trimmed private-user object)."""
    return Reply(200, {"login": login, "id": uid, "node_id": "MDQ6VXNlcjE=",
                       "avatar_url": f"https://github.com/images/{login}.gif",
                       "url": f"https://api.github.com/users/{login}",
                       "type": "User", "site_admin": False, "name": "Mona Lisa",
                       "company": "GitHub", "public_repos": 2, "followers": 20,
                       "created_at": "2008-01-14T04:33:35Z",
                       "two_factor_authentication": True})


def org(login: str, oid: int = 1) -> dict:
    """One entry of `GET /user/orgs`."""
    return {"login": login, "id": oid, "node_id": "MDEyOk9yZ2FuaXphdGlvbjE=",
            "url": f"https://api.github.com/orgs/{login}",
            "repos_url": f"https://api.github.com/orgs/{login}/repos",
            "description": "A great organization"}


def orgs_page(*logins: str) -> Reply:
    return Reply(200, [org(name, i + 1) for i, name in enumerate(logins)])


def paged(sizes: list[int]):
    """`/user/orgs` answering page p (1-based) with `sizes[p-1]` organizations
    named `p<p>-org<i>`; pages past the list are empty."""
    def answer(req: Request) -> Reply:
        page = int(req.query.get("page", "1"))
        n = sizes[page - 1] if 1 <= page <= len(sizes) else 0
        return orgs_page(*(f"p{page}-org{i}" for i in range(n)))
    return answer


def rate_limited(kind: str) -> Reply:
    """GitHub's rate-limit answers: the primary limit (403 or 429 with
    `x-ratelimit-remaining: 0`) and a secondary one (`retry-after`)."""
    reset = str(int(time.time()) + 3600)
    primary = {"x-ratelimit-limit": "5000", "x-ratelimit-remaining": "0",
               "x-ratelimit-used": "5000", "x-ratelimit-reset": reset,
               "x-ratelimit-resource": "core"}
    if kind == "429":
        return Reply(429, {"message": "API rate limit exceeded for user ID 583231.",
                           "documentation_url": RATE_DOCS}, primary)
    if kind == "403-remaining-0":
        return Reply(403, {"message": "API rate limit exceeded for user ID 583231.",
                           "documentation_url": RATE_DOCS}, primary)
    assert kind == "403-retry-after"
    # A secondary limit: requests remain in the primary budget.
    return Reply(403, {"message": "You have exceeded a secondary rate limit. Please wait a few "
                                  "minutes before you try again.",
                       "documentation_url": RATE_DOCS},
                 {"retry-after": "60", "x-ratelimit-limit": "5000",
                  "x-ratelimit-remaining": "4990", "x-ratelimit-reset": reset})


def provider(port: int, base: str = "", **extra) -> dict:
    return {"type": "github_token", "github_api_base_url": f"http://127.0.0.1:{port}{base}",
            "cluster": "github", **extra}


@pytest.fixture(scope="module")
def github():
    """The mock GitHub REST API."""
    with IdP() as server:
        yield server


@pytest.fixture(scope="module")
def users(github) -> Scripted:
    s = Scripted(bearer, Reply(401, BAD_CREDENTIALS))
    github.route(USER, s)
    github.route(GHE + USER, s)
    return s


@pytest.fixture(scope="module")
def orgs(github) -> Scripted:
    s = Scripted(bearer, Reply(200, []))
    github.route(ORGS, s)
    github.route(GHE + ORGS, s)
    return s


@pytest.fixture(scope="module")
def gw(module_envoy, github, users, orgs):
    """The defaults (claims_mapping, timeout_ms, cache_ttl); `/v1/admin*` is
    for members of `acme`."""
    return module_envoy({
        "auth": {"provider_config": provider(github.port)},
        "route_policy": [{"forbid": {"paths": "/v1/admin*"}, "unless": ["user with acme in teams"]},
                         {"permit": {"paths": "*"}}],
    }, clusters={"github": github.port}, concurrency=1)


@pytest.fixture(scope="module")
def slow_gw(module_envoy, github, users, orgs):
    return module_envoy({"auth": {"provider_config": provider(github.port, timeout_ms=300)}},
                        clusters={"github": github.port}, concurrency=1)


@pytest.fixture(scope="module")
def ghe_gw(module_envoy, github, users, orgs):
    """A GitHub Enterprise Server base URL (`.../api/v3`), its own
    claims_mapping, and a 1 s cache."""
    return module_envoy({"auth": {"provider_config": provider(
        github.port, GHE, claims_mapping={"login": "roles", "id": "namespaces"}, cache_ttl=1)}},
        clusters={"github": github.port}, concurrency=1)


def pages_requested(orgs: Scripted, token: str) -> list[dict[str, str]]:
    return [r.query for r in orgs.requests(token)]


# -- accepted tokens -------------------------------------------------------------------

def test_a_token_is_checked_once_and_mapped(gw, users, orgs, upstream):
    t = users.answer(new_token("gho"), user("octocat"))
    orgs.answer(t, orgs_page("github", "acme", "octo-org"))
    for _ in range(3):
        assert gw.get(API, token=t).status == 200
    assert users.calls(t) == 1 and orgs.calls(t) == 1  # cached (one worker)
    assert pages_requested(orgs, t) == [{"per_page": "100", "page": "1"}]
    sent = upstream.received()[0].headers
    assert sent["x-auth-principal"] == "octocat"
    assert json.loads(sent["x-auth-attributes"]) == {"roles": ["octocat"],
                                                     "teams": ["github", "acme", "octo-org"]}


def test_what_github_is_sent(gw, github, users, orgs):
    t = users.answer(new_token("ghp"), user("hubot"))
    orgs.answer(t, orgs_page("acme"))
    r = gw.get(API, token=t, headers={"cookie": "session=caller-cookie", "x-caller": "1"})
    assert r.status == 200, r
    (u,) = users.requests(t)
    (o,) = orgs.requests(t)
    assert u.path == USER
    assert o.route == ORGS and o.query == {"per_page": "100", "page": "1"}
    for req in (u, o):
        assert req.method == "GET"
        assert req.body == b""
        assert "transfer-encoding" not in req.headers
        assert req.headers["authorization"] == f"Bearer {t}"
        assert req.headers["accept"] == "application/vnd.github.v3+json"
        assert req.headers["user-agent"] == "tollgate"
        assert req.headers["host"] == f"127.0.0.1:{github.port}"
        assert "cookie" not in req.headers and "x-caller" not in req.headers


def test_a_user_in_no_organization_has_no_teams(gw, users, orgs):
    t = users.answer(new_token("gho"), user("loner"))
    r = gw.get(API, token=t)
    assert identity(r) == ("loner", {"roles": ["loner"]})
    assert orgs.calls(t) == 1


def test_organizations_keep_their_order_without_duplicates(gw, users, orgs):
    t = users.answer(new_token("gho"), user("dup"))
    orgs.answer(t, orgs_page("zeta", "acme", "zeta", "beta", "acme"))
    assert identity(gw.get(API, token=t)) == ("dup", {"roles": ["dup"],
                                                      "teams": ["zeta", "acme", "beta"]})


def test_organizations_are_paged(gw, users, orgs):
    t = users.answer(new_token("gho"), user("many"))
    orgs.answer(t, paged([100, 3]))
    principal, attrs = identity(gw.get(API, token=t))
    assert principal == "many"
    expected = [f"p1-org{i}" for i in range(100)] + ["p2-org0", "p2-org1", "p2-org2"]
    assert attrs == {"roles": ["many"], "teams": expected}
    assert len(attrs["teams"]) == 103
    assert pages_requested(orgs, t) == [{"per_page": "100", "page": "1"},
                                        {"per_page": "100", "page": "2"}]


def test_at_most_ten_pages_of_organizations(gw, users, orgs):
    t = users.answer(new_token("gho"), user("huge"))
    orgs.answer(t, paged([100] * 15))  # every page is full
    r = gw.get(API, token=t)
    assert r.status == 200, r
    assert pages_requested(orgs, t) == [{"per_page": "100", "page": str(p)} for p in range(1, 11)]
    _, attrs = identity(r)
    assert attrs["teams"] == [f"p{p}-org{i}" for p in range(1, 11) for i in range(100)]


def test_route_policy_sees_the_organizations(gw, users, orgs):
    member = users.answer(new_token("gho"), user("member"))
    orgs.answer(member, orgs_page("other", "acme"))
    outsider = users.answer(new_token("gho"), user("outsider"))
    orgs.answer(outsider, orgs_page("other"))
    assert gw.get("/v1/admin/keys", token=member).status == 200
    r = gw.get("/v1/admin/keys", token=outsider)
    assert r.status == 403, r
    assert gw.get(API, token=outsider).status == 200


def test_enterprise_base_url_claims_mapping_and_cache_ttl(ghe_gw, users, orgs, upstream):
    t = users.answer(new_token("ghe"), user("enterprise-user", uid=42))
    orgs.answer(t, orgs_page("corp"))
    assert ghe_gw.get(API, token=t).status == 200
    assert [r.path for r in users.requests(t)] == [GHE + USER]
    assert [(r.route, r.query) for r in orgs.requests(t)] == [
        (GHE + ORGS, {"per_page": "100", "page": "1"})]
    sent = upstream.received()[0].headers
    assert sent["x-auth-principal"] == "enterprise-user"
    assert json.loads(sent["x-auth-attributes"]) == {"roles": ["enterprise-user"],
                                                     "namespaces": ["42"]}
    assert ghe_gw.get(API, token=t).status == 200
    assert users.calls(t) == 1  # within cache_ttl
    time.sleep(2.2)
    assert ghe_gw.get(API, token=t).status == 200
    assert users.calls(t) == 2  # cache_ttl (1 s) is over


def test_no_token_does_not_call_github(gw, github):
    before = github.count(USER)
    r = gw.get(API)
    assert r.status == 401, r
    assert json.loads(r.body)["error"]["message"].startswith("Authentication required")
    assert github.count(USER) == before


# -- refused tokens (401, remembered) -------------------------------------------------

@pytest.mark.parametrize("reply", [
    None,                                                             # 401 Bad credentials
    Reply(403, {"message": "Resource not accessible by personal access token"},
          {"x-ratelimit-limit": "5000", "x-ratelimit-remaining": "4999"}),
], ids=["401", "403"])
def test_refused_tokens_are_401_and_remembered(gw, users, orgs, upstream, reply):
    t = new_token("bad")
    if reply is not None:
        users.answer(t, reply)
    for _ in range(2):
        assert_denied(gw.get(API, token=t), 401, INVALID)
    assert users.calls(t) == 1  # GitHub's refusal is remembered
    assert orgs.calls(t) == 0
    assert upstream.received() == []


@pytest.mark.parametrize("reply", [
    Reply(200, [{"login": "octocat", "id": 1}]),                     # not an object
    Reply(200, {"id": 1, "name": "no login"}),
    Reply(200, {"login": 12, "id": 1}),                               # login not a string
    Reply(200, "<html>not json</html>", {"content-type": "text/html"}),
], ids=["list", "no-login", "login-not-string", "not-json"])
def test_a_bad_user_answer_is_401_and_asked_again(gw, users, orgs, upstream, reply):
    """A 200 that is no user is a broken answer (a proxy's page, a wrong base
    URL), not GitHub's verdict on the token: refused, never remembered (as
    the other providers' unreadable answers)."""
    t = new_token("bad")
    users.answer(t, reply)
    for _ in range(2):
        assert_denied(gw.get(API, token=t), 401, BAD_USER)
    assert users.calls(t) == 2
    assert orgs.calls(t) == 0
    assert upstream.received() == []


def test_a_refusal_is_remembered_for_five_seconds(gw, users):
    """`NEGATIVE_TTL` (5 s, the README's "remembered briefly"), whole seconds."""
    t = new_token("bad")  # GitHub's 401
    started = time.monotonic()
    assert_denied(gw.get(API, token=t), 401, INVALID)
    time.sleep(max(0.0, started + 2.5 - time.monotonic()))
    assert_denied(gw.get(API, token=t), 401, INVALID)
    assert users.calls(t) == 1  # still remembered after 2.5 s
    time.sleep(max(0.0, started + 7 - time.monotonic()))
    assert_denied(gw.get(API, token=t), 401, INVALID)
    assert users.calls(t) == 2  # forgotten after 5 s


# -- GitHub unavailable (503, never cached) -------------------------------------------

RATE_KINDS = ["429", "403-remaining-0", "403-retry-after"]


@pytest.mark.parametrize("kind", RATE_KINDS)
@pytest.mark.parametrize("where", [USER, ORGS], ids=["user", "orgs"])
def test_rate_limited_is_503_and_not_cached(gw, users, orgs, upstream, where, kind):
    t = new_token("rl")
    if where == USER:
        users.answer(t, sequence(rate_limited(kind), user("limited")))
        orgs.answer(t, orgs_page("acme"))
    else:
        users.answer(t, user("limited"))
        orgs.answer(t, sequence(rate_limited(kind), orgs_page("acme")))
    assert_denied(gw.get(API, token=t), 503, UNAVAILABLE)
    assert upstream.received() == []
    r = gw.get(API, token=t)  # asks GitHub again, which now answers
    assert identity(r) == ("limited", {"roles": ["limited"], "teams": ["acme"]})
    assert users.calls(t) == 2
    assert orgs.calls(t) == (1 if where == USER else 2)


@pytest.mark.parametrize("reply", [
    Reply(500, {"message": "Server Error"}),
    Reply(502, "<html>Bad Gateway</html>", {"content-type": "text/html"}),
    Reply(503, {"message": "Service Unavailable"}),
    Reply(drop=True),
], ids=["500", "502", "503", "dropped"])
def test_user_endpoint_failing_is_503_and_not_cached(gw, users, orgs, upstream, reply):
    t = users.answer(new_token("down"), sequence(reply, user("back")))
    assert_denied(gw.get(API, token=t), 503, UNAVAILABLE)
    assert upstream.received() == []
    assert orgs.calls(t) == 0
    assert identity(gw.get(API, token=t)) == ("back", {"roles": ["back"]})
    assert users.calls(t) == 2


@pytest.mark.parametrize("answer", [
    Reply(500, {"message": "Server Error"}),
    Reply(404, {"message": "Not Found"}),
    Reply(403, {"message": "Resource not accessible by personal access token"},
          {"x-ratelimit-remaining": "4999"}),
    Reply(200, {"message": "not a list"}),
    Reply(200, "not json", {"content-type": "text/plain"}),
    Reply(drop=True),
    paged([100]),  # a full first page, then page 2 fails
], ids=["500", "404", "403", "object", "not-json", "dropped", "page-2"])
def test_organizations_failing_is_503_and_not_cached(gw, users, orgs, upstream, answer):
    t = users.answer(new_token("orgs"), user("orgless"))
    if callable(answer):  # page 1 as scripted, then a 502
        first = answer

        def answer(req: Request) -> Reply:
            return first(req) if req.query.get("page") == "1" else Reply(502, {"message": "x"})
    orgs.answer(t, answer)
    for _ in range(2):
        assert_denied(gw.get(API, token=t), 503, UNAVAILABLE)
    assert users.calls(t) == 2  # nothing cached
    assert upstream.received() == []


@pytest.mark.parametrize("where", [USER, ORGS], ids=["user", "orgs"])
def test_slow_github_is_a_timeout(slow_gw, users, orgs, upstream, where):
    t = new_token("slow")
    if where == USER:
        users.answer(t, dataclasses.replace(user("late"), delay=1.0))
    else:
        users.answer(t, user("late"))
        orgs.answer(t, Reply(200, [org("acme")], delay=1.0))
    started = time.monotonic()
    assert_denied(slow_gw.get(API, token=t), 503, TIMEOUT)
    assert time.monotonic() - started < 0.9
    assert upstream.received() == []


# -- configuration -----------------------------------------------------------------------

@pytest.mark.parametrize("extra,key", [
    ({"github_api_base": 1}, "auth.provider_config.github_api_base"),
    ({"github_api_base_url": "ftp://127.0.0.1:1"}, "auth.provider_config.github_api_base_url"),
    ({"github_api_base_url": "api.github.com"}, "auth.provider_config.github_api_base_url"),
], ids=["unknown-key", "ftp-url", "no-scheme"])
def test_bad_configurations_refuse_to_load(expect_config_rejected, github, extra, key):
    log = expect_config_rejected({"auth": {"provider_config": {**provider(github.port), **extra}}},
                                 clusters={"github": github.port})
    assert f"configuration key `{key}`" in log, log
