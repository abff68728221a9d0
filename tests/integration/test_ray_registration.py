"""A worker started as a Ray actor registers in Redis under its served model name and leaves on shutdown."""

from __future__ import annotations

import time

import ray

from cluster.config import EngineConfig
from cluster.state import StateStore, start_embedded_redis


def test_ray_worker_actor_registers_and_deregisters_on_shutdown(ray_cluster, tiny_model_dir) -> None:
    from cluster.worker.actor import start_worker_actor

    with start_embedded_redis() as server:
        store = StateStore.from_url(server.url)
        config = EngineConfig(dtype="float32", num_kv_blocks=32, num_threads=1, block_size=8)
        # A long TTL: if it is gone right after shutdown, it deregistered.
        actor, address = start_worker_actor("decode", tiny_model_dir, config, redis_url=server.url,
                                            served_model_name="ray-tiny", registry_ttl_s=60.0)
        worker_id = ray.get(actor.worker_id.remote())
        deadline = time.monotonic() + 60
        while not store.list_workers() and time.monotonic() < deadline:
            time.sleep(0.1)
        (info,) = store.list_workers()
        assert (info.worker_id, info.model, info.role, info.address, info.block_size) == (
            worker_id, "ray-tiny", "decode", address, 8)
        assert store.get_loads([worker_id])[worker_id].num_total_blocks == 32

        ray.get(actor.shutdown.remote())
        assert store.list_workers() == []
        ray.kill(actor)
        store.close()
