"""`tollgate` with the functions a request runs through timed: bench.stages runs the decision
service so.

    python -m bench.timed TIMINGS [--function=MODULE:QUALNAME ...] ARGS...

runs `tollgate ARGS` with `FUNCTIONS` (and each `--function`) timed by `sys.monitoring` (PEP
669), which calls back on their start and return alone, and writes their calls (inclusive
seconds, per call, in order) to TIMINGS as the process exits.

(Its own module: the benchmarks' harness sets the test suite's provider keys as it is
imported, and this process must keep the environment it was given.)
"""

from __future__ import annotations

import atexit
import functools
import importlib
import json
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from types import CodeType
from typing import Any

# What a request decided from a precedent runs through on the Envoy host, in that order.
FUNCTIONS = [
    "extproc.decider:_head", "extproc.decider:ClientHeads.decoded",
    "tollgate.request:Request.with_body", "extproc.service:ExternalProcessor.decide_now",
    "tollgate.gateway:Gateway.decide_like", "tollgate.precedent:Precedents.known",
    "tollgate.keys:authenticated", "tollgate.telemetry:start",
    "tollgate.request:check_header_values", "tollgate.body:read_json",
    "tollgate.precedent:Precedents.find", "tollgate.precedent:written_ahead",
    "tollgate.admission:Admission.again", "tollgate.derived:Derived.applying",
    "tollgate.store.sqlite:SQLiteStore.reserve_now", "extproc.decider:answer",
    # The response: its meter post, its exchange, its settlement.
    "extproc.decider:Decider._meter", "extproc.service:ExternalProcessor.metered",
    "tollgate.gateway:Gateway.adopt", "tollgate.settlement:Settlement.finish",
    "tollgate.settlement:Settlement.ledger_row", "tollgate.gateway:Gateway._settle",
    "tollgate.gateway:Gateway._observe", "tollgate.metrics:observe",
    "tollgate.accesslog:AccessLog.write", "tollgate.store.sqlite:SQLiteStore._commit_one",
]


def resolve(name: str) -> tuple[CodeType, str]:
    """`module:qualified.name` -> the function's code object, and its name as printed: a
    method's qualified name, a function's with its module's (`telemetry.start`). A
    property or a cached property is timed as its getter."""
    module, _, qualified = name.partition(":")
    found: Any = importlib.import_module(module)
    for part in qualified.split("."):
        found = getattr(found, part)
    if isinstance(found, property):
        found = found.fget
    elif isinstance(found, functools.cached_property):
        found = found.func
    label = qualified if "." in qualified else f"{module.rsplit('.', 1)[-1]}.{qualified}"
    return found.__code__, label


class Timer:
    """Times calls to the given code objects: their inclusive time, per call, in order. A
    call left by an exception is dropped (its start is discarded by the next return of a
    function that holds it)."""

    def __init__(self, functions: Iterable[tuple[CodeType, str]],
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.names = dict(functions)
        self.calls: dict[str, list[float]] = {name: [] for name in self.names.values()}
        self._started: list[tuple[CodeType, float]] = []

    def start(self, code: CodeType, _offset: int) -> None:
        self._started.append((code, self.clock()))

    def returned(self, code: CodeType, _offset: int, _value: object) -> None:
        now = self.clock()
        while self._started:
            started, at = self._started.pop()
            if started is code:
                self.calls[self.names[code]].append(now - at)
                return

    def install(self) -> None:
        mon = sys.monitoring
        tool = mon.PROFILER_ID
        mon.use_tool_id(tool, "bench.stages")
        mon.register_callback(tool, mon.events.PY_START, self.start)
        mon.register_callback(tool, mon.events.PY_RETURN, self.returned)
        for code in self.names:
            mon.set_local_events(tool, code, mon.events.PY_START | mon.events.PY_RETURN)

    def uninstall(self) -> None:
        mon = sys.monitoring
        tool = mon.PROFILER_ID
        for code in self.names:
            mon.set_local_events(tool, code, 0)
        mon.register_callback(tool, mon.events.PY_START, None)
        mon.register_callback(tool, mon.events.PY_RETURN, None)
        mon.free_tool_id(tool)


def serve(timings: Path, args: list[str], more: Iterable[str] = ()) -> None:
    """`tollgate ARGS`, with `FUNCTIONS` and `more` timed; their calls written to `timings`
    at exit."""
    from tollgate.cli.main import cli

    timer = Timer(resolve(name) for name in [*FUNCTIONS, *more])
    atexit.register(lambda: timings.write_text(json.dumps(timer.calls)))
    timer.install()
    cli.main(args=args, prog_name="tollgate")


def command_line(rest: list[str]) -> tuple[list[str], list[str]]:
    """The `--function=` names that lead `rest`, and the `tollgate` arguments after them."""
    lead = 0
    while lead < len(rest) and rest[lead].startswith("--function="):
        lead += 1
    return [a.removeprefix("--function=") for a in rest[:lead]], rest[lead:]


if __name__ == "__main__":
    functions, arguments = command_line(sys.argv[2:])
    serve(Path(sys.argv[1]), arguments, functions)
