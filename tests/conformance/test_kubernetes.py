"""Kubernetes and Istio: what `tollgate envoy k8s` renders passes the API server's schemas,
and a Pod's worth of it serves: the ConfigMap mounted the way the kubelet mounts it, the
tollgate container's own args, probes and env, and the Envoy its manifests configure (the
sidecar's envoy.yaml, or istio-proxy's listener and clusters from the EnvoyFilter) run by the
real Envoy binary. The Pod follows a ConfigMap update and keeps its state out of the mount."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import certifi
import httpx
import kubernetes_validate
import openai
import pytest
from cloudcoil.models.istio.networking.v1alpha3 import EnvoyFilter
from ruamel.yaml import YAML

from extproc.runner import envoy_binary
from tests.conftest import OPENAI_KEY, PEPPER, make_config
from tests.fakes.providers import FakeProvider
from tests.harness import (
    BIN,
    ROOT,
    ConfigMapMount,
    RedisServer,
    envoy_validates,
    free_port,
    ledger,
    tollgate,
    wait_until,
)

SHAPES = ["sidecar", "istio"]
KUBERNETES = "1.37.0"
# istio-proxy's agent drains it this long before it stops it (Istio's
# terminationDrainDuration, 5 s by default): enough for its access log's last batch.
ISTIO_DRAIN = 0.5
CHAT = {"model": "gpt-5-mini", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def config(tmp_path, fake_openai, fake_anthropic, redis) -> Path:
    """The config a platform team keeps in git; replicas share their state through Redis."""
    path = make_config(tmp_path / "src", fake_openai, fake_anthropic)
    text = path.read_text()
    path.write_text(text.replace('state: "sqlite:///.tollgate/state.db"',
                                 f'state: "{redis.url}"'))
    return path


def render(config: Path, shape: str, *args: str) -> list[dict[str, Any]]:
    out = tollgate("envoy", "k8s", shape, *args, config=config).stdout
    return [doc for doc in YAML(typ="safe").load_all(out) if doc]


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    [doc] = [d for d in docs if d["kind"] == kind
             and (name is None or d["metadata"]["name"] == name)]
    return doc


def check_istio_schema(doc: dict[str, Any]) -> None:
    """The EnvoyFilter CRD's schema (models generated from Istio's CRDs): enums and types are
    checked by validation, unknown fields by a round trip that would drop them."""
    model = EnvoyFilter.model_validate(doc)
    assert model.model_dump(by_alias=True, exclude_unset=True, mode="json") == doc


@pytest.mark.parametrize("shape", SHAPES)
def test_manifests_pass_the_kubernetes_and_istio_schemas(config, shape):
    docs = render(config, shape, "--namespace", "ai", "--extproc-processes", "2")
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == (["ConfigMap", "ConfigMap", "Deployment"] if shape == "sidecar"
                     else ["ConfigMap", "Deployment", "EnvoyFilter"])
    for doc in docs:
        if doc["kind"] == "EnvoyFilter":
            check_istio_schema(doc)
        else:
            kubernetes_validate.validate(doc, KUBERNETES, strict=True)
        assert doc["metadata"]["namespace"] == "ai"


def test_each_version_of_the_filters_has_an_envoyfilter_for_its_own_pods(config, monkeypatch):
    """Istio gives an EnvoyFilter to every Pod it selects at once; a Deployment replaces its
    Pods one by one, and ext_proc refuses filters of another version. So each version of
    the filters has an EnvoyFilter of its own, for the Pods of its version only: while an
    upgrade rolls, old and new Pods keep the filters their ext_proc speaks, and the render
    says which older EnvoyFilters to delete once it has."""
    from extproc import envoy_config, kubernetes
    from tollgate.config.load import load_config

    loaded, opts = load_config(config), kubernetes.Options(namespace="ai")
    rendered = {}
    for version in (envoy_config.FILTERS_VERSION, "0123456789ab"):
        monkeypatch.setattr(envoy_config, "FILTERS_VERSION", version)
        docs = kubernetes.istio(loaded, opts)
        envoy_filter, deployment = one(docs, "EnvoyFilter"), one(docs, "Deployment")
        check_istio_schema(envoy_filter)
        kubernetes_validate.validate(deployment, KUBERNETES, strict=True)
        selector = envoy_filter["spec"]["workloadSelector"]["labels"]
        assert selector == {"tollgate.dev/gateway": "tollgate", "tollgate.dev/filters": version}
        assert selector.items() <= envoy_filter["metadata"]["labels"].items()
        lua = json.dumps(envoy_filter["spec"]["configPatches"])
        assert f'local FILTERS = \\"{version}\\"' in lua
        rendered[version] = (envoy_filter["metadata"]["name"], selector,
                             deployment["spec"]["template"]["metadata"]["labels"])
    (old_name, old_selector, old_pods), (new_name, new_selector, new_pods) = rendered.values()
    assert old_name != new_name  # applied beside the other, not over it
    assert old_selector.items() <= old_pods.items() and new_selector.items() <= new_pods.items()
    assert not old_selector.items() <= new_pods.items()
    assert not new_selector.items() <= old_pods.items()
    out = tollgate("envoy", "k8s", "istio", "--namespace", "ai", config=config).stdout
    assert ("# kubectl -n ai delete envoyfilter -l tollgate.dev/gateway=tollgate,"
            f"tollgate.dev/filters!={envoy_config.FILTERS_VERSION}\n") in out


def test_render_refuses_what_a_pod_cannot_run(tmp_path, fake_openai, fake_anthropic):
    config = make_config(tmp_path, fake_openai, fake_anthropic)
    out = tollgate("envoy", "k8s", "sidecar", config=config, check=False)
    assert out.returncode == 1 and "gateway.state is SQLite" in out.stderr
    assert "redis://" in out.stderr and "Traceback" not in out.stderr
    config.write_text(config.read_text().replace('state: "sqlite:///.tollgate/state.db"',
                                                 'state: "redis://redis:6379/0"'))
    key_file = tmp_path / "openai.key"
    tollgate("model-providers", "create", "--id", "mp_file", "--type", "openai", "--scope",
             "ORG:acme", "--base-url", fake_openai.url, "--api-key-file", str(key_file),
             config=config)
    out = tollgate("envoy", "k8s", "istio", config=config, check=False)
    assert out.returncode == 1
    assert f"mp_file: api_key_file {key_file} is not in the Pod" in out.stderr
    assert "/var/run/secrets/tollgate/providers/" in out.stderr


def in_pod(value: str, paths: dict[str, str]) -> str:
    for pod_path, here in paths.items():
        value = value.replace(pod_path, here)
    return value


def envoy_bootstrap(docs: list[dict[str, Any]], shape: str) -> dict[str, Any]:
    """The Envoy the manifests configure: the sidecar's envoy.yaml, or istio-proxy given the
    EnvoyFilter's listener and clusters (Istio adds each patch's value as it is)."""
    if shape == "sidecar":
        return YAML(typ="safe").load(one(docs, "ConfigMap", "tollgate-envoy")["data"]
                                     ["envoy.yaml"])
    patches = one(docs, "EnvoyFilter")["spec"]["configPatches"]
    assert {p["match"]["context"] for p in patches} == {"SIDECAR_OUTBOUND"}
    assert {p["patch"]["operation"] for p in patches} == {"ADD"}
    return {"node": {"id": "sidecar~10.0.0.1~app.default~default.svc.cluster.local",
                     "cluster": "app.default"},
            "admin": {"address": {"socket_address": {"address": "127.0.0.1",
                                                     "port_value": 15000}}},
            "static_resources": {
                "listeners": [p["patch"]["value"] for p in patches
                              if p["applyTo"] == "LISTENER"],
                "clusters": [p["patch"]["value"] for p in patches
                             if p["applyTo"] == "CLUSTER"]}}


def status(mount: Path, run: Path) -> subprocess.CompletedProcess[str]:
    """`tollgate status`, as `kubectl exec` into the tollgate container would run it."""
    return subprocess.run([str(BIN / "tollgate"), "--config", str(mount / "gateway.yaml"),
                           "status"], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "TOLLGATE_STATE_DIR": str(run)})


def stop_as_the_kubelet_does(pod: dict[str, Any], running: dict[str, subprocess.Popen]
                             ) -> None:
    """Stop a Pod whose app has exited: its native sidecars in reverse order, each once its
    preStop hook is done (a `sleep` action here), by SIGTERM; then what Istio injected ahead
    of them (istio-proxy, named `envoy` in `running`), whose agent drains it as it stops."""
    for container in reversed(pod["initContainers"]):
        name = "envoy" if container["name"] == "envoy" else "tollgate"
        time.sleep(container.get("lifecycle", {}).get("preStop", {}).get("sleep", {})
                   .get("seconds", 0))
        proc = running.pop(name)
        proc.terminate()
        assert proc.wait(10) == 0
    for proc in running.values():
        time.sleep(ISTIO_DRAIN)
        proc.terminate()
        proc.wait(10)


@pytest.mark.parametrize("shape", SHAPES)
def test_a_pod_serves_and_follows_its_configmap(config, shape, tmp_path, fake_openai):
    """The sidecar's Envoy follows a provider's new address live (ext_proc rewrites its
    resources); istio-proxy keeps the EnvoyFilter's, and `tollgate status` says so."""
    created = json.loads(tollgate("virtual-keys", "create", "--name", "app", "--scope",
                                  "ORG:acme", "--principal", "app@acme.com", "--format",
                                  "json", config=config).stdout)
    other = json.loads(tollgate("virtual-keys", "create", "--name", "other", "--scope",
                                "ORG:acme", "--format", "json", config=config).stdout)
    port = free_port()
    docs = render(config, shape, "--port", str(port))
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    [container] = [c for c in pod["initContainers"] if c["name"] == "tollgate"]
    app_env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
    assert app_env["OPENAI_BASE_URL"] == f"http://127.0.0.1:{port}/v1"

    mount = ConfigMapMount(tmp_path / "etc-tollgate")
    mount.write(one(docs, "ConfigMap", "tollgate-config")["data"])
    # Unix socket paths are short: not under pytest's long tmp_path.
    run = Path(tempfile.mkdtemp(prefix="tg-pod-"))
    admin, envoy_admin = free_port(), free_port()
    paths = {"/etc/tollgate": str(mount.path), "/run/tollgate": str(run),
             f"0.0.0.0:{container['ports'][0]['containerPort']}": f"127.0.0.1:{admin}",
             # Envoy's admin: the sidecar's own, or istio-proxy's.
             "127.0.0.1:9901": f"127.0.0.1:{envoy_admin}",
             "127.0.0.1:15000": f"127.0.0.1:{envoy_admin}"}
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")}
    from_secrets = {}
    for var in container["env"]:
        if "value" in var:
            env[var["name"]] = in_pod(var["value"], paths)
        else:
            from_secrets[var["name"]] = var["valueFrom"]["secretKeyRef"]
    assert from_secrets == {
        "TOLLGATE_KEY_PEPPER": {"name": "tollgate-pepper", "key": "pepper"},
        "FAKE_OPENAI_KEY": {"name": "tollgate-provider-keys", "key": "FAKE_OPENAI_KEY"},
        "FAKE_ANTHROPIC_KEY": {"name": "tollgate-provider-keys", "key": "FAKE_ANTHROPIC_KEY"}}
    env.update({name: os.environ[name] for name in from_secrets})
    assert env["TOLLGATE_KEY_PEPPER"] == PEPPER

    bootstrap = json.loads(in_pod(json.dumps(envoy_bootstrap(docs, shape)), paths))
    bootstrap["admin"]["address"]["socket_address"]["port_value"] = envoy_admin
    bootstrap_file = run / "envoy.json"
    bootstrap_file.write_text(json.dumps(bootstrap))
    moved = FakeProvider("openai", OPENAI_KEY).start()  # where mp_openai moves to
    log = open(tmp_path / "pod.log", "wb")  # noqa: SIM115
    gateway = subprocess.Popen([str(BIN / container["command"][0]),
                                *(in_pod(a, paths) for a in container["args"])],
                               env=env, stdout=log, stderr=subprocess.STDOUT)
    envoy = None
    try:
        probe = f"http://127.0.0.1:{admin}{container['startupProbe']['httpGet']['path']}"
        wait_until(lambda: gateway.poll() is None and httpx.get(probe).status_code == 200,
                   timeout=30, what="the startup probe")
        # Envoy starts once the gateway's startup probe passes (native sidecar order).
        envoy_validates(bootstrap_file)
        envoy = subprocess.Popen([envoy_binary(), "-c", str(bootstrap_file),
                                  "--disable-hot-restart", "--log-level", "warn"],
                                 stdout=log, stderr=subprocess.STDOUT)
        client = openai.OpenAI(base_url=app_env["OPENAI_BASE_URL"], api_key=created["secret"],
                               max_retries=0)
        wait_until(lambda: httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 401,
                   timeout=20, what="Envoy's listener")
        reply = client.chat.completions.with_raw_response.create(**CHAT)
        assert reply.http_response.status_code == 200
        assert reply.headers["x-langwatch-provider"] == "mp_openai"
        assert fake_openai.requests[-1].headers["authorization"] == f"Bearer {OPENAI_KEY}"
        current = status(mount.path, run)
        assert current.returncode == 0, current.stdout + current.stderr
        assert f"envoy (admin 127.0.0.1:{envoy_admin}): current" in current.stdout

        # `kubectl apply` of a re-rendered ConfigMap: the kubelet swaps the folder and the
        # gateway follows the link to the new file.
        tollgate("model-providers", "update", "mp_openai", "--base-url", moved.url,
                 config=config)
        mount.write(one(render(config, shape, "--port", str(port)), "ConfigMap",
                        "tollgate-config")["data"])
        if shape == "sidecar":  # ext_proc rewrote Envoy's clusters: the next call moves
            wait_until(lambda: client.chat.completions.create(**CHAT) and moved.requests,
                       timeout=15, what="Envoy to reach mp_openai's new address")
            assert status(mount.path, run).returncode == 0
        else:  # the EnvoyFilter is what istio-proxy has: status says it is behind
            behind = wait_until(lambda: (s := status(mount.path, run)).returncode == 1 and
                                "older view" in s.stderr and s, timeout=10,
                                what="status to name Envoy's older view")
            host, _, moved_port = moved.url.removeprefix("http://").rpartition(":")
            assert f"the config to {host}:{moved_port}" in behind.stderr
            assert "envoy render --resources" in behind.stderr

        tollgate("virtual-keys", "revoke", created["id"], "--yes", config=config)
        mount.write(one(render(config, shape, "--port", str(port)), "ConfigMap",
                        "tollgate-config")["data"])

        def refused() -> bool:
            try:
                client.chat.completions.create(**CHAT)
            except openai.PermissionDeniedError as e:
                return e.body["code"] == "virtual_key_revoked"
            return False

        wait_until(refused, timeout=5, what="the ConfigMap update to revoke the key")
        assert gateway.poll() is None and envoy.poll() is None  # no restart
        # State lives in TOLLGATE_STATE_DIR, never inside the (read-only) mount.
        assert mount.entries() == {"..data", "..2026_12_02_10_00_03.3", "gateway.yaml",
                                   "prices.yaml", "models.yaml"}
        assert (run / "extproc.sock").is_socket()
        # (The reload writes its status report just after the new config serves, through a
        # `.tmp` file renamed over it: the report alone once that write is done.)
        wait_until(lambda: [p.suffix for p in (run / "run").iterdir()] == [".json"],
                   timeout=5, what="the reload's status report, alone in the run directory")

        # The app's last answer, then the Pod stops as the kubelet stops it: that answer is
        # charged in full, though its end was still in Envoy's access log as the app exited.
        last = openai.OpenAI(base_url=app_env["OPENAI_BASE_URL"], api_key=other["secret"],
                             max_retries=0).chat.completions.create(**CHAT)
        stop_as_the_kubelet_does(pod, {"tollgate": gateway, "envoy": envoy})
        [row] = [r for r in ledger(config) if r.key_id == other["id"]]
        assert (row.outcome, row.output_tokens) == ("completed", last.usage.completion_tokens)
    finally:
        for proc in (envoy, gateway):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(10)
        moved.stop()
        log.close()
        shutil.rmtree(run, ignore_errors=True)


@pytest.mark.parametrize("shape", SHAPES)
def test_shipped_examples_are_current_and_valid(shape):
    from scripts.k8s_examples import HERE
    from scripts.k8s_examples import render as render_example

    shipped = (HERE / f"{shape}.yaml").read_text()
    assert shipped == render_example(shape), "envoy/kubernetes is stale: run make k8s-examples"
    # Nothing of the machine that rendered it: providers' certificates are checked against
    # the Envoy image's own bundle.
    assert certifi.where() not in shipped and str(ROOT) not in shipped
    assert "/etc/ssl/certs/ca-certificates.crt" in shipped
    for doc in YAML(typ="safe").load_all(shipped):
        if doc["kind"] == "EnvoyFilter":
            check_istio_schema(doc)
        else:
            kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def test_render_with_resources_gives_envoy_files_ext_proc_keeps_current(config, tmp_path):
    """`envoy render --resources DIR`: the bootstrap reads the listener and clusters from DIR
    (written at once, so Envoy may start first), which `serve extproc --envoy-resources DIR`
    rewrites on every config change."""
    directory = tmp_path / "envoy"
    rendered = tollgate("envoy", "render", "--resources", str(directory), "--listen",
                        f"127.0.0.1:{free_port()}", config=config).stdout
    doc = YAML(typ="safe").load(rendered)
    assert doc["dynamic_resources"]["cds_config"]["path_config_source"] == {
        "path": f"{directory}/clusters.json", "watched_directory": {"path": str(directory)}}
    clusters = json.loads((directory / "clusters.json").read_text())["resources"]
    assert {c["name"] for c in clusters} >= {"provider_mp_openai", "provider_mp_anthropic"}
    assert json.loads((directory / "listeners.json").read_text())["resources"]
    bootstrap = tmp_path / "envoy.yaml"
    bootstrap.write_text(rendered)
    envoy_validates(bootstrap)


def test_providers_ca_bundle_is_where_envoy_runs(config, tmp_path):
    """An https provider's certificate is checked against certifi's bundle for an Envoy on
    this machine, or the bundle named for an Envoy elsewhere (a container)."""
    tollgate("model-providers", "create", "--id", "mp_tls", "--type", "openai", "--scope",
             "ORG:acme", "--base-url", "https://api.openai.com", "--api-key-env",
             "FAKE_OPENAI_KEY", config=config)

    def trusted(clusters: list[dict]) -> str:
        [tls] = [c for c in clusters if c["name"] == "provider_mp_tls"]
        return tls["transport_socket"]["typed_config"]["common_tls_context"][
            "validation_context"]["trusted_ca"]["filename"]

    local = YAML(typ="safe").load(tollgate("envoy", "render", config=config).stdout)
    assert trusted(local["static_resources"]["clusters"]) == certifi.where()
    bundle = "/etc/ssl/certs/ca-certificates.crt"
    named = YAML(typ="safe").load(tollgate("envoy", "render", "--ca-file", bundle,
                                           config=config).stdout)
    assert trusted(named["static_resources"]["clusters"]) == bundle
    tollgate("envoy", "render", "--resources", str(tmp_path / "r"), "--ca-file", bundle,
             config=config)
    written = json.loads((tmp_path / "r" / "clusters.json").read_text())["resources"]
    assert trusted(written) == bundle
    [container] = [c for c in one(render(config, "sidecar"), "Deployment")["spec"]["template"]
                   ["spec"]["initContainers"] if c["name"] == "tollgate"]
    assert container["args"][container["args"].index("--envoy-ca-file") + 1] == bundle
    istio = envoy_bootstrap(render(config, "istio"), "istio")
    assert trusted(istio["static_resources"]["clusters"]) == bundle
