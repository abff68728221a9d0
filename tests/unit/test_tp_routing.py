"""KV-head routing between TP sizes, end to end over the local transport in one process.

Prefill "ranks" hold their slice of a known set of KV pages; decode "ranks" have caches sized for
their heads. Each side builds its senders/receivers from the same KVDestination, the pages move, and
every decode rank must end up with exactly its heads of the sent blocks.
"""

from __future__ import annotations

import itertools
import time

import pytest
import torch

from cluster.parallel.destination import KVDestination, plan_destination
from cluster.parallel.heads import kv_head_range, plan_kv_pieces, sending_rank
from cluster.parallel.routed import KVGeometry, make_rank_receiver, make_rank_sender
from cluster.transfer import KVPoll

LAYERS, BLOCK, DIM, CACHE_BLOCKS = 2, 4, 8, 8
PREFILL_BLOCKS = [0, 3, 1, 6]  # the request's block table on the prefill side
DECODE_BLOCKS = [5, 2, 7]  # reserved on the decode side for blocks 1.. (block 0 was a prefix-cache hit there)
_ids = itertools.count()


def test_head_ranges_and_pieces():
    assert [kv_head_range(4, 2, r) for r in range(2)] == [(0, 2), (2, 4)]
    assert [kv_head_range(2, 4, r) for r in range(4)] == [(0, 1), (0, 1), (1, 2), (1, 2)]  # replicated
    pieces = plan_kv_pieces(4, prefill_tp=2, decode_tp=1)
    assert [(p.decode_rank, p.start, p.end) for p in pieces] == [(0, 0, 2), (0, 2, 4)]
    pieces = plan_kv_pieces(4, prefill_tp=1, decode_tp=2)
    assert [(p.decode_rank, p.start, p.end) for p in pieces] == [(0, 0, 2), (1, 2, 4)]
    assert sending_rank(1, 2, 2, 4) == 2  # the first of the ranks that replicate head 1
    with pytest.raises(ValueError, match="no rank"):
        sending_rank(0, 4, 4, 2)
    with pytest.raises(ValueError, match="divisible"):
        kv_head_range(3, 2, 0)


def test_destination_round_trips_and_names_each_piece():
    dest = plan_destination("req", transport="grpc", addresses=["a:1", "b:2"], num_kv_heads=4, prefill_tp=4,
                            first_block_index=2, num_blocks=3, lease_seconds=5.0)
    assert KVDestination.from_dict(dest.to_dict()) == dest
    assert len({t.transfer_id for t in dest.targets}) == len(dest.targets) == 4
    assert dest.receiver_offsets() == {0: 0, 1: 2}
    single = plan_destination("req", transport="grpc", addresses=["a:1"], num_kv_heads=4, prefill_tp=1,
                              first_block_index=0, num_blocks=1, lease_seconds=5.0)
    assert [t.transfer_id for t in single.targets] == ["req"]  # TP=1 on both sides: the id as given


def _wait(receivers, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while any(r.poll() != KVPoll.DONE for r in receivers):
        assert all(r.poll() != KVPoll.FAILED for r in receivers), [e for r in receivers for e in
                                                                   (getattr(x, "error", None) for x in r.receivers)]
        assert time.monotonic() < deadline, "transfer did not finish"
        time.sleep(0.005)


@pytest.mark.parametrize(("heads", "prefill_tp", "decode_tp"), [
    (4, 1, 1), (4, 1, 2), (4, 2, 1), (4, 2, 2), (4, 4, 1), (4, 1, 4), (4, 2, 4), (4, 4, 2),
    (2, 4, 1), (2, 1, 4), (2, 4, 2),  # fewer kv heads than ranks: replicated heads
])
def test_every_decode_rank_gets_its_heads(heads, prefill_tp, decode_tp):
    gen = torch.Generator().manual_seed(heads * 100 + prefill_tp * 10 + decode_tp)
    full_k = [torch.randn(CACHE_BLOCKS, BLOCK, heads, DIM, generator=gen) for _ in range(LAYERS)]
    full_v = [torch.randn(CACHE_BLOCKS, BLOCK, heads, DIM, generator=gen) for _ in range(LAYERS)]
    dest = plan_destination(f"t{next(_ids)}", transport="local", addresses=[""] * decode_tp, num_kv_heads=heads,
                            prefill_tp=prefill_tp, first_block_index=1, num_blocks=len(DECODE_BLOCKS),
                            lease_seconds=10.0)

    def geometry(tp: int, rank: int) -> KVGeometry:
        return KVGeometry(LAYERS, BLOCK, DIM, "float32", heads, tp, rank)

    decode_caches, receivers = [], []
    for rank in range(decode_tp):
        lo, hi = kv_head_range(heads, decode_tp, rank)
        k = [torch.zeros(CACHE_BLOCKS, BLOCK, hi - lo, DIM) for _ in range(LAYERS)]
        v = [torch.zeros_like(c) for c in k]
        decode_caches.append((lo, hi, k, v))
        receivers.append(make_rank_receiver(dest, geometry(decode_tp, rank), k, v, DECODE_BLOCKS))
    sent = torch.tensor(PREFILL_BLOCKS[1:])
    senders = []
    for rank in range(prefill_tp):
        lo, hi = kv_head_range(heads, prefill_tp, rank)
        sender = make_rank_sender(dest, geometry(prefill_tp, rank))
        senders.append(sender)
        for layer in range(LAYERS):  # this rank's cache holds heads [lo, hi) only
            sender.send_layer(layer, full_k[layer][sent][:, :, lo:hi], full_v[layer][sent][:, :, lo:hi])
        sender.finish(123)
    assert sum(len(s.parts) for s in senders) == len(dest.targets)  # each piece sent exactly once
    _wait(receivers)
    dest_blocks = torch.tensor(DECODE_BLOCKS)
    for (lo, hi, k, v), receiver in zip(decode_caches, receivers, strict=True):
        assert receiver.first_token_id == 123
        for layer in range(LAYERS):
            torch.testing.assert_close(k[layer][dest_blocks], full_k[layer][sent][:, :, lo:hi], rtol=0, atol=0)
            torch.testing.assert_close(v[layer][dest_blocks], full_v[layer][sent][:, :, lo:hi], rtol=0, atol=0)
            assert not k[layer][[0, 1, 3, 4, 6]].any()  # nothing outside the reserved blocks
        receiver.close()
    for sender in senders:
        sender.close()


def test_a_destination_cut_for_a_smaller_prefill_tp_is_refused():
    dest = plan_destination("coarse", transport="local", addresses=[""], num_kv_heads=4, prefill_tp=1,
                            first_block_index=0, num_blocks=1, lease_seconds=1.0)
    with pytest.raises(ValueError, match="prefill TP size"):
        make_rank_sender(dest, KVGeometry(LAYERS, BLOCK, DIM, "float32", 4, tp_size=2, rank=0))
