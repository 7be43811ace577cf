"""bench.answerer: the compiled and the Python answerer answer the decide filter's exchange
from memory on one kept-alive connection, each request once it is whole, and the round
trip's Envoy asks the compiled one through ext_authz and forwards the request with the
credential it answered, as bench.breakdown's layers need."""

import base64
import json
import socket
import sqlite3

import httpx
import pytest

from bench.answerer import answerer, decided_headers, round_trip
from bench.breakdown import model_store
from bench.latency import BODY, PROVIDER_KEY, start_fake
from tests.harness import free_port, wait_until

ANSWER = (b"HTTP/1.1 200 OK\r\nx-tollgate-authority: 127.0.0.1:9\r\n"
          b"x-tollgate-set-authorization: Bearer " + PROVIDER_KEY.encode() + b"\r\n"
          b"x-tollgate-meta-request_id: req_1\r\ncontent-length: 0\r\n\r\n")


def test_the_decisions_headers_and_the_credential_it_sets_are_read_from_its_answer():
    assert decided_headers(ANSWER) == [
        ("x-tollgate-authority", "127.0.0.1:9"),
        ("x-tollgate-set-authorization", f"Bearer {PROVIDER_KEY}"),
        ("x-tollgate-meta-request_id", "req_1"),
        ("authorization", f"Bearer {PROVIDER_KEY}")]
    with pytest.raises(ValueError, match="not a forwarded request"):
        decided_headers(b"HTTP/1.1 200 OK\r\nx-tollgate-reply: 401\r\n\r\n")


def _ask(conn: socket.socket, path: str, body: bytes) -> tuple[int, dict[str, str]]:
    conn.sendall(f"POST {path} HTTP/1.1\r\nhost: tollgate\r\ncontent-length: {len(body)}"
                 "\r\n\r\n".encode() + body)
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += conn.recv(65536)
    lines = answer.split(b"\r\n\r\n")[0].decode().split("\r\n")
    return int(lines[0].split()[1]), dict(line.split(": ", 1) for line in lines[1:])


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "python"])
def test_the_answerer_answers_decisions_and_meter_posts_on_one_connection(tmp_path, compiled):
    sock = tmp_path / "answerer.sock"
    proc = answerer(tmp_path, sock, decided_headers(ANSWER), compiled=compiled)
    try:
        with socket.socket(socket.AF_UNIX) as conn:
            conn.connect(str(sock))
            for _ in range(2):  # read whole before answering: the connection is kept
                status, headers = _ask(conn, "/decide", BODY)
                assert status == 200
                assert headers["x-tollgate-set-authorization"] == f"Bearer {PROVIDER_KEY}"
                assert headers["x-tollgate-meta-request_id"] == "req_1"
                assert headers["content-length"] == "0"
                # A body larger than a read, in pieces: answered once, when it is whole.
                body = b"x" * 200_000
                conn.sendall(f"POST /meter HTTP/1.1\r\ncontent-length: {len(body)}\r\n"
                             "\r\n".encode() + body[:1000])
                conn.settimeout(0.2)
                with pytest.raises(TimeoutError):
                    conn.recv(100)
                conn.settimeout(None)
                conn.sendall(body[1000:])
                assert conn.recv(100) == b"HTTP/1.1 204 No Content\r\n\r\n"
                assert _ask(conn, "/meter", b"x" * 5000)[0] == 204
    finally:
        proc.terminate()
        proc.wait(10)


def _up(post) -> bool:
    try:
        post()
    except httpx.TransportError:  # Envoy still starting
        return False
    return True


def test_the_round_trip_forwards_with_the_credential_the_answerer_gave(tmp_path):
    provider_port = free_port()
    fake = start_fake(provider_port)
    sock = tmp_path / "answerer.sock"
    procs = [fake, answerer(tmp_path, sock, decided_headers(ANSWER))]
    try:
        trip, url = round_trip(tmp_path, sock, provider_port)
        procs.append(trip)
        # The client's key is not the provider's: only the answer's credential gets through.
        headers = {"authorization": "Bearer tg-a-virtual-key",
                   "content-type": "application/json"}
        def post() -> httpx.Response:
            return httpx.post(f"{url}/v1/chat/completions", content=BODY, headers=headers,
                              timeout=5)

        wait_until(lambda: _up(post), timeout=30, what="the round trip's Envoy")
        r = post()
        assert r.status_code == 200, r.text
        assert r.json()["object"] == "chat.completion"
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(10)


def _decide(conn: socket.socket, body: bytes, secret: str = "tg-a-virtual-key"
            ) -> tuple[dict[str, str], bytes]:
    head = base64.b64encode(f":method: POST\n:path: /v1/chat/completions\n"
                            f"authorization: Bearer {secret}".encode()).decode()
    conn.sendall(f"POST /decide HTTP/1.1\r\nx-tollgate-body: whole\r\nx-tollgate-head: {head}"
                 f"\r\ncontent-length: {len(body)}\r\n\r\n".encode() + body)
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += conn.recv(65536)
    head_bytes, _, rest = answer.partition(b"\r\n\r\n")
    lines = head_bytes.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    while len(rest) < int(headers["content-length"]):
        rest += conn.recv(65536)
    return headers, rest


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "python"])
def test_the_modelled_decision_service_reserves_writes_ahead_and_settles_in_the_store(
        tmp_path, compiled):
    """The model of a decision service, compiled or in Python, runs tollgate's store
    statements on a state file the store made: a reservation and a row written ahead per
    decision, the settlement on the response's last meter post, each with the decision's own
    request id."""
    store = model_store(tmp_path)
    sock = tmp_path / "model.sock"
    proc = answerer(tmp_path, sock, decided_headers(ANSWER), compiled=compiled, store=store)
    db = sqlite3.connect(store)
    try:
        with socket.socket(socket.AF_UNIX) as conn:
            conn.connect(str(sock))
            first, body = _decide(conn, BODY)
            second, _ = _decide(conn, BODY)
            assert body == b"" and first["x-tollgate-set-authorization"] == \
                f"Bearer {PROVIDER_KEY}"
            ids = [first["x-tollgate-meta-request_id"], second["x-tollgate-meta-request_id"]]
            assert ids[0] != ids[1] and all(i.startswith("req_") for i in ids)
            assert sorted(r for (r,) in db.execute("SELECT request_id FROM inflight")) == \
                sorted(ids)
            assert json.loads(db.execute("SELECT row FROM inflight WHERE request_id = ?",
                                         (ids[0],)).fetchone()[0])["request_id"] == ids[0]
            assert db.execute("SELECT reserved FROM budget_counters").fetchone() == (2 * 4242,)
            # A stream that did not ask for usage is asked for it, its body replaced.
            streamed, replaced = _decide(conn, b'{"model": "m", "stream": true}')
            assert streamed["x-tollgate-body"] == "replaced"
            assert json.loads(replaced) == {"model": "m", "stream": True,
                                            "stream_options": {"include_usage": True}}
            assert streamed["x-tollgate-set-content-length"] == str(len(replaced))
            for seq, end in (("0", ""), ("1", "\r\nx-tollgate-end: 1")):
                conn.sendall(f"POST /meter HTTP/1.1\r\nx-tollgate-request: {ids[0]}\r\n"
                             f"x-tollgate-seq: {seq}{end}\r\ncontent-length: 2\r\n\r\nok"
                             .encode())
                assert conn.recv(100) == b"HTTP/1.1 204 No Content\r\n\r\n"
            _decide(conn, BODY)  # answered after the settlement: it is committed
        assert [r for (r,) in db.execute("SELECT request_id FROM ledger")] == [ids[0]]
        assert ids[0] not in {r for (r,) in db.execute("SELECT request_id FROM inflight")}
        assert db.execute("SELECT COUNT(*) FROM holds WHERE request_id = ?",
                          (ids[0],)).fetchone() == (0,)
        assert db.execute("SELECT spent, reserved FROM budget_counters").fetchone() == \
            (21, 3 * 4242)
    finally:
        db.close()
        proc.terminate()
        proc.wait(10)
