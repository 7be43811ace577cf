"""Hot reload: the running gateway follows edits to its config (and price table) file.

A poller, not inotify: it survives atomic renames, editors that replace files, bind mounts
and Kubernetes ConfigMap symlink swaps alike (stat follows the links), and checking two
stat() results every quarter second costs nothing. A change is loaded once the files have
held still for one poll (`tick`): a writer that truncates the file and writes it anew (a
shell redirect, `cp`, many editors) leaves it empty or cut short for a moment, and such a
file can be a valid config with no keys at all. Nothing stops it: a broken edit, an
unreadable or missing file, or a failing callback is logged and reported in the run status
(`tollgate status`), the last good config keeps serving, and the next good edit is taken.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tollgate.config.load import LoadedConfig, load_config
from tollgate.config.problems import ConfigError
from tollgate.statedir import state_dir

log = logging.getLogger("tollgate.config")


def _signature(paths: list[Path]) -> tuple[object, ...]:
    sig: list[object] = []
    for p in paths:
        try:
            st = os.stat(p)
            sig.append((st.st_mtime_ns, st.st_size, st.st_ino, st.st_mode))
        except OSError as e:
            sig.append(e.errno)
    return tuple(sig)


def file_digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def run_dir(config_path: Path) -> Path:
    """Where running gateways describe the config they serve (one file per process)."""
    return state_dir(config_path) / "run"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class ConfigHolder:
    """The last good config, replaced atomically when a valid edit lands."""

    def __init__(self, path: Path | str, interval: float = 0.25):
        self.path = Path(path)
        self.interval = interval
        before = _signature([self.path])
        digest = file_digest(self.path)
        self.current: LoadedConfig = load_config(self.path)
        self.last_error: str | None = None
        self.status: dict[str, Any] = {
            "pid": os.getpid(), "config": str(self.path.resolve()), "started_at": _now(),
            "loaded_at": _now(), "loaded_sha256": digest, "reloads": 0, "reload_failures": 0,
            "last_error": None, "last_error_at": None}
        self._checks: list[Callable[[LoadedConfig], None]] = []
        self._preparers: list[Callable[[LoadedConfig], None]] = []
        self._appliers: list[Callable[[LoadedConfig, LoadedConfig], None]] = []
        others = self._companions()
        self._seen: tuple[object, ...] = (self.path, *others, *before, *_signature(others))
        self._moving: tuple[object, ...] | None = None  # a change not yet held still a poll
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _companions(self) -> list[Path]:
        """The files the config names and reloads with it: prices and the model catalog."""
        settings = self.current.config.gateway
        return [self.path.parent / settings.prices, self.path.parent / settings.models]

    def _state(self) -> tuple[object, ...]:
        """What the watched files look like now. Taken before a load, never after: a write
        that lands while we parse must still count as a change on the next tick."""
        paths = [self.path, *self._companions()]
        return (*paths, *_signature(paths))

    def check_with(self, callback: Callable[[LoadedConfig], None]) -> None:
        """Run `callback` on each new config before it is accepted: a ConfigError it raises
        rejects the reload like an invalid file (the last good config keeps serving)."""
        self._checks.append(callback)

    def before_reload(self, callback: Callable[[LoadedConfig], None]) -> None:
        """Run `callback` with a new config before it takes effect (a proxy loading the
        resources the new config routes to)."""
        self._preparers.append(callback)

    def on_reload(self, callback: Callable[[LoadedConfig, LoadedConfig], None]) -> None:
        """Run `callback(old, new)` once a new config has taken effect."""
        self._appliers.append(callback)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="tollgate-config",
                                            daemon=True)
            self._write_status()
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            with contextlib.suppress(OSError):
                self._status_path().unlink(missing_ok=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.tick()
            except Exception:  # the watcher must outlive anything a reload throws
                log.exception("config watcher: unexpected error, still watching")

    def tick(self) -> bool:
        """One poll: a change is loaded (`check`) once the files look the same as at the
        poll before, not while they may still be being written; True when it took effect."""
        state = self._state()
        if state == self._seen or state != self._moving:
            self._moving = None if state == self._seen else state
            return False
        self._moving = None
        return self.check()

    def check(self) -> bool:
        """Reload if a watched file changed; True when a new config took effect."""
        state = self._state()
        if state == self._seen:
            return False
        self._seen = state
        digest = file_digest(self.path)  # before the load, like `state`
        try:
            loaded = load_config(self.path)
            for check in self._checks:
                check(loaded)
        except ConfigError as e:
            self._failed(str(e))
            log.error("config reload rejected, still serving the last good config:\n%s", e)
            return False
        except Exception as e:  # anything else a bad file can provoke
            self._failed(f"{self.path}: {e.__class__.__name__}: {e}")
            log.exception("config reload failed, still serving the last good config")
            return False
        for callback in self._preparers:
            try:
                callback(loaded)
            except Exception:
                log.exception("preparing for the new config failed")
        old, self.current, self.last_error = self.current, loaded, None
        for apply in self._appliers:
            try:
                apply(old, loaded)
            except Exception:
                log.exception("applying the new config failed")
        self.status.update(loaded_at=_now(), loaded_sha256=digest,
                           reloads=self.status["reloads"] + 1, last_error=None)
        self._write_status()
        log.info("config reloaded from %s", self.path)
        return True

    def report(self, **fields: Any) -> None:
        """Add to what this process tells `tollgate status` (its Envoy's admin address)."""
        self.status.update(fields)
        self._write_status()

    def _failed(self, message: str) -> None:
        self.last_error = message
        self.status.update(last_error=message, last_error_at=_now(),
                           reload_failures=self.status["reload_failures"] + 1)
        self._write_status()

    def _status_path(self) -> Path:
        return run_dir(self.path) / f"{os.getpid()}.json"

    def _write_status(self) -> None:
        """Tell `tollgate status` what this process serves, while it watches (best effort: a
        read-only config directory only loses the report)."""
        if self._thread is None:
            return
        path = self._status_path()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.status, indent=2))
            tmp.replace(path)
        except OSError as e:
            log.debug("cannot write run status %s: %s", path, e)
