"""Shared fixtures: fake providers, a gateway config built with the real CLI, and hosts."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.fakes.providers import AwsCredentials, FakeProvider
from tests.harness import GatewayProcess, tollgate, wait_until

OPENAI_KEY = "sk-fake-openai-provider-key"
ANTHROPIC_KEY = "sk-ant-fake-provider-key"
GEMINI_KEY = "AIza-fake-gemini-provider-key"
AZURE_KEY = "azure-fake-provider-key"
PEPPER = "test-pepper-0123456789"
PROVIDER_ENV = {"FAKE_OPENAI_KEY": OPENAI_KEY, "FAKE_ANTHROPIC_KEY": ANTHROPIC_KEY,
                "FAKE_AZURE_KEY": AZURE_KEY, "FAKE_GEMINI_KEY": GEMINI_KEY,
                "TOLLGATE_KEY_PEPPER": PEPPER,
                # The AWS credential chain finds these first (the Bedrock fake checks them).
                "AWS_ACCESS_KEY_ID": AwsCredentials().access_key,
                "AWS_SECRET_ACCESS_KEY": AwsCredentials().secret_key,
                "AWS_EC2_METADATA_DISABLED": "true"}
os.environ.update(PROVIDER_ENV)

HOSTS = ["mitmproxy", "envoy"]


@pytest.fixture(scope="session")
def fake_openai() -> Iterator[FakeProvider]:
    fake = FakeProvider("openai", OPENAI_KEY).start()
    yield fake
    fake.stop()


@pytest.fixture(scope="session")
def fake_anthropic() -> Iterator[FakeProvider]:
    fake = FakeProvider("anthropic", ANTHROPIC_KEY).start()
    yield fake
    fake.stop()


@pytest.fixture(scope="session")
def fake_azure() -> Iterator[FakeProvider]:
    """Azure OpenAI, with deployment `mini-prod` running gpt-4o-mini."""
    fake = FakeProvider("azure", AZURE_KEY, deployments={"mini-prod": "gpt-4o-mini"}).start()
    yield fake
    fake.stop()


@pytest.fixture(scope="session")
def fake_bedrock() -> Iterator[FakeProvider]:
    """AWS Bedrock in us-east-1: SigV4 with the AWS_* credentials above."""
    fake = FakeProvider("bedrock", "").start()
    yield fake
    fake.stop()


@pytest.fixture(scope="session")
def fake_vertex() -> Iterator[FakeProvider]:
    """Google Vertex AI: its own token endpoint, for the service account a test makes."""
    fake = FakeProvider("vertex", "").start()
    yield fake
    fake.stop()


@pytest.fixture(scope="session")
def fake_gemini() -> Iterator[FakeProvider]:
    fake = FakeProvider("gemini", GEMINI_KEY).start()
    yield fake
    fake.stop()


@pytest.fixture(autouse=True)
def _reset_fakes(request: pytest.FixtureRequest) -> Iterator[None]:
    """Each test starts with its fakes reset, and fails if one of them failed while it ran:
    a fake that breaks (rather than answering as scripted) would otherwise only print a
    traceback, and a test could pass on what the break did to the gateway."""
    fakes = [request.getfixturevalue(name) for name in (
        "fake_openai", "fake_anthropic", "fake_azure", "fake_bedrock", "fake_vertex",
        "fake_gemini") if name in request.fixturenames]
    for fake in fakes:
        fake.reset()
    yield
    failures = [f"fake {fake.family}: {failure}" for fake in fakes for failure in fake.failures]
    for fake in fakes:
        fake.failures.clear()
    if failures:
        pytest.fail("a fake provider failed while the test ran:\n" + "\n".join(failures),
                    pytrace=False)


# Configs `make_config` wrote, by the providers' URLs: the next one with the same URLs is a
# copy of the files the commands wrote (six CLI runs, ~5 s, saved per gateway module).
_WRITTEN: dict[tuple[str, str], Path] = {}


def make_config(directory: Path, fake_openai: FakeProvider,
                fake_anthropic: FakeProvider) -> Path:
    """A config written the way a user would: `tollgate init` and `create` commands."""
    config = directory / "gateway.yaml"
    written = _WRITTEN.get((fake_openai.url, fake_anthropic.url))
    if written is not None:
        directory.mkdir(parents=True, exist_ok=True)
        for name in ("gateway.yaml", "prices.yaml", "models.yaml"):
            shutil.copyfile(written / name, directory / name)
        return config
    _write_config(config, fake_openai, fake_anthropic)
    template = Path(tempfile.mkdtemp(prefix="tollgate-config-"))
    atexit.register(shutil.rmtree, template, ignore_errors=True)  # kept for this run only
    for name in ("gateway.yaml", "prices.yaml", "models.yaml"):
        shutil.copyfile(directory / name, template / name)
    _WRITTEN[(fake_openai.url, fake_anthropic.url)] = template
    return config


def _write_config(config: Path, fake_openai: FakeProvider, fake_anthropic: FakeProvider) -> None:
    tollgate("init", "--org", "acme", config=config)
    tollgate("teams", "create", "--id", "team_eng", config=config)
    tollgate("projects", "create", "--id", "proj_web", "--team", "team_eng", config=config)
    tollgate("model-providers", "create", "--id", "mp_openai", "--type", "openai",
             "--scope", "ORG:acme", "--base-url", fake_openai.url,
             "--api-key-env", "FAKE_OPENAI_KEY", "--fallback-priority", "1", config=config)
    tollgate("model-providers", "create", "--id", "mp_anthropic", "--type", "anthropic",
             "--scope", "ORG:acme", "--base-url", fake_anthropic.url,
             "--api-key-env", "FAKE_ANTHROPIC_KEY", "--fallback-priority", "2", config=config)


@pytest.fixture(scope="session")
def gateway_config(tmp_path_factory: pytest.TempPathFactory, fake_openai: FakeProvider,
                   fake_anthropic: FakeProvider) -> Path:
    return make_config(tmp_path_factory.mktemp("gateway"), fake_openai, fake_anthropic)


@dataclass
class Key:
    id: str
    secret: str


@dataclass
class Gateway:
    """A running host plus the helpers tests need to configure it."""

    host: str
    process: GatewayProcess
    config: Path

    @property
    def url(self) -> str:
        return self.process.url

    @property
    def openai_base(self) -> str:
        return f"{self.url}/v1"

    def cli(self, *args: str, check: bool = True):
        return tollgate(*args, config=self.config, check=check)

    def create_key(self, *args: str) -> Key:
        """Mint a key with the CLI and wait until the running gateway accepts it."""
        out = self.cli("virtual-keys", "create", "--name", "test", "--scope", "ORG:acme",
                       "--principal", "alice@acme.com", *args, "--format", "json")
        doc = json.loads(out.stdout)
        key = Key(doc["id"], doc["secret"])
        self.wait_for_key(key, lambda status: status != 401)
        return key

    def wait_for_config(self, timeout: float = 3.0) -> None:
        """Until this gateway serves the config file as it is on disk (`tollgate status`)."""
        pid = self.process.proc.pid

        def current() -> bool:
            out = self.cli("status", "--format", "json", check=False)
            return any(g["pid"] == pid and not g["stale"]
                       for g in json.loads(out.stdout)["gateways"])

        wait_until(current, timeout=timeout, what=f"{self.host} gateway to load the config")

    def wait_for_key(self, key: Key, ok, timeout: float = 2.0) -> None:
        """Poll GET /v1/models with the key until `ok(status)` (config reload is polled)."""
        def check() -> bool:
            r = httpx.get(f"{self.url}/v1/models",
                          headers={"authorization": f"Bearer {key.secret}"}, timeout=5)
            return ok(r.status_code)

        wait_until(check, timeout=timeout, what=f"gateway to pick up {key.id}")

    def extproc_streams(self) -> int:
        """The Envoy host's ext_proc streams opened so far (Envoy's admin counts them): a
        rewrite's (a response reshaped or cut event by event in Python) or an attempt's."""
        admin = self.process.extra[self.process.extra.index("--envoy-admin") + 1]
        stats = httpx.get(f"http://{admin}/stats", params={"filter": "ext_proc.streams_started"},
                          timeout=5).text
        return sum(int(line.rsplit(":", 1)[1]) for line in stats.splitlines()
                   if line.startswith("http.tollgate.ext_proc.streams_started"))


def make_policy(config: Path, name: str, *providers: str, fallback: str | None = None,
                extra: tuple[str, ...] = ()) -> str:
    """A routing policy over `providers` in order, made with the CLI. With `fallback` (a key
    config's JSON), also a key that falls back on it: Envoy renders a policy's fallback
    chains from the keys that need them, so they must exist before it starts."""
    policy = json.loads(tollgate(
        "routing-policies", "create", "--scope", "ORG:acme", "--name", name,
        *(a for p in providers for a in ("--model-provider", p)), *extra, "--format", "json",
        config=config).stdout)["id"]
    if fallback is not None:
        tollgate("virtual-keys", "create", "--name", name, "--scope", "ORG:acme",
                 "--routing-policy", policy, "--config-json", fallback, config=config)
    return policy


@contextlib.contextmanager
def own_gateways(tmp_path_factory: pytest.TempPathFactory, fake_openai: FakeProvider,
                 fake_anthropic: FakeProvider, name: str, setup: Callable[[Path], None],
                 env: dict[str, str] | None = None) -> Iterator[dict[str, Gateway]]:
    """One gateway per host, each on its own config (made by `make_config`, then `setup`)
    and its own state: for a module whose providers or keys must exist before Envoy's
    config is rendered, or whose counters must not be shared between the hosts."""
    out: dict[str, Gateway] = {}
    try:
        for host in HOSTS:
            directory = tmp_path_factory.mktemp(f"{name}-{host}")
            config = make_config(directory, fake_openai, fake_anthropic)
            setup(config)
            out[host] = Gateway(host, GatewayProcess(host, config, directory,
                                                     env=env).start(), config)
        yield out
    finally:
        for gw in out.values():
            gw.process.stop()


@pytest.fixture(scope="session", params=HOSTS)
def gateway(request: pytest.FixtureRequest, gateway_config: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    proc = GatewayProcess(request.param, gateway_config, tmp_path_factory.mktemp("logs"))
    proc.start()
    yield Gateway(request.param, proc, gateway_config)
    proc.stop()
