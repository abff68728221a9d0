"""Triton KV cache write (interpreter) against its torch reference."""

from __future__ import annotations

import pytest
import torch

from kernels import reference
from kernels.triton_cache import write_kv_cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_kv_heads,head_dim", [(2, 64), (3, 48), (1, 128)])
def test_write_matches_reference(dtype, num_kv_heads, head_dim):
    num_blocks, block_size, num_tokens = 6, 8, 7
    # k and v as the model hands them: strided views into one fused qkv projection.
    qkv = torch.randn(num_tokens, 4 + 2 * num_kv_heads, head_dim).to(dtype)
    k, v = qkv[:, 4 : 4 + num_kv_heads], qkv[:, 4 + num_kv_heads :]
    slots = torch.randperm(num_blocks * block_size)[:num_tokens]
    slots[2] = -1  # padding: skipped
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    caches = [torch.full(shape, float("nan"), dtype=dtype) for _ in range(4)]
    write_kv_cache(k, v, caches[0], caches[1], slots)
    reference.write_kv_cache(k, v, caches[2], caches[3], slots)
    # Bit-exact, and untouched slots stay NaN in both.
    torch.testing.assert_close(caches[0], caches[2], atol=0, rtol=0, equal_nan=True)
    torch.testing.assert_close(caches[1], caches[3], atol=0, rtol=0, equal_nan=True)
    written = caches[0].view(-1, num_kv_heads, head_dim)[slots[slots >= 0]]
    assert torch.equal(written, k[slots >= 0])
    assert caches[0].isnan().sum() == (num_blocks * block_size - (num_tokens - 1)) * num_kv_heads * head_dim
