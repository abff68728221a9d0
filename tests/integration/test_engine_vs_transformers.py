"""Acceptance: the engine's greedy tokens are transformers' argmax along the engine's own trajectory.

For each preset architecture we generate greedily with the engine, then teacher-force transformers on
prompt + generated tokens and check every chosen token is an argmax of transformers' logits (within a
tiny tolerance, so genuine float ties cannot make the test flaky). Variants exercise the prefix cache,
chunked prefill under a small token budget, and preemption under a tiny KV pool.
"""

from __future__ import annotations

import random

import pytest
import torch

from cluster import LLM, SamplingParams

PRESETS = ["tiny", "tiny-llama-gqa", "tiny-qwen2", "tiny-qwen3", "tiny-mistral"]
TOLERANCE = 1e-3  # logit units; fp32 reordering noise is ~1e-5


@pytest.fixture(scope="module")
def hf_models():
    cache: dict = {}
    return cache


def hf_model(cache: dict, model_dir):
    from transformers import AutoModelForCausalLM

    key = str(model_dir)
    if key not in cache:
        cache[key] = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, attn_implementation="eager"
        ).eval()
    return cache[key]


def random_prompts(vocab_size: int, lengths: list[int], seed: int, prefix: list[int] | None = None) -> list[list[int]]:
    rng = random.Random(seed)
    prefix = prefix or []
    return [prefix + [rng.randrange(8, vocab_size) for _ in range(n)] for n in lengths]


def assert_greedy_matches_transformers(model, prompts: list[list[int]], outputs) -> None:
    for prompt, out in zip(prompts, outputs, strict=True):
        assert len(out.token_ids) > 0
        ids = torch.tensor([prompt + out.token_ids[:-1]])
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt) - 1 :]  # [num_out, vocab], row j predicts out[j]
        chosen = logits[torch.arange(len(out.token_ids)), torch.tensor(out.token_ids)]
        best = logits.max(dim=-1).values
        gap = (best - chosen).max().item()
        assert gap <= TOLERANCE, f"prompt of {len(prompt)} tokens: a chosen token is {gap:.2e} below the argmax"


def engine(model_dir, **options) -> LLM:
    options.setdefault("num_kv_blocks", 512)
    options.setdefault("block_size", 16)
    return LLM(str(model_dir), dtype="float32", **options)


GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize("preset", PRESETS)
def test_mixed_lengths_match_transformers(preset, preset_model_dir, hf_models):
    model_dir = preset_model_dir(preset)
    model = hf_model(hf_models, model_dir)
    prompts = random_prompts(model.config.vocab_size, [1, 2, 7, 16, 17, 33, 64, 130, 257], seed=1)
    outputs = engine(model_dir).generate(prompts, GREEDY)
    assert_greedy_matches_transformers(model, prompts, outputs)


@pytest.mark.parametrize("preset", PRESETS)
def test_prefix_cache_hits_match_transformers(preset, preset_model_dir, hf_models):
    model_dir = preset_model_dir(preset)
    model = hf_model(hf_models, model_dir)
    shared = random_prompts(model.config.vocab_size, [70], seed=2)[0]
    prompts = random_prompts(model.config.vocab_size, [1, 5, 20, 40], seed=3, prefix=shared)
    llm = engine(model_dir)
    first = llm.generate(prompts[:1], GREEDY)  # fills the cache with the shared prefix
    rest = llm.generate(prompts[1:], GREEDY)
    assert all(o.num_cached_tokens >= 64 for o in rest), [o.num_cached_tokens for o in rest]
    assert_greedy_matches_transformers(model, prompts, first + rest)


@pytest.mark.parametrize("preset", PRESETS)
def test_chunked_prefill_matches_transformers(preset, preset_model_dir, hf_models):
    model_dir = preset_model_dir(preset)
    model = hf_model(hf_models, model_dir)
    prompts = random_prompts(model.config.vocab_size, [3, 45, 100, 200], seed=4)
    outputs = engine(model_dir, max_num_batched_tokens=24).generate(prompts, GREEDY)
    assert_greedy_matches_transformers(model, prompts, outputs)


@pytest.mark.parametrize("preset", PRESETS)
def test_preemption_matches_transformers(preset, preset_model_dir, hf_models):
    model_dir = preset_model_dir(preset)
    model = hf_model(hf_models, model_dir)
    prompts = random_prompts(model.config.vocab_size, [30, 40, 50, 60, 70, 80], seed=5)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    # 12 blocks of 16 hold ~190 tokens: the six sequences (~530 tokens at the end) cannot all fit.
    llm = engine(model_dir, num_kv_blocks=12, enable_prefix_caching=False)
    outputs = llm.generate(prompts, params)
    assert llm.engine.scheduler.num_preemptions > 0, "the pool was meant to be too small"
    assert_greedy_matches_transformers(model, prompts, outputs)
    assert llm.engine.num_free_kv_blocks == 12


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_attention_backends_agree(backend, preset_model_dir, hf_models):
    model_dir = preset_model_dir("tiny")
    model = hf_model(hf_models, model_dir)
    prompts = random_prompts(model.config.vocab_size, [5, 50, 120], seed=6)
    outputs = engine(model_dir, attention_backend=backend).generate(prompts, GREEDY)
    assert_greedy_matches_transformers(model, prompts, outputs)
