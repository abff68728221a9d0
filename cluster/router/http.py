"""The OpenAI-compatible HTTP API (FastAPI): completions, chat completions, models, health, readiness,
Prometheus metrics.

A request's life here: the API key is checked (`Authorization: Bearer`, when keys are configured;
401 otherwise) and one request charged to its rate limit (429 with Retry-After) → the body is read
(JSON content type, size-capped: 415 / 413) and parsed by hand so every bad value becomes a 400 naming
its field, in OpenAI's error shape → the model's pool is found (404 otherwise) → the prompt is
tokenized (chat: the model's own chat template) and its most tokens charged to the key → n choices
are dispatched to the workers (choices.py), each a stream of token ids that an incremental
detokenizer turns into UTF-8-safe text deltas, cut at stop strings → the client gets one JSON
response, or SSE chunks exactly as OpenAI sends them (openai_response.py). A client that disconnects
— while its request waits, runs, or streams — cancels its worker calls on every worker it touched.
Metrics (TTFT, ITL, E2E, tokens, requests by outcome) are observed on the way (observe.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator
from typing import TypeVar

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster import metrics
from cluster.router.auth import Authenticator
from cluster.router.choices import choice_params, choice_request_id, merge
from cluster.router.core import Router, as_router
from cluster.router.dispatch import ModelPool
from cluster.router.errors import APIError, bad_request
from cluster.router.logprobs import token_texts
from cluster.router.observe import RequestMetrics, outcome_of
from cluster.router.openai_response import IndexedEvent, ResponseContext, collect, sse_events
from cluster.router.schema import ParsedRequest, parse_chat, parse_completion
from cluster.router.textgen import text_events

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 4 << 20
T = TypeVar("T")


class _ClientGone(Exception):
    """The client disconnected before its response started."""


def create_app(router: Router | dict[str, ModelPool], *, auth: Authenticator | None = None) -> FastAPI:
    """The app over a Router (or a plain {name: ModelPool}, routed statically); `auth` checks API keys
    and rate limits (default: the router config's `auth` section, with its buckets in the router's
    Redis). The app starts the router and closes it on shutdown."""
    router = as_router(router)
    auth = auth or Authenticator(router.config.auth, router.store)  # the router config's keys and limits
    pools = router.pools

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        await router.start()
        yield
        await router.close()

    app = FastAPI(title="pdserve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:  # unknown path, wrong method
        error = APIError(exc.status_code, str(exc.detail), None, "not_found_error" if exc.status_code == 404
                         else "invalid_request_error")
        return JSONResponse(error.body(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error")  # the trace stays in the log, never in the response
        return JSONResponse(APIError(500, "internal error", None, "server_error").body(), status_code=500)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        missing = [name for name, pool in pools.items() if not pool.is_ready]
        if missing or not pools:
            return JSONResponse({"status": "not ready", "models_without_workers": missing}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        auth.authenticate(request.headers.get("authorization"))
        now = int(time.time())
        return {"object": "list",
                "data": [{"id": name, "object": "model", "created": now, "owned_by": "pdserve"} for name in pools]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        m = RequestMetrics(router.traffic)
        with _counted(m):
            key = auth.authenticate(request.headers.get("authorization"))
            await auth.charge_request(key)
            parsed = parse_completion(await _json_body(request))
            pool = router.resolve(parsed.model, prompt=parsed.prompt, max_tokens=parsed.params.max_tokens,
                                  priority=parsed.priority)  # the serving model's route (core.py)
            m.set_model(pool.name)
            prompt_ids = pool.prompt_ids
            return await _respond(request, auth, key, pool, parsed, prompt_ids, m, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        m = RequestMetrics(router.traffic)
        with _counted(m):
            key = auth.authenticate(request.headers.get("authorization"))
            await auth.charge_request(key)
            parsed = parse_chat(await _json_body(request))
            pool = router.resolve(parsed.model, messages=parsed.messages, max_tokens=parsed.params.max_tokens,
                                  priority=parsed.priority)
            m.set_model(pool.name)
            prompt_ids = pool.prompt_ids
            return await _respond(request, auth, key, pool, parsed, prompt_ids, m, chat=True)

    return app


@contextlib.contextmanager
def _counted(m: RequestMetrics) -> Iterator[None]:
    """Count a request that fails before its response starts under its error's outcome."""
    try:
        yield
    except Exception as exc:
        m.finish(outcome_of(exc) if isinstance(exc, APIError) else "error")
        raise


async def _json_body(request: Request):
    content_type = request.headers.get("content-type")
    if content_type is not None:
        media = content_type.split(";", 1)[0].strip().lower()
        if media != "application/json" and not media.endswith("+json"):
            raise APIError(415, f"the request body must be JSON (content-type: application/json), got {media!r}")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise APIError(413, f"request body over {MAX_BODY_BYTES} bytes")
    parts, size = [], 0
    async for part in request.stream():  # chunked uploads carry no length: stop reading at the cap
        size += len(part)
        if size > MAX_BODY_BYTES:
            raise APIError(413, f"request body over {MAX_BODY_BYTES} bytes")
        parts.append(part)
    try:
        return json.loads(b"".join(parts))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}") from None


async def _respond(request: Request, auth: Authenticator, key: str | None, pool: ModelPool, parsed: ParsedRequest,
                   prompt_ids: list[int], m: RequestMetrics, chat: bool) -> Response:
    await auth.charge_tokens(key, len(prompt_ids), parsed.n * parsed.params.max_tokens, pool.name)
    request_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    n = parsed.n
    events = merge([text_events(pool, choice_request_id(request_id, i, n), prompt_ids, params)
                    for i, params in enumerate(choice_params(parsed.params, n))])
    ctx = ResponseContext(request_id, pool.name, chat, n, len(prompt_ids),
                          token_texts(pool.tokenizer) if parsed.params.logprobs is not None else None, m,
                          include_usage=parsed.include_usage)
    is_handed_off = False
    try:
        # Errors before the first token still become proper HTTP statuses.
        first = await _unless_disconnected(request, _first(events))
        if parsed.stream:
            response = _EventStream(sse_events(ctx, first, events), media_type="text/event-stream")
            is_handed_off = True  # the stream closes the events now
            return response
        return JSONResponse(await _unless_disconnected(request, collect(ctx, first, events)))
    except _ClientGone:
        m.finish("abort")
        return Response(status_code=499)  # nobody reads it; the worker calls are cancelled
    finally:
        if not is_handed_off:
            await events.aclose()


async def _first(events: AsyncIterator[IndexedEvent]) -> IndexedEvent:
    try:
        return await anext(events)
    except StopAsyncIteration:
        raise APIError(502, "the worker stream ended without a token", None, "service_unavailable") from None


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (and raising _ClientGone) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # we were cancelled ourselves (shutdown)
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    raise _ClientGone


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _EventStream(StreamingResponse):
    """An SSE response that closes its event generator however the stream ends — a client that goes
    away mid-send included, which Starlette leaves to the garbage collector — so the worker calls
    are cancelled at once."""

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()
