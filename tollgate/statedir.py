"""Where a gateway keeps what it writes while it runs: the pepper file, run reports, the
ext_proc socket, Envoy's outage log and the spool.

`.tollgate/` beside the config, or `$TOLLGATE_STATE_DIR`. Beside the config's path as given,
never inside where its symlinks lead: a Kubernetes ConfigMap mount is read-only, and its files
point into a timestamped folder the kubelet replaces on every update.
"""

from __future__ import annotations

import os
from pathlib import Path

STATE_DIR_ENV = "TOLLGATE_STATE_DIR"


def state_dir(config_path: Path) -> Path:
    given = os.environ.get(STATE_DIR_ENV)
    if given:
        return Path(os.path.abspath(given))
    return Path(os.path.abspath(config_path)).parent / ".tollgate"


def spool_path(spool: str | None, config_path: Path) -> Path:
    """`gateway.spool`: relative to the config's folder when given, else in the state dir."""
    if spool is None:
        return state_dir(config_path) / "spool.db"
    path = Path(spool)
    return path if path.is_absolute() else Path(os.path.abspath(config_path)).parent / path
