"""Property tests: hostile bodies never crash the parser, splicing never disturbs other bytes,
and the SSE parser yields the same events however the stream is split."""

from __future__ import annotations

import json

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from tollgate.body import add_top_level, parse, replace_top_level, set_top_level, tool_names
from tollgate.errors import GatewayError
from tollgate.routes import ROUTES
from tollgate.sse import SSEParser

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | st.text(max_size=12),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6),
                                                                      children, max_size=3),
    max_leaves=8,
)
forwarded = [r for r in ROUTES.values() if r.forwarded]


@settings(max_examples=300)
@given(raw=st.binary(max_size=300), route=st.sampled_from(forwarded))
def test_arbitrary_bytes_parse_or_400(raw, route):
    try:
        parse(route, raw)
    except GatewayError as e:
        assert e.status == 400 and e.code == "invalid_request"


@settings(max_examples=300)
@given(doc=st.dictionaries(st.sampled_from(["model", "messages", "tools", "functions",
                                            "stream", "max_tokens", "input", "x"]),
                           json_values, max_size=6),
       route=st.sampled_from(forwarded))
def test_wrong_types_are_400_never_a_crash(doc, route):
    try:
        parsed = parse(route, json.dumps(doc).encode())
    except GatewayError as e:
        assert e.status == 400
    else:
        assert all(isinstance(n, str) for n in parsed.tools)


@given(depth=st.integers(min_value=1, max_value=200_000))
@settings(max_examples=20)
def test_deep_nesting_is_400_or_ok(depth):
    raw = b'{"model": "m", "messages": [], "x": ' + b"[" * depth + b"]" * depth + b"}"
    try:
        parse(ROUTES["/v1/chat/completions"], raw)
    except GatewayError as e:
        assert e.status == 400


def test_tool_names_per_shape():
    chat = {"tools": [{"type": "function", "function": {"name": "a"}},
                      {"type": "custom", "custom": {"name": "b"}}],
            "functions": [{"name": "c"}]}
    assert tool_names(ROUTES["/v1/chat/completions"], chat) == ["a", "b", "c"]
    responses = {"tools": [{"type": "function", "name": "d"}, {"type": "web_search"}]}
    assert tool_names(ROUTES["/v1/responses"], responses) == ["d", "web_search"]
    assert tool_names(ROUTES["/v1/messages"], {"tools": [{"name": "e"}]}) == ["e"]


separators = st.sampled_from([" ", "", "\n", "\t", "  \n "])


@settings(max_examples=200)
@given(doc=st.dictionaries(st.text(max_size=6), json_values, max_size=5),
       model=st.text(max_size=10), new=st.text(max_size=10), sep=separators,
       position=st.integers(min_value=0, max_value=5))
@example(doc={}, model=":", new="", sep="", position=0)  # the value looks like the key's end
def test_replace_top_level_touches_only_that_value(doc, model, new, sep, position):
    doc.pop("model", None)
    items = list(doc.items())
    items.insert(min(position, len(items)), ("model", model))
    body = "{" + sep + ("," + sep).join(
        f"{json.dumps(k, ensure_ascii=False)}{sep}:{sep}{json.dumps(v, ensure_ascii=False)}"
        for k, v in items) + sep + "}"
    raw = body.encode()
    out = replace_top_level(raw, "model", new)
    assert json.loads(out) == {**dict(items), "model": new}
    old_value = json.dumps(model, ensure_ascii=False).encode()
    key = b'"model"' + sep.encode() + b":"
    start = raw.index(old_value, raw.index(key) + len(key))  # after the colon: '":"' is a value
    assert out == raw[:start] + json.dumps(new, ensure_ascii=False).encode() + \
        raw[start + len(old_value):]


@settings(max_examples=200)
@given(doc=st.dictionaries(st.text(max_size=6), json_values, max_size=5), value=json_values,
       sep=separators, bom=st.booleans())
@example(doc={}, value=None, sep="", bom=False)
@example(doc={}, value=[], sep="  \n ", bom=True)
def test_a_field_added_first_leaves_every_other_byte_as_it_was(doc, value, sep, bom):
    """`add_top_level` (a field the body does not have: the usage the gateway asks for, an
    output cap) inserts it after the opening brace and reads no further."""
    doc.pop("added", None)
    body = sep + "{" + sep + ("," + sep).join(
        f"{json.dumps(k, ensure_ascii=False)}{sep}:{sep}{json.dumps(v, ensure_ascii=False)}"
        for k, v in doc.items()) + sep + "}" + sep
    raw = (b"\xef\xbb\xbf" if bom else b"") + body.encode()
    out = add_top_level(raw, "added", value)
    assert json.loads(out) == {"added": value, **doc}
    at = raw.index(b"{") + 1
    assert out.startswith(raw[:at]) and out.endswith(raw[at:])
    # As set_top_level gives it, for a field the body does not have.
    assert set_top_level(raw, "added", value, present=False) == out


model_values = st.text(alphabet='ab"\\:{}[], ', max_size=8) | st.just("model")
tricky_values = st.recursive(
    json_values | model_values,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(
        st.sampled_from(["model", 'say "model', "m", "model\\", ""]), children, max_size=3),
    max_leaves=8)


@settings(max_examples=300)
@given(before=st.lists(st.tuples(st.text(max_size=4), tricky_values), max_size=3),
       after=st.lists(st.tuples(st.text(max_size=4), tricky_values), max_size=3),
       model=tricky_values, sep=separators, escaped=st.booleans())
@example(before=[], after=[("x", {"model": "nested"})], model="m", sep="", escaped=False)
@example(before=[], after=[('say "model', "x")], model="m", sep="", escaped=False)
@example(before=[], after=[], model='a"b\\', sep=" ", escaped=False)
def test_the_key_found_near_the_end_is_the_one_the_walk_finds(before, after, model, sep,
                                                               escaped):
    """`replace_top_level` takes `model` from the end when it can (nested `model` keys,
    strings that hold `"model"`, escaped quotes and backslashes around it, a key spelt with
    an escape, values that are not strings): always the bytes the walk would give."""
    from tollgate import body as bodies

    items = [(k, v) for k, v in [*before, ("model", model), *after]
             if k != "model" or v is model]
    if len({k for k, _ in items}) < len(items):
        return  # a key twice: refused by the parse before any splice
    def encoded(k: str) -> str:
        if k == "model" and escaped:
            return '"mod\\u0065l"'
        return json.dumps(k, ensure_ascii=False)
    raw = ("{" + sep + ("," + sep).join(
        f"{encoded(k)}{sep}:{sep}{json.dumps(v, ensure_ascii=False)}" for k, v in items)
        + sep + "}").encode()
    assert bodies.replace_top_level(raw, "model", "new") == \
        bodies._replaced_by_walking(raw, "model", "new")


def test_a_body_with_a_byte_order_mark_can_be_spliced():
    """The parse accepts a UTF-8 byte order mark (RFC 8259 lets it), so a body that has one
    may be changed too (a model alias, the usage the gateway asks for): it was a ValueError,
    the gateway's 500. The changed body goes without the mark."""
    raw = b'\xef\xbb\xbf{"model": "alias", "stream": true}'
    assert replace_top_level(raw, "model", "real") == b'{"model": "real", "stream": true}'
    assert json.loads(set_top_level(raw, "stream_options", {}, present=False)) == {
        "model": "alias", "stream": True, "stream_options": {}}


STREAM = (b"event: message_start\r\ndata: {\"a\": 1}\r\n\r\n: keep-alive comment\n\n"
          b"data: line one\ndata: line two\n\nid: 7\nevent: ping\ndata: {}\r\r"
          b"data: [DONE]\n\n")


def events_of(chunks: list[bytes]) -> list[tuple[str, str]]:
    parser = SSEParser()
    return [(e.event, e.data) for c in chunks for e in parser.feed(c)]


@given(cuts=st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=12))
def test_sse_events_survive_any_split(cuts):
    points = sorted(set(cuts))
    chunks = [STREAM[a:b] for a, b in zip([0, *points], [*points, len(STREAM)], strict=True)]
    assert events_of(chunks) == [("message_start", '{"a": 1}'),
                                 ("message", "line one\nline two"), ("ping", "{}"),
                                 ("message", "[DONE]")]


# Scalars, flow and block collections, comments, and the characters YAML parsers disagree on.
_yaml_scalar = st.lists(st.sampled_from(
    [*"0123456789abefnotxyTFN+-._:~ '\"eE!&*<=[]{},#%@`|>?", "\n", "\n  ", "\n- ", ": ",
     "- ", "\\", "\r\n", "\u00e9", "\ufeff", "\x85", "\u2028"]), max_size=10).map("".join)


@pytest.mark.filterwarnings("ignore::ruamel.yaml.error.ReusedAnchorWarning")
@settings(max_examples=400)
@given(values=st.lists(_yaml_scalar, min_size=1, max_size=4))
def test_the_fast_config_reader_reads_what_the_round_trip_parser_reads(tmp_path_factory,
                                                                        values):
    """Whatever the document, `read_data` gives the round-trip parser's data or its error."""
    from tollgate.cli.common import plain
    from tollgate.config.fastyaml import read_data
    from tollgate.config.load import read_yaml
    from tollgate.config.problems import ConfigError

    text = "".join(f"k{i}: {v}\n" for i, v in enumerate(values)) + f"l: [{', '.join(values)}]\n"
    path = tmp_path_factory.mktemp("yaml") / "doc.yaml"
    path.write_text(text)

    def read(reader):
        try:
            return repr(plain(reader(path)))
        except ConfigError as e:
            return str(e)

    slow = read(read_yaml)
    # The round-trip parser's comment handling fails on some valid documents (`k: #\n  0`),
    # which the fast reader reads; edits of such a file are refused with that failure.
    assume("NotImplementedError: overlap in comment" not in slow)
    assert read(read_data) == slow
