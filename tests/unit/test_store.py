"""The state stores behind one interface: SQLite and a real Redis, same behaviour."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import sqlite3
import threading
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone

import pytest
from redis.exceptions import TimeoutError as RedisTimeoutError

from tests.harness import RedisServer
from tollgate.budgets import Hold, window, window_named
from tollgate.config.schema import Budget
from tollgate.ledger import LedgerRow, report
from tollgate.ratelimit import Limit
from tollgate.store import locking
from tollgate.store.base import Counter, StoreUnavailable
from tollgate.store.redis import RedisStore
from tollgate.store.spool import Spooled
from tollgate.store.sqlite import SQLiteStore

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


def hold(limit_usd: float, on_breach: str = "block", ident: str = "b_1") -> Hold:
    b = Budget(id=ident, name=ident, scope="team", team="team_eng", window="month",
               limit=limit_usd, on_breach=on_breach)
    w = window("month", NOW)
    return Hold(b, w.key, w.end)


@pytest.mark.parametrize(("kind", "key", "start", "end"), [
    ("minute", "2026-03-05T02:09", "2026-03-05T02:09", "2026-03-05T02:10"),
    ("hour", "2026-03-05T02", "2026-03-05T02:00", "2026-03-05T03:00"),
    ("day", "2026-03-05", "2026-03-05T00:00", "2026-03-06T00:00"),
    ("week", "2026-W10", "2026-03-02T00:00", "2026-03-09T00:00"),
    ("month", "2026-03", "2026-03-01T00:00", "2026-04-01T00:00"),
])
def test_budget_windows_are_utc_calendar_windows_named_as_reports_name_them(kind, key, start,
                                                                            end):
    # 21:09 on the 4th, five hours west of UTC: 02:09 UTC on the 5th. The key is the counter
    # a budget's spend is kept in, so a change of spelling would start it again from zero.
    w = window(kind, datetime(2026, 3, 4, 21, 9, 11, tzinfo=timezone(timedelta(hours=-5))))
    assert (w.key, w.start, w.end) == (key, datetime.fromisoformat(start).replace(tzinfo=UTC),
                                       datetime.fromisoformat(end).replace(tzinfo=UTC))
    if kind != "minute":  # reports name every window but a minute's
        assert window_named(key) == (kind, w)


def row(request_id: str, cost: int, principal: str = "alice") -> LedgerRow:
    return LedgerRow(request_id=request_id, ts=NOW.isoformat(), key_id="vk_1", key_name="k",
                     principal=principal, org="acme", team="team_eng", project=None,
                     provider="mp_openai", model="gpt-5-mini", route="chat_completions",
                     cost_micros=cost)


def test_a_rows_dict_is_its_fields_in_order_however_the_row_was_made():
    """What the access log and a refusal's own id are made of: every field, in the
    dataclass's order, and nothing else, for a row made, copied, replaced or read back."""
    from dataclasses import fields

    made = row("r1", 25, principal="bob\ud800")  # (a lone surrogate is replaced)
    copied = made.copy()
    copied.request_id, copied.input_tokens = "r2", 7
    names = [f.name for f in fields(LedgerRow)]
    for r in (made, copied, replace(made, outcome="completed"),
              LedgerRow.from_dict(made.to_dict())):
        doc = r.to_dict()
        assert list(doc) == names
        assert doc == {name: getattr(r, name) for name in names}
    assert copied.to_dict()["request_id"] == "r2" and made.to_dict()["request_id"] == "r1"
    assert made.to_dict()["principal"] == "bob\ufffd"


@pytest.fixture(params=["sqlite", "redis"])
def store(request, tmp_path):
    if request.param == "sqlite":
        s = SQLiteStore(tmp_path / "state.db")
        yield s
        asyncio.run(s.close())
    else:
        server = RedisServer(tmp_path / "redis").start()
        yield RedisStore(server.url)
        server.stop()


def test_reserve_is_all_or_nothing_and_settles(store):
    async def scenario():
        tight, loose = hold(0.000100), hold(1.0, ident="b_2")
        first = await store.reserve("r1", [tight, loose], 60)
        assert first.granted
        second = await store.reserve("r2", [loose, tight], 60)  # tight would pass 100
        assert not second.granted and second.refused_by == 1
        assert [c.reserved for c in await store.counters([tight, loose])] == [60, 60]
        await store.finish([tight.counter, loose.counter], 60, row("r1", 25))
        await store.finish([tight.counter, loose.counter], 60, row("r1", 25))  # replay
        counters = await store.counters([tight, loose])
        assert [(c.spent, c.reserved) for c in counters] == [(25, 0), (25, 0)]
        assert (await store.reserve("r3", [tight], 60)).granted  # 25 + 60 <= 100
        rows = await store.rows()
        assert [r.request_id for r in rows] == ["r1"]

    asyncio.run(scenario())


@pytest.mark.parametrize("kind", ["sqlite", "redis", "spooled redis"])
def test_rows_keep_what_a_client_put_in_them_through_every_store(kind, tmp_path):
    """A client's escaped JSON can name a model with half a surrogate pair (`"\\ud800"`),
    and a YAML config's escapes a principal: the row holds a replacement character in its
    place, which every store can keep. Text past ASCII, and a count past a float's
    precision, read back as they were."""
    odd = [replace(row("r1", 5, principal="b\udcffob"), model="gpt-\ud800"),
           row("r2", 2**53 + 1), row("r3", 7, principal="zoë")]
    assert (odd[0].principal, odd[0].model) == ("b\ufffdob", "gpt-\ufffd")
    server = RedisServer(tmp_path / "redis").start() if "redis" in kind else None

    async def scenario():
        store = SQLiteStore(tmp_path / "state.db") if server is None else RedisStore(server.url)
        if kind == "spooled redis":
            store = Spooled(store, tmp_path / "spool.db")
        for r in odd:
            await store.admit(r, [])
            await store.finish([], 0, r)
        try:
            return await store.rows()
        finally:
            await store.close()

    try:
        assert sorted(asyncio.run(scenario()), key=lambda r: r.request_id) == odd
    finally:
        if server is not None:
            server.stop()


def test_warn_budgets_count_but_never_refuse(store):
    async def scenario():
        soft = hold(0.000010, on_breach="warn")
        assert (await store.reserve("r1", [soft], 500)).granted
        assert (await store.reserve("r2", [soft], 500)).granted
        await store.finish([soft.counter], 0, row("r0", 7))  # served with no reservation
        c = (await store.counters([soft]))[0]
        assert (c.spent, c.reserved) == (7, 1000)

    asyncio.run(scenario())


def test_sqlite_releases_reservations_of_a_previous_run(tmp_path):
    async def scenario():
        first = SQLiteStore(tmp_path / "s.db")
        await first.reserve("r1", [hold(1.0)], 100)
        await first.finish([hold(1.0).counter], 0, row("r0", 40))
        await first.close()
        reader = SQLiteStore(tmp_path / "s.db", owner=False)
        assert (await reader.counters([hold(1.0)]))[0].reserved == 100
        await reader.close()
        # The previous run's process is gone (or another process now has its pid).
        with contextlib.closing(sqlite3.connect(tmp_path / "s.db")) as db, db:
            db.execute("UPDATE holds SET started = -1")
        again = SQLiteStore(tmp_path / "s.db")  # a gateway starting up
        c = (await again.counters([hold(1.0)]))[0]
        assert (c.spent, c.reserved) == (40, 0)
        await again.close()

    asyncio.run(scenario())


def test_the_first_settlement_after_redis_returns_replays_the_spool_before_itself(tmp_path):
    server = RedisServer(tmp_path / "redis").start()

    async def scenario():
        store = Spooled(RedisStore(server.url), tmp_path / "spool.db")
        server.stop()
        await store.finish(["b_1:2026-11"], 0, row("r1", 10))
        server.start()
        await store.finish(["b_1:2026-11"], 0, row("r2", 10))
        assert store.pending() == 0
        assert [r.request_id for r in await store.rows()] == ["r1", "r2"]
        await store.close()
        # A spool left from an earlier run is replayed before this run's first settlement.
        server.stop()
        store = Spooled(RedisStore(server.url), tmp_path / "spool.db")
        await store.finish(["b_1:2026-11"], 0, row("r3", 10))
        await store.close()
        server.start()
        store = Spooled(RedisStore(server.url), tmp_path / "spool.db")
        await store.finish(["b_1:2026-11"], 0, row("r4", 10))
        assert [r.request_id for r in await store.rows()] == ["r1", "r2", "r3", "r4"]
        assert store.pending() == 0
        await store.close()

    try:
        asyncio.run(scenario())
    finally:
        server.stop()


def test_spool_replays_in_order_when_redis_returns(tmp_path):
    server = RedisServer(tmp_path / "redis").start()

    async def scenario():
        store = Spooled(RedisStore(server.url), tmp_path / "spool.db")
        await store.finish(["b_1:2026-11"], 0, row("r0", 1))
        server.stop()
        for i in (1, 2, 3):
            await store.finish(["b_1:2026-11"], 0, row(f"r{i}", 10))
        assert store.pending() == 3
        server.start()
        assert await store.flush() == 3
        assert store.pending() == 0
        assert [r.request_id for r in await store.rows()] == ["r0", "r1", "r2", "r3"]
        assert (await store.counters([hold(1.0)]))[0].spent == 31
        await store.close()

    try:
        asyncio.run(scenario())
    finally:
        server.stop()


def test_spend_report_groups_and_sorts():
    rows = [row("a", 5, "alice"), row("b", 7, "bob"), row("c", 3, "alice")]
    out = report(rows, "principal")
    assert [(r["principal"], r["requests"], r["cost_micros"]) for r in out] == [
        ("alice", 2, 8), ("bob", 1, 7)]


@pytest.fixture
def redis_url(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    yield server.url
    server.stop()


@pytest.fixture
def short_leases(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    yield RedisStore(server.url, lease_seconds=1)
    server.stop()


def total_hold(limit_usd: float) -> Hold:
    b = Budget(id="b_total", name="t", scope="team", team="team_eng", window="total",
               limit=limit_usd)
    w = window("total", NOW)
    return Hold(b, w.key, w.end)


async def reserved_after_expiry(store: RedisStore, h: Hold, want: int) -> None:
    for _ in range(100):
        if (await store.counters([h]))[0].reserved == want:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"reserved never reached {want}")


def test_a_crashed_replicas_holds_expire_and_a_late_settle_counts_once(short_leases):
    """A replica that dies holding budget never settles: its lease returns the headroom,
    even on a `total` budget that no window reset would ever clear."""
    store = short_leases

    async def scenario():
        cap = total_hold(0.000100)
        assert (await store.reserve("r_crashed", [cap], 60)).granted
        assert not (await store.reserve("r2", [cap], 60)).granted
        await reserved_after_expiry(store, cap, 0)
        assert (await store.reserve("r2", [cap], 60)).granted
        # The first replica comes back and settles after all: its expired hold is not
        # released a second time (r2's hold stays), and what it spent still counts.
        await store.finish([cap.counter], 60, row("r_crashed", 10))
        (counter,) = await store.counters([cap])
        assert (counter.spent, counter.reserved) == (10, 60)
        await store.finish([cap.counter], 60, row("r2", 5))
        (counter,) = await store.counters([cap])
        assert (counter.spent, counter.reserved) == (15, 0)
        await store.close()

    asyncio.run(scenario())


def test_renewed_holds_outlive_their_lease(short_leases):
    store = short_leases

    async def scenario():
        cap = total_hold(0.000100)
        assert (await store.reserve("r_long", [cap], 60)).granted
        for _ in range(8):  # a long stream: 2.4 s, over twice the lease
            await asyncio.sleep(0.3)
            await store.renew([("r_long", [cap.counter], 60)])
        assert not (await store.reserve("r2", [cap], 60)).granted
        assert (await store.counters([cap]))[0].reserved == 60
        await store.finish([cap.counter], 60, row("r_long", 40))
        assert (await store.counters([cap]))[0] == Counter(40, 0)
        await store.close()

    asyncio.run(scenario())


def test_a_replica_gone_for_good_leaves_its_rows_for_the_others(short_leases):
    """Requests a replica had in flight are written ahead in Redis too: when it dies and
    never comes back, another replica records each once, charged to its budget, after its
    lease; a request that is still renewed is left alone."""
    store = short_leases

    async def scenario():
        cap = total_hold(0.000100)
        assert (await store.reserve("r_gone", [cap], 60)).granted
        await store.admit(row("r_gone", 4), [cap.counter])
        await store.admit(row("r_gone", 7), [cap.counter])  # a checkpoint: more has streamed
        await store.admit(row("r_running", 0), [])
        for _ in range(5):  # r_running's replica is alive: it renews; r_gone's is not
            await asyncio.sleep(0.3)
            await store.renew([("r_running", [], 0)])
        assert await store.recover() == 1
        assert await store.recover() == 0  # once
        assert [r.request_id for r in await store.rows()] == ["r_gone"]
        await reserved_after_expiry(store, cap, 0)
        assert (await store.counters([cap]))[0].spent == 7
        # r_gone's replica settles after all: counted once. r_running settles normally.
        await store.finish([cap.counter], 60, row("r_gone", 30))
        await store.finish([], 0, row("r_running", 5))
        assert (await store.counters([cap]))[0].spent == 7
        await asyncio.sleep(1.2)
        assert await store.recover() == 0  # a settled request leaves nothing behind
        assert sorted(r.request_id for r in await store.rows()) == ["r_gone", "r_running"]
        await store.close()

    asyncio.run(scenario())


def dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_a_request_in_flight_when_its_gateway_died_still_leaves_its_row(kind, tmp_path):
    """Written ahead at admission: a gateway killed mid-request never settles it, and the
    next gateway on the same state records it as interrupted, once."""
    server = RedisServer(tmp_path / "redis").start() if kind == "redis" else None

    def open_owner():
        if server is None:
            return SQLiteStore(tmp_path / "state.db")
        return Spooled(RedisStore(server.url), tmp_path / "spool.db")

    async def scenario():
        first = open_owner()
        await first.admit(row("r_killed", 0))
        await first.admit(row("r_done", 0))
        await first.finish([], 0, row("r_done", 30))
        # The process dies here: r_killed is never settled. Make its owner a dead process.
        db = first.db
        db.execute("UPDATE inflight SET pid = ?", (dead_pid(),))
        await first.close()
        second = open_owner()
        if isinstance(second, Spooled):
            await second.flush()
        rows = {r.request_id: r for r in await second.rows()}
        assert set(rows) == {"r_killed", "r_done"} and rows["r_done"].cost_micros == 30
        third = open_owner()  # a second restart changes nothing
        assert len(await third.rows()) == 2
        for store in (second, third):
            await store.close()

    try:
        asyncio.run(scenario())
    finally:
        if server is not None:
            server.stop()


def test_settled_rows_leave_the_spool_in_batches_and_one_left_behind_counts_once(
        tmp_path, redis_url):
    """A settled request's in-flight row is deleted with the next batch, not on the
    request's path: a gateway that dies before the batch leaves the row behind, and the
    next one replays it into a store that has it settled already."""
    from tollgate.store import spool

    h = hold(1.0)

    async def scenario():
        first = Spooled(RedisStore(redis_url), tmp_path / "spool.db")
        assert (await first.reserve("r_done", [h], 60)).granted
        await first.admit(row("r_done", 0), [h.counter])
        await first.finish([h.counter], 60, row("r_done", 30))
        inflight = "SELECT request_id FROM inflight"
        assert first.db.execute(inflight).fetchall() == [("r_done",)]  # not yet
        # The gateway dies before its batch runs.
        first._forgetting.cancel()
        first.db.execute("UPDATE inflight SET pid = ?", (dead_pid(),))
        first.db.close()
        await first.inner.close()
        second = Spooled(RedisStore(redis_url), tmp_path / "spool.db")
        await second.flush()
        assert [(r.request_id, r.cost_micros) for r in await second.rows()] == [("r_done", 30)]
        assert (await second.counters([h]))[0] == Counter(spent=30, reserved=0)
        await second.admit(row("r_next", 0))
        await second.finish([], 0, row("r_next", 5))
        await asyncio.sleep(spool.FORGET_EVERY * 3)
        assert second.db.execute(inflight).fetchall() == []
        await second.close()

    asyncio.run(scenario())


def test_a_batch_of_deletes_that_fails_leaves_later_write_aheads_committed(tmp_path,
                                                                          redis_url):
    """The spool's file is locked when a batch runs: the batch gives way (its rows are
    replayed as no-ops after a restart) and the write-aheads after it still reach the disk."""
    async def scenario():
        spooled = Spooled(RedisStore(redis_url), tmp_path / "spool.db")
        await spooled.admit(row("r_done", 0))
        await spooled.finish([], 0, row("r_done", 30))
        other = sqlite3.connect(tmp_path / "spool.db", isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")
        spooled._forgetting.cancel()
        spooled._forget_now()  # locked out
        other.execute("COMMIT")
        await spooled.admit(row("r_next", 0))
        ids = {r for (r,) in other.execute("SELECT request_id FROM inflight")}
        assert ids == {"r_done", "r_next"}  # r_next committed, seen from elsewhere
        other.close()
        await spooled.close()

    asyncio.run(scenario())


def test_write_aheads_the_disk_refuses_fail_their_requests_and_leave_no_open_transaction(
        tmp_path, redis_url, monkeypatch):
    """A spool file another process holds locked past the gateway's patience: every request
    of the batch learns its row is not on disk (it is not forwarded on a promise), and the
    next batch commits."""
    monkeypatch.setattr(locking, "BUSY_SECONDS", 0.05)
    async def scenario():
        spooled = Spooled(RedisStore(redis_url), tmp_path / "spool.db")
        other = sqlite3.connect(tmp_path / "spool.db", isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")
        failed = await asyncio.gather(spooled.admit(row("r_1", 0)), spooled.admit(row("r_2", 0)),
                                      return_exceptions=True)
        assert all(isinstance(f, sqlite3.OperationalError) for f in failed), failed
        other.execute("COMMIT")
        await spooled.admit(row("r_3", 0))
        assert not spooled.db.in_transaction
        ids = {r for (r,) in other.execute("SELECT request_id FROM inflight")}
        assert ids == {"r_3"}
        other.close()
        await spooled.close()

    asyncio.run(scenario())


def test_a_spool_closing_sends_a_batch_that_waited_for_the_lock_on_to_the_store(tmp_path,
                                                                                redis_url):
    """The gateway stops while a batch of write-aheads waits for another process's lock on
    the spool: close() waits for the batch to reach the disk and then the store, which it
    goes on to once the lock is let go, before it closes the store under it."""
    import json

    from tollgate.store.redis import INFLIGHT_ROWS

    request_id = f"r_closing_{time.monotonic_ns()}"

    async def scenario():
        spooled = Spooled(RedisStore(redis_url), tmp_path / "spool.db")
        write = spooled.inner.admit_many

        async def over_the_network(rows):  # the store is a round trip away
            await asyncio.sleep(0.05)
            await write(rows)

        spooled.inner.admit_many = over_the_network
        other = sqlite3.connect(tmp_path / "spool.db", isolation_level=None,
                                check_same_thread=False)
        other.execute("BEGIN IMMEDIATE")
        admitting = asyncio.ensure_future(spooled.admit(row(request_id, 5)))
        await asyncio.sleep(0.02)  # its batch ran, found the lock taken, and waits
        assert not admitting.done() and spooled._writing
        # The other process lets go on its own (not on this loop, which close() may block).
        threading.Timer(0.05, other.execute, ["COMMIT"]).start()
        await spooled.close()
        await admitting
        other.close()
        store = RedisStore(redis_url)
        ahead = await store.client.hget(INFLIGHT_ROWS, request_id)
        await store.close()
        assert ahead is not None and json.loads(ahead)["row"]["cost_micros"] == 5

    asyncio.run(scenario())


def test_write_aheads_wait_for_another_processs_lock_on_the_spool_on_the_loop(tmp_path,
                                                                              redis_url):
    """The node's other ext_proc processes write ahead to the same spool: while one holds its
    lock, this one's write-aheads wait for it without stopping the event loop, then commit."""
    async def scenario():
        spooled = Spooled(RedisStore(redis_url), tmp_path / "spool.db")
        other = sqlite3.connect(tmp_path / "spool.db", isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        loop = asyncio.get_running_loop()
        admitting = asyncio.gather(spooled.admit(row("r_1", 0)), spooled.admit(row("r_2", 0)))
        started, ticks = loop.time(), 0
        while loop.time() - started < 0.2:  # the loop's other work goes on meanwhile
            await asyncio.sleep(0.001)
            ticks += 1
        assert ticks > 20 and not admitting.done()
        other.execute("COMMIT")
        await admitting
        assert {r for (r,) in other.execute("SELECT request_id FROM inflight")} == \
            {"r_1", "r_2"}
        other.close()
        await spooled.close()

    asyncio.run(scenario())


def test_writes_ahead_of_one_turn_are_committed_at_its_end_not_a_turn_later(tmp_path,
                                                                          redis_url):
    """The write-aheads made in one turn of the loop are on this node's disk as the next
    turn begins: the requests waiting for them go on then, not once a task has had a turn
    of its own (a decision waits for its write-ahead)."""
    async def scenario():
        spooled = Spooled(RedisStore(redis_url), tmp_path / "spool.db")
        admitting = [asyncio.get_running_loop().create_task(spooled.admit(row(r, 1)))
                     for r in ("r_a", "r_b")]
        await asyncio.sleep(0)  # both rows are handed over in this turn
        assert not any(a.done() for a in admitting)
        await asyncio.sleep(0)  # that turn's end: committed together
        rows = spooled.db.execute("SELECT request_id FROM inflight ORDER BY 1").fetchall()
        assert rows == [("r_a",), ("r_b",)]
        await asyncio.gather(*admitting)
        await spooled.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("eager", [False, True], ids=["tasks", "eager tasks"])
def test_writes_ahead_of_one_moment_reach_redis_in_one_call_the_latest_row_kept(
        tmp_path, redis_url, eager):
    """Requests written ahead together (a checkpoint among them) are committed on this node's
    disk in one transaction before any of them returns, then go to Redis in one call, in
    order: a request's later row replaces its earlier one. Also where new tasks run eagerly,
    as in mitmproxy."""
    import json

    from tollgate.store.redis import INFLIGHT_ROWS

    async def scenario():
        if eager:
            asyncio.get_running_loop().set_task_factory(asyncio.eager_task_factory)
        spooled = Spooled(RedisStore(redis_url), tmp_path / "spool.db")
        calls, write = [], spooled.inner.admit_many

        async def counted(rows):
            calls.append([r.request_id for r, _ in rows])
            await write(rows)

        spooled.inner.admit_many = counted
        commits, commit = [], spooled._in_one_transaction
        spooled._in_one_transaction = lambda sql, rows: (commits.append(len(rows)),
                                                         commit(sql, rows))
        await asyncio.gather(*(spooled.admit(row(request_id, cost)) for request_id, cost in
                               (("r_a", 4), ("r_b", 0), ("r_a", 9))))
        # Each admit returned once its row was committed on this node's disk.
        disk = sqlite3.connect(tmp_path / "spool.db")
        on_disk = {r: json.loads(doc)["cost_micros"]
                   for r, doc in disk.execute("SELECT request_id, row FROM inflight")}
        disk.close()
        assert on_disk == {"r_a": 9, "r_b": 0} and commits == [3]
        await asyncio.gather(*spooled._writing)
        assert calls == [["r_a", "r_b", "r_a"]]
        ahead = await spooled.inner.client.hget(INFLIGHT_ROWS, "r_a")
        assert json.loads(ahead)["row"]["cost_micros"] == 9
        await spooled.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("eager", [False, True], ids=["tasks", "eager tasks"])
def test_script_calls_of_one_moment_reach_redis_in_one_round_trip_each_atomic(redis_url,
                                                                              eager):
    """Reservations and settlements started in one turn of the loop share one pipeline, and
    each still runs on its own, in order: the third reservation sees the first two."""
    h = hold(0.000100)

    async def scenario():
        if eager:
            asyncio.get_running_loop().set_task_factory(asyncio.eager_task_factory)
        store = RedisStore(redis_url)
        await store.counters([h])  # the connection is open, the scripts loaded
        before = store.pipelined.batches
        granted = await asyncio.gather(*(store.reserve(f"r{i}", [h], 40) for i in range(4)))
        assert [g.granted for g in granted] == [True, True, False, False]
        assert store.pipelined.batches == before + 1
        await asyncio.gather(store.finish([h.counter], 40, row("r0", 10)),
                             store.finish([h.counter], 40, row("r1", 15)),
                             store.counters([h]))
        assert store.pipelined.batches == before + 2
        assert await store.counters([h]) == [Counter(spent=25, reserved=0)]
        await store.close()

    asyncio.run(scenario())


def test_a_batch_is_written_in_the_turn_after_its_calls_not_a_turn_later(redis_url):
    """The calls of one turn go out together at its end: the batch is on the wire when the
    next turn begins, not once a task scheduled then has had its own turn."""
    h = hold(1.0)

    async def scenario():
        store = RedisStore(redis_url)
        await store.counters([h])  # the connection is open, the scripts loaded
        before = store.pipelined.batches
        reserving = asyncio.get_running_loop().create_task(store.reserve("r1", [h], 40))
        await asyncio.sleep(0)  # the reservation's call is made, its batch scheduled
        assert store.pipelined.batches == before and store.pipelined._queued
        await asyncio.sleep(0)  # that turn: the batch went out
        assert store.pipelined.batches == before + 1 and not store.pipelined._queued
        assert (await reserving).granted
        await store.close()

    asyncio.run(scenario())


def test_a_script_call_that_fails_fails_alone_and_forgotten_scripts_load_again(redis_url):
    """One call's error is its own (its neighbours in the pipeline are answered), and a Redis
    that forgot the scripts (restarted, `SCRIPT FLUSH`) gets them again."""
    from tollgate.store.base import StoreUnavailable

    h, broken = hold(1.0), hold(1.0, ident="b_broken")

    async def scenario():
        store = RedisStore(redis_url)
        await store.client.set(RedisStore._key(broken.counter), "not a hash")
        ok, failed = await asyncio.gather(store.reserve("r1", [h], 40),
                                          store.reserve("r2", [broken], 40),
                                          return_exceptions=True)
        assert ok.granted
        assert isinstance(failed, StoreUnavailable) and "WRONGTYPE" in str(failed)
        await store.client.script_flush()
        assert (await store.reserve("r3", [h], 40)).granted
        assert await store.counters([h]) == [Counter(spent=0, reserved=80)]
        await store.close()

    asyncio.run(scenario())


def test_one_call_after_another_keeps_its_connection_out_of_the_pool(redis_url, monkeypatch):
    """Sequential calls (a gateway at low load) reuse the connection of the call before
    instead of checking one out of redis-py's pool each time, and closing the store gives it
    back."""
    h = hold(1.0)

    async def scenario():
        store = RedisStore(redis_url)
        pool = store.client.connection_pool
        checked_out = 0
        get_connection = pool.get_connection

        async def counted() -> object:
            nonlocal checked_out
            checked_out += 1
            return await get_connection()

        monkeypatch.setattr(pool, "get_connection", counted)
        for i in range(5):
            assert (await store.reserve(f"r{i}", [h], 10)).granted
        await store.finish([h.counter], 10, row("r0", 4))
        assert checked_out == 1
        assert await store.counters([h]) == [Counter(spent=4, reserved=40)]
        await store.close()
        assert not pool._in_use_connections  # given back before the client closed

    asyncio.run(scenario())


def test_a_burst_of_round_trips_gives_the_pool_back_all_but_the_connections_kept(redis_url):
    """Round trips of several turns in flight at once each take a connection; once answered,
    all but `KEEP` go back to the bounded pool, so redis-py's own commands (and calls waiting
    in the pool during a burst) are served, not refused for want of a connection."""
    import redis as sync_redis

    from tollgate.store import pipelining

    h = hold(1.0)

    async def scenario():
        store = RedisStore(f"{redis_url}?max_connections=6&timeout=1")
        pool = store.client.connection_pool
        await store.counters([h])
        before = store.pipelined.batches
        pauser = sync_redis.Redis.from_url(redis_url)
        pauser.client_pause(300)  # replies wait: the round trips below overlap
        pauser.close()
        calls = []
        for i in range(6):
            calls.append(asyncio.get_running_loop().create_task(
                store.reserve(f"r{i}", [h], 1)))
            await asyncio.sleep(0)  # the call is made
            await asyncio.sleep(0)  # its batch is on the wire, alone
        assert store.pipelined.batches == before + 6
        assert all(r.granted for r in await asyncio.gather(*calls))
        assert len(pool._in_use_connections) == pipelining.KEEP
        assert await store.client.ping()
        await store.close()

    asyncio.run(scenario())


def test_a_kept_connection_redis_closed_is_replaced_once_unused_for_the_health_interval(
        redis_url, monkeypatch):
    """Redis closes the connection the store keeps while it is unused (a restart, `CLIENT
    KILL`, its idle timeout): unused past the health-check interval, it is PINGed before its
    next use and replaced, so that call is answered, not failed."""
    import redis as sync_redis

    from tollgate.store import redis as redis_store

    monkeypatch.setattr(redis_store, "HEALTH_CHECK_SECONDS", 0.001)
    h = hold(1.0)

    async def scenario():
        store = RedisStore(redis_url)
        assert (await store.reserve("r1", [h], 10)).granted
        killer = sync_redis.Redis.from_url(redis_url)
        assert killer.client_kill_filter(_type="normal", skipme=True) >= 1
        killer.close()
        await asyncio.sleep(0.05)  # unused for longer than the interval
        assert (await store.reserve("r2", [h], 10)).granted
        assert await store.counters([h]) == [Counter(spent=0, reserved=20)]
        await store.close()

    asyncio.run(scenario())


def test_closing_the_store_answers_the_calls_made_before_it(redis_url):
    """A store closed in the same turn a reservation was made sends it and has its answer
    before it returns (a gateway stopping leaves no call of a request unanswered)."""
    h = hold(1.0)

    async def scenario():
        store = RedisStore(redis_url)
        reserving = asyncio.get_running_loop().create_task(store.reserve("r1", [h], 40))
        await asyncio.sleep(0)  # the call is queued, its batch not yet sent
        assert store.pipelined._queued
        await store.close()
        assert reserving.done() and reserving.result().granted
        await asyncio.sleep(0)  # the batch's own turn comes, with nothing left to send
        reopened = RedisStore(redis_url)
        assert await reopened.counters([h]) == [Counter(spent=0, reserved=40)]
        await reopened.close()

    asyncio.run(scenario())


def test_a_batch_on_a_connection_redis_dropped_fails_whole_and_the_next_reconnects(tmp_path):
    """Redis goes away under pooled connections: every call of the batch fails as the store
    being unavailable (none hangs, none is retried blindly), and once Redis is back the next
    batch connects again and runs."""
    from tollgate.store.base import StoreUnavailable

    server = RedisServer(tmp_path / "redis").start()
    h = hold(1.0)

    async def scenario():
        store = RedisStore(server.url)
        await asyncio.gather(*(store.reserve(f"r{i}", [h], 10) for i in range(3)))
        server.stop()
        failed = await asyncio.gather(*(store.reserve(f"r{i}", [h], 10) for i in range(3, 6)),
                                      return_exceptions=True)
        assert all(isinstance(f, StoreUnavailable) for f in failed), failed
        server.start()
        again = await asyncio.gather(*(store.reserve(f"r{i}", [h], 10) for i in range(6, 9)))
        assert all(r.granted for r in again)
        assert await store.counters([h]) == [Counter(spent=0, reserved=60)]
        await store.close()

    try:
        asyncio.run(scenario())
    finally:
        server.stop()


def test_two_gateways_on_one_sqlite_file_keep_each_others_holds(tmp_path):
    """A gateway starting on a file another one serves from releases only the holds of
    gateways that are gone; a request in flight when its gateway died is charged what it
    surely cost (its input), once, to its budget."""
    h = hold(1.0)

    async def scenario():
        serving = SQLiteStore(tmp_path / "state.db")
        assert (await serving.reserve("r_live", [h], 100)).granted
        second = SQLiteStore(tmp_path / "state.db")  # its neighbour starts: r_live stays
        assert (await second.counters([h]))[0] == Counter(spent=0, reserved=100)
        assert (await serving.reserve("r_dies", [h], 50)).granted
        await serving.admit(row("r_dies", 7), [h.counter])
        # r_dies's gateway dies (a later process may have its pid: a container's PID 1);
        # r_live's is still serving.
        serving.db.execute("UPDATE holds SET started = -1 WHERE request_id = 'r_dies'")
        serving.db.execute("UPDATE inflight SET pid = ? WHERE request_id = 'r_dies'",
                           (dead_pid(),))
        third = SQLiteStore(tmp_path / "state.db")
        assert (await third.counters([h]))[0] == Counter(spent=7, reserved=100)
        assert [r.request_id for r in await third.rows()] == ["r_dies"]
        fourth = SQLiteStore(tmp_path / "state.db")  # once
        assert (await fourth.counters([h]))[0] == Counter(spent=7, reserved=100)
        await serving.finish([h.counter], 100, row("r_live", 30))
        assert (await fourth.counters([h]))[0] == Counter(spent=37, reserved=0)
        for s in (serving, second, third, fourth):
            await s.close()

    asyncio.run(scenario())


def test_sqlite_settlements_of_one_turn_commit_together_one_that_fails_fails_alone(tmp_path):
    """The first settlement of a turn of the loop is committed at once, those that follow it
    in the same turn at its end in one transaction, each as it would be alone; one whose row
    cannot be written fails alone (its request keeps its written-ahead row and its hold)
    while the others of its batch are recorded."""
    h = hold(1.0)

    async def scenario():
        store = SQLiteStore(tmp_path / "state.db")
        other = sqlite3.connect(tmp_path / "state.db", isolation_level=None)
        begun: list[str] = []
        store.db.set_trace_callback(lambda sql: begun.append(sql) if sql == "BEGIN IMMEDIATE"
                                    else None)
        for r in ("r1", "r2", "r3", "r4", "r5", "r6"):
            assert (await store.reserve(r, [h], 100)).granted
            await store.admit(replace(row(r, 1), outcome="interrupted"), [h.counter])
        begun.clear()
        settling = [asyncio.get_running_loop().create_task(
            store.finish([h.counter], 100, row(r, 10 * i)))
            for i, r in enumerate(("r1", "r2", "r3", "r4"), start=1)]
        await asyncio.sleep(0)  # all four made in this turn: the first is committed
        assert [s.done() for s in settling] == [True, False, False, False]
        assert {r for (r,) in other.execute("SELECT request_id FROM ledger")} == {"r1"}
        await asyncio.sleep(0)  # that turn's end: the others, seen from another connection
        assert {r for (r,) in other.execute("SELECT request_id FROM ledger")} == \
            {"r1", "r2", "r3", "r4"}
        await asyncio.gather(*settling)
        assert begun == ["BEGIN IMMEDIATE"] * 2
        assert (await store.counters([h]))[0] == Counter(spent=100, reserved=200)

        outcomes = await asyncio.gather(
            store.finish([], 0, row("r_first", 0)),  # committed at once
            store.finish([h.counter], 100, row("r5", 2 ** 63)),  # past SQLite's INTEGER
            store.finish([h.counter], 100, row("r6", 60)), return_exceptions=True)
        assert outcomes[0] is None and outcomes[2] is None
        assert isinstance(outcomes[1], OverflowError)
        assert not store.db.in_transaction
        c = (await store.counters([h]))[0]
        assert (c.spent, c.reserved) == (160, 100)  # r5 still holds its 100
        assert {r for (r,) in other.execute("SELECT request_id FROM inflight")} == {"r5"}
        assert {r.request_id for r in await store.rows()} == \
            {"r1", "r2", "r3", "r4", "r_first", "r6"}
        other.close()
        await store.close()

    asyncio.run(scenario())


def test_sqlite_settlements_made_while_settling_together_commit_as_one_when_it_closes(
        tmp_path, monkeypatch):
    """Settlements made turns apart while `settling_together` is open (a batch of Envoy's
    reports of responses' ends) wait for it, their holds still taken, and are committed in one
    transaction as it closes; one that closes while another is still open commits what
    waits all the same; past MAX_TOGETHER waiting, the next is committed as it would be
    alone, and they at the end of its turn."""
    import tollgate.store.sqlite as sqlite_store

    monkeypatch.setattr(sqlite_store, "MAX_TOGETHER", 3)
    h = hold(1.0)

    async def scenario():
        store = SQLiteStore(tmp_path / "state.db")
        other = sqlite3.connect(tmp_path / "state.db", isolation_level=None)
        names = [f"r{i}" for i in range(1, 7)]
        for r in names:
            assert (await store.reserve(r, [h], 100)).granted
            await store.admit(replace(row(r, 1), outcome="interrupted"), [h.counter])
        begun: list[str] = []
        store.db.set_trace_callback(lambda sql: begun.append(sql) if sql == "BEGIN IMMEDIATE"
                                    else None)

        def ledger() -> set[str]:
            return {r for (r,) in other.execute("SELECT request_id FROM ledger")}

        loop = asyncio.get_running_loop()
        with store.settling_together():
            first = []
            for i, r in enumerate(names[:2], start=1):  # a turn apart each
                first.append(loop.create_task(store.finish([h.counter], 100, row(r, 10 * i))))
                await asyncio.sleep(0.01)
            assert not any(t.done() for t in first) and not ledger() and not begun
            assert (await store.counters([h]))[0] == Counter(spent=0, reserved=600)
        await asyncio.wait_for(asyncio.gather(*first), 5)  # (committed as it closed)
        assert ledger() == {"r1", "r2"} and begun == ["BEGIN IMMEDIATE"]
        assert (await store.counters([h]))[0] == Counter(spent=30, reserved=400)

        begun.clear()
        outer, inner = store.settling_together(), store.settling_together()
        outer.__enter__()
        inner.__enter__()
        third = loop.create_task(store.finish([h.counter], 100, row("r3", 30)))
        await asyncio.sleep(0.01)
        inner.__exit__(None, None, None)  # the other still open: what waits is committed
        await asyncio.wait_for(third, 5)
        assert "r3" in ledger() and begun == ["BEGIN IMMEDIATE"]
        rest = [loop.create_task(store.finish([h.counter], 100, row(r, 10)))
                for r in names[3:]]
        await asyncio.sleep(0.01)  # three wait: MAX_TOGETHER
        assert not any(t.done() for t in rest)
        late = loop.create_task(store.finish([], 0, row("r_late", 0)))
        await asyncio.sleep(0.01)  # past MAX_TOGETHER: committed as alone, and those with it
        assert late.done() and all(t.done() for t in rest)
        assert ledger() == {*names, "r_late"}
        outer.__exit__(None, None, None)
        assert (await store.counters([h]))[0] == Counter(spent=90, reserved=0)
        other.close()
        await store.close()

    asyncio.run(scenario())


def test_sqlite_settlements_tried_alone_wait_for_a_lock_another_process_took_meanwhile(
        tmp_path, monkeypatch):
    """A batch with a settlement that cannot be written is tried again one by one; another
    process takes the write lock just after that one fails: the settlements still to go wait
    for the lock, as a batch does, and are recorded once it is let go, not lost (their
    requests would be charged their input alone)."""
    import tollgate.store.sqlite as sqlite_store

    h = hold(1.0)

    async def scenario():
        store = SQLiteStore(tmp_path / "state.db")
        for r in ("r5", "r6", "r7"):
            assert (await store.reserve(r, [h], 100)).granted
            await store.admit(replace(row(r, 1), outcome="interrupted"), [h.counter])
        other = sqlite3.connect(tmp_path / "state.db", isolation_level=None)
        loop = asyncio.get_running_loop()
        original = sqlite_store.resolve

        def resolve(done, outcome):  # r5 has failed alone: another process writes now
            if isinstance(outcome, OverflowError):
                other.execute("BEGIN IMMEDIATE")
                loop.call_later(0.05, other.execute, "COMMIT")
            original(done, outcome)

        monkeypatch.setattr(sqlite_store, "resolve", resolve)
        outcomes = await asyncio.gather(
            store.finish([], 0, row("r_first", 0)),  # committed at once
            store.finish([h.counter], 100, row("r5", 2 ** 63)),  # past SQLite's INTEGER
            store.finish([h.counter], 100, row("r6", 60)),
            store.finish([h.counter], 100, row("r7", 70)), return_exceptions=True)
        assert isinstance(outcomes[1], OverflowError)
        assert [outcomes[i] for i in (0, 2, 3)] == [None] * 3, outcomes
        assert not other.in_transaction  # they did wait for it
        assert {r.request_id for r in await store.rows()} == {"r_first", "r6", "r7"}
        assert {r for (r,) in other.execute("SELECT request_id FROM inflight")} == {"r5"}
        assert (await store.counters([h]))[0] == Counter(spent=130, reserved=100)
        other.close()
        await store.close()

    asyncio.run(scenario())


def test_sqlite_settlements_a_file_locked_too_long_refuses_all_fail_and_the_next_turn_commits(
        tmp_path, monkeypatch):
    """A state file another process holds locked past the store's patience: every settlement
    waiting for it learns it was not recorded (its caller logs it; its row stays written
    ahead), none is tried again one by one, and once the lock is gone the next commits."""
    monkeypatch.setattr(locking, "BUSY_SECONDS", 0.05)

    async def scenario():
        store = SQLiteStore(tmp_path / "state.db")
        for r in ("r1", "r2", "r3", "r4"):
            await store.admit(replace(row(r, 1), outcome="interrupted"))
        other = sqlite3.connect(tmp_path / "state.db", isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")
        statements: list[str] = []
        store.db.set_trace_callback(statements.append)
        failed = await asyncio.gather(*(store.finish([], 0, row(r, 10))
                                        for r in ("r1", "r2", "r3")), return_exceptions=True)
        assert all(isinstance(f, StoreUnavailable) for f in failed), failed
        assert set(statements) == {"BEGIN IMMEDIATE"}  # tried again, never got further
        other.execute("COMMIT")
        await store.finish([], 0, row("r4", 40))
        assert not store.db.in_transaction
        assert {r for (r,) in other.execute("SELECT request_id FROM ledger")} == {"r4"}
        assert {r for (r,) in other.execute("SELECT request_id FROM inflight")} == \
            {"r1", "r2", "r3"}
        other.close()
        await store.close()

    asyncio.run(scenario())


def test_sqlite_a_write_waits_for_another_processs_lock_on_the_loop_not_in_a_sleep(tmp_path):
    """A second gateway process (or a CLI) holding the file's write lock: reservations,
    write-aheads and settlements wait for it without stopping the event loop, which goes on
    serving meanwhile, and all go through once it is let go."""
    async def scenario():
        store = SQLiteStore(tmp_path / "state.db")
        other = sqlite3.connect(tmp_path / "state.db", isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        loop = asyncio.get_running_loop()
        ticks: list[float] = []

        async def tick():  # the loop's other work: a tick every millisecond
            while True:
                ticks.append(loop.time())
                await asyncio.sleep(0.001)

        ticker = loop.create_task(tick())
        writes = asyncio.gather(
            store.reserve("r_1", [hold(100)], 1_000),
            store.admit(row("r_2", 1)),
            *(store.finish([], 0, row(r, 5)) for r in ("r_3", "r_4", "r_5")))
        await asyncio.sleep(0.2)
        assert not writes.done()  # all waiting for the lock
        other.execute("COMMIT")
        granted, *_ = await writes
        ticker.cancel()
        assert granted.granted
        gaps = [b - a for a, b in itertools.pairwise(ticks)]
        assert len(ticks) > 20 and max(gaps) < 0.1, (len(ticks), max(gaps))
        assert {r for (r,) in other.execute("SELECT request_id FROM ledger")} == \
            {"r_3", "r_4", "r_5"}
        assert other.execute("SELECT request_id FROM inflight").fetchall() == [("r_2",)]
        assert other.execute("SELECT reserved FROM budget_counters").fetchall() == [(1_000,)]
        other.close()
        await store.close()

    asyncio.run(scenario())


def test_sqlite_a_settlement_on_a_later_loop_is_not_left_waiting_for_an_earlier_ones_turn(
        tmp_path):
    """A loop that stops before the end of the turn of its first settlement (a CLI's, one
    `asyncio.run` after another): a settlement on the next loop is committed all the same."""
    store = SQLiteStore(tmp_path / "state.db")

    async def settle(request_id: str) -> None:
        await store.finish([], 0, row(request_id, 1))

    first = asyncio.new_event_loop()
    settled = first.create_task(settle("r1"))
    first.call_soon(first.stop)  # stops right after the settlement's step, before its turn ends
    first.run_forever()
    first.close()
    assert settled.done()
    asyncio.run(asyncio.wait_for(settle("r2"), timeout=5))
    assert {r.request_id for r in asyncio.run(store.rows())} == {"r1", "r2"}
    asyncio.run(store.close())


def test_a_refusal_under_the_id_of_a_request_in_flight_releases_nothing(store):
    """A refusal recorded under the id of a request that is in flight (a forged request id)
    neither releases that request's hold and written-ahead row nor stands in for its
    settlement: the request is charged in full, and both rows are kept."""
    import dataclasses

    async def scenario():
        cap = hold(1.0)
        assert (await store.reserve("r1", [cap], 500)).granted
        await store.admit(dataclasses.replace(row("r1", 0), outcome="interrupted"),
                          [cap.counter])
        forged = dataclasses.replace(row("r1", 0), outcome="refused", code="payload_too_large",
                                     status=413)
        await store.finish([], 0, forged)
        await store.finish([], 0, forged)  # the same refusal read twice
        assert (await store.counters([cap]))[0].reserved == 500  # still held
        await store.finish([cap.counter], 500, dataclasses.replace(row("r1", 300),
                                                                   outcome="completed"))
        c = (await store.counters([cap]))[0]
        assert (c.spent, c.reserved) == (300, 0)
        rows = await store.rows()
        served = [r for r in rows if r.request_id == "r1"]
        assert [(r.outcome, r.cost_micros) for r in served] == [("completed", 300)]
        refused = [r for r in rows if r.outcome == "refused"]
        assert len(refused) == 1 and refused[0].request_id.startswith("r1~")

    asyncio.run(scenario())


def test_the_redis_ledger_stays_near_its_cap_and_reads_a_range(tmp_path, monkeypatch):
    """The ledger stream is trimmed to about `ledger_max_rows`, and a report for a window
    reads from the window's start, a page at a time, not the whole stream."""
    import dataclasses

    from tollgate.store import redis as redis_store

    monkeypatch.setattr(redis_store, "TRIM_EVERY", 100)
    monkeypatch.setattr(redis_store, "PAGE_ROWS", 250)
    server = RedisServer(tmp_path / "redis").start()
    try:
        async def scenario():
            store = RedisStore(server.url, ledger_max_rows=1000)
            for i in range(2500):
                await store.finish([], 0, dataclasses.replace(row(f"r{i}", 1),
                                                              outcome="completed"))
            length = await store.client.xlen(redis_store.LEDGER)
            assert 1000 <= length < 1200
            rows = await store.rows()
            assert len(rows) == length and rows[-1].request_id == "r2499"
            reads = []
            real = store.client.xrange

            async def counted(*args, **kw):
                reads.append(kw)
                return await real(*args, **kw)

            store.client.xrange = counted
            assert await store.rows(since=datetime(2100, 1, 1, tzinfo=UTC)) == []
            assert len(reads) == 1  # the range starts at the window: nothing to page through
            await store.close()

        asyncio.run(scenario())
    finally:
        server.stop()


def test_a_burst_larger_than_the_connection_pool_waits_for_connections(tmp_path):
    """A replica with more requests in flight than Redis connections queues them; none is
    refused as if the store were down."""
    server = RedisServer(tmp_path / "redis").start()
    store = RedisStore(server.url)
    loose = hold(1000.0)

    async def scenario():
        results = await asyncio.gather(*(store.reserve(f"r{i}", [loose], 10)
                                         for i in range(300)))
        assert all(r.granted for r in results)
        assert (await store.counters([loose]))[0].reserved == 3000
        await store.close()

    try:
        asyncio.run(scenario())
    finally:
        server.stop()


def test_spend_report_groups_by_price_tier():
    rows = [row("r1", 100), row("r2", 50), row("r3", 7)]
    rows[0].tier, rows[1].tier = "priority", "flex"
    out = {r["tier"]: r["cost_micros"] for r in report(rows, "tier")}
    assert out == {"priority": 100, "flex": 50, "standard": 7}


def test_a_spooled_settlement_releases_the_holds_it_did_not_charge(tmp_path):
    """A request that held two budgets and was charged to one (its fallback provider's
    budget was never reached) settles while Redis is down: the replay releases the other's
    hold rather than leaving it to its lease."""
    server = RedisServer(tmp_path / "redis").start()
    first, other = hold(1.0), hold(1.0, ident="b_2")

    async def scenario():
        store = Spooled(RedisStore(server.url), tmp_path / "spool.db")
        assert (await store.reserve("r1", [first, other], 40)).granted
        server.stop()
        await store.finish([first.counter], 40, row("r1", 25), released=[other.counter])
        assert store.pending() == 1
        server.start()
        assert await store.flush() == 1
        counters = await store.counters([first, other])
        assert [(c.spent, c.reserved) for c in counters] == [(25, 0), (0, 0)]
        await store.close()

    try:
        asyncio.run(scenario())
    finally:
        server.stop()


def test_a_ledger_and_spool_of_an_earlier_version_gain_the_new_columns(tmp_path):
    """A state file written before rows had a code, fallbacks, an output cap, hour-long
    cache writes or a price tier (and a spool before `limits` and `released`) opens, keeps
    its rows, and records the new fields."""
    old = sqlite3.connect(tmp_path / "state.db")
    old.execute("CREATE TABLE ledger (request_id TEXT PRIMARY KEY, ts TEXT NOT NULL, "
                "key_id TEXT, key_name TEXT, principal TEXT, org TEXT, team TEXT, "
                "project TEXT, provider TEXT, model TEXT, route TEXT, input_tokens INTEGER, "
                "output_tokens INTEGER, cached_input_tokens INTEGER, cache_write_tokens "
                "INTEGER, reasoning_tokens INTEGER, cost_micros INTEGER, usage_reported "
                "INTEGER, status INTEGER, outcome TEXT, latency_ms REAL, fallback_count "
                "INTEGER)")
    old.execute("INSERT INTO ledger (request_id, ts, route, cost_micros, outcome, "
                "usage_reported) VALUES ('r0', ?, 'chat_completions', 5, 'completed', 1)",
                (NOW.isoformat(),))
    old.commit()
    old.close()
    spool = sqlite3.connect(tmp_path / "spool.db")
    spool.execute("CREATE TABLE spool (id INTEGER PRIMARY KEY AUTOINCREMENT, counters TEXT, "
                  "reserved INTEGER, row TEXT)")
    spool.commit()
    spool.close()

    async def scenario():
        store = Spooled(SQLiteStore(tmp_path / "state.db"), tmp_path / "spool.db")
        new = row("r1", 30)
        new.tier, new.cache_write_tokens, new.cache_write_1h_tokens = "priority", 9, 4
        await store.finish([], 0, new, released=["b_9:2026-11"])
        rows = {r.request_id: r for r in await store.rows()}
        assert (rows["r0"].cost_micros, rows["r0"].tier, rows["r0"].cache_write_1h_tokens) == \
            (5, None, 0)
        assert (rows["r1"].tier, rows["r1"].cache_write_1h_tokens) == ("priority", 4)
        await store.close()

    asyncio.run(scenario())


def _uncertain_reservation_setup(tmp_path):
    """A Redis store, and what a reservation takes there: a budget hold, an RPM entry (a
    sliding window) and an RPD count (a day window, which keeps no entries)."""
    server = RedisServer(tmp_path / "redis").start()
    limits = [Limit("key", "vk_1", "rpm", 100), Limit("key", "vk_1", "rpd", 100, day="2026-11-27")]
    return server, RedisStore(server.url), hold(1.0), limits, NOW.timestamp()


async def _taken_back(store: RedisStore, count: int) -> None:
    for _ in range(100):
        if store.taken_back == count and not store._to_take_back:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"taken back: {store.taken_back}, waiting: {len(store._to_take_back)}")


def test_a_reservation_that_ran_but_whose_answer_never_came_is_taken_back(tmp_path):
    """Redis ran the reservation, but its answer did not come in time (a stall past the
    socket timeout): the request is refused or served unreserved, so what the reservation
    took (its hold, its RPM entry, its RPD count) goes back once Redis answers, and what
    other requests took stays."""
    server, store, budget, limits, now = _uncertain_reservation_setup(tmp_path)

    async def scenario():
        assert (await store.reserve("r0", [budget], 60, limits, now=now)).granted
        real = store.pipelined._round_trip

        async def answer_lost(commands):
            await real(commands)  # Redis runs it...
            raise RedisTimeoutError("Timeout reading from socket")  # ...the answer is late

        store.pipelined._round_trip = answer_lost
        with pytest.raises(StoreUnavailable):
            await store.reserve("r1", [budget], 70, limits, now=now)
        store.pipelined._round_trip = real
        await _taken_back(store, 1)
        assert [c.reserved for c in await store.counters([budget])] == [60]  # r0's
        assert [w.used for w in await store.windows(limits, now=now)] == [1, 1]  # r0's
        await store.close()

    try:
        asyncio.run(scenario())
    finally:
        server.stop()


def test_a_reservation_taken_back_before_it_ran_holds_nothing_when_it_runs(tmp_path):
    """The call reached Redis's socket but Redis had not read it when the gateway gave up
    (Redis stalled): the gateway takes it back first, and when Redis reads it at last it
    holds nothing."""
    server, store, budget, limits, now = _uncertain_reservation_setup(tmp_path)

    async def scenario():
        await store.windows(limits, now=now)  # Redis has the script from an earlier call
        real = store.pipelined._round_trip
        stuck: list[list[bytes]] = []

        async def not_read_yet(commands):
            stuck.append(commands)
            raise RedisTimeoutError("Timeout reading from socket")

        store.pipelined._round_trip = not_read_yet
        with pytest.raises(StoreUnavailable):
            await store.reserve("r1", [budget], 70, limits, now=now)
        store.pipelined._round_trip = real
        await _taken_back(store, 0)  # taken back: it had not run
        late = (await real(stuck[0]))[0]  # Redis reads it now
        assert late == [-1]  # (no one reads this answer)
        assert [c.reserved for c in await store.counters([budget])] == [0]
        assert [w.used for w in await store.windows(limits, now=now)] == [0, 0]
        assert (await store.reserve("r2", [budget], 70, limits, now=now)).granted  # as usual
        await store.close()

    try:
        asyncio.run(scenario())
    finally:
        server.stop()
