"""Values that change what the chart renders: API keys (a Secret mounted as the router's key file),
Redis bundled or external, the three model sources, and values the schema or the templates refuse
(with a message naming the value)."""

from __future__ import annotations

import pytest
from helm_chart import RenderError, container, one, render


def router_args(objects) -> list[str]:
    return container(one(objects, "Deployment", "-router"))["args"]


def test_api_keys_become_a_secret_the_router_reads() -> None:
    objects = render(sets={"apiKeys.keys[0]": "sk-one", "apiKeys.keys[1]": "sk-two"})
    secret = one(objects, "Secret", "-api-keys")
    assert secret["stringData"]["api-keys"].split() == ["sk-one", "sk-two"]
    assert "--api-keys-file=/etc/pdserve/api-keys/api-keys" in router_args(objects)
    config = one(objects, "ConfigMap", "-config")["data"]["cluster.yaml"]
    assert "sk-one" not in config
    assert not [a for a in router_args(render()) if a.startswith("--api-keys-file")]  # no keys: no auth


def test_existing_api_key_secret() -> None:
    objects = render(sets={"apiKeys.existingSecret": "mine", "apiKeys.existingSecretKey": "k"})
    assert not [o for o in objects if o["metadata"]["name"].endswith("-api-keys")]
    volume = next(v for v in one(objects, "Deployment", "-router")["spec"]["template"]["spec"]["volumes"]
                  if v["name"] == "api-keys")
    assert volume["secret"] == {"secretName": "mine", "items": [{"key": "k", "path": "api-keys"}]}


def test_bundled_and_external_redis() -> None:
    bundled = render()
    assert one(bundled, "Secret", "-redis-url")["stringData"]["url"] == "redis://pd-pdserve-redis:6379/0"
    assert one(bundled, "Service", "-redis")["spec"]["ports"][0]["port"] == 6379
    external = render(sets={"redis.bundled": "false", "redis.external.url": "redis://cache.example:6380/2"})
    assert not [o for o in external if o["kind"] == "StatefulSet"]
    assert one(external, "Secret", "-redis-url")["stringData"]["url"] == "redis://cache.example:6380/2"
    with pytest.raises(RenderError, match="redis.external.url"):
        render(sets={"redis.bundled": "false"})


@pytest.mark.parametrize("source,sets,volume", [
    ("pvc", {"model.pvc.claimName": "models"}, {"persistentVolumeClaim": {"claimName": "models", "readOnly": True}}),
    ("hostPath", {"model.hostPath.path": "/mnt/m"}, {"hostPath": {"path": "/mnt/m", "type": "Directory"}}),
])
def test_model_volume_reaches_router_and_workers(source, sets, volume) -> None:
    objects = render(sets={"model.source": source, **sets})
    specs = [one(objects, "Deployment", "-router")["spec"]["template"]["spec"]]
    specs += [g["template"]["spec"] for g in one(objects, "RayCluster")["spec"]["workerGroupSpecs"]]
    for spec in specs:
        assert {"name": "models", **volume} in spec["volumes"]
        assert {"name": "models", "mountPath": "/models", "readOnly": True} in spec["containers"][0]["volumeMounts"]
    with pytest.raises(RenderError, match=f"model.{source}"):
        render(sets={"model.source": source})


def test_baked_in_models_mount_nothing() -> None:
    objects = render()
    assert "models" not in {v["name"] for v in one(objects, "Deployment", "-router")["spec"]["template"]["spec"]
                            ["volumes"]}


@pytest.mark.parametrize("sets,field", [
    ({"config.redis_url": "redis://x:6379"}, "config.redis_url"),
    ({"config.models[0].decode_tp": "0"}, "decode_tp"),
    ({"router.httpPort": "70000"}, "router.httpPort"),
    ({"model.source": "s3"}, "model.source"),
    ({"rayCluster.workers.cpuPerRanks": "2"}, "cpuPerRanks"),
])
def test_schema_refuses_bad_values(sets, field) -> None:
    with pytest.raises(RenderError, match=field.replace(".", r"\.").replace("[", r"\[")):
        render(sets=sets)


def test_gpu_groups_request_tp_gpus_and_the_cuda_image() -> None:
    objects = render(sets={"config.engine.device": "cuda", "config.models[0].decode_tp": "2",
                           "config.models[0].prefill_tp": "1", "config.models[0].path": "/models/tiny"})
    groups = {g["groupName"]: g for g in one(objects, "RayCluster")["spec"]["workerGroupSpecs"]}
    decode = groups["tiny-decode"]["template"]["spec"]["containers"][0]
    assert decode["resources"]["requests"]["nvidia.com/gpu"] == "2"
    assert decode["resources"]["requests"]["cpu"] == "4"  # cpuPerRank x tp
    assert decode["image"].endswith("-cuda")
    assert groups["tiny-prefill"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container(one(objects, "Deployment", "-router"))["image"].endswith("-cpu")  # no GPU for the router


def test_hpa_and_service_monitor_are_optional() -> None:
    plain = render()
    assert not [o for o in plain if o["kind"] in ("HorizontalPodAutoscaler", "ServiceMonitor")]
    objects = render(sets={"router.hpa.enabled": "true", "serviceMonitor.enabled": "true"})
    hpa = one(objects, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == one(objects, "Deployment", "-router")["metadata"]["name"]
    assert "replicas" not in one(objects, "Deployment", "-router")["spec"]  # the HPA owns it
    monitor = one(objects, "ServiceMonitor")
    assert {e["port"] for e in monitor["spec"]["endpoints"]} == {"http", "metrics"}
