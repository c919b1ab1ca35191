"""The echo upstream: answers 200 with what it received, as JSON."""

from __future__ import annotations

from harness.server import LoopbackServer, Reply, Request


class EchoServer(LoopbackServer):
    """Answers `{"method", "path", "headers": {lower-case name: value},
    "header_list": [[name, value], ...], "body"}`."""

    def handle(self, req: Request) -> Reply:
        return Reply(200, {
            "method": req.method,
            "path": req.path,
            "headers": req.headers,
            "header_list": [list(h) for h in req.header_list],
            "body": req.body.decode("utf-8", "replace"),
        })
