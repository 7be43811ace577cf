"""Google Vertex AI: Claude through `rawPredict` / `streamRawPredict`, with the Anthropic
Messages body Vertex takes (`anthropic_version: vertex-2023-10-16`, the model in the URL),
and Gemini through `generateContent` / `streamGenerateContent?alt=sse` (Gemini's own shape,
translated for OpenAI and Anthropic clients).

    tollgate model-providers create --type vertex --scope ORG:acme \\
        --provider-config '{"project": "my-project", "location": "us-east5"}'

The credential is Application Default Credentials through google-auth (for a service
account, GOOGLE_APPLICATION_CREDENTIALS names its key file and the token comes from its
`token_uri`). Tokens are refreshed on a thread before they expire, so no request waits for
one once the first is there; the gateway fetches the first when it loads the config.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

from tollgate.errors import GatewayError
from tollgate.providers.base import Adapter

if TYPE_CHECKING:
    from tollgate.catalog import ModelCatalog
    from tollgate.routes import Route

log = logging.getLogger("tollgate")

VERTEX_VERSION = "vertex-2023-10-16"
SCOPES = ["https://www.googleapis.com/auth/cloud-platform"]
REFRESH_AHEAD = 240.0  # seconds before expiry a token is replaced, in the background


class TokenSource:
    """Application Default Credentials and their current access token."""

    def __init__(self) -> None:
        import google.auth

        self.credentials, _ = google.auth.default(scopes=SCOPES)
        self._lock = threading.Lock()
        self._refreshing = False

    def _remaining(self) -> float:
        expiry = self.credentials.expiry  # naive UTC, as google-auth keeps it
        if not self.credentials.token or expiry is None:
            return 0.0 if not self.credentials.token else float("inf")
        return (expiry.replace(tzinfo=UTC) - datetime.now(UTC)).total_seconds()

    def _refresh(self) -> None:
        import urllib3
        from google.auth.transport.urllib3 import Request

        with self._lock:
            if self._remaining() > REFRESH_AHEAD:
                return  # another thread has just done it
            self.credentials.refresh(Request(urllib3.PoolManager()))

    def _refresh_in_background(self) -> None:
        def run() -> None:
            try:
                self._refresh()
            except Exception as e:  # the current token still serves; the next call retries
                log.warning("vertex: could not refresh the access token: %s", e)
            finally:
                self._refreshing = False

        if not self._refreshing:
            self._refreshing = True
            threading.Thread(target=run, name="tollgate-vertex-token", daemon=True).start()

    def token(self) -> str:
        remaining = self._remaining()
        if remaining <= 0:
            self._refresh()  # no usable token yet: only before the first one arrives
        elif remaining < REFRESH_AHEAD:
            self._refresh_in_background()
        return str(self.credentials.token)

    def warm(self) -> None:
        if self._remaining() < REFRESH_AHEAD:
            self._refresh_in_background()


_source_lock = threading.Lock()
_source: TokenSource | None = None


def token_source() -> TokenSource:
    global _source
    with _source_lock:
        if _source is None:
            _source = TokenSource()
        return _source


class Vertex(Adapter):
    type = "vertex"
    wire = "anthropic"
    vendor = "anthropic"
    gen_ai_provider = "gcp.vertex_ai"
    default_models = ("claude-*", "gemini-*")
    key_optional = True
    native_errors = False  # Google's {"error": {"code", "message", "status"}}
    config_keys = frozenset({"project", "location"})

    @classmethod
    def check_config(cls, provider_config: dict[str, Any]) -> None:
        super().check_config(provider_config)
        for name in ("project", "location"):
            if not isinstance(provider_config.get(name), str) or not provider_config[name]:
                raise ValueError(f"vertex needs provider_config.{name}, e.g. "
                                 '{"project": "my-project", "location": "us-east5"}')

    @classmethod
    def base_url_for(cls, provider_config: dict[str, Any]) -> str | None:
        location = provider_config.get("location")
        if not location:
            return None
        return "https://aiplatform.googleapis.com" if location == "global" else \
            f"https://{location}-aiplatform.googleapis.com"

    def family(self, model: str) -> str:
        return "gemini" if model.startswith("gemini") else "anthropic"

    def serves_route(self, route: Route) -> bool:
        return route.name in ("messages", "chat_completions")

    def upstream_model(self, model: str, catalog: ModelCatalog | None) -> str:
        return catalog.named(model, self.type) if catalog is not None else model

    def ambient_credential_problem(self) -> str | None:
        if self.provider.api_key_env or self.provider.api_key_file:
            return None
        try:
            token_source()
        except Exception as e:
            return f"no Google Application Default Credentials in the gateway's environment: {e}"
        return None

    def prepare(self) -> None:
        if not (self.provider.api_key_env or self.provider.api_key_file):
            try:
                token_source().warm()
            except Exception as e:  # said again, with the fix, by the request that needs it
                log.warning("vertex provider %s: no Google credentials yet: %s",
                            self.provider.id, e)

    def auth(self, client_headers: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
        drop = ["x-api-key", "anthropic-version", "anthropic-beta"]
        if self.provider.api_key_env or self.provider.api_key_file:
            return {"authorization": f"Bearer {self.credential()}"}, drop
        try:
            token = token_source().token()
        except Exception as e:
            raise GatewayError(
                "provider_misconfigured",
                f"Model provider {self.provider.id} (vertex) has no Google credentials "
                f"({e.__class__.__name__}): set GOOGLE_APPLICATION_CREDENTIALS to a service "
                "account key file on the gateway, or run it with a workload identity.") from None
        return {"authorization": f"Bearer {token}"}, drop

    def path(self, route: Route, model: str, client_path: str, stream: bool = False) -> str:
        config = self.provider.provider_config
        base = urlsplit(self.provider.base_url).path.rstrip("/")
        if self.family(model) == "gemini":
            publisher = "google"
            method = "streamGenerateContent?alt=sse" if stream else "generateContent"
        else:
            publisher = "anthropic"
            method = "streamRawPredict" if stream else "rawPredict"
        return (f"{base}/v1/projects/{quote(config['project'], safe='')}/locations/"
                f"{quote(config['location'], safe='')}/publishers/{publisher}/models/"
                f"{quote(model, safe='@')}:{method}")

    def body(self, doc: dict[str, Any], model: str) -> dict[str, Any] | None:
        if self.family(model) == "gemini":  # Gemini's shape, as translated
            return None
        out = {k: v for k, v in doc.items() if k != "model"}
        out["anthropic_version"] = VERTEX_VERSION
        return out


ADAPTERS = [Vertex]
