"""The chart renders, lints strictly, and every object it renders is valid: Kubernetes objects against
the API's own schemas (kubernetes-validate, strict: an unknown field fails), the RayCluster against
KubeRay's CRD schema (tests/data/kuberay, with unknown fields refused as the API server would prune
them). For the default values and each example values file in helm/pdserve/ci/."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from helm_chart import CHART, EXAMPLES, KUBE_VERSION, helm, render

CRD = Path(__file__).resolve().parents[1] / "data" / "kuberay" / "ray.io_rayclusters.yaml"
CASES = [pytest.param([], id="defaults")] + [pytest.param([p], id=p.stem) for p in EXAMPLES]
CUSTOM_KINDS = {("ray.io/v1", "RayCluster"), ("monitoring.coreos.com/v1", "ServiceMonitor")}


def closed_schema(schema: Any) -> Any:
    """The CRD's structural schema as a JSON schema that refuses unknown fields (the API server would
    silently drop them: a misspelt field is lost) and knows int-or-string."""
    if isinstance(schema, list):
        return [closed_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed_schema(v) for k, v in schema.items()}
    if out.pop("x-kubernetes-int-or-string", False):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def raycluster_validator() -> jsonschema.Draft7Validator:
    crd = yaml.safe_load(CRD.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(closed_schema(version["schema"]["openAPIV3Schema"]))


@pytest.mark.parametrize("values", CASES)
def test_lint_strict(values: list[Path]) -> None:
    args = ["lint", "--strict", str(CHART)]
    for v in values:
        args += ["-f", str(v)]
    done = helm(*args)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("values", CASES)
def test_every_object_validates(values: list[Path], raycluster_validator) -> None:
    objects = render(values)
    kinds = {o["kind"] for o in objects}
    assert {"RayCluster", "Deployment", "Service", "ConfigMap", "NetworkPolicy",
            "ServiceAccount"} <= kinds
    for obj in objects:
        what = f"{obj['kind']}/{obj['metadata']['name']}"
        if (obj["apiVersion"], obj["kind"]) in CUSTOM_KINDS:
            if obj["kind"] == "RayCluster":
                errors = sorted(raycluster_validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
                assert not errors, f"{what}: " + "; ".join(
                    f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:5])
            continue
        for version in (KUBE_VERSION, "1.37.0"):  # the chart's floor is 1.25: nothing removed since
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{what} (Kubernetes {version}): {'.'.join(map(str, exc.path))}: {exc.message}")


def test_the_crd_check_refuses_a_misspelt_field(raycluster_validator) -> None:
    """The RayCluster check is not vacuous: a field KubeRay does not know is an error."""
    (ray,) = [o for o in render() if o["kind"] == "RayCluster"]
    assert not list(raycluster_validator.iter_errors(ray))
    ray["spec"]["workerGroupSpecs"][0]["maxReplica"] = 3
    assert any("maxReplica" in e.message for e in raycluster_validator.iter_errors(ray))
    del ray["spec"]["workerGroupSpecs"][0]["maxReplica"]
    ray["spec"]["workerGroupSpecs"][0]["minReplicas"] = "one"
    assert list(raycluster_validator.iter_errors(ray))


def test_kubernetes_validate_is_strict() -> None:
    """An unknown field in a Deployment fails the check the chart passes."""
    deployment = next(o for o in render() if o["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSION, strict=True)
