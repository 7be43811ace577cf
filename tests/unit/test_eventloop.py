"""The ext_proc processes' event loop."""

from __future__ import annotations

import asyncio
import gc

import uvloop

from extproc import eventloop


def test_a_process_serves_on_uvloop_with_its_modules_out_of_the_collectors_sight():
    async def main() -> tuple[bool, int]:
        return isinstance(asyncio.get_running_loop(), uvloop.Loop), gc.get_freeze_count()

    try:
        on_uvloop, frozen = eventloop.run(main())
    finally:
        gc.unfreeze()
    assert on_uvloop
    assert frozen > 1000  # the modules imported so far (this test's alone are thousands)


FREE_AND_AGAIN = """
import resource, sys
from extproc import eventloop
if sys.argv[1] == "kept":
    eventloop.keep_freed_memory()

def request():  # a request's copies of a 1 MiB body, each written, freed as it ends
    copies = [bytearray(1 << 20) for _ in range(3)]
    for copy in copies:
        copy[::4096] = bytes(len(copy[::4096]))

for _ in range(5):
    request()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    request()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 50)
"""


def test_a_process_keeps_the_memory_a_big_body_freed_for_the_next():
    """glibc gives 3 MiB freed at the top of its heap back to the system, and the next
    request's copies fault every page in again; the ext_proc processes keep it."""
    import subprocess
    import sys

    def faults(mode: str) -> float:
        out = subprocess.run([sys.executable, "-c", FREE_AND_AGAIN, mode], check=True,
                             capture_output=True, text=True)
        return float(out.stdout)

    assert faults("given back") > 500  # ~256 a MiB: the premise, on this C library
    assert faults("kept") < 10
