"""bench.floor: tollgate's decision service over a processor that forwards every request as it
forwarded the first, which is what bench.breakdown's floor measures tollgate against."""

import base64
import os
import socket
import subprocess
import sys

from bench.instructions import _client_head, _setup
from bench.latency import BODY
from extproc.envoy_config import FILTERS_VERSION


def exchange(path: str, head: str, body: bytes) -> tuple[int, dict[str, str]]:
    """One decide exchange, as tollgate.decide sends it: the answer's status and headers."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(path)
        s.sendall(b"POST /decide HTTP/1.1\r\nhost: tollgate\r\nx-tollgate-body: whole\r\n"
                  b"x-tollgate-filters: " + FILTERS_VERSION.encode() + b"\r\n"
                  b"x-tollgate-head: " + head.encode() + b"\r\ncontent-length: "
                  + str(len(body)).encode() + b"\r\n\r\n" + body)
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += s.recv(65536)
    lines = answer.split(b"\r\n\r\n")[0].decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers


def test_every_request_is_forwarded_as_the_first_one_was(tmp_path):
    config, secret = _setup(tmp_path, "http://127.0.0.1:9", None)
    sock = tmp_path / "floor.sock"
    proc = subprocess.Popen([sys.executable, "-m", "bench.floor", str(config), str(sock)],
                            stdout=subprocess.PIPE, env={**os.environ})
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        # A refusal is decided, and not replayed.
        wrong = base64.b64encode(base64.b64decode(_client_head(secret)).replace(
            secret.encode(), b"tg-not-a-key")).decode()
        status, refused = exchange(str(sock), wrong, BODY)
        assert status == 200 and refused["x-tollgate-reply"] == "401"
        # The first forward is decided; the ones after it are the same answer, even for a
        # request the gateway would have refused.
        _, first = exchange(str(sock), _client_head(secret), BODY)
        assert first["x-tollgate-set-authorization"].startswith("Bearer ")
        assert first["x-tollgate-meta-request_id"].startswith("req_")
        _, again = exchange(str(sock), _client_head(secret), BODY)
        _, replayed = exchange(str(sock), wrong, b"{}")
        assert again == first == replayed
    finally:
        proc.terminate()
        proc.wait(10)
