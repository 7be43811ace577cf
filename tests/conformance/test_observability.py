"""Traces exported over OTLP to a real receiver, Prometheus metrics that add up, health that
follows the state, and the JSON access log: on both hosts, with the official SDKs."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client.parser import text_string_to_metric_families

from tests.conformance.test_metering import ledger_row
from tests.conftest import ANTHROPIC_KEY, HOSTS, OPENAI_KEY, PEPPER, Gateway, make_config
from tests.fakes.providers import Behaviour
from tests.harness import GatewayProcess, ledger, tollgate, wait_until
from tests.otlp import OTLPReceiver
from tollgate.client import gateway_headers

ROOT = Path(__file__).resolve().parents[2]
CHAT = {"model": "gpt-5-mini", "messages": [{"role": "user", "content": "hi"}]}
MARKER = "PROMPT-MARKER-7f3a9c"  # must never leave the gateway unless capture is on
SERVER, CLIENT = 2, 3  # OTLP span kinds


@pytest.fixture(scope="module")
def receiver() -> Iterator[OTLPReceiver]:
    r = OTLPReceiver().start()
    yield r
    r.stop()


def _key(config: Path, name: str, *args: str) -> str:
    return json.loads(tollgate("virtual-keys", "create", "--name", name, "--principal",
                               f"{name}@acme.com", *args, "--format", "json",
                               config=config).stdout)["secret"]


class Observed:
    """A gateway exporting to the receiver, with one key per kind of outcome."""

    def __init__(self, gateway: Gateway, keys: dict[str, str]):
        self.gateway, self.keys = gateway, keys

    def client(self, key: str = "plain", **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.gateway.openai_base, api_key=self.keys[key],
                             max_retries=0, **kw)

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = httpx.get(f"{self.gateway.process.admin_url}/metrics", timeout=10).text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def access_log(self) -> list[dict]:
        path = self.gateway.config.parent / "access.log"
        return [json.loads(line) for line in path.read_text().splitlines()]


def _setup(config: Path, receiver: OTLPReceiver, host: str) -> dict[str, str]:
    text = config.read_text()
    # mitmproxy's gateway is pointed at the receiver by the YAML, Envoy's by the standard
    # OTEL_EXPORTER_OTLP_* variables (see the fixture).
    endpoint = f"    otlp_endpoint: http://127.0.0.1:{receiver.grpc_port}\n" \
        "    otlp_protocol: grpc\n" if host == "mitmproxy" else ""
    config.write_text(text.replace("  max_body_bytes:", "  telemetry:\n" + endpoint +
                                   "    access_log: access.log\n  max_body_bytes:", 1))
    keys = {"plain": _key(config, "plain", "--scope", "TEAM:team_eng"),
            "claude_only": _key(config, "claude", "--scope", "ORG:acme",
                                "--models-allowed", "claude-*"),
            "broke": _key(config, "broke", "--scope", "PROJECT:proj_web"),
            "limited": _key(config, "limited", "--scope", "ORG:acme", "--rpm", "1")}
    tollgate("gateway-budgets", "create", "--id", "b_web", "--name", "web", "--scope",
             "project", "--project", "proj_web", "--limit", "0.000001", config=config)
    policy = json.loads(tollgate(
        "routing-policies", "create", "--scope", "ORG:acme", "--name", "failover",
        "--model-provider", "mp_openai", "--model-provider", "mp_anthropic",
        "--format", "json", config=config).stdout)["id"]
    keys["fallback"] = _key(config, "fallback", "--scope", "ORG:acme", "--routing-policy",
                            policy, "--config-json", '{"fallback": {"on": ["5xx"]}}')
    return keys


@pytest.fixture(scope="module", params=HOSTS)
def observed(request, receiver, tmp_path_factory, fake_openai, fake_anthropic
             ) -> Iterator[Observed]:
    host = request.param
    directory = tmp_path_factory.mktemp(f"observed-{host}")
    config = make_config(directory, fake_openai, fake_anthropic)
    keys = _setup(config, receiver, host)
    env = {"OTEL_BSP_SCHEDULE_DELAY": "100"}
    if host == "envoy":
        env.update(OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{receiver.grpc_port}",
                   OTEL_EXPORTER_OTLP_PROTOCOL="grpc", OTEL_SERVICE_NAME="tollgate-sidecar")
    process = GatewayProcess(host, config, directory, env=env).start()
    yield Observed(Gateway(host, process, config), keys)
    process.stop()


def test_call_nests_under_the_callers_span_with_usage_and_cost(observed, receiver):
    tracer = TracerProvider().get_tracer("app")
    with tracer.start_as_current_span("answer-question") as app_span:
        raw = observed.client().chat.completions.with_raw_response.create(
            **CHAT, extra_headers=gateway_headers())
        ctx = app_span.get_span_context()
    app_trace, app_span_id = format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")
    assert raw.headers["x-langwatch-trace-id"] == app_trace
    gateway_span_id = raw.headers["x-langwatch-span-id"]
    row = ledger_row(observed.gateway, raw.headers["x-langwatch-request-id"])

    spans = receiver.wait_for(app_trace, 2)
    server = next(s for s in spans if s.kind == SERVER)
    assert server.span_id == gateway_span_id and server.parent_span_id == app_span_id
    a = server.attributes
    assert a["tollgate.request_id"] == row.request_id and a["tollgate.decision"] == "allowed"
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.provider.name"] == "openai"
    assert a["gen_ai.request.model"] == "gpt-5-mini" == a["gen_ai.response.model"]
    assert a["gen_ai.usage.input_tokens"] == row.input_tokens + row.cached_input_tokens > 0
    assert a["gen_ai.usage.output_tokens"] == row.output_tokens > 0
    assert a["tollgate.cost_usd"] == pytest.approx(row.cost_micros / 1e6) and row.cost_micros
    assert a["tollgate.key_id"] == row.key_id and a["tollgate.principal"] == "plain@acme.com"
    assert a["tollgate.team"] == "team_eng" and a["tollgate.fallback_count"] == 0
    assert "gen_ai.input.messages" not in a  # prompts stay out unless capture is on
    (attempt,) = [s for s in spans if s.kind == CLIENT]
    assert attempt.parent_span_id == gateway_span_id
    assert attempt.name == "chat gpt-5-mini"
    assert attempt.attributes["tollgate.provider"] == "mp_openai"
    assert attempt.attributes["http.response.status_code"] == 200
    expected = "tollgate" if observed.gateway.host == "mitmproxy" else "tollgate-sidecar"
    assert server.service == expected


def test_fallback_shows_as_two_provider_attempts(observed, receiver, fake_openai):
    fake_openai.enqueue(Behaviour("fail", status=503))
    raw = observed.client("fallback").chat.completions.with_raw_response.create(**CHAT)
    assert raw.headers["x-langwatch-fallback-count"] == "1"
    spans = receiver.wait_for(raw.headers["x-langwatch-trace-id"], 3)
    server = next(s for s in spans if s.kind == SERVER)
    assert server.parent_span_id == ""  # no caller span: the gateway's is the root
    assert server.attributes["tollgate.fallback_count"] == 1
    assert server.attributes["tollgate.provider"] == "mp_anthropic"
    assert server.attributes["gen_ai.provider.name"] == "anthropic"
    assert server.attributes["tollgate.fallbacks"] == "mp_openai:5xx"
    attempts = {s.attributes["tollgate.provider"]: s for s in spans if s.kind == CLIENT}
    assert set(attempts) == {"mp_openai", "mp_anthropic"}
    assert attempts["mp_openai"].attributes["error.type"] == "5xx"
    assert attempts["mp_openai"].status_code == 2
    assert attempts["mp_anthropic"].attributes["gen_ai.usage.output_tokens"] > 0
    assert all(s.parent_span_id == server.span_id for s in attempts.values())


def test_refused_request_has_a_span_with_the_refusal(observed, receiver):
    with pytest.raises(openai.PermissionDeniedError) as e:
        observed.client("claude_only").chat.completions.create(**CHAT)
    trace_id = e.value.response.headers["x-langwatch-trace-id"]
    (span,) = receiver.wait_for(trace_id, 1)
    assert span.attributes["tollgate.decision"] == "model_not_allowed"
    assert span.attributes["http.response.status_code"] == 403
    assert span.attributes["tollgate.principal"] == "claude@acme.com"


def _count(samples, name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items()
               if n == name and all(dict(ls).get(k) == want for k, want in labels.items()))


def test_requests_in_flight_counts_those_not_yet_settled(observed, fake_openai):
    """A stream is in flight from its decision to its settlement, and no longer."""
    def in_flight() -> float:
        return _count(observed.metrics(), "tollgate_requests_in_flight")

    fake_openai.chunk_delay = 0.2
    try:
        stream = observed.client().chat.completions.create(**CHAT, stream=True)
        next(iter(stream))
        assert in_flight() == 1
        assert list(stream)
    finally:
        fake_openai.chunk_delay = 0.0
    wait_until(lambda: in_flight() == 0, timeout=10, what="the stream to be settled")


def test_a_streams_time_to_first_byte_is_its_first_events_not_a_later_one(observed,
                                                                          fake_openai):
    """Envoy's meter posts a stream's first bytes with a later batch (here the next event,
    0.3 s on): the time to first byte is still the first event's."""
    def first_byte(kind: str) -> float:
        return _count(observed.metrics(), f"tollgate_time_to_first_byte_seconds_{kind}",
                      provider="mp_openai")

    before = first_byte("sum"), first_byte("count")
    fake_openai.chunk_delay = 0.3
    try:
        assert list(observed.client().chat.completions.create(**CHAT, stream=True))
    finally:
        fake_openai.chunk_delay = 0.0
    wait_until(lambda: first_byte("count") == before[1] + 1, timeout=10,
               what="the stream's time to first byte")
    assert first_byte("sum") - before[0] < 0.2


def test_metrics_add_up_after_a_mixed_run(observed, fake_openai):
    before = observed.metrics()
    sent = {"served": 0}
    for _ in range(2):
        observed.client().chat.completions.create(**CHAT)
        sent["served"] += 1
    assert list(observed.client().chat.completions.create(**CHAT, stream=True))
    sent["served"] += 1
    with pytest.raises(openai.PermissionDeniedError):
        observed.client("claude_only").chat.completions.create(**CHAT)
    with pytest.raises(openai.APIStatusError) as e:
        observed.client("broke").chat.completions.create(**CHAT)
    assert e.value.status_code == 402
    observed.client("limited").chat.completions.create(**CHAT)
    sent["served"] += 1
    with pytest.raises(openai.RateLimitError):
        observed.client("limited").chat.completions.create(**CHAT)
    fake_openai.enqueue(Behaviour("fail", status=503))
    observed.client("fallback").chat.completions.create(**CHAT)

    def delta(name: str, **labels: str) -> float:
        return _count(observed.metrics(), name, **labels) - _count(before, name, **labels)

    chat = {"route": "chat_completions"}
    wait_until(lambda: delta("tollgate_requests_total", **chat) == 8, timeout=10,
               what="every request to be counted")
    after = observed.metrics()
    assert delta("tollgate_requests_total", status="200", provider="mp_openai",
                 model="gpt-5-mini", code="", **chat) == sent["served"]
    assert delta("tollgate_requests_total", status="200", provider="mp_anthropic",
                 **chat) == 1
    assert delta("tollgate_requests_total", status="403", code="model_not_allowed",
                 provider="", model="", **chat) == 1
    assert delta("tollgate_requests_total", status="402", code="budget_exceeded", **chat) == 1
    assert delta("tollgate_requests_total", status="429", code="rate_limited", **chat) == 1
    assert delta("tollgate_rate_limit_rejections_total", scope="key", dimension="rpm") == 1
    assert delta("tollgate_fallbacks_total", provider="mp_openai", reason="5xx") == 1
    assert delta("tollgate_gateway_overhead_seconds_count", **chat) == 8
    assert delta("tollgate_upstream_duration_seconds_count") == 5
    assert delta("tollgate_time_to_first_byte_seconds_count", provider="mp_openai") == 1
    # Tokens and cost agree with the ledger, to the token and the micro-dollar.
    rows = [r for r in ledger(observed.gateway.config)
            if r.route == "chat_completions" and r.provider]
    assert _count(after, "tollgate_tokens_total", type="output") == \
        sum(r.output_tokens for r in rows)
    assert _count(after, "tollgate_cost_usd_total") == \
        pytest.approx(sum(r.cost_micros for r in rows) / 1e6)
    # Read when scraped: budgets, breakers and reloads.
    assert _count(after, "tollgate_budget_limit_usd", budget="b_web") == 0.000001
    assert _count(after, "tollgate_budget_utilization_ratio", budget="b_web") == 0
    assert ("tollgate_circuit_breaker_open", (("provider", "mp_openai"),)) in after
    assert ("tollgate_config_reloads_total", (("result", "failed"),)) in after
    # Every series the shipped Grafana dashboard queries is one the gateway exports.
    dashboard = json.loads((ROOT / "config" / "grafana" / "tollgate.json").read_text())
    queried = {name for p in dashboard["panels"] for t in p["targets"]
               for name in re.findall(r"\b(tollgate_\w+)", t["expr"])}
    assert len(queried) >= 10 and queried <= {n for n, _ in after}, \
        queried - {n for n, _ in after}
    # No per-request or per-key label anywhere.
    labels = {k for (_, ls) in after for k, _ in ls}
    assert not labels & {"request_id", "key", "key_id", "principal"}
    if observed.gateway.host == "envoy":  # Envoy's own stats ride along
        assert any(n.startswith("envoy_cluster_upstream_rq") for n, _ in after)
        assert _count(after, "envoy_cluster_health_check_healthy",
                      envoy_cluster_name="tollgate_extproc") == 1


def test_web_searches_are_counted_as_the_ledger_counts_them(observed):
    """`tollgate_web_searches_total` grows by the searches a request ran, as its ledger row
    says, beside its cost."""
    def searches() -> float:
        return _count(observed.metrics(), "tollgate_web_searches_total",
                      provider="mp_openai", model="gpt-5-mini")

    before = searches()
    raw = observed.client().responses.with_raw_response.create(
        model="gpt-5-mini", input="news?", tools=[{"type": "web_search"}], max_tool_calls=2)
    row = ledger_row(observed.gateway, raw.headers["x-langwatch-request-id"])
    assert row.web_search_requests == 2
    wait_until(lambda: searches() == before + 2, timeout=10, what="the searches counted")


def test_access_log_lines_are_json_without_secrets_or_prompts(observed):
    raw = observed.client().chat.completions.with_raw_response.create(
        model="gpt-5-mini", messages=[{"role": "user", "content": f"say {MARKER}"}])
    request_id = raw.headers["x-langwatch-request-id"]
    with pytest.raises(openai.PermissionDeniedError):
        observed.client("claude_only").chat.completions.create(**CHAT)
    lines = wait_until(lambda: (lines := observed.access_log()) and any(
        line["request_id"] == request_id for line in lines) and lines, timeout=10,
        what="the access-log line")
    line = next(x for x in lines if x["request_id"] == request_id)
    row = ledger_row(observed.gateway, request_id)
    for name in ("key_id", "principal", "team", "provider", "model", "input_tokens",
                 "output_tokens", "cost_micros", "status", "outcome"):
        assert line[name] == getattr(row, name), name
    assert line["trace_id"] == raw.headers["x-langwatch-trace-id"]
    assert line["overhead_ms"] >= 0
    refused = [x for x in lines if x.get("code") == "model_not_allowed"]
    assert refused and refused[-1]["status"] == 403 and refused[-1]["provider"] is None
    text = (observed.gateway.config.parent / "access.log").read_text()
    for secret in (*observed.keys.values(), OPENAI_KEY, ANTHROPIC_KEY, PEPPER, MARKER):
        assert secret not in text


def test_a_rejected_reload_keeps_the_gateway_ready_and_says_so(observed):
    """One typo in a config shared by every replica must not pull them all out of
    rotation: the last good config still serves, and the rejection is reported."""
    admin = observed.gateway.process.admin_url
    assert httpx.get(f"{admin}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{admin}/readyz").status_code == 200
    config = observed.gateway.config
    good = config.read_bytes()
    try:
        config.write_bytes(good.replace(b"max_body_bytes:", b"max_body_byte:", 1))
        said = wait_until(lambda: (r := httpx.get(f"{admin}/readyz")) and
                          "max_body_byte" in r.text and r, timeout=5,
                          what="readyz to report the rejected reload")
        assert said.status_code == 200 and said.json()["status"] == "ready"
        assert "rejected" in " ".join(said.json()["degraded"])
        assert said.json()["problems"] == []
        assert _count(observed.metrics(), "tollgate_config_reload_failing") == 1
        assert "max_body_byte" in observed.gateway.process.log()
        assert observed.client().chat.completions.create(**CHAT).choices  # still serves
    finally:
        config.write_bytes(good)
    wait_until(lambda: httpx.get(f"{admin}/readyz").json()["degraded"] == [], timeout=5,
               what="readyz to recover")


def test_reload_turns_on_prompt_capture_and_team_labels(observed, receiver):
    """Last in the module: it changes this gateway's telemetry settings (a reload)."""
    config = observed.gateway.config
    assert not _count(observed.metrics(), "tollgate_cost_usd_total", team="team_eng")
    config.write_text(config.read_text().replace("    access_log: access.log",
                                                 "    access_log: access.log\n"
                                                 "    capture_content: true\n"
                                                 "    metric_labels: [team]", 1))
    observed.gateway.wait_for_config()
    raw = observed.client().chat.completions.with_raw_response.create(
        model="gpt-5-mini", messages=[{"role": "user", "content": f"say {MARKER}"}])
    (server,) = [s for s in receiver.wait_for(raw.headers["x-langwatch-trace-id"], 2)
                 if s.kind == SERVER]
    assert MARKER in server.attributes["gen_ai.input.messages"]
    wait_until(lambda: MARKER in (config.parent / "access.log").read_text(), timeout=5,
               what="the prompt in the access log")
    row = ledger_row(observed.gateway, raw.headers["x-langwatch-request-id"])
    assert _count(observed.metrics(), "tollgate_cost_usd_total", team="team_eng") == \
        pytest.approx(row.cost_micros / 1e6)


@pytest.mark.parametrize("host", HOSTS)
def test_stdout_is_the_json_access_log_alone(host, tmp_path, fake_openai, fake_anthropic):
    """What a log shipper reads from a gateway's stdout is one JSON object per request and
    nothing else: the proxy's own lines (mitmproxy's log and flow lines, Envoy's) and the
    gateway's diagnostics go to stderr."""
    config = make_config(tmp_path, fake_openai, fake_anthropic)
    secret = _key(config, "plain", "--scope", "ORG:acme")
    stdout = tmp_path / "stdout.jsonl"
    gw = GatewayProcess(host, config, tmp_path, stdout=stdout).start()
    try:
        client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=secret, max_retries=0)
        ids = [client.chat.completions.with_raw_response.create(**CHAT).headers[
            "x-langwatch-request-id"] for _ in range(2)]
        refused = httpx.post(f"{gw.url}/v1/chat/completions", json=CHAT, timeout=10,
                             headers={"authorization": "Bearer tg-not-a-key"})
        ids.append(refused.headers["x-langwatch-request-id"])
        wait_until(lambda: set(ids) <= {json.loads(line)["request_id"] for line in
                                        stdout.read_text().splitlines()},
                   timeout=10, what="the access log lines")
    finally:
        gw.stop()
    lines = stdout.read_text().splitlines()
    assert lines and all(isinstance(json.loads(line), dict) for line in lines), lines[:5]
    assert "listening" in gw.log() or host == "envoy"  # the proxy's own lines: in stderr
