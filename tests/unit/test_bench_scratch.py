"""A benchmark's working directory: gone when the run ends, kept when it failed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

RUN = """
import sys
from bench.latency import scratch_dir
workdir = scratch_dir("tollgate-bench-scratch-")
(workdir / "service.log").write_text("what went wrong")
print(workdir, flush=True)
if sys.argv[1] == "fail":
    raise RuntimeError(f"the service did not start: see {workdir}/service.log")
"""


def _run(outcome: str, **env: str) -> tuple[Path, subprocess.CompletedProcess[str]]:
    import os

    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", RUN, outcome], cwd=root, text=True,
                          capture_output=True, env={**os.environ, **env}, timeout=60)
    return Path(done.stdout.split()[0]), done


def test_a_run_that_ends_well_removes_its_working_directory():
    workdir, done = _run("ok")
    assert done.returncode == 0
    assert not workdir.exists()


def test_a_run_that_fails_keeps_its_logs_and_says_where():
    import shutil

    workdir, done = _run("fail")
    try:
        assert done.returncode == 1
        assert (workdir / "service.log").read_text() == "what went wrong"
        assert f"(logs kept in {workdir})" in done.stderr
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def test_a_run_asked_to_keep_its_directory_keeps_it():
    import shutil

    workdir, done = _run("ok", TOLLGATE_BENCH_KEEP="1")
    try:
        assert done.returncode == 0 and (workdir / "service.log").exists()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
