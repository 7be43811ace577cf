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

# KEYS: counter hashes. ARGV[1]: amount; ARGV[1+i]: limit of hold i (-1: not blocking);
# ARGV[1+n+i]: seconds until counter i may expire (0: never).
RESERVE = """
local amount = tonumber(ARGV[1])
local n = #KEYS
local spent, reserved = {}, {}
for i = 1, n do
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
    local ttl = tonumber(ARGV[1 + n + i])
    if ttl > 0 then redis.call('EXPIRE', KEYS[i], ttl) end
  end
end
local out = {refused}
for i = 1, n do
  table.insert(out, spent[i])
  table.insert(out, reserved[i])
end
return out
"""

# KEYS[1]: settled-request marker, KEYS[2]: ledger stream, KEYS[3..]: counters.
# ARGV: reserved, cost, ledger row (JSON), marker TTL. The marker is set last: Redis does
# not roll back a script that fails half-way, and a marker without its writes would make
# the replay of that request a no-op.
FINISH = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
local reserved = tonumber(ARGV[1])
for i = 3, #KEYS do
  redis.call('HINCRBY', KEYS[i], 'spent', ARGV[2])
  if reserved > 0 and redis.call('HINCRBY', KEYS[i], 'reserved', 0 - reserved) < 0 then
    redis.call('HSET', KEYS[i], 'reserved', 0)
  end
end
redis.call('XADD', KEYS[2], '*', 'row', ARGV[3])
redis.call('SET', KEYS[1], '1', 'EX', tonumber(ARGV[4]))
return 1
"""


class RedisStore(Store):
    def __init__(self, url: str):
        self.url = url
        self.client = aioredis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2,
                                              health_check_interval=5)
        self._reserve = self.client.register_script(RESERVE)
        self._finish = self.client.register_script(FINISH)

    @staticmethod
    def _key(counter: str) -> str:
        return f"{PREFIX}budget:{counter}"

    async def reserve(self, request_id: str, holds: list[Hold], amount: int) -> Reservation:
        now = datetime.now(UTC)
        ttls = [int((h.resets_at - now).total_seconds()) + 7 * 86400 if h.resets_at else 0
                for h in holds]
        limits = [h.limit_micros if h.blocking else -1 for h in holds]
        try:
            out = await self._reserve(keys=[self._key(h.counter) for h in holds],
                                      args=[amount, *limits, *ttls])
        except RedisError as e:
            raise StoreUnavailable(f"redis {self.url}: {e}") from e
        refused, values = int(out[0]), [int(v) for v in out[1:]]
        counters = [Counter(values[2 * i], values[2 * i + 1]) for i in range(len(holds))]
        return Reservation(refused == 0, counters, refused - 1 if refused else None)

    async def finish(self, counters: list[str], reserved: int, row: LedgerRow) -> None:
        try:
            await self._finish(
                keys=[f"{PREFIX}settled:{row.request_id}", LEDGER,
                      *(self._key(c) for c in counters)],
                args=[reserved, row.cost_micros, json.dumps(row.to_dict()), SETTLED_TTL])
        except RedisError as e:
            raise StoreUnavailable(f"redis {self.url}: {e}") from e

    async def counters(self, holds: list[Hold]) -> list[Counter]:
        try:
            out = []
            for h in holds:
                spent, reserved = await self.client.hmget(self._key(h.counter), "spent",
                                                          "reserved")
                out.append(Counter(int(spent or 0), int(reserved or 0)))
            return out
        except RedisError as e:
            raise StoreUnavailable(f"redis {self.url}: {e}") from e

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
