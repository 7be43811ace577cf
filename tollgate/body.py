"""Request body parsing: one JSON decode, then the few fields governance needs, type-checked."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import jiter

from tollgate.errors import GatewayError
from tollgate.fastjson import encoded
from tollgate.routes import Route
from tollgate.usage import service_tier

# Providers allow 64 (OpenAI) or 128 (Anthropic) characters; more is never a real tool.
MAX_TOOL_NAME = 256


@dataclass(frozen=True)
class ParsedBody:
    doc: dict[str, Any]
    model: str | None
    tools: list[str]  # declared tool names
    stream: bool


def _bad(message: str, param: str | None = None) -> GatewayError:
    return GatewayError("invalid_request", message, param=param)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc = dict(pairs)
    if len(doc) != len(pairs):
        names = [k for k, _ in pairs]
        name = next(k for i, k in enumerate(names) if k in names[:i])
        raise _bad(f"Request body has the key {name!r} more than once; providers and the "
                   "gateway could read different values.", name)
    return doc


def check_content_type(value: str | None) -> None:
    """A body sent as something other than JSON is refused (absent is taken as JSON)."""
    if value is None:
        return
    media = value.split(";", 1)[0].strip().lower()
    if media != "application/json" and not (media.startswith("application/")
                                            and media.endswith("+json")):
        raise _bad(f"Content-Type {media!r} is not JSON: send `Content-Type: "
                   "application/json`.")


def check_content_encoding(value: str | None) -> None:
    """A body sent encoded (gzip, br...) is refused: the gateway reads the bytes it forwards,
    and a provider that decoded them would read a request the gateway never checked."""
    if value is None:
        return
    codings = [c.strip().lower() for c in value.split(",") if c.strip()]
    if any(c != "identity" for c in codings):
        raise _bad(f"Content-Encoding {value.strip()!r} is not accepted: the gateway reads "
                   "each request it forwards, so send the body uncompressed (no "
                   "Content-Encoding, or `identity`).")


def read_json(raw: bytes) -> Any:
    """The body's JSON, no key twice in one object. jiter (Rust) reads it, refusing such a
    key itself, two to six times as fast as the standard library with a Python hook per
    object (a request with forty tools: 100 against 200 us). What jiter refuses (a key
    twice, UTF-16, a lone surrogate, nesting past 200 levels) the standard library reads
    again, and its verdict stands: the gateway accepts what it accepted before, and says
    why it refuses in its own words."""
    try:
        return jiter.from_json(raw, catch_duplicate_keys=True, cache_mode="keys")
    except ValueError:
        return json.loads(raw, object_pairs_hook=_no_duplicates)


def parse(route: Route, raw: bytes) -> ParsedBody:
    try:
        doc = read_json(raw)
    except GatewayError:
        raise
    except RecursionError:
        raise _bad("Request body is nested too deeply.") from None
    except ValueError as e:  # JSONDecodeError, bad UTF-8, oversized integers
        raise _bad(f"Request body is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise _bad(f"Request body must be a JSON object, not {type(doc).__name__}.")
    model = doc.get("model")
    if route.needs_model and model is None:
        raise _bad("`model` is required.", "model")
    if model is not None and (not isinstance(model, str) or not model.strip()):
        raise _bad("`model` must be a non-empty string.", "model")
    stream = doc.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise _bad("`stream` must be a boolean.", "stream")
    _check_shape(route, doc)
    return ParsedBody(doc=doc, model=model, tools=tool_names(route, doc), stream=bool(stream))


def _check_shape(route: Route, doc: dict[str, Any]) -> None:
    if route.name in ("chat_completions", "messages", "count_tokens"):
        messages = doc.get("messages")
        if not isinstance(messages, list):
            raise _bad("`messages` must be an array.", "messages")
    if route.name in ("messages",) and "max_tokens" in doc:
        mt = doc["max_tokens"]
        if not isinstance(mt, int) or isinstance(mt, bool) or mt < 1:
            raise _bad("`max_tokens` must be a positive integer.", "max_tokens")
    if route.name == "chat_completions":
        for field in ("max_tokens", "max_completion_tokens", "n"):
            v = doc.get(field)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise _bad(f"`{field}` must be a positive integer.", field)
    if route.name == "embeddings" and "input" not in doc:
        raise _bad("`input` is required.", "input")
    if route.name == "responses" and doc.get("background") not in (None, False):
        # The provider answers `queued` and generates afterwards, for a poll the gateway
        # does not serve: that output would be spent past every budget and never metered.
        raise _bad("Background responses (`background: true`) are not served: their output "
                   "is generated after the answer, where the gateway cannot meter or charge "
                   "it. Stream a long response instead (`stream: true`).", "background")


# Where each route's request sets its output cap, the preferred field first.
OUTPUT_CAP_FIELDS = {"chat_completions": ("max_completion_tokens", "max_tokens"),
                     "responses": ("max_output_tokens",), "messages": ("max_tokens",)}


def output_cap(route: Route, doc: dict[str, Any]) -> int | None:
    """The most output tokens the request allows itself; None when it sets no cap (it may
    then cost its model's ceiling). Embeddings write none."""
    if route.name == "embeddings":
        return 0
    for name in OUTPUT_CAP_FIELDS.get(route.name, ()):
        value = doc.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def choices(route: Route, doc: dict[str, Any]) -> int:
    """How many completions the request asks for, each as long as its cap allows: chat's
    `n` (checked by `parse`), else one."""
    n = doc.get("n") if route.name == "chat_completions" else None
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 1 else 1


def requested_tier(doc: dict[str, Any]) -> str | None:
    """The service tier a request asks for (`standard` for the standard one), or None when
    it lets the provider choose: no `service_tier`, or `auto` (the account's default tier,
    which may be priority)."""
    value = doc.get("service_tier", doc.get("serviceTier"))
    if isinstance(value, dict):  # Bedrock Converse: {"type": "flex"}
        value = value.get("type")
    if not isinstance(value, str) or value.strip().lower() == "auto":
        return None
    return service_tier(value) or "standard"


# Content parts whose bytes the provider fetches itself when they name a URL or a file.
_FETCHED_PARTS = {"image_url", "input_image", "input_file", "file", "image", "document"}
# Tools the provider runs itself (OpenAI's and Anthropic's type names, Anthropic's dated):
# what they find (search results, pages, file chunks, an MCP server's answers, code output)
# is read into the model's next turn and billed as input.
_SERVER_TOOLS = ("web_search", "web_fetch", "file_search", "mcp", "code_interpreter",
                 "code_execution")


def unseen_input(doc: dict[str, Any]) -> str | None:
    """What in the request refers to input the gateway cannot see, and so cannot price (the
    first found), or None: a Responses `previous_response_id`, `conversation` or stored
    `prompt` (a template the provider fills in), a tool the provider runs itself (web search
    and fetch, file search, MCP servers, code execution), an item reference, a file id, or a
    URL (not a data: URI) in an image, file or document part."""
    for name in ("previous_response_id", "conversation"):
        if doc.get(name):
            return name
    prompt = doc.get("prompt")
    if isinstance(prompt, dict) and prompt.get("id"):
        return "a stored prompt"
    tools = doc.get("tools")
    for tool in tools if type(tools) is list else ():
        kind = tool.get("type") if type(tool) is dict else None
        if type(kind) is str and kind.startswith(_SERVER_TOOLS):
            return f"the {kind} tool"
    if doc.get("mcp_servers"):  # Anthropic's MCP connector
        return "MCP servers"
    if doc.get("web_search_options") is not None:  # Chat Completions' search models
        return "web_search_options"
    # Every object and array under them, however deep (the parse bounded nesting). An agent's
    # history runs to hundreds of messages: the walk visits each node once, builds nothing
    # for the strings it passes, and checks exact types (the parse makes plain dicts and
    # lists; `isinstance` made the walk half again as slow).
    stack: list[Any] = [doc.get("messages"), doc.get("input"), doc.get("system")]
    pop, push, extend = stack.pop, stack.append, stack.extend
    while stack:
        node = pop()
        if type(node) is dict:
            if node.get("file_id"):
                return "a file id"
            kind = node.get("type")
            if kind == "item_reference":  # an item of an earlier response, by id
                return "an item reference"
            if type(kind) is str and kind in _FETCHED_PARTS:  # (not a list: unhashable)
                for value in (node.get("image_url"), node.get("file_url"), node.get("url"),
                              node.get("source")):
                    url = value.get("url") if isinstance(value, dict) else value
                    if isinstance(url, str) and not url.startswith("data:"):
                        return f"a {kind} URL"
                    if isinstance(value, dict) and value.get("file_id"):
                        return "a file id"
            for value in node.values():
                if type(value) is dict or type(value) is list:
                    push(value)
        elif type(node) is list:
            extend(node)
    return None


def web_searches(route: Route, doc: dict[str, Any]) -> int:
    """The most web searches the request's tools allow, each billed on top of its tokens:
    Anthropic's `max_uses` on each search tool, a Responses request's `max_tool_calls`. A
    search tool without a bound has none: such a request already counts as input the
    gateway cannot see (`unseen_input`)."""
    tools = doc.get("tools")
    if type(tools) is not list:
        return 0
    searching = [t for t in tools if type(t) is dict and type(t.get("type")) is str
                 and t["type"].startswith("web_search")]
    if route.name == "messages":
        return sum(t["max_uses"] for t in searching
                   if type(t.get("max_uses")) is int and t["max_uses"] > 0)
    bound = doc.get("max_tool_calls")
    if route.name == "responses" and searching and type(bound) is int and bound > 0:
        return bound
    return 0


def output_cap_field(route: Route, doc: dict[str, Any]) -> str | None:
    """The field a cap on this request's output goes in: the one the client used, else its
    API's own (`max_completion_tokens`, `max_output_tokens`, `max_tokens`)."""
    names = OUTPUT_CAP_FIELDS.get(route.name, ())
    return next((n for n in names if n in doc), names[0] if names else None)


def tool_names(route: Route, doc: dict[str, Any]) -> list[str]:
    """Names of the tools a request declares, per API shape.

    Chat completions: tools[].function.name (custom tools: tools[].custom.name) and the legacy
    functions[].name. Responses: tools[].name, or the tool type for built-in tools
    (web_search, code_interpreter, ...). Anthropic messages: tools[].name.
    """
    names: list[str] = []
    tools = doc.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise _bad("`tools` must be an array.", "tools")
        for i, tool in enumerate(tools):
            names.append(_tool_name(route, tool, i))
    if route.name == "chat_completions" and doc.get("functions") is not None:
        functions = doc["functions"]
        if not isinstance(functions, list):
            raise _bad("`functions` must be an array.", "functions")
        for i, fn in enumerate(functions):
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise _bad("Each function needs a string `name`.", f"functions[{i}].name")
            names.append(fn["name"])
    for name in names:
        if len(name) > MAX_TOOL_NAME:
            raise _bad(f"Tool name of {len(name)} characters: tool names are at most "
                       f"{MAX_TOOL_NAME}.", "tools")
    return names


def _tool_name(route: Route, tool: Any, i: int) -> str:
    if not isinstance(tool, dict):
        raise _bad("Each tool must be an object.", f"tools[{i}]")
    if route.name == "chat_completions":
        kind = tool.get("type", "function")
        inner = tool.get(kind) if isinstance(kind, str) else None
        if not isinstance(inner, dict) or not isinstance(inner.get("name"), str):
            raise _bad(f"tools[{i}] needs a string `{kind}.name`.", f"tools[{i}].{kind}.name")
        return inner["name"]
    name = tool.get("name")
    if name is None and route.name == "responses" and isinstance(tool.get("type"), str):
        return tool["type"]
    if not isinstance(name, str):
        raise _bad(f"tools[{i}] needs a string `name`.", f"tools[{i}].name")
    return name


_decoder = json.JSONDecoder()
_WS = " \t\n\r"


def replace_top_level(raw: bytes, key: str, value: Any) -> bytes:
    """`raw` with one top-level field's value replaced, every other byte left as it was
    (but a byte order mark, which the parse accepts and providers need not).

    Used when a rule must change the body (a model alias, each attempt of a fallback plan
    to another model): the client's formatting, key order and unknown fields all reach the
    provider untouched.
    """
    near_the_end = _replaced_near_the_end(raw, key, value)
    return near_the_end if near_the_end is not None else _replaced_by_walking(raw, key, value)


def _replaced_by_walking(raw: bytes, key: str, value: Any) -> bytes:
    """Every top-level field decoded in turn, up to `key`'s (KeyError: it has none)."""
    text = raw.decode("utf-8-sig")
    i = _skip(text, 0)
    if text[i] != "{":
        raise ValueError("not a JSON object")
    i = _skip(text, i + 1)
    while text[i] != "}":
        name, i = json.decoder.scanstring(text, i + 1)  # type: ignore[attr-defined]
        i = _skip(text, i)
        i = _skip(text, i + 1)  # past ':'
        _, end = _decoder.raw_decode(text, i)
        if name == key:
            return b"".join((text[:i].encode(), encoded(value), text[end:].encode()))
        i = _skip(text, end)
        if text[i] == ",":
            i = _skip(text, i + 1)
    raise KeyError(key)


_BOM = b"\xef\xbb\xbf"
_TO_A_STRING = re.compile(rb"[ \t\n\r]*:[ \t\n\r]*\"")  # a key's colon, its string value
_CANDIDATES = 8
_FIRST_KEY = re.compile(rb"[ \t\n\r]*{[ \t\n\r]*")  # up to the object's first key


def _replaced_near_the_end(raw: bytes, key: str, value: Any) -> bytes | None:
    """The SDKs write `model` after the history it is for, which the walk decoded whole to
    get past. The key is looked for as the object's first, then as its last few occurrences
    as a string, from the end; one is taken when it is a key whose value is a string and
    (but for the first key) what follows it reads as the rest of an object: one nested
    deeper leaves its enclosing brackets over, and is no JSON then. None: none was (the
    walk decides)."""
    if raw.startswith(_BOM):
        return None
    token, first = json.dumps(key).encode(), _FIRST_KEY.match(raw)
    if first is not None and raw.startswith(token, first.end()):
        return _replaced_at(raw, first.end(), token, value, proven=True)
    end = len(raw)
    for _ in range(_CANDIDATES):
        at = raw.rfind(token, 0, end)
        if at < 0:
            return None
        end = at
        replaced = _replaced_at(raw, at, token, value, proven=False)
        if replaced is not None:
            return replaced
    return None


def _replaced_at(raw: bytes, at: int, token: bytes, value: Any, proven: bool) -> bytes | None:
    """`raw` with the string value of the key `token` at `at` replaced; None when it is no
    key with a string value, or (not `proven`) no key of the top-level object."""
    colon = _TO_A_STRING.match(raw, at + len(token))
    if colon is None or _escaped(raw, at):
        return None
    closing = colon.end()
    while (closing := raw.find(b'"', closing)) >= 0 and _escaped(raw, closing):
        closing += 1
    if closing < 0:
        return None
    if not proven:
        try:
            jiter.from_json(b"{" + raw[at:])
        except ValueError:
            return None
    with memoryview(raw) as view:  # one copy of the body: a second paged a MiB in
        return b"".join((view[:colon.end() - 1], encoded(value), view[closing + 1:]))


def _escaped(raw: bytes, at: int) -> bool:
    """Whether the byte at `at` follows an odd run of backslashes (in a string: escaped)."""
    run = at
    while run > 0 and raw[run - 1] == 0x5C:
        run -= 1
    return (at - run) % 2 == 1


def set_top_level(raw: bytes, key: str, value: Any, present: bool) -> bytes:
    """`raw` with a top-level field set: replaced where it is, or (not `present`, as the
    parsed document says) added first. Neither reads more of the body than it must."""
    return replace_top_level(raw, key, value) if present else add_top_level(raw, key, value)


# An object's opening brace (after a byte order mark, if any) and, when it is empty, its end.
_OPENING = re.compile(rb"(?:\xef\xbb\xbf)?[ \t\n\r]*({)[ \t\n\r]*(})?")


def add_top_level(raw: bytes, key: str, value: Any) -> bytes:
    """`raw` (an object without `key`) with the field added first, every other byte left as
    it was. Nothing past the opening brace is read: an agent's history of 1 MiB was decoded
    again to find the object's end."""
    opening = _OPENING.match(raw)
    if opening is None:
        raise ValueError("not a JSON object")
    at = opening.end(1)
    field = (encoded(key), b":", encoded(value), b"" if opening.group(2) else b",")
    with memoryview(raw) as view:  # one copy of the body, not two
        return b"".join((view[:at], *field, view[at:]))


def wants_usage_chunk(route: Route, doc: dict[str, Any]) -> bool:
    """A streamed chat completion that did not ask for its usage: the gateway asks for it
    (so the stream can be metered exactly) and hides that extra chunk from the client."""
    if route.name != "chat_completions" or doc.get("stream") is not True:
        return False
    options = doc.get("stream_options")
    return not (isinstance(options, dict) and options.get("include_usage") is True)


def _skip(text: str, i: int) -> int:
    while text[i] in _WS:
        i += 1
    return i
