"""Redis state, shared by gateway replicas. Reservations and settlements are Lua scripts,
so every check-and-increment is atomic across replicas."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
import secrets
from datetime import UTC, datetime

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from tollgate.budgets import Hold
from tollgate.fastjson import dumps
from tollgate.ledger import LedgerRow
from tollgate.ratelimit import Limit, Window, day_end_ts, reset_after
from tollgate.store.base import (
    Counter,
    LimitSettlement,
    Reservation,
    Store,
    StoreUnavailable,
    distinct_id,
)
from tollgate.store.pipelining import Pipelined

log = logging.getLogger("tollgate.store")

PREFIX = "tollgate:"
LEDGER = PREFIX + "ledger"
# Requests in flight, written ahead for every replica to see: a sorted set of request ids
# scored by a lease deadline (renewed while the request runs), and their rows. A replica
# that dies and never comes back leaves them, and any other one records them when their
# lease has passed.
INFLIGHT = PREFIX + "inflight"
INFLIGHT_ROWS = PREFIX + "inflight:rows"
SETTLED_TTL = 40 * 86400  # how long a settled request id is remembered (replays are no-ops)
TRIM_EVERY = 1000  # settles between two trims of the ledger stream
PAGE_ROWS = 5000  # ledger rows read per round trip

# Holds are leases: each reservation is also a member `request_id:amount` of a sorted set
# per counter, scored by its deadline (Redis time). A replica that crashes never settles its
# holds; the next script to touch the counter returns them when their deadline passes. A
# live gateway renews the leases of the requests it still serves.
REAP = """
local function reap(counter, holds, now)
  local stale = redis.call('ZRANGEBYSCORE', holds, '-inf', now)
  if #stale == 0 then return end
  local total = 0
  for _, member in ipairs(stale) do
    total = total + tonumber(string.match(member, ':(%d+)$'))
  end
  redis.call('ZREMRANGEBYSCORE', holds, '-inf', now)
  if redis.call('HINCRBY', counter, 'reserved', 0 - total) < 0 then
    redis.call('HSET', counter, 'reserved', 0)
  end
end
local now = tonumber(redis.call('TIME')[1])
"""

# Rate limits: per limit a hash {used, newest} (milliseconds, the store's clock) and, for a
# sliding window, a sorted set of entries `request_id:amount` scored by their time. Entries
# older than the window are dropped (and taken off `used`) whenever the limit is read.
LIMITS = """
local WINDOW = 60000
local function read_limit(total, log, sliding, now_ms)
  if sliding then
    local old = redis.call('ZRANGEBYSCORE', log, '-inf', now_ms - WINDOW)
    if #old > 0 then
      local gone = 0
      for _, e in ipairs(old) do gone = gone + tonumber(string.match(e, ':(%d+)$')) end
      redis.call('ZREMRANGEBYSCORE', log, '-inf', now_ms - WINDOW)
      if redis.call('HINCRBY', total, 'used', 0 - gone) < 0 then
        redis.call('HSET', total, 'used', 0)
      end
    end
  end
  local v = redis.call('HMGET', total, 'used', 'newest')
  return tonumber(v[1] or '0'), tonumber(v[2] or '-1')
end
-- How long until `need` more fits: -2 never (need alone is over the limit).
local function retry_after(log, sliding, used, need, limit, expire_ms, now_ms)
  if need > limit then return -2 end
  if not sliding then return math.max(0, expire_ms - now_ms) end
  -- Oldest first, a page at a time: only as far as the entries that must age out.
  local excess, freed, start = used + need - limit, 0, 0
  while true do
    local entries = redis.call('ZRANGE', log, start, start + 127, 'WITHSCORES')
    if #entries == 0 then return 0 end
    for i = 1, #entries, 2 do
      freed = freed + tonumber(string.match(entries[i], ':(%d+)$'))
      if freed >= excess then
        return math.max(0, tonumber(entries[i + 1]) + WINDOW - now_ms)
      end
    end
    start = start + 128
  end
end
local function clock(arg)
  if arg ~= '' then return tonumber(arg) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

# Admission, all or nothing. KEYS: n budget counter hashes, their n hold sets, then per
# rate limit its hash and its entry set; for a reservation (a request id given), last, the
# key that says it was taken back before it ran (TAKE_BACK). ARGV: n, m (limits), amount,
# lease seconds, the hold's member (request_id:amount), the request id ('' only reads), the
# clock in ms ('' for Redis TIME); then per hold its limit (-1: not blocking) and the
# seconds until its counter may expire (0: never); then per limit its limit, what this
# request takes, 1 for a sliding window, and when a day window ends (ms).
# Returns: the refused hold (0: none), 1 if a limit refused, the clock, spent and reserved
# per hold, then per limit: used, its newest entry (-1: none), retry-after ms (-1: fits);
# only {-1} for a reservation taken back (no one reads that reply: its caller gave up).
RESERVE = REAP + LIMITS + """
local n, m, amount = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local lease, member, request_id = tonumber(ARGV[4]), ARGV[5], ARGV[6]
local now_ms = clock(ARGV[7])
local spent, reserved = {}, {}
for i = 1, n do
  reap(KEYS[i], KEYS[n + i], now)
  local v = redis.call('HMGET', KEYS[i], 'spent', 'reserved')
  spent[i] = tonumber(v[1] or '0')
  reserved[i] = tonumber(v[2] or '0')
end
local refused = 0
for i = 1, n do
  local limit = tonumber(ARGV[6 + 2 * i])
  if refused == 0 and limit >= 0 and spent[i] + reserved[i] + amount > limit then
    refused = i
  end
end
local used, newest, retry, over = {}, {}, {}, 0
for j = 1, m do
  local total, log = KEYS[2 * n + 2 * j - 1], KEYS[2 * n + 2 * j]
  local a = 7 + 2 * n + 4 * (j - 1)
  local limit, need, sliding = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), ARGV[a + 3] == '1'
  used[j], newest[j] = read_limit(total, log, sliding, now_ms)
  retry[j] = -1
  if used[j] + need > limit then
    over = 1
    retry[j] = retry_after(log, sliding, used[j], need, limit, tonumber(ARGV[a + 4]), now_ms)
  end
end
if refused == 0 and over == 0 and request_id ~= '' then
  if redis.call('EXISTS', KEYS[#KEYS]) == 1 then
    return {-1}
  end
  for i = 1, n do
    reserved[i] = redis.call('HINCRBY', KEYS[i], 'reserved', amount)
    redis.call('ZADD', KEYS[n + i], now + lease, member)
    local ttl = tonumber(ARGV[7 + 2 * i])
    if ttl > 0 then
      redis.call('EXPIRE', KEYS[i], ttl)
      redis.call('EXPIRE', KEYS[n + i], ttl)
    end
  end
  for j = 1, m do
    local total, log = KEYS[2 * n + 2 * j - 1], KEYS[2 * n + 2 * j]
    local a = 7 + 2 * n + 4 * (j - 1)
    local need = tonumber(ARGV[a + 2])
    used[j] = redis.call('HINCRBY', total, 'used', need)
    redis.call('HSET', total, 'newest', now_ms)
    newest[j] = now_ms
    if ARGV[a + 3] == '1' then
      redis.call('ZADD', log, now_ms, request_id .. ':' .. need)
      redis.call('PEXPIRE', log, 2 * WINDOW)
      redis.call('PEXPIRE', total, 2 * WINDOW)
    else
      -- Relative to the script's clock, not Redis' own: a day counter lives one day past
      -- its end on the clock that admitted into it.
      redis.call('PEXPIRE', total, math.max(1, tonumber(ARGV[a + 4]) + 86400000 - now_ms))
    end
  end
end
local out = {refused, over, now_ms}
for i = 1, n do
  table.insert(out, spent[i])
  table.insert(out, reserved[i])
end
for j = 1, m do
  table.insert(out, used[j])
  table.insert(out, newest[j])
  table.insert(out, retry[j])
end
return out
"""

# A reservation whose caller never had the answer (Redis stalled past the socket timeout,
# or the connection broke once the call was sent) may have run, or may still run when Redis
# reads what was sent: taken back once Redis answers again, or its holds would stand until
# their lease runs out, refusing other requests against budgets nothing was spent from.
# KEYS: the key a late run checks (set here, so that it holds nothing), then the
# reservation's own: n budget counters, their n hold sets, per rate limit its hash and entry
# set. ARGV: n, m, amount, the hold's member, the request id, seconds the key is kept; then
# per limit what the request took and 1 for a sliding window. What the reservation added is
# taken off: a hold found in its set, an entry found in its window and, once either shows it
# ran, the day counts it added to (a day count keeps no entries to tell by). Returns 1 if it
# had run.
TAKE_BACK = """
local n, m, amount = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local member, request_id = ARGV[4], ARGV[5]
redis.call('SET', KEYS[1], '1', 'EX', tonumber(ARGV[6]))
local function take(hash, field, value)
  if redis.call('HINCRBY', hash, field, 0 - value) < 0 then
    redis.call('HSET', hash, field, 0)
  end
end
local ran = false
for i = 1, n do
  if redis.call('ZREM', KEYS[1 + n + i], member) == 1 then
    ran = true
    take(KEYS[1 + i], 'reserved', amount)
  end
end
for j = 1, m do
  local total, log = KEYS[2 * n + 2 * j], KEYS[2 * n + 2 * j + 1]
  local need = tonumber(ARGV[5 + 2 * j])
  if ARGV[6 + 2 * j] == '1' and redis.call('ZREM', log, request_id .. ':' .. need) == 1 then
    ran = true
    take(total, 'used', need)
  end
end
if ran then
  for j = 1, m do
    if ARGV[6 + 2 * j] ~= '1' then
      take(KEYS[2 * n + 2 * j], 'used', tonumber(ARGV[5 + 2 * j]))
    end
  end
end
return ran and 1 or 0
"""

# KEYS: n counter hashes, then their n hold sets. Returns spent, reserved per counter, with
# expired holds returned first.
COUNTERS = REAP + """
local n = #KEYS / 2
local out = {}
for i = 1, n do
  reap(KEYS[i], KEYS[n + i], now)
  local v = redis.call('HMGET', KEYS[i], 'spent', 'reserved')
  table.insert(out, tonumber(v[1] or '0'))
  table.insert(out, tonumber(v[2] or '0'))
end
return out
"""

# KEYS: hold sets. ARGV[1]: lease seconds; ARGV[2..]: members, one per set. Extends the
# leases that still exist (a hold already returned is not brought back).
RENEW = """
local now = tonumber(redis.call('TIME')[1])
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], 'XX', now + tonumber(ARGV[1]), ARGV[1 + i])
end
return #KEYS
"""

# KEYS[1]: settled-request marker, KEYS[2]: ledger stream, then n budget counters, their
# n hold sets, then per limit to settle its hash and entry set. ARGV: reserved, cost, ledger
# row (JSON), marker TTL, hold member, n, request id; then per budget counter 1 to charge it
# or 0 to only release its hold; then per limit: what its entry took (1 for a request, the
# tokens reserved for TPM, 0 for a day counter, which keeps a count and no entries) and
# what it keeps (the tokens used; -1: withdrawn whole, a provider the request never reached).
# A hold is released only if its lease is still there (an expired one was returned
# already); an entry is settled only if it is still in its window. The marker is set
# last: Redis does not roll back a script that fails half-way, and a marker without its
# writes would make the replay of that request a no-op. The last two keys: the in-flight set
# and its written-ahead rows, which forget the request once it is settled (or was already).
FINISH = """
local inflight, ahead = KEYS[#KEYS - 1], KEYS[#KEYS]
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('ZREM', inflight, ARGV[7])
  redis.call('HDEL', ahead, ARGV[7])
  return 0
end
local reserved = tonumber(ARGV[1])
local n = tonumber(ARGV[6])
for i = 3, 2 + n do
  if ARGV[5 + i] == '1' then
    redis.call('HINCRBY', KEYS[i], 'spent', ARGV[2])
  end
  if reserved > 0 and redis.call('ZREM', KEYS[i + n], ARGV[5]) == 1 then
    if redis.call('HINCRBY', KEYS[i], 'reserved', 0 - reserved) < 0 then
      redis.call('HSET', KEYS[i], 'reserved', 0)
    end
  end
end
local a = 8 + n
for k = 3 + 2 * n, #KEYS - 2, 2 do
  local took, keeps = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  a = a + 2
  local change = 0
  if took == 0 then
    if redis.call('EXISTS', KEYS[k]) == 1 then change = -1 end
  else
    local entry = ARGV[7] .. ':' .. took
    local score = redis.call('ZSCORE', KEYS[k + 1], entry)
    if score then
      redis.call('ZREM', KEYS[k + 1], entry)
      change = 0 - took
      if keeps >= 0 then
        redis.call('ZADD', KEYS[k + 1], score, ARGV[7] .. ':' .. keeps)
        change = keeps - took
      end
    end
  end
  if change ~= 0 and redis.call('HINCRBY', KEYS[k], 'used', change) < 0 then
    redis.call('HSET', KEYS[k], 'used', 0)
  end
end
redis.call('XADD', KEYS[2], '*', 'row', ARGV[3])
redis.call('SET', KEYS[1], '1', 'EX', tonumber(ARGV[4]))
redis.call('ZREM', inflight, ARGV[7])
redis.call('HDEL', ahead, ARGV[7])
return 1
"""

# A row that was never admitted (a refusal): KEYS[1] its settled-request marker, KEYS[2] the
# ledger stream, KEYS[3] the in-flight set; ARGV: the row (JSON), marker TTL, request id.
# Returns 0 for a replay, -1 when the id names a request in flight (it is kept under an id of
# its own, by the caller), 1 when written. It releases nothing.
REFUSAL = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
if redis.call('ZSCORE', KEYS[3], ARGV[3]) then
  return -1
end
redis.call('XADD', KEYS[2], '*', 'row', ARGV[1])
redis.call('SET', KEYS[1], '1', 'EX', tonumber(ARGV[2]))
return 1
"""

# KEYS: the in-flight set, the written-ahead rows. ARGV[1]: lease seconds, then a request id
# and its row (JSON) for each request written ahead.
WRITE_AHEAD = """
local deadline = tonumber(redis.call('TIME')[1]) + tonumber(ARGV[1])
for i = 2, #ARGV, 2 do
  redis.call('ZADD', KEYS[1], deadline, ARGV[i])
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
end
return 1
"""

RENEW_INFLIGHT = """
local deadline = tonumber(redis.call('TIME')[1]) + tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', deadline, ARGV[i])
end
return 1
"""

# Written-ahead rows whose lease has passed (at most 100 a call): [id, row, id, row...].
EXPIRED = """
local now = tonumber(redis.call('TIME')[1])
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 100)
local out = {}
for _, id in ipairs(ids) do
  table.insert(out, id)
  table.insert(out, redis.call('HGET', KEYS[2], id) or '')
end
return out
"""


# Connections per gateway process, and how long a request waits for one when all are busy.
POOL_CONNECTIONS = 64
POOL_WAIT_SECONDS = 5
# A connection unused this long is PINGed before its next use (and reconnected if Redis closed it).
HEALTH_CHECK_SECONDS = 5
# Reservations waiting to be taken back (TAKE_BACK) while Redis does not answer, tried again
# this often; past the cap, the oldest are left to their holds' leases.
TAKE_BACK_WAITING = 10_000
TAKE_BACK_RETRY_SECONDS = 1.0


class RedisStore(Store):
    def __init__(self, url: str, lease_seconds: int = 900, ledger_max_rows: int = 1_000_000):
        self.url = url
        self.lease_seconds = lease_seconds
        # The ledger stream keeps about this many rows (trimmed every TRIM_EVERY settles).
        self.ledger_max_rows = ledger_max_rows
        self._settled = 0
        # A burst waits for one of a bounded set of connections (redis-py's default pool fails
        # past 100, which would refuse requests fail-closed while Redis is healthy). Timeouts
        # run on the event loop's clock: a burst opening dozens of connections on a busy loop
        # takes longer than the wire does, so connecting gets 3 s (a stopped Redis refuses at
        # once). The URL's query (`?max_connections=`, `?timeout=`, `?socket_timeout=`,
        # `?socket_connect_timeout=`) overrides these.
        self.client = aioredis.Redis.from_pool(aioredis.BlockingConnectionPool.from_url(
            url, max_connections=POOL_CONNECTIONS, timeout=POOL_WAIT_SECONDS,
            socket_connect_timeout=3, socket_timeout=2,
            health_check_interval=HEALTH_CHECK_SECONDS))
        self.pipelined = Pipelined(self.client)
        self._reserve = self.pipelined.script(RESERVE)
        self._counters = self.pipelined.script(COUNTERS)
        self._renew = self.pipelined.script(RENEW)
        self._finish = self.pipelined.script(FINISH)
        self._refusal = self.pipelined.script(REFUSAL)
        self._write_ahead = self.pipelined.script(WRITE_AHEAD)
        self._renew_inflight = self.pipelined.script(RENEW_INFLIGHT)
        self._expired = self.pipelined.script(EXPIRED)
        self._take_back = self.pipelined.script(TAKE_BACK)
        self._to_take_back: collections.deque[tuple[list[str], list[object]]] = \
            collections.deque(maxlen=TAKE_BACK_WAITING)
        self._taking_back: asyncio.Task[None] | None = None
        self.taken_back = 0  # reservations found to have run, and taken back

    @staticmethod
    def _key(counter: str) -> str:
        return f"{PREFIX}budget:{counter}"

    @staticmethod
    def _holds(counter: str) -> str:
        return f"{PREFIX}holds:{counter}"

    @staticmethod
    def member(request_id: str, amount: int) -> str:
        return f"{request_id}:{amount}"

    @staticmethod
    def _limit_keys(counter: str) -> list[str]:
        return [f"{PREFIX}rl:{counter}", f"{PREFIX}rl:{counter}:log"]

    async def _admit(self, request_id: str, holds: list[Hold], amount: int,
                     limits: list[Limit], tokens: int, now: float | None
                     ) -> tuple[bool, list[Counter], int | None, list[Window], list[int], float]:
        wall = datetime.now(UTC) if now is None else datetime.fromtimestamp(now, UTC)
        ttls = [int((h.resets_at - wall).total_seconds()) + 7 * 86400 if h.resets_at else 0
                for h in holds]
        args: list[object] = [len(holds), len(limits), amount, self.lease_seconds,
                              self.member(request_id, amount), request_id,
                              "" if now is None else round(now * 1000)]
        for h, ttl in zip(holds, ttls, strict=True):
            args += [h.limit_micros if h.blocking else -1, ttl]
        for lim in limits:
            args += [lim.enforced, lim.amount(tokens), int(lim.sliding),
                     0 if lim.sliding else round(day_end_ts(lim.day or "") * 1000)]
        keys = [*(self._key(h.counter) for h in holds), *(self._holds(h.counter) for h in holds)]
        for lim in limits:
            keys += self._limit_keys(lim.counter)
        if request_id:  # a reservation, not a read: its own key says if it was taken back
            keys.append(f"{PREFIX}taken-back:{request_id}:{secrets.token_hex(4)}")
        try:
            out = [int(v) for v in await self._reserve(keys=keys, args=args)]
        except RedisError as e:
            if request_id:  # it may have run, or may yet: what it held goes back
                self._take_back_later([keys[-1], *keys[:-1]], [
                    len(holds), len(limits), amount, self.member(request_id, amount),
                    request_id, self.lease_seconds,
                    *(v for lim in limits for v in (lim.amount(tokens), int(lim.sliding)))])
            raise StoreUnavailable(f"redis {self.url}: {e}") from e
        if out[0] == -1:  # (only a late run of a reservation taken back answers so, unread)
            raise StoreUnavailable(f"redis {self.url}: the reservation was taken back")
        refused, over, clock = out[0], out[1], out[2] / 1000
        values = out[3:3 + 2 * len(holds)]
        counters = [Counter(values[2 * i], values[2 * i + 1]) for i in range(len(holds))]
        windows, refused_limits = [], []
        rest = out[3 + 2 * len(holds):]
        for j, lim in enumerate(limits):
            used, newest, retry = rest[3 * j: 3 * j + 3]
            last = newest / 1000 if newest >= 0 else None
            windows.append(Window(used, reset_after(lim, last, clock),
                                  None if retry == -2 else retry / 1000 if retry >= 0 else None))
            if retry != -1:
                refused_limits.append(j)
        granted = refused == 0 and not over
        return granted, counters, refused - 1 if refused else None, windows, refused_limits, \
            clock

    def _take_back_later(self, keys: list[str], args: list[object]) -> None:
        self._to_take_back.append((keys, args))
        if self._taking_back is None or self._taking_back.done():
            self._taking_back = asyncio.get_running_loop().create_task(
                self._take_back_waiting())

    async def _take_back_waiting(self) -> None:
        """Take back the reservations whose answer never came, oldest first, as soon as
        Redis answers (see TAKE_BACK)."""
        while self._to_take_back:
            keys, args = self._to_take_back[0]
            try:
                ran = await self._take_back(keys=keys, args=args)
            except ResponseError as e:  # the script itself failed: trying again would too
                log.error("request %s: its reservation could not be taken back (%s); its "
                          "holds return when their lease runs out", args[4], e)
                ran = 0
            except RedisError:  # Redis is not answering yet
                await asyncio.sleep(TAKE_BACK_RETRY_SECONDS)
                continue
            if self._to_take_back and self._to_take_back[0][0] is keys:
                self._to_take_back.popleft()
            if ran:
                self.taken_back += 1
                log.warning("request %s: its reservation ran after the gateway had stopped "
                            "waiting for it; what it held is returned", args[4])

    async def reserve(self, request_id: str, holds: list[Hold], amount: int,
                      limits: list[Limit] | None = None, tokens: int = 0,
                      now: float | None = None) -> Reservation:
        granted, counters, refused, windows, over, at = await self._admit(
            request_id, holds, amount, limits or [], tokens, now)
        return Reservation(granted, counters, refused, windows, over, at)

    async def windows(self, limits: list[Limit], now: float | None = None) -> list[Window]:
        return (await self._admit("", [], 0, limits, 0, now))[3]

    async def renew(self, leases: list[tuple[str, list[str], int]]) -> None:
        """Extend the leases of requests still in flight: (request_id, counters, amount),
        their holds and their written-ahead rows."""
        keys, members = [], []
        for request_id, counters, amount in leases:
            for counter in counters:
                keys.append(self._holds(counter))
                members.append(self.member(request_id, amount))
        try:
            if keys:
                await self._renew(keys=keys, args=[self.lease_seconds, *members])
            if leases:
                await self._renew_inflight(keys=[INFLIGHT], args=[
                    self.lease_seconds, *(request_id for request_id, _, _ in leases)])
        except RedisError as e:
            raise StoreUnavailable(f"redis {self.url}: {e}") from e

    async def admit(self, row: LedgerRow, counters: list[str] | None = None) -> None:
        await self.admit_many([(row, counters)])

    async def admit_many(self, rows: list[tuple[LedgerRow, list[str] | None]]) -> None:
        """Write ahead several requests in one call (in order: a later row of a request
        replaces an earlier one)."""
        args: list[object] = [self.lease_seconds]
        for row, counters in rows:
            args += [row.request_id, dumps({"row": row, "counters": counters or []})]
        try:
            await self._write_ahead(keys=[INFLIGHT, INFLIGHT_ROWS], args=args)
        except RedisError as e:
            raise StoreUnavailable(f"redis {self.url}: {e}") from e

    async def recover(self) -> int:
        """Record the written-ahead requests whose lease has passed (their replica died and
        did not come back), each once, charged to its budgets; returns how many."""
        try:
            found = await self._expired(keys=[INFLIGHT, INFLIGHT_ROWS])
        except RedisError as e:
            raise StoreUnavailable(f"redis {self.url}: {e}") from e
        recorded = 0
        for request_id, doc in zip(found[::2], found[1::2], strict=True):
            if not doc:  # its row is gone already
                await self._forget(request_id.decode() if isinstance(request_id, bytes)
                                   else request_id)
                continue
            ahead = json.loads(doc)
            # A settle that already happened makes this a no-op (settled marker); finish
            # forgets the written-ahead row either way.
            await self.finish(ahead["counters"], 0, LedgerRow.from_dict(ahead["row"]))
            recorded += 1
        return recorded

    async def _forget(self, request_id: str) -> None:
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.zrem(INFLIGHT, request_id)
            pipe.hdel(INFLIGHT_ROWS, request_id)
            await pipe.execute()

    async def finish(self, counters: list[str], reserved: int, row: LedgerRow,
                     limits: LimitSettlement | None = None,
                     released: list[str] | None = None) -> None:
        if not row.admitted:
            await self._record_refusal(row)
            return
        budget_counters = [*counters, *(released or [])]
        charge = ["1"] * len(counters) + ["0"] * len(released or [])
        # RPM and RPD entries were made on admission: TPM entries settle to the tokens used,
        # and the entries of providers the request never reached are withdrawn.
        settle: list[tuple[str, int, int]] = []
        if limits is not None:
            settle += [(c, limits.reserved, limits.tokens_used(c)) for c in limits.tokens
                       if c not in limits.unsent]
            settle += [(c, limits.reserved if c in limits.tokens else
                        1 if c in limits.sliding else 0, -1) for c in limits.unsent]
        try:
            await self._finish(
                keys=[f"{PREFIX}settled:{row.request_id}", LEDGER,
                      *(self._key(c) for c in budget_counters),
                      *(self._holds(c) for c in budget_counters),
                      *(k for c, _, _ in settle for k in self._limit_keys(c)),
                      INFLIGHT, INFLIGHT_ROWS],
                args=[reserved, row.cost_micros, row.to_json(), SETTLED_TTL,
                      self.member(row.request_id, reserved), len(budget_counters),
                      row.request_id, *charge,
                      *(v for _, took, keeps in settle for v in (took, keeps))])
            await self._trim()
        except RedisError as e:
            raise StoreUnavailable(f"redis {self.url}: {e}") from e

    async def _record_refusal(self, row: LedgerRow) -> None:
        try:
            for _ in range(2):
                written = await self._refusal(
                    keys=[f"{PREFIX}settled:{row.request_id}", LEDGER, INFLIGHT],
                    args=[row.to_json(), SETTLED_TTL, row.request_id])
                if written != -1:
                    return
                row = dataclasses.replace(row, request_id=distinct_id(row))
        except RedisError as e:
            raise StoreUnavailable(f"redis {self.url}: {e}") from e

    async def counters(self, holds: list[Hold]) -> list[Counter]:
        if not holds:
            return []
        try:
            out = await self._counters(keys=[*(self._key(h.counter) for h in holds),
                                             *(self._holds(h.counter) for h in holds)])
        except RedisError as e:
            raise StoreUnavailable(f"redis {self.url}: {e}") from e
        values = [int(v) for v in out]
        return [Counter(values[2 * i], values[2 * i + 1]) for i in range(len(holds))]

    async def _trim(self) -> None:
        """Keep the ledger stream near `ledger_max_rows` (approximate: whole nodes go)."""
        self._settled += 1
        if self._settled % TRIM_EVERY == 0:
            await self.client.xtrim(LEDGER, maxlen=self.ledger_max_rows, approximate=True)

    async def rows(self, since: datetime | None = None,
                   until: datetime | None = None) -> list[LedgerRow]:
        """Rows from `since` on, read a page at a time. An entry's id is the time Redis
        added it, never before its row's own time (a spooled row comes later), so the range
        starts there and rows are then kept by their own time."""
        start = f"{int(since.timestamp() * 1000)}-0" if since is not None else "-"
        out = []
        try:
            while True:
                page = await self.client.xrange(LEDGER, min=start, count=PAGE_ROWS)
                for _, fields in page:
                    row = LedgerRow.from_dict(json.loads(fields[b"row"]))
                    if (since is None or row.ts >= since.isoformat()) and \
                            (until is None or row.ts < until.isoformat()):
                        out.append(row)
                if len(page) < PAGE_ROWS:
                    return out
                start = "(" + page[-1][0].decode()
        except RedisError as e:
            raise StoreUnavailable(f"redis {self.url}: {e}") from e

    async def ping(self) -> None:
        try:
            await self.client.ping()
        except RedisError as e:
            raise StoreUnavailable(f"redis {self.url}: {e}") from e

    async def close(self) -> None:
        if self._taking_back is not None:
            self._taking_back.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._taking_back
        if self._to_take_back:  # the holds' leases return them
            log.warning("%d reservation(s) whose answer never came are left to their holds' "
                        "leases (%d s)", len(self._to_take_back), self.lease_seconds)
        await self.pipelined.close()
        await self.client.aclose()
