"""What a decision derives from the config alone: a key's place in the org tree, the
providers that may serve a model and their order, the budgets and rate limits that apply.
Computed once per loaded config (a reload loads a new one) instead of on every request;
the window a budget or limit counts in is still taken from the request's own clock."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from tollgate import budgets, ratelimit, routing
from tollgate.config.schema import ModelProvider, VirtualKey
from tollgate.routes import Route
from tollgate.scopes import Lineage, lineage

if TYPE_CHECKING:
    from tollgate.config.load import LoadedConfig

# Models are named by clients: past this many (key, route, model) plans, new ones are
# computed on each request instead of kept.
MAX_PLANS = 4096


@dataclass(frozen=True)
class Applying:
    """What a request is held in: its budgets (`holds`, their counters in `counters`), and
    the key's and its provider's rate limits (`limits`), each with the provider it is of
    (`named`: None for the key's); `shadow`: one of them is in shadow mode."""

    holds: list[budgets.Hold]
    limits: list[ratelimit.Limit]
    counters: list[str]
    named: list[tuple[ratelimit.Limit, str | None]]
    shadow: bool


class Derived:
    def __init__(self, loaded: LoadedConfig) -> None:
        self.loaded = loaded
        self._lineages: dict[str, Lineage] = {}
        self._targets: dict[tuple[str, str, str], tuple[list[routing.Target], list[str]]] = {}
        self._holds: dict[tuple[str, str], tuple[int, list[budgets.Hold]]] = {}
        self._limits: dict[tuple[str, str, int], list[ratelimit.Limit]] = {}
        self._applying: dict[tuple[str, str], tuple[int, Applying]] = {}
        self.providers = {p.id: p for p in loaded.config.model_providers}

    def lineage(self, scope: str) -> Lineage:
        found = self._lineages.get(scope)
        if found is None:
            found = self._lineages[scope] = lineage(self.loaded.config, scope)
        return found

    def targets(self, key: VirtualKey, route: Route, model: str,
                skipped: list[str] | None = None) -> list[routing.Target]:
        """`routing.targets`, kept unless the key's routing policy orders its providers
        at random (weighted)."""
        cfg = self.loaded.config
        plan = self._targets.get((key.id, route.name, model))
        if plan is None:
            policy = routing.policy_of(cfg, key)
            if policy is not None and policy.strategy == "weighted":  # never kept
                return routing.targets(cfg, key, route, model, catalog=self.loaded.catalog,
                                       skipped=skipped)
            left_out: list[str] = []
            plan = (routing.targets(cfg, key, route, model, catalog=self.loaded.catalog,
                                    skipped=left_out), left_out)
            if len(self._targets) < MAX_PLANS:
                self._targets[(key.id, route.name, model)] = plan
        if skipped is not None:
            skipped += plan[1]
        return list(plan[0])

    def holds(self, key: VirtualKey, lineage: Lineage, provider_id: str,
              now: datetime) -> list[budgets.Hold]:
        """`budgets.holds_for`: kept for the UTC minute of `now`, within which every
        budget window (a minute at the shortest) is the same."""
        minute = int(now.timestamp() // 60)
        kept = self._holds.get((key.id, provider_id))
        if kept is None or kept[0] != minute:
            kept = self._holds[(key.id, provider_id)] = (minute, budgets.holds_for(
                self.loaded.config, key, lineage, provider_id, now))
        return list(kept[1])

    def applying(self, key: VirtualKey, lineage: Lineage, provider_id: str, now: datetime
                 ) -> Applying:
        """What a request of `key` served by `provider_id` is held in (`holds`,
        `key_limits` and `provider_limits` together), kept for the UTC minute of `now`: a
        request decided from a precedent takes it as one lookup. Shared: not to be changed."""
        minute = int(now.timestamp() // 60)
        kept = self._applying.get((key.id, provider_id))
        if kept is None or kept[0] != minute:
            holds = self.holds(key, lineage, provider_id, now)
            limits = self.key_limits(key, now) + \
                self.provider_limits(self.providers[provider_id], now)
            kept = self._applying[(key.id, provider_id)] = (minute, Applying(
                holds, limits, [h.counter for h in holds],
                [(lim, None if lim.scope == "key" else provider_id) for lim in limits],
                any(h.shadow for h in holds) or any(lim.shadow for lim in limits)))
        return kept[1]

    def key_limits(self, key: VirtualKey, now: datetime) -> list[ratelimit.Limit]:
        return self._day_limits("key", key.id, now, lambda: ratelimit.key_limits(key, now))

    def provider_limits(self, provider: ModelProvider, now: datetime
                        ) -> list[ratelimit.Limit]:
        return self._day_limits("provider", provider.id, now,
                                lambda: ratelimit.provider_limits(provider, now))

    def _day_limits(self, scope: str, owner: str, now: datetime,
                    make: Callable[[], list[ratelimit.Limit]]) -> list[ratelimit.Limit]:
        """Limits name the UTC day they count requests per day in: kept for that day."""
        day = int(now.timestamp() // 86400)
        found = self._limits.get((scope, owner, day))
        if found is None:
            self._limits = {k: v for k, v in self._limits.items() if k[2] == day}
            found = self._limits[(scope, owner, day)] = make()
        return list(found)
