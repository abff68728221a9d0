"""Engine configuration: one dataclass, validated on construction, every field defaulted.

The cluster-level `ClusterConfig` (router, pools, autoscaler) will wrap this; the engine only needs
`EngineConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

_DTYPES = ("auto", "float32", "bfloat16", "float16")
_BACKENDS = ("auto", "torch", "cpu", "triton")


@dataclass
class EngineConfig:
    dtype: str = "auto"  # weights and KV cache dtype; auto = float32 on CPU, the checkpoint's dtype on GPU
    device: str = "cpu"  # "cpu" or "cuda[:N]"
    block_size: int = 16  # tokens per KV-cache block
    num_kv_blocks: int | None = None  # KV blocks to allocate; None = derive from kv_cache_memory_gib
    kv_cache_memory_gib: float = 2.0  # KV-cache budget when num_kv_blocks is None
    max_num_seqs: int = 256  # cap on sequences running at once
    max_num_batched_tokens: int = 2048  # token budget of one engine step (prefill chunks + decodes)
    max_model_len: int | None = None  # context cap; None = the model's max_position_embeddings
    enable_prefix_caching: bool = True  # reuse full KV blocks across requests by content hash
    scheduling_policy: str = "fcfs"  # "fcfs" or "priority" (lower Request.priority first, then arrival)
    attention_backend: str = "auto"  # auto = triton on CUDA, cpu (C++ decode kernel) on CPU; torch = plain torch
    num_threads: int | None = None  # torch intra-op threads on CPU; None = all cores
    seed: int = 0  # seed for unseeded sampling
    tensor_parallel_size: int = 1  # ranks one replica's model is sharded over (launch_tp_engine starts them)

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
        if self.attention_backend not in _BACKENDS:
            raise ValueError(f"attention_backend must be one of {_BACKENDS}, got {self.attention_backend!r}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.scheduling_policy not in ("fcfs", "priority"):
            raise ValueError(f"scheduling_policy must be 'fcfs' or 'priority', got {self.scheduling_policy!r}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.kv_cache_memory_gib <= 0:
            raise ValueError(f"kv_cache_memory_gib must be > 0, got {self.kv_cache_memory_gib}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if not isinstance(self.tensor_parallel_size, int) or self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be an integer >= 1, got {self.tensor_parallel_size!r}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}")


@dataclass
class ClusterConfig:
    """The whole cluster's configuration file. For now: which model and how its engine runs."""

    model: str = "models/tiny"  # HF-format model directory; `pdserve up` makes the tiny preset here if missing
    engine: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self) -> None:
        if isinstance(self.engine, dict):
            self.engine = _from_dict(EngineConfig, self.engine, "engine")
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model must be a non-empty path, got {self.model!r}")

    @classmethod
    def from_yaml(cls, path: str | Path) -> ClusterConfig:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: the top level must be a mapping")
        return _from_dict(cls, data, "")


def _from_dict(cls, data: dict[str, Any], prefix: str):
    """Build a config dataclass, naming the field in every error (`engine.block_size: ...`)."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{prefix + '.' if prefix else ''}{unknown[0]}: unknown field")
    try:
        return cls(**data)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{prefix + ': ' if prefix else ''}{exc}") from exc
