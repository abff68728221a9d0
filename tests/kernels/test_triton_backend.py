"""TritonAttentionBackend (interpreter) against TorchAttentionBackend on one mixed engine step."""

from __future__ import annotations

import pytest
import torch

from cluster.attention.metadata import AttentionMetadata
from cluster.attention.selector import create_attention_backend
from cluster.attention.torch_backend import TorchAttentionBackend

NUM_LAYERS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM = 2, 8, 2, 32

# (new tokens, context length after the step): two decodes (one on a one-token context), then a
# fresh prompt, a prompt with a cached prefix (two full blocks), and a later chunk of a chunked prefill.
STEP = [(1, 1), (1, 29), (13, 13), (9, 25), (6, 27)]
NUM_DECODES = 2


def step_metadata(num_blocks: int) -> AttentionMetadata:
    query_lens = [n for n, _ in STEP]
    seq_lens = [ctx for _, ctx in STEP]
    blocks_per_seq = [(ctx + BLOCK_SIZE - 1) // BLOCK_SIZE for ctx in seq_lens]
    perm = torch.randperm(num_blocks - 1) + 1  # shuffled; block 0 only pads the tables
    tables = torch.zeros(len(STEP), max(blocks_per_seq), dtype=torch.int64)
    slots, used = [], 0
    for i, ((n, ctx), nb) in enumerate(zip(STEP, blocks_per_seq, strict=True)):
        tables[i, :nb] = perm[used : used + nb]
        used += nb
        pos = torch.arange(ctx - n, ctx)
        slots.append(tables[i, pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE)
    return AttentionMetadata.build(NUM_DECODES, query_lens, seq_lens, tables, torch.cat(slots), "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_heads", [2, 8])
def test_mixed_step_matches_torch_backend(tolerance, dtype, num_heads):
    num_blocks = 20
    triton_backend = create_attention_backend(
        "triton", num_layers=NUM_LAYERS, num_blocks=num_blocks, block_size=BLOCK_SIZE,
        num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM, dtype=dtype, device=torch.device("cpu"))
    assert type(triton_backend).__name__ == "TritonAttentionBackend"
    torch_backend = TorchAttentionBackend(NUM_LAYERS, num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, dtype)
    # The cached context (prefixes, earlier chunks, decode histories): the same random pages in both.
    # Finite values: the torch gather path reads padding and masks it, which NaN would defeat.
    for layer in range(NUM_LAYERS):
        for caches in ("k_caches", "v_caches"):
            page = torch.randn(num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM).to(dtype)
            getattr(triton_backend, caches)[layer].copy_(page)
            getattr(torch_backend, caches)[layer].copy_(page)
    meta = step_metadata(num_blocks)
    num_tokens = meta.num_tokens
    written: list[int] = []
    triton_backend.layer_listener = written.append  # the KV-transfer hook sees every layer once
    for layer in range(NUM_LAYERS):  # the second layer reuses the step's cached host-side arguments
        qkv = torch.randn(num_tokens, num_heads + 2 * NUM_KV_HEADS, HEAD_DIM).to(dtype)
        q, k, v = qkv.split([num_heads, NUM_KV_HEADS, NUM_KV_HEADS], dim=1)  # strided views, as in the model
        got = triton_backend.forward(layer, q, k, v, meta)
        want = torch_backend.forward(layer, q, k, v, meta)
        assert got.shape == q.shape and torch.isfinite(got).all()
        torch.testing.assert_close(got, want, **tolerance(dtype))
        torch.testing.assert_close(triton_backend.k_caches[layer], torch_backend.k_caches[layer], atol=0, rtol=0)
        torch.testing.assert_close(triton_backend.v_caches[layer], torch_backend.v_caches[layer], atol=0, rtol=0)
    assert written == list(range(NUM_LAYERS))


def test_selector_refuses_triton_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        create_attention_backend("triton", num_layers=1, num_blocks=2, block_size=8, num_kv_heads=1,
                                 head_dim=32, dtype=torch.float32, device=torch.device("cpu"))
