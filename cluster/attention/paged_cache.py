"""PagedKVCache: the per-layer K/V block pools every attention backend owns, and their geometry.

Layout, per layer: [num_blocks, block_size, num_kv_heads, head_dim]; a token at position p of a
sequence lives in block block_table[p // block_size] at offset p % block_size (flat slot
block_id * block_size + offset). Backends differ only in how they read and write it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class PagedKVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str, scale: float | None = None) -> None:
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5 if scale is None else scale
        # Called with the layer index once a layer's new K/V are in the cache (KV transfer hooks here).
        self.layer_listener: Callable[[int], None] | None = None
        # One allocation per K and V, viewed per layer: a whole-request page copy (kernels.triton_pages)
        # then spans every layer in one launch, by a single layer stride.
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        self.k_caches = list(torch.zeros(shape, dtype=dtype, device=device).unbind(0))
        self.v_caches = list(torch.zeros(shape, dtype=dtype, device=device).unbind(0))
