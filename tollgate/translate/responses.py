"""Responses across API families, JSON and SSE. Stream translators are incremental: each
provider event becomes the client's events as it arrives, never buffered to the end."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from tollgate.fastjson import encoded
from tollgate.sse import Event, SSEParser

ANTHROPIC_TO_OPENAI_FINISH = {"end_turn": "stop", "stop_sequence": "stop",
                              "max_tokens": "length", "tool_use": "tool_calls",
                              "pause_turn": "stop", "refusal": "content_filter"}
OPENAI_TO_ANTHROPIC_STOP = {"stop": "end_turn", "length": "max_tokens",
                            "tool_calls": "tool_use", "function_call": "tool_use",
                            "content_filter": "refusal"}


def _data(doc: Any) -> bytes:
    return b"data: " + encoded(doc) + b"\n\n"


def _event(kind: str, doc: Any) -> bytes:
    return f"event: {kind}\n".encode() + _data(doc)


def _openai_usage(u: dict[str, Any]) -> dict[str, Any]:
    cached = u.get("cache_read_input_tokens") or 0
    prompt = (u.get("input_tokens") or 0) + cached + (u.get("cache_creation_input_tokens") or 0)
    completion = u.get("output_tokens") or 0
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _anthropic_usage(u: dict[str, Any]) -> dict[str, Any]:
    cached = (u.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return {"input_tokens": (u.get("prompt_tokens") or 0) - cached,
            "output_tokens": u.get("completion_tokens") or 0,
            "cache_read_input_tokens": cached, "cache_creation_input_tokens": 0}


def anthropic_json_to_openai(doc: dict[str, Any], model: str) -> dict[str, Any]:
    text, calls = "", []
    for block in doc.get("content") or []:
        if block.get("type") == "text":
            text += block.get("text", "")
        elif block.get("type") == "tool_use":
            calls.append({"id": block.get("id"), "type": "function", "function": {
                "name": block.get("name"), "arguments": json.dumps(block.get("input") or {})}})
    message: dict[str, Any] = {"role": "assistant", "content": text or None,
                               "refusal": None}
    if calls:
        message["tool_calls"] = calls
    return {
        "id": f"chatcmpl-{doc.get('id', uuid.uuid4().hex)}", "object": "chat.completion",
        "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": None,
                     "finish_reason": ANTHROPIC_TO_OPENAI_FINISH.get(
                         doc.get("stop_reason") or "", "stop")}],
        "usage": _openai_usage(doc.get("usage") or {}),
    }


def openai_json_to_anthropic(doc: dict[str, Any], model: str) -> dict[str, Any]:
    choice = (doc.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    if message.get("content"):
        content.append({"type": "text", "text": message["content"]})
    for call in message.get("tool_calls") or []:
        fn = call.get("function") or {}
        try:
            arguments = json.loads(fn.get("arguments") or "{}")
        except ValueError:
            arguments = {}
        content.append({"type": "tool_use", "id": call.get("id"), "name": fn.get("name"),
                        "input": arguments})
    return {
        "id": f"msg_{doc.get('id', uuid.uuid4().hex)}", "type": "message",
        "role": "assistant", "model": model, "content": content,
        "stop_reason": OPENAI_TO_ANTHROPIC_STOP.get(choice.get("finish_reason") or "",
                                                    "end_turn"),
        "stop_sequence": None, "usage": _anthropic_usage(doc.get("usage") or {}),
    }


def error_to(family: str, status: int, message: str) -> bytes:
    """A provider's error (its own message, read by its adapter) in the client's family."""
    if family == "anthropic":
        kind = {400: "invalid_request_error", 401: "authentication_error",
                403: "permission_error", 404: "not_found_error", 429: "rate_limit_error",
                529: "overloaded_error"}.get(status, "api_error")
        return json.dumps({"type": "error", "error": {"type": kind, "message": message}}).encode()
    kind = {400: "invalid_request_error", 401: "authentication_error", 429: "rate_limit_error",
            }.get(status, "server_error")
    return json.dumps({"error": {"message": message, "type": kind, "param": None,
                                 "code": None}}).encode()


class StreamTranslator:
    """Bytes of one family's SSE in, bytes of the other's out, event by event."""

    def __init__(self) -> None:
        self._parser = SSEParser()

    def feed(self, chunk: bytes) -> bytes:
        return b"".join(self.on_event(e) for e in self._parser.feed(chunk))

    def flush(self) -> bytes:
        """End of the provider's stream. A stream cut short stays short: the client is not
        told it completed."""
        return b""

    def on_event(self, event: Event) -> bytes:
        raise NotImplementedError


class ToOpenAIChunks(StreamTranslator):
    """A stream translated into chat-completion chunks: one id for them all, and the last
    usage chunk and `[DONE]` when the client asked for usage."""

    def __init__(self, model: str, include_usage: bool):
        super().__init__()
        self.model, self.include_usage = model, include_usage
        self.id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        return _data({"id": self.id, "object": "chat.completion.chunk",
                      "created": self.created, "model": self.model,
                      "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                   "finish_reason": finish}]})

    def _end(self, usage: dict[str, Any] | None) -> bytes:
        """The usage chunk (if the client asked for it) and `[DONE]`."""
        out = b""
        if self.include_usage and usage is not None:
            out += _data({"id": self.id, "object": "chat.completion.chunk",
                          "created": self.created, "model": self.model, "choices": [],
                          "usage": usage})
        return out + b"data: [DONE]\n\n"


class AnthropicToOpenAIStream(ToOpenAIChunks):
    def __init__(self, model: str, include_usage: bool):
        super().__init__(model, include_usage)
        self.tool_index: dict[int, int] = {}  # Anthropic block index -> OpenAI tool index
        self.usage: dict[str, Any] = {}
        self.finish: str | None = None

    def on_event(self, event: Event) -> bytes:
        try:
            doc = json.loads(event.data)
        except ValueError:
            return b""
        kind = doc.get("type")
        if kind == "message_start":
            self.usage.update((doc.get("message") or {}).get("usage") or {})
            return self._chunk({"role": "assistant", "content": ""})
        if kind == "content_block_start":
            block = doc.get("content_block") or {}
            if block.get("type") == "tool_use":
                index = self.tool_index.setdefault(doc.get("index", 0), len(self.tool_index))
                return self._chunk({"tool_calls": [{
                    "index": index, "id": block.get("id"), "type": "function",
                    "function": {"name": block.get("name"), "arguments": ""}}]})
            return b""
        if kind == "content_block_delta":
            delta = doc.get("delta") or {}
            if delta.get("type") == "text_delta":
                return self._chunk({"content": delta.get("text", "")})
            if delta.get("type") == "input_json_delta":
                index = self.tool_index.get(doc.get("index", 0), 0)
                return self._chunk({"tool_calls": [{
                    "index": index, "function": {"arguments": delta.get("partial_json", "")}}]})
            return b""
        if kind == "message_delta":
            self.usage.update(doc.get("usage") or {})
            reason = (doc.get("delta") or {}).get("stop_reason")
            self.finish = ANTHROPIC_TO_OPENAI_FINISH.get(reason or "", "stop")
            return self._chunk({}, self.finish)
        if kind == "message_stop":
            return self._end(_openai_usage(self.usage))
        if kind == "error":
            return _data({"error": doc.get("error") or {}})
        return b""


class OpenAIToAnthropicStream(StreamTranslator):
    def __init__(self, model: str, input_estimate: int = 0):
        """`input_estimate`: the input tokens `message_start` announces. OpenAI reports usage
        only at the end, but Anthropic clients (coding agents) read the input from
        `message_start`; the exact numbers follow in the final `message_delta`."""
        super().__init__()
        self.model = model
        self.input_estimate = input_estimate
        self.started = False
        self.block: str | None = None  # "text" or "tool:<openai index>"
        self.index = -1
        self.stop_reason = "end_turn"
        self.usage: dict[str, Any] = {}
        self.ended = False

    def _start(self) -> bytes:
        if self.started:
            return b""
        self.started = True
        return _event("message_start", {"type": "message_start", "message": {
            "id": f"msg_{uuid.uuid4().hex[:24]}", "type": "message", "role": "assistant",
            "model": self.model, "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": self.input_estimate, "cache_creation_input_tokens": 0,
                      "cache_read_input_tokens": 0, "output_tokens": 0}}})

    def _open(self, block: str, content_block: dict[str, Any]) -> bytes:
        out = self._close()
        self.index += 1
        self.block = block
        return out + _event("content_block_start", {"type": "content_block_start",
                                                     "index": self.index,
                                                     "content_block": content_block})

    def _close(self) -> bytes:
        if self.block is None:
            return b""
        self.block = None
        return _event("content_block_stop", {"type": "content_block_stop", "index": self.index})

    def _delta(self, delta: dict[str, Any]) -> bytes:
        return _event("content_block_delta", {"type": "content_block_delta",
                                              "index": self.index, "delta": delta})

    def _end(self) -> bytes:
        if self.ended:
            return b""
        self.ended = True
        return (self._start() + self._close()
                + _event("message_delta", {"type": "message_delta",
                                           "delta": {"stop_reason": self.stop_reason,
                                                     "stop_sequence": None},
                                           "usage": _anthropic_usage(self.usage)})
                + _event("message_stop", {"type": "message_stop"}))

    def on_event(self, event: Event) -> bytes:
        if event.data == "[DONE]":
            return self._end()
        try:
            doc = json.loads(event.data)
        except ValueError:
            return b""
        if doc.get("error"):
            return _event("error", {"type": "error", "error": {
                "type": "api_error", "message": (doc["error"] or {}).get("message", "")}})
        out = self._start()
        if doc.get("usage"):
            self.usage = doc["usage"]
        for choice in doc.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("content"):
                if self.block != "text":
                    out += self._open("text", {"type": "text", "text": ""})
                out += self._delta({"type": "text_delta", "text": delta["content"]})
            for call in delta.get("tool_calls") or []:
                key = f"tool:{call.get('index', 0)}"
                fn = call.get("function") or {}
                if self.block != key:
                    out += self._open(key, {"type": "tool_use", "id": call.get("id"),
                                            "name": fn.get("name"), "input": {}})
                if fn.get("arguments"):
                    out += self._delta({"type": "input_json_delta",
                                        "partial_json": fn["arguments"]})
            if choice.get("finish_reason"):
                self.stop_reason = OPENAI_TO_ANTHROPIC_STOP.get(choice["finish_reason"],
                                                                "end_turn")
        return out
