"""One ext_proc process of several (processes 1..N-1), started by process 0 (see
`extproc.processes`): it serves decisions and the streams that follow them, and nothing else
(no admin address, no outage log, no Envoy files)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from dataclasses import replace

from extproc import envoy_config, eventloop
from extproc.listen import ListenError, listener
from extproc.processes import READY
from extproc.runner import LoadedClusters
from extproc.service import start_server, stop_server
from tollgate.config.load import LoadedConfig
from tollgate.config.problems import ConfigError
from tollgate.gateway import Gateway

log = logging.getLogger("tollgate.extproc")


def _arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m extproc.worker")
    parser.add_argument("--config", required=True)
    parser.add_argument("--listen", required=True)
    parser.add_argument("--decider-listen", default="")
    parser.add_argument("--process", type=int, required=True)
    parser.add_argument("--ready-fd", type=int, required=True)
    parser.add_argument("--lifeline-fd", type=int, required=True)
    parser.add_argument("--envoy-admin")
    parser.add_argument("--tls-cert")
    parser.add_argument("--tls-key")
    parser.add_argument("--tls-client-ca")
    parser.add_argument("--insecure-tcp", action="store_true")
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    where = replace(listener(args.listen, args.tls_cert, args.tls_key, args.tls_client_ca,
                             args.insecure_tcp), decider=args.decider_listen)
    gateway = Gateway.from_path(args.config, siblings=True)
    clusters = LoadedClusters(args.envoy_admin) if args.envoy_admin else None
    if clusters is not None:
        def prepare(loaded: LoadedConfig) -> None:
            """As process 0 does: route to a new config's clusters once Envoy has them."""
            clusters.wait_for({c["name"] for c in envoy_config.clusters(loaded.config)})
        gateway.holder.before_reload(prepare)
    server, processor = await start_server(gateway, where, clusters, args.process)
    os.write(args.ready_fd, READY)
    os.close(args.ready_fd)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Process 0 stops it (SIGTERM), so a Ctrl-C to the terminal's process group does not
    # stop it before process 0 has stopped Envoy.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    # Process 0 holds the other end: it closes when process 0 is gone, however it went.
    loop.add_reader(args.lifeline_fd, stop.set)
    try:
        await stop.wait()
    finally:
        loop.remove_reader(args.lifeline_fd)
        if clusters is not None:
            clusters.stop()
        await stop_server(server, processor)
        await gateway.close()


def main(argv: list[str] | None = None) -> int:
    args = _arguments(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"[%(asctime)s] %(name)s (process {args.process}) %(message)s")
    try:
        eventloop.run(serve(args))
    except (ConfigError, ListenError, RuntimeError) as e:
        log.error("ext_proc process %d cannot serve: %s", args.process, e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
