"""Tensor-parallel linear layers (Megatron style) with fused projections.

Column-parallel layers split the output features over ranks and need no communication; row-parallel
layers split the input features and all-reduce their partial sums. An attention or MLP block is a
column-parallel projection followed by a row-parallel one, so it costs one all-reduce per block.

q/k/v and gate/up are each fused into one weight, so a step does one GEMM where HF does three (or
two): on CPU the per-call overhead of small GEMMs is a large share of a decode step.

Every parameter carries `weight_loader(param, loaded_weight, shard_id=None)`: it takes the FULL
checkpoint tensor (e.g. all of `k_proj.weight`) and copies in this rank's slice at the right offset.
"""

from __future__ import annotations

import torch
from torch import nn

from cluster.model import cpu_gemm
from cluster.parallel.state import SINGLE_RANK, TPGroup


def _divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) is not divisible by the tensor-parallel size ({denominator})")
    return numerator // denominator


def _copy_checked(target: torch.Tensor, source: torch.Tensor) -> None:
    # copy_ would broadcast a wrongly shaped tensor silently
    if target.shape != source.shape:
        raise ValueError(f"shape mismatch: checkpoint slice {tuple(source.shape)} vs parameter {tuple(target.shape)}")
    target.copy_(source)  # also casts the checkpoint dtype to ours


def _check_full(loaded: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(loaded.shape) != expected:
        raise ValueError(f"shape mismatch: checkpoint {tuple(loaded.shape)} vs expected {expected}")


def _param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W's rows (output features) split over ranks: y comes out sharded."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, tp: TPGroup = SINGLE_RANK):
        super().__init__()
        self.tp = tp
        self.in_features = in_features
        self.out_features_per_rank = _divide(out_features, tp.size, "output features")
        self.weight = _param(self.out_features_per_rank, in_features)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = _param(self.out_features_per_rank)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)
        self.packed_weight: torch.Tensor | None = None  # set after loading by cpu_gemm.pack_linear_layers

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: object = None) -> None:
        size = param.shape[0]
        _check_full(loaded_weight, (size * self.tp.size, *param.shape[1:]))
        _copy_checked(param.data, loaded_weight.narrow(0, self.tp.rank * size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_gemm.linear(x, self.weight, self.bias, self.packed_weight)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input in one GEMM (gate and up: shard_id 0, 1).

    Each rank holds [its slice of output 0 | its slice of output 1 | ...].
    """

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False, tp: TPGroup = SINGLE_RANK):
        for i, size in enumerate(output_sizes):
            _divide(size, tp.size, f"output {i} size")
        self.output_sizes = output_sizes
        super().__init__(in_features, sum(output_sizes), bias, tp)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: object = None) -> None:
        if not isinstance(shard_id, int) or not 0 <= shard_id < len(self.output_sizes):
            raise ValueError(f"shard_id must be an output index < {len(self.output_sizes)}, got {shard_id!r}")
        _check_full(loaded_weight, (self.output_sizes[shard_id], *param.shape[1:]))
        offset = sum(self.output_sizes[:shard_id]) // self.tp.size
        size = self.output_sizes[shard_id] // self.tp.size
        _copy_checked(param.data.narrow(0, offset, size), loaded_weight.narrow(0, self.tp.rank * size, size))


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one GEMM; each rank holds whole heads: [q heads | k heads | v heads].

    With fewer kv heads than ranks, each kv head is replicated on tp_size / num_kv_heads ranks.
    """

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool = False,
        tp: TPGroup = SINGLE_RANK,
    ):
        self.head_dim = head_dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.num_heads_per_rank = _divide(num_heads, tp.size, "number of attention heads")
        if num_kv_heads >= tp.size:
            self.num_kv_heads_per_rank = _divide(num_kv_heads, tp.size, "number of kv heads")
            self.kv_rank = tp.rank
        else:
            replicas = _divide(tp.size, num_kv_heads, "replicated kv heads: tp size vs kv heads")
            self.num_kv_heads_per_rank = 1
            self.kv_rank = tp.rank // replicas  # the kv head this rank's query heads share
        self.q_size = self.num_heads_per_rank * head_dim  # per rank
        self.kv_size = self.num_kv_heads_per_rank * head_dim  # per rank
        # out_features is the per-rank size times tp.size so the base class divides it back
        super().__init__(hidden_size, (self.q_size + 2 * self.kv_size) * tp.size, bias, tp)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: object = None) -> None:
        if shard_id == "q":
            offset, size, start, heads = 0, self.q_size, self.tp.rank * self.q_size, self.num_heads
        elif shard_id in ("k", "v"):
            offset = self.q_size if shard_id == "k" else self.q_size + self.kv_size
            size, start, heads = self.kv_size, self.kv_rank * self.kv_size, self.num_kv_heads
        else:
            raise ValueError(f"shard_id must be 'q', 'k' or 'v', got {shard_id!r}")
        _check_full(loaded_weight, (heads * self.head_dim, *param.shape[1:]))
        _copy_checked(param.data.narrow(0, offset, size), loaded_weight.narrow(0, start, size))


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W's columns (input features) split over ranks; partial sums are all-reduced.

    The input arrives already sharded (the output of a column-parallel layer). The bias is added on rank 0
    only, so the all-reduce counts it once.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, tp: TPGroup = SINGLE_RANK):
        super().__init__()
        self.tp = tp
        self.in_features_per_rank = _divide(in_features, tp.size, "input features")
        self.weight = _param(out_features, self.in_features_per_rank)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = _param(out_features)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)
        self.packed_weight: torch.Tensor | None = None  # set after loading by cpu_gemm.pack_linear_layers

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: object = None) -> None:
        if param.dim() == 1:  # the bias is not sharded
            _copy_checked(param.data, loaded_weight)
            return
        size = param.shape[1]
        _check_full(loaded_weight, (param.shape[0], size * self.tp.size))
        _copy_checked(param.data, loaded_weight.narrow(1, self.tp.rank * size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = cpu_gemm.linear(x, self.weight, self.bias if self.tp.is_first else None, self.packed_weight)
        return self.tp.all_reduce(y)
