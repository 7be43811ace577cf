"""WAL checkpoints on a thread of their own, off the event loop that serves requests.

A connection in WAL mode copies the log back into the database file itself, inside the
commit that takes the log past 1,000 pages: that commit, on the loop every request and
stream is served from, then waits for the copy and its two fsyncs (about 3 ms here, once
every hundred requests or so). A serving gateway's files leave that to a thread with a
connection of its own, which copies the log after every thousand rows written, without
blocking the writer (a passive checkpoint; SQLite releases the GIL while it runs).

The log starts again from its beginning only once all of it has been copied, so the thread
copies again at once what was written while it copied (a far shorter copy). Under a load
that never pauses it may still not catch up: the serving connection's own checkpoint stays
as a backstop, at 4,096 pages, and then finds little left to copy."""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path

log = logging.getLogger("tollgate.store")

# Rows written between copies: about 1,600 pages of log when requests come one at a time
# (each writes about ten rows, on some sixteen pages), fewer under load, where a commit's
# rows share pages; as often as SQLite's own 1,000 pages would copy, or less.
EVERY = 1000
AGAIN = 8  # copies at most, one after another, to catch up with a log still written to
BACKSTOP_PAGES = 4096  # 16 MiB of log at SQLite's 4 KiB pages


class Checkpointer:
    """Checkpoints the WAL of `db`'s file from a thread, once `every` rows have been written
    since the last time (`wrote()` after each commit). A connection that does not serve
    (`serving` False: a CLI's) starts no thread and keeps SQLite's own checkpoints."""

    def __init__(self, db: sqlite3.Connection, path: Path, serving: bool = True) -> None:
        self.db, self.path, self.every = db, path, EVERY
        self._asked_at = db.total_changes
        self._wrote = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if serving:
            db.execute(f"PRAGMA wal_autocheckpoint={BACKSTOP_PAGES}")
            self._thread = threading.Thread(target=self._run, daemon=True,
                                            name=f"tollgate-checkpoint {path}")
            self._thread.start()

    def wrote(self) -> None:
        """A commit has added to the log (called on the writing connection's thread)."""
        if self._thread is None:
            return
        changes = self.db.total_changes
        if changes - self._asked_at >= self.every:
            self._asked_at = changes
            self._wrote.set()

    def _run(self) -> None:
        try:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as e:
            log.warning("could not open %s to checkpoint it (its connection will): %s",
                        self.path, e)
            return
        try:
            while True:
                self._wrote.wait()
                if self._stop.is_set():
                    return
                self._wrote.clear()
                # The log starts again from its beginning only once all of it is copied:
                # what was written while a copy ran is copied at once (a far shorter copy),
                # until a copy finds no more than the last.
                seen = None
                for _ in range(AGAIN):
                    try:
                        busy, logged, _copied = db.execute(
                            "PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    except sqlite3.Error as e:  # the backstop copies meanwhile
                        log.warning("could not checkpoint %s: %s", self.path, e)
                        break
                    if busy or logged == seen or self._stop.is_set():
                        break
                    seen = logged
        finally:
            db.close()

    def close(self) -> None:
        """Stop the thread (a copy under way ends first)."""
        if self._thread is None:
            return
        self._stop.set()
        self._wrote.set()
        self._thread.join()
