"""Rate limits: which apply to a request, how a window is read, and what a refusal says.

A key's `config.rate_limits` and a provider's `rate_limit` each cap requests per minute
(rpm), tokens per minute (tpm) and requests per UTC day (rpd). RPM and TPM count over a
sliding 60 s window: every admitted request is an entry (its time, and 1 request or its
tokens), and a window holds the entries of the last 60 s, so no boundary ever admits twice
the limit. RPD counts the entries of the calendar day. A request's TPM entry is its
worst-case estimate (the one budgets reserve) until it ends, then the tokens it used.

The store admits a request's limits and budgets in one atomic step: all of them or none.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from tollgate.config.schema import ModelProvider, RateLimit, VirtualKey
from tollgate.errors import GatewayError

SLIDING_SECONDS = 60.0
DIMENSIONS = ("rpm", "tpm", "rpd")
SHADOW_ADMITS = 2**53  # a shadow limit counts, and admits whatever it counts


@dataclass(frozen=True)
class Limit:
    """One cap on one owner, for the window the request falls in."""

    scope: str  # "key" | "provider"
    owner: str  # the key's or the provider's id
    dimension: str  # rpm | tpm | rpd
    limit: int
    day: str | None = None  # rpd: the UTC day counted ("2026-11-29")
    shadow: bool = False  # counted apart, never refusing (mode: shadow)

    @property
    def counter(self) -> str:
        base = f"{self.scope}:{self.owner}:{self.dimension}" + (":shadow" if self.shadow else "")
        return f"{base}:{self.day}" if self.day else base

    @property
    def enforced(self) -> int:
        """The limit the store admits against: a shadow limit's lets everything in."""
        return SHADOW_ADMITS if self.shadow else self.limit

    @property
    def sliding(self) -> bool:
        return self.day is None

    @property
    def tokens(self) -> bool:
        return self.dimension == "tpm"

    @property
    def label(self) -> str:
        return f"{'virtual key' if self.scope == 'key' else 'provider'} {self.owner}"

    def amount(self, tokens: int) -> int:
        """What one request takes from this limit."""
        return tokens if self.tokens else 1

    def expires_at(self, now: float) -> float:
        """When an entry made at `now` stops counting (a day's, when the day ends)."""
        if self.sliding:
            return now + SLIDING_SECONDS
        return day_end_ts(self.day or "")


@functools.lru_cache(maxsize=8)
def day_end(day: str) -> datetime:
    return datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=UTC) + timedelta(days=1)


@functools.lru_cache(maxsize=8)
def day_end_ts(day: str) -> float:
    """When the UTC day `day` ends, in epoch seconds."""
    return day_end(day).timestamp()


@functools.lru_cache(maxsize=8)
def _day(days_since_epoch: int) -> str:
    return datetime.fromtimestamp(days_since_epoch * 86400, UTC).strftime("%Y-%m-%d")


def _limits(scope: str, owner: str, caps: RateLimit | None, now: datetime) -> list[Limit]:
    if caps is None:
        return []
    day = _day(int(now.timestamp() // 86400))
    return [Limit(scope, owner, d, value, day if d == "rpd" else None, caps.mode == "shadow")
            for d in DIMENSIONS if (value := getattr(caps, d)) is not None]


def shadow_refusals(limits: list[Limit], windows: list[Window]) -> list[str]:
    """What each shadow limit would have said of an admitted request that took it over."""
    return [f"rate limit {lim.label} {lim.dimension} would refuse 429 rate_limited: "
            f"{w.used} of {lim.limit} {'tokens' if lim.tokens else 'requests'}"
            for lim, w in zip(limits, windows, strict=True)
            if lim.shadow and w.used > lim.limit]


def key_limits(key: VirtualKey, now: datetime) -> list[Limit]:
    return _limits("key", key.id, key.config.rate_limits, now)


def provider_limits(provider: ModelProvider, now: datetime) -> list[Limit]:
    return _limits("provider", provider.id, provider.rate_limit, now)


@dataclass(frozen=True)
class Window:
    """One limit's window as the store found it (after the request, when admitted)."""

    used: int  # requests or tokens counted
    reset_after: float  # seconds until the window is back to its full limit
    retry_after: float | None = None  # refused: seconds until the request would fit


def tokens_room(over: list[tuple[Limit, Window]]) -> int | None:
    """The tokens the refused limits still have room for, when every one is a TPM limit
    (None: a request or day limit refused it, which a smaller request would not pass)."""
    if not over or not all(limit.tokens for limit, _ in over):
        return None
    return min(limit.limit - window.used for limit, window in over)


def reset_after(limit: Limit, newest: float | None, now: float) -> float:
    """Seconds until the window is back to its full limit, its newest entry made at
    `newest` (None: the window is empty)."""
    return 0.0 if newest is None else max(0.0, limit.expires_at(newest) - now)


def resets_at(limit: Limit, window: Window, now: float) -> datetime:
    """When the window is back to its full limit: a day's at midnight UTC."""
    if not limit.sliding:
        return day_end(limit.day or "")
    return datetime.fromtimestamp(now + window.reset_after, UTC)


def read_window(limit: Limit, used: int, newest: float | None, need: int, now: float,
                oldest_first: Callable[[], Iterable[tuple[float, int]]]
                ) -> tuple[bool, Window]:
    """Whether `need` more fits under the limit, with `used` counted and the newest entry
    made at `newest`. Refused: how long until enough ages out, read from the window's
    entries (time, amount) oldest first; None when the request alone is over the limit."""
    if used + need <= limit.enforced:
        return True, Window(used + need, reset_after(limit, now if need else newest, now))
    full = reset_after(limit, newest, now)
    if need > limit.enforced:
        return False, Window(used, full, None)
    if not limit.sliding:
        return False, Window(used, full, full)
    excess, freed = used + need - limit.enforced, 0
    for t, amount in oldest_first():
        freed += amount
        if freed >= excess:
            return False, Window(used, full, max(0.0, t + SLIDING_SECONDS - now))
    return False, Window(used, full, full)


def refusal(limit: Limit, window: Window, need: int, now: float) -> GatewayError:
    """429 rate_limited, naming the dimension, the scope, the limit and when it resets."""
    unit = "tokens" if limit.tokens else "requests"
    per = "per UTC day" if limit.dimension == "rpd" else "per minute"
    retry = window.retry_after
    headers: dict[str, str] = {}
    if retry is None:
        why = (f"this request alone may use {need} tokens (its input and max_tokens), more "
               f"than the limit; lower max_tokens or shorten the input.")
        headers["x-should-retry"] = "false"
    else:
        at = datetime.fromtimestamp(now + retry, UTC).isoformat(timespec="seconds")
        why = f"{window.used} used in the window; it has room again at {at}."
        headers["retry-after"] = str(max(1, math.ceil(retry)))
        headers["retry-after-ms"] = str(max(1, math.ceil(retry * 1000)))
    return GatewayError(
        "rate_limited",
        f"Rate limit reached for {limit.label}: {limit.dimension} (limit {limit.limit} {unit} "
        f"{per}); {why}",
        headers=headers,
        context={"limit": limit.dimension, "scope": f"{limit.scope}:{limit.owner}",
                 "limit_value": str(limit.limit)})


# -- the family's rate-limit headers, for the key's own limits ----------------------------

def _duration(seconds: float) -> str:
    """OpenAI's reset format: 1s, 6m0s, 20ms, 1h2m3s."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    whole = math.ceil(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def headers(family: str, limits: list[Limit], windows: list[Window], now: float
            ) -> dict[str, str]:
    """`x-ratelimit-*` (OpenAI) or `anthropic-ratelimit-*` (Anthropic) for a key's limits:
    requests from rpm (else rpd), tokens from tpm."""
    by_dim = {lim.dimension: (lim, w) for lim, w in zip(limits, windows, strict=True)
              if lim.scope == "key" and not lim.shadow}
    out: dict[str, str] = {}
    for kind, dims in (("requests", ("rpm", "rpd")), ("tokens", ("tpm",))):
        found = next((by_dim[d] for d in dims if d in by_dim), None)
        if found is None:
            continue
        lim, w = found
        remaining = max(0, lim.limit - w.used)
        if family == "anthropic":
            reset = resets_at(lim, w, now)
            out |= {f"anthropic-ratelimit-{kind}-limit": str(lim.limit),
                    f"anthropic-ratelimit-{kind}-remaining": str(remaining),
                    f"anthropic-ratelimit-{kind}-reset":
                        reset.isoformat(timespec="seconds").replace("+00:00", "Z")}
        else:
            out |= {f"x-ratelimit-limit-{kind}": str(lim.limit),
                    f"x-ratelimit-remaining-{kind}": str(remaining),
                    f"x-ratelimit-reset-{kind}": _duration(w.reset_after)}
    return out


HEADER_NAMES = [f"x-ratelimit-{part}-{kind}" for kind in ("requests", "tokens")
                for part in ("limit", "remaining", "reset")] + \
               [f"anthropic-ratelimit-{kind}-{part}" for kind in ("requests", "tokens")
                for part in ("limit", "remaining", "reset")]
