"""One adapter per provider type: auth, the upstream URL for a route and model, and the API
family it speaks (see `base.py`).

Adding a provider type means adding a module here that lists its adapter classes in
`ADAPTERS`; the config, the CLI and both hosts find it by its `type`.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING

from tollgate.providers.base import Adapter

if TYPE_CHECKING:
    from tollgate.config.schema import ModelProvider


def _discover() -> dict[str, type[Adapter]]:
    found: dict[str, type[Adapter]] = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for adapter in getattr(module, "ADAPTERS", ()):
            found[adapter.type] = adapter
    return found


ADAPTERS: dict[str, type[Adapter]] = _discover()
TYPES: list[str] = sorted(ADAPTERS)


def adapter_for(provider: ModelProvider) -> Adapter:
    return ADAPTERS[provider.type](provider)
