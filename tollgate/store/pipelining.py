"""Script calls made in one turn of the event loop go to Redis together, in one pipeline.

Under load a gateway process starts several reservations, write-aheads and settlements in the
same turn of its loop. Sent one by one, each pays redis-py's whole round trip (a connection
from the pool, packing in Python, a write, a read: about 100-140 us of CPU); sent together,
packed by hiredis, they share it (about 50 us each for a batch of three, 25 for eight). A call
made alone waits for the end of its loop turn, no more. Each script still runs atomically on
its own: the pipeline is not a transaction, it only saves round trips.

A connection or two stay with this client between round trips instead of going back to
redis-py's pool: its checkout and check-in (a condition, a timeout, locks, telemetry) cost
about as many instructions as a script call's own round trip. Each is health-checked before
use as the client's own commands are (a PING once it has been unused for the client's
`health_check_interval`), and reconnected if Redis closed it meanwhile; after a round trip
that failed (Redis gone), all of them go back to the pool.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tollgate.store.base import resolve

Args = Sequence[Any]
# Connections kept between round trips. More would starve redis-py's own commands and the
# calls waiting in its pool during a burst (the pool is bounded): the rest go back to it.
KEEP = 2


class Pipelined:
    """One Redis client's script calls, batched per loop turn (see the module's docstring)."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self._queued: list[tuple[AsyncScript, Args, Args, asyncio.Future[Any]]] = []
        self._sending: set[asyncio.Task[None]] = set()
        self.batches = 0  # pipelines sent (tests count them)
        self._idle: list[Any] = []  # connections kept between round trips

    def script(self, source: str) -> Script:
        return Script(self, self.client.register_script(source))

    async def call(self, script: AsyncScript, keys: Args, args: Args) -> Any:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Any] = loop.create_future()
        self._queued.append((script, keys, args, done))
        if len(self._queued) == 1:  # the first of this turn: the batch goes after it
            loop.call_soon(self._send)
        return await done

    def _send(self) -> None:
        batch, self._queued = self._queued, []
        if not batch:  # sent already, by close()
            return
        # Started at once (eagerly), so the batch is written in this turn, not the next: a
        # sequential request's reservation is answered about 50 us sooner.
        task = asyncio.Task(self._execute(batch), loop=asyncio.get_running_loop(),
                            eager_start=True)
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _execute(self, batch: list[tuple[AsyncScript, Args, Args, asyncio.Future[Any]]]
                       ) -> None:
        self.batches += 1
        try:
            results = await self._round_trip([_evalsha(*call[:3]) for call in batch])
        except Exception as e:  # the connection failed: every call of the batch did
            for *_, done in batch:
                resolve(done, e)
            return
        except asyncio.CancelledError:
            for *_, done in batch:
                done.cancel()
            raise
        missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
        if missing:
            await self._run_again(batch, missing, results)
        for (*_, done), result in zip(batch, results, strict=True):
            resolve(done, result)  # a script's error is its call's exception

    async def _run_again(self, batch: list[tuple[AsyncScript, Args, Args, asyncio.Future[Any]]],
                         missing: list[int], results: list[Any]) -> None:
        """Redis restarted or was flushed, and has not the scripts of the calls at `missing`
        (which did not run): load them and run those calls again, in one round trip."""
        scripts = list({batch[i][0].sha: batch[i][0] for i in missing}.values())
        try:
            again = await self._round_trip(
                [hiredis.pack_command(("SCRIPT", "LOAD", s.script)) for s in scripts]
                + [_evalsha(*batch[i][:3]) for i in missing])
        except Exception as e:  # those calls fail; the others of the batch ran, and stand
            again = [e] * (len(scripts) + len(missing))
        for i, result in zip(missing, again[len(scripts):], strict=True):
            results[i] = result

    async def _round_trip(self, commands: list[bytes]) -> list[Any]:
        """One write of every command, then their replies in order, on one connection.
        Not retried: a script that may have run is not run again."""
        conn = await self._connection()
        try:
            await conn.send_packed_command(commands, check_health=False)
            results: list[Any] = []
            for _ in commands:
                try:
                    results.append(await conn.read_response())
                except ResponseError as e:  # this call's own error; the next replies follow
                    results.append(e)
        except BaseException:
            # Replies may be left unread on it: the connection is not used again, and the
            # others kept may be as broken (Redis went away): they go back to the pool.
            await conn.disconnect(nowait=True)
            kept, self._idle = self._idle, []  # (taken before awaiting: no one else uses them)
            await self._release([conn, *kept])
            raise
        if len(self._idle) < KEEP:
            self._idle.append(conn)
        else:  # a burst's: back to the pool, where a call may be waiting for one
            await self._release([conn])
        return results

    async def _connection(self) -> Any:
        """The connection used last (else one from the pool), health-checked."""
        conn = self._idle.pop() if self._idle else \
            await self.client.connection_pool.get_connection()
        try:
            try:
                await conn.check_health()
            except (RedisConnectionError, RedisTimeoutError, OSError):
                # Redis closed it while it was unused; nothing was sent on it: reconnect.
                await conn.disconnect()
                await conn.connect()
        except BaseException:
            await self._release([conn])
            raise
        return conn

    async def _release(self, connections: list[Any]) -> None:
        for conn in connections:
            await self.client.connection_pool.release(conn)

    async def close(self) -> None:
        """Once every call made so far has its answer (the client closes after)."""
        if self._queued:
            self._send()
        await asyncio.gather(*self._sending, return_exceptions=True)
        kept, self._idle = self._idle, []
        await self._release(kept)


def _evalsha(script: AsyncScript, keys: Args, args: Args) -> bytes:
    """A call of a loaded script, packed by hiredis."""
    return hiredis.pack_command(("EVALSHA", script.sha, len(keys), *keys, *args))


class Script:
    """A registered script, called as redis-py's own: `await script(keys=..., args=...)`."""

    def __init__(self, pipelined: Pipelined, script: AsyncScript) -> None:
        self.pipelined = pipelined
        self.script = script

    async def __call__(self, keys: Args = (), args: Args = ()) -> Any:
        return await self.pipelined.call(self.script, keys, args)
