"""The scratch directories of `serve envoy` and `serve extproc` (their sockets, Envoy's
bootstrap, sibling processes' metrics), in the system's temporary directory.

A gateway removes its own as it stops; one that was killed (SIGKILL, the OOM killer) cannot.
So each directory holds a lock (`flock` on its `.owner` file) while its gateway lives, and a
gateway that starts removes the directories whose lock it can take: their gateways are gone.
A lock, not a process id: it holds for processes in other PID namespaces that share the
directory, and a reused id never keeps a dead gateway's directory alive. A directory is
locked before it takes its name (made under a name that starts with a dot, then renamed),
so another gateway starting at the same moment never finds one unlocked.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from pathlib import Path

OWNER = ".owner"
_HELD: dict[Path, int] = {}  # this process's directories, and their locks (held open)


def own_workdir(kind: str) -> Path:
    """A new directory `tollgate-<kind>-*`, locked for this process; those of gateways that
    are gone are removed first."""
    tmp = Path(tempfile.gettempdir())
    for old in tmp.glob(f"tollgate-{kind}-*"):
        _remove_if_abandoned(old)
    while True:
        made = Path(tempfile.mkdtemp(prefix=f".tollgate-{kind}-"))
        fd = os.open(made / OWNER, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        workdir = made.with_name(made.name[1:])
        try:
            made.rename(workdir)
        except OSError:  # (that name is a gone gateway's still: another one)
            os.close(fd)
            shutil.rmtree(made, ignore_errors=True)
            continue
        _HELD[workdir] = fd
        return workdir


def remove(workdir: Path) -> None:
    """This process's directory `workdir` (from `own_workdir`), removed as it stops."""
    shutil.rmtree(workdir, ignore_errors=True)
    fd = _HELD.pop(workdir, None)
    if fd is not None:
        os.close(fd)


def _remove_if_abandoned(path: Path) -> None:
    try:
        fd = os.open(path / OWNER, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return  # not a directory with an owner (an older gateway's, or not a gateway's)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return  # its gateway lives
    shutil.rmtree(path, ignore_errors=True)
    os.close(fd)
