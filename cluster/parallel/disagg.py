"""The two engine calls of a disaggregated request, for replicas of any TP size on either side.

    destination = reserve_remote_kv(decode_engine, rid, prompt, params, endpoint=..., prefill_tp=p)
    add_prefill(prefill_engine, rid, prompt, params, destination)   # on the prefill replica's rank 0

`reserve_remote_kv` reserves the blocks on the decode replica, plans one target per (decode rank, head
piece) for a prefill replica of TP=p, and makes rank 0's receivers; with TP the engine's coordinator has
the other decode ranks make theirs before this returns. `add_prefill` makes rank 0's senders for the
pieces it holds; the other prefill ranks make theirs from the same destination. Both must run on the
thread that drives the engine.
"""

from __future__ import annotations

from collections.abc import Sequence

from cluster.engine.engine import LLMEngine
from cluster.parallel.destination import KVDestination, plan_destination
from cluster.parallel.kv_endpoint import KVEndpoint
from cluster.parallel.routed import KVGeometry, make_rank_receiver, make_rank_sender
from cluster.request import SamplingParams


def reserve_remote_kv(
    engine: LLMEngine,
    request_id: str,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    *,
    endpoint: KVEndpoint,
    transfer_id: str | None = None,
    prefill_tp: int = 1,
    lease_seconds: float = 30.0,
    priority: int = 0,
) -> KVDestination | None:
    """Decode side: where the prefill replica must send this prompt's KV; None if the blocks don't fit now."""
    reservation = engine.add_remote_kv_request(request_id, prompt_ids, params, priority)
    if reservation is None:
        return None
    try:
        destination = plan_destination(
            transfer_id or request_id, transport=endpoint.transport, addresses=endpoint.rank_addresses,
            num_kv_heads=engine.arch.num_kv_heads, prefill_tp=prefill_tp,
            first_block_index=reservation.first_block_index, num_blocks=len(reservation.block_ids),
            lease_seconds=lease_seconds,
        )
        receiver = make_rank_receiver(destination, KVGeometry.of_engine(engine), engine.attn.k_caches,
                                      engine.attn.v_caches, reservation.block_ids, **endpoint.receiver_kwargs())
    except BaseException:
        engine.abort(request_id)  # give the reservation back
        raise
    engine.attach_kv_receiver(request_id, receiver)
    return destination


def add_prefill(
    engine: LLMEngine,
    request_id: str,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    destination: KVDestination | None,
    priority: int = 0,
) -> list[int]:
    """Prefill side: queue the prompt; its KV goes to `destination` (None: only the first token is wanted)."""
    if destination is None or not destination.targets:
        return engine.add_request(request_id, prompt_ids, params, priority)
    sender = make_rank_sender(destination, KVGeometry.of_engine(engine))  # ValueError: pieces this TP can't send
    try:
        return engine.add_request(request_id, prompt_ids, params, priority, kv_sender=sender,
                                  first_block_index=destination.first_block_index)
    except BaseException:
        sender.close()
        raise
