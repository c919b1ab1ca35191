"""A/B: Envoy CPU per request of several filter builds, interleaved.

Every variant gets its own Envoy (one worker, all pinned to the Envoy core);
they run at once and get load in turn, 1 s wrk slices for CYCLES cycles (the
order reversed each cycle), after a 2 s warm-up each. Prints, per variant, the
CPU µs/request (first quartile, median, min over the slices), the median
req/s, and the median over cycles of (first variant's CPU / this one's): a
ratio above 1 means cheaper than the first variant.

    build/venv/bin/python bench/ab.py CYCLES VARIANT...

VARIANT is name=WASM[:flag...]: WASM a tollgate build (copied, so the file may
change afterwards) or, with the `noop` flag, any do-nothing-style filter.
Flags: cold (a new RS256 token per request; with es256 or eddsa, a new token
of that algorithm), quota (tollgate with a quota),
quota-no-headers (the quota without RateLimit-* headers), rls (the quota
counted in Redis through the rate-limit service, as `make bench`'s h-rls;
Redis and tests/rls-server run on the load core; with `batch` or `batchN`,
quota.backend.max_batch RLS_MAX_BATCH or N, as h-rlsb), noop (WASM is loaded
as the bench's do-nothing filter; `x:noop` uses bench/noop's own build; with
`forward`, `count`, `clock` and/or `ratelimit` it also does the work of
`make bench`'s b2 / b3 / b4 / b5),
native (Envoy's jwt_authn, no cache; WASM ignored).

    build/venv/bin/python bench/ab.py 10 noop=x:noop \\
        old=/tmp/old.wasm new=target/wasm32-wasip1/release/tollgate.wasm

Needs what `make bench` needs (and a `make bench` run before, for the noop
build and the minted tokens).
"""

from __future__ import annotations

import shutil
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
import run as b  # noqa: E402 - bench/run.py: a script's own folder is first on sys.path

ENVOY_CPU, LOAD_CPU, CONNECTIONS = "0", "1", 16


def main() -> int:
    if len(sys.argv) < 3 or not sys.argv[1].isdigit():
        print(__doc__)
        return 2
    cycles = int(sys.argv[1])
    b.ensure_tools()
    keys = b.load_keys()
    jwks = b.tokens.jwks(*keys.values())
    warm = b.warm_token(keys["RS256"])
    cold_tokens: dict[str, Path] = {}
    work = b.WORK / "ab"
    work.mkdir(parents=True, exist_ok=True)
    idp = b.IdP(keys=list(keys.values()), issuer=b.ISSUER, audience=b.AUDIENCE).start()
    variants: list[tuple[str, b.BenchEnvoy, str | None]] = []
    redis = service = None
    try:
        if any("rls" in arg.split(":")[1:] for arg in sys.argv[2:]):
            why = b.prepare_rls()
            if why:
                raise SystemExit(f"rls: {why}")
            redis = b.pinned(b.rls.Redis, LOAD_CPU)().start()
            service = b.pinned(b.rls.RlsServer, LOAD_CPU)(redis.url, domain=b.RLS_DOMAIN).start()
        for arg in sys.argv[2:]:
            name, _, rest = arg.partition("=")
            wasm, *flags = rest.split(":")
            if "native" in flags:
                doc = b.native_bootstrap(jwks, False)
            elif "noop" in flags:
                src = b.NOOP_WASM if wasm == "x" else Path(wasm)
                dst = work / f"{name}.wasm"
                shutil.copy(src, dst)
                extra = (b.CLOCK if "clock" in flags else "") + \
                    (b.FORWARDED_HEADERS if "forward" in flags else "") + \
                    (b.COUNTER if "count" in flags else "") + \
                    (b.RATELIMIT_HEADERS if "ratelimit" in flags else "")
                doc = b.bootstrap([b.wasm_filter("noop", dst, extra or None)])
            else:
                dst = work / f"{name}.wasm"
                shutil.copy(wasm, dst)
                rls = "rls" in flags
                config = b.tollgate_config(idp.port, quota="quota" in flags or rls
                                           or "quota-no-headers" in flags, rls_backend=rls)
                if "quota-no-headers" in flags:
                    config["quota"]["headers"] = False
                batch = next((f for f in flags if f.startswith("batch")), None)
                if rls and batch:
                    config["quota"]["backend"]["max_batch"] = int(batch[5:] or b.RLS_MAX_BATCH)
                clusters = {"idp": idp.port, **({"ratelimit": service.port} if rls else {})}
                doc = b.bootstrap([b.wasm_filter("tollgate", dst, config,
                                                 failure_policy="FAIL_RELOAD")],
                                  clusters=clusters, http2=("ratelimit",) if rls else ())
            envoy = b.BenchEnvoy("ab-" + name, doc, ENVOY_CPU).start()
            alg = next((a for a in b.ALGS if a.lower() in flags), "RS256")
            if "cold" in flags and alg not in cold_tokens:
                cold_tokens[alg] = b.token_file(keys[alg], 100_000)
            variants.append((name, envoy, alg if "cold" in flags else None))
        offsets = {name: 0 for name, _, _ in variants}

        def one(name: str, envoy: b.BenchEnvoy, cold: str | None, seconds: int,
                warm_up: bool = False) -> tuple[float, float]:
            if cold:
                load = dict(tokens=cold_tokens[cold], max_tokens=100_000, offset=offsets[name])
            else:
                load = dict(header=f"Authorization: Bearer {warm}")
            r, _, _ = b.measured_wrk(envoy, seconds=seconds, cpu=LOAD_CPU,
                                     connections=CONNECTIONS, **load)
            offsets[name] += r["requests"] + CONNECTIONS
            # A fresh Envoy's first calls to the rate-limit service may time out (503).
            if r["status_errors"] and not warm_up:
                raise SystemExit(f"{name}: {r['status_errors']} answers other than 200")
            return r["cpu_us_per_req"] or 0.0, r["rps"]

        for v in variants:
            one(*v, seconds=2, warm_up=True)
        results: dict[str, list[tuple[float, float]]] = {name: [] for name, _, _ in variants}
        for cycle in range(cycles):
            for v in (variants if cycle % 2 == 0 else variants[::-1]):
                results[v[0]].append(one(*v, seconds=1))
        first = variants[0][0]
        for name, rs in results.items():
            cpu = [c for c, _ in rs]
            q25 = statistics.quantiles(cpu, n=4)[0] if len(cpu) >= 4 else min(cpu)
            ratio = statistics.median(results[first][i][0] / rs[i][0] for i in range(cycles))
            print(f"{name:20} CPU µs/req q25 {q25:6.1f} median {statistics.median(cpu):6.1f} "
                  f"min {min(cpu):6.1f}   req/s median {statistics.median(r for _, r in rs):8,.0f}   "
                  f"{first}/{name} by CPU {ratio:.3f}")
    finally:
        for _, envoy, _ in variants:
            envoy.stop()
        for proc in (service, redis):
            if proc:
                proc.close()
        idp.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
