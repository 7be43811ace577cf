"""Rate limits in the stores, with a controlled clock: sliding 60 s windows for RPM and TPM,
calendar UTC days for RPD, admission all or nothing with budgets, TPM settled to real usage.
SQLite and a real Redis behave the same."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
import redis

from tests.harness import RedisServer
from tests.unit.test_store import hold, row
from tollgate import ratelimit
from tollgate.config.schema import RateLimit, VirtualKey
from tollgate.ratelimit import Limit, Window
from tollgate.store.base import LimitSettlement
from tollgate.store.redis import RedisStore
from tollgate.store.sqlite import SQLiteStore

T0 = datetime(2026, 11, 29, 12, 0, tzinfo=UTC).timestamp()  # second 0 of a minute


def rpm(n: int, owner: str = "vk_1") -> Limit:
    return Limit("key", owner, "rpm", n)


def tpm(n: int, owner: str = "vk_1") -> Limit:
    return Limit("key", owner, "tpm", n)


def rpd(n: int, day: str, owner: str = "vk_1") -> Limit:
    return Limit("key", owner, "rpd", n, day)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


class Stores:
    """A store and one event loop for every call a test makes on it (a Redis client keeps
    its connections on one loop)."""

    def __init__(self, store):
        self.store = store
        self.loop = asyncio.new_event_loop()

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def __getattr__(self, name):
        method = getattr(self.store, name)
        return lambda *args, **kw: self.run(method(*args, **kw))


@pytest.fixture(params=["sqlite", "redis"])
def store(request, tmp_path):
    if request.param == "sqlite":
        s = Stores(SQLiteStore(tmp_path / "state.db"))
    else:
        server = request.getfixturevalue("redis_server")
        redis.Redis.from_url(server.url).flushdb()
        s = Stores(RedisStore(server.url))
    yield s
    s.close()
    s.loop.close()


def settled(limit: Limit, reserved: int, used: int, at: float = T0) -> LimitSettlement:
    return LimitSettlement(sliding=[limit.counter], days=[], tokens=[limit.counter],
                           reserved=reserved, admitted=at, used=used)


def admit(store, request_id: str, limits: list[Limit], at: float, tokens: int = 0,
          holds=(), amount: int = 0):
    return store.reserve(request_id, list(holds), amount, limits, tokens, now=at)


def test_a_sliding_window_never_admits_twice_the_limit_across_a_boundary(store):
    """50 at second 59 and 50 at second 61 against rpm 50: the second batch waits until
    the first is 60 s old."""
    limit = rpm(50)
    assert all(admit(store, f"a{i}", [limit], T0 + 59).granted for i in range(50))
    late = [admit(store, f"b{i}", [limit], T0 + 61) for i in range(50)]
    assert not any(r.granted for r in late)
    assert late[0].refused_limits == [0]
    assert late[0].windows[0].used == 50
    assert late[0].windows[0].retry_after == pytest.approx(58, abs=0.01)  # at second 119
    assert not admit(store, "c0", [limit], T0 + 118.9).granted
    assert all(admit(store, f"d{i}", [limit], T0 + 119).granted for i in range(50))
    assert not admit(store, "e0", [limit], T0 + 119.5).granted


def test_retry_after_counts_only_the_entries_that_must_age_out(store):
    limit = rpm(3)
    for i, t in enumerate((0, 10, 20)):
        assert admit(store, f"r{i}", [limit], T0 + t).granted
    refused = admit(store, "r3", [limit], T0 + 30)
    assert refused.windows[0].retry_after == pytest.approx(30)  # the oldest leaves at 60
    assert refused.windows[0].reset_after == pytest.approx(50)  # all gone at 80
    assert admit(store, "r3", [limit], T0 + 60).granted


@pytest.mark.parametrize("day", ["2019-03-10", "2026-11-29", "2031-07-01"])
def test_requests_per_day_reset_at_utc_midnight(store, day):
    """The store keeps time by the clock it is given, whatever the wall clock says: a day
    years before or after today counts and expires the same."""
    start = datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=UTC)
    day1 = start.timestamp() + 86400 - 30  # 23:59:30
    limit = rpd(2, day)
    assert admit(store, "a", [limit], day1).granted
    assert admit(store, "b", [limit], day1 + 20).granted
    refused = admit(store, "c", [limit], day1 + 29)
    assert not refused.granted
    assert refused.windows[0].retry_after == pytest.approx(1)  # midnight
    # A request after midnight falls in the next day's counter.
    tomorrow = rpd(2, (start + timedelta(days=1)).strftime("%Y-%m-%d"))
    assert admit(store, "c", [tomorrow], day1 + 30).granted
    assert admit(store, "d", [tomorrow], day1 + 31).granted
    assert not admit(store, "e", [tomorrow], day1 + 32).granted


def test_tokens_reserve_the_estimate_and_settle_to_what_was_used(store):
    limit = tpm(10_000)
    assert admit(store, "big", [limit], T0, tokens=9_500).granted
    assert not admit(store, "next", [limit], T0 + 1, tokens=2_000).granted
    # The response reported 3,000 tokens: the estimate is given back.
    store.finish([], 0, row("big", 0), settled(limit, 9_500, 3_000))
    assert admit(store, "next", [limit], T0 + 1, tokens=2_000).granted
    windows = store.windows([limit], now=T0 + 2)
    assert windows[0].used == 5_000
    # A replay of the same settlement changes nothing.
    store.finish([], 0, row("big", 0), settled(limit, 9_500, 3_000))
    assert store.windows([limit], now=T0 + 2)[0].used == 5_000


def test_a_response_of_9000_tokens_makes_the_next_large_request_wait(store):
    limit = tpm(10_000)
    assert admit(store, "first", [limit], T0, tokens=4_000).granted
    store.finish([], 0, row("first", 0), settled(limit, 4_000, 9_000, T0))
    refused = admit(store, "large", [limit], T0 + 5, tokens=2_000)
    assert not refused.granted
    assert refused.windows[0].used == 9_000
    assert refused.windows[0].retry_after == pytest.approx(55)
    assert admit(store, "small", [limit], T0 + 5, tokens=1_000).granted
    assert admit(store, "large", [limit], T0 + 60, tokens=2_000).granted


def test_a_request_larger_than_the_limit_can_never_fit(store):
    refused = admit(store, "huge", [tpm(1_000)], T0, tokens=5_000)
    assert not refused.granted and refused.windows[0].retry_after is None


def test_a_refused_request_consumes_nothing(store):
    """A rate-limit refusal takes no budget, and a budget refusal takes no rpm."""
    limit, cap = rpm(1), hold(0.0001)  # 100 micro-dollars
    assert admit(store, "a", [limit], T0, holds=[cap], amount=60).granted
    refused = admit(store, "b", [limit], T0 + 1, holds=[cap], amount=30)
    assert not refused.granted and refused.refused_by is None and refused.refused_limits == [0]
    assert store.counters([cap])[0].reserved == 60  # b held nothing
    other = rpm(5, owner="vk_2")
    broke = admit(store, "c", [other], T0 + 2, holds=[cap], amount=60)
    assert not broke.granted and broke.refused_by == 0 and broke.refused_limits == []
    assert store.windows([other], now=T0 + 2)[0].used == 0


def test_a_limit_and_a_budget_are_admitted_together(store):
    limits = [rpm(10), tpm(1_000), rpd(100, "2026-11-29")]
    granted = admit(store, "a", limits, T0, tokens=300, holds=[hold(1.0)], amount=500)
    assert granted.granted
    assert [w.used for w in granted.windows] == [1, 300, 1]
    assert granted.counters[0].reserved == 500


def test_concurrent_admissions_serve_exactly_the_limit(store):
    """200 admissions at once against rpm 50 serve exactly 50: on the single-node store
    through one gateway's store, on Redis through separate connections (as replicas)."""
    limit = rpm(50)

    async def run() -> int:
        if isinstance(store.store, SQLiteStore):
            stores, own = [store.store], False
        else:
            stores, own = [RedisStore(store.store.url) for _ in range(4)], True
        results = await asyncio.gather(*(
            stores[i % len(stores)].reserve(f"r{i}", [], 0, [limit], 0, now=T0)
            for i in range(200)))
        for s in stores if own else []:
            await s.close()
        return sum(r.granted for r in results)

    assert store.run(run()) == 50


def test_a_restart_keeps_the_windows_of_settled_requests(tmp_path):
    """The single-node store writes each request's entries as it settles: a gateway that
    starts again on the same file, and `rate-limits status`, see them."""
    now = T0 + 30  # a restart reads back what is still in the window by the store's clock
    today = datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%d")
    clock = [now]
    first = Stores(SQLiteStore(tmp_path / "state.db", clock=lambda: clock[0]))
    limits = [rpm(2), tpm(1_000), rpd(5, today)]
    for rid in ("a", "b"):
        granted = admit(first, rid, limits, now, tokens=400)
        assert granted.granted
        first.finish([], 0, row(rid, 0), LimitSettlement(
            sliding=[limits[0].counter, limits[1].counter], days=[limits[2].counter],
            tokens=[limits[1].counter], reserved=400, admitted=granted.at, used=100))
    first.close()
    clock[0] = now + 1
    again = Stores(SQLiteStore(tmp_path / "state.db", clock=lambda: clock[0]))
    windows = again.windows(limits, now=now + 1)
    assert [w.used for w in windows] == [2, 200, 2]
    assert not admit(again, "c", limits, now + 2, tokens=10).granted  # rpm 2 is used up
    assert admit(again, "c", limits, now + 61, tokens=10).granted
    again.close()


def test_limits_come_from_the_key_and_the_provider_config():
    key = VirtualKey(id="vk_1", name="k", scope="ORG:acme", secret_hash="0" * 64,
                     config={"rate_limits": {"rpm": 5, "rpd": 100}})
    now = datetime(2026, 11, 29, 23, 0, tzinfo=UTC)
    limits = ratelimit.key_limits(key, now)
    assert [(lim.counter, lim.limit) for lim in limits] == [
        ("key:vk_1:rpm", 5), ("key:vk_1:rpd:2026-11-29", 100)]
    assert ratelimit._limits("provider", "mp_a", RateLimit(tpm=7), now)[0].counter == \
        "provider:mp_a:tpm"


def test_headers_in_each_family_format():
    now = datetime(2026, 11, 29, 12, 0, tzinfo=UTC).timestamp()
    limits = [rpm(60), tpm(100_000), Limit("provider", "mp_a", "rpm", 5)]
    windows = [Window(1, 60.0), Window(4_100, 59.2), Window(3, 12.0)]
    assert ratelimit.headers("openai", limits, windows, now) == {
        "x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "59",
        "x-ratelimit-reset-requests": "1m0s",
        "x-ratelimit-limit-tokens": "100000", "x-ratelimit-remaining-tokens": "95900",
        "x-ratelimit-reset-tokens": "1m0s"}
    assert ratelimit.headers("anthropic", limits, windows, now) == {
        "anthropic-ratelimit-requests-limit": "60",
        "anthropic-ratelimit-requests-remaining": "59",
        "anthropic-ratelimit-requests-reset": "2026-11-29T12:01:00Z",
        "anthropic-ratelimit-tokens-limit": "100000",
        "anthropic-ratelimit-tokens-remaining": "95900",
        "anthropic-ratelimit-tokens-reset": "2026-11-29T12:00:59Z"}
    assert ratelimit._duration(0.02) == "20ms" and ratelimit._duration(3723) == "1h2m3s"
    # A day limit stands in for requests when the key has no rpm.
    day = [rpd(1000, "2026-11-29")]
    assert ratelimit.headers("openai", day, [Window(10, 43200.0)], now)[
        "x-ratelimit-reset-requests"] == "12h0m0s"


def test_a_refusal_names_the_dimension_the_scope_the_limit_and_the_reset():
    err = ratelimit.refusal(rpm(50), Window(50, 58.0, 57.2), 1, T0)
    assert err.status == 429 and err.code == "rate_limited"
    assert "virtual key vk_1" in err.message and "rpm (limit 50 requests per minute)" \
        in err.message and "2026-11-29T12:00:57" in err.message
    assert err.headers["retry-after"] == "58" and err.headers["retry-after-ms"] == "57200"
    never = ratelimit.refusal(tpm(100), Window(0, 0.0, None), 500, T0)
    assert "retry-after" not in never.headers and never.headers["x-should-retry"] == "false"


def test_a_settlement_gives_back_what_fallback_providers_did_not_use(store):
    """A request admitted to two providers' limits (its first and its fallback) and a budget
    of each: served by the fallback after the first failed, the first's TPM keeps nothing
    and its budget is released uncharged; a provider it never reached keeps no entry at all,
    not even its request of the day."""
    a_rpm, a_tpm, a_day = (Limit("provider", "mp_a", "rpm", 10), Limit("provider", "mp_a",
                           "tpm", 10_000), rpd(10, "2026-11-29", owner="mp_a"))
    b_rpm, b_tpm = Limit("provider", "mp_b", "rpm", 10), Limit("provider", "mp_b", "tpm", 10_000)
    c_rpm, c_day = Limit("provider", "mp_c", "rpm", 10), rpd(10, "2026-11-29", owner="mp_c")
    on_a, on_b = hold(1.0, ident="b_a"), hold(1.0, ident="b_b")
    assert admit(store, "r", [a_rpm, a_tpm, a_day], T0, tokens=2_000, holds=[on_a],
                 amount=500).granted
    assert admit(store, "r", [b_rpm, b_tpm], T0, tokens=2_000, holds=[on_b], amount=500).granted
    assert admit(store, "r", [c_rpm, c_day], T0, tokens=2_000).granted
    every = [a_rpm, a_tpm, a_day, b_rpm, b_tpm, c_rpm, c_day]
    store.finish([on_b.counter], 500, row("r", 300), LimitSettlement(
        sliding=[x.counter for x in every if x.sliding],
        days=[x.counter for x in every if not x.sliding],
        tokens=[a_tpm.counter, b_tpm.counter], reserved=2_000, admitted=T0, used=700,
        unbilled=[a_tpm.counter], unsent=[c_rpm.counter, c_day.counter]),
        [on_a.counter])
    used = [w.used for w in store.windows(every, now=T0 + 1)]
    assert used == [1, 0, 1, 1, 700, 0, 0]
    assert [(c.spent, c.reserved) for c in store.counters([on_a, on_b])] == [(0, 0), (300, 0)]
