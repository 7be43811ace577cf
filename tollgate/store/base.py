"""What the gateway needs from its state: one atomic admission for a request's budgets and
rate limits, settlement together with the ledger row, and reads for status and reports."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from datetime import datetime

from tollgate.budgets import Hold
from tollgate.ledger import LedgerRow
from tollgate.ratelimit import Limit, Window


def process_alive(pid: int) -> bool:
    if pid <= 0:  # 0 and -1 would signal a whole process group
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StoreUnavailable(Exception):
    """The state store cannot be reached (Redis down, disk gone)."""


@dataclass(frozen=True)
class Counter:
    spent: int = 0  # settled micro-dollars in the window
    reserved: int = 0  # micro-dollars held by requests in flight

    @property
    def committed(self) -> int:
        return self.spent + self.reserved


@dataclass(frozen=True)
class Reservation:
    granted: bool
    counters: list[Counter]  # per hold, after the reservation (or as found, when refused)
    refused_by: int | None = None  # index of the first blocking hold that could not take it
    windows: list[Window] = field(default_factory=list)  # per limit, after (or as found)
    refused_limits: list[int] = field(default_factory=list)  # limits it did not fit under
    at: float = 0.0  # the store's clock when it was admitted (epoch seconds)


@dataclass(frozen=True)
class LimitSettlement:
    """What a request took from its rate limits, settled when it ends: its TPM entries go
    from the estimate it was admitted with to the tokens it used."""

    sliding: list[str]  # the RPM and TPM counters it entered
    days: list[str]  # the RPD counters it entered
    tokens: list[str]  # of `sliding`, the TPM ones
    reserved: int  # the tokens it was admitted with
    admitted: float  # when (epoch seconds, the store's clock)
    used: int = 0  # the tokens it used


class Store(ABC):
    @abstractmethod
    async def reserve(self, request_id: str, holds: list[Hold], amount: int,
                      limits: list[Limit] | None = None, tokens: int = 0,
                      now: float | None = None) -> Reservation:
        """Admit a request, all or nothing: every hold takes `amount` (no blocking hold may
        pass its limit) and every rate limit takes one request, or `tokens` for TPM (none
        may pass its limit). `now` (epoch seconds) is for tests; the store's clock counts."""

    @abstractmethod
    async def finish(self, counters: list[str], reserved: int, row: LedgerRow,
                     limits: LimitSettlement | None = None) -> None:
        """Release `reserved` from each budget counter, add the real cost, settle the TPM
        entries and write the ledger row: once, atomically (replaying the same request id
        changes nothing)."""

    @abstractmethod
    async def windows(self, limits: list[Limit], now: float | None = None) -> list[Window]:
        """Each limit's window as it stands (for status)."""

    @abstractmethod
    async def counters(self, holds: list[Hold]) -> list[Counter]: ...

    @abstractmethod
    async def rows(self, since: datetime | None = None,
                   until: datetime | None = None) -> list[LedgerRow]: ...

    async def admit(self, row: LedgerRow) -> None:  # noqa: B027 - optional
        """Write ahead that a request is in flight (`row`, outcome `interrupted`), so a
        gateway that dies before settling it still leaves its row when it starts again."""

    async def renew(self, leases: list[tuple[str, list[str], int]]) -> None:  # noqa: B027
        """Extend the holds of requests still in flight, (request_id, counters, amount),
        where holds are leases that expire (a shared store)."""

    async def ping(self) -> None:
        """Raise StoreUnavailable when the store cannot be reached."""
        await self.counters([])

    async def close(self) -> None:  # noqa: B027 - optional
        pass
