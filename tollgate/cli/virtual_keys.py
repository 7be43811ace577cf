"""`tollgate virtual-keys ...`: secrets are shown once and stored as HMAC-SHA256 hashes."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import click
from pydantic import ValidationError

from tollgate.cli.common import (
    append_new,
    config_path,
    edit,
    emit,
    fail,
    format_option,
    get_one,
    iso_after,
    merge_patch,
    new_id,
    now_iso,
    parse_duration,
    parse_json_option,
    plain,
    rate_limit_options,
    read_section,
    report_changes,
)
from tollgate.config.fastyaml import read_data
from tollgate.config.schema import KeyConfig, PolicyRules, parse_scope
from tollgate.keys import (
    PepperMismatch,
    display_prefix,
    generate_secret,
    hash_secret,
    load_pepper,
    pepper_fingerprint,
)

COLUMNS = ["id", "name", "env", "scope", "principal", "status", "routing_policy",
           "models_allowed", "secret_prefix", "expires_at"]


def _public(item: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in item.items() if k not in ("secret_hash", "previous_secrets")}
    if item.get("previous_secrets"):
        out["previous_secrets_valid_until"] = [p["expires_at"] for p in item["previous_secrets"]]
    return out


def _pepper(ctx: click.Context) -> tuple[bytes, bool]:
    """The pepper the config's keys are made with (refused if it is not theirs), and whether
    the config names it already."""
    path = config_path(ctx)
    gateway = (read_data(path) or {}).get("gateway") or {}
    try:
        return load_pepper(gateway.get("pepper_env", "TOLLGATE_KEY_PEPPER"), path,
                           gateway.get("pepper_fingerprint")), \
            bool(gateway.get("pepper_fingerprint"))
    except PepperMismatch as e:
        raise click.ClickException(str(e)) from None


def _record_pepper(doc: Any, pepper: bytes) -> None:
    """Name the pepper a key was made with in the config, so a gateway with another one
    refuses to start rather than refuse every key."""
    gateway = doc.doc.get("gateway")
    if gateway is not None and not gateway.get("pepper_fingerprint"):
        gateway["pepper_fingerprint"] = pepper_fingerprint(pepper)


def _key_config(text: str | None) -> dict[str, Any] | None:
    raw = parse_json_option(text, "--config-json")
    if raw is None:
        return None
    try:
        return KeyConfig.model_validate(raw).model_dump(mode="json", exclude_defaults=True)
    except ValidationError as e:
        raise click.BadParameter(str(e), param_hint="--config-json") from None


def _with_limits(config: dict[str, Any] | None, rpm: int | None, tpm: int | None,
                 rpd: int | None) -> dict[str, Any] | None:
    """The key's config with --rpm/--tpm/--rpd set in `rate_limits` (others kept)."""
    given = {k: v for k, v in (("rpm", rpm), ("tpm", tpm), ("rpd", rpd)) if v is not None}
    if not given:
        return config
    config = dict(config or {})
    config["rate_limits"] = {**(config.get("rate_limits") or {}), **given}
    return config


POLICY_GROUPS = tuple(PolicyRules.model_fields)


def _with_policy(ctx: click.Context, key_id: str, config_json: str | None,
                 policy_json: str | None, mode: str | None, replace: bool) -> str | None:
    """--policy-json and --shadow/--enforce as one more merge patch on top of --config-json."""
    if policy_json is None and mode is None:
        return config_json
    if replace:
        raise click.UsageError("--replace replaces the whole config: put the rules in it")
    rules = parse_json_option(policy_json, "--policy-json") if policy_json else {}
    if not isinstance(rules, dict) or set(rules) - set(POLICY_GROUPS):
        raise click.BadParameter(f"an object of rule groups: {', '.join(POLICY_GROUPS)}",
                                 param_hint="--policy-json")
    patch: dict[str, Any] = {"policy_rules": rules}
    if mode is not None:
        current = (get_one(ctx, "virtual_keys", key_id).get("config") or {})
        named = list(rules) or [g for g in POLICY_GROUPS
                                if g in (current.get("policy_rules") or {})]
        for group in named:
            rules[group] = {**(rules.get(group) or {}), "mode": mode}
        if not policy_json and current.get("rate_limits"):
            patch["rate_limits"] = {"mode": mode}
    base = parse_json_option(config_json, "--config-json") if config_json else {}
    return json.dumps(merge_patch(base, patch))


def _as_utc(value: object) -> datetime:
    ts = value if isinstance(value, datetime) else datetime.fromisoformat(
        str(value).replace("Z", "+00:00"))
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)


@click.group("virtual-keys")
def virtual_keys() -> None:
    """Create and manage virtual keys."""


@virtual_keys.command()
@click.option("--name", required=True)
@click.option("--env", type=click.Choice(["live", "test"]), default="live", show_default=True)
@click.option("--scope", required=True, help="ORG:<id>, TEAM:<id> or PROJECT:<id>")
@click.option("--principal", help="Engineer or service the spend is attributed to.")
@click.option("--routing-policy")
@click.option("--models-allowed", multiple=True, help="Glob, repeatable (gpt-5*, claude-*).")
@click.option("--config-json", help='e.g. {"model_aliases": {"fast": "gpt-5-mini"}}')
@click.option("--expires-in", help="e.g. 30d, 12h")
@rate_limit_options
@format_option
@click.pass_context
def create(ctx: click.Context, name: str, env: str, scope: str, principal: str | None,
           routing_policy: str | None, models_allowed: tuple[str, ...],
           config_json: str | None, expires_in: str | None, rpm: int | None, tpm: int | None,
           rpd: int | None, fmt: str) -> None:
    """Mint a key. The secret is printed once and never stored."""
    try:
        parse_scope(scope)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--scope") from None
    secret = generate_secret(env)
    pepper, named = _pepper(ctx)
    item: dict[str, Any] = {
        "id": new_id("vk"), "name": name, "env": env, "scope": scope,
        "principal": principal, "secret_hash": hash_secret(secret, pepper),
        "secret_prefix": display_prefix(secret), "status": "active", "created_at": now_iso(),
        "expires_at": iso_after(parse_duration(expires_in)) if expires_in else None,
        "routing_policy": routing_policy,
        "models_allowed": list(models_allowed) or None,
        "config": _with_limits(_key_config(config_json), rpm, tpm, rpd),
    }
    item = {k: v for k, v in item.items() if v is not None}
    if named:
        append_new(ctx, "virtual_keys", "virtual key", item)
    else:
        with edit(ctx) as doc:
            doc.append("virtual_keys", item)
            _record_pepper(doc, pepper)
    emit({**_public(item), "secret": secret}, fmt)


@virtual_keys.command("list")
@format_option
@click.pass_context
def list_(ctx: click.Context, fmt: str) -> None:
    """List keys (never their secrets)."""
    emit([_public(i) for i in read_section(ctx, "virtual_keys")], fmt, COLUMNS)


@virtual_keys.command()
@click.argument("key_id")
@format_option
@click.pass_context
def get(ctx: click.Context, key_id: str, fmt: str) -> None:
    """Show one key."""
    emit(_public(get_one(ctx, "virtual_keys", key_id)), fmt)


def _mutate(ctx: click.Context, key_id: str, fmt: str, **changes: Any) -> None:
    with edit(ctx) as doc:
        node = doc.find("virtual_keys", key_id)
        if node is None:
            fail(f"no virtual key with id {key_id!r}")
        for k, v in changes.items():
            if v is None:
                node.pop(k, None)
            else:
                node[k] = v
    emit(_public(get_one(ctx, "virtual_keys", key_id)), fmt)


@virtual_keys.command()
@click.argument("key_id")
@click.option("--name")
@click.option("--principal")
@click.option("--routing-policy", help="Policy id; an empty string unbinds the key.")
@click.option("--models-allowed", multiple=True, help="Replaces the allowlist; repeatable.")
@click.option("--allow-all-models", is_flag=True, help="Remove the allowlist.")
@click.option("--config-json", help="Merged into the key's config (JSON Merge Patch: objects "
              "merge, null removes a field, lists replace).")
@click.option("--replace", is_flag=True, help="--config-json replaces the whole config.")
@click.option("--policy-json", help="Merged into the key's policy_rules, e.g. "
              '\'{"urls": {"deny": ["host:example.com"]}}\'.')
@click.option("--shadow", "mode", flag_value="shadow",
              help="The rule groups in --policy-json (or, without it, every group and the "
                   "key's rate limits) take mode: shadow.")
@click.option("--enforce", "mode", flag_value="enforce",
              help="Likewise mode: enforce: promotes shadow controls in one command.")
@click.option("--expires-in")
@rate_limit_options
@format_option
@click.pass_context
def update(ctx: click.Context, key_id: str, name: str | None, principal: str | None,
           routing_policy: str | None, models_allowed: tuple[str, ...], allow_all_models: bool,
           config_json: str | None, replace: bool, policy_json: str | None, mode: str | None,
           expires_in: str | None, rpm: int | None, tpm: int | None, rpd: int | None,
           fmt: str) -> None:
    """Change a key's settings; the secret stays the same. Prints what changed (stderr)."""
    from tollgate.config.edit import to_yaml

    if replace and config_json is None:
        raise click.UsageError("--replace goes with --config-json")
    config_json = _with_policy(ctx, key_id, config_json, policy_json, mode, replace)
    before = _public(get_one(ctx, "virtual_keys", key_id))
    with edit(ctx) as doc:
        node = doc.find("virtual_keys", key_id)
        if node is None:
            fail(f"no virtual key with id {key_id!r}")
        if name is not None:
            node["name"] = name
        if principal is not None:
            node["principal"] = principal
        if routing_policy is not None:
            if routing_policy:
                node["routing_policy"] = routing_policy
            else:
                node.pop("routing_policy", None)
        if models_allowed:
            node["models_allowed"] = to_yaml(list(models_allowed))
        elif allow_all_models:
            node.pop("models_allowed", None)
        if config_json is not None:
            patch = parse_json_option(config_json, "--config-json")
            merged = patch if replace else merge_patch(plain(node.get("config")) or {}, patch)
            config = _key_config(json.dumps(merged)) if merged is not None else None
            if config:
                node["config"] = to_yaml(config)
            else:
                node.pop("config", None)
        limited = _with_limits(node.get("config"), rpm, tpm, rpd)
        if limited is not node.get("config"):
            node["config"] = to_yaml(limited)
        if expires_in is not None:
            node["expires_at"] = iso_after(parse_duration(expires_in))
    after = _public(get_one(ctx, "virtual_keys", key_id))
    report_changes("virtual key", key_id, before, after)
    emit(after, fmt)


@virtual_keys.command()
@click.argument("key_id")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation (scripts).")
@format_option
@click.pass_context
def revoke(ctx: click.Context, key_id: str, yes: bool, fmt: str) -> None:
    """Permanently stop a key (running gateways refuse it within two seconds). Asks first,
    unless --yes: a revoked key cannot be enabled again (`disable` pauses one)."""
    key = get_one(ctx, "virtual_keys", key_id)
    if not yes:
        click.confirm(f"Revoke virtual key {key_id} ({key.get('name')}, "
                      f"{key.get('principal') or 'no principal'})? Its holders are refused "
                      "from now on, and it cannot be enabled again", abort=True, err=True)
    _mutate(ctx, key_id, fmt, status="revoked")


def _set_status(ctx: click.Context, key_id: str, fmt: str, status: str,
                if_revoked: str) -> None:
    if get_one(ctx, "virtual_keys", key_id).get("status") == "revoked":
        fail(f"virtual key {key_id} is revoked; {if_revoked}")
    _mutate(ctx, key_id, fmt, status=status)


@virtual_keys.command()
@click.argument("key_id")
@format_option
@click.pass_context
def disable(ctx: click.Context, key_id: str, fmt: str) -> None:
    """Pause a key; `enable` brings it back."""
    _set_status(ctx, key_id, fmt, "disabled", "revoked keys stay revoked")


@virtual_keys.command()
@click.argument("key_id")
@format_option
@click.pass_context
def enable(ctx: click.Context, key_id: str, fmt: str) -> None:
    """Re-enable a disabled key."""
    _set_status(ctx, key_id, fmt, "active", "create a new key instead")


@virtual_keys.command()
@click.argument("key_id")
@click.option("--grace", default="24h", show_default=True,
              help="How long the old secret keeps working (0s: stop it now).")
@format_option
@click.pass_context
def rotate(ctx: click.Context, key_id: str, grace: str, fmt: str) -> None:
    """Issue a new secret; the old one works until the grace period ends."""
    from tollgate.config.edit import to_yaml

    grace_for = parse_duration(grace)
    secret = generate_secret(get_one(ctx, "virtual_keys", key_id).get("env", "live"))
    with edit(ctx) as doc:
        node = doc.find("virtual_keys", key_id)
        if node is None:
            fail(f"no virtual key with id {key_id!r}")
        if node.get("status") == "revoked":
            fail(f"virtual key {key_id} is revoked; create a new key instead")
        # The grace period caps every older secret too: `--grace 0s` ends them all now.
        now, until = datetime.now(UTC), iso_after(grace_for)
        kept = []
        if grace_for.total_seconds() > 0:
            for prev in node.get("previous_secrets") or []:
                expires = _as_utc(prev["expires_at"])
                if expires > now:
                    capped = min(expires, _as_utc(until))
                    kept.append({"secret_hash": str(prev["secret_hash"]),
                                 "expires_at": capped.isoformat().replace("+00:00", "Z")})
            kept.append({"secret_hash": str(node["secret_hash"]), "expires_at": until})
        pepper, _ = _pepper(ctx)
        node["secret_hash"] = hash_secret(secret, pepper)
        _record_pepper(doc, pepper)
        node["secret_prefix"] = display_prefix(secret)
        if kept:
            node["previous_secrets"] = to_yaml([dict(p) for p in kept])
        else:
            node.pop("previous_secrets", None)
    emit({**_public(get_one(ctx, "virtual_keys", key_id)), "secret": secret}, fmt)
