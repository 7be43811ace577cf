"""What each part of tollgate's Envoy filters costs the client's p50, apart from any decision.

    python -m bench.filters [--requests 800]

bench.breakdown's `compiled floor` (tollgate's rendered Envoy in front of the compiled
answerer, bench.answerer: one decision answered from memory, nothing in Python) beside the
same Envoy with one part taken out of its rendered configuration:

- `no meter`: the meter filter (meter.lua, and the usage cut it runs): the response's copy;
- `no end log`: the gRPC access log of responses' ends (`tollgate.response_end`);
- `no client head`: the decide filter sends a constant in place of the client's head (its
  header lines gathered from Envoy, joined and base64-encoded, then sent in a header);
- `no exchange` (not a part: printed apart): the decide filter gathers the client's head
  and applies the same decision, but from a table in its own Lua memory, with no call to
  any process. What a sidecar would cost whose Envoy made a decision like one before by
  itself (a decision service granting Envoy's workers such decisions ahead, say): the
  floor of any design that keeps a process on the request's path is the floor above.

Each part's cost is the floor's p50 less the p50 without it; what is left over plain Envoy
is the exchange itself (the decide filter's body, call and answer). Direct and plain Envoy
are measured in the same run, round-robin in a new order each turn, and the floor twice:
their difference is the run's noise, under which no part's figure means anything.

Fewer paths than bench.breakdown's nine, on purpose: each process's code and data stay
warmer between its turns, as a sidecar's do between its app's requests. With nine paths,
tollgate's decision service doing no work read +0.20 ms over a Python service doing none;
with five, +0.06.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from bench.answerer import answerer, decided_headers
from bench.breakdown import (
    access_log,
    connection_managers,
    print_p50s,
    sequential,
    tollgate_envoy,
)
from bench.instructions import _decision
from bench.latency import PROVIDER_KEY, _Url, bench_setup, own_state
from bench.quick import governed, plain_envoy
from tests.conftest import make_config
from tests.harness import free_port

# The decide filter's client head (decide.lua), and what takes its place: base64 of "x".
CLIENT_HEAD = "handle:base64Escape(client_head(handle, kind))"
CONSTANT_HEAD = '"eA=="'
# The decide filter's call to the decision service, with its arguments.
CALL = re.compile(r"handle:httpCall\(CLUSTER, \{.*?\}, body, TIMEOUT_MS\)", re.DOTALL)


def without_filter(name: str) -> Callable[[dict[str, Any]], None]:
    def change(bootstrap: dict[str, Any]) -> None:
        for hcm in connection_managers(bootstrap):
            kept = [f for f in hcm["http_filters"] if f["name"] != name]
            if len(kept) == len(hcm["http_filters"]):
                raise ValueError(f"no filter {name!r} in the rendered configuration")
            hcm["http_filters"] = kept
    return change


def without_access_log(name: str) -> Callable[[dict[str, Any]], None]:
    def change(bootstrap: dict[str, Any]) -> None:
        for hcm in connection_managers(bootstrap):
            kept = [log for log in hcm.get("access_log", []) if log["name"] != name]
            if len(kept) == len(hcm.get("access_log", [])):
                raise ValueError(f"no access log {name!r} in the rendered configuration")
            hcm["access_log"] = kept
    return change


def _decide_source(bootstrap: dict[str, Any], edit: Callable[[str], str]) -> None:
    """The decide filter's Lua source, edited: `edit` raises ValueError where the source no
    longer says what the edit expects (bench.filters then needs updating)."""
    found = False
    for hcm in connection_managers(bootstrap):
        for f in hcm["http_filters"]:
            if f["name"] == "tollgate.decide":
                code = f["typed_config"]["default_source_code"]
                code["inline_string"] = edit(code["inline_string"])
                found = True
    if not found:
        raise ValueError("no filter 'tollgate.decide' in the rendered configuration")


def without_client_head(bootstrap: dict[str, Any]) -> None:
    def edit(source: str) -> str:
        if CLIENT_HEAD not in source:
            raise ValueError("the decide filter no longer sends its client head as "
                             f"{CLIENT_HEAD}: bench.filters needs updating")
        return source.replace(CLIENT_HEAD, CONSTANT_HEAD)
    _decide_source(bootstrap, edit)


def _lua_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def without_exchange(decided: list[tuple[str, str]]) -> Callable[[dict[str, Any]], None]:
    """The decide filter answered from its own memory: `decided` (the decision's headers) in
    place of the decision service's answer, the client's head still gathered."""
    table = "{" + ", ".join(f"[{_lua_string(k)}] = {_lua_string(v)}"
                            for k, v in [(":status", "200"), *decided]) + "}"

    def edit(source: str) -> str:
        source, calls = CALL.subn('ANSWERED, (client_head(handle, kind) and "")', source)
        if calls != 1:
            raise ValueError("the decide filter no longer calls the decision service as "
                             "bench.filters expects: it needs updating")
        return f"local ANSWERED = {table}\n{source}"
    return lambda bootstrap: _decide_source(bootstrap, edit)


PARTS: dict[str, Callable[[dict[str, Any]], None]] = {
    "no meter": without_filter("tollgate.meter"),
    "no end log": without_access_log("tollgate.response_end"),
    "no client head": without_client_head,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=800)
    args = parser.parse_args()
    workdir, fake_port, fake = bench_setup("tollgate-bench-filters-")
    procs: list[subprocess.Popen[bytes]] = [fake]
    direct = f"http://127.0.0.1:{fake_port}"
    try:
        # With the stage log each tollgate Envoy here keeps (bench.breakdown's), as there.
        plain, plain_url = plain_envoy(workdir, fake_port,
                                       access_log=access_log(workdir / "plain-stages.log"))
        procs.append(plain)
        config = make_config(workdir, _Url(direct), _Url(f"http://127.0.0.1:{free_port()}"))
        secret = governed(config)
        decided = decided_headers(asyncio.run(_decision(own_state(config, "decided"), secret)))
        socket = workdir / "answerer.sock"
        procs.append(answerer(workdir, socket, decided))

        def envoy(name: str, change: Callable[[dict[str, Any]], None] | None = None) -> str:
            slug = name.replace(" ", "-")
            return tollgate_envoy(own_state(config, slug), workdir, procs, answering=socket,
                                  change=change, name=slug)[0]

        provider = {"authorization": f"Bearer {PROVIDER_KEY}",
                    "content-type": "application/json"}
        governed_key = {"authorization": f"Bearer {secret}", "content-type": "application/json"}
        paths = {"direct": (direct, provider), "plain envoy": (plain_url, provider),
                 "floor": (envoy("floor"), governed_key)}
        for name, change in PARTS.items():
            paths[name] = (envoy(name, change), governed_key)
        paths["floor (again)"] = (envoy("floor again"), governed_key)
        paths["no exchange"] = (envoy("no exchange", without_exchange(
            [(k, v) for k, v in decided if k.startswith("x-tollgate-")])), governed_key)
        asyncio.run(sequential(paths, 0, 30))
        times = asyncio.run(sequential(paths, args.requests, 0))
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(10)
    p50s = print_p50s(times, args.requests, 16)
    floor = (p50s["floor"] + p50s["floor (again)"]) / 2
    noise = abs(p50s["floor"] - p50s["floor (again)"])
    print(f"\nwhat each part costs the floor (its mean of two, {floor:.3f}; the two "
          f"{noise:.3f} apart):")
    for name in PARTS:
        print(f"  {name.removeprefix('no '):<12} {floor - p50s[name]:>+7.3f}")
    print(f"  the rest over plain Envoy (the exchange): "
          f"{floor - p50s['plain envoy'] - sum(floor - p50s[n] for n in PARTS):+.3f}")
    print(f"\nno exchange (the decision applied from Lua's memory): "
          f"{p50s['no exchange'] - p50s['direct']:+.3f} over direct, "
          f"{p50s['no exchange'] - p50s['plain envoy']:+.3f} over plain Envoy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
