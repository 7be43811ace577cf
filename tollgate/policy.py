"""Model and tool policy for one virtual key."""

from __future__ import annotations

import fnmatch

from tollgate.config.schema import ToolRules, VirtualKey
from tollgate.errors import GatewayError
from tollgate.rules import matches


def resolve_model(key: VirtualKey, requested: str) -> str:
    """Apply the key's aliases, then its allowlist (on the resolved name)."""
    model = key.config.model_aliases.get(requested, requested)
    if not model_allowed(key, model):
        via = f" (alias of {requested!r})" if model != requested else ""
        raise GatewayError(
            "model_not_allowed",
            f"Model {model!r}{via} is not allowed for virtual key {key.id}; it allows "
            f"{', '.join(key.models_allowed or [])}. Edit the key's models_allowed or use an "
            "allowed model.",
            param="model", context={"model": model, "rule": "models_allowed"},
        )
    return model


def model_allowed(key: VirtualKey, model: str) -> bool:
    if key.models_allowed is None:
        return True
    return any(fnmatch.fnmatchcase(model, pattern) for pattern in key.models_allowed)


def check_tools(key: VirtualKey, tools: list[str]) -> None:
    """Deny rules win; a non-null allow list must match every declared tool."""
    rules: ToolRules = key.config.policy_rules.tools
    for name in tools:
        for pattern in rules.deny:
            if matches(pattern, name):
                raise GatewayError(
                    "tool_not_allowed",
                    f"Tool {name!r} is blocked by deny rule `{pattern}` on virtual key {key.id}. "
                    "Remove the tool from the request or change the key's policy_rules.",
                    param="tools", context={"tool": name, "rule": f"deny {pattern}"},
                )
        if rules.allow is not None and not any(matches(p, name) for p in rules.allow):
            raise GatewayError(
                "tool_not_allowed",
                f"Tool {name!r} matches none of the allow rules on virtual key {key.id} "
                f"({', '.join(rules.allow) or 'empty allow list'}).",
                param="tools", context={"tool": name, "rule": "allow list"},
            )
