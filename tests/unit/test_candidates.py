"""What a request reaches, read from each API family's shapes, and the `host:` URL helper."""

from __future__ import annotations

import json

import pytest

from tollgate import candidates
from tollgate.config.schema import Rules
from tollgate.rules import RuleError, compiled, matches


def test_urls_in_every_family_and_nested_results():
    doc = {"messages": [
        {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://a.example/1.png"}},
            {"type": "image_url", "image_url": "https://a.example/legacy.png"},
            {"type": "image", "source": {"type": "base64", "data": "xx"}},
            {"type": "tool_result", "content": [
                {"type": "image", "source": {"type": "url", "url": "https://b.example/2.png"}}]},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]},
        {"role": "assistant", "content": "see https://not-fetched.example"}],
        "input": [{"role": "user", "content": [
            {"type": "input_image", "image_url": "https://c.example/3.png"},
            {"type": "input_file", "file_url": "https://c.example/4.pdf"}]}],
        "tools": [{"type": "web_fetch_20250910", "name": "web_fetch",
                   "blocked_domains": ["d.example"]},
                  {"type": "web_search", "filters": {"allowed_domains": ["e.example"]}},
                  {"type": "mcp", "server_label": "s", "server_url": "https://f.example/mcp"}]}
    found = candidates.of(doc)
    assert found.urls == ["https://a.example/1.png", "https://a.example/legacy.png",
                          "https://b.example/2.png", "https://c.example/3.png",
                          "https://c.example/4.pdf", "https://d.example", "https://e.example",
                          "https://f.example/mcp"]
    raw = json.dumps(doc).encode()
    assert "https://not-fetched.example" in candidates.anywhere(raw)


def test_mcp_servers_and_their_tools():
    doc = {"mcp_servers": [{"type": "url", "url": "https://m.example/sse", "name": "m",
                            "tool_configuration": {"allowed_tools": ["a"]}}],
           "tools": [{"type": "mcp", "server_label": "r", "server_url": "https://r.example",
                      "allowed_tools": {"tool_names": ["x", "y"]}},
                     {"type": "function", "name": "f"}],
           "mcps": ["plain", {"name": "n", "url": "https://n.example"}]}
    servers = candidates.mcp_servers(doc)
    assert [s.candidates() for s in servers] == [
        ["m", "https://m.example/sse", "m/a"], ["r", "https://r.example", "r/x", "r/y"],
        ["plain"], ["n", "https://n.example"]]
    assert [s.tools for s in servers][2:] == [None, None]  # no list: every tool
    assert [s.where for s in servers] == ["mcp_servers[0]", "tools[0]", "mcps[0]", "mcps[1]"]


@pytest.mark.parametrize(("url", "host", "subdomains"), [
    ("https://example.com", True, False),
    ("https://example.com/a?b", True, False),
    ("http://api.example.com:8443/x", True, True),
    ("wss://user:pw@ws.example.com/", True, True),
    ("HTTPS://Example.COM/", True, False),
    ("https://example.com.evil.net/", False, False),
    ("https://evil.net/?to=https://example.com", False, False),
    ("https://notexample.com/", False, False),
])
def test_host_helper(url, host, subdomains):
    assert matches("host:example.com", url) is host
    assert matches("host:*.example.com", url) is subdomains


def test_bad_host_rules_are_config_errors():
    for bad in ("host:", "host:example.com/path", "host:*", "host:a b"):
        with pytest.raises(RuleError, match=r"host:example\.com"):
            compiled(bad)
    with pytest.raises(ValueError, match="invalid host rule"):
        Rules(deny=["host:exa mple.com"])
