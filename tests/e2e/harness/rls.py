"""The global-quota engine for the tests: a private Redis (Debian's `redis-server`) and
tests/rls-server (Envoy's rate-limit service answering like envoyproxy/ratelimit, counting in
that Redis), plus a grpcio client for `ShouldRateLimit` with a tiny protobuf codec.

    redis = Redis().start()                       # free port, no persistence, temp dir
    rls = RlsServer(redis.url).start()            # domain "tollgate"; or config={...}
    with RlsClient(rls.address) as c:
        r = c.should_rate_limit("tollgate", [Descriptor([("client", "alice")], limit=(5, "minute"))])
        r.overall_code == OK; r.statuses[0].limit_remaining == 4
    rls.kill(); rls.start()                       # same port; also stop(), pause()/resume()
    redis.stop(); redis.start()                   # same port, empty again

`skip_reason()` says why these cannot run (binary not built: `make rls-server`)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]
CRATE = REPO_ROOT / "tests" / "rls-server"
TARGET_DIR = Path(os.environ.get("RLS_TARGET_DIR", REPO_ROOT / "build" / "rls-server-target"))
BINARY = TARGET_DIR / "release" / "rls-server"
METHOD = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"

# RateLimitResponse.Code
UNKNOWN, OK, OVER_LIMIT = 0, 1, 2
# RateLimitResponse.RateLimit.Unit (= envoy.type.v3.RateLimitUnit)
UNITS = {"second": 1, "minute": 2, "hour": 3, "day": 4, "month": 5, "year": 6, "week": 7}
UNIT_NAMES = {v: k for k, v in UNITS.items()}
SECONDS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400, "week": 604800,
           "month": 2592000, "year": 31536000}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_refreshed = False
_refresh_lock = threading.Lock()


def skip_reason() -> str | None:
    """None when Redis and the rls-server binary are there. A built binary is brought up to
    date once per session (`cargo build --release`, a no-op when the sources did not change)."""
    global _refreshed
    if not shutil.which("redis-server"):
        return "redis-server is not installed (make rls-server)"
    if not BINARY.exists():
        return f"{BINARY} is not built (make rls-server)"
    with _refresh_lock:
        if not _refreshed and shutil.which("cargo"):
            r = subprocess.run(["cargo", "build", "--release", "--locked", "--quiet"], cwd=CRATE,
                               env={**os.environ, "CARGO_TARGET_DIR": str(TARGET_DIR)},
                               capture_output=True, text=True)
            if r.returncode != 0:
                return f"rls-server does not build:\n{r.stderr[-2000:]}"
        _refreshed = True
    return None


# --- processes -------------------------------------------------------------------------------

class _Process:
    """A child process on a fixed port: start() (again: same port), stop() (SIGTERM),
    kill() (SIGKILL), pause()/resume() (SIGSTOP/SIGCONT: a hung server)."""

    name = "process"

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self.dir = Path(tempfile.mkdtemp(prefix=f"tollgate-{self.name}-"))
        self.log_path = self.dir / f"{self.name}.log"

    def _argv(self) -> list[str]:
        raise NotImplementedError

    def _wait_ready(self, deadline: float) -> None:
        raise NotImplementedError

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 10.0):
        assert not self.running, f"{self.name} already running"
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self._argv(), stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=self.dir)
        log.close()
        try:
            self._wait_ready(time.monotonic() + timeout)
        except BaseException:
            self.kill()
            raise
        return self

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _signal(self, sig: int) -> None:
        if self.running:
            self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.resume()
            self.proc.send_signal(sig)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def pause(self) -> None:
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Redis(_Process):
    """A private redis-server on loopback: no RDB/AOF, so a restart starts empty."""

    name = "redis"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def _argv(self) -> list[str]:
        return ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", str(self.dir),
                "--daemonize", "no", "--protected-mode", "yes"]

    def _wait_ready(self, deadline: float) -> None:
        while True:
            try:
                if self.command("PING", timeout=0.5) == "PONG":
                    return
            except OSError:
                pass
            if not self.running or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start:\n{self.log_text()[-2000:]}")
            time.sleep(0.02)

    def command(self, *args, timeout: float = 2.0):
        """One Redis command (RESP2); returns str/int/list/None; raises RuntimeError on -ERR."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
            parts = [str(a).encode() for a in args]
            s.sendall(b"*%d\r\n" % len(parts)
                      + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts))
            return _read_resp(s.makefile("rb"))


def _read_resp(f):
    line = f.readline()
    if not line:
        raise ConnectionError("redis closed the connection")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise RuntimeError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        return None if n < 0 else f.read(n + 2)[:-2].decode()
    if kind == b"*":
        n = int(rest)
        return None if n < 0 else [_read_resp(f) for _ in range(n)]
    raise ValueError(f"unexpected RESP line {line!r}")


class RlsServer(_Process):
    """tests/rls-server on loopback. `config`: a limits file as a dict (envoyproxy/ratelimit's
    schema, see tests/rls-server/README.md); without it the domain has no rules and only
    descriptors with a `limit` override are limited."""

    name = "rls"

    def __init__(self, redis_url: str, port: int | None = None, domain: str = "tollgate",
                 config: dict | None = None, redis_timeout_ms: int = 1000,
                 extra_args: list[str] | None = None):
        super().__init__(port)
        self.redis_url = redis_url
        self.domain = domain
        self.config = config
        self.redis_timeout_ms = redis_timeout_ms
        self.extra_args = list(extra_args or [])

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _argv(self) -> list[str]:
        argv = [str(BINARY), "--port", str(self.port), "--redis-url", self.redis_url,
                "--redis-timeout-ms", str(self.redis_timeout_ms)]
        if self.config is not None:
            path = self.dir / "limits.json"
            path.write_text(json.dumps(self.config))
            argv += ["--config", str(path)]
        else:
            argv += ["--domain", self.domain]
        return argv + self.extra_args

    def _wait_ready(self, deadline: float) -> None:
        mark = f"listening on 127.0.0.1:{self.port}"
        while mark not in self.log_text():
            if not self.running:
                raise RuntimeError(f"rls-server exited:\n{self.log_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"rls-server not ready:\n{self.log_text()[-2000:]}")
            time.sleep(0.02)


# --- protobuf (only the fields of rls.proto the tests use) -----------------------------------

def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field(num: int, value) -> bytes:
    if isinstance(value, int):
        return _varint(num << 3) + _varint(value)
    data = value.encode() if isinstance(value, str) else value
    return _varint(num << 3 | 2) + _varint(len(data)) + data


@dataclass
class Descriptor:
    """`entries`: (key, value) pairs; `limit`: (requests_per_unit, unit name or number);
    `hits_addend`: the descriptor's own (0 allowed), None for the request's."""
    entries: list[tuple[str, str]]
    limit: tuple[int, str | int] | None = None
    hits_addend: int | None = None

    def encode(self) -> bytes:
        out = b"".join(_field(1, _field(1, k) + _field(2, v)) for k, v in self.entries)
        if self.limit is not None:
            rpu, unit = self.limit
            unit = UNITS[unit] if isinstance(unit, str) else unit
            out += _field(2, _field(1, rpu) + _field(2, unit))
        if self.hits_addend is not None:
            out += _field(3, _field(1, self.hits_addend) if self.hits_addend else b"")
        return out


def encode_request(domain: str, descriptors: list[Descriptor], hits_addend: int = 0) -> bytes:
    out = _field(1, domain) if domain else b""
    out += b"".join(_field(2, d.encode()) for d in descriptors)
    if hits_addend:
        out += _field(3, hits_addend)
    return out


def _fields(data: bytes):
    """(field number, wire type, int or bytes) for each field."""
    i = 0
    while i < len(data):
        key, i = _read_varint(data, i)
        num, wt = key >> 3, key & 7
        if wt == 0:
            v, i = _read_varint(data, i)
        elif wt == 2:
            n, i = _read_varint(data, i)
            v, i = data[i:i + n], i + n
        elif wt == 1:
            v, i = data[i:i + 8], i + 8
        elif wt == 5:
            v, i = data[i:i + 4], i + 4
        else:
            raise ValueError(f"wire type {wt}")
        yield num, wt, v


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        b = data[i]
        i += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return n, i


@dataclass
class Status:
    code: int = UNKNOWN
    requests_per_unit: int | None = None  # current_limit; None when absent
    unit: str | None = None
    limit_name: str = ""
    limit_remaining: int = 0
    duration_until_reset: int | None = None  # seconds; None when absent


@dataclass
class Reply:
    overall_code: int = UNKNOWN
    statuses: list[Status] = field(default_factory=list)


def decode_response(data: bytes) -> Reply:
    r = Reply()
    for num, _, v in _fields(data):
        if num == 1:
            r.overall_code = v
        elif num == 2:
            s = Status()
            for n2, _, v2 in _fields(v):
                if n2 == 1:
                    s.code = v2
                elif n2 == 2:
                    s.requests_per_unit, s.unit = 0, "unknown"
                    for n3, _, v3 in _fields(v2):
                        if n3 == 1:
                            s.requests_per_unit = v3
                        elif n3 == 2:
                            s.unit = UNIT_NAMES.get(v3, str(v3))
                        elif n3 == 3:
                            s.limit_name = v3.decode()
                elif n2 == 3:
                    s.limit_remaining = v2
                elif n2 == 4:
                    s.duration_until_reset = 0
                    for n3, _, v3 in _fields(v2):
                        if n3 == 1:
                            s.duration_until_reset = v3
            r.statuses.append(s)
    return r


# --- client ----------------------------------------------------------------------------------

class RlsClient:
    """grpcio client for ShouldRateLimit. Errors raise grpc.RpcError (`.code()`)."""

    def __init__(self, address: str):
        import grpc
        self._channel = grpc.insecure_channel(address)
        self._call = self._channel.unary_unary(METHOD)  # bytes in, bytes out

    def should_rate_limit(self, domain: str, descriptors: list[Descriptor],
                          hits_addend: int = 0, timeout: float = 5.0,
                          wait_for_ready: bool | None = None) -> Reply:
        """`wait_for_ready=True`: wait (up to `timeout`) for a server that is (re)starting
        instead of failing UNAVAILABLE while grpcio's reconnect backoff runs."""
        raw = self._call(encode_request(domain, descriptors, hits_addend), timeout=timeout,
                         wait_for_ready=wait_for_ready)
        return decode_response(raw)

    def future(self, domain: str, descriptors: list[Descriptor], hits_addend: int = 0,
               timeout: float = 10.0):
        """A grpc future; `.result()` is the raw answer (decode_response)."""
        return self._call.future(encode_request(domain, descriptors, hits_addend),
                                 timeout=timeout)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
