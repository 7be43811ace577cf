"""How a request body's JSON is read: jiter first, the standard library (with a hook that
refuses a key twice in one object) for whatever jiter refuses. The gateway must read every
body as the standard library with that hook reads it: the same value, or the same refusal."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tollgate.body import _no_duplicates, read_json
from tollgate.errors import GatewayError


def _standard(raw: bytes) -> Any:
    return json.loads(raw, object_pairs_hook=_no_duplicates)


def _outcome(read, raw: bytes) -> tuple[str, Any]:
    """What `read` makes of `raw`: its value as JSON text (so NaN compares equal to NaN),
    or its exception's type (a duplicate key: the gateway's own error, with the key named)."""
    try:
        value = read(raw)
    except GatewayError as e:
        return "refused", (e.code, e.param)
    except (ValueError, RecursionError) as e:
        return "error", type(e).__name__
    return "value", json.dumps(value)


CASES = {
    "a key twice": b'{"model": "a", "model": "b"}',
    "a key twice, once escaped": b'{"model": "a", "\\u006dodel": "b"}',
    "a key twice, deep": b'{"messages": [{"role": "user", "content": [{"type": "text", '
                         b'"type": "image_url"}]}]}',
    "the same key in two objects": b'{"a": {"k": 1}, "b": {"k": 1}}',
    "half a surrogate pair": b'{"model": "gpt-\\ud800"}',
    "a whole surrogate pair": b'{"model": "\\ud83d\\ude00"}',
    "UTF-16": '{"model": "m"}'.encode("utf-16"),
    "UTF-8 with a BOM": b'\xef\xbb\xbf{"model": "m"}',
    "nested 300 deep": b'{"x": ' + b"[" * 300 + b"]" * 300 + b"}",
    "an integer of 200 digits": b'{"n": ' + b"9" * 200 + b"}",
    "an integer of 5,000 digits": b'{"n": ' + b"9" * 5000 + b"}",
    "NaN and infinities": b'{"a": NaN, "b": Infinity, "c": -Infinity, "d": 1e400}',
    "numbers": b'{"a": 1.0, "b": 1, "c": -0.0, "d": 1E2, "e": -0, "f": 0.1}',
    "trailing data": b'{"a": 1} {"b": 2}',
    "a control character": b'{"a": "x\x01y"}',
    "invalid UTF-8": b'{"a": "\xff"}',
    "empty": b"",
    "whitespace around": b' \n {"a": 1} \t ',
    "not an object": b'[1, "two", null, true]',
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_body_reads_as_the_standard_library_reads_it(case):
    raw = CASES[case]
    assert _outcome(read_json, raw) == _outcome(_standard, raw)


def test_a_key_twice_is_refused_naming_the_key():
    with pytest.raises(GatewayError) as refused:
        read_json(CASES["a key twice, once escaped"])
    assert refused.value.code == "invalid_request" and refused.value.param == "model"


# JSON values whose objects may hold a key twice: each object is written by hand from a list
# of pairs, its keys from a small alphabet so that repeats are common.
_keys = st.sampled_from(["a", "b", "model", "é", "\u2028", "\\", '"', "type"])
_scalars = st.one_of(st.none(), st.booleans(), st.integers(),
                     st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8))


def _text(value: Any, ascii_only: bool) -> str:
    if isinstance(value, _Pairs):
        return "{" + ", ".join(f"{json.dumps(k, ensure_ascii=ascii_only)}: "
                               f"{_text(v, ascii_only)}" for k, v in value.pairs) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_text(v, ascii_only) for v in value) + "]"
    return json.dumps(value, ensure_ascii=ascii_only)


class _Pairs:
    def __init__(self, pairs: list[tuple[str, Any]]):
        self.pairs = pairs


_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.lists(st.tuples(_keys, inner), max_size=4).map(_Pairs)),
    max_leaves=20)


@settings(max_examples=400, deadline=None)
@given(value=_values, ascii_only=st.booleans())
def test_any_document_reads_as_the_standard_library_reads_it(value, ascii_only):
    raw = _text(value, ascii_only).encode()
    assert _outcome(read_json, raw) == _outcome(_standard, raw)


@pytest.mark.parametrize("value", [
    float("nan"), float("inf"), float("-inf"), 10 ** 200, 1e400 - 1e400, -0.0, 1e100,
    "é \u2028 \x01 \" \\", {"include_usage": True, "extra": [1, None, 1.5, "x"]}])
def test_a_field_set_in_a_body_reads_back_as_the_client_sent_it(value):
    """The gateway's field (the usage it asks for, an output cap, a model alias) holds the
    client's own values where it keeps them (its `stream_options`, read by the standard
    library when jiter refuses the body): NaN, infinities and long integers as the standard
    library writes them."""
    from tollgate.body import add_top_level, replace_top_level

    added = add_top_level(b'{"model": "m"}', "stream_options", value)
    replaced = replace_top_level(b'{"model": "m", "n": 1}', "model", value)
    for out, key in ((added, "stream_options"), (replaced, "model")):
        assert json.dumps(json.loads(out)[key]) == json.dumps(value)
