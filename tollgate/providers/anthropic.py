"""Anthropic Messages API providers."""

from __future__ import annotations

name = "anthropic"
DEFAULT_VERSION = "2023-06-01"


def auth_headers(api_key: str, client_headers: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    # The client's anthropic-version (and anthropic-beta) pass through; a default is set only
    # when the client sent none, since the API rejects requests without it.
    headers = {"x-api-key": api_key}
    if "anthropic-version" not in client_headers:
        headers["anthropic-version"] = DEFAULT_VERSION
    return headers, ["authorization"]
