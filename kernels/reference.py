"""Torch references for the Triton kernels, one per kernel and with the same signature.

They are the specification: slow, loop-per-sequence, but obviously right. Attention references
compute in float32 (or float64 when handed float64 tensors, which is how the tests get their
float64 ground truth) and return the query's dtype. They import nothing from Triton, so the engine
and CPU users can call them anywhere.

KV cache layout, per layer: [num_blocks, block_size, num_kv_heads, head_dim];
a token's slot is block_id * block_size + offset.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _gather_context(cache: torch.Tensor, table: torch.Tensor, n: int) -> torch.Tensor:
    """The first n tokens of one sequence, [n, Hkv, D], read through its block table."""
    block_size = cache.shape[1]
    blocks = table[: (n + block_size - 1) // block_size]
    return cache[blocks].flatten(0, 1)[:n]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first_pos: int, scale: float) -> torch.Tensor:
    """q [n, Hq, D] at positions first_pos.., k/v [ctx, Hkv, D]: causal softmax attention, q's dtype."""
    dt = _compute_dtype(q)
    group = q.shape[1] // k.shape[1]
    k = k.to(dt).repeat_interleave(group, dim=1)  # [ctx, Hq, D]
    v = v.to(dt).repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.to(dt), k) * scale  # [Hq, n, ctx]
    rows = torch.arange(q.shape[0], device=q.device)[:, None] + first_pos
    scores = scores.masked_fill(torch.arange(k.shape[0], device=q.device)[None, :] > rows, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).to(q.dtype)


def paged_decode_attention(
    q: torch.Tensor,  # [B, Hq, D]
    k_cache: torch.Tensor,  # [N, bs, Hkv, D]
    v_cache: torch.Tensor,  # [N, bs, Hkv, D]
    block_tables: torch.Tensor,  # [B, max_blocks]
    seq_lens: torch.Tensor,  # [B]
    scale: float,
) -> torch.Tensor:  # [B, Hq, D], q's dtype
    """One query token per sequence attending to all seq_lens[b] cached tokens."""
    out = torch.empty_like(q)
    for b in range(q.shape[0]):
        n = int(seq_lens[b])
        k = _gather_context(k_cache, block_tables[b], n)
        v = _gather_context(v_cache, block_tables[b], n)
        out[b] = _attend(q[b : b + 1], k, v, n - 1, scale)[0]
    return out


def prefill_attention(
    q: torch.Tensor,  # [T, Hq, D] new tokens of B sequences, sequence by sequence
    k_cache: torch.Tensor,  # [N, bs, Hkv, D], already holding the new tokens' K
    v_cache: torch.Tensor,  # [N, bs, Hkv, D]
    block_tables: torch.Tensor,  # [B, max_blocks]
    seq_lens: torch.Tensor,  # [B] context length after this step (cached + new)
    query_start_loc: torch.Tensor,  # [B+1] prefix sums of the new-token counts
    scale: float,
) -> torch.Tensor:  # [T, Hq, D], q's dtype
    """Causal attention of each sequence's new tokens over its whole paged context.

    New token j of a sequence with n new tokens and context length L sits at position L - n + j
    and sees keys 0 .. L - n + j: a fresh prompt, a prompt with a cached prefix, and a later
    chunk of a chunked prefill are the same computation.
    """
    out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    for b in range(len(starts) - 1):
        begin, end = starts[b], starts[b + 1]
        if end == begin:
            continue
        n = int(seq_lens[b])
        k = _gather_context(k_cache, block_tables[b], n)
        v = _gather_context(v_cache, block_tables[b], n)
        out[begin:end] = _attend(q[begin:end], k, v, n - (end - begin), scale)
    return out


def write_kv_cache(
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [N, bs, Hkv, D], written in place
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T] slot of each token; negative = skip (padding)
) -> None:
    """Scatter one step's new K/V into their cache slots."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep].to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep].to(v_cache.dtype)


def pack_pages(
    k_caches: list[torch.Tensor],  # per layer [N, bs, Hkv, D]
    v_caches: list[torch.Tensor],
    layer_range: range,
    block_ids: torch.Tensor,  # [nb]
    head_range: range | None = None,
) -> torch.Tensor:  # [L, 2, nb, bs, H, D]
    """Gather a request's blocks, for some layers and a slice of KV heads, into one buffer."""
    heads = _heads(head_range, k_caches[0])
    return torch.stack(
        [torch.stack([k_caches[layer][block_ids][:, :, heads], v_caches[layer][block_ids][:, :, heads]]) for layer in layer_range]
    )


def unpack_pages(
    buffer: torch.Tensor,  # [L, 2, nb, bs, H, D]
    k_caches: list[torch.Tensor],
    v_caches: list[torch.Tensor],
    layer_range: range,
    block_ids: torch.Tensor,  # [nb] destination blocks
    head_range: range | None = None,
) -> None:
    """Scatter a packed buffer back into the caches (the receiver's block ids)."""
    heads = _heads(head_range, k_caches[0])
    for i, layer in enumerate(layer_range):
        for kv, caches in enumerate((k_caches, v_caches)):
            caches[layer][block_ids, :, heads] = buffer[i, kv].to(caches[layer].dtype)


class QuantizedPages(NamedTuple):
    """int8 pages with one float32 scale per (layer, k|v, block, head): value ~= data * scale."""

    data: torch.Tensor  # [L, 2, nb, bs, H, D] int8
    scales: torch.Tensor  # [L, 2, nb, H] float32

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.scales.numel() * self.scales.element_size()


def quantize_pages(pages: torch.Tensor) -> QuantizedPages:
    """Symmetric per-(block, head) int8: scale = amax / 127, q = floor(x / scale + 0.5) in [-127, 127]."""
    x = pages.float()  # [L, 2, nb, bs, H, D]
    amax = x.abs().amax(dim=(3, 5))  # [L, 2, nb, H]
    # A block of zeros gets scale 0 and decodes to zeros. Multiply by a correctly rounded 127 / amax
    # (not divide by scale; and `127.0 / t` in torch is reciprocal-then-multiply, off by an ulp)
    # because that is what the kernel does, so both round the same way.
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0).div(amax), torch.zeros_like(amax))
    q = torch.floor(x * inv[:, :, :, None, :, None] + 0.5).clamp_(-127, 127)
    return QuantizedPages(q.to(torch.int8), amax / 127.0)


def dequantize_pages(packed: QuantizedPages, dtype: torch.dtype) -> torch.Tensor:  # [L, 2, nb, bs, H, D]
    return (packed.data.float() * packed.scales[:, :, :, None, :, None]).to(dtype)


def pack_pages_int8(
    k_caches: list[torch.Tensor],
    v_caches: list[torch.Tensor],
    layer_range: range,
    block_ids: torch.Tensor,
    head_range: range | None = None,
) -> QuantizedPages:
    """pack_pages, then quantize: half the bytes of a 16-bit cache, a quarter of a 32-bit one."""
    return quantize_pages(pack_pages(k_caches, v_caches, layer_range, block_ids, head_range))


def unpack_pages_int8(
    packed: QuantizedPages,
    k_caches: list[torch.Tensor],
    v_caches: list[torch.Tensor],
    layer_range: range,
    block_ids: torch.Tensor,
    head_range: range | None = None,
) -> None:
    buffer = dequantize_pages(packed, k_caches[0].dtype)
    unpack_pages(buffer, k_caches, v_caches, layer_range, block_ids, head_range)


def _heads(head_range: range | None, cache: torch.Tensor) -> slice:
    if head_range is None:
        return slice(0, cache.shape[2])
    if head_range.step != 1:
        raise ValueError(f"head_range must be contiguous, got {head_range}")
    return slice(head_range.start, head_range.stop)
