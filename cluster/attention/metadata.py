"""The per-step description of a flattened varlen batch that attention backends consume."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """One engine step's batch, flattened: T tokens from B sequences, sequence by sequence.

    Sequences with one new token (decodes) come first, then the prefill chunks.
    Sequence i's new tokens are rows query_start_loc[i]:query_start_loc[i+1] of q/k/v; they sit at the
    positions seq_lens[i] - query_lens[i] .. seq_lens[i] - 1 of that sequence.
    """

    num_decodes: int  # the first num_decodes sequences have query_len == 1
    query_lens: list[int]  # [B] new tokens per sequence
    seq_lens_cpu: list[int]  # [B] context length after this step (cached + new)
    query_start_loc_cpu: list[int]  # [B+1] prefix sums of query_lens
    seq_lens: torch.Tensor  # [B] int64 on device
    block_tables: torch.Tensor  # [B, max_blocks] int64 physical block ids, padded with 0
    slot_mapping: torch.Tensor  # [T] int64 cache slot (block_id * block_size + offset) of each new token

    @classmethod
    def build(
        cls,
        num_decodes: int,
        query_lens: list[int],
        seq_lens: list[int],
        block_tables: torch.Tensor,
        slot_mapping: torch.Tensor,
        device: torch.device | str,
    ) -> AttentionMetadata:
        return cls(
            num_decodes=num_decodes,
            query_lens=query_lens,
            seq_lens_cpu=seq_lens,
            query_start_loc_cpu=[0, *itertools.accumulate(query_lens)],
            seq_lens=torch.tensor(seq_lens, dtype=torch.int64).to(device, non_blocking=True),
            block_tables=block_tables.to(device, non_blocking=True),
            slot_mapping=slot_mapping.to(device, non_blocking=True),
        )

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def num_tokens(self) -> int:
        return self.query_start_loc_cpu[-1]
