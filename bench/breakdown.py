"""Where the Envoy host's added time goes, stage by stage, as Envoy itself times them.

    python -m bench.breakdown [--requests 400] [--pin-provider CPUS]

The same chat completion is sent sequentially, round-robin in a new order each turn, to the
provider directly, to plain Envoy (one route to it) and to tollgate's Envoy host on the
governed profile (SQLite state): an Envoy of `tollgate envoy render` and `tollgate serve
extproc`. Both Envoys keep an access log of their streams' timestamps (`%COMMON_DURATION%`),
from which each stage's p50:

- `request in`: the client's request received (DS_RX_BEG to DS_RX_END);
- `to provider`: from the request's first byte to its first byte upstream (DS_RX_BEG to
  US_TX_BEG). Plain Envoy routes on the head and streams the body on; tollgate's decide
  filter takes the whole body, then the decision service's round trip and the Lua around it;
- `provider`: the provider's time, as Envoy sees it (US_TX_BEG to US_RX_END), in two parts:
  `provider's own`, from the request's last byte upstream to the response's first (US_TX_END
  to US_RX_BEG), and `response in`, the response received (US_RX_BEG to US_RX_END), which
  holds the filters' work on its head and body as they arrive, tollgate's meter among them;
- `response head`: the provider's response head through the filters (US_RX_BEG to
  DS_TX_BEG), tollgate's meter among them;
- `response end`: the last byte from the provider to the last to the client (US_RX_END to
  DS_TX_END);
- `in Envoy`: the stream's whole time in Envoy (DS_RX_BEG to DS_TX_END).

Then the decision service's own time per request, the mean of its
`tollgate_gateway_overhead_seconds` (the decision, and its metering of the response, which
runs after the response has gone on): what `to provider` spends beyond it is the transport
between Envoy and the decision service and the decide filter's Lua. The client's p50 for each
path says how much of what the host adds these stages account for.

The fake provider shares the machine's cores with the gateway, and the kernel places it as it
wakes: next to a process still running (the decision service, just after it answers), it may
wait for a core, and `provider's own` grows while `response in` shrinks. `--pin-provider 1`
keeps every thread of it on the cores named. Where it runs moves time between those two parts
more than it changes `provider` or `in Envoy`: compare those.

A fourth path, `floor`, is tollgate's Envoy host with a decision service that does no work:
the same rendered Envoy (the decide filter's Lua and exchange, the meter, the usage
cut), answered by tollgate's own decision service (`extproc.decider`, its parsing and its
encoding, on its event loop), whose processor replays the first decision it made and reads
no meter post. What the host adds up to `floor` is the architecture's: Envoy's filters and a
round trip to another process; what it adds beyond is tollgate's own work.

Three more paths split the floor (bench.answerer): `compiled floor`, the same rendered Envoy
whose decide filter asks a decision service that is not Python (a small C server answering
the same decision from memory), `python floor`, the same with that service in Python on
tollgate's event loop but with nothing of tollgate's, and `round trip`, an Envoy with no Lua
that asks the compiled service through ext_authz (C++) and forwards with the credential it
answers. The client's p50s then give each layer's share: the exchange with another process
itself (`round trip` over plain Envoy), tollgate's filters (the decide Lua and the meter's
posts: `compiled floor` over `round trip`), a Python process in the compiled one's place
(`python floor` over `compiled floor`), tollgate's decision service doing no work (its
reading and answering of the exchange: `floor` over `python floor`), and tollgate's decision
(the host over `floor`). A decision service in a compiled language would take the place of
the last three; a filter in Envoy's own C++ that of the second.

A last path, `compiled decision`, measures what such a decision service would take in their
place: the compiled answerer as a model of one (`--store`: each decision HMACs the key, takes
a request id, runs tollgate's SQLite reservation and write-ahead, asks a stream for its
usage; no response is settled: the end comes in Envoy's access log, after the answer, which
the models do not hear), asked by tollgate's Envoy. Its p50 over the compiled floor
is printed beside tollgate's decision service's (the host over the compiled floor), and
beside `python decision`'s, the same model in Python (bench.answerer's Python answerer with
a store): the same work written as one straight path, which tells how much of tollgate's
decision is Python itself and how much the code and data its path touches.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import yaml

from bench.answerer import answerer, decided_headers, round_trip
from bench.instructions import _decision
from bench.latency import BODY, PROVIDER_KEY, _Url, bench_setup, own_state
from bench.quick import _answers, governed, plain_envoy
from extproc.runner import envoy_binary
from tests.conftest import make_config
from tests.harness import BIN, free_port, wait_until
from tollgate.store.sqlite import SQLiteStore

POINTS = {  # stage -> (from, to), Envoy's stream timestamps
    "request in": ("DS_RX_BEG", "DS_RX_END"),
    "to provider": ("DS_RX_BEG", "US_TX_BEG"),
    "provider": ("US_TX_BEG", "US_RX_END"),
    "provider's own": ("US_TX_END", "US_RX_BEG"),
    "response in": ("US_RX_BEG", "US_RX_END"),
    "response head": ("US_RX_BEG", "DS_TX_BEG"),
    "response end": ("US_RX_END", "DS_TX_END"),
    "in Envoy": ("DS_RX_BEG", "DS_TX_END"),
}
OVERHEAD = re.compile(r'^tollgate_gateway_overhead_seconds_(sum|count)\{route="chat_completions"\}'
                      r" ([0-9.e+-]+)$", re.M)


def access_log(path: Path) -> dict[str, object]:
    """A file access log of the stages' durations (µs), one space-separated line a stream."""
    fields = " ".join(f"%COMMON_DURATION({a}:{b}:us)%" for a, b in POINTS.values())
    return {"name": "envoy.access_loggers.file", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
        "path": str(path), "log_format": {"text_format_source": {"inline_string":
                                                                 fields + "\n"}}}}


HCM = "envoy.filters.network.http_connection_manager"


def connection_managers(bootstrap: dict[str, Any]) -> list[dict[str, Any]]:
    """The typed configs of the bootstrap's HTTP connection managers."""
    return [f["typed_config"] for listener in bootstrap["static_resources"]["listeners"]
            for chain in listener["filter_chains"] for f in chain["filters"]
            if f["name"] == HCM]


def with_access_log(bootstrap: dict[str, Any], log: Path) -> dict[str, Any]:
    """`bootstrap` with the stage log added to its listener's HTTP connection manager."""
    for hcm in connection_managers(bootstrap):
        hcm.setdefault("access_log", []).append(access_log(log))
    return bootstrap


def print_p50s(times: dict[str, list[float]], requests: int, width: int) -> dict[str, float]:
    """Each path's p50 (ms), printed with what it adds to the direct call's; returned."""
    p50s = {name: statistics.median(values) for name, values in times.items()}
    print(f"\n{requests} sequential requests per path, round-robin in a new order each turn; "
          "ms (p50)\n")
    header = f"{'client':<{width}} {'p50':>7} {'+p50':>7}"
    print(f"{header}\n{'-' * len(header)}")
    for name, p50 in p50s.items():
        print(f"{name:<{width}} {p50:>7.3f} {p50 - p50s['direct']:>+7.3f}")
    return p50s


def stages(log: Path, skip: int) -> dict[str, float]:
    """Each stage's p50 (ms) over the log's lines after the first `skip` (the warm-up)."""
    rows = [line.split() for line in log.read_text().splitlines() if line.strip()][skip:]
    out = {}
    for i, name in enumerate(POINTS):
        values = [int(r[i]) for r in rows if r[i] != "-"]
        out[name] = statistics.median(values) / 1000 if values else float("nan")
    return out


# What each layer of the Envoy host adds to the client's p50: (path, the path under it).
LAYERS = {
    "an exchange with another process (ext_authz, no Lua)": ("round trip", "plain envoy"),
    "tollgate's filters (the decide Lua, the meter)": ("compiled floor", "round trip"),
    "a decision service in Python, doing no work": ("python floor", "compiled floor"),
    "tollgate's decision service, doing no work": ("floor", "python floor"),
    "tollgate's decision": ("tollgate envoy", "floor"),
}


def model_store(workdir: Path, name: str = "model") -> Path:
    """A state file as tollgate's SQLite store makes one, for a modelled decision service."""
    path = workdir / f"{name}-state.db"
    asyncio.run(SQLiteStore(path).close())
    return path


def asking(config: Path, workdir: Path, procs: list[subprocess.Popen[bytes]],
           decided: list[tuple[str, str]], name: str, **kind: Any) -> tuple[str, Path]:
    """An answerer (bench.answerer; `kind`: its `compiled` and `store`) on `<name>.sock`,
    and tollgate's Envoy asking it, added to `procs` in that order: the Envoy's URL and the
    answerer's socket."""
    socket = workdir / f"{name}.sock"
    procs.append(answerer(workdir, socket, decided, **kind))
    url, _, _ = tollgate_envoy(own_state(config, name), workdir, procs, answering=socket)
    return url, socket


def pin(pid: int, cpus: set[int]) -> None:
    """Keep every thread of process `pid` on `cpus` (threads it starts later inherit it)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(ProcessLookupError):  # a thread that has ended since
            os.sched_setaffinity(int(task.name), cpus)


def cpu_list(text: str) -> set[int]:
    """`1` or `0,2-3` as a set of CPU numbers, each one this machine has."""
    cpus: set[int] = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    unknown = cpus - os.sched_getaffinity(0)
    if not cpus or unknown:
        raise argparse.ArgumentTypeError(f"not CPUs this process may use: {sorted(unknown)}")
    return cpus


def overhead(admin: str) -> tuple[float, float]:
    """The decision service's overhead histogram: (sum of seconds, count)."""
    found = dict(OVERHEAD.findall(httpx.get(f"{admin}/metrics", timeout=5).text))
    return float(found.get("sum", 0)), float(found.get("count", 0))


def tollgate_envoy(config: Path, workdir: Path, procs: list[subprocess.Popen[bytes]],
                   floor: bool = False, answering: Path | None = None,
                   service: list[str] | None = None,
                   change: Callable[[dict[str, Any]], None] | None = None,
                   name: str | None = None) -> tuple[str, str, Path]:
    """`serve extproc` (`floor`: bench.floor's decision service in its place; `answering`:
    no decision service, the decide filter asks the answerer on that socket; `service`:
    the command that runs `tollgate`, its arguments after it) and an Envoy of `envoy
    render`, with the stage log, added to `procs` as they start (stopped by the caller,
    started or not): the listener's URL, ext_proc's admin URL ("" for a floor) and the
    log. `change`: applied to the rendered bootstrap before Envoy reads it; `name`: what
    its files are called in `workdir` (one of several Envoys asking the same answerer)."""
    port, envoy_admin, admin = free_port(), f"127.0.0.1:{free_port()}", free_port()
    name = name or (f"{answering.stem}-floor" if answering else "floor" if floor
                    else "tollgate")
    sock = f"unix:{workdir}/{name}.sock"
    decider = ["--decider", f"unix:{answering}"] if answering else []
    rendered = subprocess.run(
        [str(BIN / "tollgate"), "--config", str(config), "envoy", "render", "--listen",
         f"127.0.0.1:{port}", "--extproc", sock, "--envoy-admin", envoy_admin, *decider],
        capture_output=True, text=True, check=True).stdout
    log = workdir / f"{name}-stages.log"
    bootstrap = workdir / f"{name}-envoy.json"
    rendered_bootstrap = with_access_log(yaml.safe_load(rendered), log)
    if change is not None:
        change(rendered_bootstrap)
    bootstrap.write_text(json.dumps(rendered_bootstrap))
    with open(workdir / f"{name}.log", "wb") as service_log:  # the child has its own copy
        if floor:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "bench.floor", str(config),
                 f"{workdir}/{name}.decide.sock"], stdout=subprocess.PIPE, stderr=service_log))
            assert procs[-1].stdout is not None
            if procs[-1].stdout.readline().strip() != b"ready":
                raise RuntimeError(f"the floor's decision service did not start: see "
                                   f"{workdir}/{name}.log")
        elif not answering:  # (the answerer is running already)
            procs.append(subprocess.Popen(
                [*(service or [str(BIN / "tollgate")]), "--config", str(config), "serve",
                 "extproc", "--listen", sock, "--admin", f"127.0.0.1:{admin}",
                 "--envoy-admin", envoy_admin], stdout=subprocess.DEVNULL,
                stderr=service_log))
    procs.append(subprocess.Popen([envoy_binary(), "-c", str(bootstrap),
                                   "--disable-hot-restart", "--log-level", "error",
                                   "--base-id", str(free_port())],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    url = f"http://127.0.0.1:{port}"
    # The answerer forwards every request, /v1/models too: it answers nothing with 401.
    wait_until(lambda: _forwards(url) if answering else _answers(url), timeout=30,
               what=f"{name}'s Envoy host")
    return url, "" if floor or answering else f"http://127.0.0.1:{admin}", log


def _forwards(url: str, headers: dict[str, str] | None = None) -> bool:
    """A chat completion through `url` comes back answered by the provider."""
    try:
        return httpx.post(f"{url}/v1/chat/completions", content=BODY, headers=headers,
                          timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


async def sequential(paths: dict[str, tuple[str, dict[str, str]]], n: int, warm: int,
                     body: bytes = BODY, starts: dict[str, list[float]] | None = None
                     ) -> dict[str, list[float]]:
    """`warm` then `n` requests per path, a turn of one per path at a time, in a new order
    each turn (the same orders on every run): the measured ones' times (ms), and, into
    `starts` when given, when each began (seconds after the first measured one). In a
    fixed order a path's place told in its time: the same Envoy read some 0.03 ms slower
    first and last in a turn of seven than in the middle, and each path ran after the same
    other, whose code and data it found in the caches or not."""
    out: dict[str, list[float]] = {name: [] for name in paths}
    first = None
    shuffled, order = random.Random(n), list(paths)
    async with httpx.AsyncClient(timeout=30) as client:
        for i in range(warm + n):
            shuffled.shuffle(order)
            for name in order:
                url, headers = paths[name]
                t0 = time.perf_counter()
                r = await client.post(f"{url}/v1/chat/completions", content=body,
                                      headers=headers)
                assert r.status_code == 200, f"{name}: {r.status_code} {r.text[:200]}"
                if i >= warm:
                    out[name].append((time.perf_counter() - t0) * 1000)
                    if starts is not None:
                        if first is None:
                            first = t0
                        starts.setdefault(name, []).append(t0 - first)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--pin-provider", type=cpu_list, metavar="CPUS",
                        help="keep the fake provider on these CPUs (e.g. 1 or 0,2-3)")
    args = parser.parse_args()
    warm = 20
    workdir, fake_port, fake = bench_setup("tollgate-bench-breakdown-")
    procs: list[subprocess.Popen[bytes]] = [fake]
    direct = f"http://127.0.0.1:{fake_port}"
    try:
        if args.pin_provider:
            pin(fake.pid, args.pin_provider)
        plain_log = workdir / "plain-stages.log"
        plain, plain_url = plain_envoy(workdir, fake_port, access_log=access_log(plain_log))
        procs.append(plain)
        config = make_config(workdir, _Url(direct), _Url(f"http://127.0.0.1:{free_port()}"))
        secret = governed(config)
        url, admin, log = tollgate_envoy(own_state(config, "breakdown"), workdir, procs)
        floor_url, _, floor_log = tollgate_envoy(own_state(config, "floor"), workdir, procs,
                                                 floor=True)
        # The layers under the floor: the same exchange with a service that is not Python,
        # asked by tollgate's Envoy, and by an Envoy with no Lua (bench.answerer).
        decided = decided_headers(asyncio.run(_decision(own_state(config, "decided"), secret)))
        compiled_url, answering = asking(config, workdir, procs, decided, "answerer")
        model_url, _ = asking(config, workdir, procs, decided, "model",
                              store=model_store(workdir))
        python_url, _ = asking(config, workdir, procs, decided, "python-answerer",
                               compiled=False)
        lean_url, _ = asking(config, workdir, procs, decided, "python-model", compiled=False,
                             store=model_store(workdir, "python-model"))
        trip, trip_url = round_trip(workdir, answering, fake_port)
        procs.append(trip)
        provider = {"authorization": f"Bearer {PROVIDER_KEY}", "content-type":
                    "application/json"}
        governed_key = {"authorization": f"Bearer {secret}", "content-type": "application/json"}
        wait_until(lambda: _forwards(trip_url, governed_key), timeout=30,
                   what="the round trip's Envoy")
        paths = {"direct": (direct, provider), "plain envoy": (plain_url, provider),
                 "round trip": (trip_url, governed_key),
                 "compiled floor": (compiled_url, governed_key),
                 "python floor": (python_url, governed_key),
                 "compiled decision": (model_url, governed_key),
                 "python decision": (lean_url, governed_key),
                 "floor": (floor_url, governed_key), "tollgate envoy": (url, governed_key)}
        asyncio.run(sequential(paths, 0, warm))
        spent0, count0 = overhead(admin)
        times = asyncio.run(sequential(paths, args.requests, 0))
        time.sleep(0.5)  # the last settlements
        spent1, count1 = overhead(admin)
    finally:
        for proc in reversed(procs):  # Envoy writes out its access log as it stops
            proc.terminate()
            proc.wait(10)
    # The readiness probes and the warm-up are the first lines of each log.
    logs = {"plain": plain_log, "floor": floor_log, "tollgate": log}
    found = {name: stages(path, len(path.read_text().splitlines()) - args.requests)
             for name, path in logs.items()}

    p50s = print_p50s(times, args.requests, 18)
    print("\n(round trip: an Envoy asking a decision service that is not Python, answering "
          "from memory, through ext_authz; compiled floor: tollgate's Envoy asking that "
          "service; python floor: the same service in Python)\n")
    for layer, (above, below) in LAYERS.items():
        print(f"{layer:<58} {p50s[above] - p50s[below]:>+7.3f}")
    floor = p50s["compiled floor"]
    print(f"\nover the compiled floor, a decision service doing the model's work "
          f"(bench.answerer --store): compiled {p50s['compiled decision'] - floor:+.3f}, "
          f"in Python {p50s['python decision'] - floor:+.3f}; tollgate's "
          f"{p50s['tollgate envoy'] - floor:+.3f}")
    header = (f"{'Envoy stage':<16} {'plain':>7} {'floor':>7} {'tollgate':>9} {'added':>7} "
              f"{'beyond floor':>13}")
    if args.pin_provider:
        print(f"\n(the fake provider kept on CPUs {sorted(args.pin_provider)})")
    print(f"\n{header}\n{'-' * len(header)}")
    for name in POINTS:
        a, f, b = (found[k][name] for k in logs)
        print(f"{name:<16} {a:>7.3f} {f:>7.3f} {b:>9.3f} {b - a:>+7.3f} {b - f:>+13.3f}")
    print("\n(floor: tollgate's Envoy and decision service, replaying one decision: what the "
          "architecture costs before tollgate's own work)")
    if count1 > count0:
        own = (spent1 - spent0) / (count1 - count0) * 1000
        beyond = found["tollgate"]["to provider"] - found["plain"]["to provider"] - own
        print(f"\ndecision service's own time per request (mean, its decision and its "
              f"metering of the response): {own:.3f} ms\n`to provider` adds {beyond:.3f} ms "
              "more: the round trip to the decision service and the decide filter's Lua (at "
              "least that much: the mean holds the metering too)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
