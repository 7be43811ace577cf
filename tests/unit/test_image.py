"""The Dockerfile builds the image the Kubernetes manifests run: their user, their command
on its PATH, every package of the distribution, the OTLP protos' reinstall the README asks
for, and a Debian `python3` (the interpreter envoy/README recommends for ext_proc). That the
image so built serves is `make image-check`'s (scripts/image_check.py), on demand."""

from __future__ import annotations

import fnmatch
import json
import re
import tomllib
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from scripts.image_check import base, instructions

ROOT = Path(__file__).resolve().parents[2]


def only(word: str) -> str:
    [value] = [rest for w, rest in instructions() if w == word]
    return value


def run_with(text: str) -> str:
    [found] = [rest for word, rest in instructions() if word == "RUN" and text in rest]
    return found


def tollgate_containers() -> dict[str, dict[str, Any]]:
    """The tollgate container of each example shape (envoy/kubernetes)."""
    found = {}
    for shape in ("sidecar", "istio"):
        for doc in YAML(typ="safe").load_all((ROOT / "envoy" / "kubernetes" /
                                              f"{shape}.yaml").read_text()):
            spec = (doc or {}).get("spec", {}).get("template", {}).get("spec", {})
            for c in spec.get("initContainers", []):
                if c["name"] == "tollgate":
                    found[shape] = c
    return found


def test_the_image_runs_as_the_manifests_tollgate_container_does():
    containers = tollgate_containers()
    assert set(containers) == {"sidecar", "istio"}
    # Its user is the sidecar shape's; each shape names its own (Istio's runs as
    # istio-proxy's, with which it shares ext_proc's socket), never root.
    context = containers["sidecar"]["securityContext"]
    assert only("USER") == f"{context['runAsUser']}:{context['runAsGroup']}"
    assert all(c["securityContext"]["runAsNonRoot"] for c in containers.values())
    # The manifests name the command; the image has it on its PATH, and as its entrypoint.
    assert {tuple(c["command"]) for c in containers.values()} == {("tollgate",)}
    assert json.loads(only("ENTRYPOINT")) == ["tollgate"]
    venv = re.search(r"python3 -m venv (\S+)", run_with("python3 -m venv")).group(1)
    assert only("ENV").startswith(f"PATH={venv}/bin:")


def test_the_image_installs_the_whole_distribution_with_the_readmes_second_step():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]
                ["include"]}
    copied = [rest.split() for word, rest in instructions() if word == "COPY"]
    sources = {s for *srcs, _ in copied for s in srcs}
    assert packages <= sources
    assert {"pyproject.toml", project["project"]["readme"],
            *project["project"]["license-files"]} <= sources
    ignore = [line for line in (ROOT / ".dockerignore").read_text().splitlines()
              if line and not line.startswith("#")]
    for source in sources:  # the build context keeps what is copied
        assert f"!{source}" in ignore, source
        assert not any(fnmatch.fnmatch(source, rule) for rule in ignore if rule != "*"
                       and not rule.startswith("!"))
    install = run_with("python3 -m venv")
    assert "pip install --no-cache-dir /src" in install
    assert re.search(r'--force-reinstall --no-deps\s+"opentelemetry-proto==', install)


def test_the_image_runs_debians_own_python():
    release, packages = base(instructions())  # (a FROM other than debian:<release>-slim exits)
    assert release and {"python3", "python3-venv", "ca-certificates"} <= set(packages)
