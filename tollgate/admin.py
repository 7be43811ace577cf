"""The admin address: `/healthz` (the process is alive), `/readyz` (config loaded and not
stale, state store reachable, every provider has a credential) and `/metrics` (Prometheus
text format: the gateway's metrics, the process's, and on the Envoy host Envoy's own).
Served from a thread, so it answers even when the event loop is busy."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import threading
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import prometheus_client
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from tollgate import metrics, telemetry
from tollgate.config.lint import missing_credentials
from tollgate.config.watch import file_digest

if TYPE_CHECKING:
    from tollgate.gateway import Gateway

log = logging.getLogger("tollgate.admin")


def readiness(gateway: Gateway, loop: asyncio.AbstractEventLoop | None
              ) -> tuple[list[str], list[str]]:
    """Why the gateway is not ready to serve (empty when it is), and what is degraded but
    still served (a store that is down when budgets fail open)."""
    holder = gateway.holder
    problems: list[str] = []
    store_problems: list[str] = []
    degraded: list[str] = []
    if holder.last_error:
        # The last good config still serves: one typo must not pull every replica out of
        # rotation. The rejection shows here, in tollgate_config_reload_failing and the log.
        degraded.append(f"config reload rejected, serving the last good config: "
                        f"{holder.last_error}")
    elif holder.status.get("loaded_sha256") != file_digest(holder.path):
        problems.append("the config file changed and is not loaded yet")
    problems += missing_credentials(holder.current.config)
    # Spans lost, requests still served: degraded, not unready.
    export = telemetry.export_problem(holder.current.config.gateway.telemetry)
    if export:
        degraded.append(export)
    if loop is not None and loop.is_running():
        ping = asyncio.run_coroutine_threadsafe(gateway.store().ping(), loop)
        try:
            ping.result(timeout=3)
        except FutureTimeout:
            ping.cancel()
            store_problems.append("state store did not answer within 3 s")
        except Exception as e:
            store_problems.append(f"state store unreachable: {e}")
    if holder.current.config.gateway.fail_closed:
        return problems + store_problems, degraded
    return problems, degraded + store_problems


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A probe or scraper that hangs up mid-exchange is no error; any other failure goes
        to the log, where socketserver would print a bare traceback to stderr."""
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        log.exception("admin endpoint: a request from %s failed", client_address[0])


class AdminServer:
    def __init__(self, gateway: Gateway, listen: tuple[str, int],
                 loop: asyncio.AbstractEventLoop | None = None,
                 more_metrics: Callable[[], bytes] | None = None,
                 siblings_metrics: str | None = None):
        """`more_metrics` returns more exposition text (Envoy's stats) for `/metrics`;
        `siblings_metrics`: where this gateway's other ext_proc processes keep theirs."""
        admin = self
        scraped = CollectorRegistry()
        scraped.register(metrics.GatewayCollector(gateway, loop))
        requests = metrics.REGISTRY
        if siblings_metrics is not None:
            requests = CollectorRegistry()
            requests.register(metrics.WithSiblings(siblings_metrics))

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                path = self.path.split("?")[0]
                if path == "/healthz":
                    self._send(200, {"status": "ok"})
                elif path == "/readyz":
                    problems, degraded = readiness(gateway, admin.loop)
                    self._send(503 if problems else 200,
                               {"status": "unready" if problems else "ready",
                                "problems": problems, "degraded": degraded})
                elif path == "/metrics":
                    text = generate_latest(requests) + generate_latest(scraped) + \
                        generate_latest(prometheus_client.REGISTRY)
                    if more_metrics is not None:
                        text += more_metrics()
                    self._send_raw(200, CONTENT_TYPE_LATEST, text)
                else:
                    self._send(404, {"error": "not found: /healthz, /readyz, /metrics"})

            def _send(self, status: int, doc: Any) -> None:
                self._send_raw(status, "application/json", json.dumps(doc).encode())

            def _send_raw(self, status: int, content_type: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("content-type", content_type)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.loop = loop
        self.server = _Server(listen, Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, name="tollgate-admin",
                                       daemon=True)

    def start(self) -> AdminServer:
        self.thread.start()
        host, port = self.server.server_address[:2]
        log.info("admin endpoints on http://%s:%s (/healthz /readyz /metrics)", host, port)
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
