"""The Envoy host's slowest requests, one at a time, and whether they keep a beat.

    python -m bench.tail [--requests 1500] [--rounds 2] [--against REV | --against baseline]

The provider directly, plain Envoy and tollgate's Envoy host (the governed profile on
SQLite) take turns, a JSON chat completion each per turn, sequentially, in a new order each
turn (bench.breakdown's `sequential`). Prints each path's p50, p90, p99 and slowest, what
tollgate adds over the direct call and that over plain Envoy's (`+p50/plain's`: the ratio
the sidecar's p50 goal is read by), the CPU its processes (Envoy and the decision service)
spent per request, and that CPU over plain Envoy's, in all and for each process (a ratio
the machine's slower and faster hours move less than the milliseconds: the same code read
1.0 and 1.9 ms an hour apart), and how in step the slowest 2% of tollgate's requests are
with the access log's batches, which Envoy sends every `RESPONSE_END_FLUSH` seconds and the
decision service settles: the length of the mean of their phases in that period, each a
unit vector (1: all at one moment of the period; about 0.9/sqrt(n) for n at random moments,
0.16 for 30).

What a gateway does between requests (settling a batch of ends) takes a core the machine's
other processes want, and makes every path on it slower at its tail, the direct call's
too. So `--against REV` measures REV's code in rounds of its own, alternating with this
checkout's, not beside it as bench.quick does (where two gateways share each other's
tails), and prints the medians of both codes' rounds; `--against baseline`: the commit
bench/baseline.json names (`make bench` measures it so).
"""

from __future__ import annotations

import argparse
import asyncio
import cmath
import contextlib
import json
import math
import statistics
import subprocess
from pathlib import Path

from bench.breakdown import sequential
from bench.latency import (
    PROVIDER_KEY,
    _Url,
    bench_setup,
    interpreter,
    own_state,
    percentile,
)
from bench.quick import (
    BASELINE,
    checkout,
    cpu_seconds,
    governed,
    plain_envoy,
    revision_of,
    with_tables_of,
)
from extproc.envoy_config import RESPONSE_END_FLUSH
from tests.conftest import make_config
from tests.harness import GatewayProcess, free_port

WARM_UP = 30
SLOWEST = 0.02  # the share of tollgate's requests whose phases are read
SETTLED = 0.5  # seconds within which the last requests' ends are settled
# The sidecar's p50 goal: +1.0 ms, set on a machine where plain Envoy added +0.30 ms; read
# here as the ratio of the two, which a faster or slower hour of this machine moves less.
GOAL_P50, GOAL_PLAIN = 1.0, 0.30
GOAL_RATIO = GOAL_P50 / GOAL_PLAIN


def in_step(starts: list[float], period: float = RESPONSE_END_FLUSH) -> float:
    """How close to one moment of `period` the `starts` (seconds) fall: the length of the
    mean of their phases as unit vectors (1: one moment; near 0: spread evenly)."""
    if not starts:
        return 0.0
    return abs(sum(cmath.exp(2j * math.pi * (t % period) / period) for t in starts)
               / len(starts))


def envoy_of(pid: int) -> int | None:
    """The Envoy `tollgate serve envoy` (`pid`) runs, its child."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            if Path(f"/proc/{child}/comm").read_text().strip() == "envoy":
                return int(child)
    return None


async def turns(paths: dict[str, tuple[str, dict[str, str]]], n: int, pid: int,
                plain: int) -> tuple[dict[str, list[float]], list[tuple[float, float]],
                                     float, float, float]:
    """`n` turns of one request per path (their base URLs), after a warm-up: each path's
    times (ms), tollgate's (time, start in seconds from the first turn), and the CPU
    seconds its processes (`pid` and its children), its Envoy alone and plain Envoy
    (`plain`) spent on them."""
    await sequential(paths, 0, WARM_UP)
    envoy = envoy_of(pid)
    envoy_cpu = cpu_seconds(envoy) if envoy is not None else 0.0
    cpu, plain_cpu, starts = cpu_seconds(pid), cpu_seconds(plain), {}
    times = await sequential(paths, n, 0, starts=starts)
    await asyncio.sleep(SETTLED)  # (the last requests' ends are settled)
    return (times, list(zip(times["tollgate envoy"], starts["tollgate envoy"], strict=True)),
            cpu_seconds(pid) - cpu,
            cpu_seconds(envoy) - envoy_cpu if envoy is not None else float("nan"),
            cpu_seconds(plain) - plain_cpu)


def one_round(n: int, code: Path | None) -> dict[str, float]:
    """A round on its own machine state: the provider, plain Envoy and a gateway of this
    checkout's code (or `code`'s), stopped at its end. Prints its table; returns its
    figures."""
    workdir, port, fake = bench_setup("tollgate-bench-tail-")
    procs: list[subprocess.Popen[bytes]] = [fake]
    gateway = None
    try:
        envoy, envoy_url = plain_envoy(workdir, port)
        procs.append(envoy)
        direct = f"http://127.0.0.1:{port}"
        config = make_config(workdir, _Url(direct), _Url(f"http://127.0.0.1:{free_port()}"))
        secret = governed(config)
        if code is not None:
            with_tables_of(config, code)
        gateway = GatewayProcess("envoy", own_state(config, "tail"), workdir,
                                 env={"PYTHONPATH": str(code)} if code else None).start()
        provider = {"authorization": f"Bearer {PROVIDER_KEY}"}
        paths = {"direct": (direct, provider), "plain envoy": (envoy_url, provider),
                 "tollgate envoy": (gateway.url, {"authorization": f"Bearer {secret}"})}
        assert gateway.proc is not None
        times, started, cpu, envoy_cpu, plain_cpu = asyncio.run(
            turns(paths, n, gateway.proc.pid, envoy.pid))
    finally:
        if gateway is not None:
            gateway.stop()
        for proc in procs:
            proc.terminate()
            proc.wait(10)
    print(f"{'path':<16}{'p50':>8}{'p90':>8}{'p99':>8}{'slowest':>9}{'+p50':>8}{'+p99':>8}")
    figures = {}
    for name, values in times.items():
        p50, p90, p99 = (percentile(values, q) for q in (0.5, 0.9, 0.99))
        added = (f"{p50 - percentile(times['direct'], 0.5):+8.3f}"
                 f"{p99 - percentile(times['direct'], 0.99):+8.3f}")
        print(f"{name:<16}{p50:8.3f}{p90:8.3f}{p99:8.3f}{max(values):9.3f}{added}")
        figures[f"{name} p50"], figures[f"{name} p99"] = p50, p99
    figures["cpu"] = cpu * 1000 / n
    figures["cpu / plain"] = cpu / plain_cpu
    figures["envoy / plain"] = envoy_cpu / plain_cpu
    figures["ext_proc / plain"] = (cpu - envoy_cpu) / plain_cpu
    print(f"tollgate's processes: {figures['cpu']:.3f} ms of CPU per request, "
          f"{figures['cpu / plain']:.2f} times plain Envoy's ({plain_cpu * 1000 / n:.3f}): "
          f"its Envoy {figures['envoy / plain']:.2f}, ext_proc {figures['ext_proc / plain']:.2f}")
    slowest = sorted(started, reverse=True)[:max(1, round(SLOWEST * len(started)))]
    figures["in step"] = in_step([at for _, at in slowest])
    print(f"the slowest {len(slowest)} of tollgate's: in step with the access log's batches "
          f"(every {RESPONSE_END_FLUSH} s) {figures['in step']:.2f}\n")
    return figures


def over_plain(figures: dict[str, float]) -> float:
    """A round's added p50 over plain Envoy's: the figure the p50 goal is read by."""
    return ((figures["tollgate envoy p50"] - figures["direct p50"])
            / (figures["plain envoy p50"] - figures["direct p50"]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1500, help="turns per round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per code")
    parser.add_argument("--against", metavar="REV",
                        help="a commit whose code is measured in rounds of its own, "
                             "alternating with this checkout's (`baseline`: the one "
                             "bench/baseline.json names)")
    args = parser.parse_args()
    wanted = args.against
    if wanted == "baseline":
        wanted = json.loads(BASELINE.read_text())["revision"]
    revision = revision_of(wanted) if wanted else None
    if wanted and revision is None:
        parser.error(f"{wanted} is not in this clone's history")
    codes = ["now", *([revision[:7]] if revision else [])]
    rounds: dict[str, list[dict[str, float]]] = {c: [] for c in codes}
    with checkout(revision) if revision else contextlib.nullcontext() as other:
        for i in range(args.rounds):
            # Each code first in every other round: the machine's drift weighs on both.
            for code in (codes if i % 2 == 0 else codes[::-1]):
                print(f"round {i + 1}, {'this checkout' if code == 'now' else code}")
                rounds[code].append(one_round(args.requests, other if code != "now" else None))
    print(f"medians of {args.rounds} rounds (ms); the gateway on {interpreter()}")
    names = ["direct p99", "tollgate envoy p50", "tollgate envoy p99"]
    print(f"{'code':<10}" + "".join(f"{n:>19}" for n in [
        *names, "+p50", "+p99", "+p50/plain's", "CPU/req", "CPU/plain's", "in step"]))
    for code, done in rounds.items():
        med = {k: statistics.median(r[k] for r in done) for k in done[0]}
        added = [statistics.median(r[f"tollgate envoy {q}"] - r[f"direct {q}"] for r in done)
                 for q in ("p50", "p99")]
        print(f"{code:<10}" + "".join(f"{med[n]:19.3f}" for n in names)
              + "".join(f"{a:+19.3f}" for a in added)
              + f"{statistics.median(map(over_plain, done)):19.2f}"
              + f"{med['cpu']:19.3f}{med['cpu / plain']:19.2f}{med['in step']:19.2f}")
    print(f"(+p50/plain's: tollgate's added p50 over plain Envoy's, each round's; the goal, "
          f"+{GOAL_P50} ms where plain Envoy added +{GOAL_PLAIN}, is {GOAL_RATIO:.2f})")
    for code, done in rounds.items():
        split = {k: statistics.median(r[k] for r in done)
                 for k in ("envoy / plain", "ext_proc / plain")}
        print(f"{code}: CPU over plain Envoy's, its Envoy {split['envoy / plain']:.2f} and "
              f"ext_proc {split['ext_proc / plain']:.2f} (medians)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
