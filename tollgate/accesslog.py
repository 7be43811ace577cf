"""The access log: one JSON line per request, refused or served, carrying its ledger row.

It holds no credential (a key appears as its id) and no prompt unless
`gateway.telemetry.capture_content` is on.

Lines written on an event loop's thread are written out together once the loop has run the
callbacks due: a batch of requests settled in one turn costs one write, not one each (to
stdout, each also wakes whatever collects the container's log). Elsewhere a line is written
at once. `flush` writes what is pending (the gateway's close calls it)."""

from __future__ import annotations

import asyncio
import atexit
import logging
import sys
import threading
from pathlib import Path
from typing import IO, Any

from tollgate.fastjson import dumps

log = logging.getLogger("tollgate.access")


class AccessLog:
    def __init__(self) -> None:
        self._target: str | None = None
        self._file: IO[str] | None = None
        self._lock = threading.Lock()
        self._pending: list[str] = []
        self._due: asyncio.AbstractEventLoop | None = None  # the loop a flush is due on

    def configure(self, target: str | None, base: Path) -> None:
        """`-` for stdout, a file (relative to `base`, appended to), or None for no log."""
        path = target if target in (None, "-") else str((base / target).resolve())
        with self._lock:
            if path == self._target:
                return
            self._write_pending()  # where they were meant to go
            old, self._file, self._target = self._file, None, path
            if path not in (None, "-"):
                try:
                    Path(path).parent.mkdir(parents=True, exist_ok=True)
                    self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115
                except OSError as e:
                    log.error("cannot open the access log %s (%s); it goes to stdout", path, e)
                    self._target = "-"
            if old is not None:
                old.close()

    def write(self, record: dict[str, Any]) -> None:
        if self._target is None:
            return
        line = dumps(record, default=str, ascii_only=True) + "\n"
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        with self._lock:
            self._pending.append(line)
            if loop is None:
                self._write_pending()
                return
            if self._due is loop:
                return
            # (a flush due on another loop, one that has since stopped, is taken over)
            self._due = loop
        loop.call_soon(self.flush)

    def flush(self) -> None:
        with self._lock:
            self._write_pending()

    def _write_pending(self) -> None:
        self._due = None
        if not self._pending:
            return
        lines, self._pending = "".join(self._pending), []
        out = self._file if self._file is not None else sys.stdout
        try:
            out.write(lines)
            out.flush()
        except (OSError, ValueError) as e:  # a closed or full disk must not fail a request
            log.warning("access log write failed: %s", e)


access_log = AccessLog()
atexit.register(access_log.flush)  # a loop stopped before its turn came
