"""What the engine hands back each step, and what LLM.generate returns."""

from __future__ import annotations

from dataclasses import dataclass, field

from cluster.engine.sampler import TokenLogprobs
from cluster.request import FinishReason


@dataclass
class RequestOutput:
    """One step's news for one sequence: the token(s) it gained and the text they completed."""

    request_id: str  # the id the caller gave
    index: int  # which of the n choices
    new_token_ids: list[int]
    new_text: str
    new_logprobs: list[TokenLogprobs] | None
    finished: bool
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_cached_tokens: int
    is_kv_fallback: bool = False  # decode side: the transfer failed and the prompt was computed locally


@dataclass
class Completion:
    index: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: FinishReason | None = None
    logprobs: list[TokenLogprobs] | None = None


@dataclass
class GenerationOutput:
    """One prompt's result: `outputs` holds its n completions; the shortcuts read the first."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[Completion]
    num_cached_tokens: int = 0

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def finish_reason(self) -> FinishReason | None:
        return self.outputs[0].finish_reason

    @property
    def logprobs(self) -> list[TokenLogprobs] | None:
        return self.outputs[0].logprobs

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.outputs)
