"""What only the mitmproxy host does: loading with plain mitmdump, and showing decisions."""

from __future__ import annotations

import json
import re
import subprocess

import httpx
import pytest

from tests.conftest import make_config
from tests.harness import BIN, GatewayProcess, free_port, tollgate, wait_until


@pytest.fixture
def config(tmp_path, fake_openai, fake_anthropic):
    return make_config(tmp_path, fake_openai, fake_anthropic)


def new_key(config, *args: str) -> str:
    out = tollgate("virtual-keys", "create", "--name", "dbg", "--scope", "ORG:acme",
                   "--principal", "bob@acme.com", *args, "--format", "json", config=config)
    return json.loads(out.stdout)["secret"]


def test_addon_loads_in_plain_mitmdump(config, tmp_path, fake_openai):
    secret = new_key(config)
    port = free_port()
    log = open(tmp_path / "mitmdump.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([
        str(BIN / "mitmdump"), "--mode", f"reverse:http://127.0.0.1:9@127.0.0.1:{port}",
        "--set", "connection_strategy=lazy", "-s", "addon/tollgate_addon.py",
        "--set", f"tollgate_config={config}",
    ], stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        body = {"model": "gpt-5-mini", "messages": [{"role": "user", "content": "hi"}]}
        r = wait_until(lambda: httpx.post(url, json=body, headers={
            "authorization": f"Bearer {secret}"}), timeout=20, what="mitmdump")
        assert r.status_code == 200
        assert r.headers["x-langwatch-provider"] == "mp_openai"
        assert fake_openai.requests[-1].headers["authorization"].endswith("provider-key")
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def test_mitmweb_shows_each_decision(config, tmp_path, fake_openai):
    secret = new_key(config, "--config-json",
                     '{"policy_rules": {"tools": {"deny": ["^shell\\\\."]}}}')
    web_port = free_port()
    gw = GatewayProcess("mitmproxy", config, tmp_path,
                        extra=["--ui", "web", "--web-listen", f"127.0.0.1:{web_port}"]).start()
    try:
        headers = {"authorization": f"Bearer {secret}"}
        ok = httpx.post(f"{gw.url}/v1/chat/completions", headers=headers, json={
            "model": "gpt-5-mini", "messages": [{"role": "user", "content": "hi"}]})
        denied = httpx.post(f"{gw.url}/v1/chat/completions", headers=headers, json={
            "model": "gpt-5-mini", "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"type": "function", "function": {"name": "shell.exec"}}]})
        assert (ok.status_code, denied.status_code) == (200, 403)

        token = wait_until(lambda: re.search(r"\?token=([0-9a-f]+)", gw.log()), timeout=5,
                           what="mitmweb token").group(1)
        flows = httpx.get(f"http://127.0.0.1:{web_port}/flows",
                          headers={"authorization": f"Bearer {token}"}).json()
        by_status = {f["response"]["status_code"]: f for f in flows
                     if f.get("response") and f["request"]["path"].endswith("completions")}
        allowed = by_status[200]
        assert "tollgate: forward" in allowed["comment"]
        assert "principal=bob@acme.com" in allowed["comment"]
        assert "provider=mp_openai" in allowed["comment"]
        rejected = by_status[403]
        assert "REJECT tool_not_allowed" in rejected["comment"]
        assert "^shell\\." in rejected["comment"]
        assert rejected["marked"]
    finally:
        gw.stop()
