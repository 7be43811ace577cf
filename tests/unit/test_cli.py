"""The CLI edits the config the way a careful human would: atomically, keeping comments."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from tollgate.cli.main import cli
from tollgate.config.load import load_config
from tollgate.keys import hash_secret

PEPPER = "unit-test-pepper"


@pytest.fixture
def run(config_dir: Path, monkeypatch):
    monkeypatch.setenv("TOLLGATE_KEY_PEPPER", PEPPER)
    runner = CliRunner()

    def invoke(*args: str, ok: bool = True):
        result = runner.invoke(cli, ["--config", str(config_dir / "gateway.yaml"), *args])
        if ok:
            assert result.exit_code == 0, result.output
        return result

    return invoke


def create_key(run, *args: str) -> dict:
    return json.loads(run("virtual-keys", "create", "--name", "dev", "--scope", "ORG:acme",
                          *args, "--format", "json").stdout)


def test_key_secret_is_shown_once_and_stored_hashed(run, config_dir):
    doc = create_key(run, "--principal", "alice@acme.com")
    assert doc["id"].startswith("vk_") and len(doc["id"]) == 29
    text = (config_dir / "gateway.yaml").read_text()
    assert doc["secret"] not in text
    assert hash_secret(doc["secret"], PEPPER.encode()) in text
    listed = run("virtual-keys", "list", "--format", "json").stdout
    shown = run("virtual-keys", "get", doc["id"]).stdout
    for output in (listed, shown):
        assert doc["secret"] not in output
        assert "secret_hash" not in output


def test_edits_keep_comments_order_and_quotes(run, config_dir):
    path = config_dir / "gateway.yaml"
    before = path.read_text()
    create_key(run)
    run("teams", "create", "--id", "team_ml")
    run("model-providers", "update", "mp_openai_org", "--rpm", "42")
    after = path.read_text()
    for line in before.splitlines():
        if line.strip().startswith("#") or "header_prefix" in line:
            assert line in after
    top_level = [ln.split(":")[0] for ln in after.splitlines() if ln and ln[0].isalpha()]
    assert top_level == ["gateway", "orgs", "model_providers", "routing_policies",
                         "virtual_keys", "budgets"]
    cfg = load_config(path).config
    assert cfg.model_providers[0].rate_limit.rpm == 42
    assert cfg.model_providers[0].rate_limit.tpm == 200000
    assert [t.id for t in cfg.orgs[0].teams] == ["team_eng", "team_ml"]


def test_invalid_edit_is_refused_and_file_untouched(run, config_dir):
    path = config_dir / "gateway.yaml"
    before = path.read_text()
    result = run("virtual-keys", "create", "--name", "x", "--scope", "TEAM:nope", ok=False)
    assert result.exit_code != 0
    assert "team 'nope' is not declared" in result.output
    result = run("routing-policies", "create", "--scope", "ORG:acme", "--name", "p",
                 "--model-provider", "mp_ghost", ok=False)
    assert "unknown model provider 'mp_ghost'" in result.output
    assert path.read_text() == before
    assert not [p for p in os.listdir(config_dir) if p.startswith(".gateway.yaml.")
                and not p.endswith(".lock")]


def test_lifecycle_revoke_disable_enable(run):
    key = create_key(run)
    assert json.loads(run("virtual-keys", "disable", key["id"], "--format",
                          "json").stdout)["status"] == "disabled"
    assert json.loads(run("virtual-keys", "enable", key["id"], "--format",
                          "json").stdout)["status"] == "active"
    # Asks first: no answer (a script that forgot --yes) revokes nothing.
    refused = run("virtual-keys", "revoke", key["id"], ok=False)
    assert "Revoke virtual key" in refused.output and "Aborted" in refused.output
    assert json.loads(run("virtual-keys", "get", key["id"], "--format",
                          "json").stdout)["status"] == "active"
    run("virtual-keys", "revoke", key["id"], "--yes")
    assert "stay revoked" in run("virtual-keys", "disable", key["id"], ok=False).output
    assert "create a new key" in run("virtual-keys", "enable", key["id"], ok=False).output


def test_update_binds_routing_policy_and_config(run, config_dir):
    key = create_key(run)
    policy = json.loads(run("routing-policies", "create", "--scope", "ORG:acme", "--name",
                            "openai-then-anthropic", "--strategy", "ordered",
                            "--model-provider", "mp_openai_org", "--model-provider",
                            "mp_anthropic_org", "--format", "json").stdout)
    assert policy["id"].startswith("rp_")
    run("virtual-keys", "update", key["id"], "--routing-policy", policy["id"],
        "--models-allowed", "gpt-5*", "--config-json",
        '{"fallback": {"on": ["5xx", "timeout"]}}')
    vk = load_config(config_dir / "gateway.yaml").config.virtual_keys[0]
    assert vk.routing_policy == policy["id"]
    assert vk.models_allowed == ["gpt-5*"]
    assert vk.config.fallback.on == ["5xx", "timeout"]
    bad = run("virtual-keys", "update", key["id"], "--config-json",
              '{"fallback": {"on": ["sometimes"]}}', ok=False)
    assert bad.exit_code != 0 and "--config-json" in bad.output


def test_update_merges_the_key_config_and_says_what_changed(run, config_dir):
    """Adding a fallback must not delete the key's tool rules: updates merge (JSON Merge
    Patch), --replace replaces, and each update lists its changes on stderr."""
    key = create_key(run, "--config-json",
                     '{"policy_rules": {"tools": {"deny": ["^shell\\\\."]}}, '
                     '"model_aliases": {"fast": "gpt-5-mini"}}')
    out = run("virtual-keys", "update", key["id"], "--config-json",
              '{"fallback": {"on": ["5xx"]}, "model_aliases": {"fast": null}}')
    vk = load_config(config_dir / "gateway.yaml").config.virtual_keys[0]
    assert vk.config.policy_rules.tools.deny == ["^shell\\."]
    assert vk.config.fallback.on == ["5xx"]
    assert vk.config.model_aliases == {}
    assert 'config.fallback: (unset) -> {"on": ["5xx"]}' in out.stderr
    assert 'config.model_aliases: {"fast": "gpt-5-mini"} -> (unset)' in out.stderr
    assert "policy_rules" not in out.stderr  # kept, so not listed
    assert json.loads(run("virtual-keys", "get", key["id"], "--format", "json").stdout)[
        "config"]["policy_rules"]["tools"]["deny"] == ["^shell\\."]

    out = run("virtual-keys", "update", key["id"], "--replace", "--config-json",
              '{"fallback": {"on": ["timeout"]}}')
    vk = load_config(config_dir / "gateway.yaml").config.virtual_keys[0]
    assert vk.config.policy_rules.tools.deny == [] and vk.config.fallback.on == ["timeout"]
    assert 'config.fallback.on: ["5xx"] -> ["timeout"]' in out.stderr
    assert "config.policy_rules: " in out.stderr and "-> (unset)" in out.stderr
    assert "no changes" in run("virtual-keys", "update", key["id"], "--config-json",
                               "{}").stderr
    assert "--replace goes with --config-json" in run(
        "virtual-keys", "update", key["id"], "--replace", ok=False).output


def test_weighted_policy_takes_weights_and_model_maps(run, config_dir):
    run("routing-policies", "create", "--scope", "ORG:acme", "--name", "spread", "--id",
        "rp_spread", "--strategy", "weighted", "--model-provider", "mp_openai_org",
        "--model-provider", "mp_anthropic_org", "--weight", "mp_openai_org=3",
        "--weight", "mp_anthropic_org=0",
        "--model-map", "mp_anthropic_org:gpt-5-mini=claude-haiku-4-5")
    rp = load_config(config_dir / "gateway.yaml").config.routing_policies[0]
    assert rp.strategy == "weighted"
    assert [(t.model_provider, t.weight, t.model_map) for t in rp.targets()] == [
        ("mp_openai_org", 3, {}), ("mp_anthropic_org", 0, {"gpt-5-mini": "claude-haiku-4-5"})]
    bad = run("routing-policies", "create", "--scope", "ORG:acme", "--name", "x",
              "--model-provider", "mp_openai_org", "--weight", "mp_nope=2", ok=False)
    assert bad.exit_code != 0 and "--weight" in bad.output


def test_init_refuses_to_overwrite(run, config_dir, tmp_path):
    assert "already exists" in run("init", "--org", "acme", ok=False).output
    fresh = tmp_path / "new" / "gw.yaml"
    result = CliRunner().invoke(cli, ["--config", str(fresh), "init", "--org", "globex"])
    assert result.exit_code == 0, result.output
    assert load_config(fresh).config.orgs[0].id == "globex"


def test_a_failed_init_leaves_no_config_behind(tmp_path, monkeypatch):
    from tollgate.cli import org

    monkeypatch.setattr(org, "SHIPPED_PRICES", tmp_path / "missing.yaml")
    fresh = tmp_path / "new" / "gateway.yaml"
    result = CliRunner().invoke(cli, ["--config", str(fresh), "init", "--org", "acme"])
    assert result.exit_code != 0 and "no price table" in result.output
    assert not fresh.exists()  # a later `init` is not refused by a half-made config
    assert not fresh.parent.exists() or not any(fresh.parent.iterdir())


def test_config_validate_reports_lines(run, config_dir):
    assert "ok (2 model providers" in run("config", "validate").output
    path = config_dir / "gateway.yaml"
    path.write_text(path.read_text().replace("type: anthropic", "type: antropic"))
    result = run("config", "validate", ok=False)
    assert result.exit_code == 1
    assert f"{path}:" in result.output and "model_providers[1].type" in result.output


def test_provider_create_requires_env_reference(run):
    result = run("model-providers", "create", "--type", "openai", "--scope", "ORG:acme",
                 ok=False)
    assert "--api-key-env or --api-key-file is required" in result.output
    doc = json.loads(run("model-providers", "create", "--type", "anthropic", "--scope",
                         "TEAM:team_eng", "--api-key-env", "TEAM_ANTHROPIC_KEY",
                         "--provider-config", '{"region": "us-east-1"}', "--format",
                         "json").stdout)
    assert doc["id"].startswith("mp_") and doc["base_url"] == "https://api.anthropic.com"
    assert doc["provider_config"] == {"region": "us-east-1"}


def test_controls_that_cannot_take_effect_are_warned_about(run, config_dir):
    """Valid but idle: the edit is made, and the CLI and `config validate` say why it will
    do nothing."""
    run("teams", "create", "--id", "team_ops")
    budget = run("gateway-budgets", "create", "--name", "ops", "--scope", "team", "--team",
                 "team_ops", "--limit", "10", "--format", "json")
    assert "applies to no active virtual key (team 'team_ops' has none)" in budget.stderr
    key = run("virtual-keys", "create", "--name", "g", "--scope", "TEAM:team_ops",
              "--models-allowed", "gemini-*", "--format", "json")
    assert "'gemini-*' matches no model that a provider it can see serves" in key.stderr
    assert "budget" not in key.stderr  # the budget has a key now: no longer idle
    run("teams", "create", "--id", "team_iso", "--org", "acme")
    provider = run("model-providers", "create", "--type", "openai", "--scope", "TEAM:team_iso",
                   "--id", "mp_iso", "--base-url", "http://127.0.0.1:1", "--api-key-env",
                   "OPENAI_API_KEY", "--rpm", "10")
    assert "provider mp_iso: no active virtual key can reach it" in provider.stderr
    checked = run("config", "validate")
    path = config_dir / "gateway.yaml"
    lines = [line for line in checked.stderr.splitlines() if line.startswith("warning: ")]
    assert any(f"{path}:" in line and "mp_iso" in line for line in lines)
    assert any("gemini-*" in line for line in lines)


def test_a_policy_provider_that_can_serve_nothing_is_warned_about(run):
    """OpenAI then Anthropic needs no model map (the catalog has equivalents); a provider
    that serves none of the first one's models, and has no map, is skipped by requests."""
    seed = run("routing-policies", "create", "--scope", "ORG:acme", "--name", "seed",
               "--model-provider", "mp_openai_org", "--model-provider", "mp_anthropic_org")
    assert "serves none of the models" not in seed.stderr
    run("model-providers", "create", "--type", "openai-compatible", "--scope", "ORG:acme",
        "--id", "mp_local", "--base-url", "http://127.0.0.1:1", "--api-key-env", "LOCAL_KEY",
        "--models", "llama-*")
    local = run("routing-policies", "create", "--scope", "ORG:acme", "--name", "local",
                "--model-provider", "mp_openai_org", "--model-provider", "mp_local")
    assert "mp_local serves none of the models mp_openai_org serves" in local.stderr


def test_make_run_passes_envoys_admin_address_when_given():
    """`make run ENVOY_ADMIN=...` moves Envoy's admin off its default, as ADMIN= moves
    tollgate's; without it the default stands."""
    import subprocess

    from tests.harness import ROOT

    def command(*assignments: str) -> str:
        return subprocess.run(["make", "-n", "run", *assignments], cwd=ROOT, check=True,
                              capture_output=True, text=True).stdout

    assert "--envoy-admin 127.0.0.1:9902" in command("ENVOY_ADMIN=127.0.0.1:9902")
    assert "--envoy-admin" not in command()


def test_version_is_the_installed_distributions():
    import importlib.metadata

    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0
    version = importlib.metadata.version("tollgate-llm-gateway")  # the distribution's name
    assert result.output.strip() == f"tollgate, version {version}"


def test_teams_and_projects_move_and_delete(run, config_dir):
    path = config_dir / "gateway.yaml"
    path.write_text(path.read_text().replace("orgs:\n", "orgs:\n  - id: globex\n    teams: []\n"))
    run("teams", "create", "--id", "team_ml", "--org", "acme")
    moved = run("projects", "update", "proj_web", "--team", "team_ml", "--format", "json")
    assert json.loads(moved.stdout) == {"id": "proj_web", "team": "team_ml", "org": "acme"}
    assert "team: team_eng -> team_ml" in moved.stderr
    refused = run("teams", "delete", "team_ml", ok=False)
    assert "has projects (proj_web)" in refused.output and "projects update" in refused.output
    run("teams", "update", "team_ml", "--org", "globex")
    cfg = load_config(path).config
    by_org = {o.id: {t.id: t.projects for t in o.teams} for o in cfg.orgs}
    assert by_org == {"globex": {"team_ml": ["proj_web"]}, "acme": {"team_eng": []}}

    # Something scoped to it: the edit is refused, and says what refers to it.
    key = create_key(run, "--scope", "PROJECT:proj_web")
    in_use = run("projects", "delete", "proj_web", ok=False)
    assert "project 'proj_web' is not declared" in in_use.output
    assert load_config(path).config.orgs[0].teams[0].projects == ["proj_web"]
    run("virtual-keys", "revoke", key["id"], "--yes")
    path.write_text(path.read_text().replace("PROJECT:proj_web", "TEAM:team_eng"))
    assert run("projects", "delete", "proj_web").stdout == "deleted proj_web\n"
    run("teams", "delete", "team_ml")
    assert [t.id for o in load_config(path).config.orgs for t in o.teams] == ["team_eng"]
    assert "no team 'team_ml'" in run("teams", "delete", "team_ml", ok=False).output


def test_routing_policy_update_changes_it_in_place(run, config_dir):
    run("routing-policies", "create", "--scope", "ORG:acme", "--name", "two", "--id", "rp_two",
        "--model-provider", "mp_openai_org", "--model-provider", "mp_anthropic_org",
        "--model-map", "mp_anthropic_org:gpt-5-mini=claude-haiku-4-5")
    out = run("routing-policies", "update", "rp_two", "--strategy", "weighted",
              "--weight", "mp_openai_org=3")
    rp = load_config(config_dir / "gateway.yaml").config.routing_policies[0]
    assert rp.strategy == "weighted"
    assert [(t.model_provider, t.weight, t.model_map) for t in rp.targets()] == [
        ("mp_openai_org", 3, {}),
        ("mp_anthropic_org", 1, {"gpt-5-mini": "claude-haiku-4-5"})]  # kept
    assert 'strategy: "ordered" -> "weighted"' in out.stderr
    run("routing-policies", "update", "rp_two", "--model-provider", "mp_anthropic_org")
    rp = load_config(config_dir / "gateway.yaml").config.routing_policies[0]
    assert [(t.model_provider, t.model_map) for t in rp.targets()] == [
        ("mp_anthropic_org", {"gpt-5-mini": "claude-haiku-4-5"})]
    bad = run("routing-policies", "update", "rp_two", "--weight", "mp_openai_org=2", ok=False)
    assert "a listed provider" in bad.output
    assert "no routing policy with id 'rp_nope'" in run(
        "routing-policies", "update", "rp_nope", "--name", "x", ok=False).output


def test_spend_report_for_a_past_window_prints_money(run, config_dir):
    """Rows of October and November 2026; --period picks one by its key, whatever today is,
    and the table prints dollars (the JSON keeps numbers)."""
    import asyncio

    from tollgate.ledger import LedgerRow
    from tollgate.store.sqlite import SQLiteStore

    def row(request_id: str, ts: str, principal: str, cost: int, searches: int = 0
            ) -> LedgerRow:
        return LedgerRow(request_id=request_id, ts=ts, key_id="vk_1", key_name="k",
                         principal=principal, org="acme", team="team_eng", project=None,
                         provider="mp_openai_org", model="gpt-5-mini", route="chat_completions",
                         cost_micros=cost, input_tokens=10, output_tokens=5,
                         web_search_requests=searches)

    async def write() -> None:
        store = SQLiteStore(config_dir / ".tollgate" / "state.db")
        for r in (row("r1", "2026-10-31T23:59:59+00:00", "alice", 80),
                  row("r2", "2026-11-01T00:00:00+00:00", "bob", 1_234_500_000, 2),
                  row("r3", "2026-11-30T14:10:00+00:00", "bob", 7, 1)):
            await store.finish([], 0, r)
        await store.close()

    (config_dir / ".tollgate").mkdir()
    asyncio.run(write())
    october = run("spend", "report", "--by", "principal", "--period", "2026-10")
    assert "$0.000080" in october.stdout and "bob" not in october.stdout
    assert "principal spend, month 2026-10 (UTC)" in october.stderr
    november = json.loads(run("spend", "report", "--period", "2026-11", "--format",
                              "json").stdout)
    assert november["period"] == "2026-11" and november["window"] == "month"
    assert [(r["principal"], r["cost_usd"], r["web_search_requests"])
            for r in november["rows"]] == [("bob", 1234.500007, 3)]
    assert "$1,234.500000" in run("spend", "report", "--period", "2026-11-01").stdout
    assert "$0.000007" in run("spend", "report", "--period", "2026-11-30T14").stdout
    assert "$0.000080" in run("spend", "report", "--period", "2026-W44").stdout
    bad = run("spend", "report", "--period", "last-month", ok=False)
    assert "names no window" in bad.output and "2026-W48 (week)" in bad.output


def test_budget_scopes_are_spelled_as_everywhere_else(run, config_dir):
    made = json.loads(run("gateway-budgets", "create", "--name", "eng", "--scope",
                          "TEAM:team_eng", "--limit", "5000", "--format", "json").stdout)
    assert (made["scope"], made["team"]) == ("team", "team_eng")
    old = run("gateway-budgets", "create", "--name", "org", "--scope", "org", "--org", "acme",
              "--limit", "10", "--format", "json")
    assert json.loads(old.stdout)["org"] == "acme"
    assert "--scope ORG:acme is the spelling" in old.stderr
    assert "ORG:id, TEAM:id" in run("gateway-budgets", "create", "--name", "x", "--scope",
                                    "SQUAD:x", "--limit", "1", ok=False).output
    listed = run("gateway-budgets", "list").stdout
    assert "TEAM:team_eng" in listed and "$5,000.000000" in listed
    status = run("gateway-budgets", "status").stdout
    assert "TEAM:team_eng" in status and "$0.000000" in status
    changed = run("gateway-budgets", "update", made["id"], "--limit", "6000")
    assert "limit: 5000.0 -> 6000.0" in changed.stderr


def test_mitmdump_examples_stay_on_loopback_beside_make_run():
    """The documented `mitmdump -s addon/tollgate_addon.py` commands bind 127.0.0.1 on a port
    `make run` (8080, admin 9464, mitmweb 8081) does not take."""
    import re

    from tests.harness import ROOT

    texts = [(ROOT / "README.md").read_text(), (ROOT / "addon" / "tollgate_addon.py").read_text()]
    modes = [m for text in texts for m in re.findall(r"mitmdump --mode (\S+)", text)]
    assert len(modes) == 2
    for mode in modes:
        listen = re.fullmatch(r"reverse:http://127\.0\.0\.1:9@127\.0\.0\.1:(\d+)", mode)
        assert listen and int(listen.group(1)) not in (8080, 8081, 9464), mode


def test_spend_report_shadow_lists_what_shadow_controls_would_refuse(run, config_dir):
    import asyncio

    from tollgate.ledger import LedgerRow
    from tollgate.store.sqlite import SQLiteStore

    def row(request_id: str, key: str, principal: str, shadow: str | None) -> LedgerRow:
        return LedgerRow(request_id=request_id, ts="2026-11-10T10:00:00+00:00", key_id=key,
                         key_name=key, principal=principal, org="acme", team=None,
                         project=None, provider="mp_openai_org", model="gpt-5-mini",
                         route="chat_completions", status=200, outcome="completed",
                         shadow=shadow)

    tools = "policy_rules.tools would refuse 403 tool_not_allowed: Tool 'shell.exec; rm' is x"
    budget = "budget b_1 would refuse 402 budget_exceeded: tiny (scope team t, window 2026-11)"
    limit = "rate limit virtual key vk_a rpm would refuse 429 rate_limited: 2 of 1 requests"

    async def write() -> None:
        store = SQLiteStore(config_dir / ".tollgate" / "state.db")
        for r in (row("r1", "vk_a", "alice", f"{tools}; {budget}"),
                  row("r2", "vk_a", "alice", f"{budget}; {limit}"),
                  row("r3", "vk_b", "bob", budget), row("r4", "vk_b", "bob", None)):
            await store.finish([], 0, r)
        await store.close()

    (config_dir / ".tollgate").mkdir()
    asyncio.run(write())
    doc = json.loads(run("spend", "report", "--shadow", "--period", "2026-11", "--format",
                         "json").stdout)
    assert doc["by"] == "shadow"
    assert [(r["control"], r["would_refuse"], r["requests"], r["key"], r["principal"])
            for r in doc["rows"]] == [
        ("budget b_1", "402 budget_exceeded", 2, "vk_a", "alice"),
        ("budget b_1", "402 budget_exceeded", 1, "vk_b", "bob"),
        ("policy_rules.tools", "403 tool_not_allowed", 1, "vk_a", "alice"),
        ("rate limit virtual key vk_a rpm", "429 rate_limited", 1, "vk_a", "alice")]
    table = run("spend", "report", "--shadow", "--period", "2026-11")
    assert "shadow decisions, month 2026-11" in table.stderr and "budget b_1" in table.stdout


def test_policy_json_with_shadow_and_one_command_promotion(run, config_dir):
    key = create_key(run, "--rpm", "10")
    out = run("virtual-keys", "update", key["id"], "--policy-json",
              '{"urls": {"deny": ["host:evil.example"]}}', "--shadow")
    assert 'config.policy_rules: (unset) -> {"urls": {"deny": ["host:evil.example"], ' \
        '"mode": "shadow"}}' in out.stderr
    run("virtual-keys", "update", key["id"], "--policy-json", '{"tools": {"deny": ["^x"]}}')
    vk = load_config(config_dir / "gateway.yaml").config.virtual_keys[0]
    assert (vk.config.policy_rules.urls.mode, vk.config.policy_rules.tools.mode) == \
        ("shadow", "enforce")
    run("virtual-keys", "update", key["id"], "--shadow")  # every group, and the limits
    vk = load_config(config_dir / "gateway.yaml").config.virtual_keys[0]
    assert vk.config.policy_rules.tools.mode == "shadow"
    assert vk.config.rate_limits.mode == "shadow" and vk.config.rate_limits.rpm == 10
    run("virtual-keys", "update", key["id"], "--enforce")
    vk = load_config(config_dir / "gateway.yaml").config.virtual_keys[0]
    assert (vk.config.policy_rules.urls.mode, vk.config.policy_rules.tools.mode,
            vk.config.rate_limits.mode) == ("enforce", "enforce", "enforce")
    assert vk.config.policy_rules.urls.deny == ["host:evil.example"]
    bad = run("virtual-keys", "update", key["id"], "--policy-json", '{"tool": {}}', ok=False)
    assert "rule groups: tools, mcp, urls, models" in bad.output


def test_provider_rate_limits_in_shadow_and_promoted(run, config_dir):
    run("model-providers", "update", "mp_openai_org", "--rpm", "7", "--rate-limit-mode",
        "shadow")
    limit = load_config(config_dir / "gateway.yaml").config.model_providers[0].rate_limit
    assert (limit.rpm, limit.tpm, limit.mode) == (7, 200000, "shadow")
    out = run("model-providers", "update", "mp_openai_org", "--rate-limit-mode", "enforce")
    assert 'rate_limit.mode: "shadow" -> "enforce"' in out.stderr
    limit = load_config(config_dir / "gateway.yaml").config.model_providers[0].rate_limit
    assert (limit.rpm, limit.mode) == (7, "enforce")
