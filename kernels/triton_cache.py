"""KV cache write in Triton: scatter one step's new K and V rows into their cache slots.

One program per token moves its [Hkv, D] K and V rows (contiguous in the cache) in one tile each.
A negative slot means "no slot" (padding) and is skipped, so callers can pad the token count.

Reference: kernels.reference.write_kv_cache (same signature).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import triton_utils as tu


@triton.jit
def _write_kernel(
    k_ptr,  # [T, Hkv, D]
    v_ptr,
    k_cache_ptr,  # [N, bs, Hkv, D]
    v_cache_ptr,
    slot_ptr,  # [T]
    stride_kt, stride_kh,
    stride_vt, stride_vh,
    stride_ckb, stride_ckt, stride_ckh,
    stride_cvb, stride_cvt, stride_cvh,
    block_size,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    if slot >= 0:
        block = slot // block_size
        within = slot % block_size
        offs_h = tl.arange(0, BLOCK_H)[:, None]
        offs_d = tl.arange(0, BLOCK_D)[None, :]
        mask = (offs_h < NUM_HEADS) & (offs_d < HEAD_DIM)
        k = tl.load(k_ptr + tok * stride_kt + offs_h * stride_kh + offs_d, mask=mask)
        v = tl.load(v_ptr + tok * stride_vt + offs_h * stride_vh + offs_d, mask=mask)
        tl.store(k_cache_ptr + block * stride_ckb + within * stride_ckt + offs_h * stride_ckh + offs_d,
                 k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + block * stride_cvb + within * stride_cvt + offs_h * stride_cvh + offs_d,
                 v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv_cache(
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [N, bs, Hkv, D], written in place
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T] slot of each token; negative = skip
) -> None:
    num_tokens, num_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("KV caches must have a unit-stride head_dim axis")
    k, v = tu.last_dim_contiguous(k), tu.last_dim_contiguous(v)
    _write_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1),
        v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        k_cache.shape[1],
        NUM_HEADS=num_heads, HEAD_DIM=head_dim,
        BLOCK_H=tu.next_pow2(num_heads), BLOCK_D=tu.next_pow2(head_dim),
        num_warps=4 if num_heads * head_dim >= 1024 else 1,
    )
