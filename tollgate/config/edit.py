"""Edits to the config file that keep the user's comments and key order.

Every edit is validated as a whole config before it is written, written to a temporary file
beside the original and renamed over it, so a running gateway only ever sees a complete,
valid file. A lock file serialises concurrent CLI invocations.

Most edits read and write the whole file with the round-trip parser, which keeps what the
user wrote but costs some 10 ms per KiB: a config of a few hundred keys took the better part
of a second per command, and a script that mints keys one by one went slower with each. An
item added to a section (`append_item`) is instead inserted as lines of its own after the
section's last item, the rest of the file left byte for byte, wherever the file reads, with
those lines in, as exactly the config with the item appended (libyaml, over ten times
faster); elsewhere it takes the round-trip way.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from ruamel.yaml.comments import CommentedMap, CommentedSeq

from tollgate.config.fastyaml import parse, parse_nodes
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
    """The parsed config file, for an edit in progress (`doc` None: an item appended
    without it, `append_item`)."""

    def __init__(self, path: Path, doc: CommentedMap | None):
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
def _locked(path: Path) -> Iterator[None]:
    """The config's edits one at a time, across processes."""
    with open(path.with_name(f".{path.name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@contextmanager
def editing(path: Path) -> Iterator[Document]:
    """Lock, load, let the caller mutate, validate, then atomically replace the file."""
    path = Path(path)
    with _locked(path), _edited(path) as document:
        yield document


@contextmanager
def _edited(path: Path) -> Iterator[Document]:
    """`editing`, the lock held."""
    doc = read_yaml(path) or CommentedMap()
    document = Document(path, doc)
    with contextlib.suppress(ConfigError):
        document.before = validate_document(doc, path)
    yield document
    document.after = validate_document(doc, path)  # ConfigError: nothing is written
    write_atomic(path, dump(doc))


class AlreadyThere(Exception):
    """The section has an item with that id already."""


def append_item(path: Path, section: str, item: dict[str, Any]) -> Document:
    """Add `item` (plain data with an `id`) to the list `section`, as `editing` would
    (AlreadyThere: an item has its id; ConfigError: the config would not be valid; nothing
    is written then). The document returned has no round-trip parse (`doc` None) when the
    item's lines were inserted (see the module's docstring)."""
    path = Path(path)
    with _locked(path):
        try:
            text = path.read_bytes().decode("utf-8")
        except (OSError, ValueError):
            text = None  # (the round-trip parser says what is wrong with it)
        spliced = _spliced(text, section, item) if text is not None else None
        if spliced is not None:
            data, new_text, new_data = spliced
            if any(isinstance(i, dict) and i.get("id") == item["id"] for i in data[section]):
                raise AlreadyThere(item["id"])
            document = Document(path, None)
            try:
                document.after = validate_document(new_data, path)
            except ConfigError:
                pass  # said again below, with the round-trip parser's lines
            else:
                with contextlib.suppress(ConfigError):
                    document.before = validate_document(data, path)
                write_atomic(path, new_text)
                return document
        with _edited(path) as document:
            if document.find(section, item["id"]) is not None:
                raise AlreadyThere(item["id"])
            document.append(section, item)
        return document


def _spliced(text: str, section: str, item: dict[str, Any]
             ) -> tuple[dict[str, Any], str, Any] | None:
    """The file's data, its text with `item`'s lines inserted after the last item of the
    block list `section`, and what that text reads as; None unless it reads as the data
    with the item appended, its items indented as the round-trip writer would indent the
    item (or the file is not one this reader reads, or the list is not such a list)."""
    try:
        data, root = parse_nodes(text)
    except ValueError:
        return None
    if "\r" in text or not isinstance(data, dict) or not isinstance(root, yaml.MappingNode) \
            or not isinstance(data.get(section), list):
        return None
    items = next((v for k, v in root.value if k.value == section), None)
    if not isinstance(items, yaml.SequenceNode) or items.flow_style or not items.value:
        return None
    last = items.value[-1]
    end = _end(last)
    if end is None or not last.start_mark.index <= end <= items.end_mark.index:
        return None  # (an alias: its marks are its anchor's)
    lines = dump(to_yaml({section: [item]})).split("\n", 1)[1]
    dash = re.match(" *- ", lines)
    if dash is None or dash.end() != last.start_mark.column:
        return None  # the file's items are indented otherwise
    cut = text.find("\n", end) + 1
    new_text = f"{text}\n{lines}" if cut == 0 else text[:cut] + lines + text[cut:]
    try:
        new_data = parse(new_text)
    except ValueError:
        return None
    if new_data != {**data, section: [*data[section], json.loads(json.dumps(item))]}:
        return None
    return data, new_text, new_data


def _end(node: yaml.Node) -> int | None:
    """Where the text of a block collection's last item ends (the offset just past its last
    scalar or flow collection); None where a block scalar or an empty value ends it (whose
    marks reach into the lines after it)."""
    while isinstance(node, yaml.MappingNode | yaml.SequenceNode) and not node.flow_style:
        if not node.value:
            return None
        node = node.value[-1] if isinstance(node, yaml.SequenceNode) else node.value[-1][1]
    if isinstance(node, yaml.ScalarNode) and (node.style in ("|", ">") or node.value == ""):
        return None
    return node.end_mark.index


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
