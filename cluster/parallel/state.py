"""The tensor-parallel group a model's layers shard over.

Layers hold a `TPGroup` instead of reading global state, so one process can build a TP=1 model next to
a sharded one (tests) and a TP rank never has to ask torch.distributed who it is. At size 1 every
collective is a no-op and torch.distributed need not be initialised.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TPGroup:
    rank: int = 0
    size: int = 1
    group: Any = None  # torch.distributed ProcessGroup; None = the default world group

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"TP size must be >= 1, got {self.size}")
        if not 0 <= self.rank < self.size:
            raise ValueError(f"TP rank must be in [0, {self.size}), got {self.rank}")

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over the ranks, in place."""
        if self.size == 1:
            return t
        dist.all_reduce(t, group=self.group)
        return t

    def all_gather_last_dim(self, t: torch.Tensor) -> torch.Tensor:
        """[..., n] on each rank -> [..., size * n], rank-major."""
        if self.size == 1:
            return t
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(parts, t, group=self.group)
        return torch.cat(parts, dim=-1)


SINGLE_RANK = TPGroup()  # the default: no tensor parallelism
