"""The engine on CUDA: greedy tokens are transformers' argmax (transformers on the same GPU), with the
Triton attention kernels and with plain torch attention, through prefix-cache hits, chunked prefill
and preemption; bf16 agrees with transformers' bf16; a prefill engine hands KV to a decode engine
over the local transport and the decode engine continues exactly as the unified one does.
"""

from __future__ import annotations

import random

import pytest
import torch

from cluster import LLM, SamplingParams
from cluster.config import EngineConfig
from cluster.engine.engine import LLMEngine
from cluster.parallel.disagg import add_prefill, reserve_remote_kv
from cluster.parallel.kv_endpoint import start_kv_endpoint

PRESETS = ["tiny", "tiny-llama-gqa", "tiny-qwen2", "tiny-qwen3", "tiny-mistral"]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
# Logit units. fp32: reordering noise only (the kernels use IEEE fp32 dots, not TF32). bf16: both
# sides round every activation to 8 mantissa bits, so near-ties may flip; the gap stays small.
TOLERANCE = {"float32": 1e-3, "bfloat16": 0.25}


def hf_model(model_dir, dtype: str):
    from transformers import AutoModelForCausalLM

    return (
        AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=getattr(torch, dtype), attn_implementation="eager"
        )
        .to("cuda")
        .eval()
    )


def random_prompts(
    vocab: int, lengths: list[int], seed: int, prefix: list[int] | None = None
) -> list[list[int]]:
    rng = random.Random(seed)
    return [(prefix or []) + [rng.randrange(8, vocab) for _ in range(n)] for n in lengths]


def max_argmax_gap(model, prompt: list[int], token_ids: list[int]) -> float:
    """How far below transformers' best logit the engine's chosen tokens fall (0 = every one an argmax)."""
    ids = torch.tensor([prompt + token_ids[:-1]], device="cuda")
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 :].float()  # [num_out, vocab]; row j predicts token j
    chosen = logits[torch.arange(len(token_ids)), torch.tensor(token_ids, device="cuda")]
    return (logits.max(dim=-1).values - chosen).max().item()


def assert_argmax(model, prompts, outputs, dtype: str) -> None:
    for prompt, out in zip(prompts, outputs, strict=True):
        assert len(out.token_ids) == GREEDY.max_tokens
        gap = max_argmax_gap(model, prompt, out.token_ids)
        assert gap <= TOLERANCE[dtype], (
            f"{len(prompt)}-token prompt: a chosen token is {gap:.2e} below the argmax"
        )


def cuda_llm(model_dir, dtype: str, **options) -> LLM:
    options.setdefault("num_kv_blocks", 512)
    return LLM(str(model_dir), dtype=dtype, device="cuda", **options)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("preset", PRESETS)
def test_fp32_greedy_matches_transformers_on_cuda(preset, backend, preset_model_dir):
    model_dir = preset_model_dir(preset)
    model = hf_model(model_dir, "float32")
    prompts = random_prompts(model.config.vocab_size, [1, 2, 7, 16, 17, 33, 64, 130, 257], seed=1)
    llm = cuda_llm(model_dir, "float32", attention_backend=backend)
    assert_argmax(model, prompts, llm.generate(prompts, GREEDY), "float32")
    llm.engine.kv_manager.check_no_leaks()


@pytest.mark.parametrize("preset", ["tiny", "tiny-qwen3"])
def test_bf16_greedy_tracks_transformers_bf16(preset, preset_model_dir):
    model_dir = preset_model_dir(preset)
    model = hf_model(model_dir, "bfloat16")
    prompts = random_prompts(model.config.vocab_size, [3, 40, 200], seed=2)
    llm = cuda_llm(model_dir, "bfloat16")
    assert_argmax(model, prompts, llm.generate(prompts, GREEDY), "bfloat16")


def test_prefix_hits_chunked_prefill_and_preemption_on_cuda(tiny_model_dir):
    model = hf_model(tiny_model_dir, "float32")
    shared = random_prompts(model.config.vocab_size, [70], seed=3)[0]
    prompts = random_prompts(model.config.vocab_size, [1, 5, 20, 40, 90], seed=4, prefix=shared)
    # 24 blocks of 16 cannot hold five ~100-token sequences growing together: some get preempted.
    llm = cuda_llm(tiny_model_dir, "float32", num_kv_blocks=24, max_num_batched_tokens=64)
    first = llm.generate(prompts[:1], GREEDY)  # fills the prefix cache with the shared blocks
    rest = llm.generate(prompts[1:], GREEDY)
    assert_argmax(model, prompts, first + rest, "float32")
    llm.engine.kv_manager.check_no_leaks()


def run(engine: LLMEngine) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    return tokens


def test_prefill_to_decode_over_local_transport_on_cuda(tiny_model_dir):
    def engine() -> LLMEngine:
        return LLMEngine(
            str(tiny_model_dir),
            EngineConfig(dtype="float32", device="cuda", num_kv_blocks=256, max_num_batched_tokens=96),
        )

    prefill, decode, unified = engine(), engine(), engine()
    endpoint = start_kv_endpoint("local")
    prompts = random_prompts(prefill.arch.vocab_size, [1, 15, 16, 17, 40, 130], seed=5)
    for i, prompt in enumerate(prompts):  # the project's own handoff: what a router's worker calls do
        destination = reserve_remote_kv(decode, f"r{i}", prompt, GREEDY, endpoint=endpoint)
        assert destination is not None
        add_prefill(prefill, f"r{i}", prompt, GREEDY, destination)
        unified.add_request(f"r{i}", prompt, GREEDY)
    run(prefill)
    assert run(decode) == run(unified)
    assert decode.num_kv_transfer_fallbacks == 0
    for e in (prefill, decode, unified):
        e.kv_manager.check_no_leaks()
