"""OpenAI request bodies → the engine's SamplingParams, with errors that name the field.

Parameters as OpenAI defines them (max_tokens / max_completion_tokens, temperature, top_p, n, stop,
seed, logprobs / top_logprobs, presence/frequency penalties, user, stream, stream_options) plus the
extras vLLM users send (top_k, min_p, repetition_penalty, ignore_eos, min_tokens, priority). Fields
OpenAI has and this server does not do (echo, suffix, logit_bias, best_of > n) are refused by name
rather than silently ignored; so is any field neither API knows.

`n` stays on the ParsedRequest: the router runs n one-choice requests (choices.py), so the
SamplingParams sent to the workers always say n=1. Logprobs: completions take `logprobs: k` (the
chosen token plus the top k), chat `logprobs: true` with `top_logprobs: k`; either becomes
SamplingParams.logprobs = k.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cluster.request import SamplingParams
from cluster.router.choices import MAX_N
from cluster.router.errors import bad_request

_COMMON = {
    "model", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "presence_penalty", "frequency_penalty",
    "user", "stream", "stream_options", "top_k", "min_p", "repetition_penalty", "ignore_eos", "min_tokens",
    "priority", "logprobs", "logit_bias",
}
_COMPLETION_FIELDS = _COMMON | {"prompt", "echo", "suffix", "best_of"}
_CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens", "top_logprobs"}
MAX_LOGPROBS = 20  # top alternatives per token (SamplingParams' bound; OpenAI's is 20 for chat, 5 legacy)


@dataclass
class ParsedRequest:
    model: str
    params: SamplingParams
    stream: bool
    include_usage: bool
    priority: int
    n: int = 1
    user: str | None = None
    prompt: str | list[int] | None = None  # completions
    messages: list[dict[str, Any]] | None = None  # chat


def parse_completion(body: Any) -> ParsedRequest:
    body = _object(body)
    _unknown(body, _COMPLETION_FIELDS)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one, as the openai client may send it
    if isinstance(prompt, list):
        if not prompt or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise bad_request("prompt must be a string or a list of token ids", "prompt")
    elif not isinstance(prompt, str):
        raise bad_request("prompt is required and must be a string or a list of token ids", "prompt")
    if prompt == "":
        raise bad_request("prompt must not be empty", "prompt")
    for name in ("echo", "suffix"):
        if body.get(name) not in (None, False, ""):
            raise bad_request(f"{name} is not supported by this server", name)
    logprobs = _int(body, "logprobs", None)
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise bad_request(f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {logprobs}", "logprobs")
    parsed = _common(body, max_tokens_default=16, logprobs=logprobs)
    best_of = _int(body, "best_of", None)
    if best_of is not None and best_of != parsed.n:
        raise bad_request("best_of other than n is not supported by this server", "best_of")
    parsed.prompt = prompt
    return parsed


def parse_chat(body: Any) -> ParsedRequest:
    body = _object(body)
    _unknown(body, _CHAT_FIELDS)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages is required and must be a non-empty list", "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool", "developer"):
            raise bad_request(f"messages[{i}].role must be system, user, assistant, tool or developer", "messages")
        if not isinstance(m.get("content"), str | list):
            raise bad_request(f"messages[{i}].content must be a string or a list of parts", "messages")
    max_tokens = _int(body, "max_completion_tokens", None)  # OpenAI's newer name wins over max_tokens
    if max_tokens is not None and max_tokens < 1:
        raise bad_request(f"max_completion_tokens must be an integer >= 1, got {max_tokens}", "max_completion_tokens")
    if max_tokens is not None:
        body = {**body, "max_tokens": max_tokens}
    want_logprobs = _bool(body, "logprobs", False)
    top = _int(body, "top_logprobs", None)
    if top is not None and not 0 <= top <= MAX_LOGPROBS:
        raise bad_request(f"top_logprobs must be an integer in [0, {MAX_LOGPROBS}], got {top}", "top_logprobs")
    if top is not None and not want_logprobs:
        raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
    parsed = _common(body, max_tokens_default=256, logprobs=(top or 0) if want_logprobs else None)
    parsed.messages = [{"role": m["role"], "content": _text(m["content"], i)} for i, m in enumerate(messages)]
    return parsed


def _common(body: dict, max_tokens_default: int, logprobs: int | None) -> ParsedRequest:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("model is required and must be a string", "model")
    if body.get("logit_bias"):
        raise bad_request("logit_bias is not supported by this server", "logit_bias")
    n = _int(body, "n", 1)
    if not 1 <= n <= MAX_N:
        raise bad_request(f"n must be an integer in [1, {MAX_N}], got {n}", "n")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise bad_request(f"user must be a string, got {user!r}", "user")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)) or len(stop) > 4:
        raise bad_request("stop must be a string or a list of up to 4 strings", "stop")
    stream = _bool(body, "stream", False)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request("stream_options must be an object", "stream_options")
    if options is not None and not stream:
        raise bad_request("stream_options is only allowed when stream is true", "stream_options")
    include_usage = (options or {}).get("include_usage") or False
    if not isinstance(include_usage, bool):
        raise bad_request(f"stream_options.include_usage must be a boolean, got {include_usage!r}", "stream_options")
    try:
        params = SamplingParams(
            n=1,
            max_tokens=_int(body, "max_tokens", max_tokens_default),
            temperature=_float(body, "temperature", 1.0),
            top_p=_float(body, "top_p", 1.0),
            top_k=_int(body, "top_k", 0),
            min_p=_float(body, "min_p", 0.0),
            seed=_int(body, "seed", None),
            presence_penalty=_float(body, "presence_penalty", 0.0),
            frequency_penalty=_float(body, "frequency_penalty", 0.0),
            repetition_penalty=_float(body, "repetition_penalty", 1.0),
            min_tokens=_int(body, "min_tokens", 0),
            stop=stop,
            ignore_eos=_bool(body, "ignore_eos", False),
            logprobs=logprobs,
        )
    except ValueError as exc:  # SamplingParams names the field first
        field = str(exc).split(" ", 1)[0]
        raise bad_request(str(exc), field) from None
    return ParsedRequest(model=model, params=params, stream=stream, include_usage=include_usage,
                         priority=_int(body, "priority", 0), n=n, user=user)


def _object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    return body


def _unknown(body: dict, allowed: set[str]) -> None:
    extra = sorted(set(body) - allowed)
    if extra:
        raise bad_request(f"unknown field {extra[0]!r}", extra[0])


def _int(body: dict, name: str, default):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"{name} must be an integer, got {value!r}", name)
    return value


def _float(body: dict, name: str, default: float) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise bad_request(f"{name} must be a number, got {value!r}", name)
    return float(value)


def _bool(body: dict, name: str, default: bool) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request(f"{name} must be a boolean, got {value!r}", name)
    return value


def _text(content: str | list, index: int) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
            raise bad_request(f"messages[{index}].content parts must be text parts", "messages")
        parts.append(part["text"])
    return "".join(parts)
