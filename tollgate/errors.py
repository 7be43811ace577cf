"""Errors the gateway answers itself, shaped like each API family's own errors.

An OpenAI SDK raises its usual exception classes on an OpenAI-shaped envelope and an
Anthropic SDK on an Anthropic-shaped one, so callers need no gateway-specific handling.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

# code -> (status, OpenAI error type, Anthropic error type)
CODES: dict[str, tuple[int, str, str]] = {
    "invalid_request": (400, "invalid_request_error", "invalid_request_error"),
    "no_provider_for_model": (400, "invalid_request_error", "invalid_request_error"),
    "model_not_priced": (400, "invalid_request_error", "invalid_request_error"),
    "invalid_api_key": (401, "authentication_error", "authentication_error"),
    "budget_exceeded": (402, "insufficient_quota", "billing_error"),
    "virtual_key_revoked": (403, "permission_error", "permission_error"),
    "virtual_key_disabled": (403, "permission_error", "permission_error"),
    "virtual_key_expired": (403, "permission_error", "permission_error"),
    "model_not_allowed": (403, "permission_error", "permission_error"),
    "tool_not_allowed": (403, "permission_error", "permission_error"),
    "mcp_not_allowed": (403, "permission_error", "permission_error"),
    "url_not_allowed": (403, "permission_error", "permission_error"),
    "not_found": (404, "invalid_request_error", "not_found_error"),
    "method_not_allowed": (405, "invalid_request_error", "invalid_request_error"),
    "payload_too_large": (413, "invalid_request_error", "request_too_large"),
    "rate_limited": (429, "rate_limit_error", "rate_limit_error"),
    "gateway_error": (500, "server_error", "api_error"),
    "provider_unreachable": (502, "server_error", "api_error"),
    "provider_misconfigured": (502, "server_error", "api_error"),
    "provider_invalid_response": (502, "server_error", "api_error"),
    "gateway_unavailable": (503, "server_error", "overloaded_error"),
    "provider_timeout": (504, "server_error", "timeout_error"),
}


@dataclass
class GatewayError(Exception):
    code: str
    message: str
    param: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    # What fired (rule, tool, budget...): shown with the decision in logs and mitmweb.
    context: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.code not in CODES:
            raise ValueError(f"unknown gateway error code {self.code!r}")
        super().__init__(self.message)

    @property
    def status(self) -> int:
        return CODES[self.code][0]

    def body_for_any_family(self) -> bytes:
        """One envelope both SDKs read, for a reply written before the family is known:
        Anthropic's shape, which also carries what OpenAI's reads (`error.message`,
        `error.code`, `error.type`)."""
        _, _, anthropic_type = CODES[self.code]
        return json.dumps({"type": "error", "error": {
            "type": anthropic_type, "message": self.message, "code": self.code,
            "param": self.param}}).encode()

    def body(self, family: str) -> bytes:
        """The error envelope of the client's API family."""
        _, openai_type, anthropic_type = CODES[self.code]
        if family == "anthropic":
            doc: dict[str, object] = {
                "type": "error",
                "error": {"type": anthropic_type, "message": self.message, "code": self.code},
            }
        else:
            doc = {"error": {"message": self.message, "type": openai_type,
                             "code": self.code, "param": self.param}}
        return json.dumps(doc).encode()
