"""Build a model from an HF checkpoint directory: config.json plus safetensors (one file or sharded).

Tensors are read one at a time through `safe_open`, handed in full to their parameter's
`weight_loader` (which copies this rank's shard and casts to the model dtype), then dropped, so peak
memory is the model plus one checkpoint tensor.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from cluster.model import cpu_gemm, cpu_kernels
from cluster.model.arch import ModelArchConfig
from cluster.model.layers import default_weight_loader
from cluster.model.llama import LlamaForCausalLM
from cluster.parallel.state import SINGLE_RANK, TPGroup

_INDEX_FILE = "model.safetensors.index.json"
_SINGLE_FILE = "model.safetensors"


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint, from its index when sharded."""
    index = model_dir / _INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    if (model_dir / _SINGLE_FILE).is_file():
        return [model_dir / _SINGLE_FILE]
    raise FileNotFoundError(f"no {_SINGLE_FILE} or {_INDEX_FILE} in {model_dir}")


def checkpoint_names(model_dir: Path) -> set[str]:
    """Every tensor name in the checkpoint, without reading any tensor."""
    index = model_dir / _INDEX_FILE
    if index.is_file():
        return set(json.loads(index.read_text())["weight_map"])
    names: set[str] = set()
    for path in checkpoint_files(model_dir):
        with safe_open(path, framework="pt", device="cpu") as f:
            names.update(f.keys())
    return names


def iter_checkpoint(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of the checkpoint, read lazily one by one."""
    for path in checkpoint_files(model_dir):
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def _target(name: str, model: LlamaForCausalLM) -> tuple[str, str | int | None]:
    """HF tensor name -> (our parameter name, shard id)."""
    for hf_proj, (fused, shard_id) in model.packed_modules.items():
        if f".{hf_proj}." in name:
            return name.replace(f".{hf_proj}.", f".{fused}."), shard_id
    return name, None


def load_weights(model: LlamaForCausalLM, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
    """Copy HF-named tensors into the model's (fused, sharded) parameters; every one must be covered."""
    params = dict(model.named_parameters(remove_duplicate=False))
    expected = _expected_hf_names(model)
    loaded: set[str] = set()
    for name, tensor in weights:
        if "rotary_emb.inv_freq" in name:
            continue  # old checkpoints saved rope buffers; we recompute them
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue  # some tied checkpoints store a copy; the embedding is the one that counts
        param_name, shard_id = _target(name, model)
        if param_name not in params:
            raise ValueError(f"checkpoint weight {name!r} has no counterpart in the {model.config.model_type} model")
        param = params[param_name]
        loader = getattr(param, "weight_loader", default_weight_loader)
        try:
            loader(param, tensor, shard_id)
        except ValueError as e:
            raise ValueError(f"cannot load checkpoint weight {name!r}: {e}") from e
        loaded.add(name)

    missing = sorted(expected - loaded)
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ValueError(f"checkpoint is missing weight(s) {', '.join(map(repr, missing[:5]))}{more}")


def _expected_hf_names(model: LlamaForCausalLM) -> set[str]:
    """The HF tensor names the model needs: fused parameters expand back to their parts."""
    unpacked: dict[str, list[str]] = {}
    for hf_proj, (fused, _) in model.packed_modules.items():
        unpacked.setdefault(fused, []).append(hf_proj)
    names = set()
    for name, _ in model.named_parameters():  # tied parameters appear once, under the embedding
        for fused, parts in unpacked.items():
            if f".{fused}." in name:
                names.update(name.replace(f".{fused}.", f".{part}.") for part in parts)
                break
        else:
            names.add(name)
    return names


def load_model(
    model_dir: str | Path,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    tp: TPGroup | None = None,
) -> tuple[LlamaForCausalLM, ModelArchConfig]:
    """Build the model for `model_dir` in `dtype` on `device` (this rank's shard) and load its weights."""
    model_dir = Path(model_dir)
    cfg = ModelArchConfig.from_dir(model_dir)
    if not cfg.tie_word_embeddings and "lm_head.weight" not in checkpoint_names(model_dir):
        # An lm_head-less checkpoint means the embedding is the output projection, whatever the config says
        cfg = dataclasses.replace(cfg, tie_word_embeddings=True)
    # Built directly in the target dtype and device: no float32 copy on the host first
    with torch.device(device), _default_dtype(dtype):
        model = LlamaForCausalLM(cfg, tp or SINGLE_RANK)
    load_weights(model, iter_checkpoint(model_dir))
    model.eval()
    if torch.device(device).type == "cpu":
        cpu_gemm.pack_linear_layers(model)  # weights packed once for oneDNN
        cpu_kernels.attach(model)  # fused RMSNorm / SwiGLU / rotary ops
    return model, cfg


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
