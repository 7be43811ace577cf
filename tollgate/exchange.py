"""One forwarded request, followed from the provider's response headers to its last byte,
and settled exactly once however it ends."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from tollgate import eventstream, telemetry, translate
from tollgate import usage as usage_of
from tollgate.breaker import Breakers
from tollgate.config.schema import VirtualKey
from tollgate.errors import GatewayError
from tollgate.ledger import LedgerRow
from tollgate.meter import ResponseMeter
from tollgate.pricing import ModelPrice, PriceTable, cost_micros
from tollgate.ratelimit import Limit
from tollgate.request import Attempt
from tollgate.routes import Route
from tollgate.scopes import Lineage
from tollgate.sse import MAX_EVENT_BYTES, CappedEvents, EventFilter
from tollgate.store.base import LimitSettlement
from tollgate.telemetry import RequestTrace

log = logging.getLogger("tollgate")
_WARNED_TIERS: set[tuple[str | None, str | None, str]] = set()


def _warn_unpriced_tier(provider: str | None, model: str | None, tier: str) -> None:
    """Once per provider, model and tier: charged the standard price, which may be less."""
    if (provider, model, tier) not in _WARNED_TIERS and len(_WARNED_TIERS) < 1000:
        _WARNED_TIERS.add((provider, model, tier))
        log.warning("%s served %s at service tier %r, which has no price for it: charged the "
                    "standard price. Add `tiers: {%s: ...}` to its price.", provider, model,
                    tier, tier)



# The code of a reply the host made in place of a provider, by its status.
PROXY_FAILURE_CODES = {502: "provider_unreachable", 504: "provider_timeout"}


class Rewriter(Protocol):
    def feed(self, chunk: bytes) -> bytes: ...
    def flush(self) -> bytes: ...


@dataclass
class Billing:
    """What the request holds in its budgets and rate limits, for each provider of its plan
    (each attempt is admitted before it can be sent), and how to price what it used."""

    price: ModelPrice | None
    lineage: Lineage
    # Provider -> the budget counters a request it serves settles into (those not scoped to
    # a provider, and that provider's own), in plan order.
    held: dict[str, list[str]] = field(default_factory=dict)
    reserved: int = 0  # micro-dollars held in each of them
    estimated_input_tokens: int = 0  # for a stream cut off before the provider's usage
    warning: str | None = None
    # The rate limits it entered, each with the provider it is of (None: the key's), when
    # (the store's clock) and with how many tokens; the key's rate-limit headers.
    limits: list[tuple[Limit, str | None]] = field(default_factory=list)
    admitted_at: float = 0.0
    reserved_tokens: int = 0
    rate_headers: dict[str, str] = field(default_factory=dict)
    # The output cap the gateway set on the request (a budget with on_breach: cap).
    output_cap: int | None = None
    # Fallback providers left out of the plan because they could not be admitted.
    passed_over_later: list[str] = field(default_factory=list)
    # What shadow-mode controls would have refused (see policy.Shadowed).
    shadow: list[str] = field(default_factory=list)
    worst_case: int = 0  # micro-dollars it could cost (held where budgets apply)

    @property
    def counters(self) -> list[str]:
        """Every budget counter it holds (kept alive while it runs)."""
        return list(dict.fromkeys(c for held in self.held.values() for c in held))

    def settlement(self, served_by: str, reached: list[str], used_tokens: int
                   ) -> tuple[list[str], list[str], LimitSettlement | None]:
        """The budget counters to charge (those of the provider that served it), those only
        released (other providers' own), and what it leaves in its rate limits: a fallback
        provider that failed it bills no tokens; one it never reached keeps nothing."""
        charged = self.held.get(served_by, next(iter(self.held.values()), []))
        released = [c for c in self.counters if c not in charged]
        if not self.limits:
            return charged, released, None
        limits = [lim for lim, _ in self.limits]
        return charged, released, LimitSettlement(
            sliding=[lim.counter for lim in limits if lim.sliding],
            days=[lim.counter for lim in limits if not lim.sliding],
            tokens=[lim.counter for lim in limits if lim.tokens],
            reserved=self.reserved_tokens, admitted=self.admitted_at, used=used_tokens,
            unbilled=[lim.counter for lim, p in self.limits
                      if lim.tokens and p not in (None, served_by) and p in reached],
            unsent=[lim.counter for lim, p in self.limits if p is not None and p not in reached])


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
        self.attempts = attempts
        self.index = 0
        self.stream_requested = stream
        self.billing = billing
        self._settle = settle
        self._prices = prices
        self.client_wants_usage = client_wants_usage  # an OpenAI stream's own usage chunk
        self.breakers = breakers
        self.started = time.monotonic()
        self.status: int | None = None
        self.meter = self._meter()
        self._finished = False
        self.error: str | None = None  # why it ended badly, once finished
        # The gateway's error code when no provider answered (unreachable, timed out), or
        # its answer could not be used; the status the client got instead of the provider's.
        self.code: str | None = None
        self.replaced_status: int | None = None
        self.settled: LedgerRow | None = None  # its ledger row, once finished
        # The gateway's own time on the response, and when its first body byte came.
        self.overhead = 0.0
        self.first_byte: float | None = None
        self._attempt_span = trace.start_attempt(self.attempt, route.name)
        self.stream_error: str | None = None  # the gateway ended the stream itself
        self.rewriter: Rewriter | None = None  # set per response by on_response_headers
        # Why the request moved past providers, in order ("mp_a:rate_limit (rpm 2)"): those
        # passed over before dispatch, then the attempts that failed.
        self.fallbacks: list[str] = list(passed_over or [])
        # Providers of its routing policy with nothing to serve for it, and why.
        self.unserved: list[str] = list(unserved or [])

    @property
    def attempt(self) -> Attempt:
        return self.attempts[self.index]

    @property
    def reached(self) -> list[str]:
        """The providers its attempts have gone to so far."""
        return [a.provider_id for a in self.attempts[:self.index + 1]]

    @property
    def fallback_count(self) -> int:
        return len(self.fallbacks)

    @property
    def provider_id(self) -> str:
        return self.attempt.provider_id

    @property
    def model(self) -> str:
        return self.attempt.model

    @property
    def reshapes(self) -> bool:
        """Some attempt's response is reshaped for the client: translated across API
        families, reframed, or its errors put in the client's family."""
        return any(a.translated or a.reframed or a.foreign_errors for a in self.attempts)

    @property
    def hides_usage_chunk(self) -> bool:
        """The gateway asked a provider for a usage chunk the client did not ask for, and
        keeps it out of the client's stream."""
        return any(a.strip_usage for a in self.attempts)

    def _meter(self) -> ResponseMeter:
        a = self.attempt
        return a.adapter.meter(a.model, self.stream_requested)

    # -- fallback -----------------------------------------------------------------------
    def failure_kind(self, status: int | None = None, error: str | None = None) -> str | None:
        """The `fallback.on` condition an attempt's outcome falls under, if any: a transport
        error as it is, a status as the provider's adapter classes it."""
        if error is not None:
            return error  # "timeout" | "network_error"
        if status is None:
            return None
        return self.attempt.adapter.failure_kind(status)

    def fallback_reason(self, status: int | None = None, error: str | None = None
                        ) -> str | None:
        """Why this attempt's outcome may move on to the next provider, if it may."""
        reason = self.failure_kind(status, error)
        if reason in self.key.config.fallback.on and self.index + 1 < len(self.attempts):
            return reason
        return None

    def advance(self, reason: str) -> Attempt:
        """Move to the next provider; what the failed attempt used is nothing billable."""
        log.info("request %s: %s on %s, falling back to %s", self.trace.request_id, reason,
                 self.provider_id, self.attempts[self.index + 1].provider_id)
        if self.breakers is not None:
            self.breakers.failure(self.provider_id)
        self.fallbacks.append(f"{self.provider_id}:{reason}")
        telemetry.end_attempt(self._attempt_span, self.status, failure=reason)
        self.index += 1
        self._attempt_span = self.trace.start_attempt(self.attempt, self.route.name)
        if self._prices is not None:
            self.billing.price = self._prices.lookup(self.model, self.attempt.prices) or \
                self.billing.price
        self.status = None
        self.meter = self._meter()
        return self.attempt

    def begin_attempt(self, provider_id: str) -> Attempt:
        """A host that retries by itself (Envoy) starts the attempt that reached
        `provider_id`; the attempts before it failed."""
        later = [i for i in range(self.index, len(self.attempts))
                 if self.attempts[i].provider_id == provider_id]
        if not later:
            log.error("request %s: attempt reached %s, which is not in its plan",
                      self.trace.request_id, provider_id)
            return self.attempt
        while self.index < later[0]:
            self.advance(self.failure_kind(self.status) or "timeout or network error")
        return self.attempt

    def attempt_answered(self, status: int) -> None:
        """An attempt's response status, before the host decides whether to retry."""
        self.status = status

    # -- the response -------------------------------------------------------------------
    def response_headers(self) -> dict[str, str]:
        """Gateway headers the client gets on the provider's response."""
        headers = self.trace.headers(self.prefix, self.provider_id, self.fallback_count)
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

    def on_response_headers(self, status: int, headers: Mapping[str, str]) -> dict[str, str]:
        """Record the response's start; `headers` may lack content-type (a host that cannot
        see it), and then the first body bytes tell an event stream from JSON."""
        began = time.perf_counter()
        self.status = status
        lowered = {k.lower(): v for k, v in headers.items()}
        content_type = lowered.get("content-type")
        length = lowered.get("content-length", "")
        self.meter.start(content_type, int(length) if length.isdigit() else None,
                         lowered.get("x-amzn-bedrock-service-tier"))
        self.rewriter = self.rewriter_for(status, content_type)
        out = {**self.response_headers(), **self.reframed_headers(status, content_type)}
        self.overhead += time.perf_counter() - began
        return out

    def reframed_headers(self, status: int, content_type: str | None) -> dict[str, str]:
        """A stream the gateway turns into SSE (Bedrock's frames) is announced as SSE."""
        if self.attempt.reframed and eventstream.is_eventstream(content_type):
            return {"content-type": "text/event-stream; charset=utf-8"}
        if (self.attempt.reframed or self.attempt.foreign_errors) and not 200 <= status < 300:
            return {"content-type": "application/json"}
        return {}

    def rewriter_for(self, status: int, content_type: str | None) -> Rewriter | None:
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
            return JSONTranslation(lambda body: json.dumps(convert(json.loads(body)))
                                   .encode() if body else body, self._invalid_answer)
        if a.strip_usage and (sse or content_type is None):
            return EventFilter(usage_of.is_usage_only_chunk, usage_of.MAX_USAGE_CHUNK_BYTES)
        return None

    def _invalid_answer(self, error: Exception) -> bytes:
        """A provider's 2xx the gateway cannot translate: the client gets a 502 in its own
        family (`replaced_status`), and the ledger row says why."""
        log.warning("request %s: %s answered %s with a body that is not its API's JSON (%s)",
                    self.trace.request_id, self.provider_id, self.status, error)
        err = GatewayError("provider_invalid_response", f"Model provider {self.provider_id} "
                           f"answered with a body that is not valid JSON for its API, so it "
                           f"could not be translated (request id {self.trace.request_id}).")
        self.status = self.replaced_status = err.status
        self.code, self.stream_error = err.code, err.message
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
            self.stream_error = message

        return CappedEvents(rewriter, ending, overflow)

    def on_chunk(self, data: bytes) -> bytes:
        """The tap: reads the bytes on their way to the client and returns them unchanged."""
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

    def failure(self, code: str, message: str) -> tuple[int, dict[str, str], bytes]:
        """Status, headers and body for a request no provider could answer (and so its
        ledger row's)."""
        err = GatewayError(code, message)
        self.code = code
        if self.status is None:  # a provider that had answered keeps its status (and usage)
            self.status = err.status
        headers = {"content-type": "application/json", **self.response_headers()}
        return err.status, headers, err.body(self.route.family)

    def proxy_replied(self, status: int, details: str | None) -> None:
        """The host answered in place of a provider after the decision (Envoy's reply to
        an unreachable provider, a timeout); it carries the gateway's envelope already."""
        self.code = PROXY_FAILURE_CODES.get(status, "gateway_error")
        self.stream_error = f"answered by the proxy: {details or status}"

    def relay(self, data: bytes) -> bytes:
        """For hosts whose bytes pass through the core: tap, then rewrite; b"" ends it."""
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
            **({"skipped": "; ".join(self.unserved)} if self.unserved else {}),
        }

    def usage(self, sent: bool = True) -> usage_of.Usage:
        """What the request used, from the provider's own numbers where it gave them. A
        request the provider had (`sent`) and did not refuse is billed its input at least:
        with no numbers from the provider, the gateway's estimate (flagged as such)."""
        if self.status is not None and not 200 <= self.status < 300:
            return usage_of.Usage()  # providers do not bill refused or failed requests
        if self.status is None and not sent:
            return usage_of.Usage()  # it never reached the provider
        # In the provider's family, before any translation.
        used = self.meter.usage() if self.status is not None else usage_of.Usage(reported=False)
        if not used.reported and not used.prompt_tokens and self.route.metered:
            used.input_tokens, used.reported = self.billing.estimated_input_tokens, False
        return used

    def written_ahead(self) -> LedgerRow:
        """Its row in case the gateway dies before it settles (outcome `interrupted`),
        charged what the provider surely bills by now: the input, and the output that has
        streamed so far."""
        used = self.usage()
        price = self.billing.price
        return self.row("interrupted", used,
                        cost_micros(used, price) if price is not None else 0)

    def row(self, outcome: str, used: usage_of.Usage | None = None, cost: int = 0
            ) -> LedgerRow:
        """This request's ledger row (before it ends: what is written ahead, in case the
        gateway dies before it can settle)."""
        used = used or usage_of.Usage(reported=False)
        lin = self.billing.lineage
        return LedgerRow(
            request_id=self.trace.request_id, ts=datetime.now(UTC).isoformat(),
            key_id=self.key.id, key_name=self.key.name, principal=self.key.principal,
            org=lin.org, team=lin.team, project=lin.project, provider=self.provider_id,
            model=self.model, route=self.route.name, input_tokens=used.input_tokens,
            output_tokens=used.output_tokens, cached_input_tokens=used.cached_input_tokens,
            cache_write_tokens=used.cache_write_tokens + used.cache_write_1h_tokens,
            cache_write_1h_tokens=used.cache_write_1h_tokens,
            tier=self.billing.price.served(used)[1] if self.billing.price is not None
            else used.service_tier, reasoning_tokens=used.reasoning_tokens,
            cost_micros=cost, usage_reported=used.reported, status=self.status,
            outcome=outcome, latency_ms=round((time.monotonic() - self.started) * 1000, 1),
            code=self.code, output_cap=self.billing.output_cap,
            fallback_count=self.fallback_count,
            fallbacks=", ".join(self.fallbacks) or None,
            skipped="; ".join(self.unserved) or None,
            shadow="; ".join(self.billing.shadow) or None)

    @property
    def finished(self) -> bool:
        return self._finished

    def finish(self, outcome: str, error: str | None = None, sent: bool = True) -> None:
        """Close the books on this request exactly once, however it ended; `sent` False:
        it ended before the host passed it to the provider."""
        if self._finished:
            return
        self._finished = True
        if self.stream_error is not None:
            outcome, error = "error", self.stream_error
        elif outcome in ("abandoned", "aborted") and self.complete and self.status is not None \
                and 200 <= self.status < 300:
            # Its last event had passed: a client that closes once it has the end (an SDK
            # at [DONE]) did not cut anything short.
            outcome, error = "completed", None
        if self.breakers is not None:
            failed = self.status is None or self.failure_kind(self.status) is not None
            if failed and outcome != "abandoned":
                self.breakers.failure(self.provider_id)
            elif not failed:
                self.breakers.success(self.provider_id)
        used = self.usage(sent)
        price = self.billing.price
        cost = cost_micros(used, price) if price is not None else 0
        if price is not None and used.service_tier and used.service_tier not in price.tiers:
            _warn_unpriced_tier(self.provider_id, self.model, used.service_tier)
        self.error = error
        telemetry.end_attempt(
            self._attempt_span, self.status,
            failure=error or (None if self.status is not None and self.status < 400
                              else f"status {self.status or 'none'}"),
            input_tokens=used.prompt_tokens, output_tokens=used.output_tokens)
        self.settled = self.row(outcome, used, cost)
        self._settle(self, self.settled)
