"""Small host-side helpers shared by the Triton kernel wrappers (no kernels here).

Every wrapper picks its tile sizes from `is_interpreter()`: the interpreter runs each program as
numpy ops in Python, so tiny tiles keep tests fast, while a GPU wants tiles big enough to feed its
tensor cores and hide memory latency.
"""

from __future__ import annotations

import functools
import os

import torch
import triton

LOG2E = 1.4426950408889634  # softmax in base 2: exp(x) = exp2(x * log2(e)), one fewer multiply in the loop


def is_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(n)


@functools.cache
def num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def device_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 for the interpreter (only shapes grids)."""
    if device.type != "cuda":
        return 1
    return num_sms(device.index if device.index is not None else torch.cuda.current_device())


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 tensors multiply in full precision: tf32 would drop ~3 digits that fp32 users expect."""
    return "ieee" if dtype == torch.float32 else "tf32"


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The kernels index the last (head_dim) axis with unit stride; everything else goes by stride."""
    return t if t.stride(-1) == 1 else t.contiguous()


def check_head_dim(head_dim: int) -> None:
    if head_dim % 16:
        raise ValueError(f"head_dim must be a multiple of 16 (tensor-core tiles), got {head_dim}")
