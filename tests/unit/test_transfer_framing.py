"""The dist framing (SlotPlan), the checksum's definition, and chunks landing in the cache as they arrive."""

from __future__ import annotations

import pytest
import torch

from cluster.transfer import KVPoll, TransferSpec
from cluster.transfer.codec import checksum, pack_layer, spec_fingerprint
from cluster.transfer.pair_group import HEADER_BYTES, KIND_DATA, Header, SlotPlan
from cluster.transfer.receiver_core import ReceiverCore

MASK = (1 << 64) - 1


def reference_checksum(data: bytes) -> int:
    """The documented definition, word by word: 64-word rows, sum((2r+1) * S_r) + nbytes * K mod 2^64."""
    padded = data + bytes(-len(data) % 8)
    words = [int.from_bytes(padded[i:i + 8], "little") for i in range(0, len(padded), 8)]
    total = sum((2 * (i // 64) + 1) * w for i, w in enumerate(words))
    return (total + len(data) * 0x9E3779B97F4A7C15) & MASK


@pytest.mark.parametrize("nbytes", [0, 5, 8, 512, 520, 4096 + 8, 3 * 4096 + 8 * 11 + 3, 40_000])
def test_checksum_is_the_row_weighted_sum_on_every_path(nbytes):
    data = torch.randint(0, 256, (nbytes + 3,), dtype=torch.uint8, generator=torch.Generator().manual_seed(nbytes))
    payload = data[3:]  # misaligned on purpose
    expected = reference_checksum(payload.numpy().tobytes())
    assert checksum(payload) == expected
    assert checksum(payload.clone()) == expected
    assert checksum(payload.numpy().tobytes()) == expected  # protobuf's read-only bytes
    assert checksum(memoryview(bytearray(payload.numpy().tobytes()))) == expected


def test_checksum_catches_swapped_words_and_single_bit_flips():
    data = torch.randint(0, 256, (8 * 4096,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    base = checksum(data)
    words = data.clone().view(torch.int64)
    words[[10, 3000]] = words[[3000, 10]]  # two words of different 512-byte rows swap places
    assert checksum(words.view(torch.uint8)) != base
    rows = data.clone().view(torch.int64).view(-1, 64)
    rows[[3, 4]] = rows[[4, 3]]  # two adjacent rows swap places
    assert checksum(rows.view(torch.uint8).view(-1)) != base
    assert checksum(data[:-8]) != base  # a lost word
    for pos in (0, 4095, 8 * 4096 - 1):
        flipped = data.clone()
        flipped[pos] ^= 0x80
        assert checksum(flipped) != base


def spec_for(num_blocks: int = 10, **kw) -> TransferSpec:
    base = dict(transfer_id="plan", num_layers=3, block_size=4, num_kv_heads=2, head_dim=8, dtype="float32",
                num_blocks=num_blocks)
    return TransferSpec(**{**base, **kw})  # 256-byte blocks


def test_slot_plan_covers_each_layer_with_whole_blocks_in_order():
    spec = spec_for(num_blocks=10)  # a packed layer: 10 K blocks, then 10 V blocks, 256 bytes each
    plan = SlotPlan(spec, chunk_bytes=3 * 256, posted_bytes=4 * (HEADER_BYTES + 3 * 256))
    assert [c.pieces for c in plan.chunks] == [
        ((0, 0, 3),), ((0, 3, 3),), ((0, 6, 3),), ((0, 9, 1), (1, 0, 2)), ((1, 2, 3),), ((1, 5, 3),), ((1, 8, 2),)]
    offset = 0
    for chunk in plan.chunks:  # contiguous, in the packed layer's order, each message on a cache line
        assert chunk.offset == offset and chunk.nbytes == sum(n for _, _, n in chunk.pieces) * 256
        assert chunk.start % 64 == 0
        offset += chunk.nbytes
    assert offset == spec.layer_nbytes
    assert plan.layer_buffer_nbytes >= plan.chunks[-1].start + HEADER_BYTES + plan.chunks[-1].nbytes
    assert plan.final_slot == 3 * 7 and plan.slot_nbytes(plan.final_slot) == HEADER_BYTES
    assert plan.chunk(7 + 6) == (1, plan.chunks[6]) and plan.slot_nbytes(7 + 6) == HEADER_BYTES + 2 * 256
    assert plan.depth == 4
    assert list(plan.posted_after_abort(5)) == [6, 7, 8]  # the depth - 1 slots still posted
    assert list(plan.posted_after_abort(0)) == [1]  # before any chunk landed only two slots are posted
    assert list(plan.posted_after_abort(plan.final_slot - 1)) == [plan.final_slot]


def test_slot_plan_chunks_are_as_even_as_whole_blocks_allow():
    sizes = [c.nbytes for c in SlotPlan(spec_for(num_blocks=10), chunk_bytes=8 * 256).chunks]
    assert sizes == [7 * 256, 7 * 256, 6 * 256]  # not 8, 8, 4
    whole = SlotPlan(spec_for(num_blocks=10), chunk_bytes=1 << 30)
    assert [c.pieces for c in whole.chunks] == [((0, 0, 10), (1, 0, 10))]  # one message per layer


def test_slot_plan_posts_everything_for_a_small_transfer_and_at_least_two_slots():
    assert SlotPlan(spec_for(num_blocks=2)).depth == SlotPlan(spec_for(num_blocks=2)).final_slot + 1
    assert SlotPlan(spec_for(num_blocks=10), chunk_bytes=256, posted_bytes=1).depth == 2


def test_header_carries_the_offset_and_survives_a_write_read():
    message = torch.zeros(HEADER_BYTES + 16, dtype=torch.uint8)
    header = Header(KIND_DATA, layer_idx=2, nbytes=16, checksum=MASK, fingerprint=77, offset=4096)
    header.write_into(message)
    assert Header.read_from(message) == header == Header.decode(header.encode())
    message[HEADER_BYTES - 9] ^= 1  # a flipped bit in the header itself
    with pytest.raises(Exception, match="corrupt"):
        Header.read_from(message)


def _layer(spec: TransferSpec, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    k, v = torch.randn(spec.page_shape, generator=gen), torch.randn(spec.page_shape, generator=gen)
    return k, v, pack_layer(k, v)


@pytest.mark.parametrize("cuts", [[0, 3, 10, 17, 20], [0, 20], [0, 7, 13, 20]], ids=["K|K+V|V", "whole", "mixed"])
def test_chunks_of_whole_blocks_land_as_they_arrive(cuts):
    """Cuts in blocks of the packed layer (10 K blocks, then 10 V blocks); a chunk may span K and V."""
    spec = spec_for(num_blocks=10, num_layers=1, kv_head_start=1, kv_head_end=3)
    k, v, payload = _layer(spec, seed=len(cuts))
    k_cache, v_cache = torch.zeros(16, 4, 4, 8), torch.zeros(16, 4, 4, 8)
    dest = [15, 0, 7, 3, 12, 1, 9, 4, 11, 2]
    core = ReceiverCore(spec, [k_cache], [v_cache], dest)
    fp = spec_fingerprint(spec)
    for a, b in zip(cuts, cuts[1:], strict=False):
        data = payload[a * 256:b * 256]
        assert core.on_data(0, a * 256, data, checksum(data), fp)
        last_block = b if b <= 10 else 10
        assert torch.equal(k_cache[dest[:last_block]][:, :, 1:3], k[:last_block])  # landed already
    assert torch.equal(v_cache[dest][:, :, 1:3], v)
    assert k_cache[:, :, [0, 3]].eq(0).all() and k_cache[[5, 6, 8, 10, 13, 14]].eq(0).all()


def test_a_chunk_cut_inside_a_page_is_staged_until_the_layer_is_complete():
    spec = spec_for(num_blocks=10, num_layers=1)
    k, v, payload = _layer(spec, seed=9)
    k_cache, v_cache = torch.zeros(10, 4, 2, 8), torch.zeros(10, 4, 2, 8)
    dest = list(range(9, -1, -1))
    core = ReceiverCore(spec, [k_cache], [v_cache], dest)
    fp = spec_fingerprint(spec)
    cuts = [0, 512, 1000, 3000, spec.layer_nbytes]  # whole blocks first, then a cut inside block 3
    for i, (a, b) in enumerate(zip(cuts, cuts[1:], strict=False)):
        data = payload[a:b] if i % 2 == 0 else payload[a:b].numpy().tobytes()
        assert core.on_data(0, a, data, checksum(data), fp)
        if b == 1000:
            assert torch.equal(k_cache[dest[:2]], k[:2]) and k_cache[dest[2]].eq(0).all()
    assert core.on_final(5, 1, core_digest(spec, payload, cuts), fp) and core.poll() == KVPoll.DONE
    assert torch.equal(k_cache[dest], k) and torch.equal(v_cache[dest], v)


def core_digest(spec: TransferSpec, payload: torch.Tensor, cuts: list[int]) -> int:
    from cluster.transfer.codec import TransferDigest

    digest = TransferDigest()
    for a, b in zip(cuts, cuts[1:], strict=False):
        digest.add(0, a, b - a, checksum(payload[a:b]))
    return digest.value()
