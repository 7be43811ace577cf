"""Addresses the gateway listens on, checked before it starts: a second gateway on an address
in use fails with the address named, instead of sharing it (`SO_REUSEPORT`, which Envoy and
gRPC set by default, would split the traffic between two gateways, perhaps on two configs)."""

from __future__ import annotations

import errno
import socket


class AddressInUse(RuntimeError):
    """Another process listens on an address the gateway needs."""


def ensure_free(host: str, port: int, what: str) -> None:
    """Raise AddressInUse when something listens on host:port. `what` names the address
    for the user, e.g. "--admin"."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # A connection of an earlier run in TIME_WAIT is no conflict; a listener is.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise AddressInUse(
                    f"{what} {host}:{port} is already in use (another gateway, or another "
                    f"program): stop it or choose another address") from None
            if e.errno == errno.EADDRNOTAVAIL:
                raise AddressInUse(f"{what} {host}:{port}: no such address on this "
                                   "machine") from None
            raise
