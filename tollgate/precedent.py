"""Precedents: a request decided as one like it was.

An app's traffic repeats itself: the same key, route, headers, model and options, with new
messages. The full decision (gateway.py) works out again, for each of them, what the config
alone settles: the route, the policy, the plan, the provider's credentials and path, the
price and the budgets that apply. A forwarded decision that depends on its request only
through the request's length and plain-text messages is kept as a precedent. A later
request that matches it is decided from it: the key is checked, the body read as JSON (all
of it but its plain messages is the precedent's, which was parsed and checked), the worst
case priced for its own length and held in its budgets, and the request written ahead, as
the full decision does; the rest is the precedent's. Whatever the precedent cannot vouch for
(a reservation not granted, a store that cannot make one) goes to the full decision with
nothing taken.

A request matches a precedent of its key when it has the same method and path, the same
headers (the values that differ on every request aside: the key itself, the body's length,
the proxy's request id) and the same body but for a `messages` list of plain-text messages.
Nothing a precedent could not repeat is ever kept: a plan of more than one provider or
chosen at random, a cap or a shadow control at work, rules on what a request
reaches, input the gateway cannot see, a trace continued or recorded, a prompt captured,
a response the gateway reshapes, a request signed over (Bedrock's SigV4).

A host that names the heads it has seen (`Request.head`: the Envoy host's decide filter
sends an app's head the same each time) has what a head settles kept once a request was
decided from a precedent with it (`KnownHead`): its key is not looked up by its secret again
nor its header values checked again, but the key's expiry, and a rotated-out secret's
grace, are checked on every request.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pydantic_core import PydanticSerializationError, to_json

from tollgate import body as bodies
from tollgate import policy, routing, telemetry
from tollgate.admission import WorstTerms, worst_terms
from tollgate.config.load import LoadedConfig
from tollgate.config.schema import VirtualKey
from tollgate.ledger import LedgerRow
from tollgate.pricing import ModelPrice, input_priced
from tollgate.providers.base import Adapter
from tollgate.routes import Route
from tollgate.scopes import Lineage
from tollgate.settlement import Billing
from tollgate.telemetry import RequestTrace

if TYPE_CHECKING:
    from tollgate.exchange import Exchange
    from tollgate.request import Attempt, Request

# Header values that differ on every request without changing its decision: the key (its
# header's name still counts), the body's length (priced from the body itself), the
# request id a proxy gives each request (the gateway names its own).
VARYING = frozenset({"authorization", "x-api-key", "content-length", "x-request-id"})
# Where a request's messages are, on the routes decided from precedents.
MESSAGES = {"chat_completions": "messages", "messages": "messages"}
_PLAIN = frozenset({"role", "content", "name"})
MAX_PER_KEY = 4  # precedents kept for each (key, method, path): the newest
MAX_PLACES = 256  # (key, method, path) kept, per loaded config: the newest
MAX_REST = 16 * 1024  # bytes of JSON: a body with more options is decided in full
MAX_HEADS = 256  # client heads known, per loaded config: the newest
# Full decisions at one (key, method, path) that keep their precedent while none of those
# kept there has decided a request: past this many, the place's requests do not repeat
# (each has options of its own: a `user` per end user, say), and only one full decision
# in KEEP_EVERY keeps its own (in case they come to): keeping one costs a full decision
# about a fifth more (bench.instructions' decision service).
UNUSED_KEEPS = 8
KEEP_EVERY = 16


def head_of(headers: Mapping[str, str]) -> frozenset[tuple[str, str]]:
    """The client's headers as a precedent compares them."""
    return frozenset((k, "" if k in VARYING else v) for k, v in headers.items())


def plain_messages(messages: Any) -> bool:
    """A list of messages whose content is text, with nothing else in them that a decision
    reads (tool calls, parts that name a file or a URL)."""
    return type(messages) is list and all(
        type(m) is dict and m.keys() <= _PLAIN and type(m.get("content")) is str
        and type(m.get("role")) is str for m in messages)


def rest_of(route: Route, doc: dict[str, Any]) -> bytes | None:
    """The body but its messages, when they are plain text (None: they are not, or the
    route is not decided from precedents), as JSON: compared as text, `true` is not `1`,
    `1` is not `1.0` and `NaN` is not `null`, which a decision tells apart. (What JSON
    cannot hold, a lone surrogate, is not compared: None.)"""
    field = MESSAGES.get(route.name)
    if field is None or not plain_messages(doc.get(field)):
        return None
    try:
        return to_json({k: v for k, v in doc.items() if k != field}, inf_nan_mode="constants")
    except PydanticSerializationError:
        return None


@dataclass(frozen=True)
class Precedent:
    """A forwarded decision, and what a request must share with it to be decided so."""

    loaded: LoadedConfig
    key: VirtualKey
    route: Route
    method: str
    path: str  # and query, as the client sent them
    head: frozenset[tuple[str, str]]
    rest: bytes
    # The decision: its one attempt (its body aside: each request's own is made anew), the
    # price and the place in the org tree it is billed at, and the exchange's options.
    attempt: Attempt
    price: ModelPrice | None
    lineage: Lineage
    prefix: str
    client_wants_usage: bool
    shadow_headers: bool
    terms: WorstTerms  # what prices its worst case, but a request's input estimate
    row: LedgerRow  # its written-ahead row: what a request decided from it writes, but its own
    # What `bodies.parse` read of its body (a request like it has the same but its plain
    # messages): its model, its tools, whether it streams.
    model: str | None
    tools: list[str]
    stream: bool
    # The hosts it was forwarded on, and what each made of the decision, to make the same of
    # the requests decided from it (the Envoy host: the decide filter's answer; mitmproxy's
    # needs nothing but the exchange).
    hosts: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def of(cls, loaded: LoadedConfig, req: Request, body: bodies.ParsedBody, rest: bytes,
           exchange: Exchange) -> Precedent:
        attempt = exchange.cursor.attempts[0].copy()
        attempt.body, attempt.set_headers = None, dict(attempt.set_headers)
        route, doc = exchange.route, body.doc
        return cls(loaded, exchange.key, route, req.method, req.path,
                   head_of(req.headers), rest, attempt, exchange.billing.price,
                   exchange.billing.lineage, exchange.prefix, exchange.client_wants_usage,
                   exchange.shadow_headers,
                   worst_terms(loaded, route, doc, attempt, bodies.output_cap(route, doc)),
                   exchange.settlement.written_ahead(), body.model, body.tools, body.stream)

    def body(self, doc: dict[str, Any]) -> bodies.ParsedBody:
        """The body of a request that matches it (`doc`: its JSON), as `bodies.parse` would
        read it: all but its plain messages is the precedent's, which that read before."""
        return bodies.ParsedBody(doc, self.model, self.tools, self.stream)


@dataclass(frozen=True)
class KnownHead:
    """What a client head (the host's name for a request's method, path and headers:
    `Request.head`) settles for each request that presents it again, once one was decided
    from a precedent: its key, found by the secret it presents and usable (checked again
    each time, with `until`: a rotated-out secret's grace), its route, its headers as a
    precedent compares them, and that their values passed the checks (they are the same)."""

    loaded: LoadedConfig
    key: VirtualKey
    until: datetime | None
    route: Route
    compared: frozenset[tuple[str, str]]


@dataclass
class Replayed:
    """A request decided from a precedent: admitted and written ahead, with what its
    exchange is made of once something needs one (the response's first bytes, a renewal)."""

    precedent: Precedent
    trace: RequestTrace
    key: VirtualKey
    body: bodies.ParsedBody
    attempt: Attempt
    billing: Billing
    started: float


def written_ahead(precedent: Precedent, request_id: str, estimated_input_tokens: int,
                  started: float, now: datetime) -> LedgerRow:
    """The row of a request decided from `precedent`, as `Settlement.written_ahead` writes
    a request's before any response: charged its input estimate. A copy of the precedent's,
    its own values set (the fields a name could put text that is not ASCII in are the
    precedent's, checked when it was made; its shadow refusals are none: a precedent is
    never kept where a shadow control is at work)."""
    tokens = estimated_input_tokens if precedent.route.metered else 0
    row = precedent.row.copy()
    row.request_id, row.ts = request_id, now.isoformat()
    row.input_tokens = tokens
    row.cost_micros, row.tier = input_priced(tokens, precedent.price) \
        if precedent.price is not None else (0, None)
    row.latency_ms = round((time.monotonic() - started) * 1000, 1)
    return row


def can_be_one(loaded: LoadedConfig, req: Request, body: bodies.ParsedBody,
               exchange: Exchange, shadowed: bool) -> bytes | None:
    """The body's part a precedent compares (see `rest_of`), when this forwarded decision can
    be one (see the module's docstring); None when it cannot. `shadowed`: a shadow control
    counted something on it."""
    key, billing, cursor = exchange.key, exchange.billing, exchange.cursor
    if (shadowed or billing.shadow or billing.output_cap is not None
            or len(cursor.attempts) != 1 or key.config.fallback.on or cursor.fallbacks
            or cursor.unserved or exchange.reshapes or policy.reaches_matter(key)
            or bodies.unseen_input(body.doc) is not None or exchange.trace.prompt is not None
            or "traceparent" in req.headers or "tracestate" in req.headers
            or telemetry.recording()):
        return None
    # A shadow budget's or limit's refusals are counted and told per request.
    if any(h.shadow for h in loaded.derived.holds(key, billing.lineage, exchange.provider_id,
                                                  datetime.now(UTC))) \
            or any(lim.shadow for lim, _ in billing.limits):
        return None
    # A request signed over (SigV4) has headers the signature sets or leaves out anew.
    if type(exchange.attempt.adapter).sign is not Adapter.sign:
        return None
    # A plan chosen at random is chosen anew for each request.
    rp = routing.policy_of(loaded.config, key)
    if rp is not None and rp.strategy == "weighted":
        return None
    rest = rest_of(exchange.route, body.doc)
    return None if rest is None or len(rest) > MAX_REST else rest


class Precedents:
    """The precedents of one loaded config, by key, method and path; the newest first."""

    def __init__(self) -> None:
        self._for: LoadedConfig | None = None
        self._kept: dict[tuple[str, str, str], list[Precedent]] = {}
        self._heads: dict[str, KnownHead] = {}
        # Full decisions at each place since a precedent kept there last decided a request.
        self._unused: dict[tuple[str, str, str], int] = {}

    def __bool__(self) -> bool:
        return bool(self._kept)

    def keep(self, precedent: Precedent) -> None:
        self._under(precedent.loaded)
        where = (precedent.key.id, precedent.method, precedent.path)
        kept = self._kept.get(where)
        if kept is None:
            if len(self._kept) >= MAX_PLACES:
                del self._kept[next(iter(self._kept))]  # the oldest
            kept = self._kept[where] = []
        # The newest first; one like it that it replaces (kept anew after a miss) goes.
        kept[:] = [precedent, *(p for p in kept
                                if (p.head, p.rest) != (precedent.head, precedent.rest))]
        del kept[MAX_PER_KEY:]

    def _under(self, loaded: LoadedConfig) -> None:
        if self._for is not loaded:  # a reload: the old config's are void
            self._for, self._kept, self._heads, self._unused = loaded, {}, {}, {}

    def find(self, loaded: LoadedConfig, key: VirtualKey, req: Request,
             doc: dict[str, Any], compared: frozenset[tuple[str, str]]) -> Precedent | None:
        """The precedent `req` matches; `compared`: its headers as a precedent compares
        them (`head_of`, or its `KnownHead`'s)."""
        kept = self._kept.get((key.id, req.method, req.path)) if self._for is loaded else None
        if not kept:
            return None
        rest = rest_of(kept[0].route, doc)
        found = next((p for p in kept if p.head == compared and p.rest == rest), None)
        if found is not None and self._unused:
            self._unused.pop((key.id, req.method, req.path), None)  # its requests repeat
        return found

    def worth_keeping(self, loaded: LoadedConfig, key: VirtualKey, req: Request) -> bool:
        """Whether a full decision of `key`'s on `req`'s method and path keeps its precedent
        (counted as one more): each does, until UNUSED_KEEPS in a row have been decided
        there with no request matching a precedent in between; then one in KEEP_EVERY."""
        self._under(loaded)
        place = (key.id, req.method, req.path)
        unused = self._unused.get(place, 0)
        if place not in self._unused and len(self._unused) >= MAX_PLACES:
            del self._unused[next(iter(self._unused))]  # the oldest
        self._unused[place] = unused + 1
        return unused < UNUSED_KEEPS or unused % KEEP_EVERY == 0

    def known(self, loaded: LoadedConfig, req: Request, now: datetime) -> KnownHead | None:
        """What `req`'s head settles, when it was decided from a precedent before and its
        secret is still its key's."""
        known = self._heads.get(req.head) if req.head is not None else None
        if known is None or known.loaded is not loaded or \
                (known.until is not None and now >= known.until):
            return None
        return known

    def know(self, head: str, known: KnownHead) -> None:
        if known.loaded is not self._for:
            return  # (its precedents are void: so is what it settled)
        if head not in self._heads and len(self._heads) >= MAX_HEADS:
            del self._heads[next(iter(self._heads))]  # the oldest
        self._heads[head] = known

    def candidates(self, loaded: LoadedConfig, key: VirtualKey, req: Request) -> bool:
        """Whether any precedent could match a request of `key` (before its body is read)."""
        return self._for is loaded and (key.id, req.method, req.path) in self._kept

