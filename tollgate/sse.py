"""Incremental Server-Sent Events parser: feed bytes as they arrive, split anywhere."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Event:
    event: str  # "message" when the stream names none
    data: str
    id: str | None = None


class SSEParser:
    """Follows the WHATWG event-stream rules (CRLF/LF/CR line ends, comments, multi-line data)."""

    def __init__(self) -> None:
        self._buf = b""
        self._event = ""
        self._data: list[str] = []
        self._id: str | None = None
        self._pending_cr = False

    def feed(self, chunk: bytes) -> list[Event]:
        if self._pending_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]  # the LF of a CRLF split across chunks
        self._pending_cr = chunk.endswith(b"\r")
        self._buf += chunk
        events: list[Event] = []
        lines = self._buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        self._buf = lines.pop()  # the unfinished line
        for raw in lines:
            event = self._line(raw.decode("utf-8", errors="replace"))
            if event is not None:
                events.append(event)
        return events

    def _line(self, line: str) -> Event | None:
        if line == "":
            if not self._data:
                self._event = ""
                return None
            event = Event(self._event or "message", "\n".join(self._data), self._id)
            self._event, self._data = "", []
            return event
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


_BLOCK_END = (b"\r\n\r\n", b"\n\n", b"\r\r")


class EventFilter:
    """Drops whole events from a byte stream and passes every other byte through untouched.

    Bytes are held back only until the event they belong to is complete, so a stream keeps
    flowing event by event.
    """

    def __init__(self, drop: Callable[[Event], bool]):
        self._drop = drop
        self._buf = b""

    def feed(self, chunk: bytes) -> bytes:
        self._buf += chunk
        out = []
        while True:
            ends = [(i, len(sep)) for sep in _BLOCK_END if (i := self._buf.find(sep)) != -1]
            if not ends:
                break
            i, n = min(ends)
            block, self._buf = self._buf[: i + n], self._buf[i + n:]
            events = SSEParser().feed(block)
            if not (events and all(self._drop(e) for e in events)):
                out.append(block)
        return b"".join(out)

    def flush(self) -> bytes:
        rest, self._buf = self._buf, b""
        return rest
