"""Workers as Ray actors: Ray places and supervises them; requests and KV still travel over gRPC.

`start_worker_actor(role, model_dir, config)` creates a `WorkerActor` (one engine, one gRPC server on
127.0.0.1 or the node's address) and returns its handle and gRPC address. A tensor-parallel replica
(`config.tensor_parallel_size > 1`) first reserves a STRICT_PACK placement group with one bundle per
rank, so every rank lands on the same node; the WorkerActor is rank 0 (bundle 0) and starts ranks
1.. as `FollowerActor`s in the other bundles. Ray is the control plane only — lifecycle, placement,
restarts, health and stats polls; token streams, KV pages and the per-step plans of a TP replica never
pass through Ray's object store (whose transport pickles). With `redis_url` the worker registers
in the cluster's Redis and heartbeats there (`registration.py`); `shutdown` deregisters it, while an
actor killed outright drops out of the registry when its TTL runs out.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from cluster.config import EngineConfig
from cluster.state.base import DEFAULT_TTL_S
from cluster.worker.registration import new_worker_id


class WorkerActor:
    """The body of a worker actor. Plain class: `ray.remote(WorkerActor)` makes the actor."""

    def __init__(self, role: str, model_dir: str, engine_config: dict, kv_transport: str = "grpc",
                 host: str = "127.0.0.1", prefill_tp: int = 1, rank_cpus: float = 1, *,
                 redis_url: str | None = None, served_model_name: str | None = None,
                 registry_ttl_s: float = DEFAULT_TTL_S) -> None:
        from cluster.parallel.launch import launch_tp_engine
        from cluster.worker.engine_loop import EngineLoop
        from cluster.worker.server import serve

        config = EngineConfig(**engine_config)
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        self.role = role
        self.replica = None

        def make_engine():  # on the engine's own thread: see cluster/worker/engine_loop.py
            if config.tensor_parallel_size == 1:
                from cluster.engine.engine import LLMEngine

                return LLMEngine(model_dir, config)
            receives_kv = role != "prefill"
            engine, self.replica = launch_tp_engine(
                model_dir, config, kv_transport=kv_transport if receives_kv else None, kv_host=host,
                start_follower=ray_follower_starter(placement_group, rank_cpus,
                                                   1 if config.device.startswith("cuda") else 0))
            return engine

        placement_group = None
        if config.tensor_parallel_size > 1:
            from ray.util import get_current_placement_group

            placement_group = get_current_placement_group()  # here: Ray knows it on the actor's own thread
        engine_loop = EngineLoop.build(make_engine, name=f"{role}-engine")
        peers = tuple(self.replica.kv_addresses) if self.replica is not None else ()
        self._worker_id = new_worker_id(served_model_name or Path(model_dir).name, role)
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        ports: list[int] = []

        async def run() -> None:
            started = asyncio.Event()
            self._task = asyncio.create_task(serve(engine_loop, role, model_dir, host, 0, kv_transport, started,
                                                   ports, peers, prefill_tp, redis_url=redis_url,
                                                   model_name=served_model_name, registry_ttl_s=registry_ttl_s,
                                                   worker_id=self._worker_id))
            await started.wait()
            ready.set()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(run(),), daemon=True)
        self._thread.start()
        if not ready.wait(120):
            raise RuntimeError(f"{role} worker's gRPC server did not start")
        self._address = f"{host}:{ports[0]}"

    def address(self) -> str:
        return self._address

    def ping(self) -> str:
        return self.role

    def worker_id(self) -> str:
        """The id it registers under (and reports in Stats)."""
        return self._worker_id

    def shutdown(self) -> None:
        """Stop serving, then the engine thread, then the TP ranks."""
        self._loop.call_soon_threadsafe(self._task.cancel)
        self._thread.join(15)
        if self.replica is not None:
            self.replica.shutdown()


class FollowerActor:
    """TP rank > 0 of a replica: runs `run_follower` until rank 0 sends STOP (or dies)."""

    def run(self, *args) -> None:
        from cluster.parallel.launch import run_follower

        run_follower(*args)


class RayRank:
    """A follower actor seen as the process-like object launch_tp_engine and TPHandle manage."""

    pid = None

    def __init__(self, name: str, actor, done) -> None:
        self.name, self.actor, self.done = name, actor, done

    def is_alive(self) -> bool:
        import ray

        ready, _ = ray.wait([self.done], timeout=0)
        return not ready

    def join(self, timeout: float | None = None) -> None:
        import ray

        ray.wait([self.done], timeout=timeout)

    def kill(self) -> None:
        import ray

        ray.kill(self.actor)


def ray_follower_starter(placement_group, rank_cpus: float, rank_gpus: float = 0) -> Callable[[int, tuple], RayRank]:
    """start_follower for launch_tp_engine: rank r becomes a FollowerActor in bundle r of the group
    (asking for its GPU itself, so that Ray gives the rank its own CUDA_VISIBLE_DEVICES)."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    def start(rank: int, args: tuple) -> RayRank:
        strategy = PlacementGroupSchedulingStrategy(placement_group=placement_group,
                                                    placement_group_bundle_index=rank)
        actor = ray.remote(FollowerActor).options(num_cpus=rank_cpus, num_gpus=rank_gpus, scheduling_strategy=strategy,
                                                  max_restarts=0).remote()
        return RayRank(f"tp-rank{rank}", actor, actor.run.remote(*args))

    return start


def start_worker_actor(role: str, model_dir: str, config: EngineConfig | None = None, *,
                       kv_transport: str = "grpc", num_cpus: float = 1, name: str | None = None,
                       prefill_tp: int = 1, redis_url: str | None = None, served_model_name: str | None = None,
                       registry_ttl_s: float = DEFAULT_TTL_S):
    """Create a worker (a TP replica: one actor per rank, STRICT_PACK) and wait until it serves.

    `num_cpus` is per rank. With `redis_url` it registers there as `served_model_name` (default: the
    model directory's name). Returns (rank 0's actor handle, gRPC address)."""
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    config = config or EngineConfig()
    gpus = 1 if config.device.startswith("cuda") else 0  # per rank: Ray then sets its CUDA_VISIBLE_DEVICES
    options: dict = {"num_cpus": num_cpus, "num_gpus": gpus, "max_restarts": 0}
    if name:
        options["name"] = name
    tp = config.tensor_parallel_size
    if tp > 1:
        group = placement_group([{"CPU": num_cpus, "GPU": gpus} if gpus else {"CPU": num_cpus}] * tp,
                                strategy="STRICT_PACK")
        ray.get(group.ready())
        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            placement_group=group, placement_group_bundle_index=0)
    actor = ray.remote(WorkerActor).options(**options).remote(
        role, str(model_dir), asdict(config), kv_transport, "127.0.0.1", prefill_tp, num_cpus,
        redis_url=redis_url, served_model_name=served_model_name, registry_ttl_s=registry_ttl_s)
    return actor, ray.get(actor.address.remote())
