"""The decision service: Envoy's `tollgate.decide` Lua filter (decide.lua) asks it over plain
HTTP/1.1, once per request, and applies the answer itself; `tollgate.meter` (meter.lua)
copies each forwarded request's response to it.

A gRPC stream per request cost several times the decision it carried (stream set-up in
grpcio, five messages); one keep-alive HTTP exchange costs a read and a write. The exchange:

    POST /decide                        x-tollgate-body: none | whole | unread
    <the client's headers, "name: value" a line, pseudo-headers included>
    <an empty line>
    <the client's body>

`unread`: its content-length is over `gateway.max_body_bytes`, so Envoy did not read it and
the request is refused from its headers. The answer is 200 with the decision in
`x-tollgate-*` headers:

- forward: `x-tollgate-set-<name>` headers to set (`x-tollgate-path` and
  `x-tollgate-authority` for the pseudo-headers), `x-tollgate-remove` (a comma-separated
  list), `x-tollgate-meta-<key>` dynamic metadata (namespace `tollgate`), and
  `x-tollgate-body: replaced` when the answer's body is the body to send;
- reply: `x-tollgate-reply: <status>`, the reply's headers as `x-tollgate-set-<name>`, its
  body as the answer's body.

The meter's posts, fire-and-forget, a few per response:

    POST /meter      x-tollgate-request: <request id>   x-tollgate-seq: 0, 1, ...
                     x-tollgate-end: 1 (on the last)
    <seq 0 only: the response's head, "name: value" a line (:status too), an empty line>
    <the response's bytes since the previous post>

Posts may arrive out of order (Envoy sends each on any free connection); `seq` puts them back
in order. Each is answered 204.

Anything else is answered 400 and the connection closed; the decide filter then answers the
client 500 (503 only when the service cannot be reached or is too slow).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from extproc.listen import Listener, private_socket, restrict
from extproc.service import ExternalProcessor, Forwarding
from tollgate.request import Reply, lower_headers

log = logging.getLogger("tollgate.extproc")

DECIDE, METER = b"/decide", b"/meter"
BODY_HEADER = b"x-tollgate-body"
PREFIX = "x-tollgate-"
MAX_HEAD = 64 * 1024  # the filter's own request head: a few short headers
# Envoy opens a connection per decision in flight: a burst of hundreds must queue, not be
# refused (asyncio's default backlog is 100; the kernel caps it at somaxconn).
BACKLOG = 4096


def _encode(status: int, headers: list[tuple[str, str]], body: bytes) -> bytes:
    lines = [f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}",
             *(f"{k}: {v}" for k, v in headers), f"content-length: {len(body)}", "", ""]
    head = "\r\n".join(lines)
    if head.count("\n") != len(lines) - 1 or "\0" in head:
        raise ValueError("a header value holds a line break or NUL")
    return head.encode("utf-8", "surrogateescape") + body


def answer(decision: Reply | Forwarding) -> bytes:
    """The HTTP answer that tells the filter what to do."""
    if isinstance(decision, Reply):
        headers = [(f"{PREFIX}reply", str(decision.status)), (f"{PREFIX}meta-answered", "1"),
                   *((f"{PREFIX}set-{k.lower()}", v) for k, v in decision.headers.items())]
        return _encode(200, headers, decision.body)
    out: list[tuple[str, str]] = []
    for name, value in decision.set_headers.items():
        if name in (":path", ":authority"):
            out.append((f"{PREFIX}{name[1:]}", value))
        else:
            out.append((f"{PREFIX}set-{name.lower()}", value))
    if decision.remove_headers:
        out.append((f"{PREFIX}remove", ", ".join(decision.remove_headers)))
    out += [(f"{PREFIX}meta-{k}", v) for k, v in decision.metadata.items()]
    if decision.body is not None:
        out.append((f"{PREFIX}body", "replaced"))
    return _encode(200, out, decision.body or b"")


class BadRequest(ValueError):
    """Not an exchange the decide filter sends (see the module's docstring)."""


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
    if method != b"POST" or path not in (DECIDE, METER):
        raise BadRequest(f"not a decision or a meter request: {lines[0][:80]!r}")
    length, fields = 0, {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value.strip())
        elif name.startswith(b"x-tollgate-"):
            fields[name] = value.strip().decode("ascii", "replace")
        elif name == b"transfer-encoding":
            raise BadRequest("a chunked request")
    return Head(path, length, fields)


def _lines(head: bytes) -> list[tuple[str, str]]:
    """"name: value" lines, as the filters send a head."""
    pairs = []
    for line in head.decode("utf-8", "surrogateescape").split("\n"):
        name, sep, value = line.partition(": ")
        if not sep:
            name, value = line.rstrip(":"), ""
        pairs.append((name, value))
    return pairs


def response_head(payload: bytes) -> tuple[int, dict[str, str], bytes]:
    """A first meter post: the response's status, its headers and the bytes after them."""
    head, sep, body = payload.partition(b"\n\n")
    if not sep:
        raise BadRequest("no end to the response's headers")
    headers = lower_headers(_lines(head))
    status = headers.pop(":status", "")
    if not status.isdigit():
        raise BadRequest(f"a response head without a status: {status!r}")
    return int(status), headers, body


def client_request(payload: bytes, kind: str) -> tuple[dict[str, str], bytes | None,
                                                       int | None]:
    """The client's headers, its body (None: it has none) and, for a body left unread,
    its declared size."""
    head, sep, body = payload.partition(b"\n\n")
    if not sep:
        raise BadRequest("no end to the client's headers")
    headers = lower_headers(_lines(head))
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


NO_CONTENT = b"HTTP/1.1 204 No Content\r\n\r\n"


class Decider:
    """Serves the filters' requests on one connection after another (keep-alive)."""

    def __init__(self, processor: ExternalProcessor) -> None:
        self.processor = processor

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = _head(await reader.readuntil(b"\r\n\r\n"))
                    payload = await reader.readexactly(head.length)
                    if head.path == METER:
                        self._meter(head, payload)
                        writer.write(NO_CONTENT)
                        continue
                    kind = head.fields.get(BODY_HEADER, "whole")
                    headers, body, declared = client_request(payload, kind)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return  # Envoy closed the connection
                except (asyncio.LimitOverrunError, BadRequest, ValueError) as e:
                    log.error("a filter sent what the decision service does not read (%s): "
                              "render Envoy's configuration again with `tollgate envoy "
                              "render`", e)
                    writer.write(_encode(400, [("connection", "close")], b""))
                    return
                decision = await self.processor.decide(headers, body, declared)
                try:
                    writer.write(answer(decision))
                except ValueError as e:  # the filter answers the client 500
                    log.error("a decision could not be put in HTTP headers: %s", e)
                    writer.write(_encode(500, [], b""))
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    def _meter(self, head: Head, payload: bytes) -> None:
        request_id = head.fields.get(b"x-tollgate-request", "")
        seq = head.fields.get(b"x-tollgate-seq", "")
        if not request_id or not seq.isdigit():
            raise BadRequest("a meter post without its request id or sequence number")
        last = head.fields.get(b"x-tollgate-end") == "1"
        if seq == "0":
            status, headers, payload = response_head(payload)
            self.processor.metered(request_id, 0, last, payload, (status, headers))
        else:
            self.processor.metered(request_id, int(seq), last, payload)


async def start_decider(processor: ExternalProcessor, where: Listener) -> asyncio.Server:
    """Listen where the decide filter calls, with the protections of ext_proc's listener:
    a Unix socket created 0600 in a 0700 directory, or TCP with mutual TLS (or in the clear
    when asked for by name)."""
    decider = Decider(processor)
    if where.is_unix:
        with private_socket(where) as path:
            server = await asyncio.start_unix_server(decider.serve, path, limit=MAX_HEAD,
                                                     backlog=BACKLOG)
        restrict(where)
        return server
    host, _, port = where.target.rpartition(":")
    if where.tls is None:
        log.warning("the decision service listens on TCP %s WITHOUT TLS (--insecure-tcp)",
                    where.target)
    return await asyncio.start_server(decider.serve, host.strip("[]"), int(port),
                                      ssl=where.tls.ssl_context() if where.tls else None,
                                      limit=MAX_HEAD, reuse_port=False,
                                      backlog=BACKLOG)
