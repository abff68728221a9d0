"""The prefill role: compute a prompt, ship its KV to the decode worker, return the first token.

A request's life on a prefill worker:
1. `Prefill(request_id, prompt, sampling params, kv_destination)` arrives from the router. The
   destination names the transport, the decode rank(s) and their addresses, the first block the
   decode worker lacks (it may hold a prefix already) and how long it will wait (the lease).
2. One KV sender per target piece is made, on the rank that holds its KV heads (each rank of a TP
   worker sends its own heads; a decode rank may get several pieces), and the prompt enters this
   worker's engine with them attached. The scheduler batches it with other prompts, in chunks under
   the token budget; its own prefix cache may already hold part of it.
3. In the step that completes the prompt, each layer's pages go to the senders the moment the layer
   is written, so the transfer overlaps the remaining layers' compute; the first token is sampled,
   and the last KV message carries it plus a checksum over the whole transfer.
4. The response returns the first token to the router (which streams it to the client: TTFT). The
   prompt's blocks stay in this worker's prefix cache for the next request that shares them.
Failures: a bad request is INVALID_ARGUMENT; if a sender fails the decode worker notices (checksum,
abort message or lease) and computes the prompt itself, so the request is never lost.
"""

from __future__ import annotations

import asyncio

from cluster.engine.engine import LLMEngine
from cluster.engine.outputs import RequestOutput
from cluster.parallel.disagg import add_prefill
from cluster.worker.convert import destination_from_pb
from cluster.worker.engine_loop import EngineLoop


async def prefill(loop: EngineLoop, request_id: str, prompt_ids: list[int], params, destination) -> RequestOutput:
    """Run the prompt on the engine thread with its senders attached; resolve with the first token's output."""
    aio_loop = asyncio.get_running_loop()
    first: asyncio.Future[RequestOutput] = aio_loop.create_future()

    def deliver(out: RequestOutput) -> None:
        aio_loop.call_soon_threadsafe(lambda: first.done() or first.set_result(out))

    def add(engine: LLMEngine) -> None:
        # Every TP rank of this worker sends the pieces of the destination it holds (cluster/parallel/routed.py).
        add_prefill(engine, request_id, prompt_ids, params,
                    destination_from_pb(destination) if destination is not None else None)
        loop.subscribe(request_id, deliver)

    await asyncio.wrap_future(loop.call(add))
    try:
        return await first
    except asyncio.CancelledError:
        loop.call(lambda e: e.abort(request_id))
        raise
