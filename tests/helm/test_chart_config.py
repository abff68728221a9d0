"""The chart and the code cannot drift apart: the cluster config and the autoscaling policy the chart
renders into its ConfigMaps load with the project's own loaders (ClusterConfig.from_yaml,
AutoscalePolicy.from_yaml), the worker groups match the config's pools and TP sizes, the policy's
pools name pools that exist, and the router and controller are started with the files they mount."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from helm_chart import EXAMPLES, container, one, render

from cluster.autoscale.policy import AutoscalePolicy
from cluster.config import ClusterConfig

CASES = [pytest.param([], id="defaults")] + [pytest.param([p], id=p.stem) for p in EXAMPLES]


def rendered_files(objects: list[dict[str, Any]], tmp_path: Path) -> tuple[ClusterConfig, AutoscalePolicy]:
    config_file = tmp_path / "cluster.yaml"
    config_file.write_text(one(objects, "ConfigMap", "-config")["data"]["cluster.yaml"])
    policy_file = tmp_path / "autoscale.yaml"
    policy_file.write_text(one(objects, "ConfigMap", "-autoscale")["data"]["autoscale.yaml"])
    return ClusterConfig.from_yaml(config_file), AutoscalePolicy.from_yaml(policy_file)


def pools_of(config: ClusterConfig) -> dict[tuple[str, str], int]:
    """(model, pool) -> ranks per replica."""
    out = {}
    for m in config.models:
        if m.mode == "unified":
            out[(m.served_name, "unified")] = m.decode_tp
        else:
            out[(m.served_name, "prefill")] = m.prefill_tp
            out[(m.served_name, "decode")] = m.decode_tp
    return out


@pytest.mark.parametrize("values", CASES)
def test_rendered_config_and_policy_load_with_the_code(values, tmp_path) -> None:
    objects = render(values)
    config, policy = rendered_files(objects, tmp_path)
    assert config.host == "0.0.0.0" and config.redis_url is None  # Redis comes from its Secret
    pools = pools_of(config)
    for p in policy.pools:  # a policy entry for a pool that does not exist would never act
        assert (p.model, p.pool) in pools, f"autoscaling policy names {p.model}/{p.pool}, not in the config"

    ray = one(objects, "RayCluster")
    assert ray["spec"]["enableInTreeAutoscaling"] is True
    groups = {(g["template"]["metadata"]["labels"]["pdserve.io/model"],
               g["template"]["metadata"]["labels"]["pdserve.io/pool"]): g for g in ray["spec"]["workerGroupSpecs"]}
    assert set(groups) == set(pools)
    for key, tp in pools.items():
        group = groups[key]
        model = next(m for m in config.models if m.served_name == key[0])
        is_gpu = model.engine_config(config.engine, tp).device.startswith("cuda")
        worker = group["template"]["spec"]["containers"][0]
        assert worker["resources"]["limits"].get("nvidia.com/gpu") == (str(tp) if is_gpu else None)
        assert group["rayStartParams"].get("num-gpus") == (str(tp) if is_gpu else None)
        shm = next(v for v in group["template"]["spec"]["volumes"] if v["name"] == "shm")
        assert shm["emptyDir"]["medium"] == "Memory"
        assert {"name": "shm", "mountPath": "/dev/shm"} in worker["volumeMounts"]
        pool_policy = policy.pool(*key)
        if pool_policy is not None:  # pods follow actors: the group may hold every replica the policy allows
            assert group["maxReplicas"] == pool_policy.max_replicas


@pytest.mark.parametrize("values", CASES)
def test_processes_get_the_files_they_mount(values) -> None:
    objects = render(values)
    router = one(objects, "Deployment", "-router")
    autoscaler = one(objects, "Deployment", "-autoscaler")
    for deployment, module in ((router, "cluster.router"), (autoscaler, "cluster.autoscale")):
        c = container(deployment)
        assert c["command"] == ["python", "-m", module]
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        for arg in c["args"]:
            flag, _, value = arg.partition("=")
            if flag in ("--config", "--policy", "--api-keys-file"):
                mount = mounts[str(Path(value).parent)]
                source = volumes[mount].get("configMap") or volumes[mount].get("secret")
                assert source is not None, f"{arg}: {mount} is neither a ConfigMap nor a Secret"
        assert "--redis-url=$(REDIS_URL)" in c["args"]
        assert [e["name"] for e in c["env"]] == ["REDIS_URL"]
    ray = one(objects, "RayCluster")
    head_service = f"{ray['metadata']['name']}-head-svc"  # the Service KubeRay makes for the head
    assert f"--ray-address=ray://{head_service}:10001" in container(autoscaler)["args"]


def test_every_pod_runs_as_non_root_without_a_token() -> None:
    objects = render([EXAMPLES[0]])
    templates = [o["spec"]["template"]["spec"] for o in objects if o["kind"] in ("Deployment", "StatefulSet")]
    ray = one(objects, "RayCluster")["spec"]
    templates += [ray["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in ray["workerGroupSpecs"]]
    for spec in templates:
        assert spec["securityContext"]["runAsNonRoot"] is True
        for c in spec["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
    # The controller needs Ray and Redis, not the Kubernetes API: no token, no Role.
    assert one(objects, "ServiceAccount", "-autoscaler")["automountServiceAccountToken"] is False
    assert not [o for o in objects if o["kind"] in ("Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding")]


def test_network_policy_opens_only_the_router() -> None:
    objects = render()
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    router = next(p for p in policies if p["spec"]["podSelector"]["matchLabels"].get("app.kubernetes.io/component")
                  == "router")
    assert "from" not in router["spec"]["ingress"][0]  # anyone, on the API ports only
    assert {p["port"] for p in router["spec"]["ingress"][0]["ports"]} == {"http", "grpc"}
    internal = next(p for p in policies if p is not router)
    assert internal["spec"]["podSelector"]["matchExpressions"] == [
        {"key": "app.kubernetes.io/component", "operator": "NotIn", "values": ["router"]}]
    assert internal["spec"]["ingress"] == [{"from": [{"podSelector": {"matchLabels": {
        "app.kubernetes.io/name": "pdserve", "app.kubernetes.io/instance": "pd"}}}]}]
    # Every pod the internal policy must cover carries the labels it selects by.
    ray = one(objects, "RayCluster")["spec"]
    for labels in [ray["headGroupSpec"]["template"]["metadata"]["labels"]] + [
            g["template"]["metadata"]["labels"] for g in ray["workerGroupSpecs"]]:
        assert labels["app.kubernetes.io/instance"] == "pd" and labels["app.kubernetes.io/component"] != "router"


@pytest.mark.parametrize("values", CASES)
def test_replicas_ask_for_the_resource_their_worker_group_advertises(values, tmp_path):
    """A replica the autoscaler starts must land on the worker group sized for its (model, pool):
    the group's rayStartParams advertise `pdserve-<group>`; the replica's ranks ask for exactly that
    name (cluster/autoscale/replicas.py), and for a GPU each where the group has GPUs."""
    import json

    from cluster.autoscale.replicas import group_resource, rank_resources

    objects = render(values)
    config, _ = rendered_files(objects, tmp_path)
    groups = one(objects, "RayCluster")["spec"]["workerGroupSpecs"]
    advertised: dict[str, dict] = {}
    for g in groups:
        params = g["rayStartParams"]
        resources = json.loads(params["resources"].strip("'"))
        advertised[next(iter(resources))] = {**resources, "GPU": float(params.get("num-gpus", 0))}
    for m in config.models:
        for pool, tp in ((p, t) for (name, p), t in pools_of(config).items() if name == m.served_name):
            engine = m.engine_config(config.engine, tp)
            key = group_resource(m.served_name, pool)
            assert key in advertised, (key, sorted(advertised))
            needs = rank_resources(m.served_name, pool, engine, advertised)
            assert needs[key] == 1 and advertised[key][key] == tp  # one unit per rank, tp ranks per pod
            assert needs.get("GPU", 0) * tp == advertised[key]["GPU"]
