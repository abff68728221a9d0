"""n > 1: one client request becomes n worker requests, and their events one interleaved stream.

A request with `n` choices here: `choice_params` gives choice i its own SamplingParams (with a seed,
seed + i, so the choices are reproducible yet differ from each other; without one each worker request
draws its own noise; greedy choices are all the same text) → the caller starts one event stream per
choice, each under its own worker request id → `merge` runs them side by side and yields
(choice index, event) in arrival order, as OpenAI interleaves streamed choices. The first error from
any choice ends the merge; closing it (client gone, error) cancels every choice still running, which
cancels its worker calls. One choice takes a direct path with no tasks: the common case pays nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from typing import TypeVar

from cluster.request import SamplingParams

T = TypeVar("T")

MAX_N = 32


def choice_params(params: SamplingParams, n: int) -> list[SamplingParams]:
    """SamplingParams for each of n choices (each asks the worker for one sequence)."""
    if n == 1:
        return [params]
    return [replace(params, n=1, seed=None if params.seed is None else params.seed + i) for i in range(n)]


def choice_request_id(request_id: str, index: int, n: int) -> str:
    """The worker request id of choice `index`: the request's own id when there is one choice."""
    return request_id if n == 1 else f"{request_id}-{index}"


async def merge(streams: Sequence[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Yield (index, item) from every stream as items arrive; re-raise the first stream's error."""
    if len(streams) == 1:
        stream = streams[0]
        try:
            async for item in stream:
                yield 0, item
        finally:
            await stream.aclose()
        return
    queue: asyncio.Queue[tuple[int, T | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                await queue.put((index, item))
            await queue.put((index, None))
        except Exception as exc:  # handed to the consumer, which raises it
            await queue.put((index, exc))
        finally:
            await stream.aclose()

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        num_open = len(tasks)
        while num_open:
            index, item = await queue.get()
            if item is None:
                num_open -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()  # a cancelled choice closes its stream, which cancels its worker calls
        await asyncio.gather(*tasks, return_exceptions=True)
