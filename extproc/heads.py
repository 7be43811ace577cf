"""The heads Envoy's Lua filters send tollgate ("name: value" a line, pseudo-headers too):
a client's request head (decide.lua) and a provider's response head (meter.lua, in its
first post or in the access log's report of the response's end)."""

from __future__ import annotations

from tollgate.request import lower_headers


class BadRequest(ValueError):
    """Not what tollgate's filters send (extproc/decider.py and meter.lua say what they
    send)."""


def head_lines(head: bytes) -> list[tuple[str, str]]:
    """"name: value" lines, as the filters send a head."""
    pairs = []
    for line in head.decode("utf-8", "surrogateescape").split("\n"):
        name, sep, value = line.partition(": ")
        if not sep:
            name, value = line.rstrip(":"), ""
        pairs.append((name, value))
    return pairs


def response_head(payload: bytes) -> tuple[int, dict[str, str], bytes]:
    """A response's head as the meter sends it: its status, its headers and the bytes
    after them."""
    head, sep, body = payload.partition(b"\n\n")
    if not sep:
        raise BadRequest("no end to the response's headers")
    headers = lower_headers(head_lines(head))
    status = headers.pop(":status", "")
    if not status.isdigit():
        raise BadRequest(f"a response head without a status: {status!r}")
    return int(status), headers, body
