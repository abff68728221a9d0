"""Rotary position embeddings (RoPE), the half-rotation ("neox") layout Llama uses in HF.

Each head vector x = [x1 | x2] (halves of size D/2) is rotated pairwise, pair i = (x1[i], x2[i]) by
angle pos * inv_freq[i]. cos/sin are precomputed for every position once, so a step only gathers rows.
Frequencies follow transformers bit for bit (default, `linear` and `llama3` scaling), so logits match it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None = None) -> torch.Tensor:
    """inv_freq[i] = theta^(-2i/D), then rescaled as `scaling` says: [D/2] float32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    rope_type = scaling["rope_type"]
    if rope_type == "linear":
        # Dividing the frequencies is the same as dividing the positions (position interpolation)
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    raise ValueError(f"unsupported rope_type {rope_type!r}")


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1: keep high frequencies, divide low ones by `factor`, blend smoothly in between."""
    factor = scaling["factor"]
    low_freq_factor = scaling["low_freq_factor"]
    high_freq_factor = scaling["high_freq_factor"]
    old_context_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor

    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(
        self,
        head_dim: int,
        max_positions: int,
        theta: float,
        scaling: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.head_dim = head_dim
        inv_freq = rope_inv_freq(head_dim, theta, scaling)  # [D/2]
        positions = torch.arange(max_positions, dtype=torch.float)  # [P]
        freqs = positions[:, None] * inv_freq[None, :]  # [P, D/2]
        # float32 whatever the model dtype (explicit dtypes above; the loader builds the model in its dtype
        # rather than casting it), so angles at large positions stay exact; rows are cast per step
        cache = torch.cat([freqs.cos(), freqs.sin()], dim=-1)  # [P, D]
        self.register_buffer("cos_sin_cache", cache, persistent=False)
        self.use_cpu_kernel = False  # set by cpu_kernels.attach

    def forward(
        self,
        positions: torch.Tensor,  # [T]
        q: torch.Tensor,  # [T, Hq, D]
        k: torch.Tensor,  # [T, Hkv, D]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.use_cpu_kernel:  # one fused op (kernels/csrc/cpu_elementwise.cpp), same roundings
            return torch.ops.pdserve_cpu.rotary(q, k, self.cos_sin_cache, positions)
        cos_sin = self.cos_sin_cache.index_select(0, positions).to(q.dtype)  # [T, D]
        cos, sin = cos_sin.unsqueeze(1).chunk(2, dim=-1)  # [T, 1, D/2] each
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)  # [T, H, D/2] each
    # [x1 | x2] * [cos | cos] + [-x2 | x1] * [sin | sin], as HF's rotate_half writes it
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
