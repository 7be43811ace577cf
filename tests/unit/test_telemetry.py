"""Tracing set-up (exporters chosen by the YAML or the OTEL_* variables, swapped on
reload), the client helper, and the access log's targets."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from ulid import ULID

from tests.otlp import OTLPReceiver
from tollgate import telemetry
from tollgate.accesslog import AccessLog
from tollgate.client import gateway_headers
from tollgate.config.schema import Telemetry
from tollgate.ledger import LedgerRow


@pytest.fixture
def receiver():
    r = OTLPReceiver().start()
    yield r
    r.stop()
    telemetry.configure(Telemetry())  # back to no export


def _request(row_id: str) -> telemetry.RequestTrace:
    t = telemetry.start("POST", "/v1/chat/completions", {})
    t.end(LedgerRow(request_id=row_id, ts="", key_id="vk_1", key_name="k", principal="p",
                    org="acme", team=None, project=None, provider=None, model=None,
                    route="chat_completions", status=401, outcome="refused",
                    code="invalid_api_key"))
    return t


def test_no_exporter_records_nothing_but_ids_still_flow(monkeypatch):
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    telemetry.configure(Telemetry())
    t = telemetry.start("POST", "/v1/chat/completions", {
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"})
    assert not t.span.is_recording()
    assert t.trace_id == "0af7651916cd43dd8448eb211c80319c"  # still the caller's trace
    assert t.span_id != "b7ad6b7169203331" and len(t.span_id) == 16
    # Upstream, the provider call nests under it with the caller's sampling decision.
    assert t.traceparent == f"00-{t.trace_id}-{t.span_id}-01"
    attempt = t.start_attempt(SimpleNamespace(model="m"), "chat_completions")
    ctx = attempt.get_span_context()
    assert not attempt.is_recording() and format(ctx.trace_id, "032x") == t.trace_id
    assert format(ctx.span_id, "016x") not in (t.span_id, "0" * 16)
    # Without a caller: a trace of its own, a new one each time, nothing sampled.
    a, b = (telemetry.start("POST", "/v1/messages", {}) for _ in range(2))
    assert a.trace_id != b.trace_id and "0" * 32 not in (a.trace_id, b.trace_id)
    assert a.traceparent.endswith("-00")


def test_yaml_endpoint_over_http_protobuf_exports(receiver):
    telemetry.configure(Telemetry(otlp_endpoint=f"http://127.0.0.1:{receiver.http_port}",
                                  service_name="gw-a"))
    t = _request("req_http")
    telemetry.flush()
    (span,) = receiver.wait_for(t.trace_id, 1)
    assert span.service == "gw-a" and span.attributes["tollgate.request_id"] == "req_http"
    assert span.attributes["tollgate.decision"] == "invalid_api_key"


def test_standard_variables_and_a_reload_that_changes_the_exporter(receiver, monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{receiver.grpc_port}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    telemetry.configure(Telemetry())
    first = _request("req_grpc")
    telemetry.flush()
    receiver.wait_for(first.trace_id, 1)
    # A reload pointing elsewhere: the next spans go there; OTEL_TRACES_EXPORTER=none stops.
    telemetry.configure(Telemetry(otlp_endpoint=f"http://127.0.0.1:{receiver.http_port}",
                                  otlp_protocol="http/protobuf"))
    second = _request("req_after_reload")
    telemetry.flush()
    receiver.wait_for(second.trace_id, 1)
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    telemetry.configure(Telemetry(service_name="changed"))
    assert not telemetry.start("GET", "/", {}).span.is_recording()


def test_gateway_headers_nest_under_the_current_span():
    assert gateway_headers() == {}  # outside any span: nothing to nest under
    tracer = TracerProvider().get_tracer("app")
    with tracer.start_as_current_span("app") as span:
        headers = gateway_headers({"x-team": "web"})
    ctx = span.get_span_context()
    flags = int(ctx.trace_flags)
    assert headers == {"traceparent": f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{flags:02x}",
                       "x-team": "web"}
    parent = trace.get_current_span()  # and nothing leaks once the span has ended
    assert not parent.get_span_context().is_valid


def test_client_helper_imports_nothing_heavy():
    out = subprocess.run([sys.executable, "-c", (
        "import sys, tollgate.client; "
        "print(sorted(m for m in sys.modules if m.startswith(('tollgate.', 'opentelemetry.sdk',"
        " 'grpc', 'prometheus_client', 'redis', 'mitmproxy', 'pydantic'))))")],
        capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.replace("'", '"')) == ["tollgate.client"]


def test_access_log_targets(tmp_path, capsys):
    log = AccessLog()
    log.configure("-", tmp_path)
    log.write({"request_id": "req_1", "status": 200})
    assert json.loads(capsys.readouterr().out) == {"request_id": "req_1", "status": 200}
    log.configure("logs/access.log", tmp_path)  # a reload moves it to a file
    log.write({"request_id": "req_2"})
    log.configure(None, tmp_path)  # and turns it off
    log.write({"request_id": "req_3"})
    lines = (tmp_path / "logs" / "access.log").read_text().splitlines()
    assert [json.loads(x)["request_id"] for x in lines] == ["req_2"]
    assert capsys.readouterr().out == ""


def test_access_log_lines_are_ascii_json_of_whatever_a_row_holds(tmp_path):
    """Non-ASCII escaped (stdout's encoding may not be UTF-8), a lone surrogate kept, and
    values JSON has no type for written as text."""
    log = AccessLog()
    log.configure("access.log", tmp_path)
    records = [{"request_id": "req_1", "principal": "zoë", "model": "gpt-\ud800"},
               {"request_id": "req_2", "ts": datetime(2026, 1, 2, tzinfo=UTC),
                "cost_micros": 2**70},
               {"request_id": "req_3", "status": 200, "overhead_ms": 0.25}]
    for record in records:
        log.write(record)
    log.configure(None, tmp_path)
    text = (tmp_path / "access.log").read_text(encoding="utf-8")
    assert text.isascii() and '"principal":"zo\\u00eb"' in text
    records[1]["ts"] = "2026-01-02 00:00:00+00:00"
    assert [json.loads(x) for x in text.splitlines()] == records


class _Out:
    """stdout that records each write."""

    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)

    def flush(self) -> None:
        pass


def test_access_log_lines_of_one_loop_turn_are_written_together_after_it(monkeypatch):
    """Requests settled in one turn of the loop cost one write; a line written where no loop
    runs is written at once; the last lines of a loop that ends, or of a log turned off,
    are not left pending."""
    out = _Out()
    monkeypatch.setattr("sys.stdout", out)
    log = AccessLog()
    log.configure("-", Path("."))

    async def turn() -> list[str]:
        for i in range(3):
            log.write({"request_id": f"req_{i}"})
        before = list(out.writes)
        await asyncio.sleep(0)  # the flush runs once the callbacks due have run
        await asyncio.sleep(0)
        return before

    assert asyncio.run(turn()) == []
    assert out.writes == ['{"request_id":"req_0"}\n{"request_id":"req_1"}\n'
                          '{"request_id":"req_2"}\n']
    log.write({"request_id": "req_3"})  # no loop: at once
    assert out.writes[-1] == '{"request_id":"req_3"}\n'

    async def last() -> None:
        log.write({"request_id": "req_4"})  # the loop ends right after this

    asyncio.run(last())
    assert out.writes[-1] == '{"request_id":"req_4"}\n'
    asyncio.run(turn())  # a new loop
    assert out.writes[-1] == '{"request_id":"req_0"}\n{"request_id":"req_1"}\n' \
        '{"request_id":"req_2"}\n'
    log.write({"request_id": "req_5"})
    log.configure(None, Path("."))  # turned off: what was pending went where it was meant to
    assert out.writes[-1] == '{"request_id":"req_5"}\n'


def test_an_exporter_that_cannot_start_leaves_tracing_off(monkeypatch, caplog):
    """A broken OTLP install (another package overwrote opentelemetry-proto's files) must
    not stop the gateway: it serves without export and says why."""
    def broken(export):
        raise ImportError("cannot import name 'InstrumentationScope'")

    monkeypatch.setattr(telemetry, "_exporter", broken)
    telemetry.configure(Telemetry(otlp_endpoint="http://127.0.0.1:4318"))
    try:
        assert not telemetry.start("POST", "/v1/chat/completions", {}).span.is_recording()
        assert "force-reinstall --no-deps opentelemetry-proto" in caplog.text
    finally:
        telemetry.configure(Telemetry())


def test_captured_prompts_reach_the_access_log_without_an_exporter(monkeypatch):
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    telemetry.configure(Telemetry(capture_content=True))
    try:
        t = telemetry.start("POST", "/v1/chat/completions", {})
        t.keep_prompt({"model": "m", "messages": [{"role": "user", "content": "MARKER"}]})
        assert not t.span.is_recording() and "MARKER" in (t.prompt or "")
    finally:
        telemetry.configure(Telemetry())
    off = telemetry.start("POST", "/v1/chat/completions", {})
    off.keep_prompt({"messages": [{"role": "user", "content": "MARKER"}]})
    assert off.prompt is None


def test_overwritten_otlp_protos_are_named_with_their_fix(monkeypatch):
    """xds-protos's old copy of the OpenTelemetry protos (no InstrumentationScope) written
    over opentelemetry-proto's: `config validate` and /readyz name it and the fix."""
    import types

    import opentelemetry.proto.common.v1 as common

    from tollgate.telemetry import export_problem

    exporting = Telemetry(otlp_endpoint="http://127.0.0.1:4318")
    assert export_problem(exporting) is None
    old = types.ModuleType("opentelemetry.proto.common.v1.common_pb2")
    old.InstrumentationLibrary = object  # what the old copy has instead
    monkeypatch.setitem(sys.modules, "opentelemetry.proto.common.v1.common_pb2", old)
    monkeypatch.setattr(common, "common_pb2", old, raising=False)
    problem = export_problem(exporting)
    assert problem and "overwrote opentelemetry-proto's files" in problem
    assert "pip install --force-reinstall --no-deps opentelemetry-proto==" in problem
    assert export_problem(Telemetry()) is None  # nothing to export: nothing to say


def test_shadow_decisions_are_on_the_span(receiver):
    telemetry.configure(Telemetry(otlp_endpoint=f"http://127.0.0.1:{receiver.http_port}"))
    t = telemetry.start("POST", "/v1/chat/completions", {})
    shadow = "policy_rules.tools would refuse 403 tool_not_allowed: Tool 'x' is blocked"
    t.end(LedgerRow(request_id="req_shadow", ts="", key_id="vk_1", key_name="k",
                    principal="p", org="acme", team=None, project=None, provider=None,
                    model=None, route="chat_completions", status=200, outcome="completed",
                    shadow=shadow))
    telemetry.flush()
    (span,) = receiver.wait_for(t.trace_id, 1)
    assert span.attributes["tollgate.shadow"] == shadow


def test_a_request_id_is_req_and_a_ulid_of_its_millisecond(monkeypatch):
    # The encoding is python-ulid's, bit for bit (read back by it below).
    assert len({telemetry.new_request_id() for _ in range(2000)}) == 2000
    clock, real = [1_796_451_630_123_456_789, 1_796_451_630_123_999_999,
                   1_796_451_630_124_000_000], telemetry.time.time_ns
    monkeypatch.setattr(telemetry.time, "time_ns", lambda: clock.pop(0) if clock else real())
    # Random bytes whose low five bits count up (and the top three vary).
    monkeypatch.setattr(telemetry.os, "urandom", lambda n: bytes((i * 37) % 256
                                                                 for i in range(n)))
    monkeypatch.setattr(telemetry, "_entropy", telemetry.Entropy())
    ids = [ULID.from_str(telemetry.new_request_id().removeprefix("req_")) for _ in range(3)]
    assert [u.milliseconds for u in ids] == [1_796_451_630_123] * 2 + [1_796_451_630_124]
    # The system's random bytes, each used once, in turn: five bits of each.
    fives = [(i * 37) % 256 & 31 for i in range(48)]
    for n, u in enumerate(ids):
        assert int.from_bytes(u.bytes[6:]) == sum(
            v << 5 * (15 - j) for j, v in enumerate(fives[16 * n:16 * (n + 1)]))
    for ms in (0, 1023, 1024, 2**48 - 1):  # its first and last; either side of a block
        clock.append(ms * 1_000_000)
        assert ULID.from_str(telemetry.new_request_id()[4:]).milliseconds == ms
    assert telemetry.start("GET", "/v1/models", {}).request_id.startswith("req_")


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_child_makes_request_ids_of_its_own():
    """Not its parent's next ones: it reads random bytes of its own."""
    telemetry.new_request_id()  # the pool is read
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.write(write, telemetry.new_request_id().encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child = os.read(read, 100).decode()
    os.close(read)
    ours = telemetry.new_request_id()
    assert ULID.from_str(child[4:]).bytes[6:] != ULID.from_str(ours[4:]).bytes[6:]
