"""The org tree: where a scope sits, and which scopes sit above it."""

from __future__ import annotations

from dataclasses import dataclass

from tollgate.config.schema import Config, parse_scope


@dataclass(frozen=True)
class Lineage:
    org: str | None
    team: str | None
    project: str | None

    def scopes(self) -> set[str]:
        """This scope and every scope above it: project -> team -> org."""
        return {f"{kind}:{ident}" for kind, ident in (
            ("ORG", self.org), ("TEAM", self.team), ("PROJECT", self.project)) if ident}


def lineage(cfg: Config, scope: str) -> Lineage:
    kind, ident = parse_scope(scope)
    for org in cfg.orgs:
        if kind == "ORG" and ident == org.id:
            return Lineage(org.id, None, None)
        for team in org.teams:
            if kind == "TEAM" and ident == team.id:
                return Lineage(org.id, team.id, None)
            if kind == "PROJECT" and ident in team.projects:
                return Lineage(org.id, team.id, ident)
    return Lineage(ident if kind == "ORG" else None, ident if kind == "TEAM" else None,
                   ident if kind == "PROJECT" else None)
