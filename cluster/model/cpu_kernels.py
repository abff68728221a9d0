"""Switches a CPU model's RMSNorms, SwiGLU gates and rotary embeddings to the fused C++ ops of
kernels/csrc/cpu_elementwise.cpp.

At decode batch sizes those small ops cost more in dispatch than in arithmetic: RMSNorm with its
residual add is ~9 torch ops, the gate 3, rotary ~15. The fused ops round where the torch code does,
so outputs match it (to one step of the dtype, where a float32 sum runs in another
order). Without a compiler the extension does not
build (kernels.cpu_decode.load returns None) and the layers keep their torch code.
"""

from __future__ import annotations

from torch import nn

from cluster.model.layers import RMSNorm, SiluAndMul
from cluster.model.rotary import RotaryEmbedding


def attach(model: nn.Module) -> int:
    """Use the fused ops in every RMSNorm, SiluAndMul and RotaryEmbedding of `model`; returns how many."""
    from kernels import cpu_decode

    if cpu_decode.load() is None:
        return 0
    switched = 0
    for module in model.modules():
        if isinstance(module, RMSNorm | SiluAndMul | RotaryEmbedding):
            module.use_cpu_kernel = True
            switched += 1
    return switched
