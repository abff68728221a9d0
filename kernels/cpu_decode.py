"""The CPU kernels (kernels/csrc/): paged decode attention, and the fused RMSNorm / SwiGLU / rotary ops
of cpu_elementwise.cpp (torch.ops.pdserve_cpu.*), built on first use.

`load()` compiles it with torch's C++ extension builder (cached under TORCH_EXTENSIONS_DIR, so only
the first process on a machine pays the ~30 s) and returns the op, or None when no compiler is
available; callers then fall back to the gather + SDPA path in plain torch.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_SOURCES = [Path(__file__).parent / "csrc" / name
            for name in ("paged_decode_attention.cpp", "cpu_elementwise.cpp", "kv_block_copy.cpp")]


def _extension_name() -> str:
    """Named by the sources' content: two checkouts (or versions) on one machine never share a build
    directory under TORCH_EXTENSIONS_DIR, where one would load the other's stale library."""
    digest = hashlib.sha256(b"".join(path.read_bytes() for path in _SOURCES)).hexdigest()[:12]
    return f"pdserve_cpu_kernels_{digest}"


@functools.cache
def load():
    try:
        from torch.utils.cpp_extension import load

        load(
            name=_extension_name(),
            sources=[str(path) for path in _SOURCES],
            extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffast-math"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
        return torch.ops.pdserve_cpu.paged_decode_attention
    except Exception as exc:  # no compiler, no ninja, no headers: the torch path still works
        logger.warning("CPU paged-attention kernel unavailable (%s); using gather + SDPA", exc)
        return None


def loaded() -> bool:
    """Whether load() already succeeded in this process (without building or loading anything now)."""
    return load.cache_info().currsize > 0 and load() is not None


def paged_decode_reference(
    q: torch.Tensor,  # [B, Hq, D]
    k_cache: torch.Tensor,  # [N, bs, Hkv, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks]
    seq_lens: torch.Tensor,  # [B]
    scale: float,
) -> torch.Tensor:  # [B, Hq, D] float32
    """Float64 loop-per-sequence reference with the kernel's signature, for tests."""
    block_size = k_cache.shape[1]
    outs = []
    for b in range(q.shape[0]):
        n = int(seq_lens[b])
        blocks = block_tables[b, : (n + block_size - 1) // block_size]
        k = k_cache[blocks].flatten(0, 1)[:n].double()  # [n, Hkv, D]
        v = v_cache[blocks].flatten(0, 1)[:n].double()
        group = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[b].double(), k) * scale
        outs.append(torch.einsum("hn,nhd->hd", scores.softmax(-1), v))
    return torch.stack(outs).float()
