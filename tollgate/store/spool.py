"""A local spool in front of a shared store: finished requests the store cannot take right
now are kept on disk and replayed, in order, once it answers again. Replays are idempotent
(the store ignores a request id it has already settled), so nothing is lost or counted twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

from tollgate.budgets import Hold
from tollgate.fastjson import dumps
from tollgate.ledger import LedgerRow
from tollgate.ratelimit import Limit, Window
from tollgate.store import locking
from tollgate.store.base import (
    PROCESS,
    Counter,
    LimitSettlement,
    Reservation,
    Store,
    StoreUnavailable,
    holder_alive,
    in_background,
    resolve,
    until_written,
)
from tollgate.store.checkpoint import Checkpointer

log = logging.getLogger("tollgate.store")
# Settled requests' in-flight rows are deleted together, at most this long after: a process
# that dies first leaves rows whose replay the store ignores (they are settled already).
FORGET_EVERY = 0.1


class Spooled(Store):
    def __init__(self, inner: Store, path: Path | str, owner: bool = True):
        self.inner = inner
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                  timeout=locking.BUSY_SECONDS)
        self.db.execute("PRAGMA journal_mode=WAL")
        # As the SQLite state: a commit survives the process dying, and costs no fsync.
        self.db.execute("PRAGMA synchronous=NORMAL")
        # A serving gateway copies the log back into the file off the event loop.
        self._checkpoints = Checkpointer(self.db, self.path, serving=owner)
        self.db.execute("CREATE TABLE IF NOT EXISTS spool (id INTEGER PRIMARY KEY "
                        "AUTOINCREMENT, counters TEXT, reserved INTEGER, row TEXT, limits TEXT)")
        spooled = {c[1] for c in self.db.execute("PRAGMA table_info(spool)")}
        for added in ("limits", "released"):  # a spool of an earlier version
            if added not in spooled:
                self.db.execute(f"ALTER TABLE spool ADD COLUMN {added} TEXT")
        # Requests this node has in flight: written ahead on its own disk.
        self.db.execute("CREATE TABLE IF NOT EXISTS inflight (request_id TEXT PRIMARY KEY, "
                        "pid INTEGER NOT NULL, row TEXT NOT NULL, counters TEXT)")
        have = {c[1] for c in self.db.execute("PRAGMA table_info(inflight)")}
        for added in ("counters TEXT", "started INTEGER"):  # a spool of an earlier version
            if added.split()[0] not in have:
                self.db.execute(f"ALTER TABLE inflight ADD COLUMN {added}")
        self._writing: set[asyncio.Task[None]] = set()
        # Written ahead here, not yet in the shared store: they go in the next batch.
        self._ahead: list[tuple[LedgerRow, list[str] | None, asyncio.Future[None]]] = []
        self._settled: list[str] = []  # in-flight rows to delete with the next batch
        self._forgetting: asyncio.TimerHandle | None = None
        if owner:
            self._recover()
            # Other processes on this node write here too: a write that finds one of them
            # holding the lock waits for it on the event loop (`locking`), not in SQLite.
            self.db.execute("PRAGMA busy_timeout=0")
        # Spooled rows wait for replay: settlements replay them first, to keep the ledger in
        # order. Known here rather than asked of the file on every settlement; rows another
        # process spools are replayed by it, or by the gateway's replay loop.
        self._behind = self.pending() > 0

    def _recover(self) -> None:
        """Rows of requests a dead gateway on this node had in flight are spooled, so they
        reach the shared ledger with the next replay."""
        for request_id, pid, started, row, counters in self.db.execute(
                "SELECT request_id, pid, started, row, counters FROM inflight").fetchall():
            if not holder_alive(pid, started):
                # Charged to its budgets; its holds are leases that expire by themselves.
                self.db.execute("INSERT INTO spool (counters, reserved, row) VALUES "
                                "(?, 0, ?)", (counters or "[]", row))
                self.db.execute("DELETE FROM inflight WHERE request_id = ?", (request_id,))

    async def admit(self, row: LedgerRow, counters: list[str] | None = None) -> None:
        """On this node's disk first (it survives Redis being down), then in Redis, off the
        request's path (it survives this node never coming back). The requests written ahead
        in one turn of the loop commit together, at its end: each waits for its commit, not
        its own."""
        loop = asyncio.get_running_loop()
        committed = loop.create_future()
        self._ahead.append((row, counters, committed))
        if len(self._ahead) == 1:  # the first since the last batch: a batch goes next
            loop.call_soon(self._admit_batch)
        await committed

    def _admit_batch(self) -> None:
        """The requests written ahead since the last batch: one transaction here, then one
        call to the store (in a task: the requests go on meanwhile)."""
        batch, self._ahead = self._ahead, []
        if not batch:  # written already, by close()
            return
        rows = [(row, counters) for row, counters, _ in batch]

        def write() -> None:
            self._in_one_transaction(
                "INSERT OR REPLACE INTO inflight (request_id, pid, started, row, counters) "
                "VALUES (?, ?, ?, ?, ?)",
                [(row.request_id, *PROCESS, row.to_json(), dumps(counters or []))
                 for row, counters in rows])

        try:
            write()
        except locking.Busy:  # another process writes here: waited for on the loop
            in_background(self._writing, self._admit_when_unlocked(write, batch, rows))
            return
        except sqlite3.Error as e:
            self._admitted(batch, rows, e)
            return
        self._admitted(batch, rows, None)

    async def _admit_when_unlocked(self, write: Callable[[], None],
                                   batch: list[tuple[LedgerRow, list[str] | None,
                                                     asyncio.Future[None]]],
                                   rows: list[tuple[LedgerRow, list[str] | None]]) -> None:
        try:
            await locking.unlocked(write)
        except locking.Busy as e:  # held too long: they fail, as on any error of this disk
            self._admitted(batch, rows, e.__cause__ or e)
        except sqlite3.Error as e:
            self._admitted(batch, rows, e)
        else:
            self._admitted(batch, rows, None)

    def _admitted(self, batch: list[tuple[LedgerRow, list[str] | None, asyncio.Future[None]]],
                  rows: list[tuple[LedgerRow, list[str] | None]],
                  failure: Exception | None) -> None:
        """A batch of write-aheads is on this node's disk (or `failure` says why not): its
        requests go on, and the rows go to the store, off their path."""
        for *_, committed in batch:
            resolve(committed, failure)
        if failure is None:
            in_background(self._writing, self._admit_inner(rows))

    async def _admit_inner(self, rows: list[tuple[LedgerRow, list[str] | None]]) -> None:
        with contextlib.suppress(StoreUnavailable):
            await self.inner.admit_many(rows)

    def _in_one_transaction(self, statement: str, params: list[tuple[object, ...]]) -> None:
        """`statement` for each of `params`, committed together or not at all."""
        try:
            self.db.execute("BEGIN")
            self.db.executemany(statement, params)
            self.db.execute("COMMIT")
            self._checkpoints.wrote()
        except sqlite3.Error as e:
            # Left open, the transaction would take in every later write uncommitted.
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            locking.raise_if_busy(e, self.path)
            raise

    def _write(self, statement: str, params: tuple[object, ...]) -> None:
        """One statement in its own transaction; `locking.Busy` while another process holds
        the write lock."""
        try:
            self.db.execute(statement, params)
        except sqlite3.Error as e:
            locking.raise_if_busy(e, self.path)
            raise
        self._checkpoints.wrote()

    async def recover(self) -> int:
        return await self.inner.recover()

    def pending(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM spool").fetchone()[0]

    async def flush(self) -> int:
        """Replay spooled requests until the store refuses; returns how many went through."""
        done = 0
        for ident, counters, reserved, row, limits, released in self.db.execute(
                "SELECT id, counters, reserved, row, limits, released FROM spool ORDER BY id"
        ).fetchall():
            await self.inner.finish(json.loads(counters), reserved,
                                    LedgerRow.from_dict(json.loads(row)),
                                    LimitSettlement(**json.loads(limits)) if limits else None,
                                    json.loads(released) if released else None)
            await locking.unlocked(
                lambda ident=ident: self._write("DELETE FROM spool WHERE id = ?", (ident,)))
            done += 1
        self._behind = self.pending() > 0  # (spooled while this replay ran)
        if done:
            log.info("replayed %d spooled request(s) into the state store", done)
        return done

    async def reserve(self, request_id: str, holds: list[Hold], amount: int,
                      limits: list[Limit] | None = None, tokens: int = 0,
                      now: float | None = None) -> Reservation:
        return await self.inner.reserve(request_id, holds, amount, limits, tokens, now)

    async def windows(self, limits: list[Limit], now: float | None = None) -> list[Window]:
        return await self.inner.windows(limits, now)

    async def finish(self, counters: list[str], reserved: int, row: LedgerRow,
                     limits: LimitSettlement | None = None,
                     released: list[str] | None = None) -> None:
        if row.admitted:
            self._forget(row.request_id)
        try:
            if self._behind:
                await self.flush()  # keep the ledger in order
            await self.inner.finish(counters, reserved, row, limits, released)
        except StoreUnavailable as e:
            spooled = (json.dumps(counters), reserved, row.to_json(),
                       json.dumps(asdict(limits)) if limits else None,
                       json.dumps(released) if released else None)
            await locking.unlocked(lambda: self._write(
                "INSERT INTO spool (counters, reserved, row, limits, released) "
                "VALUES (?, ?, ?, ?, ?)", spooled))
            self._behind = True
            log.warning("state store unavailable (%s); request %s spooled for replay", e,
                        row.request_id)

    async def counters(self, holds: list[Hold]) -> list[Counter]:
        return await self.inner.counters(holds)

    async def rows(self, since: datetime | None = None,
                   until: datetime | None = None) -> list[LedgerRow]:
        return await self.inner.rows(since, until)

    async def renew(self, leases: list[tuple[str, list[str], int]]) -> None:
        await self.inner.renew(leases)

    async def ping(self) -> None:
        await self.inner.ping()

    def _forget(self, request_id: str) -> None:
        self._settled.append(request_id)
        if self._forgetting is None:
            self._forgetting = asyncio.get_running_loop().call_later(FORGET_EVERY,
                                                                    self._forget_now)

    def _forget_now(self) -> None:
        """Delete the in-flight rows of the requests settled since the last batch, in one
        transaction."""
        self._forgetting = None
        settled, self._settled = self._settled, []
        if not settled:
            return
        try:
            self._in_one_transaction("DELETE FROM inflight WHERE request_id = ?",
                                     [(r,) for r in settled])
        except locking.Busy:  # another process writes here: with the next batch
            self._settled = settled + self._settled
            self._forgetting = asyncio.get_running_loop().call_later(FORGET_EVERY,
                                                                    self._forget_now)
        except sqlite3.Error as e:
            log.warning("could not delete the in-flight rows of %d settled requests (%s); a "
                        "restart replays them, which changes nothing", len(settled), e)

    async def close(self) -> None:
        # The last writes may wait for another process's lock in SQLite itself: nothing
        # else is served any more.
        self.db.execute(f"PRAGMA busy_timeout={int(locking.BUSY_SECONDS * 1000)}")
        if self._forgetting is not None:
            self._forgetting.cancel()
        self._forget_now()
        self._admit_batch()  # write-aheads of this turn, whose batch has not gone yet
        # (A batch that waited for the lock sends its rows to the store after it.)
        await until_written(self._writing)
        await self.inner.close()
        await asyncio.to_thread(self._checkpoints.close)
        self.db.close()
