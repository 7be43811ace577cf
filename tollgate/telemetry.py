"""Request ids, W3C trace context, spans and the access log."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from ulid import ULID

_provider = TracerProvider()
_tracer = _provider.get_tracer("tollgate")
_propagator = TraceContextTextMapPropagator()
access_log = logging.getLogger("tollgate.access")


def tracer_provider() -> TracerProvider:
    """Where exporters are attached (OTLP, console) by whoever runs the gateway."""
    return _provider


@dataclass
class RequestTrace:
    request_id: str
    span: trace.Span

    @property
    def trace_id(self) -> str:
        return format(self.span.get_span_context().trace_id, "032x")

    @property
    def span_id(self) -> str:
        return format(self.span.get_span_context().span_id, "016x")

    @property
    def traceparent(self) -> str:
        """Sent upstream so the provider call nests under the gateway span."""
        return f"00-{self.trace_id}-{self.span_id}-01"

    def headers(self, prefix: str, provider: str, fallback_count: int) -> dict[str, str]:
        return {
            f"{prefix}Request-Id": self.request_id,
            f"{prefix}Trace-Id": self.trace_id,
            f"{prefix}Span-Id": self.span_id,
            f"{prefix}Fallback-Count": str(fallback_count),
            f"{prefix}Provider": provider,
        }


def start(method: str, path: str, headers: Mapping[str, str]) -> RequestTrace:
    """A new server span; an incoming `traceparent` makes it the caller's child."""
    parent = _propagator.extract(dict(headers))
    span = _tracer.start_span(f"{method} {path.split('?', 1)[0]}", context=parent,
                              kind=trace.SpanKind.SERVER)
    return RequestTrace(request_id=f"req_{ULID()}", span=span)


def log_access(record: dict[str, object]) -> None:
    access_log.info(json.dumps(record, default=str, separators=(",", ":")))
