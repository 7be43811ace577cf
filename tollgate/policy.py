"""Model, tool, MCP and URL policy for one virtual key: `models_allowed` globs and the
`policy_rules` groups (RE2; deny wins; a non-null allow list must match every candidate)."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass

from tollgate.candidates import Candidates, McpServer
from tollgate.config.schema import Rules, VirtualKey
from tollgate.errors import GatewayError
from tollgate.rules import matches

URL_SHOWN = 120  # characters of a refused URL in the message (data stays out of logs)


def verdict(rules: Rules, candidate: str) -> str | None:
    """The rule that refuses `candidate` (None: it passes)."""
    for pattern in rules.deny:
        if matches(pattern, candidate):
            return f"deny {pattern}"
    if rules.allow is not None and not any(matches(p, candidate) for p in rules.allow):
        return "allow list"
    return None


def _why(rule: str, rules: Rules) -> str:
    if rule.startswith("deny "):
        return f"by deny rule `{rule.removeprefix('deny ')}`"
    return f"by the allow list ({', '.join(rules.allow or []) or 'empty'}): it matches none"


@dataclass(frozen=True)
class Shadowed:
    """A refusal a shadow-mode control would have made; the request was served."""

    control: str  # policy_rules.tools, ...
    code: str
    status: int
    message: str

    def __str__(self) -> str:
        return f"{self.control} would refuse {self.status} {self.code}: {self.message}"


def resolve_model(key: VirtualKey, requested: str) -> str:
    """Apply the key's aliases, then its allowlist (on the resolved name)."""
    model = key.config.model_aliases.get(requested, requested)
    if not _in_allowlist(key, model):
        raise GatewayError(
            "model_not_allowed",
            f"Model {model!r}{_via(model, requested)} is not allowed for virtual key {key.id}; "
            f"it allows {', '.join(key.models_allowed or [])}. Edit the key's models_allowed "
            "or use an allowed model.",
            param="model", context={"model": model, "rule": "models_allowed"},
        )
    return model


def _via(model: str, requested: str | None) -> str:
    return f" (alias of {requested!r})" if requested and model != requested else ""


def check_model(key: VirtualKey, model: str, requested: str | None = None) -> None:
    rules = key.config.policy_rules.models
    rule = verdict(rules, model)
    if rule is not None:
        raise GatewayError(
            "model_not_allowed",
            f"Model {model!r}{_via(model, requested)} is refused {_why(rule, rules)} of "
            f"policy_rules.models on virtual key {key.id}. Use another model or change the "
            "key's policy_rules.",
            param="model", context={"model": model, "rule": f"models {rule}"},
        )


def _in_allowlist(key: VirtualKey, model: str) -> bool:
    if key.models_allowed is None:
        return True
    return any(fnmatch.fnmatchcase(model, pattern) for pattern in key.models_allowed)


def model_allowed(key: VirtualKey, model: str) -> bool:
    """Whether the key may call `model` (its resolved name): what GET /v1/models lists (a
    shadow rule refuses nothing)."""
    rules = key.config.policy_rules.models
    return _in_allowlist(key, model) and (rules.mode == "shadow" or
                                          verdict(rules, model) is None)


def check_tools(key: VirtualKey, tools: list[str]) -> None:
    rules = key.config.policy_rules.tools
    for name in tools:
        rule = verdict(rules, name)
        if rule is not None:
            raise GatewayError(
                "tool_not_allowed",
                f"Tool {name!r} is blocked {_why(rule, rules)} on virtual key {key.id}. "
                "Remove the tool from the request or change the key's policy_rules.",
                param="tools", context={"tool": name, "rule": rule})


def check_mcp(key: VirtualKey, servers: list[McpServer]) -> None:
    """Each server (its label and URL) and each of its tools the request allows, as
    `server/tool`. A server with no tool list exposes all its tools: refused when an allow
    list (MCP or tools) restricts what may be called."""
    policy = key.config.policy_rules
    rules = policy.mcp
    for server in servers:
        for candidate in server.candidates():
            rule = verdict(rules, candidate)
            if rule is not None:
                what = "server" if candidate in (server.label, server.url) else "tool"
                raise GatewayError(
                    "mcp_not_allowed",
                    f"MCP {what} {candidate!r} ({server.where}) is blocked {_why(rule, rules)} of "
                    f"policy_rules.mcp on virtual key {key.id}.",
                    param=server.where, context={"mcp": candidate, "rule": f"mcp {rule}"})
        if server.tools is None and (rules.allow is not None or policy.tools.allow is not None):
            which = "mcp" if rules.allow is not None else "tools"
            raise GatewayError(
                "mcp_not_allowed",
                f"MCP server {server.label or server.url!r} ({server.where}) names no allowed "
                f"tools, so the model could call every tool it has, and virtual key {key.id} "
                f"allows only listed ones (policy_rules.{which}.allow). List the tools the "
                "model may call: `allowed_tools` on a Responses mcp tool, "
                "`tool_configuration.allowed_tools` on an Anthropic MCP server.",
                param=server.where,
                context={"mcp": server.label or server.url, "rule": f"{which} allow list"})


def check_urls(key: VirtualKey, urls: list[str]) -> None:
    rules = key.config.policy_rules.urls
    for url in urls:
        rule = verdict(rules, url)
        if rule is not None:
            shown = url if len(url) <= URL_SHOWN else url[:URL_SHOWN] + "…"
            raise GatewayError(
                "url_not_allowed",
                f"URL {shown!r} is blocked {_why(rule, rules)} of policy_rules.urls on "
                f"virtual key {key.id}: the provider would fetch it for this request.",
                param="url", context={"url": shown, "rule": f"urls {rule}"})


def reaches_matter(key: VirtualKey) -> bool:
    """Whether the key has rules on what a request reaches (MCP servers, URLs), or a tool
    allow list that an MCP server without a tool list would get around."""
    rules = key.config.policy_rules
    return any(r.deny or r.allow is not None for r in (rules.mcp, rules.urls)) or \
        rules.tools.allow is not None


def check(key: VirtualKey, model: str | None, requested: str | None, tools: list[str],
          found: Candidates, shadowed: list[Shadowed]) -> None:
    """Every rule group of the key against what the request asks for and would reach. A
    shadow group's refusal (its first) goes to `shadowed`; the first enforcing group's is
    raised once every group has been looked at, so shadow decisions are recorded on refused
    requests too."""
    policy = key.config.policy_rules
    groups: list[tuple[str, Rules, Callable[[], None]]] = [
        ("models", policy.models,
         lambda: check_model(key, model, requested) if model else None),
        ("tools", policy.tools, lambda: check_tools(key, tools)),
        ("mcp", policy.mcp, lambda: check_mcp(key, found.mcp)),
        ("urls", policy.urls, lambda: check_urls(key, found.urls)),
    ]
    refused: GatewayError | None = None
    for name, rules, run in groups:
        try:
            run()
        except GatewayError as e:
            if rules.mode == "shadow":
                shadowed.append(Shadowed(f"policy_rules.{name}", e.code, e.status, e.message))
            elif refused is None:
                refused = e
    if refused is not None:
        raise refused
