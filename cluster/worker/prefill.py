"""The prefill role: compute a prompt, ship its KV to the decode worker, return the first token.

A request's life on a prefill worker:
1. `Prefill(request_id, prompt, sampling params, kv_destination)` arrives from the router. The
   destination names the transport, the decode rank(s) and their addresses, the first block the
   decode worker lacks (it may hold a prefix already) and how long it will wait (the lease).
2. One KV sender per decode rank is made (each gets its slice of KV heads when decode runs TP > 1)
   and the prompt enters this worker's engine with them attached. The scheduler batches it with other
   prompts, in chunks under the token budget; its own prefix cache may already hold part of it.
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
from cluster.transfer import KVSender, TransferSpec, create_sender
from cluster.worker.engine_loop import EngineLoop
from cluster.worker.fanout import FanOutSender


def make_senders(engine: LLMEngine, destination) -> KVSender | None:
    """One sender per decode rank named in `destination` (a pb.KVDestination); None when it names none."""
    if not destination.targets:
        return None
    senders = []
    for target in destination.targets:
        spec = TransferSpec(
            transfer_id=target.transfer_id,
            num_layers=engine.arch.num_layers,
            block_size=engine.config.block_size,
            num_kv_heads=target.kv_head_end - target.kv_head_start,
            head_dim=engine.arch.head_dim,
            dtype=str(engine.dtype).removeprefix("torch."),
            num_blocks=destination.num_blocks,
            first_block_index=destination.first_block_index,
            kv_head_start=target.kv_head_start,
            kv_head_end=target.kv_head_end,
            lease_seconds=destination.lease_seconds,
        )
        senders.append((spec, create_sender(destination.transport, spec, **_endpoint(destination.transport, target))))
    if len(senders) == 1 and senders[0][0].num_kv_heads == engine.arch.num_kv_heads:
        return senders[0][1]
    return FanOutSender(senders)


def _endpoint(transport: str, target) -> dict:
    if transport == "grpc":
        return {"target": target.address}
    if transport == "dist":
        return {"address": target.address}
    return {}


async def prefill(loop: EngineLoop, request_id: str, prompt_ids: list[int], params, destination) -> RequestOutput:
    """Run the prompt on the engine thread with its senders attached; resolve with the first token's output."""
    aio_loop = asyncio.get_running_loop()
    first: asyncio.Future[RequestOutput] = aio_loop.create_future()

    def deliver(out: RequestOutput) -> None:
        aio_loop.call_soon_threadsafe(lambda: first.done() or first.set_result(out))

    def add(engine: LLMEngine) -> None:
        sender = make_senders(engine, destination) if destination is not None else None
        first_block = destination.first_block_index if destination is not None else 0
        engine.add_request(request_id, prompt_ids, params, kv_sender=sender, first_block_index=first_block)
        loop.subscribe(request_id, deliver)

    await asyncio.wrap_future(loop.call(add))
    try:
        return await first
    except asyncio.CancelledError:
        loop.call(lambda e: e.abort(request_id))
        raise
