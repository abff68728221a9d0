"""Triton page pack / unpack (plain and int8) in interpreter mode, against the torch references."""

from __future__ import annotations

import pytest
import torch

from kernels import reference
from kernels.reference import QuantizedPages
from kernels.triton_pages import pack_pages, pack_pages_int8, unpack_pages, unpack_pages_int8

NUM_LAYERS, NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM = 3, 9, 8, 4, 32
# How a cache's layers sit in memory: a tensor each (one launch per layer), views of one allocation
# (PagedKVCache's; one launch for all layers), and such views listed last layer first (negative stride).
LAYOUTS = ["tensor_per_layer", "one_allocation", "one_allocation_reversed"]


def caches(dtype: torch.dtype, fill: float | None = None,
           layout: str = "tensor_per_layer") -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    def make(*shape: int) -> torch.Tensor:
        return torch.randn(shape).to(dtype) if fill is None else torch.full(shape, fill, dtype=dtype)

    shape = (NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    if layout == "tensor_per_layer":
        return [make(*shape) for _ in range(NUM_LAYERS)], [make(*shape) for _ in range(NUM_LAYERS)]
    k, v = (list(make(NUM_LAYERS, *shape).unbind(0)) for _ in range(2))
    return (k[::-1], v[::-1]) if layout == "one_allocation_reversed" else (k, v)


# (layers, KV heads): all of them; two layers not starting at 0; one layer and a TP rank's head slice.
RANGES = [(range(0, 3), None), (range(1, 3), range(0, 2)), (range(1, 2), range(2, 4))]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layers,heads", RANGES)
def test_pack_unpack_match_reference(dtype, layers, heads, layout):
    k_src, v_src = caches(dtype, layout=layout)
    src_blocks = torch.randperm(NUM_BLOCKS)[:4]  # shuffled, non-contiguous
    ref = reference.pack_pages(k_src, v_src, layers, src_blocks, heads)
    buffer = torch.full_like(ref, float("nan"))
    pack_pages(k_src, v_src, layers, src_blocks, heads, out=buffer)
    assert torch.equal(buffer, ref)  # a copy: bit-exact

    dst_blocks = torch.randperm(NUM_BLOCKS)[:4]
    k_dst, v_dst = caches(dtype, fill=float("nan"), layout=layout)
    k_ref, v_ref = caches(dtype, fill=float("nan"))
    unpack_pages(buffer, k_dst, v_dst, layers, dst_blocks, heads)
    reference.unpack_pages(buffer, k_ref, v_ref, layers, dst_blocks, heads)
    for got, want in zip(k_dst + v_dst, k_ref + v_ref, strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0, equal_nan=True)  # untouched stays NaN
    # The round trip moved exactly the source pages.
    assert torch.equal(reference.pack_pages(k_dst, v_dst, layers, dst_blocks, heads), ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layers,heads", RANGES)
def test_int8_round_trip_error_bound(dtype, layers, heads):
    k_src, v_src = caches(dtype)
    k_src[layers.start][3] = 0  # an all-zero block: scale 0, decodes to exact zeros
    src_blocks = torch.tensor([3, 7, 1, 5])
    ref = reference.pack_pages_int8(k_src, v_src, layers, src_blocks, heads)
    packed = QuantizedPages(torch.full_like(ref.data, -128), torch.full_like(ref.scales, float("nan")))
    pack_pages_int8(k_src, v_src, layers, src_blocks, heads, out=packed)
    assert torch.isfinite(packed.scales).all() and packed.data.min() >= -127  # every element written
    torch.testing.assert_close(packed.scales, ref.scales, atol=0, rtol=0)
    # Same rounding rule; allow one step where float contraction tips a value sitting on .5.
    assert (packed.data.int() - ref.data.int()).abs().max() <= 1
    assert packed.scales[0, 0, 0].eq(0).all()

    # One byte per element (half a 16-bit cache) plus one float32 scale per (block, head): 4 bytes
    # per block_size * head_dim elements, 0.2 % at 16 x 128.
    plain = reference.pack_pages(k_src, v_src, layers, src_blocks, heads)
    assert packed.data.nbytes * plain.element_size() == plain.nbytes
    assert packed.nbytes == packed.data.nbytes + 4 * packed.data.numel() // (BLOCK_SIZE * HEAD_DIM)

    dst_blocks = torch.tensor([0, 8, 2, 6])
    k_dst, v_dst = caches(dtype, fill=float("nan"))
    unpack_pages_int8(packed, k_dst, v_dst, layers, dst_blocks, heads)
    original = reference.pack_pages(k_src, v_src, layers, src_blocks, heads).double()  # [L, 2, nb, bs, H, D]
    restored = reference.pack_pages(k_dst, v_dst, layers, dst_blocks, heads).double()
    # Bound, in float64: half a quantisation step per (block, head), plus the cast back to the cache dtype.
    step = packed.scales.double()[:, :, :, None, :, None]
    cast = original.abs() * (2.0**-11 if dtype == torch.float16 else 2.0**-24)
    assert ((restored - original).abs() <= step / 2 * (1 + 1e-6) + cast + 1e-12).all()
    # Unpacking dequantises like the reference.
    torch.testing.assert_close(restored, reference.dequantize_pages(packed, dtype).double(), atol=0, rtol=0)
    # Blocks that were not unpacked into stay untouched.
    others = [b for b in range(NUM_BLOCKS) if b not in dst_blocks.tolist()]
    assert k_dst[layers.start][others].isnan().all()


def test_rejects_bad_ranges_and_buffers():
    k_src, v_src = caches(torch.float32)
    blocks = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="head_range"):
        pack_pages(k_src, v_src, range(0, 1), blocks, range(3, 6))
    with pytest.raises(ValueError, match="out must be"):
        pack_pages(k_src, v_src, range(0, 1), blocks, out=torch.empty(1, 2, 3, BLOCK_SIZE, 4, HEAD_DIM))
    with pytest.raises(ValueError, match="buffer shape"):
        unpack_pages(torch.empty(2, 2, 2, BLOCK_SIZE, 4, HEAD_DIM), k_src, v_src, range(0, 1), blocks)
