"""A simulated worker with a capacity, as a Ray actor in a pool: what autoscaler tests and benches scale.

The plain simulated worker (cluster/worker/simulated.py) refuses calls past its concurrency limit;
a real engine does not, it queues them (num_waiting), and that queue is what the autoscaler reads.
`QueueingSimWorker` runs at most `capacity` Prefill + Decode calls at once and queues the rest inside
the worker, first come first served. Its heartbeats publish that queue as `num_waiting` and its
capacity as `max_num_seqs` (so routers cap admission by it, as for an engine's max_num_seqs).

A request's life here: admission (draining → UNAVAILABLE, bad params → INVALID_ARGUMENT, as the plain
simulated worker) → a free slot, else wait in the queue for one → the simulated prefill or token
stream, timed from when the slot was granted → the slot is handed to the head of the queue. A
request already queued when a Drain arrives is served: it was admitted. Drain's `num_in_flight`
counts the queued ones too, so "drained" means nothing runs and nothing waits.

`SimWorkerActor` serves one on its own event loop thread inside a Ray actor and registers it in Redis
under a pool role (prefill / decode / unified) — the plain simulated worker registers as "simulated",
which routers do not route to.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque

import grpc

from cluster.protogen import ensure_generated
from cluster.request import SamplingParams
from cluster.state.base import DEFAULT_TTL_S
from cluster.state.load import LoadReport
from cluster.state.registry import WorkerInfo
from cluster.worker.grpc_options import SERVER_OPTIONS
from cluster.worker.registration import WorkerReport, advertised_address, new_worker_id, start_registration
from cluster.worker.simulated import BLOCK_SIZE, SimConfig, SimulatedWorker

ensure_generated()
from pdserve.v1 import worker_pb2 as pb  # noqa: E402
from pdserve.v1 import worker_pb2_grpc as pb_grpc  # noqa: E402


class QueueingSimWorker(SimulatedWorker):
    def __init__(self, config: SimConfig, address: str = "", capacity: int = 1) -> None:
        if config.max_concurrency:
            raise ValueError("max_concurrency: must be 0 (this worker queues past `capacity` instead of refusing)")
        if capacity < 1:
            raise ValueError(f"capacity: must be >= 1, got {capacity}")
        super().__init__(config, address)
        self.capacity = capacity
        self.num_waiting = 0
        self._waiters: deque[asyncio.Future] = deque()
        self._num_granted = 0  # slots handed to waiters that have not resumed (and counted themselves) yet

    async def _admit(self, msg: pb.SamplingParams, context) -> SamplingParams:
        params = await super()._admit(msg, context)
        if self._waiters or self.num_in_flight + self._num_granted >= self.capacity:
            slot = asyncio.get_running_loop().create_future()
            self._waiters.append(slot)
            self.num_waiting += 1
            try:
                await slot
            except asyncio.CancelledError:  # the client went away while queued
                if slot.done() and not slot.cancelled():
                    self._num_granted -= 1
                    self._grant()  # the slot it was given goes to the next in line
                elif slot in self._waiters:
                    self._waiters.remove(slot)
                raise
            finally:
                self.num_waiting -= 1
            # The caller counts itself in num_in_flight before it next yields control: the cap is exact.
            self._num_granted -= 1
        return params

    def _grant(self) -> None:
        while self._waiters and self.num_in_flight + self._num_granted < self.capacity:
            slot = self._waiters.popleft()
            if not slot.done():
                self._num_granted += 1
                slot.set_result(None)

    async def Prefill(self, request: pb.PrefillRequest, context) -> pb.PrefillResponse:  # noqa: N802
        try:
            return await super().Prefill(request, context)
        finally:
            self._grant()

    async def Decode(self, request: pb.DecodeRequest, context):  # noqa: N802
        try:
            async with contextlib.aclosing(super().Decode(request, context)) as stream:
                async for chunk in stream:
                    yield chunk
        finally:
            self._grant()

    async def Drain(self, request: pb.DrainRequest, context) -> pb.DrainResponse:  # noqa: N802
        response = await super().Drain(request, context)
        response.num_in_flight += self.num_waiting
        return response

    async def Stats(self, request: pb.StatsRequest, context) -> pb.StatsResponse:  # noqa: N802
        stats = await super().Stats(request, context)
        load = self.load()
        stats.num_requests_waiting = load.num_waiting
        stats.num_free_blocks, stats.num_total_blocks = load.num_free_blocks, load.num_total_blocks
        stats.kv_cache_usage = load.kv_usage
        return stats

    def load(self) -> LoadReport:
        """Slots stand for KV blocks: usage is the share of them taken."""
        used = min(self.num_in_flight, self.capacity)
        return LoadReport(num_running=self.num_running, num_waiting=self.num_waiting,
                          num_waiting_for_kv=self.num_waiting_for_kv, num_free_blocks=self.capacity - used,
                          num_total_blocks=self.capacity, kv_usage=used / self.capacity, max_num_seqs=self.capacity)


class SimWorkerActor:
    """The body of a simulated worker actor (`ray.remote(SimWorkerActor)` makes the actor)."""

    def __init__(self, pool: str, model: str, sim: dict, capacity: int, redis_url: str | None = None,
                 registry_ttl_s: float = DEFAULT_TTL_S, host: str = "127.0.0.1") -> None:
        config = SimConfig(**{**sim, "model": model})
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        self._worker: QueueingSimWorker | None = None
        self._error: BaseException | None = None

        async def run() -> None:
            server = grpc.aio.server(options=SERVER_OPTIONS)
            port = server.add_insecure_port(f"{host}:0")
            worker = QueueingSimWorker(config, f"{host}:{port}", capacity)
            worker.worker_id = new_worker_id(model, pool)
            pb_grpc.add_WorkerServicer_to_server(worker, server)
            registration = None
            try:
                await server.start()
                if redis_url:
                    async def read(snapshot: bool) -> WorkerReport:
                        return WorkerReport(worker.load())

                    info = WorkerInfo(worker.worker_id, model, pool, advertised_address(host, port),
                                      block_size=BLOCK_SIZE)
                    registration = await start_registration(redis_url, info, read, registry_ttl_s)
                    worker.on_drain = registration.leave
                self._worker, self._address = worker, f"{host}:{port}"
                ready.set()
                await server.wait_for_termination()
            except BaseException as exc:
                self._error = exc
                ready.set()
                raise
            finally:
                if registration is not None:
                    await registration.leave()
                await server.stop(grace=1.0)

        self._task: asyncio.Task | None = None

        def thread() -> None:
            asyncio.set_event_loop(self._loop)
            self._task = self._loop.create_task(run())
            with contextlib.suppress(asyncio.CancelledError, Exception):
                self._loop.run_until_complete(self._task)

        self._thread = threading.Thread(target=thread, daemon=True, name=f"sim-{pool}")
        self._thread.start()
        if not ready.wait(60) or self._worker is None:
            raise RuntimeError(f"simulated {pool} worker did not start: {self._error!r}")

    def address(self) -> str:
        return self._address

    def worker_id(self) -> str:
        return self._worker.worker_id

    def ping(self) -> str:
        return "simulated"

    def shutdown(self) -> None:
        """Leave the registry, stop serving."""
        if self._task is not None:
            self._loop.call_soon_threadsafe(self._task.cancel)
        self._thread.join(15)


__all__ = ["QueueingSimWorker", "SimWorkerActor"]
