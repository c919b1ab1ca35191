"""Rolling out a new plugin configuration through Envoy's LDS (README.md,
"Rolling out configuration").

The listener comes from a file-based LDS (`dynamic_resources.lds_config` with
`path_config_source`); an update is a new file moved over the old one, as a
control plane's push would replace the listener. Under load (a thread sending
authenticated requests on new connections, each of which must be answered
200) a valid update takes effect for new connections, and a kept-alive
connection keeps the old configuration until Envoy drains it; an update that
tollgate refuses is rejected by Envoy as a whole (`listener_manager.lds.
update_rejected`), the old configuration keeps serving, and tollgate counts
and logs the refusal naming the key. An Envoy whose FIRST listener
configuration is refused starts anyway, with no listener, and /ready says 200.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from harness import tokens
from harness.config import jwt_config

API = "/v1/models"
NEW_PUBLIC = "/v1/status"  # public only after the valid update
LISTENER_TYPE = "type.googleapis.com/envoy.config.listener.v3.Listener"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FileLds:
    """Moves the bootstrap's listener into a file-based LDS; `push` swaps it."""

    def __init__(self, directory: Path, port: int):
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "lds.json"
        self.port = port
        self.listener: dict | None = None
        self.serial = 0

    def transform(self, bootstrap: dict) -> dict:
        (listener,) = bootstrap["static_resources"].pop("listeners")
        listener["address"]["socket_address"]["port_value"] = self.port
        self.listener = listener
        self._write(listener)
        bootstrap["node"] = {"id": "tollgate-rollout", "cluster": "tollgate-rollout"}
        bootstrap["dynamic_resources"] = {"lds_config": {
            "path_config_source": {"path": str(self.path)}, "resource_api_version": "V3"}}
        return bootstrap

    def _write(self, listener: dict) -> None:
        """Writes a temporary file next to the watched one, then renames it
        over it (atomic, as `mv`): Envoy never reads half a file."""
        self.serial += 1
        tmp = self.dir / f".lds.{self.serial}.json"
        tmp.write_text(json.dumps({"resources": [{"@type": LISTENER_TYPE, **listener}]}, indent=1))
        os.replace(tmp, self.path)

    def push(self, plugin_config: dict) -> None:
        """The same listener with another tollgate configuration."""
        listener = json.loads(json.dumps(self.listener))
        hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
        (wasm,) = [f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.wasm"]
        wasm["typed_config"]["config"]["configuration"]["value"] = json.dumps(plugin_config)
        self._write(listener)


class Load:
    """Authenticated requests on new connections until stopped; every answer
    must be 200 (bounded: at most `limit` requests or `seconds`)."""

    def __init__(self, url: str, token: str, limit: int = 5000, seconds: float = 30.0):
        self.url, self.token, self.limit, self.seconds = url, token, limit, seconds
        self.statuses: dict[int | str, int] = {}
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        host, port = self.url.rsplit("/", 1)[1].split(":")
        deadline = time.monotonic() + self.seconds
        n = 0
        while not self.stop_event.is_set() and n < self.limit and time.monotonic() < deadline:
            n += 1
            try:
                conn = http.client.HTTPConnection(host, int(port), timeout=10)
                conn.request("GET", API, headers={"Authorization": f"Bearer {self.token}"})
                resp = conn.getresponse()
                resp.read()
                key: int | str = resp.status
                conn.close()
            except OSError as e:
                key = type(e).__name__
            self.statuses[key] = self.statuses.get(key, 0) + 1

    def __enter__(self) -> "Load":
        self.thread.start()
        time.sleep(0.3)  # some requests before the change
        return self

    def __exit__(self, *exc) -> None:
        time.sleep(0.3)  # and some after
        self.stop_event.set()
        self.thread.join(15)

    @property
    def total(self) -> int:
        return sum(self.statuses.values())


def stats(gw) -> dict:
    return gw.stats()


def prom(gw, name: str) -> float:
    with urllib.request.urlopen(gw.admin_url + "/stats/prometheus", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{}"):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def wait_for(predicate, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = predicate()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def key(idp):
    k = tokens.rsa_key("rollout")
    idp.set_keys(k)
    return k


def base_config(idp_port: int) -> dict:
    return jwt_config(idp_port, public_paths=["/v1/health"])


def start(envoy, idp, tmp_path, config, **kw):
    lds = FileLds(tmp_path / "lds", free_port())
    gw = envoy(config, transform=lds.transform, wait_listener=False,
               extra_args=("--drain-strategy", "immediate", "--drain-time-s", "1"), **kw)
    return gw, lds


def test_valid_update_under_load_loses_no_request(envoy, idp, key, tmp_path):
    gw, lds = start(envoy, idp, tmp_path, base_config(idp.port))
    assert gw.port == lds.port
    token = key.sign(tokens.claims(sub=f"u-{uuid.uuid4().hex[:8]}"))
    assert gw.get(API, token=token).status == 200
    assert gw.get(NEW_PUBLIC).status == 401
    loads_before = prom(gw, "tollgate_config_loads_total")

    # A kept-alive connection opened under the old configuration.
    kept = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
    kept.request("GET", NEW_PUBLIC)
    first = kept.getresponse()
    first.read()
    assert first.status == 401

    with Load(gw.url, token) as load:
        before = stats(gw).get("listener_manager.lds.update_success", 0)
        lds.push(base_config(idp.port) | {"public_paths": ["/v1/health", NEW_PUBLIC]})
        wait_for(lambda: stats(gw).get("listener_manager.lds.update_success", 0) > before,
                 what="the LDS update")
        # New connections: the new configuration, at once.
        wait_for(lambda: gw.get(NEW_PUBLIC).status == 200, timeout=5,
                 what="the new configuration on a new connection")
    assert load.statuses == {200: load.total}, load.statuses
    assert load.total >= 10, load.statuses
    s = stats(gw)
    assert s.get("listener_manager.lds.update_rejected", 0) == 0
    assert s.get("listener_manager.listener_in_place_updated", 0) >= 1
    assert prom(gw, "tollgate_config_loads_total") > loads_before
    assert prom(gw, "tollgate_config_failures_total") == 0

    # The kept-alive connection belongs to the old filter chain: its next
    # request is still decided by the old configuration, and Envoy, draining
    # that chain, closes the connection with it.
    kept.request("GET", NEW_PUBLIC)
    again = kept.getresponse()
    again.read()
    assert again.status == 401
    assert (again.getheader("connection") or "").lower() == "close"
    kept.close()
    assert gw.get(NEW_PUBLIC).status == 200


def test_rejected_update_keeps_the_old_configuration(envoy, idp, key, tmp_path):
    gw, lds = start(envoy, idp, tmp_path, base_config(idp.port))
    token = key.sign(tokens.claims(sub=f"u-{uuid.uuid4().hex[:8]}"))
    assert gw.get(API, token=token).status == 200
    assert prom(gw, "tollgate_config_failures_total") == 0
    bad = base_config(idp.port) | {
        "public_paths": ["/v1/health", NEW_PUBLIC],
        "quota": {"authenticated_max_requests": 10, "period": "fortnight"},
    }
    with Load(gw.url, token) as load:
        lds.push(bad)
        wait_for(lambda: stats(gw).get("listener_manager.lds.update_rejected", 0) >= 1,
                 what="Envoy to reject the LDS update")
    assert load.statuses == {200: load.total}, load.statuses
    assert load.total >= 10, load.statuses
    # The old configuration still serves, on new connections too.
    assert gw.get(NEW_PUBLIC).status == 401
    assert gw.get(API, token=token).status == 200
    s = stats(gw)
    assert s.get("listener_manager.lds.update_success", 0) == 1  # the initial load only
    assert s.get("listener_manager.total_listeners_active", 0) == 1
    assert prom(gw, "tollgate_config_failures_total") >= 1
    wait_for(lambda: any("tollgate refused its configuration" in line
                         and "configuration key `quota.period`" in line
                         for line in gw.log_text().splitlines()),
             what="the log line naming the key")
    # A later valid update is accepted again.
    lds.push(base_config(idp.port) | {"public_paths": ["/v1/health", NEW_PUBLIC]})
    wait_for(lambda: gw.get(NEW_PUBLIC).status == 200, what="the next valid update")


def test_first_configuration_rejected_means_no_listener_but_ready(envoy, idp, key, tmp_path):
    """What the README's readiness advice is for: Envoy does not exit, /ready
    answers 200, and nothing listens. A readiness check through the listener
    (a public path) notices; /ready alone does not."""
    bad = base_config(idp.port) | {"quota": {"authenticated_max_requests": 10, "period": "fortnight"}}
    gw, lds = start(envoy, idp, tmp_path, bad)
    assert gw.alive
    with urllib.request.urlopen(gw.admin_url + "/ready", timeout=5) as r:
        assert r.status == 200 and r.read().decode().strip() == "LIVE"
    assert gw.port is None  # no listener at all
    s = stats(gw)
    assert s.get("listener_manager.lds.update_rejected", 0) >= 1
    assert s.get("listener_manager.total_listeners_active", 0) == 0
    assert "configuration key `quota.period`" in gw.log_text()
    # The recommended readiness check: a public path through the listener.
    with pytest.raises(OSError):
        with socket.create_connection(("127.0.0.1", lds.port), timeout=2):
            pass
    # Fixing the configuration brings the listener up.
    lds.push(base_config(idp.port))
    wait_for(lambda: gw.listener_port() == lds.port, what="the listener after a valid push")
    gw.port = lds.port
    assert gw.get("/v1/health").status == 200
