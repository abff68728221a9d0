"""The OpenAI-compatible HTTP API (FastAPI): completions, chat completions, models, health, readiness.

A request's life here: the body is read (size-capped) and parsed by hand so every bad value becomes a
400 naming its field, in OpenAI's error shape → the model's pool is found (404 otherwise) → the prompt
is tokenized (chat: the model's own chat template) → the pool dispatches it to the workers → token
ids come back and an incremental detokenizer turns them into UTF-8-safe text deltas, cut at stop
strings → the client gets one JSON response, or SSE chunks exactly as OpenAI sends them (a role chunk
first for chat, a finish chunk, a usage chunk when `stream_options.include_usage`, then
`data: [DONE]`). A client that disconnects mid-stream cancels the worker calls.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from cluster.router.dispatch import ModelPool
from cluster.router.errors import APIError, bad_request
from cluster.router.schema import ParsedRequest, parse_chat, parse_completion
from cluster.router.textgen import chat_prompt_token_ids, find_pool, prompt_token_ids, text_events

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 4 << 20


def create_app(pools: dict[str, ModelPool]) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        for pool in pools.values():
            await pool.close()

    app = FastAPI(title="pdserve", docs_url=None, redoc_url=None, lifespan=lifespan)

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

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

    @app.get("/v1/models")
    async def models() -> dict:
        now = int(time.time())
        return {"object": "list",
                "data": [{"id": name, "object": "model", "created": now, "owned_by": "pdserve"} for name in pools]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        parsed = parse_completion(await _json_body(request))
        pool = find_pool(pools, parsed.model)
        return await _respond(pool, parsed, prompt_token_ids(pool, parsed.prompt), chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        parsed = parse_chat(await _json_body(request))
        pool = find_pool(pools, parsed.model)
        return await _respond(pool, parsed, chat_prompt_token_ids(pool, parsed.messages), chat=True)

    return app


async def _json_body(request: Request):
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        raise APIError(413, f"request body over {MAX_BODY_BYTES} bytes")
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}") from None


async def _respond(pool: ModelPool, parsed: ParsedRequest, prompt_ids: list[int], chat: bool) -> Response:
    request_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    events = text_events(pool, request_id, prompt_ids, parsed.params)
    first = await anext(events)  # errors before the first token still become proper HTTP errors
    if parsed.stream:
        return StreamingResponse(_sse(request_id, pool.name, chat, parsed, prompt_ids, first, events),
                                 media_type="text/event-stream")
    text, tokens, reason = first[0], len(first[1]), first[2]
    async for delta, ids, finish in events:
        text += delta
        tokens += len(ids)
        reason = finish or reason
    choice = {"index": 0, "finish_reason": reason, "logprobs": None}
    choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
    return JSONResponse({
        "id": request_id, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
        "model": pool.name, "choices": [choice], "usage": _usage(len(prompt_ids), tokens),
    })


async def _sse(request_id: str, model: str, chat: bool, parsed: ParsedRequest, prompt_ids: list[int],
               first: tuple[str, list[int], str | None], events: AsyncIterator) -> AsyncIterator[str]:
    created = int(time.time())
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(delta: str | None, finish: str | None, role: bool = False) -> str:
        if chat:
            body = {"role": "assistant", "content": ""} if role else ({} if delta is None else {"content": delta})
            choice = {"index": 0, "delta": body, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
        payload = {"id": request_id, "object": kind, "created": created, "model": model, "choices": [choice]}
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    num_tokens = 0
    try:
        if chat:
            yield chunk(None, None, role=True)
        item = first
        while True:
            delta, ids, finish = item
            num_tokens += len(ids)
            if delta:
                yield chunk(delta, None)
            if finish is not None:
                yield chunk(None if chat else "", finish)
                break
            item = await anext(events)
        if parsed.include_usage:
            usage = {"id": request_id, "object": kind, "created": created, "model": model, "choices": [],
                     "usage": _usage(len(prompt_ids), num_tokens)}
            yield f"data: {json.dumps(usage)}\n\n"
        yield "data: [DONE]\n\n"
    except APIError as exc:  # after the headers went out, the error travels in the stream
        yield f"data: {json.dumps(exc.body())}\n\n"
    finally:
        await events.aclose()  # a client that went away cancels the worker calls


def _usage(num_prompt: int, num_completion: int) -> dict:
    return {"prompt_tokens": num_prompt, "completion_tokens": num_completion,
            "total_tokens": num_prompt + num_completion}
