"""Azure OpenAI behind the gateway, on both hosts, with the official SDKs as clients: the
deployment path, `api-key` and `api-version` upstream, OpenAI clients served byte for byte,
Anthropic clients through translation, errors in the client's family, exact cost, and
fallback from Azure to OpenAI."""

from __future__ import annotations

import json
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from tests.conformance.test_metering import expect_cost, ledger_row
from tests.conftest import AZURE_KEY, HOSTS, make_policy, own_gateways
from tests.fakes.providers import Behaviour
from tests.harness import tollgate
from tollgate.usage import Usage

AZURE_CONFIG = {"api_version": "2024-10-21", "deployments": {"gpt-4o-mini": "mini-prod"}}
DEPLOYMENT_PATH = "/openai/deployments/mini-prod/chat/completions?api-version=2024-10-21"
MESSAGES = [{"role": "user", "content": "hello azure"}]
TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}


@pytest.fixture(scope="module")
def gateways(tmp_path_factory, fake_openai, fake_anthropic, fake_azure):
    """`mp_azure` serves gpt-4o-mini (deployment mini-prod) and gpt-4o (no deployment of
    that name: Azure answers DeploymentNotFound), its key in a file beside the config;
    policy `azure-first` falls back to OpenAI."""
    policies: dict[str, str] = {}

    def setup(config: Path) -> None:
        (config.parent / "azure.key").write_text(AZURE_KEY + "\n")  # a mounted secret
        tollgate("model-providers", "create", "--id", "mp_azure", "--type", "azure-openai",
                 "--scope", "ORG:acme", "--base-url", fake_azure.url, "--api-key-file",
                 "azure.key", "--provider-config", json.dumps(AZURE_CONFIG),
                 "--models", "gpt-4o-mini", "--models", "gpt-4o", "--fallback-priority", "0",
                 config=config)
        policies[str(config)] = make_policy(config, "azure-first", "mp_azure", "mp_openai",
                                            fallback='{"fallback": {"on": ["5xx"]}}')

    with own_gateways(tmp_path_factory, fake_openai, fake_anthropic, "azure", setup) as out:
        yield {"gateways": out, "policies": {h: policies[str(g.config)] for h, g in out.items()}}


@pytest.mark.parametrize("host", HOSTS)
def test_openai_clients_reach_the_deployment_byte_for_byte(gateways, host, fake_azure):
    gw = gateways["gateways"][host]
    key = gw.create_key()
    body = json.dumps({"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 30},
                      separators=(",", ":")).encode()
    r = httpx.post(f"{gw.url}/v1/chat/completions", content=body, timeout=30,
                   headers={"authorization": f"Bearer {key.secret}",
                            "content-type": "application/json"})
    assert r.status_code == 200 and r.headers["x-langwatch-provider"] == "mp_azure"
    sent = fake_azure.requests[-1]
    assert sent.path == DEPLOYMENT_PATH and sent.body == body
    assert sent.headers["api-key"] == AZURE_KEY
    assert "authorization" not in sent.headers and key.secret not in json.dumps(sent.headers)
    usage = r.json()["usage"]
    row = ledger_row(gw, r.headers["x-langwatch-request-id"])
    assert (row.provider, row.model) == ("mp_azure", "gpt-4o-mini")
    assert row.cost_micros == expect_cost("gpt-4o-mini", Usage(
        input_tokens=usage["prompt_tokens"], output_tokens=usage["completion_tokens"]))


@pytest.mark.parametrize("host", HOSTS)
def test_openai_sdk_streams_tools_and_embeddings(gateways, host, fake_azure):
    gw = gateways["gateways"][host]
    client = openai.OpenAI(base_url=gw.openai_base, api_key=gw.create_key().secret,
                           max_retries=0)
    fake_azure.chunk_delay = 0.01
    with client.chat.completions.with_streaming_response.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True,
            stream_options={"include_usage": True}) as response:
        rid = response.headers["x-langwatch-request-id"]
        chunks = list(response.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith("Hello") and len([c for c in chunks if c.choices]) > 3
    used = chunks[-1].usage
    row = ledger_row(gw, rid)
    assert row.cost_micros == expect_cost("gpt-4o-mini", Usage(
        input_tokens=used.prompt_tokens, output_tokens=used.completion_tokens))
    called = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES,
                                            tools=[TOOL])
    assert called.choices[0].message.tool_calls[0].function.name == "get_weather"
    vectors = client.embeddings.create(model="gpt-4o-mini", input=["a", "b", "c"])
    assert len(vectors.data) == 3
    assert fake_azure.requests[-1].path == \
        "/openai/deployments/mini-prod/embeddings?api-version=2024-10-21"


@pytest.mark.parametrize("host", HOSTS)
def test_anthropic_clients_are_served_by_azure_through_translation(gateways, host,
                                                                    fake_azure):
    gw = gateways["gateways"][host]
    claude = anthropic.Anthropic(base_url=gw.url, api_key=gw.create_key().secret,
                                 max_retries=0)
    message = claude.messages.create(model="gpt-4o-mini", max_tokens=40, messages=MESSAGES)
    assert message.type == "message" and message.content[0].text.startswith("Hello")
    assert message.usage.output_tokens > 0
    assert fake_azure.requests[-1].path == DEPLOYMENT_PATH
    assert json.loads(fake_azure.requests[-1].body)["max_completion_tokens"] == 40
    with claude.messages.stream(model="gpt-4o-mini", max_tokens=40,
                                messages=MESSAGES) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text.startswith("Hello") and final.usage.output_tokens > 0


@pytest.mark.parametrize("host", HOSTS)
def test_azure_errors_reach_each_client_in_its_family(gateways, host):
    gw = gateways["gateways"][host]
    key = gw.create_key()
    client = openai.OpenAI(base_url=gw.openai_base, api_key=key.secret, max_retries=0)
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert missing.value.code == "DeploymentNotFound"
    claude = anthropic.Anthropic(base_url=gw.url, api_key=key.secret, max_retries=0)
    with pytest.raises(anthropic.NotFoundError) as translated:
        claude.messages.create(model="gpt-4o", max_tokens=20, messages=MESSAGES)
    assert "deployment" in translated.value.message.lower()


@pytest.mark.parametrize("host", HOSTS)
def test_azure_falls_back_to_openai_on_5xx(gateways, host, fake_azure, fake_openai):
    gw = gateways["gateways"][host]
    key = gw.create_key("--routing-policy", gateways["policies"][host], "--config-json",
                        '{"fallback": {"on": ["5xx"]}}')
    fake_azure.enqueue(Behaviour("fail", status=503))
    client = openai.OpenAI(base_url=gw.openai_base, api_key=key.secret, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini",
                                                          messages=MESSAGES)
    assert raw.headers["x-langwatch-provider"] == "mp_openai"
    assert raw.headers["x-langwatch-fallback-count"] == "1"
    assert fake_azure.requests and fake_openai.requests[-1].path == "/v1/chat/completions"
    row = ledger_row(gw, raw.headers["x-langwatch-request-id"])
    assert row.provider == "mp_openai" and row.fallbacks == "mp_azure:5xx"


@pytest.mark.parametrize("host", HOSTS)
def test_a_rotated_key_file_is_used_without_a_restart(gateways, host, fake_azure):
    """The upstream key is rotated the way a Kubernetes secret is (a new file swapped in):
    the next request carries the new key, and none fails."""
    gw = gateways["gateways"][host]
    client = openai.OpenAI(base_url=gw.openai_base, api_key=gw.create_key().secret,
                           max_retries=0)
    assert client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES).choices
    key_file, rotated = gw.config.parent / "azure.key", "azure-rotated-key-0002"
    try:
        staged = key_file.with_suffix(".new")
        staged.write_text(rotated + "\n")
        staged.replace(key_file)
        fake_azure.api_key = rotated
        assert client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES).choices
        assert fake_azure.requests[-1].headers["api-key"] == rotated
    finally:
        key_file.write_text(AZURE_KEY + "\n")
        fake_azure.api_key = AZURE_KEY


@pytest.mark.parametrize("host", HOSTS)
def test_the_responses_api_goes_to_azures_v1_path(gateways, host, fake_azure):
    gw = gateways["gateways"][host]
    client = openai.OpenAI(base_url=gw.openai_base, api_key=gw.create_key().secret,
                           max_retries=0)
    raw = client.responses.with_raw_response.create(model="gpt-4o-mini", input="hello")
    answer = raw.parse()
    assert answer.output_text and raw.headers["x-langwatch-provider"] == "mp_azure"
    sent = fake_azure.requests[-1]
    assert sent.path == "/openai/v1/responses" and sent.headers["api-key"] == AZURE_KEY
    assert json.loads(sent.body)["model"] == "mini-prod"  # the deployment, by name
    row = ledger_row(gw, raw.headers["x-langwatch-request-id"])
    assert row.cost_micros == expect_cost("gpt-4o-mini", Usage(
        input_tokens=answer.usage.input_tokens, output_tokens=answer.usage.output_tokens))
