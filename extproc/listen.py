"""Where ext_proc listens, and who may connect.

Its answers carry provider credentials, so it is never open to anyone who can reach a port:
a Unix socket only its own user can open (the default), or TCP with mutual TLS, or TCP in
the clear only when asked for by name (`--insecure-tcp`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from tollgate.statedir import state_dir

log = logging.getLogger("tollgate.extproc")


class ListenError(ValueError):
    """The listen address and its security options do not go together."""


@dataclass(frozen=True)
class ServerTLS:
    cert: Path  # the server's certificate chain (PEM)
    key: Path
    client_ca: Path  # clients (Envoy) must present a certificate this CA signed

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.key.read_bytes(), self.cert.read_bytes())],
            root_certificates=self.client_ca.read_bytes(), require_client_auth=True)

    def ssl_context(self) -> ssl.SSLContext:
        """The same mutual TLS for a plain TLS server (the decision service), checking
        certificates as gRPC does (not with Python's stricter X.509 defaults)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(str(self.cert), str(self.key))
        context.load_verify_locations(cafile=str(self.client_ca))
        context.verify_mode = ssl.CERT_REQUIRED
        return context


@dataclass(frozen=True)
class Listener:
    target: str  # unix:/path or host:port
    tls: ServerTLS | None = None
    insecure_tcp: bool = False
    # Where its decision service listens, with the same protection (see
    # `envoy_config.decider_targets`); "": beside `target`.
    decider: str = ""

    @property
    def is_unix(self) -> bool:
        return self.target.startswith("unix:")

    @property
    def socket_path(self) -> Path:
        return Path(self.target.removeprefix("unix:"))


def default_socket(config_path: Path) -> str:
    """The Unix socket beside the config (`tollgate envoy render` points Envoy at it)."""
    return f"unix:{state_dir(config_path) / 'extproc.sock'}"


def listener(target: str, tls_cert: str | None = None, tls_key: str | None = None,
             tls_client_ca: str | None = None, insecure_tcp: bool = False) -> Listener:
    """Check that a TCP address comes with mTLS or an explicit --insecure-tcp."""
    given = [v for v in (tls_cert, tls_key, tls_client_ca) if v]
    if given and len(given) != 3:
        raise ListenError("mTLS needs all three of --tls-cert, --tls-key and --tls-client-ca")
    tls = ServerTLS(Path(tls_cert), Path(tls_key), Path(tls_client_ca)) \
        if tls_cert and tls_key and tls_client_ca else None
    if target.startswith("unix:"):
        if tls or insecure_tcp:
            raise ListenError("--tls-* and --insecure-tcp are for TCP addresses; a Unix "
                              "socket is protected by its file mode (0600)")
        return Listener(target)
    if tls is None and not insecure_tcp:
        raise ListenError(
            f"ext_proc on TCP {target} would hand provider credentials to anyone who can "
            "connect to it. Use a Unix socket (the default), mutual TLS (--tls-cert, "
            "--tls-key, --tls-client-ca), or say --insecure-tcp if the port is private.")
    if tls is not None and insecure_tcp:
        raise ListenError("choose mTLS or --insecure-tcp, not both")
    for path in (tls.cert, tls.key, tls.client_ca) if tls else ():
        if not path.is_file():
            raise ListenError(f"{path}: no such file")
    return Listener(target, tls, insecure_tcp)


@contextlib.contextmanager
def _private_umask() -> Iterator[None]:
    old = os.umask(0o177)
    try:
        yield
    finally:
        os.umask(old)


def accepts(path: str | Path) -> bool:
    """Whether a process listens on the Unix socket `path`: False for no file, a socket left
    by a process that died, or one bound a moment before its process listens."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def ensure_unused(target: str) -> None:
    """A Unix socket another ext_proc still serves on is not taken over (its file would be
    replaced, and Envoy's new connections would reach this process instead)."""
    if not target.startswith("unix:") or not accepts(target.removeprefix("unix:")):
        return
    raise ListenError(f"{target}: another ext_proc already serves on this socket: stop it or "
                      "choose another with --listen")


@contextlib.contextmanager
def private_socket(where: Listener) -> Iterator[Path]:
    """Around creating the Unix socket `where`: its directory is made 0700, a socket another
    server still serves on is refused, one left by a process that died is removed, and the
    socket is created 0600 (no moment at which it is open to others)."""
    path = where.socket_path
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    ensure_unused(where.target)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    with _private_umask():
        yield path


def bind(server: grpc.aio.Server, where: Listener) -> None:
    """Add the listening port; a Unix socket is created 0600 in a 0700 directory."""
    if where.is_unix:
        with private_socket(where):
            server.add_insecure_port(where.target)
        return
    if where.tls is not None:
        server.add_secure_port(where.target, where.tls.credentials())
        return
    log.warning("ext_proc listens on TCP %s WITHOUT TLS (--insecure-tcp): anyone who can "
                "connect gets provider credentials in its answers", where.target)
    server.add_insecure_port(where.target)


def restrict(where: Listener) -> None:
    """After start: make sure the socket file is the owner's alone."""
    if where.is_unix and where.socket_path.exists():
        os.chmod(where.socket_path, 0o600)
