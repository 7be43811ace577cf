"""Fallback done by Envoy itself: aggregate clusters, retry headers and the per-attempt filter.

A request with a fallback plan is routed to a *chain*: an aggregate cluster listing the plan's
provider clusters in order, one priority each. The route's retry policy uses
`previous_priorities`, so every retry goes to the next provider of the chain. The decision
filter sets the per-request retry headers from the key's `fallback` config, and the
`tollgate.attempt` upstream filter (in the router's `upstream_http_filters`) is called once per
attempt to put that provider's credentials, host, path and body on it. Streams stay native:
Envoy never retries once a response has started.

Aggregate clusters are fixed at render time, so one is rendered for every order a key's
fallback could need: the orderings of its routing policy's providers (or, without a policy, of
the providers its scope sees), up to its `max_attempts`. A plan without a rendered chain is cut
to its longest prefix that has one.
"""

from __future__ import annotations

import functools
import itertools
import logging
from typing import Any

from tollgate.config.schema import Config, Fallback
from tollgate.providers.base import Adapter
from tollgate.request import Attempt
from tollgate.routing import visible_scopes

log = logging.getLogger("tollgate.extproc")

# A bound on rendered chains, whatever the config: shorter chains are rendered first.
CHAIN_LIMIT = 1000

PREVIOUS_PRIORITIES = "type.googleapis.com/envoy.extensions.retry.priority.previous_priorities." \
                      "v3.PreviousPrioritiesConfig"

# `fallback.on` -> Envoy's retry conditions besides statuses. Envoy cannot tell a per-try
# timeout from a reset before the response, so `reset` serves both `timeout` and
# `network_error`.
_RETRY_ON = {"5xx": [], "rate_limit": [], "timeout": ["reset"],
             "network_error": ["connect-failure", "refused-stream", "reset"]}
# Per-request controls of Envoy's router: the gateway alone sets them.
ENVOY_CONTROL_PREFIX = "x-envoy-"


def chain_name(provider_ids: tuple[str, ...]) -> str:
    return "chain_" + "_then_".join(provider_ids)


def chains(cfg: Config) -> list[tuple[str, ...]]:
    """Every provider order (two or more) some key's fallback may need, shortest first."""
    known = {p.id for p in cfg.model_providers}
    pools: dict[tuple[str, ...], int] = {}  # provider pool -> longest chain it needs
    policies = {rp.id: rp for rp in cfg.routing_policies}
    for key in cfg.virtual_keys:
        fallback = key.config.fallback
        if not fallback.on or fallback.max_attempts < 2:
            continue
        policy = policies.get(key.routing_policy or "")
        if policy is not None:
            ids = [t.model_provider for t in policy.targets()]
        else:
            scopes = visible_scopes(cfg, key.scope)
            ids = [p.id for p in cfg.model_providers if p.scope in scopes]
        pool = tuple(sorted({i for i in ids if i in known}))
        pools[pool] = max(pools.get(pool, 0), min(fallback.max_attempts, len(pool)))
    found: set[tuple[str, ...]] = set()
    for pool, longest in pools.items():
        for length in range(2, longest + 1):
            found.update(itertools.permutations(pool, length))
    ordered = sorted(found, key=lambda t: (len(t), t))
    if len(ordered) > CHAIN_LIMIT:
        log.warning("%d fallback chains needed, rendering the %d shortest; longer plans are "
                    "cut to a rendered prefix", len(ordered), CHAIN_LIMIT)
    return ordered[:CHAIN_LIMIT]


def has_chain(attempts: list[Attempt], rendered: set[tuple[str, ...]]) -> bool:
    """Envoy can route the whole plan (a plan of one needs no chain)."""
    return len(attempts) < 2 or tuple(a.provider_id for a in attempts) in rendered


def usable_plan(attempts: list[Attempt], rendered: set[tuple[str, ...]]) -> list[Attempt]:
    """The longest prefix of the plan Envoy has a chain for (at least its first attempt)."""
    for length in range(len(attempts), 1, -1):
        if tuple(a.provider_id for a in attempts[:length]) in rendered:
            return attempts[:length]
    if len(attempts) > 1:
        log.warning("no fallback chain for %s rendered; serving without fallback (render the "
                    "Envoy config again)", ", ".join(a.provider_id for a in attempts))
    return attempts[:1]


def retry_headers(fallback: Fallback, attempts: list[Attempt]) -> dict[str, str]:
    """Envoy's per-request retry controls for a fallback plan, from the key's conditions.

    The per-try timeout is the first provider's first byte timeout (Envoy takes one value
    for every attempt). A plan of one gets none: without fallback a slow first byte (a long
    reasoning call) is waited for, as on the mitmproxy host."""
    if len(attempts) < 2:
        return {}
    # Any attempt but the last may be followed by another.
    retry_on, codes = _conditions(tuple(fallback.on), tuple(type(a.adapter)
                                                             for a in attempts[:-1]))
    headers = {"x-envoy-retry-on": retry_on,
               "x-envoy-max-retries": str(len(attempts) - 1),
               "x-envoy-upstream-rq-per-try-timeout-ms":
                   str(round(attempts[0].first_byte_timeout * 1000))}
    if codes:
        headers["x-envoy-retriable-status-codes"] = codes
    return headers


@functools.cache
def _conditions(on: tuple[str, ...], adapters: tuple[type[Adapter], ...]) -> tuple[str, str]:
    """Envoy's retry conditions and the statuses to retry for a plan whose attempts before the
    last are of these provider types: the same for every request of such a plan, so worked
    out once (a hundred statuses a plan)."""
    retry_on = {c for cond in on for c in _RETRY_ON[cond]}
    # The statuses each provider type classes under the key's conditions (Bedrock's 408 is a
    # timeout).
    codes = sorted({code for adapter in adapters
                    for code, kind in adapter.failure_statuses.items() if kind in on})
    if codes:
        retry_on.add("retriable-status-codes")
    return ",".join(sorted(retry_on)), ",".join(map(str, codes))


def retry_policy() -> dict[str, Any]:
    """The fallback routes' retry policy: each retry goes to the chain's next priority; the
    conditions and the count come with each request."""
    return {
        "retry_priority": {"name": "envoy.retry_priorities.previous_priorities",
                           "typed_config": {"@type": PREVIOUS_PRIORITIES, "update_frequency": 1}},
        # Another provider is tried at once: no back-off between providers.
        "retry_back_off": {"base_interval": "0.001s", "max_interval": "0.001s"},
    }
