"""Between API families, one translation per (client family, provider family) pair:
OpenAI chat completions <-> Anthropic messages, and both to Gemini's generateContent and
Bedrock's Converse, for requests, JSON responses, SSE streams and provider errors. Anthropic
clients reach Gemini and Converse through OpenAI's shape."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from tollgate.translate import converse, gemini
from tollgate.translate.requests import anthropic_to_openai, openai_to_anthropic
from tollgate.translate.responses import (
    AnthropicToOpenAIStream,
    OpenAIToAnthropicStream,
    anthropic_json_to_openai,
    error_to,
    openai_json_to_anthropic,
)

__all__ = ["AnthropicToOpenAIStream", "Chained", "OpenAIToAnthropicStream",
           "anthropic_json_to_openai", "anthropic_to_openai", "error_to", "json_response",
           "openai_json_to_anthropic", "openai_to_anthropic", "request", "stream"]


class Rewriter(Protocol):
    def feed(self, chunk: bytes) -> bytes: ...
    def flush(self) -> bytes: ...


class Chained:
    """Two rewriters in a row: the first one's output is the second one's input."""

    def __init__(self, first: Rewriter, second: Rewriter):
        self.first, self.second = first, second

    def feed(self, chunk: bytes) -> bytes:
        return self.second.feed(self.first.feed(chunk))

    def flush(self) -> bytes:
        return self.second.feed(self.first.flush()) + self.second.flush()


# Families reached through OpenAI's shape: request, JSON answer and stream translations.
_VIA_OPENAI: dict[str, tuple[Any, Any, Any]] = {
    "gemini": (gemini.openai_to_gemini, gemini.gemini_json_to_openai,
               gemini.GeminiToOpenAIStream),
    "converse": (converse.openai_to_converse, converse.converse_json_to_openai,
                 converse.ConverseToOpenAIStream),
}


def request(client: str, wire: str, doc: dict[str, Any], model: str) -> dict[str, Any]:
    """A client's request body in the provider's family."""
    if wire in _VIA_OPENAI:
        return _VIA_OPENAI[wire][0](doc if client == "openai" else
                                    anthropic_to_openai(doc, model))
    return openai_to_anthropic(doc, model) if client == "openai" else \
        anthropic_to_openai(doc, model)


def json_response(client: str, wire: str, model: str
                  ) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """The provider's JSON answer in the client's family."""
    if wire in _VIA_OPENAI:
        to_openai = _VIA_OPENAI[wire][1]
        if client == "openai":
            return lambda doc: to_openai(doc, model)
        return lambda doc: openai_json_to_anthropic(to_openai(doc, model), model)
    if client == "openai":
        return lambda doc: anthropic_json_to_openai(doc, model)
    return lambda doc: openai_json_to_anthropic(doc, model)


def stream(client: str, wire: str, model: str, include_usage: bool,
           input_estimate: int = 0) -> Rewriter:
    """The provider's SSE in the client's family, event by event (`input_estimate`: the
    input an Anthropic client is told of before the provider's own count arrives)."""
    if wire in _VIA_OPENAI:
        to_openai = _VIA_OPENAI[wire][2]
        if client == "openai":
            return to_openai(model, include_usage)
        return Chained(to_openai(model, include_usage=True),
                       OpenAIToAnthropicStream(model, input_estimate))
    if client == "openai":
        return AnthropicToOpenAIStream(model, include_usage=include_usage)
    return OpenAIToAnthropicStream(model, input_estimate)
