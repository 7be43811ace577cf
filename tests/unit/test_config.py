"""Loading and validating the YAML config: good files load, bad ones point at the line."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness import ROOT
from tollgate.cli.common import plain
from tollgate.config import fastyaml
from tollgate.config.fastyaml import read_data
from tollgate.config.load import load_config, read_yaml
from tollgate.config.problems import ConfigError
from tollgate.config.watch import ConfigHolder


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    return [str(p) for p in exc.value.problems]


def test_shipped_example_config_is_valid():
    loaded = load_config(ROOT / "config" / "gateway.example.yaml")
    assert {p.id for p in loaded.config.model_providers} == {"mp_openai_org",
                                                              "mp_anthropic_org"}
    assert loaded.config.gateway.header_prefix == "X-LangWatch-"


def test_price_table_covers_the_documented_models():
    prices = load_config(ROOT / "config" / "gateway.example.yaml").prices
    for model in ["gpt-5", "gpt-5-mini", "gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-4.1-mini",
                  "o3", "o4-mini", "text-embedding-3-small", "claude-opus-4-1",
                  "claude-sonnet-4-5", "claude-haiku-4-5", "claude-3-5-haiku-latest"]:
        assert prices.lookup(model) is not None, model
    assert prices.lookup("gpt-4o-2024-08-06") == prices.lookup("gpt-4o")
    assert prices.lookup("claude-sonnet-4-5-20250929") == prices.lookup("claude-sonnet-4-5")
    assert prices.lookup("gpt-9-turbo") is None
    # Only snapshots the catalog names: an invented date is no price, nor a ceiling.
    assert prices.lookup("claude-sonnet-4-20250514") == prices.lookup("claude-sonnet-4-0")
    assert prices.lookup("gpt-4o-2099-01-01") is None
    assert prices.lookup("claude-sonnet-4-5-29990101") is None


def test_typo_names_file_line_and_field(config_dir):
    path = config_dir / "gateway.yaml"
    text = path.read_text().replace("fallback_priority: 2", "fallback_prority: 2")
    path.write_text(text)
    line = next(i for i, t in enumerate(text.splitlines(), 1) if "fallback_prority" in t)
    assert problems_of(path) == [
        f"{path}:{line}: model_providers[1].fallback_prority: unknown field (check the spelling)"]


def test_wrong_type_and_bad_scope(config_dir):
    path = config_dir / "gateway.yaml"
    text = path.read_text().replace("rpm: 500", "rpm: lots").replace(
        "scope: ORG:acme\n    base_url: https://api.anthropic.com", "scope: ORGANIZATION\n"
        "    base_url: https://api.anthropic.com")
    path.write_text(text)
    found = problems_of(path)
    assert any("model_providers[0].rate_limit.rpm" in p and "integer" in p for p in found)
    assert any("model_providers[1].scope" in p and "ORG:<id>" in p for p in found)


def test_dangling_references_are_errors(config_dir):
    path = config_dir / "gateway.yaml"
    path.write_text(path.read_text().replace("routing_policies: []", """routing_policies:
  - id: rp_1
    name: p
    scope: TEAM:team_nope
    model_providers: [mp_openai_org, mp_missing]"""))
    found = problems_of(path)
    assert any("routing_policies[0].scope" in p and "team_nope" in p for p in found)
    assert any("routing_policies[0].model_providers[1]" in p and "mp_missing" in p
               for p in found)


def test_env_interpolation(config_dir, monkeypatch):
    path = config_dir / "gateway.yaml"
    path.write_text(path.read_text().replace("https://api.openai.com",
                                             "${OPENAI_BASE:-https://api.openai.com}/proxy"))
    assert load_config(path).config.model_providers[0].base_url == \
        "https://api.openai.com/proxy"
    monkeypatch.setenv("OPENAI_BASE", "http://127.0.0.1:9999")
    assert load_config(path).config.model_providers[0].base_url == \
        "http://127.0.0.1:9999/proxy"
    path.write_text(path.read_text().replace("${OPENAI_BASE:-https://api.openai.com}",
                                             "${TG_SURELY_UNSET_VAR}"))
    assert any("TG_SURELY_UNSET_VAR is not set" in p for p in problems_of(path))


def test_alias_to_unpriced_model_is_an_error(config_dir):
    path = config_dir / "gateway.yaml"
    path.write_text(path.read_text().replace("virtual_keys: []", """virtual_keys:
  - id: vk_1
    name: k
    scope: ORG:acme
    secret_hash: "%s"
    config:
      model_aliases: {fast: gpt-mystery}""" % ("a" * 64)))
    assert any("model_aliases.fast" in p and "no price" in p for p in problems_of(path))


def test_yaml_syntax_error_has_a_line(config_dir):
    path = config_dir / "gateway.yaml"
    path.write_text("gateway:\n  header_prefix: [unclosed\norgs: []\n")
    (problem,) = problems_of(path)
    assert problem.startswith(f"{path}:") and "YAML syntax" in problem


def test_holder_keeps_last_good_config(config_dir):
    path = config_dir / "gateway.yaml"
    holder = ConfigHolder(path)
    first = holder.current
    path.write_text(path.read_text().replace("header_prefix:", "header_prefx:"))
    assert holder.check() is False
    assert holder.current is first
    assert "header_prefx" in str(holder.last_error)
    path.write_text(path.read_text().replace("header_prefx:", "header_prefix:").replace(
        "X-LangWatch-", "X-Gate-"))
    assert holder.check() is True
    assert holder.current.config.gateway.header_prefix == "X-Gate-"
    assert holder.last_error is None


def test_edit_landing_during_a_reload_is_not_missed(config_dir, monkeypatch):
    path = config_dir / "gateway.yaml"
    holder = ConfigHolder(path)
    import tollgate.config.watch as watch

    real_load = watch.load_config

    def load_then_edit(p):
        loaded = real_load(p)
        # Another writer lands after we read but before the reload finishes.
        path.write_text(path.read_text().replace("X-LangWatch-", "X-Late-"))
        return loaded

    path.write_text(path.read_text().replace("max_body_bytes: 8388608", "max_body_bytes: 4096"))
    monkeypatch.setattr(watch, "load_config", load_then_edit)
    assert holder.check() is True
    assert holder.current.config.gateway.max_body_bytes == 4096
    monkeypatch.setattr(watch, "load_config", real_load)
    assert holder.check() is True
    assert holder.current.config.gateway.header_prefix == "X-Late-"


def test_env_expansion_only_where_it_is_meant(config_dir, monkeypatch):
    monkeypatch.setenv("SECRET_THING", "sk-must-never-show")
    monkeypatch.setenv("GW_HOST", "10.0.0.7:8443")
    path = config_dir / "gateway.yaml"
    text = path.read_text().replace("model_providers:\n", """model_providers:
  - id: mp_x
    type: openai
    scope: ORG:acme
    base_url: https://${GW_HOST}/v1
    api_key_env: OPENAI_API_KEY
    provider_config: {region: "${GW_HOST}"}
""").replace("virtual_keys: []", """virtual_keys:
  - id: vk_x
    name: ${SECRET_THING}
    principal: ${SECRET_THING}
    scope: ORG:acme
    secret_hash: "%s"
    config: {policy_rules: {tools: {deny: ["^${SECRET_THING}$"]}}}""" % ("0" * 64))
    path.write_text(text)
    cfg = load_config(path).config
    provider = next(p for p in cfg.model_providers if p.id == "mp_x")
    assert provider.base_url == "https://10.0.0.7:8443/v1"
    assert provider.provider_config == {"region": "10.0.0.7:8443"}
    key = next(k for k in cfg.virtual_keys if k.id == "vk_x")
    assert (key.name, key.principal) == ("${SECRET_THING}", "${SECRET_THING}")
    assert key.config.policy_rules.tools.deny == ["^${SECRET_THING}$"]


@pytest.mark.parametrize(("provider_type", "config", "error"), [
    ("azure-openai", {"api_version": "2024-10-21", "deploymets": {}},
     "unknown provider_config keys for azure-openai: deploymets"),
    ("azure-openai", {}, "azure-openai needs provider_config.api_version"),
    ("bedrock", {"regoin": "us-east-1"}, "unknown provider_config keys for bedrock: regoin"),
    ("bedrock", {}, "bedrock needs provider_config.region"),
])
def test_provider_config_is_checked_by_its_type(provider_type, config, error):
    from pydantic import ValidationError

    from tollgate.config.schema import ModelProvider

    with pytest.raises(ValidationError, match=error):
        ModelProvider(id="mp", type=provider_type, scope="ORG:acme",
                      base_url="https://example.com", provider_config=config)


# -- the fast reader (libyaml) reads what the round-trip parser reads -------------------

SCALARS = ["on", "yes", "no", "off", "y", "true", "True", "FALSE", "tRue", "0o17", "017",
           "0x1F", "-0x1f", "0b101", "+12", "-12", "1_000", "1e3", "1.5e3", ".5", "-.inf",
           ".NaN", "1.", "~", "null", "NULL", "", "'1'", '"on"', "1:30", "-0", "+0o7",
           "12.5_0", "a b", "1_", "_1", "0b", "00", "007", "9" * 30, "'2026-12-01'"]
# Read alike only by leaving them to the round-trip parser.
UNLIKE = {"a timestamp": "k: 2026-12-01T00:00:00Z\n",
          "a merge key": "a: &x {b: 1}\nc:\n  <<: *x\n  d: 2\n",
          "a tag": "k: !!str 5\n", "a local tag": "k: !env X\n",
          "a YAML 1.1 directive": "%YAML 1.1\n---\nfallback: {on: [5xx]}\nk: yes\n",
          "a tab (libyaml takes it)": "gateway:\n  header_prefix:\tX-A-\n"}


def _both(tmp_path: Path, text: str) -> tuple[object, object]:
    """What `read_data` and the round-trip parser read, as plain data."""
    path = tmp_path / "doc.yaml"
    path.write_text(text)
    return plain(read_data(path)), plain(read_yaml(path))


@pytest.mark.parametrize("scalar", SCALARS)
def test_the_fast_reader_reads_scalars_by_yaml_1_2_like_the_round_trip_parser(tmp_path,
                                                                              scalar):
    text = f"k: {scalar}\nl: [{scalar}]\n"
    fast, slow = _both(tmp_path, text)
    assert repr(fast) == repr(slow)
    assert repr(fastyaml._load(text)) == repr(slow)  # and not by falling back


@pytest.mark.parametrize("path", [
    "config/gateway.example.yaml", "config/prices.yaml", "config/models.yaml",
    "envoy/kubernetes/gateway.yaml", "tollgate/shipped/prices.yaml",
    "tollgate/shipped/models.yaml"])
def test_the_fast_reader_reads_the_shipped_files_alike_without_falling_back(tmp_path, path):
    text = (ROOT / path).read_text()
    fast, slow = _both(tmp_path, text)
    assert fast == slow and fastyaml._load(text) == slow


@pytest.mark.parametrize("text", UNLIKE.values(), ids=UNLIKE.keys())
def test_what_the_fast_reader_would_read_otherwise_it_leaves_to_the_round_trip_parser(
        tmp_path, text):
    if "%YAML" not in text and "\t" not in text:
        with pytest.raises(fastyaml._Unsupported):
            fastyaml._load(text)
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    try:
        slow = repr(plain(read_yaml(path)))
    except ConfigError as e:
        slow = str(e)
    try:
        fast = repr(plain(read_data(path)))
    except ConfigError as e:
        fast = str(e)
    assert fast == slow


def test_a_duplicate_key_is_the_round_trip_parsers_error_with_its_line(tmp_path):
    path = tmp_path / "gateway.yaml"
    path.write_text("gateway:\n  header_prefix: X-A-\n  header_prefix: X-B-\n")
    with pytest.raises(fastyaml._Unsupported):
        fastyaml._load(path.read_text())
    [problem] = problems_of(path)
    assert problem.startswith(f"{path}:3") and "duplicate key" in problem


def test_errors_found_after_a_fast_read_still_name_their_line(tmp_path):
    text = (ROOT / "config" / "gateway.example.yaml").read_text()
    text = text.replace("header_prefix:", "header_prefx:", 1)
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    line = text[: text.index("header_prefx:")].count("\n") + 1
    assert f"{path}:{line}: gateway.header_prefx: unknown field (check the spelling)" in \
        problems_of(path)


def test_a_value_the_yaml_parser_itself_fails_on_is_a_config_error(tmp_path):
    """`+_` matches YAML 1.2's integer pattern, and the parser then fails reading it."""
    path = tmp_path / "gateway.yaml"
    path.write_text("gateway:\n  header_prefix: +_\n")
    [problem] = problems_of(path)
    assert "a value the parser cannot read" in problem
