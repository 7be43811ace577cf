"""AWS Bedrock behind the gateway, on both hosts: Claude through InvokeModel and its
response stream, signed with SigV4 (the fake recomputes the signature with botocore),
event-stream frames turned into each client's SSE, exact cost, and fallback across types."""

from __future__ import annotations

import json
from pathlib import Path

import anthropic
import openai
import pytest

from tests.conformance.test_metering import expect_cost, ledger_row
from tests.conftest import HOSTS, make_policy, own_gateways
from tests.fakes.providers import Behaviour
from tests.harness import tollgate
from tollgate.usage import Usage

MESSAGES = [{"role": "user", "content": "hello bedrock"}]
INVOKE = "/model/anthropic.claude-haiku-4-5-20251001-v1%3A0/invoke"
FALLBACK = '{"fallback": {"on": ["5xx", "rate_limit", "timeout"]}}'
TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


@pytest.fixture(scope="module")
def gateways(tmp_path_factory, fake_openai, fake_anthropic, fake_bedrock):
    """`mp_bedrock` serves Claude in us-east-1 (no key: the AWS chain). Policies:
    `openai-bedrock` [mp_openai, mp_bedrock] and `bedrock-anthropic` [mp_bedrock,
    mp_anthropic], with no model map (the catalog names Bedrock's model ids)."""
    ids: dict[str, dict[str, str]] = {}

    def setup(config: Path) -> None:
        tollgate("model-providers", "create", "--id", "mp_bedrock", "--type", "bedrock",
                 "--scope", "ORG:acme", "--base-url", fake_bedrock.url, "--provider-config",
                 '{"region": "us-east-1"}', "--fallback-priority", "0", "--models",
                 "claude-*", "--models", "amazon.nova-*", config=config)
        ids[str(config)] = {}
        for name, first, second in (("openai-bedrock", "mp_openai", "mp_bedrock"),
                                    ("bedrock-anthropic", "mp_bedrock", "mp_anthropic")):
            ids[str(config)][name] = make_policy(config, name, first, second, fallback=FALLBACK)

    with own_gateways(tmp_path_factory, fake_openai, fake_anthropic, "bedrock", setup) as out:
        yield out, {h: ids[str(g.config)] for h, g in out.items()}


@pytest.mark.parametrize("host", HOSTS)
def test_anthropic_clients_reach_claude_on_bedrock(gateways, host, fake_bedrock):
    gw = gateways[0][host]
    claude = anthropic.Anthropic(base_url=gw.url, api_key=gw.create_key().secret,
                                 max_retries=0)
    raw = claude.messages.with_raw_response.create(model="claude-haiku-4-5", max_tokens=40,
                                                   messages=MESSAGES)
    message = raw.parse()
    assert raw.headers["x-langwatch-provider"] == "mp_bedrock"
    assert message.content[0].text.startswith("Hello")
    sent = fake_bedrock.requests[-1]  # the fake refuses a request whose signature is wrong
    assert sent.path == INVOKE and sent.headers["authorization"].startswith("AWS4-HMAC-SHA256")
    doc = json.loads(sent.body)
    assert doc["anthropic_version"] == "bedrock-2023-05-31" and "model" not in doc
    row = ledger_row(gw, raw.headers["x-langwatch-request-id"])
    assert row.cost_micros == expect_cost("claude-haiku-4-5", Usage(
        input_tokens=message.usage.input_tokens, output_tokens=message.usage.output_tokens))

    fake_bedrock.chunk_delay = 0.01
    with claude.messages.stream(model="claude-haiku-4-5", max_tokens=40,
                                messages=MESSAGES) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(pieces) > 3 and "".join(pieces).startswith("Hello")
    assert fake_bedrock.requests[-1].path.endswith("/invoke-with-response-stream")
    streamed = [r for r in gw_rows(gw) if r.provider == "mp_bedrock"][-1]
    assert streamed.output_tokens == final.usage.output_tokens and streamed.cost_micros > 0


def gw_rows(gw) -> list:
    from tests.harness import ledger

    return sorted(ledger(gw.config), key=lambda r: r.ts)


@pytest.mark.parametrize("host", HOSTS)
def test_openai_clients_reach_claude_on_bedrock_through_translation(gateways, host,
                                                                    fake_bedrock):
    gw = gateways[0][host]
    client = openai.OpenAI(base_url=gw.openai_base, api_key=gw.create_key().secret,
                           max_retries=0)
    answer = client.chat.completions.create(model="claude-haiku-4-5", messages=MESSAGES,
                                            max_tokens=40)
    assert answer.choices[0].message.content.startswith("Hello")
    assert answer.usage.completion_tokens > 0
    called = client.chat.completions.create(model="claude-haiku-4-5", messages=MESSAGES,
                                            tools=[TOOL], max_tokens=40)
    assert called.choices[0].message.tool_calls[0].function.name == "get_weather"
    chunks = list(client.chat.completions.create(
        model="claude-haiku-4-5", messages=MESSAGES, max_tokens=40, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith("Hello") and chunks[-1].usage.completion_tokens > 0


@pytest.mark.parametrize("host", HOSTS)
def test_openai_falls_back_to_claude_on_bedrock(gateways, host, fake_openai, fake_bedrock):
    gw, ids = gateways[0][host], gateways[1][host]
    key = gw.create_key("--routing-policy", ids["openai-bedrock"], "--config-json", FALLBACK)
    fake_openai.enqueue(Behaviour("fail", status=503))
    client = openai.OpenAI(base_url=gw.openai_base, api_key=key.secret, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(model="gpt-5-mini",
                                                          messages=MESSAGES)
    assert raw.headers["x-langwatch-provider"] == "mp_bedrock"
    assert raw.headers["x-langwatch-fallback-count"] == "1"
    assert fake_bedrock.requests[-1].path == INVOKE  # gpt-5-mini's equivalent, Bedrock's id
    row = ledger_row(gw, raw.headers["x-langwatch-request-id"])
    assert (row.model, row.fallbacks) == ("claude-haiku-4-5", "mp_openai:5xx")


@pytest.mark.parametrize("host", HOSTS)
def test_bedrock_throttling_falls_back_and_errors_reach_the_client_in_its_family(
        gateways, host, fake_bedrock):
    gw, ids = gateways[0][host], gateways[1][host]
    key = gw.create_key("--routing-policy", ids["bedrock-anthropic"], "--config-json",
                        FALLBACK)
    fake_bedrock.enqueue(Behaviour("fail", status=429))
    claude = anthropic.Anthropic(base_url=gw.url, api_key=key.secret, max_retries=0)
    raw = claude.messages.with_raw_response.create(model="claude-haiku-4-5", max_tokens=20,
                                                   messages=MESSAGES)
    assert raw.headers["x-langwatch-provider"] == "mp_anthropic"
    # Without fallback, Bedrock's throttling reaches the client as its own family's 429.
    plain = anthropic.Anthropic(base_url=gw.url, api_key=gw.create_key().secret,
                                max_retries=0)
    fake_bedrock.enqueue(Behaviour("fail", status=429))
    with pytest.raises(anthropic.RateLimitError):
        plain.messages.create(model="claude-haiku-4-5", max_tokens=20, messages=MESSAGES)
    fake_bedrock.enqueue(Behaviour("fail", status=429))
    client = openai.OpenAI(base_url=gw.openai_base, api_key=gw.create_key().secret,
                           max_retries=0)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="claude-haiku-4-5", messages=MESSAGES)


@pytest.mark.parametrize("host", HOSTS)
def test_bedrock_model_timeout_falls_back_as_a_timeout(gateways, host, fake_bedrock):
    """Bedrock's adapter classes its own errors: ModelTimeoutException (408) is a timeout, so
    a key that falls back on timeouts alone moves on; its 503 is not, and reaches the client
    with Bedrock's message in the client's family."""
    gw, ids = gateways[0][host], gateways[1][host]
    key = gw.create_key("--routing-policy", ids["bedrock-anthropic"], "--config-json",
                        '{"fallback": {"on": ["timeout"]}}')
    claude = anthropic.Anthropic(base_url=gw.url, api_key=key.secret, max_retries=0)
    # Bedrock first again: a model only it serves closes the circuit earlier failures opened,
    # once its request is settled (after the client has its answer).
    nova = openai.OpenAI(base_url=gw.openai_base, api_key=key.secret, max_retries=0
                         ).chat.completions.with_raw_response.create(
        model="amazon.nova-lite-v1:0", messages=MESSAGES)
    ledger_row(gw, nova.headers["x-langwatch-request-id"])
    fake_bedrock.enqueue(Behaviour("fail", status=408))
    raw = claude.messages.with_raw_response.create(model="claude-haiku-4-5", max_tokens=20,
                                                   messages=MESSAGES)
    assert raw.headers["x-langwatch-provider"] == "mp_anthropic"
    assert ledger_row(gw, raw.headers["x-langwatch-request-id"]).fallbacks == \
        "mp_bedrock:timeout"
    fake_bedrock.enqueue(Behaviour("fail", status=503))
    with pytest.raises(anthropic.InternalServerError) as e:
        claude.messages.create(model="claude-haiku-4-5", max_tokens=20, messages=MESSAGES)
    assert e.value.body == {"type": "error", "error": {
        "type": "api_error", "message": "The server is overloaded."}}


NOVA = "amazon.nova-lite-v1:0"


@pytest.mark.parametrize("host", HOSTS)
def test_other_models_on_bedrock_go_through_converse(gateways, host, fake_bedrock):
    """Models other than Claude are served by Converse and ConverseStream, translated for
    OpenAI and Anthropic clients, tools included, with exact cost."""
    gw = gateways[0][host]
    key = gw.create_key()
    client = openai.OpenAI(base_url=gw.openai_base, api_key=key.secret, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model=NOVA, messages=[{"role": "system", "content": "Be brief."}, *MESSAGES],
        max_tokens=40)
    answer = raw.parse()
    assert answer.choices[0].message.content.startswith("Hello")
    sent = fake_bedrock.requests[-1]
    assert sent.path == "/model/amazon.nova-lite-v1%3A0/converse"
    doc = json.loads(sent.body)
    assert doc["system"] == [{"text": "Be brief."}] and doc["inferenceConfig"]["maxTokens"] == 40
    row = ledger_row(gw, raw.headers["x-langwatch-request-id"])
    assert row.cost_micros == expect_cost(NOVA, Usage(
        input_tokens=answer.usage.prompt_tokens,
        output_tokens=answer.usage.completion_tokens)) and row.cost_micros > 0
    called = client.chat.completions.create(model=NOVA, messages=MESSAGES, tools=[TOOL])
    assert called.choices[0].message.tool_calls[0].function.name == "get_weather"
    assert called.choices[0].finish_reason == "tool_calls"
    fake_bedrock.chunk_delay = 0.01
    chunks = list(client.chat.completions.create(
        model=NOVA, messages=MESSAGES, stream=True, stream_options={"include_usage": True}))
    assert fake_bedrock.requests[-1].path.endswith("/converse-stream")
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith("Hello") and chunks[-1].usage.completion_tokens > 0
    claude = anthropic.Anthropic(base_url=gw.url, api_key=key.secret, max_retries=0)
    with claude.messages.stream(model=NOVA, max_tokens=30, messages=MESSAGES) as stream:
        assert "".join(stream.text_stream).startswith("Hello")
        assert stream.get_final_message().usage.output_tokens > 0


@pytest.mark.parametrize("host", HOSTS)
def test_a_stalled_bedrock_times_out_to_anthropic(gateways, host, fake_bedrock):
    """Fallback across types on a timeout: Bedrock does not answer within its first-byte
    timeout, and Anthropic serves."""
    gw, ids = gateways[0][host], gateways[1][host]
    key = gw.create_key("--routing-policy", ids["bedrock-anthropic"], "--config-json",
                        FALLBACK)
    gw.cli("model-providers", "update", "mp_bedrock", "--first-byte-timeout", "1")
    gw.wait_for_config()
    try:
        fake_bedrock.enqueue(Behaviour("hang", seconds=4))
        claude = anthropic.Anthropic(base_url=gw.url, api_key=key.secret, max_retries=0)
        raw = claude.messages.with_raw_response.create(model="claude-haiku-4-5",
                                                       max_tokens=20, messages=MESSAGES)
        assert raw.headers["x-langwatch-provider"] == "mp_anthropic"
        assert raw.headers["x-langwatch-fallback-count"] == "1"
    finally:
        gw.cli("model-providers", "update", "mp_bedrock", "--first-byte-timeout", "120")
        gw.wait_for_config()


@pytest.mark.parametrize("host", HOSTS)
def test_bedrock_service_tiers_are_charged_at_their_price(gateways, host, fake_bedrock):
    """Converse names the tier that served it in its body (and ConverseStream in its
    metadata event), InvokeModel in the X-Amzn-Bedrock-Service-Tier header: the row names
    the tier and is charged its price (a tier with no price, the standard one)."""
    gw = gateways[0][host]
    key = gw.create_key()
    client = openai.OpenAI(base_url=gw.openai_base, api_key=key.secret, max_retries=0)
    fake_bedrock.default_tier = "flex"
    raw = client.chat.completions.with_raw_response.create(model=NOVA, messages=MESSAGES,
                                                           max_tokens=40)
    with client.chat.completions.with_streaming_response.create(
            model=NOVA, messages=MESSAGES, max_tokens=40, stream=True) as streamed:
        list(streamed.parse())
    for request_id in (raw.headers["x-langwatch-request-id"],
                       streamed.headers["x-langwatch-request-id"]):
        row = ledger_row(gw, request_id)
        used = Usage(input_tokens=row.input_tokens, output_tokens=row.output_tokens)
        assert row.tier == "flex" and row.output_tokens > 0
        # Nova Lite on flex: half its on-demand price.
        assert row.cost_micros == expect_cost(NOVA, Usage(**{**vars(used),
                                                             "service_tier": "flex"}))
        assert row.cost_micros < expect_cost(NOVA, used)

    fake_bedrock.default_tier = "priority"
    claude = anthropic.Anthropic(base_url=gw.url, api_key=key.secret, max_retries=0)
    raw = claude.messages.with_raw_response.create(model="claude-haiku-4-5", max_tokens=40,
                                                   messages=MESSAGES)
    assert fake_bedrock.requests[-1].path == INVOKE
    with claude.messages.with_streaming_response.create(
            model="claude-haiku-4-5", max_tokens=40, messages=MESSAGES,
            stream=True) as streamed:
        list(streamed.parse())
    for request_id in (raw.headers["x-langwatch-request-id"],
                       streamed.headers["x-langwatch-request-id"]):
        row = ledger_row(gw, request_id)
        assert row.provider == "mp_bedrock" and row.tier == "priority"
        assert row.cost_micros == expect_cost("claude-haiku-4-5", Usage(
            input_tokens=row.input_tokens, output_tokens=row.output_tokens))


@pytest.mark.parametrize("host", HOSTS)
def test_a_bedrock_stream_the_client_leaves_is_charged_as_the_clients_doing(gateways, host,
                                                                             fake_bedrock):
    """A client that walks away from a ConverseStream (translated for it) leaves a row of
    its own doing, charged what streamed: never a gateway error, even when it leaves before
    the Envoy host's meter has sent any of the stream on."""
    gw = gateways[0][host]
    key = gw.create_key()
    client = openai.OpenAI(base_url=gw.openai_base, api_key=key.secret, max_retries=0)
    fake_bedrock.chunk_delay, fake_bedrock.answer_words = 0.03, 40
    try:
        with client.chat.completions.with_streaming_response.create(
                model=NOVA, messages=MESSAGES, max_tokens=100, stream=True) as streamed:
            request_id = streamed.headers["x-langwatch-request-id"]
            words = 0
            for chunk in streamed.parse():
                words += bool(chunk.choices and chunk.choices[0].delta.content)
                if words >= 2:
                    break  # the client walks away, early in the stream
    finally:
        fake_bedrock.chunk_delay, fake_bedrock.answer_words = 0.0, 0
    row = ledger_row(gw, request_id)
    assert (row.outcome, row.code, row.status) == ("abandoned", None, 200), row
    assert row.provider == "mp_bedrock" and row.input_tokens > 0 and row.output_tokens > 0
