"""Workers as Ray actors: Ray places and supervises them; requests and KV still travel over gRPC.

`start_worker_actor(role, model_dir, ...)` creates a `WorkerActor` (one process, one engine, one
gRPC server on 127.0.0.1 or the node's address) and returns its handle and gRPC address. Ray is the
control plane only — lifecycle, placement, restarts, health and stats polls; token streams and KV
pages never pass through Ray's object store (whose transport pickles).
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import asdict

import torch

from cluster.config import EngineConfig


class WorkerActor:
    """The body of a worker actor. Plain class: `ray.remote(WorkerActor)` makes the actor."""

    def __init__(self, role: str, model_dir: str, engine_config: dict, kv_transport: str = "grpc",
                 host: str = "127.0.0.1") -> None:
        from cluster.engine.engine import LLMEngine
        from cluster.worker.server import serve

        config = EngineConfig(**engine_config)
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        self.role = role
        self.engine = LLMEngine(model_dir, config)
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        ports: list[int] = []

        async def run() -> None:
            started = asyncio.Event()
            task = asyncio.create_task(serve(self.engine, role, model_dir, host, 0, kv_transport, started, ports))
            await started.wait()
            ready.set()
            await task

        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(run(),), daemon=True)
        self._thread.start()
        if not ready.wait(60):
            raise RuntimeError(f"{role} worker's gRPC server did not start")
        self._address = f"{host}:{ports[0]}"

    def address(self) -> str:
        return self._address

    def ping(self) -> str:
        return self.role


def start_worker_actor(role: str, model_dir: str, config: EngineConfig | None = None, *,
                       kv_transport: str = "grpc", num_cpus: float = 1, name: str | None = None):
    """Create a worker actor and wait until it serves; returns (actor handle, gRPC address)."""
    import ray

    config = config or EngineConfig()
    options = {"num_cpus": num_cpus, "max_restarts": 0}
    if name:
        options["name"] = name
    actor = ray.remote(WorkerActor).options(**options).remote(role, str(model_dir), asdict(config), kv_transport)
    return actor, ray.get(actor.address.remote())
