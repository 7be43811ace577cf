"""`tollgate model-providers ...` and `tollgate routing-policies ...`."""

from __future__ import annotations

import os
from typing import Any

import click

from tollgate.cli.common import (
    add_get_delete,
    append_new,
    edit,
    emit,
    fail,
    format_option,
    get_one,
    new_id,
    now_iso,
    parse_json_option,
    plain,
    rate_limit_options,
    read_section,
    report_changes,
    warn,
)
from tollgate.config.edit import to_yaml
from tollgate.config.schema import MODES
from tollgate.providers import ADAPTERS, TYPES

PROVIDER_COLUMNS = ["id", "name", "type", "scope", "base_url", "api_key_env",
                    "fallback_priority", "rate_limit"]


def _provider_fields(api_key_env: str | None, api_key_file: str | None, base_url: str | None,
                     name: str | None,
                     rpm: int | None, tpm: int | None, rpd: int | None,
                     rate_limit_mode: str | None,
                     fallback_priority: int | None, provider_config: str | None,
                     models: tuple[str, ...], connect_timeout: float | None,
                     first_byte_timeout: float | None,
                     default_service_tier: str | None) -> dict[str, Any]:
    fields: dict[str, Any] = {"name": name, "base_url": base_url, "api_key_env": api_key_env,
                              "api_key_file": api_key_file,
                              "default_service_tier": default_service_tier,
                              "fallback_priority": fallback_priority,
                              "connect_timeout": connect_timeout,
                              "first_byte_timeout": first_byte_timeout}
    limits = {k: v for k, v in (("rpm", rpm), ("tpm", tpm), ("rpd", rpd),
                                ("mode", rate_limit_mode)) if v is not None}
    if limits:
        fields["rate_limit"] = limits
    if provider_config is not None:
        fields["provider_config"] = parse_json_option(provider_config, "--provider-config")
    if models:
        fields["models"] = list(models)
    return {k: v for k, v in fields.items() if v is not None}


def provider_options(f: Any) -> Any:
    f = rate_limit_options(f)
    for decorator in reversed([
        click.option("--api-key-env", help="Environment variable holding the provider key."),
        click.option("--api-key-file", help="File holding the key (e.g. a mounted secret), "
                     "re-read when it changes; relative to the config file."),
        click.option("--rate-limit-mode", type=click.Choice(MODES),
                     help="shadow: its limits count apart and refuse nothing; what they "
                          "would have refused is recorded. `--rate-limit-mode enforce` "
                          "promotes them."),
        click.option("--base-url", help="Origin plus optional path prefix."),
        click.option("--name"),
        click.option("--fallback-priority", type=int, help="Lower is tried first."),
        click.option("--provider-config", help="JSON, e.g. {\"region\": \"us-east-1\"}"),
        click.option("--models", multiple=True, help="Model glob it serves; repeatable."),
        click.option("--connect-timeout", type=float, help="Seconds (fallback: timeout)."),
        click.option("--first-byte-timeout", type=float,
                     help="Seconds to the first response byte (fallback: timeout)."),
        click.option("--default-service-tier", help="The service tier this account serves "
                     "requests that name none at (e.g. priority); budgets hold its price."),
    ]):
        f = decorator(f)
    return f


@click.group("model-providers")
def model_providers() -> None:
    """Provider credentials (by env-var reference) and their gateway settings."""


@model_providers.command("create")
@click.option("--type", "type_", required=True,
              type=click.Choice(TYPES))
@click.option("--scope", required=True)
@click.option("--id", "provider_id")
@provider_options
@format_option
@click.pass_context
def create_provider(ctx: click.Context, type_: str, scope: str, provider_id: str | None,
                    fmt: str, **opts: Any) -> None:
    fields = _provider_fields(**opts)
    if "api_key_env" not in fields and "api_key_file" not in fields \
            and not ADAPTERS[type_].key_optional:
        fail("--api-key-env or --api-key-file is required: provider keys are referenced, "
             "never stored")
    base_url = fields.pop("base_url", None) or ADAPTERS[type_].base_url_for(
        fields.get("provider_config") or {})
    if base_url is None:
        fail(f"--base-url is required for {type_} providers")
    item = {"id": provider_id or new_id("mp"), "type": type_, "scope": scope,
            "base_url": base_url, **fields, "created_at": now_iso()}
    append_new(ctx, "model_providers", "model provider", item)
    if "api_key_env" in item and not os.environ.get(item["api_key_env"]):
        warn(f"{item['api_key_env']} is not set here; the gateway needs it in its environment")
    emit(item, fmt)


@model_providers.command("list")
@format_option
@click.pass_context
def list_providers(ctx: click.Context, fmt: str) -> None:
    emit(read_section(ctx, "model_providers"), fmt, PROVIDER_COLUMNS)


@model_providers.command("update")
@click.argument("provider_id")
@click.option("--scope")
@provider_options
@format_option
@click.pass_context
def update_provider(ctx: click.Context, provider_id: str, scope: str | None, fmt: str,
                    **opts: Any) -> None:
    fields = _provider_fields(**opts)
    if scope:
        fields["scope"] = scope
    before = get_one(ctx, "model_providers", provider_id)
    with edit(ctx) as doc:
        node = doc.find("model_providers", provider_id)
        if node is None:
            fail(f"no model provider with id {provider_id!r}")
        for k, v in fields.items():
            if k == "rate_limit" and isinstance(node.get(k), dict):
                node[k].update(v)
            else:
                node[k] = to_yaml(v)
        # One source of the key: setting one drops the other.
        for given, other in (("api_key_env", "api_key_file"), ("api_key_file", "api_key_env")):
            if given in fields:
                node.pop(other, None)
    after = get_one(ctx, "model_providers", provider_id)
    report_changes("model provider", provider_id, before, after)
    emit(after, fmt)


add_get_delete(model_providers, "model_providers", "model provider",
               "Delete a provider no routing policy uses.")


@click.group("routing-policies")
def routing_policies() -> None:
    """Ordered (or weighted) lists of providers that keys dispatch through."""


def _targets(providers: tuple[str, ...], model_maps: tuple[str, ...],
             weights: tuple[str, ...], current: list[Any] | None = None) -> list[Any]:
    """A policy's `model_providers`: `providers` in order (else the current ones), with
    their model maps and weights; maps and weights given add to or replace theirs."""
    extra: dict[str, dict[str, Any]] = {}
    for target in current or []:
        if isinstance(target, dict):
            extra[target["model_provider"]] = {k: v for k, v in target.items()
                                               if k != "model_provider"}
    order = list(providers) or [t if isinstance(t, str) else t["model_provider"]
                                for t in current or []]
    extra = {p: extra.get(p, {}) for p in order}
    for spec in model_maps:
        provider, _, mapping = spec.partition(":")
        source, _, target = mapping.partition("=")
        if not (provider and source and target) or provider not in extra:
            raise click.BadParameter(f"{spec!r}: use PROVIDER:FROM=TO with a listed provider",
                                     param_hint="--model-map")
        extra[provider]["model_map"] = {**extra[provider].get("model_map", {}), source: target}
    for spec in weights:
        provider, _, weight = spec.partition("=")
        if provider not in extra or not weight.isdigit():
            raise click.BadParameter(f"{spec!r}: use PROVIDER=N with a listed provider and a "
                                     "whole number", param_hint="--weight")
        extra[provider]["weight"] = int(weight)
    return [{"model_provider": p, **extra[p]} if extra[p] else p for p in order]


def _policy_options(f: Any) -> Any:
    for decorator in reversed([
        click.option("--strategy", type=click.Choice(["ordered", "weighted"])),
        click.option("--model-provider", "providers", multiple=True,
                     help="Provider id, in dispatch order; repeatable."),
        click.option("--model-map", "model_maps", multiple=True, metavar="PROVIDER:FROM=TO",
                     help="The model a provider serves instead, e.g. "
                          "mp_anthropic:gpt-5-mini=claude-haiku-4-5; repeatable."),
        click.option("--weight", "weights", multiple=True, metavar="PROVIDER=N",
                     help="A provider's share of first picks with --strategy weighted "
                          "(default 1; 0: only ever a fallback); repeatable."),
    ]):
        f = decorator(f)
    return f


@routing_policies.command("create")
@click.option("--scope", required=True)
@click.option("--name", required=True)
@_policy_options
@click.option("--id", "policy_id")
@format_option
@click.pass_context
def create_policy(ctx: click.Context, scope: str, name: str, strategy: str | None,
                  providers: tuple[str, ...], model_maps: tuple[str, ...],
                  weights: tuple[str, ...], policy_id: str | None, fmt: str) -> None:
    if not providers:
        raise click.UsageError("give at least one --model-provider")
    item = {"id": policy_id or new_id("rp"), "name": name, "scope": scope,
            "strategy": strategy or "ordered",
            "model_providers": _targets(providers, model_maps, weights)}
    append_new(ctx, "routing_policies", "routing policy", item)
    emit(item, fmt)


@routing_policies.command("update")
@click.argument("policy_id")
@click.option("--name")
@click.option("--scope")
@_policy_options
@format_option
@click.pass_context
def update_policy(ctx: click.Context, policy_id: str, name: str | None, scope: str | None,
                  strategy: str | None, providers: tuple[str, ...],
                  model_maps: tuple[str, ...], weights: tuple[str, ...], fmt: str) -> None:
    """Change a policy in place (keys bound to it follow). --model-provider replaces the
    list; --model-map and --weight add to the listed providers' own."""
    before = get_one(ctx, "routing_policies", policy_id)
    with edit(ctx) as doc:
        node = doc.find("routing_policies", policy_id)
        for field, value in (("name", name), ("scope", scope), ("strategy", strategy)):
            if value is not None:
                node[field] = value
        if providers or model_maps or weights:
            node["model_providers"] = to_yaml(_targets(
                providers, model_maps, weights, plain(node.get("model_providers"))))
    after = get_one(ctx, "routing_policies", policy_id)
    report_changes("routing policy", policy_id, before, after)
    emit(after, fmt)


@routing_policies.command("list")
@format_option
@click.pass_context
def list_policies(ctx: click.Context, fmt: str) -> None:
    emit(read_section(ctx, "routing_policies"), fmt,
         ["id", "name", "scope", "strategy", "model_providers"])


add_get_delete(routing_policies, "routing_policies", "routing policy",
               "Delete a policy no key is bound to.")
