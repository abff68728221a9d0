"""Model presets and `make_model`: a real HF-format checkpoint with random weights from a fixed seed.

The directory it writes is what transformers and `load_model` both read: config.json,
generation_config.json, safetensors weights (one file or sharded with an index), and a locally trained
byte-level BPE tokenizer with a ChatML chat template. Same preset and seed give the same bytes.

Weights are not HF's std-0.02 init: that makes every block a near-identity, so greedy decoding just
echoes a function of the last token. Projections get std 1/sqrt(fan_in) (each block moves the residual
stream by about as much as the embedding) and the LM head is scaled for logits of std ~4, so greedy
continuations depend on the whole context and vary.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from cluster.model.arch import DTYPES
from cluster.model.toy_tokenizer import BOS, CHAT_TEMPLATE, EOS, IM_END, PAD, SPECIAL_TOKENS, train_tokenizer


@dataclass(frozen=True)
class Preset:
    model_type: str  # llama | mistral | qwen2 | qwen3
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    max_position_embeddings: int
    head_dim: int | None = None  # None: hidden_size // num_heads
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    rms_norm_eps: float = 1e-5
    dtype: str = "float32"  # dtype the weights are saved in
    # transformers 4 spelling (rope_theta/rope_scaling/torch_dtype at top level) instead of 5's
    # (rope_parameters/dtype): real checkpoints use both, so presets exercise both
    legacy_config: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # more config.json keys

    @property
    def add_bos(self) -> bool:
        return self.model_type in ("llama", "mistral")  # Qwen tokenizers add no BOS


_LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 256,
}

PRESETS: dict[str, Preset] = {
    "tiny": Preset("llama", 256, 704, 4, 4, 2, 2048, 2048, rope_theta=500000.0),
    "small": Preset("llama", 512, 1408, 8, 8, 4, 8000, 4096, rope_theta=500000.0, dtype="bfloat16"),
    "tiny-llama-gqa": Preset(
        "llama", 128, 352, 2, 8, 2, 1024, 2048, rope_theta=500000.0, rope_scaling=_LLAMA3_SCALING, legacy_config=True
    ),
    "tiny-qwen2": Preset(
        "qwen2", 128, 352, 2, 4, 2, 1024, 2048, tie_word_embeddings=True, rope_theta=1000000.0, rms_norm_eps=1e-6
    ),
    "tiny-qwen3": Preset(
        "qwen3", 128, 352, 2, 4, 2, 1024, 2048, head_dim=48, rope_theta=1000000.0, rms_norm_eps=1e-6
    ),
    "tiny-mistral": Preset("mistral", 128, 352, 2, 4, 1, 1024, 2048, legacy_config=True),
}

_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def hf_config(preset: Preset) -> dict[str, Any]:
    """config.json as transformers writes it for this architecture."""
    p = preset
    head_dim = p.head_dim or p.hidden_size // p.num_heads
    config: dict[str, Any] = {
        "architectures": [_ARCHITECTURES[p.model_type]],
        "model_type": p.model_type,
        "hidden_size": p.hidden_size,
        "intermediate_size": p.intermediate_size,
        "num_hidden_layers": p.num_layers,
        "num_attention_heads": p.num_heads,
        "num_key_value_heads": p.num_kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": p.max_position_embeddings,
        "rms_norm_eps": p.rms_norm_eps,
        "vocab_size": p.vocab_size,
        "tie_word_embeddings": p.tie_word_embeddings,
        "initializer_range": 0.02,
        "attention_dropout": 0.0,
        "use_cache": True,
        "bos_token_id": SPECIAL_TOKENS.index(BOS),
        "eos_token_id": SPECIAL_TOKENS.index(EOS if p.add_bos else IM_END),
        "pad_token_id": SPECIAL_TOKENS.index(PAD),
    }
    if p.model_type in ("llama", "qwen3"):
        config["attention_bias"] = False
    if p.model_type == "llama":
        config["mlp_bias"] = False
    if p.model_type in ("mistral", "qwen2", "qwen3"):
        config["sliding_window"] = None  # full attention, which is all the engine implements
    if p.model_type in ("qwen2", "qwen3"):
        config["use_sliding_window"] = False
        config["max_window_layers"] = p.num_layers
    if p.legacy_config:
        config["rope_theta"] = p.rope_theta
        config["rope_scaling"] = dict(p.rope_scaling) if p.rope_scaling else None
        config["torch_dtype"] = p.dtype
    else:
        config["rope_parameters"] = {"rope_type": "default", **(p.rope_scaling or {}), "rope_theta": p.rope_theta}
        config["dtype"] = p.dtype
    config.update(p.extra)
    return dict(sorted(config.items()))


def random_weights(preset: Preset, seed: int) -> dict[str, torch.Tensor]:
    """HF-named float32 tensors, drawn in a fixed order from one seeded generator."""
    p = preset
    gen = torch.Generator().manual_seed(seed)
    head_dim = p.head_dim or p.hidden_size // p.num_heads
    H, inter = p.hidden_size, p.intermediate_size
    q_size, kv_size = p.num_heads * head_dim, p.num_kv_heads * head_dim

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    def norm_weight(dim: int) -> torch.Tensor:
        return 1.0 + normal(dim, std=0.1)  # not all ones, so a norm weight loaded wrong shows

    logit_std = 4.0
    weights = {"model.embed_tokens.weight": normal(p.vocab_size, H, std=logit_std / math.sqrt(H))}
    qkv_bias = p.model_type == "qwen2"
    for i in range(p.num_layers):
        prefix = f"model.layers.{i}"
        weights[f"{prefix}.input_layernorm.weight"] = norm_weight(H)
        weights[f"{prefix}.self_attn.q_proj.weight"] = normal(q_size, H, std=H**-0.5)
        weights[f"{prefix}.self_attn.k_proj.weight"] = normal(kv_size, H, std=H**-0.5)
        weights[f"{prefix}.self_attn.v_proj.weight"] = normal(kv_size, H, std=H**-0.5)
        if qkv_bias:
            for name, size in (("q", q_size), ("k", kv_size), ("v", kv_size)):
                weights[f"{prefix}.self_attn.{name}_proj.bias"] = normal(size, std=0.1)
        if p.model_type == "qwen3":
            weights[f"{prefix}.self_attn.q_norm.weight"] = norm_weight(head_dim)
            weights[f"{prefix}.self_attn.k_norm.weight"] = norm_weight(head_dim)
        weights[f"{prefix}.self_attn.o_proj.weight"] = normal(H, q_size, std=q_size**-0.5)
        weights[f"{prefix}.post_attention_layernorm.weight"] = norm_weight(H)
        weights[f"{prefix}.mlp.gate_proj.weight"] = normal(inter, H, std=H**-0.5)
        weights[f"{prefix}.mlp.up_proj.weight"] = normal(inter, H, std=H**-0.5)
        weights[f"{prefix}.mlp.down_proj.weight"] = normal(H, inter, std=inter**-0.5)
    weights["model.norm.weight"] = norm_weight(H)
    if not p.tie_word_embeddings:
        weights["lm_head.weight"] = normal(p.vocab_size, H, std=logit_std / math.sqrt(H))
    return weights


def _save_weights(weights: dict[str, torch.Tensor], out_dir: Path, num_shards: int) -> None:
    metadata = {"format": "pt"}  # transformers refuses safetensors files without it
    if num_shards == 1:
        save_file(weights, out_dir / "model.safetensors", metadata=metadata)
        return
    names = list(weights)
    per_shard = -(-len(names) // num_shards)
    weight_map = {}
    for s in range(num_shards):
        file_name = f"model-{s + 1:05d}-of-{num_shards:05d}.safetensors"
        chunk = {n: weights[n] for n in names[s * per_shard : (s + 1) * per_shard]}
        save_file(chunk, out_dir / file_name, metadata=metadata)
        weight_map.update(dict.fromkeys(chunk, file_name))
    total_size = sum(t.numel() * t.element_size() for t in weights.values())
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    _write_json(out_dir / "model.safetensors.index.json", index)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_tokenizer(preset: Preset, out_dir: Path) -> None:
    style = "qwen2" if preset.model_type in ("qwen2", "qwen3") else "llama3"
    tokenizer = train_tokenizer(preset.vocab_size, style)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    special = {
        "bos_token": BOS if preset.add_bos else None,
        "eos_token": EOS if preset.add_bos else IM_END,
        "pad_token": PAD,
        "unk_token": None,  # byte-level BPE has no unknowns; left out, transformers invents <|endoftext|>
    }
    added = {
        str(tokenizer.token_to_id(t)): {
            "content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True
        }
        for t in SPECIAL_TOKENS
    }
    _write_json(out_dir / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": preset.add_bos,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": preset.max_position_embeddings,
        "added_tokens_decoder": added,
        "chat_template": CHAT_TEMPLATE,
    })
    _write_json(out_dir / "special_tokens_map.json", {k: v for k, v in special.items() if v is not None})


def make_model(
    preset: str | Preset,
    out_dir: str | Path,
    seed: int = 0,
    dtype: str | None = None,
    num_shards: int = 1,
) -> Path:
    """Write a checkpoint directory for `preset` (a PRESETS name or a Preset) and return its path.

    dtype overrides the preset's save dtype (float32 | bfloat16 | float16); num_shards > 1 writes
    model-0000i-of-0000n.safetensors files plus model.safetensors.index.json.
    """
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
        preset = PRESETS[preset]
    if dtype is not None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
        preset = replace(preset, dtype=dtype)
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    weights = {k: v.to(getattr(torch, preset.dtype)) for k, v in random_weights(preset, seed).items()}
    _save_weights(weights, out, num_shards)
    config = hf_config(preset)
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", {
        "bos_token_id": config["bos_token_id"],
        "eos_token_id": [SPECIAL_TOKENS.index(EOS), SPECIAL_TOKENS.index(IM_END)],
        "pad_token_id": config["pad_token_id"],
        "do_sample": False,
    })
    _write_tokenizer(preset, out)
    return out

