"""Anthropic's Messages API."""

from __future__ import annotations

from collections.abc import Mapping

from tollgate.providers.base import Adapter

DEFAULT_VERSION = "2023-06-01"


class Anthropic(Adapter):
    type = "anthropic"
    wire = "anthropic"
    vendor = "anthropic"
    gen_ai_provider = "anthropic"
    default_models = ("claude-*",)
    default_base_url = "https://api.anthropic.com"

    def auth(self, client_headers: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
        # The client's anthropic-version (default: one the API accepts, as it rejects
        # requests without) and anthropic-beta are set again on each attempt: on Envoy the
        # attempts of a fallback plan share one header map, and an attempt at an OpenAI
        # provider before this one removed them.
        headers = {"x-api-key": self.credential(),
                   "anthropic-version": client_headers.get("anthropic-version",
                                                           DEFAULT_VERSION)}
        if "anthropic-beta" in client_headers:
            headers["anthropic-beta"] = client_headers["anthropic-beta"]
        return headers, ["authorization"]


ADAPTERS = [Anthropic]
