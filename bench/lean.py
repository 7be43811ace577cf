"""What each path adds to one request at a time, timed by a client that costs next to nothing.

    python -m bench.lean [--rounds 6] [--seconds 2] [--hosts envoy,mitmproxy]

`bench.quick`'s client is Python (httpx): on the 2-core box it spends about a millisecond of
CPU on each request, some of it while the proxy works, and a path of more processes pays more
for it. Here `wrk` (apt-get install wrk), on one connection, sends one request as soon as the
last one's answer came, as a quick service or an agent loop does: the same chat completion
through the provider directly, plain Envoy, mitmdump and each tollgate host on the governed
profile (SQLite state), as a JSON answer and streamed (timed to its last byte: wrk does not
time a first byte). Each path runs `--seconds` at a time, the paths in turn, `--rounds`
times; a figure is the median of its rounds' p50s (or p99s).

Prints each path's p50 and p99, what it adds over the direct call, and what each tollgate
host adds over its plain proxy. Nothing is compared with a baseline: `bench.quick` guards
against regressions.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
from pathlib import Path

from bench.latency import BODY, bench_setup
from bench.quick import STREAM_BODY, references, start_hosts, stop_all
from bench.scaling import post_script, ready_for_wrk
from tests.harness import GatewayProcess

KINDS = {"JSON answer": BODY, "stream (SSE, to its last byte)": STREAM_BODY}
PLAIN = {"envoy": "plain envoy", "mitmproxy": "mitmdump"}  # each host's plain proxy
_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def latency(out: str) -> tuple[float, float]:
    """The p50 and p99 (ms) of wrk's `--latency` distribution."""
    found = {}
    for q in ("50", "99"):
        m = re.search(rf"^\s*{q}%\s+([\d.]+)(us|ms|s)\s*$", out, re.MULTILINE)
        if m is None:
            raise ValueError(f"wrk printed no {q}% latency:\n{out}")
        found[q] = float(m.group(1)) * _UNITS[m.group(2)]
    return found["50"], found["99"]


def timed(url: str, script: Path, seconds: int) -> tuple[float, float]:
    """One path's p50 and p99 (ms) over `seconds`, one request at a time."""
    out = subprocess.run(["wrk", "-t", "1", "-c", "1", "-d", f"{seconds}s", "--latency",
                          "-s", str(script), url], capture_output=True, text=True,
                         check=True).stdout
    if "Non-2xx" in out or "Socket errors" in out:
        raise SystemExit(f"{url}: not every request was answered 200:\n{out}")
    return latency(out)


def figures(rounds: dict[str, list[tuple[float, float]]]) -> dict[str, tuple[float, float]]:
    """Each path's median p50 and median p99 over its rounds."""
    return {path: (statistics.median(p for p, _ in each), statistics.median(p for _, p in each))
            for path, each in rounds.items()}


def table(kind: str, measured: dict[str, tuple[float, float]]) -> list[str]:
    """One kind's rows: each path's p50, p99 and what it adds over the direct call; then
    what each tollgate host adds over its plain proxy."""
    direct = measured["direct"]
    lines = [f"{kind:30} {'p50':>7} {'p99':>7} {'+p50':>7} {'+p99':>7}", "-" * 62]
    lines += [f"{path:30} {p50:7.3f} {p99:7.3f} {p50 - direct[0]:+7.3f} {p99 - direct[1]:+7.3f}"
              for path, (p50, p99) in measured.items()]
    for host, plain in PLAIN.items():
        name = f"tollgate {host}"
        if name in measured and plain in measured:
            lines.append(f"{name} over {plain}: {measured[name][0] - measured[plain][0]:+.3f} "
                         "ms at the p50")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=int, default=2)
    parser.add_argument("--hosts", default="envoy,mitmproxy")
    args = parser.parse_args()
    if not ready_for_wrk():
        return 1
    workdir, fake_port, fake = bench_setup("tollgate-bench-lean-")
    procs: list[subprocess.Popen[bytes]] = [fake]
    gateways: list[GatewayProcess] = []
    try:
        config, secret, paths = references(workdir, fake_port, procs)
        paths |= start_hosts(args.hosts.split(","), config, secret, workdir, gateways)
        paths = {k: (f"{url}/v1/chat/completions", h) for k, (url, h) in paths.items()}
        scripts = {}
        for i, (path, (_, headers)) in enumerate(paths.items()):
            for j, (kind, body) in enumerate(KINDS.items()):
                scripts[path, kind] = post_script(workdir, headers, body, f"post-{i}-{j}.lua")
        rounds: dict[str, dict[str, list[tuple[float, float]]]] = {
            kind: {path: [] for path in paths} for kind in KINDS}
        for path, (url, _) in paths.items():  # warm-up, not counted
            for kind in KINDS:
                timed(url, scripts[path, kind], 1)
        for _ in range(args.rounds):
            for path, (url, _) in paths.items():
                for kind in KINDS:
                    rounds[kind][path].append(timed(url, scripts[path, kind], args.seconds))
    finally:
        stop_all(gateways, procs)
    print(f"\none request at a time (wrk, one connection), {args.rounds} rounds of "
          f"{args.seconds} s per path and kind; {os.cpu_count()} cores; ms\n")
    measured = {kind: figures(rounds[kind]) for kind in KINDS}
    for kind, each in measured.items():
        print("\n".join(table(kind, each)), end="\n\n")
    print(json.dumps({kind: {path: [round(p, 3) for p in fig] for path, fig in each.items()}
                      for kind, each in measured.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
