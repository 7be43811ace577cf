"""What every provider adapter answers: how to authenticate, where a request goes, and which
API family it speaks. The request and response translations between families live in
`tollgate.translate`, one per (client family, provider family) pair."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import urlsplit

from tollgate.errors import GatewayError
from tollgate.meter import ResponseMeter

if TYPE_CHECKING:
    from tollgate.catalog import ModelCatalog
    from tollgate.config.schema import ModelProvider
    from tollgate.request import Attempt
    from tollgate.routes import Route

# The route a provider of the other family serves a translated request on.
TRANSLATED_ROUTES = {"chat_completions": "messages", "messages": "chat_completions"}
# Where each family serves each route (the client's path is kept when the families match).
WIRE_PATHS = {"chat_completions": "/v1/chat/completions", "messages": "/v1/messages"}
# Provider statuses that mean "try elsewhere", by the `fallback.on` condition they fall under.
FAILURE_STATUSES: dict[int, str] = {429: "rate_limit", **{c: "5xx" for c in range(500, 600)}}


# path -> (the file's stat signature, its key): a key is read again only when its file
# changes (a rotated Kubernetes secret is a new file behind the same path).
_KEY_FILES: dict[str, tuple[tuple[int, int, int], str]] = {}


def read_key_file(provider_id: str, path: str) -> str:
    try:
        st = os.stat(path)
        signature = (st.st_ino, st.st_mtime_ns, st.st_size)
        cached = _KEY_FILES.get(path)
        if cached is not None and cached[0] == signature:
            return cached[1]
        with open(path, encoding="utf-8") as f:
            key = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise GatewayError("provider_misconfigured", f"Model provider {provider_id}: its key "
                           f"file {path} cannot be read ({e.__class__.__name__}).") from None
    if not key:
        raise GatewayError("provider_misconfigured",
                           f"Model provider {provider_id}: its key file {path} is empty.")
    _KEY_FILES[path] = (signature, key)
    return key


def error_message(status: int, body: bytes) -> str:
    """An error's message where OpenAI, Anthropic and Google put it (`error.message`), else
    the start of the body."""
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    err = doc.get("error") if isinstance(doc, dict) else None
    message = err.get("message") if isinstance(err, dict) else None
    if isinstance(message, str) and message:
        return message
    return body.decode("utf-8", "replace")[:500] or f"provider status {status}"


class Adapter:
    """One provider type. An instance serves one configured provider."""

    type: ClassVar[str]
    wire: ClassVar[str]  # the API family the provider speaks: "openai" | "anthropic"
    vendor: ClassVar[str | None] = None  # who makes its models (the catalog's `vendor`)
    # Its `gen_ai.provider.name` in OpenTelemetry's GenAI conventions.
    gen_ai_provider: ClassVar[str] = "openai"
    default_models: ClassVar[tuple[str, ...]] = ()
    default_base_url: ClassVar[str | None] = None
    # Its streams are not SSE (Bedrock's event-stream frames) and are turned into the SSE
    # of its family on the way to the client.
    reframes_streams: ClassVar[bool] = False
    # It can authenticate without a key of ours (Bedrock: the AWS credential chain).
    key_optional: ClassVar[bool] = False
    # Its error bodies are already its family's envelope (OpenAI's, Anthropic's); otherwise
    # (AWS's, Google's) they are rewritten into the client's.
    native_errors: ClassVar[bool] = True

    def __init__(self, provider: ModelProvider):
        self.provider = provider

    # The provider_config keys this type reads (anything else is a typo).
    config_keys: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def check_config(cls, provider_config: dict[str, Any]) -> None:
        """Raise ValueError naming what is wrong with `provider_config` for this type."""
        unknown = set(provider_config) - cls.config_keys
        if unknown and cls.config_keys:
            raise ValueError(f"unknown provider_config keys for {cls.type}: "
                             f"{', '.join(sorted(unknown))}")

    @classmethod
    def base_url_for(cls, provider_config: dict[str, Any]) -> str | None:
        """The endpoint when `--base-url` is not given."""
        return cls.default_base_url

    def upstream_model(self, model: str, catalog: ModelCatalog | None) -> str:
        """The provider's own name for `model` (the catalog's `ids`, for some types)."""
        return model

    def body_model(self, route: Route, model: str) -> str:
        """The `model` a request on `route` names in its body (as a rule, the model)."""
        return model

    def body(self, doc: dict[str, Any], model: str) -> dict[str, Any] | None:
        """The request body for `model` in the shape this provider takes, from one in its
        family's shape (None: as it is)."""
        return None

    def sign(self, attempt: Attempt, body: bytes) -> None:
        """Authenticate over the final request (a SigV4 signature); most types need not."""

    def prepare(self) -> None:
        """The config that names this provider was loaded: fetch what its first request
        would otherwise wait for (an OAuth token)."""

    def ambient_credential_problem(self) -> str | None:
        """Why a provider that takes its credential from the environment's own chain (AWS's,
        Google's ADC) finds none here; None when it finds one, or has a key of its own."""
        return None

    def family(self, model: str) -> str:
        """The API family the provider speaks for `model` (Vertex: Claude's or Gemini's)."""
        return self.wire

    def translated(self, route: Route, model: str = "") -> bool:
        return self.family(model) != route.family

    def serves_route(self, route: Route) -> bool:
        """The provider can serve `route`: in its own family, or through translation."""
        return not self.translated(route) or route.name in TRANSLATED_ROUTES

    def credential(self) -> str:
        p = self.provider
        if p.api_key_file:
            return read_key_file(p.id, p.api_key_file)
        value = os.environ.get(p.api_key_env) if p.api_key_env else None
        if not value:
            raise GatewayError(
                "provider_misconfigured",
                f"Model provider {p.id} has no credential: set the environment variable "
                f"{p.api_key_env or '(api_key_env is missing)'} on the gateway.")
        return value

    # -- responses ------------------------------------------------------------------------
    failure_statuses: ClassVar[dict[int, str]] = FAILURE_STATUSES

    def failure_kind(self, status: int) -> str | None:
        """The `fallback.on` condition a response status falls under (None: an answer)."""
        return self.failure_statuses.get(status)

    def meter(self, model: str, stream_requested: bool) -> ResponseMeter:
        """What reads a response's usage as it passes, in the provider's family for `model`."""
        return ResponseMeter(self.family(model), stream_requested)

    def error_message(self, status: int, body: bytes) -> str:
        """The provider's own words for an error, for the client family's envelope."""
        return error_message(status, body)

    def auth(self, client_headers: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
        """Headers that authenticate to the provider, and client headers to drop."""
        raise NotImplementedError

    def path(self, route: Route, model: str, client_path: str, stream: bool = False) -> str:
        """The upstream path (and query) for a request on `route` asking for `model`."""
        base = urlsplit(self.provider.base_url).path.rstrip("/")
        if self.translated(route):
            return base + WIRE_PATHS[TRANSLATED_ROUTES[route.name]]
        return base + client_path
