"""`make wheel-smoke`: the wheel, installed with pip into a clean virtual environment, works
outside the checkout: `tollgate init` finds its price table and model catalog, the Envoy host
serves a request to a (fake) provider, and its spans reach an OTLP collector once the one
documented extra step has run (a plain `pip install` lets xds-protos overwrite
opentelemetry-proto's files; `config validate` says so, and how to fix it).

Run with the development environment's Python (it has the fake providers and the collector);
the gateway under test is the clean environment's `tollgate` command.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.fakes.providers import FakeProvider  # noqa: E402
from tests.harness import free_port, wait_until  # noqa: E402
from tests.otlp import OTLPReceiver  # noqa: E402

KEY = "sk-smoke-openai"


def run(*args: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None,
        check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True,
                         text=True)
    if check and out.returncode != 0:
        sys.exit(f"{Path(sys.argv[0]).stem}: {' '.join(map(str, args))} failed:\n"
                 f"{out.stdout}{out.stderr}")
    return out


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="tollgate-wheel-"))
    had_build = (ROOT / "build").exists()
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", ROOT, "-w", work / "dist")
    if not had_build:  # setuptools' scratch folder in the checkout
        shutil.rmtree(ROOT / "build", ignore_errors=True)
    [wheel] = (work / "dist").glob("*.whl")
    print(f"wheel smoke: built {wheel.name}")
    venv = work / "venv"
    run(sys.executable, "-m", "venv", venv)
    pip = [venv / "bin" / "python", "-m", "pip", "install", "-q"]
    run(*pip, wheel)
    print("wheel smoke: installed into a clean virtual environment")

    site = work / "site"  # outside the checkout: nothing can come from repository paths
    site.mkdir()
    env = {"PATH": f"{venv / 'bin'}:{os.environ['PATH']}", "HOME": str(work),
           "SMOKE_OPENAI_KEY": KEY}

    def fix_protos() -> None:
        print("wheel smoke: as documented, a plain pip install needs the protos fix; "
              "config validate said so")
        run(*pip, "--force-reinstall", "--no-deps",
            f"opentelemetry-proto=={version(venv, 'opentelemetry-proto')}")

    try:
        serves(lambda *args: [venv / "bin" / "tollgate", *args], site, site, env,
               work / "gateway.log", fix_protos)
    except BaseException:
        print(f"wheel smoke: its wheel, virtual environment and log are kept in {work}",
              file=sys.stderr)
        raise
    shutil.rmtree(work)  # (a virtual environment of some 350 MB on each `make test`)
    print("wheel smoke: ok (init, config validate, a request through Envoy, its span exported)")
    return 0


def serves(tollgate: Callable[..., list[str | Path]], site: Path, seen_as: Path,
           env: dict[str, str] | None, log_path: Path,
           fix_protos: Callable[[], None] | None = None) -> None:
    """The gateway a `tollgate` command runs (`tollgate(*args)`: its command line, run in
    `site`, which it sees as `seen_as`, with the provider key in SMOKE_OPENAI_KEY):
    `init`, a provider and a key, `config validate` with nothing to say of OpenTelemetry
    (after `fix_protos`, if it says what that fixes), then a chat completion through
    `serve envoy` and its span at an OTLP collector."""
    config = seen_as / "gateway.yaml"

    def tg(*args: str | Path) -> subprocess.CompletedProcess[str]:
        return run(*tollgate(*args), cwd=site, env=env)

    tg("--version")
    tg("--config", config, "init", "--org", "acme")
    assert (site / "prices.yaml").stat().st_size and (site / "models.yaml").stat().st_size
    provider = FakeProvider("openai", KEY).start()
    collector = OTLPReceiver().start()
    try:
        tg("--config", config, "model-providers", "create", "--id", "mp_openai", "--type",
           "openai", "--scope", "ORG:acme", "--base-url", provider.url, "--api-key-env",
           "SMOKE_OPENAI_KEY")
        edited = site / "gateway.yaml"
        edited.write_text(edited.read_text().replace(
            "  max_body_bytes:",
            f"  telemetry: {{otlp_endpoint: 'http://127.0.0.1:{collector.http_port}'}}\n"
            "  max_body_bytes:", 1))
        secret = json.loads(tg("--config", config, "virtual-keys", "create", "--name",
                               "smoke", "--scope", "ORG:acme", "--format", "json"
                               ).stdout)["secret"]

        checked = tg("--config", config, "config", "validate")
        if fix_protos is not None and "overwrote opentelemetry-proto's files" in checked.stderr:
            fix_protos()
            checked = tg("--config", config, "config", "validate")
        assert "opentelemetry" not in checked.stderr, checked.stderr

        port, admin = free_port(), free_port()
        log = open(log_path, "wb")  # noqa: SIM115
        gateway = subprocess.Popen(
            [str(a) for a in tollgate(
                "--config", config, "serve", "envoy", "--listen", f"127.0.0.1:{port}",
                "--admin", f"127.0.0.1:{admin}", "--envoy-admin", f"127.0.0.1:{free_port()}")],
            env=env, cwd=site, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: httpx.get(f"http://127.0.0.1:{admin}/readyz").status_code == 200
                       and httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 401,
                       timeout=60, what="the gateway and its Envoy listener")
            reply = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                               headers={"authorization": f"Bearer {secret}"},
                               json={"model": "gpt-5-mini", "max_tokens": 4,
                                     "messages": [{"role": "user", "content": "hi"}]})
            assert reply.status_code == 200, reply.text
            assert provider.requests[-1].headers["authorization"] == f"Bearer {KEY}"
            wait_until(lambda: collector.spans, timeout=20, what="a span at the collector")
        finally:
            gateway.terminate()
            gateway.wait(20)
            log.close()
    except BaseException:
        print(log_path.read_text(errors="replace") if log_path.exists() else "",
              file=sys.stderr)
        raise
    finally:
        provider.stop()
        collector.stop()


def version(venv: Path, name: str) -> str:
    return run(venv / "bin" / "python", "-c",
               f"import importlib.metadata as m; print(m.version({name!r}))").stdout.strip()


if __name__ == "__main__":
    sys.exit(main())
