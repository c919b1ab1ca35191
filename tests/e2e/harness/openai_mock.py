"""An OpenAI-compatible upstream on 127.0.0.1 for the token-quota tests (issue #19).

`OpenAIMock()` answers, like an OpenAI-compatible server (OpenAI, vLLM, Llama Stack):

- `POST /v1/chat/completions`: a `chat.completion`, or with `"stream": true` a
  `text/event-stream` of `chat.completion.chunk` objects (`data: {...}` events,
  then `data: [DONE]`). As OpenAI does, only when the request has
  `stream_options.include_usage` does an extra chunk with `"choices": []` and
  the `usage` come before `[DONE]`, and every other chunk then carries
  `"usage": null`.
- `POST /v1/completions`: a `text_completion` (streamed the same way).
- `POST /v1/embeddings`: a `list` of `embedding` objects (floats, or base64
  little-endian float32 for `"encoding_format": "base64"`, which the Python SDK
  asks for); usage is `prompt_tokens` and `total_tokens` only.
- `POST /v1/responses`: a `response` with `usage.input_tokens`/`output_tokens`/
  `total_tokens`; streamed as the Responses API's typed events (`event:` and
  `data:` lines): `response.created`, `response.in_progress`,
  `response.output_item.added`, `response.content_part.added`,
  `response.output_text.delta`…, `response.output_text.done`,
  `response.content_part.done`, `response.output_item.done`, and
  `response.completed` carrying the usage (no `[DONE]`).
- `GET /v1/models`: a `list` with one model.

Usage of chat completions, completions and embeddings: `usage.prompt_tokens`,
`completion_tokens`, `total_tokens`. Errors: `{"error": {"message", "type",
"param", "code"}}`.

References (OpenAI API reference): https://platform.openai.com/docs/api-reference
(chat completions, the chat completion chunk object, completions, embeddings,
responses); the Responses streaming events:
https://developers.openai.com/api/reference/resources/responses/streaming-events ;
`stream_options.include_usage` in OpenAI's OpenAPI spec
(`ChatCompletionStreamOptions`): "an additional chunk will be streamed before
the `data: [DONE]` message … the `choices` field will always be an empty array.
All other chunks will also include a `usage` field, but with a null value."
test_openai_mock.py validates every shape against the `openai` SDK's models.

Scripting: a `Script` says what to answer (token counts, number of chunks,
delays, splitting the usage event across TCP writes, no usage, a cut
mid-stream, `\\r\\n` line endings, comments, a status code, a gate to hold the
stream). `mock.script` is the default; `mock.enqueue(*scripts)` queues scripts
for the next requests (first in, first out); `mock.script_for(request)` may be
replaced to choose per request (return None for the queue/default).

Every request is recorded as a `Call` (`mock.calls(route)`): the request, its
parsed JSON body, the script used, the exact body bytes sent (without the
chunked framing), when each event was written, and the outcome.

Streams are written with `Transfer-Encoding: chunked`, one HTTP chunk per
write and a flush after each, Nagle off, so each write leaves as its own TCP
segment(s) at the time the script says."""

from __future__ import annotations

import base64
import http.server
import itertools
import json
import socket
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

if __name__ == "__main__":  # run as a script: make `harness` importable
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.server import LoopbackServer, Request, _Httpd, _RequestHandler

ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses")
MODEL = "mock-model"


@dataclass
class Script:
    """What the mock answers to one request (every field optional).

    Counts: `prompt_tokens` (the Responses API's `input_tokens`),
    `completion_tokens` (`output_tokens`), `total_tokens` (default: their sum;
    for embeddings `prompt_tokens`). `usage`: None = as OpenAI (always in
    non-streaming answers and `response.completed`; in chat/completions streams
    only when the request asked with `stream_options.include_usage`); False =
    never (no `usage` key in JSON, no usage chunk, `"usage": null` in
    `response.completed`); True = always, even unasked.

    Streams: `chunks` content deltas (each `text_piece` with its index
    formatted in); `delay` seconds between writes; `batch` events per write
    (several events in one chunk); `split_usage` writes the usage-carrying
    event in that many pieces (flush + `split_delay` sleep between them);
    `crlf` ends lines with `\\r\\n`; `comments` puts a `: keep-alive` comment
    before every event; `fail_after` cuts the connection after that many
    events are written (`fail_mode` "close": FIN without the terminating
    chunk, "reset": RST); `hold` (a threading.Event) makes the stream wait
    (up to `hold_timeout` s) before writing event number `hold_at`
    (default: the last one).

    `status` other than 200 answers that status with an OpenAI error body
    (`error_message`, `error_type`), streaming or not; `headers` are added to
    the answer."""

    prompt_tokens: int = 11
    completion_tokens: int = 22
    total_tokens: int | None = None
    usage: bool | None = None
    chunks: int = 3
    text_piece: str = "w{i} "
    delay: float = 0.0
    batch: int = 1
    split_usage: int = 1
    split_delay: float = 0.05
    crlf: bool = False
    comments: bool = False
    fail_after: int | None = None
    fail_mode: str = "close"
    hold: threading.Event | None = None
    hold_at: int | None = None
    hold_timeout: float = 10.0
    status: int = 200
    error_message: str = "The server had an error while processing your request."
    error_type: str = "server_error"
    headers: dict[str, str] = field(default_factory=dict)

    def total(self, embeddings: bool = False) -> int:
        if self.total_tokens is not None:
            return self.total_tokens
        return self.prompt_tokens if embeddings else self.prompt_tokens + self.completion_tokens

    def text(self) -> str:
        return "".join(self.text_piece.format(i=i) for i in range(self.chunks))


@dataclass
class Call:
    """One request the mock received and what it did with it."""

    request: Request
    json: Any  # the parsed body (None when absent or not JSON)
    script: Script
    stream: bool = False
    status: int = 0
    sent: bytearray = field(default_factory=bytearray)  # body bytes written (or being written), no chunk framing
    events: list[bytes] = field(default_factory=list)  # the SSE events planned, in order
    events_written: int = 0
    written_at: list[float] = field(default_factory=list)  # time.monotonic() after each event's last byte
    writes: int = 0  # write()+flush() calls for the body
    outcome: str = ""  # "complete", "cut" (scripted fail_after), "client_gone", "error" (status != 200)
    held_timed_out: bool = False
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def route(self) -> str:
        return self.request.route

    def wait(self, timeout: float = 10.0) -> "Call":
        """Waits until the answer is finished (written, cut or abandoned)."""
        if not self.done.wait(timeout):
            raise TimeoutError(f"{self.route}: answer not finished after {timeout}s")
        return self


# -- OpenAI shapes -----------------------------------------------------------

def chat_usage(s: Script) -> dict:
    return {
        "prompt_tokens": s.prompt_tokens,
        "completion_tokens": s.completion_tokens,
        "total_tokens": s.total(),
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                      "accepted_prediction_tokens": 0,
                                      "rejected_prediction_tokens": 0},
    }


def responses_usage(s: Script) -> dict:
    return {
        "input_tokens": s.prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": s.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": s.total(),
    }


def error_body(status: int, message: str, type_: str) -> dict:
    return {"error": {"message": message, "type": type_, "param": None,
                      "code": None if status >= 500 else str(status)}}


_ids = itertools.count(1)


class _Answer:
    """Builds the JSON answer or the SSE events for one request."""

    def __init__(self, route: str, body: dict, script: Script):
        self.route = route
        self.body = body
        self.s = script
        self.model = str(body.get("model") or MODEL)
        self.created = int(time.time())
        self.n = next(_ids)
        opts = body.get("stream_options")
        asked = isinstance(opts, dict) and opts.get("include_usage") is True
        self.asked = asked
        self.with_usage = asked if script.usage is None else script.usage

    # non-streaming
    def json(self) -> dict:
        s, r = self.s, self.route
        if r == "/v1/chat/completions":
            out = {"id": f"chatcmpl-mock{self.n}", "object": "chat.completion",
                   "created": self.created, "model": self.model, "system_fingerprint": None,
                   "choices": [{"index": 0, "message": {"role": "assistant", "content": s.text(),
                                                        "refusal": None, "annotations": []},
                                "logprobs": None, "finish_reason": "stop"}],
                   "service_tier": "default"}
            if s.usage is not False:
                out["usage"] = chat_usage(s)
            return out
        if r == "/v1/completions":
            out = {"id": f"cmpl-mock{self.n}", "object": "text_completion",
                   "created": self.created, "model": self.model, "system_fingerprint": None,
                   "choices": [{"text": s.text(), "index": 0, "logprobs": None,
                                "finish_reason": "stop"}]}
            if s.usage is not False:
                out["usage"] = chat_usage(s)
            return out
        if r == "/v1/embeddings":
            inputs = self.body.get("input")
            n = len(inputs) if isinstance(inputs, list) and inputs and not isinstance(inputs[0], int) else 1
            b64 = self.body.get("encoding_format") == "base64"
            data = []
            for i in range(n):
                vec = [0.25, -0.5, float(i)]
                emb = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode() if b64 else vec
                data.append({"object": "embedding", "index": i, "embedding": emb})
            out = {"object": "list", "data": data, "model": self.model}
            if s.usage is not False:
                out["usage"] = {"prompt_tokens": s.prompt_tokens, "total_tokens": s.total(embeddings=True)}
            return out
        return self.response("completed", done=True)

    def response(self, status: str, done: bool) -> dict:
        s = self.s
        output = [self.message_item("completed")] if done else []
        return {"id": f"resp_mock{self.n}", "object": "response", "created_at": self.created,
                "status": status, "error": None, "incomplete_details": None,
                "instructions": self.body.get("instructions"),
                "max_output_tokens": self.body.get("max_output_tokens"), "model": self.model,
                "output": output, "parallel_tool_calls": True, "previous_response_id": None,
                "reasoning": {"effort": None, "summary": None}, "store": True,
                "temperature": 1.0, "text": {"format": {"type": "text"}}, "tool_choice": "auto",
                "tools": [], "top_p": 1.0, "truncation": "disabled",
                "usage": responses_usage(s) if done and s.usage is not False else None,
                "user": None, "metadata": {}}

    def message_item(self, status: str) -> dict:
        content = [self.part(self.s.text())] if status == "completed" else []
        return {"type": "message", "id": f"msg_mock{self.n}", "status": status,
                "role": "assistant", "content": content}

    @staticmethod
    def part(text: str) -> dict:
        return {"type": "output_text", "text": text, "annotations": []}

    # streaming: [(event payload dict or "[DONE]", event name or None, carries usage)]
    def events(self) -> list[tuple[Any, str | None, bool]]:
        s, r = self.s, self.route
        if r == "/v1/responses":
            return self._response_events()
        chat = r == "/v1/chat/completions"
        base = {"id": f"{'chatcmpl' if chat else 'cmpl'}-mock{self.n}",
                "object": "chat.completion.chunk" if chat else "text_completion",
                "created": self.created, "model": self.model, "system_fingerprint": None}

        def chunk(choices: list) -> dict:
            c = {**base, "choices": choices}
            if self.with_usage:
                c["usage"] = None
            return c

        def choice(delta_or_text, finish=None) -> dict:
            if chat:
                return {"index": 0, "delta": delta_or_text, "logprobs": None, "finish_reason": finish}
            return {"text": delta_or_text, "index": 0, "logprobs": None, "finish_reason": finish}

        out: list[tuple[Any, str | None, bool]] = []
        if chat:
            out.append((chunk([choice({"role": "assistant", "content": "", "refusal": None})]), None, False))
        for i in range(s.chunks):
            piece = s.text_piece.format(i=i)
            out.append((chunk([choice({"content": piece} if chat else piece)]), None, False))
        out.append((chunk([choice({} if chat else "", "stop")]), None, False))
        if self.with_usage:
            out.append(({**base, "choices": [], "usage": chat_usage(s)}, None, True))
        out.append(("[DONE]", None, False))
        return out

    def _response_events(self) -> list[tuple[Any, str | None, bool]]:
        s = self.s
        seq = itertools.count(0)
        item_id = f"msg_mock{self.n}"
        ev: list[tuple[Any, str | None, bool]] = []

        def add(type_: str, usage: bool = False, **fields):
            ev.append(({"type": type_, "sequence_number": next(seq), **fields}, type_, usage))

        add("response.created", response=self.response("in_progress", done=False))
        add("response.in_progress", response=self.response("in_progress", done=False))
        add("response.output_item.added", output_index=0, item=self.message_item("in_progress"))
        add("response.content_part.added", item_id=item_id, output_index=0, content_index=0,
            part=self.part(""))
        for i in range(s.chunks):
            add("response.output_text.delta", item_id=item_id, output_index=0, content_index=0,
                delta=s.text_piece.format(i=i), logprobs=[])
        add("response.output_text.done", item_id=item_id, output_index=0, content_index=0,
            text=s.text(), logprobs=[])
        add("response.content_part.done", item_id=item_id, output_index=0, content_index=0,
            part=self.part(s.text()))
        add("response.output_item.done", output_index=0, item=self.message_item("completed"))
        # usage=None (as OpenAI): response.completed always carries it
        add("response.completed", usage=s.usage is not False, response=self.response("completed", done=True))
        return ev


def sse_event(payload: Any, name: str | None, crlf: bool = False) -> bytes:
    """One SSE event: optional `event:` line, a `data:` line, a blank line."""
    nl = "\r\n" if crlf else "\n"
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    head = f"event: {name}{nl}" if name else ""
    return f"{head}data: {data}{nl}{nl}".encode()


# -- the server --------------------------------------------------------------

class _ClientGone(Exception):
    pass


class _Handler(_RequestHandler):
    disable_nagle_algorithm = True

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("transfer-encoding") or "").lower():
            body = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(body)
                body += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("content-length") or 0)
        return self.rfile.read(length) if length else b""

    def _serve(self):
        body = self._read_body()
        header_list = [(k.lower(), v) for k, v in self.headers.items()]
        headers: dict[str, str] = {}
        for k, v in header_list:
            headers[k] = f"{headers[k]}, {v}" if k in headers else v
        req = Request(self.command, self.path, headers, header_list, body)
        mock: OpenAIMock = self.server.owner  # type: ignore[assignment]
        try:
            parsed = json.loads(body) if body else None
        except ValueError:
            parsed = None
        call = mock._begin(req, parsed)
        try:
            self._answer(mock, call)
        except (ConnectionError, _ClientGone):
            call.outcome = "client_gone"
            self.close_connection = True
        finally:
            mock._end(call)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _serve

    # -- writing
    def _json(self, call: Call, status: int, doc: dict, extra: dict[str, str]) -> None:
        payload = json.dumps(doc).encode()
        call.status = status
        self.send_response(status)
        self.send_header("content-type", "application/json")
        for k, v in extra.items():
            self.send_header(k, v)
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        call.sent += payload  # before: the client may read it before this thread resumes
        call.writes += 1
        self.wfile.write(payload)
        self.wfile.flush()

    def _chunk(self, call: Call, data: bytes) -> None:
        call.sent += data
        call.writes += 1
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _answer(self, mock: "OpenAIMock", call: Call) -> None:
        s, req = call.script, call.request
        route = req.route
        if req.method == "GET" and route == "/v1/models":
            return self._json(call, 200, {"object": "list", "data": [
                {"id": MODEL, "object": "model", "created": 0, "owned_by": "mock"}]}, s.headers)
        if route not in ROUTES:
            call.outcome = "error"
            return self._json(call, 404, error_body(404, f"Unknown path {route}", "invalid_request_error"), {})
        if req.method != "POST":
            call.outcome = "error"
            return self._json(call, 405, error_body(405, "Method not allowed", "invalid_request_error"), {})
        if not isinstance(call.json, dict):
            call.outcome = "error"
            return self._json(call, 400, error_body(400, "Body is not a JSON object", "invalid_request_error"), {})
        if s.status != 200:
            call.outcome = "error"
            return self._json(call, s.status, error_body(s.status, s.error_message, s.error_type), s.headers)
        answer = _Answer(route, call.json, s)
        call.stream = call.json.get("stream") is True and route != "/v1/embeddings"
        if not call.stream:
            self._json(call, 200, answer.json(), s.headers)
            call.outcome = "complete"
            return None
        return self._stream(call, answer)

    def _stream(self, call: Call, answer: _Answer) -> None:
        s = call.script
        events = answer.events()
        call.events = [sse_event(p, n, s.crlf) for p, n, _ in events]
        usage_at = {i for i, (_, _, u) in enumerate(events) if u}
        call.status = 200
        self.send_response(200)
        self.send_header("content-type", "text/event-stream; charset=utf-8")
        self.send_header("cache-control", "no-cache")
        self.send_header("transfer-encoding", "chunked")
        for k, v in s.headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.flush()
        comment = (b": keep-alive\r\n\r\n" if s.crlf else b": keep-alive\n\n") if s.comments else b""
        hold_at = (len(events) - 1 if s.hold_at is None else s.hold_at) if s.hold else None
        stopping = self.server.owner._stopping  # type: ignore[attr-defined]
        i = 0
        while i < len(events):
            if s.fail_after is not None and i >= s.fail_after:
                return self._cut(call)
            if i > 0 and s.delay and stopping.wait(s.delay):
                raise _ClientGone()  # the mock is stopping
            if hold_at is not None and i <= hold_at < i + max(1, s.batch):
                if not s.hold.wait(s.hold_timeout):
                    call.held_timed_out = True
            group = range(i, min(i + max(1, s.batch), len(events)))
            if s.fail_after is not None:
                group = range(i, min(group.stop, s.fail_after))
            if any(j in usage_at for j in group) and s.split_usage > 1:
                for j in group:  # the usage event alone, in pieces; the others whole
                    data = comment + call.events[j]
                    if j in usage_at:
                        n = s.split_usage
                        step = max(1, -(-len(data) // n))
                        pieces = [data[k:k + step] for k in range(0, len(data), step)]
                        for k, piece in enumerate(pieces):
                            if k:
                                time.sleep(s.split_delay)
                            self._chunk(call, piece)
                    else:
                        self._chunk(call, data)
                    call.events_written += 1
                    call.written_at.append(time.monotonic())
            else:
                self._chunk(call, b"".join(comment + call.events[j] for j in group))
                for _ in group:
                    call.events_written += 1
                    call.written_at.append(time.monotonic())
            i = group.stop
        if s.fail_after is not None and s.fail_after <= len(events) and i >= s.fail_after:
            return self._cut(call)
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()
        call.outcome = "complete"
        return None

    def _cut(self, call: Call) -> None:
        """Ends the connection mid-stream, without the terminating chunk."""
        call.outcome = "cut"
        self.close_connection = True
        try:
            self.wfile.flush()
            if call.script.fail_mode == "reset":
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
            else:
                self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class _MockHttpd(_Httpd):
    request_queue_size = 1024  # hundreds of concurrent streams connect at once

    def __init__(self, addr, owner: "OpenAIMock"):
        self.owner = owner
        http.server.ThreadingHTTPServer.__init__(self, addr, _Handler)


class OpenAIMock(LoopbackServer):
    """The OpenAI-compatible upstream. `base_url` + "/v1" is what an SDK's
    `base_url` wants (`mock.v1_url`)."""

    def __init__(self, port: int = 0, script: Script | None = None):
        super().__init__(port)
        self.script = script or Script()
        self._queue: deque[Script] = deque()
        self._calls: list[Call] = []
        self.active = 0  # answers being written now
        self.peak_active = 0

    @property
    def v1_url(self) -> str:
        return f"{self.base_url}/v1"

    def start(self) -> "OpenAIMock":
        if self._httpd is not None:
            return self
        self._stopping.clear()
        self._httpd = _MockHttpd(("127.0.0.1", self.port), self)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    # -- scripting
    def enqueue(self, *scripts: Script) -> None:
        """Scripts for the next requests, in order (before `script_for`'s default)."""
        with self._lock:
            self._queue.extend(scripts)

    def script_for(self, req: Request) -> Script | None:
        """Override to choose a script per request; None: the queue, then `script`."""
        return None

    def reset(self) -> None:
        """Forgets calls and queued scripts; the default script back to `Script()`."""
        with self._lock:
            self._queue.clear()
            self._calls.clear()
            self.requests.clear()
            self.script = Script()
            self.peak_active = self.active

    # -- the record
    def calls(self, route: str | None = None) -> list[Call]:
        with self._lock:
            return [c for c in self._calls if route is None or c.route == route]

    def last(self, route: str | None = None, wait: bool = True) -> Call:
        """The latest request (to `route`), once its answer is finished unless `wait=False`."""
        calls = self.calls(route)
        if not calls:
            raise AssertionError(f"no request reached {route or 'the mock'}")
        return calls[-1].wait() if wait else calls[-1]

    def wait_calls(self, n: int, timeout: float = 10.0, route: str | None = None) -> list[Call]:
        """Waits until `n` requests arrived (not necessarily finished)."""
        deadline = time.monotonic() + timeout
        while len(self.calls(route)) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.calls(route))} of {n} requests after {timeout}s")
            time.sleep(0.01)
        return self.calls(route)

    def wait_active(self, n: int, timeout: float = 10.0) -> None:
        """Waits until `n` answers are being written at once."""
        deadline = time.monotonic() + timeout
        while self.active < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.active} of {n} concurrent answers after {timeout}s")
            time.sleep(0.01)

    # -- internals
    def _begin(self, req: Request, parsed: Any) -> Call:
        script = self.script_for(req)
        with self._lock:
            if script is None:
                script = self._queue.popleft() if self._queue else self.script
            call = Call(req, parsed, script)
            self.requests.append(req)
            self._calls.append(call)
            self.active += 1
            self.peak_active = max(self.peak_active, self.active)
        return call

    def _end(self, call: Call) -> None:
        with self._lock:
            self.active -= 1
        call.done.set()


def usage_of(event_payload: dict) -> dict | None:
    """The usage an SSE event payload carries (chat/completions chunk or
    `response.completed`), else None."""
    if event_payload.get("type") == "response.completed":
        return (event_payload.get("response") or {}).get("usage")
    return event_payload.get("usage")


if __name__ == "__main__":  # python tests/e2e/harness/openai_mock.py --port N
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--chunks", type=int, default=3)
    p.add_argument("--delay", type=float, default=0.0)
    a = p.parse_args()
    m = OpenAIMock(a.port, Script(chunks=a.chunks, delay=a.delay)).start()
    print(f"OpenAI mock on {m.v1_url}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        m.stop()
