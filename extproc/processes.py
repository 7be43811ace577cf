"""ext_proc as several processes, so a sidecar's decisions use every core.

A Python process serves its gRPC streams on one core. With `--extproc-processes N`, the
process that was started (process 0) starts processes 1..N-1 beside it, each listening at its
own address (`envoy_config.process_targets`). Envoy spreads decisions over all of them; the
process that decided a request names itself in a routing header and in metadata, and the
request's meter posts, rewrite and attempt streams and access log entry go to that process's
own clusters, where its exchange lives.
State is shared through the store (a Redis state; a SQLite file serves budgets to several
processes but not rate limits, which the gateway refuses at start).

Process 0 keeps the admin address (`/metrics` sums every process's counters), reads the outage
log, and writes Envoy's files. A process that exits stops the group with a non-zero status, so
the supervisor restarts the pod or unit whole; one left behind by a parent that died stops on
its own (its lifeline pipe closes).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from extproc.listen import Listener

log = logging.getLogger("tollgate.extproc")

READY = b"ready\n"
# Where processes 1..N-1 keep their counters for process 0's `/metrics` (prometheus_client's
# multiprocess mode).
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


class ProcessExited(RuntimeError):
    """An ext_proc process of the group exited."""


class Siblings:
    """ext_proc processes 1..N-1, started and stopped by process 0."""

    def __init__(self, config: str, listeners: list[Listener], metrics_dir: Path,
                 envoy_admin: str | None = None):
        """`listeners`: processes 1..N-1's addresses; `envoy_admin`: the Envoy that process 0
        runs (each process reads which clusters it has loaded)."""
        self.config = config
        self.listeners = listeners
        self.metrics_dir = metrics_dir
        self.envoy_admin = envoy_admin
        self.procs: list[asyncio.subprocess.Process] = []
        self._lifelines: list[int] = []
        self._exited: asyncio.Future[tuple[int, int | None]] | None = None

    def _command(self, index: int, where: Listener, ready: int, lifeline: int) -> list[str]:
        cmd = [sys.executable, "-m", "extproc.worker", "--config", self.config,
               "--listen", where.target, "--decider-listen", where.decider,
               "--process", str(index),
               "--ready-fd", str(ready), "--lifeline-fd", str(lifeline)]
        if self.envoy_admin:
            cmd += ["--envoy-admin", self.envoy_admin]
        if where.tls is not None:
            cmd += ["--tls-cert", str(where.tls.cert), "--tls-key", str(where.tls.key),
                    "--tls-client-ca", str(where.tls.client_ca)]
        if where.insecure_tcp:
            cmd.append("--insecure-tcp")
        return cmd

    async def start(self, timeout: float = 60.0) -> None:
        """Start every process and wait until each serves; ProcessExited if one does not."""
        self.metrics_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for old in self.metrics_dir.glob("*.db"):
            old.unlink()  # counters of an earlier run would be summed into this one's
        env = {**os.environ, METRICS_DIR_ENV: str(self.metrics_dir)}
        readers = []
        for index, where in enumerate(self.listeners, start=1):
            ready_r, ready_w = os.pipe()
            life_r, life_w = os.pipe()
            try:
                proc = await asyncio.create_subprocess_exec(
                    *self._command(index, where, ready_w, life_r), env=env,
                    pass_fds=(ready_w, life_r))
            finally:
                os.close(ready_w)
                os.close(life_r)
            self.procs.append(proc)
            self._lifelines.append(life_w)  # held open while this process lives
            readers.append(ready_r)
        try:
            async with asyncio.timeout(timeout):
                ready = await asyncio.gather(*(_says_ready(fd) for fd in readers))
        except TimeoutError:
            raise ProcessExited(f"ext_proc processes did not start within {timeout:.0f} s") \
                from None
        for index, (proc, serving) in enumerate(zip(self.procs, ready, strict=True), start=1):
            if not serving:
                status = await proc.wait()
                raise ProcessExited(f"ext_proc process {index} exited during start with "
                                    f"status {status} (its log above says why)")
        log.info("ext_proc processes 1-%d serving on %s", len(self.procs),
                 ", ".join(w.target for w in self.listeners))

    def exited(self) -> asyncio.Future[tuple[int, int | None]]:
        """Done when a process exits: its index and status."""
        if self._exited is None:
            async def first() -> tuple[int, int | None]:
                waits = {asyncio.ensure_future(p.wait()): i
                         for i, p in enumerate(self.procs, start=1)}
                done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                for w in pending:
                    w.cancel()
                index = waits[next(iter(done))]
                return index, self.procs[index - 1].returncode
            self._exited = asyncio.ensure_future(first())
        return self._exited

    async def stop(self, timeout: float = 10.0) -> None:
        if self._exited is not None:
            self._exited.cancel()
        for proc in self.procs:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        for fd in self._lifelines:
            os.close(fd)
        self._lifelines.clear()


async def _says_ready(fd: int) -> bool:
    """True once the process says it serves; False if it exits first."""
    reader = asyncio.StreamReader()
    transport, _ = await asyncio.get_running_loop().connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", 0))
    try:
        return await reader.readline() == READY
    finally:
        transport.close()
