"""Soak: rounds of concurrent streaming requests through each host, bounded in time.

    python -m bench.soak [--streams 500] [--rounds 5] [--hosts envoy,mitmproxy]

Each round opens `--streams` streamed chat completions within a second, each of which stays
open about three seconds (so all are open together), and reads every one to its end. After
each round it records, per host, the resident memory and open file descriptors of the
gateway's processes (ext_proc and Envoy, or mitmproxy) and the requests it still holds
unsettled (`tollgate_requests_in_flight`, which must be back to 0). At the end every request
must be in the ledger exactly once with the provider's token counts. Prints a table; exits 1
if a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

from bench.latency import PROVIDER_KEY, _Url, new_key, scratch_dir, start_fake
from bench.scaling import status_mib
from tests.conftest import make_config
from tests.fakes.providers import TEXT
from tests.harness import GatewayProcess, free_port, ledger, wait_until

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--hosts", default="envoy,mitmproxy")
    parser.add_argument("--max-seconds", type=float, default=900)
    args = parser.parse_args()
    os.environ.setdefault("TOLLGATE_KEY_PEPPER", "soak-pepper")
    os.environ["FAKE_OPENAI_KEY"] = PROVIDER_KEY
    os.environ.setdefault("FAKE_ANTHROPIC_KEY", "unused")
    deadline = time.monotonic() + args.max_seconds
    workdir = scratch_dir("tollgate-soak-")
    fake_port = free_port()
    fake = start_fake(fake_port, chunk_delay=0.2)  # each stream stays open ~3 s
    failures: list[str] = []
    # host, round, RSS MB (all processes), gateway fds, Envoy fds, in flight, served, s
    table: list[tuple[str, int, float, int, int | None, int | None, int, float]] = []
    try:
        for host in args.hosts.split(","):
            config = make_config(workdir / host, _Url(f"http://127.0.0.1:{fake_port}"),
                                 _Url(f"http://127.0.0.1:{free_port()}"))
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
                    table.append((host, rnd, rss,
                                  fds(gw.proc.pid), sum(fds(p) for p in envoys) or None,
                                  open_, len(ids), took))
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

    print(f"\n{args.streams} concurrent streams per round; {os.cpu_count()} cores\n")
    print(f"{'host':<10} {'round':>5} {'RSS MB':>8} {'fds':>5} {'envoy fds':>9} "
          f"{'in flight':>9} {'served':>7} {'seconds':>8}")
    for host, rnd, rss, nfd, envoy_fds, open_, ok, took in table:
        print(f"{host:<10} {rnd:>5} {rss:>8.1f} {nfd:>5} {envoy_fds or '':>9} "
              f"{'' if open_ is None else open_:>9} {ok:>7} {took:>8.1f}")
    print("RSS: the gateway and Envoy together; fds: the gateway process (ext_proc or "
          "mitmproxy); Envoy's own fds are mostly its pool of upstream connections, bounded "
          "by the peak concurrency.")
    for host in args.hosts.split(","):
        mine = [t for t in table if t[0] == host]
        if len(mine) >= 3:
            growth = mine[-1][2] - mine[1][2]  # after the first round's warm-up
            fd_growth = mine[-1][3] - mine[1][3]
            print(f"{host}: RSS {growth:+.1f} MB and fds {fd_growth:+d} from round 2 to "
                  f"round {len(mine)}")
            if growth > 50 or fd_growth > 20:
                failures.append(f"{host}: grows (RSS {growth:+.1f} MB, fds {fd_growth:+d})")
            if mine[-1][5] != 0:
                failures.append(f"{host}: {mine[-1][5]} requests still held unsettled")
    for f in failures:
        print("FAIL:", f)
    print("soak:", "ok" if not failures else f"{len(failures)} problem(s)")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
