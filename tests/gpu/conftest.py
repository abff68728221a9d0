"""GPU tests: the engine, its Triton kernels and a KV transfer on a CUDA device.

Collected only where CUDA is available: a CPU-only machine (CI included) has no device to run them
on, and the CPU paths they mirror are tested under tests/integration and tests/kernels. On a GPU
machine: `python -m pytest -q tests/gpu` (tools/gpu_check.sh runs them with the kernel benchmark).
"""

import torch

collect_ignore_glob = [] if torch.cuda.is_available() else ["test_*.py"]
