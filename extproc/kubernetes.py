"""Kubernetes and Istio manifests for the sidecar, from the gateway config.

Rendered by `tollgate envoy k8s`, from the same listener and clusters as `tollgate envoy
render`, so the two never drift. Two shapes:

- `sidecar`: the app's Pod runs Envoy and `tollgate serve extproc` beside the app, as native
  sidecars (init containers that keep running), on a Unix socket in a shared `emptyDir`.
- `istio`: the Pod's own istio-proxy is the Envoy. An EnvoyFilter adds tollgate's listener
  (loopback only) and clusters to it; `tollgate serve extproc` runs beside it the same way.

In both, the app reaches the gateway on 127.0.0.1:10080 (`--port`) and never sees a provider
key: the keys are in a Secret that only the tollgate container mounts.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from extproc import envoy_config
from tollgate.config.load import LoadedConfig

CONFIG_DIR = PurePosixPath("/etc/tollgate")
ENVOY_DIR = PurePosixPath("/etc/envoy")
RUN_DIR = PurePosixPath("/run/tollgate")
KEYS_DIR = PurePosixPath("/var/run/secrets/tollgate/providers")
SOCKET = f"unix:{RUN_DIR / 'extproc.sock'}"
OUTAGE_LOG = str(RUN_DIR / "envoy-outage.log")
# Loopback only: the Pod's app is its one client. Not 8080, which apps often listen on.
PORT = 10080
ENVOY_ADMIN = "127.0.0.1:9901"
ISTIO_PROXY_ADMIN = "127.0.0.1:15000"
# Where the Envoy images (envoyproxy/envoy, istio-proxy) keep the system CA bundle that
# providers' certificates are checked against.
CA_FILE = "/etc/ssl/certs/ca-certificates.crt"
# The sidecar's listener and clusters, which ext_proc rewrites as the config changes.
RESOURCES = str(RUN_DIR / "envoy")
ADMIN_PORT = 9464
# istio-proxy runs as this user; ext_proc's socket is private to its owner (0600).
ISTIO_PROXY_UID = 1337
GATEWAY_UID = 10001
GATEWAY_LABEL = "tollgate.dev/gateway"
# The version of tollgate's filters a Pod's ext_proc speaks (`envoy_config.FILTERS_VERSION`),
# on Istio's Pods and the EnvoyFilter that gives them those filters: see `envoy_filter`.
FILTERS_LABEL = "tollgate.dev/filters"


class RenderError(ValueError):
    """The config cannot run as rendered (a file the Pod will not have, a local state)."""


@dataclass(frozen=True)
class Options:
    name: str = "tollgate"
    namespace: str = "default"
    image: str = "tollgate:latest"
    envoy_image: str = "envoyproxy/envoy:v1.40-latest"
    app_image: str = "registry.example.com/your-app:latest"
    replicas: int = 2
    processes: int = 1
    port: int = PORT


def check(loaded: LoadedConfig) -> list[str]:
    """What stops this config from running in a Pod (raised), and what works but should not
    be left so (returned, as warnings)."""
    cfg = loaded.config
    state = cfg.gateway.state
    if state.startswith("sqlite:"):
        raise RenderError(
            f"gateway.state is SQLite ({state}): in Kubernetes use redis://host:6379/0. "
            "Replicas must share budgets, holds and the ledger, and a Pod's disk goes "
            "with it.")
    warnings = []
    for p in cfg.model_providers:
        if p.api_key_file and PurePosixPath(p.api_key_file).parent != KEYS_DIR:
            raise RenderError(
                f"model provider {p.id}: api_key_file {p.api_key_file} is not in the Pod: "
                f"use api_key_file: {KEYS_DIR}/<KEY>, a key of the Secret "
                "<name>-provider-keys, mounted there (rotations apply without a restart)")
        if p.api_key_env:
            warnings.append(
                f"model provider {p.id}: api_key_env {p.api_key_env} comes from the Secret "
                f"<name>-provider-keys at start; a rotated key needs a restart. "
                f"api_key_file: {KEYS_DIR}/{p.api_key_env} follows rotations.")
    return warnings


def _key_envs(loaded: LoadedConfig, secret: str) -> list[dict[str, Any]]:
    names = sorted({p.api_key_env for p in loaded.config.model_providers if p.api_key_env})
    return [{"name": n, "valueFrom": {"secretKeyRef": {"name": secret, "key": n}}}
            for n in names]


def _metadata(opts: Options, name: str) -> dict[str, Any]:
    return {"name": name, "namespace": opts.namespace,
            "labels": {"app.kubernetes.io/name": opts.name,
                       "app.kubernetes.io/component": "llm-gateway"}}


def config_map(loaded: LoadedConfig, opts: Options) -> dict[str, Any]:
    """The gateway's files, as they are: edits applied with `kubectl apply` reach running
    Pods within a minute (the kubelet swaps the mounted folder) and reload live."""
    settings = loaded.config.gateway
    data = {"gateway.yaml": loaded.path.read_text()}
    for name in (settings.prices, settings.models):
        path = loaded.path.parent / name
        if PurePosixPath(name).is_absolute() or "/" in name:
            raise RenderError(f"gateway.prices/models: {name} must be a file beside the "
                              "config to travel in its ConfigMap")
        if path.exists():
            data[name] = path.read_text()
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": _metadata(opts, f"{opts.name}-config"), "data": data}


def extproc_args(opts: Options, envoy_admin: str, resources: bool) -> list[str]:
    """`resources`: keep the Envoy's listener and clusters current (`sidecar`; istio-proxy
    takes them from the EnvoyFilter)."""
    args = ["--config", str(CONFIG_DIR / "gateway.yaml"), "serve", "extproc",
            "--listen", SOCKET, "--outage-log", OUTAGE_LOG,
            "--admin", f"0.0.0.0:{ADMIN_PORT}", "--envoy-admin", envoy_admin,
            "--extproc-processes", str(opts.processes)]
    if resources:
        args += ["--envoy-resources", RESOURCES, "--envoy-listen", f"127.0.0.1:{opts.port}",
                 "--envoy-ca-file", CA_FILE]
    return args


def _probe(path: str, period: int, failures: int) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": "admin"}, "periodSeconds": period,
            "timeoutSeconds": 3, "failureThreshold": failures}


def _hardened(uid: int) -> dict[str, Any]:
    return {"runAsUser": uid, "runAsGroup": uid, "runAsNonRoot": True,
            "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]}}


def extproc_container(loaded: LoadedConfig, opts: Options, uid: int,
                      args: list[str]) -> dict[str, Any]:
    """`tollgate serve extproc` as a native sidecar: the app's containers start once its
    startup probe passes (config loaded, store reachable, every provider has a key)."""
    settings = loaded.config.gateway
    mounts = [{"name": "config", "mountPath": str(CONFIG_DIR), "readOnly": True},
              {"name": "run", "mountPath": str(RUN_DIR)},
              {"name": "tmp", "mountPath": "/tmp"},
              {"name": "provider-keys", "mountPath": str(KEYS_DIR), "readOnly": True}]
    env = [{"name": "TOLLGATE_STATE_DIR", "value": str(RUN_DIR)},
           {"name": settings.pepper_env, "valueFrom": {"secretKeyRef": {
               "name": f"{opts.name}-pepper", "key": "pepper"}}},
           *_key_envs(loaded, f"{opts.name}-provider-keys")]
    return {
        "name": "tollgate", "image": opts.image, "restartPolicy": "Always",
        "command": ["tollgate"], "args": args, "env": env,
        "ports": [{"name": "admin", "containerPort": ADMIN_PORT}],
        "startupProbe": _probe("/readyz", 1, 60),
        "readinessProbe": _probe("/readyz", 5, 2),
        "livenessProbe": _probe("/healthz", 10, 3),
        # From bench/ (bench.scaling, bench.quick): about 0.3 ms of CPU per request under
        # load, 0.5-0.65 ms one at a time, and ~80 MiB resident per process; 250m is
        # headroom (hundreds of requests a second), not what a pod's traffic needs.
        "resources": {"requests": {"cpu": f"{250 * opts.processes}m",
                                   "memory": f"{96 * opts.processes}Mi"},
                      "limits": {"memory": f"{256 * opts.processes}Mi"}},
        "securityContext": _hardened(uid),
        "volumeMounts": mounts,
    }


def _volumes(opts: Options, *extra: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {"name": "config", "configMap": {"name": f"{opts.name}-config"}},
        {"name": "run", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {}},
        {"name": "provider-keys", "secret": {"secretName": f"{opts.name}-provider-keys"}},
        *extra,
    ]


def _app(opts: Options) -> dict[str, Any]:
    base = f"http://127.0.0.1:{opts.port}"
    return {"name": "app", "image": opts.app_image,
            "env": [{"name": "OPENAI_BASE_URL", "value": f"{base}/v1"},
                    {"name": "ANTHROPIC_BASE_URL", "value": base}]}


def _deployment(opts: Options, pod: dict[str, Any], annotations: dict[str, str] | None = None,
                labels: dict[str, str] | None = None) -> dict[str, Any]:
    labels = {"app.kubernetes.io/name": f"{opts.name}-app", GATEWAY_LABEL: opts.name,
              **(labels or {})}
    template: dict[str, Any] = {"metadata": {"labels": labels}, "spec": pod}
    if annotations:
        template["metadata"]["annotations"] = annotations
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": _metadata(opts, f"{opts.name}-app"),
            "spec": {"replicas": opts.replicas,
                     "selector": {"matchLabels": {"app.kubernetes.io/name": f"{opts.name}-app"}},
                     "template": template}}


def _targets(opts: Options) -> list[str]:
    return envoy_config.process_targets(SOCKET, opts.processes)


def bootstrap(loaded: LoadedConfig, opts: Options) -> dict[str, Any]:
    """What `tollgate envoy render` would give this Pod: the listener and clusters inline."""
    return envoy_config.static_bootstrap(loaded.config, ("127.0.0.1", opts.port),
                                         _targets(opts), OUTAGE_LOG, ENVOY_ADMIN,
                                         ca_file=CA_FILE)


# Seconds the sidecar's Envoy waits before it stops: several of its access log's batches
# (`envoy_config.RESPONSE_END_FLUSH`), a backlog under load included.
ENVOY_STOP_WAIT = 1


def sidecar(loaded: LoadedConfig, opts: Options) -> list[dict[str, Any]]:
    envoy_map = {"apiVersion": "v1", "kind": "ConfigMap",
                 "metadata": _metadata(opts, f"{opts.name}-envoy"),
                 "data": {"envoy.yaml": to_yaml([envoy_config.dynamic_bootstrap(
                     RESOURCES, _targets(opts), ENVOY_ADMIN)])}}
    envoy = {
        "name": "envoy", "image": opts.envoy_image, "restartPolicy": "Always",
        "command": ["envoy"],
        "args": ["-c", str(ENVOY_DIR / "envoy.yaml"), "--log-level", "warn"],
        "resources": {"requests": {"cpu": "100m", "memory": "64Mi"},
                      "limits": {"memory": "256Mi"}},
        # The same user as ext_proc: its socket is private to its owner.
        "securityContext": _hardened(GATEWAY_UID),
        # Stopped before ext_proc (native sidecars stop in reverse order), it first waits
        # for its access log to send the ends of the app's last answers: Envoy drops what
        # the log holds when it stops, and those answers would be charged their input only.
        "lifecycle": {"preStop": {"sleep": {"seconds": ENVOY_STOP_WAIT}}},
        "volumeMounts": [{"name": "envoy", "mountPath": str(ENVOY_DIR), "readOnly": True},
                         {"name": "run", "mountPath": str(RUN_DIR)}],
    }
    pod = {
        "securityContext": {"fsGroup": GATEWAY_UID, "seccompProfile": {"type": "RuntimeDefault"}},
        "initContainers": [extproc_container(loaded, opts, GATEWAY_UID,
                                             extproc_args(opts, ENVOY_ADMIN, True)), envoy],
        "containers": [_app(opts)],
        "volumes": _volumes(opts, {"name": "envoy", "configMap": {"name": f"{opts.name}-envoy"}}),
    }
    return [config_map(loaded, opts), envoy_map, _deployment(opts, pod)]


def _filters_labels(opts: Options) -> dict[str, str]:
    return {GATEWAY_LABEL: opts.name, FILTERS_LABEL: envoy_config.FILTERS_VERSION}


def envoy_filter(loaded: LoadedConfig, opts: Options) -> dict[str, Any]:
    """tollgate's listener and clusters, added to the selected Pods' istio-proxy.

    Named for the version of its filters and given only to the Pods of that version: the
    decision service refuses filters of another (extproc/decider.py), and Istio pushes an
    EnvoyFilter to every Pod it selects at once, while a Deployment replaces its Pods one by
    one. An upgrade's `kubectl apply` adds the new version's EnvoyFilter beside the old one,
    each Pod keeps the filters its ext_proc speaks while the Deployment rolls, and the old
    EnvoyFilter is deleted once it selects no Pod."""
    boot = bootstrap(loaded, opts)
    resources = boot["static_resources"]
    outbound = {"context": "SIDECAR_OUTBOUND"}
    patches = [{"applyTo": "LISTENER", "match": outbound,
                "patch": {"operation": "ADD", "value": listener}}
               for listener in resources["listeners"]]
    patches += [{"applyTo": "CLUSTER", "match": outbound,
                 "patch": {"operation": "ADD", "value": cluster}}
                for cluster in resources["clusters"]]
    metadata = _metadata(opts, f"{opts.name}-{envoy_config.FILTERS_VERSION}")
    metadata["labels"].update(_filters_labels(opts))
    return {"apiVersion": "networking.istio.io/v1alpha3", "kind": "EnvoyFilter",
            "metadata": metadata,
            "spec": {"workloadSelector": {"labels": _filters_labels(opts)},
                     "configPatches": patches}}


def istio(loaded: LoadedConfig, opts: Options) -> list[dict[str, Any]]:
    pod = {
        "securityContext": {"fsGroup": ISTIO_PROXY_UID,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        # istio-proxy's user, which its socket is private to; its own connections (Redis,
        # OTLP) leave the Pod directly, as istio-proxy's do.
        "initContainers": [extproc_container(loaded, opts, ISTIO_PROXY_UID,
                                             extproc_args(opts, ISTIO_PROXY_ADMIN, False))],
        "containers": [_app(opts)],
        "volumes": _volumes(opts),
    }
    annotations = {
        # istio-proxy reaches ext_proc's socket through the shared volume.
        "sidecar.istio.io/userVolumeMount": json.dumps(
            {"run": {"mountPath": str(RUN_DIR)}}, separators=(",", ":")),
        # The app's first call must find the listener the EnvoyFilter adds.
        "proxy.istio.io/config": '{"holdApplicationUntilProxyStarts": true}',
    }
    return [config_map(loaded, opts), envoy_filter(loaded, opts),
            _deployment(opts, pod, annotations, _filters_labels(opts))]


def secrets_help(loaded: LoadedConfig, opts: Options) -> list[str]:
    """The Secrets the manifests mount, as the commands that create them (never rendered:
    their values do not belong in a file)."""
    cfg = loaded.config
    keys = sorted({p.api_key_env for p in cfg.model_providers if p.api_key_env} |
                  {PurePosixPath(p.api_key_file).name for p in cfg.model_providers
                   if p.api_key_file})
    literal = " ".join(f"--from-literal={k}=..." for k in keys) or "--from-literal=unused="
    secret = f"kubectl -n {opts.namespace} create secret generic"
    return [
        f"{secret} {opts.name}-provider-keys {literal}",
        f"{secret} {opts.name}-pepper --from-literal=pepper=\"${cfg.gateway.pepper_env}\"",
        "  (or --from-file=pepper=.tollgate/pepper: the pepper the config's keys were made "
        "with, from beside the config)",
    ]


SHAPES = {"sidecar": sidecar, "istio": istio}


def to_yaml(docs: list[dict[str, Any]]) -> str:
    """YAML a reader can follow: files as literal blocks, no anchors for repeated parts."""
    from ruamel.yaml import YAML
    from ruamel.yaml.scalarstring import LiteralScalarString

    def blocks(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: blocks(v) for k, v in node.items()}
        if isinstance(node, list):
            return [blocks(v) for v in node]
        if isinstance(node, str) and "\n" in node:
            return LiteralScalarString(node)
        return node

    yaml = YAML()
    yaml.default_flow_style = False
    yaml.width = 4096  # paths and formats on one line each
    yaml.representer.ignore_aliases = lambda data: True
    out = io.StringIO()
    yaml.dump_all([blocks(d) for d in docs], out)
    return out.getvalue()


def upgrade_help(opts: Options) -> list[str]:
    """What an upgrade of the istio shape leaves to delete (see `envoy_filter`), as the
    command that deletes it."""
    return ["Once the Deployment has rolled, delete the EnvoyFilters of older filters:",
            f"kubectl -n {opts.namespace} delete envoyfilter -l "
            f"{GATEWAY_LABEL}={opts.name},{FILTERS_LABEL}!={envoy_config.FILTERS_VERSION}"]


def render(loaded: LoadedConfig, shape: str, opts: Options) -> tuple[list[dict[str, Any]],
                                                                     list[str]]:
    """The manifests, and warnings about the config (see `check`)."""
    warnings = check(loaded)
    return SHAPES[shape](loaded, opts), warnings

