"""The autoscaler as a running service: a Ray actuator over a cluster config's models, and the controller.

`pdserve up` (in its own process, beside the router) and `python -m cluster.autoscale` (a Deployment of
its own on Kubernetes) both start one with `start_autoscaler`:
1. the state store (the cluster's Redis) and a `RayActuator` whose factories start real workers from
   the cluster config (replicas.py; `lifetime="detached"` on Kubernetes, so replicas outlive a
   controller restart);
2. replicas started before it — `pdserve up`'s first workers, handed over as `workers` — and named
   replicas a previous leader left (`adopt_existing`) are adopted, so the actuator counts and may
   remove them like its own;
3. the controller thread starts; it waits if another controller leads.
`stop()` stops the controller (handing the lock over) and the actuator, leaving the replicas to
whoever stops Ray.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from cluster.autoscale.controller import Controller
from cluster.autoscale.policy import AutoscalePolicy, PolicyFile
from cluster.autoscale.ray_actuator import RayActuator, StartedReplica
from cluster.autoscale.replicas import cluster_factories
from cluster.config import ClusterConfig
from cluster.state.store import StateStore

logger = logging.getLogger(__name__)


@dataclass
class Autoscaler:
    store: StateStore
    actuator: RayActuator
    controller: Controller

    def stop(self) -> None:
        self.controller.stop()
        self.actuator.close(kill=False)
        self.store.close()


def start_autoscaler(policy: AutoscalePolicy | PolicyFile, config: ClusterConfig, redis_url: str, *,
                     workers: Iterable[Any] = (), lifetime: str | None = None, host: str = "127.0.0.1",
                     adopt_existing: bool = True) -> Autoscaler:
    """`workers`: already running replicas, each with `model`, `role`, `address` and its Ray `actor`
    (cluster.local_cluster.WorkerHandle)."""
    import ray

    store = StateStore.from_url(redis_url)
    current = policy.current() if isinstance(policy, PolicyFile) else policy
    actuator = RayActuator(cluster_factories(config, redis_url, lifetime=lifetime, host=host), store=store,
                           drain_timeout_s=current.drain_timeout_s)
    for w in workers:
        worker_id = ray.get(w.actor.worker_id.remote())
        actuator.adopt(w.model, w.role, StartedReplica(w.actor, w.address, worker_id))
    if adopt_existing:
        found = actuator.adopt_existing()
        if found:
            logger.info("adopted %d replicas a previous autoscaler started", found)
    controller = Controller(store, actuator, policy).start()
    return Autoscaler(store, actuator, controller)
