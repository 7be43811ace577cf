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

  With `store` (a state file tollgate's SQLite store made), each models a decision service
  that does what costs most in tollgate's and nothing else: each decision runs the key's
  HMAC, takes a request id, runs the store's reservation and write-ahead and asks a stream
  for its usage (its body replaced), and a response's last meter post its settlement
  (answerer.c says which statements; `Modelled` runs the same ones). tollgate's meter filter
  no longer posts a response's end (Envoy's access log carries it, after the client's
  answer, which the answerers do not serve): behind its Envoy the models settle nothing,
  and tollgate settles off the answer's path. Compiled: what a
  compiled decision would cost on the request's path, measured, not estimated. Python: what
  the same work costs in Python, written as one straight path (tollgate's decision spends
  several times that: the difference is the code and data its path touches, not Python).
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
import base64
import hashlib
import hmac
import os
import shutil
import sqlite3
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
    `compiled=False`: the Python one; `store`: the model of a decision service, on that
    state file."""
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


# The model's counter, worst case and cost, and its key's pepper: answerer.c's.
COUNTER, AMOUNT, COST = "model:budget", 4242, 21
PEPPER = b"a pepper of thirty-two bytes ..."
LEDGER = ("INSERT OR IGNORE INTO ledger (request_id, ts, key_id, key_name, org, provider, "
          "model, route, input_tokens, output_tokens, cached_input_tokens, cache_write_tokens, "
          "reasoning_tokens, cost_micros, usage_reported, status, outcome, latency_ms, "
          "fallback_count) VALUES (?1, '2026-12-05T00:00:00.000000+00:00', 'vk_model', "
          "'model', 'acme', 'mp_openai', 'gpt-5-mini', 'chat_completions', 12, 9, 0, 0, 0, ?2, "
          "1, 200, 'completed', 0.3, 0)")


class Modelled:
    """The Python answerer's model of a decision service (`--store`): answerer.c's decision
    and settlement, statement for statement, in one straight path each."""

    def __init__(self, database: str, row: str, head: bytes) -> None:
        self.db = sqlite3.connect(database, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.row = Path(row).read_text()
        self.head = head  # the decision's headers, without the request id or an end
        self.keyed = hmac.new(PEPPER, digestmod=hashlib.sha256)
        self.pid = os.getpid()

    def decide(self, head: bytes, body: bytes) -> bytes:
        at = head.find(b"\r\nx-tollgate-head:")
        client = base64.b64decode(head[at + 18:].split(b"\r\n", 1)[0].strip() + b"==")
        at = client.find(b"authorization: Bearer ")
        mac = self.keyed.copy()
        mac.update(client[at + 22:].split(b"\n", 1)[0] if at >= 0 else b"")
        mac.digest()
        request_id = "req_" + os.urandom(10).hex()
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        db.execute("SELECT spent, reserved FROM budget_counters WHERE counter = ?",
                   (COUNTER,)).fetchall()
        db.execute("INSERT INTO budget_counters (counter, reserved) VALUES (?1, ?2) "
                   "ON CONFLICT (counter) DO UPDATE SET reserved = reserved + ?2",
                   (COUNTER, AMOUNT))
        db.execute("INSERT OR REPLACE INTO holds (request_id, counter, amount, pid, started) "
                   "VALUES (?1, ?2, ?3, ?4, 0)", (request_id, COUNTER, AMOUNT, self.pid))
        db.execute("COMMIT")
        db.execute("INSERT OR REPLACE INTO inflight (request_id, pid, started, row) "
                   "VALUES (?1, ?2, 0, ?3)", (request_id, self.pid, self.row % request_id))
        named = b"x-tollgate-meta-request_id: " + request_id.encode() + b"\r\n"
        if b'"stream": true' in body and b"include_usage" not in body and body[:1] == b"{":
            asked = b'{"stream_options": {"include_usage": true}, ' + body[1:]
            return b"".join((self.head, named, b"x-tollgate-set-content-length: %d\r\n"
                             b"x-tollgate-meta-cut_usage: 1\r\nx-tollgate-body: replaced\r\n"
                             b"content-length: %d\r\n\r\n" % (len(asked), len(asked)), asked))
        return b"".join((self.head, named, b"content-length: 0\r\n\r\n"))

    def settle(self, head: bytes) -> None:
        """The response's last meter post settles its request."""
        if b"\r\nx-tollgate-end: 1" not in head:
            return
        at = head.find(b"\r\nx-tollgate-request:")
        request_id = head[at + 21:].split(b"\r\n", 1)[0].strip().decode()
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        db.execute("DELETE FROM inflight WHERE request_id = ?1", (request_id,))
        db.execute("DELETE FROM holds WHERE request_id = ?1", (request_id,))
        db.execute(LEDGER, (request_id, COST))
        db.execute("INSERT INTO budget_counters (counter, spent) VALUES (?1, ?2) "
                   "ON CONFLICT (counter) DO UPDATE SET spent = spent + ?2, "
                   "reserved = MAX(0, reserved - ?3)", (COUNTER, COST, AMOUNT))
        db.execute("COMMIT")


class Answering(asyncio.Protocol):
    """The Python answerer's connection: each whole request answered as answerer.c does."""

    def __init__(self, answer: bytes, model: Modelled | None = None) -> None:
        self.answer = answer
        self.model = model
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            # Header names come lower-cased from Envoy; values are read as they came.
            head = bytes(self.buffer[:end + 2])
            at = head.find(b"\r\ncontent-length:")
            length = int(head[at + 17:].split(b"\r\n", 1)[0]) if at >= 0 else 0
            if len(self.buffer) < end + 4 + length:
                return
            body = bytes(self.buffer[end + 4:end + 4 + length]) if self.model else b""
            del self.buffer[:end + 4 + length]
            meter = head.startswith(b"POST /meter")
            if self.model is None:
                self.transport.write(NO_CONTENT if meter else self.answer)
            elif meter:
                self.transport.write(NO_CONTENT)
                self.model.settle(head)
            else:
                self.transport.write(self.model.decide(head, body))


async def serve(socket: Path, answer: bytes, store: list[str]) -> None:
    """The Python answerer: `answer` to every decision on `socket`, until it is stopped;
    `store` (DATABASE ROW, or nothing): the model's."""
    socket.unlink(missing_ok=True)
    model = Modelled(store[0], store[1], answer) if store else None
    loop = asyncio.get_running_loop()
    server = await loop.create_unix_server(lambda: Answering(answer, model), str(socket),
                                           backlog=4096)
    print("ready", flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    from extproc import eventloop

    if len(sys.argv) not in (3, 6) or sys.argv[3:4] not in ([], ["--store"]):
        sys.exit("usage: python -m bench.answerer SOCKET ANSWER [--store DATABASE ROW]")
    eventloop.run(serve(Path(sys.argv[1]), Path(sys.argv[2]).read_bytes(), sys.argv[4:]))
