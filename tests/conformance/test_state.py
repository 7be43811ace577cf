"""Budgets under load, across replicas, restarts and a state store that goes away."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.conformance.test_metering import PRICES, ledger
from tests.conftest import HOSTS, make_config
from tests.fakes.providers import Behaviour
from tests.harness import GatewayProcess, RedisServer, tollgate, wait_until
from tollgate.pricing import worst_case_micros

MAX_TOKENS = 500
BODY = json.dumps({"model": "gpt-5-mini", "max_tokens": MAX_TOKENS,
                   "messages": [{"role": "user", "content": "budget test"}]}).encode()
# What the gateway reserves for BODY: input estimated at one token per two bytes.
WORST_CASE = worst_case_micros(math.ceil(len(BODY) / 2), MAX_TOKENS, PRICES.lookup("gpt-5-mini"))


@pytest.fixture
def redis(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


def configure(tmp_path: Path, fake_openai, fake_anthropic, state: str,
              fail_closed: bool = True) -> Path:
    config = make_config(tmp_path, fake_openai, fake_anthropic)
    text = config.read_text().replace('state: "sqlite:///.tollgate/state.db"',
                                      f'state: "{state}"')
    if not fail_closed:
        text = text.replace("max_body_bytes:", "fail_closed: false\n  max_body_bytes:")
    config.write_text(text)
    return config


def key_and_budget(config: Path, limit_micros: int) -> tuple[str, str]:
    key = json.loads(tollgate("virtual-keys", "create", "--name", "load", "--scope",
                              "TEAM:team_eng", "--principal", "bob@acme.com", "--format",
                              "json", config=config).stdout)
    budget = json.loads(tollgate("gateway-budgets", "create", "--name",
                                 "engineering-monthly-cap", "--scope", "team", "--team",
                                 "team_eng", "--window", "month", "--limit",
                                 str(limit_micros / 1_000_000), "--on-breach", "block",
                                 "--format", "json", config=config).stdout)
    return key["secret"], budget["id"]


async def burst(urls: list[str], secret: str, n: int) -> list[int]:
    limits = httpx.Limits(max_connections=n)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        async def one(i: int) -> int:
            r = await client.post(f"{urls[i % len(urls)]}/v1/chat/completions", content=BODY,
                                  headers={"authorization": f"Bearer {secret}"})
            return r.status_code

        return await asyncio.gather(*(one(i) for i in range(n)))


def budget_status(config: Path, budget_id: str) -> dict:
    return json.loads(tollgate("gateway-budgets", "status", budget_id, "--format", "json",
                               config=config).stdout)


def state_url(tmp_path: Path, store: str, redis: RedisServer | None) -> str:
    return redis.url if store == "redis" else f"sqlite:///{tmp_path / 'state.db'}"


def chat_rows(config) -> list:
    """The ledger's rows for chat completions (start-up probes leave rows of their own)."""
    return [r for r in ledger(config) if r.route == "chat_completions"]


@pytest.mark.parametrize("host", HOSTS)
def test_answers_the_clients_have_are_charged_in_full_though_the_gateway_stops_at_once(
        host, tmp_path, fake_openai, fake_anthropic):
    """Envoy reports an answer's end after the client has it, in batches: a gateway stopped
    the moment its last answers reached their clients waits for those reports, and each
    answer is settled complete, charged its usage."""
    config = configure(tmp_path, fake_openai, fake_anthropic, "sqlite:///.tollgate/state.db")
    secret, _ = key_and_budget(config, 1_000_000)
    gw = GatewayProcess(host, config, tmp_path).start()
    try:
        statuses = asyncio.run(burst([gw.url], secret, 4))
    finally:
        gw.stop()
    assert statuses == [200] * 4
    rows = chat_rows(config)
    assert [(r.outcome, r.status, r.usage_reported) for r in rows] == \
        [("completed", 200, True)] * 4, rows
    assert all(r.output_tokens > 0 and r.cost_micros > 0 for r in rows)


@pytest.mark.parametrize("store", ["sqlite", "redis"])
@pytest.mark.parametrize("host", HOSTS)
def test_concurrent_requests_never_spend_past_a_blocking_budget(
        host, store, tmp_path, fake_openai, fake_anthropic, request):
    redis = request.getfixturevalue("redis") if store == "redis" else None
    config = configure(tmp_path, fake_openai, fake_anthropic, state_url(tmp_path, store, redis))
    limit = 10 * WORST_CASE
    secret, budget_id = key_and_budget(config, limit)
    fake_openai.response_delay = 1.5  # all 100 are in flight at once
    gw = GatewayProcess(host, config, tmp_path).start()
    try:
        statuses = asyncio.run(burst([gw.url], secret, 100))
    finally:
        gw.stop()
    served, refused = statuses.count(200), statuses.count(402)
    assert served + refused == 100, statuses
    assert served == 10  # exactly what the worst-case reservations allow in flight
    chats = chat_rows(config)
    assert len(chats) == 100  # one row per request, refused or served
    rows = [r for r in chats if r.status == 200]
    assert len(rows) == served
    assert {r.code for r in chats if r.status == 402} == {"budget_exceeded"}
    assert sum(r.cost_micros for r in chats) <= limit
    status = budget_status(config, budget_id)
    assert status["reserved_usd"] == 0  # every reservation settled
    assert round(status["spent_usd"] * 1_000_000) == sum(r.cost_micros for r in rows)


@pytest.mark.parametrize("host", HOSTS)
def test_requests_like_one_before_are_decided_from_its_precedent_on_redis(
        host, tmp_path, redis, fake_openai, fake_anthropic):
    """On a Redis state, as on SQLite, a request like one forwarded before is decided from
    its precedent, on either host: held in its budget (in Redis, its reservation awaited),
    written ahead before it goes, and settled as the full decision's."""
    from tests.conformance.test_metering import precedent_decisions

    config = configure(tmp_path, fake_openai, fake_anthropic, redis.url)
    secret, budget_id = key_and_budget(config, 100 * WORST_CASE)
    gw = GatewayProcess(host, config, tmp_path).start()
    try:
        decided_before = precedent_decisions(gw)
        for n in range(6):
            body = json.loads(BODY)
            body["messages"][0]["content"] = f"budget test {n}"  # new words, same length
            r = httpx.post(f"{gw.url}/v1/chat/completions", json=body, timeout=30,
                           headers={"authorization": f"Bearer {secret}"})
            assert r.status_code == 200, r.text
        # Counted once each request's exchange is made (its response's end, which Envoy
        # reports in batches after the client has it).
        wait_until(lambda: precedent_decisions(gw) - decided_before >= 5, timeout=15,
                   what="the requests decided from a precedent to be counted")
        assert precedent_decisions(gw) - decided_before == 5  # all but the first
    finally:
        gw.stop()
    chats = chat_rows(config)
    assert len(chats) == 6 and all(r.status == 200 and r.outcome == "completed"
                                   and r.usage_reported and r.cost_micros > 0 for r in chats)
    status = budget_status(config, budget_id)
    assert status["reserved_usd"] == 0  # every reservation settled
    assert round(status["spent_usd"] * 1_000_000) == sum(r.cost_micros for r in chats)


def test_two_replicas_share_one_budget_through_redis(tmp_path, redis, fake_openai,
                                                     fake_anthropic):
    config = configure(tmp_path, fake_openai, fake_anthropic, redis.url)
    limit = 10 * WORST_CASE
    secret, budget_id = key_and_budget(config, limit)
    fake_openai.response_delay = 1.5
    replicas = [GatewayProcess(host, config, tmp_path).start() for host in ("mitmproxy",
                                                                            "envoy")]
    try:
        statuses = asyncio.run(burst([r.url for r in replicas], secret, 60))
    finally:
        for r in replicas:
            r.stop()
    assert statuses.count(200) == 10 and statuses.count(402) == 50
    chats = chat_rows(config)
    assert len(chats) == 60 and len([r for r in chats if r.status == 200]) == 10
    assert sum(r.cost_micros for r in chats) <= limit
    assert budget_status(config, budget_id)["reserved_usd"] == 0


@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_spend_and_budgets_survive_a_restart(store, tmp_path, fake_openai, fake_anthropic,
                                             request):
    redis = request.getfixturevalue("redis") if store == "redis" else None
    config = configure(tmp_path, fake_openai, fake_anthropic, state_url(tmp_path, store, redis))
    secret, budget_id = key_and_budget(config, 100 * WORST_CASE)
    headers = {"authorization": f"Bearer {secret}"}
    first = GatewayProcess("mitmproxy", config, tmp_path).start()
    try:
        for _ in range(3):
            assert httpx.post(f"{first.url}/v1/chat/completions", content=BODY,
                              headers=headers).status_code == 200
    finally:
        first.stop()
    spent = budget_status(config, budget_id)["spent_usd"]
    assert spent > 0 and len(chat_rows(config)) == 3

    # Tighten the budget so that what was spent before the restart leaves too little room.
    tollgate("gateway-budgets", "delete", budget_id, config=config)
    limit = round(spent * 1_000_000) + WORST_CASE // 2
    again = json.loads(tollgate(
        "gateway-budgets", "create", "--id", budget_id, "--name", "engineering-monthly-cap",
        "--scope", "team", "--team", "team_eng", "--window", "month", "--limit",
        str(limit / 1_000_000), "--format", "json", config=config).stdout)
    assert again["id"] == budget_id
    second = GatewayProcess("envoy", config, tmp_path).start()
    try:
        r = httpx.post(f"{second.url}/v1/chat/completions", content=BODY, headers=headers)
        assert r.status_code == 402, r.text
        assert budget_id in r.json()["error"]["message"]
    finally:
        second.stop()
    assert budget_status(config, budget_id)["spent_usd"] == spent
    assert [r.status for r in chat_rows(config)] == [200, 200, 200, 402]


@pytest.mark.parametrize("host", HOSTS)
def test_redis_down_fail_closed_refuses_with_503(host, tmp_path, redis, fake_openai,
                                                 fake_anthropic):
    """The gateway's own 503 reaches the client as it is (on Envoy, not one of Envoy's
    replies for the same status)."""
    config = configure(tmp_path, fake_openai, fake_anthropic, redis.url)
    secret, _ = key_and_budget(config, 100 * WORST_CASE)
    gw = GatewayProcess(host, config, tmp_path).start()
    try:
        headers = {"authorization": f"Bearer {secret}"}
        url = f"{gw.url}/v1/chat/completions"
        assert httpx.post(url, content=BODY, headers=headers).status_code == 200
        redis.stop()
        r = httpx.post(url, content=BODY, headers=headers, timeout=30)
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "gateway_unavailable"
        assert "state store" in r.json()["error"]["message"]
        assert r.headers["x-langwatch-request-id"].startswith("req_")
        assert len(fake_openai.requests) == 1  # the refused request never left
        # Health follows: unready while the store is down, ready once it is back.
        ready = httpx.get(f"{gw.admin_url}/readyz", timeout=10)
        assert ready.status_code == 503 and "state store" in ready.json()["problems"][0]
        assert httpx.get(f"{gw.admin_url}/healthz").status_code == 200
        redis.start()
        wait_until(lambda: httpx.get(f"{gw.admin_url}/readyz", timeout=10).status_code == 200,
                   timeout=10, what="readyz once redis is back")
    finally:
        gw.stop()


def test_redis_down_fail_open_serves_and_loses_nothing(tmp_path, redis, fake_openai,
                                                       fake_anthropic):
    config = configure(tmp_path, fake_openai, fake_anthropic, redis.url, fail_closed=False)
    secret, budget_id = key_and_budget(config, 100 * WORST_CASE)
    gw = GatewayProcess("envoy", config, tmp_path).start()
    try:
        headers = {"authorization": f"Bearer {secret}"}
        url = f"{gw.url}/v1/chat/completions"
        assert httpx.post(url, content=BODY, headers=headers).status_code == 200
        wait_until(lambda: len(chat_rows(config)) == 1, timeout=5, what="first row")
        redis.stop()
        ids = []
        for _ in range(3):
            r = httpx.post(url, content=BODY, headers=headers, timeout=30)
            assert r.status_code == 200
            ids.append(r.headers["x-langwatch-request-id"])
        # Served without budgets: ready, and the degraded store is said.
        ready = httpx.get(f"{gw.admin_url}/readyz", timeout=10)
        assert ready.status_code == 200 and "state store" in ready.json()["degraded"][0]
        redis.start()  # same port and data directory: what was in it is still there
        rows = wait_until(lambda: (rows := chat_rows(config)) and len(rows) == 4 and rows,
                          timeout=15, what="spooled rows to reach redis")
        assert {r.request_id for r in rows} >= set(ids)
        spent = round(budget_status(config, budget_id)["spent_usd"] * 1_000_000)
        assert spent == sum(r.cost_micros for r in rows)
    finally:
        gw.stop()


@pytest.mark.parametrize("host", HOSTS)
def test_redis_going_away_under_requests_in_flight_loses_nothing(host, tmp_path, redis,
                                                                 fake_openai, fake_anthropic):
    """Redis stops while requests it admitted are still with the provider, more are admitted
    while it is down, and it comes back: with `fail_closed: false` every request is served
    and leaves one row, and the budget holds what the rows cost with nothing left reserved
    (the holds taken before the stop are released by settlements replayed after it)."""
    config = configure(tmp_path, fake_openai, fake_anthropic, redis.url, fail_closed=False)
    secret, budget_id = key_and_budget(config, 1000 * WORST_CASE)
    fake_openai.response_delay = 2.0  # every request stays with the provider that long
    gw = GatewayProcess(host, config, tmp_path).start()
    try:
        async def outage() -> tuple[list[int], list[int]]:
            before = asyncio.ensure_future(burst([gw.url], secret, 20))
            await asyncio.sleep(0.8)  # all 20 admitted, their holds in Redis
            await asyncio.to_thread(redis.stop)
            during = await burst([gw.url], secret, 5)  # the first 20 settle meanwhile
            await asyncio.to_thread(redis.start)  # same port and data: its holds are there
            return await before, during

        before, during = asyncio.run(outage())
        assert before == [200] * 20 and during == [200] * 5
        rows = wait_until(lambda: (rows := chat_rows(config)) and len(rows) == 25 and rows,
                          timeout=20, what="spooled rows to reach redis")
        assert len({r.request_id for r in rows}) == 25
        status = wait_until(lambda: (s := budget_status(config, budget_id))["reserved_usd"] == 0
                            and s, timeout=10, what="every hold released")
        assert round(status["spent_usd"] * 1_000_000) == sum(r.cost_micros for r in rows) > 0
    finally:
        gw.stop()


@pytest.mark.parametrize("host", HOSTS)
def test_a_redis_stall_leaves_no_reservation_standing(host, tmp_path, redis, fake_openai,
                                                      fake_anthropic):
    """Redis stops answering past the gateway's socket timeout while a request reserves: the
    request is refused 503 (fail-closed), and the reservation Redis runs when it wakes holds
    nothing for long: a request that fits only in the whole budget is served next, not
    refused for the 15 minutes of a hold's lease."""
    config = configure(tmp_path, fake_openai, fake_anthropic, f"{redis.url}?socket_timeout=0.5")
    # Room for one request's worst case beside what one costs, not for two worst cases.
    secret, budget_id = key_and_budget(config, WORST_CASE * 3 // 2)
    gw = GatewayProcess(host, config, tmp_path).start()
    try:
        headers = {"authorization": f"Bearer {secret}"}
        url = f"{gw.url}/v1/chat/completions"
        # Served and settled first: Redis has the reservation's script, which it runs when it
        # wakes, and nothing else is on its way to Redis when it stops.
        assert httpx.post(url, content=BODY, headers=headers, timeout=30).status_code == 200
        wait_until(lambda: len(chat_rows(config)) == 1, timeout=5, what="the first row")
        os.kill(redis.proc.pid, signal.SIGSTOP)
        try:
            stalled = httpx.post(url, content=BODY, headers=headers, timeout=30)
        finally:
            os.kill(redis.proc.pid, signal.SIGCONT)
        assert stalled.status_code == 503, stalled.text
        assert stalled.json()["error"]["code"] == "gateway_unavailable"
        wait_until(lambda: budget_status(config, budget_id)["reserved_usd"] == 0, timeout=10,
                   what="the stalled reservation taken back")
        served = httpx.post(url, content=BODY, headers=headers, timeout=30)
        assert served.status_code == 200, served.text
    finally:
        gw.stop()


def test_spend_report_and_budget_status_from_the_cli(tmp_path, fake_openai, fake_anthropic):
    config = configure(tmp_path, fake_openai, fake_anthropic,
                       f"sqlite:///{tmp_path / 'state.db'}")
    secret, budget_id = key_and_budget(config, 100 * WORST_CASE)
    gw = GatewayProcess("mitmproxy", config, tmp_path).start()
    try:
        for _ in range(2):
            assert httpx.post(f"{gw.url}/v1/chat/completions", content=BODY,
                              headers={"authorization": f"Bearer {secret}"}).status_code == 200
        wait_until(lambda: len(chat_rows(config)) == 2, timeout=5, what="ledger rows")
    finally:
        gw.stop()
    rows = chat_rows(config)
    total = sum(r.cost_micros for r in rows)
    doc = json.loads(tollgate("spend", "report", "--by", "principal", "--window", "month",
                              "--format", "json", config=config).stdout)
    assert doc["by"] == "principal" and doc["window"] == "month"
    assert doc["rows"] == [{"principal": "bob@acme.com", "requests": 2,
                            "input_tokens": sum(r.input_tokens for r in rows),
                            "output_tokens": sum(r.output_tokens for r in rows),
                            "cached_input_tokens": 0, "cache_write_tokens": 0,
                            "web_search_requests": 0, "cost_micros": total, "estimated": 0,
                            "cost_usd": round(total / 1_000_000, 6)}]
    by_team = tollgate("spend", "report", "--by", "team", "--format", "csv", config=config)
    assert by_team.stdout.splitlines()[1].startswith("team_eng,2,")
    table = tollgate("spend", "report", "--by", "model", config=config).stdout
    assert "gpt-5-mini" in table and "COST_USD" in table
    status = budget_status(config, budget_id)
    assert round(status["spent_usd"] * 1_000_000) == total and status["reserved_usd"] == 0


@pytest.mark.parametrize("host", HOSTS)
def test_a_stalled_provider_times_out_and_its_hold_is_released(host, tmp_path, fake_openai,
                                                               fake_anthropic):
    config = configure(tmp_path, fake_openai, fake_anthropic,
                       f"sqlite:///{tmp_path / 'state.db'}")
    _, budget_id = key_and_budget(config, 100 * WORST_CASE)
    tollgate("model-providers", "update", "mp_openai", "--first-byte-timeout", "1",
             config=config)
    policy = json.loads(tollgate(
        "routing-policies", "create", "--scope", "ORG:acme", "--name", "stall",
        "--model-provider", "mp_openai", "--model-provider", "mp_anthropic", "--model-map",
        "mp_anthropic:gpt-5-mini=claude-haiku-4-5", "--format", "json", config=config).stdout)
    secret = json.loads(tollgate(
        "virtual-keys", "create", "--name", "stall", "--scope", "TEAM:team_eng",
        "--routing-policy", policy["id"], "--config-json", '{"fallback": {"on": ["timeout"]}}',
        "--format", "json", config=config).stdout)["secret"]
    fake_openai.enqueue(Behaviour("hang", seconds=5))
    gw = GatewayProcess(host, config, tmp_path).start()
    try:
        r = httpx.post(f"{gw.url}/v1/chat/completions", content=BODY, timeout=30,
                       headers={"authorization": f"Bearer {secret}"})
        assert r.status_code == 200 and r.headers["x-langwatch-provider"] == "mp_anthropic", \
            (r.status_code, r.text, gw.log()[-3000:])
        rid = r.headers["x-langwatch-request-id"]
        row = wait_until(lambda: next((x for x in ledger(config) if x.request_id == rid), None),
                         timeout=10, what="the ledger row")
    finally:
        gw.stop()
    assert (row.fallback_count, row.provider) == (1, "mp_anthropic") and row.cost_micros > 0
    status = budget_status(config, budget_id)
    assert status["reserved_usd"] == 0  # the stalled attempt holds nothing
    assert round(status["spent_usd"] * 1_000_000) == row.cost_micros


@pytest.mark.parametrize("host", HOSTS)
def test_sigterm_with_open_streams_records_every_one(host, tmp_path, fake_openai,
                                                     fake_anthropic):
    """50 streams are open when the gateway is told to stop: each finishes or is cut
    cleanly, and the ledger has all 50."""
    config = configure(tmp_path, fake_openai, fake_anthropic,
                       f"sqlite:///{tmp_path / 'state.db'}")
    secret, _ = key_and_budget(config, 1000 * WORST_CASE)
    fake_openai.chunk_delay = 0.15  # each stream lasts about two seconds
    gw = GatewayProcess(host, config, tmp_path).start()
    body = {"model": "gpt-5-mini", "stream": True, "max_tokens": MAX_TOKENS,
            "messages": [{"role": "user", "content": "hi"}]}

    async def streams() -> list[str | BaseException]:
        opened: list[str] = []
        all_open = asyncio.Event()
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=60)) as c:
            async def one() -> str:
                async with c.stream("POST", f"{gw.url}/v1/chat/completions", json=body,
                                    headers={"authorization": f"Bearer {secret}"}) as r:
                    opened.append(r.headers["x-langwatch-request-id"])
                    if len(opened) == 50:
                        all_open.set()
                    async for _ in r.aiter_raw():
                        pass
                    return r.headers["x-langwatch-request-id"]

            tasks = [asyncio.create_task(one()) for _ in range(50)]
            # Every stream under way (however long a loaded machine takes to open them),
            # most of each still to come.
            await asyncio.wait_for(all_open.wait(), 20)
            gw.proc.send_signal(signal.SIGTERM)
            return await asyncio.gather(*tasks, return_exceptions=True)

    try:
        results = asyncio.run(streams())
        assert gw.proc.wait(20) == 0
    finally:
        gw.stop()
    assert all(isinstance(r, str | httpx.HTTPError) for r in results), results
    rows = chat_rows(config)
    assert len(rows) == 50 and len({r.request_id for r in rows}) == 50
    finished = {r for r in results if isinstance(r, str)}
    assert {r.outcome for r in rows if r.request_id in finished} <= {"completed"}
    assert all(r.cost_micros > 0 for r in rows)  # cut or not, what streamed is charged


@pytest.mark.parametrize("host", HOSTS)
def test_a_gateway_killed_mid_stream_leaves_the_streamed_output_charged(
        host, tmp_path, fake_openai, fake_anthropic):
    """SIGKILL the whole gateway while a long answer streams: the next gateway on the same
    state records the request once, as interrupted, charged its input and the output that
    had streamed by the last checkpoint (not its input alone), to its budget."""
    import os
    import threading

    from tollgate.pricing import cost_micros
    from tollgate.usage import Usage, estimate_tokens

    config = configure(tmp_path, fake_openai, fake_anthropic, state_url(tmp_path, "sqlite",
                                                                        None))
    config.write_text(config.read_text().replace(
        "max_body_bytes:", "checkpoint_seconds: 1\n  max_body_bytes:"))
    secret, budget_id = key_and_budget(config, 100 * WORST_CASE)
    fake_openai.answer_words, fake_openai.chunk_delay = 600, 0.02  # about 12 s of stream
    body = json.dumps({**json.loads(BODY), "stream": True}).encode()
    gw = GatewayProcess(host, config, tmp_path).start()
    received: list[str] = []

    def stream() -> None:
        with contextlib.suppress(httpx.HTTPError), httpx.stream(
                "POST", f"{gw.url}/v1/chat/completions", content=body, timeout=30,
                headers={"authorization": f"Bearer {secret}"}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    for choice in json.loads(line[6:])["choices"]:
                        received.append(choice["delta"].get("content") or "")

    reader = threading.Thread(target=stream)
    try:
        reader.start()
        wait_until(lambda: len(received) >= 100, timeout=20, what="the stream under way")
        seen = sum(map(len, received))
        time.sleep(2.5)  # past a checkpoint
        os.killpg(gw.proc.pid, signal.SIGKILL)
        gw.proc.wait(10)
        reader.join(10)
    finally:
        gw.stop()
    assert 0 < len(received) < 600  # cut short by the kill
    fake_openai.chunk_delay = 0
    again = GatewayProcess(host, config, tmp_path).start()  # recovers what it left
    again.stop()

    (row,) = [r for r in chat_rows(config) if r.outcome == "interrupted"]
    assert not row.usage_reported
    assert estimate_tokens(seen) <= row.output_tokens <= estimate_tokens(sum(map(len, received)))
    input_only = cost_micros(Usage(input_tokens=row.input_tokens), PRICES.lookup("gpt-5-mini"))
    assert row.cost_micros > input_only
    assert budget_status(config, budget_id)["spent_usd"] == row.cost_micros / 1_000_000


@pytest.mark.parametrize("second", HOSTS)
def test_a_second_process_on_a_sqlite_state_refuses_rate_limits_it_cannot_share(
        tmp_path, fake_openai, fake_anthropic, second):
    """Rate limits on SQLite are counted in the process that serves the file: a second
    gateway process on the same file would admit the full limit again, so it refuses to
    start with them, and refuses a reload that adds them (the last good config serves)."""
    config = make_config(tmp_path, fake_openai, fake_anthropic)
    first = GatewayProcess("mitmproxy", config, tmp_path).start()
    try:
        # No rate limits yet: two processes may share the file (budgets are in the file).
        other = GatewayProcess(second, config, tmp_path).start()
        try:
            tollgate("virtual-keys", "create", "--name", "limited", "--scope", "ORG:acme",
                     "--rpm", "5", config=config)

            def rejected() -> str | None:
                out = json.loads(tollgate("status", "--format", "json", config=config,
                                          check=False).stdout)
                mine = [g for g in out["gateways"] if g["pid"] == other.proc.pid]
                return mine and mine[0].get("last_error")

            error = wait_until(rejected, timeout=10, what="the second gateway's rejection")
            assert "more than one gateway process serves" in error and "redis://" in error
            assert first.proc.poll() is None and other.proc.poll() is None  # both serve
        finally:
            other.stop()
        late = GatewayProcess(second, config, tmp_path)
        with pytest.raises(RuntimeError, match="more than one gateway process serves"):
            late.start()
    finally:
        first.stop()
