"""Usage, cost and budgets end to end through each host, with the official SDKs."""

from __future__ import annotations

import json
import math
import re
import time
from decimal import Decimal
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.harness import ROOT, ledger, wait_until
from tollgate.ledger import LedgerRow
from tollgate.pricing import cost_micros, load_prices
from tollgate.usage import Usage

PRICES = load_prices(ROOT / "config" / "prices.yaml")
RID = "x-langwatch-request-id"


def ledger_row(gateway, request_id: str) -> LedgerRow:
    return wait_until(lambda: next((r for r in ledger(gateway.config)
                                    if r.request_id == request_id), None),
                      timeout=5, what=f"ledger row {request_id}")


def expect_cost(model: str, usage: Usage) -> int:
    price = PRICES.lookup(model)
    assert price is not None
    return cost_micros(usage, price)


def oai(gateway, key) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.openai_base, api_key=key.secret, max_retries=0)


def ant(gateway, key) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gateway.url, api_key=key.secret, max_retries=0)


def ant_call(client: anthropic.Anthropic, stream: bool, **ask) -> tuple[str, Any]:
    """A messages call, streamed or not: its request id, and its events (read to the end:
    the stream completes) or its message."""
    if stream:
        with client.messages.with_streaming_response.create(stream=True, **ask) as response:
            return response.headers[RID], list(response.parse())
    raw = client.messages.with_raw_response.create(**ask)
    return raw.headers[RID], raw.parse()


MESSAGES = [{"role": "user", "content": "Say hello to the metering tests."}]


def test_openai_chat_json_usage_and_cost(gateway):
    key = gateway.create_key()
    raw = oai(gateway, key).chat.completions.with_raw_response.create(
        model="gpt-5-mini", messages=MESSAGES, max_tokens=64)
    u = raw.parse().usage
    row = ledger_row(gateway, raw.headers[RID])
    assert (row.input_tokens, row.output_tokens) == (u.prompt_tokens, u.completion_tokens)
    assert row.usage_reported and row.status == 200 and row.outcome == "completed"
    assert row.cost_micros == expect_cost("gpt-5-mini", Usage(
        input_tokens=u.prompt_tokens, output_tokens=u.completion_tokens))
    assert (row.key_id, row.principal, row.org, row.provider) == (
        key.id, "alice@acme.com", "acme", "mp_openai")


def test_openai_chat_stream_is_metered_exactly_and_usage_chunk_hidden(gateway, fake_openai):
    key = gateway.create_key()
    with oai(gateway, key).chat.completions.with_streaming_response.create(
            model="gpt-5-mini", messages=MESSAGES, stream=True) as response:
        request_id = response.headers[RID]
        chunks = list(response.parse())
    # The client did not ask for usage, so it sees no usage chunk (every chunk has a choice)...
    assert all(c.choices for c in chunks) and all(c.usage is None for c in chunks)
    # ...but the provider was asked, and the ledger has its exact numbers.
    sent = fake_openai.requests[-1].json()
    assert sent["stream_options"] == {"include_usage": True}
    row = ledger_row(gateway, request_id)
    assert row.usage_reported
    assert row.output_tokens == len(chunks) - 2  # words (role chunk and stop chunk excluded)
    assert row.cost_micros == expect_cost("gpt-5-mini", Usage(
        input_tokens=row.input_tokens, output_tokens=row.output_tokens))


@pytest.mark.parametrize("arrival", ["whole-events", "events-split", "one-write",
                                     "compact-one-write", "sized"])
def test_the_client_gets_the_providers_stream_byte_for_byte_less_the_usage_chunk(
        gateway, fake_openai, arrival):
    """The usage chunk the gateway asked for is the only difference between what the
    provider sent and what the client gets, even when events reach the proxy in pieces
    (each cut between the two newlines that end it), or all in one (the usage chunk after
    a dozen events with choices), their JSON spaced or written as OpenAI writes it, and
    when the provider declares the stream's length (the client is told none: the stream it
    gets is shorter); for the request a host decides from the one before it (a precedent)
    as for that one. On the Envoy host the cut is Envoy's own (its meter's Lua): no event
    goes through Python, and no ext_proc stream is opened for one."""
    fake_openai.split_events = arrival == "events-split"
    fake_openai.one_write = arrival.endswith("one-write")
    fake_openai.compact_events = arrival.startswith("compact")
    fake_openai.sized_stream = arrival == "sized"
    fake_openai.chunk_delay = 0.003 if arrival == "events-split" else 0.0
    key = gateway.create_key()
    decided_before = precedent_decisions(gateway)
    streams_before = gateway.extproc_streams() if gateway.host == "envoy" else 0
    for words in (MESSAGES, [*MESSAGES, {"role": "user", "content": "And again."}]):
        with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", timeout=30,
                          headers={"authorization": f"Bearer {key.secret}"},
                          json={"model": "gpt-5-mini", "messages": words,
                                "stream": True}) as r:
            assert r.status_code == 200
            got = b"".join(r.iter_raw())
            request_id = r.headers[RID]
            assert r.headers.get("content-length") in (None, str(len(got)))
        assert fake_openai.requests[-1].json()["messages"] == words
        sent = fake_openai.streamed[-1]
        events = sent.split(b"\n\n")
        usage = [e for e in events if re.search(rb'"choices": ?\[\]', e)]
        assert len(usage) == 1 and b'"usage"' in usage[0]
        assert got == sent.replace(usage[0] + b"\n\n", b"")
        row = ledger_row(gateway, request_id)
        assert row.usage_reported and row.output_tokens == len(events) - 5  # words only
        assert row.outcome == "completed"
    # The second was decided from the first's precedent, on either host.
    assert precedent_decisions(gateway) == decided_before + 1
    if gateway.host == "envoy":
        assert gateway.extproc_streams() == streams_before


def precedent_decisions(gateway) -> float:
    """(`gateway`: the module's fixture, or a GatewayProcess.)"""
    process = getattr(gateway, "process", gateway)
    text = httpx.get(f"{process.admin_url}/metrics", timeout=5).text
    found = re.search(r"^tollgate_precedent_decisions_total (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def test_a_json_answer_passed_on_unchanged_is_not_held_back(gateway, fake_openai):
    """An answer the gateway does not rewrite goes to the client as it arrives, and is
    settled after: its first half reaches the client while the provider still pauses."""
    key = gateway.create_key()
    fake_openai.json_pause = 1.0
    body = {"model": "gpt-5-mini", "messages": MESSAGES, "max_tokens": 64}
    with httpx.stream("POST", f"{gateway.openai_base}/chat/completions", json=body,
                      headers={"authorization": f"Bearer {key.secret}"}, timeout=10) as r:
        started = time.monotonic()
        pieces = [(time.monotonic() - started, piece) for piece in r.iter_raw()]
    assert r.status_code == 200
    assert pieces[0][0] < 0.5 and pieces[-1][0] > 0.8  # the first half came before the pause
    doc = json.loads(b"".join(piece for _, piece in pieces))
    row = ledger_row(gateway, r.headers[RID])
    assert (row.input_tokens, row.output_tokens) == (doc["usage"]["prompt_tokens"],
                                                     doc["usage"]["completion_tokens"])
    assert row.outcome == "completed" and row.usage_reported


def test_client_that_asks_for_usage_still_gets_it(gateway, fake_openai):
    key = gateway.create_key()
    sent: list[bytes] = []
    stream = openai.OpenAI(
        base_url=gateway.openai_base, api_key=key.secret, max_retries=0,
        http_client=openai.DefaultHttpxClient(event_hooks={"request": [
            lambda r: sent.append(r.read())]})).chat.completions.create(
        model="gpt-5-mini", messages=MESSAGES, stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert fake_openai.requests[-1].body == sent[-1]  # nothing to add: bytes untouched


def test_large_embeddings_response_is_charged(gateway):
    """2,000 inputs: several MiB of vectors before the usage block at the very end."""
    key = gateway.create_key()
    raw = oai(gateway, key).embeddings.with_raw_response.create(
        model="text-embedding-3-small", input=[f"doc {i}" for i in range(2000)],
        dimensions=512)
    result = raw.parse()
    assert len(result.data) == 2000 and int(raw.headers["content-length"]) > 4 << 20
    row = ledger_row(gateway, raw.headers[RID])
    assert row.usage_reported and row.input_tokens == result.usage.prompt_tokens > 0
    assert row.cost_micros == expect_cost("text-embedding-3-small", Usage(
        input_tokens=result.usage.prompt_tokens))


def test_20mb_answer_with_logprobs_is_charged(gateway, fake_openai):
    fake_openai.answer_words = 40_000
    key = gateway.create_key()
    raw = oai(gateway, key).chat.completions.with_raw_response.create(
        model="gpt-5-mini", messages=MESSAGES, logprobs=True, top_logprobs=5)
    done = raw.parse()
    assert int(raw.headers["content-length"]) > 20 << 20
    assert len(done.choices[0].logprobs.content) == 40_000
    row = ledger_row(gateway, raw.headers[RID])
    assert row.usage_reported and row.output_tokens == done.usage.completion_tokens == 40_000
    assert row.cost_micros == expect_cost("gpt-5-mini", Usage(
        input_tokens=done.usage.prompt_tokens, output_tokens=40_000)) > 0


@pytest.mark.parametrize("stream", [False, True])
def test_responses_api_usage(gateway, stream):
    key = gateway.create_key()
    client = oai(gateway, key)
    if stream:
        with client.responses.with_streaming_response.create(
                model="gpt-5", input="hello", stream=True) as response:
            request_id = response.headers[RID]
            events = list(response.parse())
        usage = events[-1].response.usage
    else:
        raw = client.responses.with_raw_response.create(model="gpt-5", input="hello")
        request_id, usage = raw.headers[RID], raw.parse().usage
    row = ledger_row(gateway, request_id)
    assert (row.input_tokens, row.output_tokens) == (usage.input_tokens, usage.output_tokens)
    assert row.cost_micros == expect_cost("gpt-5", Usage(input_tokens=usage.input_tokens,
                                                         output_tokens=usage.output_tokens))


@pytest.mark.parametrize("stream", [False, True])
def test_anthropic_usage(gateway, stream):
    key = gateway.create_key()
    client = ant(gateway, key)
    if stream:
        with client.messages.with_streaming_response.create(
                model="claude-haiku-4-5", max_tokens=64, messages=MESSAGES,
                stream=True) as response:
            request_id = response.headers[RID]
            events = list(response.parse())
        output = events[-2].usage.output_tokens  # message_delta carries the total
        input_tokens = events[0].message.usage.input_tokens
    else:
        raw = client.messages.with_raw_response.create(model="claude-haiku-4-5",
                                                       max_tokens=64, messages=MESSAGES)
        message = raw.parse()
        request_id = raw.headers[RID]
        output, input_tokens = message.usage.output_tokens, message.usage.input_tokens
    row = ledger_row(gateway, request_id)
    assert (row.input_tokens, row.output_tokens) == (input_tokens, output)
    assert row.provider == "mp_anthropic" and row.usage_reported
    assert row.cost_micros == expect_cost("claude-haiku-4-5", Usage(
        input_tokens=input_tokens, output_tokens=output))


def test_client_that_goes_away_is_not_a_provider_failure(gateway, fake_openai):
    """Clients that give up before the provider answers leave a row each, charged the
    input the provider bills once it has the request (estimated, flagged), and never count
    towards the provider's circuit breaker (three of them used to reroute every key)."""
    key = gateway.create_key()
    fake_openai.response_delay = 1.5
    log_before = len(gateway.process.log())
    for _ in range(4):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{gateway.openai_base}/chat/completions", timeout=0.4,
                       headers={"authorization": f"Bearer {key.secret}"},
                       json={"model": "gpt-5-mini", "messages": MESSAGES})
    rows = wait_until(lambda: (r := [r for r in ledger(gateway.config) if r.key_id == key.id
                                     and r.route == "chat_completions"])
                      and len(r) == 4 and r, timeout=15, what="four ledger rows")
    assert {(r.outcome, r.usage_reported, r.output_tokens) for r in rows} == \
        {("abandoned", False, 0)}
    assert all(r.input_tokens > 0 and r.cost_micros > 0 for r in rows)
    assert "circuit open for provider mp_openai" not in gateway.process.log()[log_before:]


def test_every_request_leaves_exactly_one_row_refused_or_served(gateway):
    key = gateway.create_key("--models-allowed", "gpt-5*")
    auth = {"authorization": f"Bearer {key.secret}"}
    chat = {"model": "gpt-5-mini", "messages": MESSAGES}
    cases = [  # (request, status, code, key)
        (dict(json=chat, headers={"authorization": "Bearer tg-not-a-key"}), 401,
         "invalid_api_key", None),
        (dict(json={**chat, "model": "claude-haiku-4-5"}, headers=auth), 403,
         "model_not_allowed", key.id),
        (dict(content=b'{"model": "gpt-5-mini", "messages": [', headers=auth), 400,
         "invalid_request", key.id),
        (dict(json=chat, headers=auth), 200, None, key.id),
    ]
    seen = []
    for kwargs, status, code, key_id in cases:
        r = httpx.post(f"{gateway.openai_base}/chat/completions", timeout=10, **kwargs)
        assert r.status_code == status, r.text
        seen.append((r.headers[RID], status, code, key_id))
    wait_until(lambda: {rid for rid, *_ in seen} <= {r.request_id
                                                    for r in ledger(gateway.config)},
               timeout=5, what="a row for every request")
    rows = ledger(gateway.config)
    for rid, status, code, key_id in seen:
        (row,) = [r for r in rows if r.request_id == rid]
        assert (row.status, row.code, row.key_id) == (status, code, key_id)
        if code is not None:
            assert (row.cost_micros, row.outcome, row.provider) == (0, "refused", None)
        if code == "model_not_allowed":
            assert row.model == "claude-haiku-4-5"  # who tried what


def test_abandoned_stream_is_still_charged(gateway, fake_anthropic):
    key = gateway.create_key()
    fake_anthropic.chunk_delay = 0.2
    body = {"model": "claude-haiku-4-5", "max_tokens": 64, "stream": True,
            "messages": MESSAGES}
    with httpx.stream("POST", f"{gateway.url}/v1/messages", json=body,
                      headers={"x-api-key": key.secret}) as r:
        request_id = r.headers[RID]
        received = b""
        for chunk in r.iter_raw():
            received += chunk
            if received.count(b"text_delta") >= 2:
                break  # the client walks away mid-stream
    row = wait_until(lambda: ledger_row(gateway, request_id), timeout=10)
    assert row.outcome != "completed"
    assert not row.usage_reported  # the provider's totals never arrived; estimated
    assert row.input_tokens > 0 and row.output_tokens > 0 and row.cost_micros > 0


def test_a_stream_the_client_leaves_is_charged_every_word_it_was_sent(gateway, fake_anthropic):
    """The words a client received before it walked away are all charged, those that came
    after the meter's last batch on the Envoy host included (they reach ext_proc through
    Envoy's access log)."""
    from tollgate.usage import estimate_tokens

    key = gateway.create_key()
    fake_anthropic.chunk_delay, fake_anthropic.answer_words = 0.05, 60
    body = {"model": "claude-haiku-4-5", "max_tokens": 256, "stream": True,
            "messages": MESSAGES}
    text = ""
    try:
        with httpx.stream("POST", f"{gateway.url}/v1/messages", json=body,
                          headers={"x-api-key": key.secret}) as r:
            request_id = r.headers[RID]
            for line in r.iter_lines():
                if line.startswith("data: ") and '"text_delta"' in line:
                    text += json.loads(line[6:])["delta"]["text"]
                    if len(text.split()) >= 12:
                        break  # the client walks away, well into the stream
    finally:
        fake_anthropic.chunk_delay, fake_anthropic.answer_words = 0.0, 0
    row = ledger_row(gateway, request_id)
    assert row.outcome == "abandoned" and not row.usage_reported  # the client's doing
    assert row.output_tokens >= estimate_tokens(len(text))


def budget(gateway, *args: str) -> dict:
    out = gateway.cli("gateway-budgets", "create", *args, "--format", "json")
    return json.loads(out.stdout)


def test_blocking_budget_refuses_with_402(gateway, fake_openai, fake_anthropic):
    key = gateway.create_key()
    b = budget(gateway, "--name", "tiny-cap", "--scope", "vk", "--vk", key.id,
               "--window", "day", "--limit", "0.0001", "--on-breach", "block")
    time.sleep(0.6)  # the reload is polled; the key already exists, so wait a tick
    wait_until(lambda: httpx.post(f"{gateway.openai_base}/chat/completions", json={
        "model": "gpt-5-mini", "messages": MESSAGES, "max_tokens": 2000},
        headers={"authorization": f"Bearer {key.secret}"}).status_code == 402,
        timeout=3, what="the budget to load")
    with pytest.raises(openai.APIStatusError) as exc:
        oai(gateway, key).chat.completions.create(model="gpt-5-mini", messages=MESSAGES,
                                                  max_tokens=2000)
    assert exc.value.status_code == 402
    error = exc.value.body
    assert error["code"] == "budget_exceeded"
    for part in (b["id"], "tiny-cap", "vk", key.id, "window day", "limit $0.000100", "spent",
                 "2,000 output tokens of gpt-5-mini", "Send max_tokens <= "):
        assert part in error["message"]
    assert int(exc.value.response.headers["retry-after"]) > 0
    with pytest.raises(anthropic.APIStatusError) as aexc:
        ant(gateway, key).messages.create(model="claude-haiku-4-5", max_tokens=2000,
                                          messages=MESSAGES)
    assert aexc.value.status_code == 402
    assert aexc.value.body["error"]["code"] == "budget_exceeded"
    assert fake_openai.requests == [] and fake_anthropic.requests == []


def test_warning_budget_serves_and_warns(gateway):
    key = gateway.create_key()
    b = budget(gateway, "--name", "soft-cap", "--scope", "vk", "--vk", key.id,
               "--window", "month", "--limit", "0.0001", "--on-breach", "warn")

    def warned() -> str | None:
        r = httpx.post(f"{gateway.openai_base}/chat/completions", json={
            "model": "gpt-5-mini", "messages": MESSAGES, "max_tokens": 100},
            headers={"authorization": f"Bearer {key.secret}"})
        assert r.status_code == 200
        return r.headers.get("x-langwatch-budget-warning")

    warning = wait_until(warned, timeout=3, what="the budget warning")
    assert b["id"] in warning and "soft-cap" in warning


def tier_cost(model: str, usage: Usage) -> tuple[int, str | None]:
    price = PRICES.lookup(model)
    assert price is not None
    return cost_micros(usage, price), price.served(usage)[1]


@pytest.mark.parametrize("api", ["chat", "chat-stream", "responses", "responses-stream"])
def test_openai_service_tiers_are_charged_at_their_price(gateway, fake_openai, api):
    """OpenAI reports the tier that served each request: flex at half the price, priority
    at its premium; one the request did not name is the project's default (here priority)."""
    key = gateway.create_key()
    client = oai(gateway, key)

    def call(**extra) -> tuple[str, str]:
        if api.startswith("chat"):
            if api == "chat":
                raw = client.chat.completions.with_raw_response.create(
                    model="gpt-5", messages=MESSAGES, max_tokens=64, **extra)
                return raw.headers[RID], raw.parse().service_tier
            with client.chat.completions.with_streaming_response.create(
                    model="gpt-5", messages=MESSAGES, max_tokens=64, stream=True,
                    **extra) as response:
                chunks = list(response.parse())
                return response.headers[RID], chunks[-1].service_tier
        if api == "responses":
            raw = client.responses.with_raw_response.create(model="gpt-5", input="hello",
                                                            **extra)
            return raw.headers[RID], raw.parse().service_tier
        with client.responses.with_streaming_response.create(
                model="gpt-5", input="hello", stream=True, **extra) as response:
            events = list(response.parse())
            return response.headers[RID], events[-1].response.service_tier

    served = {}
    for asked in ("flex", "priority", "default"):
        request_id, tier = call(service_tier=asked)
        served[asked] = (ledger_row(gateway, request_id), tier)
    fake_openai.default_tier = "priority"
    request_id, tier = call()
    served["project default"] = (ledger_row(gateway, request_id), tier)
    for asked, (row, tier) in served.items():
        used = Usage(input_tokens=row.input_tokens, output_tokens=row.output_tokens,
                     service_tier=tier)
        assert (row.cost_micros, row.tier) == tier_cost("gpt-5", used), asked
    assert [row.tier for row, _ in served.values()] == ["flex", "priority", None, "priority"]
    flex, standard = served["flex"][0], served["default"][0]
    assert flex.cost_micros * 2 in range(standard.cost_micros - 1, standard.cost_micros + 2)


@pytest.mark.parametrize("stream", [False, True])
def test_anthropic_one_hour_cache_writes_and_service_tier(gateway, fake_anthropic, stream):
    """Cache writes kept an hour cost twice the input price, those kept 5 minutes 1.25x;
    a tier the price table does not list (Anthropic's Priority Tier, priced by contract) is
    named on the row and charged the standard price."""
    key = gateway.create_key()
    fake_anthropic.default_tier = "priority"
    system = [{"type": "text", "text": "a long style guide " * 300,
               "cache_control": {"type": "ephemeral", "ttl": "1h"}},
              {"type": "text", "text": "today's notes " * 200,
               "cache_control": {"type": "ephemeral"}}]
    request_id, got = ant_call(ant(gateway, key), stream, model="claude-sonnet-4-5",
                               max_tokens=64, system=system, messages=MESSAGES)
    reported = got[0].message.usage if stream else got.usage
    row = ledger_row(gateway, request_id)
    hour = reported.cache_creation.ephemeral_1h_input_tokens
    five = reported.cache_creation.ephemeral_5m_input_tokens
    assert hour > 0 and five > 0 and reported.service_tier == "priority"
    assert (row.cache_write_tokens, row.cache_write_1h_tokens) == (hour + five, hour)
    assert row.tier == "priority"
    used = Usage(input_tokens=row.input_tokens, output_tokens=row.output_tokens,
                 cache_write_tokens=five, cache_write_1h_tokens=hour)
    assert row.cost_micros == expect_cost("claude-sonnet-4-5", used)
    # $6 per 1M for the hour's writes, $3.75 for the 5 minutes', $3 input, $15 output.
    assert row.cost_micros == math.ceil(hour * 6 + five * Decimal("3.75")
                                        + row.input_tokens * 3 + row.output_tokens * 15)


@pytest.mark.parametrize("stream", [False, True])
def test_anthropic_web_searches_are_charged_per_search(gateway, stream):
    """Anthropic's web search tool bills each search ($10 per 1,000) on top of the tokens
    its results add to the input: the row counts the searches and its cost holds them."""
    key = gateway.create_key()
    tools = [{"type": "web_search_20250305", "name": "web_search", "max_uses": 3}]
    request_id, got = ant_call(ant(gateway, key), stream, model="claude-haiku-4-5",
                               max_tokens=64, tools=tools, messages=MESSAGES)
    usage = got[-2].usage if stream else got.usage  # a stream's totals: message_delta
    searches = usage.server_tool_use.web_search_requests
    row = ledger_row(gateway, request_id)
    assert searches == row.web_search_requests == 3
    assert row.cost_micros == expect_cost("claude-haiku-4-5", Usage(
        input_tokens=row.input_tokens, output_tokens=row.output_tokens, web_search_requests=3))
    # $1 per 1M input tokens, $5 output, and $0.01 a search.
    assert row.cost_micros == row.input_tokens + row.output_tokens * 5 + 3 * 10_000


@pytest.mark.parametrize("stream", [False, True])
def test_openai_responses_web_search_calls_are_charged_per_call(gateway, stream):
    """OpenAI bills each web search call of a Responses request ($10 per 1,000 for gpt-5
    models), which its usage does not count: the gateway counts the `web_search_call`
    output items."""
    key = gateway.create_key()
    ask = {"model": "gpt-5-mini", "input": "What happened today?", "max_output_tokens": 64,
           "tools": [{"type": "web_search"}], "max_tool_calls": 2}
    responses = oai(gateway, key).responses
    if stream:
        with responses.with_streaming_response.create(stream=True, **ask) as response:
            request_id = response.headers[RID]
            events = list(response.parse())
        answer = events[-1].response
    else:
        raw = responses.with_raw_response.create(**ask)
        request_id, answer = raw.headers[RID], raw.parse()
    row = ledger_row(gateway, request_id)
    assert [o.type for o in answer.output].count("web_search_call") == 2
    assert row.web_search_requests == 2 and row.usage_reported
    assert row.input_tokens == answer.usage.input_tokens
    # $0.25 per 1M input tokens, $2 output, and $0.01 a call.
    assert row.cost_micros == math.ceil(row.input_tokens * Decimal("0.25")
                                        + row.output_tokens * 2) + 2 * 10_000


def test_a_long_responses_stream_is_charged_the_usage_its_closing_event_reports(
        gateway, fake_openai):
    """A Responses stream reports its usage only in `response.completed`, which repeats the
    whole answer: past 64 KiB that event is not held to be parsed, and its usage is found
    as it passes (it was estimated from the text, leaving out reasoning and cached tokens)."""
    key = gateway.create_key()
    fake_openai.answer_words = 30_000  # about 200 KB of text
    with oai(gateway, key).responses.with_streaming_response.create(
            model="gpt-5-mini", input="Write at length.", stream=True) as response:
        request_id = response.headers[RID]
        events = list(response.parse())
    reported = events[-1].response.usage
    assert events[-1].type == "response.completed" and reported.output_tokens >= 30_000
    row = ledger_row(gateway, request_id)
    assert row.usage_reported and row.outcome == "completed"
    assert (row.input_tokens, row.output_tokens) == (reported.input_tokens,
                                                     reported.output_tokens)
    assert row.cost_micros == expect_cost("gpt-5-mini", Usage(
        input_tokens=reported.input_tokens, output_tokens=reported.output_tokens))


def test_long_context_is_priced_for_the_whole_request(gateway):
    """Claude Sonnet 4.5 past 200k input tokens: every token at the long-context price,
    the row names the tier, and the spend report groups by it."""
    key = gateway.create_key()
    long_prompt = [{"role": "user", "content": "lorem ipsum dolor " * 50_000}]  # ~225k
    raw = ant(gateway, key).messages.with_raw_response.create(
        model="claude-sonnet-4-5", max_tokens=64, messages=long_prompt)
    usage = raw.parse().usage
    row = ledger_row(gateway, raw.headers[RID])
    assert usage.input_tokens > 200_000 and row.tier == "long_context"
    assert row.cost_micros == math.ceil(usage.input_tokens * 6
                                        + usage.output_tokens * Decimal("22.5"))
    report = json.loads(gateway.cli("spend", "report", "--by", "tier", "--format",
                                    "json").stdout)["rows"]
    tiers = {r["tier"]: r for r in report}
    assert tiers["long_context"]["cost_micros"] >= row.cost_micros
    assert "standard" in tiers
