"""State behind one small interface: SQLite (one node) or Redis (shared by replicas)."""

from __future__ import annotations

from pathlib import Path

from tollgate.statedir import spool_path
from tollgate.store.base import Counter, LimitSettlement, Reservation, Store, StoreUnavailable

__all__ = ["Counter", "LimitSettlement", "Reservation", "Store", "StoreUnavailable", "open_store"]


def sqlite_path(url: str, config_dir: Path) -> Path:
    path = Path(url.removeprefix("sqlite:///"))
    return path if path.is_absolute() else config_dir / path


def open_store(url: str, config_path: Path, spool: str | None, owner: bool = True,
               lease_seconds: int = 900, ledger_max_rows: int = 1_000_000) -> Store:
    """`owner`: a serving gateway (not a CLI reading reports). `lease_seconds`: how long a
    shared store keeps a hold that is not renewed (a crashed replica's)."""
    if url.startswith("sqlite:///"):
        from tollgate.store.sqlite import SQLiteStore

        return SQLiteStore(sqlite_path(url, config_path.parent), owner=owner)
    if url.startswith(("redis://", "rediss://", "unix://")):
        from tollgate.store.redis import RedisStore
        from tollgate.store.spool import Spooled

        return Spooled(RedisStore(url, lease_seconds, ledger_max_rows),
                       spool_path(spool, config_path), owner=owner)
    raise ValueError(f"unsupported state store {url!r}: use sqlite:///path or redis://host")
