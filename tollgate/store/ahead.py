"""Reservations a SQLite-state gateway grants before it writes them.

A request that fits its budgets as this process last knew them (`SQLiteStore.reserve_now`)
is answered before its reservation is written to the state file: most often its own
settlement takes it (in a batch of them), which then writes neither its holds nor its
written-ahead row, only what it spent; else it is written within a second of the oldest
grant not yet written (`sqlite.WRITE_WITHIN`), with all the others, or by a transaction
that reads the file's reservations (one made in the file). The reservation's transaction,
some 0.2 ms cold, is off the request's path. Two things keep that as safe as writing first:

- The journal (`<state>.ahead`): each such reservation is written to it, one `pwrite` and
  no fsync (what SQLite's WAL gives a commit under `synchronous=NORMAL`), before the answer;
  once they are all in the state file, the next is written over them from the journal's
  start again (pages it already has: no block to allocate or free on the request's path).
  A gateway that dies in between leaves them there; the next gateway to open the file
  records those it finds neither in flight nor in the ledger as it records a dead gateway's
  requests in flight, charged what they surely cost. (What is left of entries written over
  is in flight or in the ledger, or is not a whole entry.)
- The owners' lock (`<state>.owners`): every gateway process serving from the file holds a
  shared lock on it while it lives. A process grants from memory only while it holds it
  exclusively, from its first such grant until they are all written: no other gateway
  serves from the file meanwhile, whose reservations would not see those not yet written.
  A gateway that starts then waits for a moment when they are all written (a second
  after the oldest at most) before it serves; while another
  holds it shared, every reservation is made in the file, as before (tried again a second
  later, `SHARED_FOR`).

POSIX record locks (`lockf`): a process's own lock never conflicts with itself, and any
close of the file drops them, so each process opens the file once and keeps it (`ahead_of`);
its shared lock is held while it has a serving store open on the state file.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Protocol

from tollgate.store.base import StoreUnavailable

log = logging.getLogger("tollgate.store")

# How long a gateway starting on a file waits for another's reservations to be written.
START_WAIT = 10.0
# How long a process that found another gateway serving from the file waits before it
# tries again to grant before writing (every reservation is written first meanwhile).
SHARED_FOR = 1.0


class Granting(Protocol):
    def write_granted(self) -> None:
        """Write what it granted before (in a transaction of its own)."""


class Ahead:
    """The owners' lock and the journal of one state file, in this process. One store of
    the process may grant before it writes (`holder`); another on the same file (a config
    reload's, while the last one's requests settle) has it write them before its own."""

    def __init__(self, state: Path) -> None:
        self.journal = Path(f"{state}.ahead")
        self._owners = os.open(f"{state}.owners", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._journal: int | None = None
        self._lines: dict[tuple[str, ...], str] = {}  # counters' JSON, by counters
        self.exclusive = False
        self.written = 0  # bytes of entries not yet in the state file
        self.holder: Granting | None = None
        self.stores = 0  # serving stores open on the file in this process
        self._shared_until = 0.0  # (monotonic) another gateway was found serving from it
        self._shared = False  # ... and said so in the log

    def join(self) -> None:
        """A serving store opens on the file: the owners' lock is taken shared (the first
        store waits, off any event loop's requests, for another process's grants)."""
        waited = 0.0
        while not self.stores:
            try:
                fcntl.lockf(self._owners, fcntl.LOCK_SH | fcntl.LOCK_NB)
                break
            except OSError:
                if waited >= START_WAIT:
                    raise
            time.sleep(0.001)
            waited += 0.001
        self.stores += 1

    def leave(self, store: Granting) -> None:
        """`store` closes (having written what it granted); the last lets go of the lock."""
        if self.holder is store:
            self.holder = None
        self.stores -= 1
        if not self.stores:  # (what the journal holds is all written: it is emptied)
            if self._journal is not None:
                os.ftruncate(self._journal, 0)
            self.written = 0
            fcntl.lockf(self._owners, fcntl.LOCK_UN)
            self.exclusive = False

    def may_take(self, store: Granting) -> bool:
        """Whether `store` may try to `take` the lock: no other store of this process
        grants, and no other gateway was found serving from the file a moment ago."""
        return (self.holder is None or self.holder is store) and \
            (self.exclusive or time.monotonic() >= self._shared_until)

    def take(self, store: Granting) -> bool:
        """Hold the owners' lock exclusively for `store` (no other gateway serves from
        the file, no other store of this process grants from it), at once, or False."""
        if not self.may_take(store):
            return False
        if not self.exclusive:
            try:
                fcntl.lockf(self._owners, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                self._shared_until = time.monotonic() + SHARED_FOR
                if not self._shared:
                    self._shared = True
                    log.info("another gateway process serves from %s: each reservation is "
                             "written to it before its answer", self.journal.with_suffix(""))
                return False
            self.exclusive = True
            if self._shared:
                self._shared = False
                log.info("this process alone serves from %s again: reservations of requests "
                         "like a precedent are journaled and answered before they are "
                         "written", self.journal.with_suffix(""))
        self.holder = store
        return True

    def append(self, counters: list[str], row: str) -> None:
        """Journal a reservation granted before it is written: its budget counters and its
        written-ahead row (raises OSError: it is then not granted this way)."""
        if self._journal is None:
            self._journal = os.open(self.journal, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC,
                                    0o600)
        named = self._lines.get(tuple(counters))
        if named is None:
            if len(self._lines) > 1024:
                self._lines.clear()
            named = self._lines[tuple(counters)] = json.dumps(counters)
        line = f"{named}\t{row}\n".encode()
        if os.pwrite(self._journal, line, self.written) != len(line):
            raise OSError("the reservation journal took part of an entry")
        self.written += len(line)

    def all_written(self) -> None:
        """Every journaled reservation is in the state file: the next is written from the
        journal's start, and the owners' lock is shared again (a gateway waiting to start
        may)."""
        self.written = 0
        if self.exclusive:
            fcntl.lockf(self._owners, fcntl.LOCK_SH)
            self.exclusive = False

    def before_writing(self, store: Granting) -> None:
        """`store` is about to write the file: what another store of this process granted
        goes first."""
        if self.holder is not None and self.holder is not store:
            self.holder.write_granted()

    def left(self) -> list[tuple[list[str], dict[str, Any]]]:
        """What the journal holds, (counters, row) each, some of it maybe written to the
        state file already (see the module's docstring). A line cut short (being written,
        or written over) is left out: its request was never answered, or is in the file."""
        try:
            text = self.journal.read_text("utf-8", errors="replace")
        except FileNotFoundError:
            return []
        except OSError as e:  # never served as if it held nothing
            raise StoreUnavailable(f"cannot read the reservation journal {self.journal}: "
                                   f"{e}") from e
        out = []
        for line in text.split("\n"):
            counters, _, row = line.partition("\t")
            try:
                entry = (json.loads(counters), json.loads(row))
            except ValueError:
                continue
            if isinstance(entry[0], list) and isinstance(entry[1], dict):
                out.append(entry)
        return out

    def recovered(self) -> None:
        """A gone gateway's journal is recorded: emptied."""
        with open(self.journal, "ab") as f:
            os.ftruncate(f.fileno(), 0)
        self.written = 0


_AHEAD: dict[str, Ahead] = {}


def ahead_of(state: Path) -> Ahead:
    """This process's `Ahead` of a state file, joined by a serving store (`Ahead.join`)."""
    name = str(state.resolve())
    if name not in _AHEAD:
        _AHEAD[name] = Ahead(state)
    _AHEAD[name].join()
    return _AHEAD[name]
