"""What the gateway needs from its state: one atomic admission for a request's budgets and
rate limits, settlement together with the ledger row, and reads for status and reports."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Coroutine
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

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


def process_started(pid: int) -> int | None:
    """When `pid` started (clock ticks after boot; Linux), which tells it from a later
    process given the same pid (a restarted container's PID 1). None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return int(stat.rsplit(b")", 1)[1].split()[19])  # field 22, starttime
    except (OSError, IndexError, ValueError):
        return None


# This process, as the holder of what it writes ahead.
PROCESS = (os.getpid(), process_started(os.getpid()))


def holder_alive(pid: int, started: int | None) -> bool:
    """The process that wrote something ahead is still running (the same one, not a later
    process with its pid)."""
    if not process_alive(pid):
        return False
    return started is None or process_started(pid) in (None, started)


def resolve(done: asyncio.Future[Any] | None, outcome: Any) -> None:
    """Answer a call that waits for a batch (of a loop turn) with its own outcome: its
    result, or the exception it failed with. One whose caller was cancelled meanwhile (or
    that nobody waits for: None) is left alone; what the batch did for it stands."""
    if done is None or done.done():
        return
    if isinstance(outcome, BaseException):
        done.set_exception(outcome)
    else:
        done.set_result(outcome)


def in_background(tasks: set[asyncio.Task[None]], writes: Coroutine[Any, Any, None]) -> None:
    """Run `writes` as a task kept in `tasks` until it is done (a store's close() waits for
    them: see `until_written`)."""
    task = asyncio.get_running_loop().create_task(writes)
    tasks.add(task)
    task.add_done_callback(tasks.discard)


async def until_written(tasks: set[asyncio.Task[None]]) -> None:
    """Wait for every task of `tasks`, those they start meanwhile too (a write that waited
    for a lock goes on to the next step of its own)."""
    while tasks:
        await asyncio.gather(*tasks, return_exceptions=True)


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
    # Of `tokens`: those of fallback providers that failed it (they bill nothing): settled
    # to 0. Of `sliding` and `days`: those of providers it never reached, withdrawn whole.
    unbilled: list[str] = field(default_factory=list)
    unsent: list[str] = field(default_factory=list)

    def tokens_used(self, counter: str) -> int:
        return 0 if counter in self.unbilled else self.used


def distinct_id(row: LedgerRow) -> str:
    """An id for a refusal whose own id names another request in flight: derived from the
    row, so the same refusal read twice (a log replayed) is still recorded once."""
    digest = hashlib.sha256(json.dumps(row.to_dict(), sort_keys=True).encode()).hexdigest()
    return f"{row.request_id}~{digest[:16]}"


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
                     limits: LimitSettlement | None = None,
                     released: list[str] | None = None) -> None:
        """Release `reserved` from each budget counter, add the real cost, settle the TPM
        entries and write the ledger row: once, atomically (replaying the same request id
        changes nothing). `released`: budget counters whose hold is given back uncharged
        (those of fallback providers that did not serve it). A row that was never admitted
        (`row.admitted`) releases nothing; if its id names a request in flight it is kept
        under an id of its own (`distinct_id`), so it can never stand in for that request's
        settlement."""

    @abstractmethod
    async def windows(self, limits: list[Limit], now: float | None = None) -> list[Window]:
        """Each limit's window as it stands (for status)."""

    @abstractmethod
    async def counters(self, holds: list[Hold]) -> list[Counter]: ...

    @abstractmethod
    async def rows(self, since: datetime | None = None,
                   until: datetime | None = None) -> list[LedgerRow]: ...

    async def admit(self, row: LedgerRow, counters: list[str] | None = None  # noqa: B027
                    ) -> None:
        """Write ahead that a request is in flight (`row`, outcome `interrupted`, charged
        what it surely cost), so a gateway that dies before settling it still leaves its
        row, charged to its budget `counters`, when a gateway starts again."""

    def settling_together(self) -> contextlib.AbstractContextManager[None]:
        """Settlements finished while it is open are committed together as it closes (or
        sooner), not each as it comes; a store that commits each at once does as ever."""
        return contextlib.nullcontext()

    reserves_now = False  # whether `reserve_now` ever does

    def reserve_now(self, request_id: str, holds: list[Hold], amount: int,
                    limits: list[Limit], tokens: int, row: LedgerRow) -> Reservation | None:
        """`reserve` and, once granted, `admit` (its written-ahead `row`), in one
        transaction, made at once in the caller's own call, or not at all (None): a store
        that cannot (a network store, the write lock held elsewhere) leaves the request to
        `reserve`. A reservation it does make may be refused, as `reserve`'s may (nothing
        is written then). A store may grant it before it is written, as safely (SQLite's,
        journaled: see `tollgate.store.ahead`)."""
        return None

    async def admit_many(self, rows: list[tuple[LedgerRow, list[str] | None]]) -> None:
        """`admit` for several requests, in order (a store may do it in one call)."""
        for row, counters in rows:
            await self.admit(row, counters)

    async def recover(self) -> int:
        """Record requests written ahead by a replica that is gone for good (a shared store:
        their lease has passed); returns how many."""
        return 0

    async def renew(self, leases: list[tuple[str, list[str], int]]) -> None:  # noqa: B027
        """Extend the holds of requests still in flight, (request_id, counters, amount),
        where holds are leases that expire (a shared store)."""

    async def ping(self) -> None:
        """Raise StoreUnavailable when the store cannot be reached."""
        await self.counters([])

    async def close(self) -> None:  # noqa: B027 - optional
        pass
