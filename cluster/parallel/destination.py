"""KVDestination: where a prefill replica sends one request's KV, piece by piece (mirrors pb.KVDestination).

The decode replica plans it when it reserves the blocks (`plan_destination`): one `KVTarget` per
(decode rank, head piece), each with its own transfer id (the key that rank's receiver waits on) and
the address of that decode rank's KV endpoint. The prefill replica's ranks read the same object and
each sends the pieces it holds (routed.py). Within one decode rank the pieces land in the same blocks,
side by side in the head dimension.

Head ranges here are global (the model's KV heads). A TransferSpec's kv_head_start/end are in the
receiving rank's frame (its cache holds only its range): `receiver_offsets` gives each decode rank's
first global head, the smallest start among its targets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cluster.parallel.heads import plan_kv_pieces


@dataclass(frozen=True)
class KVTarget:
    decode_rank: int
    address: str  # the decode rank's KV endpoint ("host:port"; "" for the local transport)
    transfer_id: str  # per piece: what that rank's receiver is registered under
    kv_head_start: int  # global KV heads [kv_head_start, kv_head_end) of this piece
    kv_head_end: int


@dataclass(frozen=True)
class KVDestination:
    transport: str  # "grpc" | "dist" | "local"
    first_block_index: int  # blocks before this one of the request's table are on the decode side already
    num_blocks: int  # blocks sent
    lease_seconds: float
    targets: tuple[KVTarget, ...]

    def receiver_offsets(self) -> dict[int, int]:
        """decode rank -> the first global KV head its cache holds."""
        offsets: dict[int, int] = {}
        for t in self.targets:
            offsets[t.decode_rank] = min(offsets.get(t.decode_rank, t.kv_head_start), t.kv_head_start)
        return offsets

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data (for step plans: no pickle crosses a process boundary)."""
        return {
            "transport": self.transport, "first_block_index": self.first_block_index,
            "num_blocks": self.num_blocks, "lease_seconds": self.lease_seconds,
            "targets": [[t.decode_rank, t.address, t.transfer_id, t.kv_head_start, t.kv_head_end]
                        for t in self.targets],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KVDestination:
        return cls(
            transport=str(data["transport"]), first_block_index=int(data["first_block_index"]),
            num_blocks=int(data["num_blocks"]), lease_seconds=float(data["lease_seconds"]),
            targets=tuple(KVTarget(int(r), str(a), str(tid), int(s), int(e)) for r, a, tid, s, e in data["targets"]),
        )


def plan_destination(
    transfer_id: str,
    *,
    transport: str,
    addresses: list[str],
    num_kv_heads: int,
    prefill_tp: int,
    first_block_index: int,
    num_blocks: int,
    lease_seconds: float,
) -> KVDestination:
    """The decode side's plan: one target per piece (`addresses[r]` is decode rank r's KV endpoint).

    With one piece (TP=1 on both sides) the target keeps `transfer_id` as is; otherwise each piece's id
    names its decode rank and first head, so receivers sharing a registry never collide."""
    pieces = plan_kv_pieces(num_kv_heads, prefill_tp, len(addresses))
    targets = tuple(
        KVTarget(p.decode_rank, addresses[p.decode_rank],
                 transfer_id if len(pieces) == 1 else f"{transfer_id}@d{p.decode_rank}h{p.start}", p.start, p.end)
        for p in pieces
    )
    return KVDestination(transport, first_block_index, num_blocks, lease_seconds, targets)
