"""A tiny HTTP client on http.client (no third-party dependency)."""

from __future__ import annotations

import http.client
import json
from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass
class Response:
    status: int
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    header_list: list[tuple[str, str]]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self):
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.headers!r} {self.body[:300]!r}>"


def request(base_url: str, path: str = "/", method: str = "GET", headers: dict | None = None,
            body: bytes | str | None = None, timeout: float = 15.0) -> Response:
    """Sends one request on a new connection and reads the whole answer."""
    u = urlsplit(base_url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=dict(headers or {}))
        resp = conn.getresponse()
        data = resp.read()
        header_list = [(k.lower(), v) for k, v in resp.getheaders()]
        joined: dict[str, str] = {}
        for k, v in header_list:
            joined[k] = f"{joined[k]}, {v}" if k in joined else v
        return Response(resp.status, joined, header_list, data)
    finally:
        conn.close()
