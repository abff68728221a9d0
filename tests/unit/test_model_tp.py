"""Tensor parallelism for real: two gloo ranks hold half the model each and give TP=1's logits."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cluster.attention.torch_backend import TorchAttentionBackend, metadata_for_prefill
from cluster.model.loader import load_model
from cluster.model.presets import Preset, make_model
from cluster.parallel.state import TPGroup

LENS = [13, 29]


def prefill_logits(model_dir, tp: TPGroup) -> torch.Tensor:
    model, cfg = load_model(model_dir, torch.float32, "cpu", tp)
    assert model.lm_head.weight.shape[0] == -(-cfg.vocab_size // tp.size)  # really sharded
    num_kv_heads = model.num_kv_heads_per_rank
    assert num_kv_heads == max(1, cfg.num_kv_heads // tp.size)
    backend = TorchAttentionBackend(cfg.num_layers, 8, 16, num_kv_heads, cfg.head_dim, torch.float32)
    ids = torch.randint(0, cfg.vocab_size, (sum(LENS),), generator=torch.Generator().manual_seed(0))
    positions = torch.cat([torch.arange(n) for n in LENS])
    with torch.no_grad():
        return model.compute_logits(model(ids, positions, backend, metadata_for_prefill(LENS, 16)))


def _worker(rank: int, world: int, init_file: str, model_dirs: list[str], out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for i, model_dir in enumerate(model_dirs):
            logits = prefill_logits(model_dir, TPGroup(rank=rank, size=world))
            torch.save(logits, f"{out_dir}/rank{rank}-model{i}.pt")
    finally:
        dist.destroy_process_group()


def test_tp2_matches_tp1(preset_model_dir, tmp_path):
    # an odd vocab (padded shards), one kv head (replicated on both ranks), q/k/v bias, tied embeddings
    odd = make_model(Preset("qwen2", 64, 128, 2, 4, 1, 515, 256, tie_word_embeddings=True), tmp_path / "odd")
    model_dirs = [str(odd), str(preset_model_dir("tiny-llama-gqa"))]
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), model_dirs, str(tmp_path)), nprocs=2, join=True)
    for i, model_dir in enumerate(model_dirs):
        expected = prefill_logits(model_dir, TPGroup())
        for rank in range(2):
            got = torch.load(tmp_path / f"rank{rank}-model{i}.pt")
            assert got.shape == expected.shape
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
