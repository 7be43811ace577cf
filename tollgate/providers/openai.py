"""OpenAI, and servers that speak its API (`openai-compatible`: vLLM, Ollama, LiteLLM...)."""

from __future__ import annotations

from collections.abc import Mapping

from tollgate.providers.base import Adapter


class OpenAI(Adapter):
    type = "openai"
    wire = "openai"
    vendor = "openai"
    gen_ai_provider = "openai"
    default_models = ("gpt-*", "o1*", "o3*", "o4*", "chatgpt-*", "text-embedding-*", "codex-*",
                      "computer-use-*")
    default_base_url = "https://api.openai.com"

    def auth(self, client_headers: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
        return {"authorization": f"Bearer {self.credential()}"}, ["x-api-key"]


class OpenAICompatible(OpenAI):
    type = "openai-compatible"
    vendor = None  # whatever it hosts: its `models` list says
    default_models = ()  # it serves what its `models` list says
    default_base_url = None


ADAPTERS = [OpenAI, OpenAICompatible]
