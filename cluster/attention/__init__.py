"""Attention backends: how the model reads and writes the paged KV cache.

The model never touches the cache layout. Each attention layer calls
`backend.forward(layer_idx, q, k, v, metadata)`; the backend writes the step's new K/V into their
slots and attends over every cached token of each sequence.
"""

from cluster.attention.base import AttentionBackend
from cluster.attention.metadata import AttentionMetadata

__all__ = ["AttentionBackend", "AttentionMetadata"]
