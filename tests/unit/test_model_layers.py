"""Layers: norm and rotary against transformers; tensor-parallel sharding simulated rank by rank.

A layer built for rank r of n loads its shard without torch.distributed; the collectives are replaced by
the identity and the per-rank results are summed or concatenated here, which is what all_reduce and
all_gather would do.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cluster.model.layers import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    SiluAndMul,
    VocabParallelEmbedding,
    rope_inv_freq,
)
from cluster.parallel.state import TPGroup

transformers = pytest.importorskip("transformers")


class LocalTP(TPGroup):
    """A rank of a group whose collectives are done by the test: each rank's partial result comes back."""

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def all_gather_last_dim(self, t: torch.Tensor) -> torch.Tensor:
        return t


def ranks(size: int) -> list[TPGroup]:
    return [LocalTP(rank=r, size=size) for r in range(size)]


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_transformers(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x, residual, weight = randn(5, 64, seed=1).to(dtype), randn(5, 64, seed=2).to(dtype), randn(64, seed=3).to(dtype)
    ours, ref = RMSNorm(64, 1e-5).to(dtype), LlamaRMSNorm(64, 1e-5).to(dtype)
    ours.weight.data.copy_(weight)
    ref.weight.data.copy_(weight)
    assert torch.equal(ours(x), ref(x))
    normed, summed = ours.add_and_norm(x, residual)
    assert torch.equal(summed, residual + x) and torch.equal(normed, ref(residual + x))


def hf_inv_freq(rope_parameters: dict, head_dim: int = 64) -> torch.Tensor:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(
        hidden_size=head_dim * 4, num_attention_heads=4, max_position_embeddings=4096,
        rope_parameters=dict(rope_parameters),
    )
    init = ROPE_INIT_FUNCTIONS.get(rope_parameters["rope_type"], LlamaRotaryEmbedding.compute_default_rope_parameters)
    return init(config)[0]


@pytest.mark.parametrize(
    "params",
    [
        {"rope_type": "default", "rope_theta": 10000.0},
        {"rope_type": "default", "rope_theta": 500000.0},
        {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
        {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
         "high_freq_factor": 4.0, "original_max_position_embeddings": 1024},
    ],
    ids=["default", "default-500k", "linear", "llama3"],
)
def test_rope_inv_freq_matches_transformers(params):
    scaling = None if params["rope_type"] == "default" else {k: v for k, v in params.items() if k != "rope_theta"}
    assert torch.equal(rope_inv_freq(64, params["rope_theta"], scaling), hf_inv_freq(params))


def test_rotary_matches_transformers_apply():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    head_dim, inv_freq = 32, rope_inv_freq(32, 10000.0)
    rope = RotaryEmbedding(head_dim, 512, 10000.0)
    positions = torch.tensor([0, 1, 2, 300, 7, 511])
    q, k = randn(6, 4, head_dim, seed=1), randn(6, 2, head_dim, seed=2)
    freqs = positions[:, None].float() * inv_freq  # HF's LlamaRotaryEmbedding.forward
    emb = torch.cat((freqs, freqs), dim=-1)
    # HF layout is [B, H, S, D]; ours is [T, H, D]
    ref_q, ref_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], emb.cos()[None], emb.sin()[None])
    out_q, out_k = rope(positions, q, k)
    torch.testing.assert_close(out_q, ref_q[0].transpose(0, 1), atol=1e-6, rtol=0)
    torch.testing.assert_close(out_k, ref_k[0].transpose(0, 1), atol=1e-6, rtol=0)


def test_silu_and_mul():
    x = randn(3, 8)
    torch.testing.assert_close(SiluAndMul()(x), F.silu(x[:, :4]) * x[:, 4:])


@pytest.mark.parametrize("tp_size", [1, 2, 4])
def test_column_parallel_concatenates_to_full(tp_size):
    w, b, x = randn(16, 8, seed=1), randn(16, seed=2), randn(3, 8, seed=3)
    outs = []
    for tp in ranks(tp_size):
        layer = ColumnParallelLinear(8, 16, bias=True, tp=tp)
        layer.weight.weight_loader(layer.weight, w)
        layer.bias.weight_loader(layer.bias, b)
        outs.append(layer(x))
    torch.testing.assert_close(torch.cat(outs, -1), F.linear(x, w, b))


@pytest.mark.parametrize("tp_size", [1, 2, 4])
def test_row_parallel_sums_to_full_with_bias_once(tp_size):
    w, b, x = randn(8, 16, seed=1), randn(8, seed=2), randn(3, 16, seed=3)
    total = 0
    for tp in ranks(tp_size):
        layer = RowParallelLinear(16, 8, bias=True, tp=tp)
        layer.weight.weight_loader(layer.weight, w)
        layer.bias.weight_loader(layer.bias, b)
        shard = x.chunk(tp_size, -1)[tp.rank]  # the column-parallel layer before hands each rank its slice
        total = total + layer(shard)
    torch.testing.assert_close(total, F.linear(x, w, b))


@pytest.mark.parametrize("tp_size", [1, 2])
def test_merged_gate_up_holds_each_ranks_slice_of_both(tp_size):
    gate, up, x = randn(12, 8, seed=1), randn(12, 8, seed=2), randn(3, 8, seed=3)
    gates, ups = [], []
    for tp in ranks(tp_size):
        layer = MergedColumnParallelLinear(8, [12, 12], tp=tp)
        layer.weight.weight_loader(layer.weight, gate, 0)
        layer.weight.weight_loader(layer.weight, up, 1)
        g, u = layer(x).chunk(2, -1)  # each rank: [its gate slice | its up slice]
        gates.append(g)
        ups.append(u)
    torch.testing.assert_close(torch.cat(gates, -1), F.linear(x, gate))
    torch.testing.assert_close(torch.cat(ups, -1), F.linear(x, up))


@pytest.mark.parametrize(("num_kv_heads", "tp_size"), [(2, 1), (2, 2), (4, 2), (1, 2), (2, 4)])
def test_qkv_shards_whole_heads_and_replicates_scarce_kv_heads(num_kv_heads, tp_size):
    D, num_heads, hidden = 4, 4, 8
    wq, wk, wv = randn(num_heads * D, hidden, seed=1), randn(num_kv_heads * D, hidden, seed=2), randn(
        num_kv_heads * D, hidden, seed=3
    )
    bq, bk, bv = randn(num_heads * D, seed=4), randn(num_kv_heads * D, seed=5), randn(num_kv_heads * D, seed=6)
    x = randn(3, hidden, seed=7)
    full_q, full_k, full_v = F.linear(x, wq, bq), F.linear(x, wk, bk), F.linear(x, wv, bv)
    qs = []
    for tp in ranks(tp_size):
        layer = QKVParallelLinear(hidden, D, num_heads, num_kv_heads, bias=True, tp=tp)
        for shard_id, w, b in (("q", wq, bq), ("k", wk, bk), ("v", wv, bv)):
            layer.weight.weight_loader(layer.weight, w, shard_id)
            layer.bias.weight_loader(layer.bias, b, shard_id)
        q, k, v = layer(x).split([layer.q_size, layer.kv_size, layer.kv_size], -1)
        qs.append(q)
        # the kv heads this rank holds are the ones its query heads attend with (GQA grouping)
        heads_per_kv = num_heads // num_kv_heads
        first_kv = tp.rank * layer.num_heads_per_rank // heads_per_kv
        kv_cols = slice(first_kv * D, first_kv * D + layer.kv_size)
        torch.testing.assert_close(k, full_k[:, kv_cols])
        torch.testing.assert_close(v, full_v[:, kv_cols])
    torch.testing.assert_close(torch.cat(qs, -1), full_q)


def test_qkv_rejects_heads_that_do_not_divide():
    with pytest.raises(ValueError, match="attention heads"):
        QKVParallelLinear(8, 4, 6, 2, tp=LocalTP(rank=0, size=4))
    with pytest.raises(ValueError, match="kv heads"):
        QKVParallelLinear(8, 4, 12, 3, tp=LocalTP(rank=0, size=2))


def test_weight_loader_rejects_wrong_shapes():
    layer = QKVParallelLinear(8, 4, 4, 2)
    with pytest.raises(ValueError, match="shape mismatch"):
        layer.weight.weight_loader(layer.weight, torch.zeros(12, 8), "k")
    with pytest.raises(ValueError, match="shard_id"):
        layer.weight.weight_loader(layer.weight, torch.zeros(16, 8), "x")
    row = RowParallelLinear(16, 8)
    with pytest.raises(ValueError, match="shape mismatch"):
        row.weight.weight_loader(row.weight, torch.zeros(8, 15))


@pytest.mark.parametrize("tp_size", [1, 2, 3, 4])
def test_vocab_parallel_embedding_and_lm_head_pad_and_reassemble(tp_size):
    vocab, hidden = 10, 6  # 10 is not a multiple of 3 or 4: the last rank holds padding rows
    w = randn(vocab, hidden, seed=1)
    ids = torch.tensor([0, 9, 3, 5, 7, 2])
    h = randn(4, hidden, seed=2)
    embedded, logits = 0, []
    for tp in ranks(tp_size):
        emb = VocabParallelEmbedding(vocab, hidden, tp)
        head = ParallelLMHead(vocab, hidden, tp)
        assert emb.padded_vocab_size % tp_size == 0 and emb.padded_vocab_size >= vocab
        emb.weight.weight_loader(emb.weight, w)
        head.weight.weight_loader(head.weight, w)
        embedded = embedded + emb(ids)  # all_reduce
        logits.append(F.linear(h, head.weight))  # what each rank contributes to the all_gather
    torch.testing.assert_close(embedded, F.embedding(ids, w))
    torch.testing.assert_close(torch.cat(logits, -1)[:, :vocab], F.linear(h, w))
    assert torch.cat(logits, -1)[:, vocab:].abs().sum() == 0  # padding rows are zero


def test_lm_head_trims_padding_at_tp1():
    head = ParallelLMHead(10, 6)
    head.weight.weight_loader(head.weight, randn(10, 6))
    assert head(randn(2, 6)).shape == (2, 10)


def test_every_parameter_has_a_weight_loader():
    for module in (ColumnParallelLinear(4, 4, bias=True), MergedColumnParallelLinear(4, [4, 4]),
                   QKVParallelLinear(8, 4, 2, 1, bias=True), RowParallelLinear(4, 4, bias=True),
                   VocabParallelEmbedding(10, 4), RMSNorm(4)):
        for name, param in module.named_parameters():
            assert callable(getattr(param, "weight_loader", None)), name
            assert not param.requires_grad


def test_tp_group_validates_and_is_a_no_op_at_size_1():
    t = torch.ones(3)
    group = TPGroup()
    assert group.all_reduce(t) is t and group.all_gather_last_dim(t) is t
    with pytest.raises(ValueError, match="rank"):
        TPGroup(rank=2, size=2)
    with pytest.raises(ValueError, match="size"):
        TPGroup(rank=0, size=0)
