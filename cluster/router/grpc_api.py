"""The router's public gRPC API (protos/pdserve/v1/serving.proto), next to the OpenAI HTTP API and
over the same `dict[str, ModelPool]`.

A Generate call's life here: the request is checked (grpc_schema.py; bad input → INVALID_ARGUMENT
whose details start with the field, also sent as trailing metadata "pdserve-field") → the model's
pool is found (NOT_FOUND otherwise) → the prompt is tokenized, or chat messages rendered with the
model's chat template, exactly as the HTTP API does (textgen.py) → the pool runs it on the workers →
each worker message becomes one GenerateResponse (new token ids and the text they add); the last one
carries finish_reason and usage. Overload is RESOURCE_EXHAUSTED, no worker UNAVAILABLE, as 429 and
503 are on HTTP. A client that cancels the call cancels the worker calls.

The same server answers grpc.health.v1 (SERVING when every model has workers) and server reflection.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cluster.protogen import ensure_generated
from cluster.router.dispatch import ModelPool
from cluster.router.errors import APIError
from cluster.router.grpc_schema import parse_generate
from cluster.router.textgen import chat_prompt_token_ids, find_pool, prompt_token_ids, text_events

ensure_generated()
from pdserve.v1 import serving_pb2 as pb  # noqa: E402
from pdserve.v1 import serving_pb2_grpc as pb_grpc  # noqa: E402

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Serving"].full_name
FIELD_METADATA = "pdserve-field"

# HTTP status (errors.py) → gRPC code; anything else is the router's own fault.
_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    502: grpc.StatusCode.UNAVAILABLE,  # a worker failed: another try may reach a healthy one
    503: grpc.StatusCode.UNAVAILABLE,
}


class ServingServicer(pb_grpc.ServingServicer):
    def __init__(self, pools: dict[str, ModelPool]) -> None:
        self._pools = pools

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext,
                       ) -> AsyncIterator[pb.GenerateResponse]:
        try:
            async for response in self._generate(request):
                yield response
            return
        except APIError as exc:
            error = exc
        except Exception:
            logger.exception("unexpected error")  # the trace stays in the log, never in the status
            error = APIError(500, "internal error", None, "server_error")
        await _abort(context, error)

    async def _generate(self, request: pb.GenerateRequest) -> AsyncIterator[pb.GenerateResponse]:
        parsed = parse_generate(request)
        pool = find_pool(self._pools, parsed.model)
        if parsed.messages is not None:
            prompt_ids = chat_prompt_token_ids(pool, parsed.messages)
        else:
            prompt_ids = prompt_token_ids(pool, parsed.prompt)
        public_id = request.request_id or "gen-" + uuid.uuid4().hex
        # Workers key their state on the id: a client's own id gets a suffix so two clients that
        # happen to pick the same one never share blocks or a KV transfer.
        worker_id = f"{public_id}-{uuid.uuid4().hex[:8]}" if request.request_id else public_id
        events = text_events(pool, worker_id, prompt_ids, parsed.params)
        num_tokens = 0
        try:
            async for delta, ids, finish in events:
                num_tokens += len(ids)
                response = pb.GenerateResponse(request_id=public_id, model=pool.name, token_ids=ids, text=delta)
                if finish is not None:
                    response.finish_reason = finish
                    response.usage.CopyFrom(pb.Usage(prompt_tokens=len(prompt_ids), completion_tokens=num_tokens,
                                                     total_tokens=len(prompt_ids) + num_tokens))
                yield response
        finally:
            await events.aclose()  # a cancelled call cancels the worker calls

    async def Models(self, request: pb.ModelsRequest, context: grpc.aio.ServicerContext) -> pb.ModelsResponse:
        return pb.ModelsResponse(models=[pb.ModelInfo(id=name, ready=pool.is_ready, max_model_len=pool.max_model_len)
                                         for name, pool in self._pools.items()])


class PoolHealth(health.aio.HealthServicer):
    """grpc.health.v1 for the server ("") and pdserve.v1.Serving: SERVING while every model has workers.

    Pools gain and lose workers while the router runs, so the status is recomputed on every Check
    and when a Watch starts (watchers also hear of changes that a later Check notices)."""

    def __init__(self, pools: dict[str, ModelPool]) -> None:
        super().__init__()
        self._pools = pools

    async def refresh(self) -> None:
        ready = bool(self._pools) and all(pool.is_ready for pool in self._pools.values())
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE_NAME):
            if self._server_status.get(service) != status:  # set() wakes watchers: only on a change
                await self.set(service, status)

    async def Check(self, request, context):
        await self.refresh()
        return await super().Check(request, context)

    async def Watch(self, request, context):
        await self.refresh()
        return await super().Watch(request, context)


async def serve_grpc(pools: dict[str, ModelPool], host: str, port: int) -> tuple[grpc.aio.Server, int]:
    """Start the public gRPC server (port 0: any free port); return it and the port it bound.

    Stop it with `await server.stop(grace)`; the pools stay open for the caller to close."""
    server = grpc.aio.server()
    pb_grpc.add_ServingServicer_to_server(ServingServicer(pools), server)
    health_servicer = PoolHealth(pools)
    await health_servicer.refresh()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind the gRPC API to {host}:{port}")
    await server.start()
    return server, bound


async def _abort(context: grpc.aio.ServicerContext, error: APIError) -> None:
    code = _CODES.get(error.status, grpc.StatusCode.INTERNAL)
    details = error.message
    metadata: tuple[tuple[str, str], ...] = ()
    if error.param:
        metadata = ((FIELD_METADATA, error.param),)
        if not details.startswith(error.param):
            details = f"{error.param}: {details}"
    await context.abort(code, details, trailing_metadata=metadata)
