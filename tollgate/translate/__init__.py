"""Between API families: OpenAI chat completions <-> Anthropic messages, both ways, for
requests, JSON responses, SSE streams and provider errors."""

from tollgate.translate.requests import anthropic_to_openai, openai_to_anthropic
from tollgate.translate.responses import (
    AnthropicToOpenAIStream,
    OpenAIToAnthropicStream,
    anthropic_json_to_openai,
    error_to,
    openai_json_to_anthropic,
)

__all__ = ["AnthropicToOpenAIStream", "OpenAIToAnthropicStream", "anthropic_json_to_openai",
           "anthropic_to_openai", "error_to", "openai_json_to_anthropic",
           "openai_to_anthropic"]
