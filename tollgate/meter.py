"""The response meter: what a provider's answer used, counted as its bytes pass.

Memory stays bounded whatever the answer's size: a JSON body is scanned once for its
top-level `usage` object (nothing else is kept), and an event stream keeps usage counters,
never its events.
"""

from __future__ import annotations

import functools
import re
from typing import Any

from tollgate import eventstream
from tollgate import usage as usage_of
from tollgate.fastjson import loads
from tollgate.sse import SSEParser

# Events after which a provider sends nothing more (Anthropic, OpenAI Responses, errors);
# OpenAI chat streams end with `data: [DONE]`.
_LAST_EVENTS = {"message_stop", "response.completed", "response.failed", "response.incomplete",
                "error"}
# Usage is reported in small events and objects; anything larger is counted, not parsed.
MAX_PARSED_EVENT = 64 * 1024
_MAX_USAGE_OBJECT = 64 * 1024

_TOKEN = re.compile(rb'[{}\[\]":]')
_NEXT_BYTE = re.compile(rb'\s*(\S)')
# An OpenAI Responses web search call in JSON, as a scanned answer's bytes hold it: a
# string holds its quotes escaped, so no text can pass for it.
_SEARCH_CALL = re.compile(rb'"type"\s*:\s*"web_search_call"')
# Streams whose usage can come in an event too long to hold, by API family: the scanners
# that find it there (OpenAI's Responses repeat the whole answer in `response.completed`;
# a chat chunk may carry usage beside a long delta; Gemini's last event holds its usage
# beside the last part, a function call's whole arguments among them).
_LONG_EVENT_USAGE = {"openai": ((b"usage", b"service_tier", None),  # a Responses event's
                                (b"usage", b"service_tier", b"response")),  # own is last
                     "gemini": ((b"usageMetadata", None, None),)}
# A Gemini candidate's finish reason (a key: a string holds its quotes escaped).
_FINISH_REASON = re.compile(rb'"finishReason"\s*:')
# The top-level field naming the service tier that served a JSON answer, by API family
# (Anthropic's is inside `usage`; Bedrock's InvokeModel sends a header).
_TIER_KEYS = {"openai": b"service_tier", "converse": b"serviceTier"}


class _Matches:
    """How often `pattern` (a match a few dozen bytes long at most) occurs in bytes fed in
    pieces, a match split across two pieces included."""

    def __init__(self, pattern: re.Pattern[bytes]) -> None:
        self.pattern, self.count, self._tail = pattern, 0, b""

    def feed(self, data: bytes) -> None:
        seen = self._tail + data
        self.count += sum(1 for m in self.pattern.finditer(seen) if m.end() > len(self._tail))
        self._tail = seen[-64:]


def _odd_backslashes(chunk: bytes, start: int, end: int) -> bool:
    """Whether the run of backslashes just before `end` (not before `start`) is odd: the
    byte at `end` is then escaped."""
    j = end
    while j > start and chunk[j - 1] == 0x5C:
        j -= 1
    return (end - j) % 2 == 1


def _string_end(chunk: bytes, i: int) -> int:
    """Index of the quote that closes the string being read from `i`, or -1."""
    while (j := chunk.find(b'"', i)) >= 0:
        if not _odd_backslashes(chunk, i, j):
            return j
        i = j + 1
    return -1


class JSONUsageScanner:
    """Finds the top-level `"usage": {...}` of a JSON document fed in pieces, and the
    top-level `tier_key` (`service_tier`: a short string, or Converse's `serviceTier`
    object); with `within`, those of the object that top-level member holds instead (an
    OpenAI Responses event's `response`).

    A small tokenizer that tracks only strings, brackets and colons: numbers, literals and
    string contents are skipped by regular expressions, so a 20 MB body is one linear pass,
    and only the usage object itself is kept.
    """

    def __init__(self, key: bytes = b"usage", tier_key: bytes | None = None,
                 within: bytes | None = None) -> None:
        self.key = key  # Gemini calls it `usageMetadata`
        self.tier_key = tier_key
        self.within = within
        self._level = 1 if within is None else 2  # the depth of the keys looked for
        self._inside = within is None  # in the object where they are looked for
        self._within_next = False  # saw `"<within>":` at depth 1
        self.tier: bytes | None = None  # the tier's value as sent (a JSON string or object)
        self._tier_next = False  # saw `"<tier_key>":` at depth 1
        self.depth = 0
        self._in_string = False
        self._escape = False  # a backslash ended the last chunk inside a string
        self._string = bytearray()  # a depth-1 string, while it may be a key (short)
        self._key: bytes | None = None  # the depth-1 string just closed (a key if ':' follows)
        self._after_usage_key = False  # saw `"usage":` at depth 1
        self._capture: bytearray | None = None  # the usage object, while it is read
        self._capturing_tier = False
        self.found: bytes | None = None

    def _tier_value_starts(self, chunk: bytes, i: int) -> None:
        """After `"<tier_key>":`, only a string or an object is the tier (`null`, a number:
        no tier, and the next string is a key)."""
        if self._tier_next:
            m = _NEXT_BYTE.match(chunk, i)
            if m is not None and m.group(1) not in (b'"', b"{"):
                self._tier_next = False

    def feed(self, chunk: bytes) -> None:
        i, n = 0, len(chunk)
        start_capture = 0
        if not self._in_string:
            self._tier_value_starts(chunk, 0)
        while i < n:
            if self._in_string:
                if self._escape:  # a backslash ended the last chunk: skip what it escapes
                    self._escape = False
                    i += 1
                    continue
                end = _string_end(chunk, i)
                keys = self.depth == 1 or (self.depth == self._level and self._inside)
                if keys and len(self._string) <= 32:
                    self._string += chunk[i:min(n if end < 0 else end, i + 33)]
                if end < 0:  # the string goes on in the next chunk
                    self._escape = _odd_backslashes(chunk, i, n)
                    i = n
                else:
                    self._in_string = False
                    key = bytes(self._string)
                    self._key = key if keys else None
                    if self._tier_next and self.depth == self._level:
                        self.tier, self._key = b'"' + key + b'"', None
                    self._tier_next = False
                    i = end + 1
                continue
            m = _TOKEN.search(chunk, i)
            if m is None:
                break
            i = m.end()
            c = chunk[m.start()]
            if c == 0x22:  # '"'
                self._in_string, self._string = True, bytearray()
                self._after_usage_key = self._within_next = False
            elif c == 0x3A:  # ':'
                looked_in = self.depth == self._level and self._inside
                self._after_usage_key = looked_in and self._key == self.key
                self._tier_next = self.tier_key is not None and looked_in and \
                    self._key == self.tier_key
                self._within_next = self.within is not None and self.depth == 1 and \
                    self._key == self.within
                self._key = None
                self._tier_value_starts(chunk, i)
            elif c in (0x7B, 0x5B):  # '{' '['
                if (self._after_usage_key or self._tier_next) and c == 0x7B and \
                        self.depth == self._level:
                    self._capture, start_capture = bytearray(), m.start()
                    self._capturing_tier = self._tier_next
                if self._within_next and c == 0x7B:
                    self._inside = True
                self._after_usage_key, self._tier_next, self._key = False, False, None
                self._within_next = False
                self.depth += 1
            else:  # '}' ']'
                self.depth -= 1
                self._key, self._within_next = None, False
                if self.within is not None and self.depth == 1:
                    self._inside = False  # the object looked in has closed
                if self._capture is not None and self.depth == self._level:
                    self._append(chunk[start_capture:i])
                    if self._capture is not None and self._capturing_tier:
                        self.tier = bytes(self._capture)
                    elif self._capture is not None:
                        self.found = bytes(self._capture)
                    self._capture = None
        if self._capture is not None:
            self._append(chunk[start_capture:])

    def _append(self, piece: bytes) -> None:
        assert self._capture is not None
        if len(self._capture) + len(piece) > _MAX_USAGE_OBJECT:
            self._capture = None  # not a usage object any provider sends
            return
        self._capture += piece


# A JSON answer up to this size is held and parsed whole when its usage is asked for (C
# speed); a larger one is scanned as it passes, in bounded memory.
HELD_JSON_BYTES = 256 * 1024


class ResponseMeter:
    """Follows one provider response: its kind (event stream or JSON), whether it is
    complete, and what it used, in the provider's own API family."""

    def __init__(self, family: str, stream_requested: bool) -> None:
        self.family = family
        self.stream_requested = stream_requested
        self.is_sse: bool | None = False
        self.bytes = 0
        self.events = 0
        self._length: int | None = None
        self._ended = False
        self._long: list[JSONUsageScanner] = []  # scanning the long event passing
        self._long_open = False  # a long line is passing (scanned if it is data)
        self._long_finish: _Matches | None = None  # Gemini: a finish reason in it
        # Where a JSON answer says what it used and at which service tier.
        self._usage_key = b"usageMetadata" if family == "gemini" else b"usage"
        self._tier_key = _TIER_KEYS.get(family)
        self._held: bytearray | None = bytearray()  # a JSON answer, while it is small
        self._held_searches: int | None = None  # in a held one, parsed
        self._header_tier: str | None = None
        self._frames: eventstream.EventStreamToSSE | None = None

    # What reads a stream or a JSON answer too large to hold, made once one needs it: most
    # answers are JSON held whole, which needs none of them.
    @functools.cached_property
    def _sse(self) -> SSEParser:
        # An event too long to hold may report the stream's usage (`_LONG_EVENT_USAGE`): it
        # is scanned for it as its bytes pass.
        return SSEParser(max_line=MAX_PARSED_EVENT, long_line=self._long_event
                         if self.family in _LONG_EVENT_USAGE else None)

    @functools.cached_property
    def _stream(self) -> usage_of.StreamUsage:
        return usage_of.StreamUsage(self.family)

    @functools.cached_property
    def _json(self) -> JSONUsageScanner:
        return JSONUsageScanner(self._usage_key, self._tier_key)

    @functools.cached_property
    def _search_calls(self) -> _Matches:  # in a scanned JSON answer
        return _Matches(_SEARCH_CALL)

    def start(self, content_type: str | None, length: int | None,
              tier: str | None = None) -> None:
        """The response headers; without a content-type (a host that cannot see it), the
        first body bytes tell an event stream from JSON. `tier`: a service tier sent as a
        header (Bedrock's InvokeModel), which the body does not repeat."""
        self._length = length
        self._header_tier = usage_of.service_tier(tier)
        self.is_sse = None if content_type is None else \
            content_type.lower().startswith("text/event-stream")
        if eventstream.is_eventstream(content_type):  # Bedrock: frames, read as SSE
            self.is_sse, self._frames = True, eventstream.EventStreamToSSE()

    def feed(self, data: bytes) -> None:
        self.bytes += len(data)
        if self._frames is not None:
            data = self._frames.feed(data)
        if self.is_sse is None and data.strip():
            self.is_sse = self.stream_requested and not data.lstrip().startswith((b"{", b"["))
        if self.is_sse:
            for event in self._sse.feed(data):
                self.events += 1
                if event.dropped:  # and scanned for usage (`_long_event`)
                    self._stream.add_unparsed(event.dropped)
                else:
                    self._stream.add(event)
                # Gemini names no events: its last one carries the finish reason.
                self._ended = self._ended or event.event in _LAST_EVENTS or \
                    event.data.strip() == "[DONE]" or \
                    (self.family in ("gemini", "converse") and self._stream.final)
        elif self._held is not None:
            self._held += data
            if len(self._held) > HELD_JSON_BYTES:
                self._scan_held()
        else:
            self._scan(data)

    def _long_event(self, piece: bytes | None) -> None:
        """A line of an event too long to parse, piece by piece (None: it ended): the usage
        it reports, if any, is the stream's (and for Gemini, a finish reason ends it)."""
        if piece is None:
            finished = self._long_finish is not None and self._long_finish.count > 0
            for scanner in self._long:
                if scanner.found is not None:
                    self._stream.long_event_usage(scanner.found, scanner.tier, finished)
            self._long, self._long_open, self._long_finish = [], False, None
            return
        if not self._long_open:  # the line's start
            self._long_open = True
            if piece.startswith(b"data:"):
                self._long = [JSONUsageScanner(*spec) for spec in _LONG_EVENT_USAGE[self.family]]
                if self.family == "gemini":
                    self._long_finish = _Matches(_FINISH_REASON)
                piece = piece[len(b"data:"):]
        for scanner in self._long:
            scanner.feed(piece)
        if self._long_finish is not None:
            self._long_finish.feed(piece)

    def _scan_held(self) -> None:
        held, self._held = self._held, None
        if held:
            self._scan(bytes(held))

    def _scan(self, data: bytes) -> None:
        self._json.feed(data)
        if self.family == "openai":
            self._search_calls.feed(data)

    def _usage_parts(self) -> tuple[Any, Any]:
        """A JSON answer's top-level usage object and service tier (a string or an object),
        or None for each it lacks."""
        if self._held is not None:
            try:
                doc = loads(self._held)
            except ValueError:  # cut short, say: scanned for what it holds
                doc = None
            if isinstance(doc, dict):
                self._held_searches = usage_of.web_search_calls(doc.get("output"))
                found = doc.get(self._usage_key.decode())
                tier_key = self._tier_key
                tier = doc.get(tier_key.decode()) if tier_key is not None else None
                return (found if isinstance(found, dict) else None,
                        tier if isinstance(tier, str | dict) else None)
            self._scan_held()
        try:
            found = loads(self._json.found) if self._json.found is not None else None
            tier = loads(self._json.tier) if self._json.tier is not None else None
        except ValueError:
            return None, None
        return found, tier

    @property
    def complete(self) -> bool:
        """The whole response has been seen: its content-length, or its last event."""
        if self.is_sse:
            return self._ended
        return self._length is not None and self.bytes >= self._length

    def usage(self) -> usage_of.Usage:
        used = self._stream.result() if self.is_sse else self._json_usage()
        if used.service_tier is None and self._header_tier is not None:
            used.service_tier = self._header_tier
        return used

    def _json_usage(self) -> usage_of.Usage:
        doc, tier = self._usage_parts()
        if doc is None:
            return usage_of.Usage()
        if self.family == "gemini":
            return usage_of.gemini_usage(doc)
        if self.family == "converse":
            return usage_of.converse_usage(doc, tier)
        if self.family == "anthropic":
            return usage_of.anthropic_usage(doc)
        used = usage_of.openai_usage(doc, tier)
        used.web_search_requests = self._search_calls.count if self._held_searches is None \
            else self._held_searches
        return used
