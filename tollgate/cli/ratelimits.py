"""`tollgate rate-limits status`: each key's and provider's windows as the store holds them."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import click

from tollgate import ratelimit
from tollgate.cli.common import emit, fail, format_option
from tollgate.cli.spend import with_store
from tollgate.config.load import LoadedConfig
from tollgate.store import Store

COLUMNS = ["scope", "id", "dimension", "limit", "used", "remaining", "resets_at"]


@click.group("rate-limits")
def rate_limits() -> None:
    """RPM, TPM and RPD caps on virtual keys and model providers."""


@rate_limits.command("status")
@click.option("--vk", "key_id", help="Only this virtual key.")
@click.option("--provider", "provider_id", help="Only this model provider.")
@format_option
@click.pass_context
def status(ctx: click.Context, key_id: str | None, provider_id: str | None, fmt: str) -> None:
    """Usage and remaining capacity per window: RPM and TPM over the last 60 s, RPD over
    the UTC day. `resets_at` is when the window is back to its full limit."""

    async def read(store: Store, loaded: LoadedConfig) -> list[dict[str, Any]]:
        cfg, now = loaded.config, datetime.now(UTC)
        if key_id and not any(k.id == key_id for k in cfg.virtual_keys):
            fail(f"no virtual key with id {key_id!r}")
        if provider_id and not any(p.id == provider_id for p in cfg.model_providers):
            fail(f"no model provider with id {provider_id!r}")
        limits: list[ratelimit.Limit] = []
        if not provider_id:
            for key in cfg.virtual_keys:
                if key_id in (None, key.id):
                    limits += ratelimit.key_limits(key, now)
        if not key_id:
            for provider in cfg.model_providers:
                if provider_id in (None, provider.id):
                    limits += ratelimit.provider_limits(provider, now)
        clock = time.time()
        windows = await store.windows(limits)
        return [{
            "scope": "virtual_key" if lim.scope == "key" else "model_provider",
            "id": lim.owner, "dimension": lim.dimension, "limit": lim.limit, "used": w.used,
            "remaining": max(0, lim.limit - w.used),
            "resets_at": ratelimit.resets_at(lim, w, clock).isoformat(timespec="seconds"),
        } for lim, w in zip(limits, windows, strict=True)]

    emit(with_store(ctx, read), fmt, COLUMNS)
