"""Admission: a request's worst case priced, and every attempt of its plan admitted to the
budgets and rate limits that apply to it before anything is sent, each in one atomic
reservation. A provider at its own cap is passed over for the next (when the key falls back
on `rate_limit`); a budget with `on_breach: cap` lowers the output cap until the request
fits; anything else that does not fit is refused with the control that refused it."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from tollgate import body as bodies
from tollgate import budgets, ratelimit, routes
from tollgate.config.load import LoadedConfig
from tollgate.config.schema import ModelProvider, VirtualKey
from tollgate.derived import Applying
from tollgate.errors import GatewayError
from tollgate.ledger import LedgerRow
from tollgate.pricing import ZERO_PRICE, ModelPrice
from tollgate.request import Attempt, Request
from tollgate.scopes import Lineage
from tollgate.settlement import Billing
from tollgate.store import Reservation, Store, StoreUnavailable

log = logging.getLogger("tollgate")
# A blocking budget that only requests in flight stand in the way of (their holds) is asked
# again, for this long, before the request is capped or refused: their answers may have
# reached their clients already, their ends on their way to be settled (Envoy reports a
# response's end after the client has it, in batches every 0.1 s), and a client that sends
# its next request once it has its answer finds the last one's hold gone.
HOLDS_SETTLING = 0.25
HOLDS_POLL = 0.01


class Admission:
    def __init__(self, store: Callable[[], Store],
                 shadowed: Callable[[str, str, int], None]) -> None:
        self._store = store  # the gateway's current state store
        self._shadowed = shadowed  # counts what a shadow control would have refused

    async def admit(self, loaded: LoadedConfig, request_id: str, key: VirtualKey,
                    route: routes.Route, body: bodies.ParsedBody, req: Request,
                    attempts: list[Attempt]) -> tuple[Billing, list[str], list[Attempt]]:
        """Price the request, then admit it to its rate limits and budgets in one atomic
        step: every budget that applies holds its worst-case cost (that of the dearest model
        its plan may fall back to), every rate limit counts it, its TPM its worst-case tokens.
        A provider at its own cap is passed over for the next in the plan when the key falls
        back on `rate_limit`; returns the billing and why providers were passed over.
        (Models a policy maps to are checked for a price when the config is loaded.)"""
        settings = loaded.config.gateway
        model = attempts[0].model
        price = loaded.prices.lookup(model, attempts[0].prices)
        if price is None and settings.unpriced == "block":
            raise GatewayError("model_not_priced",
                               f"Model {model!r} has no price in the price table, so its spend "
                               "cannot be metered. Add it to prices.yaml (or set "
                               "gateway.unpriced: allow).", param="model")
        input_estimate = worst_input(req) + self._unseen_input_allowance(loaded, key, body,
                                                                         attempts)
        requested_cap = bodies.output_cap(route, body.doc)
        providers = loaded.derived.providers

        def worst_case(cap: int | None) -> tuple[budgets.WorstCase | None, int]:
            return priced_worst_case(loaded, route, body.doc, attempts, input_estimate, cap)

        worst, tokens = worst_case(requested_cap)
        amount = worst.micros if worst else 0
        derived = loaded.derived
        billing = Billing(price=price, lineage=derived.lineage(key.scope),
                          estimated_input_tokens=estimated_input(req))
        now = datetime.now(UTC)
        passed_over: list[str] = []
        lowered = 0  # times an `on_breach: cap` budget lowered the output cap (bounded)
        settling_until = time.monotonic() + HOLDS_SETTLING
        i = -1
        while i + 1 < len(attempts):
            i += 1
            attempt = attempts[i]
            applying = _applying(loaded, key, billing, attempt, now)
            # The budgets to hold (none for a request priced at nothing), the limits to take.
            holds = list(applying.holds) if amount else []
            limits = list(applying.limits)
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
                if counter.reserved and counter.spent + amount <= hold.limit_micros \
                        and time.monotonic() < settling_until:
                    await asyncio.sleep(HOLDS_POLL)  # it fits once they are settled
                    i -= 1
                    continue
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
                    capping, worst, (room - worst.input_tokens) // worst.choices, lowered)
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
            self._granted(billing, holds, limits, granted, amount, rate_headers)
        billing.reserved_tokens, billing.worst_case = tokens, amount
        kept = [attempt]
        for later in attempts[i + 1:]:
            if await self._admit_fallback(loaded, request_id, key, billing, later,
                                          providers[later.provider_id], amount, tokens, now):
                kept.append(later)
        return billing, passed_over, kept

    def _granted(self, billing: Billing, holds: list[budgets.Hold],
                 limits: list[ratelimit.Limit], granted: Reservation, amount: int,
                 rate_headers: dict[str, str]) -> None:
        """What a granted reservation tells the request (`_told`), and what shadow budgets and
        limits would have refused (counted)."""
        _told(billing, holds, granted, amount, rate_headers)
        if holds:
            over_budget = [budgets.shadow_refusal(h, c.committed, amount)
                           for h, c in zip(holds, granted.counters, strict=True)
                           if h.would_refuse(c.committed)]
            self._shadowed("budget", "budget_exceeded", len(over_budget))
            billing.shadow += over_budget
        over_limit = ratelimit.shadow_refusals(limits, granted.windows)
        self._shadowed("rate_limit", "rate_limited", len(over_limit))
        billing.shadow += over_limit

    def again(self, loaded: LoadedConfig, request_id: str, key: VirtualKey,
              route: routes.Route, req: Request, attempt: Attempt,
              price: ModelPrice | None, lineage: Lineage, terms: WorstTerms, row: LedgerRow,
              now: datetime) -> Billing | None:
        """The admission of a request decided from a precedent (precedent.py): one attempt,
        nothing it cannot see. Its worst case is priced for its own length and held in its
        budgets and rate limits, as `admit` holds it, in one transaction with its
        written-ahead `row` (or granted before it is written, journaled: SQLite's, while
        one gateway process serves the file), made at once (`Store.reserve_now`); None,
        with nothing taken, when the store cannot make it at once or does not grant it:
        `admit` then decides the request (a lower cap, a refusal, a wait for the store,
        a shadow control's count). `price`, `lineage` and the worst case's `terms`: the
        precedent's; `now`: when it was decided."""
        held = _held_again(loaded, key, route, req, attempt, price, lineage, terms, now)
        if held is None:
            return None
        billing, holds, limits, amount, tokens = held
        granted = self._store().reserve_now(request_id, holds, amount, limits, tokens, row)
        return _granted_again(billing, route, holds, limits, amount, tokens, granted)

    async def again_soon(self, loaded: LoadedConfig, request_id: str, key: VirtualKey,
                         route: routes.Route, req: Request, attempt: Attempt,
                         price: ModelPrice | None, lineage: Lineage, terms: WorstTerms,
                         now: datetime) -> Billing | None:
        """`again` on a store that reserves over the network (`Store.reserve`, as `admit`
        reserves; the request is written ahead after it, as `admit`'s is): None, with
        nothing taken, when it is not granted or the store cannot be reached (`admit` then
        fails open or closed, as configured). Nothing to hold is not asked for."""
        held = _held_again(loaded, key, route, req, attempt, price, lineage, terms, now)
        if held is None:
            return None
        billing, holds, limits, amount, tokens = held
        if not holds and not limits:  # (as `admit` leaves a request with nothing to hold)
            billing.reserved_tokens, billing.worst_case = tokens, amount
            return billing
        try:
            granted = await self._store().reserve(request_id, holds, amount, limits, tokens)
        except StoreUnavailable:
            return None
        return _granted_again(billing, route, holds, limits, amount, tokens, granted)

    async def _reserve(self, settings: Any, request_id: str, holds: list[budgets.Hold],
                       amount: int, limits: list[ratelimit.Limit], tokens: int
                       ) -> Reservation | None:
        """One atomic reservation; None when the store is down and the gateway fails open."""
        try:
            return await self._store().reserve(request_id, holds, amount, limits, tokens)
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
        cfg, derived = loaded.config, loaded.derived
        applying = derived.holds(key, billing.lineage, attempt.provider_id, now)
        # Budgets not scoped to a provider hold the request once, from its first attempt.
        held = [h for h in applying if h.counter not in billing.counters] if amount else []
        billing.held[attempt.provider_id] = [h.counter for h in applying]
        limits = derived.provider_limits(provider, now)
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

    @staticmethod
    def _unseen_input_allowance(loaded: LoadedConfig, key: VirtualKey,
                                body: bodies.ParsedBody, attempts: list[Attempt]) -> int:
        """Input tokens to reserve beyond what the body shows, for a request that refers to
        input the gateway cannot see: the largest allowance of the blocking budgets that
        apply; one that refuses such requests refuses it."""
        unseen = bodies.unseen_input(body.doc)
        if unseen is None:
            return 0
        derived, now = loaded.derived, datetime.now(UTC)
        lin = derived.lineage(key.scope)
        applying = {h.budget.id: h.budget for a in attempts
                    for h in derived.holds(key, lin, a.provider_id, now)
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


def _held_again(loaded: LoadedConfig, key: VirtualKey, route: routes.Route, req: Request,
                attempt: Attempt, price: ModelPrice | None, lineage: Lineage,
                terms: WorstTerms, now: datetime
                ) -> tuple[Billing, list[budgets.Hold], list[ratelimit.Limit], int, int] | None:
    """What a request decided from a precedent is held in (`Admission.again`): its
    billing, the budgets that hold its worst case (none for a request priced at nothing),
    the limits it enters, that worst case and the tokens it may use; None where a shadow
    control applies (never where a precedent was kept: counted by `admit`)."""
    if route.metered:
        worst = terms.at(worst_input(req))
        amount, tokens = worst.micros, worst.input_tokens + worst.output_tokens
    else:
        amount = tokens = 0
    billing = Billing(price=price, lineage=lineage,
                      estimated_input_tokens=estimated_input(req))
    applying = _applying(loaded, key, billing, attempt, now)
    if applying.shadow:
        return None
    return billing, applying.holds if amount else [], applying.limits, amount, tokens


def _granted_again(billing: Billing, route: routes.Route, holds: list[budgets.Hold],
                   limits: list[ratelimit.Limit], amount: int, tokens: int,
                   granted: Reservation | None) -> Billing | None:
    """The billing of a request decided from a precedent once its reservation is made
    (None: it was not granted, or not made)."""
    if granted is None or not granted.granted:
        return None
    if holds or limits:  # (no shadow control applies: none to count)
        _told(billing, holds, granted, amount,
              ratelimit.headers(route.family, limits, granted.windows, time.time()))
    billing.reserved_tokens, billing.worst_case = tokens, amount
    return billing


def estimated_input(req: Request) -> int:
    """The input tokens a request's body likely holds (~4 bytes a token): what a request
    is charged when the provider reports no usage."""
    return math.ceil(len(req.body) / 4)


def worst_input(req: Request) -> int:
    """The input tokens a request's body may hold, generously: a token is >= ~2 bytes."""
    return math.ceil(len(req.body) / 2)


def _applying(loaded: LoadedConfig, key: VirtualKey, billing: Billing, attempt: Attempt,
              now: datetime) -> Applying:
    """What an attempt is held in (`Derived.applying`: shared, not to be changed), named on
    its billing: the budget counters it settles into (even those it does not hold) and the
    limits it enters."""
    applying = loaded.derived.applying(key, billing.lineage, attempt.provider_id, now)
    billing.held = {attempt.provider_id: list(applying.counters)}
    billing.limits = list(applying.named)
    return applying


def _told(billing: Billing, holds: list[budgets.Hold], granted: Reservation, amount: int,
          rate_headers: dict[str, str]) -> None:
    """What a granted reservation tells the request: what it holds, a budget's warning, its
    rate-limit headers."""
    if holds:
        billing.reserved = amount  # renewed from _admit on, while it runs
        billing.warning = next((w for h, c in zip(holds, granted.counters, strict=True)
                                if (w := budgets.warning(h, c.committed))), None)
    billing.rate_headers = rate_headers
    billing.admitted_at = granted.at


@dataclass(frozen=True)
class WorstTerms:
    """What prices an attempt's worst case, but the request's input estimate: its model,
    its price and the tier it asks for (else its provider's default), and the output it
    may write. All of it is read from the body but its messages, and from the config."""

    model: str
    price: ModelPrice
    tier: str | None
    output_tokens: int  # on each choice
    capped: bool
    cap_field: str | None
    choices: int
    searches: int

    def at(self, input_estimate: int) -> budgets.WorstCase:
        held, tier = self.price.at(input_estimate, self.tier)
        return budgets.WorstCase(self.model, held, input_estimate,
                                 self.output_tokens * self.choices, self.capped,
                                 self.cap_field, tier, self.choices, self.searches)


def worst_terms(loaded: LoadedConfig, route: routes.Route, doc: dict[str, Any],
                attempt: Attempt, cap: int | None) -> WorstTerms:
    """An attempt's worst-case terms, its output capped at `cap` (None: its model's own
    ceiling)."""
    ceiling = loaded.catalog.max_output_tokens(attempt.model)
    out = cap if cap is not None else loaded.config.gateway.default_max_output_tokens \
        if ceiling is None else ceiling
    # The tier it asks for, else the one the provider's account serves by default.
    tier = bodies.requested_tier(doc) or \
        loaded.derived.providers[attempt.provider_id].default_service_tier
    return WorstTerms(attempt.model,
                      loaded.prices.lookup(attempt.model, attempt.prices) or ZERO_PRICE,
                      tier, out, cap is not None, bodies.output_cap_field(route, doc),
                      bodies.choices(route, doc),  # each writes up to the cap
                      bodies.web_searches(route, doc))


def dearest(route: routes.Route, terms: list[WorstTerms], input_estimate: int
            ) -> tuple[budgets.WorstCase | None, int]:
    """The dearest attempt's worst case, and the most tokens any attempt may use (None and
    0 on a route that is not metered)."""
    if not route.metered:
        return None, 0
    cases = [t.at(input_estimate) for t in terms]
    return max(cases, key=lambda c: c.micros), max(input_estimate + c.output_tokens
                                                   for c in cases)


def priced_worst_case(loaded: LoadedConfig, route: routes.Route, doc: dict[str, Any],
                      attempts: list[Attempt], input_estimate: int, cap: int | None
                      ) -> tuple[budgets.WorstCase | None, int]:
    """The dearest attempt's worst case, and the most tokens any attempt may use, with the
    output capped at `cap` (None: each model's own ceiling)."""
    return dearest(route, [worst_terms(loaded, route, doc, a, cap) for a in attempts],
                   input_estimate)
