"""The worker's gRPC server (pdserve.v1.Worker): one engine, one role, on grpc.aio.

Handlers never block the event loop on the engine: they hand work to the EngineLoop thread and await
its futures and output queues. Roles: `prefill` serves Prefill, `decode` serves Decode (with or without
KV from a prefill worker) and receives KV, `unified` serves both. Errors map to gRPC status codes:
bad input INVALID_ARGUMENT naming the field, no KV room RESOURCE_EXHAUSTED (with a retry hint in the
trailing metadata), draining UNAVAILABLE, a call the role doesn't serve FAILED_PRECONDITION.

With a Redis URL the worker also registers in the cluster's registry once it listens, heartbeats its
load and prefix-cache changes (`registration.py`), and leaves the registry on Drain or shutdown.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

from cluster.engine.engine import LLMEngine
from cluster.parallel.kv_endpoint import KVEndpoint, start_kv_endpoint
from cluster.protogen import ensure_generated
from cluster.state.base import DEFAULT_TTL_S
from cluster.state.load import LoadReport
from cluster.state.registry import WorkerInfo
from cluster.worker import convert
from cluster.worker.decode import NoRoomError, decode
from cluster.worker.engine_loop import EngineLoop
from cluster.worker.grpc_options import SERVER_OPTIONS
from cluster.worker.prefill import prefill
from cluster.worker.registration import (
    ReadReport,
    WorkerReport,
    advertised_address,
    new_worker_id,
    start_registration,
)

ensure_generated()
from pdserve.v1 import worker_pb2 as pb  # noqa: E402
from pdserve.v1 import worker_pb2_grpc as pb_grpc  # noqa: E402

logger = logging.getLogger(__name__)

ROLES = ("prefill", "decode", "unified")
RETRY_AFTER_S = "1"


def engine_load(engine: LLMEngine) -> LoadReport:
    """The engine's figures now (call on the engine thread): what Stats answers and heartbeats publish."""
    scheduler, kv = engine.scheduler, engine.kv_manager
    return LoadReport(
        num_running=scheduler.num_running, num_waiting=scheduler.num_waiting,
        num_waiting_for_kv=len(scheduler.waiting_for_kv), num_free_blocks=kv.num_free_blocks,
        num_total_blocks=kv.num_blocks, kv_usage=kv.usage, prefix_cache_hits=kv.prefix_cache_hits,
        prefix_cache_queries=kv.prefix_cache_queries, kv_transfer_fallbacks=engine.num_kv_transfer_fallbacks,
        kv_transfer_bytes=engine.num_kv_bytes_received, max_num_seqs=engine.config.max_num_seqs,
    )


def engine_report(loop: EngineLoop) -> ReadReport:
    """A heartbeat's reader: load and prefix-cache changes in one trip to the engine thread."""

    async def read(snapshot: bool) -> WorkerReport:
        def on_engine(engine: LLMEngine) -> WorkerReport:
            return WorkerReport(engine_load(engine), engine.kv_manager.drain_cache_events(snapshot))

        return await asyncio.wrap_future(loop.call(on_engine))

    return read


class WorkerService(pb_grpc.WorkerServicer):
    def __init__(self, loop: EngineLoop, role: str, model: str, endpoint: KVEndpoint, kv_servicer=None,
                 prefill_tp: int = 1, *, worker_id: str | None = None,
                 on_drain: Callable[[], Awaitable[None]] | None = None) -> None:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        self.loop = loop
        self.role = role
        self.model = model
        self.endpoint = endpoint
        self.kv_servicer = kv_servicer
        self.prefill_tp = prefill_tp  # for Decode requests that don't name the sender's TP size
        self.worker_id = worker_id or new_worker_id(model, role)
        self.on_drain = on_drain  # e.g. leave the registry, so routers stop choosing this worker
        self.draining = False
        self.num_in_flight = 0

    # ---- data plane ----
    async def Prefill(self, request: pb.PrefillRequest, context: grpc.aio.ServicerContext) -> pb.PrefillResponse:  # noqa: N802
        await self._admit(context, "prefill")
        params = await self._params(request.sampling_params, context)
        destination = request.kv_destination if request.HasField("kv_destination") else None
        self.num_in_flight += 1
        try:
            out = await prefill(self.loop, request.request_id, list(request.prompt_token_ids), params, destination)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        finally:
            self.num_in_flight -= 1
        response = pb.PrefillResponse(
            request_id=request.request_id,
            first_token_id=out.new_token_ids[0],
            num_prompt_tokens=out.num_prompt_tokens,
            num_cached_tokens=out.num_cached_tokens,
            kv_sent=destination is not None and bool(destination.targets),
        )
        if out.new_logprobs:
            response.first_token_logprob = out.new_logprobs[0].logprob
            response.first_token_top_logprobs.CopyFrom(convert.top_logprobs_to_pb(out.new_logprobs[0]))
        return response

    async def Decode(self, request: pb.DecodeRequest, context: grpc.aio.ServicerContext):  # noqa: N802
        await self._admit(context, "decode")
        params = await self._params(request.sampling_params, context)
        self.num_in_flight += 1
        try:
            stream = decode(
                self.loop, request.request_id, list(request.prompt_token_ids), params,
                expect_kv=request.expect_kv, transfer_id=request.transfer_id or request.request_id,
                lease_seconds=request.kv_lease_seconds or 30.0, endpoint=self.endpoint,
                min_prefill_tokens=request.min_prefill_tokens,
                prefill_tp=request.prefill_tp_size or self.prefill_tp,
            )
            is_first_output = True
            is_remote = False
            async for kv_destination, out in stream:
                if out is None:  # expect_kv: where the KV goes, or (no targets) that it is computed here
                    is_remote = kv_destination is not None
                    destination = (convert.destination_to_pb(kv_destination) if is_remote
                                   else pb.KVDestination(transport="none"))
                    yield pb.TokenChunk(request_id=request.request_id, kv_destination=destination)
                    continue
                tokens, logprobs = out.new_token_ids, out.new_logprobs
                # The router already streamed the prefill worker's first token, unless we recomputed it.
                if is_remote and is_first_output and not out.is_kv_fallback:
                    tokens, logprobs = [], None
                is_first_output = False
                yield convert.fill_logprobs(pb.TokenChunk(
                    request_id=request.request_id, token_ids=tokens,
                    finish_reason=convert.finish_to_pb(out.finish_reason if out.finished else None),
                    num_prompt_tokens=out.num_prompt_tokens, num_cached_tokens=out.num_cached_tokens,
                    kv_fallback=out.is_kv_fallback,
                ), logprobs)
        except NoRoomError as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc),
                                trailing_metadata=(("retry-after", RETRY_AFTER_S),))
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        finally:
            self.num_in_flight -= 1

    async def PushKV(self, request_iterator, context):  # noqa: N802
        if self.kv_servicer is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this worker does not receive KV over gRPC")
        return await self.kv_servicer.push_kv_async(request_iterator, context)

    # ---- control plane ----
    async def Stats(self, request: pb.StatsRequest, context) -> pb.StatsResponse:  # noqa: N802
        load = await asyncio.wrap_future(self.loop.call(engine_load))
        return pb.StatsResponse(
            worker_id=self.worker_id, role=self.role, model=self.model,
            num_requests_running=load.num_running, num_requests_waiting=load.num_waiting,
            num_requests_waiting_for_kv=load.num_waiting_for_kv, num_free_blocks=load.num_free_blocks,
            num_total_blocks=load.num_total_blocks, kv_cache_usage=load.kv_usage,
            prefix_cache_hits=load.prefix_cache_hits, prefix_cache_queries=load.prefix_cache_queries,
            kv_transfer_bytes=load.kv_transfer_bytes, kv_transfer_fallbacks=load.kv_transfer_fallbacks,
            draining=self.draining,
        )

    async def Drain(self, request: pb.DrainRequest, context) -> pb.DrainResponse:  # noqa: N802
        self.draining = True
        if self.on_drain is not None:
            await self.on_drain()
        return pb.DrainResponse(accepted=True, num_in_flight=self.num_in_flight)

    async def Health(self, request: pb.HealthRequest, context) -> pb.HealthResponse:  # noqa: N802
        status = pb.HealthResponse.DRAINING if self.draining else pb.HealthResponse.SERVING
        return pb.HealthResponse(status=status, role=self.role, model=self.model)

    # ---- helpers ----
    async def _admit(self, context, call: str) -> None:
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "worker is draining")
        if self.role != "unified" and self.role != call:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"a {self.role} worker does not serve {call}")

    async def _params(self, msg, context):
        try:
            return convert.params_from_pb(msg)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))


async def serve(loop: EngineLoop, role: str, model: str, host: str = "127.0.0.1", port: int = 0,
                kv_transport: str = "grpc", ready: asyncio.Event | None = None, port_out: list | None = None,
                kv_peer_addresses: tuple[str, ...] = (), prefill_tp: int = 1, *, redis_url: str | None = None,
                model_name: str | None = None, registry_ttl_s: float = DEFAULT_TTL_S,
                worker_id: str | None = None) -> None:
    """Serve `loop`'s engine until cancelled, then stop the loop. Binds host:port (0 = any free port,
    reported through `port_out`).

    `model` is the model directory (or already a name); the worker serves it as `model_name`, by default
    the directory's name. A TP engine (launch_tp_engine) passes its other ranks' KV addresses as
    `kv_peer_addresses`. With `redis_url` the worker registers there (see `registration.py`), with a
    liveness TTL of `registry_ttl_s`; an unreachable Redis is logged and retried, never fatal. `worker_id`
    defaults to a fresh "{model_name}-{role}-{8 hex}"."""
    served_name = model_name or Path(model).name
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 16 << 20), *SERVER_OPTIONS])
    bound = server.add_insecure_port(f"{host}:{port}")
    address = f"{host}:{bound}"
    kv_servicer = None
    if kv_transport == "grpc":  # PushKV rides on this very server
        from cluster.transfer.grpc import AsyncKVTransferServicer

        kv_servicer = AsyncKVTransferServicer()
        endpoint = KVEndpoint(kv_transport, address, kv_servicer, peer_addresses=tuple(kv_peer_addresses))
    else:  # dist: this rank's TCPStore rendezvous; local: the in-process channel
        endpoint = start_kv_endpoint(kv_transport, host)
        endpoint.peer_addresses = tuple(kv_peer_addresses)
    engine = loop.engine
    registration = None

    async def leave() -> None:
        if registration is not None:
            await registration.leave()

    service = WorkerService(loop, role, served_name, endpoint, kv_servicer, prefill_tp, worker_id=worker_id,
                            on_drain=leave)
    pb_grpc.add_WorkerServicer_to_server(service, server)
    try:
        await server.start()
        logger.info("%s worker %s serving %s on %s (KV transport %s)", role, service.worker_id, served_name,
                    address, kv_transport)
        if redis_url:
            info = WorkerInfo(worker_id=service.worker_id, model=served_name, role=role,
                              address=advertised_address(host, bound), tp=engine.config.tensor_parallel_size,
                              block_size=engine.config.block_size)
            registration = await start_registration(redis_url, info, engine_report(loop), registry_ttl_s)
        if port_out is not None:
            port_out.append(bound)
        if ready is not None:
            ready.set()
        await server.wait_for_termination()
    finally:
        await leave()  # before the server stops: routers must not pick a worker that no longer answers
        await server.stop(grace=1.0)
        loop.stop()
        endpoint.close()


__all__ = ["ROLES", "WorkerService", "engine_load", "engine_report", "serve"]
