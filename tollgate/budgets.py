"""Budgets: which apply to a request, their calendar windows, and what a refusal says.

A request reserves its worst-case cost in every applicable budget at once (the store does it
atomically) and settles to its real cost when it ends. Blocking budgets refuse a reservation
that would take committed spend (settled + reserved) past the limit; warning budgets only
count, and flag the response once they pass their threshold.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from tollgate.config.schema import Budget, Config, VirtualKey
from tollgate.errors import GatewayError
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
    def blocking(self) -> bool:
        return self.budget.on_breach == "block"


@dataclass(frozen=True)
class Window:
    key: str  # e.g. "2026-11" for a month
    start: datetime | None  # None for `total`
    end: datetime | None


def window(kind: str, now: datetime) -> Window:
    """The calendar window (UTC) of `kind` containing `now`."""
    now = now.astimezone(UTC)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if kind == "minute":
        start = now.replace(second=0, microsecond=0)
        return Window(start.strftime("%Y-%m-%dT%H:%M"), start, start + timedelta(minutes=1))
    if kind == "hour":
        start = now.replace(minute=0, second=0, microsecond=0)
        return Window(start.strftime("%Y-%m-%dT%H"), start, start + timedelta(hours=1))
    if kind == "day":
        return Window(day.strftime("%Y-%m-%d"), day, day + timedelta(days=1))
    if kind == "week":
        start = day - timedelta(days=day.weekday())  # ISO weeks start on Monday
        year, week, _ = start.isocalendar()
        return Window(f"{year}-W{week:02d}", start, start + timedelta(weeks=1))
    if kind == "month":
        start = day.replace(day=1)
        return Window(start.strftime("%Y-%m"), start,
                      (start + timedelta(days=32)).replace(day=1))
    return Window("total", None, None)


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


def refusal(hold: Hold, spent: int, reserved: int, amount: int, now: datetime
            ) -> GatewayError:
    b = hold.budget
    retry = ""
    headers: dict[str, str] = {}
    if hold.resets_at is not None:
        seconds = max(1, int((hold.resets_at - now).total_seconds()) + 1)
        headers["retry-after"] = str(seconds)
        retry = f" It resets at {hold.resets_at.isoformat()}."
    in_flight = f" plus {usd(reserved)} held by requests in flight" if reserved else ""
    return GatewayError(
        "budget_exceeded",
        f"Budget {b.id} ({b.name}; scope {b.scope} {b.target}, window {b.window}) is "
        f"exhausted: limit {usd(hold.limit_micros)}, spent {usd(spent)}{in_flight}; this "
        f"request could cost up to {usd(amount)}.{retry} Raise the limit with `tollgate "
        f"gateway-budgets` or lower max_tokens.",
        headers=headers,
        context={"budget": b.id, "scope": f"{b.scope}:{b.target}", "window": b.window,
                 "limit": usd(hold.limit_micros), "spent": usd(spent)},
    )


def warning(hold: Hold, committed: int) -> str | None:
    """Header text once a budget is at or above its warn threshold."""
    limit = hold.limit_micros
    if limit <= 0 or committed < hold.budget.warn_at * limit:
        return None
    b = hold.budget
    return (f"{b.id}; name={b.name}; window={b.window}; used={committed / limit:.0%}; "
            f"limit={usd(limit)}")
