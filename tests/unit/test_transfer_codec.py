"""Codec: one layer's pages to bytes and back (every dtype, KV-head slices), checksums, the dist header."""

from __future__ import annotations

import pytest
import torch

from cluster.transfer import KVPoll, TransferSpec, combine
from cluster.transfer.codec import (
    TransferDigest,
    as_bytes,
    checksum,
    pack_layer,
    scatter_layer,
    spec_fingerprint,
    unpack_layer,
)
from cluster.transfer.pair_group import KIND_DATA, Header
from cluster.transfer.receiver_core import ReceiverCore


def spec_for(dtype: str = "float32", **kw) -> TransferSpec:
    base = dict(transfer_id="t", num_layers=2, block_size=4, num_kv_heads=2, head_dim=8, dtype=dtype, num_blocks=3)
    return TransferSpec(**{**base, **kw})


def raw(t: torch.Tensor) -> bytes:
    """Exact bytes (bf16 included), so comparisons are bit-exact rather than numeric."""
    return t.contiguous().view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_pack_unpack_round_trip(dtype):
    spec = spec_for(dtype)
    k = torch.randn(spec.page_shape).to(spec.torch_dtype)
    v = torch.randn(spec.page_shape).to(spec.torch_dtype)
    payload = pack_layer(k, v)
    assert payload.dtype == torch.uint8 and payload.numel() == spec.layer_nbytes
    assert bytes(as_bytes(payload)) == raw(k) + raw(v)  # K then V, raw
    k2, v2 = unpack_layer(payload, spec)
    assert raw(k2) == raw(k) and raw(v2) == raw(v)


def test_pack_copies_so_the_source_may_change():
    k, v = torch.ones(3, 4, 2, 8), torch.zeros(3, 4, 2, 8)
    payload = pack_layer(k, v)
    k.fill_(5)
    assert unpack_layer(payload, spec_for())[0].eq(1).all()


def test_kv_head_slice_packs_and_lands_in_its_heads():
    # prefill holds 4 heads; this decode rank holds global heads 2..3 at local heads 0..1 of a 2-head cache
    # and the slice goes to a 3-head cache at heads 1..2 (a generic placement)
    spec = spec_for("bfloat16", num_kv_heads=2, kv_head_start=1)
    full_k = torch.randn(3, 4, 4, 8).bfloat16()
    full_v = torch.randn(3, 4, 4, 8).bfloat16()
    payload = pack_layer(full_k[:, :, 2:4], full_v[:, :, 2:4])  # non-contiguous slice
    k, v = unpack_layer(payload, spec)
    k_cache = torch.zeros(6, 4, 3, 8, dtype=torch.bfloat16)
    v_cache = torch.zeros_like(k_cache)
    dest = torch.tensor([4, 0, 2])
    scatter_layer(k_cache, v_cache, dest, k, v, kv_head_start=1)
    assert raw(k_cache[dest][:, :, 1:3]) == raw(full_k[:, :, 2:4])
    assert raw(v_cache[dest][:, :, 1:3]) == raw(full_v[:, :, 2:4])
    assert k_cache[:, :, 0].eq(0).all() and k_cache[[1, 3, 5]].eq(0).all()  # nothing else touched


def test_checksum_mismatch_fails_the_transfer_and_writes_nothing():
    spec = spec_for()
    caches = [torch.zeros(5, 4, 2, 8) for _ in range(2)], [torch.zeros(5, 4, 2, 8) for _ in range(2)]
    core = ReceiverCore(spec, *caches, [1, 2, 3])
    payload = pack_layer(torch.ones(spec.page_shape), torch.ones(spec.page_shape))
    crc = checksum(payload)
    payload[17] ^= 0x01  # one flipped bit in flight
    assert not core.on_data(0, 0, payload, crc, spec_fingerprint(spec))
    assert core.poll() == KVPoll.FAILED and "checksum" in core.error
    assert all(c.eq(0).all() for c in caches[0] + caches[1])


def test_spec_disagreement_is_detected():
    spec = spec_for()
    core = ReceiverCore(spec, [torch.zeros(5, 4, 2, 8)] * 2, [torch.zeros(5, 4, 2, 8)] * 2, [0, 1, 2])
    payload = pack_layer(torch.ones(spec.page_shape), torch.ones(spec.page_shape))
    other = spec_for(first_block_index=1)
    assert not core.on_data(0, 0, payload, checksum(payload), spec_fingerprint(other))
    assert "fingerprint" in core.error


def test_final_before_every_layer_or_with_a_wrong_digest_fails():
    spec = spec_for()
    fp = spec_fingerprint(spec)
    payload = pack_layer(torch.ones(spec.page_shape), torch.ones(spec.page_shape))
    crc = checksum(payload)
    digest = TransferDigest()
    for layer in range(2):
        digest.add(layer, 0, payload.numel(), crc)

    def fresh() -> ReceiverCore:
        return ReceiverCore(spec, [torch.zeros(5, 4, 2, 8) for _ in range(2)],
                            [torch.zeros(5, 4, 2, 8) for _ in range(2)], [0, 1, 2])

    core = fresh()
    assert core.on_data(0, 0, payload, crc, fp)
    assert not core.on_final(9, 2, digest.value(), fp) and "before layers [1]" in core.error
    core = fresh()
    assert core.on_data(0, 0, payload, crc, fp) and core.on_data(1, 0, payload, crc, fp)
    assert not core.on_final(9, 2, digest.value() ^ 1, fp) and "transfer checksum" in core.error
    core = fresh()
    assert core.on_data(0, 0, payload, crc, fp) and core.on_data(1, 0, payload, crc, fp)
    assert core.on_final(9, 2, digest.value(), fp) and core.poll() == KVPoll.DONE and core.first_token_id == 9


def test_digest_is_order_independent_but_content_sensitive():
    a, b = TransferDigest(), TransferDigest()
    a.add(0, 0, 10, 111)
    a.add(1, 0, 10, 222)
    b.add(1, 0, 10, 222)
    b.add(0, 0, 10, 111)
    assert a.value() == b.value()
    b.add(2, 0, 10, 333)
    assert a.value() != b.value()


def test_dist_header_round_trip_and_corruption():
    header = Header(KIND_DATA, layer_idx=3, nbytes=4096, checksum=0xFEEDFACEDEADBEEF, fingerprint=12345, first_token_id=0)
    encoded = header.encode()
    assert Header.decode(encoded) == header
    encoded[3] += 1
    with pytest.raises(Exception, match="corrupt"):
        Header.decode(encoded)


def test_combine_takes_the_least_advanced_rank():
    assert combine([KVPoll.DONE, KVPoll.TRANSFERRING]) == KVPoll.TRANSFERRING
    assert combine([KVPoll.DONE, KVPoll.FAILED, KVPoll.WAITING]) == KVPoll.FAILED
    assert combine([KVPoll.DONE, KVPoll.DONE]) == KVPoll.DONE


@pytest.mark.parametrize("bad", [dict(num_blocks=0), dict(dtype="int8"), dict(kv_head_end=5), dict(lease_seconds=0),
                                 dict(transfer_id="")])
def test_spec_validation(bad):
    with pytest.raises(ValueError):
        spec_for(**bad)


def test_receiver_rejects_caches_that_cannot_hold_the_spec():
    spec = spec_for()
    with pytest.raises(ValueError, match="destination blocks"):
        ReceiverCore(spec, [torch.zeros(5, 4, 2, 8)] * 2, [torch.zeros(5, 4, 2, 8)] * 2, [0, 1])
    with pytest.raises(ValueError, match="must be in"):
        ReceiverCore(spec, [torch.zeros(5, 4, 2, 8)] * 2, [torch.zeros(5, 4, 2, 8)] * 2, [0, 1, 5])
    with pytest.raises(ValueError, match="does not match"):
        ReceiverCore(spec, [torch.zeros(5, 4, 2, 8).half()] * 2, [torch.zeros(5, 4, 2, 8).half()] * 2, [0, 1, 2])
