"""The fused C++ RMSNorm / add+RMSNorm / SwiGLU ops against the torch code they replace (the layers'
own fallback path), in float32 and bfloat16, on fresh random inputs each run."""

from __future__ import annotations

import pytest
import torch

from cluster.model.layers import RMSNorm, SiluAndMul
from kernels import cpu_decode


@pytest.fixture(scope="module", autouse=True)
def built():
    assert cpu_decode.load() is not None, "the CPU kernels must build on the CI machine"


def fused_and_plain(module):
    module.use_cpu_kernel = False
    yield module
    module.use_cpu_kernel = True
    yield module


# bf16: the same rounding steps as the torch code, but the float32 sum of squares runs in another
# order, so a value that lands on a rounding boundary may come out one bf16 step (2^-7 relative) apart.
BF16_STEP = dict(atol=1e-3, rtol=2**-7)


@pytest.mark.parametrize(
    "dtype,tol", [(torch.float32, dict(atol=1e-5, rtol=1e-5)), (torch.bfloat16, BF16_STEP)]
)
@pytest.mark.parametrize("shape", [(1, 64), (37, 512), (3, 5, 96)])
def test_rms_norm_and_add_rms_norm_match_the_torch_code(dtype, tol, shape):
    norm = RMSNorm(shape[-1], eps=1e-5).to(dtype)
    norm.weight.data = torch.randn(shape[-1]).to(dtype)
    x, residual = torch.randn(shape).to(dtype) * 3, torch.randn(shape).to(dtype)
    plain, fused = ([m(x), *m.add_and_norm(x, residual)] for m in fused_and_plain(norm))
    for want, got in zip(plain, fused, strict=True):
        assert got.dtype == dtype and got.shape == x.shape
        torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_silu_and_mul_matches_the_torch_code(dtype, atol):
    x = torch.randn(19, 2 * 352).to(dtype) * 4
    plain, fused = (m(x) for m in fused_and_plain(SiluAndMul()))
    assert fused.shape == (19, 352)
    torch.testing.assert_close(fused, plain, atol=atol, rtol=atol)


def test_non_contiguous_input_takes_the_torch_path():
    norm = RMSNorm(64)
    norm.use_cpu_kernel = True
    x = torch.randn(8, 4, 64).transpose(0, 1)  # a strided view, as a q/k head norm sees it
    torch.testing.assert_close(norm(x), x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps))


@pytest.mark.parametrize(
    "dtype,tol", [(torch.float32, dict(atol=1e-5, rtol=1e-5)), (torch.bfloat16, BF16_STEP)]
)
def test_rotary_matches_the_torch_code_on_strided_q_and_k(dtype, tol):
    from cluster.model.rotary import RotaryEmbedding

    rope = RotaryEmbedding(
        64,
        4096,
        500000.0,
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 1024,
        },
    )
    tokens, num_heads, num_kv_heads = 23, 8, 2
    qkv = torch.randn(tokens, (num_heads + 2 * num_kv_heads) * 64).to(
        dtype
    )  # q and k: views into it, as in the model
    q = qkv[:, : num_heads * 64].view(tokens, num_heads, 64)
    k = qkv[:, num_heads * 64 : (num_heads + num_kv_heads) * 64].view(tokens, num_kv_heads, 64)
    positions = torch.randint(0, 4096, (tokens,))
    plain, fused = (m(positions, q, k) for m in fused_and_plain(rope))
    for want, got in zip(plain, fused, strict=True):
        assert got.shape == want.shape and got.dtype == dtype
        torch.testing.assert_close(got, want, **tol)
