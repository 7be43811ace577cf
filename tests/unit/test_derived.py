"""What decisions keep per loaded config: the same answers as computing them per request,
with each request's own windows."""

from datetime import UTC, datetime
from pathlib import Path

from tollgate import budgets, ratelimit, routing
from tollgate.catalog import ModelCatalog
from tollgate.config.load import LoadedConfig
from tollgate.config.schema import Config
from tollgate.pricing import PriceTable
from tollgate.routes import ROUTES

CHAT = ROUTES["/v1/chat/completions"]


def _loaded(strategy: str = "ordered") -> LoadedConfig:
    providers = [{"id": f"mp_{i}", "type": "openai", "scope": "ORG:acme",
                  "base_url": f"https://p{i}.example", "api_key_env": "K",
                  "models": ["gpt-5-mini"] if i else ["gpt-5"],
                  "rate_limit": {"rpd": 100}} for i in range(4)]
    cfg = Config.model_validate({
        "orgs": [{"id": "acme", "teams": [{"id": "core", "projects": ["web"]}]}],
        "model_providers": providers,
        "routing_policies": [{"id": "rp", "name": "p", "scope": "ORG:acme", "strategy": strategy,
                              "model_providers": [{"model_provider": p["id"], "weight": 1}
                                                  for p in providers]}],
        "virtual_keys": [{"id": "vk", "name": "k", "scope": "PROJECT:web",
                          "secret_hash": "0" * 64, "routing_policy": "rp",
                          "config": {"rate_limits": {"rpm": 10, "rpd": 50}}}],
        "budgets": [{"id": "b_hour", "name": "h", "scope": "team", "team": "core",
                     "window": "hour", "limit": 5},
                    {"id": "b_minute", "name": "m", "scope": "virtual_key", "virtual_key": "vk",
                     "window": "minute", "limit": 1, "model_provider": "mp_1"},
                    {"id": "b_other", "name": "o", "scope": "org", "org": "other",
                     "limit": 1}]})
    return LoadedConfig(cfg, PriceTable({}), Path("gateway.yaml"), ModelCatalog({}))


def test_the_providers_kept_for_a_model_are_those_routing_orders_and_what_was_left_out():
    loaded = _loaded()
    cfg, key = loaded.config, loaded.config.virtual_keys[0]
    fresh: list[str] = []
    expected = routing.targets(cfg, key, CHAT, "gpt-5-mini", skipped=fresh)
    assert [t.provider.id for t in expected] == ["mp_1", "mp_2", "mp_3"]
    assert fresh == ["mp_0: serves neither 'gpt-5-mini' nor an equivalent"]
    for _ in range(2):  # computed, then kept: the same both times
        skipped: list[str] = []
        got = loaded.derived.targets(key, CHAT, "gpt-5-mini", skipped=skipped)
        assert got == expected and skipped == fresh
        got.pop()  # a caller's list is its own
    assert [t.provider.id for t in loaded.derived.targets(key, CHAT, "gpt-5")] == ["mp_0"]


def test_a_weighted_policy_is_ordered_anew_for_each_request():
    loaded = _loaded("weighted")
    key = loaded.config.virtual_keys[0]
    firsts = {loaded.derived.targets(key, CHAT, "gpt-5-mini")[0].provider.id
              for _ in range(200)}
    assert firsts == {"mp_1", "mp_2", "mp_3"}


def test_budget_holds_are_those_that_apply_in_the_window_of_each_request():
    loaded = _loaded()
    cfg, key = loaded.config, loaded.config.virtual_keys[0]
    lin = loaded.derived.lineage(key.scope)
    assert (lin.org, lin.team, lin.project) == ("acme", "core", "web")
    for at in ("2026-12-03T10:59:58", "2026-12-03T10:59:59", "2026-12-03T11:00:00",
               "2026-12-03T11:00:30", "2026-12-03T11:01:00", "2026-12-04T00:00:00"):
        now = datetime.fromisoformat(at).replace(tzinfo=UTC)
        for provider in ("mp_0", "mp_1"):
            got = loaded.derived.holds(key, lin, provider, now)
            assert got == budgets.holds_for(cfg, key, lin, provider, now)
    now = datetime(2026, 12, 3, 11, 0, 30, tzinfo=UTC)
    assert [h.counter for h in loaded.derived.holds(key, lin, "mp_1", now)] == \
        ["b_hour:2026-12-03T11", "b_minute:2026-12-03T11:00"]
    later = datetime(2026, 12, 3, 11, 1, 0, tzinfo=UTC)
    assert [h.counter for h in loaded.derived.holds(key, lin, "mp_1", later)] == \
        ["b_hour:2026-12-03T11", "b_minute:2026-12-03T11:01"]


def test_rate_limits_count_requests_per_day_in_the_day_of_each_request():
    loaded = _loaded()
    key, provider = loaded.config.virtual_keys[0], loaded.config.model_providers[2]
    for at in ("2026-12-03T23:59:59", "2026-12-04T00:00:00", "2026-12-03T12:00:00"):
        now = datetime.fromisoformat(at).replace(tzinfo=UTC)
        assert loaded.derived.key_limits(key, now) == ratelimit.key_limits(key, now)
        assert loaded.derived.provider_limits(provider, now) == \
            ratelimit.provider_limits(provider, now)
    day = {lim.dimension: lim.day for lim in loaded.derived.key_limits(
        key, datetime(2026, 12, 4, 0, 0, 1, tzinfo=UTC))}
    assert day == {"rpm": None, "rpd": "2026-12-04"}


def test_what_a_request_is_held_in_is_its_windows_holds_and_limits_each_minute():
    """`applying`, kept for a minute: the holds and the key's and provider's limits of the
    request's own windows, each limit named with its provider (None: the key's)."""
    loaded = _loaded()
    cfg, key = loaded.config, loaded.config.virtual_keys[0]
    lin, provider = loaded.derived.lineage(key.scope), loaded.config.model_providers[1]
    for at in ("2026-12-03T10:59:59", "2026-12-03T11:00:00", "2026-12-03T11:00:59",
               "2026-12-03T23:59:59", "2026-12-04T00:00:00"):
        now = datetime.fromisoformat(at).replace(tzinfo=UTC)
        got = loaded.derived.applying(key, lin, "mp_1", now)
        holds = budgets.holds_for(cfg, key, lin, "mp_1", now)
        limits = ratelimit.key_limits(key, now) + ratelimit.provider_limits(provider, now)
        assert (got.holds, got.limits) == (holds, limits)
        assert got.counters == [h.counter for h in holds]
        assert got.named == [(lim, None if lim.scope == "key" else "mp_1") for lim in limits]
        assert [n for _, n in got.named] == [None, None, "mp_1"]
        assert not got.shadow
    minute = datetime(2026, 12, 3, 11, 0, 5, tzinfo=UTC)
    assert loaded.derived.applying(key, lin, "mp_1", minute) is \
        loaded.derived.applying(key, lin, "mp_1", minute.replace(second=50))
    assert loaded.derived.applying(key, lin, "mp_1", minute).counters != \
        loaded.derived.applying(key, lin, "mp_1", minute.replace(minute=1)).counters


def test_a_reloaded_config_derives_its_own():
    first, second = _loaded(), _loaded()
    assert first.derived is first.derived and first.derived is not second.derived
