"""Anthropic's Messages API."""

from __future__ import annotations

from tollgate.providers.base import Adapter

DEFAULT_VERSION = "2023-06-01"


class Anthropic(Adapter):
    type = "anthropic"
    wire = "anthropic"
    default_models = ("claude-*",)
    default_base_url = "https://api.anthropic.com"

    def auth(self, client_headers: dict[str, str]) -> tuple[dict[str, str], list[str]]:
        # The client's anthropic-version (and anthropic-beta) pass through; a default is set
        # only when the client sent none, since the API rejects requests without it.
        headers = {"x-api-key": self.credential()}
        if "anthropic-version" not in client_headers:
            headers["anthropic-version"] = DEFAULT_VERSION
        return headers, ["authorization"]


ADAPTERS = [Anthropic]
