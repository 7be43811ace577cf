"""The event loop the ext_proc processes run on: uvloop's (libuv, in C). Every request costs
the decision service two HTTP exchanges with Envoy and a few store round trips, and asyncio's
own loop and transports, in Python, cost a seventh of its instructions per request."""

from __future__ import annotations

import asyncio
import ctypes
import gc
from collections.abc import Coroutine
from typing import Any

import uvloop

# glibc's mallopt parameters, and how much freed memory a process keeps for its next bodies.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
KEPT_BYTES = 16 * 1024 * 1024


def keep_freed_memory() -> None:
    """Keep up to KEPT_BYTES of freed memory, and serve blocks up to that size from the
    heap. glibc otherwise gives memory back to the system once twice the largest block it
    freed lies free at its heap's top, and a body of a MiB (several copies of it, freed as
    its request ends) had the next one fault its pages in again: some 200-700 faults per
    request, or none, as the heap happened to lie, so one process of two served a 1 MiB
    stream 15% slower than the other. Nothing on a C library without mallopt (not glibc)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt(M_MMAP_THRESHOLD, KEPT_BYTES)
    mallopt(M_TRIM_THRESHOLD, KEPT_BYTES)


def run[T](main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run` on a uvloop loop, with what is loaded so far out of the collector's
    sight: the modules' objects never become garbage, and under load a full collection that
    scanned them too paused the service 70-90 ms every few seconds (about 30 without); and
    freed memory kept for the next bodies (`keep_freed_memory`)."""
    gc.freeze()
    keep_freed_memory()
    return asyncio.run(main, loop_factory=uvloop.new_event_loop)
