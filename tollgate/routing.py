"""Which providers may serve a request, in which order, and how to reach each."""

from __future__ import annotations

import fnmatch
import random
from dataclasses import dataclass
from urllib.parse import urlsplit

from tollgate.catalog import ModelCatalog
from tollgate.config.schema import (
    Config,
    ModelProvider,
    RoutingPolicy,
    RoutingTarget,
    VirtualKey,
)
from tollgate.errors import GatewayError
from tollgate.providers import adapter_for
from tollgate.request import Attempt
from tollgate.routes import Route
from tollgate.scopes import lineage

_rng = random.Random()


@dataclass(frozen=True)
class Target:
    provider: ModelProvider
    model: str  # the model this provider is asked for


def visible_scopes(cfg: Config, scope: str) -> set[str]:
    """A key sees its own scope and every scope above it: project -> team -> org."""
    return lineage(cfg, scope).scopes() | {scope}


def serves(provider: ModelProvider, model: str) -> bool:
    return any(fnmatch.fnmatchcase(model, p) for p in provider.serves())


def weighted_order(targets: list[RoutingTarget], rng: random.Random) -> list[RoutingTarget]:
    """Spread load by weight: the first pick is weighted-random, then the rest likewise,
    so the remaining targets still serve as fallbacks. Weight 0 only ever falls back."""
    pool, out = list(targets), []
    while pool:
        weights = [t.weight for t in pool]
        pick = rng.choices(range(len(pool)), weights=weights)[0] if sum(weights) else 0
        out.append(pool.pop(pick))
    return out


def policy_model(target: RoutingTarget, provider: ModelProvider, model: str,
                 catalog: ModelCatalog | None) -> str:
    """What a policy's provider is asked for: the target's model map, else the model itself
    if it serves it, else its vendor's equivalent from the catalog."""
    if model in target.model_map:
        return target.model_map[model]
    if serves(provider, model) or catalog is None:
        return model
    return catalog.equivalent(model, adapter_for(provider).vendor) or model


def policy_of(cfg: Config, key: VirtualKey) -> RoutingPolicy | None:
    """The key's routing policy, if it has one."""
    return next((rp for rp in cfg.routing_policies if rp.id == key.routing_policy), None)


def targets(cfg: Config, key: VirtualKey, route: Route, model: str,
            rng: random.Random | None = None, catalog: ModelCatalog | None = None,
            skipped: list[str] | None = None) -> list[Target]:
    """Eligible providers in dispatch order: same family, or translatable to it. A policy's
    provider with nothing to serve for the request is left out, and why is appended to
    `skipped`."""
    client_family = route.family
    rng = rng or _rng
    scopes = visible_scopes(cfg, key.scope)
    providers = {p.id: p for p in cfg.model_providers}
    ordered: list[Target] = []
    policy = policy_of(cfg, key)
    if policy is not None:
        chosen = policy.targets()
        if policy.strategy == "weighted":
            chosen = weighted_order(chosen, rng)
        for chosen_target in chosen:
            p = providers[chosen_target.model_provider]
            ordered.append(Target(p, policy_model(chosen_target, p, model, catalog)))
    else:
        # Lower fallback_priority first; ties keep config order (creation order).
        for p in sorted(cfg.model_providers, key=lambda p: p.fallback_priority):
            ordered.append(Target(p, model))
    eligible = []
    for t in ordered:
        if t.provider.scope not in scopes:
            continue
        if serves(t.provider, t.model) and adapter_for(t.provider).serves_route(route):
            eligible.append(t)
        elif policy is not None and skipped is not None:
            skipped.append(f"{t.provider.id}: serves neither {model!r} nor an equivalent"
                           if not serves(t.provider, t.model) else
                           f"{t.provider.id}: does not serve the {route.name} route")
    if not eligible:
        raise GatewayError(
            "no_provider_for_model",
            f"No model provider visible to virtual key {key.id} (scope {key.scope}) serves "
            f"{model!r} for the {client_family} API. Add a provider that serves it, or list the "
            "model in a provider's `models`.",
            param="model",
        )
    return eligible


def build_attempt(target: Target, route: Route, client_path: str,
                  client_headers: dict[str, str], strip: list[str], stream: bool = False,
                  catalog: ModelCatalog | None = None) -> Attempt:
    """Upstream URL, provider credential and the headers to drop for one provider."""
    p = target.provider
    adapter = adapter_for(p)
    url = urlsplit(p.base_url)
    scheme = url.scheme
    port = url.port or (443 if scheme == "https" else 80)
    set_headers, remove = adapter.auth(client_headers)
    wire = adapter.family(target.model)
    translated = wire != route.family
    if translated:
        set_headers["content-type"] = "application/json"
        if wire == "openai":
            remove = [*remove, "anthropic-version", "anthropic-beta"]
    # Once each: the adapter's credential headers are often among the client's own
    # (`strip`), and each name is a removal every attempt's proxy makes.
    remove = [h for h in dict.fromkeys([*remove, *strip]) if h not in set_headers]
    return Attempt(
        provider_id=p.id,
        scheme=scheme,
        host=url.hostname or "",
        port=port,
        path=adapter.path(route, adapter.upstream_model(target.model, catalog), client_path,
                          stream),
        set_headers=set_headers,
        remove_headers=remove,
        family=wire,
        model=target.model,
        body_model=adapter.body_model(route, target.model),
        translated=translated,
        reframed=adapter.reframes_streams and stream,
        foreign_errors=not adapter.native_errors,
        connect_timeout=p.connect_timeout,
        first_byte_timeout=p.first_byte_timeout,
        adapter=adapter,
    )
