"""`bench.scaling` runs the gateway on the state it is asked for, and caps each ext_proc
process at its share of a CPU when asked."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.latency import _Url
from bench.scaling import (
    capped,
    cpu_controller,
    machine_busy,
    peak_rss,
    settled_after,
    throttled,
    use_state,
)
from tests.conftest import make_config
from tests.harness import wait_until
from tollgate.config.load import load_config
from tollgate.store import open_store
from tollgate.store.redis import RedisStore
from tollgate.store.sqlite import SQLiteStore


def store_of(config: Path):
    loaded = load_config(config)
    return open_store(loaded.config.gateway.state, config, loaded.config.gateway.spool,
                      owner=False)


def test_the_scaling_benchmark_runs_on_sqlite_or_on_a_redis_it_starts(tmp_path):
    config = make_config(tmp_path / "a", _Url("http://127.0.0.1:9"),
                         _Url("http://127.0.0.1:10"))
    assert use_state(config, tmp_path, "sqlite") == ("SQLite", None)
    store = store_of(config)
    assert isinstance(store, SQLiteStore)
    asyncio.run(store.close())

    name, redis = use_state(config, tmp_path, "redis")
    try:
        assert name == "Redis"
        store = store_of(config)
        assert isinstance(store.inner, RedisStore)  # behind the node's spool

        async def answers():
            await store.ping()
            await store.close()

        asyncio.run(answers())
    finally:
        redis.stop()


def cap_of(group: Path) -> float:
    """The cgroup's CPU cap, as a share of a CPU."""
    if (group / "cpu.max").exists():
        quota, period = (group / "cpu.max").read_text().split()
    else:
        quota = (group / "cpu.cfs_quota_us").read_text()
        period = (group / "cpu.cfs_period_us").read_text()
    return int(quota) / int(period)


def test_a_capped_process_runs_at_its_share_in_a_cgroup_of_its_own_and_leaves_it_after():
    spinning = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        root = cpu_controller()
        if root is None:  # nothing to cap with: said, not ignored
            with pytest.raises(SystemExit, match="no cgroup CPU controller"), \
                    capped({"ext_proc 0": spinning.pid}, 0.1):
                pass
            return
        with capped({"ext_proc 0": spinning.pid}, 0.1) as groups:
            group = groups["ext_proc 0"]
            assert (group / "cgroup.procs").read_text().split() == [str(spinning.pid)]
            assert cap_of(group) == pytest.approx(0.1)
            # The cap binds a process that would take a whole CPU.
            wait_until(lambda: throttled(group) >= 3, timeout=5, what="the cap to bind")
        assert not group.exists()
        assert str(spinning.pid) in (root / "cgroup.procs").read_text().split()
    finally:
        spinning.kill()
        spinning.wait()


def test_the_machine_counts_busy_time_as_part_of_all_time():
    busy0, all0 = machine_busy()
    spent = time.process_time()
    while time.process_time() - spent < 0.05:  # CPU of this process's own: five ticks
        pass
    busy1, all1 = machine_busy()
    assert 0 <= busy0 <= all0
    assert busy1 > busy0
    assert all1 - all0 >= busy1 - busy0


def test_peak_memory_is_what_each_process_of_the_tree_once_held_resident():
    # A parent that has held 64 MiB and freed it, and a child that holds 96 MiB.
    script = ("import subprocess, sys, time\n"
              "b = bytearray(64 << 20); del b\n"
              "c = subprocess.Popen([sys.executable, '-c', "
              "'import time; b = bytearray(96 << 20); print(1, flush=True); time.sleep(60)'], "
              "stdout=subprocess.PIPE)\n"
              "c.stdout.readline(); print(c.pid, flush=True); time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child = None
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        held = peak_rss(parent.pid)
        assert len(held) == 1  # both are named as the same program, and added together
        (total,) = held.values()
        assert total >= 64 + 96
        assert peak_rss(child) and sum(peak_rss(child).values()) >= 96
        assert sum(peak_rss(child).values()) < total
    finally:
        if child is not None:
            os.kill(child, signal.SIGKILL)
        parent.kill()
        parent.wait(10)


def test_it_says_how_long_after_the_load_every_request_was_settled(monkeypatch, tmp_path):
    import bench.scaling as scaling

    rows = iter([[1], [1, 2], [1, 2, 3]])
    monkeypatch.setattr(scaling, "ledger", lambda config: next(rows))
    monkeypatch.setattr(scaling.time, "sleep", lambda seconds: None)
    assert settled_after(tmp_path, 3) is not None
    monkeypatch.setattr(scaling, "ledger", lambda config: [1])
    monkeypatch.setattr(scaling, "SETTLED_WITHIN", 0.0)
    assert settled_after(tmp_path, 3) is None
