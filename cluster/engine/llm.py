"""`LLM`: the offline Python API, in the shape vLLM users know.

    from cluster import LLM, SamplingParams
    llm = LLM("models/tiny", max_num_seqs=64)
    outs = llm.generate(["Hello"], SamplingParams(max_tokens=32, temperature=0))
    outs[0].text, outs[0].token_ids, outs[0].finish_reason
"""

from __future__ import annotations

from collections.abc import Sequence

from tqdm import tqdm

from cluster.config import EngineConfig
from cluster.engine.engine import LLMEngine
from cluster.engine.outputs import Completion, GenerationOutput
from cluster.request import SamplingParams

Prompt = str | Sequence[int]


class LLM:
    def __init__(self, model_dir: str, dtype: str = "auto", **engine_options) -> None:
        self.engine = LLMEngine(model_dir, EngineConfig(dtype=dtype, **engine_options))
        self.tokenizer = self.engine.tokenizer
        self._counter = 0

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[GenerationOutput]:
        """Run prompts (strings or token-id lists) to completion; one output per prompt, in order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params_list = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError("sampling_params must be one value or one per prompt")

        results: dict[str, GenerationOutput] = {}
        order = []
        for prompt, p in zip(prompts, params_list, strict=True):
            request_id = f"gen-{self._counter}"
            self._counter += 1
            try:
                prompt_ids = self.engine.add_request(request_id, prompt, p)
            except ValueError:
                for queued in order:  # leave the engine as we found it
                    self.engine.abort(queued)
                raise
            results[request_id] = GenerationOutput(request_id, prompt_ids, [Completion(i) for i in range(p.n)])
            order.append(request_id)

        total_tokens = sum(p.max_tokens * p.n for p in params_list)
        with tqdm(total=total_tokens, disable=not use_tqdm, unit="tok", desc="generate") as bar:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    result = results[out.request_id]
                    completion = result.outputs[out.index]
                    completion.token_ids.extend(out.new_token_ids)
                    completion.text += out.new_text
                    if out.new_logprobs is not None:
                        completion.logprobs = (completion.logprobs or []) + out.new_logprobs
                    if out.finished:
                        completion.finish_reason = out.finish_reason
                    result.num_cached_tokens = out.num_cached_tokens
                    bar.update(len(out.new_token_ids))
        return [results[request_id] for request_id in order]
