"""Token usage read from every response shape the providers send.

OpenAI chat: `usage` in JSON, or the final SSE chunk when `stream_options.include_usage` is
on. OpenAI Responses: `usage` in JSON, or in `response.completed` / `.incomplete` / `.failed`
events. Anthropic messages: `usage` in JSON, or `message_start` plus the running
`message_delta` totals (its web searches in `server_tool_use`). When a stream is cut off
before the provider reports usage, what the client did receive is estimated (and marked as
such) so nothing goes unmetered.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from tollgate.fastjson import loads
from tollgate.sse import Event

CHARS_PER_TOKEN = 4  # for estimates only


@dataclass
class Usage:
    input_tokens: int = 0  # uncached prompt tokens
    output_tokens: int = 0  # including reasoning tokens
    cached_input_tokens: int = 0  # prompt tokens read from the provider's cache
    cache_write_tokens: int = 0  # prompt-cache writes kept 5 minutes (Anthropic, Bedrock)
    cache_write_1h_tokens: int = 0  # Anthropic prompt-cache writes kept 1 hour
    reasoning_tokens: int = 0  # part of output_tokens, reported for insight
    reported: bool = False  # False: estimated by the gateway
    # The provider's service tier as it reported it (flex, priority, ...); None: standard.
    service_tier: str | None = None
    # Searches the provider ran for it (Anthropic's web search tool, OpenAI's web search
    # calls), billed per search.
    web_search_requests: int = 0

    @property
    def prompt_tokens(self) -> int:
        """Every input token, however it was billed (long-context tiers count them all)."""
        return (self.input_tokens + self.cached_input_tokens + self.cache_write_tokens
                + self.cache_write_1h_tokens)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.output_tokens


# How providers name their standard tier: priced at the model's base price.
STANDARD_TIERS = {"default", "standard", "auto", "standard_only", "on_demand"}


def service_tier(value: Any) -> str | None:
    """A reported service tier, lower-cased; None for the standard tier or anything that is
    not a short name (a provider never sends more)."""
    if isinstance(value, dict):  # Bedrock Converse: {"type": "flex"}
        value = value.get("type")
    if not isinstance(value, str) or not value or len(value) > 32:
        return None
    tier = value.strip().lower()
    return None if tier in STANDARD_TIERS else tier


def _int(doc: Any, *path: str) -> int:
    for part in path:
        if not isinstance(doc, dict):
            return 0
        doc = doc.get(part)
    return doc if isinstance(doc, int) and not isinstance(doc, bool) else 0


def openai_usage(u: Any, tier: Any = None) -> Usage:
    """Chat completions and embeddings (`prompt_tokens`) or Responses (`input_tokens`);
    `tier`: the response's top-level `service_tier`."""
    if not isinstance(u, dict):
        return Usage()
    if "input_tokens" in u:
        prompt, completion = _int(u, "input_tokens"), _int(u, "output_tokens")
        cached = _int(u, "input_tokens_details", "cached_tokens")
        reasoning = _int(u, "output_tokens_details", "reasoning_tokens")
    else:
        prompt, completion = _int(u, "prompt_tokens"), _int(u, "completion_tokens")
        cached = _int(u, "prompt_tokens_details", "cached_tokens")
        reasoning = _int(u, "completion_tokens_details", "reasoning_tokens")
    cached = min(cached, prompt)
    return Usage(input_tokens=prompt - cached, output_tokens=completion,
                 cached_input_tokens=cached, reasoning_tokens=reasoning, reported=True,
                 service_tier=service_tier(tier))


def anthropic_usage(u: Any, into: Usage | None = None) -> Usage:
    """Anthropic reports cache reads and writes apart from `input_tokens`, the writes kept
    an hour apart from those kept five minutes (`cache_creation`), and its service tier."""
    out = into or Usage()
    if not isinstance(u, dict):
        return out
    for name, attr in (("input_tokens", "input_tokens"), ("output_tokens", "output_tokens"),
                       ("cache_read_input_tokens", "cached_input_tokens"),
                       ("cache_creation_input_tokens", "cache_write_tokens")):
        if name in u and isinstance(u[name], int):
            setattr(out, attr, u[name])  # message_delta totals are cumulative
    if "cache_creation_input_tokens" in u:
        # The total includes the 1-hour writes, billed at their own price (a running total
        # without the breakdown keeps the one message_start gave).
        if isinstance(u.get("cache_creation"), dict):
            out.cache_write_1h_tokens = _int(u, "cache_creation", "ephemeral_1h_input_tokens")
        out.cache_write_1h_tokens = min(out.cache_write_1h_tokens, out.cache_write_tokens)
        out.cache_write_tokens -= out.cache_write_1h_tokens
    if "service_tier" in u:
        out.service_tier = service_tier(u["service_tier"])
    if isinstance(u.get("server_tool_use"), dict):  # a running total in message_delta
        out.web_search_requests = _int(u, "server_tool_use", "web_search_requests")
    out.reported = True
    return out


def web_search_calls(output: Any) -> int:
    """The web searches an OpenAI Responses answer ran: its `web_search_call` output items
    (its usage does not count them)."""
    if type(output) is not list:
        return 0
    return sum(1 for item in output if type(item) is dict
               and item.get("type") == WEB_SEARCH_CALL)


WEB_SEARCH_CALL = "web_search_call"


def gemini_usage(meta: Any) -> Usage:
    """Gemini's `usageMetadata`: cached prompt tokens are part of `promptTokenCount`, and
    thinking tokens are billed as output."""
    if not isinstance(meta, dict):
        return Usage()
    prompt, cached = _int(meta, "promptTokenCount"), _int(meta, "cachedContentTokenCount")
    thoughts = _int(meta, "thoughtsTokenCount")
    cached = min(cached, prompt)
    return Usage(input_tokens=prompt - cached, cached_input_tokens=cached,
                 output_tokens=_int(meta, "candidatesTokenCount") + thoughts,
                 reasoning_tokens=thoughts, reported=True)


def converse_usage(u: Any, tier: Any = None) -> Usage:
    """Bedrock Converse's `usage`: cache reads and writes apart from `inputTokens`; `tier`:
    the response's (or metadata event's) `serviceTier`."""
    if not isinstance(u, dict):
        return Usage()
    return Usage(input_tokens=_int(u, "inputTokens"), output_tokens=_int(u, "outputTokens"),
                 cached_input_tokens=_int(u, "cacheReadInputTokens"),
                 cache_write_tokens=_int(u, "cacheWriteInputTokens"), reported=True,
                 service_tier=service_tier(tier))


class StreamUsage:
    """Usage of an SSE stream, counted event by event: a few counters, never the events, so
    memory does not grow with the stream. Streamed text is estimated where the provider
    said nothing (a stream cut off before its totals)."""

    def __init__(self, family: str) -> None:
        self.family = family
        self.usage = Usage()
        self.streamed_chars = 0
        self.final = False  # the provider's closing usage arrived (message_delta / usage chunk)
        # OpenAI Responses' web search calls, as each is done (the closing event may be too
        # large to parse; a stream cut short has still run those searches).
        self.searches = 0
        # The reader of an event's JSON in this family's shapes (OpenAI's by default), chosen
        # once for every event of the stream (a function, not a bound method: no cycle).
        self._read = _READERS.get(family, StreamUsage._add_openai)

    def add(self, event: Event) -> None:
        if event.data == "[DONE]":
            return
        try:
            doc = loads(event.data)
        except ValueError:
            return
        if isinstance(doc, dict):
            self._read(self, doc)

    def _add_gemini(self, doc: dict[str, Any]) -> None:
        # Each event's usageMetadata is the running total; the last names a finish reason.
        if doc.get("usageMetadata"):
            self.usage = gemini_usage(doc["usageMetadata"])
        for candidate in doc.get("candidates") or []:
            if not isinstance(candidate, dict):
                continue
            for part in (candidate.get("content") or {}).get("parts") or []:
                self.streamed_chars += len(part.get("text") or "") if \
                    isinstance(part, dict) else 0
            self.final = self.final or candidate.get("finishReason") is not None

    def _add_converse(self, doc: dict[str, Any]) -> None:
        # Shapes, not names: metadata, contentBlockDelta.
        if isinstance(doc.get("usage"), dict):
            self.usage, self.final = converse_usage(doc["usage"], doc.get("serviceTier")), True
        delta = doc.get("delta")
        if isinstance(delta, dict):
            self.streamed_chars += len(delta.get("text") or "") + len(
                (delta.get("toolUse") or {}).get("input") or "")

    def _add_anthropic(self, doc: dict[str, Any]) -> None:
        kind = doc.get("type", "")
        if kind == "content_block_delta":
            delta = doc.get("delta") or {}
            self.streamed_chars += len(delta.get("text") or delta.get("partial_json") or
                                       delta.get("thinking") or "")
        elif kind == "message_start":
            anthropic_usage((doc.get("message") or {}).get("usage"), self.usage)
        elif kind == "message_delta":
            anthropic_usage(doc.get("usage"), self.usage)
            self.final = True

    def _add_openai(self, doc: dict[str, Any]) -> None:
        kind = doc.get("type", "")  # the Responses API's events (chat chunks name none)
        if kind in ("response.completed", "response.incomplete", "response.failed"):
            response = doc.get("response") or {}
            reported = openai_usage(response.get("usage"), response.get("service_tier")) \
                if isinstance(response, dict) else Usage()
            if reported.reported:
                self.usage, self.final = reported, True
        elif kind == "response.output_text.delta":
            self.streamed_chars += len(doc.get("delta") or "")
        elif kind == "response.output_item.done":
            item = doc.get("item")
            self.searches += type(item) is dict and item.get("type") == WEB_SEARCH_CALL
        elif doc.get("usage"):
            self.usage, self.final = openai_usage(doc["usage"], doc.get("service_tier")), True
        for choice in doc.get("choices") or []:
            delta = choice.get("delta") or {} if isinstance(choice, dict) else {}
            self.streamed_chars += len(delta.get("content") or "")
            for call in delta.get("tool_calls") or []:
                self.streamed_chars += len(((call or {}).get("function") or {})
                                           .get("arguments") or "")

    def long_event_usage(self, found: bytes, tier: bytes | None, finished: bool) -> None:
        """The usage of an event too large to parse, found by scanning it as sent: OpenAI
        Responses' `response.usage` and `service_tier` (its closing event), or Gemini's
        `usageMetadata` (the running total; `finished`: the event has a finish reason)."""
        try:
            doc, served = loads(found), loads(tier) if tier is not None else None
        except ValueError:
            return
        if self.family == "gemini":
            self.usage, self.final = gemini_usage(doc), self.final or finished
            return
        reported = openai_usage(doc, served)
        if reported.reported:
            self.usage, self.final = reported, True

    def add_unparsed(self, size: int) -> None:
        """An event too large to parse for usage (usage events are small): its bytes count
        towards the estimate of what was streamed."""
        self.streamed_chars += size

    def result(self) -> Usage:
        usage = Usage(**vars(self.usage))
        if self.searches:
            usage.web_search_requests = self.searches
        if not self.final:
            # Cut off before the provider's totals (message_start's output count is a
            # placeholder): charge what reached the client.
            usage.reported = False
            usage.output_tokens = max(usage.output_tokens, estimate_tokens(self.streamed_chars))
        return usage


_READERS = {"gemini": StreamUsage._add_gemini, "converse": StreamUsage._add_converse,
            "anthropic": StreamUsage._add_anthropic}


# The usage chunk is a few hundred bytes: an event longer than this is not it (and is not held
# back to find out). The Envoy host's usage cut (extproc/usage_cut.lua) uses the same bound.
MAX_USAGE_CHUNK_BYTES = 64 * 1024


# What every usage-only chunk has (an empty `choices`): events without it are not parsed to
# find out. The Envoy host's usage cut looks for the same.
USAGE_ONLY_HINT = re.compile(rb'"choices"\s*:\s*\[\s*\]')


def is_usage_only_chunk(event: Event) -> bool:
    """The extra chat-completions chunk `stream_options.include_usage` adds: no choices,
    just usage. Dropped from the client's stream when the gateway asked for it."""
    if not event.data.startswith("{"):
        return False
    try:
        doc = loads(event.data)
    except ValueError:
        return False
    return isinstance(doc, dict) and doc.get("choices") == [] and bool(doc.get("usage"))


def estimate_tokens(chars: int) -> int:
    return -(-chars // CHARS_PER_TOKEN)
