"""Rendering the chart with the pinned helm (tools/install_helm.sh), for the tests in this folder."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "pdserve"
EXAMPLES = sorted((CHART / "ci").glob("*-values.yaml"))
KUBE_VERSION = "1.30.0"  # what `helm template` reports as the cluster's version (Capabilities)


def helm_binary() -> str | None:
    """$HELM, else the one tools/install_helm.sh puts in .tools/, else helm on PATH."""
    for candidate in (os.environ.get("HELM"), str(ROOT / ".tools" / "node_modules" / ".bin" / "helm")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("helm")


def helm(*args: str) -> subprocess.CompletedProcess:
    binary = helm_binary()
    if binary is None:
        raise RuntimeError("helm not found: run tools/install_helm.sh (or set HELM)")
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=120)


def render(values: list[Path] = (), sets: dict[str, str] | None = None, release: str = "pd") -> list[dict[str, Any]]:
    """Every object `helm template` renders, parsed."""
    args = ["template", release, str(CHART), "--namespace", "serving", "--kube-version", KUBE_VERSION]
    for v in values:
        args += ["-f", str(v)]
    for key, value in (sets or {}).items():
        args += ["--set", f"{key}={value}"]
    done = helm(*args)
    if done.returncode != 0:
        raise RenderError(done.stderr)
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


class RenderError(Exception):
    pass


def one(objects: list[dict[str, Any]], kind: str, name_suffix: str = "") -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"{len(found)} {kind} objects named *{name_suffix}"
    return found[0]


def container(obj: dict[str, Any]) -> dict[str, Any]:
    """The one container of a Deployment or StatefulSet."""
    containers = obj["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]
