"""The decode role: receive a prompt's KV into this worker's paged cache and stream tokens from it.

A request's life on a decode worker:
1. `Decode(expect_kv=true, prompt, params, transfer_id)` arrives from the router before the prefill
   starts. The engine reserves blocks for the prompt, reusing any leading blocks its prefix cache
   already holds, under a lease; the new blocks stay out of the prefix cache until their KV lands.
   No room → RESOURCE_EXHAUSTED, and the router tries elsewhere or later.
2. A receiver is registered for the transfer, and the stream's first message tells the router where
   the pages go (`kv_destination`: transport, this worker's address, the first block it lacks).
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
from dataclasses import dataclass

from cluster.engine.engine import LLMEngine
from cluster.engine.outputs import RequestOutput
from cluster.engine.scheduler import RemoteKVReservation
from cluster.transfer import TransferSpec, create_receiver
from cluster.worker.engine_loop import EngineLoop


class NoRoomError(RuntimeError):
    """The KV blocks for this prompt are not free right now."""


@dataclass
class KVEndpoint:
    """How prefill workers reach this decode worker: the transport, its address, and the object
    receivers register with (a gRPC KV servicer, a dist endpoint, or a local channel)."""

    transport: str
    address: str
    registry: object | None = None

    def receiver_kwargs(self) -> dict:
        if self.transport == "grpc":
            return {"servicer": self.registry}
        if self.transport == "dist":
            return {"endpoint": self.registry}
        return {"channel": self.registry} if self.registry is not None else {}


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
) -> AsyncIterator[tuple[RemoteKVReservation | None, RequestOutput | None]]:
    """Yields (reservation, None) first when expecting KV — a reservation of None meaning "prefilling
    here after all" (conditional disaggregation) — then (None, output) per engine output."""
    aio_loop = asyncio.get_running_loop()
    outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()

    def deliver(out: RequestOutput) -> None:
        aio_loop.call_soon_threadsafe(outputs.put_nowait, out)

    def add(engine: LLMEngine) -> RemoteKVReservation | None:
        num_uncached = len(prompt_ids) - engine.kv_manager.count_cached_prefix_tokens(prompt_ids)
        if not expect_kv or num_uncached < min_prefill_tokens:
            engine.add_request(request_id, prompt_ids, params)
            loop.subscribe(request_id, deliver)
            return None
        reservation = engine.add_remote_kv_request(request_id, prompt_ids, params)
        if reservation is None:
            raise NoRoomError(f"no room for {len(prompt_ids)} prompt tokens in the KV cache")
        spec = TransferSpec(
            transfer_id=transfer_id or request_id,
            num_layers=engine.arch.num_layers,
            block_size=engine.config.block_size,
            num_kv_heads=engine.arch.num_kv_heads,
            head_dim=engine.arch.head_dim,
            dtype=str(engine.dtype).removeprefix("torch."),
            num_blocks=len(reservation.block_ids),
            first_block_index=reservation.first_block_index,
            lease_seconds=lease_seconds,
        )
        receiver = create_receiver(endpoint.transport, spec, engine.attn.k_caches, engine.attn.v_caches,
                                   reservation.block_ids, **endpoint.receiver_kwargs())
        engine.attach_kv_receiver(request_id, receiver)
        loop.subscribe(request_id, deliver)
        return reservation

    reservation = await asyncio.wrap_future(loop.call(add))
    finished = False
    try:
        if expect_kv:
            yield reservation, None  # None: decided to prefill here
        while not finished:
            out = await outputs.get()
            finished = out.finished
            yield None, out
    finally:
        if not finished:  # the client went away: free the blocks and the lease now
            loop.call(lambda e: e.abort(request_id))
