"""Replica factories for the Ray actuator: how one more replica of a pool is started.

`engine_factory` starts a real worker (cluster/worker/actor.py's WorkerActor): a tensor-parallel
replica first reserves a STRICT_PACK placement group with one bundle per rank, so its ranks share a
node, and the group is handed back with the replica so that removing the replica frees it. On
Kubernetes a pending group or actor is what KubeRay's autoscaler sees and adds a pod for.
`simulated_factory` starts a `SimWorkerActor` (sim_worker.py): no model, a capacity, a queue.
`cluster_factories(config, redis_url)` maps every (model, pool) of a ClusterConfig to its factory.

Each factory blocks until the replica serves (its gRPC server listens and it has registered).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from cluster.autoscale.ray_actuator import ReplicaFactory, StartedReplica
from cluster.config import ClusterConfig, EngineConfig, ModelDeployment
from cluster.state.base import DEFAULT_TTL_S

_START_TIMEOUT_S = 600.0  # a big model loads for a while; a replica that never serves is an error


def _ready(actor, placement_group=None) -> StartedReplica:
    import ray

    try:
        address, worker_id = ray.get([actor.address.remote(), actor.worker_id.remote()], timeout=_START_TIMEOUT_S)
    except BaseException:
        ray.kill(actor)
        if placement_group is not None:
            ray.util.remove_placement_group(placement_group)
        raise
    return StartedReplica(actor, address, worker_id, placement_group)


def _options(name: str, num_cpus: float, lifetime: str | None) -> dict[str, Any]:
    options: dict[str, Any] = {"name": name, "num_cpus": num_cpus, "max_restarts": 0}
    if lifetime is not None:
        options["lifetime"] = lifetime  # "detached": outlives the controller process (Kubernetes)
    return options


def group_resource(model: str, pool: str) -> str:
    """The custom resource the Helm chart's worker group for (model, pool) advertises, one unit per
    TP rank (helm/pdserve/templates/_helpers.tpl, `pdserve.workerGroups`: the same name rule)."""
    name = f"{model.lower().replace('_', '-').replace('.', '-').replace('/', '-')}-{pool}"[:50].removesuffix("-")
    return f"pdserve-{name}"


def rank_resources(model: str, pool: str, engine: EngineConfig, advertised: dict[str, float]) -> dict[str, float]:
    """What each rank of a replica asks Ray for beyond CPUs: a GPU on CUDA, and its worker group's
    resource where the cluster advertises one — so that on Kubernetes the replica lands on (and
    KubeRay scales) the group sized for it, not whichever group has room."""
    needs: dict[str, float] = {}
    if engine.device.startswith("cuda"):
        needs["GPU"] = 1
    key = group_resource(model, pool)
    if key in advertised:
        needs[key] = 1
    return needs


def _with_needs(options: dict[str, Any], needs: dict[str, float]) -> dict[str, Any]:
    custom = {k: v for k, v in needs.items() if k != "GPU"}
    if "GPU" in needs:
        options["num_gpus"] = needs["GPU"]
    if custom:
        options["resources"] = custom
    return options


def simulated_factory(model: str, pool: str, sim: dict[str, Any], capacity: int, *, redis_url: str | None,
                      registry_ttl_s: float = DEFAULT_TTL_S, num_cpus: float = 0.05,
                      lifetime: str | None = None, host: str = "127.0.0.1") -> ReplicaFactory:
    """`sim`: SimConfig fields (ttft_s, itl_s, prefill_s_per_token, ...) but `model`."""
    import ray

    from cluster.autoscale.sim_worker import SimWorkerActor

    def start(name: str) -> StartedReplica:
        actor = ray.remote(SimWorkerActor).options(**_options(name, num_cpus, lifetime)).remote(
            pool, model, dict(sim), capacity, redis_url, registry_ttl_s, host)
        return _ready(actor)

    return start


def engine_factory(model: ModelDeployment, pool: str, engine: EngineConfig, *, redis_url: str | None,
                   registry_ttl_s: float = DEFAULT_TTL_S, lifetime: str | None = None,
                   host: str = "127.0.0.1") -> ReplicaFactory:
    """A real worker of `model` in `pool`, its engine as `engine` (tensor_parallel_size included)."""
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from cluster.worker.actor import WorkerActor

    tp, num_cpus = engine.tensor_parallel_size, model.worker_num_cpus

    def start(name: str) -> StartedReplica:
        needs = rank_resources(model.served_name, pool, engine, ray.cluster_resources())
        options = _with_needs(_options(name, num_cpus, lifetime), needs)
        group = None
        if tp > 1:
            group = placement_group([{"CPU": num_cpus, **needs}] * tp, strategy="STRICT_PACK", lifetime=lifetime)
            try:
                ray.get(group.ready(), timeout=_START_TIMEOUT_S)
            except BaseException:
                ray.util.remove_placement_group(group)
                raise
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                placement_group=group, placement_group_bundle_index=0)
        actor = ray.remote(WorkerActor).options(**options).remote(
            pool, model.path, asdict(engine), model.kv_transport, host, model.prefill_tp, num_cpus,
            redis_url=redis_url, served_model_name=model.served_name, registry_ttl_s=registry_ttl_s)
        return _ready(actor, group)

    return start


def cluster_factories(config: ClusterConfig, redis_url: str, *, lifetime: str | None = None,
                      host: str = "127.0.0.1"):
    """(model, pool) -> its engine factory, for every served model of the cluster config."""
    models = {m.served_name: m for m in config.models}

    def factory(model: str, pool: str) -> ReplicaFactory:
        if model not in models:
            raise ValueError(f"model: {model!r} is not served by this cluster config")
        m = models[model]
        tp = m.prefill_tp if pool == "prefill" else m.decode_tp
        return engine_factory(m, pool, m.engine_config(config.engine, tp), redis_url=redis_url,
                              registry_ttl_s=config.heartbeat_ttl_s, lifetime=lifetime, host=host)

    return factory
