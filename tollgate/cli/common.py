"""Shared CLI plumbing: the config path, output formats, ids, durations, errors."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click
from ulid import ULID

from tollgate.config.edit import AlreadyThere, Document, append_item, editing
from tollgate.config.lint import idle, warnings
from tollgate.config.load import default_config_path
from tollgate.config.problems import ConfigError

format_option = click.option("--format", "fmt", type=click.Choice(["table", "json"]),
                             default="table", show_default=True, help="Output format.")


def config_path(ctx: click.Context) -> Path:
    root = ctx.find_root()
    return Path(root.params.get("config") or default_config_path())


def new_id(prefix: str) -> str:
    return f"{prefix}_{ULID()}"


def now_iso() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


_DURATION = re.compile(r"^(\d+)([smhdw])$")


def parse_duration(text: str) -> timedelta:
    m = _DURATION.match(text.strip())
    if not m:
        raise click.BadParameter(f"{text!r}: use a number and a unit, e.g. 90m, 12h, 30d, 2w")
    unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}[m.group(2)]
    return timedelta(**{unit: int(m.group(1))})


def iso_after(delta: timedelta) -> str:
    ts = datetime.now(UTC).replace(microsecond=0) + delta
    return ts.isoformat().replace("+00:00", "Z")


def parse_json_option(text: str | None, name: str) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError as e:
        raise click.BadParameter(f"not valid JSON: {e}", param_hint=name) from None


def _existing(ctx: click.Context) -> Path:
    path = config_path(ctx)
    if not path.exists():
        raise click.ClickException(f"{path} does not exist; create it with `tollgate init`.")
    return path


@contextmanager
def _invalid_refused() -> Iterator[None]:
    try:
        yield
    except ConfigError as e:
        raise click.ClickException(f"the change would make the config invalid:\n{e}") from None


@contextmanager
def edit(ctx: click.Context) -> Iterator[Document]:
    """An atomic, validated edit of the config; a rejected edit leaves the file untouched."""
    path = _existing(ctx)
    with _invalid_refused(), editing(path) as doc:
        yield doc
    _warn_idle(doc)


def _warn_idle(doc: Document) -> None:
    """Say which controls the edit left with nothing to do (that were not idle before)."""
    if doc.after is None:
        return
    before = set(idle(doc.before)) if doc.before is not None else set()
    new = [found for found in idle(doc.after) if found not in before]
    if new:  # (their lines: the document's as parsed for the edit, or else the file's now)
        for line in warnings(doc.after, doc.doc, only=new):
            warn(line)


def plain(node: Any) -> Any:
    """ruamel nodes -> plain JSON-able data."""
    if isinstance(node, dict):
        return {str(k): plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [plain(v) for v in node]
    if isinstance(node, datetime):
        return node.isoformat()
    return node


def emit(obj: dict[str, Any] | list[dict[str, Any]], fmt: str,
         columns: list[str] | None = None) -> None:
    if fmt == "json":
        click.echo(json.dumps(plain(obj), indent=2))
        return
    rows = obj if isinstance(obj, list) else None
    if rows is None:
        width = max((len(k) for k in obj), default=0)
        for k, v in plain(obj).items():
            shown = json.dumps(v) if isinstance(v, dict | list) else v
            click.echo(f"{k:<{width}}  {'' if shown is None else shown}")
        return
    columns = columns or sorted({k for r in rows for k in r})
    table = [[_cell(plain(r).get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in table]) for i, c in enumerate(columns)]
    click.echo("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in table:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, list):
        return ",".join(str(x) for x in v)
    if isinstance(v, dict):
        return json.dumps(v)
    return str(v)


def merge_patch(target: Any, patch: Any) -> Any:
    """JSON Merge Patch (RFC 7386): objects merge key by key, null removes a key, anything
    else (lists included) replaces."""
    if not isinstance(patch, dict):
        return patch
    merged = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = merge_patch(merged.get(key), value)
    return merged


def changes(before: Any, after: Any, path: str = "") -> list[str]:
    """`field: old -> new` for each leaf that differs (lists compared whole)."""
    if isinstance(before, dict) and isinstance(after, dict):
        return [line for key in sorted(set(before) | set(after), key=str)
                for line in changes(before.get(key), after.get(key),
                                    f"{path}.{key}" if path else str(key))]
    if before == after:
        return []

    def shown(v: Any) -> str:
        return "(unset)" if v is None else json.dumps(v, default=str)

    return [f"{path}: {shown(before)} -> {shown(after)}"]


def report_changes(noun: str, ident: str, before: dict[str, Any], after: dict[str, Any]
                   ) -> None:
    """What an update changed, on stderr (stdout keeps the object, for scripts)."""
    lines = changes(before, after)
    click.echo(f"updated {noun} {ident}: " + ("no changes" if not lines else
               "\n  " + "\n  ".join(lines)), err=True)


def money(usd: float | None) -> str:
    """An amount as people read one: $0.000080, $1,234.500000 (to the micro-dollar the
    ledger keeps)."""
    return "-" if usd is None else f"${usd:,.6f}"


def fail(message: str) -> None:
    raise click.ClickException(message)


def warn(message: str) -> None:
    click.echo(f"warning: {message}", err=True)


def append_new(ctx: click.Context, section: str, noun: str, item: dict[str, Any]) -> None:
    """Add `item` to `section`, refusing an id that is already there."""
    path = _existing(ctx)
    try:
        with _invalid_refused():
            doc = append_item(path, section, item)
    except AlreadyThere:
        fail(f"{noun} {item['id']!r} already exists")
    _warn_idle(doc)


def read_section(ctx: click.Context, section: str) -> list[dict[str, Any]]:
    from tollgate.config.fastyaml import read_data

    try:
        doc = read_data(config_path(ctx)) or {}
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    return [plain(item) for item in doc.get(section) or []]


def get_one(ctx: click.Context, section: str, ident: str) -> dict[str, Any]:
    item = next((i for i in read_section(ctx, section) if i.get("id") == ident), None)
    if item is None:
        noun = {"budgets": "budget", "routing_policies": "routing policy"}.get(
            section, section.rstrip("s").replace("_", " "))
        fail(f"no {noun} with id {ident!r}")
    return item  # type: ignore[return-value]


def add_get_delete(group: click.Group, section: str, noun: str, help_delete: str = "") -> None:
    """`get ID` and `delete ID` for one config section."""

    @group.command("get", help=f"Show one {noun}.")
    @click.argument("ident")
    @format_option
    @click.pass_context
    def get(ctx: click.Context, ident: str, fmt: str) -> None:
        emit(get_one(ctx, section, ident), fmt)

    @group.command("delete", help=help_delete or f"Delete a {noun}.")
    @click.argument("ident")
    @click.pass_context
    def delete(ctx: click.Context, ident: str) -> None:
        with edit(ctx) as doc:
            if not doc.remove(section, ident):
                fail(f"no {noun} with id {ident!r}")
        click.echo(f"deleted {ident}")


def rate_limit_options(f: Any) -> Any:
    for decorator in reversed([
        click.option("--rpm", type=click.IntRange(min=1), help="Requests per minute."),
        click.option("--tpm", type=click.IntRange(min=1), help="Tokens per minute."),
        click.option("--rpd", type=click.IntRange(min=1), help="Requests per UTC day."),
    ]):
        f = decorator(f)
    return f
