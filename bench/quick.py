"""The sidecar's cost per request, side by side with the proxies it lives in, in one run.

    python -m bench.quick [--requests 400] [--update-baseline] [--baseline bench/baseline.json]
                          [--against REV | --against none] [--states sqlite,redis]

A fake OpenAI provider runs in its own process. The same chat-completions request is sent
sequentially, with keep-alive, to: the provider directly; plain Envoy (a static route to
it); mitmdump (reverse proxy, bodies streamed); and each tollgate host on the governed
profile (one key with a model allowlist, one blocking org budget, SQLite state), and again,
in a process of its own, with a key that has a fallback plan (the provider, then one that
is down: the first attempt serves, as it mostly does); and the Envoy host again on a Redis
state, as the Kubernetes render requires (a local `redis-server` with AOF and `appendfsync
everysec`, Redis's default; left out, and said so, where none is installed). Each path
takes, in each turn, that request and the same one streamed as the OpenAI SDK sends it by
default (no `stream_options`), timed to its first and last body byte. Turns go round-robin
across the paths, in a new order each turn, so the machine's drift weighs on all alike, and
a path's two requests in either order by turn: the first runs cold (its path's processes
idle while the others ran), the second warm (right after it), and each is printed apart,
the warm one as `warm`. The figures read the cold ones, as a sidecar beside an application
that works between its calls meets them. Then each
path's throughput with 32 requests in flight, the fallback key's and the Redis state's
aside (printed, not compared: the Python client and provider bind it; `make bench-scaling`
measures the sidecar's). `make bench-quick` leaves it out (`--concurrent-requests 0`),
which keeps it under a minute: those 14 s of a 59 s run compared nothing. It also takes
300 turns, not 400: beside the baseline's hosts (13 paths) 400 took 56-63 s on the 2-core
box, 300 some 45, and the same code still read 0.95x-1.01x of itself.

`--answer-words N` makes every answer N words long (the fake's own are a few): the JSON
answer and the stream, whose every event the meter copies and the usage cut reads; `make
bench` runs it at 500 words (some 115 KB, 500 events) against the baseline's code.

Prints p50/p99, what each path adds over the direct call, and the CPU each path's
processes spent per request (Envoy and ext_proc together for the Envoy host). Then the
figures that matter as ratios to references of the same run (tollgate's p50 to the direct
call's and to the plain proxy's, its CPU to the provider's), compared with the baseline:
any more than 15% worse is flagged (exit status 1).

The baseline is the code of a commit measured in the same run: `bench/baseline.json` names
it (`revision`), and each host of that commit's code (a git worktree, run with this
checkout's environment) joins the round-robin beside this checkout's, so both meet the same
machine at the same moment. Stored ratios alone drift with the machine: the same code
measured a third apart on two days of the same box, which a 15% threshold cannot tell from
a regression. The stored figures are still printed, and are the reference when the revision
is not in this clone's history or with `--against none`. `--update-baseline` rewrites the
baseline from this run, naming the checkout's commit: commit it with the reason.

The baseline's hosts nearly double the paths in the round-robin, and every path pays for
it in its absolute figures: between two of its requests, a path's processes run colder for
the others that ran meanwhile. On the 2-core box, with the baseline's hosts (11 paths) the
Envoy host added +1.36 ms at the p50 and plain Envoy +0.29, and each proxy spent 10-25%
more CPU per request (plain Envoy a quarter more; the provider the same); in the same half
hour, with `--against none` (7 paths; the sidecar's latency goals were set in a run of 6)
they added +0.82 and +0.17. The Redis state adds one path per code measured. The ratios to
the baseline compare like with like; read a goal's absolute figures with `--against none
--states sqlite`.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import cast

import httpx

from bench.latency import (
    BODY,
    PROVIDER_KEY,
    QUIET,
    _Url,
    bench_setup,
    concurrent,
    down_provider,
    fallback_key,
    interpreter,
    new_key,
    own_state,
    percentile,
    with_state,
)
from extproc.runner import envoy_binary
from tests.conftest import make_config
from tests.harness import GatewayProcess, RedisServer, free_port, tollgate, wait_until

BASELINE = Path(__file__).with_name("baseline.json")
ROOT = Path(__file__).resolve().parent.parent  # the checkout, a git work tree
TOLERANCE = 0.15  # a figure this much worse than the baseline is flagged
TICKS = os.sysconf("SC_CLK_TCK")
# The OpenAI SDK's default stream: no `stream_options`, so a governed gateway asks for the
# usage chunk upstream and keeps it from the client.
STREAM_BODY = json.dumps({**json.loads(BODY), "stream": True}).encode()
KINDS = ("json", "sse")  # a path's two requests in each turn: a JSON answer, a stream
# The paths of --models: tollgate's Envoy asking a model of a decision service
# (bench.answerer with a store), compiled and in Python.
MODELS = {"compiled decision (model)": True, "python decision (model)": False}


def plain_envoy(workdir: Path, upstream: int, access_log: dict[str, object] | None = None
                ) -> tuple[subprocess.Popen[bytes], str]:
    """Envoy with one static route to the provider: what a sidecar costs with no decisions
    (`access_log`: one for its listener, as bench.breakdown's)."""
    port, admin = free_port(), free_port()
    bootstrap = {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [{"name": "plain", "address": {"socket_address": {
                "address": "127.0.0.1", "port_value": port}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network."
                                 "http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "plain",
                        "access_log": [access_log] if access_log else [],
                        "route_config": {"virtual_hosts": [{
                            "name": "all", "domains": ["*"],
                            "routes": [{"match": {"prefix": "/"},
                                        "route": {"cluster": "provider", "timeout": "60s"}}]}]},
                        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.http."
                                     "router.v3.Router"}}]}}]}]}],
            "clusters": [{"name": "provider", "type": "STATIC", "connect_timeout": "1s",
                          "load_assignment": {"cluster_name": "provider", "endpoints": [{
                              "lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                                  "address": "127.0.0.1", "port_value": upstream}}}}]}]}}]}}
    path = workdir / "plain-envoy.json"
    path.write_text(json.dumps(bootstrap))
    proc = subprocess.Popen([envoy_binary(), "-c", str(path), "--disable-hot-restart",
                             "--log-level", "error", "--base-id", str(free_port())],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: _answers(url), timeout=20, what="plain Envoy")
    return proc, url


def mitmdump_command(upstream_url: str, port: int) -> list[str]:
    """The reference mitmdump: a quiet reverse proxy to `upstream_url` with streamed bodies,
    no addon (bench.instructions counts the same one)."""
    return [str(Path(sys.executable).with_name("mitmdump")), "-q", "--mode",
            f"reverse:{upstream_url}", "--listen-host", "127.0.0.1", "--listen-port",
            str(port), "--set", "stream_large_bodies=1"]


def plain_mitmdump(upstream: int) -> tuple[subprocess.Popen[bytes], str]:
    """mitmdump as a reverse proxy with streamed bodies, no addon."""
    port = free_port()
    proc = subprocess.Popen(mitmdump_command(f"http://127.0.0.1:{upstream}", port),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: _answers(url), timeout=20, what="mitmdump")
    return proc, url


def references(workdir: Path, port: int, procs: list[subprocess.Popen[bytes]]
               ) -> tuple[Path, str, dict[str, tuple[str, dict[str, str]]]]:
    """Plain Envoy and mitmdump in front of the provider on `port` (added to `procs`, which
    the caller stops), the governed profile's config and key, and the paths tollgate is
    measured against: the provider directly, plain Envoy and mitmdump, in `procs`' order."""
    direct = f"http://127.0.0.1:{port}"
    provider = {"authorization": f"Bearer {PROVIDER_KEY}"}
    envoy, envoy_url = plain_envoy(workdir, port)
    procs.append(envoy)
    mitm, mitm_url = plain_mitmdump(port)
    procs.append(mitm)
    config = make_config(workdir, _Url(direct), _Url(f"http://127.0.0.1:{free_port()}"))
    return config, governed(config), {"direct": (direct, provider),
                                       "plain envoy": (envoy_url, provider),
                                       "mitmdump": (mitm_url, provider)}


def start_hosts(hosts: list[str], config: Path, secret: str, workdir: Path,
                gateways: list[GatewayProcess], who: str = "tollgate",
                code: Path | None = None) -> dict[str, tuple[str, dict[str, str]]]:
    """Each tollgate host on the governed profile, its own state (added to `gateways`,
    which the caller stops), and its path for the round robin, named `<who> <host>`;
    `code`: another revision's (a `checkout`), run in place of this checkout's."""
    paths = {}
    for host in hosts:
        gw = GatewayProcess(host, own_state(config, f"{who}-{host}"), workdir,
                            env={"PYTHONPATH": str(code)} if code else None,
                            extra=QUIET.get(host))
        gateways.append(gw)
        gw.start()
        paths[f"{who} {host}"] = (gw.url, {"authorization": f"Bearer {secret}"})
    return paths


def against(wanted: str | None, baseline: Path = BASELINE) -> str | None:
    """The commit to measure beside this checkout: `wanted` (`--against`), by default the
    one `baseline` names; None for `none`, or one not in this clone's history (said so)."""
    if wanted is None and baseline.exists():
        wanted = json.loads(baseline.read_text()).get("revision")
    if not wanted or wanted == "none":
        return None
    revision = revision_of(wanted)
    if revision is None:
        print(f"revision {wanted} is not in this clone's history: not measured beside this "
              "checkout (the stored figures are, where there are any)")
    return revision


def stop_all(gateways: list[GatewayProcess], procs: list[subprocess.Popen[bytes]]) -> None:
    """Stop what a run started: its gateways, then the references and the provider."""
    for gw in gateways:
        gw.stop()
    for proc in procs:
        proc.terminate()
        proc.wait(10)


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/v1/models", timeout=1).status_code == 401
    except httpx.HTTPError:
        return False


def cpu_seconds(pid: int) -> float:
    """User and system CPU of a process and all its descendants (Envoy and ext_proc)."""
    total, stack = 0.0, [pid]
    while stack:
        p = stack.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / TICKS
            for task in Path(f"/proc/{p}/task").iterdir():
                stack += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def modelled(config: Path, secret: str, workdir: Path, procs: list[subprocess.Popen[bytes]],
             compiled: bool) -> tuple[str, tuple[int, int]]:
    """tollgate's Envoy asking the model of a decision service (bench.answerer; `compiled`:
    answerer.c's, else its Python one), added to `procs`: its URL, and the pids of the
    service and of its Envoy."""
    from bench.answerer import decided_headers
    from bench.breakdown import asking, model_store
    from bench.instructions import _decision

    decided = decided_headers(asyncio.run(_decision(own_state(config, "decided"), secret)))
    name = "model" if compiled else "python-model"
    url, _ = asking(config, workdir, procs, decided, name, compiled=compiled,
                    store=model_store(workdir, name))
    return url, (procs[-2].pid, procs[-1].pid)


def cpu_of(pids: int | tuple[int, ...]) -> float:
    """`cpu_seconds` of one process, or of several together."""
    return sum(map(cpu_seconds, pids)) if isinstance(pids, tuple) else cpu_seconds(pids)


async def _streamed(client: httpx.AsyncClient, name: str, url: str,
                    headers: dict[str, str]) -> tuple[float, float]:
    """Time to the first body byte and to the last (ms) of one streamed completion."""
    t0 = time.perf_counter()
    first = None
    async with client.stream("POST", url, content=STREAM_BODY, headers=headers) as r:
        assert r.status_code == 200, f"{name}: {r.status_code}"
        async for chunk in r.aiter_raw():
            if first is None and chunk:
                first = time.perf_counter()
    end = time.perf_counter()
    return ((first or end) - t0) * 1000, (end - t0) * 1000


def turn_order(turn: int) -> tuple[str, str]:
    """The order of a path's two requests in a turn: the JSON answer first in even turns,
    the stream in odd ones. The first is its path's first request since the other paths
    ran, its processes' caches taken by theirs (cold); the second comes right after it
    (warm). In a fixed order one kind was always cold and the other always warm, some 0.45
    ms apart on the Envoy host: with the JSON answer first it added +1.63 to +1.69 ms over
    the direct call and the stream's first byte +1.34 to +1.39; the other way round, +1.18
    to +1.23 and +1.63 to +1.87."""
    return KINDS if turn % 2 == 0 else (KINDS[1], KINDS[0])


async def round_robin(paths: dict[str, tuple[str, dict[str, str]]], n: int,
                      pids: dict[str, int | tuple[int, ...]]
                      ) -> tuple[dict[str, list[float]], dict[str, float]]:
    """`n` turns, each a JSON answer and a stream per path, one path after the other, in a
    new order each turn (a path's time depends a little on which ran just before it: in a
    fixed order the same code measured up to 5% apart on two paths), which of its two
    requests comes first alternating by turn (`turn_order`). Each one's time (ms): the JSON
    answer under the path's name, the stream's to its first and last byte under `<path> sse
    first` and `<path> sse total`, when it came first (cold); with ` warm` after them when
    it came second. And the CPU seconds each path's processes (`pids`: a process and its
    children, or several) spent on them all."""
    shuffled = random.Random(n)  # the same orders on every run
    clients = {name: httpx.AsyncClient(timeout=30) for name in paths}
    try:
        for _ in range(20):  # warm connections and caches
            for name, (url, headers) in paths.items():
                await clients[name].post(url, content=BODY, headers=headers)
                await _streamed(clients[name], name, url, headers)
        before = {k: cpu_of(p) for k, p in pids.items()}
        out: dict[str, list[float]] = {
            f"{name}{part}{regime}": [] for name in paths
            for part in ("", " sse first", " sse total") for regime in ("", " warm")}
        order = list(paths)
        for turn in range(n):
            shuffled.shuffle(order)
            for name in order:
                url, headers = paths[name]
                for i, kind in enumerate(turn_order(turn)):
                    regime = " warm" if i else ""
                    if kind == "json":
                        t0 = time.perf_counter()
                        r = await clients[name].post(url, content=BODY, headers=headers)
                        out[f"{name}{regime}"].append((time.perf_counter() - t0) * 1000)
                        assert r.status_code == 200, f"{name}: {r.status_code} {r.text[:200]}"
                    else:
                        ttfb, total = await _streamed(clients[name], name, url, headers)
                        out[f"{name} sse first{regime}"].append(ttfb)
                        out[f"{name} sse total{regime}"].append(total)
        return out, {k: cpu_of(p) - before[k] for k, p in pids.items()}
    finally:
        for c in clients.values():
            await c.aclose()


@contextmanager
def checkout(revision: str) -> Iterator[Path]:
    """The code of `revision`, in a git worktree that is removed afterwards."""
    where = Path(tempfile.mkdtemp(prefix="tollgate-bench-baseline-")) / "code"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--quiet",
                    str(where), revision], check=True, capture_output=True)
    try:
        yield where
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(where)],
                       capture_output=True)
        where.parent.rmdir()


def with_tables_of(config: Path, code: Path) -> None:
    """`config` reads the price table and model catalog `code` shipped with: a revision's
    code measured beside this checkout reads its own tables (a later one may hold fields it
    does not know, and would refuse to start on it)."""
    text = config.read_text()
    for name in ("prices", "models"):
        text = re.sub(rf"(?m)^(\s+{name}):.*$", rf'\1: "{code}/config/{name}.yaml"', text)
    config.write_text(text)


def revision_of(ref: str) -> str | None:
    """The commit `ref` names in this clone (None: not in its history)."""
    found = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", "--quiet",
                            f"{ref}^{{commit}}"], capture_output=True, text=True)
    return found.stdout.strip() or None


def governed(config: Path) -> str:
    """The governed profile: a key with a model allowlist, under a blocking org budget."""
    tollgate("gateway-budgets", "create", "--name", "bench", "--scope", "org", "--org",
             "acme", "--limit", "1000000", "--on-breach", "block", config=config)
    return new_key(config, "--models-allowed", "gpt-5-mini")


def figures(times: dict[str, list[float]], cpu: dict[str, float], n: int,
            measured: str = "tollgate") -> dict[str, float]:
    """The figures compared with the baseline, all lower-is-better ratios to references
    measured in the same run, so that a slower machine (or a slower hour of a shared one)
    moves the references as much as tollgate: latency to the direct call's p50 and to the
    plain proxy's, CPU to the provider's (the same Python, HTTP and JSON work per request).
    p99 is printed, not compared: a few hundred requests on a shared machine move it by
    half. `measured`: whose paths (`<measured> <host>`): this checkout's, or the baseline
    revision's."""
    p50 = {k: statistics.median(v) for k, v in times.items()}
    per_request = {k: v / n for k, v in cpu.items()}
    per_request["provider"] /= len(cpu)  # it served every path's requests
    out: dict[str, float] = {}
    for host, plain in (("envoy", "plain envoy"), ("mitmproxy", "mitmdump")):
        name = f"{measured} {host}"
        if name not in times:
            continue
        out[f"{host}: p50 / direct p50"] = p50[name] / p50["direct"]
        out[f"{host}: p50 / {plain} p50"] = p50[name] / p50[plain]
        out[f"{host}: CPU / provider CPU"] = per_request[name] / per_request["provider"]
        if f"{name} fallback" in times:
            out[f"{host}: fallback key p50 / {plain} p50"] = \
                p50[f"{name} fallback"] / p50[plain]
        for part, what in (("first", "first byte"), ("total", "last byte")):
            out[f"{host}: SSE {what} / {plain}"] = \
                p50[f"{name} sse {part}"] / p50[f"{plain} sse {part}"]
        if f"{name} redis" in times:  # the same host on a Redis state
            out[f"{host}: Redis p50 / {plain} p50"] = p50[f"{name} redis"] / p50[plain]
            out[f"{host}: Redis SSE first byte / {plain}"] = \
                p50[f"{name} redis sse first"] / p50[f"{plain} sse first"]
    return {k: round(v, 3) for k, v in out.items()}


def compare(now: dict[str, float], baseline: dict[str, float]) -> list[str]:
    """Figures more than TOLERANCE worse than the baseline."""
    return [f"{name}: {value:.3f}, baseline {baseline[name]:.3f} "
            f"(+{(value / baseline[name] - 1) * 100:.0f}%)"
            for name, value in now.items()
            if name in baseline and value > baseline[name] * (1 + TOLERANCE)]


def stored_baseline(path: Path, answer_words: int = 0) -> dict[str, object]:
    """The baseline's stored figures to compare with; none for answers of `answer_words`
    (they are the short answer's)."""
    if answer_words or not path.exists():
        return {}
    return json.loads(path.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--hosts", default="envoy,mitmproxy")
    parser.add_argument("--states", default="sqlite,redis",
                        help="The states the Envoy host is measured on (the mitmproxy host "
                             "and the fallback key: SQLite).")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--concurrent-requests", type=int, default=600,
                        help="Requests per path at --concurrency, for the throughput table "
                             "(the client is Python too: the ratio is what compares); 0 "
                             "leaves the table out (`make bench-quick`).")
    parser.add_argument("--baseline", type=Path, default=BASELINE)
    parser.add_argument("--update-baseline", action="store_true")
    parser.add_argument("--against", metavar="REV",
                        help="The commit whose code is measured beside this checkout's and "
                             "compared with (default: the baseline's `revision`; `none`: "
                             "the stored figures only).")
    parser.add_argument("--models", action="store_true",
                        help=f"Also measure {' and '.join(map(repr, MODELS))}: tollgate's "
                             "Envoy asking a model of a decision service that does only "
                             "what costs most in tollgate's (bench.answerer with a store), "
                             "compiled and in Python: what the Envoy host would add with a "
                             "lean decision.")
    parser.add_argument("--answer-words", type=int, default=0, metavar="N",
                        help="Every answer N words long, the JSON answer and the stream "
                             "(default: the fake provider's few): what each event of a "
                             "long stream costs, the usage cut among it. Compared with a "
                             "revision's code measured in the same run only: the stored "
                             "figures are of the short answer.")
    parser.add_argument("--runs", type=int, default=1,
                        help="Rounds measured; each figure is their median (use 3 or more "
                             "with --update-baseline).")
    args = parser.parse_args()
    if args.answer_words and args.update_baseline:
        parser.error("the baseline's figures are of the short answer: --update-baseline "
                     "without --answer-words")

    stored = stored_baseline(args.baseline, args.answer_words)
    revision = None if args.update_baseline else against(args.against, args.baseline)
    if revision is None:
        return _run(args, stored, None, None)
    with checkout(revision) as code:
        return _run(args, stored, revision, code)


def _run(args: argparse.Namespace, stored: dict[str, object], revision: str | None,
         baseline_code: Path | None) -> int:
    """One run: this checkout's hosts, and `revision`'s (from `baseline_code`) if given."""
    short = revision[:7] if revision else ""  # names the revision's paths and its figures
    workdir, fake_port, fake = bench_setup("tollgate-bench-quick-",
                                           answer_words=args.answer_words)
    procs: list[subprocess.Popen[bytes]] = [fake]
    gateways: list[GatewayProcess] = []
    redis: RedisServer | None = None
    try:
        config, secret, paths = references(workdir, fake_port, procs)
        keys = {"": secret, " fallback": fallback_key(config, "mp_openai", down_provider(config))}
        pids: dict[str, int | tuple[int, ...]] = {
            "provider": procs[0].pid, "plain envoy": procs[1].pid, "mitmdump": procs[2].pid}
        measured: list[tuple[str, dict[str, str] | None]] = [("tollgate", None)]
        if baseline_code is not None and revision is not None:
            measured.append((short, {"PYTHONPATH": str(baseline_code)}))
        hosts = args.hosts.split(",")
        if "envoy" in hosts and "redis" in args.states.split(","):
            if shutil.which("redis-server"):
                redis = RedisServer(workdir / "redis", fsync="everysec").start()
                keys[" redis"] = secret
            else:
                print("redis-server is not installed: the Envoy host on a Redis state is not "
                      "measured (`make bootstrap` installs it)")
        for host in hosts:
            for i, ((who, env), kind) in enumerate(itertools.product(measured, keys)):
                name = f"{who} {host}{kind}"
                if kind == " redis":
                    if host != "envoy":
                        continue
                    state = config.with_name(f"gateway-{name.replace(' ', '-')}.yaml")
                    # A database of its own for each code measured (0 is left unused).
                    state.write_text(with_state(config, redis.database(i)))
                else:
                    state = own_state(config, name.replace(" ", "-"))
                if env is not None:
                    with_tables_of(state, Path(env["PYTHONPATH"]))
                gw = GatewayProcess(host, state, workdir, env=env, extra=QUIET.get(host))
                gateways.append(gw)  # stopped at the end, started or not
                try:
                    gw.start()
                except Exception as e:
                    tail = "\n".join(gw.log().splitlines()[-15:])
                    raise SystemExit(f"{who}'s {host} host did not start ({e}):\n{tail}\n"
                                     "Measure against another revision (--against REV), or "
                                     "against the stored figures (--against none).") from None
                paths[name] = (gw.url, {"authorization": f"Bearer {keys[kind]}"})
                pids[name] = gw.proc.pid
        for model, compiled in MODELS.items() if args.models else ():
            url, pids[model] = modelled(config, secret, workdir, procs, compiled)
            paths[model] = (url, {"authorization": f"Bearer {secret}"})
        paths = {k: (f"{url}/v1/chat/completions", h) for k, (url, h) in paths.items()}
        rounds = [asyncio.run(round_robin(paths, args.requests, pids))
                  for _ in range(args.runs)]
        times, cpu = rounds[-1]
        throughput = {name: asyncio.run(concurrent(url, headers, args.concurrent_requests,
                                                   args.concurrency))[1]
                      for name, (url, headers) in paths.items()
                      if args.concurrent_requests > 0
                      and not name.endswith((" fallback", " redis"))}
    finally:
        stop_all(gateways, procs)
        if redis is not None:
            redis.stop()

    n = args.requests
    # More paths, colder processes: the absolute figures depend on it (see the docstring).
    among = f" ({short}'s hosts among them)" if short else ""
    words = f" of {args.answer_words} words" if args.answer_words else ""
    print(f"\n{n} sequential turns, round-robin across {len(paths)} paths{among}, each a JSON "
          f"answer and a stream{words} per path, either first by turn: the first (cold) and the "
          f"second (`warm`) apart; {os.cpu_count()} cores; "
          f"ms{f' (the last of {args.runs} rounds)' if args.runs > 1 else ''}\n")
    base50, base99 = statistics.median(times["direct"]), percentile(times["direct"], 0.99)
    warm0 = statistics.median(times["direct warm"])
    header = (f"{'JSON answer':<28} {'p50':>7} {'p99':>7} {'+p50':>7} {'+p99':>7} "
              f"{'warm':>7} {'+warm':>7} {'CPU/req':>8}")
    print(header)
    print("-" * len(header))
    for key in cpu:
        name = "direct" if key == "provider" else key
        values = times[name]
        p50, p99 = statistics.median(values), percentile(values, 0.99)
        warm = statistics.median(times[f"{name} warm"])
        spent = cpu[key] / n / (len(cpu) if key == "provider" else 1)
        print(f"{name:<28} {p50:>7.3f} {p99:>7.3f} {p50 - base50:>+7.3f} "
              f"{p99 - base99:>+7.3f} {warm:>7.3f} {warm - warm0:>+7.3f} {spent * 1000:>8.3f}")
    first0 = statistics.median(times["direct sse first"])
    total0 = statistics.median(times["direct sse total"])
    first_warm0 = statistics.median(times["direct sse first warm"])
    header = (f"{'stream (SSE)':<28} {'first':>7} {'+first':>7} {'last':>7} {'+last':>7} "
              f"{'warm':>7} {'+warm':>7}")
    print(f"\n{header}\n{'-' * len(header)}")
    for name in cpu:
        name = "direct" if name == "provider" else name
        first = statistics.median(times[f"{name} sse first"])
        total = statistics.median(times[f"{name} sse total"])
        first_warm = statistics.median(times[f"{name} sse first warm"])
        print(f"{name:<28} {first:>7.3f} {first - first0:>+7.3f} {total:>7.3f} "
              f"{total - total0:>+7.3f} {first_warm:>7.3f} {first_warm - first_warm0:>+7.3f}")
    if throughput:
        header = f"{f'{args.concurrency} concurrent':<28} {'req/s':>7}"
        print(f"\n{header}\n{'-' * len(header)}")
        for name, rate in throughput.items():
            print(f"{name:<28} {rate:>7.0f}")
        for host, plain in (("envoy", "plain envoy"), ("mitmproxy", "mitmdump")):
            if f"tollgate {host}" in throughput:
                ratio = throughput[f"tollgate {host}"] / throughput[plain]
                print(f"{host}: tollgate / {plain}: {ratio:.2f}")
        print("(printed, not compared with the baseline: the client and the fake provider "
              "are Python too, and bind this figure; it moves by a third between runs)")
    now = _median_figures(rounds, n)
    figures_stored = cast(dict[str, float], stored.get("figures", {}))
    reference, against = figures_stored, "the stored baseline"
    if revision is not None:
        reference = _median_figures(rounds, n, short)
        against = f"{short}'s code (measured in this run)"
    print("\n(CPU/req: a JSON answer and a stream together; `direct`: the provider's own, per "
          "pair it served. SSE `warm`: its first byte. The figures read the cold ones.)\n\n"
          f"Figures (ratios to this run's references; lower is better; the gateway on "
          f"{interpreter()}):\n")
    print(f"  {'':<44} {'now':>7}  {f'{short} (same run)' if short else '':>18}"
          f"  {'stored':>14}")
    for name, value in now.items():
        same_run = f"{reference[name]:>7.3f} ({value / reference[name]:.2f}x)" \
            if revision and reference.get(name) else ""
        before = figures_stored.get(name)
        vs = f"{before:>6.3f} ({value / before:.2f}x)" if before else ""
        print(f"  {name:<44} {value:>7.3f}  {same_run:>18}  {vs:>14}")
    if args.update_baseline:
        head = revision_of("HEAD")
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True
                               ).stdout.strip()
        args.baseline.write_text(json.dumps({
            "machine": f"{os.cpu_count()} cores, {platform.machine()}, "
                       f"Python {platform.python_version()}",
            "requests": n, "runs": args.runs, "revision": head, "figures": now},
            indent=2) + "\n")
        print(f"\nbaseline written to {args.baseline} (revision {head}): commit it with the "
              "reason" + ("; the checkout had uncommitted changes, which the revision does "
                          "not hold" if dirty else ""))
        return 0
    worse = compare(now, reference)
    if worse:
        print(f"\nWORSE by more than {TOLERANCE:.0%} than {against}:")
        for line in worse:
            print(f"  {line}")
        return 1
    print(f"\nwithin {TOLERANCE:.0%} of {against}" if reference else "\nno baseline yet")
    return 0


def _median_figures(rounds: list[tuple[dict[str, list[float]], dict[str, float]]], n: int,
                    measured: str = "tollgate") -> dict[str, float]:
    """Each figure's median over the rounds."""
    each = [figures(t, c, n, measured) for t, c in rounds]
    return {name: statistics.median(f[name] for f in each) for name in each[0]}


if __name__ == "__main__":
    sys.exit(main())
