"""Requests across API families: OpenAI chat completions <-> Anthropic messages."""

from __future__ import annotations

import json
from typing import Any

DEFAULT_ANTHROPIC_MAX_TOKENS = 4096  # Anthropic requires max_tokens; OpenAI does not


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content
                       if isinstance(p, dict) and p.get("type") in ("text", "input_text"))
    return ""


def _image_block(url: str) -> dict[str, Any]:
    if url.startswith("data:") and ";base64," in url:
        media_type, data = url[5:].split(";base64,", 1)
        return {"type": "image", "source": {"type": "base64", "media_type": media_type,
                                            "data": data}}
    return {"type": "image", "source": {"type": "url", "url": url}}


def _user_blocks(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    blocks = []
    for part in content or []:
        if not isinstance(part, dict):
            continue
        if part.get("type") == "text":
            blocks.append({"type": "text", "text": part.get("text", "")})
        elif part.get("type") == "image_url":
            image = part.get("image_url")
            url = image.get("url", "") if isinstance(image, dict) else str(image)
            blocks.append(_image_block(url))
    return blocks


def _append(messages: list[dict[str, Any]], role: str, blocks: list[dict[str, Any]]) -> None:
    """Anthropic wants alternating roles: consecutive turns of one role are merged."""
    if not blocks:
        return
    if messages and messages[-1]["role"] == role:
        messages[-1]["content"].extend(blocks)
    else:
        messages.append({"role": role, "content": blocks})


def openai_to_anthropic(doc: dict[str, Any], model: str) -> dict[str, Any]:
    """An OpenAI chat-completions body as an Anthropic messages body."""
    system: list[str] = []
    messages: list[dict[str, Any]] = []
    for m in doc.get("messages") or []:
        role = m.get("role")
        if role in ("system", "developer"):
            system.append(_text_of(m.get("content")))
        elif role == "user":
            _append(messages, "user", _user_blocks(m.get("content")))
        elif role == "assistant":
            blocks: list[dict[str, Any]] = []
            if _text_of(m.get("content")):
                blocks.append({"type": "text", "text": _text_of(m.get("content"))})
            for call in m.get("tool_calls") or []:
                fn = call.get("function") or {}
                try:
                    arguments = json.loads(fn.get("arguments") or "{}")
                except ValueError:
                    arguments = {"_raw": fn.get("arguments")}
                blocks.append({"type": "tool_use", "id": call.get("id"),
                               "name": fn.get("name"), "input": arguments})
            _append(messages, "assistant", blocks)
        elif role == "tool":
            _append(messages, "user", [{"type": "tool_result",
                                        "tool_use_id": m.get("tool_call_id"),
                                        "content": _text_of(m.get("content"))}])
    out: dict[str, Any] = {
        "model": model,
        "max_tokens": doc.get("max_completion_tokens") or doc.get("max_tokens")
        or DEFAULT_ANTHROPIC_MAX_TOKENS,
        "messages": messages,
    }
    if system:
        out["system"] = "\n\n".join(system)
    if doc.get("stream"):
        out["stream"] = True
    if doc.get("temperature") is not None:
        out["temperature"] = min(float(doc["temperature"]), 1.0)  # Anthropic's range is 0..1
    if doc.get("top_p") is not None:
        out["top_p"] = doc["top_p"]
    stop = doc.get("stop")
    if stop:
        out["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    tools = [t.get("function") or {} for t in doc.get("tools") or []
             if isinstance(t, dict) and t.get("type", "function") == "function"]
    if tools:
        out["tools"] = [{"name": f.get("name"), "description": f.get("description", ""),
                         "input_schema": f.get("parameters") or {"type": "object"}}
                        for f in tools]
    choice = doc.get("tool_choice")
    if choice is not None and tools:
        if choice == "required":
            out["tool_choice"] = {"type": "any"}
        elif choice in ("auto", "none"):
            out["tool_choice"] = {"type": choice}
        elif isinstance(choice, dict) and (choice.get("function") or {}).get("name"):
            out["tool_choice"] = {"type": "tool", "name": choice["function"]["name"]}
        if doc.get("parallel_tool_calls") is False and choice != "none":
            out.setdefault("tool_choice", {"type": "auto"})["disable_parallel_tool_use"] = True
    if doc.get("user"):
        out["metadata"] = {"user_id": str(doc["user"])}
    return out


def _openai_content(blocks: list[dict[str, Any]]) -> Any:
    parts = []
    for b in blocks:
        if b.get("type") == "text":
            parts.append({"type": "text", "text": b.get("text", "")})
        elif b.get("type") == "image":
            src = b.get("source") or {}
            url = (f"data:{src.get('media_type')};base64,{src.get('data')}"
                   if src.get("type") == "base64" else src.get("url", ""))
            parts.append({"type": "image_url", "image_url": {"url": url}})
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def anthropic_to_openai(doc: dict[str, Any], model: str) -> dict[str, Any]:
    """An Anthropic messages body as an OpenAI chat-completions body."""
    messages: list[dict[str, Any]] = []
    system = doc.get("system")
    if system:
        messages.append({"role": "system", "content": _text_of(system)})
    for m in doc.get("messages") or []:
        content = m.get("content")
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else [
            b for b in content or [] if isinstance(b, dict)]
        if m.get("role") == "assistant":
            msg: dict[str, Any] = {"role": "assistant",
                                   "content": _openai_content(blocks) or None}
            calls = [{"id": b.get("id"), "type": "function",
                      "function": {"name": b.get("name"),
                                   "arguments": json.dumps(b.get("input") or {})}}
                     for b in blocks if b.get("type") == "tool_use"]
            if calls:
                msg["tool_calls"] = calls
            messages.append(msg)
            continue
        for b in blocks:
            if b.get("type") == "tool_result":
                messages.append({"role": "tool", "tool_call_id": b.get("tool_use_id"),
                                 "content": _text_of(b.get("content"))})
        rest = [b for b in blocks if b.get("type") != "tool_result"]
        if rest:
            messages.append({"role": "user", "content": _openai_content(rest)})
    out: dict[str, Any] = {"model": model, "messages": messages}
    if doc.get("max_tokens"):
        out["max_completion_tokens"] = doc["max_tokens"]
    if doc.get("stream"):
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    for name in ("temperature", "top_p"):
        if doc.get(name) is not None:
            out[name] = doc[name]
    if doc.get("stop_sequences"):
        out["stop"] = list(doc["stop_sequences"])
    tools = [t for t in doc.get("tools") or [] if isinstance(t, dict) and "input_schema" in t]
    if tools:
        out["tools"] = [{"type": "function", "function": {
            "name": t.get("name"), "description": t.get("description", ""),
            "parameters": t.get("input_schema")}} for t in tools]
    choice = doc.get("tool_choice")
    if isinstance(choice, dict) and tools:
        kind = choice.get("type")
        out["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}.get(kind) or (
            {"type": "function", "function": {"name": choice.get("name")}}
            if kind == "tool" else "auto")
        if choice.get("disable_parallel_tool_use"):
            out["parallel_tool_calls"] = False
    user = (doc.get("metadata") or {}).get("user_id")
    if user:
        out["user"] = user
    return out


# -- shared by the families reached from OpenAI's shape (Gemini, Converse) ----------------

def add_turn(turns: list[dict[str, Any]], role: str, key: str,
             blocks: list[dict[str, Any]]) -> None:
    """Append a turn's blocks under `key`, merged into the last turn of the same role: these
    APIs want user and model turns to alternate."""
    if not blocks:
        return
    if turns and turns[-1]["role"] == role:
        turns[-1][key].extend(blocks)
    else:
        turns.append({"role": role, key: blocks})


def tool_call(call: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """A chat-completions tool call's id, name and parsed arguments."""
    fn = call.get("function") or {}
    try:
        args = json.loads(fn.get("arguments") or "{}")
    except ValueError:
        args = {}
    return call.get("id", ""), fn.get("name", ""), args if isinstance(args, dict) else {}


def function_tools(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [t.get("function") or {} for t in doc.get("tools") or []
            if isinstance(t, dict) and t.get("type") == "function"]


def sampling(doc: dict[str, Any], max_name: str) -> dict[str, Any]:
    """max_tokens, temperature, top_p and stop under these APIs' names."""
    out: dict[str, Any] = {}
    max_tokens = doc.get("max_completion_tokens") or doc.get("max_tokens")
    for name, value in ((max_name, max_tokens), ("temperature", doc.get("temperature")),
                        ("topP", doc.get("top_p"))):
        if value is not None:
            out[name] = value
    stop = doc.get("stop")
    if stop:
        out["stopSequences"] = [stop] if isinstance(stop, str) else list(stop)
    return out
