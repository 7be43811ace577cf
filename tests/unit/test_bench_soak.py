"""`bench.soak` tells a leak from Envoy's pool of connections to the decision service, which
grows to the highest number of calls in flight so far and stays open between rounds."""

from __future__ import annotations

import subprocess
import sys

import httpx

from bench.latency import _Url
from bench.soak import Round, decider_connections, fds, growth_problems, settled_fds
from tests.conftest import make_config
from tests.harness import GatewayProcess, wait_until


def rounds(*rows: tuple[float, int, int, int | None]) -> list[Round]:
    """Rounds of the envoy host: (RSS MB, gateway fds, Envoy's connections, in flight)."""
    return [Round("envoy", i, rss, n, envoy, 600, held, 500, 8.0)
            for i, (rss, n, envoy, held) in enumerate(rows, 1)]


def test_descriptors_that_follow_envoys_connections_are_not_a_leak():
    # A later burst reached a new peak: Envoy opened 60 more connections to the service.
    assert growth_problems(rounds((190, 70, 40, 0), (192, 80, 50, 0), (193, 140, 110, 0))) == []


def test_descriptors_the_gateway_holds_besides_envoys_connections_are():
    problems = growth_problems(rounds((190, 70, 40, 0), (192, 80, 50, 0), (193, 111, 50, 0)))
    assert problems == ["envoy: grows (RSS +1.0 MB, fds +31)"]


def test_memory_growth_and_requests_left_unsettled_are_reported():
    assert growth_problems(rounds((190, 70, 40, 0), (192, 80, 50, 0), (260, 80, 50, 3))) == [
        "envoy: grows (RSS +68.0 MB, fds +0)", "envoy: 3 requests still held unsettled"]
    assert growth_problems(rounds((190, 70, 40, None))) == [
        "envoy: its /metrics did not say what it holds unsettled"]


def test_descriptors_are_counted_once_they_stop_closing():
    # 100 descriptors open, then closed over the next 300 ms, as a host closes a round's
    # connections after its client has gone.
    child = subprocess.Popen([sys.executable, "-c", """
import os, sys, time
held = [os.open(os.devnull, os.O_RDONLY) for _ in range(100)]
print(flush=True)
sys.stdin.readline()
for i, fd in enumerate(held):
    os.close(fd)
    if i % 10 == 9:
        time.sleep(0.03)
sys.stdin.readline()
"""], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        child.stdout.readline()
        before = fds(child.pid)
        child.stdin.write("\n")
        child.stdin.flush()
        assert settled_fds(child.pid) == before - 100
    finally:
        child.kill()
        child.wait()


def test_envoys_connections_to_the_decision_service_are_read_from_its_admin(tmp_path):
    config = make_config(tmp_path, _Url("http://127.0.0.1:9"), _Url("http://127.0.0.1:10"))
    gw = GatewayProcess("envoy", config, tmp_path).start()
    try:
        admin = gw.extra[gw.extra.index("--envoy-admin") + 1]
        # Every request is decided by the service: Envoy keeps a connection to it open.
        assert httpx.get(f"{gw.url}/v1/models").status_code == 401
        open_now = wait_until(lambda: decider_connections(admin), timeout=10,
                              what="Envoy's connections to the decision service")
        # Every one of them is a descriptor of the gateway's (and is not counted twice).
        assert 1 <= open_now <= fds(gw.proc.pid)
    finally:
        gw.stop()
