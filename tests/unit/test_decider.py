"""The decision service's side of its exchange with the decide filter (decide.lua): what it
reads of the client's request, and how a decision is written for the filter to apply."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import pytest

from extproc import decider as decider_module
from extproc.decider import (
    BadRequest,
    ClientHeads,
    Decider,
    answer,
    client_request,
    response_head,
)
from extproc.envoy_config import FILTERS_VERSION
from extproc.service import Forwarding, Made, Replaying
from tollgate.request import Reply


def _headers(raw: bytes) -> dict[str, str]:
    head = raw.split(b"\r\n\r\n", 1)[0].decode()
    return dict(line.split(": ", 1) for line in head.split("\r\n")[1:])


def _b64(head: bytes) -> str:
    return base64.b64encode(head).decode()


def test_the_clients_head_and_body_are_read_as_envoy_lists_them():
    head = _b64(b":method: POST\n:path: /v1/chat/completions\nx-other: a\nx-other: b\n"
                b"x-empty: \ncontent-length: 2")
    headers, body, declared = client_request(head, b"{}", "whole")
    assert headers == {":method": "POST", ":path": "/v1/chat/completions",
                       "x-other": "a, b", "x-empty": "", "content-length": "2"}
    assert (body, declared) == (b"{}", None)
    assert client_request(_b64(b":method: GET"), b"", "none") == (
        {":method": "GET"}, None, None)
    _, body, declared = client_request(_b64(b"content-length: 99"), b"", "unread")
    assert (body, declared) == (None, 99)


def test_an_apps_repeated_head_is_decoded_once(monkeypatch):
    heads, decoded = ClientHeads(), []
    monkeypatch.setattr(decider_module, "client_request", lambda *a: decoded.append(a) or
                        client_request(*a))
    head = _b64(b":method: POST\nauthorization: Bearer tg-1")
    first = heads.decoded(head)
    assert heads.decoded(head) is first and len(decoded) == 1
    assert first.headers == {":method": "POST", "authorization": "Bearer tg-1"}
    # A head past the kept ones is decoded again.
    for n in range(ClientHeads.MAX):
        heads.decoded(_b64(b"x-n: %d" % n))
    heads.decoded(head)
    assert len(decoded) == 2 + ClientHeads.MAX
    with pytest.raises(BadRequest):  # a bad head is refused each time, never kept
        heads.decoded("*")


def test_the_request_a_known_head_names_is_made_once_and_each_has_its_own_body():
    heads = ClientHeads()
    head = _b64(b":method: POST\n:path: /v1/chat/completions\nauthorization: Bearer tg-1\n"
                b"x-forwarded-for: 10.0.0.7")
    known = heads.decoded(head)
    assert heads.decoded(head) is known
    one, two = known.request.with_body(b'{"a":1}'), known.request.with_body(b'{"b":2}')
    for req, body in ((one, b'{"a":1}'), (two, b'{"b":2}')):
        assert (req.method, req.path, req.peer, req.head, req.body) == \
            ("POST", "/v1/chat/completions", "10.0.0.7", head, body)
        assert dict(req.headers) == {"authorization": "Bearer tg-1",
                                     "x-forwarded-for": "10.0.0.7"}
    assert known.request.body == b"" and one.headers is two.headers


@pytest.mark.parametrize(("head", "kind"), [
    (None, "whole"),  # no head
    (":method: POST", "whole"),  # not base64
    (_b64(b":method: POST") + "!", "whole"),  # base64 and more
    (_b64(b":method: POST"), "unread"),  # unread, but no size to refuse it by
    (_b64(b":method: POST"), "partly"),
])
def test_what_the_filter_never_sends_is_refused(head, kind):
    with pytest.raises(BadRequest):
        client_request(head, b"", kind)


def test_a_forward_names_each_change_for_the_filter():
    raw = b"".join(answer(Forwarding(
        set_headers={":path": "/v1/messages", ":authority": "api.example", "x-api-key": "sk",
                     "content-length": "7"},
        remove_headers=["authorization", "x-envoy-retry-on"], body=b'{"a":1}',
        metadata={"request_id": "req_1", "budget_warning": "b; name=équipe; used=85%"})))
    headers = _headers(raw)
    assert raw.startswith(b"HTTP/1.1 200 ")
    assert headers["x-tollgate-path"] == "/v1/messages"
    assert headers["x-tollgate-authority"] == "api.example"
    assert headers["x-tollgate-set-x-api-key"] == "sk"
    assert headers["x-tollgate-remove"] == "authorization, x-envoy-retry-on"
    assert headers["x-tollgate-meta-budget_warning"] == "b; name=équipe; used=85%"
    assert headers["x-tollgate-body"] == "replaced" and raw.endswith(b'\r\n\r\n{"a":1}')
    unchanged = _headers(b"".join(answer(Forwarding({":path": "/v1/x"}, [], None, {}))))
    assert "x-tollgate-body" not in unchanged and "x-tollgate-remove" not in unchanged


def _lines(raw: bytes) -> tuple[list[str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return sorted(head.decode().split("\r\n")), body


def test_a_request_decided_from_a_precedent_is_told_its_own_values_over_the_precedents():
    """The precedent's answer with this request's own headers and metadata over it, line
    for line the answer of the two merged: none of the precedent's own values (its ids, its
    budget warning, its rate-limit headers) is left beside or instead of the request's,
    however the names the request sets itself change from one request to the next."""
    made = Made(Forwarding(
        set_headers={":path": "/v1/chat/completions", ":authority": "api.example",
                     "authorization": "Bearer sk-old", "x-request-id": "req_0",
                     "x-tollgate-cluster": "provider_p", "content-length": "10"},
        remove_headers=["x-api-key"], body=None,
        metadata={"request_id": "req_0", "trace_id": "t0", "family": "openai",
                  "budget_warning": "b; used=90%", "x-ratelimit-remaining-requests": "9"}))
    own = {"authorization": "Bearer sk-new", "x-request-id": "req_1", "content-length": "12"}
    cases = [
        Replaying(made, own, {"request_id": "req_1", "trace_id": "t1"}, None),
        Replaying(made, own, {"request_id": "req_2", "trace_id": "t2",
                              "budget_warning": "b; used=95%",
                              "x-ratelimit-remaining-requests": "8"}, b'{"stream":1}'),
        Replaying(made, own, {"request_id": "req_3", "trace_id": "t3"}, None),
    ]
    for r in cases:
        raw = b"".join(answer(r))
        assert _lines(raw) == _lines(b"".join(answer(r.forwarding())))
        headers = _headers(raw)
        assert headers["x-tollgate-set-authorization"] == "Bearer sk-new"
        assert headers["x-tollgate-meta-request_id"] == r.metadata["request_id"]
        assert headers.get("x-tollgate-meta-budget_warning") == \
            r.metadata.get("budget_warning")
        assert headers.get("x-tollgate-meta-x-ratelimit-remaining-requests") == \
            r.metadata.get("x-ratelimit-remaining-requests", "9")
    assert len(made.shared) == 2  # encoded once for each set of names a request set
    with pytest.raises(ValueError):  # a request's own value cannot break out of its line
        answer(Replaying(made, {"authorization": "Bearer x\r\nx-evil: 1"}, {}, None))


def test_a_reply_is_the_gateways_answer_with_its_headers():
    raw = b"".join(answer(Reply(429, {"content-type": "application/json", "Retry-After": "3"},
                                b'{"error": {}}', {"code": "rate_limited"})))
    headers = _headers(raw)
    assert headers["x-tollgate-reply"] == "429"
    assert headers["x-tollgate-meta-answered"] == "1"
    assert headers["x-tollgate-set-retry-after"] == "3"
    assert raw.endswith(b'{"error": {}}')


def test_a_value_that_would_break_the_headers_is_refused():
    with pytest.raises(ValueError, match="line break"):
        answer(Forwarding({"x-bad": "a\r\nx-injected: 1"}, [], None, {}))


def test_a_first_meter_post_carries_the_response_head():
    status, headers, body = response_head(
        b":status: 200\ncontent-type: text/event-stream\nset-cookie: a=1\nset-cookie: b=2"
        b"\n\ndata: {\"x\": 1}\n\n")
    assert status == 200 and body == b'data: {"x": 1}\n\n'
    assert headers["content-type"] == "text/event-stream" and ":status" not in headers
    for payload in (b":status: 200\ncontent-type: x", b"content-type: x\n\nbody",
                    b":status: OK\n\nbody"):
        with pytest.raises(BadRequest):
            response_head(payload)


@pytest.mark.parametrize("head", [
    b"POST /meter HTTP/1.1\r\nx-tollgate-seq: 0\r\n\r\n",  # no request id
    b"POST /meter HTTP/1.1\r\nx-tollgate-request: r\r\nx-tollgate-seq: one\r\n\r\n",
    b"GET /meter HTTP/1.1\r\n\r\n",
    b"POST /elsewhere HTTP/1.1\r\n\r\n",
])
def test_what_the_meter_never_posts_is_refused(head):
    from extproc.decider import Decider, _head

    with pytest.raises(BadRequest):
        Decider(None)._meter(_head(head), b"")  # type: ignore[arg-type]


class _Processor:
    """Decides by the client's path (`/slow` takes a while, `/boom` raises, `/now` is
    decided at once, like a request decided before, `/soon` once its store answers), and
    records what it did in order."""

    def __init__(self) -> None:
        self.done: list[tuple] = []
        self.heads: list[str | None] = []  # what each request decided at once was named

    def decide_now(self, req):
        self.heads.append(req.head)
        if req.path == "/now-boom":
            raise RuntimeError("a fault in the decision made at once")
        if req.path != "/now":
            return None
        self.done.append(("decided now", "/now"))
        return Forwarding({":path": "/now"}, [], req.body, {"request_id": "now"})

    async def decide_soon(self, req):
        """`/soon`: decided from its precedent once the store has answered (Redis's way)."""
        if req.path != "/soon":
            return None
        await asyncio.sleep(0.05)
        self.done.append(("decided soon", "/soon"))
        return Forwarding({":path": "/soon"}, [], req.body, {"request_id": "soon"})

    async def decide(self, headers, body, declared):
        path = headers[":path"]
        if path == "/boom":
            raise RuntimeError("a fault in the decision")
        if path == "/slow":
            await asyncio.sleep(0.2)
        self.done.append(("decided", path))
        return Reply(200, {}, f"{path} {body!r}".encode(), {})

    def metered(self, request_id, seq, last, data, head=None, first_byte=None):
        self.done.append(("metered", request_id, seq, last, data))
        if first_byte is not None:
            self.done.append(("first byte", first_byte))

    def attempt(self, request_id, provider, status):
        self.done.append(("attempt", request_id, provider, status))
        return Forwarding({":path": f"/{provider}", "authorization": "Bearer sk"}, ["x-api-key"],
                          b"its own" if provider == "b" else None, {"provider": provider})


def _decide(path: str, body: bytes = b"", client_head: bytes = b"") -> bytes:
    head = _b64(f":method: POST\n:path: {path}".encode() + client_head).encode()
    return (b"POST /decide HTTP/1.1\r\nx-tollgate-body: whole\r\nx-tollgate-head: %b\r\n"
            b"x-tollgate-filters: %b\r\ncontent-length: %d\r\n\r\n"
            % (head, FILTERS_VERSION.encode(), len(body))) + body


def _meter(seq: int, extra: bytes = b"") -> bytes:
    payload = b":status: 200\n\n{}" if seq == 0 else b"more"
    return (b"POST /meter HTTP/1.1\r\nx-tollgate-request: r1\r\nx-tollgate-seq: %d\r\n"
            b"%bcontent-length: %d\r\n\r\n" % (seq, extra, len(payload))) + payload


def _attempt(provider: str, status: str) -> bytes:
    return (b"POST /attempt HTTP/1.1\r\nx-tollgate-request: r1\r\nx-tollgate-provider: %s\r\n"
            b"x-tollgate-status: %s\r\ncontent-length: 0\r\n\r\n" % (provider.encode(),
                                                                    status.encode()))


async def _answers(reader: asyncio.StreamReader, n: int) -> list[tuple[str, bytes]]:
    out = []
    for _ in range(n):
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        status = head.split(b" ", 2)[1].decode()
        length = int(_headers(head).get("content-length", "0"))
        out.append((status, await reader.readexactly(length)))
    return out


@pytest.fixture
async def decider(tmp_path):
    from extproc.decider import start_decider
    from extproc.listen import Listener

    processor = _Processor()
    sock = tmp_path / "d" / "decide.sock"
    server = await start_decider(processor, Listener(f"unix:{sock}"))  # type: ignore[arg-type]
    yield processor, sock
    server.close()


async def test_requests_are_answered_in_order_however_their_bytes_arrive(decider):
    processor, sock = decider
    reader, writer = await asyncio.open_unix_connection(str(sock))
    # Byte by byte; then, in one write, a slow decision and the requests behind it, which
    # wait for its answer (Envoy never sends them so, but a connection answers in order).
    for byte in _decide("/a", b"{}"):
        writer.write(bytes([byte]))
        await writer.drain()
    writer.write(_decide("/slow") + _meter(0) + _meter(1) + _decide("/b", b"x"))
    assert await _answers(reader, 5) == [
        ("200", b"/a b'{}'"), ("200", b"/slow b''"), ("204", b""), ("204", b""),
        ("200", b"/b b'x'")]
    assert processor.done == [
        ("decided", "/a"), ("decided", "/slow"), ("metered", "r1", 0, False, b"{}"),
        ("metered", "r1", 1, False, b"more"), ("decided", "/b")]
    writer.close()


async def test_a_request_decided_at_once_is_answered_in_its_turn(decider):
    """A request like one decided before is decided in the read that brought it, and
    answered in its turn: after a slow decision ahead of it, before the ones behind it."""
    processor, sock = decider
    reader, writer = await asyncio.open_unix_connection(str(sock))
    writer.write(_decide("/slow") + _decide("/now", b"{}") + _decide("/b", b"x"))
    answers = await _answers(reader, 3)
    assert [status for status, _ in answers] == ["200", "200", "200"]
    assert answers[0][1] == b"/slow b''" and answers[1][1] == b"{}"
    assert answers[2][1] == b"/b b'x'"
    assert processor.done == [("decided", "/slow"), ("decided now", "/now"),
                              ("decided", "/b")]
    # Each is named by its client head as the filter encoded it (`Request.head`).
    assert processor.heads == [_b64(f":method: POST\n:path: {p}".encode())
                               for p in ("/slow", "/now", "/b")]


async def test_a_request_decided_from_its_precedent_once_the_store_answers_keeps_its_turn(
        decider):
    """A request of a known head that its store admits over the network (`decide_soon`) is
    answered in its turn: the requests behind it wait for it; one it does not match goes on
    to the full decision."""
    processor, sock = decider
    reader, writer = await asyncio.open_unix_connection(str(sock))
    writer.write(_decide("/soon", b"{}") + _decide("/now", b"[]") + _decide("/b", b"x"))
    answers = await _answers(reader, 3)
    assert answers == [("200", b"{}"), ("200", b"[]"), ("200", b"/b b'x'")]
    assert processor.done == [("decided soon", "/soon"), ("decided now", "/now"),
                              ("decided", "/b")]
    writer.close()
    writer.close()


async def test_a_decision_made_at_once_that_fails_is_answered_500_and_the_connection_serves_on(
        decider):
    processor, sock = decider
    assert processor.done == []
    reader, writer = await asyncio.open_unix_connection(str(sock))
    writer.write(_decide("/now-boom", b"{}") + _decide("/b", b"x"))
    assert await _answers(reader, 2) == [("500", b""), ("200", b"/b b'x'")]
    assert processor.done == [("decided", "/b")]
    writer.close()


async def test_a_streams_first_post_says_when_its_first_bytes_came(decider):
    """Envoy's meter posts a stream's first bytes with a later batch: its first post says
    when they came (microseconds since the epoch), and only that post's time is taken."""
    processor, sock = decider
    reader, writer = await asyncio.open_unix_connection(str(sock))
    writer.write(_meter(0, b"x-tollgate-first-byte: 1796390000123456\r\n")
                 + _meter(1, b"x-tollgate-first-byte: 1\r\n"))
    assert await _answers(reader, 2) == [("204", b""), ("204", b"")]
    assert processor.done == [("metered", "r1", 0, False, b"{}"),
                              ("first byte", 1796390000.123456),
                              ("metered", "r1", 1, False, b"more")]
    writer.close()


@pytest.mark.parametrize("behind_a_slow_one", [False, True])
async def test_a_large_body_is_read_whole_however_its_reads_come(decider, behind_a_slow_one):
    """A body past `LARGE` is kept as its reads come and joined once: whole, in order, and
    the request whose first bytes came with its last is served after it."""
    from extproc.decider import LARGE

    processor, sock = decider
    reader, writer = await asyncio.open_unix_connection(str(sock))
    body = bytes(i % 251 for i in range(4 * LARGE + 7))
    sent = (_decide("/slow") if behind_a_slow_one else b"") + _decide("/large", body)
    cut = len(sent) - len(body) + 10  # the head and ten bytes, then uneven reads
    writer.write(sent[:cut])
    await writer.drain()
    for at in range(cut, len(sent), 70_001):
        piece = sent[at:at + 70_001]
        if at + 70_001 >= len(sent):
            piece += _meter(0) + _decide("/after", b"x")
        writer.write(piece)
        await writer.drain()
        await asyncio.sleep(0.01)
    answers = await _answers(reader, 4 if behind_a_slow_one else 3)
    assert answers[-3:] == [("200", b"/large " + repr(body).encode()), ("204", b""),
                            ("200", b"/after b'x'")]
    assert processor.done[-3:] == [("decided", "/large"),
                                   ("metered", "r1", 0, False, b"{}"), ("decided", "/after")]
    writer.close()


async def test_each_attempt_of_a_fallback_plan_gets_its_providers_changes(decider):
    """The attempt filter names the request, the provider Envoy chose and the status of the
    attempt before (none for the first); the answer is written as a decision is, at once."""
    processor, sock = decider
    reader, writer = await asyncio.open_unix_connection(str(sock))
    writer.write(_attempt("a", "") + _attempt("b", "503"))
    first, second = await _answers(reader, 2)
    assert first == ("200", b"") and second == ("200", b"its own")
    assert processor.done == [("attempt", "r1", "a", None), ("attempt", "r1", "b", 503)]
    writer.close()
    protocol, transport = Decider(processor), _Transport()  # type: ignore[arg-type]
    protocol.connection_made(transport)  # type: ignore[arg-type]
    protocol.data_received(_attempt("a", ""))  # answered in the read that brought it
    headers = _headers(transport.sent[0])
    assert (headers["x-tollgate-path"], headers["x-tollgate-set-authorization"],
            headers["x-tollgate-remove"], headers["x-tollgate-meta-provider"]) == \
        ("/a", "Bearer sk", "x-api-key", "a")
    assert "x-tollgate-body" not in headers
    protocol.data_received(_attempt("b", "5xx"))  # not a status: the filter never sends it
    assert transport.sent[-1].startswith(b"HTTP/1.1 400 ") and transport.closed


class _Transport:
    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.sent.append(data)

    def writelines(self, parts: list[bytes]) -> None:  # an answer, whole
        self.sent.append(b"".join(parts))

    def close(self) -> None:
        self.closed = True


async def test_a_decision_that_waits_for_nothing_is_answered_in_the_read_that_brought_it():
    # No turn of the loop between the request and its answer, where other callbacks (a
    # batch of settlements) would run first; one that waits keeps those behind it waiting.
    transport = _Transport()
    protocol = Decider(_Processor())  # type: ignore[arg-type]
    protocol.connection_made(transport)  # type: ignore[arg-type]
    protocol.data_received(_decide("/a") + _decide("/slow") + _decide("/b"))
    assert [a.rpartition(b"\r\n\r\n")[2] for a in transport.sent] == [b"/a b''"]
    await asyncio.wait_for(_until(lambda: len(transport.sent) == 3), 10)
    assert [a.rpartition(b"\r\n\r\n")[2] for a in transport.sent] == [
        b"/a b''", b"/slow b''", b"/b b''"]
    protocol.data_received(_decide("/c"))
    assert transport.sent[-1].endswith(b"/c b''")


async def _until(done) -> None:
    while not done():
        await asyncio.sleep(0.01)


async def test_a_client_head_as_large_as_envoys_listener_takes_is_decided(decider):
    """The client's head comes in base64, a third larger than the head itself: one at the
    listener's cap (MAX_HEADER_BYTES) still fits the decision request's."""
    from tollgate.request import MAX_HEADER_BYTES

    _, sock = decider
    reader, writer = await asyncio.open_unix_connection(str(sock))
    big = b"\nx-big: " + b"a" * (MAX_HEADER_BYTES - 100)
    writer.write(_decide("/big", b"{}", big))
    assert await _answers(reader, 1) == [("200", b"/big b'{}'")]
    writer.close()


async def test_a_decision_that_fails_is_answered_500_and_the_connection_serves_on(decider):
    _, sock = decider
    reader, writer = await asyncio.open_unix_connection(str(sock))
    writer.write(_decide("/boom") + _decide("/after"))
    assert await _answers(reader, 2) == [("500", b""), ("200", b"/after b''")]
    writer.close()


@pytest.mark.parametrize("sent", [
    b"GET /decide HTTP/1.1\r\n\r\n",
    b"POST /decide HTTP/1.1\r\ncontent-length: -1\r\n\r\n",
    b"POST /decide HTTP/1.1\r\nx-tollgate-body: partly\r\ncontent-length: 3\r\n\r\na\n\n",
    b"POST /decide HTTP/1.1\r\nx-long: " + b"a" * (140 * 1024),  # a head with no end
    # A whole, well-formed decision request, but with a head over 128 KiB.
    _decide("/a").replace(b"\r\n\r\n", b"\r\nx-long: " + b"a" * (140 * 1024) + b"\r\n\r\n",
                           1),
    _decide("/a").replace(b"x-tollgate-head: ", b"x-tollgate-head: *"),  # not base64
    _decide("/a").replace(b"x-tollgate-head: ", b"x-tollgate-nohead: "),
])
async def test_what_the_filters_never_send_is_answered_400_and_the_connection_closed(
        decider, sent):
    _, sock = decider
    reader, writer = await asyncio.open_unix_connection(str(sock))
    writer.write(sent)
    assert await _answers(reader, 1) == [("400", b"")]
    assert await asyncio.wait_for(reader.read(), 10) == b""  # closed
    writer.close()


@pytest.mark.parametrize("named", [b"0123456789ab", b""])
async def test_a_decision_from_filters_of_another_version_is_refused_loudly(decider, caplog,
                                                                          named):
    """Envoy running the filters another tollgate rendered (or filters from before they
    named their version) would meter and settle by other rules: nothing of theirs is
    decided, and the log says which versions met and what to apply."""
    processor, sock = decider
    ours = b"x-tollgate-filters: " + FILTERS_VERSION.encode() + b"\r\n"
    theirs = b"x-tollgate-filters: " + named + b"\r\n" if named else b""
    reader, writer = await asyncio.open_unix_connection(str(sock))
    writer.write(_decide("/a").replace(ours, theirs))
    assert await _answers(reader, 1) == [("400", b"")]
    assert await asyncio.wait_for(reader.read(), 10) == b""  # closed
    writer.close()
    assert processor.done == []  # not decided
    [record] = [r for r in caplog.records if r.levelname == "ERROR"]
    said = record.getMessage()
    assert f"another version ({named.decode() or 'none named'}; this service's are " \
           f"{FILTERS_VERSION})" in said
    assert "`tollgate envoy render`" in said and "`tollgate envoy k8s istio`" in said
    # Filters of this version, on a connection of their own, are decided.
    reader, writer = await asyncio.open_unix_connection(str(sock))
    writer.write(_decide("/a"))
    assert await _answers(reader, 1) == [("200", b"/a b''")]
    writer.close()


def test_refusals_are_said_once_in_a_while_with_how_many_went_unsaid(caplog):
    """An Envoy with another version's filters sends every request to be refused: the log
    says so once every EVERY seconds, not once per request."""
    from extproc.decider import Refusals

    clock = [100.0]
    refusals = Refusals(clock=lambda: clock[0])
    said = lambda: [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]  # noqa: E731
    for _ in range(3):
        refusals.refused(BadRequest("filters of another version"))
    assert len(said()) == 1 and "more refused" not in said()[0]
    clock[0] += Refusals.EVERY - 0.1
    refusals.refused(BadRequest("filters of another version"))
    assert len(said()) == 1
    clock[0] += 0.1
    refusals.refused(BadRequest("filters of another version"))
    assert len(said()) == 2
    assert "(filters of another version; 3 more refused since the last said so)" in said()[1]
    assert "`tollgate envoy render`" in said()[1]
    clock[0] += Refusals.EVERY
    refusals.refused(BadRequest("a chunked request"))
    assert len(said()) == 3 and "more refused" not in said()[2]


async def test_the_connections_of_a_decision_service_share_its_refusals_log(
        decider, caplog, monkeypatch):
    """Each refusal closes its connection, and Envoy opens another for the next request:
    what the log leaves out is counted across them."""
    from extproc.decider import Refusals

    monkeypatch.setattr(Refusals, "EVERY", float("inf"))
    _, sock = decider
    ours = b"x-tollgate-filters: " + FILTERS_VERSION.encode() + b"\r\n"
    for _ in range(3):
        reader, writer = await asyncio.open_unix_connection(str(sock))
        writer.write(_decide("/a").replace(ours, b"x-tollgate-filters: 0ther\r\n"))
        assert await _answers(reader, 1) == [("400", b"")]
        writer.close()
    assert len([r for r in caplog.records if r.levelname == "ERROR"]) == 1


def test_the_filters_version_is_every_scripts_and_the_decide_filter_names_it(tmp_path,
                                                                            monkeypatch):
    """A change to any script Envoy runs (the exchange, the metadata the access log
    carries), or to what the decisions rely on the routes for, makes another version, and
    the decide filter names the one rendered."""
    from extproc import envoy_config

    here = Path(envoy_config.__file__).parent
    assert set(envoy_config.SCRIPTS) == set(here.glob("*.lua"))
    copies = []
    for script in envoy_config.SCRIPTS:
        copies.append(tmp_path / script.name)
        copies[-1].write_bytes(script.read_bytes())
    assert envoy_config.filters_version(copies) == FILTERS_VERSION
    versions = set()
    for copy in copies:
        source = copy.read_text()
        copy.write_text(source + "\n-- changed\n")
        versions.add(envoy_config.filters_version(copies))
        copy.write_text(source)
    assert len(versions) == len(copies) and FILTERS_VERSION not in versions
    monkeypatch.setattr(envoy_config, "ROUTES_SUPPLY", b"something else\0")
    assert envoy_config.filters_version(copies) not in {FILTERS_VERSION, *versions}
    monkeypatch.undo()
    lua = envoy_config.decide_filter(1024)["typed_config"]["default_source_code"]
    assert f'local FILTERS = "{FILTERS_VERSION}"' in lua["inline_string"]
    assert '["x-tollgate-filters"] = FILTERS' in lua["inline_string"]


async def test_each_full_decision_has_headers_of_its_own(tmp_path):
    """A head decoded once serves every request that sends it: what one decision does to
    its headers reaches no other request of the head."""
    from extproc.decider import start_decider
    from extproc.listen import Listener

    class Changing(_Processor):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[dict[str, str]] = []

        async def decide(self, headers, body, declared):
            self.seen.append(dict(headers))
            headers["x-added"] = "by one request"
            headers.pop(":path")
            return Reply(200, {}, b"", {})

    processor = Changing()
    sock = tmp_path / "d" / "decide.sock"
    server = await start_decider(processor, Listener(f"unix:{sock}"))  # type: ignore[arg-type]
    reader, writer = await asyncio.open_unix_connection(str(sock))
    writer.write(_decide("/a", b"{}") + _decide("/a", b"{}"))
    await _answers(reader, 2)
    assert processor.seen == [{":method": "POST", ":path": "/a"}] * 2
    writer.close()
    server.close()
