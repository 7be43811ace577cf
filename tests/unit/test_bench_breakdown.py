"""bench.breakdown: its stage log goes into tollgate's rendered bootstrap as Envoy accepts it,
each stage's p50 is read from the lines after the warm-up, and its turns (which bench.tail,
bench.filters and bench.stages take too) go in a new order each."""

import argparse
import asyncio
import math
import os
import subprocess
import sys

import pytest
import yaml

from bench.breakdown import POINTS, cpu_list, pin, sequential, stages, with_access_log
from bench.latency import _Url
from tests.conftest import OPENAI_KEY, make_config
from tests.harness import envoy_validates, free_port, tollgate


def test_the_stage_log_joins_the_rendered_listener_and_envoy_accepts_it(tmp_path):
    config = make_config(tmp_path, _Url("http://127.0.0.1:9"), _Url("http://127.0.0.1:9"))
    rendered = tollgate("envoy", "render", "--listen", f"127.0.0.1:{free_port()}",
                        config=config).stdout
    log = tmp_path / "stages.log"
    bootstrap = with_access_log(yaml.safe_load(rendered), log)
    hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    logs = hcm["typed_config"]["access_log"]
    assert logs[-1]["typed_config"]["path"] == str(log)
    assert len(logs) > 1  # tollgate's own access logs are kept
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(bootstrap))
    envoy_validates(path)


def test_each_stage_is_the_median_after_the_warm_up_in_ms(tmp_path):
    log = tmp_path / "stages.log"
    warm = " ".join(["999999"] * len(POINTS))
    lines = [warm, warm, "100 - 300 200 90 40 5 900", "300 - 500 400 80 60 7 1100",
             "200 - 400 300 70 50 6 1000"]
    log.write_text("\n".join(lines) + "\n")
    found = stages(log, skip=2)
    assert found["request in"] == 0.2
    assert found["provider"] == 0.4
    assert found["provider's own"] == 0.3
    assert found["response in"] == 0.08
    assert found["in Envoy"] == 1.0
    assert math.isnan(found["to provider"])  # Envoy had no such span for any of them


def test_the_provider_is_kept_on_the_cpus_named_every_thread_of_it():
    mine = sorted(os.sched_getaffinity(0))
    assert cpu_list(",".join(map(str, mine))) == set(mine)
    assert cpu_list(f"{mine[0]}-{mine[-1]}") >= set(mine)
    for wrong in ("99999", "", "x"):
        with pytest.raises((argparse.ArgumentTypeError, ValueError)):
            cpu_list(wrong)
    # A process with a second thread, as the fake provider's executor would have.
    child = subprocess.Popen([sys.executable, "-c", "import threading, time; threading.Thread("
                              "target=time.sleep, args=(60,), daemon=True).start(); "
                              "print('up', flush=True); time.sleep(60)"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "up\n"
        pin(child.pid, {mine[0]})
        tasks = os.listdir(f"/proc/{child.pid}/task")
        assert len(tasks) == 2
        assert all(os.sched_getaffinity(int(t)) == {mine[0]} for t in tasks)
    finally:
        child.kill()
        child.wait()


def test_sequential_sends_each_path_once_a_turn_in_a_new_order_the_same_every_run(
        fake_openai):
    """In a fixed order a path's place told in its time; each turn is shuffled instead, by
    a seed, so two runs send the same orders."""
    names = ("direct", "plain envoy", "tollgate envoy", "floor")
    paths = {name: (fake_openai.url, {"authorization": f"Bearer {OPENAI_KEY}",
                                      "x-bench-path": name}) for name in names}

    def orders() -> list[tuple[str, ...]]:
        fake_openai.reset()
        times = asyncio.run(sequential(paths, 6, 2))
        assert {n: len(t) for n, t in times.items()} == dict.fromkeys(names, 6)
        assert all(t > 0 for ts in times.values() for t in ts)
        sent = [r.headers["x-bench-path"] for r in fake_openai.requests]
        return [tuple(sent[i:i + len(names)]) for i in range(0, len(sent), len(names))]

    first = orders()
    assert len(first) == 8 and all(sorted(turn) == sorted(names) for turn in first)
    assert len(set(first)) > 3  # not one order, nor a rotation of it
    assert orders() == first
