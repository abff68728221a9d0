"""One TP rank's share of a disaggregated transfer: its senders (prefill side) or receivers (decode side).

Prefill rank r, given a KVDestination, makes one transport sender for each target piece it is the
sending rank of (heads.sending_rank), and `RoutedSender.send_layer` feeds each the piece's heads sliced
out of r's own pages (sender frame: global heads minus r's first head). The TransferSpec it builds says
where the piece lands in the receiving rank's cache (receiver frame), so both sides fingerprint the same spec.

Decode rank r makes one receiver per target piece addressed to it, all writing into the same reserved
blocks at their head offsets; `RoutedReceiver.poll` is their minimum (`transfer.combine`).

At TP=1 on both sides there is one piece, one sender and one receiver: the plain path of old.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from cluster.parallel.destination import KVDestination, KVTarget
from cluster.parallel.heads import kv_head_range, sending_rank
from cluster.transfer import (
    KVPoll,
    KVReceiver,
    KVSender,
    TransferSpec,
    combine,
    create_receiver,
    create_sender,
)


@dataclass(frozen=True)
class KVGeometry:
    """What a rank needs to build its TransferSpecs."""

    num_layers: int
    block_size: int
    head_dim: int
    dtype: str  # torch dtype name
    num_kv_heads: int  # the model's, over all ranks
    tp_size: int = 1
    rank: int = 0

    @property
    def head_range(self) -> tuple[int, int]:
        return kv_head_range(self.num_kv_heads, self.tp_size, self.rank)

    @classmethod
    def of_engine(cls, engine: Any) -> KVGeometry:
        """The geometry of an LLMEngine (rank 0 of its replica)."""
        tp = engine.tp
        return cls(engine.arch.num_layers, engine.config.block_size, engine.arch.head_dim,
                   str(engine.dtype).removeprefix("torch."), engine.arch.num_kv_heads,
                   tp.size if tp is not None else 1, 0)


def _spec(destination: KVDestination, target: KVTarget, geometry: KVGeometry, offset: int) -> TransferSpec:
    return TransferSpec(
        transfer_id=target.transfer_id,
        num_layers=geometry.num_layers,
        block_size=geometry.block_size,
        num_kv_heads=target.kv_head_end - target.kv_head_start,
        head_dim=geometry.head_dim,
        dtype=geometry.dtype,
        num_blocks=destination.num_blocks,
        first_block_index=destination.first_block_index,
        kv_head_start=target.kv_head_start - offset,  # the receiving rank's frame
        kv_head_end=target.kv_head_end - offset,
        lease_seconds=destination.lease_seconds,
    )


def sender_endpoint(transport: str, address: str) -> dict[str, Any]:
    if transport == "grpc":
        return {"target": address}
    if transport == "dist":
        return {"address": address}
    return {}


class RoutedSender(KVSender):
    """The pieces of one transfer that this prefill rank sends; may be empty (a replica rank)."""

    def __init__(self, destination: KVDestination, parts: list[tuple[slice, KVSender]]) -> None:
        self.destination = destination
        self.parts = parts  # (heads in this rank's pages, the piece's sender)

    def send_layer(self, layer_idx: int, k_pages: torch.Tensor, v_pages: torch.Tensor) -> None:
        # pages: [num_blocks, block_size, this rank's kv heads, head_dim]
        for heads, sender in self.parts:
            sender.send_layer(layer_idx, k_pages[:, :, heads], v_pages[:, :, heads])

    def send_layer_blocks(self, layer_idx: int, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          block_ids: torch.Tensor | list[int], head_start: int = 0) -> None:
        # Each piece gathers its heads straight from the cache into its send buffer (one copy).
        for heads, sender in self.parts:
            sender.send_layer_blocks(layer_idx, k_cache, v_cache, block_ids, head_start + heads.start)

    def finish(self, first_token_id: int) -> None:
        for _, sender in self.parts:
            sender.finish(first_token_id)

    def poll(self) -> KVPoll:
        return combine(sender.poll() for _, sender in self.parts) if self.parts else KVPoll.DONE

    def abort(self) -> None:
        for _, sender in self.parts:
            sender.abort()

    def close(self) -> None:
        for _, sender in self.parts:
            sender.close()


class RoutedReceiver(KVReceiver):
    """The pieces of one transfer that land on this decode rank, all in `block_ids`."""

    def __init__(self, destination: KVDestination, block_ids: list[int], receivers: list[KVReceiver]) -> None:
        if not receivers:
            raise ValueError("a decode rank must receive at least one piece")
        self.destination = destination
        self.block_ids = block_ids
        self.receivers = receivers

    def poll(self) -> KVPoll:
        return combine(r.poll() for r in self.receivers)

    @property
    def first_token_id(self) -> int:
        return self.receivers[0].first_token_id  # every piece's final message carries the same token

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.receivers)

    def abort(self) -> None:
        for r in self.receivers:
            r.abort()

    def close(self) -> None:
        for r in self.receivers:
            r.close()


def make_rank_sender(destination: KVDestination, geometry: KVGeometry) -> RoutedSender:
    """Senders for the pieces this rank owns. Raises ValueError if some piece has no sending rank."""
    own_start, _ = geometry.head_range
    offsets = destination.receiver_offsets()
    owners = [sending_rank(t.kv_head_start, t.kv_head_end, geometry.num_kv_heads, geometry.tp_size)
              for t in destination.targets]  # validates every piece before anything is created
    parts: list[tuple[slice, KVSender]] = []
    try:
        for target, owner in zip(destination.targets, owners, strict=True):
            if owner != geometry.rank:
                continue
            spec = _spec(destination, target, geometry, offsets[target.decode_rank])
            sender = create_sender(destination.transport, spec, **sender_endpoint(destination.transport, target.address))
            parts.append((slice(target.kv_head_start - own_start, target.kv_head_end - own_start), sender))
    except BaseException:
        for _, sender in parts:
            sender.close()
        raise
    return RoutedSender(destination, parts)


def make_rank_receiver(
    destination: KVDestination,
    geometry: KVGeometry,
    k_caches: list[torch.Tensor],
    v_caches: list[torch.Tensor],
    block_ids: list[int],
    **endpoint: Any,
) -> RoutedReceiver:
    """Receivers for the pieces addressed to this rank, registered with its endpoint (`endpoint` kwargs)."""
    offsets = destination.receiver_offsets()
    receivers: list[KVReceiver] = []
    try:
        for target in destination.targets:
            if target.decode_rank == geometry.rank:
                spec = _spec(destination, target, geometry, offsets[target.decode_rank])
                receivers.append(create_receiver(destination.transport, spec, k_caches, v_caches, block_ids, **endpoint))
        return RoutedReceiver(destination, block_ids, receivers)
    except BaseException:
        for r in receivers:
            r.close()
        raise
