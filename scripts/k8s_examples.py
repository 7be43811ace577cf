"""Writes envoy/kubernetes/{sidecar,istio}.yaml from envoy/kubernetes/gateway.yaml and the
shipped price table and model catalog (`make k8s-examples`); a test checks they are current."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = ROOT / "envoy" / "kubernetes"
SHAPES = ("sidecar", "istio")


def render(shape: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "gateway.yaml"
        shutil.copyfile(HERE / "gateway.yaml", config)
        for name in ("prices.yaml", "models.yaml"):
            shutil.copyfile(ROOT / "config" / name, Path(tmp) / name)
        return subprocess.run(
            [str(Path(sys.executable).parent / "tollgate"), "--config", str(config), "envoy",
             "k8s", shape, "--namespace", "tollgate", "--image",
             "registry.example.com/tollgate:0.1.0"],
            check=True, capture_output=True, text=True).stdout


def main() -> None:
    for shape in SHAPES:
        (HERE / f"{shape}.yaml").write_text(render(shape))
        print(f"wrote envoy/kubernetes/{shape}.yaml")


if __name__ == "__main__":
    main()
