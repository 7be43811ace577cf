"""Whether an Envoy routes as the config says: its clusters (from its admin's config dump)
against the ones the config renders, and the version of tollgate's filters it runs against
this tollgate's. `tollgate status` asks it of each running gateway that knows its Envoy, so
a provider edit an Envoy has not taken (a static render, a file it has not read yet) or
filters another tollgate rendered (which ext_proc refuses) are reported, not hidden behind
"current"."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from extproc import envoy_config
from extproc.envoy_admin import AdminError, EnvoyAdmin
from tollgate.config.schema import Config


def _endpoints(cluster: dict[str, Any]) -> list[tuple[str, int]]:
    assignment = cluster.get("load_assignment") or {}
    return sorted(
        (sock.get("address", ""), int(sock.get("port_value", 0)))
        for group in assignment.get("endpoints") or []
        for lb in group.get("lb_endpoints") or []
        if (sock := lb.get("endpoint", {}).get("address", {}).get("socket_address")))


def loaded_clusters(admin: EnvoyAdmin) -> dict[str, dict[str, Any]]:
    """The clusters the Envoy whose admin is `admin` runs, static and dynamic, by name."""
    out: dict[str, dict[str, Any]] = {}
    for resource in ("static_clusters", "dynamic_active_clusters"):
        for entry in _config_dump(admin, resource):
            cluster = entry.get("cluster") or {}
            out[cluster.get("name", "")] = cluster
    return out


def _config_dump(admin: EnvoyAdmin, resource: str) -> list[dict[str, Any]]:
    configs: list[dict[str, Any]] = admin.json("/config_dump", resource=resource) \
        .get("configs", [])
    return configs


_FILTERS = re.compile(r'^local FILTERS = "([^"]*)"$', re.MULTILINE)


def filters_versions(admin: EnvoyAdmin) -> set[str | None]:
    """The versions of tollgate's filters the listeners of the Envoy run (None:
    a decide filter that names none, rendered before filters had versions)."""
    versions: set[str | None] = set()
    for http in _http_filters(admin):
        if http.get("name") == "tollgate.decide":
            source = (http.get("typed_config") or {}).get(
                "default_source_code", {}).get("inline_string", "")
            found = _FILTERS.search(source)
            versions.add(found.group(1) if found else None)
    return versions


def _http_filters(admin: EnvoyAdmin) -> Iterator[dict[str, Any]]:
    """The HTTP filters of every listener the Envoy runs, static and dynamic."""
    for resource in ("static_listeners", "dynamic_listeners"):
        for entry in _config_dump(admin, resource):
            listener = entry.get("listener") or (entry.get("active_state") or {}) \
                .get("listener") or {}
            for chain in listener.get("filter_chains") or []:
                for network in chain.get("filters") or []:
                    yield from (network.get("typed_config") or {}).get("http_filters") or []


def older_view(admin: str, cfg: Config) -> list[str] | None:
    """How the Envoy at `admin` differs from what `cfg` renders (empty: it does not), or
    None when its admin cannot be read."""
    api = EnvoyAdmin(admin, timeout=3)  # one connection for its four config dumps
    try:
        running = loaded_clusters(api)
        filters = filters_versions(api)
    except (AdminError, AttributeError):
        return None
    finally:
        api.close()
    differences = [f"it runs tollgate filters of version {version or '(none named)'}, which "
                   f"this tollgate's decision service refuses (its own: "
                   f"{envoy_config.FILTERS_VERSION})"
                   for version in sorted(filters, key=str)
                   if version != envoy_config.FILTERS_VERSION]
    for wanted in envoy_config.clusters(cfg):
        name = wanted["name"]
        have = running.get(name)
        if have is None:
            differences.append(f"it has no cluster {name}")
        elif _endpoints(have) != _endpoints(wanted):
            shown = ", ".join(f"{a}:{p}" for a, p in _endpoints(have)) or "-"
            differences.append(f"its cluster {name} goes to {shown}, the config to "
                               + ", ".join(f"{a}:{p}" for a, p in _endpoints(wanted)))
    return differences
