"""Redis state, shared by gateway replicas. Reservations and settlements are Lua scripts,
so every check-and-increment is atomic across replicas."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from tollgate.budgets import Hold
from tollgate.ledger import LedgerRow
from tollgate.store.base import Counter, Reservation, Store, StoreUnavailable

PREFIX = "tollgate:"
LEDGER = PREFIX + "ledger"
SETTLED_TTL = 40 * 86400  # how long a settled request id is remembered (replays are no-ops)

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

# KEYS: n counter hashes, then their n hold sets. ARGV[1]: amount; ARGV[1+i]: limit of hold
# i (-1: not blocking); ARGV[1+n+i]: seconds until counter i may expire (0: never);
# ARGV[2+2n]: lease seconds; ARGV[3+2n]: the hold's member (request_id:amount).
RESERVE = REAP + """
local amount = tonumber(ARGV[1])
local n = #KEYS / 2
local lease, member = tonumber(ARGV[2 + 2 * n]), ARGV[3 + 2 * n]
local spent, reserved = {}, {}
for i = 1, n do
  reap(KEYS[i], KEYS[n + i], now)
  local v = redis.call('HMGET', KEYS[i], 'spent', 'reserved')
  spent[i] = tonumber(v[1] or '0')
  reserved[i] = tonumber(v[2] or '0')
end
local refused = 0
for i = 1, n do
  local limit = tonumber(ARGV[1 + i])
  if refused == 0 and limit >= 0 and spent[i] + reserved[i] + amount > limit then
    refused = i
  end
end
if refused == 0 then
  for i = 1, n do
    reserved[i] = redis.call('HINCRBY', KEYS[i], 'reserved', amount)
    redis.call('ZADD', KEYS[n + i], now + lease, member)
    local ttl = tonumber(ARGV[1 + n + i])
    if ttl > 0 then
      redis.call('EXPIRE', KEYS[i], ttl)
      redis.call('EXPIRE', KEYS[n + i], ttl)
    end
  end
end
local out = {refused}
for i = 1, n do
  table.insert(out, spent[i])
  table.insert(out, reserved[i])
end
return out
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

# KEYS[1]: settled-request marker, KEYS[2]: ledger stream, KEYS[3..2+n]: counters, then
# their n hold sets. ARGV: reserved, cost, ledger row (JSON), marker TTL, hold member.
# A hold is released only if its lease is still there (an expired one was returned
# already). The marker is set last: Redis does not roll back a script that fails half-way,
# and a marker without its writes would make the replay of that request a no-op.
FINISH = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
local reserved = tonumber(ARGV[1])
local n = (#KEYS - 2) / 2
for i = 3, 2 + n do
  redis.call('HINCRBY', KEYS[i], 'spent', ARGV[2])
  if reserved > 0 and redis.call('ZREM', KEYS[i + n], ARGV[5]) == 1 then
    if redis.call('HINCRBY', KEYS[i], 'reserved', 0 - reserved) < 0 then
      redis.call('HSET', KEYS[i], 'reserved', 0)
    end
  end
end
redis.call('XADD', KEYS[2], '*', 'row', ARGV[3])
redis.call('SET', KEYS[1], '1', 'EX', tonumber(ARGV[4]))
return 1
"""


class RedisStore(Store):
    def __init__(self, url: str, lease_seconds: int = 900):
        self.url = url
        self.lease_seconds = lease_seconds
        self.client = aioredis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2,
                                              health_check_interval=5)
        self._reserve = self.client.register_script(RESERVE)
        self._counters = self.client.register_script(COUNTERS)
        self._renew = self.client.register_script(RENEW)
        self._finish = self.client.register_script(FINISH)

    @staticmethod
    def _key(counter: str) -> str:
        return f"{PREFIX}budget:{counter}"

    @staticmethod
    def _holds(counter: str) -> str:
        return f"{PREFIX}holds:{counter}"

    @staticmethod
    def member(request_id: str, amount: int) -> str:
        return f"{request_id}:{amount}"

    async def reserve(self, request_id: str, holds: list[Hold], amount: int) -> Reservation:
        now = datetime.now(UTC)
        ttls = [int((h.resets_at - now).total_seconds()) + 7 * 86400 if h.resets_at else 0
                for h in holds]
        limits = [h.limit_micros if h.blocking else -1 for h in holds]
        try:
            out = await self._reserve(
                keys=[*(self._key(h.counter) for h in holds),
                      *(self._holds(h.counter) for h in holds)],
                args=[amount, *limits, *ttls, self.lease_seconds,
                      self.member(request_id, amount)])
        except RedisError as e:
            raise StoreUnavailable(f"redis {self.url}: {e}") from e
        refused, values = int(out[0]), [int(v) for v in out[1:]]
        counters = [Counter(values[2 * i], values[2 * i + 1]) for i in range(len(holds))]
        return Reservation(refused == 0, counters, refused - 1 if refused else None)

    async def renew(self, leases: list[tuple[str, list[str], int]]) -> None:
        """Extend the leases of requests still in flight: (request_id, counters, amount)."""
        keys, members = [], []
        for request_id, counters, amount in leases:
            for counter in counters:
                keys.append(self._holds(counter))
                members.append(self.member(request_id, amount))
        if not keys:
            return
        try:
            await self._renew(keys=keys, args=[self.lease_seconds, *members])
        except RedisError as e:
            raise StoreUnavailable(f"redis {self.url}: {e}") from e

    async def finish(self, counters: list[str], reserved: int, row: LedgerRow) -> None:
        try:
            await self._finish(
                keys=[f"{PREFIX}settled:{row.request_id}", LEDGER,
                      *(self._key(c) for c in counters), *(self._holds(c) for c in counters)],
                args=[reserved, row.cost_micros, json.dumps(row.to_dict()), SETTLED_TTL,
                      self.member(row.request_id, reserved)])
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

    async def rows(self, since: datetime | None = None,
                   until: datetime | None = None) -> list[LedgerRow]:
        try:
            entries = await self.client.xrange(LEDGER)
        except RedisError as e:
            raise StoreUnavailable(f"redis {self.url}: {e}") from e
        out = []
        for _, fields in entries:
            row = LedgerRow.from_dict(json.loads(fields[b"row"]))
            if since is not None and row.ts < since.isoformat():
                continue
            if until is not None and row.ts >= until.isoformat():
                continue
            out.append(row)
        return out

    async def ping(self) -> None:
        try:
            await self.client.ping()
        except RedisError as e:
            raise StoreUnavailable(f"redis {self.url}: {e}") from e

    async def close(self) -> None:
        await self.client.aclose()
