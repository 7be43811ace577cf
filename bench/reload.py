"""What config reloads cost the requests in flight, on the Envoy host.

    python -m bench.reload [--keys 400] [--every 0.5] [--seconds 10] [--connections 8]

A reload runs on a thread of the process that decides requests, so whatever it spends holding
the interpreter (reading the file, validating it, reading Envoy's clusters) the requests wait
for. The gateway (the governed profile on SQLite, in front of the compiled provider of
`bench.scaling`) gets a config with `--keys` virtual keys, what a platform team's holds; `wrk`
(apt-get install wrk) sends the same POST with `--connections` in flight, first with the
config left alone, then while a key's name changes every `--every` seconds (each change a
reload). Prints requests per second and the latency percentiles of both phases.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from ruamel.yaml import YAML

from bench.latency import _Url
from bench.quick import governed
from bench.scaling import compiled_provider, post_script, ready_for_wrk
from tests.conftest import make_config
from tests.harness import GatewayProcess, free_port


def add_keys(config: Path, count: int) -> None:
    """`count` more keys like the first one (hashes of no secret: never matched)."""
    yaml = YAML()
    doc = yaml.load(config.read_text())
    first = dict(doc["virtual_keys"][0])
    for i in range(count):
        doc["virtual_keys"].append({**first, "id": f"vk_bench{i:05d}", "name": f"bench {i}",
                                    "secret_hash": f"{i:064x}",
                                    "secret_prefix": f"tg-live-b{i:04d}"})
    with config.open("w") as f:
        yaml.dump(doc, f)


def churn(config: Path, every: float, stop: threading.Event) -> int:
    """Rename the last key every `every` seconds, each time by an atomic replace (as the
    CLI writes); returns how many changes it made."""
    text, n = config.read_text(), 0
    last = re.findall(r"name: (bench \d+)", text)[-1]
    while not stop.wait(every):
        n += 1
        tmp = config.with_name(f".{config.name}.bench")
        tmp.write_text(text.replace(f"name: {last}\n", f"name: {last} v{n}\n"))
        os.replace(tmp, config)
    return n


def wrk(url: str, script: Path, seconds: int, connections: int) -> dict[str, str]:
    out = subprocess.run(["wrk", "-t", "1", "-c", str(connections), "-d", f"{seconds}s",
                          "--latency", "-s", str(script), url], capture_output=True, text=True,
                         check=True).stdout
    found = dict(re.findall(r"^\s+(50|90|99)%\s+(\S+)", out, re.M))
    found["req/s"] = re.search(r"Requests/sec:\s+(\S+)", out).group(1)
    found["max"] = re.search(r"Latency\s+\S+\s+\S+\s+(\S+)", out).group(1)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    found["non-2xx"] = bad.group(1) if bad else "0"
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, default=400)
    parser.add_argument("--every", type=float, default=0.5)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=8)
    args = parser.parse_args()
    if not ready_for_wrk():
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="tollgate-bench-reload-"))
    provider, provider_url = compiled_provider(workdir)
    rows: list[tuple[str, dict[str, str]]] = []
    changes: list[int] = []
    try:
        config = make_config(workdir, _Url(provider_url),
                             _Url(f"http://127.0.0.1:{free_port()}"))
        secret = governed(config)
        add_keys(config, args.keys)
        size = config.stat().st_size
        script = post_script(workdir, {"authorization": f"Bearer {secret}"})
        gw = GatewayProcess("envoy", config, workdir).start()
        try:
            url = f"{gw.url}/v1/chat/completions"
            wrk(url, script, 2, args.connections)  # warm-up
            rows.append(("config left alone", wrk(url, script, args.seconds,
                                                  args.connections)))
            stop = threading.Event()
            thread = threading.Thread(target=lambda: changes.append(
                churn(config, args.every, stop)))
            thread.start()
            try:
                rows.append((f"reload every {args.every:g} s",
                             wrk(url, script, args.seconds, args.connections)))
            finally:
                stop.set()
                thread.join()
        finally:
            gw.stop()
    finally:
        provider.terminate()
        provider.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"\n{args.connections} in flight for {args.seconds} s (wrk); {os.cpu_count()} cores; "
          f"{args.keys + 1} keys, a {size // 1024} KiB config; {changes[0]} changes\n")
    header = (f"{'phase':<22} {'req/s':>8} {'p50':>9} {'p90':>9} {'p99':>9} {'max':>9} "
              f"{'non-2xx':>8}")
    print(f"{header}\n{'-' * len(header)}")
    for name, f in rows:
        print(f"{name:<22} {f['req/s']:>8} {f.get('50', '-'):>9} {f.get('90', '-'):>9} "
              f"{f.get('99', '-'):>9} {f['max']:>9} {f['non-2xx']:>8}")
    return 1 if any(f["non-2xx"] != "0" for _, f in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
