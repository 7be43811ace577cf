"""The gateway's scratch directories: a killed gateway's are removed by the next to start, a
living one's never."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from extproc import workdirs
from tests.harness import ROOT

HOLDER = ("import sys\nfrom extproc.workdirs import own_workdir\n"
          "print(own_workdir('envoy'), flush=True)\nsys.stdin.read()\n")


@pytest.fixture
def tmp(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def another_gateway(tmp: Path) -> tuple[subprocess.Popen[str], Path]:
    """A process holding a directory of its own, until it is killed or its stdin closes."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER], cwd=ROOT, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            env={**os.environ, "TMPDIR": str(tmp)})
    assert proc.stdout is not None
    return proc, Path(proc.stdout.readline().strip())


def test_a_killed_gateways_directory_goes_when_the_next_starts_and_a_living_ones_stays(tmp):
    proc, theirs = another_gateway(tmp)
    try:
        (theirs / "extproc.sock").write_text("")
        mine = workdirs.own_workdir("envoy")
        assert theirs.is_dir() and mine.is_dir() and mine != theirs
        assert mine.name.startswith("tollgate-envoy-") and theirs.parent == mine.parent == tmp
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        again = workdirs.own_workdir("envoy")
        assert not theirs.exists()
        assert mine.is_dir() and again.is_dir()  # this process's own, still held
    finally:
        proc.kill()
        proc.wait()
    for held in (mine, again):
        workdirs.remove(held)
        assert not held.exists()
    assert sorted(p.name for p in tmp.iterdir()) == []


def test_a_directory_without_an_owner_is_left_alone(tmp):
    """(One an older gateway made, or anything else of that name.)"""
    other = tmp / "tollgate-envoy-older"
    other.mkdir()
    (other / "bootstrap.json").write_text("{}")
    mine = workdirs.own_workdir("envoy")
    assert (other / "bootstrap.json").exists()
    workdirs.remove(mine)


def test_a_living_gateway_is_never_found_without_its_lock(tmp):
    """Gateways starting and stopping beside a living one never remove its directory, and
    leave nothing half-made (a directory takes its name once locked)."""
    proc, theirs = another_gateway(tmp)
    try:
        for _ in range(20):
            workdirs.remove(workdirs.own_workdir("envoy"))
        assert theirs.is_dir()
        assert not [p for p in tmp.iterdir() if p.name.startswith(".")]  # none left half-made
    finally:
        proc.kill()
        proc.wait()
