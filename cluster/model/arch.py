"""The architecture of a Llama-family checkpoint, read from its HF `config.json`.

One flat dataclass covers Llama, Mistral, Qwen2 and Qwen3: they differ only in biases, q/k norm, head
size and rope scaling. Both the transformers 4 spelling (`rope_theta`, `rope_scaling`, `torch_dtype`)
and the transformers 5 one (`rope_parameters`, `dtype`) are accepted, so a directory downloaded
elsewhere loads unchanged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
ROPE_TYPES = ("default", "linear", "llama3")
DTYPES = ("float32", "bfloat16", "float16")  # checkpoint dtypes, by name: the router reads configs without torch
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass
class ModelArchConfig:
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # None for plain rope, else {"rope_type": "linear" | "llama3", "factor": ..., ...} as transformers keys it
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v (Qwen2 always; Llama/Qwen3 when attention_bias is set)
    o_proj_bias: bool = False  # bias on o_proj (Llama/Qwen3 attention_bias; never Qwen2)
    mlp_bias: bool = False  # Llama's mlp_bias
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before rope
    # Mistral/Qwen sliding window; the model attends fully, so the engine caps context at this length
    sliding_window: int | None = None
    torch_dtype: str = "float32"  # dtype the checkpoint was saved in
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {self.model_type!r}")
        for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "vocab_size", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be > 0, got {self.rope_theta}")
        if self.rope_scaling is not None:
            _validate_rope_scaling(self.rope_scaling)
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 or None, got {self.sliding_window}")
        if self.torch_dtype not in DTYPES:
            raise ValueError(f"torch_dtype must be one of {tuple(DTYPES)}, got {self.torch_dtype!r}")
        if not all(isinstance(t, int) and 0 <= t for t in self.eos_token_ids):
            raise ValueError(f"eos_token_ids must be non-negative token ids, got {self.eos_token_ids!r}")

    @property
    def checkpoint_dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.torch_dtype)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelArchConfig:
        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"no config.json in {path}")
        config = json.loads(config_file.read_text())
        generation_file = path / "generation_config.json"
        generation = json.loads(generation_file.read_text()) if generation_file.is_file() else {}
        return cls.from_hf_config(config, generation)

    @classmethod
    def from_hf_config(cls, config: dict[str, Any], generation: dict[str, Any] | None = None) -> ModelArchConfig:
        """Map HF config keys (plus generation_config.json, for eos/bos) onto our fields."""
        generation = generation or {}
        model_type = config.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {model_type!r} in config.json: pdserve serves {MODEL_TYPES}"
            )
        if config.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act must be 'silu', got {config['hidden_act']!r}")
        hidden_size = _require(config, "hidden_size")
        num_heads = _require(config, "num_attention_heads")
        # Qwen3's transformers default is 128, not hidden/heads; every real Qwen3 config states it anyway
        default_head_dim = 128 if model_type == "qwen3" else hidden_size // num_heads
        rope_theta, rope_scaling = _parse_rope(config)
        bias = bool(config.get("attention_bias", False))
        sliding_window = config.get("sliding_window")
        if model_type in ("qwen2", "qwen3") and not config.get("use_sliding_window", False):
            sliding_window = None  # Qwen configs carry a window they only use when this flag is set
        return cls(
            model_type=model_type,
            hidden_size=hidden_size,
            intermediate_size=_require(config, "intermediate_size"),
            num_layers=_require(config, "num_hidden_layers"),
            num_heads=num_heads,
            num_kv_heads=config.get("num_key_value_heads") or num_heads,
            head_dim=config.get("head_dim") or default_head_dim,
            vocab_size=_require(config, "vocab_size"),
            max_position_embeddings=_require(config, "max_position_embeddings"),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=True if model_type == "qwen2" else bias,
            o_proj_bias=False if model_type == "qwen2" else bias,
            mlp_bias=bool(config.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            sliding_window=sliding_window,
            torch_dtype=_parse_dtype(config.get("dtype") or config.get("torch_dtype")),
            eos_token_ids=_token_ids(generation.get("eos_token_id", config.get("eos_token_id"))),
            bos_token_id=generation.get("bos_token_id", config.get("bos_token_id")),
        )


def _require(config: dict[str, Any], key: str) -> Any:
    if key not in config:
        raise ValueError(f"config.json is missing required field {key!r}")
    return config[key]


def _parse_rope(config: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, scaling) from `rope_scaling` (transformers 4) or `rope_parameters` (transformers 5)."""
    params = config.get("rope_scaling") or config.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise ValueError(f"rope_scaling/rope_parameters must be a mapping, got {params!r}")
    # transformers 5 keeps theta inside rope_parameters; it wins over a top-level one, as in transformers
    theta = float(params.get("rope_theta") or config.get("rope_theta") or 10000.0)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "type")}
    scaling["rope_type"] = rope_type
    if rope_type == "llama3" and "original_max_position_embeddings" not in scaling:
        scaling["original_max_position_embeddings"] = config.get(
            "original_max_position_embeddings", config.get("max_position_embeddings")
        )
    return theta, scaling


def _validate_rope_scaling(scaling: dict[str, Any]) -> None:
    rope_type = scaling.get("rope_type")
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_scaling.rope_type must be one of {ROPE_TYPES}, got {rope_type!r}")
    required = _LLAMA3_KEYS if rope_type == "llama3" else ("factor",)
    for key in required:
        if not isinstance(scaling.get(key), int | float) or not scaling[key] > 0:
            raise ValueError(f"rope_scaling.{key} must be a positive number for {rope_type}, got {scaling.get(key)!r}")
    if rope_type == "llama3" and scaling["high_freq_factor"] == scaling["low_freq_factor"]:
        raise ValueError("rope_scaling.high_freq_factor must differ from low_freq_factor")


def _parse_dtype(value: Any) -> str:
    if value is None:
        return "float32"  # what transformers loads when a config names no dtype
    name = str(value).removeprefix("torch.")
    return {"float": "float32", "half": "float16", "bf16": "bfloat16", "fp16": "float16"}.get(name, name)


def _token_ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list | tuple) else [int(value)]
