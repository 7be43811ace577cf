"""The fake providers answer the vendors' own clients as the real services do: a fake that
accepted anything would prove nothing about the gateway in front of it."""

from __future__ import annotations

import json

import anthropic
import httpx
import openai
import pytest

from tests.fakes.providers import FakeProvider

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def azure():
    fake = FakeProvider("azure", "azure-key", deployments={"my-dep": "gpt-4o-mini"}).start()
    yield fake
    fake.stop()


def client(fake: FakeProvider, key: str = "azure-key", version: str = "2024-10-21"):
    return openai.AzureOpenAI(azure_endpoint=fake.url, api_key=key, api_version=version,
                              max_retries=0)


def test_the_azure_fake_serves_the_azure_client(azure):
    answer = client(azure).chat.completions.create(model="my-dep", messages=MESSAGES)
    assert answer.model == "gpt-4o-mini" and answer.usage.total_tokens > 0
    sent = azure.requests[-1]
    assert sent.path == "/openai/deployments/my-dep/chat/completions?api-version=2024-10-21"
    assert sent.headers["api-key"] == "azure-key" and "authorization" not in sent.headers
    chunks = list(client(azure).chat.completions.create(
        model="my-dep", messages=MESSAGES, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage.completion_tokens > 0
    vectors = client(azure).embeddings.create(model="my-dep", input=["a", "b"])
    assert len(vectors.data) == 2


def test_the_azure_fake_refuses_what_azure_refuses(azure):
    with pytest.raises(openai.AuthenticationError):
        client(azure, key="wrong").chat.completions.create(model="my-dep", messages=MESSAGES)
    with pytest.raises(openai.NotFoundError):
        client(azure, version="2019-01-01").chat.completions.create(model="my-dep",
                                                                    messages=MESSAGES)
    with pytest.raises(openai.NotFoundError) as missing:
        client(azure).chat.completions.create(model="no-such-dep", messages=MESSAGES)
    assert missing.value.code == "DeploymentNotFound"


CLAUDE_ON_BEDROCK = "anthropic.claude-haiku-4-5-20251001-v1:0"


@pytest.fixture(scope="module")
def bedrock():
    fake = FakeProvider("bedrock", "").start()
    yield fake
    fake.stop()


def bedrock_runtime(fake: FakeProvider, secret: str | None = None):
    import botocore.session

    return botocore.session.get_session().create_client(
        "bedrock-runtime", region_name=fake.aws.region, endpoint_url=fake.url,
        aws_access_key_id=fake.aws.access_key,
        aws_secret_access_key=secret or fake.aws.secret_key)


def test_the_bedrock_fake_serves_botocore_and_checks_its_signature(bedrock):
    import botocore.exceptions

    body = json.dumps({"anthropic_version": "bedrock-2023-05-31", "max_tokens": 30,
                       "messages": MESSAGES})
    client = bedrock_runtime(bedrock)
    answer = json.loads(client.invoke_model(modelId=CLAUDE_ON_BEDROCK, body=body)["body"].read())
    assert answer["type"] == "message" and answer["usage"]["output_tokens"] > 0
    assert bedrock.requests[-1].path == "/model/anthropic.claude-haiku-4-5-20251001-v1%3A0/invoke"
    events = [json.loads(e["chunk"]["bytes"]) for e in
              client.invoke_model_with_response_stream(modelId=CLAUDE_ON_BEDROCK,
                                                       body=body)["body"]]
    assert events[0]["type"] == "message_start" and events[-1]["type"] == "message_stop"
    assert any(e["type"] == "content_block_delta" for e in events)
    with pytest.raises(botocore.exceptions.ClientError) as refused:
        bedrock_runtime(bedrock, secret="wrong" * 8).invoke_model(modelId=CLAUDE_ON_BEDROCK,
                                                                   body=body)
    assert refused.value.response["Error"]["Code"] == "InvalidSignatureException"
    with pytest.raises(botocore.exceptions.ClientError) as invalid:
        client.invoke_model(modelId=CLAUDE_ON_BEDROCK, body=json.dumps(
            {"model": "claude-haiku-4-5", "max_tokens": 5, "messages": MESSAGES}))
    assert invalid.value.response["Error"]["Code"] == "ValidationException"


def test_the_bedrock_fake_serves_the_anthropic_bedrock_client(bedrock):
    claude = anthropic.AnthropicBedrock(
        aws_access_key=bedrock.aws.access_key, aws_secret_key=bedrock.aws.secret_key,
        aws_region=bedrock.aws.region, base_url=bedrock.url, max_retries=0)
    message = claude.messages.create(model=CLAUDE_ON_BEDROCK, max_tokens=30,
                                     messages=MESSAGES)
    assert message.content[0].text.startswith("Hello")
    with claude.messages.stream(model=CLAUDE_ON_BEDROCK, max_tokens=30,
                                messages=MESSAGES) as stream:
        assert "".join(stream.text_stream).startswith("Hello")


@pytest.fixture(scope="module")
def vertex():
    fake = FakeProvider("vertex", "").start()
    yield fake
    fake.stop()


def test_the_vertex_fake_issues_tokens_to_google_auth_and_serves_anthropic_vertex(vertex):
    """google-auth's service-account flow gets a token from the fake's token endpoint (its
    JWT checked against the account's key); AnthropicVertex is served with that token,
    and refused without one."""
    import urllib3
    from google.auth.transport.urllib3 import Request
    from google.oauth2 import service_account

    from tests.fakes.providers import service_account_for

    info = service_account_for(vertex)
    creds = service_account.Credentials.from_service_account_info(
        info, scopes=["https://www.googleapis.com/auth/cloud-platform"])
    creds.refresh(Request(urllib3.PoolManager()))
    assert creds.token in vertex.tokens and creds.valid
    claude = anthropic.AnthropicVertex(region="us-east5", project_id="acme-ml",
                                       access_token=creds.token,
                                       base_url=f"{vertex.url}/v1", max_retries=0)
    message = claude.messages.create(model="claude-haiku-4-5@20251001", max_tokens=30,
                                     messages=MESSAGES)
    assert message.content[0].text.startswith("Hello")
    assert vertex.requests[-1].path == ("/v1/projects/acme-ml/locations/us-east5/publishers/"
                                        "anthropic/models/claude-haiku-4-5@20251001:rawPredict")
    with claude.messages.stream(model="claude-haiku-4-5@20251001", max_tokens=30,
                                messages=MESSAGES) as stream:
        assert "".join(stream.text_stream).startswith("Hello")
    stale = anthropic.AnthropicVertex(region="us-east5", project_id="acme-ml",
                                      access_token="ya29.not-issued",
                                      base_url=f"{vertex.url}/v1", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        stale.messages.create(model="claude-haiku-4-5@20251001", max_tokens=5,
                              messages=MESSAGES)
    vertex.tokens[creds.token] = 0  # expired: refused as well
    with pytest.raises(anthropic.AuthenticationError):
        claude.messages.create(model="claude-haiku-4-5@20251001", max_tokens=5,
                               messages=MESSAGES)
    forged = dict(info, private_key=service_account_for(FakeProvider("vertex", ""))
                  ["private_key"])
    import google.auth.exceptions

    with pytest.raises(google.auth.exceptions.RefreshError):
        service_account.Credentials.from_service_account_info(
            forged, scopes=["https://www.googleapis.com/auth/cloud-platform"]).refresh(
                Request(urllib3.PoolManager()))


def test_the_bedrock_fake_serves_converse_to_botocore(bedrock):
    client = bedrock_runtime(bedrock)
    nova = "amazon.nova-lite-v1:0"
    answer = client.converse(modelId=nova, messages=[
        {"role": "user", "content": [{"text": "hi"}]}], inferenceConfig={"maxTokens": 20})
    assert answer["output"]["message"]["content"][0]["text"].startswith("Hello")
    assert answer["usage"]["outputTokens"] > 0 and answer["stopReason"] == "end_turn"
    streamed = list(client.converse_stream(modelId=nova, messages=[
        {"role": "user", "content": [{"text": "hi"}]}])["stream"])
    kinds = [next(iter(e)) for e in streamed]
    assert kinds[0] == "messageStart" and kinds[-2:] == ["messageStop", "metadata"]
    assert "".join(e["contentBlockDelta"]["delta"]["text"] for e in streamed
                   if "contentBlockDelta" in e).startswith("Hello")
    # What botocore would not send (it validates first), signed and sent by hand: a field
    # Converse does not take.
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    url = f"{bedrock.url}/model/amazon.nova-lite-v1%3A0/converse"
    body = json.dumps({"model": nova, "messages": [{"role": "user",
                                                    "content": [{"text": "hi"}]}]})
    signed = AWSRequest(method="POST", url=url, data=body,
                        headers={"content-type": "application/json"})
    SigV4Auth(Credentials(bedrock.aws.access_key, bedrock.aws.secret_key), "bedrock",
              bedrock.aws.region).add_auth(signed)
    refused = httpx.post(url, content=body, headers=dict(signed.headers))
    assert refused.status_code == 400
    assert refused.headers["x-amzn-errortype"].startswith("ValidationException")


def test_the_bedrock_fake_names_its_service_tier_as_botocore_reads_it(bedrock):
    """InvokeModel in a header, Converse in its body and ConverseStream's metadata event:
    what botocore parses into `serviceTier`."""
    client = bedrock_runtime(bedrock)
    body = json.dumps({"anthropic_version": "bedrock-2023-05-31", "max_tokens": 30,
                       "messages": MESSAGES})
    assert client.invoke_model(modelId=CLAUDE_ON_BEDROCK, body=body)["serviceTier"] == \
        "default"
    assert client.invoke_model(modelId=CLAUDE_ON_BEDROCK, body=body,
                               serviceTier="priority")["serviceTier"] == "priority"
    messages = [{"role": "user", "content": [{"text": "hi"}]}]
    nova = "amazon.nova-lite-v1:0"
    assert client.converse(modelId=nova, messages=messages, serviceTier={"type": "flex"}
                           )["serviceTier"] == {"type": "flex"}
    bedrock.default_tier = "priority"
    try:
        streamed = list(client.converse_stream(modelId=nova, messages=messages)["stream"])
        assert streamed[-1]["metadata"]["serviceTier"] == {"type": "priority"}
    finally:
        bedrock.default_tier = None


def test_the_openai_fake_runs_responses_web_searches_as_the_sdk_reads_them(fake_openai):
    """A Responses web search tool: a `web_search_call` item per search (`max_tool_calls`
    of them) before the message, in JSON and in a stream, each search's events included."""
    client = openai.OpenAI(base_url=f"{fake_openai.url}/v1", api_key=fake_openai.api_key)
    ask = {"model": "gpt-5-mini", "input": "news?", "tools": [{"type": "web_search"}],
           "max_tool_calls": 2}
    answer = client.responses.create(**ask)
    with client.responses.stream(**ask) as stream:
        kinds = [event.type for event in stream]
        streamed = stream.get_final_response()
    for got in (answer, streamed):
        assert [o.type for o in got.output] == ["web_search_call"] * 2 + ["message"]
        assert got.output[0].action.query and got.output_text
    assert kinds.count("response.web_search_call.completed") == 2


def test_the_anthropic_fake_runs_web_searches_as_the_sdk_reads_them(fake_anthropic):
    """A web search tool: the searches and what they found come before the answer, in JSON
    and in a stream, and usage counts them (`server_tool_use`)."""
    claude = anthropic.Anthropic(base_url=fake_anthropic.url, api_key=fake_anthropic.api_key,
                                 default_headers={"x-api-key": fake_anthropic.api_key})
    ask = {"model": "claude-haiku-4-5", "max_tokens": 50,
           "messages": [{"role": "user", "content": "news?"}],
           "tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 2}]}
    message = claude.messages.create(**ask)
    with claude.messages.stream(**ask) as stream:
        streamed = stream.get_final_message()
    for got in (message, streamed):
        assert [b.type for b in got.content] == ["server_tool_use", "web_search_tool_result"] \
            * 2 + ["text"]
        assert got.usage.server_tool_use.web_search_requests == 2
        assert got.content[0].name == "web_search" and got.content[1].content[0].url
        assert got.stop_reason == "end_turn"


def test_the_anthropic_fake_reports_cache_writes_and_tier_as_the_sdk_reads_them(fake_anthropic):
    claude = anthropic.Anthropic(base_url=fake_anthropic.url, api_key=fake_anthropic.api_key,
                                 default_headers={"x-api-key": fake_anthropic.api_key})
    message = claude.messages.create(
        model="claude-sonnet-4-5", max_tokens=20, messages=MESSAGES, system=[
            {"type": "text", "text": "guide " * 400,
             "cache_control": {"type": "ephemeral", "ttl": "1h"}}])
    usage = message.usage
    assert usage.cache_creation.ephemeral_1h_input_tokens == usage.cache_creation_input_tokens
    assert usage.cache_creation.ephemeral_5m_input_tokens == 0 and usage.input_tokens > 0
    assert usage.service_tier == "standard"


def test_a_client_that_resets_its_connection_leaves_no_traceback_and_the_fake_serves_on(
        capfd):
    """A client that resets a keep-alive connection, half-way through its next request, is
    the client's business: the fake says nothing (socketserver printed a traceback into the
    test run's output) and answers the next client."""
    import socket
    import struct
    import time

    fake = FakeProvider("openai", "sk-reset").start()
    try:
        body = json.dumps({"model": "gpt-5-mini", "messages": MESSAGES}).encode()
        head = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer "
                b"sk-reset\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n")
        with socket.create_connection(("127.0.0.1", fake.port), timeout=5) as s:
            s.sendall(head % len(body) + body)
            assert s.recv(65536).startswith(b"HTTP/1.1 200")
            s.sendall(b"POST /v1/chat/comp")  # half the next request's head, then a reset
            time.sleep(0.1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        time.sleep(0.2)  # the handler's thread meets the reset
        answer = httpx.post(f"{fake.url}/v1/chat/completions", content=body,
                            headers={"authorization": "Bearer sk-reset"})
        assert answer.status_code == 200
    finally:
        fake.stop()
    assert "Exception occurred" not in capfd.readouterr().err


def test_each_stream_is_recorded_whole_while_others_run_and_after_a_reset(capfd):
    """Each stream keeps a record of its own: two at once are each recorded as their client
    got them, and a stream still under way when a test resets the fake (the last test's,
    its gateway gone) goes on to its end (it failed with an IndexError, cut short, with a
    traceback in the run's output)."""
    import threading

    fake = FakeProvider("openai", "sk-streams", chunk_delay=0.01).start()
    got: list[bytes] = [b"", b""]
    started = threading.Barrier(3)

    def stream(i: int) -> None:
        with httpx.stream("POST", f"{fake.url}/v1/chat/completions", timeout=10,
                          headers={"authorization": "Bearer sk-streams"},
                          json={"model": "gpt-5-mini", "messages": MESSAGES,
                                "stream": True}) as r:
            chunks = r.iter_raw()
            got[i] = next(chunks)
            started.wait(5)
            got[i] += b"".join(chunks)

    readers = [threading.Thread(target=stream, args=(i,)) for i in range(2)]
    try:
        for reader in readers:
            reader.start()
        started.wait(5)  # both under way
        records = list(fake.streamed)
        fake.reset()
        for reader in readers:
            reader.join(10)
    finally:
        fake.stop()
    assert len(records) == 2 and not fake.streamed
    assert sorted(map(bytes, records)) == sorted(got)
    assert all(g.endswith(b"data: [DONE]\n\n") for g in got)
    assert "Exception occurred" not in capfd.readouterr().err


def test_a_fake_keeps_its_own_failures_for_the_fixtures_and_not_a_clients_reset(
        monkeypatch, capfd):
    """A fake that breaks keeps the traceback, which fails the test that was running (see
    conftest's `_reset_fakes`); a client that resets its connection is no failure of it."""
    import socket
    import struct

    from tests.fakes import providers

    fake = FakeProvider("openai", "sk-broken").start()
    try:
        with socket.create_connection(("127.0.0.1", fake.port), timeout=5) as s:
            s.sendall(b"POST /v1/chat/comp")
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        answer = httpx.post(f"{fake.url}/v1/chat/completions", json={"model": "gpt-5-mini"},
                            headers={"authorization": "Bearer sk-broken"})
        assert answer.status_code == 200 and fake.failures == []

        def broken(self, body: bytes) -> None:
            raise RuntimeError("the fake's own bug")

        monkeypatch.setattr(providers._Handler, "_handle", broken)
        with pytest.raises(httpx.RemoteProtocolError):
            httpx.post(f"{fake.url}/v1/chat/completions", json={"model": "gpt-5-mini"},
                       headers={"authorization": "Bearer sk-broken"})
    finally:
        fake.stop()
    (failure,) = fake.failures
    assert "RuntimeError: the fake's own bug" in failure and "in broken" in failure
    assert "RuntimeError: the fake's own bug" in capfd.readouterr().err  # and it still prints


@pytest.mark.parametrize("arrival", ["chunked", "one_write", "sized_stream"])
def test_a_cut_stream_drops_after_its_events_however_it_is_written(arrival):
    """A `cut` behaviour sends its first events and drops the connection, whether the fake
    writes its stream event by event, in one piece or with its length declared (the
    provider's whole length, never reached): the client reads those events and then an
    error, and the fake records what it sent."""
    from tests.fakes.providers import Behaviour

    fake = FakeProvider("openai", "sk-cut", **({arrival: True} if arrival != "chunked"
                                               else {})).start()
    fake.enqueue(Behaviour("cut", after_events=3))
    got = b""
    try:
        with pytest.raises(httpx.HTTPError), httpx.stream(
                "POST", f"{fake.url}/v1/chat/completions", timeout=10,
                headers={"authorization": "Bearer sk-cut"},
                json={"model": "gpt-5-mini", "messages": MESSAGES, "stream": True}) as r:
            for chunk in r.iter_raw():
                got += chunk
    finally:
        fake.stop()
    assert got == bytes(fake.streamed[-1])
    assert got.count(b"\n\n") == 3 and b"[DONE]" not in got
