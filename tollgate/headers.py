"""Which headers cross the gateway, each way: one place, used by both hosts and every attempt.

Upstream, a provider gets the client's headers less: the client's credentials (the provider's
own are set instead), headers that describe one connection, the gateway's and Envoy's own
controls, and the headers that choose which provider account is billed (the provider
credential decides that, never the client). Downstream, a client gets the provider's headers
less the ones that belong to the gateway's provider account: its cookies and its
organization and project ids.
"""

from __future__ import annotations

from collections.abc import Iterable

from tollgate.secrets import CREDENTIAL_HEADERS

# Headers that describe one connection, not the message (RFC 9110 7.6.1, and the ones
# proxies add). `connection` itself, and a body's framing (content-length,
# transfer-encoding), are each host's to handle: mitmproxy reads a client's
# `connection: close` from the request to close that client's connection after the answer,
# and Envoy drops them itself.
HOP_BY_HOP = frozenset({"keep-alive", "proxy-connection", "te", "trailer", "upgrade",
                        "proxy-authenticate", "proxy-authorization"})
# Request headers that pick the provider account a request is billed to.
ACCOUNT_SELECTORS = frozenset({"openai-organization", "openai-project", "x-goog-user-project"})
# Set by the gateway for its host (Envoy's routing) and by Envoy's router: never a client's.
GATEWAY_PREFIX = "x-tollgate-"
ENVOY_PREFIX = "x-envoy-"
# Response headers that belong to the gateway's own provider account.
PROVIDER_ACCOUNT = frozenset({"set-cookie", "set-cookie2", "openai-organization",
                              "openai-project", "anthropic-organization-id"})


def upstream_removals(client_headers: Iterable[str], gateway_prefix: str) -> list[str]:
    """The client's headers a provider never gets (names lower-cased)."""
    prefixes = (gateway_prefix.lower(), GATEWAY_PREFIX, ENVOY_PREFIX)
    out = []
    for name in client_headers:
        low = name.lower()
        if low in CREDENTIAL_HEADERS or low in HOP_BY_HOP or low in ACCOUNT_SELECTORS \
                or low.startswith(prefixes):
            out.append(low)
    return out


def downstream_removals(provider_headers: Iterable[str]) -> list[str]:
    """The provider's response headers a client never gets (names lower-cased)."""
    return [n.lower() for n in provider_headers if n.lower() in PROVIDER_ACCOUNT]
