"""Paged decode attention in Triton: one query token per sequence, read straight from the KV blocks.

One program = (sequence, KV head, split). The G = Hq / Hkv query heads that share a KV head are
scored together as the rows of one [G, D] x [D, BLOCK_N] dot, so each K/V tile is loaded once for
the whole group (decode is bound by exactly that traffic). Tiles span BLOCK_N tokens across block
boundaries: each token's block comes from the block table, so any block size works.

Split-K (flash-decoding): with few sequences and long contexts, (sequence, KV head) pairs alone
do not fill the GPU, so each context is cut into `num_splits` ranges that run as separate
programs. Each writes its unnormalised-softmax partial result and log-sum-exp; a second kernel
merges them. num_splits=1 skips the merge and writes the output directly.

Reference: kernels.reference.paged_decode_attention (same signature but the keyword options).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import triton_utils as tu


@triton.jit
def _decode_kernel(
    q_ptr,  # [B, Hq, D]
    k_cache_ptr,  # [N, bs, Hkv, D]
    v_cache_ptr,
    block_tables_ptr,  # [B, max_blocks]
    seq_lens_ptr,  # [B]
    out_ptr,  # [B, Hq, D] when NUM_SPLITS == 1, else float32 partials [B, Hq, S, D]
    lse_ptr,  # float32 [B, Hq, S] (split only), base-2 log-sum-exp of each split
    scale_log2,  # softmax scale * log2(e)
    stride_qb, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_bt,
    stride_ob, stride_oh,
    block_size,
    GROUP: tl.constexpr,  # query heads per KV head
    HEAD_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr,  # GROUP padded to a power of two >= 16 (the smallest dot)
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    # Splits own whole tiles so only the last tile of a sequence is ragged.
    tiles_per_split = tl.cdiv(tl.cdiv(seq_len, BLOCK_N), NUM_SPLITS)
    start = split * tiles_per_split * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, seq_len)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    heads = kv_head * GROUP + offs_g  # [BLOCK_G] query heads of this KV head
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    q = tl.load(q_ptr + seq.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_G, BLOCK_D]

    m = tl.full([BLOCK_G], float("-inf"), tl.float32)  # running max (base-2 logits)
    l_sum = tl.zeros([BLOCK_G], tl.float32)  # running sum of exp2(logit - m)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for tile_start in range(start, end, BLOCK_N):
        toks = tile_start + offs_n  # [BLOCK_N]
        valid = toks < end
        # Masked: past the end the table holds padding (or nothing at all).
        blocks = tl.load(table + toks // block_size, mask=valid, other=0).to(tl.int64)
        within = toks % block_size
        k_rows = k_cache_ptr + blocks * stride_kb + within * stride_kt + kv_head * stride_kh
        v_rows = v_cache_ptr + blocks * stride_vb + within * stride_vt + kv_head * stride_vh
        kv_mask = valid[:, None] & d_mask[None, :]
        k = tl.load(k_rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # [BLOCK_G, BLOCK_N]
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))  # finite: every tile has >= 1 valid token
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_sum = l_sum * alpha + tl.sum(p, 1)
        v = tl.load(v_rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new

    store_mask = g_mask[:, None] & d_mask[None, :]
    if NUM_SPLITS == 1:
        out = acc / l_sum[:, None]
        tl.store(out_ptr + seq.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=store_mask)
    else:
        # An empty split (context shorter than the split grid) stores lse = -inf and zeros, which
        # the merge weighs by exp2(-inf) = 0.
        safe_l = tl.where(l_sum > 0, l_sum, 1.0)
        row = (seq * (GROUP * tl.num_programs(1)) + heads).to(tl.int64) * NUM_SPLITS + split  # [BLOCK_G]
        tl.store(out_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], acc / safe_l[:, None], mask=store_mask)
        tl.store(lse_ptr + row, tl.where(l_sum > 0, m + tl.log2(safe_l), float("-inf")), mask=g_mask)


@triton.jit
def _merge_kernel(
    partial_ptr,  # float32 [B, Hq, S, D]
    lse_ptr,  # float32 [B, Hq, S]
    out_ptr,  # [B, Hq, D]
    stride_ob, stride_oh,
    num_heads,
    HEAD_DIM: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < NUM_SPLITS
    d_mask = offs_d < HEAD_DIM
    row = (seq * num_heads + head).to(tl.int64) * NUM_SPLITS + offs_s  # [BLOCK_S]
    lse = tl.load(lse_ptr + row, mask=s_mask, other=float("-inf"))
    weight = tl.exp2(lse - tl.max(lse, 0))  # split 0 is never empty, so the max is finite
    part = tl.load(partial_ptr + row[:, None] * HEAD_DIM + offs_d[None, :],
                   mask=s_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_S, BLOCK_D]
    out = tl.sum(part * weight[:, None], 0) / tl.sum(weight, 0)
    tl.store(out_ptr + seq.to(tl.int64) * stride_ob + head * stride_oh + offs_d,
             out.to(out_ptr.dtype.element_ty), mask=d_mask)


MIN_TOKENS_PER_SPLIT = 256  # below this a split's fixed cost (partials, merge) outweighs its parallelism
MAX_SPLITS = 32


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, device: torch.device) -> int:
    """Enough splits for ~4 programs per SM, no more than long contexts can fill."""
    programs = num_seqs * num_kv_heads
    wanted = triton.cdiv(4 * tu.device_sms(device), programs)
    return max(1, min(wanted, max_seq_len // MIN_TOKENS_PER_SPLIT, MAX_SPLITS))


def paged_decode_attention(
    q: torch.Tensor,  # [B, Hq, D]
    k_cache: torch.Tensor,  # [N, bs, Hkv, D]
    v_cache: torch.Tensor,  # [N, bs, Hkv, D]
    block_tables: torch.Tensor,  # [B, max_blocks] int32/int64
    seq_lens: torch.Tensor,  # [B] int32/int64, each >= 1
    scale: float,
    *,
    num_splits: int | None = None,  # None: choose from the shape (needs max_seq_len or one sync)
    max_seq_len: int | None = None,  # host-side max(seq_lens), saves a device sync
    out: torch.Tensor | None = None,  # [B, Hq, D] to write into (may be a strided view)
) -> torch.Tensor:  # [B, Hq, D], q's dtype
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    tu.check_head_dim(head_dim)
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    q, k_cache, v_cache = (tu.last_dim_contiguous(t) for t in (q, k_cache, v_cache))
    if out is None:
        out = torch.empty_like(q)
    if out.stride(-1) != 1:
        raise ValueError("out must have a unit-stride last axis")
    if num_seqs == 0:
        return out
    if num_splits is None:
        if max_seq_len is None:
            max_seq_len = int(seq_lens.max())
        num_splits = choose_num_splits(num_seqs, num_kv_heads, max_seq_len, q.device)
    group = num_heads // num_kv_heads
    block_d = tu.next_pow2(head_dim)
    block_n = 16 if tu.is_interpreter() else 64
    grid = (num_seqs, num_kv_heads, num_splits)
    if num_splits == 1:
        target, lse = out, out  # lse is unused without splits
    else:
        target = torch.empty(num_seqs, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
        lse = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=q.device)
    _decode_kernel[grid](
        q, k_cache, v_cache, block_tables, seq_lens, target, lse,
        scale * tu.LOG2E,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        block_size,
        GROUP=group, HEAD_DIM=head_dim, BLOCK_G=max(16, tu.next_pow2(group)), BLOCK_D=block_d,
        BLOCK_N=block_n, NUM_SPLITS=num_splits, PRECISION=tu.dot_precision(q.dtype),
        num_warps=4,
    )
    if num_splits > 1:
        _merge_kernel[(num_seqs, num_heads)](
            target, lse, out, out.stride(0), out.stride(1), num_heads,
            HEAD_DIM=head_dim, NUM_SPLITS=num_splits, BLOCK_S=tu.next_pow2(num_splits), BLOCK_D=block_d,
            num_warps=4,
        )
    return out
