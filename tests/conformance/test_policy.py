"""Keys, model and tool policy as each SDK sees them: its own exception, the documented code."""

from __future__ import annotations

import json
import re
import subprocess
import time

import anthropic
import httpx
import openai
import pytest

from tests.conformance.test_metering import ledger_row
from tests.conftest import Key
from tests.harness import BIN, wait_until

CHAT = {"model": "gpt-5-mini", "messages": [{"role": "user", "content": "hi"}]}
MSG = {"model": "claude-haiku-4-5", "max_tokens": 16,
       "messages": [{"role": "user", "content": "hi"}]}


def oai(gateway, secret: str | None) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.openai_base, api_key=secret or "unused",
                         max_retries=0)


def ant(gateway, secret: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gateway.url, api_key=secret, max_retries=0)


def openai_error(exc: pytest.ExceptionInfo) -> dict:
    return exc.value.body  # the SDK hands over the envelope's "error" object


def anthropic_error(exc: pytest.ExceptionInfo) -> dict:
    return exc.value.body["error"]


# -- authentication ---------------------------------------------------------------------------

def test_no_key_is_401(gateway, fake_openai):
    r = httpx.post(f"{gateway.openai_base}/chat/completions", json=CHAT)
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_api_key"
    assert r.json()["error"]["param"] is None
    assert r.headers["x-langwatch-request-id"]
    assert fake_openai.requests == []


def test_unknown_key_is_401_for_both_sdks(gateway, fake_openai, fake_anthropic):
    with pytest.raises(openai.AuthenticationError) as exc:
        oai(gateway, "tg-live-not-a-real-key").chat.completions.create(**CHAT)
    assert openai_error(exc)["code"] == "invalid_api_key"
    with pytest.raises(anthropic.AuthenticationError) as aexc:
        ant(gateway, "tg-live-not-a-real-key").messages.create(**MSG)
    assert anthropic_error(aexc)["code"] == "invalid_api_key"
    assert anthropic_error(aexc)["type"] == "authentication_error"
    assert fake_openai.requests == [] and fake_anthropic.requests == []


@pytest.mark.parametrize(("command", "code"), [("revoke", "virtual_key_revoked"),
                                                ("disable", "virtual_key_disabled")])
def test_key_state_is_403(gateway, command, code):
    key = gateway.create_key()
    gateway.cli("virtual-keys", command, key.id, *(["--yes"] if command == "revoke" else []))
    gateway.wait_for_key(key, lambda status: status == 403)
    with pytest.raises(openai.PermissionDeniedError) as exc:
        oai(gateway, key.secret).chat.completions.create(**CHAT)
    assert openai_error(exc)["code"] == code
    with pytest.raises(anthropic.PermissionDeniedError) as aexc:
        ant(gateway, key.secret).messages.create(**MSG)
    assert anthropic_error(aexc)["code"] == code


def test_disabled_key_can_be_enabled_again(gateway):
    key = gateway.create_key()
    gateway.cli("virtual-keys", "disable", key.id)
    gateway.wait_for_key(key, lambda status: status == 403)
    gateway.cli("virtual-keys", "enable", key.id)
    gateway.wait_for_key(key, lambda status: status == 200)
    assert oai(gateway, key.secret).chat.completions.create(**CHAT).choices


def test_expired_key_is_403(gateway):
    key = gateway.create_key("--expires-in", "2s")
    assert oai(gateway, key.secret).chat.completions.create(**CHAT).choices
    time.sleep(2.2)
    with pytest.raises(openai.PermissionDeniedError) as exc:
        oai(gateway, key.secret).chat.completions.create(**CHAT)
    assert openai_error(exc)["code"] == "virtual_key_expired"


def test_rotated_key_keeps_old_secret_for_the_grace_period(gateway):
    key = gateway.create_key()
    out = gateway.cli("virtual-keys", "rotate", key.id, "--grace", "1h", "--format", "json")
    new = Key(key.id, json.loads(out.stdout)["secret"])
    gateway.wait_for_key(new, lambda status: status == 200)
    assert oai(gateway, new.secret).chat.completions.create(**CHAT).choices
    assert oai(gateway, key.secret).chat.completions.create(**CHAT).choices
    gateway.cli("virtual-keys", "rotate", key.id, "--grace", "0s", "--format", "json")
    gateway.wait_for_key(key, lambda status: status == 401)


# -- the seed guide's flow, as written ---------------------------------------------------------

def test_seed_flow_create_with_jq_then_revoke_without_restart(gateway, fake_openai):
    tollgate = f"{BIN / 'tollgate'} --config {gateway.config}"
    secret = subprocess.run(
        f'{tollgate} virtual-keys create --name "dev-migration" --env live --scope ORG:acme '
        f"--format json | tee {gateway.config.parent / 'vk.json'} | jq -r '.secret'",
        shell=True, capture_output=True, text=True, check=True).stdout.strip()
    assert secret.startswith("tg-live-")
    key_id = json.loads((gateway.config.parent / "vk.json").read_text())["id"]
    key = Key(key_id, secret)
    gateway.wait_for_key(key, lambda status: status == 200)
    # The guide's curl check: the gateway's headers are on the answer.
    r = httpx.post(f"{gateway.openai_base}/chat/completions",
                   headers={"authorization": f"Bearer {secret}"},
                   json={"model": "gpt-5-mini", "messages": [{"role": "user", "content": "ping"}],
                         "max_tokens": 4})
    assert r.status_code == 200
    assert {"x-langwatch-request-id", "x-langwatch-trace-id", "x-langwatch-span-id"} <= set(
        r.headers)

    subprocess.run(f"{tollgate} virtual-keys revoke {key_id} --yes", shell=True, check=True,
                   capture_output=True)
    revoked_at = time.monotonic()
    while True:
        r = httpx.post(f"{gateway.openai_base}/chat/completions",
                       headers={"authorization": f"Bearer {secret}"}, json=CHAT)
        if r.status_code == 403:
            break
        assert r.status_code == 200
        assert time.monotonic() - revoked_at < 2.0, "revoke did not take effect within 2 s"
        time.sleep(0.05)
    assert r.json()["error"]["code"] == "virtual_key_revoked"


# -- model policy -----------------------------------------------------------------------------

def test_model_outside_allowlist_is_403(gateway, fake_openai, fake_anthropic):
    key = gateway.create_key("--models-allowed", "gpt-5*")
    with pytest.raises(openai.PermissionDeniedError) as exc:
        oai(gateway, key.secret).chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert openai_error(exc)["code"] == "model_not_allowed"
    assert openai_error(exc)["param"] == "model"
    with pytest.raises(anthropic.PermissionDeniedError) as aexc:
        ant(gateway, key.secret).messages.create(**MSG)
    assert anthropic_error(aexc)["code"] == "model_not_allowed"
    assert fake_openai.requests == [] and fake_anthropic.requests == []
    assert oai(gateway, key.secret).chat.completions.create(**CHAT).choices


def test_alias_rewrites_only_the_model(gateway, fake_openai):
    key = gateway.create_key("--models-allowed", "gpt-5*", "--config-json",
                             '{"model_aliases": {"fast": "gpt-5-mini"}}')
    body = b'{"model" :  "fast",\n "messages": [{"role": "user", "content": "caf\xc3\xa9"}]}'
    r = httpx.post(f"{gateway.openai_base}/chat/completions", content=body,
                   headers={"authorization": f"Bearer {key.secret}",
                            "content-type": "application/json"})
    assert r.status_code == 200
    seen = fake_openai.requests[-1]
    assert seen.body == body.replace(b'"fast"', b'"gpt-5-mini"')
    assert int(seen.headers["content-length"]) == len(seen.body)
    completion = oai(gateway, key.secret).chat.completions.create(
        model="fast", messages=[{"role": "user", "content": "hi"}])
    assert completion.model == "gpt-5-mini"


def test_unserved_model_is_400_no_provider(gateway):
    key = gateway.create_key()
    with pytest.raises(openai.BadRequestError) as exc:
        oai(gateway, key.secret).chat.completions.create(
            model="mistral-large", messages=[{"role": "user", "content": "hi"}])
    assert openai_error(exc)["code"] == "no_provider_for_model"


# -- tool policy ------------------------------------------------------------------------------

DENY = '{"policy_rules": {"tools": {"deny": ["^shell\\\\.exec$", "^filesystem\\\\.write$"]}}}'
ALLOW = '{"policy_rules": {"tools": {"allow": ["^search_"]}}}'


def chat_tool(name: str) -> dict:
    return {"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}


def anthropic_tool(name: str) -> dict:
    return {"name": name, "input_schema": {"type": "object"}}


def test_denied_tool_openai_chat(gateway, fake_openai):
    key = gateway.create_key("--config-json", DENY)
    with pytest.raises(openai.PermissionDeniedError) as exc:
        oai(gateway, key.secret).chat.completions.create(
            **CHAT, tools=[chat_tool("search"), chat_tool("shell.exec")])
    assert openai_error(exc)["code"] == "tool_not_allowed"
    assert "shell.exec" in openai_error(exc)["message"]
    assert fake_openai.requests == []
    completion = oai(gateway, key.secret).chat.completions.create(
        **CHAT, tools=[chat_tool("shell_exec_preview")])
    assert completion.choices[0].message.tool_calls[0].function.name == "shell_exec_preview"


def test_denied_tool_responses_api(gateway, fake_openai):
    key = gateway.create_key("--config-json", DENY)
    with pytest.raises(openai.PermissionDeniedError) as exc:
        oai(gateway, key.secret).responses.create(
            model="gpt-5", input="hi",
            tools=[{"type": "function", "name": "filesystem.write",
                    "parameters": {"type": "object"}}])
    assert openai_error(exc)["code"] == "tool_not_allowed"
    assert fake_openai.requests == []


def test_denied_tool_anthropic(gateway, fake_anthropic):
    key = gateway.create_key("--config-json", DENY)
    with pytest.raises(anthropic.PermissionDeniedError) as exc:
        ant(gateway, key.secret).messages.create(**MSG, tools=[anthropic_tool("shell.exec")])
    assert anthropic_error(exc)["code"] == "tool_not_allowed"
    assert fake_anthropic.requests == []
    message = ant(gateway, key.secret).messages.create(**MSG, tools=[anthropic_tool("grep")])
    assert message.content[0].type == "tool_use" and message.content[0].name == "grep"


def test_allow_list_must_match(gateway, fake_anthropic):
    key = gateway.create_key("--config-json", ALLOW)
    with pytest.raises(anthropic.PermissionDeniedError) as exc:
        ant(gateway, key.secret).messages.create(**MSG, tools=[anthropic_tool("delete_repo")])
    assert anthropic_error(exc)["code"] == "tool_not_allowed"
    with pytest.raises(openai.PermissionDeniedError):
        oai(gateway, key.secret).chat.completions.create(**CHAT,
                                                         tools=[chat_tool("delete_repo")])
    ok = ant(gateway, key.secret).messages.create(**MSG, tools=[anthropic_tool("search_docs")])
    assert ok.content[0].name == "search_docs"


def test_tool_rules_run_in_linear_time(gateway, fake_openai):
    """A pattern that backtracks exponentially in a backtracking engine, and a 1 MB tool
    name: both are answered at once, and the gateway serves the next request."""
    rules = '{"policy_rules": {"tools": {"deny": ["^(a+)+$", ".*exec"]}}}'
    key = gateway.create_key("--config-json", rules)
    client = oai(gateway, key.secret)
    allowed = client.chat.completions.create(**CHAT, tools=[chat_tool("a" * 200 + "!")])
    assert allowed.choices[0].message.tool_calls  # served: the deny pattern did not match
    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(**CHAT, tools=[chat_tool("a" * 250)])
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(**CHAT, tools=[chat_tool("x" * (1 << 20) + "exec")])
    assert openai_error(exc)["code"] == "invalid_request"
    assert "at most 256" in openai_error(exc)["message"]
    assert client.chat.completions.create(**CHAT).choices


def test_backtracking_only_regex_is_a_config_error(gateway):
    rules = '{"policy_rules": {"tools": {"deny": ["^(shell)\\\\1$"]}}}'
    out = gateway.cli("virtual-keys", "create", "--name", "x", "--scope", "ORG:acme",
                      "--config-json", rules, check=False)
    assert out.returncode != 0 and "RE2" in out.stderr


# -- bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize(("body", "param"), [
    (b"{not json", None),
    (b"[1, 2]", None),
    (b'{"messages": []}', "model"),
    (b'{"model": 42, "messages": []}', "model"),
    (b'{"model": "gpt-5-mini", "messages": "hi"}', "messages"),
    (b'{"model": "gpt-5-mini", "messages": [], "tools": {"a": 1}}', "tools"),
    (b'{"model": "gpt-5-mini", "messages": [], "tools": [{"type": "function"}]}',
     "tools[0].function.name"),
    (b'{"model": "gpt-5-mini", "messages": [], "stream": "yes"}', "stream"),
    (b"[" * 100_000 + b"]" * 100_000, None),
    (b'{"model": "gpt-5-mini", "messages": [], "n": ' + b"9" * 10_000 + b"}", None),
    (b'\xff\xfe{"model"', None),
])
def test_bad_bodies_get_400_invalid_request(gateway, fake_openai, body, param):
    key = gateway.create_key()
    r = httpx.post(f"{gateway.openai_base}/chat/completions", content=body,
                   headers={"authorization": f"Bearer {key.secret}",
                            "content-type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_request"
    assert error["param"] == param
    assert "Traceback" not in r.text
    assert fake_openai.requests == []


def test_bad_body_on_anthropic_route_is_anthropic_shaped(gateway):
    key = gateway.create_key()
    r = httpx.post(f"{gateway.url}/v1/messages", content=b"{oops",
                   headers={"x-api-key": key.secret})
    assert r.status_code == 400
    assert r.json()["type"] == "error"
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert r.json()["error"]["code"] == "invalid_request"


def test_body_over_cap_is_413(gateway, fake_openai):
    key = gateway.create_key()
    big = json.dumps({"model": "gpt-5-mini",
                      "messages": [{"role": "user", "content": "x" * (9 * 1024 * 1024)}]})
    with pytest.raises(openai.APIStatusError) as exc:
        oai(gateway, key.secret).chat.completions.create(
            model="gpt-5-mini", messages=json.loads(big)["messages"])
    assert exc.value.status_code == 413
    assert openai_error(exc)["code"] == "payload_too_large"
    assert fake_openai.requests == []


def test_unknown_route_is_404_with_envelope(gateway):
    key = gateway.create_key()
    r = httpx.post(f"{gateway.url}/v1/completions", json={"model": "gpt-5"},
                   headers={"authorization": f"Bearer {key.secret}"})
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found"


# -- MCP, URL and model rules ------------------------------------------------------------------

MCP_BETA = ["mcp-client-2025-04-04"]


def rules_key(gateway, **groups: dict) -> Key:
    return gateway.create_key("--config-json", json.dumps({"policy_rules": groups}))


def test_mcp_servers_and_tools_anthropic_beta(gateway, fake_anthropic):
    """Anthropic's MCP connector (the beta header): each server's name and URL, and each tool
    it allows as `server/tool`."""
    key = rules_key(gateway, mcp={"deny": ["host:mcp.evil.example", "/delete_"],
                                  "allow": None})
    client = ant(gateway, key.secret)
    with pytest.raises(anthropic.PermissionDeniedError) as exc:
        client.beta.messages.create(**MSG, betas=MCP_BETA, mcp_servers=[
            {"type": "url", "url": "https://mcp.evil.example/sse", "name": "notes"}])
    error = anthropic_error(exc)
    assert error["code"] == "mcp_not_allowed" and error["type"] == "permission_error"
    assert "https://mcp.evil.example/sse" in error["message"]
    assert "`host:mcp.evil.example`" in error["message"]
    with pytest.raises(anthropic.PermissionDeniedError) as exc:
        client.beta.messages.create(**MSG, betas=MCP_BETA, mcp_servers=[
            {"type": "url", "url": "https://mcp.example.com/sse", "name": "repo",
             "tool_configuration": {"allowed_tools": ["read_file", "delete_branch"]}}])
    assert "MCP tool 'repo/delete_branch'" in anthropic_error(exc)["message"]
    assert fake_anthropic.requests == []
    served = client.beta.messages.create(**MSG, betas=MCP_BETA, mcp_servers=[
        {"type": "url", "url": "https://mcp.example.com/sse", "name": "repo",
         "tool_configuration": {"allowed_tools": ["read_file"]}}])
    assert served.content and fake_anthropic.requests[-1].json()["mcp_servers"][0]["name"] == \
        "repo"


def test_responses_mcp_tools(gateway, fake_openai):
    """OpenAI Responses `mcp` tools: label, URL and allowed tools; one that lists no tools
    is refused under an allow list, with how to list them."""
    key = rules_key(gateway, mcp={"allow": ["^deepwiki$", "^https://mcp\\.deepwiki\\.com/",
                                            "^deepwiki/(ask_question|read_wiki_structure)$"]})
    client = oai(gateway, key.secret)
    deepwiki = {"type": "mcp", "server_label": "deepwiki",
                "server_url": "https://mcp.deepwiki.com/mcp", "require_approval": "never"}
    with pytest.raises(openai.PermissionDeniedError) as exc:
        client.responses.create(model="gpt-5-mini", input="hi", tools=[deepwiki])
    error = openai_error(exc)
    assert error["code"] == "mcp_not_allowed" and "allowed_tools" in error["message"]
    assert error["param"] == "tools[0]"
    with pytest.raises(openai.PermissionDeniedError) as exc:
        client.responses.create(model="gpt-5-mini", input="hi", tools=[
            {**deepwiki, "allowed_tools": ["ask_question", "delete_wiki"]}])
    assert "'deepwiki/delete_wiki'" in openai_error(exc)["message"]
    assert "allow list" in openai_error(exc)["message"]
    with pytest.raises(openai.PermissionDeniedError) as exc:
        client.responses.create(model="gpt-5-mini", input="hi", tools=[
            {**deepwiki, "server_url": "https://elsewhere.example/mcp",
             "allowed_tools": {"tool_names": ["ask_question"]}}])
    assert "https://elsewhere.example/mcp" in openai_error(exc)["message"]
    assert fake_openai.requests == []
    served = client.responses.create(model="gpt-5-mini", input="hi", tools=[
        {**deepwiki, "allowed_tools": ["ask_question"]}])
    assert served.output and fake_openai.requests[-1].json()["tools"][0]["type"] == "mcp"


def test_urls_the_provider_would_fetch(gateway, fake_openai, fake_anthropic):
    """Image and document URLs in either family, with the host helper; inline data and URLs
    in plain text pass unless `anywhere` asks for the seed's rule."""
    key = rules_key(gateway, urls={"deny": ["host:evil.example", "^http://"]})
    client = oai(gateway, key.secret)

    def image(url: str) -> dict:
        return {"model": "gpt-5-mini", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": url}}]}]}

    with pytest.raises(openai.PermissionDeniedError) as exc:
        client.chat.completions.create(**image("https://cdn.evil.example/cat.png"))
    error = openai_error(exc)
    assert error["code"] == "url_not_allowed"
    assert "'https://cdn.evil.example/cat.png'" in error["message"]
    assert "`host:evil.example`" in error["message"]
    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(**image("http://example.com/cat.png"))
    with pytest.raises(openai.PermissionDeniedError) as exc:
        client.responses.create(model="gpt-5-mini", input=[{"role": "user", "content": [
            {"type": "input_file", "file_url": "https://evil.example/" + "a" * 300}]}])
    assert "…" in openai_error(exc)["message"]  # a long URL is cut
    with pytest.raises(anthropic.PermissionDeniedError) as aexc:
        ant(gateway, key.secret).messages.create(**{**MSG, "messages": [{
            "role": "user", "content": [
                {"type": "document", "source": {"type": "url",
                                                "url": "https://evil.example/terms.pdf"}},
                {"type": "text", "text": "summarise"}]}]})
    assert anthropic_error(aexc)["code"] == "url_not_allowed"
    assert fake_openai.requests == [] and fake_anthropic.requests == []

    client.chat.completions.create(**image("https://example.com/cat.png"))
    client.chat.completions.create(**image("data:image/png;base64,iVBORw0KGgo="))
    client.chat.completions.create(**{**CHAT, "messages": [
        {"role": "user", "content": "is https://evil.example/x safe?"}]})
    assert len(fake_openai.requests) == 3

    anywhere = rules_key(gateway, urls={"deny": ["host:evil.example"], "anywhere": True})
    with pytest.raises(openai.PermissionDeniedError) as exc:
        oai(gateway, anywhere.secret).chat.completions.create(**{**CHAT, "messages": [
            {"role": "user", "content": "is https://evil.example/x safe?"}]})
    assert "'https://evil.example/x'" in openai_error(exc)["message"]


def test_web_tool_domains_are_urls(gateway, fake_anthropic):
    key = rules_key(gateway, urls={"allow": ["host:docs.python.org"]})
    with pytest.raises(anthropic.PermissionDeniedError) as exc:
        ant(gateway, key.secret).messages.create(**MSG, tools=[{
            "type": "web_search_20250305", "name": "web_search",
            "allowed_domains": ["docs.python.org", "pastebin.com"]}])
    assert "'https://pastebin.com'" in anthropic_error(exc)["message"]
    assert "matches none" in anthropic_error(exc)["message"]
    ant(gateway, key.secret).messages.create(**MSG, tools=[{
        "type": "web_search_20250305", "name": "web_search",
        "allowed_domains": ["docs.python.org"]}])


def test_model_rules_after_aliases_and_in_the_model_list(gateway, fake_openai):
    key = gateway.create_key("--config-json", json.dumps({
        "model_aliases": {"best": "gpt-5"},
        "policy_rules": {"models": {"deny": ["^gpt-5$"], "allow": ["^gpt-"]}}}))
    client = oai(gateway, key.secret)
    for asked in ("gpt-5", "best"):
        with pytest.raises(openai.PermissionDeniedError) as exc:
            client.chat.completions.create(**{**CHAT, "model": asked})
        error = openai_error(exc)
        assert error["code"] == "model_not_allowed" and "`^gpt-5$`" in error["message"]
    with pytest.raises(anthropic.PermissionDeniedError) as aexc:
        ant(gateway, key.secret).messages.create(**MSG)
    assert "matches none" in anthropic_error(aexc)["message"]
    assert fake_openai.requests == []
    client.chat.completions.create(**CHAT)  # gpt-5-mini
    listed = {m.id for m in client.models.list()}
    assert "gpt-5-mini" in listed and "gpt-5" not in listed and "best" not in listed
    assert not any(m.startswith("claude") for m in listed)


def shadow_count(gateway, control: str, code: str) -> float:
    text = httpx.get(f"{gateway.process.admin_url}/metrics", timeout=5).text
    series = f'tollgate_shadow_decisions_total{{code="{code}",control="{control}"}}'
    found = re.search(rf"^{re.escape(series)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def test_a_shadow_rule_group_serves_and_records(gateway, fake_openai):
    """`mode: shadow` on a rule group: the request is served; the refusal it would have met
    is on its ledger row, in the access log's row, counted, and on the response only when
    gateway.shadow_headers says so."""
    key = rules_key(gateway, tools={"deny": ["^shell\\."], "mode": "shadow"},
                    urls={"deny": ["host:evil.example"]})  # this group enforces
    client = oai(gateway, key.secret)
    before = shadow_count(gateway, "policy_rules.tools", "tool_not_allowed")
    reply = client.chat.completions.with_raw_response.create(
        **CHAT, tools=[chat_tool("shell.exec")])
    assert reply.http_response.status_code == 200
    assert fake_openai.requests[-1].json()["tools"][0]["function"]["name"] == "shell.exec"
    assert "x-langwatch-shadow" not in reply.headers
    row = ledger_row(gateway, reply.headers["x-langwatch-request-id"])
    assert row.status == 200 and row.shadow.startswith(
        "policy_rules.tools would refuse 403 tool_not_allowed: Tool 'shell.exec' is blocked "
        "by deny rule `^shell\\.`")
    assert shadow_count(gateway, "policy_rules.tools", "tool_not_allowed") == before + 1

    def logged() -> dict | None:  # the access log is the gateway's stdout, JSON lines
        return next((json.loads(line) for line in gateway.process.log().splitlines()
                     if line.startswith("{") and row.request_id in line), None)

    assert wait_until(logged, timeout=5, what="the access log line")["shadow"] == row.shadow
    with pytest.raises(openai.PermissionDeniedError) as exc:  # enforcing groups still refuse
        client.chat.completions.create(**{**CHAT, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://evil.example/a.png"}}]}]},
            tools=[chat_tool("shell.exec")])
    assert openai_error(exc)["code"] == "url_not_allowed"
    refused = ledger_row(gateway, exc.value.response.headers["x-langwatch-request-id"])
    assert refused.code == "url_not_allowed" and "policy_rules.tools" in refused.shadow

    config = gateway.config.read_text()
    try:
        gateway.config.write_text(config.replace("gateway:\n", "gateway:\n  shadow_headers: "
                                                 "true\n", 1))
        gateway.wait_for_config()
        shown = client.chat.completions.with_raw_response.create(
            **CHAT, tools=[chat_tool("shell.exec")])
        assert shown.headers["x-langwatch-shadow"].startswith(
            "policy_rules.tools would refuse 403 tool_not_allowed")
    finally:
        gateway.config.write_text(config)
        gateway.wait_for_config()


def test_shadow_budget_and_rate_limit_count_and_refuse_nothing(gateway, fake_openai):
    """A shadow budget and a shadow rate limit count what they would have counted, in their
    own counters, and a request past them is served with their would-be refusal recorded."""
    key = gateway.create_key("--config-json", json.dumps(
        {"rate_limits": {"rpm": 1, "mode": "shadow"}}))
    budget = json.loads(gateway.cli(
        "gateway-budgets", "create", "--name", "tiny", "--scope", f"VK:{key.id}", "--limit",
        "0.000001", "--mode", "shadow", "--format", "json").stdout)
    gateway.wait_for_config()
    before = shadow_count(gateway, "budget", "budget_exceeded")
    client = oai(gateway, key.secret)
    replies = [client.chat.completions.with_raw_response.create(**CHAT) for _ in range(2)]
    assert [r.http_response.status_code for r in replies] == [200, 200]
    assert all("x-ratelimit-limit-requests" not in r.headers for r in replies)
    assert all("x-langwatch-budget-warning" not in r.headers for r in replies)
    first, second = (ledger_row(gateway, r.headers["x-langwatch-request-id"]) for r in replies)
    assert f"budget {budget['id']} would refuse 402 budget_exceeded" in first.shadow
    assert "rate limit" not in first.shadow  # the first request fits its rpm of 1
    assert f"rate limit virtual key {key.id} rpm would refuse 429 rate_limited: 2 of 1" \
        in second.shadow
    assert shadow_count(gateway, "budget", "budget_exceeded") == before + 2
    status = json.loads(gateway.cli("gateway-budgets", "status", budget["id"], "--format",
                                    "json").stdout)
    assert status["mode"] == "shadow" and status["spent_usd"] > status["limit_usd"]
    promoted = gateway.cli("gateway-budgets", "update", budget["id"], "--mode", "enforce")
    assert 'mode: "shadow" -> "enforce"' in promoted.stderr
    gateway.wait_for_config()
    with pytest.raises(openai.APIStatusError) as exc:
        client.chat.completions.create(**CHAT)
    assert exc.value.status_code == 402
    gateway.cli("gateway-budgets", "delete", budget["id"])


def explained(gateway, key: Key, path: str, body: dict) -> dict:
    out = subprocess.run([str(BIN / "tollgate"), "--config", str(gateway.config), "explain",
                          "--key", key.id, "--path", path, "--format", "json", "-"],
                         input=json.dumps(body), capture_output=True, text=True, timeout=60)
    assert out.returncode in (0, 1), out.stderr
    report = json.loads(out.stdout)
    assert out.returncode == (1 if report["decision"]["action"] == "refuse" else 0)
    return report


def test_explain_decides_as_the_hosts_do(gateway, fake_openai, fake_anthropic):
    """The same requests through `tollgate explain` and through the host: the same verdict,
    code and provider, and explain sends and counts nothing."""
    key = gateway.create_key("--config-json", json.dumps({
        "model_aliases": {"fast": "gpt-5-mini"},
        "policy_rules": {"tools": {"deny": ["^shell\\."], "mode": "shadow"},
                         "urls": {"deny": ["host:evil.example"]},
                         "models": {"deny": ["^o3"]}}}))
    image = [{"type": "image_url", "image_url": {"url": "https://evil.example/a.png"}}]
    cases = [
        ("/v1/chat/completions", {**CHAT, "model": "fast"}),
        ("/v1/chat/completions", {**CHAT, "tools": [chat_tool("shell.exec")]}),
        ("/v1/chat/completions", {**CHAT, "model": "o3"}),
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": image}]}),
        ("/v1/messages", MSG),
        ("/v1/chat/completions", {"model": "gpt-5-mini"}),  # no messages: 400
    ]
    for path, body in cases:
        fake_openai.reset()
        fake_anthropic.reset()
        report = explained(gateway, key, path, body)
        assert fake_openai.requests == [] and fake_anthropic.requests == []  # nothing sent
        r = httpx.post(f"{gateway.url}{path}", json=body,
                       headers={"authorization": f"Bearer {key.secret}",
                                "anthropic-version": "2023-06-01"}, timeout=30)
        decision = report["decision"]
        if r.status_code == 200:
            assert decision["action"] == "forward", (path, body, report)
            assert report["plan"][0]["provider"] == r.headers["x-langwatch-provider"]
        else:
            error = r.json()["error"]
            assert (decision["status"], decision["code"]) == (r.status_code, error["code"])
    shadowed = explained(gateway, key, "/v1/chat/completions",
                         {**CHAT, "tools": [chat_tool("shell.exec")]})
    assert shadowed["shadow"][0].startswith("policy_rules.tools would refuse 403")
    tools = next(g for g in shadowed["policy"] if g["group"] == "policy_rules.tools")
    assert tools["candidates"] == [{"candidate": "shell.exec", "refused_by": "deny ^shell\\."}]
    plan = shadowed["plan"][0]
    assert plan["headers"]["authorization"].startswith("Bearer sk-") and "…" in \
        plan["headers"]["authorization"]  # the provider key, masked
    assert shadowed["worst_case_usd"] > 0
    refused = explained(gateway, key, "/v1/chat/completions", {**CHAT, "model": "o3"})
    assert refused["model"]["resolved"] == "o3"
    assert "deny ^o3" in json.dumps(refused["policy"])


def test_explain_holds_the_web_searches_a_request_allows(gateway):
    """The worst case explain shows counts every search the request allows ($10 per 1,000
    on gpt-5-mini), and the price it shows says so, in JSON and in text."""
    key = gateway.create_key()
    ask = {"model": "gpt-5-mini", "input": "news?", "max_output_tokens": 16,
           "tools": [{"type": "web_search"}]}
    plain = explained(gateway, key, "/v1/responses", ask)
    searching = explained(gateway, key, "/v1/responses", {**ask, "max_tool_calls": 3})
    assert searching["price"]["web_search_usd_per_1k"] == 10.0
    held = searching["worst_case_usd"] - plain["worst_case_usd"]
    assert 0.03 <= held < 0.0301  # three searches, and the few bytes of `max_tool_calls`
    text = subprocess.run([str(BIN / "tollgate"), "--config", str(gateway.config), "explain",
                           "--key", key.id, "--path", "/v1/responses", "-"],
                          input=json.dumps({**ask, "max_tool_calls": 3}), capture_output=True,
                          text=True, timeout=60).stdout
    assert "$10.0/1K web searches" in text and "every search it allows" in text


def test_explain_shows_a_budget_that_refuses(gateway, fake_openai):
    key = gateway.create_key()
    budget = json.loads(gateway.cli(
        "gateway-budgets", "create", "--name", "none-left", "--scope", f"VK:{key.id}",
        "--limit", "0.000001", "--format", "json").stdout)["id"]
    try:
        gateway.wait_for_config()
        report = explained(gateway, key, "/v1/chat/completions", CHAT)
        assert (report["decision"]["status"], report["decision"]["code"]) == \
            (402, "budget_exceeded")
        r = httpx.post(f"{gateway.openai_base}/chat/completions", json=CHAT,
                       headers={"authorization": f"Bearer {key.secret}"})
        assert (r.status_code, r.json()["error"]["code"]) == (402, "budget_exceeded")
        assert budget in report["decision"]["message"] and fake_openai.requests == []
    finally:
        gateway.cli("gateway-budgets", "delete", budget)
