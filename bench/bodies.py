"""What each path adds to a request as its body grows to an agent's: a history of hundreds
of messages, hundreds of KiB to a MiB, sent again on every turn.

    python -m bench.bodies [--requests 150] [--messages 2,200,700,2000] [--hosts envoy,mitmproxy]
                           [--against REV | --against none]

Each size is a chat completion of that many messages (80 words each, but the first size's
of a few), sent sequentially, round-robin in a new order each turn, to the provider
directly, plain Envoy, mitmdump and each tollgate host on the governed profile: as a JSON
request, and as the stream the OpenAI SDK sends by default (no `stream_options`), whose
body the gateway changes to ask for the usage chunk.

Prints, per size and path, the median added to the direct call (ms) for the JSON answer and
for the stream to its last byte, and what tollgate adds beyond the plain proxy it runs in.
The hosts of another commit run beside this checkout's in the same run (`--against REV`, by
default the revision `bench/baseline.json` names; `none`: not), and a figure of this
checkout's (p50 over the direct call's, per host, size and kind, for bodies of 64 KiB and
more) more than 15% worse than that commit's is flagged, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import statistics
import subprocess
import time
from pathlib import Path

import httpx

from bench.latency import bench_setup
from bench.quick import TOLERANCE, against, checkout, compare, references, start_hosts, stop_all
from tests.harness import GatewayProcess

PROXY_OF = {"tollgate envoy": "plain envoy", "tollgate mitmproxy": "mitmdump"}
KINDS = ("json", "stream")
BIG = 64 * 1024  # the bodies whose figures are compared


def body(messages: int, stream: bool) -> bytes:
    """A chat completion with `messages` messages (the first size: a few words each)."""
    words = 80 if messages > 2 else 4
    history = [{"role": "user" if i % 2 == 0 else "assistant",
                "content": " ".join(["lorem"] * words)} for i in range(messages)]
    doc = {"messages": history, "model": "gpt-5-mini", "max_completion_tokens": 100}
    return json.dumps({**doc, "stream": True} if stream else doc).encode()


async def round_robin(paths: dict[str, tuple[str, dict[str, str]]], bodies: list[bytes],
                      n: int) -> dict[str, list[float]]:
    """`n` requests per path and body (its kind: JSON, stream), the paths in a new (seeded)
    order each turn: each one's time to its last byte (ms), by `path kind`."""
    order, shuffled = list(paths), random.Random(n)
    out: dict[str, list[float]] = {}
    async with httpx.AsyncClient(timeout=60) as client:
        async def one(name: str, content: bytes) -> float:
            url, headers = paths[name]
            t0 = time.perf_counter()
            r = await client.post(url, content=content, headers=headers)
            assert r.status_code == 200, (name, r.status_code, r.text[:200])
            return (time.perf_counter() - t0) * 1000

        for kind, content in zip(KINDS, bodies, strict=True):
            for name in paths:  # warm connections and caches
                for _ in range(3):
                    await one(name, content)
            for _ in range(n):
                shuffled.shuffle(order)
                for name in order:
                    out.setdefault(f"{name} {kind}", []).append(await one(name, content))
    return out


def rows(size: int, times: dict[str, list[float]], paths: list[str]) -> list[str]:
    """One size's rows: each path's added p50 for either kind and, for tollgate, what it
    adds beyond its plain proxy (ms)."""
    p50 = {k: statistics.median(v) for k, v in times.items()}
    out = []
    for name in paths:
        added = {kind: p50[f"{name} {kind}"] - p50[f"direct {kind}"] for kind in KINDS}
        proxy = PROXY_OF.get(name)
        beyond = "" if proxy is None else " ".join(
            f"{added[kind] - (p50[f'{proxy} {kind}'] - p50[f'direct {kind}']):>+8.3f}"
            for kind in KINDS)
        out.append(f"{size / 1024:>8.1f} KiB  {name:<20} {added['json']:>+8.3f} "
                   f"{added['stream']:>+8.3f}  {beyond}")
    return out


def figures(size: int, times: dict[str, list[float]], who: str) -> dict[str, float]:
    """`who`'s figures for one size: per host and kind, its p50 over the direct call's
    (none for a body under BIG: bench.quick's small body is measured a thousand times)."""
    if size < BIG:
        return {}
    p50 = {k: statistics.median(v) for k, v in times.items()}
    return {f"{host} {size / 1024:.0f} KiB {kind}: p50 / direct p50":
            round(p50[f"{who} {host} {kind}"] / p50[f"direct {kind}"], 3)
            for host in ("envoy", "mitmproxy") for kind in KINDS
            if f"{who} {host} {kind}" in p50}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=150)
    parser.add_argument("--messages", default="2,200,700,2000")
    parser.add_argument("--hosts", default="envoy,mitmproxy")
    parser.add_argument("--against", metavar="REV",
                        help="The commit whose hosts run beside this checkout's (default: "
                             "bench/baseline.json's `revision`; `none`: none).")
    args = parser.parse_args()
    revision = against(args.against)
    with checkout(revision) if revision else contextlib.nullcontext() as code:
        return _run(args, revision[:7] if revision else None, code)


def _run(args: argparse.Namespace, short: str | None, code: Path | None) -> int:
    workdir, port, fake = bench_setup("tollgate-bench-bodies-")
    procs: list[subprocess.Popen[bytes]] = [fake]
    gateways: list[GatewayProcess] = []
    table = [f"{'body':>12}  {'path':<20} {'+json':>8} {'+stream':>8}  "
             "beyond its plain proxy: json, stream"]
    table.append("-" * len(table[0]))
    now: dict[str, float] = {}
    then: dict[str, float] = {}
    try:
        config, secret, paths = references(workdir, port, procs)
        hosts = args.hosts.split(",")
        paths |= start_hosts(hosts, config, secret, workdir, gateways)
        if short:
            paths |= start_hosts(hosts, config, secret, workdir, gateways, short, code)
        paths = {k: (f"{url}/v1/chat/completions", {**h, "content-type": "application/json"})
                 for k, (url, h) in paths.items()}
        for messages in map(int, args.messages.split(",")):
            bodies = [body(messages, stream) for stream in (False, True)]
            times = asyncio.run(round_robin(paths, bodies, args.requests))
            table += rows(len(bodies[0]), times, [p for p in paths if p != "direct"])
            now |= figures(len(bodies[0]), times, "tollgate")
            if short:
                then |= figures(len(bodies[0]), times, short)
    finally:
        stop_all(gateways, procs)
    print(f"\n{args.requests} sequential requests per path, body and kind, round-robin; "
          "added p50 over the direct call, ms\n")
    print("\n".join(table))
    if not short:
        return 0
    print(f"\nFigures (lower is better), against {short}'s code measured in this run:\n")
    for name, value in now.items():
        print(f"  {name:<44} {value:>7.3f} {then[name]:>7.3f} ({value / then[name]:.2f}x)")
    worse = compare(now, then)
    print(f"\nWORSE by more than {TOLERANCE:.0%} than {short}'s code:\n  " + "\n  ".join(worse)
          if worse else f"\nwithin {TOLERANCE:.0%} of {short}'s code")
    return 1 if worse else 0


if __name__ == "__main__":
    raise SystemExit(main())
