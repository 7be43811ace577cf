"""Closing the books on a forwarded request, exactly once however it ended: what it used (the
provider's numbers, else the gateway's estimate), what it cost, its ledger row (and the row
written ahead in case the gateway dies first), its provider's circuit and its attempt span.
The gateway's `settle` callback then writes the row and settles budgets and rate limits."""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from tollgate import telemetry
from tollgate import usage as usage_of
from tollgate.ledger import LedgerRow
from tollgate.pricing import ModelPrice, cost_micros
from tollgate.ratelimit import Limit
from tollgate.scopes import Lineage
from tollgate.store.base import LimitSettlement

if TYPE_CHECKING:
    from tollgate.exchange import Exchange

log = logging.getLogger("tollgate")
_WARNED: set[tuple[str | None, str | None, str]] = set()


def _warn_unpriced(provider: str | None, model: str | None, served: str, charged: str,
                   fix: str) -> None:
    """Once per provider, model and what it served that its price does not cover."""
    if (provider, model, served) not in _WARNED and len(_WARNED) < 1000:
        _WARNED.add((provider, model, served))
        log.warning("%s served %s %s, which has no price for it: charged %s. Add %s to its "
                    "price.", provider, model, served, charged, fix)


@dataclass
class Billing:
    """What the request holds in its budgets and rate limits, for each provider of its plan
    (each attempt is admitted before it can be sent), and how to price what it used."""

    price: ModelPrice | None
    lineage: Lineage
    # Provider -> the budget counters a request it serves settles into (those not scoped to
    # a provider, and that provider's own), in plan order.
    held: dict[str, list[str]] = field(default_factory=dict)
    reserved: int = 0  # micro-dollars held in each of them
    estimated_input_tokens: int = 0  # for a stream cut off before the provider's usage
    warning: str | None = None
    # The rate limits it entered, each with the provider it is of (None: the key's), when
    # (the store's clock) and with how many tokens; the key's rate-limit headers.
    limits: list[tuple[Limit, str | None]] = field(default_factory=list)
    admitted_at: float = 0.0
    reserved_tokens: int = 0
    rate_headers: dict[str, str] = field(default_factory=dict)
    # The output cap the gateway set on the request (a budget with on_breach: cap).
    output_cap: int | None = None
    # Fallback providers left out of the plan because they could not be admitted.
    passed_over_later: list[str] = field(default_factory=list)
    # What shadow-mode controls would have refused (see policy.Shadowed).
    shadow: list[str] = field(default_factory=list)
    worst_case: int = 0  # micro-dollars it could cost (held where budgets apply)

    @property
    def counters(self) -> list[str]:
        """Every budget counter it holds (kept alive while it runs)."""
        return list(dict.fromkeys(c for held in self.held.values() for c in held))

    def charged(self, served_by: str) -> list[str]:
        """The budget counters a request served by `served_by` is charged to."""
        return self.held.get(served_by, next(iter(self.held.values()), []))

    def charges(self, served_by: str, reached: list[str], used_tokens: int
                ) -> tuple[list[str], list[str], LimitSettlement | None]:
        """The budget counters to charge (those of the provider that served it), those only
        released (other providers' own), and what it leaves in its rate limits: a fallback
        provider that failed it bills no tokens; one it never reached keeps nothing."""
        charged = self.charged(served_by)
        released = [c for c in self.counters if c not in charged]
        if not self.limits:
            return charged, released, None
        limits = [lim for lim, _ in self.limits]
        return charged, released, LimitSettlement(
            sliding=[lim.counter for lim in limits if lim.sliding],
            days=[lim.counter for lim in limits if not lim.sliding],
            tokens=[lim.counter for lim in limits if lim.tokens],
            reserved=self.reserved_tokens, admitted=self.admitted_at, used=used_tokens,
            unbilled=[lim.counter for lim, p in self.limits
                      if lim.tokens and p not in (None, served_by) and p in reached],
            unsent=[lim.counter for lim, p in self.limits if p is not None and p not in reached])


class Settlement:
    """How one exchange ended and what it came to. Hosts and the response path record what
    went wrong here (`code`, `stream_error`); `finish` turns it into the ledger row."""

    def __init__(self, exchange: Exchange, settle: Callable[[Exchange, LedgerRow], None]
                 ) -> None:
        # Held weakly: the exchange owns its settlement, and a cycle between them would
        # leave every finished request's objects to the cyclic collector instead of freeing
        # them as soon as the request is done with.
        self._exchange = weakref.ref(exchange)
        self._settle = settle
        self.finished = False
        self.error: str | None = None  # why it ended badly, once finished
        # The gateway's error code when no provider answered (unreachable, timed out), or
        # its answer could not be used; the status the client got instead of the provider's.
        self.code: str | None = None
        self.replaced_status: int | None = None
        self.stream_error: str | None = None  # the gateway ended the stream itself
        self.row: LedgerRow | None = None  # its ledger row, once finished

    @property
    def _ex(self) -> Exchange:
        exchange = self._exchange()
        assert exchange is not None, "a settlement outlived its exchange"
        return exchange

    def usage(self, sent: bool = True) -> usage_of.Usage:
        """What the request used, from the provider's own numbers where it gave them. A
        request the provider had (`sent`) and did not refuse is billed its input at least:
        with no numbers from the provider, the gateway's estimate (flagged as such)."""
        ex = self._ex
        if ex.status is not None and not 200 <= ex.status < 300:
            return usage_of.Usage()  # providers do not bill refused or failed requests
        if ex.status is None and not sent:
            return usage_of.Usage()  # it never reached the provider
        # In the provider's family, before any translation.
        used = ex.meter.usage() if ex.status is not None else usage_of.Usage(reported=False)
        if not used.reported and not used.prompt_tokens and ex.route.metered:
            used.input_tokens, used.reported = ex.billing.estimated_input_tokens, False
        return used

    def written_ahead(self) -> LedgerRow:
        """Its row in case the gateway dies before it settles (outcome `interrupted`),
        charged what the provider surely bills by now: the input, and the output that has
        streamed so far."""
        used = self.usage()
        price = self._ex.billing.price
        return self.ledger_row("interrupted", used,
                               cost_micros(used, price) if price is not None else 0)

    def ledger_row(self, outcome: str, used: usage_of.Usage | None = None, cost: int = 0
                   ) -> LedgerRow:
        """The request's ledger row as it stands."""
        ex = self._ex
        used = used or usage_of.Usage(reported=False)
        lin, price, cursor = ex.billing.lineage, ex.billing.price, ex.cursor
        return LedgerRow(
            request_id=ex.trace.request_id, ts=datetime.now(UTC).isoformat(),
            key_id=ex.key.id, key_name=ex.key.name, principal=ex.key.principal,
            org=lin.org, team=lin.team, project=lin.project, provider=ex.provider_id,
            model=ex.model, route=ex.route.name, input_tokens=used.input_tokens,
            output_tokens=used.output_tokens, cached_input_tokens=used.cached_input_tokens,
            cache_write_tokens=used.cache_write_tokens + used.cache_write_1h_tokens,
            cache_write_1h_tokens=used.cache_write_1h_tokens,
            tier=price.served(used)[1] if price is not None else used.service_tier,
            reasoning_tokens=used.reasoning_tokens,
            web_search_requests=used.web_search_requests,
            cost_micros=cost, usage_reported=used.reported, status=ex.status,
            outcome=outcome,
            latency_ms=round(((ex.ended or time.monotonic()) - ex.started) * 1000, 1),
            code=self.code, output_cap=ex.billing.output_cap,
            fallback_count=cursor.fallback_count,
            fallbacks=", ".join(cursor.fallbacks) or None,
            skipped="; ".join(cursor.unserved) or None,
            shadow="; ".join(ex.billing.shadow) or None)

    def finish(self, outcome: str, error: str | None = None, sent: bool = True) -> None:
        """Close the books exactly once, however it ended; `sent` False: it ended before the
        host passed it to the provider."""
        if self.finished:
            return
        self.finished = True
        ex = self._ex
        ok = ex.status is not None and 200 <= ex.status < 300
        if self.stream_error is not None:
            outcome, error = "error", self.stream_error
        elif outcome in ("abandoned", "aborted") and ex.complete and ok:
            # Its last event had passed: a client that closes once it has the end (an SDK
            # at [DONE]) did not cut anything short.
            outcome, error = "completed", None
        if ex.breakers is not None:
            failed = ex.status is None or ex.cursor.failure_kind(ex.status) is not None
            if failed and outcome != "abandoned":
                ex.breakers.failure(ex.provider_id)
            elif not failed:
                ex.breakers.success(ex.provider_id)
        used = self.usage(sent)
        price = ex.billing.price
        cost = cost_micros(used, price) if price is not None else 0
        if price is not None and used.service_tier and used.service_tier not in price.tiers:
            _warn_unpriced(ex.provider_id, ex.model, f"at service tier {used.service_tier!r}",
                           "the standard price", f"`tiers: {{{used.service_tier}: ...}}`")
        if price is not None and used.web_search_requests and price.web_search is None:
            _warn_unpriced(ex.provider_id, ex.model, "web searches", "nothing for them",
                           "`web_search: <USD per 1,000 searches>`")
        self.error = error
        telemetry.end_attempt(
            ex.attempt_span, ex.status, end_time=ex.end_time_ns(),
            failure=error or (None if ex.status is not None and ex.status < 400
                              else f"status {ex.status or 'none'}"),
            input_tokens=used.prompt_tokens, output_tokens=used.output_tokens)
        self.row = self.ledger_row(outcome, used, cost)
        self._settle(ex, self.row)
