"""`tollgate init`, `teams` and `projects`: the org tree that scopes keys, providers and budgets."""

from __future__ import annotations

import shutil
from collections.abc import Callable

import click

from tollgate import shipped
from tollgate.cli.common import config_path, edit, emit, fail, format_option, read_section
from tollgate.config.edit import to_yaml, write_atomic

STARTER = """\
# tollgate gateway config. Edited by `tollgate ...` commands, which keep comments and order.
# Reloaded within two seconds of a change; a broken edit keeps the last good config running.
gateway:
  header_prefix: "X-LangWatch-"
  state: "sqlite:///.tollgate/state.db"
  prices: prices.yaml          # relative to this file
  models: models.yaml          # the model catalog, for fallback across vendors
  max_body_bytes: 8388608

orgs:
  - id: {org}
    teams: []

# Provider keys are never written here: api_key_env names the environment variable.
model_providers: []

routing_policies: []

virtual_keys: []

budgets: []
"""

SHIPPED_PRICES = shipped.path(shipped.PRICES)
SHIPPED_CATALOG = shipped.path(shipped.MODELS)


@click.command()
@click.option("--org", required=True, help="Organization id, e.g. acme.")
@click.pass_context
def init(ctx: click.Context, org: str) -> None:
    """Write a starter config (and price table and model catalog) at --config; refuses to
    overwrite."""
    path = config_path(ctx)
    if path.exists():
        fail(f"{path} already exists; not overwriting it")
    prices = path.parent / "prices.yaml"
    if not prices.exists() and not SHIPPED_PRICES.exists():
        fail(f"no price table to copy; put one at {prices}")
    path.parent.mkdir(parents=True, exist_ok=True)
    # The config comes last, whole or not at all: a failed init leaves none behind.
    if not prices.exists():
        shutil.copyfile(SHIPPED_PRICES, prices)
    models = path.parent / "models.yaml"
    if not models.exists() and SHIPPED_CATALOG.exists():
        shutil.copyfile(SHIPPED_CATALOG, models)
    write_atomic(path, STARTER.format(org=org))
    click.echo(f"wrote {path}")


def _orgs(ctx: click.Context) -> list[dict]:
    return read_section(ctx, "orgs")


@click.group()
def teams() -> None:
    """Teams inside an org."""


@teams.command("create")
@click.option("--id", "team_id", required=True)
@click.option("--org", help="Defaults to the only org in the config.")
@format_option
@click.pass_context
def create_team(ctx: click.Context, team_id: str, org: str | None, fmt: str) -> None:
    with edit(ctx) as doc:
        orgs = doc.doc.get("orgs") or []
        if org is None:
            if len(orgs) != 1:
                fail("say which org with --org")
            org = orgs[0]["id"]
        node = doc.find("orgs", org)
        if node is None:
            fail(f"no org {org!r}")
        if any(t.get("id") == team_id for o in orgs for t in o.get("teams") or []):
            fail(f"team {team_id!r} already exists")
        if not node.get("teams"):
            node["teams"] = to_yaml([])
            node["teams"].fa.set_block_style()
        node["teams"].append(to_yaml({"id": team_id, "projects": []}))
    emit({"id": team_id, "org": org, "projects": []}, fmt)


@teams.command("list")
@format_option
@click.pass_context
def list_teams(ctx: click.Context, fmt: str) -> None:
    rows = [{"id": t["id"], "org": o["id"], "projects": t.get("projects") or []}
            for o in _orgs(ctx) for t in o.get("teams") or []]
    emit(rows, fmt, ["id", "org", "projects"])


def _where(doc: object, noun: str, ident: str, holds: Callable[[dict], bool]
           ) -> tuple[dict, dict]:
    """(org, team) of the team in the edited document that `holds` accepts, or the command
    stops."""
    for o in doc.doc.get("orgs") or []:  # type: ignore[attr-defined]
        for t in o.get("teams") or []:
            if holds(t):
                return o, t
    fail(f"no {noun} {ident!r}")
    raise AssertionError  # unreachable: fail() raises


def _team(doc: object, team_id: str) -> tuple[dict, dict]:
    return _where(doc, "team", team_id, lambda t: t.get("id") == team_id)


def _project(doc: object, project_id: str) -> tuple[dict, dict]:
    """(its org, its team)."""
    return _where(doc, "project", project_id, lambda t: project_id in (t.get("projects") or []))


@teams.command("update")
@click.argument("team_id")
@click.option("--org", required=True, help="Move the team, with its projects, to this org.")
@format_option
@click.pass_context
def update_team(ctx: click.Context, team_id: str, org: str, fmt: str) -> None:
    """Move a team to another org (keys, providers and budgets scoped to it follow)."""
    with edit(ctx) as doc:
        old_org, node = _team(doc, team_id)
        target = doc.find("orgs", org)
        if target is None:
            fail(f"no org {org!r}")
        if target is not old_org:
            old_org["teams"].remove(node)
            if not target.get("teams"):
                target["teams"] = to_yaml([])
                target["teams"].fa.set_block_style()
            target["teams"].append(node)
    click.echo(f"updated team {team_id}: org: {old_org['id']} -> {org}", err=True)
    emit({"id": team_id, "org": org, "projects": list(node.get("projects") or [])}, fmt)


@teams.command("delete")
@click.argument("team_id")
@click.pass_context
def delete_team(ctx: click.Context, team_id: str) -> None:
    """Delete a team with no projects that nothing is scoped to."""
    with edit(ctx) as doc:
        org, node = _team(doc, team_id)
        if node.get("projects"):
            fail(f"team {team_id!r} has projects ({', '.join(node['projects'])}): delete them "
                 "or move them to another team (`projects update ID --team T`) first")
        org["teams"].remove(node)
    click.echo(f"deleted {team_id}")


@click.group()
def projects() -> None:
    """Projects inside a team."""


@projects.command("create")
@click.option("--id", "project_id", required=True)
@click.option("--team", required=True)
@format_option
@click.pass_context
def create_project(ctx: click.Context, project_id: str, team: str, fmt: str) -> None:
    with edit(ctx) as doc:
        found = None
        for o in doc.doc.get("orgs") or []:
            for t in o.get("teams") or []:
                if project_id in (t.get("projects") or []):
                    fail(f"project {project_id!r} already exists")
                if t.get("id") == team:
                    found = (o, t)
        if found is None:
            fail(f"no team {team!r}")
        org, node = found
        if node.get("projects") is None:
            node["projects"] = to_yaml([])
        node["projects"].append(project_id)
    emit({"id": project_id, "team": team, "org": org["id"]}, fmt)


@projects.command("list")
@format_option
@click.pass_context
def list_projects(ctx: click.Context, fmt: str) -> None:
    rows = [{"id": p, "team": t["id"], "org": o["id"]}
            for o in _orgs(ctx) for t in o.get("teams") or [] for p in t.get("projects") or []]
    emit(rows, fmt, ["id", "team", "org"])


@projects.command("update")
@click.argument("project_id")
@click.option("--team", required=True, help="Move the project to this team.")
@format_option
@click.pass_context
def update_project(ctx: click.Context, project_id: str, team: str, fmt: str) -> None:
    """Move a project to another team (keys, providers and budgets scoped to it follow)."""
    with edit(ctx) as doc:
        _, old_team = _project(doc, project_id)
        org, target = _team(doc, team)
        if target is not old_team:
            old_team["projects"].remove(project_id)
            if target.get("projects") is None:
                target["projects"] = to_yaml([])
            target["projects"].append(project_id)
    click.echo(f"updated project {project_id}: team: {old_team['id']} -> {team}", err=True)
    emit({"id": project_id, "team": team, "org": org["id"]}, fmt)


@projects.command("delete")
@click.argument("project_id")
@click.pass_context
def delete_project(ctx: click.Context, project_id: str) -> None:
    """Delete a project that nothing is scoped to."""
    with edit(ctx) as doc:
        _, team = _project(doc, project_id)
        team["projects"].remove(project_id)
    click.echo(f"deleted {project_id}")
