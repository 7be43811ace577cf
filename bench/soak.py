"""Soak: rounds of concurrent streaming requests through each host, bounded in time.

    python -m bench.soak [--streams 500] [--rounds 5] [--hosts envoy,mitmproxy]
                         [--state sqlite|redis]

Each round opens `--streams` streamed chat completions within a second, each of which stays
open about three seconds (so all are open together), and reads every one to its end. After
each round it records, per host, the resident memory and open file descriptors of the
gateway's processes (ext_proc and Envoy, or mitmproxy) and the requests it still holds
unsettled (`tollgate_requests_in_flight`, which must be back to 0). At the end every request
must be in the ledger exactly once with the provider's token counts. Prints a table; exits 1
if a check fails. `--state redis` runs each host on a local `redis-server` (a database of
its own per host), the state the Kubernetes render requires.

Envoy keeps its connections to the decision service open between rounds (HTTP/1.1: one per
decision or meter post in flight, up to the highest number so far), so ext_proc's own
descriptors rise whenever a round's burst reaches a new peak. What is checked for growth is
what ext_proc holds besides those connections (Envoy's `upstream_cx_active` on its decider
clusters): a connection Envoy closed and ext_proc kept would show there.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import httpx

from bench.latency import PROVIDER_KEY, _Url, new_key, scratch_dir, start_fake, with_state
from bench.scaling import status_mib
from extproc.envoy_config import DECIDER_CLUSTER
from tests.conftest import make_config
from tests.fakes.providers import TEXT
from tests.harness import GatewayProcess, RedisServer, free_port, ledger, wait_until

BODY = {"model": "gpt-5-mini", "stream": True, "max_tokens": 64,
        "messages": [{"role": "user", "content": "soak"}]}
WORDS = len(TEXT.split(" "))


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def settled_fds(pid: int, timeout: float = 10.0) -> int:
    """A process's descriptors once they have stopped changing for half a second: as a
    round's client goes, its connections close over the next moments (mitmproxy takes a few
    hundred milliseconds for 500), and a count taken meanwhile says nothing of a leak."""
    deadline = time.monotonic() + timeout
    last, same = fds(pid), 0
    while same < 5 and time.monotonic() < deadline:
        time.sleep(0.1)
        now = fds(pid)
        same = same + 1 if now == last else 0
        last = now
    return last


def decider_connections(envoy_admin: str) -> int:
    """Envoy's open connections to the decision service, from its admin's stats."""
    text = httpx.get(f"http://{envoy_admin}/stats", timeout=5, params={
        "filter": rf"^cluster\.{DECIDER_CLUSTER}(_\d+)?\.upstream_cx_active$"}).text
    return sum(int(line.rsplit(":", 1)[1]) for line in text.splitlines() if ":" in line)


def in_flight(admin_url: str) -> int | None:
    """The requests the gateway holds unsettled, from its /metrics."""
    try:
        text = httpx.get(f"{admin_url}/metrics", timeout=5).text
    except httpx.HTTPError:
        return None
    for line in text.splitlines():
        if line.startswith("tollgate_requests_in_flight "):
            return int(float(line.rsplit(" ", 1)[1]))
    return None


async def one_round(url: str, secret: str, n: int) -> tuple[list[str], int]:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    headers = {"authorization": f"Bearer {secret}"}
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        async def stream(i: int) -> str:
            # Opened over the first second (all are then open together): a burst of 500
            # connects in one instant overflows mitmproxy's accept backlog.
            await asyncio.sleep(i / n)
            async with client.stream("POST", f"{url}/v1/chat/completions", json=BODY,
                                     headers=headers) as r:
                assert r.status_code == 200, await r.aread()
                async for _ in r.aiter_raw():
                    pass
                return r.headers["x-langwatch-request-id"]

        results = await asyncio.gather(*(stream(i) for i in range(n)), return_exceptions=True)
    ids = [r for r in results if isinstance(r, str)]
    errors = Counter(f"{type(r).__name__}: {r}"[:120] for r in results if not isinstance(r, str))
    for error, count in errors.most_common(3):
        print(f"  {count} x {error}", flush=True)
    return ids, len(results) - len(ids)


class Round(NamedTuple):
    host: str
    round: int
    rss: float  # MB, the gateway's processes together
    fds: int  # the gateway process's
    envoy_connections: int  # of those, Envoy's connections to its decision service
    envoy_fds: int | None
    in_flight: int | None  # requests held unsettled once the round had ended
    served: int
    seconds: float


def growth_problems(rounds: list[Round]) -> list[str]:
    """What one host's rounds say is wrong: memory or descriptors that grow from the second
    round on (the first warms up), or requests left unsettled after the last."""
    problems: list[str] = []
    if len(rounds) >= 3:
        second, last = rounds[1], rounds[-1]
        growth = last.rss - second.rss
        held = (last.fds - last.envoy_connections) - (second.fds - second.envoy_connections)
        besides = " (besides Envoy's connections)" if last.host == "envoy" else ""
        print(f"{last.host}: RSS {growth:+.1f} MB and fds {held:+d}{besides} from round 2 to "
              f"round {len(rounds)}")
        if growth > 50 or held > 20:
            problems.append(f"{last.host}: grows (RSS {growth:+.1f} MB, fds {held:+d})")
    if rounds and rounds[-1].in_flight is None:
        problems.append(f"{rounds[-1].host}: its /metrics did not say what it holds unsettled")
    elif rounds and rounds[-1].in_flight:
        problems.append(f"{rounds[-1].host}: {rounds[-1].in_flight} requests still held "
                        "unsettled")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--hosts", default="envoy,mitmproxy")
    parser.add_argument("--max-seconds", type=float, default=900)
    parser.add_argument("--state", choices=["sqlite", "redis"], default="sqlite")
    args = parser.parse_args()
    os.environ.setdefault("TOLLGATE_KEY_PEPPER", "soak-pepper")
    os.environ["FAKE_OPENAI_KEY"] = PROVIDER_KEY
    os.environ.setdefault("FAKE_ANTHROPIC_KEY", "unused")
    deadline = time.monotonic() + args.max_seconds
    workdir = scratch_dir("tollgate-soak-")
    fake_port = free_port()
    fake = start_fake(fake_port, chunk_delay=0.2)  # each stream stays open ~3 s
    redis = RedisServer(workdir / "redis", fsync="everysec").start() \
        if args.state == "redis" else None
    failures: list[str] = []
    table: list[Round] = []
    try:
        for db, host in enumerate(args.hosts.split(","), 1):
            config = make_config(workdir / host, _Url(f"http://127.0.0.1:{fake_port}"),
                                 _Url(f"http://127.0.0.1:{free_port()}"))
            if redis is not None:
                config.write_text(with_state(config, redis.database(db)))
            secret = new_key(config)
            admin = f"127.0.0.1:{free_port()}"
            extra = ["--envoy-admin", admin] if host == "envoy" else []
            gw = GatewayProcess(host, config, workdir, extra=extra).start()
            served: list[str] = []
            try:
                for rnd in range(1, args.rounds + 1):
                    if time.monotonic() > deadline:
                        failures.append(f"{host}: stopped at round {rnd}, out of time")
                        break
                    started = time.monotonic()
                    ids, failed = asyncio.run(one_round(gw.url, secret, args.streams))
                    took = time.monotonic() - started
                    served += ids
                    if failed:
                        failures.append(f"{host} round {rnd}: {failed} streams failed")
                    # Every stream has ended: each request is settled a moment later.
                    for _ in range(100):
                        if (open_ := in_flight(gw.admin_url)) == 0:
                            break
                        time.sleep(0.1)
                    envoys = children(gw.proc.pid)
                    rss = sum(status_mib(p, "VmRSS") for p in [gw.proc.pid, *envoys])
                    table.append(Round(
                        host, rnd, rss, settled_fds(gw.proc.pid),
                        decider_connections(admin) if host == "envoy" else 0,
                        sum(fds(p) for p in envoys) or None, open_, len(ids), took))
            finally:
                gw.stop()
            expected = set(served)
            rows = wait_until(lambda c=config, e=expected: (
                r := [x for x in ledger(c) if x.request_id in e]) and len(r) >= len(e) and r,
                timeout=30, what=f"{host} ledger")
            if len(rows) != len(expected) or len({r.request_id for r in rows}) != len(rows):
                failures.append(f"{host}: {len(rows)} ledger rows for {len(expected)} requests")
            wrong = [r for r in rows if r.output_tokens != WORDS or not r.usage_reported]
            if wrong:
                failures.append(f"{host}: {len(wrong)} rows with wrong tokens")
    finally:
        fake.terminate()
        fake.wait(5)
        if redis is not None:
            redis.stop()

    print(f"\n{args.streams} concurrent streams per round; {os.cpu_count()} cores; "
          f"{'Redis' if redis else 'SQLite'} state\n")
    print(f"{'host':<10} {'round':>5} {'RSS MB':>8} {'fds':>5} {'of Envoy':>8} "
          f"{'envoy fds':>9} {'in flight':>9} {'served':>7} {'seconds':>8}")
    for r in table:
        of_envoy = r.envoy_connections if r.host == "envoy" else ""
        print(f"{r.host:<10} {r.round:>5} {r.rss:>8.1f} {r.fds:>5} {of_envoy:>8} "
              f"{r.envoy_fds or '':>9} {'' if r.in_flight is None else r.in_flight:>9} "
              f"{r.served:>7} {r.seconds:>8.1f}")
    print("RSS: the gateway and Envoy together; fds: the gateway process (ext_proc or "
          "mitmproxy), of which Envoy's connections to the decision service (kept open, up "
          "to the highest number in flight so far); Envoy's own fds are mostly its pools of "
          "connections, bounded by the peak concurrency.")
    for host in args.hosts.split(","):
        failures += growth_problems([r for r in table if r.host == host])
    for f in failures:
        print("FAIL:", f)
    print("soak:", "ok" if not failures else f"{len(failures)} problem(s)")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
