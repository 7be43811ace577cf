"""Translation between API families, checked against the official SDKs' own parsers."""

from __future__ import annotations

import json

from anthropic.types import Message
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from tollgate.config.schema import ModelProvider
from tollgate.providers import ADAPTERS
from tollgate.providers.base import error_message
from tollgate.sse import SSEParser
from tollgate.translate import (
    AnthropicToOpenAIStream,
    OpenAIToAnthropicStream,
    anthropic_json_to_openai,
    anthropic_to_openai,
    error_to,
    openai_json_to_anthropic,
    openai_to_anthropic,
)

OPENAI_REQUEST = {
    "model": "gpt-5-mini", "stream": True, "temperature": 1.5, "stop": "END",
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Weather?"},
                                     {"type": "image_url",
                                      "image_url": {"url": "data:image/png;base64,AAAA"}}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": "warm"},
    ],
    "tools": [{"type": "function", "function": {"name": "get_weather", "description": "w",
                                                "parameters": {"type": "object"}}}],
    "tool_choice": "required",
}


def test_openai_request_to_anthropic():
    out = openai_to_anthropic(OPENAI_REQUEST, "claude-haiku-4-5")
    assert out["model"] == "claude-haiku-4-5" and out["system"] == "Be brief."
    assert out["max_tokens"] == 4096  # Anthropic requires it
    assert out["temperature"] == 1.0 and out["stop_sequences"] == ["END"]
    assert [m["role"] for m in out["messages"]] == ["user", "assistant", "user"]
    assert out["messages"][0]["content"][1]["source"] == {
        "type": "base64", "media_type": "image/png", "data": "AAAA"}
    assert out["messages"][1]["content"] == [
        {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}}]
    assert [b["tool_use_id"] for b in out["messages"][2]["content"]] == ["call_1", "call_2"]
    assert out["tools"][0]["input_schema"] == {"type": "object"}
    assert out["tool_choice"] == {"type": "any"}


def test_anthropic_request_to_openai_and_back_keeps_the_conversation():
    there = openai_to_anthropic(OPENAI_REQUEST, "claude-haiku-4-5")
    back = anthropic_to_openai(there, "gpt-5-mini")
    roles = [m["role"] for m in back["messages"]]
    assert roles == ["system", "user", "assistant", "tool", "tool"]
    assert back["messages"][2]["tool_calls"][0]["function"] == {
        "name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert back["tool_choice"] == "required"
    assert back["stream_options"] == {"include_usage": True}
    assert back["max_completion_tokens"] == 4096


ANTHROPIC_MESSAGE = {
    "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-haiku-4-5",
    "content": [{"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                 "input": {"city": "Paris"}}],
    "stop_reason": "tool_use", "stop_sequence": None,
    "usage": {"input_tokens": 10, "output_tokens": 5, "cache_read_input_tokens": 2,
              "cache_creation_input_tokens": 0},
}


def test_anthropic_json_to_openai_parses_with_the_openai_sdk():
    completion = ChatCompletion.model_validate(
        anthropic_json_to_openai(ANTHROPIC_MESSAGE, "gpt-5-mini"))
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Checking."
    assert choice.message.tool_calls[0].function.name == "get_weather"
    assert json.loads(choice.message.tool_calls[0].function.arguments) == {"city": "Paris"}
    assert completion.usage.prompt_tokens == 12
    assert completion.usage.prompt_tokens_details.cached_tokens == 2


def test_openai_json_to_anthropic_parses_with_the_anthropic_sdk():
    completion = anthropic_json_to_openai(ANTHROPIC_MESSAGE, "gpt-5-mini")
    message = Message.model_validate(openai_json_to_anthropic(completion, "claude-haiku-4-5"))
    assert message.stop_reason == "tool_use"
    assert message.content[1].type == "tool_use" and message.content[1].input == {
        "city": "Paris"}
    assert (message.usage.input_tokens, message.usage.cache_read_input_tokens) == (10, 2)


def sse(*events: tuple[str, dict]) -> bytes:
    return b"".join(f"event: {k}\ndata: {json.dumps(d)}\n\n".encode() for k, d in events)


ANTHROPIC_STREAM = sse(
    ("message_start", {"type": "message_start", "message": {
        "id": "msg_1", "usage": {"input_tokens": 9, "output_tokens": 1}}}),
    ("content_block_start", {"type": "content_block_start", "index": 0,
                             "content_block": {"type": "text", "text": ""}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 0,
                             "delta": {"type": "text_delta", "text": "Hi"}}),
    ("content_block_stop", {"type": "content_block_stop", "index": 0}),
    ("content_block_start", {"type": "content_block_start", "index": 1, "content_block": {
        "type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 1,
                             "delta": {"type": "input_json_delta", "partial_json": '{"ci'}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 1,
                             "delta": {"type": "input_json_delta", "partial_json": 'ty": 1}'}}),
    ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use"},
                       "usage": {"output_tokens": 7}}),
    ("message_stop", {"type": "message_stop"}),
)


def test_anthropic_stream_to_openai_chunks_incrementally():
    translator = AnthropicToOpenAIStream("gpt-5-mini", include_usage=True)
    out = b"".join(translator.feed(ANTHROPIC_STREAM[i:i + 7])
                   for i in range(0, len(ANTHROPIC_STREAM), 7))
    events = SSEParser().feed(out)
    assert events[-1].data == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate(json.loads(e.data)) for e in events[:-1]]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    args = "".join(tc.function.arguments or "" for c in chunks if c.choices
                   for tc in c.choices[0].delta.tool_calls or [])
    assert text == "Hi" and json.loads(args) == {"city": 1}
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert chunks[-1].usage.completion_tokens == 7 and chunks[-1].usage.prompt_tokens == 9


def test_openai_stream_to_anthropic_round_trip():
    there = AnthropicToOpenAIStream("gpt-5-mini", include_usage=True).feed(ANTHROPIC_STREAM)
    back = OpenAIToAnthropicStream("claude-haiku-4-5").feed(there)
    events = [(e.event, json.loads(e.data)) for e in SSEParser().feed(back)]
    kinds = [k for k, _ in events]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    starts = [d["content_block"]["type"] for k, d in events if k == "content_block_start"]
    assert starts == ["text", "tool_use"]
    delta = events[-2][1]
    assert delta["delta"]["stop_reason"] == "tool_use" and delta["usage"]["output_tokens"] == 7


def test_errors_keep_the_provider_message_in_the_client_shape():
    body = json.dumps({"type": "error", "error": {"type": "overloaded_error",
                                                  "message": "Overloaded"}}).encode()
    doc = json.loads(error_to("openai", 529, error_message(529, body)))
    assert doc["error"]["message"] == "Overloaded" and doc["error"]["type"] == "server_error"
    back = json.loads(error_to("anthropic", 503, error_message(
        503, error_to("openai", 503, error_message(503, body)))))
    assert back == {"type": "error", "error": {"type": "api_error", "message": "Overloaded"}}


def test_each_provider_type_reads_its_own_errors_and_failure_classes():
    bedrock = ADAPTERS["bedrock"](ModelProvider(
        id="mp_b", type="bedrock", scope="ORG:acme", base_url="https://b.example",
        provider_config={"region": "us-east-1"}))
    openai_ = ADAPTERS["openai"](ModelProvider(id="mp_o", type="openai", scope="ORG:acme",
                                               base_url="https://o.example"))
    throttled = b'{"message": "Too many requests, please wait before trying again."}'
    assert bedrock.error_message(429, throttled).startswith("Too many requests")
    assert openai_.error_message(500, b"<html>oops</html>") == "<html>oops</html>"
    google = b'{"error": {"code": 429, "message": "Quota exceeded", "status": ' \
             b'"RESOURCE_EXHAUSTED"}}'
    gemini = ADAPTERS["gemini"](ModelProvider(id="mp_g", type="gemini", scope="ORG:acme",
                                              base_url="https://g.example"))
    assert gemini.error_message(429, google) == "Quota exceeded"
    # Bedrock's ModelTimeoutException (408) and ModelErrorException (424) fail over.
    assert [bedrock.failure_kind(s) for s in (408, 424, 429, 503, 400)] == \
        ["timeout", "5xx", "rate_limit", "5xx", None]
    assert [openai_.failure_kind(s) for s in (408, 429, 529, 404)] == \
        [None, "rate_limit", "5xx", None]


def test_openai_chat_becomes_gemini_contents_and_back():
    """Turns alternate user/model, tool calls and their results keep their names, images
    travel inline, and a Gemini answer comes back as a chat completion with its usage."""
    from tollgate.translate import gemini

    doc = {"model": "gemini-2.5-flash", "max_tokens": 64, "temperature": 0.2, "stop": "END",
           "messages": [
               {"role": "system", "content": "Be brief."},
               {"role": "user", "content": [
                   {"type": "text", "text": "What is here?"},
                   {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function",
                    "function": {"name": "look", "arguments": '{"where": "desk"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "a cup"},
               {"role": "user", "content": "thanks"}],
           "tools": [{"type": "function", "function": {"name": "look", "parameters": {
               "type": "object"}}}],
           "tool_choice": {"type": "function", "function": {"name": "look"}}}
    out = gemini.openai_to_gemini(doc)
    assert out["systemInstruction"] == {"parts": [{"text": "Be brief."}]}
    assert [c["role"] for c in out["contents"]] == ["user", "model", "user"]
    assert out["contents"][0]["parts"][1] == {"inlineData": {"mimeType": "image/png",
                                                             "data": "AAAA"}}
    assert out["contents"][1]["parts"] == [{"functionCall": {"name": "look",
                                                             "args": {"where": "desk"}}}]
    assert out["contents"][2]["parts"][0] == {"functionResponse": {
        "name": "look", "response": {"content": "a cup"}}}
    assert out["contents"][2]["parts"][1] == {"text": "thanks"}
    assert out["toolConfig"] == {"functionCallingConfig": {
        "mode": "ANY", "allowedFunctionNames": ["look"]}}
    assert out["generationConfig"] == {"maxOutputTokens": 64, "temperature": 0.2,
                                       "stopSequences": ["END"]}
    answer = gemini.gemini_json_to_openai({
        "candidates": [{"content": {"parts": [{"text": "thinking", "thought": True},
                                              {"text": "A cup."}]},
                        "finishReason": "MAX_TOKENS"}],
        "usageMetadata": {"promptTokenCount": 30, "cachedContentTokenCount": 10,
                          "candidatesTokenCount": 4, "thoughtsTokenCount": 6}},
        "gemini-2.5-flash")
    assert answer["choices"][0]["message"]["content"] == "A cup."
    assert answer["choices"][0]["finish_reason"] == "length"
    assert answer["usage"]["completion_tokens"] == 10
    assert answer["usage"]["prompt_tokens_details"]["cached_tokens"] == 10

    from tollgate.usage import gemini_usage

    used = gemini_usage({"promptTokenCount": 30, "cachedContentTokenCount": 10,
                         "candidatesTokenCount": 4, "thoughtsTokenCount": 6})
    assert (used.input_tokens, used.cached_input_tokens, used.output_tokens,
            used.reasoning_tokens) == (20, 10, 10, 6)


def test_openai_chat_becomes_converse_and_its_stream_comes_back():
    from tollgate.translate import converse

    out = converse.openai_to_converse({
        "model": "amazon.nova-lite-v1:0", "max_tokens": 32, "tool_choice": "required",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "tool_calls": [{"id": "t1", "type": "function", "function": {
                "name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
            {"role": "tool", "tool_call_id": "t1", "content": "rain"}],
        "tools": [{"type": "function", "function": {"name": "get_weather",
                                                    "parameters": {"type": "object"}}}]})
    assert out["system"] == [{"text": "Be brief."}]
    assert out["messages"][1] == {"role": "assistant", "content": [{"toolUse": {
        "toolUseId": "t1", "name": "get_weather", "input": {"city": "Oslo"}}}]}
    assert out["messages"][2]["content"][0]["toolResult"] == {
        "toolUseId": "t1", "content": [{"text": "rain"}]}
    assert out["toolConfig"]["toolChoice"] == {"any": {}}
    assert out["inferenceConfig"] == {"maxTokens": 32}

    def sse(kind: str, doc: dict) -> bytes:
        return f"event: {kind}\ndata: {json.dumps(doc)}\n\n".encode()

    stream = converse.ConverseToOpenAIStream("amazon.nova-lite-v1:0", include_usage=True)
    raw = b"".join([
        sse("messageStart", {"role": "assistant"}),
        sse("contentBlockStart", {"contentBlockIndex": 1, "start": {
            "toolUse": {"toolUseId": "tu_9", "name": "get_weather"}}}),
        sse("contentBlockDelta", {"contentBlockIndex": 1, "delta": {
            "toolUse": {"input": '{"city":'}}}),
        sse("contentBlockDelta", {"contentBlockIndex": 1, "delta": {
            "toolUse": {"input": ' "Oslo"}'}}}),
        sse("messageStop", {"stopReason": "tool_use"}),
        sse("metadata", {"usage": {"inputTokens": 9, "outputTokens": 4}})])
    chunks = [json.loads(line[6:]) for line in stream.feed(raw).decode().split("\n")
              if line.startswith("data: {")]
    calls = [c["choices"][0]["delta"]["tool_calls"][0] for c in chunks
             if c["choices"] and "tool_calls" in c["choices"][0]["delta"]]
    assert calls[0]["id"] == "tu_9" and calls[0]["function"]["name"] == "get_weather"
    assert "".join(c["function"]["arguments"] for c in calls) == '{"city": "Oslo"}'
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[-1]["usage"]["completion_tokens"] == 4
