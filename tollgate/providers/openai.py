"""OpenAI and OpenAI-compatible providers."""

from __future__ import annotations

name = "openai"


def auth_headers(api_key: str, client_headers: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    return {"authorization": f"Bearer {api_key}"}, ["x-api-key"]
