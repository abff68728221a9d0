"""A tensor-parallel engine (rank 0 here, rank 1 a spawned process, gloo) gives the TP=1 engine's tokens.

TP=1 is checked against transformers elsewhere (test_engine_vs_transformers), so equal greedy tokens
mean TP=2 matches transformers too. The prompts mix lengths (one token to several blocks), share
prefixes (the second wave hits the prefix cache) and exceed the step's token budget (chunked prefill),
so decodes and prefill chunks share steps.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from cluster.config import EngineConfig
from cluster.engine.engine import LLMEngine
from cluster.parallel.launch import launch_tp_engine
from cluster.request import SamplingParams

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
CONFIG = dict(dtype="float32", num_kv_blocks=96, max_num_batched_tokens=48, num_threads=1)


def generate(engine: LLMEngine, waves: list[list[list[int]]]) -> list[list[int]]:
    """Each wave runs to completion before the next is added, so later waves find earlier prefixes cached."""
    tokens: dict[str, list[int]] = {}
    for w, wave in enumerate(waves):
        for i, prompt in enumerate(wave):
            engine.add_request(f"w{w}-{i}", prompt, GREEDY)
        while engine.has_unfinished_requests():
            for out in engine.step():
                tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    return [tokens[f"w{w}-{i}"] for w, wave in enumerate(waves) for i in range(len(wave))]


def make_waves(vocab: int, seed: int) -> list[list[list[int]]]:
    rng = random.Random(seed)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(8, vocab) for _ in range(n)]

    shared = tokens(40)
    first = [tokens(n) for n in (1, 7, 16, 33, 130)] + [shared + tokens(3)]
    second = [shared + tokens(5), shared + tokens(20), first[3]]  # prefix hits, and a whole-prompt hit
    return [first, second]


@pytest.mark.parametrize("preset", ["tiny", "tiny-mistral"])  # 2 kv heads split; 1 kv head replicated
def test_tp2_greedy_tokens_equal_tp1(preset, preset_model_dir):
    model_dir = preset_model_dir(preset)
    engine, replica = launch_tp_engine(model_dir, EngineConfig(tensor_parallel_size=2, **CONFIG))
    try:
        assert engine.num_kv_heads == max(1, engine.arch.num_kv_heads // 2)  # rank 0 caches its heads only
        waves = make_waves(engine.arch.vocab_size, seed=3)
        got = generate(engine, waves)
        assert engine.kv_manager.prefix_cache_hits > 0
        replica.check_no_leaks()
    finally:
        replica.shutdown()
    # shutdown leaves no process behind: every rank exited cleanly and was reaped
    assert [p.exitcode for p in replica.processes] == [0]
    assert not any(Path(f"/proc/{pid}").exists() for pid in replica.pids)
    assert got == generate(LLMEngine(str(model_dir), EngineConfig(**CONFIG)), waves)


def test_tp_size_is_validated(tiny_model_dir):
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        EngineConfig(tensor_parallel_size=0)
    with pytest.raises(ValueError, match="tensor_parallel_size"):  # a TP config without its ranks
        LLMEngine(str(tiny_model_dir), EngineConfig(tensor_parallel_size=2, **CONFIG))
