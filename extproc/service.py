"""Envoy's External Processing service, adapting ext_proc messages to the tollgate core.

The decision itself comes over plain HTTP from Envoy's `tollgate.decide` Lua filter
(`extproc.decider`), which calls `ExternalProcessor.decide`: a gRPC stream per request costs
several times what the decision does. The response comes back the same way: Envoy's
`tollgate.meter` Lua filter posts it, in a few batches, to `metered`, which settles the
request at its end. A response that does not end there (reset by the client or the provider,
or answered by Envoy in the provider's place) is reported by Envoy's access log (`ended`).

Each attempt of a request with a fallback plan (`tollgate.attempt`, an upstream Lua filter)
asks for its changes the same way (`attempt`): the credentials, path and body of the provider
Envoy chose for it, and the metadata that names that provider on the response.

The gRPC streams that remain come here, each naming the filter that opened it
(`x-tollgate-filter` gRPC metadata): rewrite streams (`tollgate.rewrite`) carry the responses
the gateway reshapes, answered chunk by chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.accesslog.v3 import als_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from extproc import fallback
from extproc.envoy_config import (
    ANTHROPIC_PATH,
    CLUSTER_HEADER,
    EXTPROC_PROCESS_HEADER,
    EXTPROC_SERVICE,
    EXTRA_KEYS,
    EXTRAS_HEADER,
    FALLBACK_HEADER,
    FILTER_ROLE_HEADER,
    METADATA_NS,
    REWRITE_HEADER,
    ROUTE_SETS,
    cluster_name,
    decider_targets,
)
from extproc.heads import response_head
from extproc.listen import Listener, bind, restrict
from extproc.proxy_replies import ProxyReplies, Whole
from tollgate.errors import GatewayError
from tollgate.exchange import Exchange, JSONTranslation
from tollgate.gateway import Gateway
from tollgate.precedent import Replayed
from tollgate.request import Attempt, Forward, Reply, Request

log = logging.getLogger("tollgate.extproc")
# This host's name for what it makes of a precedent (`Precedent.hosts`): the decide
# filter's answer.
HOST = "envoy"

OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
# A forwarded request Envoy has said nothing of for this long is closed. It is longer than
# Envoy's own idle timeouts (the listener's and the route's, 300 s), past which Envoy has
# ended the request and its access log has reported it: this only settles requests whose
# report was lost (Envoy restarted).
QUIET_AFTER = 360.0
# How long a finished response waits for the rewrite of the same response to end.
REWRITE_GRACE = 5.0
# How long the end the access log reports waits for meter posts still on their way, from
# the last that came: a long answer's posts (a 20 MB one makes a thousand) reach a busy
# process a while after its end does, each within the meter's timeout of being sent.
POSTS_GRACE = 2.0
# How long a stopping gateway waits for the access log's reports of requests still open
# (two and a half of its batches), before it settles them as far as they got.
ENDS_REPORTED = 0.25
# The filters whose streams this service serves (envoy_config renders them).
ROLES = ("rewrite",)


def _headers(header_map: base_pb2.HeaderMap) -> dict[str, str]:
    out: dict[str, str] = {}
    for h in header_map.headers:
        value = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
        out[h.key] = f"{out[h.key]}, {value}" if h.key in out else value
    return out


def _set(headers: dict[str, str]) -> list[base_pb2.HeaderValueOption]:
    return [base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k.lower(),
                                                                   raw_value=v.encode()),
                                       append_action=OVERWRITE)
            for k, v in headers.items()]


def immediate(reply: Reply) -> pb.ProcessingResponse:
    answered = struct_pb2.Struct()
    answered.update({METADATA_NS: {"answered": "1"}})  # keeps Envoy's error mappers off it
    return pb.ProcessingResponse(dynamic_metadata=answered, immediate_response=pb.ImmediateResponse(
        status=http_status_pb2.HttpStatus(code=reply.status),
        headers=pb.HeaderMutation(set_headers=_set(reply.headers)),
        body=reply.body,
        details=f"tollgate_{reply.decision.get('code', 'answer')}",
    ))


def metadata(exchange: Exchange) -> dict[str, str]:
    """What the decision leaves in Envoy's dynamic metadata (namespace `tollgate`) for the
    filters after it: the request's id (which the meter posts under, and the response's
    header), the gateway's other response headers where they are not the routes' own,
    whether the usage cut is on. (The span's ids go in the traceparent it sends upstream,
    which the meter reads them from.)"""
    fields = {"request_id": exchange.trace.request_id}
    # Envoy's own replies (a provider unreachable) are in the client's API family, which its
    # error mappers tell by the path unless this says otherwise: where the provider's path
    # is of the other family's API (or a later attempt's may be).
    family, plan = exchange.route.family, exchange.cursor.attempts
    if len(plan) > 1 or plan[0].path.startswith(ANTHROPIC_PATH) != (family == "anthropic"):
        fields["family"] = family
    # The first attempt's, when the decision passed a provider over (absent: Envoy's routes
    # say 0); each later attempt of a fallback plan names its own.
    if exchange.cursor.fallback_count:
        fields["fallback_count"] = str(exchange.cursor.fallback_count)
    if exchange.hides_usage_chunk and not exchange.reshapes:
        fields["cut_usage"] = "1"  # the meter keeps it from the client (usage_cut.lua)
    if exchange.billing.warning:
        fields["budget_warning"] = exchange.billing.warning
    if exchange.billing.output_cap is not None:
        fields["max_tokens"] = str(exchange.billing.output_cap)
    if exchange.shadow_header:
        fields["shadow"] = exchange.shadow_header
    return {**fields, **exchange.billing.rate_headers}


def _changes(a: Attempt, body_length: int | None, extra: dict[str, str],
             remove: list[str]) -> tuple[dict[str, str], list[str]]:
    """The headers to set and to remove that put one provider's credentials, host and path
    (and its body's length) on the request; each name to remove once (the client's
    `x-envoy-*` controls are among the attempt's own removals too)."""
    set_headers = {":authority": a.authority, ":path": a.path, **_own(a.set_headers), **extra}
    if a.body is not None:
        set_headers["content-length"] = str(len(a.body))
    elif body_length is not None:
        set_headers["content-length"] = str(body_length)
    return set_headers, [h for h in dict.fromkeys([*a.remove_headers, *remove])
                         if h not in set_headers]


def _own(set_headers: dict[str, str]) -> dict[str, str]:
    """The headers a decision sets but for those Envoy's routes set to the same value."""
    return {k: v for k, v in set_headers.items() if ROUTE_SETS.get(k) != v}


@dataclass
class Forwarding:
    """A decision to forward, as the decide filter applies it: headers to set (`:path` and
    `:authority` among them) and to remove, the body to send instead of the client's (None:
    the client's), and the dynamic metadata for the filters after it."""

    set_headers: dict[str, str]
    remove_headers: list[str]
    body: bytes | None
    metadata: dict[str, str]


@dataclass
class Made:
    """What this host makes of a precedent (`Precedent.hosts`): its forwarding, and the
    lines of its answer that the requests decided from it share, encoded once (by
    extproc.decider), by the names each such request sets itself."""

    forwarding: Forwarding
    shared: dict[tuple[tuple[str, ...], tuple[str, ...]], str] = field(default_factory=dict)


@dataclass
class Replaying:
    """A request decided from a precedent, as the decide filter is told it: the precedent's
    forwarding with this request's own headers (its credential, ids, trace, length) and
    metadata (its ids, budget warning, rate-limit headers) over it, and its body."""

    made: Made
    set_headers: dict[str, str]
    metadata: dict[str, str]
    body: bytes | None

    def forwarding(self) -> Forwarding:
        """The same decision as one `Forwarding`."""
        made = self.made.forwarding
        fields = {k: v for k, v in made.metadata.items() if k != "budget_warning"}
        return Forwarding({**made.set_headers, **self.set_headers}, made.remove_headers,
                          self.body, {**fields, **self.metadata})


def forward(fwd: Forward, client_headers: dict[str, str], body: bytes | None,
            process: int | None = None) -> Forwarding:
    """How a request goes on to its provider: its first attempt's changes are applied here.
    A fallback plan goes to its chain with Envoy's retry controls, and names its first
    attempt's provider (`first_attempt`): the attempt filter asks for the changes of any
    other attempt Envoy makes."""
    exchange = fwd.exchange
    plan = exchange.cursor.attempts
    # Envoy's router controls are the gateway's to set, never the client's.
    envoy_controls = [h for h in client_headers if h.startswith(fallback.ENVOY_CONTROL_PREFIX)]
    routing = fallback.retry_headers(exchange.key.config.fallback, plan)
    # Envoy's own replies from here on (a provider unreachable) name the request's row.
    routing["x-request-id"] = exchange.trace.request_id
    if exchange.reshapes:  # the rewrite filter edits its response (a usage chunk as well)
        routing[REWRITE_HEADER] = "1"
    fields = metadata(exchange)
    if not EXTRA_KEYS.isdisjoint(fields):
        routing[EXTRAS_HEADER] = "1"
    if process is not None:  # this process holds the request: its later streams come here
        routing[EXTPROC_PROCESS_HEADER] = fields["process"] = str(process)
    if len(plan) == 1:
        routing[CLUSTER_HEADER] = cluster_name(fwd.attempt.provider_id)
    else:
        routing[CLUSTER_HEADER] = fallback.chain_name(tuple(a.provider_id for a in plan))
        routing[FALLBACK_HEADER] = "1"
        fields["first_attempt"] = fwd.attempt.provider_id
    set_headers, removed = _changes(fwd.attempt, None if body is None else len(body),
                                    routing, envoy_controls)
    # What the client's request has already (its own path, the length of a body it declared
    # and that stays its own) or lacks (a header to take off) is left out: each header the
    # decide filter sets or takes off is a call into Envoy. (The requests decided from this
    # one as a precedent have the same path and header names.)
    if set_headers.get(":path") == client_headers.get(":path"):
        del set_headers[":path"]
    if fwd.attempt.body is None and "content-length" in client_headers:
        set_headers.pop("content-length", None)
    removed = [h for h in removed if h in client_headers]
    new_body = fwd.attempt.body if body is not None else None
    return Forwarding(set_headers, removed, new_body, fields)


def _attribute(msg: pb.ProcessingRequest, name: str) -> str | None:
    """An attribute the filter was configured to send (`request_attributes` and
    `response_attributes`), as a string."""
    attrs = msg.attributes.get("envoy.filters.http.ext_proc")
    value = attrs.fields.get(name) if attrs is not None else None
    return None if value is None else value.string_value


def _from_upstream(msg: pb.ProcessingRequest) -> bool:
    """The response came from the provider, not from Envoy itself (a local reply)."""
    return _attribute(msg, "response.code_details") in (None, "via_upstream")


def _request_id(msg: pb.ProcessingRequest) -> str | None:
    """The request id the decision stored in dynamic metadata (None: a reply Envoy or the
    gateway made itself)."""
    fields = msg.metadata_context.filter_metadata.get(METADATA_NS)
    if fields is None or "request_id" not in fields.fields:
        return None
    return fields.fields["request_id"].string_value


class _Ended(NamedTuple):
    """What Envoy's access log said of a request's end."""

    status: int  # 0: no response
    details: str  # Envoy's response code details
    posts: int  # meter posts made, to wait for
    tail: bytes  # the response's bytes no post carried
    client_left: bool


@dataclass
class _Pending:
    decided: Exchange | Replayed  # (a request decided from a precedent: see `exchange`)
    since: float  # the last word of it: its decision, a meter post
    set_by_attempts: list[str] = field(default_factory=list)
    body_length: int | None = None  # the client's body's
    # The client's body, when the first attempt's replaced it: Envoy replays that attempt's
    # body to each later one, which may need the client's bytes back.
    client_body: bytes | None = None
    # Set when its rewrite stream has ended (for a response the gateway edits).
    rewritten: asyncio.Event | None = None
    posts: int = 0  # meter posts taken, in order
    early: dict[int, tuple[bytes, bool]] = field(default_factory=dict)  # ahead of their turn
    ended: _Ended | None = None  # while the posts the access log counted are on their way
    ended_at: float | None = None  # when the response's last bytes came (the access log's)
    adopt: Callable[[Replayed], Exchange] | None = None  # makes a replayed one's exchange

    @property
    def exchange(self) -> Exchange:
        """The request's exchange; one decided from a precedent has it made now."""
        if isinstance(self.decided, Replayed):
            assert self.adopt is not None
            self.decided = self.adopt(self.decided)
        return self.decided


# A JSON answer the rewrite translates whole: its body in one message, its headers held.
WHOLE_BODY = processing_mode_pb2.ProcessingMode(
    request_header_mode=processing_mode_pb2.ProcessingMode.SKIP,
    response_header_mode=processing_mode_pb2.ProcessingMode.SEND,
    response_body_mode=processing_mode_pb2.ProcessingMode.BUFFERED,
    request_trailer_mode=processing_mode_pb2.ProcessingMode.SKIP,
    response_trailer_mode=processing_mode_pb2.ProcessingMode.SKIP)


class LoadedClusters(Protocol):
    """The clusters an Envoy this process runs has loaded."""

    def get(self) -> frozenset[str]: ...
    async def refresh(self) -> bool: ...


class ExternalProcessor(pb_grpc.ExternalProcessorServicer):
    def __init__(self, gateway: Gateway, loaded_clusters: LoadedClusters | None = None,
                 process: int | None = None):
        """`process`: this process's index when ext_proc runs as several (see
        `envoy_config.route_config`)."""
        self.gateway = gateway
        gateway.precedents_for.add(HOST)  # its requests are decided from precedents too
        # An exchange ends with the meter's last post, which Envoy sends as it passes the
        # response's end on to the client: nothing is left to hold back. Settled at once,
        # while its client reads, not a millisecond later, when the client's next request
        # is likely being decided on this same loop.
        gateway.settle_after = 0.0
        self.process = process
        self._pending: dict[str, _Pending] = {}  # forwarded, until settled
        self._rewrites: dict[str, _Pending] = {}  # forwarded, waiting for the rewrite
        # The clusters Envoy has loaded, when known (an Envoy this process runs); else the
        # rendered config is taken to be loaded.
        self._loaded_clusters = loaded_clusters
        self._chains_for: tuple[object, object] | None = None  # (config, clusters) seen
        self._chain_set: set[tuple[str, ...]] = set()
        self.sweeper: asyncio.Task[None] | None = None
        self.decider: asyncio.Server | None = None  # extproc.decider, once started
        self.settling: set[asyncio.Task[None]] = set()  # waiting for their rewrite
        self.stopping = False  # waiting for the last reports (`ends_reported`)

    async def stop_decider(self) -> None:
        if self.decider is not None:
            self.decider.close()
            if hasattr(self.decider, "close_clients"):  # Python 3.13: Envoy's keep-alives
                self.decider.close_clients()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.decider.wait_closed(), 2)

    def chains(self) -> set[tuple[str, ...]]:
        """The fallback chains Envoy can route to: the running config's, once loaded."""
        loaded = self.gateway.holder.current
        clusters = self._loaded_clusters.get() if self._loaded_clusters else None
        seen = self._chains_for
        if seen is None or seen[0] is not loaded or seen[1] is not clusters:
            rendered = fallback.chains(loaded.config)
            self._chain_set = {c for c in rendered
                               if clusters is None or fallback.chain_name(c) in clusters}
            self._chains_for = (loaded, clusters)
        return self._chain_set

    async def Process(self, requests: AsyncIterator[pb.ProcessingRequest],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ProcessingResponse]:
        """One stream, served by the processor of the filter that opened it (named in the
        stream's metadata)."""
        role = dict(context.invocation_metadata() or ()).get(FILTER_ROLE_HEADER)
        if role not in ROLES:
            log.error("an ext_proc stream named no tollgate filter (%s: %r): render Envoy's "
                      "configuration again with `tollgate envoy render`", FILTER_ROLE_HEADER,
                      role)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"unknown {FILTER_ROLE_HEADER}: {role!r}")
            return
        first = await anext(aiter(requests), None)
        if first is None:
            return
        async for answer in self._rewrite(first, requests):
            yield answer

    # -- decisions --------------------------------------------------------------------------
    async def decide(self, headers: dict[str, str], body: bytes | None,
                     declared: int | None = None) -> Reply | Forwarding:
        """Decide a request from its headers (`:method`, `:path` among them) and its whole
        body (None: it has none). `declared`: the size of a body left unread because its
        content-length is over the limit, which is refused from the headers alone."""
        size = declared if declared is not None else len(body or b"")
        if size > self.gateway.max_body_bytes:
            refusal = await self.gateway.handle(self.request_of(headers, b"", size))
            assert isinstance(refusal, Reply)  # a body over the limit is never forwarded
            return refusal
        result = await self.gateway.handle(self.request_of(headers, body or b""))
        if isinstance(result, Reply):
            return result
        exchange = result.exchange
        chains = self.chains()
        if not fallback.has_chain(exchange.cursor.attempts, chains) and self._loaded_clusters \
                and await self._loaded_clusters.refresh():
            chains = self.chains()  # Envoy had it already: the poll had not seen it yet
        exchange.cursor.attempts = fallback.usable_plan(exchange.cursor.attempts, chains)
        request_id = exchange.trace.request_id
        pending = _Pending(exchange, time.monotonic())
        if len(exchange.cursor.attempts) > 1:
            # Attempts share one header map: each removes what another provider set there.
            pending.set_by_attempts = sorted({h for a in exchange.cursor.attempts
                                              for h in _own(a.set_headers) if h not in headers})
            pending.body_length = None if body is None else len(body)
            if exchange.cursor.attempts[0].body is not None:
                pending.client_body = body
        self._pending[request_id] = pending
        if exchange.reshapes:
            pending.rewritten = asyncio.Event()
            self._rewrites[request_id] = pending
        forwarding = forward(result, headers, body, self.process)
        if exchange.precedent is not None:  # the answer the requests like it get
            kept = forwarding.set_headers
            if EXTRA_KEYS.isdisjoint(k for k in forwarding.metadata if k != "budget_warning"):
                # Its only extra, if any, is its own budget warning, which the requests like
                # it do not take (`Replaying`): each says itself whether it has one.
                kept = {k: v for k, v in kept.items() if k != EXTRAS_HEADER}
            exchange.precedent.hosts[HOST] = Made(dataclasses.replace(
                forwarding, body=None, set_headers=kept))
        return forwarding

    def decide_now(self, req: Request) -> Replaying | None:
        """A request like one decided before, decided from that decision's precedent at once
        (`Gateway.decide_like`), and its answer made from that decision's own; None: it is
        for `decide_soon` or `decide`. `req.head`: the client head as the decide filter
        encoded it, which names the request's method, path and headers (`Request.head`)."""
        replayed = self.gateway.decide_like(req, HOST)
        return None if replayed is None else self._replaying(req, replayed)

    async def decide_soon(self, req: Request) -> Replaying | None:
        """`decide_now` on a store that reserves over the network (`Gateway.decide_like_soon`):
        the reservation and the write-ahead awaited; None: it is for `decide`."""
        replayed = await self.gateway.decide_like_soon(req, HOST)
        return None if replayed is None else self._replaying(req, replayed)

    def _replaying(self, req: Request, replayed: Replayed) -> Replaying:
        trace, attempt, billing = replayed.trace, replayed.attempt, replayed.billing
        self._pending[trace.request_id] = _Pending(replayed, time.monotonic(),
                                                   adopt=self.gateway.adopt)
        # What `forward` makes of it: the precedent's answer, with this request's own ids,
        # credential, trace, length (unless it is the one the client declared), budget
        # warning and rate-limit headers.
        own = {**_own(attempt.set_headers), "x-request-id": trace.request_id}
        if attempt.body is not None or "content-length" not in req.headers:
            own["content-length"] = str(len(req.body if attempt.body is None else
                                            attempt.body))
        fields = {"request_id": trace.request_id}
        if billing.warning:
            fields["budget_warning"] = billing.warning
        if billing.rate_headers:
            fields.update(billing.rate_headers)
        if not EXTRA_KEYS.isdisjoint(fields):  # (else its precedent's answer says)
            own[EXTRAS_HEADER] = "1"
        return Replaying(replayed.precedent.hosts[HOST], own, fields, attempt.body)

    # -- attempts of a fallback plan ------------------------------------------------------
    def attempt(self, request_id: str, provider: str, status: int | None) -> Reply | Forwarding:
        """An attempt of a fallback plan reached `provider` (Envoy chose it), other than the
        first one the decision made: the changes that put that provider on the request (its
        credentials, path and host, and its body when it is not the one Envoy replays), and
        the metadata that names it on the response. `status`: the attempt before it answered
        that (Envoy retried it); None when it got no answer."""
        pending = self._pending.get(request_id)
        if pending is None or not provider:
            log.error("attempt of an unknown request (%s) or provider (%s)", request_id,
                      provider)
            err = GatewayError("gateway_error", "The gateway lost track of this request between "
                               "fallback attempts; see the ext_proc log.")
            return Reply(err.status, {"content-type": "application/json"},
                         err.body("openai"), {"code": err.code})
        exchange = pending.exchange
        if status is not None:
            exchange.attempt_answered(status)
        attempt = exchange.begin_attempt(provider)
        set_headers, removed = _changes(attempt, pending.body_length, {},
                                        pending.set_by_attempts)
        body = attempt.body if attempt.body is not None else pending.client_body
        return Forwarding(set_headers, removed, body, {
            "fallback_count": str(exchange.cursor.fallback_count)})

    @staticmethod
    def request_of(headers: dict[str, str], body: bytes, declared: int | None = None,
                   head: str | None = None) -> Request:
        """The request the decide filter describes: `headers` its client's (pseudo-headers
        too), `declared` the length of a body it did not read, `head` the client head as
        it encoded it."""
        plain = {k: v for k, v in headers.items() if not k.startswith(":")}
        return Request(method=headers.get(":method", "GET"), path=headers.get(":path", "/"),
                       headers=plain, body=body, peer=headers.get("x-forwarded-for", ""),
                       declared_length=declared, head=head)

    # -- responses ----------------------------------------------------------------------------
    def metered(self, request_id: str, seq: int, last: bool, data: bytes,
                head: tuple[int, dict[str, str]] | None = None,
                first_byte: float | None = None, ended_at: float | None = None) -> None:
        """The response's bytes, taken in order: each meter post's (with the first, its
        status and headers, and for a stream when its first bytes came, in seconds since
        the epoch: they may have gone on to the client before that post), and `last`, the
        end the access log reports (`ended`; `ended_at`: when the provider's last bytes
        came). The last, or a response complete before it, settles the request."""
        pending = self._pending.get(request_id)
        if pending is None:
            return  # settled already (complete before its last post), or not this process's
        pending.since = time.monotonic()
        pending.early[seq] = (data, last)
        if ended_at is not None:
            pending.ended_at = ended_at
        try:
            while pending.posts in pending.early:
                data, last = pending.early.pop(pending.posts)
                exchange = pending.exchange
                if pending.posts == 0:
                    if head is None:
                        raise ValueError("the first meter post came without the head")
                    exchange.response_head(*head)
                    if first_byte is not None:
                        exchange.first_byte_at(first_byte)
                pending.posts += 1
                if data:
                    exchange.on_chunk(data)
                if last or exchange.complete:
                    if pending.ended_at is not None:
                        exchange.ended_at(pending.ended_at)
                    self._settle(request_id, "completed")
                    return
        except Exception:
            log.exception("request %s: could not meter its response", request_id)
            self._settle(request_id, "error", "the gateway could not meter the response")
            return
        if pending.ended is not None and pending.posts >= pending.ended.posts:
            self._end(request_id)

    def ended(self, request_id: str, status: int, details: str, posts: int,
              tail: bytes = b"", client_left: bool = False, whole: Whole | None = None
              ) -> None:
        """Envoy's access log: the request ended, having made `posts` meter posts and
        streamed `tail` after them. `whole`: the meter saw the response to its end, which
        settles it once those posts are in, as a last post would. Else it ended without
        (`status` 0: no response; `client_left`: the client reset it), and is charged what
        it streamed once those posts are in."""
        pending = self._pending.get(request_id)
        if pending is None:
            return
        pending.ended = _Ended(status, details, posts, tail, client_left)
        if whole is not None:
            try:
                head = None if whole.head is None else response_head(whole.head)[:2]
            except ValueError as e:
                log.error("request %s: the meter's report of its end is unreadable (%s): "
                          "charged what it streamed", request_id, e)
            else:
                self.metered(request_id, posts, True, tail, head, whole.first_byte, whole.at)
                if request_id not in self._pending:
                    return
        if pending.posts >= posts:
            self._end(request_id)
        else:
            pending.since = time.monotonic()
            self._end_unless_posting(request_id)

    def _end_unless_posting(self, request_id: str) -> None:
        """End a request whose end came before the posts it counted once neither has come for
        POSTS_GRACE (`metered` ends it as soon as they are all in)."""
        pending = self._pending.get(request_id)
        if pending is None:
            return
        quiet = time.monotonic() - pending.since
        if quiet >= POSTS_GRACE:
            self._end(request_id)
        else:
            asyncio.get_running_loop().call_later(POSTS_GRACE - quiet, self._end_unless_posting,
                                                  request_id)

    def _end(self, request_id: str) -> None:
        pending = self._pending.get(request_id)
        if pending is None or pending.ended is None:
            return
        status, details, _, tail, client_left = pending.ended
        exchange = pending.exchange
        if pending.posts == 0 and status:
            exchange.response_head(status, {})
            # Envoy answered in the provider's place (a client that left is not that: the
            # details then name its departure, after the provider's own status; nor is a
            # response the meter saw bytes of, which only the provider sends it: an SSE
            # stream cut before its first post).
            if details not in ("via_upstream", "") and not client_left and not tail:
                exchange.proxy_replied(status, details)
                self._settle(request_id, "completed")
                return
        if tail and exchange.status is not None:
            exchange.on_chunk(tail)
        if client_left and exchange.status is not None:  # not the provider's doing
            self._settle(request_id, "abandoned", "the client went away mid-response")
        else:
            self._cut_short(request_id, "the client went away before the provider answered",
                            "the response stream ended early")

    def _cut_short(self, request_id: str, unanswered: str, mid_response: str) -> None:
        """Settle a request that did not end: `abandoned` if the provider had not answered,
        else `aborted` (charged what streamed), with why."""
        if self._pending[request_id].exchange.status is None:
            self._settle(request_id, "abandoned", unanswered)
        else:
            self._settle(request_id, "aborted", mid_response)

    def _settle(self, request_id: str, outcome: str, error: str | None = None) -> None:
        pending = self._pending.pop(request_id, None)
        if pending is None:
            return
        if outcome == "abandoned":
            self._rewrites.pop(request_id, None)  # no response: no rewrite will take it
        rewritten = pending.rewritten
        if outcome != "completed" or rewritten is None or rewritten.is_set():
            pending.exchange.finish(outcome, error)
            return
        # The meter's report of the end may come before the rewrite has passed it on: let
        # the rewrite finish, so a stream it ended early is settled as the client saw it.
        # (Started at once: a wait cancelled before it began would never settle.)
        task = asyncio.Task(self._after_rewrite(pending, rewritten, outcome, error),
                            loop=asyncio.get_running_loop(), eager_start=True)
        self.settling.add(task)
        task.add_done_callback(self.settling.discard)

    @staticmethod
    async def _after_rewrite(pending: _Pending, rewritten: asyncio.Event, outcome: str,
                             error: str | None) -> None:
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(rewritten.wait(), REWRITE_GRACE)
        finally:  # settled even if the wait is cancelled (ext_proc stopping)
            pending.exchange.finish(outcome, error)

    # -- response rewrites ----------------------------------------------------------------
    async def _rewrite(self, first: pb.ProcessingRequest,
                       requests: AsyncIterator[pb.ProcessingRequest]
                       ) -> AsyncIterator[pb.ProcessingResponse]:
        """Answer the response headers, then each body chunk with the bytes the client
        should get (STREAMED): a translation across API families, or a hidden usage chunk."""
        pending = self._rewrites.pop(_request_id(first) or "", None)
        try:
            async for answer in self._rewritten(pending.exchange if pending else None,
                                                first, requests):
                yield answer
        finally:
            if pending is not None and pending.rewritten is not None:
                pending.rewritten.set()

    async def _rewritten(self, exchange: Exchange | None, first: pb.ProcessingRequest,
                         requests: AsyncIterator[pb.ProcessingRequest]
                         ) -> AsyncIterator[pb.ProcessingResponse]:
        rewriter = None
        msg: pb.ProcessingRequest | None = first
        while msg is not None:
            kind = msg.WhichOneof("request")
            if kind == "response_headers":
                headers = _headers(msg.response_headers.headers)
                changed: dict[str, str] = {}
                answer = pb.ProcessingResponse()
                if exchange is not None and _from_upstream(msg):
                    status = int(headers.get(":status", "0"))
                    rewriter, changed = exchange.reshaping(status, headers.get("content-type"))
                    if isinstance(rewriter, JSONTranslation) and 200 <= status < 300:
                        answer.mode_override.CopyFrom(WHOLE_BODY)
                answer.response_headers.response.header_mutation.CopyFrom(
                    pb.HeaderMutation(set_headers=_set(changed)))
                yield answer
                if msg.response_headers.end_of_stream:
                    return
            elif kind == "response_body":
                chunk = msg.response_body
                answer = pb.CommonResponse()
                if rewriter is not None:
                    began = time.perf_counter()
                    kept = rewriter.feed(chunk.body)
                    if chunk.end_of_stream:
                        kept += rewriter.flush()
                    answer.body_mutation.body = kept
                    if exchange is not None:  # the gateway's own time on the response
                        exchange.overhead += time.perf_counter() - began
                        # An answer it could not translate:
                        if exchange.settlement.replaced_status is not None:
                            yield immediate(Reply(exchange.settlement.replaced_status, {
                                "content-type": "application/json",
                                **exchange.response_headers()}, kept,
                                {"code": exchange.settlement.code}))
                            return
                yield pb.ProcessingResponse(response_body=pb.BodyResponse(response=answer))
                if chunk.end_of_stream:
                    return
            else:
                return
            msg = await anext(requests, None)

    def sweep(self, now: float | None = None) -> None:
        """Close forwarded requests Envoy has said nothing of for QUIET_AFTER: their end was
        never reported. The provider may have had them: they are charged what they surely
        cost."""
        now = time.monotonic() if now is None else now
        for request_id, pending in list(self._pending.items()):
            if now - pending.since > QUIET_AFTER:
                log.warning("request %s: Envoy never reported its end; settled as far as it "
                            "got", request_id)
                why = "Envoy never reported how the request ended"
                self._cut_short(request_id, why, why)
        # A rewrite Envoy never opened (a response it answered itself, say).
        for request_id, waiting in list(self._rewrites.items()):
            if waiting.exchange.settlement.finished and now - waiting.since > QUIET_AFTER:
                del self._rewrites[request_id]

    async def ends_reported(self, within: float = ENDS_REPORTED) -> None:
        """Wait, `within` seconds at most, until every request decided here has been settled:
        as the gateway stops, the ends of answers its clients have may still be in Envoy's
        access log, which sends them in batches (`envoy_config.RESPONSE_END_FLUSH`), and
        which are settled at once from now on."""
        self.stopping = True
        until = time.monotonic() + within
        while self._pending and time.monotonic() < until:
            await asyncio.sleep(0.01)

    def settle_all(self) -> None:
        """Settle every request still open as the service stops: what it streamed so far,
        its input at least once the provider had answered."""
        for request_id in list(self._pending):
            self._cut_short(request_id, "the gateway stopped before the provider answered",
                            "the gateway stopped while the response streamed")

    async def sweep_forever(self, every: float = 60.0) -> None:
        while True:
            await asyncio.sleep(every)
            self.sweep()


def access_log_service(processor: ExternalProcessor) -> ProxyReplies:
    """The gRPC access log service beside `processor`: the requests Envoy answered itself,
    and the ends of those `processor` decided (without pauses once it stops)."""
    return ProxyReplies(processor.gateway, processor.ended,
                        stopping=lambda: processor.stopping)


async def start_server(gateway: Gateway, where: Listener,
                       loaded_clusters: LoadedClusters | None = None,
                       process: int | None = None
                       ) -> tuple[grpc.aio.Server, ExternalProcessor]:
    """Serve ext_proc (with gRPC health, and the access log of requests Envoy answered
    itself) on a private Unix socket, or TCP (see listen.py), and the decision service
    beside it (`where.decider`)."""
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", -1),
                                      ("grpc.max_send_message_length", -1),
                                      # A second ext_proc on the port fails, not shares it.
                                      ("grpc.so_reuseport", 0)])
    processor = ExternalProcessor(gateway, loaded_clusters, process)
    pb_grpc.add_ExternalProcessorServicer_to_server(processor, server)
    als_pb2_grpc.add_AccessLogServiceServicer_to_server(access_log_service(processor), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set(EXTPROC_SERVICE,
                              health_pb2.HealthCheckResponse.SERVING)
    bind(server, where)
    await server.start()
    restrict(where)
    from extproc.decider import start_decider  # it builds on this module

    processor.decider = await start_decider(processor, Listener(
        where.decider or decider_targets([where.target])[0], where.tls, where.insecure_tcp))
    processor.sweeper = asyncio.get_running_loop().create_task(processor.sweep_forever())
    return server, processor


async def stop_server(server: grpc.aio.Server, processor: ExternalProcessor) -> None:
    """Undo `start_server`: the sweep, the gRPC server (its streams get 2 s to end), the
    decision service; then settle the requests still open."""
    if processor.sweeper:
        processor.sweeper.cancel()
    await server.stop(grace=2)
    await processor.stop_decider()
    processor.settle_all()
    if processor.settling:  # responses waiting for a rewrite that can no longer come
        for task in processor.settling:
            task.cancel()  # (settled as they are)
        await asyncio.wait(processor.settling)
