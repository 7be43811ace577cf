"""The request's path through the core, in one place.

request id & trace -> route -> key auth -> size cap -> parse body -> model resolution
(aliases, allowlist) -> tool policy -> routing plan -> price -> admission (rate limits and
budgets, all or nothing; a provider at its cap is passed over) -> forward. When the
exchange ends it settles the real cost and tokens and writes the ledger row. Each step is a
small module; this file only orders them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from datetime import UTC, datetime
from typing import Any

from tollgate import body as bodies
from tollgate import (
    budgets,
    candidates,
    metrics,
    policy,
    ratelimit,
    routes,
    routing,
    telemetry,
    translate,
)
from tollgate import headers as header_rules
from tollgate.accesslog import access_log
from tollgate.breaker import Breakers
from tollgate.catalog import ModelCatalog
from tollgate.config.load import LoadedConfig
from tollgate.config.problems import ConfigError, Problem
from tollgate.config.schema import ModelProvider, VirtualKey
from tollgate.config.watch import ConfigHolder
from tollgate.errors import GatewayError
from tollgate.exchange import Exchange
from tollgate.keys import (
    KeyIndex,
    PepperMismatch,
    authenticate,
    by_prefix,
    load_pepper,
    usable,
)
from tollgate.ledger import LedgerRow
from tollgate.pricing import ZERO_PRICE
from tollgate.providers import adapter_for
from tollgate.request import Attempt, Forward, Reply, Request, check_header_values
from tollgate.scopes import lineage
from tollgate.settlement import Billing
from tollgate.store import LimitSettlement, Reservation, Store, StoreUnavailable, open_store
from tollgate.store.spool import Spooled
from tollgate.usage import Usage

log = logging.getLogger("tollgate")

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
        return json.dumps(own).encode()
    if attempt.translated:
        return json.dumps(doc).encode()
    out = None
    named = attempt.body_model or attempt.model
    if named != body.model:
        out = bodies.replace_top_level(raw, "model", named)
    if attempt.strip_usage:
        options = body.doc.get("stream_options")
        options = {**(options if isinstance(options, dict) else {}), "include_usage": True}
        out = bodies.set_top_level(raw if out is None else out, "stream_options", options)
    return out


class Gateway:
    def __init__(self, holder: ConfigHolder, store: Store | None = None,
                 siblings: bool = False, dry_run: bool = False):
        """`siblings`: other processes of this gateway serve from the same state (ext_proc
        as several processes). `dry_run`: decide and record nothing (`tollgate explain`,
        with a store that answers reservations without taking them)."""
        self.holder = holder
        self.siblings = siblings
        self.dry_run = dry_run
        self._index_for: tuple[LoadedConfig, KeyIndex] | None = None
        self._store = store
        # (state, spool, lease, ledger rows) the store was opened with
        self._store_for: tuple[str, str, int, int] | None = None
        self._renewer: asyncio.Task[None] | None = None
        self._checkpointer: asyncio.Task[None] | None = None
        # In flight (renewed, checkpointed): each exchange, and how many response bytes it
        # had when last written ahead.
        self._in_flight: dict[str, tuple[Exchange, int]] = {}
        self._settling: set[asyncio.Task[None]] = set()
        self.breakers = Breakers()
        self._apply(holder.current)
        holder.on_reload(lambda _old, new: self._apply(new))
        if store is None:
            self.store()  # opened at start: a state file another gateway serves is seen now
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
            targets = routing.targets(loaded.config, key, route, model or "",
                                      catalog=loaded.catalog, skipped=unserved)
            if unserved:
                log.warning("request %s: %s", trace.request_id, "; ".join(unserved))
            # A streamed chat completion that did not ask for usage: ask for it upstream.
            ask_usage = bodies.wants_usage_chunk(route, body.doc)
            attempts = self._plan(targets, key, route, body, req, trace, settings, ask_usage,
                                  loaded.catalog)
            billing, passed_over, attempts = await self._admit_request(
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
            return Forward(exchange, attempts[0])
        except GatewayError as e:
            return self._error(trace, loaded, family, e, key, seen)
        except Exception:
            log.exception("request %s failed inside the gateway", trace.request_id)
            err = GatewayError("gateway_error", "The gateway failed to handle this request "
                               f"(request id {trace.request_id}); see the gateway log.")
            return self._error(trace, loaded, family, err, key, seen)

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
        body.doc[name] = cap
        raw = bodies.set_top_level(req.body, name, cap)
        for attempt in attempts:
            self._set_body(attempt, route, body, raw)
            if attempt.body is None:  # the client's bytes, but for the cap
                attempt.body = raw

    @staticmethod
    def _unseen_input_allowance(loaded: LoadedConfig, key: VirtualKey,
                                body: bodies.ParsedBody, attempts: list[Attempt]) -> int:
        """Input tokens to reserve beyond what the body shows, for a request that refers to
        input the gateway cannot see: the largest allowance of the blocking budgets that
        apply; one that refuses such requests refuses it."""
        unseen = bodies.unseen_input(body.doc)
        if unseen is None:
            return 0
        cfg, now = loaded.config, datetime.now(UTC)
        lin = lineage(cfg, key.scope)
        applying = {h.budget.id: h.budget for a in attempts
                    for h in budgets.holds_for(cfg, key, lin, a.provider_id, now)
                    if h.blocking}
        for b in applying.values():
            if b.unseen_input == "refuse":
                raise GatewayError(
                    "budget_exceeded",
                    f"Budget {b.id} ({b.name}) does not admit requests that refer to input "
                    f"the gateway cannot see (this one has {unseen}): their cost has no "
                    "bound. Send the input in the request itself, or give the budget a token "
                    f"allowance for it (`unseen_input: <tokens>` on budget {b.id}).",
                    context={"budget": b.id, "unseen_input": unseen})
        return max((b.unseen_input for b in applying.values()
                    if isinstance(b.unseen_input, int)), default=0)

    async def _admit_request(self, loaded: LoadedConfig, request_id: str, key: VirtualKey,
                             route: routes.Route, body: bodies.ParsedBody, req: Request,
                             attempts: list[Attempt]
                             ) -> tuple[Billing, list[str], list[Attempt]]:
        """Price the request, then admit it to its rate limits and budgets in one atomic
        step: every budget that applies holds its worst-case cost (that of the dearest model
        its plan may fall back to), every rate limit counts it, its TPM its worst-case tokens.
        A provider at its own cap is passed over for the next in the plan when the key falls
        back on `rate_limit`; returns the billing and why providers were passed over.
        (Models a policy maps to are checked for a price when the config is loaded.)"""
        cfg, settings = loaded.config, loaded.config.gateway
        model = attempts[0].model
        price = loaded.prices.lookup(model, attempts[0].prices)
        if price is None and settings.unpriced == "block":
            raise GatewayError("model_not_priced",
                               f"Model {model!r} has no price in the price table, so its spend "
                               "cannot be metered. Add it to prices.yaml (or set "
                               "gateway.unpriced: allow).", param="model")
        input_estimate = math.ceil(len(req.body) / 2)  # generous: a token is >= ~2 bytes
        input_estimate += self._unseen_input_allowance(loaded, key, body, attempts)
        requested_cap = bodies.output_cap(route, body.doc)
        requested_tier = bodies.requested_tier(body.doc)
        providers = {p.id: p for p in cfg.model_providers}

        def worst_case(cap: int | None) -> tuple[budgets.WorstCase | None, int]:
            """The dearest attempt's worst case, and the most tokens any attempt may use,
            with the output capped at `cap` (None: each model's own ceiling)."""
            cases = []
            for a in attempts:
                ceiling = loaded.catalog.max_output_tokens(a.model)
                out = cap if cap is not None else settings.default_max_output_tokens \
                    if ceiling is None else ceiling
                price = loaded.prices.lookup(a.model, a.prices) or ZERO_PRICE
                # The tier it asks for, else the one the provider's account serves by default.
                held, tier = price.served(Usage(
                    input_tokens=input_estimate,
                    service_tier=requested_tier or providers[a.provider_id].default_service_tier))
                cases.append(budgets.WorstCase(
                    a.model, held, input_estimate, out, cap is not None,
                    bodies.output_cap_field(route, body.doc), tier))
            if not route.metered:
                return None, 0
            return max(cases, key=lambda c: c.micros), max(
                input_estimate + c.output_tokens for c in cases)

        worst, tokens = worst_case(requested_cap)
        amount = worst.micros if worst else 0
        billing = Billing(price=price, lineage=lineage(cfg, key.scope),
                          estimated_input_tokens=math.ceil(len(req.body) / 4))
        now = datetime.now(UTC)
        key_caps = ratelimit.key_limits(key, now)
        passed_over: list[str] = []
        lowered = 0  # times an `on_breach: cap` budget lowered the output cap (bounded)
        i = -1
        while i + 1 < len(attempts):
            i += 1
            attempt = attempts[i]
            holds = budgets.holds_for(cfg, key, billing.lineage, attempt.provider_id, now)
            # Settled into even if not reserved (a request priced at nothing).
            billing.held = {attempt.provider_id: [h.counter for h in holds]}
            holds = holds if amount else []
            limits = key_caps + ratelimit.provider_limits(providers[attempt.provider_id], now)
            billing.limits = [(lim, None if lim.scope == "key" else attempt.provider_id)
                              for lim in limits]
            if not holds and not limits:
                granted = None  # nothing to reserve for this attempt
                break
            granted = await self._reserve(settings, request_id, holds, amount, limits, tokens)
            if granted is None:  # the store is down and the gateway fails open
                return billing, passed_over, attempts[i:]
            clock = time.time()
            rate_headers = ratelimit.headers(route.family, limits, granted.windows, clock)
            if granted.granted:
                break
            if granted.refused_by is not None:
                j = granted.refused_by
                hold, counter = holds[j], granted.counters[j]
                assert worst is not None  # a reservation with holds has a worst case
                fits = worst.output_that_fits(hold.limit_micros - counter.committed)
                new_cap = budgets.lowered_cap(hold.budget, worst, fits, lowered)
                if new_cap is None:
                    raise budgets.refusal(hold, counter.spent, counter.reserved, worst, now)
            else:
                over = [(limits[j], granted.windows[j]) for j in granted.refused_limits]
                by_key = [o for o in over if o[0].scope == "key"]
                if not by_key and "rate_limit" in key.config.fallback.on and \
                        i + 1 < len(attempts):
                    cap = over[0][0]
                    passed_over.append(
                        f"{attempt.provider_id}:rate_limit ({cap.dimension} {cap.limit})")
                    log.info("request %s: provider %s is at its %s cap, passed over for %s",
                             request_id, attempt.provider_id, cap.dimension,
                             attempts[i + 1].provider_id)
                    continue
                # Under an `on_breach: cap` budget, a TPM limit with room for less output
                # than the request may write serves it with the output cap that fits.
                room = ratelimit.tokens_room(over)
                capping = next((h.budget for h in holds if h.budget.on_breach == "cap"
                                and not h.shadow), None)
                new_cap = None if room is None or worst is None else budgets.lowered_cap(
                    capping, worst, room - worst.input_tokens, lowered)
                if new_cap is None:
                    # The limit that holds the request back longest (or that it can never
                    # fit).
                    cap, window = max(by_key or over, key=lambda o: math.inf
                                      if o[1].retry_after is None else o[1].retry_after)
                    err = ratelimit.refusal(cap, window, cap.amount(tokens), clock)
                    err.headers = {**rate_headers, **err.headers}
                    raise err
            # Served with a lower output cap, which the budget or TPM can pay for: the same
            # attempt again, for less.
            billing.output_cap = new_cap
            worst, tokens = worst_case(new_cap)
            amount, lowered = (worst.micros if worst else 0), lowered + 1
            i -= 1
        # The provider admitted may not be the first (one at its cap was passed over).
        billing.price = loaded.prices.lookup(attempt.model, attempt.prices) or billing.price
        if granted is not None:
            if holds:
                billing.reserved = amount  # renewed from _admit on, while it runs
                counted = list(zip(holds, granted.counters, strict=True))
                billing.warning = next((w for h, c in counted
                                        if (w := budgets.warning(h, c.committed))), None)
                over_budget = [budgets.shadow_refusal(h, c.committed, amount)
                               for h, c in counted if h.would_refuse(c.committed)]
                self._shadowed("budget", "budget_exceeded", len(over_budget))
                billing.shadow += over_budget
            billing.rate_headers = rate_headers
            billing.admitted_at = granted.at
            over_limit = ratelimit.shadow_refusals(limits, granted.windows)
            self._shadowed("rate_limit", "rate_limited", len(over_limit))
            billing.shadow += over_limit
        billing.reserved_tokens, billing.worst_case = tokens, amount
        kept = [attempt]
        for later in attempts[i + 1:]:
            if await self._admit_fallback(loaded, request_id, key, billing, later,
                                          providers[later.provider_id], amount, tokens, now):
                kept.append(later)
        return billing, passed_over, kept

    def _shadowed(self, control: str, code: str, count: int = 1) -> None:
        """Count what a shadow control would have refused (not in a dry run: nothing was)."""
        if not self.dry_run:
            metrics.shadowed(control, code, count)

    async def _reserve(self, settings: Any, request_id: str, holds: list[budgets.Hold],
                       amount: int, limits: list[ratelimit.Limit], tokens: int
                       ) -> Reservation | None:
        """One atomic reservation; None when the store is down and the gateway fails open."""
        try:
            return await self.store().reserve(request_id, holds, amount, limits, tokens)
        except StoreUnavailable as e:
            if settings.fail_closed:
                log.error("state store unavailable, refusing request %s: %s", request_id, e)
                raise GatewayError(
                    "gateway_unavailable",
                    "The gateway's state store is unavailable and budgets and rate limits "
                    "are fail-closed (gateway.fail_closed), so the request was not "
                    "forwarded. Retry shortly.") from None
            log.warning("state store unavailable, serving %s without budgets or rate "
                        "limits: %s", request_id, e)
            return None

    async def _admit_fallback(self, loaded: LoadedConfig, request_id: str, key: VirtualKey,
                              billing: Billing, attempt: Attempt, provider: ModelProvider,
                              amount: int, tokens: int, now: datetime) -> bool:
        """Admit a fallback attempt before it can be sent, as the first was: its provider's
        rate limits and the budgets scoped to that provider. One that cannot be admitted is
        left out of the plan (a provider at its cap is passed over); False then."""
        cfg = loaded.config
        applying = budgets.holds_for(cfg, key, billing.lineage, attempt.provider_id, now)
        # Budgets not scoped to a provider hold the request once, from its first attempt.
        held = [h for h in applying if h.counter not in billing.counters] if amount else []
        billing.held[attempt.provider_id] = [h.counter for h in applying]
        limits = ratelimit.provider_limits(provider, now)
        if not held and not limits:
            return True
        granted = await self._reserve(cfg.gateway, request_id, held, amount, limits, tokens)
        if granted is None:  # the store is down and the gateway fails open: nothing held
            return True
        if not granted.granted:
            del billing.held[attempt.provider_id]
            why = (f"budget {held[granted.refused_by].budget.id}"
                   if granted.refused_by is not None else
                   ", ".join(f"{limits[j].dimension} {limits[j].limit}"
                             for j in granted.refused_limits))
            billing.passed_over_later.append(f"{attempt.provider_id}:not admitted ({why})")
            log.info("request %s: fallback provider %s left out of the plan: %s",
                     request_id, attempt.provider_id, why)
            return False
        billing.limits += [(lim, attempt.provider_id) for lim in limits]
        billing.admitted_at = billing.admitted_at or granted.at
        return True

    def in_flight(self) -> int:
        """Requests forwarded and not yet settled."""
        return len(self._in_flight)

    async def _admit(self, exchange: Exchange) -> None:
        """Write ahead that the request is in flight: if the gateway dies before it settles,
        its row survives, charged its input, which the provider bills once it has it (and
        later, the output streamed so far: see `_checkpoint_forever`)."""
        if self.dry_run:
            return
        request_id = exchange.trace.request_id
        # Renewed while it runs (its holds, and its written-ahead row in a shared store).
        if self._renewer is None:
            loop = asyncio.get_running_loop()
            self._renewer = loop.create_task(self._renew_forever())
            self._checkpointer = loop.create_task(self._checkpoint_forever())
        self._in_flight[request_id] = (exchange, 0)
        await self._write_ahead(exchange)

    async def _write_ahead(self, exchange: Exchange) -> None:
        try:
            charged = exchange.billing.charges(exchange.provider_id, exchange.cursor.reached, 0)[0]
            await self.store().admit(exchange.settlement.written_ahead(), charged)
        except StoreUnavailable as e:
            log.warning("could not write ahead request %s: %s", exchange.trace.request_id, e)

    async def _checkpoint_forever(self) -> None:
        """Rewrite the written-ahead rows of requests that received more of their response,
        so a gateway that dies mid-stream leaves them charged the output streamed up to
        `gateway.checkpoint_seconds` before it died, not their input alone."""
        while True:
            await asyncio.sleep(self.holder.current.config.gateway.checkpoint_seconds)
            for request_id, (exchange, written) in list(self._in_flight.items()):
                received = exchange.meter.bytes
                if received > written and not exchange.settlement.finished:
                    self._in_flight[request_id] = (exchange, received)
                    try:
                        await self._write_ahead(exchange)
                    except Exception:  # one request's fault must not stop the others'
                        log.exception("could not checkpoint request %s", request_id)

    def _settle(self, exchange: Exchange, row: LedgerRow) -> None:
        """Write the ledger row and settle budgets and TPM, off the host's hot path."""
        billing = exchange.billing
        counters, released, limits = billing.charges(
            exchange.provider_id, exchange.cursor.reached,
            row.input_tokens + row.cached_input_tokens + row.cache_write_tokens
            + row.output_tokens)
        self._observe(exchange.trace, row, exchange=exchange)
        self._record(row, counters, billing.reserved, limits, released)

    def _observe(self, trace: telemetry.RequestTrace, row: LedgerRow,
                 decision: dict[str, Any] | None = None, exchange: Exchange | None = None
                 ) -> None:
        """A finished request, refused or served: its span, its metrics and its access-log
        line, all from its ledger row."""
        if self.dry_run:
            return
        loaded = self.holder.current
        settings = loaded.config.gateway.telemetry
        extra: dict[str, Any] = {"trace_id": trace.trace_id, "span_id": trace.span_id}
        if exchange is None:
            trace.end(row)
            metrics.observe(row, decision_seconds=trace.decision_seconds,
                            rate_limit=(decision or {}) if row.code == "rate_limited" else None,
                            known_models=loaded.known_models)
            extra.update({k: v for k, v in (decision or {}).items()
                          if k not in ("request_id", "key", "principal", "action", "code")})
        else:
            attempt = exchange.attempt
            trace.end(row, requested_model=exchange.requested_model,
                      provider_name=attempt.adapter.gen_ai_provider,
                      error=exchange.settlement.error)
            ended = time.monotonic()
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
                          "budget_warning": exchange.billing.warning})
        extra["overhead_ms"] = round((trace.decision_seconds + (
            exchange.overhead if exchange else 0.0)) * 1000, 3)
        if trace.prompt is not None:
            extra["prompt"] = trace.prompt
        access_log.write({**row.to_dict(), **extra})

    def _record(self, row: LedgerRow, counters: list[str] | None = None,
                reserved: int = 0, limits: LimitSettlement | None = None,
                released: list[str] | None = None) -> None:
        if self.dry_run:
            return
        coro = self._finish(counters or [], reserved, row, limits, released)
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
                      released: list[str] | None = None) -> None:
        self._in_flight.pop(row.request_id, None)
        try:
            await self.store().finish(counters, reserved, row, limits, released)
        except Exception:
            log.exception("could not record request %s: %s", row.request_id,
                          json.dumps(row.to_dict()))

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
        lin = lineage(loaded.config, key.scope) if key else None
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
