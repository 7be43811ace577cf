"""The client-facing routes: which API family a path speaks and what the gateway does with it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Route:
    name: str
    method: str
    family: str  # "openai" | "anthropic": the client's API shape, and so its error shape
    forwarded: bool = True  # False: the gateway answers itself
    needs_model: bool = True
    metered: bool = True  # False: it costs nothing (counting tokens)


ROUTES: dict[str, Route] = {
    "/v1/chat/completions": Route("chat_completions", "POST", "openai"),
    "/v1/responses": Route("responses", "POST", "openai"),
    "/v1/embeddings": Route("embeddings", "POST", "openai"),
    "/v1/models": Route("models", "GET", "openai", forwarded=False, needs_model=False),
    "/v1/messages": Route("messages", "POST", "anthropic"),
    "/v1/messages/count_tokens": Route("count_tokens", "POST", "anthropic", metered=False),
}


def match(path: str) -> Route | None:
    return ROUTES.get(path.split("?", 1)[0].rstrip("/") or "/")


def family_for_path(path: str, headers: dict[str, str] | None = None) -> str:
    """Error shape for any path; Anthropic SDKs mark themselves with anthropic-version."""
    route = match(path)
    if route is not None and route.name != "models":
        return route.family
    if headers and "anthropic-version" in headers:
        return "anthropic"
    return "openai"
