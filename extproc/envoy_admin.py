"""Envoy's admin API, as the gateway reads it: a few GETs on a local plain-HTTP address
(its loaded clusters, its stats, its config dump).

On the standard library's `http.client`, not an HTTP client library: every ext_proc process
reads its Envoy's admin, and the library alone (with its imports) held some 7.6 MiB of the
process's resident memory, of a budget of 100 MiB, for a handful of requests to localhost."""

from __future__ import annotations

import http.client
import json
import threading
from typing import Any
from urllib.parse import urlencode


class AdminError(Exception):
    """Envoy's admin could not be read: not listening (yet), too slow, or it answered an
    error."""


class EnvoyAdmin:
    """GETs to the admin at `address` ("host:port"), on one keep-alive connection opened
    again when it broke. Safe to share between threads: one request at a time."""

    def __init__(self, address: str, timeout: float) -> None:
        self.address, self.timeout = address, timeout
        self._conn: http.client.HTTPConnection | None = None
        self._lock = threading.Lock()
        self._closed = False

    def get(self, path: str, **params: str) -> bytes:
        """The body of a 200 answer to GET `path`?`params` (AdminError: none came)."""
        target = f"{path}?{urlencode(params)}" if params else path
        with self._lock:
            if self._closed:
                raise AdminError("closed")
            while True:
                reused = self._conn is not None
                try:
                    return self._get(target)
                except (OSError, http.client.HTTPException) as e:
                    self._drop()
                    # A kept connection Envoy closed while it was idle fails its next
                    # request at once: that one is tried again, on a new connection.
                    if not (reused and isinstance(e, ConnectionError)):
                        raise AdminError(f"{self.address}{path}: {e or type(e).__name__}"
                                         ) from None

    def json(self, path: str, **params: str) -> Any:
        """GET `path` as JSON (AdminError: not read, or not JSON)."""
        body = self.get(path, **params)
        try:
            return json.loads(body)
        except ValueError as e:
            raise AdminError(f"{self.address}{path}: not JSON ({e})") from None

    def _get(self, target: str) -> bytes:
        if self._conn is None:
            self._conn = http.client.HTTPConnection(self.address, timeout=self.timeout)
        self._conn.request("GET", target)
        response = self._conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise AdminError(f"{self.address}{target.partition('?')[0]}: "
                             f"{response.status} {body[:200]!r}")
        return body

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def close(self) -> None:
        """Close the connection; a request under way ends first, any later one fails."""
        with self._lock:
            self._closed = True
            self._drop()
