"""The decode role: receive a prompt's KV into this worker's paged cache and stream tokens from it.

A request's life on a decode worker:
1. `Decode(expect_kv=true, prompt, params, transfer_id)` arrives from the router before the prefill
   starts. The engine reserves blocks for the prompt, reusing any leading blocks its prefix cache
   already holds, under a lease; the new blocks stay out of the prefix cache until their KV lands.
   No room → RESOURCE_EXHAUSTED, and the router tries elsewhere or later.
2. A receiver is registered for the transfer on every TP rank of this worker (one per KV-head piece,
   cut for the sending prefill worker's TP size), and the stream's first message tells the router
   where the pages go (`kv_destination`: transport, each piece's rank, address and heads, the first
   block it lacks).
3. The router hands that destination to a prefill worker, whose pages arrive layer by layer and are
   written straight into the reserved blocks, every message checked against its checksum.
4. Each engine step polls the receivers. DONE: the request leaves WAITING_FOR_KV with the prefill's
   first token and joins the running batch. FAILED (lease expiry, checksum mismatch, sender gone):
   the engine computes the prompt itself (`kv_fallback` on the stream, and a fallback counted).
5. Tokens stream back as steps produce them — after the first one, which the router already has
   from the prefill worker, unless the fallback sampled its own. Finish, abort or a client that went
   away frees the blocks into the prefix cache and releases the lease.
With `expect_kv=false` the worker prefills locally. With `min_prefill_tokens`, it decides itself: if
less than that much of the prompt is missing from its prefix cache, moving KV would cost more than
computing it, so it prefills locally and tells the router to skip the prefill worker (conditional
disaggregation).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from cluster.engine.engine import LLMEngine
from cluster.engine.outputs import RequestOutput
from cluster.parallel.destination import KVDestination
from cluster.parallel.disagg import reserve_remote_kv
from cluster.parallel.kv_endpoint import KVEndpoint
from cluster.worker.engine_loop import EngineLoop

__all__ = ["KVEndpoint", "NoRoomError", "decode"]


class NoRoomError(RuntimeError):
    """The KV blocks for this prompt are not free right now."""


async def decode(
    loop: EngineLoop,
    request_id: str,
    prompt_ids: list[int],
    params,
    *,
    expect_kv: bool,
    transfer_id: str,
    lease_seconds: float,
    endpoint: KVEndpoint,
    min_prefill_tokens: int = 0,
    prefill_tp: int = 1,
) -> AsyncIterator[tuple[KVDestination | None, RequestOutput | None]]:
    """Yields (destination, None) first when expecting KV — a destination of None meaning "prefilling
    here after all" (conditional disaggregation) — then (None, output) per engine output.

    `endpoint` is this worker's (rank 0's, listing its other TP ranks' addresses); `prefill_tp` is the
    TP size of the prefill worker that will send, which fixes how the KV heads are cut into pieces."""
    aio_loop = asyncio.get_running_loop()
    outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()

    def deliver(out: RequestOutput) -> None:
        aio_loop.call_soon_threadsafe(outputs.put_nowait, out)

    def add(engine: LLMEngine) -> KVDestination | None:
        num_uncached = len(prompt_ids) - engine.kv_manager.count_cached_prefix_tokens(prompt_ids)
        if not expect_kv or num_uncached < min_prefill_tokens:
            engine.add_request(request_id, prompt_ids, params)
            loop.subscribe(request_id, deliver)
            return None
        destination = reserve_remote_kv(engine, request_id, prompt_ids, params, endpoint=endpoint,
                                        transfer_id=transfer_id or request_id, prefill_tp=prefill_tp,
                                        lease_seconds=lease_seconds)
        if destination is None:
            raise NoRoomError(f"no room for {len(prompt_ids)} prompt tokens in the KV cache")
        loop.subscribe(request_id, deliver)
        return destination

    destination = await asyncio.wrap_future(loop.call(add))
    finished = False
    try:
        if expect_kv:
            yield destination, None  # None: decided to prefill here
        while not finished:
            out = await outputs.get()
            finished = out.finished
            yield None, out
    finally:
        if not finished:  # the client went away: free the blocks and the lease now
            loop.call(lambda e: e.abort(request_id))
