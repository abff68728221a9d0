"""Pick the attention backend for a device and a config value."""

from __future__ import annotations

import os

import torch

from cluster.attention.torch_backend import TorchAttentionBackend


def create_attention_backend(
    name: str,
    *,
    num_layers: int,
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
):
    """auto = triton on CUDA, cpu on CPU. `cpu` = torch ops plus the C++ paged decode kernel (falling
    back to plain torch when it cannot be built); `torch` = plain torch ops only (the reference);
    `triton` = the Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1 for tests)."""
    if name == "auto":
        name = "triton" if device.type == "cuda" else "cpu"
    if name == "triton":
        return _create_triton_backend(num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype, device)
    decode_kernel = None
    if name == "cpu":
        if device.type != "cpu":
            raise ValueError(f"attention_backend 'cpu' needs device 'cpu', got {device}")
        from kernels import cpu_decode

        decode_kernel = cpu_decode.load()
    return TorchAttentionBackend(
        num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype, device, decode_kernel=decode_kernel
    )


def _create_triton_backend(num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype, device):
    """Imported here, not at the top: the engine must load without Triton, and the interpreter flag
    (TRITON_INTERPRET) must be set before the kernels are defined."""
    device = torch.device(device)
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise ValueError("attention_backend 'triton' on CPU needs TRITON_INTERPRET=1 (tests only); use 'cpu'")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"attention_backend 'triton' needs a CUDA device, got {device}")
    try:
        from cluster.attention.triton_backend import TritonAttentionBackend
    except ImportError as exc:
        raise ValueError(f"attention_backend 'triton' needs the triton package ({exc}); use 'torch'") from exc
    return TritonAttentionBackend(num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype, device)
