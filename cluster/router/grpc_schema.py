"""A public GenerateRequest (protos/pdserve/v1/serving.proto) → what the router runs, with errors
that name the field, as the HTTP API's schema.py does for OpenAI bodies.

Unset sampling fields take the HTTP API's defaults (max_tokens 16 for a prompt, 256 for messages,
temperature 1, n 1); SamplingParams checks the values and names the field it rejects. As on HTTP, `n`
stays on the GenerateInput (the router runs n one-choice requests) and `logprobs` becomes
SamplingParams.logprobs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cluster.protogen import ensure_generated
from cluster.request import SamplingParams
from cluster.router.choices import MAX_N
from cluster.router.errors import bad_request

ensure_generated()
from pdserve.v1 import serving_pb2 as pb  # noqa: E402

ROLES = ("system", "user", "assistant", "tool", "developer")
MAX_STOP_STRINGS = 4


@dataclass
class GenerateInput:
    model: str
    params: SamplingParams
    n: int = 1
    prompt: str | list[int] | None = None  # a prompt or prompt_token_ids
    messages: list[dict[str, Any]] | None = None  # chat


def parse_generate(request: pb.GenerateRequest) -> GenerateInput:
    if not request.model:
        raise bad_request("model is required", "model")
    given = [name for name, value in (("prompt", request.prompt), ("prompt_token_ids", request.prompt_token_ids),
                                      ("messages", request.messages)) if value]
    if not given:
        raise bad_request("prompt is required (or prompt_token_ids, or messages)", "prompt")
    if len(given) > 1:
        raise bad_request(f"{given[1]} cannot be sent with {given[0]}: send exactly one input", given[1])
    for i, m in enumerate(request.messages):
        if m.role not in ROLES:
            raise bad_request(f"messages[{i}].role must be one of {', '.join(ROLES)}", "messages")
    chat = given[0] == "messages"
    n = request.sampling.n if request.sampling.HasField("n") else 1
    if not 1 <= n <= MAX_N:
        raise bad_request(f"n must be in [1, {MAX_N}], got {n}", "n")
    parsed = GenerateInput(model=request.model, params=_params(request.sampling, max_tokens=256 if chat else 16),
                           n=n)
    if chat:
        parsed.messages = [{"role": m.role, "content": m.content} for m in request.messages]
    else:
        parsed.prompt = request.prompt or list(request.prompt_token_ids)
    return parsed


def _params(s: pb.GenerateSampling, max_tokens: int) -> SamplingParams:
    def get(name: str, default):
        return getattr(s, name) if s.HasField(name) else default

    if len(s.stop) > MAX_STOP_STRINGS:
        raise bad_request(f"stop takes up to {MAX_STOP_STRINGS} strings", "stop")
    try:
        return SamplingParams(
            n=1,
            max_tokens=get("max_tokens", max_tokens),
            temperature=get("temperature", 1.0),
            top_p=get("top_p", 1.0),
            top_k=get("top_k", 0),
            min_p=get("min_p", 0.0),
            seed=get("seed", None),
            presence_penalty=get("presence_penalty", 0.0),
            frequency_penalty=get("frequency_penalty", 0.0),
            repetition_penalty=get("repetition_penalty", 1.0),
            min_tokens=get("min_tokens", 0),
            stop=list(s.stop),
            stop_token_ids=list(s.stop_token_ids),
            ignore_eos=s.ignore_eos,
            logprobs=get("logprobs", None),
        )
    except ValueError as exc:  # SamplingParams names the field first
        raise bad_request(str(exc), str(exc).split(" ", 1)[0]) from None
