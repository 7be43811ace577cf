"""Starting and stopping the real processes the tests drive."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _port_range() -> range:
    """Ports for the processes tests start, below the kernel's ephemeral range: a port from
    that range, free when checked, may become an outgoing connection's local port before the
    process binds it. Each pytest-xdist worker has its own share."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    share = (low - 10000) // max(workers, 1)
    return range(10000 + worker * share, 10000 + (worker + 1) * share)


class QuietHTTPServer(ThreadingHTTPServer):
    """The tests' own HTTP endpoints (fake providers, an OTLP receiver, Envoy's admin): a
    client that resets its connection (a kept connection let go, a test cutting a stream)
    is no fault of the server's, and socketserver would print its traceback into the test
    run's output. Any other error is still printed."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


_PORTS = _port_range()
_next_port = [random.randrange(len(_PORTS))]  # runs one after another start elsewhere


def free_port() -> int:
    """A port nothing listens on, handed out in turn from this worker's share."""
    for _ in range(len(_PORTS)):
        port = _PORTS[_next_port[0] % len(_PORTS)]
        _next_port[0] += 1
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {_PORTS}")


def envoy_validates(path: Path) -> str:
    """Envoy's own check of the bootstrap at `path` (`--mode validate`), which must pass;
    what it printed."""
    from extproc.runner import envoy_binary

    checked = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(path),
                              "--disable-hot-restart"], capture_output=True, text=True,
                             timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    return checked.stdout + checked.stderr


def wait_until(check, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except Exception as e:  # keep polling until the deadline
            last = e
        time.sleep(interval)
    raise TimeoutError(f"timed out waiting for {what} (last: {last!r})")


def ledger(config: Path) -> list:
    """The ledger rows of the gateway that runs `config` (read as a reporting CLI would)."""
    import asyncio

    from tollgate.config.load import load_config
    from tollgate.store import open_store

    settings = load_config(config).config.gateway

    async def read() -> list:
        store = open_store(settings.state, config, settings.spool, owner=False)
        try:
            return await store.rows()
        finally:
            await store.close()

    return asyncio.run(read())


def tollgate(*args: str, config: Path, env: dict[str, str] | None = None,
             check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the real `tollgate` command, in this process through click's runner: the same
    code and exit status, without a Python start-up per call (which was a fifth of the
    suite's time). As a child process from other threads (the runner swaps sys.stdout,
    which pytest's capture also swaps, from the main thread), or with
    TOLLGATE_TEST_CLI=subprocess."""
    argv = ["--config", str(config), *args]
    if os.environ.get("TOLLGATE_TEST_CLI") == "subprocess" or \
            threading.current_thread() is not threading.main_thread():
        return subprocess.run([str(BIN / "tollgate"), *argv], capture_output=True, text=True,
                              env={**os.environ, **(env or {})}, check=check, timeout=60)
    from click.testing import CliRunner

    from tollgate.cli.main import cli

    result = CliRunner().invoke(cli, argv, env=env, prog_name="tollgate")
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        # What the command would have printed before dying with status 1.
        stderr += "".join(traceback.format_exception(result.exception))
    done = subprocess.CompletedProcess([str(BIN / "tollgate"), *argv], result.exit_code,
                                       result.stdout, stderr)
    if check and result.exit_code != 0:
        raise subprocess.CalledProcessError(result.exit_code, done.args, done.stdout, stderr)
    return done


class GatewayProcess:
    """`tollgate serve <host>` as a child process, with its log kept for assertions."""

    def __init__(self, host: str, config: Path, log_dir: Path, extra: list[str] | None = None,
                 env: dict[str, str] | None = None, stdout: Path | None = None,
                 wrap: list[str] | None = None):
        """`stdout`: where the gateway's stdout goes, apart from its log (stderr); `wrap`:
        a command the gateway's Python runs under (a profiler's)."""
        self.host = host
        self.config = config
        self.port = free_port()
        self.log_path = log_dir / f"gateway-{host}-{self.port}.log"
        self.extra = extra or []
        # Before any `--` (what follows goes to mitmproxy).
        if host == "envoy" and "--envoy-admin" not in self.extra:
            self.extra = ["--envoy-admin", f"127.0.0.1:{free_port()}", *self.extra]
        # tollgate's own admin address (/healthz, /readyz, /metrics), on every host.
        if "--admin" not in self.extra:
            self.extra = ["--admin", f"127.0.0.1:{free_port()}", *self.extra]
        self.admin_url = f"http://{self.extra[self.extra.index('--admin') + 1]}"
        self.env = env or {}
        self.stdout = stdout
        self.command = ([*wrap, sys.executable, "-m", "tollgate"] if wrap
                        else [str(BIN / "tollgate")])
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> GatewayProcess:
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        out = open(self.stdout, "wb") if self.stdout else None  # noqa: SIM115
        self.proc = subprocess.Popen(
            [*self.command, "--config", str(self.config), "serve", self.host,
             "--listen", f"127.0.0.1:{self.port}", *self.extra],
            stdout=out or self._log, stderr=self._log if out else subprocess.STDOUT,
            env={**os.environ, **self.env}, start_new_session=True,
        )
        if out is not None:
            out.close()  # the child has its own copy

        def ready() -> str | bool:
            if self.proc.poll() is not None:
                return "exited"
            r = httpx.get(f"{self.url}/v1/models", timeout=2)
            return r.status_code == 401 and "invalid_api_key" in r.text

        try:
            state = wait_until(ready, timeout=timeout,
                               what=f"{self.host} gateway on {self.url}")
        except BaseException:
            self.stop()
            raise
        if state == "exited":
            raise RuntimeError(f"gateway exited early:\n{self.log()}")
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGINT, timeout: float = 10.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(5)
        finally:
            self._log.close()


class RedisServer:
    """A real redis-server on a free port, persisting to an append-only file so a restart
    keeps its data (as a production Redis would).

    `fsync`: its `appendfsync`. Tests use `always`, so that a Redis they kill keeps every
    write; benchmarks use `everysec`, Redis's own default, to measure tollgate rather than
    the disk: `always` holds each reply for a flush, a third of a millisecond on each
    request's reservation here (the README says what each keeps)."""

    def __init__(self, directory: Path, fsync: str = "always"):
        self.dir = directory
        self.port = free_port()
        self.fsync = fsync
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return self.database(0)

    def database(self, n: int) -> str:
        """The URL of its database `n` (one for each gateway that must not share state)."""
        return f"redis://127.0.0.1:{self.port}/{n}"

    def start(self) -> RedisServer:
        import shutil

        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed; run `make test` (it installs it)")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--appendonly", "yes", "--appendfsync", self.fsync, "--save", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def up() -> bool:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")

        wait_until(up, timeout=10, what="redis-server")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


class ConfigMapMount:
    """A ConfigMap volume as the kubelet writes it: each key a symlink through `..data` into a
    timestamped folder, and an update one atomic rename of `..data` onto a new folder."""

    def __init__(self, path: Path):
        self.path = path
        self.generation = 0
        path.mkdir(parents=True)

    def write(self, data: dict[str, str]) -> None:
        self.generation += 1
        folder = self.path / f"..2026_12_02_10_00_0{self.generation}.{self.generation}"
        folder.mkdir()
        for name, text in data.items():
            (folder / name).write_text(text)
        new = self.path / "..data_tmp"
        new.symlink_to(folder.name)
        old = (self.path / "..data").resolve() if (self.path / "..data").exists() else None
        new.replace(self.path / "..data")
        for name in data:
            if not (self.path / name).is_symlink():
                (self.path / name).symlink_to(f"..data/{name}")
        if old is not None:
            shutil.rmtree(old)

    def entries(self) -> set[str]:
        return {p.name for p in self.path.iterdir()}
