"""The OpenAI response bodies of one completion or chat completion, whole or as SSE chunks.

A request's events arrive here as (choice index, (text delta, token ids, finish reason, logprobs)),
the n choices interleaved (choices.py). Non-streamed, `collect` gathers every choice's text, token
count, finish reason and logprobs into one `text_completion` / `chat.completion` body. Streamed,
`sse_events` turns each event into a chunk as OpenAI sends it: for chat a role chunk per choice first,
then content chunks (with their tokens' logprobs when asked), a finish chunk per choice, a usage chunk
(prompt tokens once, completion tokens summed over the choices) when `stream_options.include_usage`,
then `data: [DONE]`. An error after the headers went out travels in the stream as an error object.

Every event also feeds the request's metrics (observe.py); the hot path (one choice, no logprobs)
does one JSON encode per chunk and nothing per token beyond it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from cluster.router.errors import APIError
from cluster.router.logprobs import CompletionLogprobs, TokenTexts, chat_logprobs
from cluster.router.observe import RequestMetrics, outcome_of
from cluster.router.sse import ChunkEncoder
from cluster.router.textgen import TextEvent

logger = logging.getLogger(__name__)

IndexedEvent = tuple[int, TextEvent]


@dataclass
class ResponseContext:
    request_id: str
    model: str
    is_chat: bool
    n: int
    num_prompt_tokens: int
    texts: TokenTexts | None  # set when the request asked for logprobs
    metrics: RequestMetrics
    include_usage: bool = False
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def kind(self) -> str:
        return "chat.completion" if self.is_chat else "text_completion"

    def usage(self, num_completion_tokens: int) -> dict:
        return {"prompt_tokens": self.num_prompt_tokens, "completion_tokens": num_completion_tokens,
                "total_tokens": self.num_prompt_tokens + num_completion_tokens}


@dataclass
class _Choice:
    parts: list[str] = field(default_factory=list)
    num_tokens: int = 0
    finish: str | None = None
    logprobs: list = field(default_factory=list)


async def collect(ctx: ResponseContext, first: IndexedEvent, events: AsyncIterator[IndexedEvent]) -> dict:
    """The whole (non-streamed) response body."""
    choices = [_Choice() for _ in range(ctx.n)]
    item: IndexedEvent | None = first
    while item is not None:
        index, (delta, ids, finish, logprobs) = item
        ctx.metrics.tokens(len(ids))
        choice = choices[index]
        choice.parts.append(delta)
        choice.num_tokens += len(ids)
        choice.finish = finish or choice.finish
        if logprobs:
            choice.logprobs += logprobs
        item = await anext(events, None)
    bodies = []
    for index, choice in enumerate(choices):
        text = "".join(choice.parts)
        body = {"index": index, "finish_reason": choice.finish, "logprobs": _logprobs(ctx, choice.logprobs)}
        body.update({"message": {"role": "assistant", "content": text}} if ctx.is_chat else {"text": text})
        bodies.append(body)
    num_completion = sum(c.num_tokens for c in choices)
    ctx.metrics.finish(choices[-1].finish or "abort", ctx.num_prompt_tokens, num_completion)
    return {"id": ctx.request_id, "object": ctx.kind, "created": ctx.created, "model": ctx.model,
            "choices": bodies, "usage": ctx.usage(num_completion)}


def _logprobs(ctx: ResponseContext, logprobs: list) -> dict | None:
    if ctx.texts is None:
        return None
    if ctx.is_chat:
        return {"content": chat_logprobs(ctx.texts, logprobs), "refusal": None}
    return CompletionLogprobs(ctx.texts).chunk(logprobs)


async def sse_events(ctx: ResponseContext, first: IndexedEvent, events: AsyncIterator[IndexedEvent],
                     ) -> AsyncIterator[str]:
    """The SSE body: `data: {chunk}` lines, then `data: [DONE]`."""
    head = (f'{{"id": "{ctx.request_id}", "object": "{ctx.kind}{".chunk" if ctx.is_chat else ""}", '
            f'"created": {ctx.created}, "model": {json.dumps(ctx.model)}, "choices": [')

    def chunk(choice: dict) -> str:
        return f"data: {head}{json.dumps(choice, ensure_ascii=False)}]}}\n\n"

    text_chunks = ChunkEncoder(ctx.request_id, ctx.model, ctx.created, ctx.is_chat)

    completion_logprobs = ([CompletionLogprobs(ctx.texts) for _ in range(ctx.n)]
                           if ctx.texts is not None and not ctx.is_chat else None)
    num_tokens = 0
    num_open = ctx.n
    outcome = "abort"  # unless the stream runs to its end: the client went away
    try:
        if ctx.is_chat:
            for index in range(ctx.n):
                yield chunk({"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None})
        item: IndexedEvent | None = first
        while item is not None:
            index, (delta, ids, finish, logprobs) = item
            ctx.metrics.tokens(len(ids))
            num_tokens += len(ids)
            if delta or logprobs:
                lp = None
                if logprobs and ctx.texts is not None:
                    lp = ({"content": chat_logprobs(ctx.texts, logprobs)} if ctx.is_chat
                          else completion_logprobs[index].chunk(logprobs))
                if lp is None:  # the per-token hot path: only the delta is JSON-escaped (sse.py)
                    yield text_chunks.text(delta, index)
                elif ctx.is_chat:
                    yield chunk({"index": index, "delta": {"content": delta}, "logprobs": lp, "finish_reason": None})
                else:
                    yield chunk({"index": index, "text": delta, "logprobs": lp, "finish_reason": None})
            if finish is not None:
                outcome = finish
                yield chunk({"index": index, "delta": {}, "logprobs": None, "finish_reason": finish} if ctx.is_chat
                            else {"index": index, "text": "", "logprobs": None, "finish_reason": finish})
                num_open -= 1
                if not num_open:
                    break
            item = await anext(events, None)
        if ctx.include_usage:
            usage = {"id": ctx.request_id, "object": f"{ctx.kind}{'.chunk' if ctx.is_chat else ''}",
                     "created": ctx.created, "model": ctx.model, "choices": [], "usage": ctx.usage(num_tokens)}
            yield f"data: {json.dumps(usage)}\n\n"
        yield "data: [DONE]\n\n"
    except APIError as exc:  # after the headers went out, the error travels in the stream
        outcome = outcome_of(exc)
        yield f"data: {json.dumps(exc.body())}\n\n"
    except Exception:
        logger.exception("unexpected error")  # the trace stays in the log, never in the stream
        outcome = "error"
        yield f"data: {json.dumps(APIError(500, 'internal error', None, 'server_error').body())}\n\n"
    finally:
        ctx.metrics.finish(outcome, ctx.num_prompt_tokens, num_tokens)
        await events.aclose()  # a client that went away cancels the worker calls
