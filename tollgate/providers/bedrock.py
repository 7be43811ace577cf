"""AWS Bedrock: Claude models through InvokeModel and InvokeModelWithResponseStream, with
the Anthropic Messages body Bedrock expects (`anthropic_version: bedrock-2023-05-31`, the
model in the URL); every other model (Nova, Llama, Mistral...) through Converse and
ConverseStream. Requests are signed with SigV4 by botocore's own signer.

    tollgate model-providers create --type bedrock --scope ORG:acme \\
        --provider-config '{"region": "us-east-1"}'

Credentials come from the standard AWS chain through botocore (environment, profile, role);
a Bedrock API key given with --api-key-env or --api-key-file is sent as a bearer token
instead. Streams come back as AWS event-stream frames, turned into Anthropic SSE event by
event (`tollgate.eventstream`).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

from tollgate.errors import GatewayError
from tollgate.providers.base import Adapter

if TYPE_CHECKING:
    from tollgate.catalog import ModelCatalog
    from tollgate.request import Attempt
    from tollgate.routes import Route

BEDROCK_VERSION = "bedrock-2023-05-31"
_credentials_lock = threading.Lock()
_credentials: Any = None  # botocore's resolved (and self-refreshing) credentials


def aws_credentials() -> Any:
    """The standard AWS chain, resolved once; botocore refreshes temporary credentials
    (a role's) by itself before they expire."""
    global _credentials
    with _credentials_lock:
        if _credentials is None:
            import botocore.session

            _credentials = botocore.session.Session().get_credentials()
        return _credentials


class Bedrock(Adapter):
    type = "bedrock"
    wire = "anthropic"
    vendor = "anthropic"
    gen_ai_provider = "aws.bedrock"
    default_models = ("claude-*", "anthropic.claude-*")
    reframes_streams = True
    key_optional = True

    config_keys = frozenset({"region"})

    def ambient_credential_problem(self) -> str | None:
        if self.provider.api_key_env or self.provider.api_key_file:
            return None  # a Bedrock API key, checked like any other key
        if aws_credentials() is None:
            return ("no AWS credentials in the gateway's environment (AWS_ACCESS_KEY_ID and "
                    "AWS_SECRET_ACCESS_KEY, AWS_PROFILE with ~/.aws, web identity, or an "
                    "instance or task role)")
        return None
    # Bedrock's ModelTimeoutException (408) and ModelErrorException (424) fail over like a
    # timeout and a 5xx; ThrottlingException and ModelNotReadyException are 429s.
    failure_statuses = {**Adapter.failure_statuses, 408: "timeout", 424: "5xx"}
    native_errors = False

    def error_message(self, status: int, body: bytes) -> str:
        """AWS errors are `{"message": ...}` (the type is in x-amzn-ErrorType)."""
        try:
            doc = json.loads(body)
        except ValueError:
            doc = None
        if isinstance(doc, dict):
            message = doc.get("message") or doc.get("Message")
            if isinstance(message, str) and message:
                return message
        return super().error_message(status, body)

    @classmethod
    def check_config(cls, provider_config: dict[str, Any]) -> None:
        super().check_config(provider_config)
        region = provider_config.get("region")
        if not isinstance(region, str) or not region:
            raise ValueError('bedrock needs provider_config.region, e.g. {"region": '
                             '"us-east-1"}')

    @classmethod
    def base_url_for(cls, provider_config: dict[str, Any]) -> str | None:
        region = provider_config.get("region")
        return f"https://bedrock-runtime.{region}.amazonaws.com" if region else None

    @property
    def region(self) -> str:
        return str(self.provider.provider_config["region"])

    def family(self, model: str) -> str:
        """Claude speaks Anthropic's Messages API here; every other model, Converse."""
        return "anthropic" if model.startswith(("claude", "anthropic.")) else "converse"

    def serves_route(self, route: Route) -> bool:
        return route.name in ("messages", "chat_completions")

    def upstream_model(self, model: str, catalog: ModelCatalog | None) -> str:
        return catalog.named(model, self.type) if catalog is not None else model

    def auth(self, client_headers: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
        drop = ["authorization", "x-api-key", "anthropic-version", "anthropic-beta"]
        if self.provider.api_key_env or self.provider.api_key_file:
            return {"authorization": f"Bearer {self.credential()}"}, drop[1:]
        return {}, drop  # signed once the body is final

    def path(self, route: Route, model: str, client_path: str, stream: bool = False) -> str:
        base = urlsplit(self.provider.base_url).path.rstrip("/")
        if self.family(model) == "converse":
            operation = "converse-stream" if stream else "converse"
        else:
            operation = "invoke-with-response-stream" if stream else "invoke"
        return f"{base}/model/{quote(model, safe='')}/{operation}"

    def body(self, doc: dict[str, Any], model: str) -> dict[str, Any] | None:
        """An Anthropic Messages body as Bedrock takes it: no model or stream field (a
        Converse body is already in its shape)."""
        if self.family(model) == "converse":
            return None
        out = {k: v for k, v in doc.items() if k not in ("model", "stream")}
        out["anthropic_version"] = BEDROCK_VERSION
        return out

    def sign(self, attempt: Attempt, body: bytes) -> None:
        """SigV4 over the final method, URL and body (a bearer key needs no signature)."""
        if "authorization" in attempt.set_headers:
            return
        from botocore.auth import SigV4Auth
        from botocore.awsrequest import AWSRequest

        credentials = aws_credentials()
        if credentials is None:
            raise GatewayError(
                "provider_misconfigured",
                f"Model provider {self.provider.id} (bedrock) has no AWS credentials: set "
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, a profile or a role on the "
                "gateway, or give a Bedrock API key with --api-key-env.")
        request = AWSRequest(method="POST", url=attempt.url, data=body,
                             headers={"content-type": "application/json"})
        SigV4Auth(credentials.get_frozen_credentials(), "bedrock", self.region).add_auth(
            request)
        for name in ("authorization", "x-amz-date", "x-amz-security-token"):
            if name in request.headers:
                attempt.set_headers[name] = request.headers[name]
        attempt.set_headers["content-type"] = "application/json"


ADAPTERS = [Bedrock]
