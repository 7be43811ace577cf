"""ext_proc as several processes behind one Envoy (`--extproc-processes`): decisions spread over
them, each request's later streams reach the process that holds it, and the processes share
budgets, limits and metrics as one gateway."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from extproc.runner import envoy_binary
from tests.conftest import make_config
from tests.fakes.providers import Behaviour
from tests.harness import (
    BIN,
    GatewayProcess,
    RedisServer,
    free_port,
    ledger,
    tollgate,
    wait_until,
)

CHAT = {"model": "gpt-5-mini", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def redis(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


def with_state(config: Path, state: str) -> Path:
    config.write_text(config.read_text().replace('state: "sqlite:///.tollgate/state.db"',
                                                 f'state: "{state}"'))
    return config


def create(config: Path, *args: str) -> dict:
    return json.loads(tollgate(*args, "--format", "json", config=config).stdout)


def key(config: Path, *extra: str) -> str:
    return create(config, "virtual-keys", "create", "--name", "k", "--scope", "ORG:acme",
                  "--principal", "alice@acme.com", *extra)["secret"]


def policy(config: Path, name: str, *providers: str) -> str:
    return create(config, "routing-policies", "create", "--scope", "ORG:acme", "--name", name,
                  *(a for p in providers for a in ("--model-provider", p)),
                  "--model-map", "mp_anthropic:gpt-5-mini=claude-haiku-4-5")["id"]


def envoy_counter(admin: str, name: str) -> int:
    stats = httpx.get(f"http://{admin}/stats", params={"filter": f"^{re.escape(name)}$"}).text
    match = re.search(rf"^{re.escape(name)}: (\d+)$", stats, re.M)
    return int(match.group(1)) if match else 0


def served_by_each_process(admin: str, processes: int) -> list[int]:
    """Streams Envoy opened to each process's own gRPC service: the access log that reports
    the ends of the requests it decided (and the rewrites of those it reshapes)."""
    return [envoy_counter(admin, f"cluster.tollgate_extproc_{i}.upstream_rq_total")
            for i in range(processes)]


def metric_sum(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_two_processes_serve_as_one_gateway(tmp_path, redis, fake_openai, fake_anthropic):
    """Plain, streamed (usage chunk cut in Envoy), translated (rewrite) and fallen-back
    (attempts) requests, spread over two processes: each is metered and charged once, both
    processes meter responses, a rate limit counts across them, and `/metrics` sums them."""
    config = with_state(make_config(tmp_path, fake_openai, fake_anthropic), redis.url)
    plain = key(config)
    limited = key(config, "--rpm", "5")
    translated = key(config, "--routing-policy", policy(config, "to-claude", "mp_anthropic"))
    fallback = key(config, "--routing-policy",
                   policy(config, "fb", "mp_openai", "mp_anthropic"),
                   "--config-json", '{"fallback": {"on": ["5xx"]}}')
    envoy_admin = f"127.0.0.1:{free_port()}"
    gw = GatewayProcess("envoy", config, tmp_path, extra=[
        "--envoy-admin", envoy_admin, "--extproc-processes", "2"]).start()
    try:
        async def traffic() -> tuple[int, list[int]]:
            clients = {k: openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key=k, max_retries=0)
                       for k in (plain, translated, limited)}

            async def stream(secret: str) -> str:
                chunks = await clients[secret].chat.completions.create(**CHAT, stream=True)
                text = ""
                async for chunk in chunks:
                    assert chunk.choices, "the usage chunk the gateway asked for reached " \
                                          "the client"
                    text += chunk.choices[0].delta.content or ""
                return text

            async def limited_call() -> int:
                r = await clients[limited].chat.completions.with_raw_response.create(**CHAT)
                return r.status_code

            answers = await asyncio.gather(
                *(clients[plain].chat.completions.create(**CHAT) for _ in range(8)),
                *(stream(plain) for _ in range(8)),
                *(clients[translated].chat.completions.create(**CHAT) for _ in range(4)),
                *(stream(translated) for _ in range(4)))
            assert all(answers)
            statuses = []
            for result in await asyncio.gather(*(limited_call() for _ in range(8)),
                                               return_exceptions=True):
                statuses.append(result if isinstance(result, int) else result.status_code)
            return len(answers), statuses

        served, statuses = asyncio.run(traffic())
        assert sorted(statuses) == [200] * 5 + [429] * 3  # one limit, counted across both

        fb = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=fallback, max_retries=0)
        for _ in range(2):
            fake_openai.enqueue(Behaviour("fail", status=503))
            answer = fb.chat.completions.with_raw_response.create(**CHAT)
            assert answer.headers["x-langwatch-provider"] == "mp_anthropic"
        claude = anthropic.Anthropic(base_url=gw.url, api_key=plain, max_retries=0)
        with claude.messages.stream(model="gpt-5-mini", max_tokens=50,
                                    messages=[{"role": "user", "content": "hi"}]) as s:
            assert s.get_final_text()

        total = served + 5 + 2 + 1

        def served_rows() -> list:
            return [r for r in ledger(config) if r.status == 200 and r.route != "models"]

        wait_until(lambda: len(served_rows()) >= total, what="every answer settled")
        rows = served_rows()
        assert len(rows) == total, [(r.route, r.status, r.code) for r in ledger(config)]
        assert all(r.cost_micros > 0 and r.output_tokens > 0 for r in rows)
        assert len({r.request_id for r in rows}) == total
        each = served_by_each_process(envoy_admin, 2)
        assert all(n > 0 for n in each), each  # both processes held requests
        # Decisions go to the decision services of both processes, spread by Envoy.
        decided = [envoy_counter(envoy_admin, "cluster.tollgate_decider.upstream_rq_total")]
        assert decided[0] >= total

        text = httpx.get(f"{gw.admin_url}/metrics").text
        assert metric_sum(text, "tollgate_requests_total", status="200") == total
        assert metric_sum(text, "tollgate_requests_total", status="429") == 3
        assert text.count("# TYPE tollgate_requests_total counter") == 1
    finally:
        gw.stop()


def worker_pids(parent: int) -> list[int]:
    """ext_proc processes 1..N-1 of the gateway `parent`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat[1]) == parent and b"extproc.worker" in cmdline:
            pids.append(int(entry.name))
    return pids


def test_a_process_that_dies_stops_the_gateway_with_a_failure(tmp_path, fake_openai,
                                                              fake_anthropic):
    """A supervisor restarts the whole gateway rather than run on with a process missing,
    whose requests Envoy would keep sending to a dead socket."""
    config = make_config(tmp_path, fake_openai, fake_anthropic)
    gw = GatewayProcess("envoy", config, tmp_path, extra=["--extproc-processes", "3"]).start()
    try:
        workers = worker_pids(gw.proc.pid)
        assert len(workers) == 2
        os.kill(workers[0], signal.SIGKILL)
        status = gw.proc.wait(30)
        assert status != 0
        assert re.search(r"ext_proc process \d exited with status -9", gw.log())
        wait_until(lambda: not worker_pids(gw.proc.pid) and not any(
            Path(f"/proc/{p}").exists() for p in workers[1:]), timeout=10,
            what="the other process to stop")
    finally:
        gw.stop()


def test_a_sqlite_state_with_rate_limits_refuses_several_processes(tmp_path, fake_openai,
                                                                   fake_anthropic):
    config = make_config(tmp_path, fake_openai, fake_anthropic)
    key(config, "--rpm", "5")
    gw = GatewayProcess("envoy", config, tmp_path, extra=["--extproc-processes", "2"])
    with pytest.raises(RuntimeError, match="more than one gateway process serves") as e:
        gw.start()
    assert "redis://" in str(e.value)


def test_rendered_envoy_in_front_of_extproc_in_two_processes(tmp_path, fake_openai,
                                                             fake_anthropic):
    """`envoy render --extproc-processes 2` and `serve extproc --extproc-processes 2` agree
    on where the processes listen, and requests are served and charged through both."""
    config = make_config(tmp_path, fake_openai, fake_anthropic)
    secret = key(config)
    listen, admin = free_port(), free_port()
    rendered = tollgate("envoy", "render", "--listen", f"127.0.0.1:{listen}", "--envoy-admin",
                        f"127.0.0.1:{admin}", "--extproc-processes", "2", config=config).stdout
    bootstrap = tmp_path / "envoy.yaml"
    bootstrap.write_text(rendered)
    log = open(tmp_path / "procs.log", "wb")  # noqa: SIM115
    extproc = subprocess.Popen([str(BIN / "tollgate"), "--config", str(config), "serve",
                                "extproc", "--extproc-processes", "2"], stdout=log,
                               stderr=subprocess.STDOUT)
    envoy = subprocess.Popen([envoy_binary(), "-c", str(bootstrap), "--disable-hot-restart",
                              "--log-level", "warn"], stdout=log, stderr=subprocess.STDOUT)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{listen}/v1", api_key=secret,
                           max_retries=0)
    try:
        def up() -> bool:
            try:
                return bool(client.chat.completions.create(**CHAT).choices)
            except openai.APIError:
                return False

        wait_until(up, timeout=30, what="envoy and both ext_proc processes")
        for _ in range(8):
            assert client.chat.completions.create(**CHAT).usage.total_tokens > 0

        def rows() -> list:
            return [r for r in ledger(config) if r.route == "chat_completions"
                    and r.status == 200]

        wait_until(lambda: len(rows()) >= 9, what="every answer settled")
        assert all(r.cost_micros > 0 for r in rows())
        each = served_by_each_process(f"127.0.0.1:{admin}", 2)
        assert all(n > 0 for n in each), each
        sockets = sorted(p.name for p in (config.parent / ".tollgate").glob("extproc*.sock"))
        assert sockets == ["extproc-1.decide.sock", "extproc-1.sock", "extproc.decide.sock",
                           "extproc.sock"]
    finally:
        extproc.send_signal(signal.SIGTERM)
        assert extproc.wait(20) == 0
        envoy.terminate()
        envoy.wait(10)
        log.close()
