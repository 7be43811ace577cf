"""Decision services that do no work, a model of a compiled one that does, and an Envoy
that asks one with no Lua: the layers under bench.breakdown's floor.

- `answerer`: a decision service on a Unix socket that answers the decide filter's exchange
  from memory, with one decision tollgate made (`decided`), and every meter post 204. It
  reads each request whole before it answers (an HTTP/1.1 server that answers a request
  before its body has come closes the connection, and Envoy would open one per decision).
  One process, one thread, as a decision service is. Two of them:
  - compiled (answerer.c, built with the machine's C compiler on first use): the least a
    service in another process can cost the exchange;
  - Python (`python -m bench.answerer SOCKET ANSWER`): the same on the event loop the
    decision service runs on (extproc.eventloop), with nothing of tollgate's: what a Python
    process costs beyond it.

  An Envoy answering by itself stood in for the compiled one before: it cost the exchange
  about 0.2 ms more than answerer.c, cold, which the layers above it were then read short.

  With `store` (a state file tollgate's SQLite store made), the compiled one models a
  compiled decision service: each decision also runs what costs most in tollgate's (the key's
  HMAC, a request id, the store's reservation and write-ahead, the stream's body asked for
  usage), and each response's last meter post its settlement (answerer.c says which
  statements). What a compiled decision would cost on the request's path, measured, not
  estimated.
- `round_trip`: an Envoy in front of the provider whose one filter before the router is
  ext_authz (C++) asking the compiled answerer, with the request's body, and putting the
  answer's credential on the request: one exchange with another process per request,
  without tollgate's Lua filters (the decision's, the meter's) or anything in Python.

tollgate's own Envoy in front of an answerer (`tollgate envoy render --decider`) is the floor
with tollgate's decision service taken out: the difference to `round_trip` is what
tollgate's filters cost, the difference to the floor what its decision service costs doing
no work.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from pathlib import Path
from typing import cast

from bench.scaling import WHOLE_REQUEST, cluster, envoy
from extproc.listen import accepts
from tests.harness import wait_until
from tollgate.ledger import LedgerRow

SOURCE = Path(__file__).with_name("answerer.c")
NO_CONTENT = b"HTTP/1.1 204 No Content\r\n\r\n"


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


def answer_bytes(decided: list[tuple[str, str]]) -> bytes:
    """The answer to every decision: 200, the decision's headers, no body."""
    head = "".join(f"{k}: {v}\r\n" for k, v in decided)
    return f"HTTP/1.1 200 OK\r\n{head}content-length: 0\r\n\r\n".encode()


def compiled_answerer(workdir: Path) -> Path:
    """answerer.c built into `workdir` (again only if the source is newer), with SQLite's and
    OpenSSL's headers and libraries (Debian: libsqlite3-dev, libssl-dev)."""
    binary = workdir / "answerer"
    if binary.exists() and binary.stat().st_mtime >= SOURCE.stat().st_mtime:
        return binary
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc) to build bench/answerer.c: install gcc")
    subprocess.run([compiler, "-O2", "-o", str(binary), str(SOURCE), "-lsqlite3", "-lcrypto"],
                   check=True)
    return binary


def written_ahead_row() -> str:
    """A written-ahead ledger row as tollgate writes one, with `%s` for its request id."""
    row = LedgerRow(request_id="%s", ts="2026-12-05T00:00:00.000000+00:00", key_id="vk_model",
                    key_name="model", principal=None, org="acme", team=None, project=None,
                    provider="mp_openai", model="gpt-5-mini", route="chat_completions",
                    input_tokens=12, cost_micros=21, usage_reported=False, outcome="interrupted",
                    latency_ms=0.3)
    return row.to_json().replace("%", "%%").replace("%%s", "%s", 1)


def answerer(workdir: Path, socket: Path, decided: list[tuple[str, str]],
             compiled: bool = True, store: Path | None = None) -> subprocess.Popen[bytes]:
    """An answerer on `socket` (see the module's docstring), once it accepts connections;
    `compiled=False`: the Python one; `store`: the model of a compiled decision service, on
    that state file (the compiled one only)."""
    if store is not None and not compiled:
        raise ValueError("only the compiled answerer models a decision service with a store")
    answer = workdir / f"{socket.stem}.answer"
    command = [str(compiled_answerer(workdir))] if compiled else \
        [sys.executable, "-m", "bench.answerer"]
    command += [str(socket), str(answer)]
    if store is None:
        answer.write_bytes(answer_bytes(decided))
    else:  # a head without its end: the model adds its request id (and a body)
        answer.write_bytes(answer_bytes([(k, v) for k, v in decided
                                         if k != "x-tollgate-meta-request_id"])
                           .removesuffix(b"content-length: 0\r\n\r\n"))
        row = workdir / f"{socket.stem}.row"
        row.write_text(written_ahead_row())
        command += ["--store", str(store), str(row)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != b"ready":
        proc.wait(10)
        raise RuntimeError(f"the answerer on {socket} did not start ({proc.returncode})")
    wait_until(lambda: accepts(socket), timeout=30, what="the answerer")
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


class Answering(asyncio.Protocol):
    """The Python answerer's connection: each whole request answered as answerer.c does."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head = bytes(self.buffer[:end]).lower()
            at = head.find(b"\r\ncontent-length:")
            length = int(head[at + 17:].split(b"\r\n", 1)[0]) if at >= 0 else 0
            if len(self.buffer) < end + 4 + length:
                return
            del self.buffer[:end + 4 + length]
            self.transport.write(NO_CONTENT if head.startswith(b"post /meter") else
                                 self.answer)


async def serve(socket: Path, answer: bytes) -> None:
    """The Python answerer: `answer` to every decision on `socket`, until it is stopped."""
    socket.unlink(missing_ok=True)
    loop = asyncio.get_running_loop()
    server = await loop.create_unix_server(lambda: Answering(answer), str(socket),
                                           backlog=4096)
    print("ready", flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    from extproc import eventloop

    eventloop.run(serve(Path(sys.argv[1]), Path(sys.argv[2]).read_bytes()))
