"""deploy/ checked without a Docker engine, a Kubernetes or a cloud: the Dockerfiles copy only paths
that exist and are not ignored, generate the protobuf code in the builder, and end in a stage with a
non-root user and no compiler; every example cluster config and policy loads with the code; the Ray
cluster launcher config validates against the schema Ray ships; the Grafana dashboard queries only
metrics the code exports, and covers the ones an operator needs."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from helm_chart import CHART, ROOT

from cluster.autoscale.policy import AutoscalePolicy
from cluster.config import ClusterConfig
from cluster.metrics import REGISTRY, WorkerFigures, WorkerFiguresCollector

DOCKERFILES = sorted(p for p in (ROOT / "deploy" / "docker").glob("Dockerfile.*") if p.suffix != ".dockerignore")
COMPILERS = re.compile(r"\b(build-essential|gcc|g\+\+|clang|cc|make|python3-dev|cuda-nvcc[\w-]*)\b")


def stages(dockerfile: Path) -> list[list[str]]:
    """The instructions of each stage, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    out: list[list[str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            out.append([])
        if out:
            out[-1].append(line)
    return out


def ignored(path: str, dockerignore: Path) -> bool:
    patterns = [p.strip() for p in dockerignore.read_text().splitlines() if p.strip() and not p.startswith("#")]
    return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(path, p.removeprefix("**/"))
               or path.startswith(p.rstrip("/") + "/") for p in patterns)


def test_there_are_a_cpu_and_a_cuda_image() -> None:
    assert [d.name for d in DOCKERFILES] == ["Dockerfile.cpu", "Dockerfile.cuda"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copies_what_exists(dockerfile: Path) -> None:
    dockerignore = dockerfile.with_name(dockerfile.name + ".dockerignore")
    assert dockerignore.is_file()
    copies = [line for stage in stages(dockerfile) for line in stage if line.upper().startswith(("COPY ", "ADD "))]
    from_context = [line for line in copies if "--from=" not in line]
    assert from_context
    for line in from_context:
        *sources, _dest = [w for w in shlex.split(line)[1:] if not w.startswith("--")]
        for source in sources:
            assert (ROOT / source).exists(), f"{dockerfile.name}: {line}: {source} is not in the repository"
            assert not ignored(source.rstrip("/"), dockerignore), f"{dockerfile.name}: {source} is dockerignored"
    # Generated code is never taken from the context: the builder makes it.
    assert ignored("cluster/_generated", dockerignore)
    # Every stage a COPY --from names exists.
    names = {shlex.split(stage[0])[-1] for stage in stages(dockerfile) if " AS " in stage[0].upper()}
    for line in copies:
        if "--from=" in line:
            assert re.search(r"--from=(\S+)", line).group(1) in names


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_final_stage_is_non_root_without_compilers(dockerfile: Path) -> None:
    all_stages = stages(dockerfile)
    assert len(all_stages) >= 2, "multi-stage"
    builder, final = all_stages[0], all_stages[-1]
    assert any("python -m cluster.protogen" in line for line in builder)
    assert any(COMPILERS.search(line) for line in builder if line.upper().startswith("RUN "))  # the check can fire
    for line in final:
        if line.upper().startswith("RUN "):
            assert not COMPILERS.search(line), f"{dockerfile.name}: compiler in the final stage: {line}"
    users = [line.split()[1] for line in final if line.upper().startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    uid = int(users[-1].split(":")[0])
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["podSecurityContext"]["runAsUser"] == uid  # the chart runs the image's user
    assert any("/opt/venv/bin" in line for line in final if line.upper().startswith("ENV "))


def test_the_modules_the_chart_runs_exist() -> None:
    for module in ("cluster/router/__main__.py", "cluster/autoscale/__main__.py"):
        assert (ROOT / module).is_file()


EXAMPLE_CONFIGS = sorted(p for p in (ROOT / "deploy" / "config").glob("*.yaml") if not p.name.startswith("autoscale"))
EXAMPLE_POLICIES = sorted((ROOT / "deploy" / "config").glob("autoscale*.yaml"))


@pytest.mark.parametrize("path", EXAMPLE_CONFIGS, ids=lambda p: p.name)
def test_example_cluster_configs_load(path: Path) -> None:
    assert ClusterConfig.from_yaml(path).models


@pytest.mark.parametrize("path", EXAMPLE_POLICIES, ids=lambda p: p.name)
def test_example_policies_load(path: Path) -> None:
    policy = AutoscalePolicy.from_yaml(path)
    paired = path.with_name(path.name.removeprefix("autoscale.") if path.name != "autoscale.example.yaml"
                            else "example.yaml")
    config = ClusterConfig.from_yaml(paired)  # each policy goes with the config of the same name
    models = {m.served_name for m in config.models}
    assert {p.model for p in policy.pools} <= models


def test_ray_launcher_config_validates() -> None:
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    path = ROOT / "deploy" / "ray" / "cluster.yaml"
    config = yaml.safe_load(path.read_text())
    jsonschema.validate(config, schema)
    for source in config["file_mounts"].values():
        assert (path.parent / source).is_dir()
    commands = " ".join(config["head_start_ray_commands"])
    for name in re.findall(r"pdserve-config/(\S+\.yaml)", commands):
        assert (ROOT / "deploy" / "config" / name).is_file(), name
    assert "cluster.router" in commands and "cluster.autoscale" in commands


def exported_names() -> set[str]:
    """Every sample name /metrics can carry (router, workers' figures through it, autoscaler)."""
    families = list(REGISTRY.collect())
    families += list(WorkerFiguresCollector(lambda: [WorkerFigures("w", "m", "decode", 1, 0, 0.5)]).collect())
    names = set()
    for f in families:
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(f.type, [""])
        names |= {f.name + s for s in suffixes}
    return names


def test_dashboard_queries_exported_metrics() -> None:
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "pdserve.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = {name for e in exprs for name in re.findall(r"pdserve:[a-z0-9_]+", e)}
    exported = exported_names()
    assert used <= exported, f"not exported: {sorted(used - exported)}"
    for needed in ("time_to_first_token_seconds_bucket", "inter_token_latency_seconds_bucket",
                   "e2e_request_latency_seconds_bucket", "requests_total", "generation_tokens_total",
                   "queue_depth", "kv_cache_usage_perc", "kv_transfer_bytes_total", "kv_transfer_fallbacks_total",
                   "pool_desired_replicas", "pool_replicas"):
        assert f"pdserve:{needed}" in used, needed
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    model_var = next(v for v in dashboard["templating"]["list"] if v["name"] == "model")
    assert re.findall(r"pdserve:[a-z0-9_]+", model_var["definition"])[0] in exported
