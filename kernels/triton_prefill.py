"""Causal prefill attention over the paged KV cache, for a varlen batch of prompt chunks (Triton).

Sequence b's n new tokens are rows query_start_loc[b]:query_start_loc[b+1] of q; its context holds
seq_lens[b] tokens, the new ones included (the cache write runs first), so new token j sits at
position seq_lens[b] - n + j. A fresh prompt, a prompt whose prefix was already cached, and a later
chunk of a chunked prefill are therefore one code path: every key comes from the cache.

One program = (sequence, BLOCK_M new tokens, query head); a flash-attention loop over BLOCK_N-key
tiles with an online softmax. Key tiles that every row of the query tile may see run without the
causal mask; only the few tiles on the diagonal pay for it.

Reference: kernels.reference.prefill_attention (same signature but the keyword options).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels import triton_utils as tu


@triton.jit
def _attend_tiles(
    acc, l_sum, m, q,  # running state [BLOCK_M, BLOCK_D], [BLOCK_M], [BLOCK_M]; q [BLOCK_M, BLOCK_D]
    table, k_cache_ptr, v_cache_ptr,
    stride_kb, stride_kt, stride_vb, stride_vt,
    kv_head_k, kv_head_v,  # head offsets (head * head stride) into the K and V rows
    block_size, scale_log2,
    key_start, key_end,
    q_pos,  # [BLOCK_M] positions of the query rows (causal bound)
    seq_len,
    MASKED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PRECISION: tl.constexpr,
):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    for tile_start in range(key_start, key_end, BLOCK_N):
        keys = tile_start + offs_n  # [BLOCK_N]
        if MASKED:
            in_seq = keys < seq_len
        else:
            in_seq = keys >= 0  # all true: these tiles lie wholly inside the context
        blocks = tl.load(table + keys // block_size, mask=in_seq, other=0).to(tl.int64)
        within = keys % block_size
        kv_mask = in_seq[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + (blocks * stride_kb + within * stride_kt + kv_head_k)[:, None] + offs_d[None, :],
                    mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # [BLOCK_M, BLOCK_N]
        if MASKED:
            visible = (keys[None, :] <= q_pos[:, None]) & in_seq[None, :]
            s = tl.where(visible, s, float("-inf"))
        # Each row saw key 0 in the first tile, so m stays finite even on rows this tile hides.
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_sum = l_sum * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + (blocks * stride_vb + within * stride_vt + kv_head_v)[:, None] + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
    return acc, l_sum, m


@triton.jit
def _prefill_kernel(
    q_ptr,  # [T, Hq, D]
    k_cache_ptr,  # [N, bs, Hkv, D]
    v_cache_ptr,
    block_tables_ptr,  # [B, max_blocks]
    seq_lens_ptr,  # [B]
    query_start_ptr,  # [B+1]
    out_ptr,  # [T, Hq, D]
    scale_log2,
    stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_bt,
    stride_ot, stride_oh,
    block_size,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    m_start = tl.program_id(1) * BLOCK_M
    head = tl.program_id(2)
    q_begin = tl.load(query_start_ptr + seq).to(tl.int32)
    num_new = tl.load(query_start_ptr + seq + 1).to(tl.int32) - q_begin
    if m_start < num_new:  # the grid is sized for the longest chunk
        seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
        num_cached = seq_len - num_new
        rows = m_start + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        row_mask = rows < num_new
        io_mask = row_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
        tok = (q_begin + rows).to(tl.int64)
        q = tl.load(q_ptr + tok[:, None] * stride_qt + head * stride_qh + offs_d[None, :], mask=io_mask, other=0.0)
        q_pos = num_cached + rows

        kv_head = head // GROUP
        table = block_tables_ptr + seq.to(tl.int64) * stride_bt
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_sum = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        # Keys 0 .. num_cached + m_start are visible to every row of this tile; stop at a tile edge.
        unmasked_end = (num_cached + m_start + 1) // BLOCK_N * BLOCK_N
        # The tile's last row sees up to num_cached + m_start + BLOCK_M - 1, the context ends at seq_len.
        masked_end = tl.minimum(seq_len, num_cached + m_start + BLOCK_M)
        acc, l_sum, m = _attend_tiles(
            acc, l_sum, m, q, table, k_cache_ptr, v_cache_ptr, stride_kb, stride_kt, stride_vb, stride_vt,
            kv_head * stride_kh, kv_head * stride_vh, block_size, scale_log2, 0, unmasked_end, q_pos, seq_len,
            False, BLOCK_N, BLOCK_D, HEAD_DIM, PRECISION)
        acc, l_sum, m = _attend_tiles(
            acc, l_sum, m, q, table, k_cache_ptr, v_cache_ptr, stride_kb, stride_kt, stride_vb, stride_vt,
            kv_head * stride_kh, kv_head * stride_vh, block_size, scale_log2, unmasked_end, masked_end, q_pos,
            seq_len, True, BLOCK_N, BLOCK_D, HEAD_DIM, PRECISION)
        out = acc / l_sum[:, None]
        tl.store(out_ptr + tok[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=io_mask)


@dataclass(frozen=True)
class PrefillTiles:
    """Launch shape: query rows and keys per tile, warps, pipeline stages (kernels.sweep times options)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {value}")


def default_prefill_tiles(head_dim: int) -> PrefillTiles:
    if tu.is_interpreter():
        return PrefillTiles(16, 16, 4, 1)
    if head_dim <= 128:
        return PrefillTiles(128, 128, 8, 2)  # fastest or within 5 % on an H200 (python -m kernels.sweep)
    return PrefillTiles(64, 32, 4, 2)


def prefill_attention(
    q: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [N, bs, Hkv, D], already holding the new tokens' K
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks]
    seq_lens: torch.Tensor,  # [B] context length after this step
    query_start_loc: torch.Tensor,  # [B+1] prefix sums of the new-token counts, on q's device
    scale: float,
    *,
    max_query_len: int | None = None,  # host-side max new tokens per sequence, saves a device sync
    out: torch.Tensor | None = None,  # [T, Hq, D] to write into (may be a strided view)
    tiles: PrefillTiles | None = None,  # None = default_prefill_tiles(head_dim)
) -> torch.Tensor:  # [T, Hq, D], q's dtype
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    tu.check_head_dim(head_dim)
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    q, k_cache, v_cache = (tu.last_dim_contiguous(t) for t in (q, k_cache, v_cache))
    if out is None:
        out = torch.empty_like(q)
    if out.stride(-1) != 1:
        raise ValueError("out must have a unit-stride last axis")
    num_seqs = query_start_loc.shape[0] - 1
    if num_tokens == 0 or num_seqs == 0:
        return out
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    tiles = tiles or default_prefill_tiles(head_dim)
    grid = (num_seqs, triton.cdiv(max_query_len, tiles.block_m), num_heads)
    _prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, out,
        scale * tu.LOG2E,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        block_size,
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
        BLOCK_D=tu.next_pow2(head_dim), PRECISION=tu.dot_precision(q.dtype),
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return out
