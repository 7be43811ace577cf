"""The Gemini API behind the gateway, on both hosts: OpenAI and Anthropic clients served by
`generateContent` and `streamGenerateContent?alt=sse` through translation (tools included),
`x-goog-api-key` upstream, `usageMetadata` metered exactly, Google's errors in each client's
family, and the seed recipe's fallback reaching Gemini through the catalog."""

from __future__ import annotations

import json
import math
from decimal import Decimal
from pathlib import Path

import anthropic
import openai
import pytest

from tests.conformance.test_metering import expect_cost, ledger_row
from tests.conftest import GEMINI_KEY, HOSTS, make_policy, own_gateways
from tests.fakes.providers import Behaviour
from tests.harness import tollgate
from tollgate.usage import Usage

MESSAGES = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hello gemini"}]
TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


@pytest.fixture(scope="module")
def gateways(tmp_path_factory, fake_openai, fake_anthropic, fake_gemini):
    """`mp_gemini` (AI Studio); policy `openai-gemini` [mp_openai, mp_gemini], no map."""
    policies: dict[str, str] = {}

    def setup(config: Path) -> None:
        tollgate("model-providers", "create", "--id", "mp_gemini", "--type", "gemini",
                 "--scope", "ORG:acme", "--base-url", fake_gemini.url, "--api-key-env",
                 "FAKE_GEMINI_KEY", config=config)
        policies[str(config)] = make_policy(
            config, "openai-gemini", "mp_openai", "mp_gemini",
            fallback='{"fallback": {"on": ["5xx", "rate_limit"]}}')

    with own_gateways(tmp_path_factory, fake_openai, fake_anthropic, "gemini", setup) as out:
        yield out, {h: policies[str(g.config)] for h, g in out.items()}


@pytest.mark.parametrize("host", HOSTS)
def test_openai_clients_are_served_by_gemini(gateways, host, fake_gemini):
    gw = gateways[0][host]
    client = openai.OpenAI(base_url=gw.openai_base, api_key=gw.create_key().secret,
                           max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="gemini-2.5-flash", messages=MESSAGES, max_tokens=50)
    answer = raw.parse()
    assert answer.choices[0].message.content.startswith("Hello")
    sent = fake_gemini.requests[-1]
    assert sent.path == "/v1beta/models/gemini-2.5-flash:generateContent"
    assert sent.headers["x-goog-api-key"] == GEMINI_KEY and "authorization" not in sent.headers
    doc = json.loads(sent.body)
    assert doc["systemInstruction"] == {"parts": [{"text": "Be brief."}]}
    assert doc["generationConfig"]["maxOutputTokens"] == 50
    row = ledger_row(gw, raw.headers["x-langwatch-request-id"])
    assert row.cost_micros == expect_cost("gemini-2.5-flash", Usage(
        input_tokens=answer.usage.prompt_tokens,
        output_tokens=answer.usage.completion_tokens)) and row.cost_micros > 0

    called = client.chat.completions.create(model="gemini-2.5-flash", messages=MESSAGES,
                                            tools=[TOOL], tool_choice="required")
    call = called.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments)
    assert called.choices[0].finish_reason == "tool_calls"
    sent = json.loads(fake_gemini.requests[-1].body)
    assert sent["tools"][0]["functionDeclarations"][0]["name"] == "get_weather"
    assert sent["toolConfig"] == {"functionCallingConfig": {"mode": "ANY"}}

    fake_gemini.chunk_delay = 0.01
    with client.chat.completions.with_streaming_response.create(
            model="gemini-2.5-flash", messages=MESSAGES, stream=True,
            stream_options={"include_usage": True}) as response:
        rid = response.headers["x-langwatch-request-id"]
        chunks = list(response.parse())
    assert fake_gemini.requests[-1].path.endswith(":streamGenerateContent?alt=sse")
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith("Hello") and len([c for c in chunks if c.choices]) > 3
    usage = chunks[-1].usage
    row = ledger_row(gw, rid)
    assert (row.output_tokens, row.outcome) == (usage.completion_tokens, "completed")
    assert row.cost_micros == expect_cost("gemini-2.5-flash", Usage(
        input_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens))


@pytest.mark.parametrize("host", HOSTS)
def test_a_long_last_gemini_event_is_charged_the_usage_it_reports(gateways, host,
                                                                  fake_gemini):
    """Gemini sends a function call's whole arguments in one event, its last, beside the
    stream's usage: past 64 KiB that event is not held to be parsed, and its usage is found
    as it passes (it was estimated from the bytes, and the stream never ended)."""
    gw = gateways[0][host]
    client = openai.OpenAI(base_url=gw.openai_base, api_key=gw.create_key().secret,
                           max_retries=0)
    fake_gemini.answer_words = 20_000  # a file of about 130 KB, written through the tool
    with client.chat.completions.with_streaming_response.create(
            model="gemini-2.5-flash", messages=MESSAGES, tools=[TOOL], stream=True,
            stream_options={"include_usage": True}) as response:
        rid = response.headers["x-langwatch-request-id"]
        chunks = list(response.parse())
    arguments = "".join(c.choices[0].delta.tool_calls[0].function.arguments
                        for c in chunks if c.choices and c.choices[0].delta.tool_calls)
    assert len(json.loads(arguments)["content"]) > 64 << 10
    usage = chunks[-1].usage
    row = ledger_row(gw, rid)
    assert row.usage_reported and row.outcome == "completed"
    assert (row.input_tokens, row.output_tokens) == (usage.prompt_tokens,
                                                     usage.completion_tokens)


@pytest.mark.parametrize("host", HOSTS)
def test_anthropic_clients_are_served_by_gemini(gateways, host, fake_gemini):
    gw = gateways[0][host]
    claude = anthropic.Anthropic(base_url=gw.url, api_key=gw.create_key().secret,
                                 max_retries=0)
    message = claude.messages.create(model="gemini-2.5-flash", max_tokens=40,
                                     system="Be brief.",
                                     messages=[{"role": "user", "content": "hi"}])
    assert message.content[0].text.startswith("Hello") and message.usage.output_tokens > 0
    with claude.messages.stream(model="gemini-2.5-flash", max_tokens=40,
                                messages=[{"role": "user", "content": "hi"}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text.startswith("Hello") and final.usage.output_tokens > 0


@pytest.mark.parametrize("host", HOSTS)
def test_gemini_errors_reach_each_client_in_its_family(gateways, host, fake_gemini):
    gw = gateways[0][host]
    key = gw.create_key()
    fake_gemini.enqueue(Behaviour("fail", status=429))
    client = openai.OpenAI(base_url=gw.openai_base, api_key=key.secret, max_retries=0)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="gemini-2.5-flash", messages=MESSAGES)
    fake_gemini.enqueue(Behaviour("fail", status=400))
    claude = anthropic.Anthropic(base_url=gw.url, api_key=key.secret, max_retries=0)
    with pytest.raises(anthropic.BadRequestError):
        claude.messages.create(model="gemini-2.5-flash", max_tokens=10,
                               messages=[{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("host", HOSTS)
def test_openai_falls_back_to_gemini_without_a_model_map(gateways, host, fake_openai):
    gw, policy = gateways[0][host], gateways[1][host]
    key = gw.create_key("--routing-policy", policy, "--config-json",
                        '{"fallback": {"on": ["5xx", "rate_limit"]}}')
    fake_openai.enqueue(Behaviour("fail", status=503))
    client = openai.OpenAI(base_url=gw.openai_base, api_key=key.secret, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(model="gpt-5-mini",
                                                          messages=MESSAGES)
    assert raw.headers["x-langwatch-provider"] == "mp_gemini"
    row = ledger_row(gw, raw.headers["x-langwatch-request-id"])
    assert (row.model, row.fallbacks) == ("gemini-2.5-flash", "mp_openai:5xx")


@pytest.mark.parametrize("host", HOSTS)
def test_gemini_pro_past_200k_tokens_is_charged_its_long_context_price(gateways, host):
    """Gemini 2.5 Pro bills a prompt over 200k tokens at its long-context price, for the
    whole request, streamed or not; a shorter one at the standard price."""
    gw = gateways[0][host]
    client = openai.OpenAI(base_url=gw.openai_base, api_key=gw.create_key().secret,
                           max_retries=0)
    long_prompt = [{"role": "user", "content": "lorem ipsum dolor " * 50_000}]
    raw = client.chat.completions.with_raw_response.create(
        model="gemini-2.5-pro", messages=long_prompt, max_tokens=50)
    with client.chat.completions.with_streaming_response.create(
            model="gemini-2.5-pro", messages=long_prompt, max_tokens=50,
            stream=True) as streamed:
        list(streamed.parse())
    short = client.chat.completions.with_raw_response.create(
        model="gemini-2.5-pro", messages=MESSAGES, max_tokens=50)
    for response, tier, input_price, output_price in (
            (raw, "long_context", 2.5, 15), (streamed, "long_context", 2.5, 15),
            (short, None, 1.25, 10)):
        row = ledger_row(gw, response.headers["x-langwatch-request-id"])
        assert (row.tier, row.outcome) == (tier, "completed")
        assert row.input_tokens > (200_000 if tier else 0) and row.output_tokens > 0
        assert row.cost_micros == math.ceil(row.input_tokens * Decimal(str(input_price))
                                            + row.output_tokens * output_price)
