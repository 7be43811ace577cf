"""Reading Envoy's admin API (extproc/envoy_admin.py): kept connections, errors as
AdminError, and the ext_proc process left without an HTTP client library."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler

import pytest

from extproc.envoy_admin import AdminError, EnvoyAdmin
from tests.harness import QuietHTTPServer


class Admin(BaseHTTPRequestHandler):
    """An admin API that answers each GET with its path, as JSON, or as told by `status`
    and `body`; counts the connections it accepts."""

    protocol_version = "HTTP/1.1"  # kept alive, as Envoy's admin
    connections: list[socket.socket] = []
    status = 200
    body: bytes | None = None

    def setup(self) -> None:
        super().setup()
        type(self).connections.append(self.connection)

    def do_GET(self) -> None:
        body = self.body if self.body is not None else json.dumps({"path": self.path}).encode()
        self.send_response(self.status)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def admin() -> Iterator[tuple[str, type[Admin]]]:
    handler = type("Handler", (Admin,), {"connections": []})
    server = QuietHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


def test_gets_go_on_one_kept_connection_with_their_parameters(admin):
    address, handler = admin
    client = EnvoyAdmin(address, timeout=2)
    try:
        assert client.json("/clusters", format="json") == {"path": "/clusters?format=json"}
        assert client.get("/stats/prometheus", usedonly="") \
            == b'{"path": "/stats/prometheus?usedonly="}'
        assert len(handler.connections) == 1
    finally:
        client.close()


def test_a_connection_envoy_closed_while_idle_is_opened_again(admin):
    address, handler = admin
    client = EnvoyAdmin(address, timeout=2)
    try:
        client.get("/ready")
        handler.connections[0].shutdown(socket.SHUT_RDWR)  # Envoy let it go meanwhile
        assert client.json("/ready") == {"path": "/ready"}
        assert len(handler.connections) == 2
    finally:
        client.close()


def test_an_error_answer_is_an_admin_error_and_the_connection_stays(admin):
    address, handler = admin
    handler.status, handler.body = 503, b"no healthy upstream"
    client = EnvoyAdmin(address, timeout=2)
    try:
        with pytest.raises(AdminError, match="503"):
            client.get("/clusters")
        handler.status, handler.body = 200, b"not json"
        with pytest.raises(AdminError, match="not JSON"):
            client.json("/clusters")
        assert len(handler.connections) == 1
    finally:
        client.close()


def test_an_admin_not_listening_or_too_slow_is_an_admin_error_tried_once():
    with socket.socket() as idle:
        idle.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{idle.getsockname()[1]}"
        with pytest.raises(AdminError):  # not listening yet
            EnvoyAdmin(address, timeout=1).get("/clusters")
        idle.listen()
        client = EnvoyAdmin(address, timeout=0.2)
        with pytest.raises(AdminError, match="timed out"):  # accepted, never answered
            client.get("/clusters")
        accepted = []
        idle.settimeout(0.1)
        try:
            while True:
                accepted.append(idle.accept()[0])
        except TimeoutError:
            pass
        assert len(accepted) == 1  # not tried again: a timeout is not a closed connection
        for conn in accepted:
            conn.close()


def test_a_closed_client_reads_nothing_more(admin):
    address, _ = admin
    client = EnvoyAdmin(address, timeout=2)
    client.get("/ready")
    client.close()
    with pytest.raises(AdminError, match="closed"):
        client.get("/ready")


def test_an_extproc_process_imports_no_http_client_library():
    """Every ext_proc process reads its Envoy's admin: with httpx (and its imports) for
    that, each held some 7.6 MiB more, of the 100 MiB it has."""
    entry = ("import sys, extproc.runner, extproc.worker, extproc.decider, tollgate.cli.main; "
             "print(sorted(m for m in ('httpx', 'httpcore', 'h11', 'anyio', 'requests', "
             "'aiohttp') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", entry], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_envoy_stats_for_metrics_come_whole_or_say_why_not(admin):
    """The gateway's `/metrics` carries Envoy's own stats; an admin that cannot be read
    leaves a comment there, never an error for the scrape."""
    from extproc.runner import envoy_stats

    address, handler = admin
    handler.body = b"envoy_cluster_upstream_rq_total 3\n"
    assert envoy_stats(address)() == b"envoy_cluster_upstream_rq_total 3\n"
    handler.status, handler.body = 503, b"starting"
    said = envoy_stats(address)()
    assert said.startswith(b"# envoy stats unavailable: ") and b"503" in said


def test_loaded_clusters_keep_what_they_knew_while_the_admin_cannot_be_read(admin):
    from extproc.runner import LoadedClusters

    address, handler = admin
    handler.body = json.dumps({"cluster_statuses": [{"name": "provider_a"}]}).encode()
    clusters = LoadedClusters(address)
    clusters._fetch()
    assert clusters.get() == {"provider_a"}
    for status, body in [(503, b"no"), (200, b"not json"), (200, b"[]")]:
        handler.status, handler.body = status, body
        clusters._fetch()
        assert clusters.get() == {"provider_a"}
    clusters.stop()
    clusters._fetch()  # stopped: the admin is closed, nothing is read or raised
    assert clusters.get() == {"provider_a"}
