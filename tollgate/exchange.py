"""One forwarded request, followed from the provider's response headers to its last byte."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from opentelemetry.trace import Status, StatusCode

from tollgate.config.schema import VirtualKey
from tollgate.request import Attempt
from tollgate.routes import Route
from tollgate.sse import Event, SSEParser
from tollgate.telemetry import RequestTrace, log_access

log = logging.getLogger("tollgate")

# How much of a non-streamed response body the tap keeps (enough for any usage block).
_KEEP_BODY = 1 << 20


class Exchange:
    def __init__(self, *, trace: RequestTrace, prefix: str, route: Route, key: VirtualKey,
                 requested_model: str | None, model: str | None, attempt: Attempt,
                 stream: bool) -> None:
        self.trace = trace
        self.prefix = prefix
        self.route = route
        self.key = key
        self.requested_model = requested_model
        self.model = model
        self.attempt = attempt
        self.stream_requested = stream
        self.fallback_count = 0
        self.started = time.monotonic()
        self.status: int | None = None
        self.is_sse: bool | None = False
        self.bytes_out = 0
        self.events: list[Event] = []
        self.body = bytearray()
        self._sse = SSEParser()
        self._finished = False

    @property
    def provider_id(self) -> str:
        return self.attempt.provider_id

    def response_headers(self) -> dict[str, str]:
        """Gateway headers the client gets on the provider's response."""
        return self.trace.headers(self.prefix, self.provider_id, self.fallback_count)

    def on_response_headers(self, status: int, headers: Mapping[str, str]) -> dict[str, str]:
        """Record the response's start; `headers` may lack content-type (a host that cannot
        see it), and then the first body bytes tell an event stream from JSON."""
        self.status = status
        content_type = next((v for k, v in headers.items() if k.lower() == "content-type"), None)
        self.is_sse = None if content_type is None else \
            content_type.lower().startswith("text/event-stream")
        return self.response_headers()

    def on_chunk(self, data: bytes) -> bytes:
        """The tap: reads the bytes on their way to the client and returns them unchanged."""
        self.bytes_out += len(data)
        if self.is_sse is None and data.strip():
            self.is_sse = self.stream_requested and not data.lstrip().startswith((b"{", b"["))
        if self.is_sse:
            self.events.extend(self._sse.feed(data))
        elif len(self.body) < _KEEP_BODY:
            self.body += data[: _KEEP_BODY - len(self.body)]
        return data

    def decision(self) -> dict[str, Any]:
        return {
            "request_id": self.trace.request_id,
            "action": "forward",
            "key": self.key.id,
            "principal": self.key.principal,
            "model": self.model,
            "requested_model": self.requested_model,
            "provider": self.provider_id,
            "upstream": self.attempt.url,
        }

    def finish(self, outcome: str, error: str | None = None) -> None:
        """Close the books on this request exactly once, however it ended."""
        if self._finished:
            return
        self._finished = True
        span = self.trace.span
        span.set_attributes({
            "tollgate.key": self.key.id, "tollgate.principal": self.key.principal or "",
            "tollgate.provider": self.provider_id, "gen_ai.request.model": self.model or "",
            "http.response.status_code": self.status or 0, "tollgate.outcome": outcome,
        })
        if error:
            span.set_status(Status(StatusCode.ERROR, error))
        span.end()
        log_access({
            **self.decision(), "route": self.route.name, "status": self.status,
            "outcome": outcome, "error": error, "bytes_out": self.bytes_out,
            "sse_events": len(self.events),
            "latency_ms": round((time.monotonic() - self.started) * 1000, 1),
        })
