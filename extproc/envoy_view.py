"""Whether an Envoy routes as the config says: its clusters (from its admin's config dump)
against the ones the config renders. `tollgate status` asks it of each running gateway that
knows its Envoy, so a provider edit an Envoy has not taken (a static render, a file it has
not read yet) is reported, not hidden behind "current"."""

from __future__ import annotations

from typing import Any

import httpx

from extproc import envoy_config
from tollgate.config.schema import Config


def _endpoints(cluster: dict[str, Any]) -> list[tuple[str, int]]:
    assignment = cluster.get("load_assignment") or {}
    return sorted(
        (sock.get("address", ""), int(sock.get("port_value", 0)))
        for group in assignment.get("endpoints") or []
        for lb in group.get("lb_endpoints") or []
        if (sock := lb.get("endpoint", {}).get("address", {}).get("socket_address")))


def loaded_clusters(admin: str) -> dict[str, dict[str, Any]]:
    """The clusters the Envoy at `admin` runs, static and dynamic, by name."""
    out: dict[str, dict[str, Any]] = {}
    for resource in ("static_clusters", "dynamic_active_clusters"):
        r = httpx.get(f"http://{admin}/config_dump", params={"resource": resource},
                      timeout=3)
        r.raise_for_status()
        for entry in r.json().get("configs", []):
            cluster = entry.get("cluster") or {}
            out[cluster.get("name", "")] = cluster
    return out


def older_view(admin: str, cfg: Config) -> list[str] | None:
    """How the Envoy at `admin` differs from what `cfg` renders (empty: it does not), or
    None when its admin cannot be read."""
    try:
        running = loaded_clusters(admin)
    except (httpx.HTTPError, ValueError):
        return None
    differences = []
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
