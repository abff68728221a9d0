"""The building blocks of a Llama-family decoder: norm, activation, vocab-parallel embedding and LM head.

The linear layers live in `linear.py` and rotary embeddings in `rotary.py`; both are re-exported here so
model code imports its layers from one place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cluster.model import cpu_gemm
from cluster.model.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from cluster.model.rotary import RotaryEmbedding, rope_inv_freq
from cluster.parallel.state import SINGLE_RANK, TPGroup

__all__ = [
    "ColumnParallelLinear",
    "MergedColumnParallelLinear",
    "ParallelLMHead",
    "QKVParallelLinear",
    "RMSNorm",
    "RotaryEmbedding",
    "RowParallelLinear",
    "SiluAndMul",
    "VocabParallelEmbedding",
    "default_weight_loader",
    "rope_inv_freq",
]


def default_weight_loader(param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: object = None) -> None:
    """For replicated parameters (norm weights): copy the whole tensor, casting to the param's dtype."""
    if param.shape != loaded_weight.shape:
        raise ValueError(f"shape mismatch: checkpoint {tuple(loaded_weight.shape)} vs parameter {tuple(param.shape)}")
    param.data.copy_(loaded_weight)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, reduced in float32 and cast back before the weight multiply, as HF does."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.weight.weight_loader = default_weight_loader
        self.use_cpu_kernel = False  # set by cpu_kernels.attach: one fused C++ op instead of ~8

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., dim] -> [..., dim]
        if self.use_cpu_kernel and x.is_contiguous():
            return torch.ops.pdserve_cpu.rms_norm(x, self.weight, self.eps)
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The pre-norm residual step: residual += x, then normalise it. Returns (normed, new residual)."""
        if self.use_cpu_kernel and x.is_contiguous() and residual.is_contiguous():
            return torch.ops.pdserve_cpu.add_rms_norm(x, residual, self.weight, self.eps)
        residual = residual + x
        return self.forward(residual), residual


class SiluAndMul(nn.Module):
    """SwiGLU gate: [gate | up] -> silu(gate) * up, halving the last dim."""

    def __init__(self):
        super().__init__()
        self.use_cpu_kernel = False  # set by cpu_kernels.attach

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, 2I] -> [T, I]
        if self.use_cpu_kernel and x.dim() == 2 and x.is_contiguous():
            return torch.ops.pdserve_cpu.silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


class VocabParallelEmbedding(nn.Module):
    """Token embedding with the vocabulary split into contiguous per-rank ranges.

    The vocabulary is padded to a multiple of the TP size; each rank looks up the ids in its range,
    writes zeros for the rest, and the all-reduce assembles the full rows.
    """

    def __init__(self, vocab_size: int, hidden_size: int, tp: TPGroup = SINGLE_RANK):
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.padded_vocab_size = -(-vocab_size // tp.size) * tp.size
        self.vocab_per_rank = self.padded_vocab_size // tp.size
        self.vocab_start = tp.rank * self.vocab_per_rank
        self.vocab_end = self.vocab_start + self.vocab_per_rank  # may run into the padding
        self.weight = nn.Parameter(torch.empty(self.vocab_per_rank, hidden_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: object = None) -> None:
        if loaded_weight.shape != (self.vocab_size, param.shape[1]):
            raise ValueError(
                f"shape mismatch: checkpoint {tuple(loaded_weight.shape)} vs ({self.vocab_size}, {param.shape[1]})"
            )
        rows = min(self.vocab_end, self.vocab_size) - self.vocab_start  # the last rank holds the padding
        param.data[:rows].copy_(loaded_weight[self.vocab_start : self.vocab_start + rows])
        param.data[rows:].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, hidden]
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        in_shard = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)  # [T]
        local_ids = (input_ids - self.vocab_start) * in_shard  # out-of-shard ids read row 0, then zeroed
        x = F.embedding(local_ids, self.weight).masked_fill_(~in_shard.unsqueeze(-1), 0)
        return self.tp.all_reduce(x)


class ParallelLMHead(VocabParallelEmbedding):
    """hidden -> logits over the vocabulary; each rank scores its vocab range, then they are gathered."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TPGroup = SINGLE_RANK):
        super().__init__(vocab_size, hidden_size, tp)
        self.packed_weight: torch.Tensor | None = None  # set after loading by cpu_gemm.pack_linear_layers

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [S, hidden] -> [S, vocab]
        logits = cpu_gemm.linear(hidden, self.weight, None, self.packed_weight)  # [S, vocab_per_rank]
        if self.tp.size > 1:
            logits = self.tp.all_gather_last_dim(logits)  # [S, padded_vocab]
        return logits[:, : self.vocab_size]
