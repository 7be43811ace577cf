"""The event loop the ext_proc processes run on: uvloop's (libuv, in C). Every request costs
the decision service two HTTP exchanges with Envoy and a few store round trips, and asyncio's
own loop and transports, in Python, cost a seventh of its instructions per request."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import uvloop


def run[T](main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run` on a uvloop loop."""
    return asyncio.run(main, loop_factory=uvloop.new_event_loop)
