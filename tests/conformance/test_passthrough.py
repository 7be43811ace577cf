"""Calls through the gateway with the official SDKs: bodies, keys, streams and headers.

Every case runs against each host in `HOSTS` (see tests/conftest.py).
"""

from __future__ import annotations

import json
import time
from itertools import pairwise

import anthropic
import httpx
import openai
import pytest

from tests.conformance.test_metering import ledger_row
from tests.conftest import ANTHROPIC_KEY, OPENAI_KEY
from tests.fakes.providers import TEXT, Behaviour
from tests.harness import wait_until

PREFIX = "x-langwatch-"
GATEWAY_HEADERS = ["request-id", "trace-id", "span-id", "fallback-count", "provider"]


def capture_client(sdk, sent: list[bytes]):
    """The SDK's own HTTP client class, recording the exact body bytes the SDK sends."""
    def hook(request) -> None:
        sent.append(request.read())

    return sdk.DefaultHttpxClient(event_hooks={"request": [hook]})


def oai(gateway, key, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.openai_base, api_key=key.secret, max_retries=0, **kw)


def ant(gateway, key, **kw) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gateway.url, api_key=key.secret, max_retries=0, **kw)


def assert_gateway_headers(headers, provider: str) -> None:
    for name in GATEWAY_HEADERS:
        assert headers.get(PREFIX + name), f"missing {PREFIX}{name}"
    assert headers[PREFIX + "provider"] == provider
    assert headers[PREFIX + "fallback-count"] == "0"
    assert len(headers[PREFIX + "trace-id"]) == 32
    assert len(headers[PREFIX + "span-id"]) == 16


def test_openai_chat_json_reaches_provider_byte_for_byte(gateway, fake_openai):
    key = gateway.create_key()
    sent: list[bytes] = []
    client = oai(gateway, key, http_client=capture_client(openai, sent))
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-5-mini", messages=[{"role": "user", "content": "ping"}], max_tokens=4)
    completion = raw.parse()
    assert completion.choices[0].message.content == TEXT
    assert completion.usage.total_tokens > 0
    assert_gateway_headers(raw.headers, "mp_openai")

    seen = fake_openai.requests[-1]
    assert seen.body == sent[-1]
    assert seen.path == "/v1/chat/completions"
    assert seen.headers["authorization"] == f"Bearer {OPENAI_KEY}"
    assert key.secret not in json.dumps(seen.headers)
    assert "x-api-key" not in seen.headers


def test_openai_chat_stream_arrives_chunk_by_chunk(gateway, fake_openai):
    key = gateway.create_key()
    fake_openai.chunk_delay = 0.15
    client = oai(gateway, key)
    arrivals, text = [], ""
    stream = client.chat.completions.create(
        model="gpt-5-mini", messages=[{"role": "user", "content": "ping"}], stream=True)
    for chunk in stream:
        arrivals.append(time.monotonic())
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
    assert text == TEXT
    # 11 content chunks 150 ms apart: buffering would deliver them all at once at the end.
    assert len(arrivals) >= 10
    gaps = [b - a for a, b in pairwise(arrivals)]
    assert sum(g > 0.08 for g in gaps) >= len(gaps) - 2
    assert arrivals[-1] - arrivals[0] > 1.0


def test_anthropic_messages_json_and_provider_key(gateway, fake_anthropic):
    key = gateway.create_key()
    sent: list[bytes] = []
    client = ant(gateway, key, http_client=capture_client(anthropic, sent))
    raw = client.messages.with_raw_response.create(
        model="claude-haiku-4-5", max_tokens=64, messages=[{"role": "user", "content": "hi"}])
    message = raw.parse()
    assert message.content[0].text == TEXT
    assert message.usage.output_tokens > 0
    assert_gateway_headers(raw.headers, "mp_anthropic")

    seen = fake_anthropic.requests[-1]
    assert seen.body == sent[-1]
    assert seen.headers["x-api-key"] == ANTHROPIC_KEY
    assert "authorization" not in seen.headers
    assert seen.headers["anthropic-version"]  # the SDK's own version passes through
    assert key.secret not in json.dumps(seen.headers)


def test_anthropic_key_as_bearer_is_accepted(gateway, fake_anthropic):
    key = gateway.create_key()
    client = anthropic.Anthropic(base_url=gateway.url, auth_token=key.secret, max_retries=0)
    message = client.messages.create(model="claude-haiku-4-5", max_tokens=16,
                                     messages=[{"role": "user", "content": "hi"}])
    assert message.content[0].text == TEXT
    seen = fake_anthropic.requests[-1]
    assert seen.headers["x-api-key"] == ANTHROPIC_KEY
    assert "authorization" not in seen.headers


def test_anthropic_stream_arrives_chunk_by_chunk(gateway, fake_anthropic):
    key = gateway.create_key()
    fake_anthropic.chunk_delay = 0.15
    client = ant(gateway, key)
    arrivals, text = [], ""
    with client.messages.with_streaming_response.create(
            model="claude-haiku-4-5", max_tokens=64, stream=True,
            messages=[{"role": "user", "content": "hi"}]) as response:
        for event in response.parse():
            if event.type == "content_block_delta" and event.delta.type == "text_delta":
                arrivals.append(time.monotonic())
                text += event.delta.text
            if event.type == "message_delta":
                output_tokens = event.usage.output_tokens
        request_id = response.headers["x-langwatch-request-id"]
    assert text == TEXT
    assert output_tokens > 0
    # Recorded as completed at once, though the host may not see the stream's end itself.
    row = ledger_row(gateway, request_id)
    assert (row.outcome, row.output_tokens) == ("completed", output_tokens)
    assert arrivals[-1] - arrivals[0] > 1.0
    gaps = [b - a for a, b in pairwise(arrivals)]
    assert sum(g > 0.08 for g in gaps) >= len(gaps) - 2


def test_responses_api_json_and_stream(gateway, fake_openai):
    key = gateway.create_key()
    client = oai(gateway, key)
    response = client.responses.create(model="gpt-5", input="hi")
    assert response.output_text == TEXT
    with client.responses.stream(model="gpt-5", input="hi") as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == TEXT
    assert final.usage.output_tokens > 0
    assert fake_openai.requests[-1].path == "/v1/responses"


def test_a_background_response_is_refused_before_the_provider(gateway, fake_openai):
    """A background response is answered `queued` and generated afterwards, for a poll the
    gateway does not serve: its output would be spent past every budget, unmetered."""
    client = oai(gateway, gateway.create_key())
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model="gpt-5", input="a long task", background=True)
    error = refused.value.body
    assert error["code"] == "invalid_request" and error["param"] == "background"
    assert "stream" in error["message"]
    assert fake_openai.requests == []
    assert client.responses.create(model="gpt-5", input="hi", background=False).output_text


def test_embeddings(gateway, fake_openai):
    key = gateway.create_key()
    result = oai(gateway, key).embeddings.create(model="text-embedding-3-small",
                                                  input=["a", "b"])
    assert [d.embedding for d in result.data] == [[0.25, -0.5, 0.125, 1.0]] * 2
    assert fake_openai.requests[-1].path == "/v1/embeddings"


def test_anthropic_count_tokens(gateway, fake_anthropic):
    key = gateway.create_key()
    result = ant(gateway, key).messages.count_tokens(
        model="claude-haiku-4-5", messages=[{"role": "user", "content": "hello"}])
    assert result.input_tokens > 0
    assert fake_anthropic.requests[-1].path.startswith("/v1/messages/count_tokens")


def test_models_list_shows_what_the_key_may_use(gateway):
    key = gateway.create_key("--models-allowed", "gpt-5*", "--config-json",
                             '{"model_aliases": {"fast": "gpt-5-mini"}}')
    ids = {m.id for m in oai(gateway, key).models.list()}
    assert {"gpt-5", "gpt-5-mini", "fast"} <= ids
    assert not any(i.startswith(("claude", "gpt-4")) for i in ids)
    all_ids = {m.id for m in ant(gateway, gateway.create_key()).models.list()}
    assert {"claude-haiku-4-5", "gpt-5"} <= all_ids


def test_provider_errors_reach_the_client_unchanged(gateway, fake_openai, fake_anthropic):
    key = gateway.create_key()
    body = b'{"error": {"message": "upstream says no", "type": "server_error", "code": "x1"}}'
    fake_openai.enqueue(Behaviour("fail", status=503, body=body))
    with pytest.raises(openai.InternalServerError) as exc:
        oai(gateway, key).chat.completions.create(
            model="gpt-5-mini", messages=[{"role": "user", "content": "hi"}])
    assert exc.value.status_code == 503
    assert exc.value.response.content == body
    assert exc.value.response.headers[PREFIX + "provider"] == "mp_openai"

    fake_anthropic.enqueue(Behaviour("fail", status=529))
    with pytest.raises(anthropic.APIStatusError) as aexc:
        ant(gateway, key).messages.create(model="claude-haiku-4-5", max_tokens=8,
                                          messages=[{"role": "user", "content": "hi"}])
    assert aexc.value.status_code == 529
    assert aexc.value.body["error"]["type"] == "overloaded_error"


def test_traceparent_makes_gateway_span_a_child(gateway, fake_openai):
    key = gateway.create_key()
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    r = httpx.post(f"{gateway.openai_base}/chat/completions",
                   headers={"authorization": f"Bearer {key.secret}",
                            "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"},
                   json={"model": "gpt-5-mini", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 200
    assert r.headers[PREFIX + "trace-id"] == trace_id
    upstream = fake_openai.requests[-1].headers["traceparent"]
    assert upstream == f"00-{trace_id}-{r.headers[PREFIX + 'span-id']}-01"


def test_gateway_only_headers_are_stripped(gateway, fake_openai):
    key = gateway.create_key()
    r = httpx.post(f"{gateway.openai_base}/chat/completions",
                   headers={"authorization": f"Bearer {key.secret}", "x-api-key": key.secret,
                            "X-LangWatch-Trace-Hint": "abc", "x-custom-app": "kept"},
                   json={"model": "gpt-5-mini", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 200
    seen = fake_openai.requests[-1].headers
    assert "x-langwatch-trace-hint" not in seen
    assert "x-api-key" not in seen
    assert seen["x-custom-app"] == "kept"
    assert seen["host"] == fake_openai.url.removeprefix("http://")


def access_record(gateway, request_id: str) -> dict:
    """The gateway's access-log record for a request (written when the exchange closes)."""
    def find():
        for line in gateway.process.log().splitlines():
            if request_id in line and '"outcome"' in line:
                return json.loads(line[line.index("{"):])
        return None

    return wait_until(find, timeout=5, what=f"access record for {request_id}")


@pytest.mark.parametrize("stream", [True, False])
def test_tap_sees_every_byte_without_changing_them(gateway, fake_openai, stream):
    key = gateway.create_key()
    fake_openai.chunk_delay = 0.02 if stream else 0
    body = {"model": "gpt-5-mini", "messages": [{"role": "user", "content": "x"}],
            "stream": stream}
    if stream:  # asked for by the client, so the gateway passes the stream through as is
        body["stream_options"] = {"include_usage": True}
    with httpx.stream("POST", f"{gateway.openai_base}/chat/completions", json=body,
                      headers={"authorization": f"Bearer {key.secret}"}) as r:
        received = b"".join(r.iter_raw())
        request_id = r.headers[PREFIX + "request-id"]
    record = access_record(gateway, request_id)
    assert record["bytes_out"] == len(received)
    assert record["outcome"] == "completed" and record["status"] == 200
    if stream:
        assert record["sse_events"] == received.count(b"data: ")
    else:
        assert json.loads(received)["choices"][0]["message"]["content"] == TEXT
        assert r.headers["content-length"] == str(len(received))  # the provider's own


def test_usage_chunk_the_gateway_asked_for_is_cut_cleanly(gateway, fake_openai):
    key = gateway.create_key()
    body = {"model": "gpt-5-mini", "messages": [{"role": "user", "content": "x"}],
            "stream": True}
    with httpx.stream("POST", f"{gateway.openai_base}/chat/completions", json=body,
                      headers={"authorization": f"Bearer {key.secret}"}) as r:
        received = b"".join(r.iter_raw())
        request_id = r.headers[PREFIX + "request-id"]
    assert received.endswith(b"data: [DONE]\n\n")  # the stream goes on after the cut
    assert b'"choices": []' not in received and b'"usage"' not in received
    record = access_record(gateway, request_id)
    assert record["bytes_out"] > len(received)  # the meter saw the usage chunk
    assert record["usage_reported"] is True
