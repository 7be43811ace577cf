"""What each path adds to a request as its body grows to an agent's: a history of hundreds
of messages, hundreds of KiB to a MiB, sent again on every turn.

    python -m bench.bodies [--requests 150] [--messages 2,200,700,2000] [--hosts envoy,mitmproxy]

Each size is a chat completion of that many messages (80 words each, but the first size's
of a few), sent sequentially, round-robin in a new order each turn, to the provider
directly, plain Envoy, mitmdump and each tollgate host on the governed profile: as a JSON
request, and as the stream the OpenAI SDK sends by default (no `stream_options`), whose
body the gateway changes to ask for the usage chunk.

Prints, per size and path, the median added to the direct call (ms) for the JSON answer and
for the stream to its last byte, and what tollgate adds beyond the plain proxy it runs in.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import time

import httpx

from bench.latency import bench_setup
from bench.quick import references, start_hosts, stop_all
from tests.harness import GatewayProcess

PROXY_OF = {"tollgate envoy": "plain envoy", "tollgate mitmproxy": "mitmdump"}
KINDS = ("json", "stream")


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=150)
    parser.add_argument("--messages", default="2,200,700,2000")
    parser.add_argument("--hosts", default="envoy,mitmproxy")
    args = parser.parse_args()

    workdir, port, fake = bench_setup("tollgate-bench-bodies-")
    procs: list[subprocess.Popen[bytes]] = [fake]
    gateways: list[GatewayProcess] = []
    table = [f"{'body':>12}  {'path':<20} {'+json':>8} {'+stream':>8}  "
             "beyond its plain proxy: json, stream"]
    table.append("-" * len(table[0]))
    try:
        config, secret, paths = references(workdir, port, procs)
        paths |= start_hosts(args.hosts.split(","), config, secret, workdir, gateways)
        paths = {k: (f"{url}/v1/chat/completions", {**h, "content-type": "application/json"})
                 for k, (url, h) in paths.items()}
        for messages in map(int, args.messages.split(",")):
            bodies = [body(messages, stream) for stream in (False, True)]
            times = asyncio.run(round_robin(paths, bodies, args.requests))
            table += rows(len(bodies[0]), times, [p for p in paths if p != "direct"])
    finally:
        stop_all(gateways, procs)
    print(f"\n{args.requests} sequential requests per path, body and kind, round-robin; "
          "added p50 over the direct call, ms\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
