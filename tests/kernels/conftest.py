"""Kernel tests run the Triton kernels on CPU in interpreter mode, on fresh random inputs each run.

TRITON_INTERPRET must be set before any @triton.jit kernel is defined, i.e. before kernels.triton_*
is first imported: hence the assignment above every import. Nothing under tests/unit or
tests/integration imports those modules, so this runs first in a whole-suite run too.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import random  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from kernels.paged_cases import make_paged_case  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_seed() -> int:
    """A new seed per test, printed so a failure (pytest shows captured stdout) can be replayed."""
    seed = random.randrange(2**31)
    print(f"torch seed {seed}")
    torch.manual_seed(seed)
    return seed


@pytest.fixture
def paged_case():
    """make_paged_case(seq_lens, num_kv_heads, head_dim, block_size, dtype): shuffled tables, NaN outside."""
    return make_paged_case


# Tolerances against the float64 ground truth and against the torch reference at the same dtype.
# fp16: the output is rounded to fp16 (2^-11 relative) and P is rounded to fp16 before P @ V.
TOLERANCES = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=3e-3, rtol=3e-3)}


@pytest.fixture
def tolerance():
    return lambda dtype: TOLERANCES[dtype]
