"""The router's public gRPC API (protos/pdserve/v1/serving.proto), next to the OpenAI HTTP API and
over the same `dict[str, ModelPool]`.

A Generate call's life here: the API key in the `authorization` metadata is checked when keys are
configured (UNAUTHENTICATED otherwise) and a request charged to its rate limit (auth.py) → the request
is checked (grpc_schema.py; bad input → INVALID_ARGUMENT whose details start with the field, also
sent as trailing metadata "pdserve-field") → the model's pool is found (NOT_FOUND otherwise) → the
prompt is tokenized, or chat messages rendered with the model's chat template, exactly as the HTTP
API does (textgen.py), and its most tokens charged to the key → n choices run on the workers
(choices.py) → each worker message becomes one GenerateResponse (its choice index, new token ids, the
text they add, their logprobs if asked for); each choice's last one carries its finish_reason, the
stream's last one the usage. Overload and rate limits are RESOURCE_EXHAUSTED with a "retry-after"
trailing metadata, no worker UNAVAILABLE, as 429 and 503 are on HTTP. A client that cancels the call
cancels the worker calls. Metrics are observed as on HTTP (observe.py).

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
from cluster.router.auth import Authenticator, bearer_from_metadata
from cluster.router.choices import choice_params, choice_request_id, merge
from cluster.router.core import Router, as_router
from cluster.router.dispatch import ModelPool
from cluster.router.errors import APIError
from cluster.router.grpc_schema import parse_generate
from cluster.router.logprobs import TokenTexts, token_texts
from cluster.router.observe import RequestMetrics, outcome_of
from cluster.router.textgen import text_events
from cluster.worker.convert import TokenLogprob

ensure_generated()
from pdserve.v1 import serving_pb2 as pb  # noqa: E402
from pdserve.v1 import serving_pb2_grpc as pb_grpc  # noqa: E402

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Serving"].full_name
FIELD_METADATA = "pdserve-field"
RETRY_AFTER_METADATA = "retry-after"  # seconds, as HTTP's Retry-After

# HTTP status (errors.py) → gRPC code; anything else is the router's own fault.
_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    502: grpc.StatusCode.UNAVAILABLE,  # a worker failed: another try may reach a healthy one
    503: grpc.StatusCode.UNAVAILABLE,
}


class ServingServicer(pb_grpc.ServingServicer):
    def __init__(self, router: Router | dict[str, ModelPool], auth: Authenticator | None = None) -> None:
        self._router = as_router(router)
        self._pools = self._router.pools
        self._auth = auth or Authenticator(self._router.config.auth, self._router.store)

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext,
                       ) -> AsyncIterator[pb.GenerateResponse]:
        m = RequestMetrics(self._router.traffic)
        try:
            async for response in self._generate(request, context, m):
                yield response
            return
        except APIError as exc:
            error = exc
        except Exception:
            logger.exception("unexpected error")  # the trace stays in the log, never in the status
            error = APIError(500, "internal error", None, "server_error")
        m.finish(outcome_of(error))
        await _abort(context, error)

    async def _generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext, m: RequestMetrics,
                        ) -> AsyncIterator[pb.GenerateResponse]:
        key = self._auth.authenticate(bearer_from_metadata(context.invocation_metadata()))
        await self._auth.charge_request(key)
        parsed = parse_generate(request)
        pool = self._router.resolve(parsed.model, prompt=parsed.prompt, messages=parsed.messages,
                                    max_tokens=parsed.params.max_tokens)  # the serving model's route (core.py)
        m.set_model(pool.name)
        prompt_ids = pool.prompt_ids
        await self._auth.charge_tokens(key, len(prompt_ids), parsed.n * parsed.params.max_tokens, pool.name)
        public_id = request.request_id or "gen-" + uuid.uuid4().hex
        # Workers key their state on the id: a client's own id gets a suffix so two clients that
        # happen to pick the same one never share blocks or a KV transfer.
        worker_id = f"{public_id}-{uuid.uuid4().hex[:8]}" if request.request_id else public_id
        n = parsed.n
        events = merge([text_events(pool, choice_request_id(worker_id, i, n), prompt_ids, params)
                        for i, params in enumerate(choice_params(parsed.params, n))])
        texts = token_texts(pool.tokenizer) if parsed.params.logprobs is not None else None
        num_tokens, num_open, outcome = 0, n, "abort"  # abort unless every choice finishes: the client left
        try:
            async for index, (delta, ids, finish, logprobs) in events:
                m.tokens(len(ids))
                num_tokens += len(ids)
                response = pb.GenerateResponse(request_id=public_id, model=pool.name, token_ids=ids, text=delta,
                                               index=index)
                if logprobs and texts is not None:
                    response.logprobs.extend(_logprobs_pb(texts, logprobs))
                if finish is not None:
                    response.finish_reason = outcome = finish
                    num_open -= 1
                    if not num_open:
                        response.usage.CopyFrom(pb.Usage(prompt_tokens=len(prompt_ids), completion_tokens=num_tokens,
                                                         total_tokens=len(prompt_ids) + num_tokens))
                yield response
        except APIError as exc:
            outcome = outcome_of(exc)
            raise
        finally:
            m.finish(outcome, len(prompt_ids), num_tokens)
            await events.aclose()  # a cancelled call cancels the worker calls

    async def Models(self, request: pb.ModelsRequest, context: grpc.aio.ServicerContext) -> pb.ModelsResponse:
        try:
            self._auth.authenticate(bearer_from_metadata(context.invocation_metadata()))
        except APIError as exc:
            await _abort(context, exc)
        return pb.ModelsResponse(models=[pb.ModelInfo(id=name, ready=pool.is_ready, max_model_len=pool.max_model_len)
                                         for name, pool in self._pools.items()])


def _logprobs_pb(texts: TokenTexts, logprobs: list[TokenLogprob]) -> list[pb.TokenLogprob]:
    out = []
    for lp in logprobs:
        token, raw = texts.get(lp.token_id)
        top = []
        for t, v in lp.top:
            alt, alt_raw = texts.get(t)
            top.append(pb.TokenLogprob(token_id=t, token=alt, bytes=bytes(alt_raw), logprob=v))
        out.append(pb.TokenLogprob(token_id=lp.token_id, token=token, bytes=bytes(raw), logprob=lp.logprob,
                                   top_logprobs=top))
    return out


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


async def serve_grpc(router: Router | dict[str, ModelPool], host: str, port: int, *,
                     auth: Authenticator | None = None) -> tuple[grpc.aio.Server, int]:
    """Start the public gRPC server over a Router (or a plain {name: ModelPool}; port 0: any free port);
    return it and the port it bound. `auth` checks API keys and rate limits (default: the router
    config's `auth` section).

    Stop it with `await server.stop(grace)`; the router stays open for the caller to close."""
    router = as_router(router)
    await router.start()
    server = grpc.aio.server()
    pb_grpc.add_ServingServicer_to_server(ServingServicer(router, auth), server)
    health_servicer = PoolHealth(router.pools)
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
    if error.retry_after is not None and code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE):
        metadata += ((RETRY_AFTER_METADATA, error.retry_after),)
    await context.abort(code, details, trailing_metadata=metadata)
