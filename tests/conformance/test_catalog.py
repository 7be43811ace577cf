"""The seed guide's failover recipe as written: a routing policy of OpenAI then Anthropic, a
key with fallback on, no model map. The model catalog names Anthropic's equivalent, so an
OpenAI 503 is served by Anthropic on both hosts. A provider with nothing to serve is left
out visibly."""

from __future__ import annotations

import json
from pathlib import Path

import anthropic
import openai
import pytest

from tests.conformance.test_metering import ledger_row
from tests.conftest import HOSTS, make_policy, own_gateways
from tests.fakes.providers import Behaviour
from tests.harness import tollgate

MESSAGES = [{"role": "user", "content": "failover"}]


@pytest.fixture(scope="module")
def gateways(tmp_path_factory, fake_openai, fake_anthropic):
    """Policy `seed`: [mp_openai, mp_anthropic], no map. Policy `local`: [mp_openai,
    mp_local], where mp_local (openai-compatible) serves only llama models."""
    ids: dict[str, dict[str, str]] = {}

    def setup(config: Path) -> None:
        tollgate("model-providers", "create", "--id", "mp_local", "--type",
                 "openai-compatible", "--scope", "ORG:acme", "--base-url", fake_openai.url,
                 "--api-key-env", "FAKE_OPENAI_KEY", "--models", "llama-*", config=config)
        ids[str(config)] = {}
        for name, second in (("seed", "mp_anthropic"), ("local", "mp_local")):
            ids[str(config)][name] = make_policy(
                config, name, "mp_openai", second,
                fallback='{"fallback": {"on": ["5xx", "timeout", "rate_limit", "network_error"]}}')

    with own_gateways(tmp_path_factory, fake_openai, fake_anthropic, "catalog", setup) as out:
        yield out, {h: ids[str(g.config)] for h, g in out.items()}


def fallback_key(gw, policy: str):
    return gw.create_key("--routing-policy", policy, "--config-json",
                         '{"fallback": {"on": ["5xx", "timeout", "rate_limit", '
                         '"network_error"]}}')


@pytest.mark.parametrize("host", HOSTS)
def test_the_seed_recipe_falls_back_to_anthropic_without_a_model_map(gateways, host,
                                                                     fake_openai,
                                                                     fake_anthropic):
    out, ids = gateways
    gw = out[host]
    key = fallback_key(gw, ids[host]["seed"])
    fake_openai.enqueue(Behaviour("fail", status=503))
    client = openai.OpenAI(base_url=gw.openai_base, api_key=key.secret, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(model="gpt-5-mini",
                                                          messages=MESSAGES)
    answer = raw.parse()
    assert raw.headers["x-langwatch-provider"] == "mp_anthropic"
    assert raw.headers["x-langwatch-fallback-count"] == "1"
    assert answer.model == "gpt-5-mini" and answer.choices[0].message.content
    assert json.loads(fake_anthropic.requests[-1].body)["model"] == "claude-haiku-4-5"
    row = ledger_row(gw, raw.headers["x-langwatch-request-id"])
    assert (row.provider, row.model, row.fallbacks) == ("mp_anthropic", "claude-haiku-4-5",
                                                        "mp_openai:5xx")
    by_provider = json.loads(gw.cli("spend", "report", "--by", "provider", "--format",
                                    "json").stdout)["rows"]
    assert "mp_anthropic" in {r["provider"] for r in by_provider}
    # And the other way: an Anthropic client whose provider fails is served by OpenAI.
    key2 = fallback_key(gw, ids[host]["seed"])
    fake_openai.enqueue(Behaviour("fail", status=503))
    claude = anthropic.Anthropic(base_url=gw.url, api_key=key2.secret, max_retries=0)
    message = claude.messages.with_raw_response.create(
        model="claude-haiku-4-5", max_tokens=30, messages=MESSAGES)
    # The policy puts OpenAI first: it is asked for gpt-5-mini, fails, and Anthropic serves.
    assert json.loads(fake_openai.requests[-1].body)["model"] == "gpt-5-mini"
    assert message.headers["x-langwatch-provider"] == "mp_anthropic"


@pytest.mark.parametrize("host", HOSTS)
def test_a_policy_provider_with_nothing_to_serve_is_skipped_visibly(gateways, host):
    out, ids = gateways
    gw = out[host]
    key = fallback_key(gw, ids[host]["local"])
    client = openai.OpenAI(base_url=gw.openai_base, api_key=key.secret, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(model="gpt-5-mini",
                                                          messages=MESSAGES)
    assert raw.headers["x-langwatch-provider"] == "mp_openai"
    row = ledger_row(gw, raw.headers["x-langwatch-request-id"])
    assert row.skipped == "mp_local: serves neither 'gpt-5-mini' nor an equivalent"
    assert "mp_local: serves neither 'gpt-5-mini'" in gw.process.log()
