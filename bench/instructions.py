"""Instructions per request, counted by valgrind's callgrind: the figure a shared machine
cannot move. CPU time per request drifts by 15-25% between runs on such a machine, so a
change of a few percent hides in it; instruction counts repeat within 1%.

    python -m bench.instructions [--requests 300]
                                 [--parts envoy,stream,decider,served,mitmproxy,envoy-split]

- `plain envoy`: an Envoy of one route to the provider, for scale;
- `tollgate envoy`: tollgate's own rendered Envoy configuration in front of the same
  provider, with a decision service that answers, at no cost, the decision tollgate makes
  for the request (computed once, by tollgate), and a receiver of its access log (the
  requests' ends) that reads and drops it: what Envoy itself spends per request;
- `plain envoy, stream` and `tollgate envoy, stream`: the same for the OpenAI SDK's default
  stream (no `stream_options`: the gateway asks for the usage chunk and its usage cut keeps
  it from the client), answered 102 events in one piece: each of its bytes is read by the
  meter and the cut;
- `decision service`: tollgate's Python per request as its decision service runs it
  (the decision, its answer, its response's bytes as their end reports them, and the
  settlement, on Redis state when `redis-server` is installed, else SQLite), in-process,
  32 requests in flight;
- `served decisions`: the same as `tollgate serve envoy` runs it behind its Envoy, one
  request at a time: with its HTTP exchange per request with Envoy (the decision), the
  access log that brings its end, and without the batching that requests in flight
  together share;
- `mitmdump`: mitmdump as a reverse proxy to the provider, bodies streamed, for scale;
- `tollgate mitmproxy`: `tollgate serve mitmproxy` (one process: mitmproxy and the addon,
  deciding, metering and settling on SQLite state), one request at a time; quiet (`-q`),
  as `mitmdump` is;
- `tollgate envoy, no meter`, `..., no end log` and `..., no meter or logs` (`--parts
  envoy-split`, not in the defaults): tollgate's Envoy with its meter filter, the access
  log of responses' ends, or both and its other access logs taken out of the rendered
  configuration; what each costs Envoy is `tollgate envoy`'s count less its row (the rest
  is the decision: the decide filter and its exchange).

Each is counted after a warm-up, over `--requests` requests (the provider is an Envoy
answering by itself, outside the count). Callgrind slows what it runs some fifty times: a
run takes a few minutes. apt-get install valgrind.

The counts are compared with `bench/instructions.json`: any more than 5% over it is flagged
(exit status 1). `--update-baseline` rewrites it from this run: commit it with the reason.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import functools
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import yaml

from bench.latency import BODY, PROVIDER_KEY, QUIET, _Url, scratch_dir, with_state
from bench.quick import STREAM_BODY, governed, mitmdump_command
from bench.scaling import STREAM_HEADER, compiled_provider, plain_envoy
from bench.transport import bare_service
from extproc import eventloop
from extproc.runner import envoy_binary
from tests.conftest import make_config
from tests.harness import GatewayProcess, RedisServer, free_port, wait_until

CONCURRENCY = 32
WARM_UP = 300
BASELINE = Path(__file__).with_name("instructions.json")
TOLERANCE = 0.05  # counts repeat within 1-2%


def _callgrind(out: Path) -> list[str]:
    return ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
            f"--log-file={out.with_suffix('.log')}"]


def _counted(pid: int, out: Path, run: Any) -> int:
    """Instructions `pid` (under callgrind) executes while `run()` runs."""
    subprocess.run(["callgrind_control", "-z", str(pid)], check=True, capture_output=True)
    run()
    subprocess.run(["callgrind_control", "-d", str(pid)], check=True, capture_output=True)
    dump = out.with_name(f"{out.name}.1")
    wait_until(dump.exists, timeout=60, what="callgrind's dump")
    time.sleep(0.5)  # written whole
    for line in dump.read_text().splitlines():
        if line.startswith("totals:"):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {dump}")


def _posts(url: str, headers: dict[str, str], n: int, body: bytes = BODY) -> None:
    with httpx.Client(timeout=120) as client:
        for _ in range(n):
            r = client.post(url, content=body, headers=headers)
            r.raise_for_status()


def _warm_then_count(pid: int, out: Path, url: str, headers: dict[str, str], n: int,
                     body: bytes = BODY) -> float:
    """Instructions per request of `pid` over `n` requests, after 50 not counted."""
    _posts(url, headers, 50, body)
    return _counted(pid, out, lambda: _posts(url, headers, n, body)) / n


def _proxy_counted(proc: subprocess.Popen[bytes], out: Path, url: str,
                   headers: dict[str, str], n: int, body: bytes = BODY) -> float:
    """A proxy started under callgrind: counted once it answers."""
    try:
        wait_until(lambda: _answers(url, headers, body), timeout=300,
                   what="the proxy under callgrind")
        return _warm_then_count(proc.pid, out, url, headers, n, body)
    finally:
        proc.terminate()
        proc.wait(60)


def _answers(url: str, headers: dict[str, str], body: bytes = BODY) -> bool:
    try:
        return httpx.post(url, content=body, headers=headers, timeout=30).status_code == 200
    except httpx.TransportError:
        return False


def plain(workdir: Path, provider_url: str, n: int, streamed: bool = False) -> float:
    """`streamed`: the request and answer of the stream (see `tollgate_envoy`)."""
    out = workdir / "plain.callgrind"
    proc, url = plain_envoy(workdir, provider_url, wrap=_callgrind(out))
    headers, body = _request(streamed)
    return _proxy_counted(proc, out, f"{url}/v1/chat/completions",
                          {"content-type": "application/json", **headers}, n, body)


def _request(streamed: bool) -> tuple[dict[str, str], bytes]:
    """The request's own headers and body: for the stream, its body and the header that has
    the compiled provider answer one."""
    return ({STREAM_HEADER: "1"}, STREAM_BODY) if streamed else ({}, BODY)


def _setup(workdir: Path, provider_url: str, redis: RedisServer | None) -> tuple[Path, str]:
    config = make_config(workdir, _Url(provider_url), _Url(f"http://127.0.0.1:{free_port()}"))
    if redis is not None:
        config.write_text(with_state(config, redis.url))
    return config, governed(config)


@contextlib.contextmanager
def _governed_on_redis(workdir: Path, provider_url: str) -> Iterator[tuple[Path, str]]:
    """The benchmark's config and key, on Redis state while it runs when `redis-server` is
    installed (else SQLite)."""
    redis = RedisServer(workdir / "redis", fsync="everysec").start() \
        if shutil.which("redis-server") else None
    try:
        yield _setup(workdir, provider_url, redis)
    finally:
        if redis is not None:
            redis.stop()


def _client_head(secret: str, body: bytes = BODY) -> str:
    """The client's head, as the decide filter sends it for the benchmark's request."""
    head = (f":method: POST\n:path: /v1/chat/completions\n:authority: bench\n:scheme: http\n"
            f"authorization: Bearer {secret}\ncontent-type: application/json\n"
            f"content-length: {len(body)}\nx-request-id: bench\nuser-agent: bench")
    return base64.b64encode(head.encode()).decode()


async def _decision(config: Path, secret: str, sent: bytes = BODY) -> bytes:
    """tollgate's answer to the decide filter for the benchmark's request (`sent`)."""
    from extproc.decider import answer, client_request
    from extproc.service import ExternalProcessor
    from tollgate.gateway import Gateway
    gateway = Gateway.from_path(str(config), watch=False)
    try:
        headers, body, declared = client_request(_client_head(secret, sent), sent, "whole")
        return b"".join(answer(await ExternalProcessor(gateway).decide(headers, body,
                                                                        declared)))
    finally:
        await gateway.close()


def _without(rendered: str, names: tuple[str, ...]) -> str:
    """The rendered bootstrap with the HTTP filters and access logs `names` taken out of its
    listeners: what each costs Envoy is the count it takes away."""
    doc = yaml.safe_load(rendered)
    for listener in doc["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for manager in (f["typed_config"] for f in chain["filters"]):
                manager["http_filters"] = [f for f in manager["http_filters"]
                                           if f["name"] not in names]
                manager["access_log"] = [a for a in manager.get("access_log", [])
                                         if a["name"] not in names]
    return yaml.safe_dump(doc)


def tollgate_envoy(workdir: Path, provider_url: str, n: int, streamed: bool = False,
                   without: tuple[str, ...] = ()) -> float:
    """`streamed`: the OpenAI SDK's default stream (no `stream_options`), whose usage chunk
    the gateway asks for and the usage cut keeps from the client, answered in one piece of
    102 events (every byte of it read by the meter and the cut). `without`: filters and
    access logs taken out (`_without`)."""
    config, secret = _setup(workdir, provider_url, None)
    streaming, body = _request(streamed)
    decision = asyncio.run(_decision(config, secret, body))
    port, sock = free_port(), workdir / "decide.sock"
    rendered = subprocess.run(
        [sys.executable, "-m", "tollgate", "--config", str(config), "envoy", "render",
         "--listen", f"127.0.0.1:{port}", "--extproc", f"unix:{workdir}/extproc.sock",
         "--decider", f"unix:{sock}", "--envoy-admin", f"127.0.0.1:{free_port()}"],
        capture_output=True, text=True, check=True).stdout
    bootstrap = workdir / "tollgate-envoy.yaml"
    bootstrap.write_text(_without(rendered, without) if without else rendered)
    decided = workdir / "decided.http"
    decided.write_bytes(decision)
    decider = bare_service("http", sock, decided)
    access_log = bare_service("grpc", workdir / "extproc.sock")
    out = workdir / "tollgate.callgrind"
    try:
        proc = subprocess.Popen([*_callgrind(out), envoy_binary(), "-c", str(bootstrap),
                                 "--disable-hot-restart", "--log-level", "error",
                                 "--base-id", str(free_port())],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return _proxy_counted(proc, out, f"http://127.0.0.1:{port}/v1/chat/completions",
                              {"content-type": "application/json",
                               "authorization": f"Bearer {secret}", **streaming},
                              n, body)
    finally:
        decider.terminate()
        access_log.terminate()


ANSWER_HEAD = (b":status: 200\ncontent-type: application/json\ndate: x\n"
               b"x-tollgate-upstream: 1\ncontent-length: ")


async def _serve_decisions(config: Path, secret: str, n: int, first: int) -> None:
    """`n` requests through the decision service's own path, CONCURRENCY at a time: the
    decision and its answer, the provider's answer as its end reports it, the settlement."""
    from bench.scaling import ANSWER
    from extproc.decider import answer, client_request, response_head
    from extproc.service import ExternalProcessor
    from tollgate.gateway import Gateway
    gateway = Gateway.from_path(str(config), watch=False)
    processor = ExternalProcessor(gateway)
    head = _client_head(secret)
    response = ANSWER_HEAD + str(len(ANSWER)).encode() + b"\n\n" + ANSWER.encode()

    async def one() -> None:
        headers, body, declared = client_request(head, BODY, "whole")
        decision = await processor.decide(headers, body, declared)
        answer(decision)
        status, response_headers, data = response_head(response)
        processor.metered(decision.metadata["request_id"], 0, True, data,
                          (status, response_headers))

    async def some(count: int) -> None:
        async def worker(k: int) -> None:
            for _ in range(k):
                await one()
        await asyncio.gather(*(worker(count // CONCURRENCY) for _ in range(CONCURRENCY)))
        await gateway.drain()

    try:  # stdout carries the access log: the parent hears from stderr
        await some(first)
        print("warm", file=sys.stderr, flush=True)
        sys.stdin.readline()
        await some(n)
        print("done", file=sys.stderr, flush=True)
        sys.stdin.readline()
    finally:
        await gateway.close()


def decision_service(workdir: Path, provider_url: str, n: int) -> float:
    with _governed_on_redis(workdir, provider_url) as (config, secret):
        out = workdir / "decider.callgrind"
        n -= n % CONCURRENCY
        proc = subprocess.Popen(
            [*_callgrind(out), sys.executable, "-m", "bench.instructions", "--serve",
             str(config), secret, str(n)],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True)
        assert proc.stdin is not None and proc.stderr is not None
        try:
            if proc.stderr.readline().strip() != "warm":
                raise RuntimeError("the decision service did not start")

            def run() -> None:
                assert proc.stdin is not None and proc.stderr is not None
                proc.stdin.write("go\n")
                proc.stdin.flush()
                if proc.stderr.readline().strip() != "done":
                    raise RuntimeError("the decision service stopped")

            count = _counted(proc.pid, out, run)
            proc.stdin.write("end\n")
            proc.stdin.flush()
            proc.wait(120)
            return count / n
        finally:
            proc.kill()


def served(workdir: Path, provider_url: str, n: int) -> float:
    """tollgate's Python per request as `tollgate serve envoy` runs it behind its Envoy:
    the above with its HTTP exchange with Envoy (the decision) and its end in Envoy's
    access log, one request at a time."""
    with _governed_on_redis(workdir, provider_url) as (config, secret):
        out = workdir / "served.callgrind"
        # Envoy, its child, runs outside callgrind (valgrind does not follow children).
        gw = GatewayProcess("envoy", config, workdir, wrap=_callgrind(out)).start(timeout=600)
        try:
            headers = {"content-type": "application/json", "authorization": f"Bearer {secret}"}
            return _warm_then_count(gw.proc.pid, out, f"{gw.url}/v1/chat/completions",
                                    headers, n)
        finally:
            gw.stop(timeout=120)


def mitmdump(workdir: Path, provider_url: str, n: int) -> float:
    out = workdir / "mitmdump.callgrind"
    port = free_port()
    proc = subprocess.Popen([*_callgrind(out), sys.executable,
                             *mitmdump_command(provider_url, port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return _proxy_counted(proc, out, f"http://127.0.0.1:{port}/v1/chat/completions",
                          {"content-type": "application/json",
                           "authorization": f"Bearer {PROVIDER_KEY}"}, n)


def tollgate_mitmproxy(workdir: Path, provider_url: str, n: int) -> float:
    """The mitmproxy host as a developer runs it: SQLite state beside the config."""
    config, secret = _setup(workdir, provider_url, None)
    out = workdir / "mitmproxy.callgrind"
    gw = GatewayProcess("mitmproxy", config, workdir, wrap=_callgrind(out),
                        extra=QUIET["mitmproxy"]).start(timeout=600)
    try:
        headers = {"content-type": "application/json", "authorization": f"Bearer {secret}"}
        return _warm_then_count(gw.proc.pid, out, f"{gw.url}/v1/chat/completions", headers, n)
    finally:
        gw.stop(timeout=120)


# tollgate's Envoy with parts taken out (`--parts envoy-split`, on demand): each part's
# instructions are the full count less the row without it.
SPLIT = {"tollgate envoy, no meter": ("tollgate.meter",),
         "tollgate envoy, no end log": ("tollgate.response_end",),
         "tollgate envoy, no meter or logs": ("tollgate.meter", "tollgate.response_end",
                                              "tollgate.proxy_replies", "tollgate.outage")}
PARTS = {"envoy": ("plain envoy", "tollgate envoy"),
         "stream": ("plain envoy, stream", "tollgate envoy, stream"),
         "decider": ("decision service",),
         "served": ("served decisions",), "mitmproxy": ("mitmdump", "tollgate mitmproxy"),
         "envoy-split": tuple(SPLIT)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--parts", default="envoy,stream,decider,served,mitmproxy")
    parser.add_argument("--update-baseline", action="store_true")
    parser.add_argument("--serve", nargs=3, metavar=("CONFIG", "SECRET", "N"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("TOLLGATE_KEY_PEPPER", "bench-pepper")
    os.environ["FAKE_OPENAI_KEY"] = PROVIDER_KEY
    os.environ.setdefault("FAKE_ANTHROPIC_KEY", "unused")
    if args.serve:
        config, secret, n = args.serve
        eventloop.run(_serve_decisions(Path(config), secret, int(n), WARM_UP))
        return 0
    if shutil.which("valgrind") is None:
        print("valgrind is not installed: apt-get install valgrind", file=sys.stderr)
        return 2
    workdir = scratch_dir("tollgate-bench-instructions-")
    provider, provider_url = compiled_provider(workdir)
    measure = {"plain envoy": plain, "tollgate envoy": tollgate_envoy,
               "plain envoy, stream": functools.partial(plain, streamed=True),
               "tollgate envoy, stream": functools.partial(tollgate_envoy, streamed=True),
               "decision service": decision_service, "served decisions": served,
               "mitmdump": mitmdump, "tollgate mitmproxy": tollgate_mitmproxy,
               **{name: functools.partial(tollgate_envoy, without=names)
                  for name, names in SPLIT.items()}}
    rows: dict[str, float] = {}
    try:
        for part in args.parts.split(","):
            for name in PARTS[part]:
                where = workdir / name.replace(" ", "-")
                where.mkdir()
                rows[name] = measure[name](where, provider_url, args.requests)
    finally:
        provider.terminate()
    baseline = json.loads(BASELINE.read_text()) if BASELINE.exists() else {}
    print(f"\ninstructions per request (callgrind, {args.requests} requests each)\n")
    width = max([24, *(len(name) + 2 for name in rows)])
    print(f"{'':{width}}{'instructions':>14}{'baseline':>14}")
    print("-" * (width + 28))
    for name, count in rows.items():
        stored = f"{baseline[name]:14,.0f}" if name in baseline else f"{'-':>14}"
        print(f"{name:{width}}{count:14,.0f}{stored}")
    for plain_name, ours in (("plain envoy", "tollgate envoy"),
                             ("plain envoy, stream", "tollgate envoy, stream"),
                             ("mitmdump", "tollgate mitmproxy")):
        if plain_name in rows and ours in rows:
            print(f"\n{ours} / {plain_name}: {rows[ours] / rows[plain_name]:.2f}")
    if args.update_baseline:
        BASELINE.write_text(json.dumps({**baseline, **{k: round(v) for k, v in rows.items()}},
                                       indent=2) + "\n")
        print(f"\nbaseline written: {BASELINE}")
        return 0
    worse = [f"{name}: {count:,.0f}, baseline {baseline[name]:,} "
             f"(+{(count / baseline[name] - 1) * 100:.0f}%)"
             for name, count in rows.items()
             if name in baseline and count > baseline[name] * (1 + TOLERANCE)]
    if worse:
        print(f"\nMORE than {TOLERANCE:.0%} over the baseline:\n  " + "\n  ".join(worse))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
