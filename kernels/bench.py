"""Kernel benchmark: `python -m kernels.bench` (or `make bench-kernels`).

On a CUDA machine: correctness checks at small shapes, then each kernel timed at serving shapes
(kernels/bench_timing.py) against the copy bandwidth and matmul rate measured in the same run and
against torch SDPA on padded tensors; each timed shape is checked before it is timed.

Without a GPU it still runs, so it cannot rot: it sets TRITON_INTERPRET=1 before the kernels are
imported (the flag is read when a kernel is defined), runs the same correctness checks in the
Triton interpreter at small shapes in float32 and float16, says that timing needs a GPU, and exits 0.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernels.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"], help="timed dtype (GPU)")
    args = parser.parse_args(argv)

    on_gpu = torch.cuda.is_available() and not _interpreting()
    if not on_gpu:
        os.environ["TRITON_INTERPRET"] = "1"
    from kernels import bench_checks  # defines the kernels: only now that the mode is settled

    device = torch.device("cuda" if on_gpu else "cpu")
    # The interpreter's bf16 arithmetic is wrong, so the CPU path checks fp32 and fp16 only.
    dtypes = [torch.float32, getattr(torch, args.dtype)] if on_gpu else [torch.float32, torch.float16]
    print(f"correctness ({'GPU' if on_gpu else 'Triton interpreter on CPU'}, small shapes)")
    for dtype in dtypes:
        print(f" {dtype}")
        for result in bench_checks.run_small_checks(dtype, device):
            print(f"  {result}")
    if not on_gpu:
        print("\ntiming needs a GPU: no CUDA device here, so only the correctness checks ran (interpreter).")
        return 0
    from kernels import bench_timing

    bench_timing.run(getattr(torch, args.dtype), device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
