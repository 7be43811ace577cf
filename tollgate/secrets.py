"""Credentials in headers: which headers carry them, and how they are shown when they must
be shown at all (`sk-…wxyz`)."""

from __future__ import annotations

# Client virtual keys and provider keys travel in these.
CREDENTIAL_HEADERS = frozenset({"authorization", "x-api-key", "api-key", "x-goog-api-key",
                                "proxy-authorization"})


def mask(value: str) -> str:
    """A credential as people may see it: its scheme, its first characters, its last four.
    Short values are masked whole."""
    scheme, sep, token = value.partition(" ")
    if not sep:
        scheme, token = "", value
    if "…" in token:
        return value  # masked already
    shown = f"{token[:3]}…{token[-4:]}" if len(token) >= 16 else "…"
    return f"{scheme} {shown}" if scheme else shown
