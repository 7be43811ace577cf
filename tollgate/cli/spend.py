"""`tollgate gateway-budgets ...` and `tollgate spend report`."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import click

from tollgate import budgets as budget_rules
from tollgate.cli.common import (
    add_get_delete,
    append_new,
    config_path,
    edit,
    emit,
    fail,
    format_option,
    get_one,
    money,
    new_id,
    read_section,
    report_changes,
)
from tollgate.config.edit import to_yaml
from tollgate.config.load import load_config
from tollgate.config.problems import ConfigError
from tollgate.config.schema import MODES
from tollgate.ledger import REPORT_DIMENSIONS, report, shadow_report, to_csv
from tollgate.store import Store, StoreUnavailable, open_store

# One spelling with keys, providers and policies: KIND:target.
SCOPES = {"ORG": "org", "TEAM": "team", "PROJECT": "project", "VK": "virtual_key",
          "PRINCIPAL": "principal"}
SPELLING = {field: kind for kind, field in SCOPES.items()}
SCOPE_HELP = "ORG:id, TEAM:id, PROJECT:id, VK:key-id or PRINCIPAL:who (e.g. TEAM:team_eng)."


def _scope(scope: str, targets: dict[str, str | None]) -> tuple[str, str]:
    """(budget field, target) from --scope KIND:target; the older `--scope team --team x`
    still works, with a note."""
    kind, sep, target = scope.partition(":")
    if sep:
        field = SCOPES.get(kind.upper())
        if field is None or not target:
            raise click.BadParameter(f"{scope!r}: use {SCOPE_HELP}", param_hint="--scope")
        return field, target
    field = {"vk": "virtual_key", "virtual_key": "virtual_key"}.get(scope.lower(),
                                                                     scope.lower())
    if field not in SPELLING:
        raise click.BadParameter(f"{scope!r}: use {SCOPE_HELP}", param_hint="--scope")
    target = targets.get(field)
    if not target:
        fail(f"--scope {scope} needs --{'vk' if field == 'virtual_key' else field} "
             f"(or write --scope {SPELLING[field]}:<id>)")
    click.echo(f"note: --scope {SPELLING[field]}:{target} is the spelling for this "
               "(the one keys and providers use)", err=True)
    return field, target


def shown_scope(budget: Any) -> str:
    return f"{SPELLING[budget.scope]}:{budget.target}"
WINDOWS = ["minute", "hour", "day", "week", "month", "total"]


def with_store[T](ctx: click.Context, work: Callable[[Store, Any], Awaitable[T]]) -> T:
    """Run `work` against the gateway's state store (as a reader: no reservations reset)."""
    try:
        loaded = load_config(config_path(ctx))
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    settings = loaded.config.gateway

    async def run() -> T:
        store = open_store(settings.state, loaded.path, settings.spool, owner=False)
        try:
            return await work(store, loaded)
        finally:
            await store.close()

    try:
        return asyncio.run(run())
    except StoreUnavailable as e:
        raise click.ClickException(f"state store unavailable: {e}") from None


@click.group("gateway-budgets")
def gateway_budgets() -> None:
    """Spend limits on an org, team, project, virtual key or principal."""


UNSEEN_HELP = ("Requests that refer to input the gateway cannot see (previous_response_id, "
               "file ids, image URLs): input tokens to reserve for it, or 'refuse'.")


class UnseenInput(click.ParamType):
    name = "TOKENS|refuse"

    def convert(self, value: Any, param: Any, ctx: Any) -> int | str:
        if value == "refuse" or isinstance(value, int):
            return value
        if str(value).isdigit():
            return int(value)
        self.fail(f"{value!r} is neither a number of tokens nor 'refuse'", param, ctx)


MODE_HELP = ("shadow: count in its own counter and refuse nothing; what it would have "
             "refused is recorded (ledger rows' shadow, tollgate_shadow_decisions_total).")
ON_BREACH_HELP = ("block: refuse what could pass the limit; warn: only count and flag; cap: "
                  "lower a request's output cap to what remains (refused below "
                  "--min-output-tokens).")


@gateway_budgets.command("create")
@click.option("--name", required=True)
@click.option("--scope", required=True, metavar="KIND:ID", help=SCOPE_HELP)
@click.option("--org", hidden=True)
@click.option("--team", hidden=True)
@click.option("--project", hidden=True)
@click.option("--vk", "virtual_key", hidden=True)
@click.option("--principal", hidden=True)
@click.option("--window", type=click.Choice(WINDOWS), default="month", show_default=True,
              help="Calendar window in UTC, or total.")
@click.option("--limit", type=float, required=True, help="USD.")
@click.option("--on-breach", type=click.Choice(["block", "warn", "cap"]), default="block",
              show_default=True, help=ON_BREACH_HELP)
@click.option("--warn-at", type=float, default=0.8, show_default=True,
              help="Fraction of the limit that adds the Budget-Warning header.")
@click.option("--min-output-tokens", type=click.IntRange(min=1),
              help="With --on-breach cap: the smallest output cap it sets (default 256).")
@click.option("--unseen-input", type=UnseenInput(), help=UNSEEN_HELP)
@click.option("--model-provider", help="Count only spend through this provider.")
@click.option("--mode", type=click.Choice(MODES), default="enforce",
              show_default=True, help=MODE_HELP)
@click.option("--id", "budget_id")
@format_option
@click.pass_context
def create(ctx: click.Context, name: str, scope: str, window: str, limit: float,
           on_breach: str, warn_at: float, min_output_tokens: int | None,
           unseen_input: int | str | None, model_provider: str | None, mode: str,
           budget_id: str | None, fmt: str, **targets: str | None) -> None:
    field, target = _scope(scope, targets)
    item: dict[str, Any] = {"id": budget_id or new_id("b"), "name": name, "scope": field,
                            field: target, "window": window, "limit": limit,
                            "on_breach": on_breach}
    if warn_at != 0.8:
        item["warn_at"] = warn_at
    if min_output_tokens is not None:
        item["min_output_tokens"] = min_output_tokens
    if unseen_input is not None:
        item["unseen_input"] = unseen_input
    if model_provider:
        item["model_provider"] = model_provider
    if mode != "enforce":
        item["mode"] = mode
    append_new(ctx, "budgets", "budget", item)
    emit(item, fmt)


@gateway_budgets.command("update")
@click.argument("budget_id")
@click.option("--name")
@click.option("--limit", type=float, help="USD.")
@click.option("--on-breach", type=click.Choice(["block", "warn", "cap"]), help=ON_BREACH_HELP)
@click.option("--warn-at", type=float,
              help="Fraction of the limit that adds the Budget-Warning header.")
@click.option("--min-output-tokens", type=click.IntRange(min=1),
              help="With --on-breach cap: the smallest output cap it sets.")
@click.option("--unseen-input", type=UnseenInput(), help=UNSEEN_HELP)
@click.option("--mode", type=click.Choice(MODES), help=MODE_HELP)
@format_option
@click.pass_context
def update(ctx: click.Context, budget_id: str, fmt: str, **fields: Any) -> None:
    """Change a budget's limit, name, breach rule or mode (`--mode enforce` promotes a
    shadow budget); its spend so far is kept."""
    changed = {k: v for k, v in fields.items() if v is not None}
    if not changed:
        fail("nothing to change: give --limit, --name, --on-breach, --warn-at, "
             "--min-output-tokens, --unseen-input or --mode")
    before = get_one(ctx, "budgets", budget_id)
    with edit(ctx) as doc:
        node = doc.find("budgets", budget_id)
        for k, v in changed.items():
            node[k] = to_yaml(v)
    after = get_one(ctx, "budgets", budget_id)
    report_changes("budget", budget_id, before, after)
    emit(after, fmt)


@gateway_budgets.command("list")
@format_option
@click.pass_context
def list_(ctx: click.Context, fmt: str) -> None:
    rows = [{**b, "target": b.get(b["scope"])} for b in read_section(ctx, "budgets")]
    if fmt == "table":
        rows = [{**r, "scope": f"{SPELLING.get(r['scope'], r['scope'])}:{r['target']}",
                 "limit": money(r["limit"])} for r in rows]
    emit(rows, fmt, ["id", "name", "scope", "window", "limit", "on_breach"])


add_get_delete(gateway_budgets, "budgets", "budget")


@gateway_budgets.command("status")
@click.argument("budget_id", required=False)
@format_option
@click.pass_context
def status(ctx: click.Context, budget_id: str | None, fmt: str) -> None:
    """Spend in each budget's current window."""
    now = datetime.now(UTC)

    async def work(store: Store, loaded: Any) -> list[dict[str, Any]]:
        chosen = [b for b in loaded.config.budgets if budget_id in (None, b.id)]
        if budget_id and not chosen:
            fail(f"no budget with id {budget_id!r}")
        holds = [budget_rules.current_hold(b, now) for b in chosen]
        counters = await store.counters(holds)
        return [{
            "id": h.budget.id, "name": h.budget.name,
            "scope": shown_scope(h.budget), "window": h.window_key,
            "limit_usd": h.budget.limit, "spent_usd": c.spent / budget_rules.MICROS,
            "reserved_usd": c.reserved / budget_rules.MICROS,
            "used": f"{c.committed / h.limit_micros:.1%}" if h.limit_micros else "-",
            "on_breach": h.budget.on_breach, "mode": h.budget.mode,
            "resets_at": h.resets_at.isoformat() if h.resets_at else None,
        } for h, c in zip(holds, counters, strict=True)]

    rows = with_store(ctx, work)
    if fmt == "table":
        rows = [{**r, **{k: money(r[k]) for k in ("limit_usd", "spent_usd", "reserved_usd")}}
                for r in rows]
    emit(rows[0] if budget_id else rows, fmt,
         None if budget_id else ["id", "name", "scope", "window", "limit_usd", "spent_usd",
                                 "reserved_usd", "used", "on_breach", "mode", "resets_at"])


@click.group("spend")
def spend() -> None:
    """Who spent what."""


@spend.command("report")
@click.option("--by", type=click.Choice(list(REPORT_DIMENSIONS)), default="principal",
              show_default=True)
@click.option("--window", type=click.Choice(WINDOWS), default="month", show_default=True,
              help="The current calendar window (UTC), or total.")
@click.option("--period", "period_key", metavar="KEY",
              help="A past (or the current) window by its key: 2026-11, 2026-W48, "
                   "2026-11-30, 2026-11-30T14 (UTC). Implies its --window.")
@click.option("--shadow", is_flag=True,
              help="What shadow-mode controls would have refused instead, by control, key "
                   "and principal.")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table",
              show_default=True)
@click.pass_context
def spend_report(ctx: click.Context, by: str, window: str, period_key: str | None,
                 shadow: bool, fmt: str) -> None:
    """Spend grouped by principal, team, project, virtual key, model, provider or price tier
    (the service tier that served each request, and long context)."""
    if period_key is None:
        period = budget_rules.window(window, datetime.now(UTC))
    else:
        try:
            window, period = budget_rules.window_named(period_key)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--period") from None

    async def work(store: Store, loaded: Any) -> list[dict[str, Any]]:
        rows = await store.rows(since=period.start, until=period.end)
        return shadow_report(rows) if shadow else report(rows, by)

    rows = with_store(ctx, work)
    if fmt == "csv":
        click.echo(to_csv(rows), nl=False)
    elif fmt == "json":
        click.echo(json.dumps({"window": window, "period": period.key,
                               "by": "shadow" if shadow else by, "rows": rows}, indent=2))
    elif shadow:
        click.echo(f"shadow decisions, {window} {period.key} (UTC)", err=True)
        emit(rows, "table", ["control", "would_refuse", "requests", "key", "key_name",
                             "principal"])
    else:
        click.echo(f"{by} spend, {window} {period.key} (UTC)", err=True)
        emit([{**r, "cost_usd": money(r["cost_usd"])} for r in rows], "table",
             [by, "requests", "input_tokens", "cached_input_tokens", "output_tokens",
              "cost_usd", "estimated"])
