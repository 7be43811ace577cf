"""The request metrics one finished request counts (tollgate.metrics.observe)."""

from __future__ import annotations

from tollgate import metrics
from tollgate.ledger import LedgerRow


def row(provider: str | None, model: str | None, **values: object) -> LedgerRow:
    return LedgerRow(request_id="req_1", ts="2026-12-01T00:00:00+00:00", key_id="vk_1",
                     key_name="k", principal=None, org="acme", team="team_eng",
                     project=None, provider=provider, model=model,
                     route="chat_completions", **values)  # type: ignore[arg-type]


def sample(name: str, **labels: str) -> float | None:
    return metrics.REGISTRY.get_sample_value(name, labels)


def test_a_request_counts_in_the_series_its_labels_name_and_only_those_it_used():
    """Each request of the same labels adds to the same series; token types, cost and web
    searches it did not use get no series (none appears at zero), a model nobody named is
    `other`, and a request another has the same labels as counts where it did."""
    provider, known = "mp_metrics_one", frozenset({"gpt-metrics"})
    served = row(provider, "gpt-metrics", input_tokens=8, status=200, outcome="completed")
    for _ in range(2):
        metrics.observe(served, decision_seconds=0.0002, response_seconds=0.0001,
                        upstream_seconds=0.003, known_models=known)
    requests = {"route": "chat_completions", "status": "200", "code": "",
                "provider": provider, "model": "gpt-metrics"}
    assert sample("tollgate_requests_total", **requests) == 2
    assert sample("tollgate_upstream_duration_seconds_count", provider=provider) == 2
    assert sample("tollgate_upstream_duration_seconds_sum", provider=provider) == 0.006
    tokens = {"provider": provider, "model": "gpt-metrics", "team": "", "project": ""}
    assert sample("tollgate_tokens_total", type="input", **tokens) == 16
    for unused in ("cached_input", "cache_write", "output"):
        assert sample("tollgate_tokens_total", type=unused, **tokens) is None
    assert sample("tollgate_cost_usd_total", **tokens) is None
    assert sample("tollgate_web_searches_total", **tokens) is None
    assert sample("tollgate_time_to_first_byte_seconds_count", provider=provider,
                  model="gpt-metrics") is None

    priced = row(provider, "unnamed-model", output_tokens=5, cost_micros=2_500_000,
                 web_search_requests=1, status=200, outcome="completed")
    metrics.observe(priced, decision_seconds=0.0, first_byte_seconds=0.01,
                    upstream_seconds=0.02, labels=["team"], known_models=known)
    other = {**tokens, "model": "other", "team": "team_eng"}
    assert sample("tollgate_tokens_total", type="output", **other) == 5
    assert sample("tollgate_cost_usd_total", **other) == 2.5
    assert sample("tollgate_web_searches_total", **other) == 1
    assert sample("tollgate_time_to_first_byte_seconds_count", provider=provider,
                  model="other") == 1
    assert sample("tollgate_upstream_duration_seconds_count", provider=provider) == 3


def test_a_refusal_counts_as_a_request_and_in_no_providers_series():
    before = sample("tollgate_requests_total", route="chat_completions", status="402",
                    code="budget_exceeded", provider="", model="") or 0
    refused = row(None, None, status=402, outcome="refused", code="budget_exceeded")
    metrics.observe(refused, decision_seconds=0.0004, upstream_seconds=None)
    assert sample("tollgate_requests_total", route="chat_completions", status="402",
                  code="budget_exceeded", provider="", model="") == before + 1
    assert sample("tollgate_upstream_duration_seconds_count", provider="") is None
