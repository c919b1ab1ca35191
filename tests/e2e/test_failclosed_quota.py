"""Issue 16, item 8: anonymous quota counters, memory and IPv6.

Anonymous clients are counted per address prefix (IPv4 /32 and IPv6 /64 by
default) in a fixed table of `anonymous_slots` shared-data entries, so neither
rotating addresses inside a /64 nor a flood of distinct addresses gets extra
requests or grows Envoy's memory without bound.

Client addresses come from `x-forwarded-for`: these Envoys trust one hop
(`xff_num_trusted_hops: 1` with `use_remote_address: true`), so the last XFF
address is the client's `source.address`. Allowed requests are answered by
Envoy itself (a `direct_response` route) so that the flood does not wait on
the Python upstream."""

from __future__ import annotations

import http.client
import shutil
import signal
import subprocess
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PATH = "/v1/anything"
MIB = 1024 * 1024

# README (`quota`, Memory): bytes per anonymous slot in Envoy 1.40 (measured
# ~160: the map node, the key and the value, plus the bucket array), and the
# default table size.
BYTES_PER_SLOT = 176
DEFAULT_SLOTS = 65_536
# Envoy's own allocations during a flood that are not shared data (connection
# and stats bookkeeping: ~0.6 MiB measured).
ENVOY_SLACK = 1 * MIB

DIRECT = {"name": "local", "virtual_hosts": [{
    "name": "all", "domains": ["*"],
    "routes": [{"match": {"prefix": "/"},
                "direct_response": {"status": 200, "body": {"inline_string": "ok"}}}],
}]}
TRUST_XFF = {"xff_num_trusted_hops": 1, "route_config": DIRECT}


def start(envoy, quota: dict):
    """An Envoy without `auth` (every request anonymous) trusting one XFF hop."""
    return envoy({"quota": quota}, clusters={}, hcm_extra=TRUST_XFF)


def send(gw, client: str):
    """One request as `client` (an address); the answer's status and
    RateLimit-Remaining (or None)."""
    r = gw.get(PATH, headers={"x-forwarded-for": client})
    remaining = r.headers.get("ratelimit-remaining")
    return r.status, int(remaining) if remaining is not None else None


def allocated(gw) -> int:
    """Envoy's `server.memory_allocated` (tcmalloc bytes in use)."""
    with urllib.request.urlopen(f"{gw.admin_url}/stats?filter=^server.memory_allocated$",
                                timeout=5) as r:
        return int(r.read().decode().split(":")[1])


def completed(gw) -> int:
    with urllib.request.urlopen(
            f"{gw.admin_url}/stats?filter=^http.ingress.downstream_rq_completed$", timeout=5) as r:
        return int(r.read().decode().split(":")[1])


def status_counts(gw) -> Counter:
    """Requests answered so far, by status class (`2xx`, `4xx`, `5xx`)."""
    out: Counter = Counter()
    for name, value in gw.stats().items():
        for cls in ("2xx", "4xx", "5xx"):
            if name == f"http.ingress.downstream_rq_{cls}":
                out[cls] = value
    return out


# One request per distinct IPv6 /64: `2001:db8:<thread>:<n>::1`.
WRK_SCRIPT = """
local threads = {}
local counter = 0
function setup(thread)
  thread:set("tid", #threads + 1)
  table.insert(threads, thread)
end
function request()
  counter = counter + 1
  local xff = string.format("2001:db8:%x:%x::1", tid, counter)
  return wrk.format("GET", "/v1/anything", {["x-forwarded-for"] = xff})
end
"""


def flood(gw, n: int, workdir: Path) -> None:
    """At least `n` requests, each from its own IPv6 /64. With wrk (as `make
    bench` installs) when present, else Python threads over keep-alive
    connections (slower)."""
    wrk = shutil.which("wrk")
    if wrk:
        threads = 4
        assert n // threads < 0xFFFF
        script = workdir / "flood.lua"
        script.write_text(WRK_SCRIPT)
        target = completed(gw) + n
        proc = subprocess.Popen([wrk, f"-t{threads}", "-c16", "-d120s", "-s", str(script), gw.url],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            while completed(gw) < target:
                assert proc.poll() is None, proc.communicate()[0]
                time.sleep(0.1)
        finally:
            proc.send_signal(signal.SIGINT)
            proc.communicate(timeout=10)
        return

    def worker(t: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=15)
        for i in range(t, n, 8):
            conn.request("GET", PATH, headers={"x-forwarded-for": f"2001:db8:{i >> 16:x}:{i & 0xFFFF:x}::1"})
            conn.getresponse().read()
        conn.close()

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(worker, range(8)))


# -- IPv6 prefixes --------------------------------------------------------------------------------

def test_rotating_ipv6_addresses_in_one_64_share_one_anonymous_quota(envoy):
    """A client that changes its address inside its /64 for every request
    still has one budget (on main each address had its own)."""
    gw = start(envoy, {"anonymous_max_requests": 3})
    answers = [send(gw, f"2001:db8:77:1:{i:x}::{i + 1:x}") for i in range(8)]
    assert answers == [(200, 2), (200, 1), (200, 0)] + [(429, 0)] * 5, answers
    # Another /64 (even in the same /48) has its own budget.
    assert send(gw, "2001:db8:77:2::1") == (200, 2)
    # IPv4 clients: one budget per address by default.
    assert send(gw, "198.51.100.7") == (200, 2)
    assert send(gw, "198.51.100.8") == (200, 2)


def test_ipv4_mapped_addresses_count_as_ipv4(envoy):
    gw = start(envoy, {"anonymous_max_requests": 2})
    assert send(gw, "198.51.100.9") == (200, 1)
    assert send(gw, "::ffff:198.51.100.9") == (200, 0)
    assert send(gw, "::ffff:198.51.100.9")[0] == 429
    assert send(gw, "198.51.100.9")[0] == 429


def test_configured_prefixes(envoy):
    """`anonymous_ipv4_prefix: 24`, `anonymous_ipv6_prefix: 48`."""
    gw = start(envoy, {"anonymous_max_requests": 2, "anonymous_ipv4_prefix": 24,
                       "anonymous_ipv6_prefix": 48})
    assert [send(gw, ip)[0] for ip in ("203.0.113.1", "203.0.113.200", "203.0.113.77")] == [200, 200, 429]
    assert send(gw, "203.0.114.1") == (200, 1)
    v6 = [send(gw, f"2001:db8:5:{i:x}::1")[0] for i in range(1, 4)]
    assert v6 == [200, 200, 429], v6
    assert send(gw, "2001:db8:6::1") == (200, 1)


def test_bad_prefix_or_table_size_refused(expect_config_rejected):
    for key, value, reason in [
        ("anonymous_ipv4_prefix", 33, "must be at most 32"),
        ("anonymous_ipv6_prefix", 129, "must be at most 128"),
        ("anonymous_slots", 0, "must be at least 1"),
    ]:
        log = expect_config_rejected({"quota": {key: value}}, clusters={})
        assert f"configuration key `quota.{key}`: {reason}" in log, log[-2000:]


# -- memory ---------------------------------------------------------------------------------------

def test_distinct_clients_do_not_grow_memory_past_the_table(envoy, tmp_path):
    """200,000 anonymous clients, each its own /64, one request each: Envoy's
    memory grows by no more than the table's stated bound (the default
    65,536 slots × 176 bytes, plus Envoy's own slack), where one entry per
    client (main) grows it by ~21 MiB. Below the table's capacity counts are
    exact for every client."""
    limit = 1_000_000
    gw = start(envoy, {"anonymous_max_requests": limit})

    # Below capacity (300 clients in 65,536 slots): every client's count is
    # exact, request after request.
    clients = [f"2001:db8:ffff:{i:x}::1" for i in range(150)] + [f"192.0.2.{i}" for i in range(150)]
    for round_ in range(1, 3):
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda c: send(gw, c), clients))
        assert answers == [(200, limit - round_)] * len(clients), Counter(answers)

    time.sleep(0.5)
    before = allocated(gw)
    before_status = status_counts(gw)
    flood(gw, 200_000, tmp_path)
    time.sleep(0.5)
    after = allocated(gw)
    statuses = status_counts(gw) - before_status
    growth = after - before
    bound = (DEFAULT_SLOTS + 1) * BYTES_PER_SLOT + ENVOY_SLACK
    print(f"\nserver.memory_allocated: {before / MIB:.1f} MiB -> {after / MIB:.1f} MiB "
          f"({growth / MIB:+.2f} MiB; bound {bound / MIB:.2f} MiB); answers {dict(statuses)}")
    assert statuses["2xx"] >= 200_000 and statuses["5xx"] == 0 and statuses["4xx"] == 0, statuses
    assert growth <= bound, f"grew {growth / MIB:.2f} MiB, bound {bound / MIB:.2f} MiB"
    # Still counting, never under: a client from before the flood has at
    # least its own two requests on its counter.
    status, remaining = send(gw, clients[0])
    assert status == 200 and remaining <= limit - 3, (status, remaining)
