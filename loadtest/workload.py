"""Workloads: the list of requests a run sends, built up front from a seed (same seed, same requests).

- `random`: input and output lengths from two length distributions (loadtest/lengths.py).
- `shared-prefix`: `num_prefixes` groups, each behind its own long system prompt (`prefix_len`); each
  request is its group's prefix plus its own input, groups taken in turn. Over the chat API the
  prefix is the system message; over completions it leads the prompt.
- `multi-turn`: sessions of `num_turns` turns; each turn resends the whole history (earlier inputs and
  the server's actual answers, loadtest/sessions.py) plus a new input. `num_sessions` sessions are
  open at once, their turns interleaved, so a session's next turn is rarely held up waiting for its
  previous answer (the runner makes it wait when it must).
- `chat-mix`: a synthetic chat-like mix of lengths: mostly short questions with longer answers, some
  pasted context, a few long documents (CHAT_MIX).
- `jsonl`: a file with one request a line: {"prompt": "..."}, {"prompt_token_ids": [...]} or
  {"messages": [...]}, optionally "max_tokens"; its lines are used in order and again from the top
  when the run wants more requests than the file has.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.lengths import LengthDist
from loadtest.prompts import Prompt, PromptMaker

KINDS = ("random", "shared-prefix", "multi-turn", "chat-mix", "jsonl")

# (weight, input length, output length): the chat-mix workload's three kinds of request.
CHAT_MIX = (
    (0.60, "lognormal:150:0.8", "lognormal:220:0.7"),  # a question, a chatty answer
    (0.30, "lognormal:800:0.6", "lognormal:300:0.6"),  # pasted context and a question about it
    (0.10, "lognormal:2500:0.4", "lognormal:180:0.6"),  # a long document to summarise
)


@dataclass
class RequestSpec:
    index: int
    user: Prompt  # this request's own new input
    max_tokens: int
    system: Prompt | None = None  # shared-prefix: the group's system prompt
    messages: list[dict[str, Any]] | None = None  # a JSONL conversation, sent as it is
    session: int | None = None  # multi-turn: which session, and which turn of it
    turn: int = 0
    group: int | None = None  # shared-prefix: which group


@dataclass
class WorkloadConfig:
    kind: str = "random"
    input_len: str = "256"
    output_len: str = "128"
    num_prefixes: int = 4  # shared-prefix: groups
    prefix_len: str = "1024"  # shared-prefix: each group's system prompt, drawn once per group
    num_turns: str = "4"  # multi-turn: turns per session (a length spec: fixed, uniform, ...)
    num_sessions: int = 8  # multi-turn: sessions open at once
    dataset: Path | None = None  # jsonl
    max_input_len: int | None = None  # caps every drawn input length
    max_output_len: int | None = None  # caps every drawn output length
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"workload must be one of {', '.join(KINDS)}, got {self.kind!r}")
        for name in ("num_prefixes", "num_sessions"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_input_len", "max_output_len"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        self.inputs = LengthDist.parse(self.input_len, "input_len", self.max_input_len)
        self.outputs = LengthDist.parse(self.output_len, "output_len", self.max_output_len)
        self.prefixes = LengthDist.parse(self.prefix_len, "prefix_len")
        self.turns = LengthDist.parse(self.num_turns, "num_turns")
        if self.kind == "jsonl" and self.dataset is None:
            raise ValueError("dataset: the jsonl workload needs a file (--dataset FILE)")


def build(config: WorkloadConfig, num_requests: int, maker: PromptMaker) -> list[RequestSpec]:
    rng = np.random.default_rng(config.seed)
    if config.kind == "random":
        inputs, outputs = config.inputs.sample(rng, num_requests), config.outputs.sample(rng, num_requests)
        return [RequestSpec(i, maker.random(rng, n), m) for i, (n, m) in enumerate(zip(inputs, outputs, strict=True))]
    if config.kind == "shared-prefix":
        return _shared_prefix(config, num_requests, maker, rng)
    if config.kind == "multi-turn":
        return _multi_turn(config, num_requests, maker, rng)
    if config.kind == "chat-mix":
        return _chat_mix(config, num_requests, maker, rng)
    return _jsonl(config, num_requests, maker, rng)


def _shared_prefix(config: WorkloadConfig, n: int, maker: PromptMaker, rng: np.random.Generator) -> list[RequestSpec]:
    prefixes = [maker.random(rng, k) for k in config.prefixes.sample(rng, config.num_prefixes)]
    inputs, outputs = config.inputs.sample(rng, n), config.outputs.sample(rng, n)
    return [RequestSpec(i, maker.random(rng, inputs[i]), outputs[i], system=prefixes[i % len(prefixes)],
                        group=i % len(prefixes)) for i in range(n)]


def _multi_turn(config: WorkloadConfig, n: int, maker: PromptMaker, rng: np.random.Generator) -> list[RequestSpec]:
    """Turns in the order they are sent: round-robin over `num_sessions` open sessions, a finished
    session's slot taken by the next one."""
    specs: list[RequestSpec] = []
    slots: list[list[int]] = []  # per open slot: [session id, turns left, next turn]
    next_session = 0
    while len(specs) < n:
        while len(slots) < config.num_sessions:
            slots.append([next_session, config.turns.sample(rng, 1)[0], 0])
            next_session += 1
        for slot in list(slots):
            if len(specs) == n:
                break
            session, left, turn = slot
            num_in, num_out = config.inputs.sample(rng, 1)[0], config.outputs.sample(rng, 1)[0]
            specs.append(RequestSpec(len(specs), maker.random(rng, num_in), num_out, session=session, turn=turn))
            slot[1], slot[2] = left - 1, turn + 1
            if slot[1] == 0:
                slots.remove(slot)
    return specs


def _chat_mix(config: WorkloadConfig, n: int, maker: PromptMaker, rng: np.random.Generator) -> list[RequestSpec]:
    weights = np.array([w for w, _, _ in CHAT_MIX])
    kinds = rng.choice(len(CHAT_MIX), size=n, p=weights / weights.sum())
    dists = [(LengthDist.parse(i, "chat-mix", config.max_input_len), LengthDist.parse(o, "chat-mix", config.max_output_len))
             for _, i, o in CHAT_MIX]
    specs = []
    for index, kind in enumerate(kinds):
        inputs, outputs = dists[kind]
        specs.append(RequestSpec(index, maker.random(rng, inputs.sample(rng, 1)[0]), outputs.sample(rng, 1)[0]))
    return specs


def _jsonl(config: WorkloadConfig, n: int, maker: PromptMaker, rng: np.random.Generator) -> list[RequestSpec]:
    lines = read_jsonl(config.dataset)
    outputs = config.outputs.sample(rng, n)
    specs = []
    for index in range(n):
        line = lines[index % len(lines)]
        max_tokens = line.get("max_tokens") or outputs[index]
        if "messages" in line:
            text = "\n".join(m["content"] for m in line["messages"])
            specs.append(RequestSpec(index, maker.from_text(text), max_tokens, messages=line["messages"]))
        elif "prompt_token_ids" in line:
            ids = line["prompt_token_ids"]
            text = maker.tokenizer.decode(ids) if maker.tokenizer is not None else ""
            specs.append(RequestSpec(index, Prompt(text, ids, len(ids)), max_tokens))
        else:
            specs.append(RequestSpec(index, maker.from_text(line["prompt"]), max_tokens))
    return specs


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The file's requests, each checked; errors name the file, the line and the field."""
    path = Path(path)
    try:
        raw_lines = path.read_text().splitlines()
    except OSError as exc:
        raise ValueError(f"dataset: cannot read {path}: {exc.strerror}") from None
    lines = []
    for number, raw in enumerate(raw_lines, 1):
        if not raw.strip():
            continue
        where = f"dataset {path}:{number}"
        try:
            line = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not JSON ({exc.msg})") from None
        if not isinstance(line, dict):
            raise ValueError(f"{where}: each line must be a JSON object")
        if "prompt" in line:
            if not isinstance(line["prompt"], str) or not line["prompt"]:
                raise ValueError(f"{where}: prompt must be a non-empty string")
        elif "prompt_token_ids" in line:
            ids = line["prompt_token_ids"]
            if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and t >= 0 for t in ids):
                raise ValueError(f"{where}: prompt_token_ids must be a non-empty list of token ids")
        elif "messages" in line:
            messages = line["messages"]
            if not isinstance(messages, list) or not messages or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in messages):
                raise ValueError(f"{where}: messages must be a non-empty list of {{role, content}} strings")
        else:
            raise ValueError(f"{where}: each line needs a prompt, prompt_token_ids or messages field")
        max_tokens = line.get("max_tokens")
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
            raise ValueError(f"{where}: max_tokens must be an integer >= 1")
        lines.append(line)
    if not lines:
        raise ValueError(f"dataset: {path} holds no requests")
    return lines
