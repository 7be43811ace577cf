"""How fallback plans become Envoy config and per-request retry controls."""

from __future__ import annotations

from typing import Any

from extproc import envoy_config, fallback
from tollgate.config.schema import Config, Fallback, ModelProvider
from tollgate.providers import adapter_for
from tollgate.request import Attempt

HASH = "0" * 64


def provider(ident: str, scope: str = "ORG:acme") -> dict[str, Any]:
    return {"id": ident, "type": "openai", "scope": scope, "base_url": "http://127.0.0.1:9"}


def key(ident: str, scope: str = "ORG:acme", policy: str | None = None,
        **fb: Any) -> dict[str, Any]:
    return {"id": ident, "name": ident, "scope": scope, "secret_hash": HASH,
            "routing_policy": policy, "config": {"fallback": fb}}


def config(providers: list[dict], keys: list[dict], policies: list[dict] = ()) -> Config:
    return Config.model_validate({
        "orgs": [{"id": "acme", "teams": [{"id": "red"}, {"id": "blue"}]}],
        "model_providers": providers, "routing_policies": list(policies),
        "virtual_keys": keys})


def attempt(provider_id: str, first_byte: float = 120.0, kind: str = "openai") -> Attempt:
    spec = {**provider(provider_id), "type": kind}
    if kind == "bedrock":
        spec["provider_config"] = {"region": "us-east-1"}
    return Attempt(provider_id=provider_id, scheme="http", host="h", port=80, path="/",
                   set_headers={}, remove_headers=[], first_byte_timeout=first_byte,
                   adapter=adapter_for(ModelProvider.model_validate(spec)))


def test_chains_cover_every_order_a_policy_key_may_need():
    cfg = config([provider("a"), provider("b"), provider("c")],
                 [key("k", policy="rp", on=["5xx"])],
                 [{"id": "rp", "name": "rp", "scope": "ORG:acme", "model_providers": ["b", "a"]}])
    assert fallback.chains(cfg) == [("a", "b"), ("b", "a")]


def test_chains_without_policy_follow_the_keys_scope_and_max_attempts():
    cfg = config([provider("a"), provider("r", "TEAM:red"), provider("b", "TEAM:blue")],
                 [key("k", "TEAM:red", on=["timeout"], max_attempts=2),
                  key("quiet", "TEAM:blue")])  # no fallback conditions: no chains
    assert fallback.chains(cfg) == [("a", "r"), ("r", "a")]
    three = config([provider("a"), provider("b"), provider("c")], [key("k", on=["5xx"])])
    chains = fallback.chains(three)
    assert len(chains) == 6 + 6 and ("c", "a", "b") in chains


def test_plans_without_a_rendered_chain_keep_their_longest_rendered_prefix():
    plan = [attempt("a"), attempt("b"), attempt("c")]
    assert [a.provider_id for a in fallback.usable_plan(plan, {("a", "b")})] == ["a", "b"]
    assert [a.provider_id for a in fallback.usable_plan(plan, set())] == ["a"]
    assert fallback.usable_plan(plan, {("a", "b", "c")}) == plan


def test_retry_headers_follow_the_keys_conditions():
    plan = [attempt("a", first_byte=2.5), attempt("b")]
    only_5xx = fallback.retry_headers(Fallback(on=["5xx"]), plan)
    assert only_5xx["x-envoy-retry-on"] == "retriable-status-codes"
    codes = only_5xx["x-envoy-retriable-status-codes"].split(",")
    assert "503" in codes and "529" in codes and "429" not in codes and "499" not in codes
    assert only_5xx["x-envoy-max-retries"] == "1"
    assert only_5xx["x-envoy-upstream-rq-per-try-timeout-ms"] == "2500"

    network = fallback.retry_headers(Fallback(on=["network_error", "rate_limit"]), plan)
    assert set(network["x-envoy-retry-on"].split(",")) == {
        "connect-failure", "refused-stream", "reset", "retriable-status-codes"}
    assert network["x-envoy-retriable-status-codes"] == "429"

    timeout_only = fallback.retry_headers(Fallback(on=["timeout"]), plan)
    assert timeout_only["x-envoy-retry-on"] == "reset"
    assert "x-envoy-retriable-status-codes" not in timeout_only
    # A plan of one is left to Envoy's defaults: no retries, no per-try timeout.
    assert fallback.retry_headers(Fallback(on=["5xx"]), plan[:1]) == {}


def test_rendered_chain_is_an_aggregate_of_provider_clusters_in_plan_order():
    cfg = config([provider("a"), provider("b")], [key("k", on=["5xx"])])
    clusters = {c["name"]: c for c in envoy_config.clusters(cfg)}
    chain = clusters["chain_b_then_a"]
    assert chain["cluster_type"]["typed_config"]["clusters"] == ["provider_b", "provider_a"]
    endpoint = clusters["provider_a"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    assert endpoint["metadata"]["filter_metadata"]["tollgate"]["provider"] == "a"
    # Each attempt of the chain: the endpoint's provider into a header, then the attempt
    # filter, which asks the decision service for that provider's changes.
    options = chain["typed_extension_protocol_options"][envoy_config.HTTP_OPTIONS_NAME]
    names = [f["name"] for f in options["http_filters"]]
    assert names[:2] == ["tollgate.attempt_provider", "tollgate.attempt"]
    assert names[-1] == "envoy.filters.http.upstream_codec"
    (mutation,) = options["http_filters"][0]["typed_config"]["mutations"]["request_mutations"]
    assert mutation["append"]["header"] == {
        "key": envoy_config.ATTEMPT_PROVIDER_HEADER,
        "value": "%UPSTREAM_METADATA(tollgate:provider)%"}
    lua = options["http_filters"][1]["typed_config"]["default_source_code"]["inline_string"]
    assert "local function apply_answer" in lua  # answer.lua comes first
    assert "@" + "CLUSTER@" not in lua and envoy_config.ATTEMPT_PROVIDER_HEADER in lua
    assert "tollgate.attempt" not in {f["name"] for f in envoy_config.http_filters(1 << 20)}
    routes = envoy_config.route_config(cfg)["virtual_hosts"][0]["routes"]
    retrying = [r for r in routes if "retry_policy" in r["route"]]
    assert len(retrying) == 2  # with and without the extra response headers
    for route in retrying:
        assert route["route"]["retry_policy"]["retry_priority"]["name"] == \
            "envoy.retry_priorities.previous_priorities"


def test_rendered_listener_and_extproc_cluster_resist_slow_and_busy_clients():
    from extproc.envoy_config import extproc_clusters, listener
    from tollgate.config.schema import Config

    hcm = listener(Config(), "127.0.0.1", 8080, "/tmp/outage.log")["filter_chains"][0][
        "filters"][0]["typed_config"]
    assert hcm["request_headers_timeout"] == "10s" and hcm["request_timeout"] == "60s"
    assert hcm["max_request_headers_kb"] == 64
    assert hcm["http2_protocol_options"]["max_concurrent_streams"] == 256
    (limits,) = extproc_clusters(["unix:/tmp/x.sock"])[0]["circuit_breakers"]["thresholds"]
    # 2,000 concurrent streams, each holding up to four ext_proc streams, fit.
    assert limits["max_requests"] >= 4 * 2000 and limits["max_pending_requests"] >= 4 * 2000


def test_retry_statuses_follow_the_provider_types_a_plan_may_fall_back_from():
    """A status counts under the key's conditions as each provider type classes it (Bedrock
    answers a model that took too long with 408: a timeout). Worked out once per kind of plan,
    each kind of plan has its own."""
    timeout = Fallback(on=["timeout"])
    from_bedrock = fallback.retry_headers(timeout, [attempt("b", kind="bedrock"), attempt("a")])
    from_openai = fallback.retry_headers(timeout, [attempt("a"), attempt("b", kind="bedrock")])
    assert from_bedrock["x-envoy-retriable-status-codes"] == "408"
    assert set(from_bedrock["x-envoy-retry-on"].split(",")) == {"reset",
                                                                 "retriable-status-codes"}
    assert "x-envoy-retriable-status-codes" not in from_openai  # the last is never left
    assert from_openai["x-envoy-retry-on"] == "reset"
    middle = fallback.retry_headers(timeout, [attempt("a"), attempt("b", kind="bedrock"),
                                              attempt("c")])
    assert middle["x-envoy-retriable-status-codes"] == "408"
    again = fallback.retry_headers(timeout, [attempt("c", 9.0, "bedrock"), attempt("d")])
    assert again["x-envoy-retriable-status-codes"] == "408"
    assert again["x-envoy-upstream-rq-per-try-timeout-ms"] == "9000"  # the plan's own
