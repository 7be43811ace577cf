"""A serving gateway's SQLite files (its state, and its spool before Redis) have their log
copied back into the database file by a thread of their own: never inside a commit on the
event loop that serves every request, but for a backstop that keeps the log bounded."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from tests.harness import RedisServer
from tests.unit.test_store import row
from tollgate.store import checkpoint
from tollgate.store.redis import RedisStore
from tollgate.store.spool import Spooled
from tollgate.store.sqlite import SQLiteStore

FRAME = 24 + 4096  # a WAL frame: its header and a page


def in_file(path: Path) -> int:
    """The written-ahead rows in the database file itself, the log left out."""
    with contextlib.closing(sqlite3.connect(f"file:{path}?immutable=1", uri=True)) as db:
        return db.execute("SELECT COUNT(*) FROM inflight").fetchone()[0]


def frames(path: Path) -> int:
    """How far the log has ever reached (the file keeps its size when the log restarts)."""
    return (Path(f"{path}-wal").stat().st_size - 32) // FRAME


def copy_schema(path: Path) -> None:
    """Copy the log into the file once, from a connection of the test's: the tables a store
    creates as it opens are then in the file, with no row yet."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("PRAGMA wal_checkpoint(PASSIVE)")
    assert in_file(path) == 0


@pytest.fixture(params=["sqlite", "spool"])
def serving(request, tmp_path):
    """Opens a serving gateway's SQLite state, or its spool in front of a real Redis."""
    if request.param == "sqlite":
        yield SQLiteStore
        return
    server = RedisServer(tmp_path / "redis").start()
    yield lambda path: Spooled(RedisStore(server.url), path)
    server.stop()


async def write_ahead(store, count: int) -> None:
    for i in range(count):  # one commit each, as one request at a time makes them
        await store.admit(row(f"r_{i}", 1), [])


def checkpoint_threads(path: Path) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"tollgate-checkpoint {path}"]


def test_the_loop_does_not_copy_the_log_where_sqlite_would_but_at_the_backstop(tmp_path,
                                                                               monkeypatch):
    """Past SQLite's own 1,000 pages, a commit on the loop copies nothing (the thread's
    work); past the backstop's, it does, so a thread that never catches up leaves a log of
    bounded size."""
    monkeypatch.setattr(checkpoint, "EVERY", 10**9)  # the thread is never asked
    path = tmp_path / "state.db"

    async def scenario():
        store = SQLiteStore(path)
        try:
            copy_schema(path)
            await write_ahead(store, 500)
            assert frames(path) > 1000  # where SQLite's own checkpoint would have run
            assert in_file(path) == 0
            await write_ahead(store, 2 * checkpoint.BACKSTOP_PAGES)
            assert in_file(path) > 0  # copied by the loop's connection at the backstop
            assert frames(path) <= checkpoint.BACKSTOP_PAGES + 10  # and begun again
        finally:
            await store.close()

    asyncio.run(scenario())


def test_the_thread_copies_the_log_once_enough_is_written_and_stops_with_the_store(
        serving, tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "EVERY", 50)  # rows written between copies
    path = tmp_path / "serving.db"

    async def scenario():
        store = serving(path)
        assert len(checkpoint_threads(path)) == 1
        copy_schema(path)
        await write_ahead(store, 30)
        await asyncio.sleep(0.2)
        assert in_file(path) == 0  # not enough written yet to ask for a copy
        await write_ahead(store, 370)
        copied, deadline = 0, time.monotonic() + 10  # copied up to the last copy asked for
        while copied < 400 - 50 and time.monotonic() < deadline:
            with contextlib.suppress(sqlite3.DatabaseError):  # read as the thread writes it
                copied = in_file(path)
            await asyncio.sleep(0.01)
        assert 400 - 50 <= copied <= 400
        await store.close()
        assert checkpoint_threads(path) == []

    asyncio.run(scenario())


def test_a_store_that_does_not_serve_starts_no_thread_and_keeps_sqlites_own_checkpoint(
        tmp_path):
    """A CLI reading reports (not a serving gateway) leaves the log to SQLite, as it is."""
    path = tmp_path / "report.db"
    asyncio.run(SQLiteStore(path).close())  # a gateway made the file, and stopped
    store = SQLiteStore(path, owner=False)
    assert checkpoint_threads(path) == []
    assert store.db.execute("PRAGMA wal_autocheckpoint").fetchone() == (1000,)
    asyncio.run(store.close())
