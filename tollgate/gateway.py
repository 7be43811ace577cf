"""The request's path through the core, in one place.

request id & trace -> route -> key auth -> size cap -> parse body -> model resolution
(aliases, allowlist) -> tool policy -> routing plan -> price -> admission (rate limits and
budgets, all or nothing; a provider at its cap is passed over) -> forward. When the
exchange ends it settles the real cost and tokens and writes the ledger row. Each step is a
small module; this file only orders them.

A request like one forwarded before is decided from that decision (`decide_like`, for a host
that asks; `decide_like_soon` where the store reserves over the network): key, size cap, the
body read as JSON and matched to a precedent (precedent.py), which vouches for what parsing
would check -> price -> admission (budgets and rate limits) -> forward, the rest of the path
being the precedent's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import time
from datetime import UTC, datetime
from typing import Any, NamedTuple

from tollgate import body as bodies
from tollgate import (
    candidates,
    fastjson,
    metrics,
    policy,
    routes,
    routing,
    telemetry,
    translate,
)
from tollgate import headers as header_rules
from tollgate.accesslog import access_log
from tollgate.admission import Admission, estimated_input
from tollgate.breaker import Breakers
from tollgate.catalog import ModelCatalog
from tollgate.config.load import LoadedConfig
from tollgate.config.problems import ConfigError, Problem
from tollgate.config.schema import VirtualKey
from tollgate.config.watch import ConfigHolder
from tollgate.errors import GatewayError
from tollgate.exchange import Exchange
from tollgate.keys import (
    KeyIndex,
    PepperMismatch,
    authenticate,
    authenticated,
    by_prefix,
    load_pepper,
    usable,
)
from tollgate.ledger import LedgerRow
from tollgate.precedent import (
    VARYING,
    KnownHead,
    Precedent,
    Precedents,
    Replayed,
    can_be_one,
    head_of,
    written_ahead,
)
from tollgate.providers import adapter_for
from tollgate.request import Attempt, Forward, Reply, Request, check_header_values
from tollgate.settlement import Billing
from tollgate.store import LimitSettlement, Store, StoreUnavailable, open_store
from tollgate.store.spool import Spooled
from tollgate.telemetry import RequestTrace

log = logging.getLogger("tollgate")
# How long after its exchange ends a request is settled, by default (see Gateway._finish).
SETTLE_AFTER = 0.001

# The gateway's code for a status the proxy answered with itself.
PROXY_REPLY_CODES = {400: "invalid_request", 408: "invalid_request", 413: "payload_too_large",
                     431: "invalid_request", 503: "gateway_unavailable",
                     504: "gateway_unavailable"}


def upstream_body(attempt: Attempt, route: routes.Route, body: bodies.ParsedBody,
                  raw: bytes) -> bytes | None:
    """The body this provider gets; None when it is the client's bytes, unchanged."""
    doc = body.doc
    if attempt.translated:
        doc = translate.request(route.family, attempt.family, body.doc, attempt.model)
    own = attempt.adapter.body(doc, attempt.model)
    if own is not None:  # the provider type's own shape (Bedrock's)
        return fastjson.encoded(own)
    if attempt.translated:
        return fastjson.encoded(doc)
    out = None
    named = attempt.body_model or attempt.model
    if named != body.model:
        out = bodies.replace_top_level(raw, "model", named)
    if attempt.strip_usage:
        options = body.doc.get("stream_options")
        options = {**(options if isinstance(options, dict) else {}), "include_usage": True}
        out = bodies.set_top_level(raw if out is None else out, "stream_options", options,
                                   "stream_options" in body.doc)
    return out


class _Like(NamedTuple):
    """A request that matches a precedent (`Gateway._like`): what it shares with it and
    what is its own, before it is admitted."""

    loaded: LoadedConfig
    found: Precedent
    trace: RequestTrace
    key: VirtualKey
    route: routes.Route
    body: bodies.ParsedBody
    attempt: Attempt
    row: LedgerRow  # written ahead once admitted
    started: float
    now: datetime


class Gateway:
    def __init__(self, holder: ConfigHolder, store: Store | None = None,
                 siblings: bool = False, dry_run: bool = False):
        """`siblings`: other processes of this gateway serve from the same state (ext_proc
        as several processes). `dry_run`: decide and record nothing (`tollgate explain`,
        with a store that answers reservations without taking them)."""
        self.holder = holder
        self.siblings = siblings
        self.dry_run = dry_run
        # How long after its exchange ends a request is settled: a host whose exchanges end
        # as the response's end goes on to the client (Envoy's) settles at once (`_finish`).
        self.settle_after = SETTLE_AFTER
        self._index_for: tuple[LoadedConfig, KeyIndex] | None = None
        self._store = store
        # (state, spool, lease, ledger rows) the store was opened with
        self._store_for: tuple[str, str | None, int, int] | None = None
        self._renewer: asyncio.Task[None] | None = None
        self._checkpointer: asyncio.Task[None] | None = None
        # In flight (renewed, checkpointed): each exchange, and how many response bytes it
        # had when last written ahead.
        self._in_flight: dict[str, tuple[Exchange | Replayed, int]] = {}
        self._settling: set[asyncio.Task[None]] = set()
        self.breakers = Breakers()
        self.admission = Admission(self.store, self._shadowed)
        self._precedents = Precedents()
        # The hosts that decide requests from precedents (`decide_like`): none, none are kept.
        self.precedents_for: set[str] = set()
        self._apply(holder.current)
        holder.on_reload(lambda _old, new: self._apply(new))
        if store is None:  # opened at start: a state file another gateway serves is seen now
            try:
                self.store()
            except (StoreUnavailable, sqlite3.Error, OSError) as e:
                loaded = holder.current
                raise ConfigError([Problem(str(loaded.path), None, "gateway.state",
                                           f"{loaded.config.gateway.state} cannot be "
                                           f"opened: {e}")]) from None
        self._check_limits_are_kept(holder.current)
        holder.check_with(self._check_limits_are_kept)
        self._check_pepper(holder.current)
        holder.check_with(self._check_pepper)
        self._replayer: asyncio.Task[None] | None = None

    def _apply(self, loaded: LoadedConfig) -> None:
        """Settings held outside the config object follow every reload."""
        settings = loaded.config.gateway
        breaker = settings.circuit_breaker
        self.breakers.failures, self.breakers.cooldown = breaker.failures, \
            breaker.cooldown_seconds
        telemetry.configure(settings.telemetry)
        access_log.configure(settings.telemetry.access_log, loaded.path.parent)
        for provider in loaded.config.model_providers:
            adapter_for(provider).prepare()

    def _check_pepper(self, loaded: LoadedConfig) -> None:
        """The pepper here is the one the config's keys were made with (a config copied
        to a new place without it would refuse every key)."""
        try:
            self._keys(loaded)
        except PepperMismatch as e:
            raise ConfigError([Problem(str(loaded.path), None, "gateway.pepper_fingerprint",
                                       str(e))]) from None

    def _check_limits_are_kept(self, loaded: LoadedConfig) -> None:
        """Rate limits on a SQLite state are kept in the one process that serves the file;
        a second process would admit the full limit again, so it refuses them."""
        alone = getattr(self._store, "serves_alone", None)
        if alone is None or (alone and not self.siblings):
            return  # a shared store (Redis), or this process alone serves the file
        cfg = loaded.config
        limited = [f"model provider {p.id}" for p in cfg.model_providers
                   if p.rate_limit and p.rate_limit.any()] + \
            [f"virtual key {k.id}" for k in cfg.virtual_keys
             if k.config.rate_limits and k.config.rate_limits.any()]
        if limited:
            raise ConfigError([Problem(
                str(loaded.path), None, "gateway.state",
                f"more than one gateway process serves {cfg.gateway.state} (another "
                "gateway, or ext_proc as several processes), and rate "
                f"limits ({', '.join(limited[:3])}{', ...' if len(limited) > 3 else ''}) "
                "are counted in the process that serves a SQLite state: two processes would "
                "each admit the full limit. Share limits across processes with a Redis state "
                "(gateway.state: redis://...), or run one gateway per state file.")])

    @classmethod
    def from_path(cls, path: str, watch: bool = True, siblings: bool = False) -> Gateway:
        holder = ConfigHolder(path)
        if watch:
            holder.start()
        return cls(holder, siblings=siblings)

    def store(self) -> Store:
        """The state store named by the running config (reopened if an edit changes it)."""
        loaded = self.holder.current
        settings = loaded.config.gateway
        wanted = (settings.state, settings.spool, settings.hold_lease_seconds,
                  settings.ledger_max_rows)
        if self._store is None or (self._store_for is not None and wanted != self._store_for):
            previous = self._store
            self._store = open_store(settings.state, loaded.path, settings.spool,
                                     lease_seconds=settings.hold_lease_seconds,
                                     ledger_max_rows=settings.ledger_max_rows)
            self._store_for = wanted
            # Requests in flight settle into the new store; the old one is closed.
            if previous is not None:
                with contextlib.suppress(RuntimeError):
                    self._track(asyncio.get_running_loop().create_task(previous.close()))
        return self._store

    @property
    def max_body_bytes(self) -> int:
        return self.holder.current.config.gateway.max_body_bytes

    def _keys(self, loaded: LoadedConfig) -> KeyIndex:
        cached = self._index_for
        if cached is None or cached[0] is not loaded:
            settings = loaded.config.gateway
            pepper = load_pepper(settings.pepper_env, loaded.path, settings.pepper_fingerprint)
            cached = (loaded, KeyIndex(loaded.config.virtual_keys, pepper))
            self._index_for = cached
        return cached[1]

    async def handle(self, req: Request, as_key: VirtualKey | None = None) -> Reply | Forward:
        """The decision for `req`. `as_key`: the key it is taken to carry instead of the one
        in its headers (`tollgate explain --key ID`, which has no secret)."""
        loaded = self.holder.current
        trace = telemetry.start(req.method, req.path, req.headers)
        family = routes.family_for_path(req.path, dict(req.headers))
        key: VirtualKey | None = None
        seen: dict[str, str | None] = {"route": None, "model": None}  # for the ledger row
        try:
            route = routes.match(req.path)
            seen["route"] = route.name if route else None
            if route is None:
                raise GatewayError("not_found", f"tollgate does not serve {req.method} "
                                   f"{req.path.split('?')[0]}; routes: {', '.join(routes.ROUTES)}.")
            if req.method != route.method:
                raise GatewayError("method_not_allowed",
                                   f"{route.name} takes {route.method}, not {req.method}.")
            settings = loaded.config.gateway
            # The key first, so a refusal for size or headers is attributed like any other.
            key = usable(as_key) if as_key is not None else \
                authenticate(self._keys(loaded), dict(req.headers))
            check_header_values(req.headers)
            if req.body_size > settings.max_body_bytes:
                raise GatewayError("payload_too_large",
                                   f"Request body is {req.body_size} bytes; this gateway accepts "
                                   f"at most {settings.max_body_bytes} (gateway.max_body_bytes).")
            if not route.forwarded:
                return self._reply(trace, loaded, 200, self._models(loaded, key, family), key,
                                   seen=seen)
            bodies.check_content_type(req.headers.get("content-type"))
            bodies.check_content_encoding(req.headers.get("content-encoding"))
            body = bodies.parse(route, req.body)
            trace.keep_prompt(body.doc)
            seen["model"] = body.model  # as asked; as resolved once the alias applies
            model = policy.resolve_model(key, body.model) if body.model else None
            seen["model"] = model
            # Most keys have no MCP or URL rules: nothing to look for.
            found = candidates.of(body.doc, req.body, key.config.policy_rules.urls.anywhere) \
                if policy.reaches_matter(key) else candidates.Candidates()
            shadowed: list[policy.Shadowed] = []
            try:
                policy.check(key, model, body.model, body.tools, found, shadowed)
            finally:  # recorded on a request another control refuses too
                if shadowed:
                    seen["shadow"] = "; ".join(map(str, shadowed))
                for s in shadowed:
                    self._shadowed(s.control, s.code)
            unserved: list[str] = []
            targets = loaded.derived.targets(key, route, model or "", skipped=unserved)
            if unserved:
                log.warning("request %s: %s", trace.request_id, "; ".join(unserved))
            # A streamed chat completion that did not ask for usage: ask for it upstream.
            ask_usage = bodies.wants_usage_chunk(route, body.doc)
            attempts = self._plan(targets, key, route, body, req, trace, settings, ask_usage,
                                  loaded.catalog)
            billing, passed_over, attempts = await self.admission.admit(
                loaded, trace.request_id, key, route, body, req, attempts)
            billing.shadow = [str(s) for s in shadowed] + billing.shadow
            if billing.passed_over_later:
                unserved += billing.passed_over_later
            if billing.output_cap is not None:
                self._cap_output(attempts, route, body, req, billing.output_cap)
            exchange = Exchange(trace=trace, prefix=settings.header_prefix, route=route, key=key,
                                requested_model=body.model, attempts=attempts,
                                stream=body.stream, billing=billing, settle=self._settle,
                                prices=loaded.prices, breakers=self.breakers,
                                client_wants_usage=route.name == "chat_completions"
                                and body.stream and not ask_usage, passed_over=passed_over,
                                unserved=unserved, shadow_headers=settings.shadow_headers)
            await self._admit(exchange)
            trace.decided = time.perf_counter()
            if as_key is None and self.precedents_for and settings.precedents \
                    and not self.dry_run and self._precedents.worth_keeping(loaded, key, req):
                self._keep_precedent(loaded, req, body, exchange, bool(shadowed))
            return Forward(exchange, attempts[0])
        except GatewayError as e:
            return self._error(trace, loaded, family, e, key, seen)
        except Exception:
            log.exception("request %s failed inside the gateway", trace.request_id)
            err = GatewayError("gateway_error", "The gateway failed to handle this request "
                               f"(request id {trace.request_id}); see the gateway log.")
            return self._error(trace, loaded, family, err, key, seen)

    def _keep_precedent(self, loaded: LoadedConfig, req: Request, body: bodies.ParsedBody,
                        exchange: Exchange, shadowed: bool) -> None:
        """Keep a forwarded decision as the precedent of the requests like it, if it can be
        one (precedent.py); the exchange names it, for its host."""
        rest = can_be_one(loaded, req, body, exchange, shadowed)
        if rest is not None:
            exchange.precedent = Precedent.of(loaded, req, body, rest, exchange)
            self._precedents.keep(exchange.precedent)

    @property
    def keeps_precedents(self) -> bool:
        """Some precedent is kept: a request may be decided from one (`decide_like`)."""
        return bool(self._precedents)

    def decide_like(self, req: Request, host: str) -> Replayed | None:
        """`req` decided from the precedent it matches (precedent.py), exactly as the full
        decision (`handle`) would decide it, at once, in this call: admitted to its budgets and
        rate limits and written ahead, its exchange made only once something needs it
        (`adopt`). None, with nothing taken, when it matches no precedent forwarded on
        `host`, or its precedent cannot vouch for it (a reservation the store cannot make at
        once or does not grant), or the store reserves over the network
        (`decide_like_soon` then): `handle` decides it then."""
        if not self.keeps_precedents or not self._reserves_now():
            return None
        like = self._like(req, host)
        if like is None:
            return None
        billing = self.admission.again(like.loaded, like.trace.request_id, like.key, like.route,
                                       req, like.attempt, like.found.price, like.found.lineage,
                                       like.found.terms, like.row, like.now)
        return None if billing is None else self._replayed(like, billing)

    async def decide_like_soon(self, req: Request, host: str) -> Replayed | None:
        """`decide_like` for a store that reserves over the network (Redis, shared by
        replicas): the reservation made and the request written ahead as the full decision
        makes and writes them, each awaited, with nothing else of the full decision's work.
        None, with nothing taken, as `decide_like`'s; also when the store is unreachable
        (`handle` then fails open or closed, as configured), and at once for a store that
        reserves at once (`decide_like` has decided)."""
        if not self.keeps_precedents or self._reserves_now():
            return None
        like = self._like(req, host)
        if like is None:
            return None
        billing = await self.admission.again_soon(
            like.loaded, like.trace.request_id, like.key, like.route, req, like.attempt,
            like.found.price, like.found.lineage, like.found.terms, like.now)
        if billing is None:
            return None
        replayed = self._replayed(like, billing)
        try:
            await self._write_row_ahead(like.row, billing.charged(like.attempt.provider_id))
        except Exception as e:  # not on this node's disk: not forwarded on a promise
            self._not_in_flight(like.trace.request_id)
            log.error("request %s could not be written ahead (%s): decided in full",
                      like.trace.request_id, e)
            return None
        return replayed

    def _reserves_now(self) -> bool:
        """Whether the store a precedent was kept with reserves at once (`decide_like`), or
        over the network (`decide_like_soon`). Either admits on whichever store the config
        names now: this only picks the path."""
        return self._store is not None and self._store.reserves_now

    def _like(self, req: Request, host: str) -> _Like | None:
        """What `req` shares with the precedent it matches, and what is its own (see
        `decide_like`): None when it matches none forwarded on `host`."""
        started, loaded, now = time.monotonic(), self.holder.current, datetime.now(UTC)
        try:
            # A head decided from a precedent before settles its key, route and checks.
            known = self._precedents.known(loaded, req, now)
            if known is not None:
                key, until = usable(known.key, now), known.until
            else:
                key, until = authenticated(self._keys(loaded), req.headers, now)
            if not self._precedents.candidates(loaded, key, req):
                return None
            trace = telemetry.start(req.method, req.path, req.headers)
            if req.body_size > loaded.config.gateway.max_body_bytes:
                return None
            route = known.route if known is not None else routes.match(req.path)
            assert route is not None  # a precedent was forwarded on it
            try:
                doc = bodies.read_json(req.body)
            except (ValueError, RecursionError):
                return None  # (not JSON: the full decision says so)
            compared = known.compared if known is not None else head_of(req.headers)
            found = self._precedents.find(loaded, key, req, doc, compared) \
                if type(doc) is dict else None
            if found is None or host not in found.hosts:
                return None
            body = found.body(doc)
            if known is None:
                # The other headers are the precedent's, whose values passed this check.
                check_header_values(req.headers, only=VARYING)
                if req.head is not None:
                    self._precedents.know(req.head, KnownHead(loaded, key, until, route,
                                                              compared))
            # The provider's credential as it is now (a key file rotates, a token expires).
            credential, _ = found.attempt.adapter.auth(req.headers)
        except GatewayError:
            return None
        attempt = found.attempt.copy()
        attempt.set_headers = {**attempt.set_headers, **credential,
                               "traceparent": trace.traceparent}
        self._set_body(attempt, route, body, req.body)
        row = written_ahead(found, trace.request_id, estimated_input(req), started, now)
        return _Like(loaded, found, trace, key, route, body, attempt, row, started, now)

    def _replayed(self, like: _Like, billing: Billing) -> Replayed:
        """A request admitted from its precedent, in flight from here on."""
        replayed = Replayed(like.found, like.trace, like.key, like.body, like.attempt, billing,
                            like.started)
        self._start_keeping()
        self._in_flight[like.trace.request_id] = (replayed, 0)
        like.trace.decided = time.perf_counter()
        return replayed

    def adopt(self, replayed: Replayed) -> Exchange:
        """The exchange of a request decided from a precedent, made now that something
        needs it (its response, a checkpoint): what the full decision would have made."""
        p = replayed.precedent
        exchange = Exchange(trace=replayed.trace, prefix=p.prefix, route=p.route,
                            key=replayed.key, requested_model=replayed.body.model,
                            attempts=[replayed.attempt], stream=replayed.body.stream,
                            billing=replayed.billing, settle=self._settle,
                            prices=p.loaded.prices, breakers=self.breakers,
                            client_wants_usage=p.client_wants_usage,
                            shadow_headers=p.shadow_headers)
        exchange.started, exchange.from_precedent = replayed.started, True
        metrics.decided_from_precedent()  # (counted here, off the request's path)
        request_id = replayed.trace.request_id
        if request_id in self._in_flight:
            self._in_flight[request_id] = (exchange, self._in_flight[request_id][1])
        return exchange

    def record_proxy_reply(self, req: Request, status: int, detail: str, *,
                           request_id: str | None = None, at: datetime | None = None,
                           key_prefix_only: bool = False) -> None:
        """A request the proxy answered itself before the gateway could decide (Envoy's codec
        refusing it, a body over the buffer, a client too slow, ext_proc down): its ledger
        row, under the request id the proxy gave the client, so every request leaves one.

        It is attributed to its key when the key is valid or, when the proxy kept only the
        key's shown prefix (`key_prefix_only`), to the one key with that prefix."""
        loaded = self.holder.current
        trace = telemetry.start(req.method, req.path, req.headers, request_id)
        code = PROXY_REPLY_CODES.get(status, "gateway_error")
        key = None
        if key_prefix_only:
            key = by_prefix(loaded.config.virtual_keys, dict(req.headers))
        else:
            with contextlib.suppress(GatewayError):
                key = authenticate(self._keys(loaded), dict(req.headers))
        route = routes.match(req.path)
        # Recorded as the gateway's own refusals are; the proxy has answered already.
        self._reply(trace, loaded, status, b"", key, {
            "action": "reject", "code": code,
            "message": f"Refused by the proxy before the gateway's decision "
                       f"({detail or status})."}, {"route": route.name if route else None},
            at=at)

    def _plan(self, targets: list[routing.Target], key: VirtualKey, route: routes.Route,
              body: bodies.ParsedBody, req: Request, trace: telemetry.RequestTrace,
              settings: Any, ask_usage: bool, catalog: ModelCatalog | None = None
              ) -> list[Attempt]:
        """The attempts to make, in order: the first target, then the fallbacks the key's
        `fallback.on` allows (at most `fallback.max_attempts` in all)."""
        fallback = key.config.fallback
        targets = [targets[i] for i in self.breakers.order([t.provider.id for t in targets])]
        chosen = targets[: fallback.max_attempts] if fallback.on else targets[:1]
        strip = header_rules.upstream_removals(req.headers, settings.header_prefix)
        attempts = []
        for i, target in enumerate(chosen):
            try:
                attempt = routing.build_attempt(target, route, req.path, dict(req.headers),
                                                strip, body.stream, catalog)
            except GatewayError:
                if i == 0:
                    raise
                log.warning("fallback provider %s skipped for %s: no credential",
                            target.provider.id, trace.request_id)
                continue
            attempt.strip_usage = ask_usage and not attempt.translated
            self._set_body(attempt, route, body, req.body)
            attempt.set_headers["traceparent"] = trace.traceparent
            # Identity encoding upstream so the tap reads usage from plain bytes; the
            # client's SDK decodes either way.
            attempt.set_headers["accept-encoding"] = "identity"
            attempts.append(attempt)
        return attempts

    @staticmethod
    def _set_body(attempt: Attempt, route: routes.Route, body: bodies.ParsedBody,
                  raw: bytes) -> None:
        """The attempt's body (None: the client's bytes) and the signature made over it."""
        attempt.body = upstream_body(attempt, route, body, raw)
        attempt.adapter.sign(attempt, raw if attempt.body is None else attempt.body)

    def _cap_output(self, attempts: list[Attempt], route: routes.Route,
                    body: bodies.ParsedBody, req: Request, cap: int) -> None:
        """Set the output cap a budget lowered on the request, in its API's own field (and
        so in each provider's, through translation)."""
        name = bodies.output_cap_field(route, body.doc)
        assert name is not None  # only routes with an output cap are capped
        raw = bodies.set_top_level(req.body, name, cap, name in body.doc)
        body.doc[name] = cap
        for attempt in attempts:
            self._set_body(attempt, route, body, raw)
            if attempt.body is None:  # the client's bytes, but for the cap
                attempt.body = raw

    def _shadowed(self, control: str, code: str, count: int = 1) -> None:
        """Count what a shadow control would have refused (not in a dry run: nothing was)."""
        if not self.dry_run:
            metrics.shadowed(control, code, count)

    def in_flight(self) -> int:
        """Requests forwarded and not yet settled."""
        return len(self._in_flight)

    async def _admit(self, exchange: Exchange) -> None:
        """Write ahead that the request is in flight: if the gateway dies before it settles,
        its row survives, charged its input, which the provider bills once it has it (and
        later, the output streamed so far: see `_checkpoint_forever`)."""
        if self.dry_run:
            return
        self._start_keeping()
        self._in_flight[exchange.trace.request_id] = (exchange, 0)
        try:
            await self._write_ahead(exchange)
        except BaseException:  # not forwarded: nothing will settle it
            self._not_in_flight(exchange.trace.request_id)
            raise

    def _not_in_flight(self, request_id: str) -> None:
        """A request admitted but not forwarded after all (its write-ahead failed on this
        node's disk) is not kept in flight: its holds, leases in a shared store, are not
        renewed, and return when their lease runs out, as a replica's that died before it
        forwarded them. (Kept, they were renewed until the gateway stopped.)"""
        self._in_flight.pop(request_id, None)

    def _start_keeping(self) -> None:
        """Requests in flight are renewed while they run (their holds, and their written-ahead
        rows in a shared store) and checkpointed."""
        if self._renewer is None:
            loop = asyncio.get_running_loop()
            self._renewer = loop.create_task(self._renew_forever())
            self._checkpointer = loop.create_task(self._checkpoint_forever())

    async def _write_ahead(self, exchange: Exchange) -> None:
        await self._write_row_ahead(exchange.settlement.written_ahead(),
                                    exchange.billing.charged(exchange.provider_id))

    async def _write_row_ahead(self, row: LedgerRow, counters: list[str]) -> None:
        """A request's row written ahead, charged to `counters`; a store that cannot be
        reached is warned of (the request goes on), any other failure raised."""
        try:
            await self.store().admit(row, counters)
        except StoreUnavailable as e:
            log.warning("could not write ahead request %s: %s", row.request_id, e)

    async def _checkpoint_forever(self) -> None:
        """Rewrite the written-ahead rows of requests that received more of their response,
        so a gateway that dies mid-stream leaves them charged the output streamed up to
        `gateway.checkpoint_seconds` before it died, not their input alone."""
        while True:
            await asyncio.sleep(self.holder.current.config.gateway.checkpoint_seconds)
            moved = []
            for request_id, (exchange, written) in list(self._in_flight.items()):
                if isinstance(exchange, Replayed):
                    continue  # nothing of its response has come (its exchange would hold it)
                received = exchange.meter.bytes
                if received > written and not exchange.settlement.finished:
                    self._in_flight[request_id] = (exchange, received)
                    moved.append(exchange)
            # Together: a spooled store writes them in one transaction and one call.
            done = await asyncio.gather(*map(self._write_ahead, moved), return_exceptions=True)
            for exchange, outcome in zip(moved, done, strict=True):
                if isinstance(outcome, Exception):  # one request's fault is its own
                    log.error("could not checkpoint request %s: %s",
                              exchange.trace.request_id, outcome)

    def _settle(self, exchange: Exchange, row: LedgerRow) -> None:
        """Observe the request, write its ledger row and settle budgets and TPM: all in a
        task, off the host's hot path (mitmproxy sends a stream's end after the hook that
        settles it)."""
        billing = exchange.billing
        counters, released, limits = billing.charges(
            exchange.provider_id, exchange.cursor.reached,
            row.input_tokens + row.cached_input_tokens + row.cache_write_tokens
            + row.output_tokens)
        self._record(row, counters, billing.reserved, limits, released, exchange)

    def _observe(self, trace: telemetry.RequestTrace, row: LedgerRow,
                 decision: dict[str, Any] | None = None, exchange: Exchange | None = None
                 ) -> None:
        """A finished request, refused or served: its span, its metrics and its access-log
        line, all from its ledger row."""
        if self.dry_run:
            return
        loaded = self.holder.current
        settings = loaded.config.gateway.telemetry
        # The access-log line: the row, then what else is known of the request.
        extra = row.to_dict()
        extra["trace_id"], extra["span_id"] = trace.trace_id, trace.span_id
        if exchange is None:
            trace.end(row)
            metrics.observe(row, decision_seconds=trace.decision_seconds,
                            rate_limit=(decision or {}) if row.code == "rate_limited" else None,
                            known_models=loaded.known_models)
            extra.update({k: v for k, v in (decision or {}).items()
                          if k not in ("request_id", "key", "principal", "action", "code")})
        else:
            attempt = exchange.attempt
            if trace.recorded is not None:  # (else it ends as it is)
                trace.end(row, requested_model=exchange.requested_model,
                          provider_name=attempt.adapter.gen_ai_provider,
                          error=exchange.settlement.error, end_time=exchange.end_time_ns())
            ended = exchange.ended or time.monotonic()
            metrics.observe(
                row, decision_seconds=trace.decision_seconds,
                response_seconds=exchange.overhead,
                upstream_seconds=ended - exchange.started - exchange.overhead,
                first_byte_seconds=exchange.first_byte - exchange.started
                if exchange.first_byte is not None and exchange.is_sse else None,
                fallbacks=exchange.cursor.fallbacks, labels=settings.metric_labels,
                known_models=loaded.known_models)
            extra.update({"requested_model": exchange.requested_model,
                          "upstream": attempt.url, "error": exchange.settlement.error,
                          "bytes_out": exchange.meter.bytes,
                          "sse_events": exchange.meter.events,
                          "budget_warning": exchange.billing.warning,
                          "precedent": exchange.from_precedent})
        extra["overhead_ms"] = round((trace.decision_seconds + (
            exchange.overhead if exchange else 0.0)) * 1000, 3)
        if trace.prompt is not None:
            extra["prompt"] = trace.prompt
        access_log.write(extra)

    def _record(self, row: LedgerRow, counters: list[str] | None = None,
                reserved: int = 0, limits: LimitSettlement | None = None,
                released: list[str] | None = None, exchange: Exchange | None = None) -> None:
        if self.dry_run:
            return
        coro = self._finish(counters or [], reserved, row, limits, released, exchange)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            asyncio.run(coro)
            return
        self._track(loop.create_task(coro))
        if self._replayer is None and isinstance(self._store, Spooled):
            self._replayer = loop.create_task(self._replay_forever())

    def _track(self, task: asyncio.Task[None]) -> None:
        """Keep a settlement task until it is done, so close() can wait for it."""
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def _finish(self, counters: list[str], reserved: int, row: LedgerRow,
                      limits: LimitSettlement | None = None,
                      released: list[str] | None = None,
                      exchange: Exchange | None = None) -> None:
        # mitmproxy runs new tasks eagerly, up to their first await, and its host ends some
        # exchanges before their reply is written (its fallback relay's, an error page):
        # settled at once, the request (a SQLite state never awaits) would hold it back.
        # (Settling its served responses at once, after their end was sent, measured 1% to
        # 4% slower cold and 0.3 ms quicker for a request sent right after: not done.)
        if self.settle_after:
            await asyncio.sleep(self.settle_after)
        self._in_flight.pop(row.request_id, None)
        if exchange is not None:  # its span, metrics and access-log line
            try:
                self._observe(exchange.trace, row, exchange=exchange)
            except Exception:  # never at the cost of its ledger row
                log.exception("could not observe request %s", row.request_id)
        # A decision that came meanwhile (a client's next request, sent as soon as this
        # answer reached it) is answered before this row is written, not after: with a
        # client quick to send, it waited some 0.1 ms for the commit.
        await asyncio.sleep(0)
        try:
            await self.store().finish(counters, reserved, row, limits, released)
        except Exception:
            log.exception("could not record request %s: %s", row.request_id,
                          row.to_json())

    async def _renew_forever(self) -> None:
        """Keep the holds of requests still in flight (a stream of hours) from expiring."""
        while True:
            store = self.store()
            # The store's own lease (opened with gateway.hold_lease_seconds).
            lease = getattr(getattr(store, "inner", store), "lease_seconds", None) or \
                self.holder.current.config.gateway.hold_lease_seconds
            await asyncio.sleep(lease / 3)
            leases = [(rid, ex.billing.counters if ex.billing.reserved else [],
                       ex.billing.reserved) for rid, (ex, _) in list(self._in_flight.items())]
            try:
                await self.store().renew(leases)
            except StoreUnavailable as e:
                log.warning("could not renew %d budget holds: %s", len(leases), e)

    async def _replay_forever(self, every: float = 1.0) -> None:
        """Put spooled requests into a shared store as soon as it is back, and record those
        of replicas gone for good (every tenth turn)."""
        turn = 0
        while True:
            await asyncio.sleep(every)
            store, turn = self._store, turn + 1
            if isinstance(store, Spooled):
                with contextlib.suppress(StoreUnavailable):
                    if store.pending():
                        await store.flush()
                    if turn % 10 == 0:
                        await store.recover()

    async def drain(self) -> None:
        """Wait for every finished request to be recorded (before shutting down)."""
        # Finished tasks leave the set only on a later loop turn, so wait on unfinished ones.
        while pending := [t for t in self._settling if not t.done()]:
            await asyncio.gather(*pending, return_exceptions=True)

    async def close(self) -> None:
        await self.drain()
        await asyncio.to_thread(telemetry.flush)  # the last requests' spans
        access_log.flush()  # and access-log lines
        for task in (self._replayer, self._renewer, self._checkpointer):
            if task is not None:
                task.cancel()
        if self._store is not None:
            await self._store.close()
        self.holder.stop()

    def _reply(self, trace: telemetry.RequestTrace, loaded: LoadedConfig, status: int,
               doc: Any, key: VirtualKey | None, decision: dict[str, Any] | None = None,
               seen: dict[str, str | None] | None = None, at: datetime | None = None
               ) -> Reply:
        """An answer the gateway gives itself; it leaves its ledger row like any request."""
        headers = {"content-type": "application/json",
                   **trace.headers(loaded.config.gateway.header_prefix, "tollgate", 0)}
        decision = {"request_id": trace.request_id, "key": key.id if key else None,
                    "principal": key.principal if key else None, **(decision or {})}
        trace.decided = time.perf_counter()
        body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
        row = self._answered_row(loaded, trace, status, key, decision, seen or {}, at)
        self._observe(trace, row, decision)
        self._record(row)
        return Reply(status, headers, body, decision)

    @staticmethod
    def _answered_row(loaded: LoadedConfig, trace: telemetry.RequestTrace, status: int,
                      key: VirtualKey | None, decision: dict[str, Any],
                      seen: dict[str, str | None], at: datetime | None = None) -> LedgerRow:
        lin = loaded.derived.lineage(key.scope) if key else None
        return LedgerRow(
            request_id=trace.request_id, ts=(at or datetime.now(UTC)).isoformat(),
            key_id=key.id if key else None, key_name=key.name if key else None,
            principal=key.principal if key else None, org=lin.org if lin else None,
            team=lin.team if lin else None, project=lin.project if lin else None,
            provider=None, model=seen.get("model"), route=seen.get("route") or "unknown",
            status=status, outcome="refused" if status >= 400 else "answered",
            code=decision.get("code"), latency_ms=round(trace.decision_seconds * 1000, 1),
            shadow=seen.get("shadow"))

    def _error(self, trace: telemetry.RequestTrace, loaded: LoadedConfig, family: str,
               err: GatewayError, key: VirtualKey | None,
               seen: dict[str, str | None] | None = None) -> Reply:
        reply = self._reply(trace, loaded, err.status, err.body(family), key,
                            {"action": "reject", "code": err.code, **err.context,
                             "message": err.message}, seen)
        reply.headers.update(err.headers)
        return reply

    def _models(self, loaded: LoadedConfig, key: VirtualKey, family: str) -> dict[str, Any]:
        """GET /v1/models: what this key may call, in the client's API shape."""
        cfg = loaded.config
        scopes = routing.visible_scopes(cfg, key.scope)
        names: dict[str, str] = {}
        for p in cfg.model_providers:
            if p.scope not in scopes:
                continue
            for m in loaded.prices.matching(p.serves()) + [
                    m for m in p.serves() if not any(c in m for c in "*?[")]:
                if policy.model_allowed(key, m):
                    names.setdefault(m, p.type)
        for alias, target in key.config.model_aliases.items():
            if target in names:
                names.setdefault(alias, names[target])
        if family == "anthropic":
            now = datetime.now(UTC).isoformat()
            data = [{"type": "model", "id": m, "display_name": m, "created_at": now}
                    for m in sorted(names)]
            return {"data": data, "has_more": False,
                    "first_id": data[0]["id"] if data else None,
                    "last_id": data[-1]["id"] if data else None}
        return {"object": "list", "data": [
            {"id": m, "object": "model", "created": 0, "owned_by": names[m]}
            for m in sorted(names)]}
