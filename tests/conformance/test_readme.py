"""The README's first steps, run as written: `make demo` with no provider key, and the
"Check it is live" command, which must fail loudly when the provider answers an error."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import httpx
import pytest

from tests.conftest import make_config
from tests.fakes.providers import Behaviour
from tests.harness import ROOT, GatewayProcess, free_port, tollgate, wait_until


def readme_check() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("Check it is live"):]
    return re.search(r"```sh\n(.*?)```", section, re.S).group(1)


@pytest.fixture
def gateway(tmp_path, fake_openai, fake_anthropic):
    config = make_config(tmp_path, fake_openai, fake_anthropic)
    gw = GatewayProcess("mitmproxy", config, tmp_path).start()
    yield gw
    gw.stop()


def test_the_first_check_shows_the_provider_and_fails_loudly_on_an_error(gateway, fake_openai):
    secret = json.loads(tollgate("virtual-keys", "create", "--name", "dev", "--scope",
                                 "ORG:acme", "--principal", "alice@acme.com", "--format",
                                 "json", config=gateway.config).stdout)["secret"]
    wait_until(lambda: httpx.get(f"{gateway.url}/v1/models", headers={
        "authorization": f"Bearer {secret}"}).status_code == 200, timeout=5,
        what="the gateway to load the new key")
    command = readme_check().replace("http://127.0.0.1:8080", gateway.url)
    assert gateway.url in command

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", "-c", command], capture_output=True, text=True,
                              env={**os.environ, "TOLLGATE_VK": secret}, timeout=30)

    ok = run()
    assert ok.returncode == 0, ok.stderr
    assert "x-langwatch-provider: mp_openai" in ok.stdout.lower()
    fake_openai.enqueue(Behaviour("fail", status=401, body=json.dumps({"error": {
        "message": "Incorrect API key provided", "type": "invalid_request_error",
        "code": "invalid_api_key"}}).encode()))
    failed = run()
    assert failed.returncode == 22  # curl's "HTTP error", not a quiet success
    assert "Incorrect API key provided" in failed.stdout
    assert "401" in failed.stderr


def test_make_demo_serves_with_no_provider_key(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FAKE_", "OPENAI", "ANTHROPIC"))}
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "demo.py"), "--check",
                          "--listen", f"127.0.0.1:{free_port()}", "--envoy-admin",
                          f"127.0.0.1:{free_port()}", "--dir", str(tmp_path / "demo")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "POST /v1/chat/completions -> 200" in out.stdout
    assert '"x-langwatch-provider": "mp_openai"' in out.stdout
