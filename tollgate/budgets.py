"""Budgets: which apply to a request, their calendar windows, and what a refusal says.

A request reserves its worst-case cost in every applicable budget at once (the store does it
atomically) and settles to its real cost when it ends. Blocking budgets refuse a reservation
that would take committed spend (settled + reserved) past the limit; warning budgets only
count, and flag the response once they pass their threshold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from tollgate.config.schema import Budget, Config, VirtualKey
from tollgate.errors import GatewayError
from tollgate.pricing import ModelPrice, search_micros, worst_case_micros
from tollgate.scopes import Lineage

MICROS = 1_000_000


@dataclass(frozen=True)
class Hold:
    """One budget's counter for the window the request falls in."""

    budget: Budget
    window_key: str  # e.g. "2026-11" for a month; part of the counter's name
    resets_at: datetime | None  # None for `total`

    @property
    def counter(self) -> str:
        return f"{self.budget.id}:{self.window_key}"

    @property
    def limit_micros(self) -> int:
        return round(self.budget.limit * MICROS)

    @property
    def shadow(self) -> bool:
        return self.budget.mode == "shadow"

    @property
    def _refuses(self) -> bool:
        """Its breach rule refuses what would pass the limit (`warn` only counts)."""
        return self.budget.on_breach in ("block", "cap")

    @property
    def blocking(self) -> bool:
        return self._refuses and not self.shadow

    def admits(self, committed: int, amount: int) -> bool:
        """Whether it takes `amount` more, with `committed` held and spent already."""
        return not self.blocking or committed + amount <= self.limit_micros

    def would_refuse(self, committed: int) -> bool:
        """A shadow budget that, enforcing, would not have held this request: with it, the
        window's committed spend is over the limit."""
        return self.shadow and self._refuses and committed > self.limit_micros


@dataclass(frozen=True)
class Window:
    key: str  # e.g. "2026-11" for a month
    start: datetime | None  # None for `total`
    end: datetime | None


def window(kind: str, now: datetime) -> Window:
    """The calendar window (UTC) of `kind` containing `now`."""
    now = now.astimezone(UTC)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    # Keys formatted by hand: strftime costs several times more, on every request.
    ymd = f"{day.year:04d}-{day.month:02d}-{day.day:02d}"
    if kind == "minute":
        start = now.replace(second=0, microsecond=0)
        return Window(f"{ymd}T{now.hour:02d}:{now.minute:02d}", start,
                      start + timedelta(minutes=1))
    if kind == "hour":
        start = now.replace(minute=0, second=0, microsecond=0)
        return Window(f"{ymd}T{now.hour:02d}", start, start + timedelta(hours=1))
    if kind == "day":
        return Window(ymd, day, day + timedelta(days=1))
    if kind == "week":
        start = day - timedelta(days=day.weekday())  # ISO weeks start on Monday
        year, week, _ = start.isocalendar()
        return Window(f"{year}-W{week:02d}", start, start + timedelta(weeks=1))
    if kind == "month":
        start = day.replace(day=1)
        return Window(ymd[:7], start,
                      (start + timedelta(days=32)).replace(day=1))
    return Window("total", None, None)


PERIODS = [("hour", "%Y-%m-%dT%H"), ("day", "%Y-%m-%d"), ("month", "%Y-%m")]


def window_named(key: str) -> tuple[str, Window]:
    """(kind, window) of a window's key, as reports print it: 2026-11 (a month), 2026-W48
    (an ISO week), 2026-11-30 (a day), 2026-11-30T14 (an hour, UTC), or total."""
    if key == "total":
        return "total", window("total", datetime.now(UTC))
    year, sep, week = key.partition("-W")
    if sep and year.isdigit() and week.isdigit():
        try:
            start = datetime.fromisocalendar(int(year), int(week), 1).replace(tzinfo=UTC)
        except ValueError:
            pass
        else:
            return "week", window("week", start)
    for kind, fmt in PERIODS:
        try:
            start = datetime.strptime(key, fmt).replace(tzinfo=UTC)
        except ValueError:
            continue
        return kind, window(kind, start)
    raise ValueError(f"{key!r} names no window: use 2026-11 (month), 2026-W48 (week), "
                     "2026-11-30 (day), 2026-11-30T14 (hour, UTC) or total")


def applies(budget: Budget, key: VirtualKey, lineage: Lineage, provider_id: str) -> bool:
    if budget.model_provider and budget.model_provider != provider_id:
        return False
    return {
        "org": lineage.org, "team": lineage.team, "project": lineage.project,
        "virtual_key": key.id, "principal": key.principal,
    }[budget.scope] == budget.target


def current_hold(budget: Budget, now: datetime) -> Hold:
    """The budget's counter for the window containing `now`."""
    w = window(budget.window, now)
    return Hold(budget, w.key, w.end)


def holds_for(cfg: Config, key: VirtualKey, lineage: Lineage, provider_id: str,
              now: datetime) -> list[Hold]:
    return [current_hold(budget, now) for budget in cfg.budgets
            if applies(budget, key, lineage, provider_id)]


def usd(micros: int) -> str:
    return f"${micros / MICROS:,.2f}" if micros >= 10_000 else f"${micros / MICROS:,.6f}"


@dataclass(frozen=True)
class WorstCase:
    """What a request can cost at most, and what sets that: its dearest model's price for
    its input estimate and every output token it may write (its own cap, or without one the
    model's ceiling)."""

    model: str
    price: ModelPrice
    input_tokens: int
    output_tokens: int  # of all its choices together
    capped: bool  # False: no cap in the request, so the model's ceiling counts
    cap_field: str | None  # where the request would set a cap (on each choice)
    tier: str | None = None  # the price tier held (None: standard)
    choices: int = 1  # completions it asks for (chat's `n`), each up to the cap
    searches: int = 0  # the web searches its tools allow (each billed)

    @property
    def micros(self) -> int:
        return worst_case_micros(self.input_tokens, self.output_tokens, self.price,
                                 self.searches)

    @property
    def per_choice(self) -> int:
        """The output tokens each choice may write: the cap the request has now."""
        return self.output_tokens // self.choices

    def output_that_fits(self, micros: int) -> int:
        """The highest output cap (on each choice) that keeps this request's worst case
        within `micros` (below zero: its input alone does not fit), once the cap itself is
        in its body (the input is estimated from the body's size: `, "field": 123456` adds
        to it)."""
        with_cap = self.input_tokens + math.ceil((len(self.cap_field or "") + 12) / 2)
        room = micros - self.price.input * with_cap - self.searches * search_micros(self.price)
        if room < 0:
            return -1
        if self.price.output <= 0:
            return self.per_choice
        return int(room // self.price.output) // self.choices


# How many times one request's output cap may be lowered (each retry is a store round trip).
MAX_LOWERINGS = 3


def lowered_cap(budget: Budget | None, worst: WorstCase | None, fits: int, lowered: int
                ) -> int | None:
    """The lower output cap an `on_breach: cap` budget serves a request with, when `fits`
    output tokens are what its remaining money or TPM can pay for; None: refuse it (no cap
    budget, no cap field, below the budget's floor, no lower than now, or lowered enough)."""
    if budget is None or budget.on_breach != "cap" or worst is None or not worst.cap_field \
            or lowered >= MAX_LOWERINGS:
        return None
    return fits if budget.min_output_tokens <= fits < worst.per_choice else None


def shadow_refusal(hold: Hold, committed: int, amount: int) -> str:
    """What a shadow budget would have said (see Hold.would_refuse)."""
    b = hold.budget
    return (f"budget {b.id} would refuse 402 budget_exceeded: {b.name} (scope {b.scope} "
            f"{b.target}, window {hold.window_key}) would be at {usd(committed)} of "
            f"{usd(hold.limit_micros)} with this request's {usd(amount)}")


def refusal(hold: Hold, spent: int, reserved: int, worst: WorstCase, now: datetime
            ) -> GatewayError:
    """A blocking budget that cannot hold the request's worst case: what it could cost, what
    remains, and the output cap that would fit now."""
    b = hold.budget
    remaining = max(0, hold.limit_micros - spent - reserved)
    in_flight = f", {usd(reserved)} held by requests in flight" if reserved else ""
    state = f"limit {usd(hold.limit_micros)}, spent {usd(spent)}{in_flight}"
    raise_it = f"raise the limit with `tollgate gateway-budgets update {b.id} --limit USD`"
    fits = worst.output_that_fits(remaining)
    headers: dict[str, str] = {}
    resets = ""
    if hold.resets_at is not None:
        resets = f" It resets at {hold.resets_at.isoformat()}."
        headers["retry-after"] = str(max(1, int((hold.resets_at - now).total_seconds()) + 1))
    what = f"{worst.output_tokens:,} output tokens of {worst.model}"
    if worst.choices > 1:
        what += f" ({worst.choices} choices of {worst.per_choice:,})"
    if not worst.capped:
        what += ", its most, as the request sets no output cap"
    if worst.searches and worst.price.web_search:
        what += f", and {worst.searches:,} web searches"
    if worst.tier is not None:
        what += f", at the {worst.tier} price"
    head = f"Budget {b.id} ({b.name}; scope {b.scope} {b.target}, window {b.window})"
    if fits >= 1 and worst.cap_field:
        message = (f"{head} cannot cover this request: it could cost up to {usd(worst.micros)} "
                   f"({what}); {usd(remaining)} remains ({state}). Send {worst.cap_field} <= "
                   f"{fits:,}, or {raise_it}.{resets}")
    else:
        exhausted = "is exhausted" if remaining == 0 else \
            f"has {usd(remaining)} left, less than this request's input alone"
        message = (f"{head} {exhausted} ({state}); this request could cost up to "
                   f"{usd(worst.micros)} ({what}).{resets} To serve it now, {raise_it}.")
    return GatewayError(
        "budget_exceeded", message, headers=headers, param=worst.cap_field if fits >= 1
        else None,
        context={"budget": b.id, "scope": f"{b.scope}:{b.target}", "window": b.window,
                 "limit": usd(hold.limit_micros), "spent": usd(spent),
                 "remaining": usd(remaining), "worst_case": usd(worst.micros),
                 **({"tier": worst.tier} if worst.tier is not None else {}),
                 **({"max_output_tokens_that_fit": fits} if fits >= 1 else {})},
    )


def warning(hold: Hold, committed: int) -> str | None:
    """Header text once a budget is at or above its warn threshold."""
    limit = hold.limit_micros
    if limit <= 0 or hold.shadow or committed < hold.budget.warn_at * limit:
        return None
    b = hold.budget
    return (f"{b.id}; name={b.name}; window={b.window}; used={committed / limit:.0%}; "
            f"limit={usd(limit)}")
