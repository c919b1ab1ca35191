"""A small threaded HTTP server on 127.0.0.1 that can be stopped and restarted
on the same port, and that closes its open keep-alive connections when stopped."""

from __future__ import annotations

import http.server
import json
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import parse_qs, urlsplit


@dataclass
class Request:
    """One received request, as a handler and a test see it."""

    method: str
    path: str  # the full target, query included
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    header_list: list[tuple[str, str]]  # every header in order, names lower-case
    body: bytes
    at: float = field(default_factory=time.time)  # when it was received (epoch seconds)

    @property
    def route(self) -> str:
        """The path without the query string."""
        return urlsplit(self.path).path

    @property
    def query(self) -> dict[str, str]:
        """The query parameters (last value wins)."""
        return {k: v[-1] for k, v in parse_qs(urlsplit(self.path).query).items()}

    def form(self) -> dict[str, str]:
        """The body read as application/x-www-form-urlencoded."""
        return {k: v[-1] for k, v in parse_qs(self.body.decode("latin-1")).items()}


@dataclass
class Reply:
    """What a handler answers. `drop=True` closes the connection with no answer."""

    status: int = 200
    body: bytes | str | dict | list = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    drop: bool = False

    def encoded(self) -> tuple[bytes, dict[str, str]]:
        headers = dict(self.headers)
        body = self.body
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            headers.setdefault("content-type", "application/json")
        elif isinstance(body, str):
            body = body.encode()
        return body, headers


Handler = Callable[[Request], Reply]


class _Httpd(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # A burst of callouts overflowing the default backlog of 5 loses SYNs, and
    # Envoy's 1 s connect timeout then fails the call (seen in CI as a 503).
    request_queue_size = 1024

    def __init__(self, addr, owner: "LoopbackServer"):
        self.owner = owner
        super().__init__(addr, _RequestHandler)

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], ConnectionError):
            return  # the peer hung up, e.g. an Envoy stopped while its answer was on its way
        super().handle_error(request, client_address)


class _RequestHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    wbufsize = 1 << 16  # one write per answer: no Nagle/delayed-ACK stalls
    server: _Httpd

    def setup(self):
        super().setup()
        self.server.owner._track(self.connection, add=True)

    def finish(self):
        try:
            super().finish()
        finally:
            self.server.owner._track(self.connection, add=False)

    def log_message(self, format, *args):  # noqa: A002 - keep pytest output quiet
        pass

    def _handle(self):
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        header_list = [(k.lower(), v) for k, v in self.headers.items()]
        headers: dict[str, str] = {}
        for k, v in header_list:
            headers[k] = f"{headers[k]}, {v}" if k in headers else v
        req = Request(self.command, self.path, headers, header_list, body)
        owner = self.server.owner
        reply = owner._dispatch(req)
        if reply.delay and owner._stopping.wait(reply.delay):
            reply = Reply(drop=True)  # stopped while waiting: just hang up
        if reply.drop:
            self.close_connection = True
            return
        payload, extra = reply.encoded()
        self.send_response(reply.status)
        for k, v in extra.items():
            self.send_header(k, v)
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _handle


class LoopbackServer:
    """Base class: subclasses implement `handle(request) -> Reply`."""

    def __init__(self, port: int = 0):
        self.port = port
        self._httpd: _Httpd | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self.requests: list[Request] = []

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> "LoopbackServer":
        """Starts listening (again on the same port after a `stop`)."""
        if self._httpd is not None:
            return self
        self._stopping.clear()
        self._httpd = _Httpd(("127.0.0.1", self.port), self)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stops listening and closes every open connection; the port is kept."""
        if self._httpd is None:
            return
        self._stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread:
            self._thread.join(5)
        self._httpd = None
        self._thread = None

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self._httpd is not None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- request log -------------------------------------------------------
    def count(self, route: str) -> int:
        """How many requests reached `route` (path without query)."""
        with self._lock:
            return sum(1 for r in self.requests if r.route == route)

    def received(self, route: str | None = None) -> list[Request]:
        """The received requests, optionally only those for `route`."""
        with self._lock:
            return [r for r in self.requests if route is None or r.route == route]

    def reset_log(self) -> None:
        with self._lock:
            self.requests.clear()

    # -- internals ---------------------------------------------------------
    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            (self._conns.add if add else self._conns.discard)(conn)

    def _dispatch(self, req: Request) -> Reply:
        with self._lock:
            self.requests.append(req)
        try:
            return self.handle(req)
        except Exception as e:  # a bug in a scripted handler: make it visible
            return Reply(500, f"handler error: {e!r}")

    def handle(self, req: Request) -> Reply:
        raise NotImplementedError
