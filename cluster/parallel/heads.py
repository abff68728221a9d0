"""Which KV heads each TP rank caches, and how a transfer between two TP sizes splits into pieces.

Rank r of a TP-`tp` replica caches a contiguous range of the model's KV heads (the same rule as
`QKVParallelLinear`): with at least as many KV heads as ranks, heads [r*h, (r+1)*h) with h = H/tp;
with fewer, each head is replicated on tp/H consecutive ranks and rank r holds head r // (tp/H).

A disaggregated transfer goes from a prefill replica (TP=p) to a decode replica (TP=d). Each decode
rank needs its range; each piece of it comes from one prefill rank. The pieces are the intersections
of the two partitions, e.g. H=4:

    p=1, d=2:  prefill [0,4)          ->  decode 0 gets [0,2), decode 1 gets [2,4): two pieces
    p=2, d=1:  prefill [0,2) | [2,4)  ->  decode 0 gets [0,2) and [2,4): two pieces, same blocks

A piece is sent by the lowest prefill rank whose range contains it (replicas would send duplicates).
"""

from __future__ import annotations

from dataclasses import dataclass


def kv_head_range(num_kv_heads: int, tp_size: int, rank: int) -> tuple[int, int]:
    """The global KV heads [start, end) that `rank` of a TP-`tp_size` replica caches."""
    if not 0 <= rank < tp_size:
        raise ValueError(f"rank must be in [0, {tp_size}), got {rank}")
    if num_kv_heads >= tp_size:
        if num_kv_heads % tp_size:
            raise ValueError(f"number of kv heads ({num_kv_heads}) is not divisible by the TP size ({tp_size})")
        per_rank = num_kv_heads // tp_size
        return rank * per_rank, (rank + 1) * per_rank
    if tp_size % num_kv_heads:
        raise ValueError(f"TP size ({tp_size}) is not a multiple of the number of kv heads ({num_kv_heads})")
    head = rank // (tp_size // num_kv_heads)
    return head, head + 1


def unique_ranges(num_kv_heads: int, tp_size: int) -> list[tuple[int, int]]:
    """The distinct head ranges of a replica's ranks, in rank order (replicas collapse into one)."""
    ranges: list[tuple[int, int]] = []
    for rank in range(tp_size):
        r = kv_head_range(num_kv_heads, tp_size, rank)
        if r not in ranges:
            ranges.append(r)
    return ranges


@dataclass(frozen=True)
class HeadPiece:
    """Global KV heads [start, end) that go to `decode_rank` in one message stream."""

    decode_rank: int
    start: int
    end: int


def plan_kv_pieces(num_kv_heads: int, prefill_tp: int, decode_tp: int) -> list[HeadPiece]:
    """Every decode rank's range, cut where the prefill ranks' ranges meet; decode-rank-major order."""
    prefill_ranges = unique_ranges(num_kv_heads, prefill_tp)
    pieces = []
    for decode_rank in range(decode_tp):
        start, end = kv_head_range(num_kv_heads, decode_tp, decode_rank)
        for p_start, p_end in prefill_ranges:
            lo, hi = max(start, p_start), min(end, p_end)
            if lo < hi:
                pieces.append(HeadPiece(decode_rank, lo, hi))
    return pieces


def sending_rank(start: int, end: int, num_kv_heads: int, tp_size: int) -> int:
    """The lowest rank of a TP-`tp_size` replica that caches all of heads [start, end).

    Raises ValueError when no single rank does: the decode side cut its pieces for another TP size."""
    for rank in range(tp_size):
        lo, hi = kv_head_range(num_kv_heads, tp_size, rank)
        if lo <= start and end <= hi:
            return rank
    raise ValueError(f"no rank of a TP={tp_size} replica holds all of kv heads [{start}, {end}): the decode "
                     "side must plan its receivers for this prefill TP size")
