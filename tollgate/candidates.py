"""What a request asks the provider to reach, for the key's MCP and URL rules: the MCP servers
(and the tools of theirs it may call) and every URL the provider would fetch for it.

Read from each API family's own shapes; entries that are not of the documented shape are
left to the provider, which refuses them (nothing here can make a URL disappear from the
rules' sight: a URL in an unknown place is caught only by `urls.anywhere`)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import re2

# Every http(s) URL in a text, for `urls.anywhere` (the seed's rule): up to a character that
# cannot be in one, or a JSON string's closing quote or escape.
_ANY_URL = re2.compile(r"https?://[^\s\"'<>\\]+")


@dataclass
class McpServer:
    """An MCP server a request names: its label and URL (either may be absent), and the
    tools of it the request lets the model call (None: all of them)."""

    label: str | None
    url: str | None
    tools: list[str] | None
    where: str  # the request field, for messages

    def candidates(self) -> list[str]:
        name = self.label or self.url or "?"
        return [c for c in (self.label, self.url) if c] + \
            [f"{name}/{t}" for t in self.tools or []]


@dataclass
class Candidates:
    mcp: list[McpServer] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)


def _dicts(value: Any) -> Iterator[dict[str, Any]]:
    if isinstance(value, list):
        yield from (v for v in value if isinstance(v, dict))


def _tool_names(allowed: Any) -> list[str] | None:
    """`allowed_tools` as the APIs take it: a list of names, or {tool_names: [...]}."""
    if isinstance(allowed, dict):
        allowed = allowed.get("tool_names")
    if isinstance(allowed, list):
        return [t for t in allowed if isinstance(t, str)]
    return None


def mcp_servers(doc: dict[str, Any]) -> list[McpServer]:
    servers = []
    # Anthropic Messages (the MCP connector beta).
    for i, s in enumerate(_dicts(doc.get("mcp_servers"))):
        config = s.get("tool_configuration") if isinstance(s.get("tool_configuration"),
                                                            dict) else {}
        servers.append(McpServer(_str(s.get("name")), _str(s.get("url")),
                                 _tool_names(config.get("allowed_tools")),
                                 f"mcp_servers[{i}]"))
    # OpenAI Responses: remote MCP servers as tools.
    for i, t in enumerate(_dicts(doc.get("tools"))):
        if t.get("type") == "mcp":
            servers.append(McpServer(_str(t.get("server_label")), _str(t.get("server_url")),
                                     _tool_names(t.get("allowed_tools")), f"tools[{i}]"))
    # The seed's top-level lists: names, or objects with a name and URL.
    for field_name in ("mcp", "mcps"):
        for i, s in enumerate(doc.get(field_name) or [] if isinstance(
                doc.get(field_name), list) else []):
            where = f"{field_name}[{i}]"
            if isinstance(s, str):
                servers.append(McpServer(s, None, None, where))
            elif isinstance(s, dict):
                servers.append(McpServer(_str(s.get("name") or s.get("server_label")),
                                         _str(s.get("url") or s.get("server_url")),
                                         _tool_names(s.get("allowed_tools")), where))
    return servers


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _fetched(url: Any) -> Iterator[str]:
    """A URL the provider fetches (data: URLs are the content itself)."""
    if isinstance(url, str) and url and not url.startswith("data:"):
        yield url


def _content_urls(content: Any) -> Iterator[str]:
    """Image, file and document URLs in a message's content parts, in any family's shape."""
    for part in _dicts(content):
        kind = part.get("type")
        if kind == "image_url":  # OpenAI chat
            image = part.get("image_url")
            yield from _fetched(image.get("url") if isinstance(image, dict) else image)
        elif kind == "input_image":  # Responses
            yield from _fetched(part.get("image_url"))
        elif kind == "input_file":
            yield from _fetched(part.get("file_url"))
        elif kind in ("image", "document"):  # Anthropic
            source = part.get("source")
            if isinstance(source, dict) and source.get("type") == "url":
                yield from _fetched(source.get("url"))
        elif kind == "tool_result":  # Anthropic: results carry content blocks too
            yield from _content_urls(part.get("content"))


# Built-in tools that fetch the web, by family: their domain lists are candidates.
WEB_TOOLS = ("web_search", "web_fetch", "web_search_preview")


def _domain(value: str) -> str:
    """A domain as sent (`example.com`, `docs.example.com/path`) as a URL the rules match."""
    return value if "://" in value else f"https://{value}"


def _web_tool_urls(tool: dict[str, Any]) -> Iterator[str]:
    kind = tool.get("type")
    if not isinstance(kind, str) or not kind.startswith(WEB_TOOLS):
        return
    lists = [tool.get("allowed_domains"), tool.get("blocked_domains")]
    filters = tool.get("filters")
    if isinstance(filters, dict):  # Responses web_search
        lists += [filters.get("allowed_domains"), filters.get("blocked_domains")]
    for domains in lists:
        if isinstance(domains, list):
            yield from (_domain(d) for d in domains if isinstance(d, str) and d)


def urls(doc: dict[str, Any], servers: list[McpServer]) -> list[str]:
    found: list[str] = []
    for message in _dicts(doc.get("messages")):
        found += _content_urls(message.get("content"))
    inputs = doc.get("input")
    for item in _dicts(inputs):
        found += _content_urls(item.get("content"))
        found += _content_urls([item])  # an input item may itself be a content part
    for tool in _dicts(doc.get("tools")):
        found += _web_tool_urls(tool)
    found += [s.url for s in servers if s.url]
    return list(dict.fromkeys(found))


def anywhere(raw: bytes) -> list[str]:
    """Every http(s) URL anywhere in the body (the seed's behaviour, `urls.anywhere`)."""
    text = raw.decode("utf-8", errors="replace")
    return list(dict.fromkeys(_ANY_URL.findall(text)))


def of(doc: dict[str, Any], raw: bytes = b"", anywhere_too: bool = False) -> Candidates:
    """What the request `doc` reaches; with `anywhere_too`, every URL in its bytes `raw` as
    well (`urls.anywhere`)."""
    servers = mcp_servers(doc)
    found = urls(doc, servers)
    if anywhere_too:
        found += anywhere(raw)
    return Candidates(mcp=servers, urls=found)
