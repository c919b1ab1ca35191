"""Streaming answers through Envoy (issue 19's performance target): Envoy CPU
per streamed chat completion, tollgate counting tokens vs the do-nothing
filter.

Each configuration has its own Envoy (one worker, pinned to the Envoy core)
in front of the same upstream, tests/e2e/harness/openai_mock.py, answering
every `POST /v1/chat/completions` with an event stream of CHUNKS content
chunks plus the role, finish and usage chunks and `data: [DONE]` (one write
and one HTTP chunk each, so Envoy sees one body callback per event). wrk
POSTs the same request (`stream_options.include_usage`, 16 connections) to
each Envoy in turn, 1 s slices for CYCLES cycles after a warm-up, the order
reversed each cycle; the mock, wrk and this script run on the load core.

    build/venv/bin/python bench/stream.py [CYCLES] [CHUNKS]

- noop: the bench's do-nothing filter (bench/noop). It subscribes to body
  callbacks as every proxy-wasm filter does: Envoy calls into the VM for each
  chunk; the filter answers Continue.
- tokens: tollgate, JWT (one cached token) and `quota.tokens` on the path:
  a reservation before, each chunk read for its usage, the settlement after.

Prints, per configuration, Envoy CPU µs per answer (median over slices),
answers/s, the ratio tokens/noop (target ≤ 1.2) and the extra Envoy CPU per
chunk. Needs what `make bench` needs (a `make bench` run first builds the
noop filter and mints the keys).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
import run as b  # noqa: E402 - bench/run.py: a script's own folder is first on sys.path

from harness.envoy import listener_bootstrap, wasm_filter  # noqa: E402
from harness.idp import IdP  # noqa: E402
from harness.openai_mock import OpenAIMock, Script  # noqa: E402

ENVOY_CPU, LOAD_CPU, CONNECTIONS = "0", "1", 16
PATH = "/v1/chat/completions"

LUA = """
wrk.method = "POST"
wrk.body = '{"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": true, "stream_options": {"include_usage": true}}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %s"
function done(summary, latency, requests)
   io.write(string.format("STREAM_JSON {\\"requests\\": %%d, \\"errors\\": %%d, \\"non2xx\\": %%d}\\n",
      summary.requests, summary.errors.connect + summary.errors.read + summary.errors.write
      + summary.errors.timeout, summary.errors.status))
end
"""


def bootstrap(filters: list[dict], upstream_port: int, idp_port: int) -> dict:
    route = {"route": {"cluster": "upstream", "timeout": "30s"}}
    return listener_bootstrap(filters, clusters={"upstream": upstream_port, "idp": idp_port},
                              route=route)


def slice_once(envoy, lua: Path, seconds: int = 1) -> tuple[int, int]:
    """(answers, Envoy CPU ns) of one wrk slice."""
    s0 = envoy.counters()
    cpu0 = envoy.cpu_ns()
    out = subprocess.run(["taskset", "-c", LOAD_CPU, "wrk", "-t1", f"-c{CONNECTIONS}",
                          f"-d{seconds}s", "--timeout", "10s", "-s", str(lua), envoy.url + PATH],
                         capture_output=True, text=True, timeout=60).stdout
    cpu = envoy.cpu_ns() - cpu0
    s1 = envoy.counters()
    line = next((l for l in out.splitlines() if l.startswith("STREAM_JSON ")), None)
    if line is None:
        raise SystemExit(f"wrk gave no result:\n{out[-2000:]}")
    r = json.loads(line[len("STREAM_JSON "):])
    if r["errors"] or r["non2xx"]:
        raise SystemExit(f"{envoy.name}: wrk saw errors {r}")
    done = s1.get("http.ingress.downstream_rq_2xx", 0) - s0.get("http.ingress.downstream_rq_2xx", 0)
    return done, cpu


def main() -> int:
    cycles = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    chunks = int(sys.argv[2]) if len(sys.argv) > 2 else 200
    try:
        os.sched_setaffinity(0, {int(LOAD_CPU)})
    except OSError:
        pass
    b.ensure_tools()
    keys = b.load_keys()
    key = keys["RS256"]
    token = b.warm_token(key)
    idp = IdP(keys=list(keys.values()), issuer=b.ISSUER, audience=b.AUDIENCE).start()
    mock = OpenAIMock(script=Script(chunks=chunks, prompt_tokens=9, completion_tokens=chunks)).start()
    work = b.WORK / "stream"
    work.mkdir(parents=True, exist_ok=True)
    lua = work / "stream.lua"
    lua.write_text(LUA % token)
    config = b.tollgate_config(idp.port)
    config["quota"] = {"tokens": {"authenticated_max_tokens": 10 ** 15}}
    variants = {
        "noop": bootstrap([wasm_filter("noop", b.NOOP_WASM, None)], mock.port, idp.port),
        "tokens": bootstrap([wasm_filter("tollgate", b.TOLLGATE_WASM, config,
                                         failure_policy="FAIL_RELOAD")], mock.port, idp.port),
    }
    envoys = {}
    try:
        for name, doc in variants.items():
            envoys[name] = b.BenchEnvoy("stream-" + name, doc, ENVOY_CPU).start()
        for e in envoys.values():  # warm-up (the key set, connections)
            slice_once(e, lua, 2)
        per = {n: [] for n in envoys}
        rates = {n: [] for n in envoys}
        order = list(envoys)
        for c in range(cycles):
            for name in (order if c % 2 == 0 else order[::-1]):
                done, cpu = slice_once(envoys[name], lua)
                if done:
                    per[name].append(cpu / 1000 / done)
                    rates[name].append(done)
        charged = envoys["tokens"].counters().get("wasmcustom.tollgate_tokens_charged_total", 0)
        answers = envoys["tokens"].counters().get("http.ingress.downstream_rq_2xx", 0)
    finally:
        for e in envoys.values():
            e.stop()
        mock.stop()
        idp.stop()
    med = {n: statistics.median(v) for n, v in per.items()}
    ratios = [t / n for t, n in zip(per["tokens"], per["noop"])]
    events = chunks + 4
    print(f"streamed chat completions, {chunks} content chunks ({events} events) each, "
          f"{cycles} cycles of 1 s slices, wrk -c{CONNECTIONS}")
    for n in envoys:
        print(f"  {n:<7} Envoy CPU µs/answer median {med[n]:8.1f}   answers/s median "
              f"{statistics.median(rates[n]):6.0f}")
    ratio = statistics.median(ratios)
    print(f"  tokens/noop by Envoy CPU per answer: {ratio:.3f} (target <= 1.2: "
          f"{'met' if ratio <= 1.2 else 'NOT MET'})")
    print(f"  extra Envoy CPU per event: {(med['tokens'] - med['noop']) / events:.2f} µs")
    print(f"  tokens charged {charged:,} for {answers:,} whole answers of {chunks + 9} "
          f"(streams wrk cuts at the end of a slice are charged unreported_tokens, 1,000)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
