"""The echo upstream: answers 200 with what it received, as JSON."""

from __future__ import annotations

import json

from harness.server import LoopbackServer, Reply, Request


class EchoServer(LoopbackServer):
    """Answers `{"method", "path", "headers": {lower-case name: value},
    "header_list": [[name, value], ...], "body"}`; with `pretty=True`, for
    people reading curl's output, only `method`, `path` and `headers`, indented."""

    def __init__(self, port: int = 0, *, pretty: bool = False):
        super().__init__(port)
        self.pretty = pretty

    def handle(self, req: Request) -> Reply:
        if self.pretty:
            text = json.dumps({"method": req.method, "path": req.path, "headers": req.headers}, indent=2)
            return Reply(200, text, {"content-type": "application/json"})
        return Reply(200, {
            "method": req.method,
            "path": req.path,
            "headers": req.headers,
            "header_list": [list(h) for h in req.header_list],
            "body": req.body.decode("utf-8", "replace"),
        })
