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
