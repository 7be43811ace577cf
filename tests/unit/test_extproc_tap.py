"""The ext_proc service follows a request from its decision (asked over the decision
service's HTTP, as the decide filter asks) to its last byte (posted as the meter filter posts
it, or reported by Envoy's access log), driven with what Envoy sends (no Envoy here: the
conformance suite runs the real one)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import httpx
import pytest
from click.testing import CliRunner
from envoy.config.core.v3 import base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import struct_pb2, wrappers_pb2

from extproc import envoy_config, service
from extproc.decider import start_decider
from extproc.listen import Listener
from extproc.proxy_replies import BURST, SLICE, Ended, ProxyReplies
from extproc.service import ExternalProcessor, Forwarding, access_log_service
from tollgate import gateway as gateway_module
from tollgate.cli.main import cli
from tollgate.gateway import Gateway
from tollgate.request import Reply


@pytest.fixture
def processor(config_dir: Path, monkeypatch) -> tuple[ExternalProcessor, str]:
    return _processor(config_dir, monkeypatch)


def _processor(config_dir: Path, monkeypatch) -> tuple[ExternalProcessor, str]:
    monkeypatch.setenv("TOLLGATE_KEY_PEPPER", "tap-pepper")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-real-openai")
    path = config_dir / "gateway.yaml"
    out = CliRunner().invoke(cli, ["--config", str(path), "virtual-keys", "create", "--name",
                                   "k", "--scope", "ORG:acme", "--format", "json"])
    return ExternalProcessor(Gateway.from_path(str(path), watch=False)), \
        json.loads(out.stdout)["secret"]


def headers(pairs: dict[str, str], end: bool = False) -> pb.HttpHeaders:
    return pb.HttpHeaders(end_of_stream=end, headers=base_pb2.HeaderMap(headers=[
        base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs.items()]))


class _Context:
    """What the servicer reads of a gRPC stream's context: the filter that opened it."""

    def __init__(self, role: str | None):
        self.role = role
        self.aborted: str | None = None

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return () if self.role is None else (("x-tollgate-filter", self.role),)

    async def abort(self, code: object, details: str) -> None:
        self.aborted = details


class Stream:
    """One ext_proc stream from the filter `role`: messages are sent as the test decides."""

    def __init__(self, processor: ExternalProcessor, role: str | None):
        self.inbox: asyncio.Queue[pb.ProcessingRequest | None] = asyncio.Queue()
        self.answers: list[pb.ProcessingResponse] = []
        self.context = _Context(role)
        self.task = asyncio.create_task(self._run(processor))

    async def _messages(self):
        while (msg := await self.inbox.get()) is not None:
            yield msg

    async def _run(self, processor: ExternalProcessor) -> None:
        async for answer in processor.Process(self._messages(), self.context):
            self.answers.append(answer)

    async def send(self, msg: pb.ProcessingRequest | None) -> None:
        await self.inbox.put(msg)
        for _ in range(20):
            await asyncio.sleep(0)


@contextlib.asynccontextmanager
async def decision_service(proc: ExternalProcessor):
    """A decision service of its own on a fresh socket, and a client on one connection to
    it (as Envoy keeps one alive): yields the client and where the service listens."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="tg-decider-") as folder:
        where = Listener(f"unix:{folder}/extproc.decide.sock")
        server = await start_decider(proc, where)
        try:
            async with httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(
                    uds=str(where.socket_path))) as http:
                yield http, where
        finally:
            server.close()  # its client has closed its connection


async def post(http: httpx.AsyncClient, client: dict[str, str], body: bytes | None,
               kind: str | None = None) -> httpx.Response:
    """One decision, asked as the decide filter asks it."""
    head = "\n".join(f"{k}: {v}" for k, v in client.items()).encode()
    return await http.post("http://tollgate/decide", content=body or b"", headers={
        "x-tollgate-head": base64.b64encode(head).decode(),
        "x-tollgate-filters": envoy_config.FILTERS_VERSION,
        "x-tollgate-body": kind or ("none" if body is None else "whole")})


async def ask(proc: ExternalProcessor, client: dict[str, str], body: bytes | None,
              kind: str | None = None) -> httpx.Response:
    async with decision_service(proc) as (http, _):
        return await post(http, client, body, kind)


def chat_request(secret: str, path: str = "/v1/chat/completions",
                 **extra: object) -> tuple[dict[str, str], bytes]:
    body = json.dumps({"model": "gpt-5-mini", **extra,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    return {":method": "POST", ":path": path, ":authority": "gateway",
            "authorization": f"Bearer {secret}", "anthropic-version": "2023-06-01",
            "content-type": "application/json", "content-length": str(len(body))}, body


async def decide_chat(proc: ExternalProcessor, secret: str, path: str = "/v1/chat/completions",
                      **extra: object) -> tuple[str, base_pb2.Metadata]:
    """A chat completion decided (and forwarded): its request id, and the metadata the
    decision leaves for the filters after it. On `/v1/messages`, an Anthropic client's
    request for an OpenAI model (its response is translated by the rewrite filter)."""
    answer = await ask(proc, *chat_request(secret, path, **extra))
    assert answer.status_code == 200 and "x-tollgate-reply" not in answer.headers
    request_id = answer.headers["x-tollgate-meta-request_id"]
    return request_id, base_pb2.Metadata(filter_metadata={"tollgate": struct_pb2.Struct(
        fields={"request_id": struct_pb2.Value(string_value=request_id)})})


def _head(head: dict[str, str]) -> bytes:
    return "\n".join(f"{k}: {v}" for k, v in head.items()).encode() + b"\n\n"


async def meter_post(http: httpx.AsyncClient, request_id: str, seq: int, data: bytes,
                     head: dict[str, str] | None = None, first_byte: int | None = None
                     ) -> None:
    """One post of a long stream, as the meter filter makes it (the first carries the head,
    and a stream's when its first bytes came, in microseconds since the epoch)."""
    if head is not None:
        data = _head(head) + data
    answer = await http.post("http://tollgate/meter", content=data, headers={
        "x-tollgate-request": request_id, "x-tollgate-seq": str(seq),
        **({"x-tollgate-first-byte": str(first_byte)} if first_byte is not None else {})})
    assert answer.status_code == 204


def gateway_settling(settling_together: Callable[[], contextlib.AbstractContextManager[None]]
                     ) -> Gateway:
    """A gateway whose store has only `settling_together`: all the access log asks of it
    when its ends are settled elsewhere."""
    store = SimpleNamespace(settling_together=settling_together)
    return cast(Gateway, SimpleNamespace(store=lambda: store))


def end_entry(request_id: str, posts: int, tail: list[bytes], *, whole: bool = True,
              head: dict[str, str] | None = None, first_byte: int | None = None,
              last: bytes = b"", status: int = 200, details: str = "via_upstream",
              started: float = 0.0, last_byte: float | None = None
              ) -> accesslog_pb2.HTTPAccessLogEntry:
    """Envoy's access-log entry of a forwarded request's end, with the metadata the meter
    filter leaves (meter.lua): the posts it made, the chunks since (`tail`) and, when it saw
    the end (`whole`), its `end`: the head no post carried, then a body's `last` bytes (a
    body of known length's, in no chunk of their own), and a stream's first byte time;
    `started` and `last_byte`: the request's start and the provider's last byte (seconds
    since the epoch)."""
    decided = {"request_id": struct_pb2.Value(string_value=request_id)}
    if posts:
        decided["posted"] = struct_pb2.Value(string_value=str(posts))
    held = {str(i): struct_pb2.Value(string_value=base64.b64encode(chunk).decode())
            for i, chunk in enumerate(tail, 1)}
    held["n"] = struct_pb2.Value(number_value=len(tail))
    if whole:
        end = (_head(head) if head is not None else b"") + last
        held["end"] = struct_pb2.Value(string_value=base64.b64encode(end).decode())
    if first_byte is not None:
        held["first_byte"] = struct_pb2.Value(string_value=str(first_byte))
    common = accesslog_pb2.AccessLogCommon(metadata=base_pb2.Metadata(filter_metadata={
        "tollgate": struct_pb2.Struct(fields=decided),
        "tollgate.tail": struct_pb2.Struct(fields=held)}))
    common.start_time.FromNanoseconds(int(started * 1e9))
    if last_byte is not None:
        common.time_to_last_upstream_rx_byte.FromNanoseconds(int((last_byte - started) * 1e9))
    return accesslog_pb2.HTTPAccessLogEntry(
        common_properties=common, response=accesslog_pb2.HTTPResponseProperties(
            response_code=wrappers_pb2.UInt32Value(value=status),
            response_code_details=details))


async def report(proc: ExternalProcessor, *entries: accesslog_pb2.HTTPAccessLogEntry) -> None:
    """Envoy's gRPC access log sends these entries to the process, as one message."""
    await report_to(ProxyReplies(proc.gateway, proc.ended), *entries)


async def report_to(log: ProxyReplies, *entries: accesslog_pb2.HTTPAccessLogEntry) -> None:
    async def messages():
        yield als_pb2.StreamAccessLogsMessage(
            http_logs=als_pb2.StreamAccessLogsMessage.HTTPAccessLogEntries(
                log_entry=list(entries)))

    await log.StreamAccessLogs(messages(), None)  # type: ignore[arg-type]


SSE = {":status": "200", "content-type": "text/event-stream"}
USAGE = b'data: {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 7}}' \
        b"\n\ndata: [DONE]\n\n"


def words(*texts: str) -> bytes:
    return b"".join(b"data: " + json.dumps({"choices": [{"delta": {"content": t}}]}).encode()
                    + b"\n\n" for t in texts)


async def settled(proc: ExternalProcessor) -> list:
    await proc.gateway.drain()
    return await proc.gateway.store().rows()


async def test_a_request_envoy_speaks_of_is_not_swept_and_is_settled_at_its_end(processor):
    proc, secret = processor
    client, body = chat_request(secret)
    async with decision_service(proc) as (http, _):
        answer = await post(http, client, body)
        request_id = answer.headers["x-tollgate-meta-request_id"]
        (pending,) = proc._pending.values()
        result = json.dumps({"choices": [], "usage": {"prompt_tokens": 1000,
                                                      "completion_tokens": 90000}}).encode()
        head = {":status": "200", "content-type": "application/json",
                "content-length": str(len(result))}
        await meter_post(http, request_id, 0, result[:10], head=head)
        # Minutes on, a post has just come: not swept.
        pending.since = time.monotonic()
        proc.sweep(now=time.monotonic() + service.QUIET_AFTER - 1)
        assert not pending.exchange.settlement.finished
        await report(proc, end_entry(request_id, 1, [result[10:20], result[20:]]))
    (row,) = await settled(proc)
    assert (row.request_id, row.outcome, row.output_tokens) == (request_id, "completed", 90000)
    assert row.cost_micros > 0 and not proc._pending
    await proc.gateway.close()


@pytest.mark.parametrize("length_known", [True, False])
async def test_a_response_envoy_reports_whole_is_settled_then_and_timed_to_its_end(
        config_dir, monkeypatch, length_known):
    """A JSON answer the meter saw whole, reported by Envoy's access log after the client
    had it (no post made): settled at once (the mitmproxy host waits before settling, as it
    sends a stream's end some turns after the hook that ends it; Envoy's report comes
    after the end has gone on), and its time is the provider's, to its last byte, not the
    time until the report came. Its bytes come after its head in the report's `end` when
    its length was known (the meter keeps no chunk of its own for them), else in a chunk."""
    monkeypatch.setattr(gateway_module, "SETTLE_AFTER", 3600.0)
    proc, secret = _processor(config_dir, monkeypatch)
    client, body = chat_request(secret)
    result = json.dumps({"choices": [], "usage": {"prompt_tokens": 3,
                                                  "completion_tokens": 5}}).encode()
    async with decision_service(proc) as (http, _):
        started = time.time()
        answer = await post(http, client, body)
    request_id = answer.headers["x-tollgate-meta-request_id"]
    await asyncio.sleep(0.8)  # the report comes late
    head = {":status": "200", "content-type": "application/json"}
    if length_known:
        head["content-length"] = str(len(result))
    await report(proc, end_entry(request_id, 0, [] if length_known else [result], head=head,
                                 last=result if length_known else b"", started=started,
                                 last_byte=started + 0.2))

    async def recorded() -> list:
        while not (rows := await proc.gateway.store().rows()):
            await asyncio.sleep(0.01)
        return rows

    (row,) = await asyncio.wait_for(recorded(), 10)
    assert (row.request_id, row.outcome, row.output_tokens) == (request_id, "completed", 5)
    # To its last byte (200 ms after the decision began, less the decision's own time),
    # not to the report (800 ms).
    assert 0 < row.latency_ms <= 250
    await proc.gateway.close()


async def test_a_streams_end_the_meter_saw_is_settled_as_complete_though_the_client_left(
        processor):
    """The stream reached the meter to its end (its `end` mark: the provider ended it,
    here without a [DONE]), and the client reset it after: it is settled complete, with the
    bytes, the head and the first byte time the report carries. A stream whose report has
    no such mark was cut short, and is charged what it streamed."""
    proc, secret = processor
    whole, _ = await decide_chat(proc, secret, stream=True, max_tokens=64)
    cut, _ = await decide_chat(proc, secret, stream=True, max_tokens=64)
    came = int((time.time() - 0.3) * 1e6)
    exchange = proc._pending[whole].exchange
    entries = [end_entry(whole, 0, [words("one"), words("two")], head=SSE, first_byte=came),
               end_entry(cut, 0, [words("one"), words("two")], whole=False, head=SSE)]
    entries[0].common_properties.response_flags.downstream_remote_reset = True
    await report(proc, *entries)
    assert 0.3 <= time.monotonic() - exchange.first_byte < 1.3  # the report's first byte
    rows = {r.request_id: r for r in await settled(proc)}
    assert [(rows[r].outcome, rows[r].status, rows[r].output_tokens) for r in (whole, cut)] \
        == [("completed", 200, 2), ("aborted", 200, 2)]
    await proc.gateway.close()


async def test_a_decision_that_comes_while_a_request_settles_is_not_kept_waiting(
        processor):
    """A client's next request, decided while its last one is being settled, is answered
    before that one's ledger row is written: it does not wait for the commit."""
    proc, secret = processor
    first, _ = await decide_chat(proc, secret, max_tokens=64)
    proc.metered(first, 0, True, json.dumps({"choices": [], "usage": {
        "prompt_tokens": 3, "completion_tokens": 5}}).encode(),
        (200, {"content-type": "application/json"}))
    await asyncio.sleep(0)  # its settlement starts (its span, metrics, access-log line)
    decision = await proc.decide(*chat_request(secret, max_tokens=64))  # the next one
    assert isinstance(decision, Forwarding)
    assert await proc.gateway.store().rows() == []  # decided first
    (row,) = await settled(proc)
    assert (row.request_id, row.output_tokens) == (first, 5)
    await proc.gateway.close()


async def test_posts_that_arrive_out_of_order_are_metered_in_order(processor):
    """Envoy sends each post on any free connection: the sequence numbers put them back."""
    proc, secret = processor
    request_id, _ = await decide_chat(proc, secret, stream=True, max_tokens=64)
    async with decision_service(proc) as (http, _):
        await report(proc, end_entry(request_id, 2, [USAGE]))  # its end, before its posts
        await meter_post(http, request_id, 1, words("two", "three"))
        assert not proc._pending[request_id].exchange.settlement.finished
        await meter_post(http, request_id, 0, words("one"), head=SSE)
    (row,) = await settled(proc)
    assert (row.outcome, row.output_tokens, row.usage_reported) == ("completed", 7, True)
    await proc.gateway.close()


async def test_a_request_envoy_never_reported_is_closed_by_the_sweep(processor):
    proc, secret = processor
    answer = await ask(proc, {":method": "POST", ":path": "/v1/embeddings",
                              "authorization": f"Bearer {secret}"},
                       b'{"model": "text-embedding-3-small", "input": "x"}')
    assert answer.status_code == 200 and "x-tollgate-meta-request_id" in answer.headers
    proc.sweep(now=time.monotonic() + service.QUIET_AFTER - 1)
    assert proc._pending  # still within Envoy's own idle timeouts
    proc.sweep(now=time.monotonic() + service.QUIET_AFTER + 1)
    (row,) = await settled(proc)
    assert row.outcome == "abandoned" and not proc._pending
    await proc.gateway.close()


async def test_a_stream_cut_short_is_charged_what_it_streamed_after_its_last_post(processor):
    """The client reset a stream: Envoy's access log reports it with the bytes the meter
    held since its last post, which are metered before it is settled; a post the log
    counted and that is still on its way is waited for."""
    proc, secret = processor
    request_id, _ = await decide_chat(proc, secret, stream=True, max_tokens=64)
    async with decision_service(proc) as (http, _):
        await meter_post(http, request_id, 0, words("one"), head=SSE)
        proc.ended(request_id, 200, "via_upstream", posts=2, tail=words("four", "five"))
        assert not proc._pending[request_id].exchange.settlement.finished  # post 1 is on its way
        await meter_post(http, request_id, 1, words("two", "three"))
    (row,) = await settled(proc)
    assert (row.outcome, row.output_tokens, row.usage_reported) == ("aborted", 5, False)
    await proc.gateway.close()


async def test_a_stream_cut_short_before_its_first_post_is_read_as_sse_from_its_bytes(
        processor):
    """An SSE stream's first bytes go on before any post: reset then, the access log
    brings its status and those bytes alone, which tell an event stream by themselves."""
    proc, secret = processor
    client_left = await decide_chat(proc, secret, stream=True, max_tokens=64)
    provider_cut = await decide_chat(proc, secret, stream=True, max_tokens=64)
    proc.ended(client_left[0], 200, "via_upstream", posts=0, tail=words("one", "two"),
               client_left=True)
    # The provider broke it off: Envoy's details name the reset, and the bytes the meter saw
    # say the provider answered (Envoy's own replies never reach the meter).
    proc.ended(provider_cut[0], 200, "upstream_reset_after_response_started{remote_reset}",
               posts=0, tail=words("one", "two", "three"))
    rows = {row.request_id: row for row in await settled(proc)}
    assert [(r.outcome, r.status, r.output_tokens, r.usage_reported, r.code) for r in (
        rows[client_left[0]], rows[provider_cut[0]])] == [
        ("abandoned", 200, 2, False, None), ("aborted", 200, 3, False, None)]
    await proc.gateway.close()


async def test_a_streams_time_to_first_byte_is_when_its_first_bytes_came_not_its_post(
        processor):
    """The meter posts a stream's first bytes with a later batch, saying when they came:
    the time to first byte is theirs, not the post's."""
    proc, secret = processor
    request_id, _ = await decide_chat(proc, secret, stream=True, max_tokens=64)
    exchange = proc._pending[request_id].exchange
    came = time.time() - 0.3  # its first bytes, a post's batch ago
    async with decision_service(proc) as (http, _):
        await meter_post(http, request_id, 0, words("one", "two"), head=SSE,
                         first_byte=int(came * 1e6))
        ago = time.monotonic() - exchange.first_byte
        assert 0.3 <= ago < 0.3 + 1.0
        await report(proc, end_entry(request_id, 1, [USAGE]))
    (row,) = await settled(proc)
    assert (row.outcome, row.output_tokens) == ("completed", 7)
    await proc.gateway.close()


async def test_a_post_the_log_counted_that_never_comes_is_not_waited_for_long(processor,
                                                                              monkeypatch):
    monkeypatch.setattr(service, "POSTS_GRACE", 0.05)
    proc, secret = processor
    request_id, _ = await decide_chat(proc, secret, stream=True, max_tokens=64)
    proc.ended(request_id, 200, "via_upstream", posts=1, tail=words("a", "b"))
    await asyncio.sleep(0.2)
    (row,) = await settled(proc)
    assert (row.outcome, row.status) == ("aborted", 200)
    assert row.output_tokens > 0  # the tail, metered without the post that never came
    await proc.gateway.close()


async def test_an_end_that_comes_before_its_posts_waits_while_they_keep_coming(
        processor, monkeypatch):
    """A long answer's posts (a thousand for 20 MB) may reach a busy process well after
    the access log's report of its end: it waits as long as they keep coming, each within
    POSTS_GRACE of the last, and is settled whole once they are all in."""
    monkeypatch.setattr(service, "POSTS_GRACE", 1.0)
    proc, secret = processor
    request_id, _ = await decide_chat(proc, secret, stream=True, max_tokens=64)
    await report(proc, end_entry(request_id, 5, []))
    posts = [words("one"), words("two"), words("three"), words("four"), words("five") + USAGE]
    async with decision_service(proc) as (http, _):
        for seq, data in enumerate(posts):
            await asyncio.sleep(0.3)  # (1.5 s in all, past the grace; each well within it)
            await meter_post(http, request_id, seq, data, head=SSE if seq == 0 else None)
    (row,) = await settled(proc)
    assert (row.outcome, row.output_tokens, row.usage_reported) == ("completed", 7, True)
    await proc.gateway.close()


async def test_ends_envoy_reports_without_a_metered_response(processor):
    """Envoy answered in the provider's place (its reply carries the gateway's envelope and
    code), or the client left before any answer, or after the provider's status but before
    the meter sent anything on (that is the client's doing, not an answer of Envoy's)."""
    proc, secret = processor
    replied, _ = await decide_chat(proc, secret, max_tokens=16)
    left, _ = await decide_chat(proc, secret, max_tokens=16)
    left_later, _ = await decide_chat(proc, secret, max_tokens=16)
    proc.ended(replied, 504, "response_timeout", posts=0)
    proc.ended(left, 0, "downstream_remote_disconnect", posts=0)
    proc.ended(left_later, 200, "downstream_remote_disconnect", posts=0, client_left=True)
    rows = {r.request_id: r for r in await settled(proc)}
    assert (rows[replied].status, rows[replied].code, rows[replied].cost_micros) == \
        (504, "provider_timeout", 0)
    assert (rows[left].outcome, rows[left].status) == ("abandoned", None)
    assert (rows[left_later].outcome, rows[left_later].status, rows[left_later].code) == \
        ("abandoned", 200, None)
    assert not proc._pending
    await proc.gateway.close()


async def test_a_stream_the_rewrite_ends_early_is_settled_as_the_client_saw_it(processor):
    """Envoy's meter sees the provider's whole stream before the rewrite has passed it on;
    a stream the rewrite cut (an event over the cap) is settled as an error all the same."""
    from tollgate.sse import MAX_EVENT_BYTES

    proc, secret = processor
    request_id, context = await decide_chat(proc, secret, "/v1/messages", stream=True,
                                            max_tokens=64)
    giant = b"data: " + json.dumps({"choices": [{"delta": {
        "content": "z" * MAX_EVENT_BYTES}}]}).encode() + b"\n\n"

    # The whole stream, end included, before the rewrite has any of it.
    async with decision_service(proc) as (http, _):
        await meter_post(http, request_id, 0, giant, head=SSE)
    await report(proc, end_entry(request_id, 1, [USAGE]))
    assert not proc._pending and proc.settling  # waits for the rewrite

    rewrite = Stream(proc, "rewrite")
    await rewrite.send(pb.ProcessingRequest(metadata_context=context,
                                            response_headers=headers(SSE)))
    await rewrite.send(pb.ProcessingRequest(response_body=pb.HttpBody(
        body=giant + USAGE, end_of_stream=True)))
    await rewrite.task
    await asyncio.gather(*proc.settling)
    sent = rewrite.answers[-1].response_body.response.body_mutation.body
    assert b"larger than the gateway handles" in sent and len(sent) < 1024
    (row,) = await settled(proc)
    assert (row.request_id, row.outcome, row.output_tokens) == (request_id, "error", 7)
    await proc.gateway.close()


async def test_requests_still_open_when_the_service_stops_are_settled(processor):
    """One waits for a rewrite Envoy will never send, one is mid-stream, one was never
    answered: stopping the service settles each as far as it got."""
    from extproc.service import stop_server

    proc, secret = processor
    rewritten, _ = await decide_chat(proc, secret, "/v1/messages", stream=True, max_tokens=64)
    streaming, _ = await decide_chat(proc, secret, stream=True, max_tokens=64)
    waiting, _ = await decide_chat(proc, secret, stream=True, max_tokens=64)
    async with decision_service(proc) as (http, _):
        await meter_post(http, streaming, 0, words("one", "two"), head=SSE)
    await report(proc, end_entry(rewritten, 0, [USAGE], head=SSE))

    class Stopped:
        async def stop(self, grace: float) -> None:
            pass

    await stop_server(Stopped(), proc)
    rows = {r.request_id: r for r in await settled(proc)}
    assert (rows[rewritten].outcome, rows[rewritten].output_tokens) == ("completed", 7)
    assert (rows[streaming].outcome, rows[streaming].output_tokens) == ("aborted", 2)
    assert rows[waiting].outcome == "abandoned"
    await proc.gateway.close()


class LaggingClusters:
    """Envoy's clusters as a poll that has not caught up yet: empty until read again."""

    def __init__(self, names: set[str]):
        self.names, self.seen, self.refreshes = frozenset(names), frozenset(), 0

    def get(self) -> frozenset[str]:
        return self.seen

    async def refresh(self) -> bool:
        self.refreshes += 1
        self.seen = self.names
        return True


def _fallback_key(config_dir: Path, monkeypatch,
                  plan: tuple[str, str] = ("mp_openai_org", "mp_anthropic_org")
                  ) -> tuple[Path, str]:
    """The config, and a key whose plan is `plan`'s providers in order, falling back on 5xx;
    the Anthropic provider serves the client's gpt-5-mini as claude-haiku-4-5."""
    monkeypatch.setenv("TOLLGATE_KEY_PEPPER", "tap-pepper")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-real-openai")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-real")
    path = config_dir / "gateway.yaml"
    policy = CliRunner().invoke(cli, [
        "--config", str(path), "routing-policies", "create", "--scope", "ORG:acme", "--name",
        "p", *(a for p in plan for a in ("--model-provider", p)),
        "--model-map", "mp_anthropic_org:gpt-5-mini=claude-haiku-4-5", "--format", "json"])
    out = CliRunner().invoke(cli, [
        "--config", str(path), "virtual-keys", "create", "--name", "k", "--scope", "ORG:acme",
        "--routing-policy", json.loads(policy.stdout)["id"],
        "--config-json", '{"fallback": {"on": ["5xx"]}}', "--format", "json"])
    return path, json.loads(out.stdout)["secret"]


async def test_a_fallback_plan_is_kept_when_the_cluster_poll_lags_behind_envoy(
        config_dir: Path, monkeypatch):
    """Right after start, Envoy serves before the poll of its admin has seen the fallback
    chains: the decision reads them again rather than drop the fallback."""
    from extproc import fallback
    from extproc.envoy_config import CLUSTER_HEADER

    path, secret = _fallback_key(config_dir, monkeypatch)
    gateway = Gateway.from_path(str(path), watch=False)
    chain = fallback.chain_name(("mp_openai_org", "mp_anthropic_org"))
    clusters = LaggingClusters({chain})
    proc = ExternalProcessor(gateway, clusters)
    answer = await ask(proc, *chat_request(secret))
    assert answer.headers[f"x-tollgate-set-{CLUSTER_HEADER}"] == chain
    assert clusters.refreshes == 1
    (pending,) = proc._pending.values()
    assert [a.provider_id for a in pending.exchange.cursor.attempts] == ["mp_openai_org",
                                                                "mp_anthropic_org"]
    pending.exchange.finish("abandoned")
    await gateway.close()


async def test_the_decision_makes_the_first_attempt_and_each_later_one_asks_for_its_own(
        config_dir: Path, monkeypatch):
    """Envoy retries a fallback plan by itself. The decision puts the first provider's
    changes on the request, as for a plan of one, and names that provider; each later
    attempt asks for the changes of the provider it reached (credentials, host, path, and
    its own body in another family), with the status of the attempt before, which the
    request's row records as its fallback."""
    path, secret = _fallback_key(config_dir, monkeypatch)
    proc = ExternalProcessor(Gateway.from_path(str(path), watch=False))
    answer = await ask(proc, *chat_request(secret))
    assert answer.headers["x-tollgate-set-authorization"] == "Bearer sk-real-openai"
    assert answer.headers["x-tollgate-meta-first_attempt"] == "mp_openai_org"
    # No provider nor fallback count in the metadata: Envoy's routes say the endpoint's
    # provider and 0 (envoy_config). The client's family is, as a later attempt's path may
    # be of the other family's API.
    assert "x-tollgate-meta-provider" not in answer.headers
    assert "x-tollgate-meta-fallback_count" not in answer.headers
    assert answer.headers["x-tollgate-meta-family"] == "openai"
    assert "x-tollgate-body" not in answer.headers  # the client's bytes
    ((request_id, pending),) = proc._pending.items()

    second = proc.attempt(request_id, "mp_anthropic_org", 503)
    assert isinstance(second, Forwarding)
    assert second.set_headers["x-api-key"] == "sk-ant-real"
    assert "authorization" in second.remove_headers  # the first provider's, on the same map
    # (not what every route sets: the identity encoding stays on every attempt)
    assert not envoy_config.ROUTE_SETS.keys() & {*second.set_headers, *second.remove_headers}
    assert second.set_headers[":path"] == "/v1/messages"
    assert json.loads(second.body or b"{}")["model"] == "claude-haiku-4-5"
    assert second.set_headers["content-length"] == str(len(second.body or b""))
    assert second.metadata == {"fallback_count": "1"}
    assert pending.exchange.cursor.fallbacks == ["mp_openai_org:5xx"]

    lost = proc.attempt("req_unknown", "mp_openai_org", None)
    assert isinstance(lost, Reply) and lost.status >= 500
    assert lost.decision["code"] == "gateway_error"
    pending.exchange.finish("abandoned")
    await proc.gateway.close()


async def test_a_later_attempt_gets_the_clients_bytes_back_from_a_first_that_replaced_them(
        config_dir: Path, monkeypatch):
    """The decision put the first provider's own body (a translation) on the request, so
    Envoy replays that body to each later attempt: one that takes the client's bytes gets
    them back, with their length."""
    path, secret = _fallback_key(config_dir, monkeypatch,
                                 plan=("mp_anthropic_org", "mp_openai_org"))
    proc = ExternalProcessor(Gateway.from_path(str(path), watch=False))
    client, body = chat_request(secret)
    answer = await ask(proc, client, body)
    assert answer.headers["x-tollgate-body"] == "replaced"
    assert json.loads(answer.content)["model"] == "claude-haiku-4-5"
    ((request_id, pending),) = proc._pending.items()
    second = proc.attempt(request_id, "mp_openai_org", None)  # the first got no answer
    assert isinstance(second, Forwarding)
    assert second.body == body and second.set_headers["content-length"] == str(len(body))
    assert second.set_headers["authorization"] == "Bearer sk-real-openai"
    assert "x-api-key" in second.remove_headers
    # (named once, though the first attempt set it and the second's own removals name it)
    assert len(second.remove_headers) == len(set(second.remove_headers))
    assert pending.exchange.cursor.fallbacks == ["mp_anthropic_org:timeout or network error"]
    pending.exchange.finish("abandoned")
    await proc.gateway.close()


async def test_a_refresh_reads_envoy_again_even_right_after_a_stale_poll():
    """The poll read Envoy's clusters a moment before Envoy finished loading them: a
    request that needs a chain reads them again at once (not throttled by that poll)."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from extproc.runner import LoadedClusters

    loaded = {"names": ["provider_a"]}

    class Admin(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps({"cluster_statuses": [{"name": n} for n in loaded["names"]]})
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Admin)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        clusters = LoadedClusters(f"127.0.0.1:{server.server_address[1]}")
        clusters._fetch()  # the poll's read, just before Envoy loaded the chain
        assert clusters.get() == {"provider_a"}
        loaded["names"] = ["provider_a", "provider_b", "chain_a_then_b"]
        assert await clusters.refresh()
        assert "chain_a_then_b" in clusters.get()
        assert not await clusters.refresh()  # twice a second at most
    finally:
        server.shutdown()


async def test_a_decision_sets_the_providers_request_and_keeps_the_connection(processor):
    """The decision names what the decide filter sets and removes, and the metadata for the
    filters after it; the client's key goes, the provider's credential comes. A second
    decision on the same connection is answered too (Envoy keeps them alive)."""
    proc, secret = processor
    client, body = chat_request(secret, stream=True, max_tokens=16)
    async with decision_service(proc) as (http, where):
        answers = [await post(http, client, body) for _ in range(2)]
        assert oct(where.socket_path.stat().st_mode & 0o777) == "0o600"
    first, second = (a.headers for a in answers)
    assert first["x-tollgate-meta-request_id"] != second["x-tollgate-meta-request_id"]
    assert first["x-tollgate-set-authorization"] == "Bearer sk-real-openai"
    # The provider's path is the client's own, and the client sent no other key header to
    # take off: neither is in the answer (each would be a call into Envoy).
    assert "x-tollgate-path" not in first and "x-tollgate-remove" not in first
    assert first["x-tollgate-set-x-tollgate-cluster"].startswith("provider_")
    assert first["x-tollgate-meta-cut_usage"] == "1"  # the SDK's default stream
    # The gateway asks for the usage chunk: the body it sends, and its length.
    assert first["x-tollgate-body"] == "replaced"
    sent = json.loads(answers[0].content)
    assert sent["stream_options"] == {"include_usage": True}
    assert first["x-tollgate-set-content-length"] == str(len(answers[0].content))
    for pending in list(proc._pending.values()):
        pending.exchange.finish("abandoned")
    await proc.gateway.close()


async def test_the_clients_family_is_said_only_where_the_providers_path_would_hide_it(
        processor):
    """Envoy's own replies (a provider unreachable) are in the client's API family, which
    its error mappers read from the path the provider is sent unless the metadata says
    otherwise: an OpenAI client's request to an OpenAI provider needs none; an Anthropic
    client's translated for an OpenAI provider does."""
    proc, secret = processor
    same = await ask(proc, *chat_request(secret))
    translated = await ask(proc, *chat_request(secret, "/v1/messages", max_tokens=16))
    assert "x-tollgate-path" not in same.headers  # (the client's own path)
    assert "x-tollgate-meta-family" not in same.headers
    assert translated.headers["x-tollgate-path"] == "/v1/chat/completions"
    assert translated.headers["x-tollgate-meta-family"] == "anthropic"
    for pending in list(proc._pending.values()):
        pending.exchange.finish("abandoned")
    await proc.gateway.close()


async def test_a_decision_takes_off_the_key_headers_the_client_sent_and_no_others(
        processor):
    """The virtual key never goes on to the provider, in whichever header the client put
    it: a header the client sent that carries one is taken off; one it did not send is not
    named (taking it off would cost Envoy a call for nothing)."""
    proc, secret = processor
    headers, body = chat_request(secret, max_tokens=16)  # (within the provider's TPM)
    both = await ask(proc, {**headers, "x-api-key": secret}, body)
    assert both.headers["x-tollgate-remove"] == "x-api-key"
    assert both.headers["x-tollgate-set-authorization"] == "Bearer sk-real-openai"
    alone = await ask(proc, headers, body)
    assert "x-tollgate-remove" not in alone.headers
    controls = await ask(proc, {**headers, "x-envoy-max-retries": "9"}, body)
    assert controls.headers["x-tollgate-remove"] == "x-envoy-max-retries"
    for pending in list(proc._pending.values()):
        pending.exchange.finish("abandoned")
    await proc.gateway.close()


async def test_a_body_the_decision_keeps_keeps_the_length_its_client_declared(processor):
    """The decide filter says whether the client declared its body's length (an empty
    `content-length` line: Envoy read that many bytes); a body the decision does not
    replace keeps it, and the answer names none. A body sent without one (chunked) is given
    its length; a replaced body, its own."""
    proc, secret = processor
    headers, body = chat_request(secret, max_tokens=16)
    declared = await ask(proc, {**headers, "content-length": ""}, body)
    assert "x-tollgate-body" not in declared.headers
    assert "x-tollgate-set-content-length" not in declared.headers
    chunked = {k: v for k, v in headers.items() if k != "content-length"}
    undeclared = await ask(proc, chunked, body)
    assert undeclared.headers["x-tollgate-set-content-length"] == str(len(body))
    headers, body = chat_request(secret, stream=True, max_tokens=16)  # (usage asked for)
    replaced = await ask(proc, {**headers, "content-length": ""}, body)
    assert replaced.headers["x-tollgate-body"] == "replaced"
    assert replaced.headers["x-tollgate-set-content-length"] == str(len(replaced.content))
    for pending in list(proc._pending.values()):
        pending.exchange.finish("abandoned")
    await proc.gateway.close()


async def test_a_refusal_is_the_gateways_own_reply(processor):
    proc, _ = processor
    answer = await ask(proc, {":method": "POST", ":path": "/v1/chat/completions",
                              "authorization": "Bearer tg-nope"}, b"{}")
    assert answer.headers["x-tollgate-reply"] == "401"
    assert answer.headers["x-tollgate-meta-answered"] == "1"  # Envoy's mappers leave it
    assert answer.headers["x-tollgate-set-content-type"] == "application/json"
    assert json.loads(answer.content)["error"]["code"] == "invalid_api_key"
    assert not proc._pending
    await proc.gateway.close()


async def test_a_body_declared_over_the_limit_is_refused_unread(processor):
    """Its content-length is over gateway.max_body_bytes: the decide filter does not read
    it, and the refusal is in the ledger."""
    proc, secret = processor
    declared = proc.gateway.max_body_bytes + 1
    answer = await ask(proc, {":method": "POST", ":path": "/v1/chat/completions",
                              "authorization": f"Bearer {secret}",
                              "content-length": str(declared)}, None, kind="unread")
    assert answer.headers["x-tollgate-reply"] == "413"
    assert b"payload_too_large" in answer.content
    await proc.gateway.drain()
    (row,) = await proc.gateway.store().rows()
    assert (row.status, row.code) == (413, "payload_too_large") and not proc._pending
    await proc.gateway.close()


async def test_what_the_decide_filter_never_sends_is_answered_400(processor):
    proc, _ = processor
    for client, kind in (({":path": "/v1/chat/completions"}, "sideways"),
                         ({":path": "/v1/chat/completions"}, "unread")):  # no length
        answer = await ask(proc, client, b"", kind=kind)
        assert answer.status_code == 400
    assert not proc._pending
    await proc.gateway.close()


@pytest.mark.parametrize("role", [None, "tap", "attempt"])
async def test_a_stream_from_a_filter_tollgate_did_not_render_is_refused(processor, role):
    """The filter that opens a stream names itself; a stream that names none (an Envoy
    configuration from elsewhere) or a filter this version no longer renders over gRPC (the
    tap, the attempt filter) is refused, never guessed at."""
    proc, secret = processor
    stray = Stream(proc, role)
    await stray.send(pb.ProcessingRequest(request_headers=headers({
        ":method": "POST", ":path": "/v1/chat/completions",
        "authorization": f"Bearer {secret}"})))
    await stray.send(None)
    await stray.task
    assert stray.answers == [] and "x-tollgate-filter" in stray.context.aborted
    assert not proc._pending
    await proc.gateway.close()


async def test_a_stopping_service_waits_a_moment_for_the_ends_envoy_has_yet_to_report(
        processor):
    """(With an Envoy it does not run, ext_proc cannot hold Envoy back: it waits for the
    reports instead, a bounded moment.)"""
    proc, secret = processor
    request_id, _ = await decide_chat(proc, secret, max_tokens=16)
    result = json.dumps({"choices": [], "usage": {"prompt_tokens": 3,
                                                  "completion_tokens": 5}}).encode()
    head = {":status": "200", "content-type": "application/json",
            "content-length": str(len(result))}
    later = asyncio.get_running_loop().call_later(
        0.05, lambda: asyncio.ensure_future(report(proc, end_entry(
            request_id, 0, [result], head=head))))
    await proc.ends_reported(within=10)
    assert not proc._pending
    (row,) = await settled(proc)
    assert (row.outcome, row.output_tokens) == ("completed", 5)
    later.cancel()

    never, _ = await decide_chat(proc, secret, max_tokens=16)
    await proc.ends_reported(within=0.05)  # not reported: it returns all the same
    assert never in proc._pending
    await proc.gateway.close()


async def test_a_reported_end_before_the_request_began_is_taken_as_its_start(processor):
    """(A report from a clock that is not this process's: never a negative time.)"""
    proc, secret = processor
    request_id, _ = await decide_chat(proc, secret, max_tokens=16)
    result = json.dumps({"choices": [], "usage": {"prompt_tokens": 3,
                                                  "completion_tokens": 5}}).encode()
    await report(proc, end_entry(request_id, 0, [result], head={
        ":status": "200", "content-type": "application/json",
        "content-length": str(len(result))}, started=1_000.0, last_byte=1_000.5))
    (row,) = await settled(proc)
    assert row.outcome == "completed" and 0 <= row.latency_ms < 1_000
    await proc.gateway.close()


LONG = BURST + 1  # reports in a batch long enough to be paced


def settling_for(taken: list[str], timer: list[float], each: float) -> Ended:
    """An `ended` that takes a request's report, `each` seconds of `timer` long."""
    def ended(request_id: str, *_: object) -> None:
        taken.append(request_id)
        timer[0] += each
    return ended


async def settle_batch(taken: list[str], reports: int, *, age: float, busy: float,
                       each: float, stopping: bool = False,
                       settling_together: Callable[[], contextlib.AbstractContextManager[None]]
                       = contextlib.nullcontext) -> list[tuple[bool, int]]:
    """A batch of `reports` fresh reports `age` seconds old, each `each` seconds long,
    settled by a process that used `busy` of a core in the last sample: the turns of the
    loop after them (whether the core was offered to other processes first, and after how
    many were taken)."""
    turns: list[tuple[bool, int]] = []
    gave = [False]
    clock, cpu, timer = [1_000.0], [5.0], [0.0]

    async def sleep(seconds: float) -> None:
        assert seconds == 0  # a turn of the loop, never a pause
        turns.append((gave[0], len(taken)))
        gave[0] = False

    def give_way() -> None:
        gave[0] = True

    log = ProxyReplies(gateway_settling(settling_together), settling_for(taken, timer, each),
                       stopping=lambda: stopping, clock=lambda: clock[0], cpu=lambda: cpu[0],
                       sleep=sleep, timer=lambda: timer[0], give_way=give_way)
    clock[0] += 0.1 + age
    cpu[0] += (0.1 + age) * busy
    await report_to(log, *[end_entry(f"r{i}", 0, [b"{}"], started=1_000.1)
                           for i in range(reports)])
    return turns


@pytest.mark.parametrize(("reports", "age", "busy", "stopping", "gave_way"), [
    # Fresh: the core is offered to other processes between two (each report past a slice).
    (LONG, 0.05, 0.2, False, [True] * LONG),
    (BURST, 0.05, 0.2, False, [False] * BURST),  # a few: no longer than a decision takes
    (LONG, 0.05, 0.8, False, [False] * LONG),  # the process is busy: no core to give
    (LONG, 0.05, 0.2, True, [False] * LONG),  # the service stops: its last reports at once
    (LONG, 0.3, 0.2, False, [False] * LONG),  # past FRESH: batches come faster than settled
    (LONG, 1.0, 0.2, False, []),  # behind: settled back to back, the decisions wait
])
async def test_a_long_batch_of_fresh_reports_is_settled_with_a_spare_core_given_away(
        reports, age, busy, stopping, gave_way):
    """A batch of fresh reports settled back to back kept a core busy for milliseconds, and
    the requests that came meanwhile on the machine (the app's, Envoy's) waited for it.
    `busy`: the share of a core the process used in the last sample. Paced or not, the
    batch's settlements are committed together once it is read (the store's
    `settling_together` open around all of it), not one transaction each."""
    taken: list[str] = []
    together: list[tuple[int, int]] = []  # (reports taken as it opened, as it closed)

    @contextlib.contextmanager
    def settling_together() -> Iterator[None]:
        opened = len(taken)
        yield
        together.append((opened, len(taken)))

    turns = await settle_batch(taken, reports, age=age, busy=busy, each=2 * SLICE,
                               stopping=stopping, settling_together=settling_together)
    assert taken == [f"r{i}" for i in range(reports)]
    assert turns == [(gave, i) for i, gave in enumerate(gave_way, 1)]
    assert together == [(0, reports)]


@pytest.mark.parametrize(("busy", "age", "gave"), [
    (0.2, 0.05, True),  # fresh, with a core to spare: paced
    (0.8, 0.05, False),  # busy: the loop turns
    (0.2, 1.0, None),  # behind: back to back
])
async def test_a_batch_is_settled_in_slices_back_to_back_within_each(
        busy, age, gave, monkeypatch):
    """A report at a time, each was settled cold, and its settlement's steps ran between
    the next report's: the loop turns (the core offered first, or not) only once a slice's
    time is spent, here every third report."""
    monkeypatch.setattr("extproc.proxy_replies.SLICE", 3.0)
    taken: list[str] = []
    turns = await settle_batch(taken, LONG + 1, age=age, busy=busy, each=1.0)
    assert taken == [f"r{i}" for i in range(LONG + 1)]
    assert turns == ([] if gave is None else [(gave, 3), (gave, 6), (gave, 9)])


async def test_a_busy_process_is_told_from_a_sample_long_enough():
    """(Two streams' batches a moment apart: the verdict of the last whole sample stands.)"""
    clock, cpu = [0.0], [0.0]
    log = ProxyReplies(None, lambda *_: None, clock=lambda: clock[0],  # type: ignore[arg-type]
                       cpu=lambda: cpu[0])
    assert log.spare()  # (no sample yet)
    clock[0], cpu[0] = 0.2, 0.15
    assert not log.spare()
    clock[0], cpu[0] = 0.21, 0.15  # idle for 10 ms: too short a sample
    assert not log.spare()
    clock[0], cpu[0] = 0.4, 0.17
    assert log.spare()


async def test_the_access_log_service_settles_at_once_when_the_service_stops(processor):
    proc, _ = processor
    service_log = access_log_service(proc)
    fresh = end_entry("r0", 0, [b"{}"], started=time.time() + 60)  # (never stale here)
    assert service_log.turn_after(fresh, paced=True) is True
    await proc.ends_reported(within=0)
    assert service_log.turn_after(fresh, paced=True) is False
    await proc.gateway.close()


@pytest.mark.parametrize(("started", "taken_first"), [(None, 2), (1_000.0, 4)])
async def test_a_batch_of_ends_lets_decisions_go_first_unless_settling_is_behind(
        started, taken_first):
    """Fresh reports: a decision that came meanwhile is served after the slice under way
    (here two reports long). Reports of requests that ended long ago (settling is behind
    its answers, the load past what the process settles): the batch is settled first, and
    the decisions wait."""
    taken: list[str] = []
    at_decision: list[int] = []
    timer = [0.0]
    log = ProxyReplies(gateway_settling(contextlib.nullcontext),
                       settling_for(taken, timer, SLICE * 0.6), timer=lambda: timer[0])
    entries = [end_entry(f"r{i}", 0, [b"{}"], started=started or time.time())
               for i in range(4)]
    asyncio.get_running_loop().call_soon(lambda: at_decision.append(len(taken)))
    await report_to(log, *entries)
    await asyncio.sleep(0)
    assert taken == ["r0", "r1", "r2", "r3"] and at_decision == [taken_first]
