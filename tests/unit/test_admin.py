"""The admin endpoints' server (/healthz, /readyz, /metrics)."""

from __future__ import annotations

import contextlib
import socket
import struct
import time

import httpx

from tollgate import admin as admin_module
from tollgate.admin import AdminServer
from tollgate.gateway import Gateway


def _reset_midway(port: int) -> None:
    """A client that reads one answer, starts its next request and resets the connection
    (as a scraper that gives up may)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        assert s.recv(65536).startswith(b"HTTP/1.0 200")
        s.sendall(b"GET /heal")
        time.sleep(0.1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    time.sleep(0.2)  # the handler's thread meets the reset


async def test_a_client_that_hangs_up_is_no_error_and_a_failing_request_is_logged(
        config_dir, monkeypatch, capfd, caplog):
    """socketserver printed a bare traceback to stderr for either: a probe or scraper that
    resets its connection now leaves nothing, and a request the server fails goes to the
    log, named, not to stderr."""
    monkeypatch.setenv("TOLLGATE_KEY_PEPPER", "admin-pepper")
    gateway = Gateway.from_path(str(config_dir / "gateway.yaml"), watch=False)
    server = AdminServer(gateway, ("127.0.0.1", 0)).start()
    port = server.server.server_address[1]
    try:
        _reset_midway(port)
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").json() == {"status": "ok"}

        def broken(*_: object) -> None:
            raise RuntimeError("readiness broke")

        monkeypatch.setattr(admin_module, "readiness", broken)
        with contextlib.suppress(httpx.HTTPError):  # the connection ends, unanswered
            httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
        time.sleep(0.1)
    finally:
        server.stop()
        await gateway.close()
    assert "Exception occurred" not in capfd.readouterr().err
    assert "admin endpoint: a request from 127.0.0.1 failed" in caplog.text
    assert "readiness broke" in caplog.text
