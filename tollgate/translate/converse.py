"""OpenAI chat completions <-> Bedrock's Converse API, both ways: requests (system, turns,
images, tools and their results, tool choice, inference settings), JSON responses and
ConverseStream events (decoded from event-stream frames into named SSE events by
`tollgate.eventstream`). Anthropic clients reach Converse through OpenAI's shape."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from tollgate.sse import Event
from tollgate.translate.requests import _text_of, add_turn, function_tools, sampling, tool_call
from tollgate.translate.responses import ToOpenAIChunks, _data

_STOP = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length",
         "tool_use": "tool_calls", "guardrail_intervened": "content_filter",
         "content_filtered": "content_filter"}


def _content(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"text": content}] if content else []
    blocks: list[dict[str, Any]] = []
    for part in content or []:
        if not isinstance(part, dict):
            continue
        if part.get("type") == "text":
            blocks.append({"text": part.get("text", "")})
        elif part.get("type") == "image_url":
            url = (part.get("image_url") or {}).get("url", "")
            if url.startswith("data:image/") and ";base64," in url:
                mime, data = url[5:].split(";base64,", 1)
                blocks.append({"image": {"format": mime.split("/", 1)[1],
                                         "source": {"bytes": data}}})
    return blocks


def openai_to_converse(doc: dict[str, Any]) -> dict[str, Any]:
    """A chat-completions request as a Converse request (the model is in the URL)."""
    system: list[dict[str, Any]] = []
    messages: list[dict[str, Any]] = []
    for message in doc.get("messages") or []:
        role = message.get("role")
        if role in ("system", "developer"):
            system.append({"text": _text_of(message.get("content"))})
        elif role == "user":
            add_turn(messages, "user", "content", _content(message.get("content")))
        elif role == "assistant":
            blocks = _content(message.get("content"))
            for call in message.get("tool_calls") or []:
                call_id, name, args = tool_call(call)
                blocks.append({"toolUse": {"toolUseId": call_id, "name": name, "input": args}})
            add_turn(messages, "assistant", "content", blocks)
        elif role == "tool":
            add_turn(messages, "user", "content", [{"toolResult": {
                "toolUseId": message.get("tool_call_id", ""),
                "content": [{"text": _text_of(message.get("content"))}]}}])
    out: dict[str, Any] = {"messages": messages}
    if system:
        out["system"] = system
    inference = sampling(doc, "maxTokens")
    if inference:
        out["inferenceConfig"] = inference
    tools = function_tools(doc)
    choice = doc.get("tool_choice")
    if tools and choice != "none":
        config: dict[str, Any] = {"tools": [{"toolSpec": {
            "name": t.get("name", ""), **({"description": t["description"]}
                                          if t.get("description") else {}),
            "inputSchema": {"json": t.get("parameters") or {"type": "object"}}}}
            for t in tools]}
        if choice == "required":
            config["toolChoice"] = {"any": {}}
        elif isinstance(choice, dict) and choice.get("type") == "function":
            config["toolChoice"] = {"tool": {"name": (choice.get("function") or {}).get(
                "name", "")}}
        out["toolConfig"] = config
    return out


def usage_of(usage: Any) -> dict[str, Any]:
    """Converse's `usage` as OpenAI's."""
    usage = usage if isinstance(usage, dict) else {}
    cached = int(usage.get("cacheReadInputTokens") or 0)
    prompt = int(usage.get("inputTokens") or 0) + cached
    completion = int(usage.get("outputTokens") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def converse_json_to_openai(doc: dict[str, Any], model: str) -> dict[str, Any]:
    blocks = ((doc.get("output") or {}).get("message") or {}).get("content") or []
    text = "".join(b.get("text", "") for b in blocks if isinstance(b, dict))
    calls = [{"id": b["toolUse"].get("toolUseId", ""), "type": "function",
              "function": {"name": b["toolUse"].get("name", ""),
                           "arguments": json.dumps(b["toolUse"].get("input") or {})}}
             for b in blocks if isinstance(b, dict) and "toolUse" in b]
    message: dict[str, Any] = {"role": "assistant", "content": text or None}
    if calls:
        message["tool_calls"] = calls
    return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion",
            "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": _STOP.get(doc.get("stopReason", ""), "stop")}],
            "usage": usage_of(doc.get("usage"))}


class ConverseToOpenAIStream(ToOpenAIChunks):
    """ConverseStream events (messageStart, contentBlockStart/Delta/Stop, messageStop,
    metadata with the usage) as chat-completion chunks."""

    def __init__(self, model: str, include_usage: bool):
        super().__init__(model, include_usage)
        self.tools: dict[int, int] = {}  # content block index -> tool call index

    def on_event(self, event: Event) -> bytes:
        try:
            doc = json.loads(event.data)
        except ValueError:
            return b""
        kind = event.event
        if kind == "messageStart":
            return self._chunk({"role": "assistant", "content": ""})
        if kind == "contentBlockStart":
            use = ((doc.get("start") or {}).get("toolUse")) or {}
            index = self.tools.setdefault(int(doc.get("contentBlockIndex") or 0),
                                          len(self.tools))
            return self._chunk({"tool_calls": [{"index": index, "id": use.get("toolUseId", ""),
                                                "type": "function", "function": {
                                                    "name": use.get("name", ""),
                                                    "arguments": ""}}]})
        if kind == "contentBlockDelta":
            delta = doc.get("delta") or {}
            if "text" in delta:
                return self._chunk({"content": delta["text"]})
            if "toolUse" in delta:
                index = self.tools.get(int(doc.get("contentBlockIndex") or 0), 0)
                return self._chunk({"tool_calls": [{"index": index, "function": {
                    "arguments": (delta["toolUse"] or {}).get("input", "")}}]})
            return b""
        if kind == "messageStop":
            return self._chunk({}, _STOP.get(doc.get("stopReason", ""), "stop"))
        if kind == "metadata":
            return self._end(usage_of(doc.get("usage")))
        if kind == "error":  # an exception frame, as eventstream.py names it
            return _data({"error": {"message": ((doc.get("error") or {}).get("message", "")),
                                    "type": "server_error", "code": None}})
        return b""
