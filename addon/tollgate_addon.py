"""tollgate as a mitmproxy addon.

    mitmdump --mode reverse:http://127.0.0.1:9@127.0.0.1:8090 --set connection_strategy=lazy \
        -s addon/tollgate_addon.py --set tollgate_config=config/gateway.yaml

Run in reverse mode with a placeholder upstream: the addon routes every request itself.
(Loopback, port 8090: beside `make run`, which takes 8080.)
Each flow carries the gateway's decision as its comment (and a mark when rejected), so
mitmweb shows who called what, which rule fired and which provider served.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import ssl
import sys
import uuid
import weakref
from collections.abc import Iterable, Mapping

import aiohttp
import httpx
from mitmproxy import ctx, exceptions, hooks, http
from mitmproxy import flow as mitm_flow
from mitmproxy.net.http import http1 as mitm_http1
from mitmproxy.proxy.layers import http as mitm_http_layer
from mitmproxy.proxy.layers.http import _http1 as _mitm_http1_layer
from mitmproxy.utils import asyncio_utils
from mitmproxy.utils.strutils import always_bytes
from yarl import URL

from addon import hook_table
from tollgate import headers as header_rules
from tollgate.admin import AdminServer
from tollgate.config.problems import ConfigError
from tollgate.errors import GatewayError
from tollgate.exchange import Exchange
from tollgate.gateway import Gateway
from tollgate.request import Attempt, Forward, Reply, Request, lower_headers
from tollgate.secrets import CREDENTIAL_HEADERS, mask

log = logging.getLogger("tollgate.mitmproxy")
# Each forwarded flow's exchange. Not in flow.metadata, which mitmproxy deep-copies whenever
# it saves a flow (`-w`) or shows one (an exchange holds the gateway, its store and locks).
_EXCHANGES: weakref.WeakKeyDictionary[http.HTTPFlow, Exchange] = weakref.WeakKeyDictionary()
HOST = "mitmproxy"  # its name among the hosts a precedent was forwarded on
_REFUSED = "tollgate_refused"  # answered from the headers, by the refusal sink
_OVERSIZED = "tollgate_oversized"  # a chunked body cut off at the cap: its size so far
_PAGE = "tollgate_page"  # the page mitmproxy will send for a provider it could not reach


# mitmweb's flow list shows a comment's first line only: it leads with what a developer scans
# for (the verdict, tokens, cost, provider, who), and the ids come last.
_LEADS = ("model", "provider", "principal")


def _lead(decision: dict) -> list[str]:
    return [str(decision[k]) for k in _LEADS if decision.get(k)]


def _details(decision: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in decision.items()
                    if k not in ("action", "code", "message", *_LEADS) and v is not None)


def _comment(decision: dict, summary: list[str] | None = None,
             more: list[str] | None = None) -> str:
    """`summary`: what the request came to (status, tokens, cost), once it has; `more`:
    lines between the verdict and the ids (fallbacks, budgets)."""
    if decision.get("action") == "reject":
        verdict = [f"REJECT {decision['code']}"]
    else:
        verdict = summary or [decision.get("action", "answer")]
    lines = ["tollgate: " + " · ".join([*verdict, *_lead(decision)])]
    if "message" in decision:
        lines.append(decision["message"])
    lines += more or []
    details = _details(decision)
    return "\n".join([*lines, details] if details else lines)


def _served_comment(exchange: Exchange) -> str:
    """The verdict and what the request came to: tokens, cost, fallbacks and budgets."""
    row = exchange.settlement.row
    if row is None:
        return _comment(exchange.decision())
    usage = f"{row.input_tokens + row.cached_input_tokens + row.cache_write_tokens} in / " \
            f"{row.output_tokens} out tokens" + ("" if row.usage_reported else " (estimated)")
    summary = [f"{row.status or '-'} {row.outcome}", usage, f"${row.cost_micros / 1e6:.6f}"]
    more = []
    if row.fallbacks:
        more.append(f"fallback: {row.fallbacks}")
    if exchange.settlement.error:
        more.append(f"error: {exchange.settlement.error}")
    billing = exchange.billing
    if billing.counters:
        more.append(f"budgets: {', '.join(billing.counters)}"
                    + (f" · warning: {billing.warning}" if billing.warning else ""))
    more.append(f"{row.latency_ms:.0f} ms")
    return _comment(exchange.decision(), summary, more)


def _edit(headers: http.Headers, remove: Iterable[str], sets: Mapping[str, str]) -> None:
    """Drop the headers named in `remove` and those `sets` replaces, then add `sets`: in
    one pass over the fields (mitmproxy's own lookups by name walk them all for each name,
    and a dict() of them walks them once for each)."""
    gone = {name.lower().encode() for name in (*remove, *sets)}
    kept = tuple(f for f in headers.fields if f[0].lower() not in gone) if gone else \
        headers.fields
    headers.fields = kept + tuple((always_bytes(name, "utf-8", "surrogateescape"),
                                   always_bytes(value, "utf-8", "surrogateescape"))
                                  for name, value in sets.items())


def point_at(req: http.Request, attempt: Attempt) -> None:
    """Send `req` to the attempt's provider, as mitmproxy's scheme, host, port, path and
    host_header setters would: its fields set on its data, then its Host header (HTTP/2's
    authority) once, where each of those setters rewrote both (10 µs a request, warm,
    against 2.3)."""
    data = req.data
    data.scheme, data.host, data.port = attempt.scheme.encode(), attempt.host, attempt.port
    data.path = attempt.path.encode("utf-8", "surrogateescape")
    if data.authority and not (req.is_http2 or req.is_http3):  # an absolute-form target
        req.authority = attempt.authority
    req.host_header = attempt.authority


def _show_served_address(flow: http.HTTPFlow, exchange: Exchange) -> None:
    """A fallback plan went upstream through the relay: show the provider that served it
    (or the last one tried)."""
    if flow.request.headers.pop(FallbackRelay.HEADER, None) is not None:
        a, req = exchange.attempt, flow.request
        req.scheme, req.host, req.port, req.path = a.scheme, a.host, a.port, a.path


def _show_called_address(flow: http.HTTPFlow) -> None:
    """A refused flow never went upstream: show the address the client called, not the
    reverse-mode placeholder (or the refusal sink)."""
    where = flow.client_conn.sockname
    if where:
        req = flow.request
        req.scheme, req.host, req.port = "http", where[0], where[1]
        req.headers.pop(RefusalSink.HEADER, None)


# Headers the fallback path's own client sets itself (its connection, the body's framing).
FRAMING = {"connection", "content-length", "transfer-encoding"}


# Answers up to this size (by their content-length) that the gateway passes on unchanged
# still stream to the client, and a copy is kept on the flow for mitmweb and `-w`; larger
# ones (or of unknown length) are not kept.
STREAM_BODIES_OVER = 1 << 20


def _large(headers: Mapping[str, str]) -> bool:
    """Over the size mitmproxy buffers, or of unknown length (`headers`: the provider's,
    lower-cased)."""
    length = headers.get("content-length", "")
    return not length.isdigit() or int(length) > STREAM_BODIES_OVER


def _unsized(flow: http.HTTPFlow) -> None:
    """An answer the gateway reshapes as it streams has a length of its own: the provider's
    is dropped, and an HTTP/1 client is sent it in chunks (mitmproxy sends a head as it is
    given, and would leave a client waiting for bytes a cut never sends)."""
    assert flow.response is not None
    headers = flow.response.headers
    if "content-length" in headers:
        del headers["content-length"]
        if flow.request.http_version.startswith("HTTP/1"):
            headers["transfer-encoding"] = "chunked"


def _client_gone(flow: http.HTTPFlow) -> bool:
    """The flow failed because the client hung up (HTTP/1 says so; for HTTP/2 the client's
    connection has ended)."""
    if flow.error is not None and flow.error.msg == "Client disconnected.":
        return True
    return flow.client_conn.timestamp_end is not None


# mitmproxy writes its own reply when it cannot reach the provider (or refuses a request
# it cannot parse), after the error hook and with no hook to change it: an HTML page no SDK
# can read. Its page maker is replaced by one that writes the gateway's JSON envelope.
_PAGE_CODES = {413: "payload_too_large", 502: "provider_unreachable",
               504: "provider_timeout"}


class _GatewayPage(str):
    """An error message that carries the gateway's own answer to the page maker (mitmproxy
    passes the message through unchanged), so the client gets the refusal's headers too."""

    reply: Reply | None = None


def _error_page(status_code: int, message: str = "") -> bytes:
    if isinstance(message, _GatewayPage) and message.reply is not None:
        reply = message.reply
        return mitm_http1.assemble_response(http.Response.make(
            reply.status, reply.body, {**reply.headers, "connection": "close"}))
    code = _PAGE_CODES.get(status_code, "invalid_request" if status_code < 500
                           else "gateway_error")
    text = {
        "payload_too_large": "Request body is over the gateway's limit "
                             "(gateway.max_body_bytes).",
        "provider_unreachable": f"The model provider could not be reached: {message}.",
        "provider_timeout": f"The model provider did not answer in time: {message}.",
    }.get(code, f"{message or 'The request could not be handled'}.")
    body = GatewayError(code, text).body_for_any_family()
    return mitm_http1.assemble_response(http.Response.make(status_code, body, {
        "content-type": "application/json", "connection": "close"}))


_mitm_http1_layer.make_error_response = _error_page


def _mitmproxys(owner: type, name: str):
    """mitmproxy's own `owner.name`, not what an earlier load of this script put there: a
    script mitmproxy reloads (edited while it runs) would otherwise wrap its own last
    version, and take each of its steps twice."""
    current = getattr(owner, name)
    return getattr(current, "_mitmproxys", current)


def _replace(owner: type, name: str, replacement) -> None:
    replacement._mitmproxys = _mitmproxys(owner, name)
    setattr(owner, name, replacement)


# The running gateway, for what mitmproxy does before (or without) a flow hook.
_running: list[Gateway] = []
_OVER_CAP = "Request body is over the gateway's limit (gateway.max_body_bytes)."
_REPLY = "tollgate_reply"  # the gateway's refusal of a flow mitmproxy answers itself
_body_size_check = _mitmproxys(mitm_http_layer.HttpStream, "check_body_size")


def _check_body_size(self, request: bool):
    """mitmproxy buffers a request body of unannounced size (chunked) whole before any hook
    sees it; this stops reading one at the gateway's cap and answers 413 at once."""
    buffered = len(self.request_body_buf)
    if request and _running and buffered > _running[0].max_body_bytes and self.flow.live:
        self.flow.error = mitm_flow.Error(_OVER_CAP)
        self.flow.metadata[_OVERSIZED] = buffered
        yield mitm_http_layer.HttpErrorHook(self.flow)  # the addon decides (and records)
        message = _GatewayPage(_OVER_CAP)
        message.reply = self.flow.metadata.pop(_REPLY, None)
        yield mitm_http_layer.SendHttp(mitm_http_layer.ResponseProtocolError(
            self.stream_id, message, mitm_http_layer.ErrorCode.REQUEST_TOO_LARGE),
            self.context.client)
        self.client_state = self.state_errored
        self.flow.live = False
        return True
    return (yield from _body_size_check(self, request))


_replace(mitm_http_layer.HttpStream, "check_body_size", _check_body_size)
_read_headers = _mitmproxys(_mitm_http1_layer.Http1Server, "read_headers")


def _read_request_head(self, event):
    """A request head mitmproxy's parser refuses outright makes no flow and reaches no hook:
    its 400 (the page above) still leaves a ledger row."""
    yield from _read_headers(self, event)
    if self.request is None and self.state == self.done and _running:
        peer = self.conn.peername[0] if self.conn.peername else ""
        _running[0].record_proxy_reply(Request("UNKNOWN", "/", {}, b"", peer=peer), 400,
                                       "mitmproxy could not parse the request head")


_replace(_mitm_http1_layer.Http1Server, "read_headers", _read_request_head)
_handle_protocol_error = _mitmproxys(mitm_http_layer.HttpStream, "handle_protocol_error")


def _provider_failed(self, event):
    """A forwarded request whose provider cannot be reached: the page mitmproxy writes
    carries the gateway's answer, in the client's API family and with its headers, which
    the error hook fills in (it runs before the page is sent)."""
    if isinstance(event, mitm_http_layer.ResponseProtocolError) and \
            self.flow in _EXCHANGES and self.flow.response is None:
        event.message = self.flow.metadata[_PAGE] = _GatewayPage(event.message)
    return (yield from _handle_protocol_error(self, event))


_replace(mitm_http_layer.HttpStream, "handle_protocol_error", _provider_failed)
hook_table.install()


_CREDENTIALS = frozenset(name.encode() for name in CREDENTIAL_HEADERS)


def _credentials_in(headers: http.Headers) -> list[str]:
    """The credential headers present, by their lower-case names: one pass over the
    headers (a lookup by name each would walk them once per name)."""
    return [name.decode() for name in {n.lower() for n, _ in headers.fields} & _CREDENTIALS]


class CredentialMask:
    """Keeps credentials out of what mitmproxy shows and saves (mitmweb, `-w` files).

    Runs first in the addon chain, before mitmweb's view and the flow saver: the client's
    virtual key is taken off the flow as soon as its headers arrive (the gateway reads it
    from here), and the provider key the gateway puts on the request is masked once the
    request has gone upstream (at its response, or its error)."""

    def __init__(self) -> None:
        self._vault: weakref.WeakKeyDictionary[http.HTTPFlow, dict[str, str]] = \
            weakref.WeakKeyDictionary()

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        kept = self._mask(flow)
        if kept:
            self._vault[flow] = kept

    def client_headers(self, flow: http.HTTPFlow) -> dict[str, str]:
        """The request's headers as the client sent them (credentials unmasked)."""
        headers = lower_headers(flow.request.headers.items(multi=True))
        return {**headers, **self._vault.pop(flow, {})}

    @staticmethod
    def _mask(flow: http.HTTPFlow) -> dict[str, str]:
        """Mask the request's credentials; returns them as they were."""
        headers = flow.request.headers
        found = {name: headers[name] for name in _credentials_in(headers)}
        for name, value in found.items():
            headers[name] = mask(value)
        return found

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self._mask(flow)

    def response(self, flow: http.HTTPFlow) -> None:
        self._mask(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._mask(flow)


def _mask_web_view() -> None:
    """mitmweb shows a flow as soon as its request hooks have run: while it waits for the
    provider, the provider key is on it. Every flow mitmweb sends its UI is masked."""
    app = sys.modules.get("mitmproxy.tools.web.app")
    if app is None or getattr(app.flow_to_json, "masks_credentials", False):
        return
    unmasked = app.flow_to_json

    def flow_to_json(flow):
        doc = unmasked(flow)
        request = doc.get("request")
        if request:
            request["headers"] = tuple(
                (name, mask(value) if name.lower() in CREDENTIAL_HEADERS else value)
                for name, value in request["headers"])
        return doc

    flow_to_json.masks_credentials = True  # type: ignore[attr-defined]
    app.flow_to_json = flow_to_json


def _to_loopback(flow: http.HTTPFlow, port: int, header: str) -> str:
    """Point a flow at one of the addon's loopback servers; the token it carries there in
    `header`, which that server reads back with `_loopback_token`."""
    token = uuid.uuid4().hex
    req = flow.request
    req.scheme, req.host, req.port = "http", "127.0.0.1", port
    req.headers[header] = token
    return token


async def _loopback_token(reader: asyncio.StreamReader, header: str) -> str:
    """Read a flow's request head on a loopback server: the token in `header` ("" if none)."""
    head = await reader.readuntil(b"\r\n\r\n")
    return next((line.split(b":", 1)[1].strip().decode() for line in head.split(b"\r\n")
                 if line.lower().startswith(header.encode() + b":")), "")


class RefusalSink:
    """Answers a request refused from its headers alone (a body over the cap), while the
    client may still be sending that body.

    mitmproxy cannot answer a request before it has read the whole body, so such a request
    is pointed here instead, its body streamed rather than held: this loopback server reads
    the head, writes the gateway's reply at once, then reads the body into nothing (a client
    that sends its whole body before it reads gets its answer too) and closes."""

    HEADER = "x-tollgate-refusal"

    def __init__(self) -> None:
        self.replies: dict[str, Reply] = {}
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._answer, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def send_here(self, flow: http.HTTPFlow, reply: Reply) -> None:
        self.replies[_to_loopback(flow, self.port, self.HEADER)] = reply
        flow.request.stream = True  # through mitmproxy without being held, into _answer's drain

    async def _answer(self, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        try:
            reply = self.replies.pop(await _loopback_token(reader, self.HEADER), None)
            if reply is None:
                return
            response = http.Response.make(reply.status, reply.body,
                                          {**reply.headers, "connection": "close"})
            writer.write(mitm_http1.assemble_response(response))
            await writer.drain()
            async with asyncio.timeout(120):  # a client that stops sending is let go
                while await reader.read(1 << 16):
                    pass
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError,
                TimeoutError):
            pass
        finally:
            writer.close()

    def stop(self) -> None:
        if self._server is not None:
            self._server.close()


# mitmproxy's options for checking the servers it connects to.
UPSTREAM_TLS_OPTIONS = frozenset({"ssl_insecure", "ssl_verify_upstream_trusted_ca",
                                  "ssl_verify_upstream_trusted_confdir"})


def _upstream_tls() -> ssl.SSLContext:
    """How the relay checks providers: as mitmproxy checks the servers it connects to (none
    checked with `ssl_insecure`; only the CAs `ssl_verify_upstream_trusted_ca` or `_confdir`
    name), else by certifi's CAs, or those SSL_CERT_FILE or SSL_CERT_DIR name."""
    options = ctx.options
    if options.ssl_insecure:
        return httpx.create_ssl_context(verify=False)
    cafile = options.ssl_verify_upstream_trusted_ca
    capath = options.ssl_verify_upstream_trusted_confdir
    if cafile or capath:
        return ssl.create_default_context(cafile=cafile, capath=capath)
    return httpx.create_ssl_context()


class FallbackRelay:
    """Makes the attempts of a fallback plan, and streams the answer that counts back as it
    arrives.

    mitmproxy cannot send a flow upstream twice, so a request with a fallback plan is
    pointed here: this loopback server tries the plan's providers in turn (each with its
    credentials, path and body) until one answers with something the key does not fall back
    on, then relays that answer's status, headers and bytes to mitmproxy as they come. The
    flow's own hooks meter and edit it there, as for any other request, so a streamed
    answer is never held whole."""

    HEADER = "x-tollgate-plan"

    def __init__(self) -> None:
        self.plans: dict[str, tuple[Exchange, str, dict[str, str], bytes]] = {}
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tls: ssl.SSLContext | None = None  # made once

    def trust_changed(self) -> None:
        """mitmproxy's options for checking servers changed: the connections the relay opens
        from now on check providers by them."""
        self._tls = None

    async def send_here(self, flow: http.HTTPFlow, exchange: Exchange,
                        client_headers: dict[str, str]) -> None:
        if self._server is None:  # on first use: mitmproxy's start is not held up for it
            self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
            self.port = self._server.sockets[0].getsockname()[1]
        req = flow.request
        plan = (exchange, req.method, client_headers, req.raw_content or b"")
        self.plans[_to_loopback(flow, self.port, self.HEADER)] = plan
        # The body stays here: the relay sends each attempt its own.
        req.headers.pop("transfer-encoding", None)
        req.raw_content = b""
        req.headers["content-length"] = "0"

    async def _serve(self, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        """The flows mitmproxy points here on one connection, one after another: it keeps
        the connection for its client's next request, as it would a provider's.

        Each connection has an HTTP client of its own (aiohttp's: httpx cost five times its
        CPU per request). Its flows come one after another, so the client keeps about one
        connection per provider, closed with the relay's connection. It goes to providers
        directly, as mitmproxy does: reading proxies from the environment (and ~/.netrc) on
        each request would double its CPU."""
        client: aiohttp.ClientSession | None = None
        try:
            while True:
                plan = self.plans.pop(await _loopback_token(reader, self.HEADER), None)
                if plan is None:
                    return
                if client is None:
                    if self._tls is None:
                        self._tls = _upstream_tls()
                    # The provider's bytes as they came (relayed, and metered in the flow),
                    # and the client's headers as they were: no content type made up.
                    client = aiohttp.ClientSession(
                        connector=aiohttp.TCPConnector(ssl=self._tls), auto_decompress=False,
                        skip_auto_headers=("Content-Type",))
                if not await self._attempts(client, writer, *plan):
                    return
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        except Exception:
            log.exception("the fallback relay failed")
        finally:
            writer.close()
            if client is not None:
                await client.close()

    async def _attempts(self, client: aiohttp.ClientSession, writer: asyncio.StreamWriter,
                        exchange: Exchange, method: str, client_headers: dict[str, str],
                        client_body: bytes) -> bool:
        """The plan's attempts, and the answer that counts relayed; whether the connection
        can serve the next flow (False: the answer ended it)."""
        while True:
            a = exchange.attempt
            headers = [(k, v) for k, v in client_headers.items()
                       if k.lower() not in header_rules.HOP_BY_HOP | FRAMING | {"host"}
                       and k.lower() not in a.remove_headers and k.lower() not in a.set_headers]
            headers += [*a.set_headers.items(), ("host", a.authority)]
            # The read timeout holds between any two reads, as the first byte's does.
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=a.connect_timeout,
                                            sock_read=a.first_byte_timeout)
            try:
                # The URL as built, not requoted: a signature covers its path (SigV4).
                response = await client.request(
                    method, URL(a.url, encoded=True), headers=headers, timeout=timeout,
                    data=a.body if a.body is not None else client_body,
                    allow_redirects=False)
            except (aiohttp.ClientError, TimeoutError) as e:
                error = "timeout" if isinstance(e, TimeoutError) else "network_error"
                if (reason := exchange.cursor.fallback_reason(error=error)) is not None:
                    exchange.advance(reason)
                    continue
                code = "provider_timeout" if error == "timeout" else "provider_unreachable"
                status, out_headers, out = exchange.failure(
                    code, f"Model provider {a.provider_id} could not be reached ({error}: "
                          f"{e.__class__.__name__}) and no fallback was left.")
                exchange.finish("error", f"{error}: {e!r}")
                writer.write(mitm_http1.assemble_response(http.Response.make(
                    status, out, out_headers)))
                await writer.drain()
                return True
            async with response:
                if (reason := exchange.cursor.fallback_reason(status=response.status)):
                    exchange.advance(reason)
                    continue
                return await self._relay(writer, response)

    @staticmethod
    async def _relay(writer: asyncio.StreamWriter, response: aiohttp.ClientResponse) -> bool:
        """The provider's answer as it comes: its status and headers (framing aside), then
        its bytes; a provider that breaks off leaves the answer unterminated, as it did, and
        the connection ends with it (False)."""
        length = response.headers.get("content-length")
        head = [(k, v) for k, v in response.raw_headers
                if k.decode("latin-1").lower() not in header_rules.HOP_BY_HOP | FRAMING]
        head.append((b"content-length", length.encode()) if length is not None
                    else (b"transfer-encoding", b"chunked"))
        writer.write(mitm_http1.assemble_response_head(http.Response(
            b"HTTP/1.1", response.status, (response.reason or "").encode(),
            http.Headers(head), b"", None, 0.0, None)))
        sent = 0
        try:
            async for chunk in response.content.iter_any():
                if chunk:
                    sent += len(chunk)
                    writer.write(chunk if length is not None
                                 else b"%x\r\n%b\r\n" % (len(chunk), chunk))
                    await writer.drain()
        except (aiohttp.ClientError, TimeoutError):
            return False
        if length is None:
            writer.write(b"0\r\n\r\n")
        await writer.drain()
        return length is None or str(sent) == length.strip()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()


class StreamingNotice(logging.Filter):
    """Drops mitmproxy's "Streaming response from <host>." line: the gateway streams every
    answer it forwards through its meter, so the line would follow every request without
    saying anything the user chose (and costs its formatting and write each time)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str)
                    and record.msg.startswith("Streaming response from "))


def _quiet_streaming_notices() -> None:
    server_log = logging.getLogger("mitmproxy.proxy.server")
    if not any(type(f).__name__ == "StreamingNotice" for f in server_log.filters):
        server_log.addFilter(StreamingNotice())  # once, though the script may be reloaded


# mitmproxy takes the root logger to DEBUG and turns every record into a hook each of its
# addons hears: a record per relayed request (httpx's client made eleven) would cost more
# than its HTTP. The fallback relay's client keeps its warnings and errors.
RELAY_CLIENT_LOGGERS = ("aiohttp",)


def _quiet_relay_client() -> None:
    for name in RELAY_CLIENT_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


class TollgateAddon:
    def __init__(self) -> None:
        self.gateway: Gateway | None = None
        self.credentials = CredentialMask()
        self.admin: AdminServer | None = None
        self._live: weakref.WeakSet[Exchange] = weakref.WeakSet()  # forwarded, not settled
        self.sink = RefusalSink()
        self.plans = FallbackRelay()

    def load(self, loader) -> None:
        # First in the chain, so nothing that shows or saves flows sees a credential (a
        # reloaded script replaces its predecessor's mask).
        chain = ctx.master.addons.chain
        chain[:] = [a for a in chain if type(a).__name__ != "CredentialMask"]
        chain.insert(0, self.credentials)
        _mask_web_view()
        _quiet_streaming_notices()
        _quiet_relay_client()
        loader.add_option("tollgate_config", str, "",
                          "Path to the tollgate gateway.yaml (default: $TOLLGATE_CONFIG, "
                          "then config/gateway.yaml).")
        loader.add_option("tollgate_admin", str, "",
                          "HOST:PORT for tollgate's /healthz, /readyz and /metrics.")

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        """A body announced over the cap is refused from the headers alone."""
        declared = flow.request.headers.get("content-length", "")
        if self.gateway is None or not declared.isdigit() or \
                int(declared) <= self.gateway.max_body_bytes:
            return
        result = await self.gateway.handle(self._core_request(flow, b"", int(declared)))
        if isinstance(result, Reply):
            flow.metadata[_REFUSED] = True
            flow.comment = _comment(result.decision)
            flow.marked = ":no_entry:"
            self.sink.send_here(flow, result)

    def _core_request(self, flow: http.HTTPFlow, body: bytes,
                      declared_length: int | None = None) -> Request:
        req = flow.request
        return Request(method=req.method, path=req.path,
                       headers=self.credentials.client_headers(flow), body=body,
                       peer=f"{flow.client_conn.peername[0]}" if flow.client_conn.peername
                       else "", declared_length=declared_length)

    async def running(self) -> None:
        await self.sink.start()
        if ctx.options.tollgate_admin and self.gateway is not None and self.admin is None:
            host, _, port = ctx.options.tollgate_admin.rpartition(":")
            self.admin = AdminServer(self.gateway, (host or "127.0.0.1", int(port)),
                                     asyncio.get_running_loop()).start()
        # What mitmproxy and the gateway built to start never becomes garbage: out of the
        # collector's sight, a full collection no longer scans it (a 78 ms pause, before).
        gc.freeze()

    def configure(self, updated: set[str]) -> None:
        hook_table.forget()  # (`scripts` in a new order: their hooks, too)
        if UPSTREAM_TLS_OPTIONS & updated:
            self.plans.trust_changed()
        if "tollgate_config" in updated or self.gateway is None:
            from tollgate.config.load import default_config_path

            path = ctx.options.tollgate_config or str(default_config_path())
            try:
                gateway = Gateway.from_path(path)
            except ConfigError as e:
                raise exceptions.OptionsError(f"tollgate config is invalid:\n{e}") from None
            if self.gateway is not None:
                self.gateway.holder.stop()  # in-flight exchanges keep the old gateway's store
            gateway.precedents_for.add(HOST)  # its requests are decided from precedents too
            self.gateway = gateway
            _running[:] = [gateway]

    async def request(self, flow: http.HTTPFlow) -> None:
        assert self.gateway is not None
        if flow.metadata.get(_REFUSED):
            return  # answered from its headers
        req = self._core_request(flow, flow.request.raw_content or b"")
        result = await self._decide_like(req) or await self.gateway.handle(req)
        if isinstance(result, Forward):
            self._live.add(result.exchange)
            if result.exchange.precedent is not None:  # the requests like it follow it
                result.exchange.precedent.hosts[HOST] = True
        if isinstance(result, Reply):
            flow.response = http.Response.make(result.status, result.body, result.headers)
            flow.comment = _comment(result.decision)
            _show_called_address(flow)
            if result.status >= 400:
                flow.marked = ":no_entry:"
            return
        if len(result.exchange.cursor.attempts) == 1:
            self._dispatch(flow, result)
            return
        _EXCHANGES[flow] = result.exchange
        flow.comment = _comment(result.exchange.decision())
        await self.plans.send_here(flow, result.exchange, self.credentials.client_headers(flow))

    async def _decide_like(self, req: Request) -> Forward | None:
        """A request like one forwarded before, decided from its precedent (its exchange
        made at once: this host's hooks follow the response with it): at once, or once a
        store that reserves over the network has (Redis); None: for `handle`."""
        assert self.gateway is not None
        replayed = self.gateway.decide_like(req, HOST) or \
            await self.gateway.decide_like_soon(req, HOST)
        if replayed is None:
            return None
        exchange = self.gateway.adopt(replayed)
        return Forward(exchange, exchange.attempt)

    def _dispatch(self, flow: http.HTTPFlow, fwd: Forward) -> None:
        attempt, req = fwd.attempt, flow.request
        point_at(req, attempt)
        sets = attempt.set_headers
        if attempt.body is not None:
            req.raw_content = attempt.body
            sets = {**sets, "content-length": str(len(attempt.body))}
        _edit(req.headers, attempt.remove_headers, sets)
        _EXCHANGES[flow] = fwd.exchange
        flow.comment = _comment(fwd.exchange.decision())

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        exchange = _EXCHANGES.get(flow)
        if exchange is None or flow.response is None or exchange.settlement.finished:
            return  # (finished: no provider answered a fallback plan; its failure is sent)
        resp = flow.response
        provider = lower_headers(resp.headers.items(multi=True))  # read once
        _edit(resp.headers, header_rules.downstream_removals(provider),
              exchange.on_response_headers(resp.status_code, provider))
        large = _large(provider)
        if exchange.is_sse or large or exchange.rewriter is None:
            # Stream through the tap: bytes go to the client as they arrive, and the answer
            # is settled after the client has it. Only a JSON answer the gateway rewrites
            # whole is held (it may still become an error).
            kept = None if exchange.is_sse or large else bytearray()
            if exchange.rewriter is not None:
                _unsized(flow)

            def relay(data: bytes) -> list[bytes]:
                out = exchange.relay(data)
                if kept is not None:
                    kept.extend(out)
                    if not data:  # the end, before the response hooks: the flow shows it
                        resp.data.content = bytes(kept)
                return [out] if out else []  # an empty chunk would end an HTTP/1 body

            resp.stream = relay

    def response(self, flow: http.HTTPFlow) -> None:
        if flow.metadata.get(_REFUSED):
            _show_called_address(flow)
        exchange = _EXCHANGES.get(flow)
        if exchange is None or flow.response is None:
            return
        _show_served_address(flow, exchange)
        # No provider of a fallback plan answered: the relay said so.
        if exchange.settlement.finished:
            flow.marked = ":no_entry:"
            flow.comment = _served_comment(exchange)
            return
        if not flow.response.stream:
            body = exchange.relay(flow.response.raw_content or b"")
            if exchange.rewriter is not None:
                flow.response.content = body + exchange.relay(b"")
                # An answer it could not translate:
                if exchange.settlement.replaced_status is not None:
                    flow.response.status_code = exchange.settlement.replaced_status
                    flow.response.headers["content-type"] = "application/json"
        # The books are closed once mitmproxy has sent the response's end (all of a buffered
        # one), not in the client's time: closed here, they held a stream's end back 0.1 to
        # 0.2 ms. mitmproxy sends it two turns of its loop after this hook: the hook runs
        # in an eager task inside the handler that holds the connection's event lock, and
        # the hook's completion waits for that lock, which wakes it with a callback of its
        # own after any this hook schedules.
        loop = asyncio.get_running_loop()
        loop.call_soon(loop.call_soon, self._served, flow, exchange)

    @staticmethod
    def _served(flow: http.HTTPFlow, exchange: Exchange) -> None:
        exchange.finish("completed")
        flow.comment = _served_comment(exchange)
        # Changed after its response hooks: what shows flows (mitmweb's view) is told, as
        # of any edit of a flow.
        updated = hooks.UpdateHook([flow])
        if hook_table.heard(ctx.master.addons, updated):
            asyncio_utils.create_task(ctx.master.addons.trigger_event(updated),
                                      name="tollgate: flow served", keep_ref=True)

    async def error(self, flow: http.HTTPFlow) -> None:
        if _OVERSIZED in flow.metadata and self.gateway is not None:
            # Cut off at the cap: the refusal is decided (and recorded) like any other.
            result = await self.gateway.handle(
                self._core_request(flow, b"", flow.metadata.pop(_OVERSIZED)))
            if isinstance(result, Reply):
                flow.metadata[_REPLY] = result
                flow.comment = _comment(result.decision)
                flow.marked = ":no_entry:"
                _show_called_address(flow)
            return
        exchange = _EXCHANGES.get(flow)
        if exchange is not None:
            _show_served_address(flow, exchange)
            message = flow.error.msg if flow.error else None
            page: _GatewayPage | None = flow.metadata.pop(_PAGE, None)
            if page is not None:
                code = "provider_timeout" if "timed out" in str(message).lower() \
                    else "provider_unreachable"
                status, headers, body = exchange.failure(
                    code, f"Model provider {exchange.provider_id} could not be reached "
                          f"({message}); nothing was served.")
                page.reply = Reply(status, headers, body, {"code": code})
            # A client that went away says nothing about the provider (no breaker count).
            exchange.finish("abandoned" if _client_gone(flow) else "error", message)
            flow.comment = _served_comment(exchange)

    async def done(self) -> None:
        self.sink.stop()
        await self.plans.stop()
        if self.admin is not None:
            self.admin.stop()
        # Streams still open are cut by the shutdown: settle what they used while the store
        # is open (mitmproxy's own error events for them come after this, too late).
        for exchange in list(self._live):
            exchange.finish("aborted", "the gateway shut down while the response streamed")
        if self.gateway is not None:
            await self.gateway.close()  # every finished request is recorded before exit


addons = [TollgateAddon()]
