"""`bench.scaling` runs the gateway on the state it is asked for."""

from __future__ import annotations

import asyncio
from pathlib import Path

from bench.latency import _Url
from bench.scaling import use_state
from tests.conftest import make_config
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
