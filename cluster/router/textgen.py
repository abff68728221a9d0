"""What every router front end (HTTP, gRPC) does around the workers: find the model's pool, turn the
input into prompt token ids, and turn the token ids that come back into text.

A request through here: `Router.resolve` (core.py; or `find_pool`: unknown model → not found) →
`prompt_token_ids` (text through the tokenizer, token ids checked against the vocabulary) or
`chat_prompt_token_ids` (the model's own chat template) → `text_events` runs it on the route (or the
pool) and yields (text delta, token ids, finish reason,
logprobs), the text from an incremental detokenizer, so a multi-byte character split across tokens is
sent only once complete, and cut at the first stop string.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any, Protocol

from cluster.engine.detokenizer import IncrementalDetokenizer
from cluster.request import SamplingParams
from cluster.router.dispatch import ModelPool
from cluster.router.errors import bad_request, not_found
from cluster.worker.convert import TokenLogprob

# (text delta, new token ids, OpenAI finish reason or None, the new tokens' logprobs if asked for)
TextEvent = tuple[str, list[int], str | None, list[TokenLogprob] | None]


class Servable(Protocol):
    """What text_events runs: a core.Route (admission, then the pool) or a bare ModelPool."""

    name: str  # the model that serves: responses name it
    tokenizer: Any

    def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator: ...


def find_pool(pools: dict[str, ModelPool], model: str) -> ModelPool:
    pool = pools.get(model)
    if pool is None:
        raise not_found(f"the model {model!r} does not exist", "model")
    return pool


def prompt_token_ids(pool: ModelPool, prompt: str | list[int]) -> list[int]:
    ids = pool.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    vocab = pool.tokenizer.vocab_size
    if any(t < 0 or t >= vocab for t in ids):
        raise bad_request(f"prompt token ids must be in [0, {vocab})", "prompt")
    return ids


def chat_prompt_token_ids(pool: ModelPool, messages: list[dict[str, Any]]) -> list[int]:
    text = pool.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return pool.tokenizer.encode(text, add_special_tokens=False)  # the template wrote its own BOS


async def text_events(pool: Servable, request_id: str, prompt_ids: list[int], params: SamplingParams,
                      ) -> AsyncIterator[TextEvent]:
    """One event per worker message; the last one has the finish reason."""
    detok = IncrementalDetokenizer(pool.tokenizer.backend, prompt_ids, stop=params.stop)
    # aclosing: a consumer that stops early (client gone) closes the worker calls now, not at GC
    async with aclosing(pool.generate(request_id, prompt_ids, params)) as chunks:
        async for token_ids, finish, logprobs in chunks:
            delta = detok.update(token_ids) if token_ids else ""
            if finish is not None and detok.stop_string_hit is None:
                delta += detok.finish()
            yield delta, token_ids, (finish.value if finish is not None else None), logprobs
