"""Hot reload: the running gateway follows edits to its config (and price table) file.

A poller, not inotify: it survives atomic renames, editors that replace files and bind
mounts alike, and checking two stat() results every quarter second costs nothing.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

from tollgate.config.load import LoadedConfig, load_config
from tollgate.config.problems import ConfigError

log = logging.getLogger("tollgate.config")


def _signature(paths: list[Path]) -> tuple[object, ...]:
    sig: list[object] = []
    for p in paths:
        try:
            st = os.stat(p)
            sig.append((st.st_mtime_ns, st.st_size, st.st_ino))
        except OSError:
            sig.append(None)
    return tuple(sig)


class ConfigHolder:
    """The last good config, replaced atomically when a valid edit lands."""

    def __init__(self, path: Path | str, interval: float = 0.25):
        self.path = Path(path)
        self.interval = interval
        before = _signature([self.path])
        self.current: LoadedConfig = load_config(self.path)
        self.last_error: ConfigError | None = None
        self._preparers: list[Callable[[LoadedConfig], None]] = []
        prices = self.path.parent / self.current.config.gateway.prices
        self._seen: tuple[object, ...] = (self.path, prices, *before, *_signature([prices]))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _state(self) -> tuple[object, ...]:
        """What the watched files look like now. Taken before a load, never after: a write
        that lands while we parse must still count as a change on the next tick."""
        paths = [self.path, self.path.parent / self.current.config.gateway.prices]
        return (*paths, *_signature(paths))

    def before_reload(self, callback: Callable[[LoadedConfig], None]) -> None:
        """Run `callback` with a new config before it takes effect (a proxy loading the
        resources the new config routes to)."""
        self._preparers.append(callback)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="tollgate-config",
                                            daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.check()

    def check(self) -> bool:
        """Reload if a watched file changed; True when a new config took effect."""
        state = self._state()
        if state == self._seen:
            return False
        self._seen = state
        try:
            loaded = load_config(self.path)
        except ConfigError as e:
            self.last_error = e
            log.error("config reload rejected, still serving the last good config:\n%s", e)
            return False
        for callback in self._preparers:
            try:
                callback(loaded)
            except Exception:
                log.exception("preparing for the new config failed")
        self.current, self.last_error = loaded, None
        log.info("config reloaded from %s", self.path)
        return True
