"""Triton prefill attention over paged KV (interpreter) against its torch reference and float64."""

from __future__ import annotations

import pytest
import torch

from kernels import reference
from kernels.triton_prefill import prefill_attention

# (new tokens, context length) per sequence: a one-token prompt, a fresh prompt off the block grid,
# a prompt with a cached prefix, a one-token chunk late in a chunked prefill, a chunk that spans
# several query tiles starting mid-block.
BATCH = [(1, 1), (21, 21), (9, 40), (1, 30), (35, 51)]


def check_prefill(case, q: torch.Tensor, query_lens: list[int], scale: float, tol: dict) -> None:
    starts = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()])
    out = torch.full_like(q, float("nan"))
    prefill_attention(q, case.k_cache, case.v_cache, case.block_tables, case.seq_lens, starts, scale, out=out)
    args = (case.block_tables, case.seq_lens, starts, scale)
    ref = reference.prefill_attention(q, case.k_cache, case.v_cache, *args)
    exact = reference.prefill_attention(q.double(), case.k_cache.double(), case.v_cache.double(), *args)
    assert out.dtype == q.dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(out.double(), exact, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("group", [1, 2, 4, 8])
def test_prefill_matches_references(paged_case, tolerance, dtype, group):
    num_kv_heads, head_dim = 1, 32
    query_lens = [n for n, _ in BATCH]
    case = paged_case([ctx for _, ctx in BATCH], num_kv_heads, head_dim, 16, dtype)
    q = torch.randn(sum(query_lens), num_kv_heads * group, head_dim).to(dtype)
    check_prefill(case, q, query_lens, head_dim**-0.5, tolerance(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("head_dim,block_size", [(128, 16), (48, 8)])
def test_prefill_head_dims_and_block_sizes(paged_case, tolerance, dtype, head_dim, block_size):
    query_lens, ctx = [17, 3], [17, 26]
    case = paged_case(ctx, 2, head_dim, block_size, dtype)
    q = torch.randn(sum(query_lens), 4, head_dim).to(dtype)
    check_prefill(case, q, query_lens, 0.2, tolerance(dtype))


def test_prefill_empty_sequence_and_strided_query(paged_case, tolerance):
    """A sequence with no new tokens is skipped; q may be a view into a fused qkv tensor."""
    query_lens, ctx = [4, 0, 18], [10, 7, 18]
    case = paged_case(ctx, 2, 32, 16, torch.float32)
    q = torch.randn(sum(query_lens), 4 + 2 + 2, 32)[:, :4]
    check_prefill(case, q, query_lens, 0.25, tolerance(torch.float32))
