import random
from collections import Counter

from tollgate.config.schema import RoutingTarget
from tollgate.routing import weighted_order


def test_weighted_order_spreads_first_picks_by_weight_and_keeps_fallbacks():
    targets = [RoutingTarget(model_provider="a", weight=3),
               RoutingTarget(model_provider="b", weight=1),
               RoutingTarget(model_provider="c", weight=0)]
    rng = random.Random(7)
    firsts = Counter()
    for _ in range(4000):
        order = [t.model_provider for t in weighted_order(targets, rng)]
        assert sorted(order) == ["a", "b", "c"] and order[-1] == "c"
        firsts[order[0]] += 1
    assert firsts["c"] == 0
    assert 0.70 < firsts["a"] / 4000 < 0.80  # 3:1


def _config(*targets: dict, extra_providers: tuple[dict, ...] = ()):
    from tollgate.config.schema import Config

    providers = [
        {"id": "mp_openai", "type": "openai", "scope": "ORG:acme",
         "base_url": "https://api.openai.com", "api_key_env": "K"},
        {"id": "mp_anthropic", "type": "anthropic", "scope": "ORG:acme",
         "base_url": "https://api.anthropic.com", "api_key_env": "K"},
        *extra_providers]
    return Config.model_validate({
        "orgs": [{"id": "acme"}], "model_providers": providers,
        "routing_policies": [{"id": "rp_1", "name": "p", "scope": "ORG:acme",
                              "model_providers": list(targets)}],
        "virtual_keys": [{"id": "vk_1", "name": "k", "scope": "ORG:acme",
                          "secret_hash": "0" * 64, "routing_policy": "rp_1"}]})


def test_a_policy_across_vendors_asks_each_provider_for_its_equivalent():
    """The seed recipe: OpenAI then Anthropic, no model map. The catalog names the model
    Anthropic serves in place of the one asked for."""
    from pathlib import Path

    from tollgate.catalog import SHIPPED, load_catalog
    from tollgate.routes import ROUTES
    from tollgate.routing import targets

    catalog = load_catalog(Path("/nonexistent/models.yaml"))  # falls back to the shipped one
    assert catalog.path == SHIPPED
    cfg = _config({"model_provider": "mp_openai"}, {"model_provider": "mp_anthropic"})
    chat = ROUTES["/v1/chat/completions"]
    got = targets(cfg, cfg.virtual_keys[0], chat, "gpt-5-mini", catalog=catalog)
    assert [(t.provider.id, t.model) for t in got] == [("mp_openai", "gpt-5-mini"),
                                                       ("mp_anthropic", "claude-haiku-4-5")]
    messages = ROUTES["/v1/messages"]
    got = targets(cfg, cfg.virtual_keys[0], messages, "claude-sonnet-4-5", catalog=catalog)
    assert [(t.provider.id, t.model) for t in got] == [("mp_openai", "gpt-5"),
                                                       ("mp_anthropic", "claude-sonnet-4-5")]
    # An explicit map wins over the catalog.
    mapped = _config({"model_provider": "mp_openai"},
                     {"model_provider": "mp_anthropic",
                      "model_map": {"gpt-5-mini": "claude-sonnet-4-5"}})
    got = targets(mapped, mapped.virtual_keys[0], chat, "gpt-5-mini", catalog=catalog)
    assert got[1].model == "claude-sonnet-4-5"
    # Without the catalog, the second provider has nothing to serve, and says so.
    skipped: list[str] = []
    got = targets(cfg, cfg.virtual_keys[0], chat, "gpt-5-mini", skipped=skipped)
    assert [t.provider.id for t in got] == ["mp_openai"]
    assert skipped == ["mp_anthropic: serves neither 'gpt-5-mini' nor an equivalent"]


def test_an_attempt_names_each_header_to_remove_once(monkeypatch):
    """The client's own credential headers (which the gateway strips) are often the ones the
    provider's adapter takes off too: each proxy removes a name once, not once per list."""
    from tollgate import headers as header_rules
    from tollgate.routes import ROUTES
    from tollgate.routing import Target, build_attempt

    monkeypatch.setenv("K", "sk-provider")
    cfg = _config({"model_provider": "mp_openai"})
    client = {"x-api-key": "tg-test-key", "authorization": "Bearer tg-test-key",
              "anthropic-version": "2023-06-01", "content-type": "application/json"}
    strip = header_rules.upstream_removals(client, "X-LangWatch-")
    assert "x-api-key" in strip  # (what makes the two lists meet)
    openai = Target(cfg.model_providers[0], "gpt-5-mini")
    for path, removed in (("/v1/chat/completions", ["x-api-key"]),
                          # Anthropic's SDK to an OpenAI provider: its headers go too.
                          ("/v1/messages", ["x-api-key", "anthropic-version",
                                            "anthropic-beta"])):
        attempt = build_attempt(openai, ROUTES[path], path, client, strip)
        assert len(attempt.remove_headers) == len(set(attempt.remove_headers))
        assert set(removed) <= set(attempt.remove_headers)
        # What the attempt sets is never also taken off.
        assert not set(attempt.remove_headers) & set(attempt.set_headers)
        assert attempt.set_headers["authorization"] == "Bearer sk-provider"
