"""The plain data that crosses between a host (mitmproxy, Envoy) and the core."""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tollgate.errors import GatewayError

if TYPE_CHECKING:
    from tollgate.exchange import Exchange
    from tollgate.providers.base import Adapter


def lower_headers(pairs: Any) -> dict[str, str]:
    """Case-insensitive view of request headers; repeated headers are joined with ', '."""
    out: dict[str, str] = {}
    for name, value in pairs:
        key = name.lower()
        out[key] = f"{out[key]}, {value}" if key in out else value
    return out


_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
MAX_HEADER_BYTES = 64 * 1024  # Envoy's listener is rendered with the same cap


def check_header_values(headers: Mapping[str, str],
                        only: Collection[str] | None = None) -> None:
    """Refuse control characters in header values (CR, LF, NUL...) and oversized headers:
    what a proxy let through must not be handed on to a provider. `only`: the headers whose
    values are looked at (the others' passed before)."""
    size = sum(len(k) + len(v) + 4 for k, v in headers.items())
    if size > MAX_HEADER_BYTES:
        raise GatewayError("invalid_request", f"Request headers are {size} bytes; this "
                           f"gateway accepts at most {MAX_HEADER_BYTES}.")
    looked_at = headers.items() if only is None else \
        [(name, headers[name]) for name in only if name in headers]
    for name, value in looked_at:
        if _CONTROL.search(value):
            raise GatewayError("invalid_request", f"Header {name!r} holds a control "
                               "character; nothing was forwarded.")


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # path and query, as the client sent them
    headers: Mapping[str, str]  # lower-case names
    body: bytes
    peer: str = ""
    # Body size announced by the client when the host answers before reading the body.
    declared_length: int | None = None
    # The host's name for the request's method, path and headers, when it gives them one
    # (the Envoy host: the client head as the decide filter encodes it): requests with the
    # same name differ in their bodies alone (see `precedent.KnownHead`).
    head: str | None = None

    @property
    def body_size(self) -> int:
        return max(len(self.body), self.declared_length or 0)

    def with_body(self, body: bytes) -> Request:
        """The same request line and headers (shared, as every field) with another body: a
        host that names heads (`head`) makes each request of a head it has seen so, without
        building its headers again."""
        request = object.__new__(Request)
        request.__dict__.update(self.__dict__, body=body)
        return request


@dataclass
class Reply:
    """An answer the gateway gives itself (an error, or a gateway-served route)."""

    status: int
    headers: dict[str, str]
    body: bytes
    decision: dict[str, Any] = field(default_factory=dict)


@dataclass
class Attempt:
    """Where and how to send the request to one provider."""

    provider_id: str
    scheme: str
    host: str
    port: int
    path: str
    set_headers: dict[str, str]
    remove_headers: list[str]
    body: bytes | None = None  # None: the client's bytes, unchanged
    family: str = "openai"  # the provider's API family
    model: str = ""  # the model this provider is asked for (its canonical, priced name)
    body_model: str = ""  # the `model` its body names, when not `model` (an Azure deployment)
    translated: bool = False  # the provider speaks another family than the client
    strip_usage: bool = False  # a usage chunk the gateway asked for is hidden from the client
    reframed: bool = False  # its streams are turned into SSE (Bedrock's event-stream frames)
    foreign_errors: bool = False  # its errors are rewritten into the client's envelope
    connect_timeout: float = 10.0
    first_byte_timeout: float = 120.0
    adapter: Adapter = field(kw_only=True, repr=False)  # the provider type's adapter

    def copy(self) -> Attempt:
        """A shallow copy, as `copy.copy` makes (its header maps shared): in a third of
        that one's time, which goes through the pickling protocol."""
        attempt = object.__new__(type(self))
        attempt.__dict__.update(self.__dict__)
        return attempt

    @property
    def prices(self) -> dict[str, Any]:
        """The provider's own prices (a contract price), which win over the table's."""
        return self.adapter.provider.prices

    @property
    def authority(self) -> str:
        default = 443 if self.scheme == "https" else 80
        return self.host if self.port == default else f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.authority}{self.path}"


@dataclass
class Forward:
    """Send the request upstream; the exchange follows the response to its end.

    `exchange.cursor.attempts` holds the fallback plan; `attempt` is the first of it."""

    exchange: Exchange
    attempt: Attempt
