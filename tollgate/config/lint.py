"""Controls that are valid but cannot take effect: a budget no request can reach, a limit on
a provider no key can use, an allow list no provider can serve. Warnings, not errors: the
config still loads, and `tollgate config validate` and every CLI edit say what is idle."""

from __future__ import annotations

import fnmatch
import os
import time
from typing import Any

from tollgate.catalog import ModelCatalog
from tollgate.config.load import LoadedConfig, field_name, line_of, read_yaml
from tollgate.config.problems import ConfigError, Problem
from tollgate.config.schema import Config, ModelProvider
from tollgate.pricing import PriceTable
from tollgate.routing import policy_model, serves, visible_scopes
from tollgate.scopes import lineage

Location = tuple[Any, ...]


def _visible_providers(cfg: Config, scope: str) -> list[ModelProvider]:
    seen = visible_scopes(cfg, scope)
    return [p for p in cfg.model_providers if p.scope in seen]


# A provider type's chain (AWS's, Google's ADC) found nothing: asked again after this long, as
# looking may wait on a metadata server, and readiness is probed every few seconds.
AMBIENT_RECHECK = 30.0
_ambient_missing: dict[str, tuple[float, str]] = {}


def missing_credentials(cfg: Config) -> list[str]:
    """Providers with no usable credential in this process's environment: a key variable
    not set, a key file not readable, or no credentials in the chain their type reads."""
    from tollgate.providers import adapter_for

    out = [f"model provider {p.id}: {p.api_key_env} is not set"
           for p in cfg.model_providers if p.api_key_env and not os.environ.get(p.api_key_env)]
    out += [f"model provider {p.id}: {p.api_key_file} cannot be read"
            for p in cfg.model_providers
            if p.api_key_file and not os.access(p.api_key_file, os.R_OK)]
    for p in cfg.model_providers:
        if p.api_key_env or p.api_key_file:
            continue
        seen = _ambient_missing.get(p.type)
        if seen is not None and time.monotonic() < seen[0]:
            problem: str | None = seen[1]
        else:
            problem = adapter_for(p).ambient_credential_problem()
            if problem is None:
                _ambient_missing.pop(p.type, None)
            else:
                _ambient_missing[p.type] = (time.monotonic() + AMBIENT_RECHECK, problem)
        if problem:
            out.append(f"model provider {p.id}: {problem}")
    return out


def idle_controls(cfg: Config, prices: PriceTable, catalog: ModelCatalog | None = None
                  ) -> list[tuple[Location, str]]:
    out: list[tuple[Location, str]] = []
    keys = [k for k in cfg.virtual_keys if k.status == "active"]
    lineages = {k.id: lineage(cfg, k.scope) for k in keys}
    reachable = {p.id for k in keys for p in _visible_providers(cfg, k.scope)}

    for i, b in enumerate(cfg.budgets):
        if b.scope == "org":
            applies = [k for k in keys if lineages[k.id].org == b.org]
        elif b.scope == "team":
            applies = [k for k in keys if lineages[k.id].team == b.team]
        elif b.scope == "project":
            applies = [k for k in keys if lineages[k.id].project == b.project]
        elif b.scope == "virtual_key":
            applies = [k for k in keys if k.id == b.virtual_key]
        else:
            applies = [k for k in keys if k.principal == b.principal]
        if not applies:
            out.append((("budgets", i, b.scope), f"budget {b.id} applies to no active virtual "
                        f"key ({b.scope} {b.target!r} has none): it limits nothing"))
        elif b.model_provider and b.model_provider not in {
                p.id for k in applies for p in _visible_providers(cfg, k.scope)}:
            out.append((("budgets", i, "model_provider"), f"budget {b.id}: no key it applies "
                        f"to can reach provider {b.model_provider}: it limits nothing"))

    for i, p in enumerate(cfg.model_providers):
        if p.rate_limit is not None and p.id not in reachable:
            out.append((("model_providers", i, "rate_limit"), f"provider {p.id}: no active "
                        "virtual key can reach it, so its rate limit limits nothing"))
    # A request without an output cap reserves its model's ceiling (plus its input) against
    # TPM: a TPM below a model's ceiling refuses every such request to that model.
    ceilings = {m: c for m in prices.models if catalog is not None
                and (c := catalog.max_output_tokens(m))}
    for section, items, field in (("model_providers", cfg.model_providers, ("rate_limit",)),
                                  ("virtual_keys", cfg.virtual_keys,
                                   ("config", "rate_limits"))):
        for i, item in enumerate(items):
            caps = item.rate_limit if section == "model_providers" else \
                item.config.rate_limits
            if caps is None or caps.tpm is None:
                continue
            patterns = item.serves() if section == "model_providers" else \
                item.models_allowed or ["*"]
            over = sorted(m for m, c in ceilings.items() if c >= caps.tpm
                          and any(fnmatch.fnmatchcase(m, g) for g in patterns))
            if over:
                out.append(((section, i, *field, "tpm"), f"{item.id}: tpm {caps.tpm} is below "
                            f"the output ceiling of {', '.join(over[:3])}"
                            f"{', ...' if len(over) > 3 else ''} (models.yaml), so every "
                            "request to them without max_tokens is refused"))

    known = set(prices.models) | {m for p in cfg.model_providers for m in p.serves()
                                  if not any(c in m for c in "*?[")}
    for i, k in enumerate(cfg.virtual_keys):
        if k.status != "active" or k.models_allowed is None:
            continue
        providers = _visible_providers(cfg, k.scope)
        for j, pattern in enumerate(k.models_allowed):
            models = [m for m in known if fnmatch.fnmatchcase(m, pattern)]
            served = any(fnmatch.fnmatchcase(m, g) for m in models for p in providers
                         for g in p.serves())
            if not served:
                out.append((("virtual_keys", i, "models_allowed", j), f"key {k.id}: "
                            f"{pattern!r} matches no model that a provider it can see "
                            "serves"))
    out += _unserving_targets(cfg, known | set(catalog.models if catalog else ()), catalog)
    return out


def _unserving_targets(cfg: Config, known: set[str], catalog: ModelCatalog | None
                       ) -> list[tuple[Location, str]]:
    """Policy providers that can serve none of the models the policy's first provider
    serves (directly, by its model map, or by a catalog equivalent): requests skip them."""
    out: list[tuple[Location, str]] = []
    providers = {p.id: p for p in cfg.model_providers}
    for i, rp in enumerate(cfg.routing_policies):
        targets = rp.targets()
        if len(targets) < 2:
            continue
        first = providers[targets[0].model_provider]
        asked = [m for m in known if serves(first, m)]
        for j, t in enumerate(targets[1:], start=1):
            p = providers[t.model_provider]
            if asked and not any(serves(p, policy_model(t, p, m, catalog)) for m in asked):
                out.append((("routing_policies", i, "model_providers", j), f"policy {rp.id}: "
                            f"{p.id} serves none of the models {first.id} serves, and no "
                            "model map or catalog equivalent names one: requests skip it"))
    return out


def idle(loaded: LoadedConfig) -> list[tuple[Location, str]]:
    """The config's idle controls (`idle_controls`)."""
    return idle_controls(loaded.config, loaded.prices, loaded.catalog)


def warnings(loaded: LoadedConfig, doc: Any = None,
             only: list[tuple[Location, str]] | None = None) -> list[str]:
    """Each idle control (or those of `only`) as `file:line: field: message`; the lines are
    `doc`'s (the round-trip parse of the file), else the file's, read only if there is
    one to say."""
    found = idle(loaded) if only is None else only
    if found and doc is None:
        try:
            doc = read_yaml(loaded.path)
        except ConfigError:
            doc = None
    return [str(Problem(str(loaded.path), line_of(doc, loc) if doc is not None else None,
                        field_name(loc), message))
            for loc, message in found]
