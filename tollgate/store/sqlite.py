"""SQLite state: one file, WAL, durable across restarts. For a single gateway node.

Rate-limit windows live in this process's memory (`windows.py`) and are written here as
requests settle, so a restart keeps them and `rate-limits status` can read them.

Each call is one short transaction on the event loop's thread; `BEGIN IMMEDIATE` takes the
write lock up front, so a reservation's check and its increments cannot interleave with
another writer (a CLI, a second process on the same file). Settlements are one exception:
those that follow another in the same turn of the loop are committed together at its end (see
`finish`). Reservations made from a precedent are the other: while this process is the only
gateway serving from the file, one that fits the budget counters as this process knows them
is granted, journaled and answered, and written with the next transaction (see `ahead.py`). A
write that finds the write lock held waits for it on the loop, not in SQLite's busy handler
(see `tollgate.store.locking`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import json
import logging
import operator
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from tollgate.budgets import Hold
from tollgate.ledger import LedgerRow
from tollgate.ratelimit import SLIDING_SECONDS, Limit, Window
from tollgate.store import locking
from tollgate.store.ahead import ahead_of
from tollgate.store.base import (
    PROCESS,
    Counter,
    LimitSettlement,
    Reservation,
    Store,
    StoreUnavailable,
    distinct_id,
    holder_alive,
    in_background,
    resolve,
    until_written,
)
from tollgate.store.checkpoint import Checkpointer
from tollgate.store.windows import LocalWindows

log = logging.getLogger("tollgate.store")
# A reservation granted before it is written (see `ahead.py`) is written within this many
# seconds of the oldest not yet written, with all the others, unless its own settlement
# took it before (then it writes only its spend): the Envoy host's access log brings a
# request's end within RESPONSE_END_FLUSH (0.1 s), and a batch of settlements leaves the
# grants of requests still in flight alone. At 0.25 s, a quarter of the requests of steady
# traffic were still in flight when it came, each with its hold and written-ahead row
# written, then removed a batch later (3.8 statements a request in all); at 1 s, 1.5% of
# them (2.6). Later would keep a gateway starting on the file waiting longer (`ahead.py`),
# and hold more in the journal.
WRITE_WITHIN = 1.0
# Settlements held for one transaction (`settling_together`) at most: past this many, the
# next commit them (a batch's memory and its wait stay bounded).
MAX_TOGETHER = 64

SCHEMA = """
CREATE TABLE IF NOT EXISTS budget_counters (
    counter TEXT PRIMARY KEY,           -- budget id : window key
    spent INTEGER NOT NULL DEFAULT 0,   -- micro-dollars
    reserved INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS ledger (
    request_id TEXT PRIMARY KEY, ts TEXT NOT NULL, key_id TEXT, key_name TEXT,
    principal TEXT, org TEXT, team TEXT, project TEXT, provider TEXT, model TEXT, route TEXT,
    input_tokens INTEGER, output_tokens INTEGER, cached_input_tokens INTEGER,
    cache_write_tokens INTEGER, reasoning_tokens INTEGER, cost_micros INTEGER,
    usage_reported INTEGER, status INTEGER, outcome TEXT, latency_ms REAL,
    fallback_count INTEGER, code TEXT, fallbacks TEXT, skipped TEXT, output_cap INTEGER,
    cache_write_1h_tokens INTEGER DEFAULT 0, tier TEXT, shadow TEXT,
    web_search_requests INTEGER DEFAULT 0
);
CREATE INDEX IF NOT EXISTS ledger_ts ON ledger (ts);
-- Rate limits, as settled requests left them (the windows themselves are in memory).
CREATE TABLE IF NOT EXISTS rate_entries (  -- RPM and TPM: one row per request in a window
    counter TEXT NOT NULL, request_id TEXT NOT NULL, ts REAL NOT NULL, amount INTEGER NOT NULL,
    PRIMARY KEY (counter, request_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS rate_entries_ts ON rate_entries (ts);
CREATE TABLE IF NOT EXISTS rate_days (     -- RPD: requests per key or provider and UTC day
    counter TEXT PRIMARY KEY, used INTEGER NOT NULL, newest REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS inflight (    -- written ahead, removed when the request settles
    request_id TEXT PRIMARY KEY, pid INTEGER NOT NULL, row TEXT NOT NULL
);
-- Each budget hold and the process holding it: a gateway starting on this file releases
-- the holds of processes that are gone, and only those (another may be serving).
CREATE TABLE IF NOT EXISTS holds (
    request_id TEXT NOT NULL, counter TEXT NOT NULL, amount INTEGER NOT NULL,
    pid INTEGER NOT NULL, started INTEGER, PRIMARY KEY (request_id, counter)
) WITHOUT ROWID;
"""
_COLUMNS = [c for c in LedgerRow.__dataclass_fields__]
_INSERT_ROW = (f"INSERT OR IGNORE INTO ledger ({', '.join(_COLUMNS)}) "
               f"VALUES ({', '.join('?' for _ in _COLUMNS)})")
_VALUES = operator.attrgetter(*_COLUMNS)  # a row's, in the ledger's column order
# The serving locks this process holds, by state file (see `SQLiteStore.serves_alone`).
_SERVING: dict[str, IO[bytes]] = {}


@dataclasses.dataclass(slots=True)
class _Granted:
    """A reservation granted before it is written (`SQLiteStore.reserve_now`)."""

    request_id: str
    counters: list[str]
    amount: int
    row: str  # its written-ahead row's JSON


@dataclasses.dataclass(slots=True)
class _Settling:
    """One settlement (`SQLiteStore.finish`), and what waits for its commit (None: its
    caller, committing it at once)."""

    counters: list[str]
    reserved: int
    row: LedgerRow
    limits: LimitSettlement | None
    released: list[str] | None
    done: asyncio.Future[None] | None = None
    # Its reservation, when it was granted and is settled before it was written: neither is
    # written then, only what it spent (see `SQLiteStore._settle`).
    granted: _Granted | None = None


# The WAL index's header (SQLite's file format, "WAL-Index Format": two copies of it at the
# start of `<file>-shm`), which each commit rewrites: its frame count, change counter and
# checksums, or its salts when the log starts over.
WAL_INDEX_HEADER = 96


def _open_wal_index(path: Path) -> int | None:
    """The file's WAL index, open to read (None: it cannot be; SQLite is asked each time).
    (Opened once SQLite has made it; SQLite keeps it while a connection is open.)"""
    try:
        return os.open(f"{path}-shm", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


def _wal_header(fd: int | None) -> bytes | None:
    if fd is None:
        return None
    try:
        header = os.pread(fd, WAL_INDEX_HEADER, 0)
    except OSError:
        return None
    return header if len(header) == WAL_INDEX_HEADER else None


class SQLiteStore(Store):
    def __init__(self, path: Path | str, owner: bool = True,
                 clock: Callable[[], float] = time.time):
        """`owner`: this process serves traffic from the file, so reservations left by a
        previous run (which cannot be in flight any more) are released at start. `clock`
        (epoch seconds) is the store's time: rate windows are read and kept by it alone."""
        self.path = Path(path)
        self.clock = clock
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                  timeout=10)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(ledger)")}
        for added, kind in (("code", "TEXT"), ("fallbacks", "TEXT"), ("skipped", "TEXT"),
                            ("output_cap", "INTEGER"),
                            ("cache_write_1h_tokens", "INTEGER DEFAULT 0"),
                            ("tier", "TEXT"), ("shadow", "TEXT"),
                            ("web_search_requests", "INTEGER DEFAULT 0")):  # an earlier ledger
            if added not in columns:
                self.db.execute(f"ALTER TABLE ledger ADD COLUMN {added} {kind}")
        if "started" not in {row[1] for row in self.db.execute("PRAGMA table_info(inflight)")}:
            self.db.execute("ALTER TABLE inflight ADD COLUMN started INTEGER")
        self.rate_windows = LocalWindows()
        self._pruned = 0.0
        # Budget counters as the file has them with this process's grants not yet written,
        # while no other connection has written the file since (its `data_version`).
        self._known: dict[str, Counter] = {}
        self._version: int | None = None
        # Granted, journaled, to be written; by request id.
        self._granted: dict[str, _Granted] = {}
        self._writing: asyncio.Handle | None = None
        self._unwritten = False  # writing them failed: reservations go to the file again
        self._pending_known: dict[str, Counter] = {}  # a transaction's, known once it commits
        self._settling: list[_Settling] = []  # settlements for the end of this loop turn
        # The loop whose current turn has had its first settlement (see `finish`).
        self._turn_of: asyncio.AbstractEventLoop | None = None
        self._together = 0  # open `settling_together`s
        self._load_windows(clock())
        # Rate windows live in this process: only one serving process per file may keep
        # them, or each would admit the full limit (see `serves_alone`).
        self._serve_lock = self._lock_serving() if owner else None
        # A serving gateway copies its log back into the file off the event loop.
        self._checkpoints = Checkpointer(self.db, self.path, serving=owner)
        self._committing: set[asyncio.Task[None]] = set()  # batches waiting for the lock
        # (Before recovery: a gateway that wrote this file's journal is gone once it is taken.)
        self._ahead = ahead_of(self.path) if owner else None
        # The WAL index's header (in `<file>-shm`), which every commit to the file changes,
        # as it was when the file was last found current (`_current`): while it reads the
        # same, no connection has committed since, and SQLite need not be asked.
        self._wal_index = _open_wal_index(self.path) if self._ahead is not None else None
        self._header: bytes | None = None
        if owner:
            self._recover()
            # From here on a write that finds another process holding the write lock waits
            # for it on the event loop (`locking.unlocked`), which serves the other requests
            # meanwhile, instead of in SQLite's busy handler, which sleeps the whole loop a
            # millisecond or more at a time.
            self.db.execute("PRAGMA busy_timeout=0")

    def _lock_serving(self) -> IO[bytes] | None:
        """The file's serving lock, taken once per process and held while it lives (None:
        another process has it)."""
        name = str(self.path.resolve()) + ".serving"
        if name not in _SERVING:
            lock = open(name, "ab")  # noqa: SIM115 - held open: the lock lives with it
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                lock.close()
                return None
            _SERVING[name] = lock
        return _SERVING[name]

    @property
    def serves_alone(self) -> bool:
        """No other gateway process serves from this file (rate limits can be kept here)."""
        return self._serve_lock is not None

    def _recover(self) -> None:
        """Requests a gateway that is gone had in flight get their (interrupted) ledger rows,
        charged what they surely cost to their budgets, and its holds are released; the
        holds of gateways still serving from this file stay."""
        left = self._ahead.left() if self._ahead is not None else []
        with self._transaction():
            for request_id, pid, started, row in self.db.execute(
                    "SELECT request_id, pid, started, row FROM inflight").fetchall():
                if holder_alive(pid, started):
                    continue  # another gateway on this file is serving it
                counters = [c for (c,) in self.db.execute(
                    "SELECT counter FROM holds WHERE request_id = ?", (request_id,))]
                self._charge_interrupted(json.loads(row), counters)
                self.db.execute("DELETE FROM inflight WHERE request_id = ?", (request_id,))
            for counters, doc in left:  # journaled and never written: as those above
                if not self.db.execute("SELECT 1 FROM inflight WHERE request_id = ?",
                                       (doc.get("request_id"),)).fetchone():
                    self._charge_interrupted(doc, counters)
            holders = self.db.execute("SELECT DISTINCT pid, started FROM holds").fetchall()
            for pid, started in holders:
                if not holder_alive(pid, started):
                    self.db.execute("DELETE FROM holds WHERE pid = ? AND started IS ?",
                                    (pid, started))
            # What stays reserved is what live gateways hold (none: nothing).
            self.db.execute(
                "UPDATE budget_counters SET reserved = COALESCE((SELECT SUM(amount) FROM "
                "holds WHERE holds.counter = budget_counters.counter), 0)")
        if left and self._ahead is not None:
            self._ahead.recovered()

    def _charge_interrupted(self, doc: dict[str, Any], counters: list[str]) -> None:
        """A gone gateway's request in flight: its row (once) and what it surely cost."""
        inserted = self.db.execute(_INSERT_ROW, [doc.get(c) for c in _COLUMNS]).rowcount
        if inserted and doc.get("cost_micros"):
            for counter in counters:
                self.db.execute("UPDATE budget_counters SET spent = spent + ? WHERE counter = ?",
                                (doc["cost_micros"], counter))

    async def admit(self, row: LedgerRow, counters: list[str] | None = None) -> None:
        await locking.unlocked(lambda: self._write_ahead(row))

    def _write_ahead(self, row: LedgerRow) -> None:
        granted = self._granted.get(row.request_id)
        if granted is not None:  # (written ahead again: its grant, written later, says so)
            granted.row = row.to_json()
        try:
            self._insert_ahead(row)
        except sqlite3.Error as e:
            locking.raise_if_busy(e, self.path)
            raise StoreUnavailable(f"sqlite {self.path}: {e}") from e
        self._checkpoints.wrote()

    def _insert_ahead(self, row: LedgerRow) -> None:
        self._insert_json(row.request_id, row.to_json())

    def _insert_json(self, request_id: str, row: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO inflight (request_id, pid, started, row) "
                        "VALUES (?, ?, ?, ?)", (request_id, *PROCESS, row))

    reserves_now = True

    def reserve_now(self, request_id: str, holds: list[Hold], amount: int,
                    limits: list[Limit], tokens: int, row: LedgerRow) -> Reservation | None:
        now = self.clock()
        if holds:
            granted = self._grant(request_id, holds, amount, limits, tokens, now, row)
            if granted is not None:
                return granted
        try:
            return self._reserve(request_id, holds, amount, limits, tokens, now, row)
        except StoreUnavailable:  # the write lock is another's: `reserve` waits for it
            return None

    def _grant(self, request_id: str, holds: list[Hold], amount: int, limits: list[Limit],
               tokens: int, now: float, row: LedgerRow) -> Reservation | None:
        """A reservation granted from the counters this process knows, journaled, and
        written once the caller's answer is on its way (`write_granted`); None where
        only the file can say (see `ahead.py`): the file was written by another since,
        a counter is not known, the request does not fit (its refusal is the file's to
        make), another gateway serves from the file, or the last write failed."""
        ahead, known = self._ahead, self._known
        if (ahead is None or self._unwritten or not known or not ahead.may_take(self)
                or not self._current()):
            return None
        after = []
        for hold in holds:
            c = known.get(hold.counter)
            if c is None or not hold.admits(c.spent + c.reserved, amount):
                return None
            after.append(Counter(c.spent, c.reserved + amount))
        read = [self.rate_windows.read(lim, lim.amount(tokens), now) for lim in limits]
        if not all(ok for ok, _ in read) or not ahead.take(self):
            return None
        counters = [h.counter for h in holds]
        granted = _Granted(request_id, counters, amount, row.to_json())
        try:
            ahead.append(counters, granted.row)
        except OSError as e:
            log.error("could not journal a reservation (%s): made in the state file", e)
            return None
        for counter in counters:  # (a counter held twice takes it twice, as in the file)
            c = known[counter]
            known[counter] = Counter(c.spent, c.reserved + amount)
        self._granted[request_id] = granted
        for lim in limits:
            self.rate_windows.take(lim, request_id, lim.amount(tokens), now)
        if self._writing is None:
            try:
                self._writing = asyncio.get_running_loop().call_later(WRITE_WITHIN,
                                                                      self._write_in_time)
            except RuntimeError:  # no loop: written now
                self.write_granted()
        return Reservation(True, after, windows=[w for _, w in read], at=now)

    def _current(self) -> bool:
        """Whether the counters this process knows are still the file's: no other
        connection has written it since (else they are forgotten). (The version is taken
        before what is known is read, in a later transaction: a write in between makes
        the next check forget it again, never trust it.)

        Asking SQLite (`data_version`) takes a lock on the WAL index and lets it go, two
        system calls and some 30 µs of a cold decision; while the WAL index's header reads
        as it did when the file was last found current, nothing was committed since, by
        any connection, and the answer is known. (The header is read before SQLite is
        asked: a commit between the two makes the next check ask again.)"""
        header = _wal_header(self._wal_index)
        if header is not None and header == self._header:
            return True
        self._header = None
        version = self.db.execute("PRAGMA data_version").fetchone()[0]
        if version != self._version:
            self._known.clear()
            self._version = version
            return False
        self._header = header
        return True

    def _write_in_time(self) -> None:
        self._writing = None
        self.write_granted()

    def write_granted(self) -> None:
        """Write the reservations granted before, in a transaction of their own (the next
        transaction writes them first, whichever it is: most often their settlements')."""
        try:
            self._commit_granted()
        except locking.Busy:  # another process writes: they wait for it on the loop
            in_background(self._committing, self._write_granted_when_unlocked())
        except StoreUnavailable as e:
            self._written_failed(e)

    def _commit_granted(self) -> None:
        if self._granted:
            with self._transaction():  # (which writes them first)
                pass

    async def _write_granted_when_unlocked(self) -> None:
        try:
            await locking.unlocked(self._commit_granted)
        except StoreUnavailable as e:
            self._written_failed(e)

    def _written_failed(self, e: Exception) -> None:
        self._unwritten = True
        log.error("could not write %d reservations granted before (%s): they stay "
                  "journaled, and are written with the state's next transaction",
                  len(self._granted), e)

    def _write_granted_rows(self) -> None:
        """In a transaction: the holds and written-ahead rows of what was granted before."""
        for g in self._granted.values():
            self._hold(g.request_id, g.counters, g.amount)
            self._insert_json(g.request_id, g.row)

    def _hold(self, request_id: str, counters: list[str], amount: int) -> None:
        for counter in counters:
            self.db.execute(
                "INSERT INTO budget_counters (counter, reserved) VALUES (?, ?) "
                "ON CONFLICT (counter) DO UPDATE SET reserved = reserved + ?",
                (counter, amount, amount))
            self.db.execute("INSERT OR REPLACE INTO holds (request_id, counter, amount, pid, "
                            "started) VALUES (?, ?, ?, ?, ?)",
                            (request_id, counter, amount, *PROCESS))

    def _counter(self, name: str) -> Counter:
        row = self.db.execute("SELECT spent, reserved FROM budget_counters WHERE counter = ?",
                              (name,)).fetchone()
        return Counter(*row) if row else Counter()

    def _knows(self, counter: str, spent: int, released: int) -> None:
        """In a transaction: its change to a counter this process knows, as its statement
        makes it (known once it commits)."""
        known = self._pending_known.get(counter)
        if known is None:
            known = self._known.get(counter)
        if known is not None:
            self._pending_known[counter] = Counter(known.spent + spent,
                                                   max(0, known.reserved - released))

    @contextlib.contextmanager
    def _transaction(self, in_reservation: bool = False, settling: bool = False
                     ) -> Iterator[None]:
        """One write transaction, taking the write lock up front; it writes first what was
        granted before and not yet written, and the counters it changes (`_knows`) are
        known once it commits. `in_reservation`: a request waits for it (its reservation
        in the file). `settling`: a batch of settlements, which leaves the grants of
        requests still in flight to their write (WRITE_WITHIN), while one is due: their
        own settlements, most often in the next batch, then take them (each writes its
        spend alone), where written now each would be written, then removed, a batch
        apart. Nothing reads the file's reservations meanwhile: no other gateway serves
        from it, and a reservation made in the file writes them first."""
        if self._ahead is not None:
            self._ahead.before_writing(self)
        deferred = settling and self._writing is not None and not self._unwritten
        try:
            try:
                self.db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as e:
                locking.raise_if_busy(e, self.path)
                raise
            try:
                if self._ahead is not None and not deferred:
                    self._write_granted_rows()
                yield
                self.db.execute("COMMIT")
                self._checkpoints.wrote()
            except BaseException:
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                self._pending_known = {}
                raise
        except sqlite3.Error as e:
            raise StoreUnavailable(f"sqlite {self.path}: {e}") from e
        changed, self._pending_known = self._pending_known, {}
        if self._ahead is not None:
            self._known.update(changed)
            if not (deferred and self._granted):  # (else their write stays due)
                if self._granted or self._unwritten:
                    self._granted.clear()
                    self._unwritten = False
                # All written: the next grant waits WRITE_WITHIN of its own for its
                # settlement (in a batch of them) before it is written.
                self._cancel_write()
                if self._ahead.holder is self:
                    self._ahead.all_written()
            # This commit changed the WAL index's header: read again now, after the
            # answer it served, rather than on the next grant's path (none while another
            # gateway serves from the file: nothing is granted then).
            if self._known and not in_reservation and self._ahead.may_take(self):
                with contextlib.suppress(sqlite3.Error):  # (asked on the next grant)
                    self._current()

    def _load_windows(self, now: float) -> None:
        """The windows of requests settled before this store opened (a restart, a CLI)."""
        by_counter: dict[str, list[tuple[float, str, int]]] = {}
        for counter, request_id, ts, amount in self.db.execute(
                "SELECT counter, request_id, ts, amount FROM rate_entries WHERE ts > ?",
                (now - SLIDING_SECONDS,)):
            by_counter.setdefault(counter, []).append((ts, request_id, amount))
        for counter, entries in by_counter.items():
            self.rate_windows.load(counter, entries)
        for counter, used, newest in self.db.execute(
                "SELECT counter, used, newest FROM rate_days WHERE newest > ?",
                (now - 2 * 86400,)):
            self.rate_windows.load(counter, [], (used, newest))

    async def reserve(self, request_id: str, holds: list[Hold], amount: int,
                      limits: list[Limit] | None = None, tokens: int = 0,
                      now: float | None = None) -> Reservation:
        """Rate limits are checked in memory, budgets in one transaction; nothing awaits in
        between, so on the event loop the two are one atomic step (waiting for another
        process's write lock comes before both)."""
        limits = limits or []
        now = self.clock() if now is None else now
        return await locking.unlocked(
            lambda: self._reserve(request_id, holds, amount, limits, tokens, now))

    def _reserve(self, request_id: str, holds: list[Hold], amount: int, limits: list[Limit],
                 tokens: int, now: float, ahead: LedgerRow | None = None) -> Reservation:
        """`ahead`: the request's written-ahead row, written once it is granted, with its
        holds (one commit, not two)."""
        read = [self.rate_windows.read(lim, lim.amount(tokens), now) for lim in limits]
        windows = [w for _, w in read]
        over = [i for i, (ok, _) in enumerate(read) if not ok]
        found: list[Counter] = []
        if holds:
            with self._transaction(in_reservation=True):
                if self._ahead is not None and self._ahead.may_take(self):
                    self._current()  # (what this reads is known: see `_grant`)
                found = [self._counter(h.counter) for h in holds]
                refused = next((i for i, (h, c) in enumerate(zip(holds, found, strict=True))
                                if not h.admits(c.committed, amount)), None)
                counters = [h.counter for h in holds]
                if refused is not None or over:
                    self._pending_known.update(zip(counters, found, strict=True))
                    return Reservation(False, found, refused, windows, over, now)
                self._hold(request_id, counters, amount)
                self._pending_known.update(
                    (n, Counter(c.spent, c.reserved + amount * counters.count(n)))
                    for n, c in zip(counters, found, strict=True))
                if ahead is not None:
                    self._insert_ahead(ahead)
        elif over:
            return Reservation(False, [], None, windows, over, now)
        elif ahead is not None:  # nothing held: written alone (nothing is taken before it)
            self._write_ahead(ahead)
        for lim in limits:
            self.rate_windows.take(lim, request_id, lim.amount(tokens), now)
        return Reservation(True, [Counter(c.spent, c.reserved + amount) for c in found],
                           windows=windows, at=now)

    async def windows(self, limits: list[Limit], now: float | None = None) -> list[Window]:
        now = self.clock() if now is None else now
        return [self.rate_windows.read(lim, 0, now)[1] for lim in limits]

    def _record_limits(self, request_id: str, limits: LimitSettlement) -> None:
        """Write what a settled request took from its limits (inside finish's transaction),
        and drop what has left every window, once a minute."""
        for counter in limits.sliding:
            if counter in limits.unsent:
                continue
            amount = limits.tokens_used(counter) if counter in limits.tokens else 1
            self.db.execute("INSERT OR REPLACE INTO rate_entries (counter, request_id, ts, "
                            "amount) VALUES (?, ?, ?, ?)",
                            (counter, request_id, limits.admitted, amount))
        for counter in limits.days:
            if counter in limits.unsent:
                continue
            self.db.execute("INSERT INTO rate_days (counter, used, newest) VALUES (?, 1, ?) "
                            "ON CONFLICT (counter) DO UPDATE SET used = used + 1, "
                            "newest = MAX(newest, ?)", (counter, limits.admitted,
                                                        limits.admitted))
        # Pruned by the clock the request was admitted on (the store's), never the wall's:
        # what left the window before this request was admitted has left it for good.
        now = limits.admitted
        if now - self._pruned > SLIDING_SECONDS:
            self._pruned = now
            self.db.execute("DELETE FROM rate_entries WHERE ts <= ?", (now - SLIDING_SECONDS,))
            self.db.execute("DELETE FROM rate_days WHERE newest < ?", (now - 2 * 86400,))
            self.rate_windows.forget_idle(now)

    async def finish(self, counters: list[str], reserved: int, row: LedgerRow,
                     limits: LimitSettlement | None = None,
                     released: list[str] | None = None) -> None:
        """The first settlement of a turn of the event loop is committed at once; those that
        follow it in the same turn (a burst, under load) at its end, together, in one
        transaction, in the order they were made: the pages they share (the ledger's and its
        index's, the budget counters', the in-flight rows') go to the WAL once per batch, not
        once per request. (Write-aheads, which decisions wait for, are committed at once.)
        While another process holds the write lock, each waits for it as the lock allows.
        While `settling_together` is open, each waits for it to close."""
        loop = asyncio.get_running_loop()
        settling = _Settling(counters, reserved, row, limits, released)
        waits = self._together and len(self._settling) < MAX_TOGETHER
        # (A CLI may run one loop after another: a turn is its loop's.)
        if not waits and self._turn_of is not loop:
            self._turn_of = loop
            loop.call_soon(self._commit_settlements)  # the end of this turn
            await locking.unlocked(lambda: self._commit_one(settling))
            return
        settling.done = done = loop.create_future()
        self._settling.append(settling)
        await done

    @contextlib.contextmanager
    def settling_together(self) -> Iterator[None]:
        """Settlements finished while it is open wait for it to close (or for MAX_TOGETHER
        of them), and are committed then, in one transaction: the ends of a batch of Envoy's
        access log, settled a turn or a moment apart (see extproc/proxy_replies.py), would
        each be a transaction of its own, its pages (the ledger's, its indexes', the
        counters') written to the WAL each time. Their reservations hold until then, as
        before any settles. Each that closes commits what waits, whether others are still
        open or not."""
        self._together += 1
        try:
            yield
        finally:
            self._together -= 1
            self._commit_settlements()  # (with those of this turn, if any wait for its end)

    def _commit_one(self, settling: _Settling) -> None:
        self._take_grants([settling])
        try:
            with self._transaction(settling=True):
                self._settle(settling)
        except BaseException:
            self._give_back([settling])
            raise
        self._settled(settling)

    def _take_grants(self, batch: list[_Settling]) -> None:
        """Settlements of reservations granted and not yet written take them: a request
        settled in the transaction that would write its hold and row ahead writes
        neither."""
        if self._granted:
            for s in batch:
                if s.row.admitted:
                    s.granted = self._granted.pop(s.row.request_id, None)

    def _give_back(self, batch: list[_Settling]) -> None:
        """Their transaction failed: their reservations are written as if not taken."""
        for s in batch:
            if s.granted is not None:
                self._granted[s.row.request_id] = s.granted
                s.granted = None

    def _commit_settlements(self) -> None:
        batch, self._settling, self._turn_of = self._settling, [], None
        if not batch:  # the turn's first settlement was its only one
            return
        try:
            self._commit_batch(batch)
        except locking.Busy:  # another process writes: this batch waits for it on the loop
            in_background(self._committing, self._commit_when_unlocked(batch))

    async def _commit_when_unlocked(self, batch: list[_Settling]) -> None:
        try:
            await locking.unlocked(lambda: self._commit_batch(batch))
        except StoreUnavailable as e:
            for s in batch:
                resolve(s.done, e)

    async def _commit_each_when_unlocked(self, settlements: list[_Settling]) -> None:
        for s in settlements:
            try:
                await locking.unlocked(lambda s=s: self._commit_one(s))
            except Exception as e:
                resolve(s.done, e)

    def _commit_batch(self, batch: list[_Settling]) -> None:
        """The settlements of `batch`, in one transaction; raises Busy (nothing written)
        while another process holds the write lock."""
        began = False
        self._take_grants(batch)
        try:
            with self._transaction(settling=True):
                began = True
                for s in batch:
                    self._settle(s)
        except locking.Busy:
            self._give_back(batch)
            raise
        except Exception as e:
            self._give_back(batch)
            if not began:  # the file cannot be written at all: none of them can
                for s in batch:
                    resolve(s.done, e)
                return
            # One of them failed, and the transaction with it: each again on its own, so
            # only that one fails (its caller logs it; its row stays written ahead). Another
            # process may take the lock in between: those left wait for it, as a batch does.
            for i, s in enumerate(batch):
                try:
                    self._commit_one(s)
                except locking.Busy:
                    in_background(self._committing, self._commit_each_when_unlocked(batch[i:]))
                    return
                except Exception as alone:
                    resolve(s.done, alone)
            return
        for s in batch:
            self._settled(s)

    def _settle(self, s: _Settling) -> None:
        """A settlement's statements (see `finish`)."""
        row, reserved, limits = s.row, s.reserved, s.limits
        if not row.admitted:
            if row.request_id in self._granted or self.db.execute(
                    "SELECT 1 FROM inflight WHERE request_id = ? UNION "
                    "SELECT 1 FROM holds WHERE request_id = ?",
                    (row.request_id, row.request_id)).fetchone():
                row = dataclasses.replace(row, request_id=distinct_id(row))
            self._insert_row(row)
            return
        # What the file holds for it (nothing, if its reservation was never written) and
        # what this process knows it holds.
        held, known = (reserved, reserved) if s.granted is None else (0, s.granted.amount)
        if s.granted is None:
            self.db.execute("DELETE FROM inflight WHERE request_id = ?", (row.request_id,))
            self.db.execute("DELETE FROM holds WHERE request_id = ?", (row.request_id,))
        if not self._insert_row(row):
            return  # already settled: a replay changes nothing
        for counter in s.counters:
            self.db.execute(
                "INSERT INTO budget_counters (counter, spent) VALUES (?, ?) "
                "ON CONFLICT (counter) DO UPDATE SET spent = spent + ?, "
                "reserved = MAX(0, reserved - ?)",
                (counter, row.cost_micros, row.cost_micros, held))
            self._knows(counter, row.cost_micros or 0, known)
        for counter in s.released or []:
            if held:
                self.db.execute("UPDATE budget_counters SET reserved = MAX(0, reserved - ?) "
                                "WHERE counter = ?", (held, counter))
            self._knows(counter, 0, known)
        if limits is not None:
            self._record_limits(row.request_id, limits)

    def _settled(self, s: _Settling) -> None:
        """Once a settlement is committed: its TPM entries hold the tokens it used, the
        limits of providers it never reached give back what it took, and its caller goes on."""
        limits, request_id = s.limits, s.row.request_id
        if limits is not None:
            for counter in limits.tokens:
                self.rate_windows.settle(counter, request_id, limits.tokens_used(counter))
            for counter in limits.unsent:
                self.rate_windows.withdraw(counter, request_id, counter in limits.days)
        resolve(s.done, None)

    def _insert_row(self, row: LedgerRow) -> bool:
        """Whether the row went in (False: its request id has one already)."""
        return bool(self.db.execute(_INSERT_ROW, _VALUES(row)).rowcount)

    async def counters(self, holds: list[Hold]) -> list[Counter]:
        self.write_granted()  # (what was granted, in the file before it is read)
        return [self._counter(h.counter) for h in holds]

    async def rows(self, since: datetime | None = None,
                   until: datetime | None = None) -> list[LedgerRow]:
        query, args = f"SELECT {', '.join(_COLUMNS)} FROM ledger WHERE 1=1", []
        if since is not None:
            query, args = query + " AND ts >= ?", [*args, since.isoformat()]
        if until is not None:
            query, args = query + " AND ts < ?", [*args, until.isoformat()]
        out = []
        for values in self.db.execute(query + " ORDER BY ts", args):
            doc = dict(zip(_COLUMNS, values, strict=True))
            doc["usage_reported"] = bool(doc["usage_reported"])
            out.append(LedgerRow.from_dict(doc))
        return out

    async def ping(self) -> None:
        try:
            self.db.execute("SELECT 1 FROM budget_counters LIMIT 1").fetchall()
        except sqlite3.Error as e:
            raise StoreUnavailable(f"sqlite {self.path}: {e}") from e

    def _cancel_write(self) -> None:
        if self._writing is not None:
            self._writing.cancel()
            self._writing = None

    async def close(self) -> None:
        self._cancel_write()
        self.write_granted()  # (a write that fails leaves them journaled)
        if self._ahead is not None and not self._granted:
            self._ahead.leave(self)
            self._ahead = None
        self._commit_settlements()  # those of this turn, before the file closes
        await until_written(self._committing)
        await asyncio.to_thread(self._checkpoints.close)
        self.db.close()
        if self._wal_index is not None:
            os.close(self._wal_index)
            self._wal_index = None

