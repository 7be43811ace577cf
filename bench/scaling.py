"""Throughput of the Envoy host with 1 and more ext_proc processes, against plain Envoy.

    python -m bench.scaling [--processes 1,2] [--seconds 10] [--connections 32]
                            [--state sqlite|redis] [--cpu-share F]
                            [--per-process] [--rounds R]

Every part but tollgate is compiled, so tollgate is what binds the figure: the load comes from
`wrk` (apt-get install wrk), and the provider is an Envoy that answers every chat completion
itself (`direct_response`, with usage), so the provider costs next to nothing. Each path gets
the same POST with `--connections` in flight for `--seconds`, after a warm-up. The gateway runs
the governed profile (a key with a model allowlist under a blocking org budget) on the state
`--state` names: SQLite (one node's file, which its processes share) or Redis (what replicas
share; append-only with an fsync on every write, the most careful setting, as the tests run
it). By default Redis when `redis-server` is installed, else SQLite.

Prints requests per second, the CPU the gateway's processes (Envoy and every ext_proc) spent
per request, the ratio of N processes to one, the most memory each process held resident
(VmHWM, from its start to the run's end), and how long after the load every request was in
the ledger: a rate whose requests are settled long after it (their ends waiting in memory)
is not one the gateway sustains. On a machine with C cores, the load
generator and Envoy take some of them: expect N processes to approach N times one process
while N + 1 < C, and to level off after.

`--cpu-share F` shows the growth on a machine with too few cores for it: each ext_proc
process runs in a cgroup of its own capped at F of a CPU (CFS quota; run as root), a core
scaled down, so N processes hold N such cores while Envoy, wrk and the provider keep the
rest. What the cap cannot bind (Envoy spreading the load over the processes, the state they
share) is what the ratio then measures. The table adds each process's CPU use over the run,
as a share of its cap, and how often the cap throttled it: a process near 100% of its cap
is what bound the figure. `--per-process` makes `--connections` the requests in flight per
ext_proc process (N processes get N times as many), so that each process meets the same load
at every N, as each core of a bigger machine would. `--rounds R` measures each N R times,
in turn, and prints the round of the median rate (and every rate), and the median of each
round's ratio to that round's x1: one run of 10 s moves by 10% or more on a shared machine.
On a machine with fewer cores than processes, the capped processes also share vCPUs with
Envoy, wrk and the provider, as one process beside them mostly does not: on 2 cores, x2
measured about 1.8 times x1 this way, and 2 times (the median of four pairs of runs, x1 and
x2 in turn) with every ext_proc process on one vCPU and everything else on the other.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
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
from typing import Any

import httpx

from bench.latency import BODY, PROVIDER_KEY, _Url, new_key, with_state
from bench.quick import governed
from extproc.runner import envoy_binary
from tests.conftest import make_config
from tests.harness import GatewayProcess, RedisServer, free_port, ledger, wait_until

TICKS = os.sysconf("SC_CLK_TCK")
ANSWER = json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 1767225600,
    "model": "gpt-5-mini", "choices": [{"index": 0, "finish_reason": "stop", "message": {
        "role": "assistant", "content": "A short answer from the compiled provider."}}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21}})

# Requests with this header are answered a chat-completions stream (STREAMED, OpenAI's own
# compact JSON, the usage chunk a client without `stream_options` did not ask for among it).
STREAM_HEADER = "x-bench-stream"


def _event(**fields: object) -> str:
    return "data: " + json.dumps({
        "id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1767225600,
        "model": "gpt-5-mini", **fields}, separators=(",", ":")) + "\n\n"


def _chunk(delta: dict[str, object], finish: str | None = None) -> str:
    return _event(choices=[{"index": 0, "delta": delta, "finish_reason": finish}])


STREAMED = "".join([
    _chunk({"role": "assistant", "content": ""}),
    *(_chunk({"content": f"word{i} "}) for i in range(100)),
    _chunk({}, "stop"),
    _event(choices=[], usage={"prompt_tokens": 12, "completion_tokens": 100,
                              "total_tokens": 112}),
    "data: [DONE]\n\n"])


def envoy(workdir: Path, name: str, route: dict | list[dict], clusters: list[dict],
          filters: tuple[dict, ...] = (), wrap: list[str] | None = None,
          socket: Path | None = None, args: tuple[str, ...] = ()
          ) -> tuple[subprocess.Popen[bytes], int]:
    """An Envoy of one route (or of several, in order), `filters` before its router, on a
    free TCP port it returns (0 with `socket`: it listens on that Unix socket instead);
    `wrap`: the command it runs under (a profiler); `args`: more of Envoy's options."""
    port = 0 if socket else free_port()
    address = {"pipe": {"path": str(socket)}} if socket else \
        {"socket_address": {"address": "127.0.0.1", "port_value": port}}
    bootstrap = {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1",
                                                 "port_value": free_port()}}},
        "static_resources": {"listeners": [{
            "name": name, "address": address,
            "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network."
                             "http_connection_manager.v3.HttpConnectionManager",
                    "stat_prefix": name,
                    "route_config": {
                        "virtual_hosts": [{
                            "name": "all", "domains": ["*"],
                            "routes": route if isinstance(route, list) else [route]}],
                        "max_direct_response_body_size_bytes": 1 << 16},  # STREAMED
                    "http_filters": [*filters, {
                        "name": "envoy.filters.http.router", "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.http."
                                     "router.v3.Router"}}]}}]}]}],
            "clusters": clusters}}
    path = workdir / f"{name}.json"
    path.write_text(json.dumps(bootstrap))
    proc = subprocess.Popen([*(wrap or []), envoy_binary(), "-c", str(path),
                             "--disable-hot-restart",
                             "--log-level", "error", "--base-id", str(free_port()), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, port


def cluster(name: str, address: dict[str, Any], h2: bool = False) -> dict[str, Any]:
    """A static cluster of one endpoint, with no circuit breaker a load test would trip."""
    out: dict[str, Any] = {
        "name": name, "type": "STATIC", "connect_timeout": "1s",
        "circuit_breakers": {"thresholds": [{"max_requests": 100_000,
                                             "max_pending_requests": 100_000,
                                             "max_connections": 100_000}]},
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": address}}]}]}}
    if h2:
        out["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3."
                         "HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}}}
    return out


# The whole request is read before an answer Envoy makes itself: an answer sent while the
# body is still coming ends the connection, and a proxy in front (which writes the body after
# the headers) would then open one per request, as no real service makes it.
WHOLE_REQUEST = {"name": "envoy.filters.http.buffer", "typed_config": {
    "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer",
    "max_request_bytes": 1 << 20}}


def compiled_provider(workdir: Path, whole_request: bool = True
                      ) -> tuple[subprocess.Popen[bytes], str]:
    """An OpenAI-shaped provider that costs next to nothing: Envoy answering by itself
    (ANSWER; STREAMED, in one piece, to a request with STREAM_HEADER). `whole_request=False`:
    it answers on the request's headers and closes the connection (see bench.transport)."""
    def answering(body: str, content_type: str, **match: object) -> dict[str, object]:
        return {"match": {"prefix": "/", **match},
                "direct_response": {"status": 200, "body": {"inline_string": body}},
                "response_headers_to_add": [{"header": {"key": "content-type",
                                                        "value": content_type}}]}

    proc, port = envoy(workdir, "provider", [
        answering(STREAMED, "text/event-stream",
                  headers=[{"name": STREAM_HEADER, "present_match": True}]),
        answering(ANSWER, "application/json")], [],
        filters=(WHOLE_REQUEST,) if whole_request else ())
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: httpx.post(f"{url}/v1/chat/completions").status_code == 200,
               timeout=20, what="the compiled provider")
    return proc, url


def plain_envoy(workdir: Path, upstream: str, wrap: list[str] | None = None
                ) -> tuple[subprocess.Popen[bytes], str]:
    """`wrap`: the command it runs under (a profiler, which slows its start)."""
    host, port = upstream.removeprefix("http://").split(":")
    proc, listen = envoy(workdir, "plain", {
        "match": {"prefix": "/"}, "route": {"cluster": "provider", "timeout": "60s"}}, [{
            "name": "provider", "type": "STATIC", "connect_timeout": "1s",
            "load_assignment": {"cluster_name": "provider", "endpoints": [{"lb_endpoints": [{
                "endpoint": {"address": {"socket_address": {
                    "address": host, "port_value": int(port)}}}}]}]}}], wrap=wrap)
    url = f"http://127.0.0.1:{listen}"
    wait_until(lambda: httpx.post(f"{url}/v1/chat/completions", timeout=30).status_code
               == 200, timeout=300 if wrap else 20, what="plain Envoy")
    return proc, url


def tree(pid: int) -> Iterator[tuple[int, str, float]]:
    """`pid` and every process below it: (pid, what it is, CPU seconds). What it is:
    `envoy`, `ext_proc 0` (the gateway itself) or `ext_proc <i>` (its other processes)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            argv = Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"extproc.worker" in argv:
            name = f"ext_proc {argv[argv.index(b'--process') + 1].decode()}"
        else:
            name = "ext_proc 0" if b"serve" in argv else Path(argv[0].decode()).name
        yield p, name, (int(fields[11]) + int(fields[12])) / TICKS
        todo += children.get(p, [])


def tree_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of `pid` and every process below it, by what each is (`tree`)."""
    out: dict[str, float] = {}
    for _, name, cpu in tree(pid):
        out[name] = out.get(name, 0.0) + cpu
    return out


def status_mib(pid: int, field: str) -> float:
    """A memory figure of /proc/PID/status (`VmRSS`, `VmHWM`, ...) in MiB; 0 if it has none."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return 0.0


def peak_rss(pid: int) -> dict[str, float]:
    """The most memory `pid` and each process below it have held resident (VmHWM), in MiB,
    by what each is (`tree`)."""
    out: dict[str, float] = {}
    for p, name, _ in tree(pid):
        with contextlib.suppress(OSError):  # a process that has ended since
            out[name] = out.get(name, 0.0) + status_mib(p, "VmHWM")
    return out


PERIOD_US = 10_000  # short, so a capped process waits at most a few ms for its next turn


def cpu_controller() -> Path | None:
    """Where new cgroups with a CPU cap are made: cgroup v2's root when it has the `cpu`
    controller, else cgroup v1's `cpu` hierarchy; None when neither is mounted."""
    for line in Path("/proc/mounts").read_text().splitlines():
        _, where, kind, options, *_ = line.split()
        if kind == "cgroup2" and "cpu" in (Path(where) / "cgroup.subtree_control"
                                          ).read_text().split():
            return Path(where)
        if kind == "cgroup" and "cpu" in options.split(","):
            return Path(where)
    return None


@contextmanager
def capped(pids: dict[str, int], share: float) -> Iterator[dict[str, Path]]:
    """Each of `pids` (by name) in a cgroup of its own capped at `share` of a CPU; yields
    the cgroups, removed after (what is left in them goes back to the root group)."""
    root = cpu_controller()
    if root is None:
        raise SystemExit("--cpu-share: no cgroup CPU controller is mounted")
    quota = max(1000, round(share * PERIOD_US))
    groups: dict[str, Path] = {}
    try:
        for name, pid in pids.items():
            group = root / f"tollgate-bench-{os.getpid()}-{name.replace(' ', '-')}"
            group.mkdir()
            groups[name] = group
            if (group / "cpu.max").exists():  # v2
                (group / "cpu.max").write_text(f"{quota} {PERIOD_US}")
            else:
                (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
                (group / "cpu.cfs_quota_us").write_text(str(quota))
            (group / "cgroup.procs").write_text(str(pid))  # every thread, and those to come
        yield groups
    finally:
        for group in groups.values():
            for pid in (group / "cgroup.procs").read_text().split():
                with contextlib.suppress(ProcessLookupError):  # gone meanwhile
                    (root / "cgroup.procs").write_text(pid)
            group.rmdir()


def machine_busy() -> tuple[float, float]:
    """(busy, all) CPU time of the whole machine so far, in ticks (/proc/stat)."""
    user, nice, system, idle, iowait, *rest = map(int, Path("/proc/stat").read_text()
                                                  .split("\n", 1)[0].split()[1:9])
    busy = user + nice + system + sum(rest)
    return busy, busy + idle + iowait


def throttled(group: Path) -> int:
    """How many periods the cgroup's cap held it back in."""
    stat = dict(line.split() for line in (group / "cpu.stat").read_text().splitlines())
    return int(stat["nr_throttled"])


def spent(before: dict[str, float], after: dict[str, float], requests: int
          ) -> dict[str, float]:
    """CPU ms per request, by process."""
    return {k: (v - before.get(k, 0.0)) / requests * 1000 for k, v in sorted(after.items())}


def post_script(workdir: Path, headers: dict[str, str], body: bytes = BODY,
                name: str = "post.lua") -> Path:
    """A wrk script that POSTs the benchmark's chat completion (or `body`) with `headers`."""
    script = workdir / name
    script.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = {json.dumps(body.decode())}\n"
        + "".join(f'wrk.headers["{k}"] = "{v}"\n'
                  for k, v in {"content-type": "application/json", **headers}.items()))
    return script


def wrk(url: str, headers: dict[str, str], seconds: int, connections: int,
        workdir: Path) -> tuple[float, int, int]:
    """(requests per second, requests, non-2xx answers) from wrk."""
    script = post_script(workdir, headers)
    out = subprocess.run(["wrk", "-t", "1", "-c", str(connections), "-d", f"{seconds}s",
                          "-s", str(script), url], capture_output=True, text=True,
                         check=True).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    done = int(re.search(r"(\d+) requests in", out).group(1))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return rate, done, int(bad.group(1)) if bad else 0


def ready_for_wrk() -> bool:
    """Whether `wrk` is installed (say so if not); the environment the gateway runs in."""
    if shutil.which("wrk") is None:
        print("wrk is not installed: apt-get install wrk", file=sys.stderr)
        return False
    os.environ.setdefault("TOLLGATE_KEY_PEPPER", "bench-pepper")
    os.environ["FAKE_OPENAI_KEY"] = PROVIDER_KEY
    os.environ.setdefault("FAKE_ANTHROPIC_KEY", "unused")
    return True


def use_state(config: Path, workdir: Path, state: str) -> tuple[str, RedisServer | None]:
    """The gateway of `config` on `state` (`sqlite` as made, or `redis`: a Redis server
    started in `workdir`, for the caller to stop): its name, and the server."""
    if state == "sqlite":
        return "SQLite", None
    with_state(config, "redis://")  # refused before a server is started for nothing
    redis = RedisServer(workdir / "redis", fsync="everysec").start()
    config.write_text(with_state(config, redis.url))
    return "Redis", redis


Row = tuple[str, float, dict[str, float], int, str]


SETTLED_WITHIN = 30.0


def settled_after(config: Path, rows: int) -> float | None:
    """Seconds until the ledger holds `rows` rows: the answered rate is a rate the gateway
    sustains only if its requests are settled as they go, not long after the load (None:
    not within `SETTLED_WITHIN`)."""
    started = time.monotonic()
    while len(ledger(config)) < rows:
        if time.monotonic() - started > SETTLED_WITHIN:
            return None
        time.sleep(0.2)
    return time.monotonic() - started


def measure(config: Path, workdir: Path, secret: str, n: int, connections: int,
            seconds: int, cpu_share: float | None) -> Row:
    """tollgate's Envoy host with `n` ext_proc processes (each capped at `cpu_share` of a
    CPU, if given) under wrk: its row of the table."""
    gw = GatewayProcess("envoy", config, workdir, extra=["--extproc-processes", str(n)]).start()
    with contextlib.ExitStack() as stack:
        stack.callback(gw.stop)
        groups: dict[str, Path] = {}
        if cpu_share is not None:
            groups = stack.enter_context(capped(
                {name: pid for pid, name, _ in tree(gw.proc.pid)
                 if name.startswith("ext_proc")}, cpu_share))
        url = f"{gw.url}/v1/chat/completions"
        auth = {"authorization": f"Bearer {secret}"}
        wrk(url, auth, 2, connections, workdir)  # warm-up
        time.sleep(1)  # (its requests settled)
        recorded = len(ledger(config))
        before = tree_cpu(gw.proc.pid)
        held = {name: throttled(group) for name, group in groups.items()}
        started, machine = time.monotonic(), machine_busy()
        rate, done, bad = wrk(url, auth, seconds, connections, workdir)
        wall = time.monotonic() - started
        after = tree_cpu(gw.proc.pid)
        lag = settled_after(config, recorded + done)
        busy = [b - a for a, b in zip(machine, machine_busy(), strict=True)]
        use = f"machine {busy[0] / busy[1]:.0%} busy" + "".join(
            f", {name} {(after[name] - before[name]) / wall / cpu_share:.0%} "
            f"({throttled(group) - held[name]} throttled)"
            for name, group in sorted(groups.items()) if cpu_share is not None)
        use += "; peak RSS " + ", ".join(f"{name} {mib:.0f} MiB" for name, mib
                                         in sorted(peak_rss(gw.proc.pid).items()))
        use += f"; every request settled {lag:.1f} s after the load" if lag is not None \
            else f"; requests still unsettled {SETTLED_WITHIN:.0f} s after the load"
        return f"tollgate x{n}", rate, spent(before, after, done), bad, use


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", default="1,2")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--state", choices=["sqlite", "redis"],
                        default="redis" if shutil.which("redis-server") else "sqlite")
    parser.add_argument("--cpu-share", type=float, metavar="F",
                        help="cap each ext_proc process at F of a CPU (a cgroup each; root)")
    parser.add_argument("--per-process", action="store_true",
                        help="--connections in flight per ext_proc process")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure each count of processes this many times, in turn, "
                             "and print the median")
    args = parser.parse_args()
    if not ready_for_wrk():
        return 2
    if args.cpu_share is not None and (cpu_controller() is None or os.geteuid() != 0):
        print("--cpu-share: needs root and a cgroup CPU controller (cgroup v1 `cpu`, or v2 "
              "with `cpu` in the root's cgroup.subtree_control)", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="tollgate-bench-scaling-"))
    procs: list[subprocess.Popen[bytes]] = []
    redis = None
    rows: list[Row] = []
    ratios: dict[str, float] = {}  # N processes to one, the median of the rounds' own
    try:
        provider, provider_url = compiled_provider(workdir)
        procs.append(provider)
        plain, plain_url = plain_envoy(workdir, provider_url)
        procs.append(plain)
        config = make_config(workdir, _Url(provider_url),
                             _Url(f"http://127.0.0.1:{free_port()}"))
        state, redis = use_state(config, workdir, args.state)
        secret = governed(config)
        new_key(config)  # the key index is what a real config holds: more than one key
        url = "/v1/chat/completions"
        wrk(f"{plain_url}{url}", {}, 2, args.connections, workdir)  # warm-up
        before = tree_cpu(plain.pid)
        rate, done, bad = wrk(f"{plain_url}{url}", {}, args.seconds, args.connections,
                              workdir)
        rows.append(("plain envoy", rate, spent(before, tree_cpu(plain.pid), done), bad, ""))
        counts = [int(p) for p in args.processes.split(",")]
        runs: dict[int, list[Row]] = {n: [] for n in counts}
        for _ in range(args.rounds):  # each round meets the machine as it is then
            for n in counts:
                connections = args.connections * n if args.per_process else args.connections
                runs[n].append(measure(config, workdir, secret, n, connections, args.seconds,
                                       args.cpu_share))
        for n in counts:  # the round of the median rate
            ranked = sorted(runs[n], key=lambda r: r[1])
            name, rate, cpu, bad, use = ranked[len(ranked) // 2]
            if args.rounds > 1:
                use = f"rates {', '.join(f'{r[1]:.0f}' for r in runs[n])}; {use}"
            rows.append((name, rate, cpu, sum(r[3] for r in runs[n]), use))
            if 1 in runs:  # each round's own ratio: a round the machine slowed slows all
                ratios[name] = statistics.median(
                    r[1] / one[1] for r, one in zip(runs[n], runs[1], strict=True))
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)
        if redis is not None:
            redis.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    capped_at = "" if args.cpu_share is None else \
        f"; each ext_proc process capped at {args.cpu_share:g} of a CPU"
    in_flight = f"{args.connections} per ext_proc process" if args.per_process else \
        str(args.connections)
    print(f"\n{in_flight} in flight for {args.seconds} s (wrk); {os.cpu_count()} cores; "
          f"governed profile on {state}{capped_at}\n")
    header = f"{'path':<16} {'req/s':>8} {'CPU/req ms':>11} {'non-2xx':>8} {'vs x1':>6}  by process"
    print(f"{header}\n{'-' * len(header)}")
    for name, rate, cpu, bad, _ in rows:
        ratio = f"{ratios[name]:>6.2f}" if name in ratios else " " * 6
        split = ", ".join(f"{k} {v:.2f}" for k, v in cpu.items())
        print(f"{name:<16} {rate:>8.0f} {sum(cpu.values()):>11.3f} {bad:>8} {ratio}  {split}")
    print("\nover the run: how busy the machine was" + (
        "" if args.cpu_share is None else ", and each process's use of its cap (the periods "
        f"of {PERIOD_US // 1000} ms it was held back in)") + "; the most memory each process "
          "held resident from its start")
    for name, *_, use in rows[1:]:
        print(f"{name:<16} {use}")
    return 1 if any(row[3] for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
