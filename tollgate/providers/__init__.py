"""One module per provider API family: how to authenticate to it and what it expects.

Adding a provider family means adding a module here and registering it in FAMILIES.
"""

from __future__ import annotations

from typing import Protocol

from tollgate.providers import anthropic, openai


class Family(Protocol):
    name: str

    def auth_headers(self, api_key: str, client_headers: dict[str, str]
                     ) -> tuple[dict[str, str], list[str]]: ...


FAMILIES: dict[str, Family] = {"openai": openai, "anthropic": anthropic}  # type: ignore[dict-item]


def family(name: str) -> Family:
    return FAMILIES[name]
