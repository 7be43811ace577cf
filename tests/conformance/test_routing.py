"""Routing policies, translation across API families, fallback and the circuit breaker."""

from __future__ import annotations

import contextlib
import json
import time
from collections import Counter
from itertools import pairwise

import anthropic
import httpx
import openai
import pytest
from ulid import ULID

from tests.conformance.test_metering import ledger_row
from tests.conftest import HOSTS, OPENAI_KEY, Gateway, make_config
from tests.fakes.providers import TEXT, Behaviour
from tests.harness import GatewayProcess, free_port, wait_until

FALLBACK_ALL = '{"fallback": {"on": ["5xx", "timeout", "rate_limit", "network_error"]}}'
TOOL = {"type": "function", "function": {"name": "read_file", "parameters": {
    "type": "object", "properties": {"path": {"type": "string"}}}}}
ANTHROPIC_TOOL = {"name": "read_file", "input_schema": {"type": "object"}}


def provider(gateway, kind: str, url: str, *extra: str) -> str:
    """A provider of its own per test, so one test's failures never trip another's breaker."""
    ident = f"mp_{kind}_{str(ULID()).lower()[-8:]}"
    env = "FAKE_OPENAI_KEY" if kind == "openai" else "FAKE_ANTHROPIC_KEY"
    gateway.cli("model-providers", "create", "--id", ident, "--type", kind, "--scope",
                "ORG:acme", "--base-url", url, "--api-key-env", env, *extra)
    return ident


def policy(gateway, *providers: str, maps: tuple[str, ...] = ()) -> str:
    args = [a for p in providers for a in ("--model-provider", p)]
    args += [a for m in maps for a in ("--model-map", m)]
    out = gateway.cli("routing-policies", "create", "--scope", "ORG:acme", "--name", "p",
                      *args, "--format", "json")
    return json.loads(out.stdout)["id"]


def keyed(gateway, policy_id: str, config_json: str = FALLBACK_ALL):
    return gateway.create_key("--routing-policy", policy_id, "--config-json", config_json)


# A client family's model, and what a provider of the other family serves for it.
MAPPED = {"anthropic": ("gpt-5-mini", "claude-haiku-4-5"),
          "openai": ("claude-haiku-4-5", "gpt-5-mini")}


def translated(gateway, kind: str, url: str):
    """A provider of `kind` serving the other family's model, and a key (no fallback) bound
    to it alone."""
    ident = provider(gateway, kind, url)
    asked, served = MAPPED[kind]
    return ident, keyed(gateway, policy(gateway, ident, maps=(f"{ident}:{asked}={served}",)),
                        "{}")


# -- translation (both hosts) -----------------------------------------------------------

def test_openai_sdk_served_by_anthropic(gateway, fake_anthropic):
    anth, key = translated(gateway, "anthropic", fake_anthropic.url)
    client = openai.OpenAI(base_url=gateway.openai_base, api_key=key.secret, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-5-mini", messages=[{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": "hi"}])
    completion = raw.parse()
    assert completion.choices[0].message.content == TEXT
    assert completion.choices[0].finish_reason == "stop"
    assert raw.headers["x-langwatch-provider"] == anth
    sent = fake_anthropic.requests[-1].json()
    assert sent["model"] == "claude-haiku-4-5" and sent["system"] == "Be brief."
    assert sent["max_tokens"] > 0
    row = ledger_row(gateway, raw.headers["x-langwatch-request-id"])
    assert (row.provider, row.model) == (anth, "claude-haiku-4-5")
    assert row.output_tokens == completion.usage.completion_tokens and row.usage_reported


@pytest.mark.parametrize("stream", [False, True])
def test_tool_calls_survive_openai_to_anthropic(gateway, fake_anthropic, stream):
    _, key = translated(gateway, "anthropic", fake_anthropic.url)
    client = openai.OpenAI(base_url=gateway.openai_base, api_key=key.secret, max_retries=0)
    messages = [{"role": "user", "content": "read it"}]
    if stream:
        chunks = list(client.chat.completions.create(model="gpt-5-mini", messages=messages,
                                                     tools=[TOOL], stream=True))
        calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
        name = next(tc.function.name for tc in calls if tc.function.name)
        args = "".join(tc.function.arguments or "" for tc in calls)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        assert all(c.usage is None for c in chunks)  # the client did not ask for usage
    else:
        message = client.chat.completions.create(model="gpt-5-mini", messages=messages,
                                                 tools=[TOOL]).choices[0]
        name = message.message.tool_calls[0].function.name
        args, finish = message.message.tool_calls[0].function.arguments, message.finish_reason
    assert name == "read_file" and json.loads(args) == {"path": "/tmp/x"}
    assert finish == "tool_calls"
    assert fake_anthropic.requests[-1].json()["tools"][0]["name"] == "read_file"


@pytest.mark.parametrize("stream", [False, True])
def test_anthropic_sdk_served_by_openai_with_tools(gateway, fake_openai, stream):
    _, key = translated(gateway, "openai", fake_openai.url)
    client = anthropic.Anthropic(base_url=gateway.url, api_key=key.secret, max_retries=0)
    args = {"model": "claude-haiku-4-5", "max_tokens": 64,
            "messages": [{"role": "user", "content": "read it"}], "tools": [ANTHROPIC_TOOL]}
    if stream:
        with client.messages.stream(**args) as s:
            events = list(s)
            message = s.get_final_message()
        # Coding agents read the input from message_start: an estimate, before the
        # provider's exact count arrives in the final message_delta.
        start = events[0]
        assert start.type == "message_start" and start.message.usage.input_tokens > 0
        assert start.message.usage.cache_read_input_tokens == 0
        final = [e for e in events if e.type == "message_delta"][-1]
        assert final.usage.input_tokens > 0 and final.usage.output_tokens > 0
        assert message.usage.input_tokens == final.usage.input_tokens
    else:
        message = client.messages.create(**args)
    block = next(b for b in message.content if b.type == "tool_use")
    assert block.name == "read_file" and block.input == {"path": "/tmp/x"}
    assert message.stop_reason == "tool_use"
    sent = fake_openai.requests[-1].json()
    assert sent["model"] == "gpt-5-mini" and sent["tools"][0]["function"]["name"] == "read_file"
    plain = client.messages.create(model="claude-haiku-4-5", max_tokens=64,
                                   messages=[{"role": "user", "content": "hi"}])
    assert plain.content[0].text == TEXT and plain.usage.output_tokens > 0


def test_weighted_policy_spreads_first_picks(gateway, fake_openai):
    """A weighted policy, bound to an existing key with `virtual-keys update`, spreads the
    first pick over its providers by weight; weight 0 is never picked first."""
    a, b, idle = (provider(gateway, "openai", fake_openai.url) for _ in range(3))
    out = gateway.cli("routing-policies", "create", "--scope", "ORG:acme", "--name", "spread",
                      "--strategy", "weighted", "--model-provider", a, "--model-provider", b,
                      "--model-provider", idle, "--weight", f"{idle}=0", "--format", "json")
    key = gateway.create_key()
    gateway.cli("virtual-keys", "update", key.id, "--routing-policy",
                json.loads(out.stdout)["id"])
    body = {"model": "gpt-5-mini", "messages": [{"role": "user", "content": "x"}]}
    headers = {"authorization": f"Bearer {key.secret}"}

    def served_by() -> str:
        r = client.post(f"{gateway.openai_base}/chat/completions", json=body, headers=headers)
        assert r.status_code == 200
        return r.headers["x-langwatch-provider"]

    # One client for all: each of httpx's module-level calls builds its own TLS context.
    with httpx.Client() as client:
        wait_until(lambda: served_by() != "mp_openai", what="the key's new routing policy")
        picks = Counter(served_by() for _ in range(40))
    assert set(picks) == {a, b} and min(picks.values()) >= 5  # 1:1, idle never first


def test_translated_stream_arrives_event_by_event(gateway, fake_anthropic):
    """An OpenAI stream served by Anthropic is translated as it flows, never held back."""
    _, key = translated(gateway, "anthropic", fake_anthropic.url)
    client = openai.OpenAI(base_url=gateway.openai_base, api_key=key.secret, max_retries=0)
    fake_anthropic.chunk_delay = 0.12
    arrivals, text = [], ""
    try:
        for chunk in client.chat.completions.create(
                model="gpt-5-mini", messages=[{"role": "user", "content": "hi"}], stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                arrivals.append(time.monotonic())
                text += chunk.choices[0].delta.content
    finally:
        fake_anthropic.chunk_delay = 0.0
    assert text == TEXT
    gaps = [b - a for a, b in pairwise(arrivals)]
    assert len(arrivals) >= 5 and sum(g > 0.06 for g in gaps) >= len(gaps) - 1


@pytest.mark.parametrize("served_by", ["anthropic", "openai"])
def test_a_translated_stream_the_provider_sized_reaches_the_client_whole(
        gateway, fake_openai, fake_anthropic, served_by):
    """A provider (or a proxy in front of it that buffers) may declare its stream's length:
    the translated stream has another, so the client is told none (or its own), and reads
    the stream to its end rather than waiting for bytes that never come."""
    fake = fake_anthropic if served_by == "anthropic" else fake_openai
    _, key = translated(gateway, served_by, fake.url)
    fake.sized_stream = True
    if served_by == "anthropic":  # an OpenAI client
        path, headers = "/v1/chat/completions", {"authorization": f"Bearer {key.secret}"}
        body, last = {"model": "gpt-5-mini"}, b"data: [DONE]"
    else:
        path = "/v1/messages"
        headers = {"x-api-key": key.secret, "anthropic-version": "2023-06-01"}
        body, last = {"model": "claude-haiku-4-5", "max_tokens": 64}, b"event: message_stop"
    with httpx.stream("POST", f"{gateway.url}{path}", headers=headers, timeout=10,
                      json={**body, "stream": True,
                            "messages": [{"role": "user", "content": "hi"}]}) as r:
        assert r.status_code == 200
        got = b"".join(r.iter_raw())
        assert r.headers.get("content-length") in (None, str(len(got)))
    assert last in got
    row = ledger_row(gateway, r.headers["x-langwatch-request-id"])
    assert row.usage_reported and row.outcome == "completed"


@pytest.mark.parametrize("sdk", ["openai", "anthropic"])
def test_provider_errors_reach_the_client_in_its_own_shape(gateway, fake_openai,
                                                           fake_anthropic, sdk):
    """A provider of the other family refuses (429, no fallback): the client's own SDK
    raises its own error class, with the provider's message."""
    if sdk == "openai":
        _, key = translated(gateway, "anthropic", fake_anthropic.url)
        fake_anthropic.enqueue(Behaviour("fail", status=429))
        with pytest.raises(openai.RateLimitError) as exc:
            openai.OpenAI(base_url=gateway.openai_base, api_key=key.secret,
                          max_retries=0).chat.completions.create(
                model="gpt-5-mini", messages=[{"role": "user", "content": "x"}])
        assert exc.value.body["message"] == "Overloaded"
    else:
        _, key = translated(gateway, "openai", fake_openai.url)
        fake_openai.enqueue(Behaviour("fail", status=429))
        with pytest.raises(anthropic.RateLimitError) as exc:
            anthropic.Anthropic(base_url=gateway.url, api_key=key.secret,
                                max_retries=0).messages.create(
                model="claude-haiku-4-5", max_tokens=16,
                messages=[{"role": "user", "content": "x"}])
        assert exc.value.body["error"]["message"] == "The server is overloaded."
    assert exc.value.status_code == 429


# -- fallback: the mitmproxy addon re-dispatches failed attempts itself; Envoy retries along
# an aggregate cluster, with the attempt filter preparing each attempt.

def fallback_pair(gateway, fake_openai, fake_anthropic, primary_url: str | None = None,
                  *primary_extra: str) -> tuple[str, str, str]:
    primary = provider(gateway, "openai", primary_url or fake_openai.url, *primary_extra)
    backup = provider(gateway, "anthropic", fake_anthropic.url)
    return primary, backup, policy(gateway, primary, backup,
                                   maps=(f"{backup}:gpt-5-mini=claude-haiku-4-5",))


FAILURES = ["503", "429", "hang", "refused"]


def failing_primary(gateway, kind: str, fake, failure: str) -> str:
    """A primary provider of `kind` that fails the next request the way `failure` says."""
    if failure == "refused":
        return provider(gateway, kind, f"http://127.0.0.1:{free_port()}")
    if failure == "hang":
        fake.enqueue(Behaviour("hang", seconds=5))
    else:
        fake.enqueue(Behaviour("fail", status=int(failure)))
    return provider(gateway, kind, fake.url, "--first-byte-timeout", "1")


def ask_openai(gateway, key, stream: bool) -> tuple[httpx.Headers, str]:
    client = openai.OpenAI(base_url=gateway.openai_base, api_key=key.secret, max_retries=0)
    messages = [{"role": "user", "content": "hi"}]
    if stream:
        with client.chat.completions.with_streaming_response.create(
                model="gpt-5-mini", messages=messages, stream=True) as response:
            text = "".join(c.choices[0].delta.content or "" for c in response.parse()
                           if c.choices)
            return response.headers, text
    raw = client.chat.completions.with_raw_response.create(model="gpt-5-mini",
                                                           messages=messages)
    return raw.headers, raw.parse().choices[0].message.content or ""


def ask_anthropic(gateway, key, stream: bool) -> tuple[httpx.Headers, str]:
    client = anthropic.Anthropic(base_url=gateway.url, api_key=key.secret, max_retries=0)
    args = {"model": "claude-haiku-4-5", "max_tokens": 64,
            "messages": [{"role": "user", "content": "hi"}]}
    if stream:
        with client.messages.with_streaming_response.create(**args, stream=True) as response:
            text = "".join(e.delta.text for e in response.parse()
                           if e.type == "content_block_delta" and e.delta.type == "text_delta")
            return response.headers, text
    raw = client.messages.with_raw_response.create(**args)
    return raw.headers, raw.parse().content[0].text


# sdk -> (primary family, backup family, model asked for, model the backup serves, client)
DIRECTIONS = {
    "openai-sdk": ("openai", "anthropic", "gpt-5-mini", "claude-haiku-4-5", ask_openai),
    "anthropic-sdk": ("anthropic", "openai", "claude-haiku-4-5", "gpt-5-mini", ask_anthropic),
}
# What only the primary's family gets: its credential header.
PRIMARY_ONLY = {"openai": ["authorization"], "anthropic": ["x-api-key", "anthropic-version"]}


@pytest.mark.parametrize("failure", FAILURES)
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("sdk", DIRECTIONS)
def test_sdk_falls_back_to_the_other_family(gateway, fake_openai, fake_anthropic, sdk,
                                            failure, stream):
    """The primary fails (503, 429, hangs past its first byte timeout, refuses connections)
    and the client still gets a normal answer in its own API shape from the other family."""
    fakes = {"openai": fake_openai, "anthropic": fake_anthropic}
    first, second, asked, served, ask = DIRECTIONS[sdk]
    primary = failing_primary(gateway, first, fakes[first], failure)
    backup = provider(gateway, second, fakes[second].url)
    key = keyed(gateway, policy(gateway, primary, backup, maps=(f"{backup}:{asked}={served}",)))
    headers, text = ask(gateway, key, stream)
    assert text == TEXT
    assert headers["x-langwatch-fallback-count"] == "1"
    assert headers["x-langwatch-provider"] == backup
    [sent] = fakes[second].requests
    assert sent.json()["model"] == served
    assert not set(PRIMARY_ONLY[first]) & set(sent.headers)
    row = ledger_row(gateway, headers["x-langwatch-request-id"])
    assert (row.provider, row.model, row.fallback_count) == (backup, served, 1)
    assert row.status == 200 and row.output_tokens > 0 and row.usage_reported


# A chat completion laid out as no JSON library would write it (two spaces after a comma).
AS_SENT = b'{"model": "gpt-5-mini",  "messages": [{"role": "user", "content": "x"}]}'


def chat_as_sent(gateway, key) -> httpx.Response:
    """AS_SENT, sent to the gateway's OpenAI route with `key`."""
    return httpx.post(f"{gateway.openai_base}/chat/completions", content=AS_SENT,
                      headers={"authorization": f"Bearer {key.secret}",
                               "content-type": "application/json"})


def test_same_family_fallback_keeps_the_clients_bytes(gateway, fake_openai, fake_anthropic):
    """Two OpenAI providers: the backup gets the client's body byte for byte and its own
    credential, never the primary's."""
    primary = provider(gateway, "openai", fake_openai.url)
    backup = provider(gateway, "openai", fake_openai.url)
    key = keyed(gateway, policy(gateway, primary, backup))
    fake_openai.enqueue(Behaviour("fail", status=500))
    r = chat_as_sent(gateway, key)
    assert r.status_code == 200 and r.headers["x-langwatch-provider"] == backup
    assert [q.body for q in fake_openai.requests] == [AS_SENT, AS_SENT]
    assert all(q.headers["authorization"] == f"Bearer {OPENAI_KEY}"
               for q in fake_openai.requests)


def test_a_backup_gets_the_clients_bytes_after_a_primary_that_translated_them(
        gateway, fake_openai, fake_anthropic):
    """The primary is of the other family (it gets the client's body translated) and fails;
    the backup, of the client's family, gets the client's body byte for byte, and its
    length (on Envoy the first attempt's body is the one Envoy keeps for the retry)."""
    primary = provider(gateway, "anthropic", fake_anthropic.url)
    backup = provider(gateway, "openai", fake_openai.url)
    key = keyed(gateway, policy(gateway, primary, backup,
                                maps=(f"{primary}:gpt-5-mini=claude-haiku-4-5",)))
    fake_anthropic.enqueue(Behaviour("fail", status=500))
    r = chat_as_sent(gateway, key)
    assert r.status_code == 200 and r.headers["x-langwatch-provider"] == backup
    assert [q.json()["model"] for q in fake_anthropic.requests] == ["claude-haiku-4-5"]
    [sent] = fake_openai.requests
    assert sent.body == AS_SENT and sent.headers["content-length"] == str(len(AS_SENT))
    row = ledger_row(gateway, r.headers["x-langwatch-request-id"])
    assert (row.provider, row.fallbacks) == (backup, f"{primary}:5xx")


def test_a_fallen_back_stream_arrives_chunk_by_chunk(gateway, fake_openai, fake_anthropic):
    """The answer of a provider reached by fallback streams to the client as it comes: 11
    chunks 150 ms apart would arrive together at the end if the gateway held the answer."""
    primary = provider(gateway, "openai", fake_openai.url)
    backup = provider(gateway, "openai", fake_openai.url)
    key = keyed(gateway, policy(gateway, primary, backup))
    fake_openai.enqueue(Behaviour("fail", status=503))
    fake_openai.chunk_delay = 0.15
    client = openai.OpenAI(base_url=gateway.openai_base, api_key=key.secret, max_retries=0)
    arrivals, text = [], ""
    with client.chat.completions.with_streaming_response.create(
            model="gpt-5-mini", messages=[{"role": "user", "content": "hi"}],
            stream=True) as response:
        assert response.headers["x-langwatch-provider"] == backup
        for chunk in response.parse():
            arrivals.append(time.monotonic())
            text += "".join(c.delta.content or "" for c in chunk.choices)
    assert text == TEXT and len(fake_openai.requests) == 2
    gaps = [b - a for a, b in pairwise(arrivals)]
    assert len(arrivals) >= 10 and sum(g > 0.08 for g in gaps) >= len(gaps) - 2
    row = ledger_row(gateway, response.headers["x-langwatch-request-id"])
    assert (row.provider, row.fallback_count, row.outcome) == (backup, 1, "completed")
    assert row.usage_reported and row.output_tokens > 0


def test_long_stream_outlives_the_first_byte_timeout(gateway, fake_openai, fake_anthropic):
    """The first byte timeout ends waiting for a response, never a response under way."""
    primary, _, rp = fallback_pair(gateway, fake_openai, fake_anthropic, None,
                                   "--first-byte-timeout", "1")
    key = keyed(gateway, rp)
    fake_openai.chunk_delay = 0.15  # the stream runs well past one second
    try:
        headers, text = ask_openai(gateway, key, stream=True)
    finally:
        fake_openai.chunk_delay = 0.0
    assert text == TEXT and headers["x-langwatch-provider"] == primary
    assert headers["x-langwatch-fallback-count"] == "0" and fake_anthropic.requests == []
    row = ledger_row(gateway, headers["x-langwatch-request-id"])
    assert row.outcome == "completed" and row.output_tokens > 0


def test_no_fallback_once_the_answer_has_started(gateway, fake_openai, fake_anthropic):
    """A stream that breaks off after it began is not retried elsewhere; what it streamed is
    charged to the provider that streamed it."""
    primary, _, rp = fallback_pair(gateway, fake_openai, fake_anthropic)
    key = keyed(gateway, rp)
    fake_openai.enqueue(Behaviour("cut", after_events=3))
    fake_openai.chunk_delay = 0.1  # the answer is under way before it breaks off
    body = {"model": "gpt-5-mini", "stream": True,
            "messages": [{"role": "user", "content": "x"}]}
    received = b""
    try:
        with httpx.stream("POST", f"{gateway.openai_base}/chat/completions", json=body,
                          headers={"authorization": f"Bearer {key.secret}"}) as r:
            request_id = r.headers["x-langwatch-request-id"]
            with contextlib.suppress(httpx.TransportError):
                for chunk in r.iter_raw():
                    received += chunk
    finally:
        fake_openai.chunk_delay = 0.0
    assert b"[DONE]" not in received
    assert fake_anthropic.requests == [] and len(fake_openai.requests) == 1
    row = ledger_row(gateway, request_id)
    assert (row.provider, row.fallback_count) == (primary, 0)
    assert row.outcome != "completed" and row.output_tokens > 0


def test_without_fallback_a_slow_first_byte_is_waited_for(gateway, fake_openai):
    """The first byte timeout is a fallback condition: a key without fallback waits for a
    slow provider (a long reasoning call) rather than failing it."""
    slow = provider(gateway, "openai", fake_openai.url, "--first-byte-timeout", "0.5")
    key = keyed(gateway, policy(gateway, slow), "{}")
    fake_openai.response_delay = 1.5
    try:
        headers, text = ask_openai(gateway, key, stream=False)
    finally:
        fake_openai.response_delay = 0.0
    assert text == TEXT and headers["x-langwatch-provider"] == slow


def test_clients_cannot_steer_envoys_retries(gateway, fake_openai, fake_anthropic):
    """Router controls a client sends are dropped: no fallback the key does not allow."""
    _, _, rp = fallback_pair(gateway, fake_openai, fake_anthropic)
    key = keyed(gateway, rp, "{}")
    fake_openai.enqueue(Behaviour("fail", status=503))
    r = httpx.post(f"{gateway.openai_base}/chat/completions",
                   json={"model": "gpt-5-mini", "messages": [{"role": "user", "content": "x"}]},
                   headers={"authorization": f"Bearer {key.secret}",
                            "x-envoy-retry-on": "5xx,retriable-status-codes",
                            "x-envoy-retriable-status-codes": "503",
                            "x-envoy-max-retries": "3"})
    assert r.status_code == 503 and r.headers["x-langwatch-fallback-count"] == "0"
    assert len(fake_openai.requests) == 1 and fake_anthropic.requests == []


def test_no_fallback_without_5xx_in_the_keys_conditions(gateway, fake_openai, fake_anthropic):
    _, _, rp = fallback_pair(gateway, fake_openai, fake_anthropic)
    key = keyed(gateway, rp, '{"fallback": {"on": ["timeout", "network_error"]}}')
    body = b'{"error": {"message": "upstream down", "type": "server_error"}}'
    fake_openai.enqueue(Behaviour("fail", status=503, body=body))
    with pytest.raises(openai.InternalServerError) as exc:
        openai.OpenAI(base_url=gateway.openai_base, api_key=key.secret,
                      max_retries=0).chat.completions.create(
            model="gpt-5-mini", messages=[{"role": "user", "content": "x"}])
    assert exc.value.status_code == 503 and exc.value.response.content == body
    assert fake_anthropic.requests == []


def test_circuit_breaker_skips_a_failing_primary(gateway, fake_openai, fake_anthropic):
    _, backup, rp = fallback_pair(gateway, fake_openai, fake_anthropic)
    key = keyed(gateway, rp)
    url = f"{gateway.openai_base}/chat/completions"
    body = {"model": "gpt-5-mini", "messages": [{"role": "user", "content": "x"}]}
    headers = {"authorization": f"Bearer {key.secret}"}
    for _ in range(3):  # the default breaker opens after three failures in a row
        fake_openai.enqueue(Behaviour("fail", status=503))
        assert httpx.post(url, json=body, headers=headers).headers[
            "x-langwatch-fallback-count"] == "1"
    fake_openai.reset()
    r = httpx.post(url, json=body, headers=headers)
    assert r.status_code == 200 and r.headers["x-langwatch-provider"] == backup
    assert r.headers["x-langwatch-fallback-count"] == "0"  # went straight to the backup
    assert fake_openai.requests == []  # back after the cool-down: the test below


@pytest.mark.parametrize("host", HOSTS)
def test_circuit_breaker_sends_traffic_back_after_the_cooldown(host, tmp_path, fake_openai,
                                                               fake_anthropic):
    """Both hosts pass over a provider whose circuit is open and return to it after the
    cool-down."""
    config = make_config(tmp_path, fake_openai, fake_anthropic)
    config.write_text(config.read_text().replace(
        "max_body_bytes:", "circuit_breaker: {failures: 2, cooldown_seconds: 1.5}\n"
                           "  max_body_bytes:"))
    gw = GatewayProcess(host, config, tmp_path).start()
    try:
        cfg = Gateway(host, gw, config)
        primary, backup, rp = fallback_pair(cfg, fake_openai, fake_anthropic)
        key = keyed(cfg, rp)
        url = f"{gw.url}/v1/chat/completions"
        body = {"model": "gpt-5-mini", "messages": [{"role": "user", "content": "x"}]}
        headers = {"authorization": f"Bearer {key.secret}"}

        def provider_of() -> str:
            r = httpx.post(url, json=body, headers=headers)
            assert r.status_code == 200
            return r.headers["x-langwatch-provider"]

        for _ in range(2):
            fake_openai.enqueue(Behaviour("fail", status=503))
            assert provider_of() == backup
        assert provider_of() == backup  # open: the primary is not even tried
        assert len(fake_openai.requests) == 2
        time.sleep(1.6)
        assert provider_of() == primary  # cooled down: the primary is back first
    finally:
        gw.stop()


def test_a_fallback_attempt_is_admitted_like_the_first(gateway, fake_openai, fake_anthropic):
    """Provider A always fails (503), provider B takes one request a minute: each attempt
    reserves its own provider's limits before it is sent, so of five requests exactly one is
    served by B, and a budget scoped to B is charged B's cost (and A's nothing)."""
    from tests.fakes.providers import FakeProvider

    failing = FakeProvider("openai", OPENAI_KEY).start()
    try:
        for _ in range(5):
            failing.enqueue(Behaviour("fail", status=503))
        a, b, pol = fallback_pair(gateway, fake_openai, fake_anthropic, failing.url)
        gateway.cli("model-providers", "update", b, "--rpm", "1")
        key = keyed(gateway, pol, '{"fallback": {"on": ["5xx", "rate_limit"]}}')
        on_b = json.loads(gateway.cli(
            "gateway-budgets", "create", "--name", "b-only", "--scope", "vk", "--vk", key.id,
            "--model-provider", b, "--limit", "10", "--format", "json").stdout)["id"]
        on_a = json.loads(gateway.cli(
            "gateway-budgets", "create", "--name", "a-only", "--scope", "vk", "--vk", key.id,
            "--model-provider", a, "--limit", "10", "--format", "json").stdout)["id"]
        gateway.wait_for_config()
        answers = [httpx.post(f"{gateway.openai_base}/chat/completions", timeout=30,
                              json={"model": "gpt-5-mini", "max_completion_tokens": 50,
                                    "messages": [{"role": "user", "content": "hi"}]},
                              headers={"authorization": f"Bearer {key.secret}"})
                   for _ in range(5)]
        served = [r for r in answers if r.status_code == 200]
        assert [r.headers["x-langwatch-provider"] for r in served] == [b]
        assert len(fake_anthropic.requests) == 1  # B was sent one request, no more
        assert {r.status_code for r in answers if r.status_code != 200} == {503}
        row = ledger_row(gateway, served[0].headers["x-langwatch-request-id"])
        assert row.provider == b and row.cost_micros > 0
        # Every request settled (its row and the release of what it held on A are one
        # transaction): the Envoy host's access log may bring the last ends a batch later.
        for r in answers:
            ledger_row(gateway, r.headers["x-langwatch-request-id"])

        def spent(budget: str) -> float:
            return json.loads(gateway.cli("gateway-budgets", "status", budget, "--format",
                                          "json").stdout)

        wait_until(lambda: spent(on_b)["spent_usd"] == row.cost_micros / 1_000_000,
                   timeout=5, what="B's cost in the budget scoped to B")
        assert (spent(on_a)["spent_usd"], spent(on_a)["reserved_usd"]) == (0, 0)
        assert spent(on_b)["reserved_usd"] == 0
        refused = [ledger_row(gateway, r.headers["x-langwatch-request-id"])
                   for r in answers if r.status_code != 200]
        # Passed over at its cap, as a fallback (left out of the plan) or, once A's circuit
        # opened and B came first, as the first pick.
        assert all(f"{b}:not admitted (rpm 1)" in (x.skipped or "")
                   or f"{b}:rate_limit (rpm 1)" in (x.fallbacks or "") for x in refused), \
            [(x.skipped, x.fallbacks) for x in refused]
    finally:
        failing.stop()


def test_a_translated_answer_that_is_not_json_is_a_502_with_its_row(gateway, fake_anthropic):
    """The provider answers 200 with a body that is not JSON, on a route the gateway
    translates: the client gets a 502 in its own family (not the broken body with a 200),
    the ledger row says why, and nothing stays held."""
    _, key = translated(gateway, "anthropic", fake_anthropic.url)
    budget = json.loads(gateway.cli(
        "gateway-budgets", "create", "--name", "held", "--scope", "vk", "--vk", key.id,
        "--limit", "10", "--format", "json").stdout)["id"]
    gateway.wait_for_config()
    fake_anthropic.enqueue(Behaviour("fail", status=200, body=b'{"id": "msg_1", "content": ['))
    r = httpx.post(f"{gateway.openai_base}/chat/completions", timeout=30,
                   json={"model": "gpt-5-mini", "max_completion_tokens": 20,
                         "messages": [{"role": "user", "content": "hi"}]},
                   headers={"authorization": f"Bearer {key.secret}"})
    assert r.status_code == 502, r.text[:300]
    assert r.json()["error"]["code"] == "provider_invalid_response"
    row = ledger_row(gateway, r.headers["x-langwatch-request-id"])
    assert (row.status, row.code, row.outcome) == (502, "provider_invalid_response", "error")
    status = json.loads(gateway.cli("gateway-budgets", "status", budget, "--format",
                                    "json").stdout)
    assert status["reserved_usd"] == 0
    ok = httpx.post(f"{gateway.openai_base}/chat/completions", timeout=30,
                    json={"model": "gpt-5-mini", "max_completion_tokens": 20,
                          "messages": [{"role": "user", "content": "hi"}]},
                    headers={"authorization": f"Bearer {key.secret}"})
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == TEXT
