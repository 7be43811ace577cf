"""AWS event-stream frames (Bedrock's streamed responses) turned into SSE as they arrive:
each InvokeModel `chunk` event carries one Anthropic stream event, base64-encoded; a
ConverseStream event becomes an SSE event of its own name; and an exception frame
(throttling mid-stream, say) becomes an Anthropic `error` event. Frames are
decoded by botocore; a partial frame waits for its next bytes, nothing else is held."""

from __future__ import annotations

import base64

from botocore.eventstream import EventStreamBuffer, ParserError

from tollgate.fastjson import encoded, loads

CONTENT_TYPE = "application/vnd.amazon.eventstream"

# Bedrock's exception names -> Anthropic error types.
_ERRORS = {"throttlingException": "rate_limit_error",
           "serviceUnavailableException": "overloaded_error",
           "validationException": "invalid_request_error"}


def is_eventstream(content_type: str | None) -> bool:
    return (content_type or "").lower().startswith(CONTENT_TYPE)


def _sse(kind: str, doc: object) -> bytes:
    return f"event: {kind}\ndata: ".encode() + encoded(doc) + b"\n\n"


def _error(kind: str, message: str) -> bytes:
    return _sse("error", {"type": "error", "error": {"type": kind, "message": message}})


class EventStreamToSSE:
    """A rewriter (feed/flush) from event-stream bytes to Anthropic SSE bytes."""

    def __init__(self) -> None:
        self._buffer = EventStreamBuffer()
        self._broken = False

    def feed(self, chunk: bytes) -> bytes:
        if self._broken:
            return b""
        self._buffer.add_data(chunk)
        out = []
        try:
            for message in self._buffer:
                out.append(self._event(message.headers, message.payload))
        except (ParserError, ValueError, KeyError) as e:
            self._broken = True
            out.append(_error("api_error", f"The provider's event stream could not be read "
                                           f"({e.__class__.__name__})."))
        return b"".join(out)

    def flush(self) -> bytes:
        return b""

    @staticmethod
    def _event(headers: dict[str, object], payload: bytes) -> bytes:
        kind = headers.get(":message-type")
        if kind == "event" and headers.get(":event-type") == "chunk":
            event = loads(base64.b64decode(loads(payload)["bytes"]))
            event.pop("amazon-bedrock-invocationMetrics", None)
            return _sse(str(event.get("type", "message")), event)
        if kind == "event":  # ConverseStream: the event type names it, the payload is JSON
            return _sse(str(headers.get(":event-type", "message")), loads(payload))
        if kind in ("exception", "error"):
            name = str(headers.get(":exception-type") or headers.get(":error-code") or "")
            try:
                text = loads(payload).get("message", "")
            except ValueError:
                text = payload.decode("utf-8", "replace")
            return _error(_ERRORS.get(name, "api_error"), f"{name}: {text}")
        return b""
