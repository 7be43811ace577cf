"""`make demo`: the gateway with the bundled fake OpenAI and Anthropic providers, a key, and
the README's five-minute flow, with no real provider key.

It writes `.demo/gateway.yaml` (run `tollgate --config .demo/gateway.yaml ...` beside it),
starts the fakes and the gateway, makes a key, checks the README's first call through the
gateway, then serves until Ctrl-C. `--check` stops after the check (exit 1 if it fails).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.fakes.providers import FakeProvider  # noqa: E402 - the checkout's own fakes

BIN = Path(sys.executable).parent
KEYS = {"DEMO_OPENAI_KEY": "sk-demo-openai", "DEMO_ANTHROPIC_KEY": "sk-ant-demo"}


def tollgate(config: Path, *args: str) -> str:
    out = subprocess.run([str(BIN / "tollgate"), "--config", str(config), *args],
                         capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"demo: tollgate {' '.join(args)} failed:\n{out.stderr}")
    return out.stdout


def write_config(directory: Path, openai_url: str, anthropic_url: str) -> Path:
    """A fresh config, made with the CLI as the README makes one."""
    shutil.rmtree(directory, ignore_errors=True)
    config = directory / "gateway.yaml"
    tollgate(config, "init", "--org", "acme")
    tollgate(config, "teams", "create", "--id", "team_eng")
    for ident, kind, url, env in (("mp_openai", "openai", openai_url, "DEMO_OPENAI_KEY"),
                                  ("mp_anthropic", "anthropic", anthropic_url,
                                   "DEMO_ANTHROPIC_KEY")):
        tollgate(config, "model-providers", "create", "--id", ident, "--type", kind,
                 "--scope", "ORG:acme", "--base-url", url, "--api-key-env", env)
    return config


def check(base: str, secret: str) -> bool:
    """The README's first check: a chat completion through the gateway, loud on an error."""
    r = httpx.post(f"{base}/v1/chat/completions", headers={"authorization": f"Bearer {secret}"},
                   json={"model": "gpt-5-mini", "max_tokens": 4,
                         "messages": [{"role": "user", "content": "ping"}]}, timeout=30)
    shown = {k: v for k, v in r.headers.items() if k.lower().startswith("x-langwatch-")}
    print(f"demo: POST /v1/chat/completions -> {r.status_code} {json.dumps(shown)}")
    if r.status_code != 200:
        print(f"demo: the check FAILED: {r.text}", file=sys.stderr)
    return r.status_code == 200


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", choices=["envoy", "mitmproxy"], default="envoy")
    parser.add_argument("--listen", default="127.0.0.1:8080")
    parser.add_argument("--envoy-admin", default=None, help="For --host envoy.")
    parser.add_argument("--dir", type=Path, default=ROOT / ".demo")
    parser.add_argument("--check", action="store_true", help="Stop after the check.")
    args = parser.parse_args()

    fakes = [FakeProvider("openai", KEYS["DEMO_OPENAI_KEY"]).start(),
             FakeProvider("anthropic", KEYS["DEMO_ANTHROPIC_KEY"]).start()]
    config = write_config(args.dir, fakes[0].url, fakes[1].url)
    # The keys' pepper is the generated file beside the config, as on a first `make run`.
    env = {**os.environ, **KEYS}
    key = json.loads(tollgate(config, "virtual-keys", "create", "--name", "demo", "--scope",
                              "ORG:acme", "--principal", "alice@acme.com", "--format", "json"))
    gateway = subprocess.Popen([str(BIN / "tollgate"), "--config", str(config), "serve",
                                args.host, "--listen", args.listen,
                                *(["--envoy-admin", args.envoy_admin] if args.envoy_admin
                                  else [])], env=env)
    base = f"http://{args.listen}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/v1/models", timeout=2).status_code == 401:
                    break
            except httpx.HTTPError:
                pass
            if gateway.poll() is not None or time.monotonic() > deadline:
                print("demo: the gateway did not start", file=sys.stderr)
                return 1
            time.sleep(0.2)
        ok = check(base, key["secret"])
        if args.check or not ok:
            return 0 if ok else 1
        print(f"""
demo: the gateway is on {base}, in front of fake OpenAI and Anthropic providers.
  export TOLLGATE_VK={key['secret']}
  export TOLLGATE_CONFIG={config}       # so `tollgate ...` commands edit the demo's config
Then follow the README's "Five minutes with it" from "Point the SDKs at the gateway".
Ctrl-C stops it all.""", flush=True)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        try:
            return gateway.wait()
        except KeyboardInterrupt:
            return 0
    finally:
        gateway.send_signal(signal.SIGINT)
        try:
            gateway.wait(15)
        except subprocess.TimeoutExpired:
            gateway.kill()
        for fake in fakes:
            fake.stop()


if __name__ == "__main__":
    sys.exit(main())
