"""bench.quick sends each path its JSON answer and its stream one right after the other,
either first by turn, and times each apart: the first of the two cold (its path's processes
idle while the other paths ran), the second warm."""

import asyncio
import os
import subprocess
import sys

from bench.quick import cpu_of, cpu_seconds, round_robin, turn_order
from tests.conftest import OPENAI_KEY

TURNS = 4


def test_a_paths_two_requests_go_together_either_first_by_turn_and_are_timed_apart(
        fake_openai):
    fake_openai.reset()
    url = f"{fake_openai.url}/v1/chat/completions"
    paths = {name: (url, {"authorization": f"Bearer {OPENAI_KEY}", "x-bench-path": name})
             for name in ("direct", "plain envoy")}
    times, _ = asyncio.run(round_robin(paths, TURNS, {"provider": os.getpid()}))

    measured = fake_openai.requests[-TURNS * len(paths) * 2:]  # after the warm-up's
    for turn in range(TURNS):
        sent = [(r.headers["x-bench-path"], "sse" if r.json().get("stream") else "json")
                for r in measured[turn * 4:(turn + 1) * 4]]
        first, second = ("json", "sse") if turn % 2 == 0 else ("sse", "json")
        assert turn_order(turn) == (first, second)
        # Each path's pair back to back, the turn's first kind first.
        assert sent in ([(a, first), (a, second), (b, first), (b, second)]
                        for a, b in (("direct", "plain envoy"), ("plain envoy", "direct")))
    for name in paths:
        for kind in (name, f"{name} sse first", f"{name} sse total"):
            assert len(times[kind]) == TURNS // 2  # cold: the turns it went first
            assert len(times[f"{kind} warm"]) == TURNS // 2
            assert all(t > 0 for t in times[kind] + times[f"{kind} warm"])


def test_a_paths_cpu_is_that_of_all_its_processes(tmp_path):
    """A path served by several processes (a model decision service and its Envoy) is
    charged the CPU of each."""
    busy = subprocess.Popen([sys.executable, "-c", "import time\nt = time.process_time()\n"
                             "while time.process_time() - t < 0.3: pass\nprint(flush=True)\n"
                             "time.sleep(60)"], stdout=subprocess.PIPE)
    idle = subprocess.Popen([sys.executable, "-c", "import time\nprint(flush=True)\n"
                             "time.sleep(60)"], stdout=subprocess.PIPE)
    try:
        for proc in (busy, idle):
            assert proc.stdout is not None
            proc.stdout.readline()  # its CPU stays as it is from here on
        alone = cpu_seconds(busy.pid)
        assert alone >= 0.25
        assert cpu_of((busy.pid, idle.pid)) == alone + cpu_seconds(idle.pid)
        assert cpu_of(busy.pid) == alone
    finally:
        for proc in (busy, idle):
            proc.kill()
            proc.wait(10)
