"""Added latency of the gateway over a direct call to the same provider, in one run.

    python -m bench [--requests 1000] [--concurrency 32] [--hosts envoy,mitmproxy]

A fake OpenAI provider runs in its own process; the same chat-completions request is sent
directly to it and through each gateway host, sequentially and at a given concurrency, with
keep-alive connections. Each host is measured four ways: a plain key; a key with RPM, TPM
and RPD limits it never reaches (`+limits`); a key with fallback whose first provider
answers (`+fb`); and one whose first provider refuses connections, so every request falls
back (`+fb-down`). Prints p50/p99 per path, what the gateway adds, and the ratio; then what
the limits add over the plain key, measured with the two keys' requests interleaved; what
exporting every span over OTLP adds (a second gateway of the same host exporting to a local
receiver, interleaved with the first); and the span work per request in-process.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import httpx

from tests.conftest import make_config
from tests.harness import GatewayProcess, free_port, tollgate, wait_until

PROVIDER_KEY = "sk-bench-openai"
BODY = json.dumps({"model": "gpt-5-mini", "max_tokens": 16,
                   "messages": [{"role": "user", "content": "ping"}]}).encode()


class _Url:
    """Just enough of a FakeProvider for make_config."""

    def __init__(self, url: str):
        self.url = url


def _maps() -> str | None:
    """This process's memory mappings (Linux), None where there are none to read."""
    try:
        return Path("/proc/self/maps").read_text()
    except OSError:
        return None


def interpreter() -> str:
    """The Python the gateway's processes run on: whether it was configured with profile
    guidance and link-time optimization, and whether its libpython is a shared library or
    linked into the executable (envoy/README.md, "The interpreter ext_proc runs on": pyenv's
    default build, shared and without either, cost ext_proc about 11% more CPU per request).
    Whether libpython is shared is read from what the process has loaded: Debian's and
    Ubuntu's `python3` links it in, and its sysconfig, the shared build's, says shared."""
    flags = sysconfig.get_config_var("CONFIG_ARGS") or ""
    optimized = "--enable-optimizations" in flags and "--with-lto" in flags
    maps = _maps()
    shared = "/libpython" in maps if maps is not None \
        else bool(sysconfig.get_config_var("Py_ENABLE_SHARED"))
    return (f"Python {platform.python_version()}, configured "
            f"{'with' if optimized else 'without'} --enable-optimizations --with-lto, "
            f"libpython {'shared' if shared else 'linked in'}")


def scratch_dir(prefix: str) -> Path:
    """A working directory for one run, removed when the run ends, unless it ended in an
    error (its logs are there) or TOLLGATE_BENCH_KEEP=1."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    if not os.environ.get("TOLLGATE_BENCH_KEEP"):
        atexit.register(_remove_unless_failed, workdir)
    return workdir


def _remove_unless_failed(workdir: Path) -> None:
    if getattr(sys, "last_exc", None) is not None:  # an error the run did not handle
        print(f"(logs kept in {workdir})", file=sys.stderr)
        return
    shutil.rmtree(workdir, ignore_errors=True)


def start_fake(port: int, chunk_delay: float = 0.0, answer_words: int = 0
               ) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-m", "tests.fakes.providers", "--openai-port",
                             str(port), "--anthropic-port", str(free_port()), "--openai-key",
                             PROVIDER_KEY, "--chunk-delay", str(chunk_delay),
                             "--answer-words", str(answer_words)],
                            stdout=subprocess.DEVNULL)
    wait_until(lambda: httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 401,
               timeout=10, what="fake provider")
    return proc


def bench_env() -> None:
    """The environment the gateways read: the key pepper and the providers' keys."""
    os.environ.setdefault("TOLLGATE_KEY_PEPPER", "bench-pepper")
    os.environ["FAKE_OPENAI_KEY"] = PROVIDER_KEY
    os.environ.setdefault("FAKE_ANTHROPIC_KEY", "unused")


def bench_setup(prefix: str, chunk_delay: float = 0.0, answer_words: int = 0
                ) -> tuple[Path, int, subprocess.Popen[bytes]]:
    """The environment the gateways read, a working directory, and the fake provider
    running in its own process on the returned port (see `start_fake`)."""
    bench_env()
    port = free_port()
    return (scratch_dir(prefix), port,
            start_fake(port, chunk_delay, answer_words))


# mitmdump is measured quiet (-q: no flow lines, its log at errors only); so is the
# mitmproxy host, whose lines would otherwise be counted as the gateway's cost.
QUIET = {"mitmproxy": ["--", "-q"]}

MADE_STATE = 'state: "sqlite:///.tollgate/state.db"'  # the state line make_config writes


def with_state(config: Path, url: str) -> str:
    """`config`'s text on the state at `url` instead of the one it was made with (refused if
    that line is not there: the benchmark would silently measure the wrong state)."""
    text = config.read_text()
    if MADE_STATE not in text:
        raise ValueError(f"{config} does not hold `{MADE_STATE}` to replace")
    return text.replace(MADE_STATE, f'state: "{url}"')


def own_state(config: Path, name: str) -> Path:
    """The config beside `config` with a state file of its own: rate limits on SQLite are
    kept by the one process serving the file, so each gateway measured has its own."""
    copy = config.with_name(f"gateway-{name}.yaml")
    copy.write_text(with_state(config, f"sqlite:///.tollgate/state-{name}.db"))
    return copy


def new_key(config: Path, *extra: str) -> str:
    out = tollgate("virtual-keys", "create", "--name", "bench", "--scope", "ORG:acme",
                   "--format", "json", *extra, config=config).stdout
    return json.loads(out)["secret"]


def down_provider(config: Path) -> str:
    """`mp_down`, an OpenAI provider nobody listens for: connections to it are refused."""
    tollgate("model-providers", "create", "--id", "mp_down", "--type", "openai", "--scope",
             "ORG:acme", "--base-url", f"http://127.0.0.1:{free_port()}", "--api-key-env",
             "FAKE_OPENAI_KEY", config=config)
    return "mp_down"


def fallback_key(config: Path, *providers: str) -> str:
    """A key that tries `providers` in order and falls back on any failure."""
    args = [a for p in providers for a in ("--model-provider", p)]
    policy = json.loads(tollgate("routing-policies", "create", "--scope", "ORG:acme", "--name",
                                 "bench", *args, "--format", "json", config=config).stdout)
    return new_key(config, "--routing-policy", policy["id"], "--config-json",
                   '{"fallback": {"on": ["5xx", "timeout", "rate_limit", "network_error"]}}')


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def sequential(url: str, headers: dict[str, str], n: int) -> list[float]:
    async with httpx.AsyncClient(timeout=30) as client:
        for _ in range(20):  # warm connections and caches
            await client.post(url, content=BODY, headers=headers)
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            r = await client.post(url, content=BODY, headers=headers)
            out.append((time.perf_counter() - t0) * 1000)
            assert r.status_code == 200, r.text
        return out


async def interleaved(first: tuple[str, dict[str, str]], second: tuple[str, dict[str, str]],
                      n: int) -> tuple[list[float], list[float]]:
    """Alternate two (url, headers) request by request, so the machine's drift weighs on both
    alike."""
    async with httpx.AsyncClient(timeout=30) as client:
        for url, headers in (first, second) * 10:
            await client.post(url, content=BODY, headers=headers)
        out: tuple[list[float], list[float]] = ([], [])
        for _ in range(n):
            for i, (url, headers) in enumerate((first, second)):
                t0 = time.perf_counter()
                r = await client.post(url, content=BODY, headers=headers)
                out[i].append((time.perf_counter() - t0) * 1000)
                assert r.status_code == 200, r.text
        return out


def span_work(n: int = 20000) -> tuple[float, float]:
    """Microseconds of span work per request in-process (gateway span, one attempt span,
    their attributes): with no exporter, then exporting over OTLP/gRPC to a local receiver."""
    from tests.otlp import OTLPReceiver
    from tollgate import telemetry
    from tollgate.config.schema import ModelProvider, Telemetry
    from tollgate.ledger import LedgerRow
    from tollgate.providers import adapter_for
    from tollgate.request import Attempt

    openai_ = ModelProvider(id="mp_openai", type="openai", scope="ORG:acme",
                            base_url="https://api.openai.com")
    attempt = Attempt("mp_openai", "https", "api.openai.com", 443, "/v1/chat/completions",
                      {}, [], model="gpt-5-mini", adapter=adapter_for(openai_))
    row = LedgerRow(request_id="req_x", ts="", key_id="vk_x", key_name="k", principal="p",
                    org="acme", team="t", project=None, provider="mp_openai",
                    model="gpt-5-mini", route="chat_completions", input_tokens=10,
                    output_tokens=20, cost_micros=30, status=200, outcome="completed")

    def run() -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            t = telemetry.start("POST", "/v1/chat/completions", {})
            span = t.start_attempt(attempt, "chat_completions")
            telemetry.end_attempt(span, 200, input_tokens=10, output_tokens=20)
            t.end(row, requested_model="gpt-5-mini", provider_name="openai")
        return (time.perf_counter() - t0) / n * 1e6

    telemetry.configure(Telemetry())
    off = run()
    os.environ["OTEL_BSP_MAX_QUEUE_SIZE"] = str(4 * n)  # measure every span, none dropped
    receiver = OTLPReceiver().start()
    try:
        telemetry.configure(Telemetry(otlp_endpoint=f"http://127.0.0.1:{receiver.grpc_port}",
                                      otlp_protocol="grpc"))
        on = run()
        telemetry.flush()
    finally:
        telemetry.configure(Telemetry())
        receiver.stop()
    return off, on


async def concurrent(url: str, headers: dict[str, str], n: int, width: int
                     ) -> tuple[list[float], float]:
    limits = httpx.Limits(max_connections=width, max_keepalive_connections=width)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        await asyncio.gather(*(client.post(url, content=BODY, headers=headers)
                               for _ in range(width)))
        latencies: list[float] = []
        queue = iter(range(n))

        async def worker() -> None:
            for _ in queue:
                t0 = time.perf_counter()
                r = await client.post(url, content=BODY, headers=headers)
                latencies.append((time.perf_counter() - t0) * 1000)
                assert r.status_code == 200, r.text

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(width)))
        return latencies, n / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--hosts", default="envoy,mitmproxy")
    args = parser.parse_args()

    workdir, fake_port, fake = bench_setup("tollgate-bench-")
    direct = f"http://127.0.0.1:{fake_port}"
    config = make_config(workdir, _Url(direct), _Url(f"http://127.0.0.1:{free_port()}"))
    down_provider(config)
    keys = {"": new_key(config),
            "+limits": new_key(config, "--rpm", "10000000", "--tpm", "10000000000", "--rpd",
                               "1000000000"),
            "+fb": fallback_key(config, "mp_openai", "mp_down"),
            "+fb-down": fallback_key(config, "mp_down", "mp_openai")}
    paths: dict[str, tuple[str, dict[str, str]]] = {
        "direct": (direct, {"authorization": f"Bearer {PROVIDER_KEY}"})}
    gateways = []
    try:
        for host in args.hosts.split(","):
            gw = GatewayProcess(host, own_state(config, host), workdir,
                                extra=QUIET.get(host)).start()
            gateways.append(gw)
            for suffix, secret in keys.items():
                paths[host + suffix] = (gw.url, {"authorization": f"Bearer {secret}"})
        rows = []
        for name, (base, headers) in paths.items():
            url = f"{base}/v1/chat/completions"
            seq = asyncio.run(sequential(url, headers, args.requests))
            conc, rps = asyncio.run(concurrent(url, headers, args.requests, args.concurrency))
            rows.append((name, seq, conc, rps))
        ab, traced, exported = {}, {}, 0
        plain = {"authorization": f"Bearer {keys['']}"}
        for gw in gateways:
            url = f"{gw.url}/v1/chat/completions"
            ab[gw.host] = asyncio.run(interleaved(
                (url, plain), (url, {"authorization": f"Bearer {keys['+limits']}"}),
                args.requests))
        # The same host exporting every span over OTLP/gRPC, against one exporting none.
        from tests.otlp import OTLPReceiver

        receiver = OTLPReceiver().start()
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.grpc_port}",
               "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
        try:
            for gw in list(gateways):
                exporting = GatewayProcess(gw.host, own_state(config, f"{gw.host}-otlp"),
                                           workdir, env=env, extra=QUIET.get(gw.host)).start()
                gateways.append(exporting)
                traced[gw.host] = asyncio.run(interleaved(
                    (f"{gw.url}/v1/chat/completions", plain),
                    (f"{exporting.url}/v1/chat/completions", plain), args.requests))
            exported = wait_until(lambda: len(receiver.spans) >= 2 * args.requests
                                  and len(receiver.spans), timeout=30,
                                  what="the exporting gateways' spans")
        finally:
            receiver.stop()
        span_us = span_work()
    finally:
        for gw in gateways:
            gw.stop()
        fake.terminate()
        fake.wait(5)

    base_seq, base_conc = rows[0][1], rows[0][2]
    print(f"\n{args.requests} requests per run; concurrency {args.concurrency}; "
          f"{os.cpu_count()} cores; ms\n")
    header = (f"{'path':<18} {'seq p50':>8} {'seq p99':>8} {'+p50':>7} {'+p99':>7} "
              f"{'ratio':>6} | {'c p50':>7} {'c p99':>7} {'+p50':>7} {'ratio':>6} {'req/s':>7}")
    print(header)
    print("-" * len(header))
    for name, seq, conc, rps in rows:
        sp50, sp99 = statistics.median(seq), percentile(seq, 0.99)
        cp50, cp99 = statistics.median(conc), percentile(conc, 0.99)
        bp50, bp99 = statistics.median(base_seq), percentile(base_seq, 0.99)
        bc50 = statistics.median(base_conc)
        print(f"{name:<18} {sp50:>8.2f} {sp99:>8.2f} {sp50 - bp50:>7.2f} {sp99 - bp99:>7.2f} "
              f"{sp50 / bp50:>6.2f} | {cp50:>7.2f} {cp99:>7.2f} {cp50 - bc50:>7.2f} "
              f"{cp50 / bc50:>6.2f} {rps:>7.0f}")
    print(f"\nRPM+TPM+RPD limits, {args.requests} requests each, interleaved with a plain "
          "key's (ms):\n")
    print(f"{'host':<10} {'plain p50':>9} {'limits p50':>10} {'added':>7} {'plain p99':>9} "
          f"{'limits p99':>10}")
    for host, (plain, limited) in ab.items():
        print(f"{host:<10} {statistics.median(plain):>9.3f} {statistics.median(limited):>10.3f} "
              f"{statistics.median(limited) - statistics.median(plain):>+7.3f} "
              f"{percentile(plain, 0.99):>9.3f} {percentile(limited, 0.99):>10.3f}")
    print(f"\nTraces exported over OTLP/gRPC ({exported} spans received by then), {args.requests} "
          "requests each, interleaved with the same host exporting none (ms):\n")
    print(f"{'host':<10} {'none p50':>9} {'OTLP p50':>10} {'added':>7} {'none p99':>9} "
          f"{'OTLP p99':>10}")
    for host, (plain, exported) in traced.items():
        print(f"{host:<10} {statistics.median(plain):>9.3f} {statistics.median(exported):>10.3f} "
              f"{statistics.median(exported) - statistics.median(plain):>+7.3f} "
              f"{percentile(plain, 0.99):>9.3f} {percentile(exported, 0.99):>10.3f}")
    print(f"\nSpan work per request, in-process: {span_us[0]:.1f} µs with no exporter, "
          f"{span_us[1]:.1f} µs exporting\n")

if __name__ == "__main__":
    main()
