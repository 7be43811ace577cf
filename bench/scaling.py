"""Throughput of the Envoy host with 1 and more ext_proc processes, against plain Envoy.

    python -m bench.scaling [--processes 1,2] [--seconds 10] [--connections 32]
                            [--state sqlite|redis]

Every part but tollgate is compiled, so tollgate is what binds the figure: the load comes from
`wrk` (apt-get install wrk), and the provider is an Envoy that answers every chat completion
itself (`direct_response`, with usage), so the provider costs next to nothing. Each path gets
the same POST with `--connections` in flight for `--seconds`, after a warm-up. The gateway runs
the governed profile (a key with a model allowlist under a blocking org budget) on the state
`--state` names: SQLite (one node's file, which its processes share) or Redis (what replicas
share; append-only with an fsync on every write, the most careful setting, as the tests run
it). By default Redis when `redis-server` is installed, else SQLite.

Prints requests per second, the CPU the gateway's processes (Envoy and every ext_proc) spent
per request, and the ratio of N processes to one. On a machine with C cores, the load
generator and Envoy take some of them: expect N processes to approach N times one process
while N + 1 < C, and to level off after.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

from bench.latency import BODY, PROVIDER_KEY, _Url, new_key, with_state
from bench.quick import governed
from extproc.runner import envoy_binary
from tests.conftest import make_config
from tests.harness import GatewayProcess, RedisServer, free_port, wait_until

TICKS = os.sysconf("SC_CLK_TCK")
ANSWER = json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 1767225600,
    "model": "gpt-5-mini", "choices": [{"index": 0, "finish_reason": "stop", "message": {
        "role": "assistant", "content": "A short answer from the compiled provider."}}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21}})


def envoy(workdir: Path, name: str, route: dict, clusters: list[dict],
           filters: tuple[dict, ...] = (), wrap: list[str] | None = None
           ) -> tuple[subprocess.Popen[bytes], int]:
    """An Envoy of one route, `filters` before its router; `wrap`: the command it runs under
    (a profiler)."""
    port = free_port()
    bootstrap = {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1",
                                                 "port_value": free_port()}}},
        "static_resources": {"listeners": [{
            "name": name, "address": {"socket_address": {"address": "127.0.0.1",
                                                         "port_value": port}},
            "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network."
                             "http_connection_manager.v3.HttpConnectionManager",
                    "stat_prefix": name,
                    "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"],
                                                        "routes": [route]}]},
                    "http_filters": [*filters, {
                        "name": "envoy.filters.http.router", "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.http."
                                     "router.v3.Router"}}]}}]}]}],
            "clusters": clusters}}
    path = workdir / f"{name}.json"
    path.write_text(json.dumps(bootstrap))
    proc = subprocess.Popen([*(wrap or []), envoy_binary(), "-c", str(path),
                             "--disable-hot-restart",
                             "--log-level", "error", "--base-id", str(free_port())],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, port


def compiled_provider(workdir: Path, whole_request: bool = True
                      ) -> tuple[subprocess.Popen[bytes], str]:
    """An OpenAI-shaped provider that costs next to nothing: Envoy answering by itself.
    `whole_request=False`: it answers on the request's headers and closes the connection
    (see bench.transport)."""
    proc, port = envoy(workdir, "provider", {
        "match": {"prefix": "/"},
        "direct_response": {"status": 200, "body": {"inline_string": ANSWER}},
        "response_headers_to_add": [{"header": {"key": "content-type",
                                                "value": "application/json"}}]}, [],
        # The whole request is read before the answer: an answer sent while the body is
        # still coming ends the connection, and a proxy in front (which writes the body
        # after the headers) would then open one per request, as no real provider makes it.
        filters=({"name": "envoy.filters.http.buffer", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer",
            "max_request_bytes": 1 << 20}},) if whole_request else ())
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


def tree_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of `pid` and every process below it, by what each is: `envoy`,
    `ext_proc 0` (the gateway itself) and `ext_proc <i>` (its other processes)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    out: dict[str, float] = {}
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
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / TICKS
        todo += children.get(p, [])
    return out


def spent(before: dict[str, float], after: dict[str, float], requests: int
          ) -> dict[str, float]:
    """CPU ms per request, by process."""
    return {k: (v - before.get(k, 0.0)) / requests * 1000 for k, v in sorted(after.items())}


def post_script(workdir: Path, headers: dict[str, str]) -> Path:
    """A wrk script that POSTs the benchmark's chat completion with `headers`."""
    script = workdir / "post.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = {json.dumps(BODY.decode())}\n"
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
    redis = RedisServer(workdir / "redis").start()
    config.write_text(with_state(config, redis.url))
    return "Redis", redis


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", default="1,2")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--state", choices=["sqlite", "redis"],
                        default="redis" if shutil.which("redis-server") else "sqlite")
    args = parser.parse_args()
    if not ready_for_wrk():
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="tollgate-bench-scaling-"))
    procs: list[subprocess.Popen[bytes]] = []
    redis = None
    rows: list[tuple[str, float, dict[str, float], int]] = []
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
        rows.append(("plain envoy", rate, spent(before, tree_cpu(plain.pid), done), bad))
        for n in (int(p) for p in args.processes.split(",")):
            gw = GatewayProcess("envoy", config, workdir,
                                extra=["--extproc-processes", str(n)]).start()
            try:
                auth = {"authorization": f"Bearer {secret}"}
                wrk(f"{gw.url}{url}", auth, 2, args.connections, workdir)
                before = tree_cpu(gw.proc.pid)
                rate, done, bad = wrk(f"{gw.url}{url}", auth, args.seconds,
                                      args.connections, workdir)
                rows.append((f"tollgate x{n}", rate, spent(before, tree_cpu(gw.proc.pid),
                                                           done), bad))
            finally:
                gw.stop()
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)
        if redis is not None:
            redis.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"\n{args.connections} in flight for {args.seconds} s (wrk); {os.cpu_count()} cores; "
          f"governed profile on {state}\n")
    header = f"{'path':<16} {'req/s':>8} {'CPU/req ms':>11} {'non-2xx':>8} {'vs x1':>6}  by process"
    print(f"{header}\n{'-' * len(header)}")
    one = next((r[1] for r in rows if r[0] == "tollgate x1"), None)
    for name, rate, cpu, bad in rows:
        ratio = f"{rate / one:>6.2f}" if one and name.startswith("tollgate") else " " * 6
        split = ", ".join(f"{k} {v:.2f}" for k, v in cpu.items())
        print(f"{name:<16} {rate:>8.0f} {sum(cpu.values()):>11.3f} {bad:>8} {ratio}  {split}")
    return 1 if any(bad for *_, bad in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
