"""The floor of tollgate's Envoy host: its decision service doing no work.

    python -m bench.floor CONFIG SOCKET

tollgate's own decision service (`extproc.decider`: the decide filter's exchange, parsed and
answered as ever, on the same event loop) listens on SOCKET over a processor that forwards
every request as it forwarded the first one, at once, and reads no meter post. An Envoy of
`tollgate envoy render` in front of it costs what the architecture costs (Envoy's filters, a
round trip to another process) before any of tollgate's own work: bench.breakdown measures
it beside the real host. Prints `ready` once it listens.

(Its own module: the benchmarks' harness sets the test suite's provider keys as it is
imported, and this process must keep the environment it was given.)
"""

from __future__ import annotations

import sys
from pathlib import Path

from extproc import eventloop
from extproc.decider import start_decider
from extproc.listen import Listener
from extproc.service import ExternalProcessor, Forwarding, Made, Replaying
from tollgate.gateway import Gateway
from tollgate.request import Reply, Request


class Replayed(ExternalProcessor):
    """Every request is forwarded as the first one it forwarded (until then, and for a
    refusal such as a readiness probe's, it decides), at once, as the real service answers
    a request decided from a precedent (no task); no meter post is read."""

    replayed: Forwarding | None = None
    made: Made | None = None

    async def decide(self, headers: dict[str, str], body: bytes | None,
                     declared: int | None = None) -> Reply | Forwarding:
        if self.replayed is not None:
            return self.replayed
        decision = await super().decide(headers, body, declared)
        if isinstance(decision, Forwarding):
            self.replayed, self.made = decision, Made(decision)
        return decision

    def decide_now(self, req: Request) -> Replaying | None:
        # Answered as a request decided from a precedent is: the lines it shares with its
        # precedent's answer encoded once (here, all of them).
        return None if self.made is None else Replaying(self.made, {}, {}, None)

    def metered(self, request_id: str, seq: int, last: bool, data: bytes,
                head: tuple[int, dict[str, str]] | None = None,
                first_byte: float | None = None) -> None:
        return None


async def serve(config: Path, socket: Path) -> None:
    gateway = Gateway.from_path(str(config), watch=False)
    server = await start_decider(Replayed(gateway), Listener(f"unix:{socket}"))
    print("ready", flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    config, socket = map(Path, sys.argv[1:3])
    eventloop.run(serve(config, socket))
