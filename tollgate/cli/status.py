"""`tollgate status`: is what the gateways run the config on disk, and is the store there?"""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from tollgate.cli.common import config_path, format_option
from tollgate.config.load import LoadedConfig, load_config
from tollgate.config.problems import ConfigError
from tollgate.config.watch import file_digest, run_dir
from tollgate.store import StoreUnavailable, open_store
from tollgate.store.base import process_alive


def running_gateways(path: Path) -> list[dict[str, Any]]:
    """What each running gateway on this config reported; reports of dead ones are removed."""
    out = []
    for report in sorted(run_dir(path).glob("*.json")):
        try:
            doc = json.loads(report.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(doc, dict) or not process_alive(int(doc.get("pid", 0))):
            report.unlink(missing_ok=True)
            continue
        out.append(doc)
    return out


def _store_check(loaded: LoadedConfig) -> str | None:
    """Why the store the config names cannot be reached, if it cannot."""
    settings, path = loaded.config.gateway, loaded.path

    async def ping() -> None:
        store = open_store(settings.state, path, settings.spool, owner=False)
        try:
            await store.ping()
        finally:
            await store.close()

    try:
        asyncio.run(ping())
    except (StoreUnavailable, OSError) as e:
        return str(e)
    return None


def _envoy_view(gateway: dict[str, Any], loaded: LoadedConfig) -> list[str]:
    """Whether the gateway's Envoy routes as the config says (its admin is asked)."""
    from extproc.envoy_view import older_view

    admin = gateway["envoy_admin"]
    differences = older_view(admin, loaded.config)
    gateway["envoy"] = "unreachable" if differences is None else \
        "older view" if differences else "current"
    gateway["envoy_differences"] = differences or []
    if not differences:
        return []
    return [f"gateway pid {gateway['pid']}: its Envoy (admin {admin}) runs an older view of "
            f"the config: {'; '.join(differences)}. Render again and restart it, or let "
            "ext_proc keep it current (`envoy render --resources`, `serve extproc "
            "--envoy-resources`)"]


@click.command()
@format_option
@click.pass_context
def status(ctx: click.Context, fmt: str) -> None:
    """Running config vs the file on disk, the last reload error, store reachability.

    Exits 1 when a gateway serves an older config than the file, the Envoy it serves routes
    by an older one, the file is invalid, or the state store cannot be reached."""
    path = config_path(ctx)
    digest = file_digest(path)
    problems: list[str] = []
    state = store_error = file_error = None
    try:
        loaded = load_config(path)
    except ConfigError as e:
        file_error = str(e)
        problems.append(f"the config file is invalid:\n{e}")
    else:
        state, store_error = loaded.config.gateway.state, _store_check(loaded)
    if store_error:
        problems.append(f"state store unreachable: {store_error}")
    gateways = running_gateways(path)
    for g in gateways:
        g["stale"] = g.get("loaded_sha256") != digest
        if g["stale"]:
            why = g.get("last_error") or file_error or "not picked up yet"
            problems.append(f"gateway pid {g['pid']} serves the config loaded at "
                            f"{g['loaded_at']}, older than the file on disk: {why}")
        if g.get("envoy_admin") and file_error is None:
            problems += _envoy_view(g, loaded)
    try:
        mtime = datetime.fromtimestamp(path.stat().st_mtime, UTC).isoformat(timespec="seconds")
    except OSError:
        mtime = None
    doc = {"config": str(path), "file_modified_at": mtime, "file_sha256": digest,
           "file_error": file_error, "state": state, "store_error": store_error,
           "gateways": gateways, "ok": not problems}
    if fmt == "json":
        click.echo(json.dumps(doc, indent=2))
    else:
        click.echo(f"config      {path} (modified {mtime or 'unknown'})")
        click.echo(f"state       {state or '-'}: {store_error or 'reachable'}")
        if not gateways:
            click.echo("gateways    none running on this config")
        for g in gateways:
            mark = "STALE" if g["stale"] else "current"
            click.echo(f"gateway     pid {g['pid']}: {mark}, loaded {g['loaded_at']}, "
                       f"{g['reloads']} reloads, {g['reload_failures']} rejected")
            if "envoy" in g:
                click.echo(f"            envoy (admin {g['envoy_admin']}): {g['envoy']}")
            if g.get("last_error"):
                click.echo(f"            last reload error ({g['last_error_at']}):")
                for line in str(g["last_error"]).splitlines():
                    click.echo(f"              {line}")
        for p in problems:
            click.echo(f"problem: {p}", err=True)
    sys.exit(0 if not problems else 1)
