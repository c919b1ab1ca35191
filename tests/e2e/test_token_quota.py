"""Token quotas (`quota.tokens`, issue #19) through a real Envoy, with the real
`openai` SDK as the client and harness/openai_mock.py (OpenAI's answer shapes,
validated against the SDK's own models in test_openai_mock.py) as the upstream.

Each client's budget is charged what the answers report in `usage` (JSON,
chat-completions streams with `stream_options.include_usage`, the Responses
API's `response.completed`), `unreported_tokens` when they report nothing, and
a reservation (`reserve_tokens`) while a request is in flight; a spent budget
is a 429 the SDK raises as `RateLimitError`."""

from __future__ import annotations

import json
import threading
import uuid
from concurrent import futures
from pathlib import Path

import openai
import pytest

from harness import tokens
from harness.config import jwt_config
from harness.openai_mock import Script

MESSAGES = [{"role": "user", "content": "hi"}]


def gateway(envoy, idp, mock, rsa, **token_quota):
    idp.set_keys(rsa)
    envoy.upstream = mock
    config = jwt_config(idp.port)
    config["quota"] = {"tokens": {"authenticated_max_tokens": 100, "reserve_tokens": 10,
                                  "unreported_tokens": 7, **token_quota}}
    return envoy(config)


def client(e, rsa, sub: str | None = None) -> openai.OpenAI:
    """The SDK with a token of its own principal as the API key."""
    key = rsa.sign(tokens.claims(sub=sub or f"user-{uuid.uuid4().hex[:8]}"))
    return openai.OpenAI(base_url=f"{e.url}/v1", api_key=key, max_retries=0, timeout=15)


def chat(c: openai.OpenAI, **kw):
    return c.chat.completions.with_raw_response.create(model="m", messages=MESSAGES, **kw)


def test_chat_completions_are_charged_their_usage_until_the_budget_is_spent(envoy, idp, mock, rsa):
    e = gateway(envoy, idp, mock, rsa)
    c = client(e, rsa)
    mock.script = Script(prompt_tokens=11, completion_tokens=22)  # 33 a call
    remaining = []
    for _ in range(4):  # 0, 33, 66, 99 spent before: all below 100
        raw = chat(c)
        assert raw.parse().usage.total_tokens == 33
        assert raw.headers["x-ratelimit-limit-tokens"] == "100"
        remaining.append(int(raw.headers["x-ratelimit-remaining-tokens"]))
        assert raw.headers["ratelimit-policy"] == '"tokens";q=100;w=86400'
        assert raw.headers["ratelimit"].startswith('"tokens";r=')
    # What is left after each reservation of 10.
    assert remaining == [90, 57, 24, 0], remaining
    with pytest.raises(openai.RateLimitError) as err:
        chat(c)
    r = err.value.response
    assert r.status_code == 429 and r.json() == {"error": {"message": "Quota exceeded"}}
    assert int(r.headers["retry-after"]) >= 1
    assert r.headers["x-ratelimit-remaining-tokens"] == "0"
    assert r.headers["x-ratelimit-reset-tokens"].endswith("s")
    assert len(mock.calls("/v1/chat/completions")) == 4, "the refused call reached the upstream"
    # Another client has its own budget.
    assert chat(client(e, rsa)).headers["x-ratelimit-remaining-tokens"] == "90"
    counters = e.counters()
    assert counters["wasmcustom.tollgate_tokens_charged_total"] == 5 * 33
    assert counters["wasmcustom.tollgate_requests_denied_total.reason.quota"] == 1


def test_streams_pass_unchanged_and_are_charged_their_usage_chunk(envoy, idp, mock, rsa):
    e = gateway(envoy, idp, mock, rsa, authenticated_max_tokens=1000)
    c = client(e, rsa)
    mock.script = Script(prompt_tokens=5, completion_tokens=40, chunks=30, crlf=True,
                         comments=True, batch=3, split_usage=4)
    chunks = list(c.chat.completions.create(model="m", messages=MESSAGES, stream=True,
                                            stream_options={"include_usage": True}))
    call = mock.last("/v1/chat/completions")
    assert chunks[-1].usage.total_tokens == 45 and chunks[-1].choices == []
    assert len(chunks) == 30 + 3  # role, 30 deltas, finish, usage
    # Without include_usage the stream carries no usage: unreported_tokens.
    chunks = list(c.chat.completions.create(model="m", messages=MESSAGES, stream=True))
    assert all(ch.usage is None for ch in chunks)
    raw = chat(c)
    # 1000 − 45 − 7 spent, 10 reserved for this one.
    assert raw.headers["x-ratelimit-remaining-tokens"] == str(1000 - 45 - 7 - 10)
    counters = e.counters()
    assert counters["wasmcustom.tollgate_token_usage_missing_total"] == 1
    assert call.outcome == "complete"


def test_the_responses_api_and_embeddings_are_charged(envoy, idp, mock, rsa):
    e = gateway(envoy, idp, mock, rsa, authenticated_max_tokens=1000)
    c = client(e, rsa)
    mock.script = Script(prompt_tokens=8, completion_tokens=12)  # 20
    r = c.responses.create(model="m", input="hi")
    assert r.usage.total_tokens == 20
    events = list(c.responses.create(model="m", input="hi", stream=True))
    assert events[-1].type == "response.completed" and events[-1].response.usage.total_tokens == 20
    emb = c.embeddings.create(model="m", input="hi")  # prompt_tokens only: 8
    assert emb.usage.total_tokens == 8
    raw = chat(c)
    assert raw.headers["x-ratelimit-remaining-tokens"] == str(1000 - 20 - 20 - 8 - 10)


def test_count_output_tokens_only(envoy, idp, mock, rsa):
    e = gateway(envoy, idp, mock, rsa, count="output", authenticated_max_tokens=1000)
    c = client(e, rsa)
    mock.script = Script(prompt_tokens=500, completion_tokens=3)
    chat(c)
    assert chat(c).headers["x-ratelimit-remaining-tokens"] == str(1000 - 3 - 10)


def test_errors_and_answers_without_usage_are_charged_unreported_tokens(envoy, idp, mock, rsa):
    e = gateway(envoy, idp, mock, rsa, authenticated_max_tokens=1000, unreported_tokens=50)
    c = client(e, rsa)
    mock.script = Script(status=500)
    with pytest.raises(openai.InternalServerError):
        chat(c)
    mock.script = Script(usage=False)
    chat(c)
    # A stream cut before its usage.
    mock.script = Script(chunks=10, fail_after=4)
    with pytest.raises(openai.APIError):
        list(c.chat.completions.create(model="m", messages=MESSAGES, stream=True,
                                       stream_options={"include_usage": True}))
    mock.script = Script()
    raw = chat(c)
    assert raw.headers["x-ratelimit-remaining-tokens"] == str(1000 - 3 * 50 - 10)


def test_reservations_bound_what_concurrent_requests_can_spend(envoy, idp, mock, rsa):
    """Budget 100, 40 reserved per request: with every answer held open, the
    third request is admitted (80 < 100) and the fourth is not (120); once
    the answers end, the count is what they reported."""
    e = gateway(envoy, idp, mock, rsa, reserve_tokens=40)
    sub = f"user-{uuid.uuid4().hex[:8]}"
    gate = threading.Event()
    mock.script = Script(prompt_tokens=10, completion_tokens=20, chunks=2, hold=gate)

    def stream():
        return list(client(e, rsa, sub).chat.completions.create(
            model="m", messages=MESSAGES, stream=True, stream_options={"include_usage": True}))

    with futures.ThreadPoolExecutor(3) as pool:
        held = [pool.submit(stream) for _ in range(3)]
        mock.wait_active(3)
        with pytest.raises(openai.RateLimitError):
            chat(client(e, rsa, sub))
        gate.set()
        assert all(f.result()[-1].usage.total_tokens == 30 for f in held)
    # 90 spent: admitted (below 100), nothing left after its reservation.
    raw = chat(client(e, rsa, sub))
    assert raw.headers["x-ratelimit-remaining-tokens"] == "0"
    with pytest.raises(openai.RateLimitError):
        chat(client(e, rsa, sub))


def test_other_paths_and_methods_are_not_counted(envoy, idp, mock, rsa):
    e = gateway(envoy, idp, mock, rsa, authenticated_max_tokens=0)
    c = client(e, rsa)
    assert c.models.list().data  # GET /v1/models: no budget needed
    with pytest.raises(openai.RateLimitError):
        chat(c)


def test_request_and_token_quotas_together(envoy, idp, mock, rsa):
    idp.set_keys(rsa)
    envoy.upstream = mock
    config = jwt_config(idp.port)
    config["quota"] = {"authenticated_max_requests": 5, "period": "hour",
                       "tokens": {"authenticated_max_tokens": 1000, "reserve_tokens": 10}}
    e = envoy(config)
    raw = chat(client(e, rsa))
    assert raw.headers["ratelimit-remaining"] == "4"
    assert raw.headers["ratelimit-policy"] == '"requests";q=5;w=3600, "tokens";q=1000;w=86400'
    assert raw.headers["ratelimit"].startswith('"requests";r=4;t=')


def test_a_metered_stream_is_neither_held_nor_changed(envoy, idp, mock, rsa):
    """The first event reaches the client while the mock still holds the
    last, and the bytes are exactly those the mock sent."""
    import http.client
    import json

    e = gateway(envoy, idp, mock, rsa, authenticated_max_tokens=10_000)
    gate = threading.Event()
    mock.script = Script(chunks=200, hold=gate, hold_timeout=5, split_usage=3)
    key = rsa.sign(tokens.claims(sub=f"user-{uuid.uuid4().hex[:8]}"))
    conn = http.client.HTTPConnection("127.0.0.1", int(e.url.rsplit(":", 1)[1]), timeout=15)
    conn.request("POST", "/v1/chat/completions", body=json.dumps({
        "model": "m", "messages": MESSAGES, "stream": True,
        "stream_options": {"include_usage": True}}),
        headers={"content-type": "application/json", "authorization": f"Bearer {key}"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("x-ratelimit-remaining-tokens") == "9990"
    first = b""
    while b"\n\n" not in first:
        first += resp.read1(65536)
    call = mock.last("/v1/chat/completions", wait=False)
    assert call.events_written < len(call.events), "held until the end"
    gate.set()
    body = first + resp.read()
    conn.close()
    call.wait()
    assert body == bytes(call.sent)
    assert e.counters()["wasmcustom.tollgate_tokens_charged_total"] == 33


def remaining_after(e, rsa, sub: str) -> int:
    """What one more chat call of `sub` is told is left (after its reservation)."""
    return int(chat(client(e, rsa, sub)).headers["x-ratelimit-remaining-tokens"])


def test_budgets_are_exact_across_workers(envoy, idp, mock, rsa):
    """Two Envoy workers, 60 calls of one client at once: every answer's
    usage is counted, none twice, none lost."""
    e = gateway(envoy, idp, mock, rsa, authenticated_max_tokens=100_000, reserve_tokens=1)
    assert e.concurrency == 2
    sub = f"user-{uuid.uuid4().hex[:8]}"
    mock.script = Script(prompt_tokens=11, completion_tokens=22)
    with futures.ThreadPoolExecutor(20) as pool:
        list(pool.map(lambda _: chat(client(e, rsa, sub)), range(60)))
    assert remaining_after(e, rsa, sub) == 100_000 - 60 * 33 - 1


def test_200_concurrent_streams_of_one_client_are_each_counted(envoy, idp, mock, rsa):
    import asyncio

    e = gateway(envoy, idp, mock, rsa, authenticated_max_tokens=100_000, reserve_tokens=1)
    sub = f"user-{uuid.uuid4().hex[:8]}"
    key = rsa.sign(tokens.claims(sub=sub))
    gate = threading.Event()
    mock.script = Script(chunks=5, prompt_tokens=2, completion_tokens=3, hold=gate, hold_timeout=30)
    aclient = openai.AsyncOpenAI(base_url=f"{e.url}/v1", api_key=key, max_retries=0, timeout=60)

    async def one(i: int):
        stream = await aclient.chat.completions.create(
            model="m", messages=[{"role": "user", "content": str(i)}], stream=True,
            stream_options={"include_usage": True})
        return [ch async for ch in stream]

    async def main():
        threading.Thread(target=lambda: (mock.wait_active(200, 30), gate.set()), daemon=True).start()
        try:
            return await asyncio.gather(*(one(i) for i in range(200)))
        finally:
            gate.set()
            await aclient.close()

    results = asyncio.run(main())
    assert mock.peak_active == 200
    assert all(r[-1].usage.total_tokens == 5 for r in results)
    assert remaining_after(e, rsa, sub) == 100_000 - 200 * 5 - 1


@pytest.mark.parametrize("usage", [
    {"prompt_tokens": -1000, "completion_tokens": 1, "total_tokens": -999},
    {"prompt_tokens": 5.5, "completion_tokens": 1, "total_tokens": 6.5},
    {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": "2"},
    {"prompt_tokens": 10 ** 30, "completion_tokens": 1, "total_tokens": 10 ** 30},
    {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 1e3},
    "lots",
    {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2,
     "deep": json.loads("[" * 300 + "]" * 300)},
], ids=["negative", "fractional", "string", "huge", "exponent", "not-an-object", "nested-300"])
def test_hostile_usage_is_charged_as_unreported_never_less(envoy, idp, mock, rsa, usage):
    import harness.openai_mock as om

    e = gateway(envoy, idp, mock, rsa, authenticated_max_tokens=100_000, unreported_tokens=70)
    sub = f"user-{uuid.uuid4().hex[:8]}"
    real = om.chat_usage
    om.chat_usage = lambda s: usage
    try:
        key = rsa.sign(tokens.claims(sub=sub))
        http = openai.OpenAI(base_url=f"{e.url}/v1", api_key=key, max_retries=0).with_options(
            timeout=15)
        http.chat.completions.with_raw_response.create(model="m", messages=MESSAGES)
    finally:
        om.chat_usage = real
    assert remaining_after(e, rsa, sub) == 100_000 - 70 - 10
    assert e.counters()["wasmcustom.tollgate_token_usage_missing_total"] == 1
    assert e.traps() == []


def test_a_100_mb_stream_passes_and_its_usage_is_still_read(envoy, idp, mock, rsa):
    """1,000 events of 100 kB each, then the usage chunk: the reader keeps at
    most one event (1 MiB cap), the stream passes whole, the usage counts."""
    import http.client
    import json

    e = gateway(envoy, idp, mock, rsa, authenticated_max_tokens=100_000)
    sub = f"user-{uuid.uuid4().hex[:8]}"
    mock.script = Script(chunks=1000, text_piece="x" * 100_000, prompt_tokens=3, completion_tokens=4)
    key = rsa.sign(tokens.claims(sub=sub))
    conn = http.client.HTTPConnection("127.0.0.1", int(e.url.rsplit(":", 1)[1]), timeout=60)
    conn.request("POST", "/v1/chat/completions", body=json.dumps({
        "model": "m", "messages": MESSAGES, "stream": True,
        "stream_options": {"include_usage": True}}),
        headers={"content-type": "application/json", "authorization": f"Bearer {key}"})
    resp = conn.getresponse()
    received = 0
    while chunk := resp.read(1 << 20):
        received += len(chunk)
    conn.close()
    assert received > 100_000_000
    assert remaining_after(e, rsa, sub) == 100_000 - 7 - 10
    assert e.traps() == []


def test_a_client_that_hangs_up_mid_stream_is_charged(envoy, idp, mock, rsa):
    """The client leaves mid-stream. Envoy notices when it next writes to the
    client: the rest of the answer may still pass tollgate (its usage then
    counts) or the stream is reset (unreported_tokens); either way the
    reservation is settled, once, and nothing hangs or traps."""
    import json
    import socket
    import time

    e = gateway(envoy, idp, mock, rsa, authenticated_max_tokens=100_000, unreported_tokens=60)
    sub = f"user-{uuid.uuid4().hex[:8]}"
    gate = threading.Event()
    mock.script = Script(chunks=20, hold=gate, hold_timeout=10)
    key = rsa.sign(tokens.claims(sub=sub))
    body = json.dumps({"model": "m", "messages": MESSAGES, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    s = socket.create_connection(("127.0.0.1", int(e.url.rsplit(":", 1)[1])), timeout=10)
    s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
              f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    # The head and the first chunk may come in separate reads.
    seen = b""
    while b"data:" not in seen:
        chunk = s.recv(65536)
        assert chunk, seen
        seen += chunk
    s.close()
    gate.set()
    deadline = time.monotonic() + 10
    while not (charged := e.counters()["wasmcustom.tollgate_tokens_charged_total"]):
        assert time.monotonic() < deadline, "never settled"
        time.sleep(0.1)
    assert charged in (33, 60), charged
    assert remaining_after(e, rsa, sub) == 100_000 - charged - 10
    assert e.traps() == []


def test_the_reservation_covers_the_output_the_request_allows(envoy, idp, mock, rsa):
    """reserve_tokens for the input plus the request's own max_tokens /
    max_completion_tokens / max_output_tokens. The first request of a fresh
    Envoy waits for the key set, its body held meanwhile: read all the same."""
    e = gateway(envoy, idp, mock, rsa, authenticated_max_tokens=1000)
    c = client(e, rsa)
    mock.script = Script(prompt_tokens=11, completion_tokens=22)
    raw = chat(c, max_tokens=100)
    assert raw.headers["x-ratelimit-remaining-tokens"] == str(1000 - 10 - 100)
    raw = chat(c, max_completion_tokens=300)
    assert raw.headers["x-ratelimit-remaining-tokens"] == str(1000 - 33 - 10 - 300)
    raw = c.responses.with_raw_response.create(model="m", input="hi", max_output_tokens=200)
    assert raw.headers["x-ratelimit-remaining-tokens"] == str(1000 - 66 - 10 - 200)
    # What was spent is what the answers reported.
    assert chat(c).headers["x-ratelimit-remaining-tokens"] == str(1000 - 99 - 10)


def test_tokens_are_counted_per_path_and_direction(envoy, idp, mock, rsa):
    """tollgate_tokens_total{path, direction} at /stats/prometheus, with the
    stats_tags envoy/envoy.yaml ships (the harness's)."""
    import re
    import urllib.request

    e = gateway(envoy, idp, mock, rsa, authenticated_max_tokens=10_000)
    c = client(e, rsa)
    mock.script = Script(prompt_tokens=11, completion_tokens=22)
    chat(c)
    chat(c)
    c.embeddings.create(model="m", input="hi")  # prompt_tokens only: 11
    with urllib.request.urlopen(e.admin_url + "/stats/prometheus", timeout=5) as r:
        text = r.read().decode()
    values = {(m.group(1), m.group(2)): float(m.group(3)) for m in re.finditer(
        r'^tollgate_tokens_total\{path="([a-z0-9_]+)",direction="([a-z]+)"\} (\S+)$',
        text, re.M)}
    assert values[("v1_chat_completions", "input")] == 22
    assert values[("v1_chat_completions", "output")] == 44
    assert values[("v1_embeddings", "input")] == 11
    assert values[("v1_embeddings", "output")] == 0
    assert ("v1_openai_v1_responses", "input") in values  # every counted path, from the start


def test_a_spent_budget_is_renewed_when_its_window_turns(envoy, idp, mock, rsa):
    """period "minute": the budget spent, 429 until the next minute starts,
    then served again — the same Envoy, no restart. Waits for the boundary
    (up to a minute)."""
    import time

    e = gateway(envoy, idp, mock, rsa, authenticated_max_tokens=50, period="minute",
                reserve_tokens=1)
    c = client(e, rsa)
    mock.script = Script(prompt_tokens=30, completion_tokens=30)  # 60: over at once
    # Far enough from the boundary that the two calls fall in one window.
    if time.time() % 60 > 50:
        time.sleep(61 - time.time() % 60)
    chat(c)
    with pytest.raises(openai.RateLimitError) as err:
        chat(c)
    wait = int(err.value.response.headers["retry-after"])
    assert 1 <= wait <= 60
    time.sleep(61 - time.time() % 60)  # into the next minute
    raw = chat(c)
    assert raw.headers["x-ratelimit-remaining-tokens"] == str(50 - 1)


@pytest.fixture
def rls_service():
    from harness import rls

    reason = rls.skip_reason()
    if reason:
        pytest.skip(reason)
    r = rls.Redis().start()
    s = rls.RlsServer(r.url).start()
    yield s
    s.close()
    r.close()


def test_token_budgets_across_envoys_through_the_rate_limit_service(envoy, idp, mock, rsa,
                                                                    rls_service):
    """quota.backend: the budget is checked in the service before a request
    (hits 0) and its usage added there after (tokens as hits), so two Envoys
    share one budget."""
    from test_global_quota import http2

    idp.set_keys(rsa)
    envoy.upstream = mock
    config = jwt_config(idp.port)
    config["quota"] = {"tokens": {"authenticated_max_tokens": 100, "reserve_tokens": 10},
                       "backend": {"type": "rls", "cluster": "ratelimit", "domain": "tollgate",
                                   "timeout_ms": 500}}
    a, b = (envoy(config, clusters={"idp": idp.port, "ratelimit": rls_service.port},
                  transform=http2("ratelimit")) for _ in range(2))
    sub = f"user-{uuid.uuid4().hex[:8]}"
    mock.script = Script(prompt_tokens=30, completion_tokens=30)  # 60 a call
    assert chat(client(a, rsa, sub)).parse().usage.total_tokens == 60
    assert chat(client(b, rsa, sub)).parse().usage.total_tokens == 60  # 60 < 100 there
    # 120 spent in the service: refused by both, although each Envoy saw 60.
    # (The charge is added without waiting: allow it a moment to land.)
    import time

    def refusal(g):
        deadline = time.monotonic() + 5
        while True:
            try:
                chat(client(g, rsa, sub))
            except openai.RateLimitError as err:
                return err.response
            assert time.monotonic() < deadline, "never refused"
            time.sleep(0.1)

    for g in (a, b):
        r = refusal(g)
        assert r.status_code == 429 and r.headers["x-ratelimit-remaining-tokens"] == "0"
    # Another client is unaffected.
    assert chat(client(a, rsa)).status_code == 200


def test_the_readme_example_with_the_openai_sdk(envoy, idp, mock, rsa):
    """The README's configuration for an OpenAI-compatible server, as
    written but for the identity provider's address."""
    import re

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = text.split("## Token quotas for LLM APIs", 1)[1].split("\n## ", 1)[0]
    config = json.loads(re.search(r"```json\n(.*?)```", section, re.S).group(1))
    jwt = config["auth"]["provider_config"]
    jwt["jwks"] = {"uri": f"http://127.0.0.1:{idp.port}/jwks", "cluster": "idp"}
    idp.set_keys(rsa)
    envoy.upstream = mock
    e = envoy(config)
    key = rsa.sign(tokens.claims(sub="mia", aud=jwt["audience"], iss=jwt["issuer"]))
    c = openai.OpenAI(base_url=f"{e.url}/v1", api_key=key, max_retries=0, timeout=15)
    mock.script = Script(prompt_tokens=100, completion_tokens=20)  # 100 + 4 × 20 = 180
    chunks = list(c.chat.completions.create(model="m", messages=MESSAGES, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].usage.total_tokens == 120
    raw = chat(c)
    assert raw.headers["x-ratelimit-remaining-tokens"] == str(1_000_000 - 180 - 1000)
    assert raw.headers["ratelimit-remaining"] == str(20000 - 2)
    # The public path reaches the server without a token (the mock has no /health).
    r = e.get("/health")
    assert r.status == 404 and b"Unknown path /health" in r.body
