"""Tensor parallelism: the rank group layers shard over (and, later, the SPMD executor)."""

from cluster.parallel.state import SINGLE_RANK, TPGroup

__all__ = ["SINGLE_RANK", "TPGroup"]
