"""Azure OpenAI: OpenAI's API on per-deployment paths, with an `api-key` header and an
`api-version` on every request.

    tollgate model-providers create --type azure-openai --base-url https://RES.openai.azure.com \
        --api-key-env AZURE_OPENAI_API_KEY \
        --provider-config '{"api_version": "2024-10-21", "deployments": {"gpt-4o-mini": "dep"}}'

A model without an entry in `deployments` is sent to the deployment of the same name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import quote, urlsplit

from tollgate.providers.base import TRANSLATED_ROUTES, Adapter

if TYPE_CHECKING:
    from tollgate.routes import Route

# Route -> the operation after /openai/deployments/{deployment}/. (Azure serves the
# Responses API elsewhere, under /openai/v1/, so it is not offered here.)
_OPERATIONS = {"chat_completions": "chat/completions", "embeddings": "embeddings"}


class AzureOpenAI(Adapter):
    type = "azure-openai"
    wire = "openai"
    vendor = "openai"
    default_models: ClassVar[tuple[str, ...]] = ("gpt-*", "o1*", "o3*", "o4*",
                                                 "text-embedding-*")

    config_keys = frozenset({"api_version", "deployments"})

    @classmethod
    def check_config(cls, provider_config: dict[str, Any]) -> None:
        super().check_config(provider_config)
        version = provider_config.get("api_version")
        if not isinstance(version, str) or not version:
            raise ValueError('azure-openai needs provider_config.api_version, e.g. '
                             '{"api_version": "2024-10-21"}')
        deployments = provider_config.get("deployments", {})
        if not isinstance(deployments, dict) or not all(
                isinstance(k, str) and isinstance(v, str) and v for k, v in deployments.items()):
            raise ValueError("provider_config.deployments maps model names to deployment "
                             'names, e.g. {"gpt-4o-mini": "my-deployment"}')

    def serves_route(self, route: Route) -> bool:
        name = TRANSLATED_ROUTES.get(route.name) if self.translated(route) else route.name
        return name in _OPERATIONS

    def auth(self, client_headers: dict[str, str]) -> tuple[dict[str, str], list[str]]:
        return {"api-key": self.credential()}, ["authorization", "x-api-key"]

    def path(self, route: Route, model: str, client_path: str, stream: bool = False) -> str:
        config = self.provider.provider_config
        deployment = config.get("deployments", {}).get(model, model)
        name = TRANSLATED_ROUTES[route.name] if self.translated(route) else route.name
        base = urlsplit(self.provider.base_url).path.rstrip("/")
        return (f"{base}/openai/deployments/{quote(deployment, safe='')}/{_OPERATIONS[name]}"
                f"?api-version={quote(config['api_version'], safe='')}")


ADAPTERS = [AzureOpenAI]
