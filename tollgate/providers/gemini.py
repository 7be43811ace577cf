"""The Gemini API (Google AI Studio): `generateContent` and `streamGenerateContent?alt=sse`
with the `x-goog-api-key` header. OpenAI chat clients and Anthropic messages clients are
served through translation (`tollgate.translate.gemini`).

    tollgate model-providers create --type gemini --scope ORG:acme --api-key-env GEMINI_API_KEY
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING
from urllib.parse import quote, urlsplit

from tollgate.providers.base import Adapter

if TYPE_CHECKING:
    from tollgate.routes import Route


class Gemini(Adapter):
    type = "gemini"
    wire = "gemini"
    vendor = "google"
    gen_ai_provider = "gcp.gemini"
    native_errors = False  # Google's {"error": {"code", "message", "status"}}
    default_models = ("gemini-*",)
    default_base_url = "https://generativelanguage.googleapis.com"

    def serves_route(self, route: Route) -> bool:
        return route.name in ("chat_completions", "messages")

    def auth(self, client_headers: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
        return {"x-goog-api-key": self.credential()}, [
            "authorization", "x-api-key", "anthropic-version", "anthropic-beta"]

    def path(self, route: Route, model: str, client_path: str, stream: bool = False) -> str:
        base = urlsplit(self.provider.base_url).path.rstrip("/")
        method = "streamGenerateContent?alt=sse" if stream else "generateContent"
        return f"{base}/v1beta/models/{quote(model, safe='')}:{method}"


ADAPTERS = [Gemini]
