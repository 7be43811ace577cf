"""One forwarded request, followed from the provider's response headers to its last byte.

The exchange is the response path: it meters the provider's bytes on their way to the client
(`on_chunk`), picks what reshapes them for the client (`reshaping`), and adds the gateway's
headers. What it was sent to is its `cursor` (attempts.py); how it ended and what it cost, its
`settlement` (settlement.py). Both hosts drive it the same way: the meter sees the response
(`response_head`, then `on_chunk`); a rewriter reshapes it where the client gets other bytes
(`reshaping`); then `finish`. mitmproxy, whose bytes pass through the core, does the first two
at once (`on_response_headers`, `relay`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from tollgate import eventstream, fastjson, telemetry, translate
from tollgate import usage as usage_of
from tollgate.attempts import AttemptCursor
from tollgate.breaker import Breakers
from tollgate.config.schema import VirtualKey
from tollgate.errors import GatewayError
from tollgate.ledger import LedgerRow
from tollgate.meter import ResponseMeter
from tollgate.pricing import PriceTable
from tollgate.request import Attempt
from tollgate.routes import Route
from tollgate.settlement import Billing, Settlement
from tollgate.sse import MAX_EVENT_BYTES, CappedEvents, EventFilter
from tollgate.telemetry import RequestTrace

if TYPE_CHECKING:
    from tollgate.precedent import Precedent

log = logging.getLogger("tollgate")

# The code of a reply the host made in place of a provider, by its status.
PROXY_FAILURE_CODES = {502: "provider_unreachable", 504: "provider_timeout"}


class Rewriter(Protocol):
    def feed(self, chunk: bytes) -> bytes: ...
    def flush(self) -> bytes: ...


class JSONTranslation:
    """Rewriter for a whole JSON body: held to the end, then converted (or an error reshaped).
    A body it cannot convert becomes `invalid(error)`'s answer."""

    def __init__(self, convert: Callable[[bytes], bytes],
                 invalid: Callable[[Exception], bytes] | None = None):
        self._convert = convert
        self._invalid = invalid
        self._buf = bytearray()

    def feed(self, chunk: bytes) -> bytes:
        self._buf += chunk
        return b""

    def flush(self) -> bytes:
        try:
            return self._convert(bytes(self._buf))
        except (ValueError, TypeError, AttributeError, KeyError) as e:
            if self._invalid is None:
                raise
            return self._invalid(e)


def _on_own_clock(epoch: float) -> float:
    """A moment a host told by the wall clock (seconds since the epoch), on this process's
    monotonic clock; never later than now."""
    return time.monotonic() - max(0.0, time.time() - epoch)


class Exchange:
    def __init__(self, *, trace: RequestTrace, prefix: str, route: Route, key: VirtualKey,
                 requested_model: str | None, attempts: list[Attempt], stream: bool,
                 billing: Billing, settle: Callable[[Exchange, LedgerRow], None],
                 prices: PriceTable | None = None, client_wants_usage: bool = False,
                 breakers: Breakers | None = None, passed_over: list[str] | None = None,
                 unserved: list[str] | None = None, shadow_headers: bool = False) -> None:
        self.trace = trace
        self.prefix = prefix
        self.shadow_headers = shadow_headers
        self.route = route
        self.key = key
        self.requested_model = requested_model
        self.cursor = AttemptCursor(attempts, key.config.fallback.on, passed_over, unserved)
        self.stream_requested = stream
        self.billing = billing
        self._prices = prices
        self.client_wants_usage = client_wants_usage  # an OpenAI stream's own usage chunk
        self.breakers = breakers
        self.started = time.monotonic()
        self.settlement = Settlement(self, settle)
        # The current attempt's response: its status, its meter, what rewrites it.
        self.status: int | None = None
        self.meter = self._meter()
        self.rewriter: Rewriter | None = None  # set per response by on_response_headers
        # The gateway's own time on the response, when its first body byte came and, told
        # by a host that reports it later, when its last came (None: as it is settled).
        self.overhead = 0.0
        self.first_byte: float | None = None
        self.ended: float | None = None
        self.attempt_span = trace.start_attempt(self.attempt, route.name)
        # The precedent this decision became (precedent.py), for its host to keep its answer;
        # whether it was decided from one (`Gateway.decide_like`).
        self.precedent: Precedent | None = None
        self.from_precedent = False

    @property
    def attempt(self) -> Attempt:
        return self.cursor.attempt

    @property
    def provider_id(self) -> str:
        return self.cursor.attempt.provider_id

    @property
    def model(self) -> str:
        return self.cursor.attempt.model

    @property
    def reshapes(self) -> bool:
        """Some attempt's response is reshaped for the client: translated across API
        families, reframed, or its errors put in the client's family."""
        return any(a.translated or a.reframed or a.foreign_errors for a in self.cursor.attempts)

    @property
    def hides_usage_chunk(self) -> bool:
        """The gateway asked a provider for a usage chunk the client did not ask for, and
        keeps it out of the client's stream."""
        return any(a.strip_usage for a in self.cursor.attempts)

    def _meter(self) -> ResponseMeter:
        a = self.attempt
        return a.adapter.meter(a.model, self.stream_requested)

    # -- fallback -----------------------------------------------------------------------
    def advance(self, reason: str) -> Attempt:
        """Move to the next provider; what the failed attempt used is nothing billable."""
        log.info("request %s: %s on %s, falling back to %s", self.trace.request_id, reason,
                 self.provider_id, self.cursor.attempts[self.cursor.index + 1].provider_id)
        if self.breakers is not None:
            self.breakers.failure(self.provider_id)
        telemetry.end_attempt(self.attempt_span, self.status, failure=reason)
        attempt = self.cursor.advance(reason)
        self.attempt_span = self.trace.start_attempt(attempt, self.route.name)
        if self._prices is not None:
            self.billing.price = self._prices.lookup(attempt.model, attempt.prices) or \
                self.billing.price
        self.status = None
        self.meter = self._meter()
        return attempt

    def begin_attempt(self, provider_id: str) -> Attempt:
        """A host that retries by itself (Envoy) starts the attempt that reached
        `provider_id`; the attempts before it failed."""
        later = self.cursor.next_to(provider_id)
        if later is None:
            log.error("request %s: attempt reached %s, which is not in its plan",
                      self.trace.request_id, provider_id)
            return self.attempt
        while self.cursor.index < later:
            self.advance(self.cursor.failure_kind(self.status) or "timeout or network error")
        return self.attempt

    def attempt_answered(self, status: int) -> None:
        """An attempt's response status, before the host decides whether to retry."""
        self.status = status

    # -- the response -------------------------------------------------------------------
    def response_headers(self) -> dict[str, str]:
        """Gateway headers the client gets on the provider's response."""
        headers = self.trace.headers(self.prefix, self.provider_id,
                                     self.cursor.fallback_count)
        if self.billing.warning:
            headers[f"{self.prefix}Budget-Warning"] = self.billing.warning
        if self.billing.output_cap is not None:
            headers[f"{self.prefix}Max-Tokens"] = str(self.billing.output_cap)
        if self.shadow_header:
            headers[f"{self.prefix}Shadow"] = self.shadow_header
        return {**headers, **self.billing.rate_headers}

    @property
    def shadow_header(self) -> str | None:
        """What shadow controls would have refused, for the client: only when the gateway
        says so (`gateway.shadow_headers`); header-safe (one line, ASCII)."""
        if not (self.shadow_headers and self.billing.shadow):
            return None
        text = "; ".join(self.billing.shadow)
        return text.encode("ascii", "replace").decode()[:1024]

    # The meter: every host shows it the provider's response as it passes.
    def response_head(self, status: int, headers: Mapping[str, str]) -> str | None:
        """The response's status and headers; `headers` may lack content-type (a host that
        cannot see it), and then the first body bytes tell an event stream from JSON.
        Returns its content type."""
        if self.settlement.replaced_status is None:  # (a rewrite may have replaced it first)
            self.status = status
        lowered = {k.lower(): v for k, v in headers.items()}
        content_type = lowered.get("content-type")
        length = lowered.get("content-length", "")
        self.meter.start(content_type, int(length) if length.isdigit() else None,
                         lowered.get("x-amzn-bedrock-service-tier"))
        return content_type

    def first_byte_at(self, epoch: float) -> None:
        """The response's first bytes came at `epoch` (seconds, by the wall clock), told
        after the fact by a host that shows them later (Envoy's meter batches a stream's
        posts): kept on this exchange's own clock."""
        self.first_byte = _on_own_clock(epoch)

    def ended_at(self, epoch: float) -> None:
        """The response's last bytes came at `epoch` (seconds, by the wall clock), reported
        after the fact (Envoy's access log): its time is taken to then, not to its
        settlement."""
        # (Never before it began: a host's clock is not this process's.)
        self.ended = max(self.started, _on_own_clock(epoch))

    def end_time_ns(self) -> int | None:
        """When the response ended, as a span's end time (None: now)."""
        if self.ended is None:
            return None
        return time.time_ns() - int((time.monotonic() - self.ended) * 1e9)

    def on_chunk(self, data: bytes) -> bytes:
        """Reads the bytes on their way to the client and returns them unchanged."""
        if data and self.first_byte is None:
            self.first_byte = time.monotonic()
        self.meter.feed(data)
        return data

    @property
    def is_sse(self) -> bool | None:
        return self.meter.is_sse

    @property
    def complete(self) -> bool:
        """The whole response has been seen: its content-length, or its last event."""
        return self.meter.complete

    # The rewriter: only where the client gets other bytes than the provider sent.
    def reshaping(self, status: int, content_type: str | None
                  ) -> tuple[Rewriter | None, dict[str, str]]:
        """What turns the response's bytes into the client's, if anything, and the headers
        that change with them."""
        return self._rewriter_for(status, content_type), \
            self._reframed_headers(status, content_type)

    def _reframed_headers(self, status: int, content_type: str | None) -> dict[str, str]:
        """A stream the gateway turns into SSE (Bedrock's frames) is announced as SSE."""
        if self.attempt.reframed and eventstream.is_eventstream(content_type):
            return {"content-type": "text/event-stream; charset=utf-8"}
        if (self.attempt.reframed or self.attempt.foreign_errors) and not 200 <= status < 300:
            return {"content-type": "application/json"}
        return {}

    def _rewriter_for(self, status: int, content_type: str | None) -> Rewriter | None:
        """What turns the provider's bytes into the client's: a translation across API
        families, the removal of a usage chunk the gateway asked for, or nothing."""
        a, client = self.attempt, self.route.family
        sse = (content_type or "").lower().startswith("text/event-stream")
        model = self.requested_model or a.model  # the name the client asked for
        estimate = self.billing.estimated_input_tokens
        if (a.reframed or a.translated or a.foreign_errors) and not 200 <= status < 300:
            return JSONTranslation(lambda body: translate.error_to(
                client, status, a.adapter.error_message(status, body)))
        if a.reframed and eventstream.is_eventstream(content_type):
            frames = eventstream.EventStreamToSSE()
            if not a.translated:
                return self._capped(frames)
            return self._capped(translate.Chained(frames, translate.stream(
                client, a.family, model, self.client_wants_usage, estimate)))
        if a.translated:
            if sse:
                return self._capped(translate.stream(client, a.family, model,
                                                     self.client_wants_usage, estimate))
            convert = translate.json_response(client, a.family, model)
            return JSONTranslation(lambda body: fastjson.encoded(convert(fastjson.loads(body)))
                                   if body else body, self._invalid_answer)
        if a.strip_usage and (sse or content_type is None):
            return EventFilter(usage_of.is_usage_only_chunk, usage_of.MAX_USAGE_CHUNK_BYTES,
                               usage_of.USAGE_ONLY_HINT)
        return None

    def _invalid_answer(self, error: Exception) -> bytes:
        """A provider's 2xx the gateway cannot translate: the client gets a 502 in its own
        family (`replaced_status`), and the ledger row says why."""
        log.warning("request %s: %s answered %s with a body that is not its API's JSON (%s)",
                    self.trace.request_id, self.provider_id, self.status, error)
        err = GatewayError("provider_invalid_response", f"Model provider {self.provider_id} "
                           f"answered with a body that is not valid JSON for its API, so it "
                           f"could not be translated (request id {self.trace.request_id}).")
        outcome = self.settlement
        self.status = outcome.replaced_status = err.status
        outcome.code, outcome.stream_error = err.code, err.message
        return err.body(self.route.family)

    def _capped(self, rewriter: Rewriter) -> CappedEvents:
        """A stream rewriter that ends the stream with an error event in the client's shape
        rather than hold an event of unbounded size."""
        err = GatewayError("gateway_error", "The provider streamed an event larger than the "
                           f"gateway handles ({MAX_EVENT_BYTES} bytes); the stream was ended "
                           f"(request id {self.trace.request_id}).")
        body = err.body(self.route.family)
        ending = (b"event: error\n" if self.route.family == "anthropic" else b"") + \
            b"data: " + body + b"\n\n"

        def overflow(message: str) -> None:
            self.settlement.stream_error = message

        return CappedEvents(rewriter, ending, overflow)

    def failure(self, code: str, message: str) -> tuple[int, dict[str, str], bytes]:
        """Status, headers and body for a request no provider could answer (and so its
        ledger row's)."""
        err = GatewayError(code, message)
        self.settlement.code = code
        if self.status is None:  # a provider that had answered keeps its status (and usage)
            self.status = err.status
        headers = {"content-type": "application/json", **self.response_headers()}
        return err.status, headers, err.body(self.route.family)

    def proxy_replied(self, status: int, details: str | None) -> None:
        """The host answered in place of a provider after the decision (Envoy's reply to
        an unreachable provider, a timeout); it carries the gateway's envelope already."""
        self.settlement.code = PROXY_FAILURE_CODES.get(status, "gateway_error")
        self.settlement.stream_error = f"answered by the proxy: {details or status}"

    # A host whose bytes pass through the core (mitmproxy) does both at once.
    def on_response_headers(self, status: int, headers: Mapping[str, str]) -> dict[str, str]:
        """The response's head metered and its rewriter chosen; returns the headers the
        client gets added or changed."""
        began = time.perf_counter()
        self.rewriter, reframed = self.reshaping(status, self.response_head(status, headers))
        out = {**self.response_headers(), **reframed}
        self.overhead += time.perf_counter() - began
        return out

    def relay(self, data: bytes) -> bytes:
        """Meter, then rewrite; b"" ends it."""
        began = time.perf_counter()
        self.on_chunk(data)
        if self.rewriter is not None:
            data = self.rewriter.feed(data) if data else self.rewriter.flush()
        self.overhead += time.perf_counter() - began
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
            **({"skipped": "; ".join(self.cursor.unserved)} if self.cursor.unserved else {}),
        }

    def finish(self, outcome: str, error: str | None = None, sent: bool = True) -> None:
        """The exchange ended (the host says how): settled once, however often it is told."""
        self.settlement.finish(outcome, error, sent)
