"""Edits to the config file that keep the user's comments and key order.

Every edit is validated as a whole config before it is written, written to a temporary file
beside the original and renamed over it, so a running gateway only ever sees a complete,
valid file. A lock file serialises concurrent CLI invocations.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ruamel.yaml.comments import CommentedMap, CommentedSeq

from tollgate.config.load import LoadedConfig, read_yaml, round_trip_yaml, validate_document
from tollgate.config.problems import ConfigError


def to_yaml(value: Any) -> Any:
    """Plain data -> ruamel nodes in block style (flow style only for short scalar lists)."""
    if isinstance(value, dict):
        node = CommentedMap()
        for k, v in value.items():
            node[k] = to_yaml(v)
        return node
    if isinstance(value, list):
        seq = CommentedSeq(to_yaml(v) for v in value)
        if all(not isinstance(v, dict | list) for v in value):
            seq.fa.set_flow_style()
        return seq
    return value


class Document:
    """The parsed config file, for an edit in progress."""

    def __init__(self, path: Path, doc: CommentedMap):
        self.path = path
        self.doc = doc
        self.before: LoadedConfig | None = None  # the config as it was
        self.after: LoadedConfig | None = None  # as written, once the edit is done

    def section(self, name: str) -> CommentedSeq:
        seq = self.doc.get(name)
        if seq is None:
            seq = CommentedSeq()
            self.doc[name] = seq
        if isinstance(seq, CommentedSeq) and seq.fa.flow_style():
            seq.fa.set_block_style()
        return seq

    def find(self, section: str, ident: str) -> CommentedMap | None:
        return next((item for item in self.doc.get(section) or [] if item.get("id") == ident),
                    None)

    def append(self, section: str, item: dict[str, Any]) -> CommentedMap:
        node = to_yaml(item)
        self.section(section).append(node)
        return node

    def remove(self, section: str, ident: str) -> bool:
        seq = self.doc.get(section) or []
        for i, item in enumerate(seq):
            if item.get("id") == ident:
                del seq[i]
                return True
        return False


@contextmanager
def editing(path: Path) -> Iterator[Document]:
    """Lock, load, let the caller mutate, validate, then atomically replace the file."""
    path = Path(path)
    lock_path = path.with_name(f".{path.name}.lock")
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        doc = read_yaml(path) or CommentedMap()
        document = Document(path, doc)
        with contextlib.suppress(ConfigError):
            document.before = validate_document(doc, path)
        yield document
        document.after = validate_document(doc, path)  # ConfigError: nothing is written
        write_atomic(path, dump(doc))


def dump(doc: Any) -> str:
    buf = io.StringIO()
    round_trip_yaml().dump(doc, buf)
    return buf.getvalue()


def write_atomic(path: Path, text: str) -> None:
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
