"""Precedents (tollgate/precedent.py): a request like one forwarded before is decided from
that decision, and decided exactly as the full decision would decide it; anything a
precedent cannot vouch for goes to the full decision with nothing taken."""

from __future__ import annotations

import base64
import dataclasses
import json
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis as redis_client
import yaml
from click.testing import CliRunner

from extproc import decider
from extproc.service import ExternalProcessor, Forwarding, Replaying
from tests.harness import RedisServer
from tests.unit.test_gateway import CHAT, MSG
from tollgate import body as bodies
from tollgate import gateway as gateway_module
from tollgate import keys as keys_module
from tollgate import metrics
from tollgate import precedent as precedent_module
from tollgate.cli.main import cli
from tollgate.config.watch import ConfigHolder
from tollgate.exchange import Exchange
from tollgate.gateway import Gateway
from tollgate.ledger import LedgerRow
from tollgate.request import Reply
from tollgate.routes import ROUTES
from tollgate.store import StoreUnavailable
from tollgate.store.sqlite import SQLiteStore

PEPPER = "core-pepper"


@pytest.fixture
def gateways(config_dir: Path, monkeypatch):
    """A key with an org budget and no rate limits, and two gateways on the same config
    and state: one that decides from precedents, one that decides every request in full."""
    return _gateways(config_dir, monkeypatch, limited=False)


@pytest.fixture(params=["sqlite, at once", "sqlite, awaited", "redis"])
def stored(request, config_dir: Path, monkeypatch, tmp_path):
    """`gateways` on each way a store admits a request decided from a precedent: SQLite's,
    at once (`decide_now`); SQLite's as a store that reserves over the network does
    (awaited: `decide_soon`); and a real Redis (spooled), which does. Its `how`, then the
    gateways."""
    state = None
    if request.param == "sqlite, awaited":
        monkeypatch.setattr(SQLiteStore, "reserves_now", False)
    elif request.param == "redis":
        server = RedisServer(tmp_path / "redis").start()
        request.addfinalizer(server.stop)
        state = server.url
    return request.param, _gateways(config_dir, monkeypatch, limited=False, state=state)


@pytest.fixture
def limited(config_dir: Path, monkeypatch):
    """The same, with rate limits: the example config's on the OpenAI provider (rpm, tpm,
    rpd) and the key's own (rpm 5, tpm)."""
    return _gateways(config_dir, monkeypatch, limited=True)


@pytest.fixture
def unbounded(config_dir: Path, monkeypatch):
    """The same, with no budget and no rate limit: nothing to hold."""
    return _gateways(config_dir, monkeypatch, limited=False, budgeted=False)


def _gateways(config_dir: Path, monkeypatch, limited: bool, budgeted: bool = True,
              state: str | None = None) -> tuple[str, Gateway, Gateway]:
    monkeypatch.setenv("TOLLGATE_KEY_PEPPER", PEPPER)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-real-openai")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-real")
    path = config_dir / "gateway.yaml"
    doc = yaml.safe_load(path.read_text())
    for provider in doc["model_providers"]:
        if not limited:
            provider.pop("rate_limit", None)
    doc["gateway"].setdefault("telemetry", {})["access_log"] = "access.log"
    if state is not None:
        doc["gateway"]["state"] = state
    path.write_text(yaml.safe_dump(doc))
    caps = ["--rpm", "5", "--tpm", "100000"] if limited else []
    made = CliRunner().invoke(cli, ["--config", str(path), "virtual-keys", "create", "--name",
                                    "k", "--scope", "ORG:acme", *caps, "--format", "json"])
    assert made.exit_code == 0, made.output
    if budgeted:  # every request warned: the warning compared
        budget(path, "100", "--warn-at", "0.000001")
    full = path.with_name("full.yaml")
    doc = yaml.safe_load(path.read_text())
    doc["gateway"]["precedents"] = False
    full.write_text(yaml.safe_dump(doc))
    return (json.loads(made.stdout)["secret"], Gateway(ConfigHolder(path)),
            Gateway(ConfigHolder(full)))


def budget(path: Path, limit: str, *options: str) -> None:
    result = CliRunner().invoke(cli, ["--config", str(path), "gateway-budgets", "create",
                                      "--name", f"org-{limit}", "--scope", "ORG:acme",
                                      "--limit", limit, *options])
    assert result.exit_code == 0, result.output


def headers_of(path: str, secret: str, **extra: str) -> dict[str, str]:
    """The client's headers as the decide filter sends them (pseudo-headers too)."""
    return {":method": "POST", ":path": path, ":authority": "gw",
            "content-type": "application/json", "authorization": f"Bearer {secret}",
            **{k.replace("_", "-"): v for k, v in extra.items()}}


async def full(proc: ExternalProcessor, path: str, body: dict[str, Any], secret: str,
               **extra: str) -> Forwarding:
    decided = await proc.decide(headers_of(path, secret, **extra), json.dumps(body).encode())
    assert isinstance(decided, Forwarding), decided
    return decided


def now(proc: ExternalProcessor, path: str, body: dict[str, Any], secret: str,
        **extra: str) -> Forwarding | None:
    return _merged(proc.decide_now(proc.request_of(headers_of(path, secret, **extra),
                                                   json.dumps(body).encode())))


async def decided_like(proc: ExternalProcessor, how: str, path: str, body: dict[str, Any],
                       secret: str) -> Forwarding | None:
    """A request decided from a precedent as its store admits it (see `stored`): at once, or
    awaited (the other way declines it, taking nothing)."""
    req = proc.request_of(headers_of(path, secret), json.dumps(body).encode())
    if how == "sqlite, at once":
        decided = _merged(proc.decide_now(req))
        assert await proc.decide_soon(req) is None  # (a store that reserves at once)
        return decided
    assert proc.decide_now(req) is None
    return _merged(await proc.decide_soon(req))


def told(parts: list[bytes]) -> tuple[str, list[str], bytes]:
    """What an answer of the decision service tells the decide filter: its status line, its
    header lines in any order, its body."""
    head, _, body = b"".join(parts).partition(b"\r\n\r\n")
    status, *lines = head.decode().split("\r\n")
    return status, sorted(lines), body


def _merged(replaying: Replaying | None) -> Forwarding | None:
    """A request decided at once, as one `Forwarding`; the answer it is sent as (the lines it
    shares with its precedent's answer encoded once) tells the filter what that
    `Forwarding`'s answer would, line for line."""
    if replaying is None:
        return None
    forwarding = replaying.forwarding()
    assert told(decider.answer(replaying)) == told(decider.answer(forwarding))
    return forwarding


def answer(f: Forwarding) -> dict[str, Any]:
    """All the decide filter is told, but what differs on every request (its ids)."""
    return {"set": {k: v for k, v in f.set_headers.items()
                    if k not in ("traceparent", "x-request-id")},
            "remove": f.remove_headers, "body": f.body,
            "metadata": {k: v for k, v in f.metadata.items()
                         if k != "request_id"}}


def decision(ex: Exchange) -> dict[str, Any]:
    """All an exchange holds of its decision, but what differs on every request."""
    a = ex.attempt
    attempt = {f.name: getattr(a, f.name) for f in dataclasses.fields(a) if f.name != "adapter"}
    attempt["set_headers"] = {k: v for k, v in a.set_headers.items() if k != "traceparent"}
    billing = dataclasses.asdict(ex.billing)
    del billing["admitted_at"]
    headers = {k: v for k, v in ex.response_headers().items()
               if k not in ("X-LangWatch-Request-Id", "X-LangWatch-Trace-Id",
                            "X-LangWatch-Span-Id")}
    return {"attempt": attempt, "billing": billing, "headers": headers,
            "exchange": (ex.key.id, ex.route, ex.requested_model, ex.stream_requested,
                         ex.client_wants_usage, ex.cursor.fallbacks, ex.cursor.unserved,
                         len(ex.cursor.attempts), ex.prefix, ex.shadow_headers)}


def row(r: LedgerRow | dict[str, Any]) -> dict[str, Any]:
    doc = r.to_dict() if isinstance(r, LedgerRow) else dict(r)
    for varying in ("request_id", "ts", "latency_ms"):
        del doc[varying]
    return doc


def written_ahead(config_dir: Path, request_id: str, redis_url: str | None = None
                  ) -> dict[str, Any]:
    """What the store holds for a request in flight and has written ahead of it: SQLite's
    state; or Redis's holds, and the row on this node's spool (Redis has it off the
    request's path)."""
    db = sqlite3.connect(config_dir / ".tollgate" / ("spool.db" if redis_url else "state.db"))
    try:
        found = db.execute("SELECT row FROM inflight WHERE request_id = ?",
                           (request_id,)).fetchone()
        held = [] if redis_url else db.execute(
            "SELECT counter, amount FROM holds WHERE request_id = ? ORDER BY counter",
            (request_id,)).fetchall()
    finally:
        db.close()
    if redis_url:
        client = redis_client.Redis.from_url(redis_url)
        try:
            for name in sorted(client.scan_iter("tollgate:holds:*")):
                counter = name.decode().removeprefix("tollgate:holds:")
                held += [(counter, int(m.decode().rpartition(":")[2]))
                         for m in client.zrange(name, 0, -1)
                         if m.decode().rpartition(":")[0] == request_id]
        finally:
            client.close()
    assert found is not None, f"{request_id} was not written ahead"
    return {"row": row(json.loads(found[0])), "held": held}


def longer(body: dict[str, Any]) -> dict[str, Any]:
    """The same request, with other (and longer) messages."""
    return {**body, "messages": [*body["messages"], {"role": "assistant", "content": "hello"},
                                 {"role": "user", "content": "tell me more " * 40}]}


CASES = {
    "chat": ("/v1/chat/completions", {**CHAT, "max_tokens": 300}),
    "chat stream, usage asked for": ("/v1/chat/completions", {**CHAT, "stream": True}),
    "chat with tools": ("/v1/chat/completions", {**CHAT, "tools": [{
        "type": "function", "function": {"name": "lookup", "parameters": {}}}]}),
    "messages with a system prompt": ("/v1/messages", {**MSG, "system": "Be brief."}),
}
USAGE = {"chat": b'{"id": "c", "object": "chat.completion", "model": "gpt-5-mini", '
                 b'"choices": [], "usage": {"prompt_tokens": 40, "completion_tokens": 7}}',
         "messages": b'{"id": "m", "type": "message", "role": "assistant", "content": [], '
                     b'"model": "claude-sonnet-4-5", "usage": {"input_tokens": 40, '
                     b'"output_tokens": 7}}'}


@pytest.mark.parametrize("path, body", CASES.values(), ids=CASES.keys())
async def test_a_request_like_a_forwarded_one_is_decided_from_it_as_in_full(
        stored, config_dir, path, body):
    how, (secret, gw, reference) = stored
    proc, ref = ExternalProcessor(gw), ExternalProcessor(reference)
    assert await decided_like(proc, how, path, body, secret) is None  # nothing before it
    counted = metrics.REGISTRY.get_sample_value("tollgate_precedent_decisions_total")
    first = await full(proc, path, body, secret)
    later = longer(body)
    replayed = await decided_like(proc, how, path, later, secret)
    assert replayed is not None, "not decided from its precedent"
    in_full = await full(ref, path, later, secret)
    # What the filter is told, what the store holds and has written ahead: the same.
    assert answer(replayed) == answer(in_full)
    rid, full_rid = replayed.metadata["request_id"], in_full.metadata["request_id"]
    assert rid != first.metadata["request_id"]
    redis_url = gw.holder.current.config.gateway.state if how == "redis" else None
    held = written_ahead(config_dir, rid, redis_url)
    assert held["held"], "nothing held in the org budget"
    assert held == written_ahead(config_dir, full_rid, redis_url)
    # Its exchange, made once its response comes, is the full decision's; so is its row.
    exchanges = [proc._pending[rid].exchange, ref._pending[full_rid].exchange]
    assert decision(exchanges[0]) == decision(exchanges[1])
    usage = USAGE["messages" if path == "/v1/messages" else "chat"]
    for p, request_id in ((proc, rid), (ref, full_rid)):
        p.metered(request_id, 0, True, usage, (200, {"content-type": "application/json"}))
    await gw.close()
    await reference.close()
    rows = [e.settlement.row for e in exchanges]
    assert rows[0] is not None and rows[0].outcome == "completed"
    assert row(rows[0]) == row(rows[1])
    # Its access-log line is the full decision's, and says where it was decided from.
    lines = {line["request_id"]: line for line in map(
        json.loads, (config_dir / "access.log").read_text().splitlines())}
    logged = [lines[rid], lines[full_rid]]
    assert [line.pop("precedent") for line in logged] == [True, False]
    assert metrics.REGISTRY.get_sample_value("tollgate_precedent_decisions_total") == counted + 1
    for line in logged:
        for varying in ("request_id", "ts", "latency_ms", "overhead_ms", "trace_id",
                        "span_id"):
            del line[varying]
    assert logged[0] == logged[1]
    if body.get("stream"):  # the stream's body asks for its usage, its own messages in it
        sent = json.loads(replayed.body)
        assert sent["stream_options"] == {"include_usage": True}
        assert sent["messages"] == later["messages"]


LIKE = ("/v1/chat/completions", {**CHAT, "max_tokens": 300})


async def like_and_in_full(gateways: tuple[str, Gateway, Gateway], how: str = "sqlite, at once"
                           ) -> tuple[ExternalProcessor, ExternalProcessor, Forwarding,
                                      Forwarding]:
    """A request decided in full, then one like it decided from its precedent (`how`: see
    `stored`), and the same one decided in full by the reference gateway: each gateway's
    processor and the two answers."""
    secret, gw, reference = gateways
    proc, ref = ExternalProcessor(gw), ExternalProcessor(reference)
    path, body = LIKE
    await full(proc, path, body, secret)
    replayed = await decided_like(proc, how, path, body, secret)
    in_full = await full(ref, path, body, secret)
    assert replayed is not None
    return proc, ref, replayed, in_full


@pytest.mark.parametrize("how", ["sqlite, at once", "sqlite, awaited"])
async def test_a_rate_limited_request_is_decided_from_its_precedent_as_in_full(
        limited, config_dir, how, monkeypatch):
    """Its limits are taken as the full decision takes them, and their headers are its own
    (what is left after it); once a limit is used up, the full decision refuses it (429),
    with nothing taken."""
    if how == "sqlite, awaited":
        monkeypatch.setattr(SQLiteStore, "reserves_now", False)
    secret, path, body = limited[0], *LIKE
    proc, ref, replayed, in_full = await like_and_in_full(limited, how)
    # What is left differs by what each gateway's windows took: two requests here (the
    # first and this one), one there (each process keeps its own windows).
    left = [{k: v for k, v in a.metadata.items() if k.startswith("x-ratelimit-remaining")}
            for a in (replayed, in_full)]
    assert left[0]["x-ratelimit-remaining-requests"] == "3"
    assert left[1]["x-ratelimit-remaining-requests"] == "4"
    tokens = 100000 - int(left[1]["x-ratelimit-remaining-tokens"])
    assert int(left[0]["x-ratelimit-remaining-tokens"]) == 100000 - 2 * tokens
    assert {**answer(replayed), "metadata": {**answer(replayed)["metadata"], **left[1]}} == \
        answer(in_full)
    rid, full_rid = replayed.metadata["request_id"], in_full.metadata["request_id"]
    assert decision(proc._pending[rid].exchange)["billing"]["limits"] == \
        decision(ref._pending[full_rid].exchange)["billing"]["limits"]
    assert written_ahead(config_dir, rid) == written_ahead(config_dir, full_rid)
    # (The reference gateway counts in its own process: each keeps its own windows.)
    for _ in range(3):
        assert await decided_like(proc, how, path, body, secret) is not None
    assert await decided_like(proc, how, path, body, secret) is None  # rpm 5 is used up
    refused = await proc.decide(headers_of(path, secret), json.dumps(body).encode())
    assert isinstance(refused, Reply) and refused.status == 429, refused


@pytest.mark.parametrize("change", [
    pytest.param(lambda b: {**b, "max_tokens": 301}, id="another option"),
    # Equal in Python, not to a decision: a usage chunk asked for with `true` only.
    pytest.param(lambda b: {**b, "stream_options": {"include_usage": 1}},
                 id="a value of another type"),
    pytest.param(lambda b: {**b, "model": "gpt-5"}, id="another model"),
    pytest.param(lambda b: {**b, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"}]}]}, id="messages with parts"),
    pytest.param(lambda b: {**b, "messages": [{"role": "user", "content": "hi",
                                               "tool_call_id": "x"}]}, id="a message field"),
])
async def test_a_request_unlike_its_precedent_is_decided_in_full(gateways, change):
    secret, gw, _ = gateways
    proc = ExternalProcessor(gw)
    body = {**CHAT, "max_tokens": 300, "stream": True,
            "stream_options": {"include_usage": True}}
    await full(proc, "/v1/chat/completions", body, secret)
    assert now(proc, "/v1/chat/completions", change(body), secret) is None
    assert now(proc, "/v1/chat/completions", body, secret) is not None


async def test_not_a_number_is_not_null_and_text_json_cannot_hold_is_not_compared(gateways):
    secret, gw, _ = gateways
    proc, path = ExternalProcessor(gw), "/v1/chat/completions"
    await full(proc, path, {**CHAT, "temperature": None}, secret)
    assert now(proc, path, {**CHAT, "temperature": float("nan")}, secret) is None
    assert now(proc, path, {**CHAT, "temperature": None}, secret) is not None
    # A lone surrogate (escaped in the body) is decided in full, each time.
    odd = {**CHAT, "user": "\ud800"}
    assert (await full(proc, path, odd, secret)).metadata["request_id"]
    assert now(proc, path, odd, secret) is None


@pytest.mark.parametrize("raw", [
    b'{"model": "gpt-5-mini", "messages": [', b"[]", b'"text"',
    b'{"model": "gpt-5-mini", "model": "gpt-5", "messages": []}'])
async def test_a_body_that_is_not_one_json_object_is_refused_in_full(gateways, raw):
    """Its body read as a precedent compares it (no `bodies.parse` before a match): what is
    not JSON, not an object, or holds a key twice is left to the full decision, which
    refuses it as ever."""
    secret, gw, _ = gateways
    proc, path = ExternalProcessor(gw), "/v1/chat/completions"
    await full(proc, path, CHAT, secret)
    assert proc.decide_now(proc.request_of(headers_of(path, secret), raw)) is None
    refused = await proc.decide(headers_of(path, secret), raw)
    assert isinstance(refused, Reply) and refused.status == 400, refused


async def test_a_request_decided_from_a_precedent_has_its_body_read_as_in_full(gateways):
    secret, gw, _ = gateways
    proc, path = ExternalProcessor(gw), "/v1/chat/completions"
    body = {**CHAT, "stream": True, "tools": [{"type": "function", "function": {
        "name": "lookup", "parameters": {"type": "object"}}}]}
    await full(proc, path, body, secret)
    raw = json.dumps({**body, "messages": [{"role": "user", "content": "again"}]}).encode()
    replayed = gw.decide_like(proc.request_of(headers_of(path, secret), raw), "envoy")
    assert replayed is not None
    assert replayed.body == bodies.parse(ROUTES["/v1/chat/completions"], raw)
    assert replayed.body.tools == ["lookup"] and replayed.body.stream


async def test_other_headers_or_a_continued_trace_are_decided_in_full(gateways):
    secret, gw, _ = gateways
    proc = ExternalProcessor(gw)
    path = "/v1/chat/completions"
    await full(proc, path, CHAT, secret, x_stainless_retry_count="0")
    assert now(proc, path, CHAT, secret, x_stainless_retry_count="1") is None
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    assert now(proc, path, CHAT, secret, x_stainless_retry_count="0",
               traceparent=parent) is None
    # ...and a request that continues a trace is no precedent for the next like it.
    traced = await full(proc, path, CHAT, secret, traceparent=parent)
    assert traced.set_headers["traceparent"].split("-")[1] == "0af7651916cd43dd8448eb211c80319c"
    assert now(proc, path, CHAT, secret, traceparent=parent) is None
    # The proxy's request id and the body's length are not the request's kind.
    replayed = now(proc, path, longer(CHAT), secret, x_stainless_retry_count="0")
    assert replayed is not None
    assert replayed.set_headers["x-request-id"] == replayed.metadata["request_id"]
    await full(proc, path, CHAT, secret, x_request_id="proxy-1")
    assert now(proc, path, CHAT, secret, x_request_id="proxy-2") is not None


async def test_a_header_value_its_precedent_did_not_have_is_checked_as_in_full(gateways):
    """Headers whose values differ on every request (the key's, the proxy's request id)
    are checked for control characters on each; the full decision refuses such a one."""
    secret, gw, _ = gateways
    proc = ExternalProcessor(gw)
    path = "/v1/chat/completions"
    await full(proc, path, CHAT, secret, x_api_key="other", x_request_id="proxy-1")
    assert now(proc, path, CHAT, secret, x_api_key="other", x_request_id="proxy-2") \
        is not None
    for bad in ({"x_api_key": "oth\x01er", "x_request_id": "proxy-3"},
                {"x_api_key": "other", "x_request_id": "proxy\n4"}):
        assert now(proc, path, CHAT, secret, **bad) is None
        refused = await proc.decide(headers_of(path, secret, **bad), json.dumps(CHAT).encode())
        assert isinstance(refused, Reply) and refused.status == 400, refused


@pytest.mark.parametrize("how", ["sqlite, at once", "sqlite, awaited"])
async def test_a_request_its_budget_cannot_hold_is_refused_in_full_with_nothing_taken(
        gateways, config_dir, how, monkeypatch):
    secret, gw, _ = gateways
    if how == "sqlite, awaited":
        monkeypatch.setattr(SQLiteStore, "reserves_now", False)
    proc = ExternalProcessor(gw)
    path, body = "/v1/chat/completions", {**CHAT, "max_tokens": 100}
    first = await full(proc, path, body, secret)
    reserved = proc._pending[first.metadata["request_id"]].exchange.billing.reserved
    # A budget that holds a short request, not a long one (its limit between the two).
    budget(config_dir / "gateway.yaml", f"{reserved * 3 / 1e6:.6f}", "--id", "b_tight")
    assert gw.holder.check()
    await full(proc, path, body, secret)  # (the new config's precedent)
    db = sqlite3.connect(config_dir / ".tollgate" / "state.db")
    counters = "SELECT counter, reserved FROM budget_counters ORDER BY counter"
    try:
        before = db.execute(counters).fetchall()
        long = {**body, "messages": [{"role": "user", "content": "x" * 5000}]}
        in_flight = state(config_dir)[1:]
        assert await decided_like(proc, how, path, long, secret) is None
        assert db.execute(counters).fetchall() == before
        assert state(config_dir)[1:] == in_flight  # no hold, nothing written ahead
    finally:
        db.close()
    refused = await proc.decide(headers_of(path, secret), json.dumps(long).encode())
    assert isinstance(refused, Reply) and refused.status == 402, refused


def state(config_dir: Path) -> list[list[tuple[Any, ...]]]:
    """What the state holds of requests in flight: budget counters, holds, written-ahead
    rows."""
    db = sqlite3.connect(config_dir / ".tollgate" / "state.db")
    try:
        return [db.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()
                for table in ("budget_counters", "holds", "inflight")]
    finally:
        db.close()


@pytest.mark.parametrize("fixture", ["gateways", "unbounded"])
async def test_a_store_that_cannot_reserve_at_once_leaves_the_request_to_the_full_decision(
        fixture, config_dir, request):
    """Another gateway process serving from the file and holding its write lock: nothing
    is taken, nothing written, nothing waits; with or without budgets to hold. (With no
    other gateway on the file, the reservation is granted before it is written: see
    test_ahead.)"""
    from tests.unit.test_ahead import another_gateway

    secret, gw, _ = request.getfixturevalue(fixture)
    proc = ExternalProcessor(gw)
    await full(proc, "/v1/chat/completions", CHAT, secret)
    before = state(config_dir)
    with another_gateway(config_dir / ".tollgate" / "state.db"):
        other = sqlite3.connect(config_dir / ".tollgate" / "state.db", isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        try:
            assert now(proc, "/v1/chat/completions", CHAT, secret) is None
        finally:
            other.execute("ROLLBACK")
            other.close()
    assert state(config_dir) == before
    assert len(gw._in_flight) == 1  # the first request's alone
    assert now(proc, "/v1/chat/completions", CHAT, secret) is not None


@pytest.mark.parametrize("how", ["sqlite, at once", "sqlite, awaited"])
async def test_a_request_with_nothing_to_hold_is_written_ahead_as_in_full(
        unbounded, config_dir, how, monkeypatch):
    if how == "sqlite, awaited":
        monkeypatch.setattr(SQLiteStore, "reserves_now", False)
    proc, ref, replayed, in_full = await like_and_in_full(unbounded, how)
    assert answer(replayed) == answer(in_full)
    rid, full_rid = replayed.metadata["request_id"], in_full.metadata["request_id"]
    assert written_ahead(config_dir, rid) == written_ahead(config_dir, full_rid)
    assert written_ahead(config_dir, rid)["held"] == []
    assert decision(proc._pending[rid].exchange) == decision(ref._pending[full_rid].exchange)


async def test_a_reload_voids_the_precedents_of_the_config_before_it(gateways):
    secret, gw, _ = gateways
    proc = ExternalProcessor(gw)
    path = "/v1/chat/completions"
    await full(proc, path, CHAT, secret)
    with gw.holder.path.open("a") as config:
        config.write("# edited\n")
    assert gw.holder.check()
    assert now(proc, path, CHAT, secret) is None
    await full(proc, path, CHAT, secret)
    assert now(proc, path, CHAT, secret) is not None


async def test_the_providers_credential_is_the_one_it_has_now(gateways, monkeypatch):
    secret, gw, _ = gateways
    proc = ExternalProcessor(gw)
    await full(proc, "/v1/chat/completions", CHAT, secret)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-rotated")
    replayed = now(proc, "/v1/chat/completions", CHAT, secret)
    assert replayed is not None
    assert replayed.set_headers["authorization"] == "Bearer sk-rotated"


async def test_each_request_has_an_attempt_of_its_own_and_the_precedents_stays_as_kept(
        gateways):
    secret, gw, _ = gateways
    proc = ExternalProcessor(gw)
    await full(proc, "/v1/chat/completions", CHAT, secret)
    (kept,) = [p for ps in gw._precedents._kept.values() for p in ps]
    before = {**vars(kept.attempt), "set_headers": dict(kept.attempt.set_headers)}
    first = gw.decide_like(ExternalProcessor.request_of(headers_of(
        "/v1/chat/completions", secret), json.dumps(CHAT).encode()), "envoy")
    second = gw.decide_like(ExternalProcessor.request_of(headers_of(
        "/v1/chat/completions", secret), json.dumps(CHAT).encode()), "envoy")
    assert first is not None and second is not None
    assert first.attempt is not second.attempt is not kept.attempt
    traces = [a.attempt.set_headers["traceparent"] for a in (first, second)]
    assert traces[0] != traces[1]
    assert vars(kept.attempt) == before


async def test_a_key_refused_now_is_refused_in_full(gateways, config_dir):
    secret, gw, _ = gateways
    proc = ExternalProcessor(gw)
    await full(proc, "/v1/chat/completions", CHAT, secret)
    assert now(proc, "/v1/chat/completions", CHAT, "tg-not-a-key") is None
    assert now(proc, "/v1/chat/completions", CHAT, secret) is not None


def named(proc: ExternalProcessor, path: str, body: dict[str, Any], secret: str,
          **extra: str) -> Forwarding | None:
    """`now`, with the request's head named as the Envoy host names it (`Request.head`: the
    client head as the decide filter encodes it)."""
    headers = headers_of(path, secret, **extra)
    head = base64.b64encode("\n".join(f"{k}: {v}" for k, v in headers.items()).encode())
    return _merged(proc.decide_now(proc.request_of(headers, json.dumps(body).encode(),
                                                   head=head.decode())))


def keys_cli(path: Path, *args: str) -> dict[str, Any]:
    result = CliRunner().invoke(cli, ["--config", str(path), "virtual-keys", *args,
                                      "--format", "json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout) if result.stdout.strip() else {}


def later_by(monkeypatch, delta: timedelta) -> None:
    """The gateway's clock (and the key index's), `delta` from now."""
    at = datetime.now(UTC) + delta

    class Later(datetime):
        @classmethod
        def now(cls, tz=None):  # type: ignore[override]
            return at

    for module in (gateway_module, keys_module):
        monkeypatch.setattr(module, "datetime", Later)


async def test_a_known_head_is_not_authenticated_again_but_its_key_is_checked_each_time(
        gateways, config_dir, monkeypatch):
    """A head decided from a precedent once is known by its name: the next requests that
    present it are not looked up by their secret again (nor their header values checked:
    they are the same), but its key's expiry is checked on each, and a config that changes
    (a key revoked) voids what was known."""
    _, gw, _ = gateways
    path = gw.holder.path
    secret = keys_cli(path, "create", "--name", "brief", "--scope", "ORG:acme",
                      "--expires-in", "1d")["secret"]
    assert gw.holder.check()
    proc = ExternalProcessor(gw)
    looked_up: list[str] = []
    real = gateway_module.authenticated
    monkeypatch.setattr(gateway_module, "authenticated",
                        lambda *a: looked_up.append("key") or real(*a))
    await full(proc, LIKE[0], LIKE[1], secret)
    looked_up.clear()
    first = named(proc, *LIKE, secret)
    second = named(proc, LIKE[0], longer(LIKE[1]), secret)
    assert first is not None and second is not None
    assert looked_up == ["key"]  # the first of them alone
    for a in (first, second):
        del a.set_headers["content-length"]
    assert answer(first) == answer(second)
    assert first.metadata["request_id"] != second.metadata["request_id"]
    # Another key's head is its own, looked up by its own secret.
    assert named(proc, *LIKE, "tg-not-a-key") is None
    assert looked_up == ["key", "key"]
    # The key expires: its known head is not decided from the precedent; in full, refused.
    later_by(monkeypatch, timedelta(days=2))
    assert named(proc, *LIKE, secret) is None
    for module in (gateway_module, keys_module):
        monkeypatch.setattr(module, "datetime", datetime)
    assert named(proc, *LIKE, secret) is not None
    # Revoked: the config reloaded voids its known head and its precedents.
    key_id = next(k["id"] for k in keys_cli(path, "list") if k["name"] == "brief")
    keys_cli(path, "revoke", key_id, "--yes")
    assert gw.holder.check()
    assert named(proc, *LIKE, secret) is None
    refused = await proc.decide(headers_of(LIKE[0], secret), json.dumps(LIKE[1]).encode())
    assert isinstance(refused, Reply) and refused.status == 403, refused
    assert json.loads(refused.body)["error"]["code"] == "virtual_key_revoked"


async def test_a_rotated_out_secrets_known_head_ends_with_its_grace(gateways, monkeypatch):
    """A head that presents a secret rotated out (in its grace period) is known until the
    grace ends, then looked up again, and refused as the full decision refuses it."""
    secret, gw, _ = gateways
    path = gw.holder.path
    key_id = next(k["id"] for k in keys_cli(path, "list") if k["name"] == "k")
    new = keys_cli(path, "rotate", key_id, "--grace", "1h")["secret"]
    assert gw.holder.check()
    proc = ExternalProcessor(gw)
    await full(proc, LIKE[0], LIKE[1], secret)
    assert named(proc, *LIKE, secret) is not None
    assert named(proc, *LIKE, secret) is not None
    later_by(monkeypatch, timedelta(hours=2))
    assert named(proc, *LIKE, secret) is None
    refused = await proc.decide(headers_of(LIKE[0], secret), json.dumps(LIKE[1]).encode())
    assert isinstance(refused, Reply) and refused.status == 401, refused
    # The key's new secret is the key's still.
    await full(proc, LIKE[0], LIKE[1], new)
    assert named(proc, *LIKE, new) is not None


async def test_the_newest_known_heads_are_kept(gateways, monkeypatch):
    secret, gw, _ = gateways
    monkeypatch.setattr(precedent_module, "MAX_HEADS", 2)
    proc = ExternalProcessor(gw)
    for n in range(3):
        await full(proc, *LIKE, secret, x_app=str(n))
        assert named(proc, *LIKE, secret, x_app=str(n)) is not None
    kept = [dict(k.compared)["x-app"] for k in gw._precedents._heads.values()]
    assert kept == ["1", "2"]


async def test_a_store_it_cannot_reach_leaves_the_request_to_the_full_decision(
        gateways, config_dir, monkeypatch):
    """(A store that reserves over the network, Redis's way, here on SQLite.) Nothing is
    taken or written ahead: the full decision meets the store as it is, failing open or
    closed as configured."""
    secret, gw, _ = gateways
    monkeypatch.setattr(SQLiteStore, "reserves_now", False)
    proc, path = ExternalProcessor(gw), "/v1/chat/completions"
    await full(proc, path, CHAT, secret)
    assert await decided_like(proc, "sqlite, awaited", path, CHAT, secret) is not None
    before, in_flight = state(config_dir), len(gw._in_flight)

    async def unreachable(*_: Any, **__: Any) -> None:
        raise StoreUnavailable("down")

    monkeypatch.setattr(SQLiteStore, "reserve", unreachable)
    assert await decided_like(proc, "sqlite, awaited", path, CHAT, secret) is None
    assert (state(config_dir), len(gw._in_flight)) == (before, in_flight)
    refused = await proc.decide(headers_of(path, secret), json.dumps(CHAT).encode())
    assert isinstance(refused, Reply) and refused.status == 503, refused


async def test_a_request_its_spool_cannot_write_ahead_is_not_kept_in_flight(
        config_dir, monkeypatch, tmp_path):
    """On Redis, a node whose spool cannot take a request's write-ahead (a disk error) does
    not forward it on a promise: decided from its precedent or in full, it is answered 500,
    and its holds are not renewed (a request kept in flight that nothing settles held its
    budget until the gateway stopped): they return when their lease runs out."""
    server = RedisServer(tmp_path / "redis").start()
    try:
        secret, gw, _ = _gateways(config_dir, monkeypatch, limited=False, state=server.url)
        proc, path = ExternalProcessor(gw), "/v1/chat/completions"
        first = await full(proc, path, CHAT, secret)
        spool = sqlite3.connect(config_dir / ".tollgate" / "spool.db")
        spool.execute("CREATE TRIGGER broken BEFORE INSERT ON inflight "
                      "BEGIN SELECT RAISE(ABORT, 'disk I/O error'); END")
        spool.commit()
        spool.close()
        assert await decided_like(proc, "redis", path, CHAT, secret) is None
        refused = await proc.decide(headers_of(path, secret), json.dumps(CHAT).encode())
        assert isinstance(refused, Reply) and refused.status == 500, refused
        assert list(gw._in_flight) == [first.metadata["request_id"]]
        await gw.close()
    finally:
        server.stop()


async def test_a_place_whose_requests_do_not_repeat_keeps_few_precedents(gateways,
                                                                         monkeypatch):
    """Requests that each have options of their own (a `user` per end user) never match a
    precedent: past UNUSED_KEEPS, one full decision in KEEP_EVERY keeps its own (keeping
    costs the decision about a fifth more). Once a request matches one, each keeps again."""
    secret, gw, _ = gateways
    proc, path = ExternalProcessor(gw), "/v1/chat/completions"
    kept: list[str] = []
    keep = gw._precedents.keep

    def spied(p: precedent_module.Precedent) -> None:
        kept.append(json.loads(p.rest)["user"])
        keep(p)

    monkeypatch.setattr(gw._precedents, "keep", spied)
    unused, every = precedent_module.UNUSED_KEEPS, precedent_module.KEEP_EVERY
    for n in range(2 * every + 1):
        await full(proc, path, {**CHAT, "user": f"u{n}"}, secret)
    assert kept == [f"u{n}" for n in range(unused)] + [f"u{every}", f"u{2 * every}"]
    assert now(proc, path, {**CHAT, "user": f"u{2 * every}"}, secret) is not None
    kept.clear()
    for n in range(3):
        await full(proc, path, {**CHAT, "user": f"again {n}"}, secret)
    assert kept == ["again 0", "again 1", "again 2"]


async def test_a_request_signed_over_keeps_no_precedent(gateways, monkeypatch):
    """(Bedrock's SigV4: the signature's headers are set, or left out, anew each time.)"""
    from tollgate.providers.openai import OpenAI

    secret, gw, _ = gateways
    monkeypatch.setattr(OpenAI, "sign", lambda self, attempt, body: None)
    proc = ExternalProcessor(gw)
    await full(proc, "/v1/chat/completions", CHAT, secret)
    assert now(proc, "/v1/chat/completions", CHAT, secret) is None


async def test_precedents_off_decides_every_request_in_full(gateways):
    secret, _, reference = gateways
    proc = ExternalProcessor(reference)
    for _ in range(3):
        await full(proc, "/v1/chat/completions", CHAT, secret)
        assert now(proc, "/v1/chat/completions", CHAT, secret) is None


@pytest.mark.parametrize("kind", ["unbounded", "gateways"])
async def test_each_request_asks_for_the_route_of_extra_response_headers_itself(kind, request):
    """Envoy adds the less common response headers (a budget warning, rate limits) only on
    the route a request with one asks for (`x-tollgate-extras`), decided in full or from its
    precedent, which keeps no such mark of its own; and no decision sets the identity
    encoding Envoy's routes set on every request."""
    from extproc.envoy_config import EXTRAS_HEADER, ROUTE_SETS
    from extproc.service import HOST

    secret, gw, _ = request.getfixturevalue(kind)
    proc = ExternalProcessor(gw)
    path, body = LIKE
    first = await full(proc, path, body, secret)
    replayed = now(proc, path, body, secret)
    assert replayed is not None
    warned = kind == "gateways"  # its budget warns on every request
    for decided in (first, replayed):
        assert ("budget_warning" in decided.metadata) == warned
        assert decided.set_headers.get(EXTRAS_HEADER) == ("1" if warned else None)
        assert not ROUTE_SETS.keys() & decided.set_headers.keys()
    kept = proc._pending[first.metadata["request_id"]].exchange.precedent.hosts[HOST]
    assert EXTRAS_HEADER not in kept.forwarding.set_headers
    await gw.close()
