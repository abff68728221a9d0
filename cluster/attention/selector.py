"""Pick the attention backend for a device and a config value."""

from __future__ import annotations

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
    back to plain torch when it cannot be built); `torch` = plain torch ops only (the reference)."""
    if name == "auto":
        name = "triton" if device.type == "cuda" else "cpu"
    if name == "triton":
        raise ValueError("attention_backend 'triton' is not available yet; use 'torch'")
    decode_kernel = None
    if name == "cpu":
        if device.type != "cpu":
            raise ValueError(f"attention_backend 'cpu' needs device 'cpu', got {device}")
        from kernels import cpu_decode

        decode_kernel = cpu_decode.load()
    return TorchAttentionBackend(
        num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype, device, decode_kernel=decode_kernel
    )
