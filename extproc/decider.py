"""The decision service: Envoy's `tollgate.decide` Lua filter (decide.lua) asks it over plain
HTTP/1.1, once per request, and applies the answer itself; `tollgate.meter` (meter.lua)
copies each forwarded request's response to it.

A gRPC stream per request cost several times the decision it carried (stream set-up in
grpcio, five messages); one keep-alive HTTP exchange costs a read and a write. The exchange:

    POST /decide     x-tollgate-body: none | whole | unread
                     x-tollgate-head: <the client's headers, "name: value" a line,
                                       pseudo-headers included; base64>
                     x-tollgate-filters: <the version of tollgate's filters>
    <the client's body>

`x-tollgate-filters` names the scripts Envoy runs (`envoy_config.FILTERS_VERSION`). A decision
from filters of another version is refused (400, the connection closed; the client gets 500),
loudly (`Refusals`): they would speak another exchange or leave the response's end where this
service does not read it, and every answer would be settled wrong or not at all. Envoy's
config rendered by one tollgate and its decision service from another (an Envoy a team runs
itself, not rendered again after an upgrade; an EnvoyFilter applied apart from its image) is
a mistake to see at the first request, not in the ledger a month later.

The client's head leaves out what differs on every request and the decision does not read:
Envoy's request id (the gateway names its own), and the value of the body's length unless
the body is `unread` (a whole body's is its own): an empty `content-length` says the client
declared one, which the request keeps unless its body is replaced. An app's requests then
send the same head, which is decoded once (`ClientHeads`).

`unread`: its content-length is over `gateway.max_body_bytes`, so Envoy did not read it and
the request is refused from its headers. The answer is 200 with the decision in
`x-tollgate-*` headers:

- forward: `x-tollgate-set-<name>` headers to set (`x-tollgate-path` and
  `x-tollgate-authority` for the pseudo-headers), `x-tollgate-remove` (a comma-separated
  list), `x-tollgate-meta-<key>` dynamic metadata (namespace `tollgate`), and
  `x-tollgate-body: replaced` when the answer's body is the body to send;
- reply: `x-tollgate-reply: <status>`, the reply's headers as `x-tollgate-set-<name>`, its
  body as the answer's body.

The meter's posts, fire-and-forget, a few per long stream (a response's end, and most
responses whole, come in Envoy's access log instead: see meter.lua):

    POST /meter      x-tollgate-request: <request id>   x-tollgate-seq: 0, 1, ...
                     x-tollgate-first-byte: <microseconds since the epoch> (a stream's
                                            first post: when its first bytes came)
    <seq 0 only: the response's head, "name: value" a line (:status too), an empty line>
    <the response's bytes since the previous post>

Posts may arrive out of order (Envoy sends each on any free connection); `seq` puts them back
in order, the access log's report of the end after them. Each is answered 204.

Each attempt of a fallback plan (`tollgate.attempt`, attempt.lua) asks for its changes:

    POST /attempt    x-tollgate-request: <request id>   x-tollgate-provider: <provider id>
                     x-tollgate-status: <the status of the attempt before it; empty if none>

answered as a decision is: the provider's credentials, path, host and body to set, and the
metadata that names it on the response; or the gateway's reply.

Anything else is answered 400 and the connection closed; the decide filter then answers the
client 500 (503 only when the service cannot be reached or is too slow).
"""

from __future__ import annotations

import asyncio
import binascii
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from extproc.envoy_config import FILTERS_VERSION
from extproc.heads import BadRequest, head_lines, response_head
from extproc.listen import Listener, private_socket, restrict
from extproc.service import ExternalProcessor, Forwarding, Replaying
from tollgate.request import MAX_HEADER_BYTES, Reply, Request, lower_headers

log = logging.getLogger("tollgate.extproc")

DECIDE, METER, ATTEMPT = b"/decide", b"/meter", b"/attempt"
BODY_HEADER, HEAD_HEADER = b"x-tollgate-body", b"x-tollgate-head"
FILTERS_HEADER = b"x-tollgate-filters"
PREFIX = "x-tollgate-"
# The filters' own request heads: a few short headers, and a decision's the client's head
# (at most MAX_HEADER_BYTES, as Envoy's listener is rendered) in base64.
MAX_HEAD = 2 * MAX_HEADER_BYTES
# Envoy opens a connection per decision in flight: a burst of hundreds must queue, not be
# refused (asyncio's default backlog is 100; the kernel caps it at somaxconn).
BACKLOG = 4096


def _lines(headers: list[tuple[str, str]]) -> str:
    """Header lines, each ended by CRLF; a value that would break out of its line is
    refused (ValueError)."""
    text = "".join([f"{k}: {v}\r\n" for k, v in headers])
    if text.count("\n") != len(headers) or "\0" in text:
        raise ValueError("a header value holds a line break or NUL")
    return text


def _encode(status: int, headers: list[tuple[str, str]], body: bytes, shared: str = ""
            ) -> list[bytes]:
    """An HTTP answer, as its head and its body: written together (`writelines`), not
    joined first, which would copy a body of a MiB for nothing. `shared`: header lines
    made before (`_lines`), ahead of `headers`."""
    head = (f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}\r\n{shared}"
            f"{_lines(headers)}content-length: {len(body)}\r\n\r\n")
    encoded = head.encode("utf-8", "surrogateescape")
    return [encoded, body] if body else [encoded]


def _forwarding(set_headers: dict[str, str], removed: list[str], metadata: dict[str, str]
                ) -> list[tuple[str, str]]:
    """The headers of an answer that forwards (see the module's docstring)."""
    out: list[tuple[str, str]] = []
    for name, value in set_headers.items():
        if name in (":path", ":authority"):
            out.append((f"{PREFIX}{name[1:]}", value))
        else:
            out.append((f"{PREFIX}set-{name.lower()}", value))
    if removed:
        out.append((f"{PREFIX}remove", ", ".join(removed)))
    out += [(f"{PREFIX}meta-{k}", v) for k, v in metadata.items()]
    return out


def answer(decision: Reply | Forwarding | Replaying) -> list[bytes]:
    """The HTTP answer that tells the filter what to do (see `_encode`)."""
    if isinstance(decision, Replaying):
        return _replayed(decision)
    if isinstance(decision, Reply):
        headers = [(f"{PREFIX}reply", str(decision.status)), (f"{PREFIX}meta-answered", "1"),
                   *((f"{PREFIX}set-{k.lower()}", v) for k, v in decision.headers.items())]
        return _encode(200, headers, decision.body)
    out = _forwarding(decision.set_headers, decision.remove_headers, decision.metadata)
    if decision.body is not None:
        out.append((f"{PREFIX}body", "replaced"))
    return _encode(200, out, decision.body or b"")


# The sets of names requests decided from one precedent set themselves, kept for it: a few
# (a budget warning or not); past this many, one not seen before starts them again.
MAX_SHARED = 8


def _replayed(r: Replaying) -> list[bytes]:
    """The answer of a request decided from a precedent, the same as `answer` makes of it as
    one `Forwarding` (`Replaying.forwarding`): the precedent's lines this request does not
    set itself are encoded once, not merged and encoded again for each request."""
    made = r.made
    names = (tuple(r.set_headers), tuple(r.metadata))
    shared = made.shared.get(names)
    if shared is None:
        f, own, own_fields = made.forwarding, set(names[0]), {*names[1], "budget_warning"}
        shared = _lines(_forwarding(
            {k: v for k, v in f.set_headers.items() if k not in own}, f.remove_headers,
            {k: v for k, v in f.metadata.items() if k not in own_fields}))
        if len(made.shared) >= MAX_SHARED:
            made.shared.clear()
        made.shared[names] = shared
    out = _forwarding(r.set_headers, [], r.metadata)
    if r.body is not None:
        out.append((f"{PREFIX}body", "replaced"))
    return _encode(200, out, r.body or b"", shared)


@dataclass
class Head:
    """What the filters' request heads say: which service, the body's length, and the
    `x-tollgate-*` fields."""

    path: bytes
    length: int
    fields: dict[bytes, str]


def _head(head: bytes) -> Head:
    lines = head.split(b"\r\n")
    method, _, rest = lines[0].partition(b" ")
    path = rest.partition(b" ")[0]
    if method != b"POST" or path not in (DECIDE, METER, ATTEMPT):
        raise BadRequest(f"not a decision, attempt or meter request: {lines[0][:80]!r}")
    length, fields = 0, {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value.strip())
            if length < 0:
                raise BadRequest("a negative content-length")
        elif name.startswith(b"x-tollgate-"):
            fields[name] = value.strip().decode("ascii", "replace")
        elif name == b"transfer-encoding":
            raise BadRequest("a chunked request")
    return Head(path, length, fields)


def client_request(head: str | None, body: bytes, kind: str
                   ) -> tuple[dict[str, str], bytes | None, int | None]:
    """The client's headers (from the base64 `head`), its body (None: it has none) and,
    for a body left unread, its declared size."""
    if head is None:
        raise BadRequest(f"a decision without the client's head ({HEAD_HEADER.decode()})")
    try:
        headers = lower_headers(head_lines(binascii.a2b_base64(head, strict_mode=True)))
    except binascii.Error as e:
        raise BadRequest(f"the client's head is not base64: {e}") from None
    if kind == "none":
        return headers, None, None
    if kind == "unread":
        declared = headers.get("content-length", "")
        if not declared.isdigit():
            raise BadRequest("an unread body with no content-length")
        return headers, None, int(declared)
    if kind != "whole":
        raise BadRequest(f"{BODY_HEADER.decode()}: {kind!r}")
    return headers, body, None


@dataclass(frozen=True)
class ClientHead:
    """A client head, decoded: its headers (pseudo-headers too) and the request it names,
    with no body (`Request.with_body` gives each request its own). Shared by the requests
    that send it: not to be changed."""

    headers: dict[str, str]
    request: Request


class ClientHeads:
    """The client heads of whole-body decisions, decoded: an app sends the same head with
    each request (its key, its SDK's headers), which is decoded once, not on every
    request. Shared by the service's connections; the oldest goes past `MAX`. (A head
    holds the key its client presented: kept in this process's memory, as while a request
    is decided, and never written anywhere; the key is still checked on every request.)"""

    MAX = 256

    def __init__(self) -> None:
        self._decoded: dict[str, ClientHead] = {}

    def decoded(self, head: str) -> ClientHead:
        """The client head `head` (base64), decoded (BadRequest: it is not one)."""
        found = self._decoded.get(head)
        if found is None:
            headers = client_request(head, b"", "whole")[0]
            found = ClientHead(headers, ExternalProcessor.request_of(headers, b"", head=head))
            if len(self._decoded) >= self.MAX:
                del self._decoded[next(iter(self._decoded))]
            self._decoded[head] = found
        return found


class Refusals:
    """The log of what the filters sent that this service does not read: one line every
    EVERY seconds at most, the first refusal since, with how many the lines before it left
    out. An Envoy running another version's filters sends every request here: a line each
    would bury the log (and the disk) under the same line at the rate of the traffic.
    Shared by the service's connections (each refusal closes its own)."""

    EVERY = 10.0

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._said_at: float | None = None
        self._unsaid = 0

    def refused(self, e: Exception) -> None:
        now = self.clock()
        if self._said_at is not None and now - self._said_at < self.EVERY:
            self._unsaid += 1
            return
        more = f"; {self._unsaid} more refused since the last said so" if self._unsaid else ""
        log.error("a filter sent what the decision service does not read (%s%s): render "
                  "Envoy's configuration again with this tollgate (`tollgate envoy render`; "
                  "on Istio, apply the EnvoyFilter of `tollgate envoy k8s istio`)", e, more)
        self._said_at, self._unsaid = now, 0


NO_CONTENT = b"HTTP/1.1 204 No Content\r\n\r\n"
# A body past this size is kept as its reads came and joined once it is whole: grown in the
# buffer a read at a time, a 1 MiB body was copied several times over, and the memory it
# gave back made the next one fault its pages in again.
LARGE = 64 * 1024


class Decider(asyncio.Protocol):
    """Serves the filters' requests on one keep-alive connection, one after another, as a
    protocol rather than a stream reader: a meter post or an attempt is answered inside
    `data_received` with no task, and a decision costs one task, started eagerly, not a
    reader's coroutines per read."""

    def __init__(self, processor: ExternalProcessor, heads: ClientHeads | None = None,
                 refusals: Refusals | None = None) -> None:
        self.processor = processor
        self.heads = heads if heads is not None else ClientHeads()
        self.refusals = refusals if refusals is not None else Refusals()
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        # A large body under way: its request's head, its bytes as they came (joined once,
        # not grown a read at a time) and how many are still to come.
        self.large: tuple[Head, list[bytes]] | None = None
        self.missing = 0
        self.deciding: asyncio.Task[None] | None = None  # answers go back in order
        self.loop: asyncio.AbstractEventLoop | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's: no subclass
        self.loop = asyncio.get_running_loop()

    def connection_lost(self, exc: Exception | None) -> None:
        # A decision under way runs to its end (its admission is not cut in half); its
        # answer goes nowhere, and Envoy answers the client 503.
        self.transport = None

    def data_received(self, data: bytes) -> None:
        if self.large is not None:
            self._take_large(*self.large, data)
            return
        self.buffer += data
        if self.deciding is None:
            self._serve()

    def _take_large(self, head: Head, parts: list[bytes], data: bytes) -> None:
        parts.append(data)
        self.missing -= len(data)
        if self.missing > 0:
            return
        joined = b"".join(parts)
        self.large = None
        if self.missing < 0:  # the next request's first bytes came with its last
            self.buffer += joined[self.missing:]
            joined = joined[:self.missing]
        if self._handle(head, joined):
            self._serve()

    def _serve(self) -> None:
        """Answer every whole request in the buffer, until one needs a decision."""
        while self.transport is not None and self.deciding is None:
            end = self.buffer.find(b"\r\n\r\n")
            try:
                if end > MAX_HEAD or (end < 0 and len(self.buffer) > MAX_HEAD):
                    raise BadRequest(f"a request head over {MAX_HEAD // 1024} KiB")
                if end < 0:
                    return
                head = _head(bytes(self.buffer[:end]))
            except (BadRequest, ValueError) as e:
                self._refuse(e)
                return
            start = end + 4
            if len(self.buffer) - start < head.length:
                if head.length > LARGE:
                    self.large = (head, [bytes(self.buffer[start:])])
                    self.missing = head.length - (len(self.buffer) - start)
                    self.buffer.clear()
                return
            with memoryview(self.buffer) as view:  # one copy of a body, not two
                payload = bytes(view[start:start + head.length])
            del self.buffer[:start + head.length]
            if not self._handle(head, payload):
                return

    def _handle(self, head: Head, payload: bytes) -> bool:
        """One whole request: a meter post or an attempt answered at once, or a decision
        started. Whether the next can be served now (False: the decision is under way, or
        the connection was refused)."""
        assert self.transport is not None
        try:
            if head.path == METER:
                self._meter(head, payload)
                self.transport.write(NO_CONTENT)
                return True
            if head.path == ATTEMPT:
                self.transport.writelines(answer(self._attempt(head)))
                return True
            filters = head.fields.get(FILTERS_HEADER)
            if filters != FILTERS_VERSION:
                raise BadRequest(f"a decision from tollgate filters of another version "
                                 f"({filters or 'none named'}; this service's are "
                                 f"{FILTERS_VERSION}): Envoy runs a configuration another "
                                 "tollgate rendered")
            kind = head.fields.get(BODY_HEADER, "whole")
            client = head.fields.get(HEAD_HEADER)
            known = self.heads.decoded(client) if kind == "whole" and client else None
            if known is None:
                headers, body, declared = client_request(client, payload, kind)
        except (BadRequest, ValueError) as e:
            self._refuse(e)
            return False
        if known is not None:  # like a request decided before: decided here and now
            try:
                decided = self.processor.decide_now(known.request.with_body(payload))
                now = None if decided is None else answer(decided)
            except Exception:  # answered at once, as a decision that fails in `_decide` is
                log.exception("a request could not be decided")
                now = _encode(500, [], b"")
            if now is not None:
                self.transport.writelines(now)
                return True
            headers, body, declared = dict(known.headers), payload, None
            like = known.request.with_body(payload)
        else:
            like = None
        # Started eagerly: a decision that waits for nothing (the SQLite state, unless
        # another process holds its lock) is answered here, in this callback, with no
        # task scheduled and no turn of the loop (other callbacks first) in between.
        deciding = asyncio.Task(self._decide(headers, body, declared, like),
                                loop=self.loop, eager_start=True)
        if deciding.done():
            return True
        self.deciding = deciding
        deciding.add_done_callback(self._decided)
        return False

    def _refuse(self, e: Exception) -> None:
        assert self.transport is not None
        self.refusals.refused(e)
        self.transport.writelines(_encode(400, [("connection", "close")], b""))
        self.transport.close()
        self.transport = None

    def _decided(self, _: asyncio.Task[None]) -> None:
        self.deciding = None
        self._serve()  # requests that came while this one was decided

    async def _decide(self, headers: dict[str, str], body: bytes | None,
                      declared: int | None, like: Request | None = None) -> None:
        """Decides a request and answers it; `like`: a request of a known client head, which
        a store that reserves over the network decides from its precedent here."""
        reply = _encode(500, [], b"")  # the filter answers the client 500
        try:
            decision: Reply | Forwarding | Replaying | None = None
            if like is not None:
                decision = await self.processor.decide_soon(like)
            if decision is None:
                decision = await self.processor.decide(headers, body, declared)
        except Exception:  # answered at once, not left to time out as an outage
            log.exception("a request could not be decided")
        else:
            try:
                reply = answer(decision)
            except ValueError as e:
                log.error("a decision could not be put in HTTP headers: %s", e)
        if self.transport is not None:
            self.transport.writelines(reply)

    def _attempt(self, head: Head) -> Reply | Forwarding:
        status = head.fields.get(b"x-tollgate-status", "")
        if status and not status.isdigit():
            raise BadRequest(f"an attempt after a status that is not one: {status!r}")
        return self.processor.attempt(head.fields.get(b"x-tollgate-request", ""),
                                      head.fields.get(b"x-tollgate-provider", ""),
                                      int(status) if status else None)

    def _meter(self, head: Head, payload: bytes) -> None:
        request_id = head.fields.get(b"x-tollgate-request", "")
        seq = head.fields.get(b"x-tollgate-seq", "")
        if not request_id or not seq.isdigit():
            raise BadRequest("a meter post without its request id or sequence number")
        if seq == "0":
            status, headers, payload = response_head(payload)
            first_byte = head.fields.get(b"x-tollgate-first-byte", "")
            self.processor.metered(request_id, 0, False, payload, (status, headers),
                                   int(first_byte) / 1e6 if first_byte.isdigit() else None)
        else:
            self.processor.metered(request_id, int(seq), False, payload)


async def start_decider(processor: ExternalProcessor, where: Listener) -> asyncio.Server:
    """Listen where the decide filter calls, with the protections of ext_proc's listener:
    a Unix socket created 0600 in a 0700 directory, or TCP with mutual TLS (or in the clear
    when asked for by name)."""
    loop = asyncio.get_running_loop()
    heads, refusals = ClientHeads(), Refusals()

    def protocol() -> Decider:
        return Decider(processor, heads, refusals)

    if where.is_unix:
        with private_socket(where) as path:
            server = await loop.create_unix_server(protocol, path, backlog=BACKLOG)
        restrict(where)
        return server
    host, _, port = where.target.rpartition(":")
    if where.tls is None:
        log.warning("the decision service listens on TCP %s WITHOUT TLS (--insecure-tcp)",
                    where.target)
    return await loop.create_server(protocol, host.strip("[]"), int(port),
                                    ssl=where.tls.ssl_context() if where.tls else None,
                                    reuse_port=False, backlog=BACKLOG)
