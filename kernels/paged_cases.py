"""Random paged-KV inputs for kernel tests and the benchmark's correctness checks (torch only).

Block tables are shuffled and non-contiguous, as a real block pool hands them out after some churn,
and every cache slot no sequence owns (block 0, which pads the tables, and the tail of each
sequence's last block) can be poisoned with NaN: a kernel that reads past a context's end then
produces NaN instead of a plausible number.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PagedCase:
    """Random per-layer KV caches holding B sequences' contexts."""

    k_cache: torch.Tensor  # [N, bs, Hkv, D]
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # [B, max_blocks] int64, padded with block 0
    seq_lens: torch.Tensor  # [B] int64

    @property
    def block_size(self) -> int:
        return self.k_cache.shape[1]


def make_paged_case(
    seq_lens: list[int],
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    *,
    spare_blocks: int = 3,
    poison: bool = True,
) -> PagedCase:
    blocks_per_seq = [(n + block_size - 1) // block_size for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + spare_blocks + 1
    perm = torch.randperm(num_blocks - 1) + 1  # block 0 belongs to no one
    tables = torch.zeros(len(seq_lens), max(blocks_per_seq), dtype=torch.int64)
    used = 0
    for i, nb in enumerate(blocks_per_seq):
        tables[i, :nb] = perm[used : used + nb]
        used += nb
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, device=device).to(dtype)
    v_cache = torch.randn(shape, device=device).to(dtype)
    if poison:
        for cache in (k_cache, v_cache):
            cache[0] = float("nan")
            for i, n in enumerate(seq_lens):
                used_in_last = n - (blocks_per_seq[i] - 1) * block_size
                cache[tables[i, blocks_per_seq[i] - 1], used_in_last:] = float("nan")
    return PagedCase(k_cache, v_cache, tables.to(device), torch.tensor(seq_lens, dtype=torch.int64, device=device))
