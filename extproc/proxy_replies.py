"""Requests Envoy answered before the gateway decided on them (its codec refusing bad HTTP,
a body over the buffer, a client too slow, ext_proc itself down): each leaves its ledger
row, under the request id Envoy gave the client.

Two ways in (see `envoy_config.proxy_replies_log` and `envoy_config.outage_log`):
- while ext_proc is up, Envoy's gRPC access log sends them here, on the ext_proc socket;
- when ext_proc failed them, that log would go to the same dead socket, so Envoy writes them
  to a file (the outage log), which ext_proc reads into the ledger once it is back.

The same gRPC access log service also hears of every forwarded request's end
(`envoy_config.response_end_logs`): those carry the decision's metadata, the response's bytes
no meter post carried and, when the meter saw it whole, its mark, and go to the processor
that holds them (`ended`).

Envoy logs as proxy replies only requests without the decision's metadata, so a request the
gateway decided is never counted twice; the two logs take disjoint requests, and a line read
twice (ext_proc stopped between recording it and saving how far it read) settles once, by
its request id."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

from extproc.envoy_config import METADATA_NS
from tollgate.gateway import Gateway
from tollgate.request import Request
from tollgate.statedir import state_dir

log = logging.getLogger("tollgate.extproc")
# A report of a request's end this late (Envoy sends them in batches every 0.1 s) says the
# process settles behind its answers.
BEHIND = 0.5
# While the process has a core to spare (it used less than SPARE of one in the last SAMPLE
# seconds), a batch of more than BURST fresh reports is settled in slices with the core
# offered to the machine's other processes between two (`give_way`: the scheduler runs one
# that waits for this core, if any, and else returns at once). Settled back to back, such a
# batch kept a core busy for milliseconds on end, and on a machine the app and Envoy share,
# requests that came meanwhile waited for a core (their processes woken on the busy one):
# the slowest 2% of all requests on the machine, direct calls too, came in step with the
# batches (every 0.1 s), 2-5 ms late. A few reports take a core no longer than a decision
# does. At load there is no idle core to give. A report older than FRESH (the batches come
# faster than they are settled so) is settled without giving way.
#
# The core was given away by sleeping 1 ms between two slices: each such pause woke the
# process anew, and the reports after it were settled cold (the machine's other processes
# had run on the core meanwhile). Offered rather than left (bench.tail, one request at a
# time): 6% less CPU per request, and the tail shorter (tollgate's +p99 0.77 ms, was 1.17).
#
# A slice is SLICE seconds of reports settled back to back; between two the loop turns, and
# a decision that came meanwhile waits for the slice under way, no longer than a decision
# takes. A report at a time, each was settled cold, its settlement's steps run between the
# next report's (the loop ran its task between two): 6-9% more of the Envoy host's CPU per
# request, one request at a time.
SLICE = 0.0003
BURST = 8
FRESH = 0.25
SPARE = 0.5
SAMPLE = 0.1

# The meter's mark of a response it saw to its end (meter.lua), with what no post carried.
END = "end"


def request_of(entry: accesslog_pb2.HTTPAccessLogEntry) -> Request:
    r = entry.request
    method = base_pb2.RequestMethod.Name(r.request_method) \
        if r.request_method else "UNKNOWN"
    return Request(method=method, path=r.path or "/", headers=dict(r.request_headers),
                   body=b"", peer=entry.common_properties.downstream_remote_address
                   .socket_address.address, declared_length=r.request_body_bytes or None)


class Whole(NamedTuple):
    """A response the meter saw to its end (meter.lua): what its last post would have
    said."""

    head: bytes | None  # the response's head, when no post carried it
    first_byte: float | None  # a stream's first bytes, seconds since the epoch, as `head`
    at: float | None  # when its last bytes came from the provider, seconds since the epoch


class Ended(Protocol):
    def __call__(self, request_id: str, status: int, details: str, posts: int,
                 tail: bytes, client_left: bool, whole: Whole | None) -> None: ...


def _seconds(timestamp: Any) -> float:
    return timestamp.seconds + timestamp.nanos / 1e9


def _decided(entry: accesslog_pb2.HTTPAccessLogEntry
             ) -> tuple[str, int, bytes, Whole | None] | None:
    """A forwarded request's id, how many meter posts it made, the response bytes no post
    carried and, for a response the meter saw whole, the rest of what it said (see
    meter.lua), from its metadata; None for a request Envoy answered before any
    decision."""
    common = entry.common_properties
    namespaces = common.metadata.filter_metadata
    fields = namespaces.get(METADATA_NS)
    if fields is None or "request_id" not in fields.fields:
        return None
    posted = fields.fields["posted"].string_value if "posted" in fields.fields else "0"
    posts = int(posted) if posted.isdigit() else 0
    held = namespaces.get(f"{METADATA_NS}.tail")
    said = held.fields if held is not None else {}
    tail = b""
    if "n" in said:
        slots = [said.get(str(i)) for i in range(1, int(said["n"].number_value) + 1)]
        tail = b"".join(base64.b64decode(s.string_value) for s in slots if s is not None)
    whole = None
    if END in said:
        # The head no post carried (then its end, a blank line), then the last bytes.
        end, head = base64.b64decode(said[END].string_value), None
        if posts == 0:
            split = end.find(b"\n\n")
            head, end = (end, b"") if split < 0 else (end[:split + 2], end[split + 2:])
        tail += end
        first = said["first_byte"].string_value if "first_byte" in said else ""
        last = common.time_to_last_upstream_rx_byte
        whole = Whole(head, int(first) / 1e6 if first.isdigit() else None,
                      _seconds(common.start_time) + _seconds(last)
                      if common.HasField("time_to_last_upstream_rx_byte") else None)
    return fields.fields["request_id"].string_value, posts, tail, whole


def _ended_at(entry: accesslog_pb2.HTTPAccessLogEntry) -> float:
    """When the entry's request ended, seconds since the epoch (Envoy's clock)."""
    common = entry.common_properties
    return _seconds(common.start_time) + _seconds(common.time_to_last_downstream_tx_byte)


class ProxyReplies(als_pb2_grpc.AccessLogServiceServicer):
    def __init__(self, gateway: Gateway, ended: Ended,
                 stopping: Callable[[], bool] = lambda: False,
                 clock: Callable[[], float] = time.time,
                 cpu: Callable[[], float] = time.process_time,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 timer: Callable[[], float] = time.perf_counter,
                 give_way: Callable[[], None] = os.sched_yield):
        """`stopping`: whether the service is stopping (its last reports are settled at
        once); `clock` (seconds since the epoch, as Envoy's reports), `cpu` (the process's
        CPU seconds), `sleep` (a turn of the loop), `timer` (a slice's seconds) and
        `give_way` (the core offered to other processes): the pace's."""
        self.gateway = gateway
        self.ended = ended
        self.stopping = stopping
        self.clock = clock
        self.cpu = cpu
        self.sleep = sleep
        self.timer = timer
        self.give_way = give_way
        self._sampled = (clock(), cpu())
        self._spare = True  # the process had a core to spare when last sampled

    async def StreamAccessLogs(self, requests: AsyncIterator[als_pb2.StreamAccessLogsMessage],
                               context: grpc.aio.ServicerContext
                               ) -> als_pb2.StreamAccessLogsResponse:
        async for message in requests:
            entries = message.http_logs.log_entry
            paced = self.spare() and len(entries) > BURST
            # A batch's settlements, a turn or a moment apart, are committed as one.
            with self.gateway.store().settling_together():
                began = self.timer()
                for entry in entries:
                    self.take(entry)
                    turn = self.turn_after(entry, paced)
                    if turn is not None and self.timer() - began >= SLICE:
                        if turn:
                            self.give_way()
                        await self.sleep(0)
                        began = self.timer()
        return als_pb2.StreamAccessLogsResponse()

    def spare(self) -> bool:
        """Whether the process used less than SPARE of a core since its last sample, taken
        at least SAMPLE seconds ago (asked sooner, the last sample's verdict stands)."""
        now, cpu = self.clock(), self.cpu()
        was, used = self._sampled
        if now - was >= SAMPLE:
            self._spare = (cpu - used) / (now - was) < SPARE
            self._sampled = (now, cpu)
        return self._spare

    def turn_after(self, entry: accesslog_pb2.HTTPAccessLogEntry, paced: bool
                   ) -> bool | None:
        """What comes after settling `entry`, before the next, once a slice is spent: a
        batch settles many requests, and a decision that came meanwhile goes first (the
        loop turns: False), with the core offered to other processes first in a `paced`
        batch (a long one, while the process has a core to spare: see SLICE) while the
        reports are fresh (True); unless settling is behind (load past what the process
        settles): then the decisions wait (None), so answers never run ahead of their
        settlement for long, the requests awaiting theirs held in memory."""
        age = self.clock() - _ended_at(entry)
        if age > BEHIND:
            return None
        return paced and age <= FRESH and not self.stopping()

    def take(self, entry: accesslog_pb2.HTTPAccessLogEntry) -> None:
        """One entry: a forwarded request's end, or a request Envoy answered itself."""
        status = entry.response.response_code.value
        try:
            decided = _decided(entry)
        except ValueError as e:  # (not what the meter writes: the rest are still read)
            log.error("an access-log entry with unreadable metadata (%s): %s", e,
                      entry.request.request_id)
            return
        if decided is not None:
            request_id, posts, tail, whole = decided
            try:
                flags = entry.common_properties.response_flags
                self.ended(request_id, status, entry.response.response_code_details,
                           posts, tail, flags.downstream_connection_termination
                           or flags.downstream_remote_reset, whole)
            except Exception:
                log.exception("could not settle request %s", request_id)
            return
        if not status:
            return  # no answer at all: the client left before it was complete
        try:
            self.gateway.record_proxy_reply(
                request_of(entry), status, entry.response.response_code_details,
                request_id=entry.request.request_id or None)
        except Exception:
            log.exception("could not record a request Envoy answered itself")


def default_outage_log(config_path: Path) -> Path:
    """Beside the config, with ext_proc's socket: `envoy render` and `serve extproc` agree."""
    return state_dir(config_path) / "envoy-outage.log"


class OutageLog:
    """Reads the lines Envoy appended to the outage log since the last reading into the
    ledger. How far it has read is kept beside the log (`<log>.offset`, with the file's
    inode), so a restart neither loses nor repeats lines; a rotated, recreated or truncated
    log is read from its start."""

    CHUNK = 1 << 20  # memory stays bounded however long the outage was

    def __init__(self, gateway: Gateway, path: Path):
        self.gateway = gateway
        self.path = path
        self.mark = path.with_name(path.name + ".offset")
        self._read_to: tuple[int, int] | None = None  # (inode, offset), once the mark is read

    async def follow(self, interval: float = 1.0) -> None:
        while True:
            try:
                self.read()
            except OSError as e:
                log.warning("cannot read Envoy's outage log %s: %s", self.path, e)
            await asyncio.sleep(interval)

    def read(self) -> int:
        """Record the complete lines written since the last reading; how many."""
        try:
            f = open(self.path, "rb")  # noqa: SIM115 (closed below)
        except FileNotFoundError:
            return 0
        recorded = 0
        with f:
            stat = os.fstat(f.fileno())
            offset = self._offset(stat.st_ino)
            if offset == stat.st_size:
                return 0  # nothing new (the usual case: ext_proc has not been down)
            if offset > stat.st_size:
                offset = 0  # truncated in place (logrotate's copytruncate)
            f.seek(offset)
            pending = b""
            while chunk := f.read(self.CHUNK):
                lines = (pending + chunk).split(b"\n")
                pending = lines.pop()  # a line Envoy is still writing waits for the next read
                for line in lines:
                    recorded += self._record(line)
                self._save(stat.st_ino, f.tell() - len(pending))
        return recorded

    def _offset(self, inode: int) -> int:
        if self._read_to is None:
            try:
                doc = json.loads(self.mark.read_text())
                self._read_to = (doc["inode"], int(doc["offset"]))
            except (OSError, ValueError, KeyError, TypeError):
                self._read_to = (inode, 0)
        read_inode, offset = self._read_to
        return offset if read_inode == inode else 0

    def _save(self, inode: int, offset: int) -> None:
        self._read_to = (inode, offset)
        tmp = self.mark.with_name(f".{self.mark.name}.tmp")
        tmp.write_text(json.dumps({"inode": inode, "offset": offset}))
        os.replace(tmp, self.mark)

    def _record(self, line: bytes) -> int:
        if not line.strip():
            return 0
        try:
            doc = json.loads(line)
            status = int(doc["status"])
            at = datetime.fromisoformat(doc["start_time"]).astimezone(UTC)
        except (ValueError, KeyError, TypeError):
            log.warning("skipping a line of Envoy's outage log that is not its format: %.200r",
                        line)
            return 0
        headers = {name: str(doc[name]) for name in
                   ("authorization", "x-api-key", "anthropic-version") if doc.get(name)}
        req = Request(method=str(doc.get("method") or "UNKNOWN"),
                      path=str(doc.get("path") or "/"), headers=headers, body=b"",
                      peer=str(doc.get("peer") or ""))
        try:
            self.gateway.record_proxy_reply(req, status, str(doc.get("details") or ""),
                                            request_id=doc.get("request_id") or None, at=at,
                                            key_prefix_only=True)
        except Exception:  # not read again every second: logged with what it held
            log.exception("could not record a request from Envoy's outage log: %.500r", line)
            return 0
        return 1
