"""The access log: one JSON line per request, refused or served, carrying its ledger row.

It holds no credential (a key appears as its id) and no prompt unless
`gateway.telemetry.capture_content` is on."""

from __future__ import annotations

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

    def configure(self, target: str | None, base: Path) -> None:
        """`-` for stdout, a file (relative to `base`, appended to), or None for no log."""
        path = target if target in (None, "-") else str((base / target).resolve())
        with self._lock:
            if path == self._target:
                return
            old, self._file, self._target = self._file, None, path
            if path not in (None, "-"):
                try:
                    Path(path).parent.mkdir(parents=True, exist_ok=True)
                    self._file = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
                except OSError as e:
                    log.error("cannot open the access log %s (%s); it goes to stdout", path, e)
                    self._target = "-"
            if old is not None:
                old.close()

    def write(self, record: dict[str, Any]) -> None:
        if self._target is None:
            return
        line = dumps(record, default=str, ascii_only=True) + "\n"
        with self._lock:
            out = self._file if self._file is not None else sys.stdout
            try:
                out.write(line)
                out.flush()
            except (OSError, ValueError) as e:  # a closed or full disk must not fail a request
                log.warning("access log write failed: %s", e)


access_log = AccessLog()
