"""What only the mitmproxy host does: loading with plain mitmdump, and showing decisions."""

from __future__ import annotations

import concurrent.futures
import json
import re
import subprocess

import httpx
import pytest
from mitmproxy import io as mitm_io

from tests.conformance.test_metering import ledger_row
from tests.conftest import ANTHROPIC_KEY, OPENAI_KEY, Gateway, make_config
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
        streamed = httpx.post(url, json={**body, "stream": True},
                              headers={"authorization": f"Bearer {secret}"})
        assert streamed.status_code == 200 and "data: [DONE]" in streamed.text
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()
    # mitmproxy's own lines stay, less its notice that a response streams, which the
    # gateway's meter makes true of every one.
    shown = (tmp_path / "mitmdump.log").read_text()
    assert shown.count("POST http://") == 2 and "client connect" in shown
    assert "Streaming response from" not in shown


def test_mitmweb_shows_each_decision(config, tmp_path, fake_openai):
    secret = new_key(config, "--config-json",
                     '{"policy_rules": {"tools": {"deny": ["^shell\\\\."]}}}')
    # A policy one of whose providers serves nothing the key asks for: the flow says so.
    tollgate("model-providers", "create", "--id", "mp_local", "--type", "openai-compatible",
             "--scope", "ORG:acme", "--base-url", fake_openai.url, "--api-key-env",
             "FAKE_OPENAI_KEY", "--models", "llama-*", config=config)
    policy = json.loads(tollgate("routing-policies", "create", "--scope", "ORG:acme", "--name",
                                 "local", "--model-provider", "mp_local", "--model-provider",
                                 "mp_openai", "--format", "json", config=config).stdout)["id"]
    routed = new_key(config, "--routing-policy", policy)
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
        skipping = httpx.post(f"{gw.url}/v1/embeddings", json={
            "model": "text-embedding-3-small", "input": "hi"},
            headers={"authorization": f"Bearer {routed}"})
        assert skipping.status_code == 200
        too_big = httpx.post(f"{gw.url}/v1/chat/completions", headers=headers,
                             content=b"x" * (8 * 1024 * 1024 + 1))
        assert (ok.status_code, denied.status_code, too_big.status_code) == (200, 403, 413)
        row = ledger_row(Gateway("mitmproxy", gw, config), ok.headers["x-langwatch-request-id"])

        token = wait_until(lambda: re.search(r"\?token=([0-9a-f]+)", gw.log()), timeout=5,
                           what="mitmweb token").group(1)
        web = f"http://127.0.0.1:{web_port}"
        auth = {"authorization": f"Bearer {token}"}
        # Start-up line and status bar name the providers, not the reverse mode's placeholder.
        described = f"tollgate gateway (gateway.yaml) to mp_openai ({fake_openai.url})"
        assert described in gw.log() and "reverse proxy to" not in gw.log()
        servers = httpx.get(f"{web}/state", headers=auth).json()["servers"]
        assert next(s["description"] for s in servers.values()).startswith(described)
        # The flow list shows the comment column by default.
        assert "comment" in httpx.get(f"{web}/options", headers=auth).json()[
            "web_columns"]["value"]
        flows = httpx.get(f"{web}/flows", headers=auth).json()
        by_status = {f["response"]["status_code"]: f for f in flows
                     if f.get("response") and f["request"]["path"].endswith("completions")}
        allowed = by_status[200]
        # The flow list shows the first line: the verdict, what it came to (tokens and cost,
        # as in the ledger), model, provider and principal; the ids come last.
        first, *rest = allowed["comment"].splitlines()
        assert first == (f"tollgate: 200 completed · {row.input_tokens} in / "
                         f"{row.output_tokens} out tokens · ${row.cost_micros / 1e6:.6f} · "
                         "gpt-5-mini · mp_openai · bob@acme.com") and row.cost_micros
        assert rest[-1].startswith(f"request_id={row.request_id} key=")
        rejected = by_status[403]
        first, *rest = rejected["comment"].splitlines()
        assert first == "tollgate: REJECT tool_not_allowed · bob@acme.com"
        assert "^shell\\." in rejected["comment"]
        assert rejected["marked"]
        # Refused flows show the address the client called, not a placeholder upstream.
        for refused in (rejected, by_status[413]):
            assert (refused["request"]["host"], refused["request"]["port"]) == \
                ("127.0.0.1", gw.port)
        assert "REJECT payload_too_large" in by_status[413]["comment"]
        (embedded,) = [f for f in flows if f["request"]["path"].endswith("/embeddings")]
        assert "skipped=mp_local: serves neither 'text-embedding-3-small'" in \
            embedded["comment"]
        shown = json.dumps(flows, ensure_ascii=False)  # what the UI holds: no credential
        assert secret not in shown and OPENAI_KEY not in shown
        assert f"Bearer {OPENAI_KEY[:3]}…{OPENAI_KEY[-4:]}" in shown
    finally:
        gw.stop()


def test_mitmweb_never_shows_a_provider_key_in_flight(config, tmp_path, fake_openai):
    """While a request waits for its provider, mitmweb already lists it: the provider key
    the gateway put on it is masked there too, not only once the answer is in."""
    secret = new_key(config)
    web_port = free_port()
    gw = GatewayProcess("mitmproxy", config, tmp_path,
                        extra=["--ui", "web", "--web-listen", f"127.0.0.1:{web_port}"]).start()
    try:
        token = wait_until(lambda: re.search(r"\?token=([0-9a-f]+)", gw.log()), timeout=5,
                           what="mitmweb token").group(1)
        fake_openai.response_delay = 3
        pending = concurrent.futures.ThreadPoolExecutor(1).submit(
            httpx.post, f"{gw.url}/v1/chat/completions", timeout=30,
            headers={"authorization": f"Bearer {secret}"},
            json={"model": "gpt-5-mini", "messages": [{"role": "user", "content": "hi"}]})
        # Listed from its headers on, the flow carries the (masked) virtual key until the
        # decision puts the provider's on it: wait for that, still without a response.
        in_flight = wait_until(lambda: [f for f in httpx.get(
            f"http://127.0.0.1:{web_port}/flows",
            headers={"authorization": f"Bearer {token}"}).json()
            if f["request"]["path"].endswith("completions") and not f.get("response")
            and dict(f["request"]["headers"]).get("authorization", "").startswith(
                f"Bearer {OPENAI_KEY[:3]}")],
            timeout=5, what="the flow waiting for its provider")
        headers = dict(in_flight[0]["request"]["headers"])
        assert headers["authorization"] == f"Bearer {OPENAI_KEY[:3]}…{OPENAI_KEY[-4:]}"
        assert OPENAI_KEY not in json.dumps(in_flight) and secret not in json.dumps(in_flight)
        assert pending.result().status_code == 200  # the provider did get the real key
        assert fake_openai.requests[-1].headers["authorization"] == f"Bearer {OPENAI_KEY}"
    finally:
        fake_openai.response_delay = 0
        gw.stop()


def test_saved_flows_hold_no_credential(config, tmp_path, fake_openai, fake_anthropic):
    """`-w` files keep flows for later: neither the virtual key nor a provider key is in
    them, whether one provider served or a fallback plan did."""
    secret = new_key(config)
    policy = json.loads(tollgate("routing-policies", "create", "--scope", "ORG:acme", "--name",
                                 "fb", "--model-provider", "mp_openai", "--model-provider",
                                 "mp_anthropic", "--model-map",
                                 "mp_anthropic:gpt-5-mini=claude-haiku-4-5", "--format",
                                 "json", config=config).stdout)["id"]
    fallback_secret = new_key(config, "--routing-policy", policy, "--config-json",
                              '{"fallback": {"on": ["5xx"]}}')
    saved = tmp_path / "flows.mitm"
    gw = GatewayProcess("mitmproxy", config, tmp_path, extra=["--", "-w", str(saved)]).start()
    chat = {"model": "gpt-5-mini", "messages": [{"role": "user", "content": "hi"}]}
    try:
        answers = []
        for key in (secret, fallback_secret):
            r = httpx.post(f"{gw.url}/v1/chat/completions", json=chat,
                           headers={"authorization": f"Bearer {key}"})
            assert r.status_code == 200
            answers.append(r.content)
        r = httpx.post(f"{gw.url}/v1/messages", headers={"x-api-key": secret}, json={
            "model": "claude-haiku-4-5", "max_tokens": 5, **{k: chat[k] for k in ["messages"]}})
        assert r.status_code == 200
        assert fake_anthropic.requests[-1].headers["x-api-key"] == ANTHROPIC_KEY
    finally:
        gw.stop()
    data = saved.read_bytes()
    with saved.open("rb") as f:  # every served flow is there (the fallback plan's too)
        served = [flow for flow in mitm_io.FlowReader(f).stream()
                  if flow.response is not None and flow.response.status_code == 200]
    paths = sorted(flow.request.path for flow in served)
    assert paths == ["/v1/chat/completions", "/v1/chat/completions", "/v1/messages"]
    # A JSON answer streams to the client, and the flow still holds what the client got.
    assert served[0].response.raw_content == answers[0]
    for planted in (secret, fallback_secret, OPENAI_KEY, ANTHROPIC_KEY):
        assert planted.encode() not in data, planted
        assert planted[4:20].encode() not in data  # not even a long piece of it


def test_unknown_flag_gets_tollgates_usage_error(config):
    out = tollgate("serve", "mitmproxy", "--bogus-flag", config=config, check=False)
    assert out.returncode == 2
    assert "--bogus-flag" in out.stderr and "tollgate serve mitmproxy" in out.stderr
    assert "usage: tollgate [options] [filter]" not in out.stderr  # not mitmproxy's
