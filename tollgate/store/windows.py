"""Rate-limit windows of one node, in memory: the single-node store admits against these
(a check costs microseconds, not a disk transaction) and writes each request's entries
to disk when it settles, from where a restart or `rate-limits status` reads them back."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from tollgate.ratelimit import SLIDING_SECONDS, Limit, Window, read_window


@dataclass
class _Counter:
    """One limit's counter: a sliding window keeps its entries, a day only its total."""

    used: int = 0
    newest: float | None = None
    entries: deque[list] = field(default_factory=deque)  # [time, request id, amount]
    by_request: dict[str, list] = field(default_factory=dict)

    def trim(self, now: float) -> None:
        while self.entries and self.entries[0][0] <= now - SLIDING_SECONDS:
            _, request_id, amount = self.entries.popleft()
            self.used -= amount
            self.by_request.pop(request_id, None)


class LocalWindows:
    def __init__(self) -> None:
        self._counters: dict[str, _Counter] = {}

    def _get(self, limit: Limit, now: float) -> _Counter:
        counter = self._counters.setdefault(limit.counter, _Counter())
        if limit.sliding:
            counter.trim(now)
        return counter

    def read(self, limit: Limit, need: int, now: float) -> tuple[bool, Window]:
        counter = self._get(limit, now)
        return read_window(limit, counter.used, counter.newest, need, now,
                           lambda: ((t, a) for t, _, a in counter.entries))

    def take(self, limit: Limit, request_id: str, need: int, now: float) -> None:
        counter = self._get(limit, now)
        counter.used += need
        counter.newest = now if counter.newest is None else max(counter.newest, now)
        if limit.sliding:
            entry = [now, request_id, need]
            counter.entries.append(entry)
            counter.by_request[request_id] = entry

    def settle(self, counter_name: str, request_id: str, used: int) -> None:
        """A TPM entry goes from its estimate to what the request used (if still counted)."""
        counter = self._counters.get(counter_name)
        entry = counter.by_request.get(request_id) if counter else None
        if counter is None or entry is None:
            return
        counter.used += used - entry[2]
        entry[2] = used

    def withdraw(self, counter_name: str, request_id: str, day: bool) -> None:
        """Take back what a request took from a counter it never used (a fallback provider
        it did not reach): its sliding entry, or its one request of a `day`."""
        counter = self._counters.get(counter_name)
        if counter is None:
            return
        if day:
            counter.used = max(0, counter.used - 1)
            return
        entry = counter.by_request.pop(request_id, None)
        if entry is not None:
            counter.used -= entry[2]
            counter.entries.remove(entry)

    def load(self, limit_counter: str, entries: Iterable[tuple[float, str, int]],
             day_total: tuple[int, float] | None = None) -> None:
        """Restore a counter from disk: a sliding window's entries, or a day's total."""
        counter = self._counters.setdefault(limit_counter, _Counter())
        if day_total is not None:
            counter.used, counter.newest = day_total
            return
        for t, request_id, amount in sorted(entries):
            if request_id in counter.by_request:
                continue
            entry = [t, request_id, amount]
            counter.entries.append(entry)
            counter.by_request[request_id] = entry
            counter.used += amount
            counter.newest = t if counter.newest is None else max(counter.newest, t)

    def forget_idle(self, now: float) -> None:
        """Drop counters nothing has touched for two days (past days, idle keys)."""
        for name, counter in list(self._counters.items()):
            if counter.newest is None or counter.newest < now - 2 * 86400:
                del self._counters[name]
