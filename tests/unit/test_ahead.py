"""Reservations granted before they are written (tollgate/store/ahead.py): a request like a
precedent, which fits the budget as the gateway knows it, is answered first and its hold
and written-ahead row follow; journaled, so a gateway killed in between loses nothing;
never while another gateway serves from the file or after another connection wrote it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from extproc.envoy_config import RESPONSE_END_FLUSH
from extproc.service import ExternalProcessor
from tests.harness import BIN, ROOT
from tests.unit.test_gateway import CHAT
from tests.unit.test_precedent import USAGE, full, gateways, headers_of, now, state
from tollgate.ledger import LedgerRow
from tollgate.request import Reply
from tollgate.store import ahead as ahead_module
from tollgate.store import sqlite as sqlite_module
from tollgate.store.base import StoreUnavailable
from tollgate.store.sqlite import SQLiteStore

__all__ = ["gateways"]  # (the fixture)
PATH = "/v1/chat/completions"
BODY = {**CHAT, "max_tokens": 300}


def state_file(config_dir: Path) -> Path:
    return config_dir / ".tollgate" / "state.db"


def query(config_dir: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(state_file(config_dir))
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


def held(config_dir: Path, request_id: str) -> tuple[list[Any], list[Any]]:
    """Its holds and its written-ahead row, as the file has them."""
    return (query(config_dir, "SELECT counter, amount FROM holds WHERE request_id = ?",
                  request_id),
            query(config_dir, "SELECT request_id FROM inflight WHERE request_id = ?",
                  request_id))


def settle(proc: ExternalProcessor, request_id: str) -> None:
    proc.metered(request_id, 0, True, USAGE["chat"],
                 (200, {"content-type": "application/json"}))


def spent_and_reserved(config_dir: Path) -> list[tuple[int, int]]:
    return query(config_dir, "SELECT spent, reserved FROM budget_counters ORDER BY counter")


@contextmanager
def another_gateway(state: Path) -> Iterator[subprocess.Popen[str]]:
    """Another gateway process with the same state file open, until the block ends."""
    code = ("import sys\nfrom tollgate.store.sqlite import SQLiteStore\n"
            "SQLiteStore(sys.argv[1])\nprint('ready', flush=True)\nsys.stdin.read()\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(state)], cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        yield proc
    finally:
        proc.kill()
        proc.wait()


async def granted(gateways: tuple[str, Any, Any]) -> tuple[ExternalProcessor, str]:
    """A request decided in full, then one like it decided from its precedent: the
    processor and the second's request id."""
    secret, gw, _ = gateways
    proc = ExternalProcessor(gw)
    await full(proc, PATH, BODY, secret)
    decided = now(proc, PATH, BODY, secret)
    assert decided is not None
    return proc, decided.metadata["request_id"]


async def precedent_settled(gateways: tuple[str, Any, Any]) -> tuple[ExternalProcessor, str]:
    """A request decided in full and settled, the precedent of those like it: the processor
    and its request id."""
    secret, gw, _ = gateways
    proc = ExternalProcessor(gw)
    first = await full(proc, PATH, BODY, secret)
    settle(proc, first.metadata["request_id"])
    await gw.drain()
    return proc, first.metadata["request_id"]


@pytest.fixture
def written_at_once(monkeypatch):
    """Grants are written on the loop's next turn (if nothing wrote them before)."""
    monkeypatch.setattr(sqlite_module, "WRITE_WITHIN", 0)


async def test_a_precedents_reservation_is_answered_then_written(gateways, config_dir,
                                                                 written_at_once):
    gw = gateways[1]
    _, rid = await granted(gateways)
    assert held(config_dir, rid) == ([], [])  # answered before it is written
    journal = Path(f"{state_file(config_dir)}.ahead").read_text()
    assert rid in journal  # ... and journaled before it was answered
    for _ in range(3):  # (its timer runs on a later turn)
        await asyncio.sleep(0)
    holds, row = held(config_dir, rid)
    assert row == [(rid,)] and len(holds) == 1 and holds[0][1] > 0
    # The file holds what the full decision would have held: its reservation counted.
    (_, reserved), = spent_and_reserved(config_dir)
    assert reserved == sum(amount for _, amount in query(
        config_dir, "SELECT counter, amount FROM holds"))
    await gw.close()


async def test_one_settled_before_it_was_written_leaves_its_row_and_spend_alone(
        gateways, config_dir):
    """Its settlement's transaction would have written its hold and row ahead, then
    removed them: it writes neither, and the budget counts what it spent."""
    secret, gw, _ = gateways
    proc, first = await precedent_settled(gateways)
    granted = now(proc, PATH, BODY, secret)
    assert granted is not None
    rid = granted.metadata["request_id"]
    settle(proc, rid)
    await gw.drain()
    assert held(config_dir, rid) == ([], [])
    assert [h for h in state(config_dir)[1:]] == [[], []]  # no hold, nothing in flight
    rows = query(config_dir, "SELECT request_id, outcome, cost_micros FROM ledger")
    assert {r[0] for r in rows} == {first, rid}
    assert all(outcome == "completed" and cost > 0 for _, outcome, cost in rows)
    (spent, reserved), = spent_and_reserved(config_dir)
    assert (spent, reserved) == (sum(cost for *_, cost in rows), 0)
    await gw.close()


def test_a_grant_is_still_unwritten_when_the_envoy_hosts_access_log_brings_its_end():
    """A request answered at once has its end brought by the Envoy host's access log within
    RESPONSE_END_FLUSH, and settled within a slice of the batch's: its grant, not yet
    written by then, is taken by its settlement (the test above), not written and then
    removed a transaction apart."""
    assert sqlite_module.WRITE_WITHIN > 2 * RESPONSE_END_FLUSH


async def test_a_batch_of_settlements_leaves_the_grants_of_requests_in_flight_unwritten(
        gateways, config_dir):
    """A settlement's transaction writes no other request's grant while its write is due
    (WRITE_WITHIN): the grant of a request still in flight is taken by its own settlement
    (the next batch, most often), which then writes its spend alone; where written now, its
    hold and row would be written, then removed, a batch apart."""
    secret, gw, _ = gateways
    proc, first = await precedent_settled(gateways)
    statements: list[str] = []
    gw.store().db.set_trace_callback(statements.append)
    answered, in_flight = (now(proc, PATH, BODY, secret) for _ in range(2))
    assert answered is not None and in_flight is not None
    settle(proc, answered.metadata["request_id"])
    await gw.drain()
    rid = in_flight.metadata["request_id"]
    assert held(config_dir, rid) == ([], [])  # still only journaled
    assert rid in Path(f"{state_file(config_dir)}.ahead").read_text()
    assert gw.store()._writing is not None  # ... and its write still due
    settle(proc, rid)
    await gw.drain()
    # Neither wrote a hold or a written-ahead row, nor took one away.
    assert not [s for s in statements if "holds" in s or "inflight" in s]
    assert [h for h in state(config_dir)[1:]] == [[], []]
    rows = query(config_dir, "SELECT request_id, cost_micros FROM ledger")
    assert {r[0] for r in rows} == {first, answered.metadata["request_id"], rid}
    (spent, reserved), = spent_and_reserved(config_dir)
    assert (spent, reserved) == (sum(cost for _, cost in rows), 0)
    assert gw.store()._writing is None  # every grant settled: no write left due
    await gw.close()


async def test_a_refusal_under_the_id_of_an_unwritten_grant_stands_in_for_nothing(
        gateways, config_dir):
    """A refusal recorded under the id of a request whose grant is not written yet (a
    forged request id, while the request streams) is kept under an id of its own, as for
    any request in flight: the request's own settlement is still charged in full."""
    secret, gw, _ = gateways
    proc, _ = await precedent_settled(gateways)
    granted = now(proc, PATH, BODY, secret)
    assert granted is not None
    rid = granted.metadata["request_id"]
    forged = LedgerRow(request_id=rid, ts="2026-12-01T00:00:00+00:00", key_id=None,
                       key_name=None, principal=None, org=None, team=None, project=None,
                       provider=None, model=None, route="chat_completions",
                       status=413, outcome="refused", code="payload_too_large")
    await gw.store().finish([], 0, forged)
    assert held(config_dir, rid) == ([], [])  # (the grant is still only journaled)
    settle(proc, rid)
    await gw.drain()
    rows = query(config_dir, "SELECT request_id, outcome, cost_micros FROM ledger "
                             "WHERE request_id LIKE ?", f"{rid}%")
    assert sorted(r[1] for r in rows) == ["completed", "refused"]
    served, = [r for r in rows if r[1] == "completed"]
    refused, = [r for r in rows if r[1] == "refused"]
    assert served[0] == rid and served[2] > 0 and refused[0].startswith(f"{rid}~")
    (spent, reserved), = spent_and_reserved(config_dir)
    assert reserved == 0 and spent == sum(r[2] for r in query(
        config_dir, "SELECT request_id, outcome, cost_micros FROM ledger"))
    await gw.close()


async def test_a_transaction_that_wrote_every_grant_calls_off_their_write(
        gateways, config_dir, monkeypatch):
    """The write a grant waits for is called off once a transaction (a batch of
    settlements, most often) has written it: the next grant waits WRITE_WITHIN of its own
    for one (its settlement's, for a request answered at once), not what is left of the
    last one's."""
    loop, timers = asyncio.get_running_loop(), []
    call_later = loop.call_later

    def recorded(delay, callback, *args, **kwargs):
        handle = call_later(delay, callback, *args, **kwargs)
        if getattr(callback, "__name__", "") == "_write_in_time":
            timers.append((delay, handle))
        return handle

    monkeypatch.setattr(loop, "call_later", recorded)
    secret, gw, _ = gateways
    proc, first = await granted(gateways)
    (delay, waiting), = timers
    assert delay == sqlite_module.WRITE_WITHIN and not waiting.cancelled()
    settle(proc, first)
    await gw.drain()
    assert waiting.cancelled()  # its settlement's transaction took it
    assert held(config_dir, first) == ([], [])
    second = now(proc, PATH, BODY, secret)
    assert second is not None
    assert len(timers) == 2 and not timers[1][1].cancelled()
    settle(proc, second.metadata["request_id"])
    await gw.close()


async def test_grants_never_take_more_than_the_budget_has(gateways, config_dir):
    """Granted from what the gateway knows, each counts the ones before it: the request
    that does not fit goes to the full decision, which refuses it (402)."""
    secret, gw, _ = gateways
    proc = ExternalProcessor(gw)
    await full(proc, PATH, BODY, secret)
    worst = query(config_dir, "SELECT amount FROM holds")[0][0]
    (_, reserved), = spent_and_reserved(config_dir)
    # Spent so far: room for two more such requests, not three, of the budget's $100.
    db = sqlite3.connect(state_file(config_dir), isolation_level=None)
    db.execute("UPDATE budget_counters SET spent = ?",
               (100_000_000 - reserved - 2 * worst - worst // 2,))
    db.close()
    await full(proc, PATH, BODY, secret)  # (the file read again: see the next test)
    assert now(proc, PATH, BODY, secret) is not None
    assert now(proc, PATH, BODY, secret) is None  # past the limit: to the full decision
    refused = await proc.decide(headers_of(PATH, secret), json.dumps(BODY).encode())
    assert isinstance(refused, Reply) and refused.status == 402, refused
    (spent, reserved), = spent_and_reserved(config_dir)
    assert spent + reserved <= 100_000_000
    await gw.close()


async def test_a_file_another_connection_wrote_is_read_again(gateways, config_dir):
    """What the gateway knows of a budget is forgotten once anything else writes the file
    (an operator's fix, a gateway that came and went): the spend it wrote refuses the
    next request, which a grant from what was known before would have let through."""
    secret, gw, _ = gateways
    proc = ExternalProcessor(gw)
    await full(proc, PATH, BODY, secret)
    assert now(proc, PATH, BODY, secret) is not None
    await asyncio.sleep(0)
    gw.store().write_granted()
    db = sqlite3.connect(state_file(config_dir), isolation_level=None)
    db.execute("UPDATE budget_counters SET spent = 100000000")  # the budget's $100
    db.close()
    assert now(proc, PATH, BODY, secret) is None
    refused = await proc.decide(headers_of(PATH, secret), json.dumps(BODY).encode())
    assert isinstance(refused, Reply) and refused.status == 402, refused
    await gw.close()


async def test_a_grant_asks_sqlite_nothing_while_nothing_was_committed_since(gateways,
                                                                               config_dir):
    """Whether another connection wrote the file is read again after the gateway's own
    commits (a settlement, off the answer's path); a grant then reads the WAL index's
    header alone, which any commit changes: another connection's sends it to SQLite."""
    secret, gw, _ = gateways
    proc, _ = await precedent_settled(gateways)
    statements: list[str] = []
    gw.store().db.set_trace_callback(statements.append)
    granted = now(proc, PATH, BODY, secret)
    assert granted is not None
    assert held(config_dir, granted.metadata["request_id"]) == ([], [])  # granted
    assert statements == []
    settle(proc, granted.metadata["request_id"])
    await gw.drain()
    assert "PRAGMA data_version" in statements  # (after its commit)
    statements.clear()
    db = sqlite3.connect(state_file(config_dir), isolation_level=None)
    db.execute("UPDATE budget_counters SET spent = spent + 1")
    db.close()
    decided = now(proc, PATH, BODY, secret)
    assert decided is not None
    assert statements[0] == "PRAGMA data_version"
    assert held(config_dir, decided.metadata["request_id"])[0]  # made in the file
    await gw.close()


async def test_with_another_gateway_on_the_file_every_reservation_is_written_first(
        gateways, config_dir, monkeypatch, caplog):
    monkeypatch.setattr(ahead_module, "SHARED_FOR", 0)  # (tried again at once once it left)
    caplog.set_level("INFO", "tollgate.store")
    secret, gw, _ = gateways
    proc = ExternalProcessor(gw)
    await full(proc, PATH, BODY, secret)
    with another_gateway(state_file(config_dir)):
        decided = now(proc, PATH, BODY, secret)
        assert decided is not None
        holds, row = held(config_dir, decided.metadata["request_id"])
        assert holds and row  # written before it was answered
        assert "another gateway process serves from" in caplog.text
    # Once it is gone, grants are made before they are written again (once the file, which
    # it wrote, has been read again).
    assert now(proc, PATH, BODY, secret) is not None
    decided = now(proc, PATH, BODY, secret)
    assert decided is not None and held(config_dir, decided.metadata["request_id"]) == ([], [])
    assert "alone serves from" in caplog.text
    await gw.close()


async def test_a_write_lock_held_by_a_connection_that_serves_nothing_delays_only_the_write(
        gateways, config_dir, written_at_once):
    """A CLI or an operator's shell holding the write lock: the request is answered, and
    its reservation written once the lock is free."""
    secret, gw, _ = gateways
    proc = ExternalProcessor(gw)
    await full(proc, PATH, BODY, secret)
    other = sqlite3.connect(state_file(config_dir), isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        decided = now(proc, PATH, BODY, secret)
        assert decided is not None
        await asyncio.sleep(0.01)  # its write tried, and waiting for the lock
    finally:
        other.execute("ROLLBACK")
        other.close()
    for _ in range(200):  # written once the lock is free: the loop tries again
        if held(config_dir, decided.metadata["request_id"])[1]:
            break
        await asyncio.sleep(0.01)
    assert held(config_dir, decided.metadata["request_id"])[1]
    await gw.close()


KILLED = """
import asyncio, json, os, signal, sys
from extproc.service import ExternalProcessor
from tollgate.gateway import Gateway
from tests.unit.test_ahead import PATH, BODY, settle
from tests.unit.test_precedent import full, now

async def main():
    gw = Gateway.from_path(sys.argv[1], watch=False)
    proc = ExternalProcessor(gw)
    secret = sys.argv[2]
    first = await full(proc, PATH, BODY, secret)
    settle(proc, first.metadata["request_id"])
    await gw.drain()
    settled = now(proc, PATH, BODY, secret)  # granted, settled, never written
    settle(proc, settled.metadata["request_id"])
    await gw.drain()
    lost = now(proc, PATH, BODY, secret)  # granted, answered, then the gateway dies
    print(json.dumps([first.metadata["request_id"], settled.metadata["request_id"],
                      lost.metadata["request_id"]]), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

asyncio.run(main())
"""


async def test_a_gateway_killed_before_it_wrote_a_grant_leaves_it_charged(gateways,
                                                                          config_dir):
    """SIGKILL between the answer and the write: the next gateway on the file records the
    request from the journal, as it records a gone gateway's requests in flight (its row,
    `interrupted`, charged what it surely cost); what was written or settled before is
    not recorded twice."""
    secret, gw, reference = gateways
    await gw.close()  # (a gateway on the file here would keep it from granting)
    await reference.close()
    run = subprocess.run([sys.executable, "-c", KILLED, str(gw.holder.path), secret],
                         cwd=ROOT, capture_output=True, text=True, env=os.environ, timeout=60)
    assert run.returncode == -signal.SIGKILL, run.stderr
    first, settled, lost = json.loads(run.stdout)
    assert query(config_dir, "SELECT request_id FROM ledger WHERE request_id = ?", lost) == []
    await SQLiteStore(state_file(config_dir)).close()  # the next gateway opens it
    rows = dict((r[0], r[1:]) for r in query(
        config_dir, "SELECT request_id, outcome, cost_micros FROM ledger"))
    assert set(rows) == {first, settled, lost}
    assert rows[lost][0] == "interrupted" and rows[lost][1] > 0
    assert [rows[first][0], rows[settled][0]] == ["completed", "completed"]
    (spent, reserved), = spent_and_reserved(config_dir)
    assert (spent, reserved) == (sum(cost for _, cost in rows.values()), 0)
    assert state(config_dir)[1:] == [[], []]
    assert Path(f"{state_file(config_dir)}.ahead").read_text() == ""
    await SQLiteStore(state_file(config_dir)).close()  # and only once
    assert spent_and_reserved(config_dir) == [(spent, 0)]


def test_a_gateway_starting_waits_for_the_grants_another_has_not_written(tmp_path,
                                                                        monkeypatch):
    """While another process holds the owners' lock exclusively (its grants not yet
    written), a gateway opening the file waits, and opens once they are."""
    state = tmp_path / "state.db"
    code = ("import fcntl, os, sys\n"
            "fd = os.open(sys.argv[1] + '.owners', os.O_RDWR | os.O_CREAT)\n"
            "fcntl.lockf(fd, fcntl.LOCK_EX)\nprint('ready', flush=True)\nsys.stdin.read()\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(state)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "ready\n"
        monkeypatch.setattr(ahead_module, "START_WAIT", 0.05)
        with pytest.raises(OSError):
            ahead_module.Ahead(state).join()
    finally:
        holder.kill()
        holder.wait()
    ahead_module.Ahead(state).join()  # its lock gone with it


async def test_a_row_written_ahead_again_before_its_grant_is_written_is_kept(gateways,
                                                                            config_dir):
    """A long stream's checkpoint rewrites its row ahead (more output, more cost): the
    grant written after it does not put the older row back."""
    gw = gateways[1]
    _, rid = await granted(gateways)
    store = gw.store()
    row = LedgerRow.from_dict(json.loads(store._granted[rid].row))
    row.output_tokens, row.cost_micros = 500, row.cost_micros + 1234
    await store.admit(row)
    store.write_granted()
    written = query(config_dir, "SELECT row FROM inflight WHERE request_id = ?", rid)
    assert json.loads(written[0][0])["cost_micros"] == row.cost_micros
    assert held(config_dir, rid)[0]  # and its hold with it
    await gw.close()
    await gateways[2].close()
    # A gateway that stops leaves no journal behind (all it granted is written).
    assert Path(f"{state_file(config_dir)}.ahead").read_text() == ""


async def test_a_journal_that_cannot_be_written_sends_the_reservation_to_the_file(
        gateways, config_dir, monkeypatch, caplog):
    """A full disk, say: the request is still decided from its precedent, its reservation
    made in the file before the answer, as without a journal; and said so."""
    secret, gw, _ = gateways
    proc = ExternalProcessor(gw)
    await full(proc, PATH, BODY, secret)

    def full_disk(*_: Any) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ahead_module.os, "pwrite", full_disk)
    decided = now(proc, PATH, BODY, secret)
    assert decided is not None
    holds, row = held(config_dir, decided.metadata["request_id"])
    assert holds and row
    assert "could not journal a reservation" in caplog.text
    await gw.close()


def test_a_journal_that_cannot_be_read_keeps_the_gateway_from_serving(tmp_path):
    """What it holds may be requests to charge: a gateway does not open the state as if it
    held nothing."""
    (tmp_path / "state.db.ahead").mkdir()
    with pytest.raises(StoreUnavailable, match="reservation journal"):
        SQLiteStore(tmp_path / "state.db")


@pytest.mark.parametrize("host", ["extproc", "envoy"])
def test_a_state_that_cannot_be_opened_stops_the_host_saying_why(config_dir, host,
                                                                 monkeypatch):
    monkeypatch.setenv("TOLLGATE_KEY_PEPPER", "core-pepper")
    (config_dir / ".tollgate" / "state.db.ahead").mkdir(parents=True)
    run = subprocess.run([str(BIN / "tollgate"), "--config", str(config_dir / "gateway.yaml"),
                          "serve", host], capture_output=True, text=True, timeout=60,
                         cwd=config_dir)
    assert run.returncode == 1, run.stderr
    assert "gateway.state: sqlite:///.tollgate/state.db cannot be opened: cannot read the " \
           "reservation journal" in run.stderr
    assert "Traceback" not in run.stderr


async def test_grants_whose_write_fails_stay_journaled_and_reservations_go_to_the_file(
        gateways, config_dir, monkeypatch, caplog):
    """The file cannot be written for a moment (an I/O error): what was granted stays in the
    journal, the next reservation is made in the file, after them, before its answer; once
    that goes through, grants are made before they are written again."""
    secret, gw, _ = gateways
    proc, rid = await granted(gateways)
    store = gw.store()
    failing = SQLiteStore._write_granted_rows

    def io_error(self: SQLiteStore) -> None:
        if self._granted:
            raise sqlite3.OperationalError("disk I/O error")
        failing(self)

    monkeypatch.setattr(SQLiteStore, "_write_granted_rows", io_error)
    store.write_granted()
    assert "could not write 1 reservations granted before" in caplog.text
    assert held(config_dir, rid) == ([], [])
    assert rid in Path(f"{state_file(config_dir)}.ahead").read_text()
    monkeypatch.setattr(SQLiteStore, "_write_granted_rows", failing)
    second = now(proc, PATH, BODY, secret)
    assert second is not None
    # Both in the file before the second's answer.
    for request_id in (rid, second.metadata["request_id"]):
        holds, row = held(config_dir, request_id)
        assert holds and row
    third = now(proc, PATH, BODY, secret)
    assert third is not None and held(config_dir, third.metadata["request_id"]) == ([], [])
    await gw.close()
