"""The fused gather/scatter + checksum kernels (kernels/csrc/kv_block_copy.cpp, via host_copy.py) against
torch's index ops and codec.checksum, and the receiver's fused path end to end."""

from __future__ import annotations

import pytest
import torch

from cluster.transfer import KVPoll, TransferSpec, host_copy
from cluster.transfer.codec import ROW_BYTES, TransferDigest, checksum, pack_layer, spec_fingerprint
from cluster.transfer.receiver_core import ReceiverCore


@pytest.fixture(scope="module", autouse=True)
def kernels_loaded():
    assert host_copy.available(), "the CPU kernels must build on the CI machine"


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_equals_index_select_and_its_checksum_equals_codec(dtype):
    cache = torch.randn(40, 16, 2, 64).to(dtype)  # blocks of 4 or 2 KiB: whole 512-byte rows
    rows = host_copy.block_rows(cache)
    assert rows is not None and rows.shape == (40, cache[0].numel() * cache.element_size())
    ids = torch.randperm(40)[:11]
    out = torch.empty(11 * rows.shape[1], dtype=torch.uint8)
    # two pieces, as a chunk holding the last K blocks and the first V blocks: rows numbered on
    first = host_copy.gather_checksummed(rows, ids[:4], out[:4 * rows.shape[1]], 0)
    second = host_copy.gather_checksummed(rows, ids[4:], out[4 * rows.shape[1]:], 4 * rows.shape[1] // ROW_BYTES)
    assert raw(out) == raw(torch.index_select(cache, 0, ids))
    assert host_copy.message_checksum(first + second, out.numel()) == checksum(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scatter_writes_only_its_blocks_and_checksums_what_it_wrote(dtype):
    pages = torch.randn(5, 16, 2, 64).to(dtype)
    data = pages.view(-1).view(torch.uint8).clone()
    cache = torch.zeros(12, 16, 2, 64, dtype=dtype)
    ids = torch.tensor([9, 0, 4, 11, 2])
    value = host_copy.scatter_checksummed(data, ids, host_copy.block_rows(cache), 0)
    assert host_copy.message_checksum(value, data.numel()) == checksum(data)
    assert raw(cache[ids]) == raw(pages)
    untouched = [i for i in range(12) if i not in ids.tolist()]
    assert cache[untouched].eq(0).all()


def test_layouts_the_kernels_cannot_take_fall_back():
    assert host_copy.block_rows(torch.zeros(8, 4, 2, 8)) is None  # 256-byte blocks: not whole rows
    assert host_copy.block_rows(torch.zeros(8, 16, 4, 64)[:, :, :2]) is None  # a head slice: not contiguous


def test_out_of_range_block_ids_raise_instead_of_writing():
    cache = torch.zeros(4, 16, 2, 64)
    data = torch.zeros(cache[0].numel() * 4, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="out of range"):
        host_copy.scatter_checksummed(data, torch.tensor([7]), host_copy.block_rows(cache), 0)
    with pytest.raises(RuntimeError, match="holds"):  # a message that is not exactly the blocks' bytes
        host_copy.scatter_checksummed(data, torch.tensor([1, 2]), host_copy.block_rows(cache), 0)


def layer_spec(**kw) -> TransferSpec:
    return TransferSpec("fused", num_layers=2, block_size=16, num_kv_heads=2, head_dim=64, dtype="float32",
                        num_blocks=3, **kw)


def test_receiver_lands_whole_block_chunks_bit_exact():
    spec = layer_spec()
    k_caches, v_caches = [torch.zeros(8, 16, 2, 64) for _ in range(2)], [torch.zeros(8, 16, 2, 64) for _ in range(2)]
    dest = [6, 1, 3]
    core = ReceiverCore(spec, k_caches, v_caches, dest)
    digest = TransferDigest()
    layers = [(torch.randn(spec.page_shape), torch.randn(spec.page_shape)) for _ in range(2)]
    for layer, (k, v) in enumerate(layers):
        payload = pack_layer(k, v)
        cut = spec.layer_nbytes // 2 + spec.layer_nbytes // 6  # K, then one V block: crosses the K/V boundary
        for offset, piece in ((0, payload[:cut]), (cut, payload[cut:])):
            value = checksum(piece)
            digest.add(layer, offset, piece.numel(), value)
            assert core.on_data(layer, offset, piece, value, spec_fingerprint(spec))
    assert core.on_final(5, 2, digest.value(), spec_fingerprint(spec))
    assert core.wait(1.0) == KVPoll.DONE
    for layer, (k, v) in enumerate(layers):
        assert raw(k_caches[layer][dest]) == raw(k) and raw(v_caches[layer][dest]) == raw(v)
        assert k_caches[layer][[0, 2, 4, 5, 7]].eq(0).all()


def test_receiver_fails_a_corrupt_chunk_it_already_scattered():
    spec = layer_spec()
    caches = [torch.zeros(8, 16, 2, 64) for _ in range(2)], [torch.zeros(8, 16, 2, 64) for _ in range(2)]
    core = ReceiverCore(spec, *caches, [6, 1, 3])
    payload = pack_layer(torch.randn(spec.page_shape), torch.randn(spec.page_shape))
    value = checksum(payload)
    payload[1000] ^= 0x10  # a bit flipped in flight
    assert not core.on_data(0, 0, payload, value, spec_fingerprint(spec))
    assert core.wait(1.0) == KVPoll.FAILED and "checksum mismatch" in core.error
    assert not core.on_data(1, 0, pack_layer(torch.ones(spec.page_shape), torch.ones(spec.page_shape)), 0,
                            spec_fingerprint(spec))  # over: nothing more is accepted
