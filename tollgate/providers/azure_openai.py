"""Azure OpenAI: OpenAI's API on per-deployment paths, with an `api-key` header and an
`api-version` on every request; the Responses API on Azure's v1 path
(`/openai/v1/responses`), the deployment named in the body.

    tollgate model-providers create --type azure-openai --base-url https://RES.openai.azure.com \
        --api-key-env AZURE_OPENAI_API_KEY \
        --provider-config '{"api_version": "2024-10-21", "deployments": {"gpt-4o-mini": "dep"}}'

A model without an entry in `deployments` is sent to the deployment of the same name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import quote, urlsplit

from tollgate.providers.base import TRANSLATED_ROUTES, Adapter

if TYPE_CHECKING:
    from tollgate.routes import Route

# Route -> the operation after /openai/deployments/{deployment}/. The Responses API lives
# under Azure's v1 path instead, with the deployment named in the body.
_OPERATIONS = {"chat_completions": "chat/completions", "embeddings": "embeddings"}
_V1 = {"responses": "responses"}


class AzureOpenAI(Adapter):
    type = "azure-openai"
    wire = "openai"
    vendor = "openai"
    gen_ai_provider = "azure.ai.openai"
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
        return name in _OPERATIONS or name in _V1

    def deployment(self, model: str) -> str:
        return self.provider.provider_config.get("deployments", {}).get(model, model)

    def body_model(self, route: Route, model: str) -> str:
        return self.deployment(model) if route.name in _V1 else model

    def auth(self, client_headers: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
        return {"api-key": self.credential()}, ["authorization", "x-api-key"]

    def path(self, route: Route, model: str, client_path: str, stream: bool = False) -> str:
        config = self.provider.provider_config
        name = TRANSLATED_ROUTES[route.name] if self.translated(route) else route.name
        base = urlsplit(self.provider.base_url).path.rstrip("/")
        if name in _V1:
            return f"{base}/openai/v1/{_V1[name]}"
        return (f"{base}/openai/deployments/{quote(self.deployment(model), safe='')}/"
                f"{_OPERATIONS[name]}?api-version={quote(config['api_version'], safe='')}")


ADAPTERS = [AzureOpenAI]
