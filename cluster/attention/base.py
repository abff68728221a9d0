"""The attention-backend interface the model calls and the engine builds."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from cluster.attention.metadata import AttentionMetadata


class AttentionBackend(Protocol):
    """Owns the paged KV cache of every layer and computes attention over it."""

    block_size: int
    num_blocks: int
    k_caches: list[torch.Tensor]  # per layer [num_blocks, block_size, num_kv_heads, head_dim]
    v_caches: list[torch.Tensor]
    layer_listener: Callable[[int], None] | None  # called once layer i's new K/V are written

    def forward(
        self,
        layer_idx: int,
        q: torch.Tensor,  # [T, num_heads, head_dim]
        k: torch.Tensor,  # [T, num_kv_heads, head_dim]
        v: torch.Tensor,  # [T, num_kv_heads, head_dim]
        metadata: AttentionMetadata,
    ) -> torch.Tensor:  # [T, num_heads, head_dim]
        """Write k/v into their slots, then attend causally over each sequence's whole context."""
        ...
