"""The tensor-parallel group a model's layers shard over, and the pair of groups a TP replica runs on.

Layers hold a `TPGroup` instead of reading global state, so one process can build a TP=1 model next to
a sharded one (tests) and a TP rank never has to ask torch.distributed who it is. At size 1 every
collective is a no-op and torch.distributed need not be initialised.

A group is either torch.distributed's default world (`group=None`, as `init_process_group` makes it) or
a standalone backend object (`ProcessGroupGloo(store, rank, size)`): a TP replica builds standalone
ones, so a process can host several replicas (tests) and never touches torch.distributed's globals.
torch.distributed's functional API refuses unregistered groups, so those are driven through the
backend's own methods.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import AllgatherOptions  # not re-exported by torch.distributed
from torch.distributed import AllreduceOptions, BroadcastOptions, ReduceOp


@dataclass(frozen=True)
class TPGroup:
    rank: int = 0
    size: int = 1
    group: Any = None  # torch.distributed ProcessGroup or backend; None = the default world group

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"TP size must be >= 1, got {self.size}")
        if not 0 <= self.rank < self.size:
            raise ValueError(f"TP rank must be in [0, {self.size}), got {self.rank}")

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    def all_reduce(self, t: torch.Tensor, op: ReduceOp.RedOpType = ReduceOp.SUM) -> torch.Tensor:
        """Reduce `t` over the ranks (sum by default), in place."""
        if self.size == 1:
            return t
        if self.group is None:
            dist.all_reduce(t, op=op)
        else:
            opts = AllreduceOptions()
            opts.reduceOp = op
            self.group.allreduce([t], opts).wait()
        return t

    def all_gather_last_dim(self, t: torch.Tensor) -> torch.Tensor:
        """[..., n] on each rank -> [..., size * n], rank-major."""
        if self.size == 1:
            return t
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.size)]
        if self.group is None:
            dist.all_gather(parts, t)
        else:
            self.group.allgather([parts], [t], AllgatherOptions()).wait()
        return torch.cat(parts, dim=-1)

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Overwrite `t` on every rank with rank `src`'s, in place."""
        if self.size == 1:
            return t
        if self.group is None:
            dist.broadcast(t, src=src)
        else:
            opts = BroadcastOptions()
            opts.rootRank, opts.rootTensor = src, 0
            self.group.broadcast([t], opts).wait()
        return t


SINGLE_RANK = TPGroup()  # the default: no tensor parallelism


@dataclass(frozen=True)
class TPContext:
    """One rank's view of a TP replica: the group its layers shard over, and the CPU group that carries
    step plans. On CPU both are the same gloo group; on GPU `model` is NCCL, which cannot move the
    host-side plan tensors, so `control` is a gloo group over the same ranks."""

    model: TPGroup
    control: TPGroup

    def __post_init__(self) -> None:
        if (self.model.rank, self.model.size) != (self.control.rank, self.control.size):
            raise ValueError("the model and control groups must have the same rank and size")

    @property
    def rank(self) -> int:
        return self.model.rank

    @property
    def size(self) -> int:
        return self.model.size
