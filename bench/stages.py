"""Where the decision service's time goes, function by function, as it runs behind Envoy.

    python -m bench.stages [--requests 400] [--stream] [--function MODULE:QUALNAME ...]

The same chat completion is sent sequentially, round-robin in a new order each turn, to the
provider directly, to plain Envoy and to tollgate's Envoy host on the governed profile
(SQLite state), as in bench.breakdown: between two of its requests the decision service
sleeps while the others run, and meets each request cold, as a sidecar beside an app that
works between its calls does. The decision service runs under bench.timed, which times the
functions a request runs through (its `FUNCTIONS`: a request decided from a precedent, its
answer, its meter post and its settlement), and only those: `sys.monitoring` (PEP 669)
calls back on their start and return, so the rest runs as ever.

Prints each function's calls per request and the p50 of its own time per call, inclusive
(a function's figure holds those it calls: `Gateway.decide_like` holds `authenticate`),
after a warm-up. Each timed call adds about a microsecond of the callbacks themselves to
the functions that hold it. `--function module:Class.name` (again for more) adds one to
the list, as bench.cold's does: a step between two listed ones, or the host's own code
around them (`extproc.decider:Decider.data_received`, whose time holds the `write(2)` of
the answer, during which Envoy, woken, runs on the same core). py-spy samples wall-clock
time, which puts a third of this process's samples on that `write(2)` (the process is
descheduled there, not busy); the figures here are the time each function takes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time

from bench.breakdown import sequential, tollgate_envoy
from bench.latency import BODY, PROVIDER_KEY, _Url, bench_setup, own_state
from bench.quick import STREAM_BODY, governed, plain_envoy
from bench.timed import resolve
from tests.conftest import make_config
from tests.harness import free_port


def table(calls: dict[str, list[float]], requests: int, skip: int) -> list[str]:
    """Each function's calls per request and its p50 per call (µs), the first `skip` calls
    of each left out (the warm-up)."""
    lines = [f"{'function':<36} {'calls/request':>13} {'p50 µs':>8}", "-" * 59]
    for name, times in calls.items():
        kept = times[skip:]
        if not kept:
            lines.append(f"{name:<36} {0:>13.2f} {'-':>8}")
            continue
        lines.append(f"{name:<36} {len(kept) / requests:>13.2f} "
                     f"{statistics.median(kept) * 1e6:>8.1f}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--stream", action="store_true",
                        help="each request streamed, as the OpenAI SDK sends it by default")
    parser.add_argument("--function", action="append", default=[], metavar="NAME",
                        help="module:Class.name to time as well")
    args = parser.parse_args()
    for name in args.function:  # a name that resolves to nothing fails here, not in the service
        try:
            resolve(name)
        except (ImportError, AttributeError, ValueError) as e:
            parser.error(f"--function {name}: {e}")
    warm = 20
    workdir, fake_port, fake = bench_setup("tollgate-bench-stages-")
    procs: list[subprocess.Popen[bytes]] = [fake]
    direct = f"http://127.0.0.1:{fake_port}"
    timings = workdir / "timings.json"
    try:
        plain, plain_url = plain_envoy(workdir, fake_port)
        procs.append(plain)
        config = make_config(workdir, _Url(direct), _Url(f"http://127.0.0.1:{free_port()}"))
        secret = governed(config)
        url, _, _ = tollgate_envoy(own_state(config, "stages"), workdir, procs,
                                   service=[sys.executable, "-m", "bench.timed",
                                            str(timings),
                                            *(f"--function={n}" for n in args.function)])
        provider = {"authorization": f"Bearer {PROVIDER_KEY}", "content-type":
                    "application/json"}
        key = {"authorization": f"Bearer {secret}", "content-type": "application/json"}
        paths = {"direct": (direct, provider), "plain envoy": (plain_url, provider),
                 "tollgate envoy": (url, key)}
        body = STREAM_BODY if args.stream else BODY
        asyncio.run(sequential(paths, args.requests, warm, body))
        time.sleep(0.5)  # the last settlements
    finally:
        for proc in reversed(procs):  # the decision service writes its timings as it stops
            proc.terminate()
            proc.wait(10)
    calls = json.loads(timings.read_text())
    print(f"\n{args.requests} sequential requests per path, round-robin in a new order "
          f"each turn (direct, plain Envoy, tollgate's Envoy host); "
          f"{'streamed' if args.stream else 'JSON'}; the decision service's functions, "
          "inclusive, per call\n")
    print("\n".join(table(calls, args.requests, warm)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
