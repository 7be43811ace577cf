"""OpenAI chat completions <-> Gemini `generateContent`, both ways: requests (system
instruction, turns, images, tools and their results, tool choice, generation settings), JSON
responses, `streamGenerateContent?alt=sse` streams event by event, and usage
(`usageMetadata`). Anthropic clients reach Gemini through OpenAI's shape (two hops)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from tollgate.sse import Event
from tollgate.translate.requests import _text_of, add_turn, function_tools, sampling, tool_call
from tollgate.translate.responses import ToOpenAIChunks, _data

_FINISH = {"STOP": "stop", "MAX_TOKENS": "length", "SAFETY": "content_filter",
           "RECITATION": "content_filter", "PROHIBITED_CONTENT": "content_filter",
           "BLOCKLIST": "content_filter", "SPII": "content_filter"}


def _parts(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"text": content}] if content else []
    parts: list[dict[str, Any]] = []
    for block in content or []:
        if not isinstance(block, dict):
            continue
        if block.get("type") == "text":
            parts.append({"text": block.get("text", "")})
        elif block.get("type") == "image_url":
            url = (block.get("image_url") or {}).get("url", "")
            if url.startswith("data:") and ";base64," in url:
                mime, data = url[5:].split(";base64,", 1)
                parts.append({"inlineData": {"mimeType": mime, "data": data}})
            else:
                parts.append({"fileData": {"fileUri": url}})
    return parts


def _tool_config(choice: Any) -> dict[str, Any] | None:
    if choice == "none":
        return {"functionCallingConfig": {"mode": "NONE"}}
    if choice == "required":
        return {"functionCallingConfig": {"mode": "ANY"}}
    if isinstance(choice, dict) and choice.get("type") == "function":
        name = (choice.get("function") or {}).get("name")
        return {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": [name]}}
    return None


def openai_to_gemini(doc: dict[str, Any]) -> dict[str, Any]:
    """A chat-completions request as a generateContent request (the model is in the URL)."""
    system: list[dict[str, Any]] = []
    contents: list[dict[str, Any]] = []
    call_names: dict[str, str] = {}
    for message in doc.get("messages") or []:
        role = message.get("role")
        if role in ("system", "developer"):
            system.append({"text": _text_of(message.get("content"))})
        elif role == "user":
            add_turn(contents, "user", "parts", _parts(message.get("content")))
        elif role == "assistant":
            parts = _parts(message.get("content"))
            for call in message.get("tool_calls") or []:
                call_id, name, args = tool_call(call)
                call_names[call_id] = name
                parts.append({"functionCall": {"name": name, "args": args}})
            add_turn(contents, "model", "parts", parts)
        elif role == "tool":
            name = call_names.get(message.get("tool_call_id", ""), "")
            add_turn(contents, "user", "parts", [{"functionResponse": {
                "name": name, "response": {"content": _text_of(message.get("content"))}}}])
    out: dict[str, Any] = {"contents": contents}
    if system:
        out["systemInstruction"] = {"parts": system}
    tools = function_tools(doc)
    if tools:
        out["tools"] = [{"functionDeclarations": [
            {k: v for k, v in (("name", t.get("name")), ("description", t.get("description")),
                               ("parameters", t.get("parameters"))) if v is not None}
            for t in tools]}]
    if (config := _tool_config(doc.get("tool_choice"))) is not None:
        out["toolConfig"] = config
    generation = sampling(doc, "maxOutputTokens")
    if generation:
        out["generationConfig"] = generation
    return out


def usage_of(meta: Any) -> dict[str, Any]:
    """Gemini's `usageMetadata` as OpenAI's `usage` (thinking counts as output, as billed)."""
    meta = meta if isinstance(meta, dict) else {}
    prompt = int(meta.get("promptTokenCount") or 0)
    thoughts = int(meta.get("thoughtsTokenCount") or 0)
    completion = int(meta.get("candidatesTokenCount") or 0) + thoughts
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": int(meta.get("cachedContentTokenCount")
                                                           or 0)},
            "completion_tokens_details": {"reasoning_tokens": thoughts}}


def _message_of(candidate: dict[str, Any], calls_from: int = 0
                ) -> tuple[str, list[dict[str, Any]]]:
    text, calls = "", []
    for part in (candidate.get("content") or {}).get("parts") or []:
        if part.get("thought"):
            continue
        if "text" in part:
            text += part["text"]
        elif "functionCall" in part:
            call = part["functionCall"]
            calls.append({"id": f"call_{calls_from + len(calls)}", "type": "function",
                          "function": {"name": call.get("name", ""),
                                       "arguments": json.dumps(call.get("args") or {})}})
    return text, calls


def _finish(candidate: dict[str, Any], calls: bool) -> str | None:
    reason = candidate.get("finishReason")
    if reason is None:
        return None
    return "tool_calls" if calls else _FINISH.get(reason, "stop")


def gemini_json_to_openai(doc: dict[str, Any], model: str) -> dict[str, Any]:
    candidate = (doc.get("candidates") or [{}])[0]
    text, calls = _message_of(candidate)
    message: dict[str, Any] = {"role": "assistant", "content": text or None}
    if calls:
        message["tool_calls"] = calls
    return {"id": f"chatcmpl-{doc.get('responseId') or uuid.uuid4().hex[:24]}",
            "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": _finish(candidate, bool(calls)) or "stop"}],
            "usage": usage_of(doc.get("usageMetadata"))}


class GeminiToOpenAIStream(ToOpenAIChunks):
    """`streamGenerateContent?alt=sse` events as chat-completion chunks; each event's
    `usageMetadata` is cumulative, so the last one gives the usage chunk."""

    def __init__(self, model: str, include_usage: bool):
        super().__init__(model, include_usage)
        self.started = False
        self.calls = 0
        self.usage: dict[str, Any] | None = None
        self.done = False

    def on_event(self, event: Event) -> bytes:
        try:
            doc = json.loads(event.data)
        except ValueError:
            return b""
        if not isinstance(doc, dict) or self.done:
            return b""
        if "error" in doc:  # an error mid-stream: said in OpenAI's shape, then the end
            self.done = True
            return _data({"error": {"message": (doc["error"] or {}).get("message", ""),
                                    "type": "server_error", "code": None}})
        out = b""
        if not self.started:
            self.started = True
            out += self._chunk({"role": "assistant", "content": ""})
        if doc.get("usageMetadata"):
            self.usage = usage_of(doc["usageMetadata"])
        candidate = (doc.get("candidates") or [{}])[0]
        text, calls = _message_of(candidate, self.calls)
        if text:
            out += self._chunk({"content": text})
        for call in calls:
            out += self._chunk({"tool_calls": [{"index": self.calls, **call}]})
            self.calls += 1
        finish = _finish(candidate, self.calls > 0)
        if finish is not None:
            self.done = True
            out += self._chunk({}, finish) + self._end(self.usage)
        return out
