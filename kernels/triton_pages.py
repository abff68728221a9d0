"""Page pack / unpack for KV transfer (Triton): a request's blocks <-> one contiguous buffer.

pack gathers blocks `block_ids` of layers `layer_range`, KV heads `head_range` (a TP rank's slice),
into buffer [L, 2 (k|v), nb, bs, H, D]; unpack scatters such a buffer into the receiver's caches at
its own block ids. The int8 variant quantises symmetrically with one float32 scale per
(layer, k|v, block, head) and halves the bytes of a 16-bit cache on the wire.

Each layer's cache is its own tensor, so there is one launch per layer; the transfer path ships a
layer at a time anyway (layer_range of length 1), overlapping the send with the next layer's compute.

Plain copy: one program per (block, BLOCK elements of that block's [bs, H*D] page), K and V
together. int8: one program per (block, head), two passes over the page's tokens (amax, then
quantise), so large block sizes never need the whole page in registers.

References: kernels.reference.pack_pages / unpack_pages / pack_pages_int8 / unpack_pages_int8.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import triton_utils as tu
from kernels.reference import QuantizedPages


@triton.jit
def _copy_pages_kernel(
    k_cache_ptr,  # [N, bs, Hkv, D]
    v_cache_ptr,
    block_ids_ptr,  # [nb]
    buf_ptr,  # this layer's [2, nb, bs, H, D]
    num_pages,
    head_start,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    BLOCK_SIZE: tl.constexpr,
    NUM_HEADS: tl.constexpr,  # H, the heads moved
    HEAD_DIM: tl.constexpr,
    BLOCK: tl.constexpr,
    UNPACK: tl.constexpr,
):
    page = tl.program_id(0).to(tl.int64)
    elems = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    page_elems: tl.constexpr = BLOCK_SIZE * NUM_HEADS * HEAD_DIM
    mask = elems < page_elems
    # Constant divisors: these compile to multiplies and shifts.
    tok = elems // (NUM_HEADS * HEAD_DIM)
    head = elems // HEAD_DIM % NUM_HEADS + head_start
    dim = elems % HEAD_DIM
    block = tl.load(block_ids_ptr + page).to(tl.int64)
    k_addr = k_cache_ptr + block * stride_kb + tok * stride_kt + head * stride_kh + dim
    v_addr = v_cache_ptr + block * stride_vb + tok * stride_vt + head * stride_vh + dim
    k_buf = buf_ptr + page * page_elems + elems
    v_buf = k_buf + num_pages * page_elems
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
        if k_caches[layer].stride(-1) != 1 or v_caches[layer].stride(-1) != 1:
            raise ValueError("KV caches must have a unit-stride head_dim axis")


def _copy_grid_args(cache: torch.Tensor, heads: range) -> tuple[int, int]:
    """(BLOCK, programs per page) for the plain copy."""
    page_elems = cache.shape[1] * len(heads) * cache.shape[3]
    block = min(tu.next_pow2(page_elems), 256 if tu.is_interpreter() else 2048)
    return block, triton.cdiv(page_elems, block)


def _launch_copy(buffer, k_caches, v_caches, layer_range, block_ids, heads, unpack: bool) -> None:
    _check_caches(k_caches, v_caches, layer_range)
    cache = k_caches[layer_range.start]
    block, chunks = _copy_grid_args(cache, heads)
    num_pages = block_ids.shape[0]
    if num_pages == 0:
        return
    for i, layer in enumerate(layer_range):
        k, v = k_caches[layer], v_caches[layer]
        _copy_pages_kernel[(num_pages, chunks)](
            k, v, block_ids, buffer[i], num_pages, heads.start,
            k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
            BLOCK_SIZE=cache.shape[1], NUM_HEADS=len(heads), HEAD_DIM=cache.shape[3], BLOCK=block,
            UNPACK=unpack, num_warps=4,
        )


def pack_pages(
    k_caches: list[torch.Tensor],  # per layer [N, bs, Hkv, D]
    v_caches: list[torch.Tensor],
    layer_range: range,
    block_ids: torch.Tensor,  # [nb] on the caches' device
    head_range: range | None = None,
    *,
    out: torch.Tensor | None = None,  # a contiguous buffer to fill, e.g. a registered send buffer
) -> torch.Tensor:  # [L, 2, nb, bs, H, D]
    cache = k_caches[layer_range.start]
    heads = _heads(head_range, cache)
    shape = (len(layer_range), 2, block_ids.shape[0], cache.shape[1], len(heads), cache.shape[3])
    buffer = torch.empty(shape, dtype=cache.dtype, device=cache.device) if out is None else out
    if tuple(buffer.shape) != shape or buffer.dtype != cache.dtype or not buffer.is_contiguous():
        raise ValueError(f"out must be a contiguous {cache.dtype} tensor of shape {shape}")
    _launch_copy(buffer, k_caches, v_caches, layer_range, block_ids, heads, unpack=False)
    return buffer


def unpack_pages(
    buffer: torch.Tensor,  # [L, 2, nb, bs, H, D]
    k_caches: list[torch.Tensor],
    v_caches: list[torch.Tensor],
    layer_range: range,
    block_ids: torch.Tensor,  # [nb] destination blocks
    head_range: range | None = None,
) -> None:
    heads = _heads(head_range, k_caches[layer_range.start])
    _check_buffer(buffer, k_caches[layer_range.start], layer_range, block_ids, heads)
    _launch_copy(buffer.contiguous(), k_caches, v_caches, layer_range, block_ids, heads, unpack=True)


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
) -> None:
    heads = _heads(head_range, k_caches[layer_range.start])
    _check_buffer(packed.data, k_caches[layer_range.start], layer_range, block_ids, heads)
    packed = QuantizedPages(packed.data.contiguous(), packed.scales.contiguous())
    _launch_int8(packed, k_caches, v_caches, layer_range, block_ids, heads, unpack=True)
