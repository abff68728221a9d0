"""Paged attention with the Triton kernels of kernels/: the CUDA backend (interpreter mode on CPU, tests).

Same constructor, cache layout ([num_blocks, block_size, num_kv_heads, head_dim] per layer) and
forward contract as TorchAttentionBackend, so the two are interchangeable and a KV page written by
one is read correctly by the other. Per layer and step: one cache-write launch, one decode launch
(plus a merge launch when split-K is on) for all decodes, one prefill launch for all prefill chunks.

Only cluster.attention.selector imports this module, and only for attention_backend "triton", so
importing the engine never imports Triton (and TRITON_INTERPRET can still be set before the kernels
are defined).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cluster.attention.metadata import AttentionMetadata
from cluster.attention.paged_cache import PagedKVCache
from kernels.triton_cache import write_kv_cache
from kernels.triton_decode import paged_decode_attention
from kernels.triton_prefill import prefill_attention


@dataclass
class _StepArgs:
    """Host-side facts about one step's batch, computed once and reused by every layer."""

    meta: AttentionMetadata  # held so its id cannot be reused by a later step's metadata
    max_decode_len: int
    prefill_query_start: torch.Tensor | None  # [P+1] on device, relative to the first prefill token
    max_query_len: int


class TritonAttentionBackend(PagedKVCache):
    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cuda",
        scale: float | None = None,
        num_splits: int | None = None,  # split-K for decode; None = chosen per step from the shape
    ) -> None:
        super().__init__(num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype, device, scale)
        self.num_splits = num_splits
        self._step: _StepArgs | None = None

    def write_kv(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Scatter the step's new K/V ([T, Hkv, D]) into their cache slots."""
        write_kv_cache(k, v, self.k_caches[layer_idx], self.v_caches[layer_idx], slot_mapping)

    def _step_args(self, meta: AttentionMetadata) -> _StepArgs:
        if self._step is None or self._step.meta is not meta:
            nd = meta.num_decodes
            starts = meta.query_start_loc_cpu
            prefill_starts = None
            if meta.num_seqs > nd:
                # Relative to the first prefill token: the kernel sees q[starts[nd]:] as its own batch.
                prefill_starts = torch.tensor([s - starts[nd] for s in starts[nd:]], dtype=torch.int32)
                prefill_starts = prefill_starts.to(meta.seq_lens.device, non_blocking=True)
            self._step = _StepArgs(
                meta=meta,
                max_decode_len=max(meta.seq_lens_cpu[:nd], default=0),
                prefill_query_start=prefill_starts,
                max_query_len=max(meta.query_lens[nd:], default=0),
            )
        return self._step

    def forward(
        self,
        layer_idx: int,
        q: torch.Tensor,  # [T, Hq, D]
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,  # [T, Hkv, D]
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [T, Hq, D]
        self.write_kv(layer_idx, k, v, meta.slot_mapping)
        if self.layer_listener is not None:
            self.layer_listener(layer_idx)
        step = self._step_args(meta)
        k_cache, v_cache = self.k_caches[layer_idx], self.v_caches[layer_idx]
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        nd = meta.num_decodes
        if nd:
            paged_decode_attention(
                q[:nd], k_cache, v_cache, meta.block_tables[:nd], meta.seq_lens[:nd], self.scale,
                num_splits=self.num_splits, max_seq_len=step.max_decode_len, out=out[:nd],
            )
        if step.prefill_query_start is not None:
            first = meta.query_start_loc_cpu[nd]
            prefill_attention(
                q[first:], k_cache, v_cache, meta.block_tables[nd:], meta.seq_lens[nd:],
                step.prefill_query_start, self.scale, max_query_len=step.max_query_len, out=out[first:],
            )
        return out
