"""The mitmproxy host's own process."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import AsyncIterator

import pytest
from mitmproxy.test import taddons


async def test_the_mitmproxy_host_puts_what_it_started_with_out_of_the_collectors_sight(
        config_dir, monkeypatch):
    """Once running, mitmproxy's and the gateway's start-up objects are frozen: a full
    collection no longer scans them (it paused the host 78 ms, before)."""
    from addon.tollgate_addon import TollgateAddon

    monkeypatch.setenv("TOLLGATE_KEY_PEPPER", "heap-pepper")
    addon = TollgateAddon()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, tollgate_config=str(config_dir / "gateway.yaml"))
        assert addon.gateway is not None
        try:
            before = gc.get_freeze_count()
            await addon.running()
            frozen = gc.get_freeze_count()
        finally:
            gc.unfreeze()
            addon.sink.stop()
            await addon.gateway.close()
    assert before == 0 and frozen > 1000


def test_a_reloaded_script_wraps_each_of_mitmproxys_steps_once():
    """mitmproxy runs a script again when it is edited: its replacements of mitmproxy's
    steps each wrap mitmproxy's own, not the last load's (which would take each twice: a
    head it cannot parse recorded twice)."""
    import importlib

    from mitmproxy.proxy.layers import http as layer
    from mitmproxy.proxy.layers.http import _http1

    import addon.tollgate_addon as module

    for _ in range(2):
        module = importlib.reload(module)
    for owner, name in ((layer.HttpStream, "check_body_size"),
                        (layer.HttpStream, "handle_protocol_error"),
                        (_http1.Http1Server, "read_headers")):
        replaced = getattr(owner, name)
        assert replaced.__module__ == module.__name__
        assert replaced._mitmproxys.__module__.startswith("mitmproxy.")


def _relay_key(tmp_path, monkeypatch, fake_openai, fake_anthropic, first: str | None = None):
    """A config whose key falls back on 5xx from mp_openai to mp_backup (the same fake), and
    the key's secret. `first`: the base URL of a provider tried before mp_openai instead
    (mp_first), whose failures other than 5xx are not fallen back on."""
    import json

    from tests.conftest import PROVIDER_ENV, make_config, make_policy
    from tests.harness import tollgate

    monkeypatch.setenv("TOLLGATE_KEY_PEPPER", "relay-pepper")
    for name, value in PROVIDER_ENV.items():
        monkeypatch.setenv(name, value)
    config = make_config(tmp_path, fake_openai, fake_anthropic)
    other = "mp_backup" if first is None else "mp_first"
    tollgate("model-providers", "create", "--id", other, "--type", "openai", "--scope",
             "ORG:acme", "--base-url", first or fake_openai.url, "--api-key-env",
             "FAKE_OPENAI_KEY", config=config)
    plan = ("mp_openai", other) if first is None else (other, "mp_openai")
    policy = make_policy(config, "relay", *plan)
    secret = json.loads(tollgate(
        "virtual-keys", "create", "--name", "k", "--scope", "ORG:acme", "--routing-policy",
        policy, "--config-json", '{"fallback": {"on": ["5xx"]}}', "--format", "json",
        config=config).stdout)["secret"]
    return config, secret


@contextlib.asynccontextmanager
async def _loaded(config, *others: object) -> AsyncIterator:
    """tollgate's addon, loaded by mitmproxy's test master with `config` (and `others`)."""
    from addon.tollgate_addon import TollgateAddon

    addon = TollgateAddon()
    with taddons.context(addon, *others) as tctx:
        tctx.configure(addon, tollgate_config=str(config))
        assert addon.gateway is not None
        try:
            yield addon
        finally:
            await addon.done()


def _chat_flow(secret: str, **headers: str):
    """A chat completion to the gateway with the key `secret`, not yet decided (with a JSON
    content type unless `headers` say otherwise; an empty value leaves a header out)."""
    import json

    from mitmproxy import http
    from mitmproxy.test import tflow, tutils

    headers = {"content_type": "application/json", **headers}
    return tflow.tflow(req=tutils.treq(
        method=b"POST", host="gateway", port=80, path=b"/v1/chat/completions",
        headers=http.Headers(authorization=f"Bearer {secret}",
                             **{k: v for k, v in headers.items() if v}),
        content=json.dumps({"model": "gpt-5-mini", "messages": [
            {"role": "user", "content": "hi"}]}).encode()))


async def _relayed_flows(addon, secret: str, n: int, **headers: str) -> list:
    """`n` chat completions the addon has decided and pointed at its fallback relay (with a
    JSON content type unless `headers` say otherwise)."""
    flows = []
    for _ in range(n):
        flow = _chat_flow(secret, **headers)
        await addon.request(flow)
        assert (flow.request.host, flow.request.port) == ("127.0.0.1", addon.plans.port)
        flows.append(flow)
    return flows


async def _relay(addon, flows: list) -> list[bytes]:
    """The relay's answers to `flows`, sent one after the other on one connection (as
    mitmproxy sends its client's requests): each answer's head is checked, its body kept."""
    import asyncio

    from mitmproxy.net.http import http1

    reader, writer = await asyncio.open_connection("127.0.0.1", addon.plans.port)
    bodies = []
    try:
        for flow in flows:
            writer.write(http1.assemble_request(flow.request))
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            lines = head.decode().split("\r\n")
            assert lines[0].startswith("HTTP/1.1 200 ")
            fields = dict(line.lower().split(": ", 1) for line in lines[1:] if line)
            assert "connection" not in fields
            bodies.append(await reader.readexactly(int(fields["content-length"])))
    finally:
        writer.close()
    return bodies


async def test_the_fallback_relay_serves_each_flow_of_a_connection_in_turn(
        tmp_path, monkeypatch, fake_openai, fake_anthropic):
    """mitmproxy keeps its connection to the relay for its client's next request, as it
    would a provider's: the relay answers each flow on it in turn, framed, and keeps it
    open (it used to close it after each, so every request with a fallback plan paid a new
    connection)."""
    import json

    config, secret = _relay_key(tmp_path, monkeypatch, fake_openai, fake_anthropic)
    async with _loaded(config) as addon:
        bodies = await _relay(addon, await _relayed_flows(addon, secret, 2))
    assert all(json.loads(b)["choices"][0]["message"]["content"] for b in bodies)
    assert len(fake_openai.requests) == 2


def _established_to(port: int) -> int:
    """This machine's established TCP connections to 127.0.0.1:`port`, counted from the
    side that dialled it (/proc/net/tcp: local, remote, state 01)."""
    from pathlib import Path

    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        remote, state = fields[2], fields[3]
        if state == "01" and remote == f"0100007F:{port:04X}":
            count += 1
    return count


async def test_each_connection_to_the_fallback_relay_has_its_own_provider_connections(
        tmp_path, monkeypatch, fake_openai, fake_anthropic):
    """Flows on one of mitmproxy's connections to the relay come one after another: the
    relay gives each connection an HTTP client of its own, whose provider connections close
    with it (one client for all of them would keep every connection in one pool)."""
    import asyncio

    config, secret = _relay_key(tmp_path, monkeypatch, fake_openai, fake_anthropic)
    port = fake_openai.port
    async with _loaded(config) as addon:
        before = _established_to(port)
        flows = await _relayed_flows(addon, secret, 3)
        await asyncio.gather(*(_relay(addon, [flow]) for flow in flows))
        for _ in range(100):  # the relay sees each connection close, and closes its own
            if _established_to(port) == before:
                break
            await asyncio.sleep(0.02)
        assert len(fake_openai.requests) == 3
        assert _established_to(port) == before


async def test_the_fallback_relays_client_logs_only_what_goes_wrong(
        tmp_path, monkeypatch, caplog, fake_openai, fake_anthropic):
    """mitmproxy takes the root logger to DEBUG and makes each record a hook that every
    addon hears, which would cost a relayed request more than its own HTTP if its client
    logged it (the relay's previous client made eleven records a request). Once the addon
    is loaded, the client's loggers stand at WARNING, and a relayed request leaves no
    record of theirs."""
    import logging

    from addon.tollgate_addon import RELAY_CLIENT_LOGGERS

    config, secret = _relay_key(tmp_path, monkeypatch, fake_openai, fake_anthropic)
    async with _loaded(config) as addon:
        caplog.set_level(logging.DEBUG)  # as mitmproxy sets the root logger
        caplog.clear()
        await _relay(addon, await _relayed_flows(addon, secret, 2))
    assert len(fake_openai.requests) == 2
    client = [r for r in caplog.records if r.name.split(".")[0] in RELAY_CLIENT_LOGGERS]
    assert client == []
    assert all(logging.getLogger(name).getEffectiveLevel() == logging.WARNING
               for name in RELAY_CLIENT_LOGGERS)


async def test_the_fallback_relay_sends_the_provider_the_clients_body_and_headers_as_sent(
        tmp_path, monkeypatch, fake_openai, fake_anthropic):
    """What the relay sends a provider is what the client sent, with the attempt's changes:
    the body's bytes, no content type where the client gave none (which the gateway takes as
    JSON), the provider's credential and host, and the encoding the meter reads."""
    import json

    config, secret = _relay_key(tmp_path, monkeypatch, fake_openai, fake_anthropic)
    async with _loaded(config) as addon:
        flows = await _relayed_flows(addon, secret, 1, content_type="", x_trace_me="yes")
        body = addon.plans.plans[flows[0].request.headers["x-tollgate-plan"]][3]
        await _relay(addon, flows)
    (sent,) = fake_openai.requests
    assert sent.body == body and json.loads(body)["model"] == "gpt-5-mini"
    assert "content-type" not in sent.headers
    assert sent.headers["x-trace-me"] == "yes"
    assert sent.headers["authorization"] == f"Bearer {fake_openai.api_key}"
    assert sent.headers["host"] == f"127.0.0.1:{fake_openai.port}"
    assert sent.headers["accept-encoding"] == "identity"


ANSWER = (b'{"id": "chatcmpl-tls", "object": "chat.completion", "model": "gpt-5-mini", '
          b'"choices": [{"index": 0, "message": {"role": "assistant", "content": "over tls"}, '
          b'"finish_reason": "stop"}], '
          b'"usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}')


@contextlib.asynccontextmanager
async def _tls_provider(folder) -> AsyncIterator[tuple[int, str]]:
    """An OpenAI-like provider on TLS, its certificate for 127.0.0.1 signed by a CA of its
    own: yields its port and that CA's PEM file."""
    import asyncio
    import ipaddress
    import ssl

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from mitmproxy import certs

    store = certs.CertStore.from_store(folder, "provider", 2048)
    entry = store.get_cert("127.0.0.1", [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    (folder / "cert.pem").write_bytes(entry.cert.to_pem())
    (folder / "key.pem").write_bytes(entry.privatekey.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption()))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(folder / "cert.pem", folder / "key.pem")

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                await reader.readexactly(length)
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\n\r\n%s" % (len(ANSWER), ANSWER))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass  # the relay hung up, or would not trust us
        finally:
            writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=context)
    try:
        yield server.sockets[0].getsockname()[1], str(folder / "provider-ca-cert.pem")
    finally:
        server.close()


async def test_the_fallback_relay_checks_providers_as_mitmproxy_checks_servers(
        tmp_path, monkeypatch, fake_openai, fake_anthropic):
    """The relay checks a provider's certificate as mitmproxy checks the servers it connects
    to: against the CA its `ssl_verify_upstream_trusted_ca` names, or not at all with
    `ssl_insecure`; by default against the public CAs, which refuse a private one's."""
    import asyncio

    from mitmproxy import ctx
    from mitmproxy.net.http import http1

    (tmp_path / "ca").mkdir()
    async with _tls_provider(tmp_path / "ca") as (port, ca):
        config, secret = _relay_key(tmp_path, monkeypatch, fake_openai, fake_anthropic,
                                    first=f"https://127.0.0.1:{port}")

        async def status_through_relay(addon) -> int:
            (flow,) = await _relayed_flows(addon, secret, 1)
            reader, writer = await asyncio.open_connection("127.0.0.1", addon.plans.port)
            try:
                writer.write(http1.assemble_request(flow.request))
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            finally:
                writer.close()
            return int(head.split(b" ", 2)[1])

        async with _loaded(config) as addon:
            assert await status_through_relay(addon) == 502  # a CA no one trusts here
            ctx.options.update(ssl_verify_upstream_trusted_ca=ca)
            assert await status_through_relay(addon) == 200
            ctx.options.update(ssl_verify_upstream_trusted_ca=None, ssl_insecure=True)
            assert await status_through_relay(addon) == 200
    assert fake_openai.requests == []  # mp_first answered, or failed in a way not fallen back on


@pytest.mark.parametrize(("http_version", "authority"), [
    ("HTTP/1.1", ""), ("HTTP/1.1", "127.0.0.1:9"),  # origin-form, absolute-form
    ("HTTP/2.0", "127.0.0.1:9")])
@pytest.mark.parametrize("to", [("https", "api.openai.com", 443, "/v1/chat/completions"),
                                ("http", "127.0.0.1", 8123, "/openai/deployments/d/chat"
                                 "/completions?api-version=2025-04-01-preview")])
def test_a_request_is_pointed_at_its_provider_as_mitmproxys_setters_would(http_version,
                                                                          authority, to):
    """(`point_at` sets the fields itself and the Host header, or HTTP/2's authority, once.)"""
    from mitmproxy.test import tflow

    from addon.tollgate_addon import point_at
    from tollgate.providers.openai import OpenAI
    from tollgate.request import Attempt

    scheme, host, port, path = to
    attempt = Attempt("mp", scheme, host, port, path, {}, [], adapter=OpenAI.__new__(OpenAI))
    ours, theirs = tflow.treq(), tflow.treq()
    for req in (ours, theirs):
        req.http_version, req.authority = http_version, authority
    theirs.scheme, theirs.host, theirs.port = scheme, host, port
    theirs.path = path
    theirs.host_header = attempt.authority
    point_at(ours, attempt)
    assert ours.data == theirs.data
    assert (ours.url, ours.host_header) == (attempt.url, attempt.authority)


class _View:
    """Hears of flows that change, as mitmweb's view does."""

    def __init__(self) -> None:
        self.comments: list[str] = []

    def update(self, flows: list) -> None:
        self.comments += [f.comment for f in flows]


async def test_a_response_is_settled_just_after_its_hook_not_in_it(tmp_path, monkeypatch,
                                                                    fake_openai,
                                                                    fake_anthropic):
    """mitmproxy sends a response's end (all of a buffered one) once its response hooks have
    returned: the books are closed two turns of the loop later, with the flow's served
    comment (a view is told of it), not in the hook, where they held a stream's end back
    from the client."""
    import asyncio
    import json

    from mitmproxy import http

    from addon.tollgate_addon import _EXCHANGES
    from tests.conftest import PROVIDER_ENV, make_config
    from tests.harness import tollgate

    monkeypatch.setenv("TOLLGATE_KEY_PEPPER", "served-pepper")
    for name, value in PROVIDER_ENV.items():
        monkeypatch.setenv(name, value)
    config = make_config(tmp_path, fake_openai, fake_anthropic)
    secret = json.loads(tollgate("virtual-keys", "create", "--name", "k", "--scope",
                                 "ORG:acme", "--format", "json", config=config).stdout)["secret"]
    view = _View()
    async with _loaded(config, view) as addon:
        flow = _chat_flow(secret)
        await addon.request(flow)
        exchange = _EXCHANGES[flow]
        answer = json.dumps({"id": "c", "object": "chat.completion", "model": "gpt-5-mini",
                             "choices": [], "usage": {"prompt_tokens": 7,
                                                      "completion_tokens": 3}}).encode()
        flow.response = http.Response.make(200, answer,
                                           {"content-type": "application/json"})
        addon.responseheaders(flow)
        assert callable(flow.response.stream)  # streamed through the tap, as mitmproxy does
        flow.response.stream(answer)
        flow.response.stream(b"")
        addon.response(flow)
        assert not exchange.settlement.finished
        assert flow.comment.startswith("tollgate: forward")
        for _ in range(2):
            await asyncio.sleep(0)
        assert exchange.settlement.finished
        assert flow.comment.startswith("tollgate: 200 completed · 7 in / 3 out tokens")
        await asyncio.sleep(0)
        assert view.comments == [flow.comment]
