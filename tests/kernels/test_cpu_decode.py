"""The C++ CPU paged decode kernel against a float64 reference, on fresh random inputs each run."""

from __future__ import annotations

import pytest
import torch

from kernels import cpu_decode


@pytest.fixture(scope="module")
def kernel():
    op = cpu_decode.load()
    assert op is not None, "the CPU kernel must build on the CI machine (gcc + ninja are project deps)"
    return op


def make_case(num_seqs: int, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
              max_len: int, dtype: torch.dtype, *, one_token_first: bool = True):
    lens = torch.randint(1, max_len + 1, (num_seqs,))
    if one_token_first:
        lens[0] = 1  # a context of one token
    blocks_per_seq = (lens + block_size - 1) // block_size
    max_blocks = int(blocks_per_seq.max())
    num_blocks = int(blocks_per_seq.sum()) + 3
    # Shuffled, non-contiguous block tables; padding entries point at a poisoned block.
    perm = torch.randperm(num_blocks - 1) + 1
    tables = torch.zeros(num_seqs, max_blocks, dtype=torch.int64)
    used = 0
    for i, nb in enumerate(blocks_per_seq.tolist()):
        tables[i, :nb] = perm[used : used + nb]
        used += nb
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim).to(dtype)
    k_cache[0] = float("nan")  # the kernel must never read past a sequence's length
    v_cache[0] = float("nan")
    q = torch.randn(num_seqs, num_heads, head_dim).to(dtype)
    return q, k_cache, v_cache, tables, lens


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group", [1, 2, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128, 48])
def test_kernel_matches_float64_reference(kernel, dtype, group, head_dim):
    num_kv_heads = 2
    q, k, v, tables, lens = make_case(7, num_kv_heads * group, num_kv_heads, head_dim, 16, 70, dtype)
    out = kernel(q, k, v, tables, lens, head_dim**-0.5)
    ref = cpu_decode.paged_decode_reference(q, k, v, tables, lens, head_dim**-0.5)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("num_seqs,num_kv_heads,threads", [(1, 4, 4), (1, 3, 2), (2, 4, 3), (3, 1, 4)])
def test_fewer_sequences_than_threads_split_by_kv_head(kernel, num_seqs, num_kv_heads, threads):
    """With fewer sequences than threads each sequence is split into kv-head ranges (uneven ones too)."""
    q, k, v, tables, lens = make_case(num_seqs, 2 * num_kv_heads, num_kv_heads, 64, 16, 70, torch.float32,
                                      one_token_first=False)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = kernel(q, k, v, tables, lens, 0.125)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(out, cpu_decode.paged_decode_reference(q, k, v, tables, lens, 0.125),
                               atol=2e-5, rtol=2e-5)


def test_backend_uses_kernel_and_matches_plain_torch(kernel):
    from cluster.attention.metadata import AttentionMetadata
    from cluster.attention.torch_backend import TorchAttentionBackend

    q, k, v, tables, lens = make_case(5, 8, 2, 64, 16, 90, torch.float32)
    # The gather path reads padding blocks and masks them, so poison with finite values here.
    k[0], v[0] = 1e4, 1e4
    backends = [TorchAttentionBackend(1, k.shape[0], 16, 2, 64, torch.float32, decode_kernel=op)
                for op in (kernel, None)]
    for b in backends:
        b.k_caches[0].copy_(k)
        b.v_caches[0].copy_(v)
    # Decode step: each sequence writes its newest token at position len - 1, then attends.
    pos = lens - 1
    slots = tables[torch.arange(5), pos // 16] * 16 + pos % 16
    meta = AttentionMetadata.build(5, [1] * 5, lens.tolist(), tables, slots, "cpu")
    new_k, new_v = torch.randn(5, 2, 64), torch.randn(5, 2, 64)
    out_kernel, out_torch = (b.forward(0, q, new_k, new_v, meta) for b in backends)
    torch.testing.assert_close(out_kernel, out_torch, atol=1e-5, rtol=1e-5)
