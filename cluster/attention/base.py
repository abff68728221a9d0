"""The attention-backend interface the model calls and the engine builds."""

from __future__ import annotations

from typing import Protocol

import torch

from cluster.attention.metadata import AttentionMetadata


class AttentionBackend(Protocol):
    """Owns the paged KV cache of every layer and computes attention over it."""

    block_size: int
    num_blocks: int

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
