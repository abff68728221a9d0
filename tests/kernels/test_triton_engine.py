"""The engine end to end on the Triton backend (interpreter): greedy tokens equal the torch backend's,
through prefill, prefix-cache hits, chunked prefill and batched decode."""

from __future__ import annotations

from cluster import LLM, SamplingParams


def test_greedy_generation_matches_torch_backend(tiny_model_dir):
    shared = list(range(40, 40 + 37))  # two full blocks and a partial one
    prompts = [shared + [7, 8, 9], [3, 1, 4, 1, 5], shared + [11]]
    params = SamplingParams(max_tokens=5, temperature=0)
    outputs = {}
    for backend in ("torch", "triton"):
        # A small token budget forces the 40-token prompts through chunked prefill.
        llm = LLM(str(tiny_model_dir), attention_backend=backend, num_kv_blocks=64, max_model_len=256,
                  max_num_batched_tokens=24)
        first = llm.generate(prompts[:2], params)
        again = llm.generate(prompts[2:], params)  # reuses the shared prefix's cached blocks
        assert llm.engine.kv_manager.prefix_cache_hits > 0
        outputs[backend] = [o.outputs[0].token_ids for o in first + again]
        llm.engine.kv_manager.check_no_leaks()
    assert outputs["triton"] == outputs["torch"]
