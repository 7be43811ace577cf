"""Request ids, W3C trace context and the gateway's spans, exported over OTLP.

Each request gets a server span (the child of the caller's `traceparent`) and one client
span per provider attempt, with OpenTelemetry's GenAI attributes. With no exporter
configured, spans are not recorded at all: the ids still exist (they go back to the client
and upstream) but no attribute is computed.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import random
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import (
    INVALID_SPAN_CONTEXT,
    NonRecordingSpan,
    SpanContext,
    Status,
    StatusCode,
    TraceState,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:
    from tollgate.config.schema import Telemetry
    from tollgate.ledger import LedgerRow
    from tollgate.request import Attempt

log = logging.getLogger("tollgate.telemetry")
_propagator = TraceContextTextMapPropagator()
# A prompt kept on a span (with capture_content) is cut at this many characters.
MAX_CAPTURED_CHARS = 32 * 1024
# A replaced exporter keeps sending the spans of requests still running for this long.
_RETIRE_AFTER = 300.0

# The GenAI operation each route is.
OPERATIONS = {"chat_completions": "chat", "messages": "chat", "responses": "chat",
              "embeddings": "embeddings", "count_tokens": "count_tokens", "models": "models"}


@dataclass(frozen=True)
class _Export:
    """What the spans are exported with; a change builds a new tracer provider."""

    endpoint: str | None  # None: the exporter reads the OTEL_EXPORTER_OTLP_* variables
    protocol: str
    service_name: str
    enabled: bool


class _Tracing:
    def __init__(self) -> None:
        self.export: _Export | None = None
        self.provider = TracerProvider(sampler=ALWAYS_OFF)
        self.tracer = self.provider.get_tracer("tollgate")
        self.capture_content = False
        self.recording = False  # spans are exported: worth the SDK's work
        self._lock = threading.Lock()

    def configure(self, settings: Telemetry) -> None:
        self.capture_content = settings.capture_content
        wanted = _export_for(settings)
        with self._lock:
            if wanted == self.export:
                return
            provider = _provider_for(wanted)
            old, self.provider, self.export = self.provider, provider, wanted
            self.tracer = provider.get_tracer("tollgate")
            self.recording = provider.sampler is not ALWAYS_OFF
        if wanted.enabled:
            log.info("exporting traces over OTLP (%s) to %s", wanted.protocol,
                     wanted.endpoint or "the endpoint in OTEL_EXPORTER_OTLP_*")
        # Spans of requests still running end on the provider they started on.
        retire = threading.Timer(_RETIRE_AFTER, old.shutdown)
        retire.daemon = True
        retire.start()

    def flush(self) -> None:
        self.provider.force_flush()


def _export_for(settings: Telemetry) -> _Export:
    env = os.environ
    endpoint = settings.otlp_endpoint
    configured = endpoint or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or \
        env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    exporter = env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower()
    disabled = env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"
    protocol = settings.otlp_protocol or env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or \
        env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf"
    return _Export(endpoint=endpoint, protocol=protocol,
                   service_name=settings.service_name or env.get("OTEL_SERVICE_NAME")
                   or "tollgate",
                   enabled=bool(configured) and exporter == "otlp" and not disabled)


def proto_fix() -> str:
    """The command that puts opentelemetry-proto's own files back."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        pinned = f"=={version('opentelemetry-proto')}"
    except PackageNotFoundError:
        pinned = ""
    return f"pip install --force-reinstall --no-deps opentelemetry-proto{pinned}"


def export_problem(settings: Telemetry) -> str | None:
    """Why spans the config asks to export would not be: xds-protos (the Envoy protos) ships
    an old copy of the OpenTelemetry protos at opentelemetry-proto's paths, and a plain
    `pip install` may write it last."""
    if not _export_for(settings).enabled:
        return None
    try:
        from opentelemetry.proto.common.v1 import common_pb2
    except ImportError as e:
        return f"traces cannot be exported: {e}; run {proto_fix()}"
    if not hasattr(common_pb2, "InstrumentationScope"):
        return ("traces cannot be exported: another package (xds-protos) overwrote "
                f"opentelemetry-proto's files with an older copy; run {proto_fix()}")
    return None


def _provider_for(export: _Export) -> TracerProvider:
    if not export.enabled:
        return TracerProvider(sampler=ALWAYS_OFF)
    try:
        exporter = _exporter(export)
    except Exception as e:  # tracing must never stop the gateway from serving
        log.error("traces are not exported: the OTLP exporter cannot start (%s: %s). If it "
                  "names opentelemetry.proto, another package overwrote opentelemetry-proto's "
                  "files: %s", e.__class__.__name__, e, proto_fix())
        return TracerProvider(sampler=ALWAYS_OFF)
    # The sampler is the SDK's default (parent-based, always on) unless OTEL_TRACES_SAMPLER
    # says otherwise.
    provider = TracerProvider(resource=Resource.create({"service.name": export.service_name}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def _exporter(export: _Export) -> Any:
    endpoint = export.endpoint
    if export.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        if endpoint is None:
            return OTLPSpanExporter()
        return OTLPSpanExporter(endpoint=endpoint, insecure=endpoint.startswith("http://"))
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HTTPSpanExporter,
    )

    if endpoint is None:
        return HTTPSpanExporter()
    # Like OTEL_EXPORTER_OTLP_ENDPOINT, the setting is the collector's base address.
    if not endpoint.rstrip("/").endswith("/v1/traces"):
        endpoint = endpoint.rstrip("/") + "/v1/traces"
    return HTTPSpanExporter(endpoint=endpoint)


_tracing = _Tracing()


def configure(settings: Telemetry) -> None:
    """Apply `gateway.telemetry` (at start and on every reload)."""
    _tracing.configure(settings)


def flush() -> None:
    """Send the spans still queued (before the process exits)."""
    _tracing.flush()


@dataclass
class RequestTrace:
    request_id: str
    # A span that records; or, when nothing does, the ids of one, made into a span only if
    # something asks for it (`span`): a request's path reads its ids alone.
    recorded: trace.Span | None
    ids: tuple[int, int, TraceState] | None = None  # trace id, span id, caller's state
    started: float = field(default_factory=time.perf_counter)
    decided: float | None = None  # when the gateway had decided (forwarded or answered)
    prompt: str | None = None  # kept only with capture_content
    parent_flags: int = 0  # the caller's trace flags (sampled), from its traceparent

    @functools.cached_property
    def span(self) -> trace.Span:
        if self.recorded is not None:
            return self.recorded
        assert self.ids is not None
        trace_id, span_id, state = self.ids
        return NonRecordingSpan(SpanContext(trace_id, span_id, is_remote=False,
                                            trace_state=state))

    # Read for the answer's headers, traceparent, the ledger and the access log.
    @functools.cached_property
    def trace_id(self) -> str:
        ids = self.ids
        return format(ids[0] if ids is not None else
                      self.span.get_span_context().trace_id, "032x")

    @functools.cached_property
    def span_id(self) -> str:
        ids = self.ids
        return format(ids[1] if ids is not None else
                      self.span.get_span_context().span_id, "016x")

    @property
    def traceparent(self) -> str:
        """Sent upstream so the provider call nests under the gateway span. A gateway that
        records nothing passes the caller's sampling decision on unchanged."""
        span = self.recorded
        flags = int(span.get_span_context().trace_flags) \
            if span is not None and span.is_recording() else self.parent_flags
        return f"00-{self.trace_id}-{self.span_id}-{flags:02x}"

    @property
    def decision_seconds(self) -> float:
        return (self.decided or time.perf_counter()) - self.started

    def headers(self, prefix: str, provider: str, fallback_count: int) -> dict[str, str]:
        return {
            f"{prefix}Request-Id": self.request_id,
            f"{prefix}Trace-Id": self.trace_id,
            f"{prefix}Span-Id": self.span_id,
            f"{prefix}Fallback-Count": str(fallback_count),
            f"{prefix}Provider": provider,
        }

    def keep_prompt(self, doc: dict[str, Any]) -> None:
        """The request's messages, for the span and the access log, when capture_content is
        on (with or without an exporter)."""
        if _tracing.capture_content:
            messages = {k: doc[k] for k in ("system", "messages", "input", "instructions")
                        if k in doc}
            self.prompt = json.dumps(messages)[:MAX_CAPTURED_CHARS]

    def start_attempt(self, attempt: Attempt, route: str) -> trace.Span:
        """A client span for one provider attempt."""
        if not _tracing.recording:
            if self.ids is not None:
                return _unrecorded(self.ids[0], self.ids[2])
            return _unrecorded(*_of(self.span.get_span_context()))
        operation = OPERATIONS.get(route, route)
        span = _tracing.tracer.start_span(
            f"{operation} {attempt.model}", context=trace.set_span_in_context(self.span),
            kind=trace.SpanKind.CLIENT)
        if span.is_recording():
            span.set_attributes({
                "gen_ai.operation.name": operation,
                "gen_ai.provider.name": attempt.adapter.gen_ai_provider,
                "gen_ai.system": attempt.adapter.gen_ai_provider,
                "gen_ai.request.model": attempt.model,
                "server.address": attempt.host, "server.port": attempt.port,
                "tollgate.provider": attempt.provider_id,
            })
        return span

    def end(self, row: LedgerRow, *, requested_model: str | None = None,
            provider_name: str | None = None, error: str | None = None,
            end_time: int | None = None) -> None:
        """End the gateway span with what the request came to (its ledger row); at
        `end_time` (nanoseconds since the epoch; None: now)."""
        span = self.recorded
        if span is None:  # (a span that records nothing ends as it is)
            return
        if span.is_recording():
            operation = OPERATIONS.get(row.route, row.route)
            attributes: dict[str, Any] = {
                "gen_ai.operation.name": operation,
                "tollgate.request_id": row.request_id,
                "tollgate.decision": "allowed" if row.code is None else row.code,
                "tollgate.outcome": row.outcome,
                "http.response.status_code": row.status or 0,
            }
            for name, value in (("tollgate.key_id", row.key_id),
                                ("tollgate.principal", row.principal),
                                ("tollgate.team", row.team), ("tollgate.project", row.project),
                                ("gen_ai.request.model", requested_model or row.model),
                                ("tollgate.fallbacks", row.fallbacks),
                                ("tollgate.skipped", row.skipped),
                                ("tollgate.shadow", row.shadow),
                                ("gen_ai.input.messages", self.prompt)):
                if value:
                    attributes[name] = value
            if row.provider is not None:
                attributes.update({
                    "tollgate.provider": row.provider,
                    "gen_ai.provider.name": provider_name or "",
                    "gen_ai.system": provider_name or "",
                    "gen_ai.response.model": row.model or "",
                    "gen_ai.usage.input_tokens": row.input_tokens + row.cached_input_tokens
                    + row.cache_write_tokens,
                    "gen_ai.usage.output_tokens": row.output_tokens,
                    "tollgate.cost_usd": row.cost_micros / 1_000_000,
                    "tollgate.fallback_count": row.fallback_count,
                    "tollgate.usage_reported": row.usage_reported,
                })
            span.set_attributes(attributes)
            if error or (row.status or 0) >= 500:
                span.set_status(Status(StatusCode.ERROR, error or f"status {row.status}"))
                span.set_attribute("error.type", row.code or error or str(row.status))
        span.end(end_time)


def end_attempt(span: trace.Span, status: int | None, *, failure: str | None = None,
                input_tokens: int = 0, output_tokens: int = 0,
                end_time: int | None = None) -> None:
    """End one provider attempt's span: how it answered, or why the gateway moved on; at
    `end_time` (nanoseconds since the epoch; None: now)."""
    if span.is_recording():
        if status is not None:
            span.set_attribute("http.response.status_code", status)
        if failure is not None:
            span.set_attribute("error.type", failure)
            span.set_status(Status(StatusCode.ERROR, failure))
        else:
            span.set_attributes({"gen_ai.usage.input_tokens": input_tokens,
                                 "gen_ai.usage.output_tokens": output_tokens})
    span.end(end_time)



_IDS = RandomIdGenerator()  # the SDK's own
_NO_STATE = INVALID_SPAN_CONTEXT.trace_state  # a root span's: empty


def _of(context: SpanContext) -> tuple[int, TraceState]:
    """A span's trace id (0: none) and trace state, for the spans under it."""
    return context.trace_id if context.is_valid else 0, context.trace_state


def _new_ids(trace_id: int, state: TraceState) -> tuple[int, int, TraceState]:
    """Ids for a span that records nothing: its trace's (a new one for 0), a new span id, as
    the SDK's generator makes them (random bits, never 0), from one draw."""
    bits = random.getrandbits(192)
    new_trace, span_id = bits >> 64, bits & 0xFFFF_FFFF_FFFF_FFFF
    if not new_trace or not span_id:
        new_trace, span_id = _IDS.generate_trace_id(), _IDS.generate_span_id()
    return trace_id or new_trace, span_id, state


def _unrecorded(trace_id: int, state: TraceState) -> trace.Span:
    """What the SDK makes of a span when nothing is exported (ALWAYS_OFF), without its
    sampler and processor calls: new ids (the parent's trace id) and no flags."""
    trace_id, span_id, _ = _new_ids(trace_id, state)
    return NonRecordingSpan(SpanContext(trace_id, span_id, is_remote=False, trace_state=state))


def recording() -> bool:
    """Spans are exported (a request's span then holds what the decision found)."""
    return _tracing.recording


_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # a ULID's base 32
_PAIRS = [a + b for a in _CROCKFORD for b in _CROCKFORD]  # ten bits a pair
# A random byte as a ULID character: its low five bits (a byte's 256 values cover the 32
# characters evenly).
_RANDOM_CHARACTERS = bytes(_CROCKFORD.encode()[b & 31] for b in range(256))


class Entropy:
    """The operating system's random bytes (`os.urandom`), read 4 KiB at a time and handed
    out in turn as ULID characters, five random bits each: a `getrandom` call and the
    base 32 of each request id's 80 bits cost some 15 µs of a decision, cold. A forked
    child reads its own (it must not repeat its parent's ids)."""

    SIZE = 4096

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool, self._at = "", 0

    def take(self, n: int) -> str:
        """`n` random ULID characters."""
        with self._lock:
            if self._at + n > len(self._pool):
                self._pool = os.urandom(max(self.SIZE, n)).translate(
                    _RANDOM_CHARACTERS).decode("ascii")
                self._at = 0
            start = self._at
            self._at += n
        return self._pool[start:start + n]

    def forget(self) -> None:
        self._lock = threading.Lock()  # (a thread of the parent's may have held it)
        self._pool, self._at = "", 0


_entropy = Entropy()
os.register_at_fork(after_in_child=_entropy.forget)
# The last 1,024 ms a request id was made in, and its first eight characters.
_block: tuple[int, str] = (-1, "")


def new_request_id() -> str:
    """`req_` and a ULID: 48 bits of Unix milliseconds (ten characters: the first eight
    encoded once per 1,024 ms, as requests a second apart meet a new millisecond each), 80
    random ones (sixteen)."""
    global _block
    block, encoded = _block
    now = time.time_ns() // 1_000_000
    if now >> 10 != block:
        block = now >> 10
        encoded = "".join([_PAIRS[block >> shift & 1023] for shift in (30, 20, 10, 0)])
        _block = (block, encoded)
    return "req_" + encoded + _PAIRS[now & 1023] + _entropy.take(16)


def start(method: str, path: str, headers: Mapping[str, str],
          request_id: str | None = None) -> RequestTrace:
    """A new server span; an incoming `traceparent` makes it the caller's child. Its request
    id is a new one unless the proxy gave the request one already."""
    request_id = request_id or new_request_id()
    if "traceparent" not in headers and not _tracing.recording:
        # A root span that records nothing (most requests): new ids, no caller to read.
        return RequestTrace(request_id, None, _new_ids(0, _NO_STATE))
    parent = _propagator.extract(dict(headers)) if "traceparent" in headers else None
    caller = trace.get_current_span(parent).get_span_context() if parent is not None \
        else INVALID_SPAN_CONTEXT
    flags = int(caller.trace_flags) if caller.is_valid else 0
    if _tracing.recording:
        span = _tracing.tracer.start_span(f"{method} {path.split('?', 1)[0]}", context=parent,
                                          kind=trace.SpanKind.SERVER)
        return RequestTrace(request_id, span, parent_flags=flags)
    return RequestTrace(request_id, None, _new_ids(*_of(caller)), parent_flags=flags)
