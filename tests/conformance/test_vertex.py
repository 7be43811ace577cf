"""Google Vertex AI behind the gateway, on both hosts: Claude through rawPredict and
streamRawPredict, with an OAuth token from a service account (the fake issues tokens from
its own token endpoint and refuses any it did not issue, or that expired), refreshed ahead of
expiry without failing a request."""

from __future__ import annotations

import json
import time
from pathlib import Path

import anthropic
import openai
import pytest

from tests.conformance.test_metering import expect_cost, ledger_row
from tests.conftest import HOSTS, make_policy, own_gateways
from tests.fakes.providers import Behaviour, service_account_for
from tests.harness import tollgate
from tollgate.usage import Usage

MESSAGES = [{"role": "user", "content": "hello vertex"}]
RAW_PREDICT = ("/v1/projects/acme-ml/locations/us-east5/publishers/anthropic/models/"
               "claude-haiku-4-5@20251001:rawPredict")
TOKEN_TTL = 245  # just over google-auth's and the gateway's refresh margins: refreshed soon


@pytest.fixture(scope="module")
def gateways(tmp_path_factory, fake_openai, fake_anthropic, fake_vertex):
    """`mp_vertex` (project acme-ml, us-east5), credentials from a service-account key file
    named by GOOGLE_APPLICATION_CREDENTIALS; policy `vertex-anthropic` falls back."""
    key_file = tmp_path_factory.mktemp("gcp") / "service-account.json"
    key_file.write_text(json.dumps(service_account_for(fake_vertex)))
    fake_vertex.token_ttl = TOKEN_TTL
    policies: dict[str, str] = {}

    def setup(config: Path) -> None:
        tollgate("model-providers", "create", "--id", "mp_vertex", "--type", "vertex",
                 "--scope", "ORG:acme", "--base-url", fake_vertex.url, "--provider-config",
                 '{"project": "acme-ml", "location": "us-east5"}', "--fallback-priority",
                 "0", config=config)
        policies[str(config)] = make_policy(config, "vertex-anthropic", "mp_vertex",
                                            "mp_anthropic",
                                            fallback='{"fallback": {"on": ["5xx"]}}')

    with own_gateways(tmp_path_factory, fake_openai, fake_anthropic, "vertex", setup,
                      env={"GOOGLE_APPLICATION_CREDENTIALS": str(key_file)}) as out:
        yield out, {h: policies[str(g.config)] for h, g in out.items()}


@pytest.mark.parametrize("host", HOSTS)
def test_anthropic_clients_reach_claude_on_vertex(gateways, host, fake_vertex):
    gw = gateways[0][host]
    claude = anthropic.Anthropic(base_url=gw.url, api_key=gw.create_key().secret,
                                 max_retries=0)
    raw = claude.messages.with_raw_response.create(model="claude-haiku-4-5", max_tokens=40,
                                                   messages=MESSAGES)
    message = raw.parse()
    assert raw.headers["x-langwatch-provider"] == "mp_vertex"
    assert message.content[0].text.startswith("Hello")
    sent = fake_vertex.requests[-1]  # the fake refuses a token it did not issue
    assert sent.path == RAW_PREDICT and sent.headers["authorization"].startswith("Bearer ya29.")
    doc = json.loads(sent.body)
    assert doc["anthropic_version"] == "vertex-2023-10-16" and "model" not in doc
    row = ledger_row(gw, raw.headers["x-langwatch-request-id"])
    assert row.cost_micros == expect_cost("claude-haiku-4-5", Usage(
        input_tokens=message.usage.input_tokens, output_tokens=message.usage.output_tokens))
    with claude.messages.stream(model="claude-haiku-4-5", max_tokens=40,
                                messages=MESSAGES) as stream:
        assert "".join(stream.text_stream).startswith("Hello")
    assert fake_vertex.requests[-1].path.endswith(":streamRawPredict")


@pytest.mark.parametrize("host", HOSTS)
def test_openai_clients_reach_claude_on_vertex_through_translation(gateways, host):
    gw = gateways[0][host]
    client = openai.OpenAI(base_url=gw.openai_base, api_key=gw.create_key().secret,
                           max_retries=0)
    answer = client.chat.completions.create(model="claude-haiku-4-5", messages=MESSAGES)
    assert answer.choices[0].message.content.startswith("Hello")
    chunks = list(client.chat.completions.create(
        model="claude-haiku-4-5", messages=MESSAGES, stream=True,
        stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage.completion_tokens > 0


@pytest.mark.parametrize("host", HOSTS)
def test_vertex_claude_falls_back_to_anthropic(gateways, host, fake_vertex):
    gw, policy = gateways[0][host], gateways[1][host]
    key = gw.create_key("--routing-policy", policy, "--config-json",
                        '{"fallback": {"on": ["5xx"]}}')
    fake_vertex.enqueue(Behaviour("fail", status=503))
    claude = anthropic.Anthropic(base_url=gw.url, api_key=key.secret, max_retries=0)
    raw = claude.messages.with_raw_response.create(model="claude-haiku-4-5", max_tokens=20,
                                                   messages=MESSAGES)
    assert raw.headers["x-langwatch-provider"] == "mp_anthropic"
    assert ledger_row(gw, raw.headers["x-langwatch-request-id"]).fallbacks == "mp_vertex:5xx"


@pytest.mark.parametrize("host", HOSTS)
def test_a_token_near_its_expiry_is_refreshed_without_failing_a_request(gateways, host,
                                                                        fake_vertex):
    """Tokens live 245 s here; the gateway replaces one with 240 s left, on a thread, while
    requests go on with the current one."""
    gw = gateways[0][host]
    claude = anthropic.Anthropic(base_url=gw.url, api_key=gw.create_key().secret,
                                 max_retries=0)
    ask = {"model": "claude-haiku-4-5", "max_tokens": 10, "messages": MESSAGES}
    claude.messages.create(**ask)
    issued = set(fake_vertex.tokens)
    time.sleep(6)  # the token now has under 240 s left
    for _ in range(5):
        claude.messages.create(**ask)
        time.sleep(0.3)
    assert set(fake_vertex.tokens) - issued, "no new token was fetched"
    used = fake_vertex.requests[-1].headers["authorization"].removeprefix("Bearer ")
    assert used not in issued  # the last requests went out with the new token


@pytest.mark.parametrize("host", HOSTS)
def test_gemini_on_vertex_serves_openai_and_anthropic_clients(gateways, host, fake_vertex):
    gw = gateways[0][host]
    key = gw.create_key()
    client = openai.OpenAI(base_url=gw.openai_base, api_key=key.secret, max_retries=0)
    answer = client.chat.completions.create(model="gemini-2.5-flash", messages=MESSAGES)
    assert answer.choices[0].message.content.startswith("Hello")
    sent = fake_vertex.requests[-1]
    assert sent.path == ("/v1/projects/acme-ml/locations/us-east5/publishers/google/models/"
                         "gemini-2.5-flash:generateContent")
    assert "contents" in json.loads(sent.body)
    claude = anthropic.Anthropic(base_url=gw.url, api_key=key.secret, max_retries=0)
    with claude.messages.stream(model="gemini-2.5-flash", max_tokens=30,
                                messages=MESSAGES) as stream:
        assert "".join(stream.text_stream).startswith("Hello")
    assert fake_vertex.requests[-1].path.endswith(":streamGenerateContent?alt=sse")


@pytest.mark.parametrize("host", HOSTS)
def test_vertex_tools_and_errors_reach_each_client_in_its_family(gateways, host,
                                                                 fake_vertex):
    gw = gateways[0][host]
    key = gw.create_key()
    client = openai.OpenAI(base_url=gw.openai_base, api_key=key.secret, max_retries=0)
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}
    called = client.chat.completions.create(model="claude-haiku-4-5", messages=MESSAGES,
                                            tools=[tool])
    assert called.choices[0].message.tool_calls[0].function.name == "get_weather"
    fake_vertex.enqueue(Behaviour("fail", status=429))
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="claude-haiku-4-5", messages=MESSAGES)
    fake_vertex.enqueue(Behaviour("fail", status=400))
    claude = anthropic.Anthropic(base_url=gw.url, api_key=key.secret, max_retries=0)
    with pytest.raises(anthropic.BadRequestError) as e:
        claude.messages.create(model="claude-haiku-4-5", max_tokens=10, messages=MESSAGES)
    # Google's error envelope, rewritten into Anthropic's with Vertex's own message.
    assert e.value.body["type"] == "error"
    assert e.value.body["error"]["type"] == "invalid_request_error"
    assert e.value.body["error"]["message"] == "The server is overloaded."
