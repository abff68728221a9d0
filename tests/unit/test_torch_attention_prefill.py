"""TorchAttentionBackend's prefill over a cached context (prefix hits, later chunks) against the float64
reference in kernels/reference.py, for every query-heads-per-KV-head grouping and across steps of
different shapes (its masks are cached per shape)."""

from __future__ import annotations

import pytest
import torch

from cluster.attention.metadata import AttentionMetadata
from cluster.attention.torch_backend import TorchAttentionBackend
from kernels import reference

NUM_LAYERS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM = 2, 8, 2, 16


def prefill_step(shapes: list[tuple[int, int]], num_blocks: int, seed: int) -> AttentionMetadata:
    """Prefill chunks only: (new tokens, context length after the step) each, in shuffled blocks."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num_blocks, generator=gen)
    blocks_per_seq = [(ctx + BLOCK_SIZE - 1) // BLOCK_SIZE for _, ctx in shapes]
    tables = torch.zeros(len(shapes), max(blocks_per_seq), dtype=torch.int64)
    slots, used = [], 0
    for i, ((n, ctx), nb) in enumerate(zip(shapes, blocks_per_seq, strict=True)):
        tables[i, :nb] = perm[used:used + nb]
        used += nb
        pos = torch.arange(ctx - n, ctx)
        slots.append(tables[i, pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE)
    return AttentionMetadata.build(0, [n for n, _ in shapes], [ctx for _, ctx in shapes], tables,
                                   torch.cat(slots), "cpu")


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("group", [1, 2, 4])
def test_prefill_over_cached_context_matches_reference(dtype, atol, group):
    num_heads, num_blocks = NUM_KV_HEADS * group, 40
    backend = TorchAttentionBackend(NUM_LAYERS, num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, dtype)
    for caches in (backend.k_caches, backend.v_caches):
        for cache in caches:
            cache.copy_(torch.randn(cache.shape).to(dtype))
    # two steps of different shapes: a fresh prompt, a prefix hit, a later chunk; then other lengths
    for seed, shapes in enumerate([[(13, 13), (9, 25), (6, 27)], [(5, 37), (16, 16), (1, 18)]]):
        meta = prefill_step(shapes, num_blocks, seed)
        for layer in range(NUM_LAYERS):
            q = torch.randn(meta.num_tokens, num_heads, HEAD_DIM).to(dtype)
            k = torch.randn(meta.num_tokens, NUM_KV_HEADS, HEAD_DIM).to(dtype)
            v = torch.randn(meta.num_tokens, NUM_KV_HEADS, HEAD_DIM).to(dtype)
            got = backend.forward(layer, q, k, v, meta)
            want = reference.prefill_attention(
                q.double(), backend.k_caches[layer].double(), backend.v_caches[layer].double(), meta.block_tables,
                meta.seq_lens, torch.tensor(meta.query_start_loc_cpu), backend.scale)
            torch.testing.assert_close(got.double(), want, atol=atol, rtol=0)
