"""For applications that call through the gateway: headers that make each call's gateway
span nest under the caller's current OpenTelemetry span.

    from openai import OpenAI
    from tollgate.client import gateway_headers

    client = OpenAI(base_url="http://gateway:8080/v1", api_key=VIRTUAL_KEY)
    with tracer.start_as_current_span("answer-question"):
        client.chat.completions.create(..., extra_headers=gateway_headers())

Only the OpenTelemetry API is imported (not the SDK, nor the gateway); without it, or
outside any span, the headers are empty and calls are simply not nested.
"""

from __future__ import annotations

from collections.abc import Mapping


def gateway_headers(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """W3C `traceparent` (and `tracestate` when there is one) for the current span, plus
    `extra`; for `extra_headers=` per call, or `default_headers=` on a client made inside
    the span."""
    headers: dict[str, str] = {}
    try:
        from opentelemetry.propagate import inject
    except ImportError:
        pass
    else:
        # The globally configured propagator (W3C trace context by default).
        inject(headers)
    headers = {k: v for k, v in headers.items() if k in ("traceparent", "tracestate")}
    return {**headers, **(extra or {})}
