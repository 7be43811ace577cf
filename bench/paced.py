"""What each path adds to a stream whose events come a few milliseconds apart, as a model's
tokens do: is anything added per event, beyond what the plain proxy adds?

    python -m bench.paced [--streams 40] [--delay-ms 5] [--events 20]

A fake OpenAI provider writes each event of a streamed chat completion `--delay-ms` after
the last (`--events` words of answer, each an event, and the role and finish events around
them). The stream the OpenAI SDK sends by default (no `stream_options`) goes, round-robin in
a new order each turn, to the provider directly, plain Envoy, mitmdump and each tollgate
host on the governed profile: a tollgate host asks for the usage chunk upstream and keeps it
from the client, which is the gateway's most common stream (no translation).

Prints, per path, the median time to the first body byte and from it to the event that
finishes the answer (`finish_reason`), what each adds over the direct call, and that
second figure per event: what a proxy adds to every event of a stream. The stream is timed
to its finishing event, not its end: the fake paces the usage chunk tollgate asks for like
a token, one delay more before `[DONE]`, where a provider sends it with the finishing
event.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import statistics
import subprocess
import time

import httpx

from bench.latency import bench_setup
from bench.quick import STREAM_BODY, references, start_hosts, stop_all
from tests.harness import GatewayProcess

FINISHED = re.compile(rb'"finish_reason": ?"')


async def _paced(client: httpx.AsyncClient, url: str, headers: dict[str, str]
                 ) -> tuple[float, float]:
    """One stream's time to its first body byte, and from that to its finishing event (ms)."""
    t0 = time.perf_counter()
    first = finished = None
    async with client.stream("POST", url, content=STREAM_BODY, headers=headers) as r:
        assert r.status_code == 200, f"{url}: {r.status_code}"
        async for chunk in r.aiter_raw():
            now = time.perf_counter()
            if first is None and chunk:
                first = now
            if finished is None and FINISHED.search(chunk):
                finished = now
    assert first is not None and finished is not None, f"{url}: no finishing event"
    return (first - t0) * 1000, (finished - first) * 1000


async def _events(url: str, headers: dict[str, str]) -> int:
    """The events of one stream as the provider sends it, up to its finishing event."""
    async with httpx.AsyncClient(timeout=30) as client:
        r = await client.post(url, content=STREAM_BODY, headers=headers)
        events = r.content.split(b"\n\n")
        finishing = next(i for i, e in enumerate(events) if FINISHED.search(e))
        return finishing + 1


async def round_robin(paths: dict[str, tuple[str, dict[str, str]]], n: int
                      ) -> dict[str, list[tuple[float, float]]]:
    """`n` streams per path, the paths in a new (seeded) order each turn: each stream's
    time to its first body byte and from that to its finishing event (ms)."""
    order, shuffled = list(paths), random.Random(n)
    clients = {name: httpx.AsyncClient(timeout=30) for name in paths}
    out: dict[str, list[tuple[float, float]]] = {name: [] for name in paths}
    try:
        for name, (url, headers) in paths.items():  # warm connections
            for _ in range(3):
                await _paced(clients[name], url, headers)
        for _ in range(n):
            shuffled.shuffle(order)
            for name in order:
                url, headers = paths[name]
                out[name].append(await _paced(clients[name], url, headers))
    finally:
        for client in clients.values():
            await client.aclose()
    return out


def table(times: dict[str, list[tuple[float, float]]], events: int) -> list[str]:
    """The printed rows: medians, what each path adds over `direct`, and the added time
    from the first byte to the finishing event, per event after the first."""
    first = {k: statistics.median(f for f, _ in v) for k, v in times.items()}
    body = {k: statistics.median(b for _, b in v) for k, v in times.items()}
    rows = [f"{'path':<20} {'first':>7} {'+first':>7} {'body':>7} {'+body':>7} "
            f"{'+per event':>10}"]
    rows.append("-" * len(rows[0]))
    for name in times:
        added = body[name] - body["direct"]
        rows.append(f"{name:<20} {first[name]:>7.3f} {first[name] - first['direct']:>+7.3f} "
                    f"{body[name]:>7.3f} {added:>+7.3f} {added / max(events - 1, 1):>+10.4f}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=40)
    parser.add_argument("--delay-ms", type=float, default=5.0)
    parser.add_argument("--events", type=int, default=20)
    parser.add_argument("--hosts", default="envoy,mitmproxy")
    args = parser.parse_args()

    workdir, port, fake = bench_setup("tollgate-bench-paced-", args.delay_ms / 1000,
                                      args.events)
    procs: list[subprocess.Popen[bytes]] = [fake]
    gateways: list[GatewayProcess] = []
    try:
        config, secret, paths = references(workdir, port, procs)
        paths |= start_hosts(args.hosts.split(","), config, secret, workdir, gateways)
        paths = {k: (f"{url}/v1/chat/completions", h) for k, (url, h) in paths.items()}
        events = asyncio.run(_events(*paths["direct"]))
        times = asyncio.run(round_robin(paths, args.streams))
    finally:
        stop_all(gateways, procs)
    print(f"\n{args.streams} streams per path of {events} events, {args.delay_ms:g} ms apart "
          "(the SDK's default stream: the gateway asks for usage and cuts it); ms\n")
    print("\n".join(table(times, events)))
    print("\n(body: from the first byte to the event that finishes the answer; +per event: "
          "what the path adds to it, per event after the first)")


if __name__ == "__main__":
    main()
