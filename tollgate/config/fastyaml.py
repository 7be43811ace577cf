"""Reading a config with libyaml, for readers that write nothing back.

The round-trip parser (ruamel, pure Python) keeps comments and line numbers for edits and
error messages, and costs about 6 ms per KiB: a config with a few hundred keys took the
gateway's reload thread, which shares the interpreter with the requests it serves, most of
a second per change. Reading the same file with libyaml's parser is over ten times faster.

The data must be exactly what the round-trip parser reads, so scalars are resolved with
its own YAML 1.2 rules (`on:` and `yes` stay strings, `0o17` is octal, `017` is 17), and
whatever this reader does not do the same way falls back to it: timestamps, merge keys,
tags, `%YAML` directives, the characters the two read differently (tabs, YAML 1.1's extra
line breaks), duplicate keys and every error (whose messages need the round-trip parser's
lines).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from ruamel.yaml.resolver import implicit_resolvers

try:
    from yaml import CSafeLoader as _CLoader
    from yaml import MappingNode, ScalarNode, SequenceNode
    from yaml import YAMLError as _LibYAMLError
except ImportError:  # PyYAML without libyaml: every read takes the round-trip parser
    _CLoader = None


class _Resolved(str):
    """A tag this reader resolved; a node whose tag is not one was tagged in the file."""


STR, SEQ, MAP = (_Resolved(f"tag:yaml.org,2002:{kind}") for kind in ("str", "seq", "map"))
_SCALARS = ("bool", "int", "float", "null")

# The round-trip parser's YAML 1.2 implicit resolvers, by first character, in its order.
_RESOLVERS: dict[str, list[tuple[_Resolved, re.Pattern[str]]]] = {}
for _versions, _tag, _regexp, _first in implicit_resolvers:
    if (1, 2) in _versions:
        for _char in _first:
            _RESOLVERS.setdefault(_char, []).append((_Resolved(_tag), _regexp))


BOM = "\ufeff"
# Read otherwise by libyaml (YAML 1.1's line breaks, a BOM past the start, tabs it takes where
# the round-trip parser refuses them) or by the round-trip parser (a version directive).
_READ_OTHERWISE = re.compile("[\t\x85\u2028\u2029\ufeff]|%YAML")


class _Unsupported(Exception):
    """Something the round-trip parser reads differently, or an error it must word."""


def read_data(path: Path) -> Any:
    """The YAML document at `path` as plain data (dicts, lists, scalars), the same the
    round-trip parser reads; its errors are the round-trip parser's `ConfigError`s."""
    from tollgate.config.load import read_yaml

    if _CLoader is not None:
        try:
            return parse(path.read_bytes().decode("utf-8"))
        except (ValueError, OSError):  # (UnicodeDecodeError is a ValueError)
            pass
    return read_yaml(path)


def parse(text: str) -> Any:
    """`text` as plain data, the same the round-trip parser reads; ValueError where this
    reader does not say (whatever it reads otherwise, and every error)."""
    return parse_nodes(text)[0]


def parse_nodes(text: str) -> tuple[Any, Any]:
    """`parse`, and the document's libyaml node (None for an empty one), whose marks say
    where each value is in `text`."""
    if _CLoader is None or _READ_OTHERWISE.search(text, 1 if text.startswith(BOM) else 0):
        raise ValueError("for the round-trip parser")
    try:
        return _load_nodes(text)
    except (_Unsupported, _LibYAMLError, RecursionError) as e:
        raise ValueError(f"for the round-trip parser: {e}") from None


def _load(text: str) -> Any:
    """The data, its errors as this reader raises them."""
    return _load_nodes(text)[0]


def _load_nodes(text: str) -> tuple[Any, Any]:
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        return (None if node is None else loader.construct_document(node)), node
    finally:
        loader.dispose()


if _CLoader is not None:

    class _Loader(_CLoader):  # type: ignore[misc, valid-type]
        def resolve(self, kind: Any, value: Any, implicit: Any) -> _Resolved:
            # Called for untagged nodes and for those tagged `!`, which are read otherwise.
            if kind is ScalarNode:
                if implicit[0]:  # plain
                    for tag, regexp in _RESOLVERS.get(value[:1], ()):
                        if regexp.match(value):
                            return tag
                elif not implicit[1]:  # neither plain nor quoted: tagged `!`
                    raise _Unsupported("!")
                return STR
            if not implicit:
                raise _Unsupported("!")
            return SEQ if kind is SequenceNode else MAP

        def construct_document(self, node: Any) -> Any:
            return self._plain(node)

        def _plain(self, node: Any) -> Any:
            tag = node.tag
            if not isinstance(tag, _Resolved):
                raise _Unsupported(tag)
            if isinstance(node, MappingNode) and tag == MAP:
                out: dict[Any, Any] = {}
                for key_node, value_node in node.value:
                    key = self._plain(key_node)
                    # (An empty key is what libyaml makes of some flow syntax the round-trip
                    # parser refuses, such as `[?, x]`.)
                    if key is None or isinstance(key, dict | list) or key in out:
                        raise _Unsupported("an empty, duplicate or unhashable key")
                    out[key] = self._plain(value_node)
                return out
            if isinstance(node, SequenceNode) and tag == SEQ:
                return [self._plain(item) for item in node.value]
            if isinstance(node, ScalarNode):
                if tag == STR:
                    return node.value
                return _scalar(tag.rsplit(":", 1)[1], node.value)
            raise _Unsupported(tag)


def _scalar(kind: str, value: str) -> Any:
    if kind not in _SCALARS:  # timestamp, merge, value
        raise _Unsupported(kind)
    if kind == "null":
        return None
    if kind == "bool":
        return value.lower() == "true"
    digits = value.replace("_", "")
    try:
        if kind == "int":
            sign, digits = (-1, digits[1:]) if digits[:1] == "-" else (1, digits.lstrip("+"))
            base = {"0b": 2, "0x": 16, "0o": 8}.get(digits[:2])
            return sign * (int(digits[2:], base) if base else int(digits, 10))
        lowered = digits.lower()
        if lowered.endswith(".inf"):
            return -math.inf if lowered.startswith("-") else math.inf
        if lowered == ".nan":
            return math.nan
        return float(digits)
    except ValueError:
        raise _Unsupported(value) from None
