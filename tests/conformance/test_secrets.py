"""Planted secrets never appear anywhere the gateway writes: logs (the access log
included), the ledger, the spool, run reports, saved flows."""

from __future__ import annotations

import json
from pathlib import Path

import anthropic
import openai
import pytest

from tests.conftest import ANTHROPIC_KEY, HOSTS, OPENAI_KEY, make_config
from tests.fakes.providers import Behaviour
from tests.harness import GatewayProcess, tollgate

MARKER = "PLANTED-PROMPT-MARKER-7f3a9c"
MESSAGES = [{"role": "user", "content": f"Remember {MARKER} for me."}]


def key(config: Path, *args: str) -> str:
    out = tollgate("virtual-keys", "create", "--name", "planted", "--scope", "ORG:acme",
                   "--principal", "carol@acme.com", *args, "--format", "json", config=config)
    return json.loads(out.stdout)["secret"]


@pytest.mark.parametrize("host", HOSTS)
def test_planted_secrets_appear_nowhere(host, tmp_path, fake_openai, fake_anthropic):
    config = make_config(tmp_path, fake_openai, fake_anthropic)
    policy = json.loads(tollgate(
        "routing-policies", "create", "--scope", "ORG:acme", "--name", "fb",
        "--model-provider", "mp_openai", "--model-provider", "mp_anthropic", "--model-map",
        "mp_anthropic:gpt-5-mini=claude-haiku-4-5", "--format", "json", config=config).stdout)
    plain = key(config, "--config-json",
                '{"policy_rules": {"tools": {"deny": ["^shell\\\\.exec$"]}}}')
    fallback = key(config, "--routing-policy", policy["id"], "--config-json",
                   '{"fallback": {"on": ["5xx"]}}')
    revoked = key(config)
    revoked_id = json.loads(tollgate("virtual-keys", "list", "--format", "json",
                                     config=config).stdout)[-1]["id"]
    tollgate("virtual-keys", "revoke", revoked_id, "--yes", config=config)
    flows = tmp_path / "flows.mitm"
    extra = ["--", "-w", str(flows)] if host == "mitmproxy" else []
    gw = GatewayProcess(host, config, tmp_path, extra=extra).start()
    try:
        oai = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=plain, max_retries=0)
        oai.chat.completions.create(model="gpt-5-mini", messages=MESSAGES)
        list(oai.chat.completions.create(model="gpt-5-mini", messages=MESSAGES, stream=True))
        with pytest.raises(openai.PermissionDeniedError):
            oai.chat.completions.create(model="gpt-5-mini", messages=MESSAGES, tools=[
                {"type": "function", "function": {"name": "shell.exec"}}])
        ant = anthropic.Anthropic(base_url=gw.url, api_key=plain, max_retries=0)
        ant.messages.create(model="claude-haiku-4-5", max_tokens=16, messages=MESSAGES)
        fake_openai.enqueue(Behaviour("fail", status=503))
        openai.OpenAI(base_url=f"{gw.url}/v1", api_key=fallback, max_retries=0
                      ).chat.completions.create(model="gpt-5-mini", messages=MESSAGES)
        fake_anthropic.enqueue(Behaviour("fail", status=500))
        with pytest.raises(anthropic.InternalServerError):
            ant.messages.create(model="claude-haiku-4-5", max_tokens=16, messages=MESSAGES)
        for bad in (revoked, plain[:-2] + "zz", OPENAI_KEY):
            with pytest.raises((openai.AuthenticationError, openai.PermissionDeniedError)):
                openai.OpenAI(base_url=f"{gw.url}/v1", api_key=bad, max_retries=0
                              ).chat.completions.create(model="gpt-5-mini", messages=MESSAGES)
    finally:
        gw.stop()
    assert fake_openai.requests and fake_anthropic.requests  # the scenarios reached them

    planted = {"provider key": OPENAI_KEY, "anthropic key": ANTHROPIC_KEY,
               "virtual key": plain, "fallback key": fallback, "revoked key": revoked}
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.name != "gateway.yaml"]
    assert any(p.suffix == ".log" for p in written) and any(p.suffix == ".db" for p in written)
    for path in written:
        data = path.read_bytes()
        for what, secret in planted.items():
            assert secret.encode() not in data, f"{what} in {path}"
        # Saved flows hold the bodies a developer asked mitmproxy to keep; nothing else may.
        if path != flows:
            assert MARKER.encode() not in data, f"prompt in {path}"
