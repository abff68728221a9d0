"""Triton paged decode attention (interpreter) against its torch reference and a float64 computation."""

from __future__ import annotations

import pytest
import torch

from kernels import reference
from kernels.triton_decode import choose_num_splits, paged_decode_attention

# Context 1, lengths off the block grid, and one long enough for three splits of several tiles.
SEQ_LENS = [1, 37, 16, 90]


def check_decode(case, q: torch.Tensor, scale: float, num_splits: int, tol: dict) -> None:
    out = torch.full_like(q, float("nan"))  # poisoned: an unwritten element fails
    paged_decode_attention(q, case.k_cache, case.v_cache, case.block_tables, case.seq_lens, scale,
                           num_splits=num_splits, out=out)
    ref = reference.paged_decode_attention(q, case.k_cache, case.v_cache, case.block_tables, case.seq_lens, scale)
    exact = reference.paged_decode_attention(q.double(), case.k_cache.double(), case.v_cache.double(),
                                             case.block_tables, case.seq_lens, scale)
    assert out.dtype == q.dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(out.double(), exact, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("group", [1, 2, 4, 8])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_matches_references(paged_case, tolerance, dtype, group, num_splits):
    num_kv_heads, head_dim = 2, 64
    case = paged_case(SEQ_LENS, num_kv_heads, head_dim, 16, dtype)
    q = torch.randn(len(SEQ_LENS), num_kv_heads * group, head_dim).to(dtype)
    check_decode(case, q, head_dim**-0.5, num_splits, tolerance(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("head_dim,block_size", [(128, 16), (48, 8), (32, 32)])
def test_decode_head_dims_and_block_sizes(paged_case, tolerance, dtype, head_dim, block_size):
    """head_dim 128, a non-power-of-two multiple of 16, block sizes other than the tile."""
    case = paged_case([1, 29, 50], 1, head_dim, block_size, dtype)  # MQA
    q = torch.randn(3, 4, head_dim).to(dtype)
    check_decode(case, q, 0.3, 2, tolerance(dtype))


def test_decode_strided_query_and_output_views(paged_case, tolerance):
    """The model hands q as a view into a fused qkv projection; the backend writes into a slice."""
    case = paged_case([5, 33], 2, 64, 16, torch.float32)
    qkv = torch.randn(2, 8 + 2 + 2, 64)
    q = qkv[:, :8]  # [B, Hq, D] with a token stride of 12 * 64
    out_full = torch.full((3, 8, 64), float("nan"))
    paged_decode_attention(q, case.k_cache, case.v_cache, case.block_tables, case.seq_lens, 0.125,
                           num_splits=1, out=out_full[1:])
    ref = reference.paged_decode_attention(q, case.k_cache, case.v_cache, case.block_tables, case.seq_lens, 0.125)
    torch.testing.assert_close(out_full[1:], ref, **tolerance(torch.float32))
    assert out_full[0].isnan().all()  # nothing written outside the view


def test_more_splits_than_tiles_leaves_empty_splits_harmless(paged_case, tolerance):
    case = paged_case([1, 3], 2, 64, 16, torch.float32)
    q = torch.randn(2, 4, 64)
    check_decode(case, q, 0.125, 8, tolerance(torch.float32))


def test_choose_num_splits_bounds():
    cpu = torch.device("cpu")  # one "SM": splits only when the context is long enough to share
    assert choose_num_splits(1, 1, 100, cpu) == 1
    assert 1 <= choose_num_splits(1, 1, 100_000, cpu) <= 32
    assert choose_num_splits(64, 8, 4096, cpu) == 1


def test_rejects_bad_head_dim(paged_case):
    case = paged_case([3], 1, 40, 16, torch.float32)
    with pytest.raises(ValueError, match="multiple of 16"):
        paged_decode_attention(torch.randn(1, 1, 40), case.k_cache, case.v_cache, case.block_tables,
                               case.seq_lens, 1.0)
