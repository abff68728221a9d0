"""cpu_gemm: the oneDNN-packed linear path gives F.linear's result at every row count, and loading a
model on CPU in float32 packs every projection and the LM head (never the embedding)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cluster.model import cpu_gemm
from cluster.model.layers import ParallelLMHead, VocabParallelEmbedding
from cluster.model.linear import ColumnParallelLinear, RowParallelLinear
from cluster.model.loader import load_model


@pytest.mark.parametrize("rows", [1, 3, cpu_gemm.PACKED_MIN_ROWS, 17, 64, 300])
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_linear_equals_f_linear(rows, with_bias):
    weight, x = torch.randn(96, 80), torch.randn(rows, 80)
    bias = torch.randn(96) if with_bias else None
    packed = torch.ops.mkldnn._reorder_linear_weight(weight)
    got = cpu_gemm.linear(x, weight, bias, packed)
    torch.testing.assert_close(got, F.linear(x, weight, bias), atol=1e-5, rtol=1e-5)


def test_loading_on_cpu_packs_every_projection_and_the_lm_head(tiny_model_dir):
    model, _ = load_model(tiny_model_dir, torch.float32)
    layers = [
        m for m in model.modules() if isinstance(m, ColumnParallelLinear | RowParallelLinear | ParallelLMHead)
    ]
    assert layers and all(m.packed_weight is not None for m in layers)
    embeddings = [m for m in model.modules() if type(m) is VocabParallelEmbedding]
    assert embeddings and not any(hasattr(m, "packed_weight") for m in embeddings)
    for m in layers:  # 20 rows: the packed copy is used, and computes what the plain weight does
        x = torch.randn(20, m.weight.shape[1])
        want = F.linear(
            x, m.weight, m.bias if isinstance(m, ColumnParallelLinear | RowParallelLinear) else None
        )
        if isinstance(m, ParallelLMHead):
            want = want[:, : m.vocab_size]
        torch.testing.assert_close(m(x), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("rows", [1, 5, 64])
def test_bf16_weights_pack_exactly_where_the_cpu_has_bf16_instructions(rows):
    weight, x = torch.randn(96, 80).bfloat16(), torch.randn(rows, 80).bfloat16()
    has_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert cpu_gemm.can_pack(weight) == has_bf16
    if has_bf16:  # bf16 takes the packed path at every row count
        packed = torch.ops.mkldnn._reorder_linear_weight(weight)
        got = cpu_gemm.linear(x, weight, None, packed)
        torch.testing.assert_close(got.float(), F.linear(x.float(), weight.float()), atol=0.05, rtol=0.02)
