"""An item added to a config section (`create` commands): its lines inserted after the
section's last item, the rest of the file kept byte for byte, or, where the file is laid out
otherwise, the round-trip edit; the file reads as the config with the item appended either
way."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from tollgate.config.edit import AlreadyThere, _spliced, append_item
from tollgate.config.fastyaml import parse
from tollgate.config.problems import ConfigError

NEW = {"id": "mp_new", "type": "openai", "scope": "ORG:acme",
       "base_url": "http://127.0.0.1:9", "api_key_env": "NEW_KEY", "fallback_priority": 3}
LAST = """  - id: mp_anthropic_org
    type: anthropic
    scope: ORG:acme
    base_url: https://api.anthropic.com
    api_key_env: ANTHROPIC_API_KEY
    fallback_priority: 2
"""
INSERTED = ("  - id: mp_new\n    type: openai\n    scope: ORG:acme\n"
            "    base_url: http://127.0.0.1:9\n    api_key_env: NEW_KEY\n"
            "    fallback_priority: 3\n")


def config(config_dir: Path, last: str = LAST, rest: bool = True) -> Path:
    """The shipped example (a comment of characters past ASCII ahead) with the model
    providers' last item written `last`, and (`rest`) the sections after them."""
    path = config_dir / "gateway.yaml"
    head, tail = path.read_text().split(LAST)
    path.write_text("# The gateway's — é€\n" + head + last + (tail if rest else ""))
    return path


def appended(before: str, section: str = "model_providers") -> dict:
    data = parse(before)
    return {**data, section: [*data[section], NEW]}


@pytest.mark.parametrize(("last", "ending"), [
    (LAST, "priority: 2\n"),
    (LAST.replace("priority: 2\n", "priority: 2  # the backup\n"), "# the backup\n"),
    (LAST + "    # fallback_priority: 1 (not until its quota is raised)\n", "priority: 2\n"),
    (LAST.replace("base_url: https://api.anthropic.com\n",
                  "base_url: 'https://api.anthropic.com'\n").replace(
        "fallback_priority: 2\n", "rate_limit: {rpm: 50}\n"), "{rpm: 50}\n"),
], ids=["plain", "trailing-comment", "comment-line", "flow-last"])
def test_an_item_is_inserted_after_the_last_and_nothing_else_moves(config_dir, last, ending):
    path = config(config_dir, last)
    before = path.read_text()
    doc = append_item(path, "model_providers", NEW)
    after = path.read_text()
    assert doc.doc is None and doc.after is not None  # inserted, no round trip
    cut = before.index(ending, before.index(last)) + len(ending)
    assert after == before[:cut] + INSERTED + before[cut:]
    assert parse(after) == appended(before)


def test_a_file_without_a_last_line_break_gets_the_item_on_lines_of_its_own(config_dir):
    path = config(config_dir, LAST.rstrip("\n"), rest=False)
    before = path.read_text()
    assert append_item(path, "model_providers", NEW).doc is None
    after = path.read_text()
    assert after == before + "\n" + INSERTED
    assert parse(after) == appended(before)


def unindented(text: str) -> str:
    """The model providers at the column of their section's name."""
    head, rest = text.split("model_providers:\n")
    section, tail = rest.split("\n\n", 1)
    return f"{head}model_providers:\n{textwrap.dedent(section)}\n\n{tail}"


@pytest.mark.parametrize("layout", [
    unindented,
    # A block scalar last: its marks reach into the lines after it.
    lambda text: text.replace("    api_key_env: ANTHROPIC_API_KEY\n    fallback_priority: 2\n",
                              "    fallback_priority: 2\n    api_key_env: >-\n"
                              "      ANTHROPIC_API_KEY\n"),
    lambda text: text.replace("\n", "\r\n"),  # line breaks of another system
], ids=["unindented", "block-scalar-last", "crlf"])
def test_a_file_laid_out_otherwise_is_edited_the_round_trip_way(config_dir, layout):
    path = config(config_dir)
    plain = path.read_text()
    laid_out = layout(plain)
    assert laid_out != plain and parse(laid_out.replace("\r\n", "\n")) == parse(plain)
    path.write_bytes(laid_out.encode())
    doc = append_item(path, "model_providers", NEW)
    assert doc.doc is not None  # the round-trip parser's edit
    assert parse(path.read_bytes().decode().replace("\r\n", "\n")) == appended(plain)


@pytest.mark.parametrize("text", [
    "model_providers: []\nx: 1\n",  # flow style, empty
    "model_providers: [{id: a}]\nx: 1\n",  # flow style
    "x: 1\n",  # no such section
    "model_providers:\n  - id: a\n    base_url:\nx: 1\n",  # an empty value last
    "model_providers:\n  - id: a\n    base_url: &u http://h\n  - id: b\n    base_url: *u\n"
    "x: 1\n",  # an alias last: its marks are its anchor's
    "model_providers:\n  - id: a\n    note: |\n      two\n      lines\nx: 1\n",
    "model_providers:\n- id: a\nx: 1\n",
    "model_providers:\n\t- id: a\n",  # a tab: read otherwise by the two parsers
])
def test_layouts_the_insertion_does_not_take(text):
    assert _spliced(text, "model_providers", NEW) is None


def test_an_insertion_lands_after_the_last_item_before_the_next_section():
    text = "model_providers:\n  - id: a\n    base_url: http://h  # é\n\n# next\nx: 1\n"
    spliced = _spliced(text, "model_providers", {"id": "b"})
    assert spliced is not None
    assert spliced[1] == ("model_providers:\n  - id: a\n    base_url: http://h  # é\n"
                          "  - id: b\n\n# next\nx: 1\n")


def test_an_id_that_is_taken_is_refused_and_nothing_is_written(config_dir):
    path = config(config_dir)
    before = path.read_text()
    with pytest.raises(AlreadyThere):
        append_item(path, "model_providers", {**NEW, "id": "mp_anthropic_org"})
    assert path.read_text() == before


def test_an_invalid_item_is_refused_with_its_line_and_nothing_is_written(config_dir):
    path = config(config_dir)
    before = path.read_text()
    with pytest.raises(ConfigError) as e:
        append_item(path, "model_providers", {**NEW, "type": "no-such-type"})
    assert path.read_text() == before
    assert "model_providers" in str(e.value) and "type" in str(e.value)
