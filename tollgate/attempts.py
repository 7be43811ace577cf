"""A request's plan of provider attempts: which one is current, whether an outcome lets it move
on to the next, and why it moved past the providers before it. Every attempt in the plan was
admitted (its budgets and rate limits) before the first was sent."""

from __future__ import annotations

from collections.abc import Collection

from tollgate.request import Attempt


class AttemptCursor:
    def __init__(self, attempts: list[Attempt], fallback_on: Collection[str],
                 passed_over: list[str] | None = None,
                 unserved: list[str] | None = None) -> None:
        self.attempts = attempts
        self.index = 0
        self._fallback_on = fallback_on  # the key's `fallback.on` conditions
        # Why the request moved past providers, in order ("mp_a:rate_limit (rpm 2)"): those
        # passed over before dispatch, then the attempts that failed.
        self.fallbacks: list[str] = list(passed_over or [])
        # Providers of its routing policy with nothing to serve for it, and why.
        self.unserved: list[str] = list(unserved or [])

    @property
    def attempt(self) -> Attempt:
        return self.attempts[self.index]

    @property
    def reached(self) -> list[str]:
        """The providers its attempts have gone to so far."""
        return [a.provider_id for a in self.attempts[:self.index + 1]]

    @property
    def fallback_count(self) -> int:
        return len(self.fallbacks)

    def failure_kind(self, status: int | None = None, error: str | None = None) -> str | None:
        """The `fallback.on` condition the current attempt's outcome falls under, if any: a
        transport error as it is, a status as the provider's adapter classes it."""
        if error is not None:
            return error  # "timeout" | "network_error"
        if status is None:
            return None
        return self.attempt.adapter.failure_kind(status)

    def fallback_reason(self, status: int | None = None, error: str | None = None
                        ) -> str | None:
        """Why the current attempt's outcome may move on to the next provider, if it may."""
        reason = self.failure_kind(status, error)
        if reason in self._fallback_on and self.index + 1 < len(self.attempts):
            return reason
        return None

    def advance(self, reason: str) -> Attempt:
        """Move past the current attempt, which failed for `reason`."""
        self.fallbacks.append(f"{self.attempt.provider_id}:{reason}")
        self.index += 1
        return self.attempt

    def next_to(self, provider_id: str) -> int | None:
        """The index of the first attempt from the current one on that goes to
        `provider_id`, if the plan has one."""
        return next((i for i in range(self.index, len(self.attempts))
                     if self.attempts[i].provider_id == provider_id), None)
