"""The core pipeline with no proxy at all: Request in, Reply or Forward out."""

from __future__ import annotations

import asyncio
import gc
import json
import weakref
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.harness import RedisServer
from tollgate import budgets as budget_rules
from tollgate.cli.main import cli
from tollgate.config.load import load_config
from tollgate.config.watch import ConfigHolder
from tollgate.errors import GatewayError
from tollgate.gateway import Gateway
from tollgate.request import Forward, Reply, Request
from tollgate.store.redis import RedisStore
from tollgate.store.sqlite import SQLiteStore

PEPPER = "core-pepper"


@pytest.fixture
def setup(config_dir: Path, monkeypatch):
    monkeypatch.setenv("TOLLGATE_KEY_PEPPER", PEPPER)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-real-openai")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-real")
    path = config_dir / "gateway.yaml"

    def key(*args: str) -> str:
        result = CliRunner().invoke(cli, ["--config", str(path), "virtual-keys", "create",
                                          "--name", "k", "--scope", "ORG:acme", *args,
                                          "--format", "json"])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)["secret"]

    def gateway() -> Gateway:
        return Gateway(ConfigHolder(path))

    return key, gateway


def request(path: str, body: object = None, secret: str | None = None,
            header: str = "authorization", **headers: str) -> Request:
    h = {k.replace("_", "-"): v for k, v in headers.items()}
    if secret:
        h[header] = f"Bearer {secret}" if header == "authorization" else secret
    raw = body if isinstance(body, bytes) else json.dumps(body).encode() if body else b""
    return Request("POST" if body is not None else "GET", path, h, raw)


CHAT = {"model": "gpt-5-mini", "messages": [{"role": "user", "content": "hi"}]}
MSG = {"model": "claude-sonnet-4-5", "max_tokens": 10,
       "messages": [{"role": "user", "content": "hi"}]}


async def test_forward_to_openai_sets_credentials_and_keeps_body(setup):
    key, gateway = setup
    secret = key()
    result = await gateway().handle(request("/v1/chat/completions", CHAT, secret,
                                            x_langwatch_debug="1"))
    assert isinstance(result, Forward)
    a = result.attempt
    assert a.url == "https://api.openai.com/v1/chat/completions"
    assert a.authority == "api.openai.com"
    assert a.set_headers["authorization"] == "Bearer sk-real-openai"
    assert "x-api-key" in a.remove_headers and "x-langwatch-debug" in a.remove_headers
    assert a.body is None
    headers = result.exchange.response_headers()
    assert headers["X-LangWatch-Provider"] == "mp_openai_org"
    assert headers["X-LangWatch-Fallback-Count"] == "0"


async def test_forward_to_anthropic_accepts_bearer_and_sets_x_api_key(setup):
    key, gateway = setup
    secret = key()
    result = await gateway().handle(request("/v1/messages", MSG, secret))
    assert isinstance(result, Forward)
    a = result.attempt
    assert a.url == "https://api.anthropic.com/v1/messages"
    assert a.set_headers["x-api-key"] == "sk-ant-real"
    assert a.set_headers["anthropic-version"] == "2023-06-01"
    assert "authorization" in a.remove_headers


async def test_anthropic_version_from_client_is_kept(setup):
    key, gateway = setup
    secret = key()
    result = await gateway().handle(request("/v1/messages", MSG, secret, header="x-api-key",
                                            anthropic_version="2024-01-01"))
    # Set again on each attempt (Envoy's attempts share one header map), with its value.
    assert result.attempt.set_headers["anthropic-version"] == "2024-01-01"


@pytest.mark.parametrize(("path", "family"), [("/v1/chat/completions", "openai"),
                                              ("/v1/messages", "anthropic")])
async def test_error_envelopes_per_family(setup, path, family):
    _, gateway = setup
    result = await gateway().handle(request(path, CHAT))
    assert isinstance(result, Reply) and result.status == 401
    doc = json.loads(result.body)
    if family == "openai":
        assert doc == {"error": {"message": doc["error"]["message"],
                                 "type": "authentication_error", "code": "invalid_api_key",
                                 "param": None}}
    else:
        assert doc["type"] == "error"
        assert doc["error"]["type"] == "authentication_error"
        assert doc["error"]["code"] == "invalid_api_key"
    assert result.headers["X-LangWatch-Request-Id"].startswith("req_")
    assert result.headers["X-LangWatch-Provider"] == "tollgate"


async def test_expired_and_missing_provider_credential(setup, monkeypatch):
    key, gateway = setup
    secret = key("--expires-in", "1d")
    gw = gateway()
    assert isinstance(await gw.handle(request("/v1/chat/completions", CHAT, secret)), Forward)
    import tollgate.keys as keys

    later = datetime.now(UTC) + timedelta(days=2)
    monkeypatch.setattr(keys, "datetime", type("Clock", (), {"now": staticmethod(
        lambda tz=None: later)}))
    expired = await gw.handle(request("/v1/chat/completions", CHAT, secret))
    assert json.loads(expired.body)["error"]["code"] == "virtual_key_expired"
    monkeypatch.undo()
    monkeypatch.setenv("TOLLGATE_KEY_PEPPER", PEPPER)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    missing = await gw.handle(request("/v1/chat/completions", CHAT, secret))
    assert missing.status == 502
    assert "OPENAI_API_KEY" in json.loads(missing.body)["error"]["message"]


async def test_project_key_sees_team_and_org_providers(setup, config_dir):
    key, gateway = setup
    runner = CliRunner()
    path = str(config_dir / "gateway.yaml")
    assert runner.invoke(cli, ["--config", path, "model-providers", "create", "--type",
                               "openai", "--scope", "TEAM:team_eng", "--id", "mp_team",
                               "--api-key-env", "OPENAI_API_KEY", "--base-url",
                               "http://10.0.0.7:8000/openai", "--fallback-priority",
                               "0"]).exit_code == 0
    project_key = CliRunner().invoke(cli, [
        "--config", path, "virtual-keys", "create", "--name", "p",
        "--scope", "PROJECT:proj_web", "--format", "json"])
    secret = json.loads(project_key.stdout)["secret"]
    result = await gateway().handle(request("/v1/chat/completions", CHAT, secret))
    assert result.attempt.provider_id == "mp_team"
    assert result.attempt.url == "http://10.0.0.7:8000/openai/v1/chat/completions"
    org_secret = key()
    org_result = await gateway().handle(request("/v1/chat/completions", CHAT, org_secret))
    assert org_result.attempt.provider_id == "mp_openai_org"


async def test_routing_policy_order_wins_over_priority(setup, config_dir):
    key, gateway = setup
    runner = CliRunner()
    path = str(config_dir / "gateway.yaml")
    runner.invoke(cli, ["--config", path, "model-providers", "create", "--type", "openai",
                        "--scope", "ORG:acme", "--id", "mp_backup", "--api-key-env",
                        "OPENAI_API_KEY", "--fallback-priority", "50"])
    runner.invoke(cli, ["--config", path, "routing-policies", "create", "--scope", "ORG:acme",
                        "--name", "backup-first", "--id", "rp_backup", "--model-provider",
                        "mp_backup", "--model-provider", "mp_openai_org"])
    secret = key("--routing-policy", "rp_backup")
    result = await gateway().handle(request("/v1/chat/completions", CHAT, secret))
    assert result.attempt.provider_id == "mp_backup"


async def test_models_route_answers_in_client_shape(setup):
    key, gateway = setup
    secret = key("--models-allowed", "claude-*")
    gw = gateway()
    openai_shape = await gw.handle(request("/v1/models", None, secret))
    ids = [m["id"] for m in json.loads(openai_shape.body)["data"]]
    assert "claude-sonnet-4-5" in ids and not any(i.startswith("gpt") for i in ids)
    anthropic_shape = await gw.handle(request("/v1/models", None, secret,
                                              anthropic_version="2023-06-01"))
    doc = json.loads(anthropic_shape.body)
    assert doc["has_more"] is False and doc["data"][0]["type"] == "model"


async def test_wrong_method_and_unknown_path(setup):
    key, gateway = setup
    secret = key()
    gw = gateway()
    r = await gw.handle(Request("GET", "/v1/chat/completions",
                                {"authorization": f"Bearer {secret}"}, b""))
    assert r.status == 405
    r = await gw.handle(request("/admin/secrets", {}, secret))
    assert r.status == 404


async def test_internal_failure_is_a_500_envelope_not_a_trace(setup, monkeypatch):
    key, gateway = setup
    secret = key()
    import tollgate.policy as policy

    def boom(*a, **k):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(policy, "check_tools", boom)
    r = await gateway().handle(request("/v1/chat/completions", CHAT, secret))
    assert r.status == 500
    assert b"kaboom" not in r.body and b"Traceback" not in r.body
    assert json.loads(r.body)["error"]["code"] == "gateway_error"


async def test_unpriced_model_is_refused_unless_allowed(setup, config_dir):
    key, gateway = setup
    path = config_dir / "gateway.yaml"
    secret = key()
    body = {"model": "gpt-5-pro-preview", "messages": [{"role": "user", "content": "hi"}]}
    refused = await gateway().handle(request("/v1/chat/completions", body, secret))
    assert refused.status == 400
    assert json.loads(refused.body)["error"]["code"] == "model_not_priced"
    path.write_text(path.read_text().replace("unpriced: block", "unpriced: allow"))
    served = await gateway().handle(request("/v1/chat/completions", body, secret))
    assert isinstance(served, Forward) and served.exchange.billing.price is None


async def test_budget_with_provider_filter_applies_only_to_that_provider(setup, config_dir):
    key, gateway = setup
    secret = key()
    result = CliRunner().invoke(cli, [
        "--config", str(config_dir / "gateway.yaml"), "gateway-budgets", "create", "--name",
        "anthropic-only", "--scope", "org", "--org", "acme", "--limit", "0.000001",
        "--model-provider", "mp_anthropic_org"])
    assert result.exit_code == 0, result.output
    gw = gateway()
    openai_side = await gw.handle(request("/v1/chat/completions", CHAT, secret))
    assert isinstance(openai_side, Forward)
    anthropic_side = await gw.handle(request("/v1/messages", MSG, secret))
    assert anthropic_side.status == 402
    assert "anthropic-only" in json.loads(anthropic_side.body)["error"]["message"]
    assert int(anthropic_side.headers["retry-after"]) > 0


async def test_close_waits_for_settlements_and_returns(setup):
    key, gateway = setup
    secret = key()
    gw = gateway()
    forward = await gw.handle(request("/v1/chat/completions", CHAT, secret))
    forward.exchange.on_response_headers(200, {"content-type": "application/json"})
    forward.exchange.on_chunk(b'{"usage": {"prompt_tokens": 3, "completion_tokens": 2}}')
    forward.exchange.finish("completed")  # schedules the settlement on this loop
    # A finished settlement must not keep close() spinning; the guard only catches a hang.
    await asyncio.wait_for(gw.close(), timeout=30)
    rows = await SQLiteStore(gw.holder.path.parent / ".tollgate" / "state.db",
                             owner=False).rows()
    assert [(r.input_tokens, r.output_tokens) for r in rows] == [(3, 2)]


async def test_a_request_is_settled_after_the_host_call_that_ends_it_even_with_eager_tasks(
        setup):
    """mitmproxy runs new tasks eagerly, and sends a stream's end only after the hook that
    finishes the exchange: the settlement (ledger row, budgets, span, access log) must wait
    for a later turn of the loop, not run inside that hook."""
    key, gateway = setup
    secret = key()
    gw = gateway()
    asyncio.get_running_loop().set_task_factory(asyncio.eager_task_factory)
    try:
        forward = await gw.handle(request("/v1/chat/completions", CHAT, secret))
        forward.exchange.on_response_headers(200, {"content-type": "application/json"})
        forward.exchange.on_chunk(b'{"usage": {"prompt_tokens": 3, "completion_tokens": 2}}')
        forward.exchange.finish("completed")
        assert gw.in_flight() == 1  # not settled inside finish()
        await gw.drain()
        assert gw.in_flight() == 0
    finally:
        asyncio.get_running_loop().set_task_factory(None)
    await gw.close()
    rows = await SQLiteStore(gw.holder.path.parent / ".tollgate" / "state.db",
                             owner=False).rows()
    assert [(r.input_tokens, r.output_tokens, r.outcome) for r in rows] == [(3, 2, "completed")]


async def test_a_settled_request_is_freed_without_the_cyclic_collector(setup):
    """Nothing of a request outlives it in a reference cycle: its objects go as soon as
    the hosts and the settlement let go of them, not at the collector's next pass (which
    would then scan every request's leftovers, on the event loop)."""
    key, gateway = setup
    secret = key()
    gw = gateway()
    gc.disable()
    try:
        forward = await gw.handle(request("/v1/chat/completions", CHAT, secret))
        exchange = weakref.ref(forward.exchange)
        trace = weakref.ref(forward.exchange.trace)
        forward.exchange.on_response_headers(200, {"content-type": "application/json"})
        forward.exchange.on_chunk(b'{"usage": {"prompt_tokens": 3, "completion_tokens": 2}}')
        forward.exchange.finish("completed")
        row = forward.exchange.settlement.row
        await gw.drain()
        del forward
        await asyncio.sleep(0)
        assert exchange() is None and trace() is None
        assert row is not None and row.output_tokens == 2  # what it came to, kept
    finally:
        gc.enable()
        await gw.close()


async def test_a_retrying_host_starts_attempts_by_provider(setup, config_dir):
    """Envoy names the provider each attempt reached; the attempts before it failed."""
    key, gateway = setup
    path = str(config_dir / "gateway.yaml")
    runner = CliRunner()
    runner.invoke(cli, ["--config", path, "model-providers", "create", "--type", "openai",
                        "--scope", "ORG:acme", "--id", "mp_backup", "--api-key-env",
                        "OPENAI_API_KEY"])
    runner.invoke(cli, ["--config", path, "routing-policies", "create", "--scope", "ORG:acme",
                        "--name", "pair", "--id", "rp_pair", "--model-provider",
                        "mp_openai_org", "--model-provider", "mp_backup"])
    secret = key("--routing-policy", "rp_pair", "--config-json", '{"fallback": {"on": ["5xx"]}}')
    gw = gateway()
    forward = await gw.handle(request("/v1/chat/completions", CHAT, secret))
    exchange = forward.exchange
    assert [a.provider_id for a in exchange.cursor.attempts] == ["mp_openai_org", "mp_backup"]
    assert exchange.begin_attempt("mp_openai_org").provider_id == "mp_openai_org"
    exchange.attempt_answered(503)
    assert exchange.begin_attempt("mp_backup").provider_id == "mp_backup"
    assert exchange.cursor.fallback_count == 1
    assert exchange.response_headers()["X-LangWatch-Provider"] == "mp_backup"
    assert gw.breakers._count == {"mp_openai_org": 1}  # the failed attempt counts
    # A provider outside the plan leaves the exchange where it was.
    assert exchange.begin_attempt("mp_elsewhere").provider_id == "mp_backup"
    exchange.finish("completed")
    await gw.close()


@pytest.mark.parametrize(("content_type", "chunks", "done"), [
    ("text/event-stream", [b"data: {}\n\n"], False),
    ("text/event-stream", [b"data: {}\n\n", b"data: [DONE]\n\n"], True),
    ("text/event-stream", [b"event: message_stop\ndata: {}\n", b"\n"], True),
    ("text/event-stream", [b"event: response.completed\ndata: {}\n\n"], True),
    ("application/json", [b'{"a":', b' 1}'], True),
    ("application/json", [b'{"a":'], False),
])
async def test_a_response_is_complete_at_its_length_or_last_event(setup, content_type, chunks,
                                                                  done):
    key, gateway = setup
    secret = key()
    gw = gateway()
    body = {**CHAT, "stream": content_type == "text/event-stream"}
    result = await gw.handle(request("/v1/chat/completions", body, secret))
    assert isinstance(result, Forward), result.body
    exchange = result.exchange
    exchange.on_response_headers(200, {"content-type": content_type, "content-length": "8"}
                                 if content_type == "application/json" else
                                 {"content-type": content_type})
    for chunk in chunks:
        exchange.on_chunk(chunk)
    assert exchange.complete is done
    exchange.finish("completed")
    await gw.close()


async def test_a_fallback_plan_reserves_for_its_dearest_model(setup, config_dir):
    """A cheap primary with a dear fallback holds the dear worst case, so fallbacks can
    never together spend past a blocking budget."""
    key, gateway = setup
    path = str(config_dir / "gateway.yaml")
    runner = CliRunner()
    for args in (["gateway-budgets", "create", "--name", "org", "--scope", "org", "--org",
                  "acme", "--limit", "1000"],
                 ["routing-policies", "create", "--scope", "ORG:acme", "--name", "dear",
                  "--id", "rp_dear", "--model-provider", "mp_openai_org", "--model-provider",
                  "mp_anthropic_org", "--model-map",
                  "mp_anthropic_org:gpt-5-mini=claude-opus-4-1"]):
        assert runner.invoke(cli, ["--config", path, *args]).exit_code == 0
    plain = key()
    with_fallback = key("--routing-policy", "rp_dear", "--config-json",
                        '{"fallback": {"on": ["5xx"]}}')
    gw = gateway()
    capped = {**CHAT, "max_completion_tokens": 1000}
    cheap = await gw.handle(request("/v1/chat/completions", capped, plain))
    dear = await gw.handle(request("/v1/chat/completions", capped, with_fallback))
    assert [a.model for a in dear.exchange.cursor.attempts] == ["gpt-5-mini", "claude-opus-4-1"]
    # Same request: only the plan differs; claude-opus-4-1 costs 37.5x gpt-5-mini per token.
    assert dear.exchange.billing.reserved > 30 * cheap.exchange.billing.reserved > 0
    for forward in (cheap, dear):
        forward.exchange.finish("completed")
    await gw.close()



def test_circuit_breaker_settings_follow_a_reload(setup, config_dir):
    _, gateway = setup
    gw = gateway()
    assert (gw.breakers.failures, gw.breakers.cooldown) == (3, 30.0)
    path = config_dir / "gateway.yaml"
    text = path.read_text()
    assert "circuit_breaker" not in text
    path.write_text(text.replace("gateway:\n", "gateway:\n  circuit_breaker: "
                                 "{failures: 5, cooldown_seconds: 2.5}\n", 1))
    assert gw.holder.check() is True
    assert (gw.breakers.failures, gw.breakers.cooldown) == (5, 2.5)


async def test_a_provider_price_wins_over_the_price_table(setup, config_dir):
    """A contract price on the provider (its `prices`) is what its requests cost."""
    from tollgate.ledger import LedgerRow

    path = config_dir / "gateway.yaml"
    path.write_text(path.read_text().replace(
        "    api_key_env: OPENAI_API_KEY\n",
        "    api_key_env: OPENAI_API_KEY\n"
        "    prices: {gpt-5-mini: {input: 0.10, output: 1.00}}\n", 1))
    key, gateway = setup
    secret = key()
    gw = gateway()
    rows: list[LedgerRow] = []
    gw._settle = lambda exchange, row: rows.append(row)  # the row, not the store
    result = await gw.handle(request("/v1/chat/completions", CHAT, secret))
    assert isinstance(result, Forward)
    result.exchange._settle = gw._settle
    result.exchange.on_response_headers(200, {"content-type": "application/json"})
    result.exchange.on_chunk(json.dumps({"usage": {"prompt_tokens": 1_000_000,
                                                   "completion_tokens": 1_000_000}}).encode())
    result.exchange.finish("completed")
    assert rows[0].cost_micros == 1_100_000  # $0.10 + $1.00, not the table's $0.25 + $2.00


async def test_a_long_request_keeps_its_redis_hold_past_the_lease(setup, tmp_path):
    """Holds in Redis are leases (a crashed replica's expire); the gateway renews those of
    requests still running, however long they run, and the settle releases them."""
    key, _ = setup
    secret = key()
    path = tmp_path / "gateway.yaml"
    result = CliRunner().invoke(cli, ["--config", str(path), "gateway-budgets", "create",
                                      "--name", "org", "--scope", "org", "--org", "acme",
                                      "--limit", "100", "--format", "json"])
    assert result.exit_code == 0, result.output
    budget = json.loads(result.stdout)
    server = RedisServer(tmp_path / "redis").start()
    store = RedisStore(server.url, lease_seconds=3)
    gw = Gateway(ConfigHolder(path), store=store)
    try:
        forward = await gw.handle(request("/v1/chat/completions", CHAT, secret))
        assert isinstance(forward, Forward)
        exchange = forward.exchange
        held = exchange.billing.reserved
        assert held > 0
        await asyncio.sleep(7)  # over two leases: renewed, not expired
        (b,) = [x for x in load_config(path).config.budgets if x.id == budget["id"]]
        hold = budget_rules.current_hold(b, datetime.now(UTC))
        assert (await store.counters([hold]))[0].reserved == held
        exchange.on_response_headers(200, {"content-type": "application/json"})
        exchange.on_chunk(json.dumps({"usage": {"prompt_tokens": 3,
                                                "completion_tokens": 4}}).encode())
        exchange.finish("completed")
        await gw.drain()
        counter = (await store.counters([hold]))[0]
        assert counter.reserved == 0 and counter.spent > 0
    finally:
        await gw.close()
        server.stop()


async def test_envoy_outage_log_is_read_into_the_ledger_once(setup, tmp_path):
    """What Envoy refused while ext_proc was down: each line becomes one row under Envoy's
    request id, attributed by the key's shown prefix, and is never recorded twice (a
    restart, a line still being written, a rotated or truncated log, a lost offset)."""
    import os

    from extproc.proxy_replies import OutageLog

    key, gateway = setup
    secret = key("--principal", "alice@acme.com")
    gw = gateway()
    log_path = tmp_path / "envoy-outage.log"

    def line(request_id: str, authorization: str | None = None) -> str:
        return json.dumps({
            "request_id": request_id, "start_time": "2026-11-29T10:00:00.250Z",
            "method": "POST", "path": "/v1/chat/completions", "status": 503,
            "details": "ext_proc_error_gRPC_error_14{...}", "authorization": authorization,
            "x-api-key": None, "peer": "127.0.0.1", "bytes_received": 40}) + "\n"

    whole, half = line("env-1", f"Bearer {secret[:12]}"), line("env-3")
    log_path.write_text(whole + line("env-2", "Bearer sk-proj-abcd") + "not json\n"
                        + half[:30])
    assert OutageLog(gw, log_path).read() == 2  # the garbage line is skipped, the half waits
    assert OutageLog(gw, log_path).read() == 0  # a restart starts where the last one stopped
    with log_path.open("a") as f:
        f.write(half[30:])
    assert OutageLog(gw, log_path).read() == 1
    log_path.with_name(log_path.name + ".offset").unlink()  # stopped before saving it
    assert OutageLog(gw, log_path).read() == 4 - 1  # read again: the store keeps one each
    os.truncate(log_path, 0)  # logrotate's copytruncate
    log_path.write_text(line("env-4"))
    assert OutageLog(gw, log_path).read() == 1
    log_path.rename(tmp_path / "envoy-outage.log.1")  # rotated away; Envoy opens a new one
    log_path.write_text(line("env-5"))
    assert OutageLog(gw, log_path).read() == 1
    await asyncio.wait_for(gw.close(), timeout=30)

    found = await SQLiteStore(gw.holder.path.parent / ".tollgate" / "state.db",
                              owner=False).rows()
    assert sorted(r.request_id for r in found) == ["env-1", "env-2", "env-3", "env-4", "env-5"]
    rows = {r.request_id: r for r in found}
    assert all(r.status == 503 and r.code == "gateway_unavailable" and r.cost_micros == 0
               and r.outcome == "refused" and r.route == "chat_completions"
               for r in rows.values())
    assert rows["env-1"].principal == "alice@acme.com"
    assert rows["env-2"].key_id is None and rows["env-3"].key_id is None
    assert rows["env-1"].ts.startswith("2026-11-29T10:00:00.250")


async def test_an_outage_log_line_that_cannot_be_recorded_does_not_stop_the_rest(
        setup, tmp_path, monkeypatch, caplog):
    from extproc.proxy_replies import OutageLog

    _, gateway = setup
    gw = gateway()
    recorded: list[str | None] = []

    def record(req, status, detail, *, request_id=None, at=None, key_prefix_only=False):
        if request_id == "bad":
            raise RuntimeError("boom")
        recorded.append(request_id)

    monkeypatch.setattr(gw, "record_proxy_reply", record)
    log_path = tmp_path / "envoy-outage.log"
    log_path.write_text("".join(json.dumps({
        "request_id": rid, "start_time": "2026-11-29T10:00:00.000Z", "status": 503}) + "\n"
        for rid in ("a", "bad", "b")))
    assert OutageLog(gw, log_path).read() == 2
    assert OutageLog(gw, log_path).read() == 0  # the bad line is not tried again
    assert recorded == ["a", "b"] and "could not record" in caplog.text
    await gw.close()


@pytest.mark.parametrize("route, body, unseen", [
    ("/v1/responses", {"model": "gpt-5-mini", "input": "and then?", "max_output_tokens": 100,
                       "previous_response_id": "resp_1"}, "previous_response_id"),
    ("/v1/chat/completions", {**CHAT, "max_completion_tokens": 100, "messages": [
        {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]},
     "a image_url URL"),
    ("/v1/messages", {**MSG, "messages": [{"role": "user", "content": [
        {"type": "document", "source": {"type": "file", "file_id": "file_1"}}]}]},
     "a file id"),
    ("/v1/responses", {"model": "gpt-5-mini", "max_output_tokens": 100,
                       "prompt": {"id": "pmpt_1", "variables": {"city": "Oslo"}}},
     "a stored prompt"),
    ("/v1/responses", {"model": "gpt-5-mini", "max_output_tokens": 100, "input": [
        {"type": "item_reference", "id": "msg_1"},
        {"role": "user", "content": "and then?"}]}, "an item reference"),
    # Tools the provider runs itself: what they find is read in as input.
    ("/v1/responses", {"model": "gpt-5-mini", "input": "news?", "max_output_tokens": 100,
                       "tools": [{"type": "function", "name": "lookup", "parameters": {}},
                                 {"type": "web_search"}]}, "the web_search tool"),
    ("/v1/responses", {"model": "gpt-5-mini", "input": "what do the docs say?",
                       "max_output_tokens": 100, "tools": [
                           {"type": "file_search", "vector_store_ids": ["vs_1"]}]},
     "the file_search tool"),
    ("/v1/messages", {**MSG, "tools": [
        {"type": "web_fetch_20250910", "name": "web_fetch", "max_uses": 3}]},
     "the web_fetch_20250910 tool"),
    ("/v1/messages", {**MSG, "mcp_servers": [
        {"type": "url", "url": "https://mcp.example.com/sse", "name": "docs"}]},
     "MCP servers"),
    ("/v1/chat/completions", {**CHAT, "max_completion_tokens": 100,
                              "web_search_options": {}}, "web_search_options"),
])
async def test_input_the_gateway_cannot_see_is_reserved_or_refused(setup, config_dir, route,
                                                                  body, unseen):
    """A blocking budget reserves its `unseen_input` allowance on top of what the body shows
    for a request whose input the provider fetches or remembers, or refuses it; a request
    with everything inline (a data: URI) is not affected."""
    key, gateway = setup
    path = str(config_dir / "gateway.yaml")
    secret = key()

    def budget(*extra: str) -> None:
        assert CliRunner().invoke(cli, ["--config", path, "gateway-budgets", "create",
                                        "--name", "org", "--scope", "org", "--org", "acme",
                                        "--limit", "1000", "--id", "b_org", *extra]
                                  ).exit_code == 0

    budget()
    plain = await gateway().handle(request(route, body, secret))
    assert isinstance(plain, Forward)
    CliRunner().invoke(cli, ["--config", path, "gateway-budgets", "update", "b_org",
                             "--unseen-input", "20000"])
    allowed = await gateway().handle(request(route, body, secret))
    assert allowed.exchange.billing.reserved > plain.exchange.billing.reserved
    CliRunner().invoke(cli, ["--config", path, "gateway-budgets", "update", "b_org",
                             "--unseen-input", "refuse"])
    refused = await gateway().handle(request(route, body, secret))
    assert isinstance(refused, Reply) and refused.status == 402
    assert refused.decision["unseen_input"] == unseen
    assert "cannot see" in refused.decision["message"]
    inline = {**CHAT, "max_completion_tokens": 10, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}],
        "tools": [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]}
    assert isinstance(await gateway().handle(request("/v1/chat/completions", inline, secret)),
                      Forward)
    for forward in (plain, allowed):
        forward.exchange.finish("completed")


async def test_the_web_searches_a_request_allows_are_in_its_worst_case(setup, config_dir):
    """Each web search is billed ($10 per 1,000 on the shipped prices) on top of the tokens:
    a blocking budget holds every search the request allows (Anthropic's `max_uses`,
    OpenAI's `max_tool_calls`), refuses a request whose searches it cannot cover, and says
    so."""
    key, gateway = setup
    secret = key()
    assert CliRunner().invoke(cli, ["--config", str(config_dir / "gateway.yaml"),
                                    "gateway-budgets", "create", "--name", "org", "--scope",
                                    "org", "--org", "acme", "--limit", "0.025", "--id", "b_org"]
                              ).exit_code == 0

    def searching(max_uses: int) -> dict:
        return {**MSG, "tools": [{"type": "web_search_20250305", "name": "web_search",
                                  "max_uses": max_uses}]}

    plain = await gateway().handle(request("/v1/messages", MSG, secret))
    one = await gateway().handle(request("/v1/messages", searching(1), secret))
    assert isinstance(plain, Forward) and isinstance(one, Forward)
    held = one.exchange.billing.reserved - plain.exchange.billing.reserved
    assert 10_000 <= held < 10_500  # one search, and the input its tool adds to the body
    refused = await gateway().handle(request("/v1/messages", searching(3), secret))
    assert isinstance(refused, Reply) and refused.status == 402
    assert "and 3 web searches" in refused.decision["message"]
    # OpenAI's Responses: `max_tool_calls` bounds its searches ($10 per 1,000 on gpt-5-mini).
    asked = {"model": "gpt-5-mini", "input": "news?", "max_output_tokens": 10,
             "tools": [{"type": "web_search"}]}
    unbounded = await gateway().handle(request("/v1/responses", asked, secret))
    bounded = await gateway().handle(request("/v1/responses", {**asked, "max_tool_calls": 1},
                                             secret))
    assert isinstance(unbounded, Forward) and isinstance(bounded, Forward)
    held = bounded.exchange.billing.reserved - unbounded.exchange.billing.reserved
    assert 10_000 <= held < 10_100
    for forward in (plain, one, unbounded, bounded):
        forward.exchange.finish("completed")


async def test_a_part_whose_type_is_not_a_string_is_the_providers_to_refuse(setup):
    """The walk for input the gateway cannot see meets whatever the client sent: a content
    part whose `type` is a list or an object is no part it knows, so the request goes on
    to the provider, whose own 400 the client gets (it was the gateway's 500: an unhashable
    value looked up in a set)."""
    key, gateway = setup
    secret = key()
    for odd in (["image_url"], {"kind": "image_url"}):
        body = {**CHAT, "max_completion_tokens": 10, "messages": [{"role": "user", "content": [
            {"type": odd, "image_url": {"url": "https://example.com/cat.png"}}]}]}
        forward = await gateway().handle(request("/v1/chat/completions", body, secret))
        assert isinstance(forward, Forward), forward
        forward.exchange.finish("completed")


async def test_a_streamed_chat_with_a_byte_order_mark_is_forwarded_asking_for_its_usage(
        setup):
    """A body that opens with a UTF-8 byte order mark parses (RFC 8259 lets a parser ignore
    it); the usage the gateway asks for is added to it like to any other (it was the
    gateway's 500: the splice met the mark where it looked for the opening brace)."""
    key, gateway = setup
    secret = key()
    raw = b"\xef\xbb\xbf" + json.dumps({**CHAT, "stream": True,
                                        "max_completion_tokens": 5}).encode()
    forward = await gateway().handle(request("/v1/chat/completions", raw, secret))
    assert isinstance(forward, Forward), forward
    sent = json.loads(forward.exchange.attempt.body)
    assert sent == {**CHAT, "stream": True, "max_completion_tokens": 5,
                    "stream_options": {"include_usage": True}}
    forward.exchange.finish("completed")


# Bodies with most of what each route reads, for the odd-types sweep below.
FULL_BODIES = [
    ("/v1/chat/completions", {
        **CHAT, "max_completion_tokens": 10, "stream": True, "service_tier": "auto",
        "stream_options": {"include_usage": True},
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "hi"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}),
    ("/v1/messages", {**MSG, "tools": [{"name": "t", "input_schema": {}}],
                      "system": [{"type": "text", "text": "s"}],
                      "messages": [{"role": "user", "content": [{"type": "text",
                                                                 "text": "hi"}]}]}),
    ("/v1/responses", {"model": "gpt-5-mini", "max_output_tokens": 10,
                       "tools": [{"type": "web_search"}],
                       "input": [{"role": "user", "content": [{"type": "input_text",
                                                               "text": "hi"}]}]}),
    ("/v1/embeddings", {"model": "text-embedding-3-small", "input": ["a", "b"]}),
]
ODD_VALUES = [None, 1, 1.5, True, "x", [], [1], {}, {"a": 1}, [["x"]], [{"type": []}],
              {"type": {}}]


def _places(doc: object, at: tuple = ()) -> list[tuple]:
    """The path to every value in `doc`, itself included."""
    found = [at]
    items = doc.items() if isinstance(doc, dict) else \
        enumerate(doc) if isinstance(doc, list) else []
    for k, v in items:
        found += _places(v, (*at, k))
    return found


def _replaced(doc: object, at: tuple, value: object) -> object:
    if not at:
        return value
    copy = json.loads(json.dumps(doc))
    parent = copy
    for k in at[:-1]:
        parent = parent[k]
    parent[at[-1]] = value
    return copy


@pytest.mark.parametrize("route, body", FULL_BODIES, ids=[r for r, _ in FULL_BODIES])
async def test_no_value_of_an_odd_type_anywhere_in_a_body_gets_the_gateways_500(
        setup, route, body):
    """Every value of a body the gateway reads, replaced in turn by a value of each other
    JSON type: the gateway refuses it with a 4xx that says what is wrong, or forwards it
    for the provider to judge; never its own 500."""
    key, gateway = setup
    secret = key()
    failed = []
    for at in _places(body):
        for odd in ODD_VALUES:
            result = await gateway().handle(request(route, _replaced(body, at, odd), secret))
            if isinstance(result, Forward):
                result.exchange.finish("completed")
            elif result.status >= 500:
                failed.append((at, odd, result.status))
    assert failed == []


async def test_a_refusal_says_what_the_request_could_cost_and_what_cap_fits(setup,
                                                                           config_dir):
    """No output cap: the model's ceiling is reserved; the 402 names it, what remains, the
    cap that fits and the command that raises the limit, and never says "exhausted" while
    nothing was spent."""
    key, gateway = setup
    path = str(config_dir / "gateway.yaml")
    assert CliRunner().invoke(cli, ["--config", path, "gateway-budgets", "create", "--name",
                                    "small", "--scope", "org", "--org", "acme", "--limit",
                                    "0.05", "--id", "b_small"]).exit_code == 0
    secret = key()
    refused = await gateway().handle(request("/v1/chat/completions", {
        **CHAT, "model": "gpt-5"}, secret))
    assert isinstance(refused, Reply) and refused.status == 402
    message = refused.decision["message"]
    assert "128,000 output tokens of gpt-5, its most, as the request sets no output cap" \
        in message
    assert "$0.05 remains" in message and "exhausted" not in message
    fits = refused.decision["max_output_tokens_that_fit"]
    assert f"Send max_completion_tokens <= {fits:,}" in message and 4_000 < fits < 5_000
    assert "`tollgate gateway-budgets update b_small --limit USD`" in message
    served = await gateway().handle(request("/v1/chat/completions", {
        **CHAT, "model": "gpt-5", "max_completion_tokens": fits}, secret))
    assert isinstance(served, Forward)
    served.exchange.finish("completed")


def test_header_values_are_checked_for_control_characters_and_size():
    from tollgate.request import MAX_HEADER_BYTES, check_header_values

    check_header_values({"a": "fine", "b": "x\ty"})  # a tab is a header value's
    for bad in ({"a": "x\ry"}, {"a": "fine", "b": "\x00"}):
        with pytest.raises(GatewayError, match="control character"):
            check_header_values(bad)
    # `only`: the values looked at; the size is every header's.
    check_header_values({"a": "x\ny", "b": "fine"}, only=["b", "c"])
    with pytest.raises(GatewayError, match="control character"):
        check_header_values({"a": "fine", "b": "x\ny"}, only=["b"])
    with pytest.raises(GatewayError, match="bytes"):
        check_header_values({"a": "x" * MAX_HEADER_BYTES, "b": "fine"}, only=["b"])


async def test_a_budget_only_holds_stand_in_the_way_of_waits_for_them_to_settle(
        setup, config_dir, monkeypatch):
    """A client sends its next request once it has its answer, which may be before that
    answer's end is settled (Envoy reports it after the client has it): a blocking budget
    the request fits once the holds of requests in flight are gone is asked again for a
    moment before it refuses. One that does not fit even then is refused at once, and one
    whose holds stay is refused once the moment is past."""
    from tollgate import admission

    key, gateway = setup
    result = CliRunner().invoke(cli, [
        "--config", str(config_dir / "gateway.yaml"), "gateway-budgets", "create", "--name",
        "org", "--scope", "org", "--org", "acme", "--limit", "0.30"])
    assert result.exit_code == 0, result.output
    secret, gw = key(), gateway()
    reservations = []
    store = gw.store()
    reserve = store.reserve

    async def counted(*args, **kwargs):
        reservations.append(args)
        return await reserve(*args, **kwargs)

    monkeypatch.setattr(store, "reserve", counted)
    capped = {**CHAT, "max_completion_tokens": 100_000}  # $0.20 held of $0.30
    first = await gw.handle(request("/v1/chat/completions", capped, secret))
    assert isinstance(first, Forward) and 200_000 <= first.exchange.billing.reserved < 210_000

    # Twice that does not fit even with nothing held: refused on its first reservation.
    reservations.clear()
    dear = await gw.handle(request("/v1/chat/completions",
                                   {**CHAT, "max_completion_tokens": 200_000}, secret))
    assert isinstance(dear, Reply) and dear.status == 402 and len(reservations) == 1

    # The same again fits once the first is settled, which happens while it waits.
    reservations.clear()
    second = asyncio.create_task(gw.handle(request("/v1/chat/completions", capped, secret)))
    await asyncio.sleep(0.05)
    assert not second.done()
    first.exchange.on_response_headers(200, {"content-type": "application/json"})
    first.exchange.on_chunk(b'{"usage": {"prompt_tokens": 3, "completion_tokens": 2}}')
    first.exchange.finish("completed")
    forwarded = await asyncio.wait_for(second, 5)
    assert isinstance(forwarded, Forward) and len(reservations) > 1

    # Its hold stays (its request runs on): the next is refused once the moment is past.
    monkeypatch.setattr(admission, "HOLDS_SETTLING", 0.05)
    reservations.clear()
    third = await gw.handle(request("/v1/chat/completions", capped, secret))
    assert isinstance(third, Reply) and third.status == 402 and len(reservations) > 1
    forwarded.exchange.finish("completed")
    await gw.close()
