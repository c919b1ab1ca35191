"""The OpenAI-compatible test upstream (harness/openai_mock.py) and the real
`openai` SDK against it, directly and through Envoy with today's tollgate
(groundwork for issue #19, token quotas)."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import threading

import openai
import pytest
from openai.types import Completion, CreateEmbeddingResponse
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from harness.openai_mock import OpenAIMock, Script, usage_of

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "hi"}]
EVENT = TypeAdapter(ResponseStreamEvent)


def sdk(base_url: str, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key="sk-test", max_retries=0, timeout=15, **kw)


# -- raw HTTP/1.1 -------------------------------------------------------------

def raw_post(port: int, path: str, doc: dict) -> socket.socket:
    body = json.dumps(doc).encode()
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: mock\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
    return s


def recv_all(s: socket.socket) -> list[bytes]:
    """Every recv() until the peer closes, as received."""
    out = []
    while True:
        try:
            data = s.recv(65536)
        except ConnectionResetError:
            break
        if not data:
            break
        out.append(data)
    s.close()
    return out


def dechunk(raw: bytes) -> tuple[bytes, list[bytes], bool]:
    """(head, HTTP chunks, whether the terminating chunk came) of a chunked answer."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    chunks = []
    while rest:
        line, sep, rest = rest.partition(b"\r\n")
        if not sep:
            break
        size = int(line, 16)
        if size == 0:
            return head, chunks, True
        if len(rest) < size + 2:
            chunks.append(rest[:size])
            break
        chunks.append(rest[:size])
        rest = rest[size + 2:]
    return head, chunks, False


def sse_payloads(body: bytes) -> list[str]:
    """The `data:` values of an SSE body (either line ending)."""
    text = body.decode().replace("\r\n", "\n")
    return [line[len("data: "):] for line in text.split("\n") if line.startswith("data: ")]


# -- non-streaming --------------------------------------------------------------

def test_chat_completion_non_streaming_with_the_sdk(mock):
    mock.script = Script(prompt_tokens=7, completion_tokens=5, chunks=2)
    r = sdk(mock.v1_url).chat.completions.create(model="llama", messages=MESSAGES, max_tokens=50)
    assert r.choices[0].message.content == "w0 w1 "
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (7, 5, 12)
    call = mock.last(CHAT)
    assert call.json["max_tokens"] == 50 and call.json["model"] == "llama"
    assert call.request.headers["authorization"] == "Bearer sk-test"
    assert call.outcome == "complete" and not call.stream
    doc = json.loads(bytes(call.sent))
    ChatCompletion.model_validate(doc)  # the exact shape, every required field
    assert doc["object"] == "chat.completion"


def test_completions_embeddings_responses_non_streaming(mock):
    c = sdk(mock.v1_url)
    mock.enqueue(Script(prompt_tokens=3, completion_tokens=4),
                 Script(prompt_tokens=9), Script(),
                 Script(prompt_tokens=20, completion_tokens=30, total_tokens=55))
    r = c.completions.create(model="m", prompt="x")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (3, 4, 7)
    Completion.model_validate(json.loads(bytes(mock.last("/v1/completions").sent)))

    e = c.embeddings.create(model="m", input=["a", "b"])  # the SDK asks for base64
    assert mock.last("/v1/embeddings").json["encoding_format"] == "base64"
    assert [d.embedding for d in e.data] == [[0.25, -0.5, 0.0], [0.25, -0.5, 1.0]]
    assert (e.usage.prompt_tokens, e.usage.total_tokens) == (9, 9)
    c.embeddings.create(model="m", input="a", encoding_format="float")
    doc = json.loads(bytes(mock.last("/v1/embeddings").sent))
    CreateEmbeddingResponse.model_validate(doc)  # the SDK's model types the float form
    assert doc["data"][0]["embedding"] == [0.25, -0.5, 0.0]

    r = c.responses.create(model="m", input="hi", max_output_tokens=64)
    assert r.output_text == "w0 w1 w2 "
    assert (r.usage.input_tokens, r.usage.output_tokens, r.usage.total_tokens) == (20, 30, 55)
    Response.model_validate(json.loads(bytes(mock.last("/v1/responses").sent)))
    assert mock.last("/v1/responses").json["max_output_tokens"] == 64


def test_no_usage_and_error_status(mock):
    c = sdk(mock.v1_url)
    mock.enqueue(Script(usage=False), Script(status=500), Script(status=429, error_type="requests"))
    r = c.chat.completions.create(model="m", messages=MESSAGES)
    assert r.usage is None and "usage" not in json.loads(bytes(mock.last().sent))
    with pytest.raises(openai.InternalServerError) as err:
        c.chat.completions.create(model="m", messages=MESSAGES)
    assert err.value.status_code == 500 and err.value.body["type"] == "server_error"
    with pytest.raises(openai.RateLimitError):
        c.chat.completions.create(model="m", messages=MESSAGES, stream=True)
    assert [x.wait().outcome for x in mock.calls()] == ["complete", "error", "error"]


# -- streaming ------------------------------------------------------------------

def test_chat_stream_with_include_usage_with_the_sdk(mock):
    mock.script = Script(prompt_tokens=13, completion_tokens=8, chunks=4)
    stream = sdk(mock.v1_url).chat.completions.create(
        model="m", messages=MESSAGES, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == "w0 w1 w2 w3 "
    last = chunks[-1]
    assert last.choices == [] and (last.usage.prompt_tokens, last.usage.completion_tokens,
                                   last.usage.total_tokens) == (13, 8, 21)
    assert all(ch.usage is None for ch in chunks[:-1])
    call = mock.last(CHAT)
    assert call.json["stream_options"] == {"include_usage": True} and call.stream
    data = sse_payloads(bytes(call.sent))
    assert data[-1] == "[DONE]"
    docs = [json.loads(d) for d in data[:-1]]
    for d in docs:
        ChatCompletionChunk.model_validate(d)
        assert d["object"] == "chat.completion.chunk" and "usage" in d  # null, as OpenAI
    assert [usage_of(d) is not None for d in docs] == [False] * (len(docs) - 1) + [True]


def test_chat_stream_usage_only_when_asked(mock):
    c = sdk(mock.v1_url)
    mock.enqueue(Script(), Script(usage=True), Script(usage=False))
    list(c.chat.completions.create(model="m", messages=MESSAGES, stream=True))
    docs = [json.loads(d) for d in sse_payloads(bytes(mock.last().sent))[:-1]]
    assert all("usage" not in d for d in docs)  # not asked: no usage key at all
    chunks = list(c.chat.completions.create(model="m", messages=MESSAGES, stream=True))
    assert chunks[-1].usage.total_tokens == 33  # forced, unasked
    chunks = list(c.chat.completions.create(model="m", messages=MESSAGES, stream=True,
                                            stream_options={"include_usage": True}))
    assert all(ch.usage is None for ch in chunks)  # asked, but the upstream does not report
    assert "stream_options" not in mock.calls()[0].json


def test_completions_stream_with_usage(mock):
    chunks = list(sdk(mock.v1_url).completions.create(
        model="m", prompt="x", stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == "w0 w1 w2 "
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 33
    for d in map(json.loads, sse_payloads(bytes(mock.last().sent))[:-1]):
        assert d["object"] == "text_completion"
        if not d["choices"] or d["choices"][0]["finish_reason"]:  # the SDK's model wants one
            Completion.model_validate(d)


def test_responses_stream_with_the_sdk(mock):
    mock.script = Script(prompt_tokens=5, completion_tokens=6, chunks=3)
    events = list(sdk(mock.v1_url).responses.create(model="m", input="hi", stream=True))
    types = [e.type for e in events]
    assert types[0] == "response.created" and types[-1] == "response.completed"
    assert types.count("response.output_text.delta") == 3
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "w0 w1 w2 "
    u = events[-1].response.usage
    assert (u.input_tokens, u.output_tokens, u.total_tokens) == (5, 6, 11)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    raw = bytes(mock.last().sent).decode()
    assert "[DONE]" not in raw and raw.startswith("event: response.created\ndata: {")
    for d in sse_payloads(raw.encode()):
        EVENT.validate_python(json.loads(d))  # each event's exact shape


def test_usage_chunk_split_across_tcp_writes(mock):
    """Raw socket: the usage event arrives in several recv()s, as scripted."""
    for route, doc, marker in [
            (CHAT, {"model": "m", "messages": MESSAGES, "stream": True,
                    "stream_options": {"include_usage": True}}, b'"choices":[],"usage":{'),
            ("/v1/responses", {"model": "m", "input": "hi", "stream": True},
             b"event: response.completed")]:
        mock.script = Script(split_usage=4, split_delay=0.05)
        pieces = recv_all(raw_post(mock.port, route, doc))
        call = mock.last(route).wait()
        raw = b"".join(pieces)
        head, chunks, terminated = dechunk(raw)
        assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head.lower()
        assert terminated and b"".join(chunks) == bytes(call.sent)
        usage_event = next(e for e in call.events if marker in e)
        assert usage_event not in chunks  # not written whole
        assert sum(1 for ch in chunks if ch and ch in usage_event) == 4  # 4 HTTP chunks
        assert not any(usage_event in p for p in pieces), "one recv() had the whole usage event"
        assert len(call.events) == len(sse_payloads(b"".join(chunks)))


def test_batches_crlf_and_comments(mock):
    mock.script = Script(batch=3, crlf=True, comments=True, chunks=5)
    doc = {"model": "m", "messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True}}
    _, chunks, terminated = dechunk(b"".join(recv_all(raw_post(mock.port, CHAT, doc))))
    call = mock.last().wait()
    assert terminated and len(chunks) == -(-len(call.events) // 3)
    assert chunks[0].count(b"data: ") == 3  # several events in one write
    body = b"".join(chunks)
    assert b"\n" not in body.replace(b"\r\n", b"") and body.count(b": keep-alive\r\n\r\n") == len(call.events)
    chunks = list(sdk(mock.v1_url).chat.completions.create(
        model="m", messages=MESSAGES, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.total_tokens == 33  # the SDK reads it all the same


def test_upstream_cut_mid_stream(mock):
    c = sdk(mock.v1_url)
    for mode in ("close", "reset"):
        mock.script = Script(chunks=20, fail_after=5, fail_mode=mode)
        got = []
        with pytest.raises(Exception) as err:  # the SDK's HTTP library's protocol error
            for ch in c.chat.completions.create(model="m", messages=MESSAGES, stream=True,
                                                stream_options={"include_usage": True}):
                got.append(ch)
        assert len(got) <= 5 and not isinstance(err.value, AssertionError)
        call = mock.last().wait()
        assert call.outcome == "cut" and call.events_written == 5
    mock.script = Script(fail_after=3)
    _, chunks, terminated = dechunk(b"".join(recv_all(raw_post(mock.port, CHAT, {
        "model": "m", "messages": MESSAGES, "stream": True}))))
    assert not terminated and len(chunks) == 3
    mock.script = Script()
    assert c.chat.completions.create(model="m", messages=MESSAGES).usage.total_tokens == 33


def test_client_disconnecting_mid_stream(mock):
    mock.script = Script(chunks=100, delay=0.01)
    s = raw_post(mock.port, CHAT, {"model": "m", "messages": MESSAGES, "stream": True})
    data = b""
    while b"\n\n" not in data:
        data += s.recv(4096)
    s.close()
    call = mock.last().wait()
    assert call.outcome == "client_gone" and call.events_written < len(call.events)
    mock.script = Script()
    chunks = list(sdk(mock.v1_url).chat.completions.create(
        model="m", messages=MESSAGES, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.total_tokens == 33
    assert mock.last().outcome == "complete" and mock.active == 0


def _concurrent_streams(base_url: str, mock: OpenAIMock, n: int) -> list:
    """`n` chat streams at once from one AsyncOpenAI client; the mock holds
    each before its last event until all `n` are open."""
    gate = threading.Event()
    mock.script = Script(chunks=5, prompt_tokens=2, completion_tokens=3, hold=gate, hold_timeout=30)
    client = openai.AsyncOpenAI(base_url=base_url, api_key="sk-test", max_retries=0, timeout=60)

    async def one(i: int):
        stream = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": str(i)}], stream=True,
            stream_options={"include_usage": True})
        return [ch async for ch in stream]

    async def main():
        opener = threading.Thread(target=lambda: (mock.wait_active(n, 30), gate.set()), daemon=True)
        opener.start()
        try:
            return await asyncio.gather(*(one(i) for i in range(n)))
        finally:
            gate.set()
            await client.close()

    return asyncio.run(main())


def test_200_concurrent_streams_one_client(mock):
    results = _concurrent_streams(mock.v1_url, mock, 200)
    assert len(results) == 200
    assert all(r[-1].usage.total_tokens == 5 and r[-1].choices == [] for r in results)
    assert mock.peak_active == 200
    calls = mock.calls(CHAT)
    assert len(calls) == 200 and all(c.wait().outcome == "complete" and not c.held_timed_out for c in calls)
    assert sorted(c.json["messages"][0]["content"] for c in calls) == sorted(str(i) for i in range(200))


def test_script_per_request(mock):
    class Picky(OpenAIMock):
        def script_for(self, req):
            return Script(prompt_tokens=int(req.headers.get("x-tokens", "1")))

    with Picky() as m:
        c = sdk(m.v1_url)
        r = c.chat.completions.create(model="m", messages=MESSAGES, extra_headers={"x-tokens": "40"})
        assert r.usage.prompt_tokens == 40
    r = sdk(mock.v1_url).models.list()
    assert [x.id for x in r.data] == ["mock-model"]
    st = http.client.HTTPConnection("127.0.0.1", mock.port, timeout=5)
    st.request("POST", CHAT, body=b"not json", headers={"content-type": "application/json"})
    resp = st.getresponse()
    assert resp.status == 400 and json.loads(resp.read())["error"]["type"] == "invalid_request_error"


# -- through Envoy and today's tollgate -------------------------------------------

def test_stream_through_tollgate_unchanged_and_unbuffered(envoy, mock):
    """A 200-chunk stream passes through Envoy + tollgate (no auth) as it
    arrives: the client has the first event while the mock still holds the
    last one, and the bytes are exactly those the mock sent."""
    envoy.upstream = mock
    e = envoy({}, clusters={})
    gate = threading.Event()
    mock.script = Script(chunks=200, hold=gate, hold_timeout=5)
    conn = http.client.HTTPConnection("127.0.0.1", int(e.url.rsplit(":", 1)[1]), timeout=15)
    conn.request("POST", CHAT, body=json.dumps({
        "model": "m", "messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True}}),
        headers={"content-type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("content-type").startswith("text/event-stream")
    first = b""
    while b"\n\n" not in first:
        first += resp.read1(65536)
    call = mock.last(CHAT, wait=False)
    total = len(call.events)
    assert total == 204  # role chunk, 200 deltas, finish chunk, usage chunk, [DONE]
    assert call.events_written < total, "the first event reached the client only after the last was sent"
    assert not call.held_timed_out
    gate.set()
    body = first + resp.read()
    conn.close()
    call.wait()
    assert call.outcome == "complete" and not call.held_timed_out
    assert body == bytes(call.sent)  # unchanged

    chunks = list(sdk(f"{e.url}/v1").chat.completions.create(
        model="m", messages=MESSAGES, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.total_tokens == 33 and len(chunks) == 204 - 1  # no [DONE]


def test_200_concurrent_streams_through_tollgate(envoy, mock):
    """One client, 200 streams open at once through Envoy + tollgate, each
    with its own usage chunk."""
    envoy.upstream = mock
    e = envoy({}, clusters={})
    results = _concurrent_streams(f"{e.url}/v1", mock, 200)
    assert len(results) == 200 and mock.peak_active == 200
    assert all(r[-1].usage.total_tokens == 5 and r[-1].choices == [] for r in results)
    assert all(c.wait().outcome == "complete" and not c.held_timed_out for c in mock.calls(CHAT))
