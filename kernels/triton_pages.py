"""Page pack / unpack for KV transfer (Triton): a request's blocks <-> one contiguous buffer.

pack gathers blocks `block_ids` of layers `layer_range`, KV heads `head_range` (a TP rank's slice),
into buffer [L, 2 (k|v), nb, bs, H, D]; unpack scatters such a buffer into the receiver's caches at
its own block ids. The int8 variant quantises symmetrically with one float32 scale per
(layer, k|v, block, head) and halves the bytes of a 16-bit cache on the wire.

When the layers' caches are views of one allocation at a fixed stride (PagedKVCache's), one launch
covers every layer in the range; otherwise there is one launch per layer. The transfer path ships a
layer at a time (layer_range of length 1), overlapping the send with the next layer's compute.

Plain copy: a token's moved heads are one contiguous run of H*D elements in the cache (heads are a
contiguous slice) and in the buffer, so a program copies a [tokens, H*D] tile of one block with
unit-stride, vectorised loads, K and V together. int8: one program per (block, head), two passes
over the page's tokens (amax, then quantise), so large block sizes never need the whole page in
registers.

References: kernels.reference.pack_pages / unpack_pages / pack_pages_int8 / unpack_pages_int8.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels import triton_utils as tu
from kernels.reference import QuantizedPages


@triton.jit
def _copy_pages_kernel(
    k_cache_ptr,  # [N, bs, Hkv, D], each token's [Hkv, D] contiguous
    v_cache_ptr,
    block_ids_ptr,  # [nb]
    buf_ptr,  # [L, 2, nb, bs, H, D]
    num_pages,
    row_start,  # head_start * D: where the moved heads begin in a token's row
    stride_kl, stride_kb, stride_kt,  # stride_kl: from one layer's cache to the next's
    stride_vl, stride_vb, stride_vt,
    BLOCK_SIZE: tl.constexpr,
    ROW: tl.constexpr,  # H * D, the elements moved per token: one contiguous run in cache and buffer
    BLOCK_T: tl.constexpr,
    BLOCK_R: tl.constexpr,
    UNPACK: tl.constexpr,
):
    layer = tl.program_id(0).to(tl.int64) // num_pages
    page = tl.program_id(0).to(tl.int64) % num_pages
    k_cache_ptr += layer * stride_kl
    v_cache_ptr += layer * stride_vl
    buf_ptr += layer * (2 * num_pages * BLOCK_SIZE * ROW)
    tok = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)[:, None]  # [BLOCK_T, 1]
    col = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)[None, :]  # [1, BLOCK_R], unit stride
    mask = (tok < BLOCK_SIZE) & (col < ROW)
    block = tl.load(block_ids_ptr + page).to(tl.int64)
    k_addr = k_cache_ptr + block * stride_kb + row_start + tok * stride_kt + col
    v_addr = v_cache_ptr + block * stride_vb + row_start + tok * stride_vt + col
    k_buf = buf_ptr + page * (BLOCK_SIZE * ROW) + tok * ROW + col
    v_buf = k_buf + num_pages * (BLOCK_SIZE * ROW)
    if UNPACK:
        tl.store(k_addr, tl.load(k_buf, mask=mask).to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_addr, tl.load(v_buf, mask=mask).to(v_cache_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(k_buf, tl.load(k_addr, mask=mask), mask=mask)
        tl.store(v_buf, tl.load(v_addr, mask=mask), mask=mask)


@triton.jit
def _quantize_page(
    cache_ptr, stride_t, data_ptr, scale_ptr,  # cache_ptr: this (block, head)'s row 0; data_ptr likewise
    BLOCK_SIZE: tl.constexpr, NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    offs_t = tl.arange(0, BLOCK_T)[:, None]
    offs_d = tl.arange(0, BLOCK_D)[None, :]
    amax = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    for t0 in range(0, BLOCK_SIZE, BLOCK_T):
        mask = (t0 + offs_t < BLOCK_SIZE) & (offs_d < HEAD_DIM)
        x = tl.load(cache_ptr + (t0 + offs_t) * stride_t + offs_d, mask=mask, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    amax_all = tl.max(tl.max(amax, 1), 0)
    # Multiply by a correctly rounded 127 / amax like the reference, so both round identically
    # (`/` alone is an approximate division on GPUs); zeros get scale 0.
    safe = tl.where(amax_all > 0, amax_all, 1.0)
    inv = tl.where(amax_all > 0, tl.div_rn(tl.full([], 127.0, tl.float32), safe), 0.0)
    tl.store(scale_ptr, amax_all / 127.0)
    for t0 in range(0, BLOCK_SIZE, BLOCK_T):
        mask = (t0 + offs_t < BLOCK_SIZE) & (offs_d < HEAD_DIM)
        x = tl.load(cache_ptr + (t0 + offs_t) * stride_t + offs_d, mask=mask, other=0.0).to(tl.float32)
        qv = tl.minimum(tl.maximum(tl.floor(x * inv + 0.5), -127.0), 127.0)
        tl.store(data_ptr + (t0 + offs_t) * (NUM_HEADS * HEAD_DIM) + offs_d, qv.to(tl.int8), mask=mask)


@triton.jit
def _dequantize_page(
    cache_ptr, stride_t, data_ptr, scale_ptr,
    BLOCK_SIZE: tl.constexpr, NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    offs_t = tl.arange(0, BLOCK_T)[:, None]
    offs_d = tl.arange(0, BLOCK_D)[None, :]
    scale = tl.load(scale_ptr)
    for t0 in range(0, BLOCK_SIZE, BLOCK_T):
        mask = (t0 + offs_t < BLOCK_SIZE) & (offs_d < HEAD_DIM)
        qv = tl.load(data_ptr + (t0 + offs_t) * (NUM_HEADS * HEAD_DIM) + offs_d, mask=mask, other=0)
        x = qv.to(tl.float32) * scale
        tl.store(cache_ptr + (t0 + offs_t) * stride_t + offs_d, x.to(cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _int8_pages_kernel(
    k_cache_ptr, v_cache_ptr,
    block_ids_ptr,  # [nb]
    data_ptr,  # this layer's int8 [2, nb, bs, H, D]
    scales_ptr,  # this layer's float32 [2, nb, H]
    num_pages,
    head_start,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    BLOCK_SIZE: tl.constexpr, NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    UNPACK: tl.constexpr,
):
    page = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    block = tl.load(block_ids_ptr + page).to(tl.int64)
    k_row = k_cache_ptr + block * stride_kb + (head_start + head) * stride_kh
    v_row = v_cache_ptr + block * stride_vb + (head_start + head) * stride_vh
    page_elems: tl.constexpr = BLOCK_SIZE * NUM_HEADS * HEAD_DIM
    k_data = data_ptr + page * page_elems + head * HEAD_DIM
    v_data = k_data + num_pages * page_elems
    k_scale = scales_ptr + page * NUM_HEADS + head
    v_scale = k_scale + num_pages * NUM_HEADS
    if UNPACK:
        _dequantize_page(k_row, stride_kt, k_data, k_scale, BLOCK_SIZE, NUM_HEADS, HEAD_DIM, BLOCK_T, BLOCK_D)
        _dequantize_page(v_row, stride_vt, v_data, v_scale, BLOCK_SIZE, NUM_HEADS, HEAD_DIM, BLOCK_T, BLOCK_D)
    else:
        _quantize_page(k_row, stride_kt, k_data, k_scale, BLOCK_SIZE, NUM_HEADS, HEAD_DIM, BLOCK_T, BLOCK_D)
        _quantize_page(v_row, stride_vt, v_data, v_scale, BLOCK_SIZE, NUM_HEADS, HEAD_DIM, BLOCK_T, BLOCK_D)


def _heads(head_range: range | None, cache: torch.Tensor) -> range:
    heads = range(cache.shape[2]) if head_range is None else head_range
    if heads.step != 1 or not 0 <= heads.start < heads.stop <= cache.shape[2]:
        raise ValueError(f"head_range {heads} is not a contiguous slice of {cache.shape[2]} KV heads")
    return heads


def _check_caches(k_caches: list[torch.Tensor], v_caches: list[torch.Tensor], layer_range: range) -> None:
    for layer in layer_range:
        for cache in (k_caches[layer], v_caches[layer]):
            if cache.stride(-1) != 1 or cache.stride(-2) != cache.shape[-1]:
                raise ValueError("KV caches must hold each token's [heads, head_dim] contiguously")


@dataclass(frozen=True)
class CopyTile:
    """Launch shape of the plain copy: elements per program and warps (kernels.sweep times the options)."""

    elems: int
    num_warps: int

    def __post_init__(self) -> None:
        if self.elems < 16 or self.elems & (self.elems - 1):
            raise ValueError(f"elems must be a power of two >= 16, got {self.elems}")


def default_copy_tile() -> CopyTile:
    return CopyTile(256, 1) if tu.is_interpreter() else CopyTile(4096, 4)


def _launch_copy(buffer, k_caches, v_caches, layer_range, block_ids, heads, unpack: bool,
                 tile: CopyTile | None) -> None:
    _check_caches(k_caches, v_caches, layer_range)
    cache = k_caches[layer_range.start]
    num_pages = block_ids.shape[0]
    if num_pages == 0:
        return
    tile = tile or default_copy_tile()
    block_size, head_dim = cache.shape[1], cache.shape[3]
    row = len(heads) * head_dim
    block_r = min(tu.next_pow2(row), tile.elems)
    block_t = min(tu.next_pow2(block_size), max(1, tile.elems // block_r))
    # Python-side launch cost (~40 us on an H200) dwarfs a layer's copy: one launch covers every layer
    # when the caches are views of one allocation at a fixed layer stride (PagedKVCache's), else one each.
    k_stride, v_stride = _layer_stride(k_caches, layer_range), _layer_stride(v_caches, layer_range)
    if k_stride is not None and v_stride is not None:
        spans = [(layer_range, k_stride, v_stride)]
    else:
        spans = [(range(layer, layer + 1), 0, 0) for layer in layer_range]
    for span, k_stride, v_stride in spans:
        k, v = k_caches[span.start], v_caches[span.start]
        first = span.start - layer_range.start
        grid = (len(span) * num_pages, triton.cdiv(block_size, block_t), triton.cdiv(row, block_r))
        _copy_pages_kernel[grid](
            k, v, block_ids, buffer[first:], num_pages, heads.start * head_dim,
            k_stride, k.stride(0), k.stride(1), v_stride, v.stride(0), v.stride(1),
            BLOCK_SIZE=block_size, ROW=row, BLOCK_T=block_t, BLOCK_R=block_r, UNPACK=unpack,
            num_warps=tile.num_warps,
        )


def _layer_stride(caches: list[torch.Tensor], layer_range: range) -> int | None:
    """Elements from each layer's cache to the next's, when that is one constant; else None."""
    first = caches[layer_range.start]
    if len(layer_range) == 1:
        return 0
    step_bytes = caches[layer_range.start + 1].data_ptr() - first.data_ptr()
    if step_bytes == 0 or step_bytes % first.element_size():
        return None
    for i, layer in enumerate(layer_range):
        cache = caches[layer]
        if (cache.shape != first.shape or cache.stride() != first.stride() or cache.dtype != first.dtype
                or cache.device != first.device or cache.data_ptr() != first.data_ptr() + i * step_bytes):
            return None
    return step_bytes // first.element_size()


def pack_pages(
    k_caches: list[torch.Tensor],  # per layer [N, bs, Hkv, D]
    v_caches: list[torch.Tensor],
    layer_range: range,
    block_ids: torch.Tensor,  # [nb] on the caches' device
    head_range: range | None = None,
    *,
    out: torch.Tensor | None = None,  # a contiguous buffer to fill, e.g. a registered send buffer
    tile: CopyTile | None = None,  # launch shape; None = default_copy_tile()
) -> torch.Tensor:  # [L, 2, nb, bs, H, D]
    cache = k_caches[layer_range.start]
    heads = _heads(head_range, cache)
    shape = (len(layer_range), 2, block_ids.shape[0], cache.shape[1], len(heads), cache.shape[3])
    buffer = torch.empty(shape, dtype=cache.dtype, device=cache.device) if out is None else out
    if tuple(buffer.shape) != shape or buffer.dtype != cache.dtype or not buffer.is_contiguous():
        raise ValueError(f"out must be a contiguous {cache.dtype} tensor of shape {shape}")
    _launch_copy(buffer, k_caches, v_caches, layer_range, block_ids, heads, unpack=False, tile=tile)
    return buffer


def unpack_pages(
    buffer: torch.Tensor,  # [L, 2, nb, bs, H, D]
    k_caches: list[torch.Tensor],
    v_caches: list[torch.Tensor],
    layer_range: range,
    block_ids: torch.Tensor,  # [nb] destination blocks
    head_range: range | None = None,
    *,
    tile: CopyTile | None = None,  # launch shape; None = default_copy_tile()
) -> None:
    heads = _heads(head_range, k_caches[layer_range.start])
    _check_buffer(buffer, k_caches[layer_range.start], layer_range, block_ids, heads)
    _launch_copy(buffer.contiguous(), k_caches, v_caches, layer_range, block_ids, heads, unpack=True, tile=tile)


def _check_buffer(buffer: torch.Tensor, cache: torch.Tensor, layer_range: range, block_ids: torch.Tensor,
                  heads: range) -> None:
    expected = (len(layer_range), 2, block_ids.shape[0], cache.shape[1], len(heads), cache.shape[3])
    if tuple(buffer.shape) != expected:
        raise ValueError(f"buffer shape {tuple(buffer.shape)} != expected {expected}")


def _launch_int8(packed: QuantizedPages, k_caches, v_caches, layer_range, block_ids, heads, unpack: bool) -> None:
    _check_caches(k_caches, v_caches, layer_range)
    cache = k_caches[layer_range.start]
    num_pages = block_ids.shape[0]
    if num_pages == 0:
        return
    block_size, head_dim = cache.shape[1], cache.shape[3]
    block_t = min(tu.next_pow2(block_size), 16 if tu.is_interpreter() else 32)
    for i, layer in enumerate(layer_range):
        k, v = k_caches[layer], v_caches[layer]
        _int8_pages_kernel[(num_pages, len(heads))](
            k, v, block_ids, packed.data[i], packed.scales[i], num_pages, heads.start,
            k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
            BLOCK_SIZE=block_size, NUM_HEADS=len(heads), HEAD_DIM=head_dim,
            BLOCK_T=block_t, BLOCK_D=tu.next_pow2(head_dim), UNPACK=unpack, num_warps=4,
        )


def pack_pages_int8(
    k_caches: list[torch.Tensor],
    v_caches: list[torch.Tensor],
    layer_range: range,
    block_ids: torch.Tensor,
    head_range: range | None = None,
    *,
    out: QuantizedPages | None = None,  # contiguous buffers to fill
) -> QuantizedPages:  # data int8 [L, 2, nb, bs, H, D], scales float32 [L, 2, nb, H]
    cache = k_caches[layer_range.start]
    heads = _heads(head_range, cache)
    shape = (len(layer_range), 2, block_ids.shape[0], cache.shape[1], len(heads), cache.shape[3])
    if out is None:
        out = QuantizedPages(torch.empty(shape, dtype=torch.int8, device=cache.device),
                             torch.empty(shape[:3] + shape[4:5], dtype=torch.float32, device=cache.device))
    packed = out
    if (tuple(packed.data.shape) != shape or packed.data.dtype != torch.int8 or not packed.data.is_contiguous()
            or tuple(packed.scales.shape) != shape[:3] + shape[4:5] or packed.scales.dtype != torch.float32
            or not packed.scales.is_contiguous()):
        raise ValueError(f"out must be contiguous int8 {shape} data and float32 {shape[:3] + shape[4:5]} scales")
    _launch_int8(packed, k_caches, v_caches, layer_range, block_ids, heads, unpack=False)
    return packed


def unpack_pages_int8(
    packed: QuantizedPages,
    k_caches: list[torch.Tensor],
    v_caches: list[torch.Tensor],
    layer_range: range,
    block_ids: torch.Tensor,  # [nb] destination blocks
    head_range: range | None = None,
    *,
    tile: CopyTile | None = None,  # launch shape; None = default_copy_tile()
) -> None:
    heads = _heads(head_range, k_caches[layer_range.start])
    _check_buffer(packed.data, k_caches[layer_range.start], layer_range, block_ids, heads)
    packed = QuantizedPages(packed.data.contiguous(), packed.scales.contiguous())
    _launch_int8(packed, k_caches, v_caches, layer_range, block_ids, heads, unpack=True)
