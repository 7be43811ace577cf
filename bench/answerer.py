"""A decision service that is not Python, and an Envoy that asks it with no Lua: the layers
under bench.breakdown's floor.

- `answerer`: an Envoy on a Unix socket that answers the decide filter's exchange from
  memory, with one decision tollgate made (`decided`), and every meter post 204: a compiled
  decision service that does no work. It reads each request whole before it answers (an
  HTTP/1.1 server that answers a request before its body has come closes the connection,
  and Envoy would open one per decision). One worker, as a decision service is one process.
- `round_trip`: an Envoy in front of the provider whose one filter before the router is
  ext_authz (C++) asking the answerer, with the request's body, and putting the answer's
  credential on the request: one exchange with another process per request, without
  tollgate's Lua filters (the decision's, the meter's) or anything in Python.

tollgate's own Envoy in front of the answerer (`tollgate envoy render --decider`) is the floor
with the Python service taken out: the difference to `round_trip` is what tollgate's filters
cost, the difference to the floor what its decision service costs doing no work.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from bench.scaling import WHOLE_REQUEST, cluster, envoy
from extproc.listen import accepts
from tests.harness import wait_until


def decided_headers(answer: bytes) -> list[tuple[str, str]]:
    """The decision's headers, from tollgate's answer to the decide filter (HTTP/1.1), and
    the provider's credential it sets, as `authorization` (what ext_authz puts on the
    request)."""
    head = answer.partition(b"\r\n\r\n")[0].decode()
    fields = [tuple(line.split(": ", 1)) for line in head.split("\r\n")[1:]]
    headers = [(k, v) for k, v in fields if k.startswith("x-tollgate-")]
    credential = dict(headers).get("x-tollgate-set-authorization")
    if credential is None:
        raise ValueError("the decision sets no authorization: not a forwarded request")
    return [*headers, ("authorization", credential)]


def answerer(workdir: Path, socket: Path, decided: list[tuple[str, str]]
             ) -> subprocess.Popen[bytes]:
    """The compiled answerer on `socket` (see the module's docstring), once it listens."""
    headers = [{"header": {"key": k, "value": v}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
               for k, v in decided]
    proc, _ = envoy(workdir, "answerer", [
        {"match": {"prefix": "/meter"}, "direct_response": {"status": 204}},
        {"match": {"prefix": "/"}, "direct_response": {"status": 200},
         "response_headers_to_add": headers}], [], (WHOLE_REQUEST,), socket=socket,
        args=("--concurrency", "1"))
    # Envoy binds the socket file before its worker listens on it: wait for a connection.
    wait_until(lambda: accepts(socket), timeout=30, what="the compiled answerer")
    return proc


def round_trip(workdir: Path, socket: Path, provider_port: int
               ) -> tuple[subprocess.Popen[bytes], str]:
    """An Envoy in front of the provider that asks the answerer on `socket` through
    ext_authz (see the module's docstring): the process and its URL."""
    ext_authz = {"name": "envoy.filters.http.ext_authz", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
        "http_service": {
            "server_uri": {"uri": "http://answerer", "cluster": "answerer", "timeout": "5s"},
            "path_prefix": "/decide",
            "authorization_response": {
                "allowed_upstream_headers": {"patterns": [{"exact": "authorization"}]},
                "dynamic_metadata_from_headers": {"patterns": [{"prefix": "x-tollgate-meta-"}]},
            }},
        "with_request_body": {
            "max_request_bytes": WHOLE_REQUEST["typed_config"]["max_request_bytes"],
            "pack_as_bytes": True},
        "clear_route_cache": True}}
    proc, port = envoy(
        workdir, "round-trip",
        {"match": {"prefix": "/"}, "route": {"cluster": "provider", "timeout": "60s"}},
        [cluster("provider", {"socket_address": {"address": "127.0.0.1",
                                                 "port_value": provider_port}}),
         cluster("answerer", {"pipe": {"path": str(socket)}})], (ext_authz,))
    return proc, f"http://127.0.0.1:{port}"
