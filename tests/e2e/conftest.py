"""Fixtures for the end-to-end tests: the echo upstream, IdPs and Envoys.

Every Envoy a test starts is stopped at teardown, and a VM trap in its log
(a Rust panic, a V8 runtime error) fails the test that was running."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from harness import tokens
from harness.envoy import Envoy, EnvoyStartError
from harness.idp import IdP
from harness.openai_mock import OpenAIMock
from harness.upstream import EchoServer

_live: list[Envoy] = []  # Envoys running now, for the per-test trap check


def _new_traps(e: Envoy) -> list[str]:
    """Trap lines logged since the last check of this Envoy."""
    text = e.log_text()
    start = getattr(e, "_trap_checked", 0)
    e._trap_checked = len(text)
    return e.traps(text[start:])


class EnvoyFactory:
    """Starts Envoys in front of the echo upstream, with cluster `idp` pointing
    at this factory's IdP unless `clusters` says otherwise."""

    def __init__(self, upstream: EchoServer, idp: IdP, workdir: Path):
        self.upstream = upstream
        self.idp = idp
        self.workdir = workdir
        self.started: list[Envoy] = []

    def _make(self, plugin_config, clusters, concurrency, failure_policy, **kw) -> Envoy:
        clusters = {"idp": self.idp.port} if clusters is None else dict(clusters)
        return Envoy(plugin_config, upstream_port=self.upstream.port, clusters=clusters,
                     workdir=self.workdir, concurrency=concurrency,
                     failure_policy=failure_policy, **kw)

    def __call__(self, plugin_config: dict | str, clusters: dict[str, int] | None = None,
                 concurrency: int = 2, failure_policy: str | None = "FAIL_CLOSED", **kw) -> Envoy:
        """Starts an Envoy and waits until it is ready (raises EnvoyStartError)."""
        e = self._make(plugin_config, clusters, concurrency, failure_policy, **kw)
        self.started.append(e)
        _live.append(e)
        e.start()
        return e

    def expect_config_rejected(self, plugin_config: dict | str,
                               clusters: dict[str, int] | None = None, **kw) -> str:
        """Asserts that Envoy refuses this plugin configuration and returns its log.

        Observed on Envoy 1.40: when the plugin's on_configure fails, Envoy logs
        `Unable to create Wasm plugin tollgate` and exits with status 1 at startup
        (whatever the failure_policy), so nothing is ever served."""
        e = self._make(plugin_config, clusters, kw.pop("concurrency", 2),
                       kw.pop("failure_policy", "FAIL_CLOSED"), **kw)
        self.started.append(e)
        try:
            e.start()
        except EnvoyStartError:
            pass
        else:
            r = e.get("/v1/anything")
            e.stop()
            pytest.fail(f"Envoy started with a bad configuration and answered {r!r}\n{e.log_tail()}")
        log = e.log_text()
        assert e.proc.returncode not in (0, None), log
        assert "Unable to create Wasm plugin tollgate" in log, log
        traps = e.traps(log)
        assert not traps, "the VM trapped on a bad configuration:\n" + "\n".join(traps)
        return log

    def close(self) -> None:
        """Stops every Envoy; reports traps logged since the last check."""
        problems = []
        for e in self.started:
            e.stop()
            if e in _live:
                _live.remove(e)
            traps = _new_traps(e)
            if traps:
                problems.append(f"{e.workdir}:\n" + "\n".join(traps))
        if problems:
            pytest.fail("VM trap in Envoy log (during the test or at shutdown):\n" + "\n".join(problems), pytrace=False)


@pytest.fixture(scope="session")
def upstream():
    """The echo upstream (shared by every test; its log is cleared per test)."""
    with EchoServer() as server:
        yield server


@pytest.fixture(autouse=True)
def _per_test(upstream):
    """Clears the upstream log; fails the test if any live Envoy trapped during it."""
    upstream.reset_log()
    yield
    if _live:
        time.sleep(0.15)  # let Envoy flush its log (--file-flush-interval-msec 100)
    problems = []
    for e in list(_live):
        traps = _new_traps(e)
        if traps:
            problems.append(f"{e.workdir}:\n" + "\n".join(traps))
    if problems:
        pytest.fail("VM trap in Envoy log during this test:\n" + "\n".join(problems), pytrace=False)


@pytest.fixture
def idp():
    """A fresh IdP for this test (no keys until the test sets them)."""
    with IdP() as server:
        yield server


@pytest.fixture(scope="module")
def rsa() -> tokens.SigningKey:
    """The RS256 signing key most modules use (a module may define its own)."""
    return tokens.rsa_key("rs-good", "RS256")


@pytest.fixture(scope="module")
def ec() -> tokens.SigningKey:
    """The ES256 signing key most modules use."""
    return tokens.ec_key("ec-good", "ES256")


@pytest.fixture(scope="module")
def module_idp():
    """An IdP shared by the tests of a module."""
    with IdP() as server:
        yield server


@pytest.fixture
def envoy(upstream, idp, tmp_path_factory):
    """Factory: `envoy(plugin_config, clusters=None, concurrency=2,
    failure_policy="FAIL_CLOSED") -> Envoy`, stopped after the test."""
    factory = EnvoyFactory(upstream, idp, tmp_path_factory.mktemp("envoy"))
    yield factory
    factory.close()


@pytest.fixture(scope="module")
def module_envoy(upstream, module_idp, tmp_path_factory):
    """Like `envoy`, bound to `module_idp`; its Envoys live for the module."""
    factory = EnvoyFactory(upstream, module_idp, tmp_path_factory.mktemp("envoy"))
    yield factory
    factory.close()


@pytest.fixture
def expect_config_rejected(envoy):
    """`expect_config_rejected(plugin_config, clusters=None) -> log text`."""
    return envoy.expect_config_rejected


@pytest.fixture(scope="module")
def _openai_mock():
    with OpenAIMock() as m:
        yield m


@pytest.fixture
def mock(_openai_mock):
    """The OpenAI-compatible mock upstream, its script and calls reset; streams
    a test held are let go at teardown, so that nothing is left hanging."""
    _openai_mock.reset()
    yield _openai_mock
    for c in _openai_mock.calls():
        if c.script.hold is not None:
            c.script.hold.set()
