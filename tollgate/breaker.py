"""A circuit breaker per provider: after repeated failures a provider is passed over for a
cool-down, then tried again (one success closes it). In-process, per gateway replica."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger("tollgate.breaker")


class Breakers:
    def __init__(self, failures: int = 3, cooldown: float = 30.0,
                 clock: Callable[[], float] = time.monotonic):
        self.failures, self.cooldown, self.clock = failures, cooldown, clock
        self._count: dict[str, int] = {}
        self._open_until: dict[str, float] = {}
        self._lock = threading.Lock()

    def is_open(self, provider_id: str) -> bool:
        with self._lock:
            return self._open_until.get(provider_id, 0.0) > self.clock()

    def failure(self, provider_id: str) -> None:
        with self._lock:
            count = self._count.get(provider_id, 0) + 1
            self._count[provider_id] = count
            if count >= self.failures:
                self._open_until[provider_id] = self.clock() + self.cooldown
                self._count[provider_id] = 0
                log.warning("circuit open for provider %s after %d failures in a row: tried "
                            "last for %gs", provider_id, count, self.cooldown)

    def success(self, provider_id: str) -> None:
        with self._lock:
            self._count.pop(provider_id, None)
            self._open_until.pop(provider_id, None)

    def order(self, provider_ids: list[str]) -> list[int]:
        """Indexes in dispatch order: closed circuits first, open ones last (still there,
        so a request is served even when every provider has been failing)."""
        open_ = [self.is_open(p) for p in provider_ids]
        return [i for i in range(len(provider_ids)) if not open_[i]] + \
            [i for i in range(len(provider_ids)) if open_[i]]
