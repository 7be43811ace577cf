"""Incremental Server-Sent Events parser: feed bytes as they arrive, split anywhere.

Linear in the bytes fed, however long a line is: each chunk is scanned once, and an unfinished
line is kept as a list of pieces, never re-joined and re-scanned.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_EOL = re.compile(rb"\r\n|\r|\n")


# Not frozen: a frozen dataclass sets each field through `object.__setattr__`, which made
# an event cost three times as much to make (every event of every stream is one).
@dataclass(slots=True)
class Event:
    event: str  # "message" when the stream names none
    data: str
    id: str | None = None
    dropped: int = 0  # bytes of data left out: a line longer than the parser keeps


class SSEParser:
    """Follows the WHATWG event-stream rules (CRLF/LF/CR line ends, comments, multi-line data).

    `max_line`: longer lines are not kept (their size is reported on the event as
    `dropped`), so memory stays bounded for a reader that only needs small events.
    `long_line`: given each longer line's bytes as they arrive (from its start), then None
    when it ends, for a reader that scans them.
    """

    def __init__(self, max_line: int | None = None,
                 long_line: Callable[[bytes | None], None] | None = None) -> None:
        self._max_line = max_line
        self._long_line = long_line
        self._tapped = False  # the unfinished line's bytes are going to `long_line`
        self._parts: list[bytes] = []  # the unfinished line
        self._size = 0  # its length so far
        self._event = ""
        self._data: list[str] = []
        self._dropped = 0
        self._id: str | None = None
        self._pending_cr = False

    def feed(self, chunk: bytes) -> list[Event]:
        if self._pending_cr or b"\r" in chunk:
            return self._feed_any(chunk)
        # Lines end in LF alone (as every provider writes them): split in C.
        *lines, rest = chunk.split(b"\n")
        events: list[Event] = []
        limit = self._max_line
        for raw in lines:
            if self._parts:  # the end of a line begun in an earlier chunk
                self._keep(raw)
                raw, size = b"".join(self._parts), self._size
                self._parts, self._size = [], 0
                event = self._ended_line(raw, size)
            elif not raw:  # (most lines are a blank line or an event's one data line)
                event = self._dispatch()
            elif raw.startswith(b"data: ") and (limit is None or len(raw) <= limit):
                self._data.append(raw[6:].decode("utf-8", errors="replace"))
                continue
            else:
                event = self._ended_line(raw, len(raw))
            if event is not None:
                events.append(event)
        self._keep(rest)
        return events

    def _feed_any(self, chunk: bytes) -> list[Event]:
        """Any line ends: CRLF, CR or LF."""
        if self._pending_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]  # the LF of a CRLF split across chunks
        self._pending_cr = chunk.endswith(b"\r")
        events: list[Event] = []
        start = 0
        for m in _EOL.finditer(chunk):
            self._keep(chunk[start:m.start()])
            raw, size = b"".join(self._parts), self._size
            self._parts, self._size = [], 0
            if (event := self._ended_line(raw, size)) is not None:
                events.append(event)
            start = m.end()
        self._keep(chunk[start:])
        return events

    def _ended_line(self, raw: bytes, size: int) -> Event | None:
        """A whole line (`size` bytes, of which `raw` was kept): the event it ends, if any."""
        if self._max_line is not None and size > self._max_line:
            self._oversized(raw, size)
            if self._long_line is not None:
                if not self._tapped:  # the whole line came in one chunk
                    self._long_line(raw)
                self._long_line(None)
                self._tapped = False
            return None
        return self._line(raw.decode("utf-8", errors="replace"))

    def _keep(self, piece: bytes) -> None:
        if not piece:
            return
        before = self._size
        self._size += len(piece)
        if self._max_line is None or self._size <= self._max_line:
            self._parts.append(piece)
        elif before <= self._max_line:  # just went over: keep only the field name
            line = b"".join([*self._parts, piece])
            self._parts = [line[:16]]
            if self._long_line is not None:
                self._long_line(line)
                self._tapped = True
        elif self._long_line is not None:
            self._long_line(piece)

    def _oversized(self, head: bytes, size: int) -> None:
        if head.startswith(b"data"):
            self._dropped += size
            self._data.append("")

    def _dispatch(self) -> Event | None:
        """A blank line: the event its lines made, if they had data."""
        if not self._data:
            self._event = ""
            return None
        event = Event(self._event or "message", "\n".join(self._data), self._id,
                      self._dropped)
        self._event, self._data, self._dropped = "", [], 0
        return event

    def _line(self, line: str) -> Event | None:
        if line == "":
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            self._id = value
        return None


_BLOCK_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")

# A rewriter holds an event until it is whole; one larger than this ends the stream.
MAX_EVENT_BYTES = 16 * 1024 * 1024


class CappedEvents:
    """Bounds what a stream rewriter may hold: once an event passes `cap` bytes, the client
    gets `ending` (an error event in its own API shape) and the rest of the stream is
    dropped; `on_overflow` tells the exchange, which settles what was used."""

    def __init__(self, inner: Any, ending: bytes, on_overflow: Callable[[str], None],
                 cap: int = MAX_EVENT_BYTES):
        self._inner = inner
        self._ending = ending
        self._on_overflow = on_overflow
        self._cap = cap
        self._open = 0  # bytes since the last event boundary
        self._tail = b""  # the last bytes seen, for a boundary split across chunks
        self.broken = False

    def feed(self, chunk: bytes) -> bytes:
        if self.broken:
            return b""
        seen = self._tail + chunk
        began = len(self._tail) - self._open  # where, in `seen`, the open event began
        over = None  # where the first event over the cap began
        for m in _BLOCK_END.finditer(seen):
            if m.end() - began > self._cap:
                over = began
                break
            began = m.end()
        if over is None and len(seen) - began > self._cap:
            over = began
        if over is not None:
            self.broken = True
            self._on_overflow(f"a streamed event passed {self._cap} bytes; the stream was "
                              "ended")
            # The events before it in this chunk still go out, then the error event.
            return self._inner.feed(chunk[:max(0, over - len(self._tail))]) + self._ending
        self._open = len(seen) - began
        self._tail = seen[-3:]
        return self._inner.feed(chunk)

    def flush(self) -> bytes:
        return b"" if self.broken else self._inner.flush()


class EventFilter:
    """Drops whole events from a byte stream and passes every other byte through untouched.

    Bytes are held back only until the event they belong to is complete, so a stream keeps
    flowing event by event. Each byte is searched once (a long event costs linear time).
    """

    def __init__(self, drop: Callable[[Event], bool], max_held: int | None = None,
                 hint: re.Pattern[bytes] | None = None):
        self._drop = drop
        # Text every event `drop` takes has: the others pass without being parsed.
        self._hint = hint
        # An unfinished event longer than this cannot be one `drop` takes: its bytes go on
        # unheld (the rest of it follows as it comes).
        self._max_held = max_held
        self._buf = bytearray()
        self._searched = 0  # bytes of _buf known to hold no block end

    def feed(self, chunk: bytes) -> bytes:
        self._buf += chunk
        out = []
        while m := _BLOCK_END.search(self._buf, max(0, self._searched - 3)):
            block = bytes(self._buf[: m.end()])
            del self._buf[: m.end()]
            self._searched = 0
            if self._hint is not None and not self._hint.search(block):
                out.append(block)
                continue
            events = SSEParser().feed(block)
            if not (events and all(self._drop(e) for e in events)):
                out.append(block)
        if self._max_held is not None and len(self._buf) > self._max_held:
            # All but what may be the start of its boundary (which ends this event, whatever
            # follows it).
            out.append(bytes(self._buf[:-3]))
            del self._buf[:-3]
        self._searched = len(self._buf)
        return b"".join(out)

    def flush(self) -> bytes:
        rest, self._buf, self._searched = bytes(self._buf), bytearray(), 0
        return rest
