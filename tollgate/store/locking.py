"""Waiting for another process's write lock on a SQLite file without stopping the event loop.

SQLite's busy handler waits inside the call, sleeping a millisecond or more at a time: on a
gateway's event loop that stops every request it serves. A serving gateway's connections
take no busy timeout instead; a write refused for the lock raises `Busy` before it has
written anything, and `unlocked` tries it again from the loop, which serves the other
requests meanwhile.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from pathlib import Path

from tollgate.store.base import StoreUnavailable

# How long a write waits for another process's hold on the file's write lock (a second
# gateway process, a CLI) before the store counts as unavailable.
BUSY_SECONDS = 10.0
_FIRST_WAIT, _LONGEST_WAIT = 0.0002, 0.01  # seconds between tries, doubling


class Busy(StoreUnavailable):
    """Another connection holds the file's write lock: nothing was written, try again."""


def raise_if_busy(e: sqlite3.Error, path: Path) -> None:
    """Raise `Busy` for `e` if it is another connection's write lock that refused the
    statement."""
    if (getattr(e, "sqlite_errorcode", 0) & 0xFF) == sqlite3.SQLITE_BUSY:
        raise Busy(f"sqlite {path}: {e}") from e


async def unlocked[T](write: Callable[[], T]) -> T:
    """`write()`, which raises `Busy` while another process holds its file's write lock:
    tried again from the event loop until it goes through, for up to BUSY_SECONDS in all
    (then its last `Busy` is raised)."""
    wait, waited = _FIRST_WAIT, 0.0
    while True:
        try:
            return write()
        except Busy:
            if waited >= BUSY_SECONDS:
                raise
        await asyncio.sleep(wait)
        waited += wait
        wait = min(wait * 2, _LONGEST_WAIT)
