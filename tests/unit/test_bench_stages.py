"""bench.stages: the decision service's functions timed by sys.monitoring, and only those."""

from __future__ import annotations

import pytest

from bench.stages import table
from bench.timed import FUNCTIONS, Timer, command_line, resolve


def inner(x: int) -> int:
    if x < 0:
        raise ValueError(x)
    return x


def outer(x: int) -> int:
    return inner(x) + 1


def test_every_function_it_times_is_found_on_the_path_of_a_request():
    found = [resolve(name) for name in FUNCTIONS]
    assert len({code for code, _ in found}) == len(FUNCTIONS)
    labels = [label for _, label in found]
    assert "Gateway.decide_like" in labels and "telemetry.start" in labels


def test_a_timed_call_holds_the_calls_it_makes_and_one_that_raised_is_dropped():
    ticks = iter(range(100))
    timer = Timer([(outer.__code__, "outer"), (inner.__code__, "inner")],
                  clock=lambda: next(ticks))
    timer.install()
    try:
        outer(1)  # outer starts at 0, inner runs 1 to 2, outer returns at 3
        with pytest.raises(ValueError):
            outer(-1)  # starts at 4 and 5, never returns
        outer(2)  # 6 to 9
    finally:
        timer.uninstall()
    outer(3)  # no longer timed
    assert timer.calls == {"outer": [3, 3], "inner": [1, 1]}


def test_the_table_leaves_the_warm_up_out():
    calls = {"a": [1.0, 0.000010, 0.000030, 0.000020], "b": []}
    lines = table(calls, requests=3, skip=1)
    assert lines[2].split() == ["a", "1.00", "20.0"]
    assert lines[3].split() == ["b", "0.00", "-"]


def test_functions_named_on_the_command_line_lead_the_tollgate_arguments():
    assert command_line(["--function=tollgate.body:read_json", "--function=a:b", "--config",
                         "c.yaml", "serve", "extproc", "--function=x:y"]) == (
        ["tollgate.body:read_json", "a:b"], ["--config", "c.yaml", "serve", "extproc",
                                             "--function=x:y"])
    assert command_line(["--config", "c.yaml"]) == ([], ["--config", "c.yaml"])
