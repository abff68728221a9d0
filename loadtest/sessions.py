"""What a request actually sends: its spec's input behind its shared prefix and, in a multi-turn
session, behind the whole conversation so far — earlier inputs and the server's real answers.

Each API takes the same input in its own form (`Input`): the chat API a message list; completions a
prompt, as token ids when the tokenizer made them (exact lengths) and the server takes them, else as
text; gRPC either. A session's answers become history as text; with a tokenizer they are encoded
again for token-id prompts (the ids the server generated are not returned by the OpenAI API).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from loadtest.prompts import Prompt, PromptMaker
from loadtest.workload import RequestSpec


@dataclass
class Input:
    text: str
    ids: list[int] | None
    messages: list[dict[str, Any]]
    num_tokens: int  # what the workload built: exact with ids, approximate with text


@dataclass
class Session:
    turns: list[tuple[Prompt, Prompt]] = field(default_factory=list)  # (input, answer) per finished turn
    done: dict[int, asyncio.Event] = field(default_factory=dict)  # turn → set once that turn finished

    def finished(self, turn: int) -> asyncio.Event:
        return self.done.setdefault(turn, asyncio.Event())


class Conversations:
    """The open sessions of a multi-turn run."""

    def __init__(self, maker: PromptMaker) -> None:
        self.maker = maker
        self.sessions: dict[int, Session] = {}

    def session(self, spec: RequestSpec) -> Session | None:
        return None if spec.session is None else self.sessions.setdefault(spec.session, Session())

    async def wait_turn(self, spec: RequestSpec) -> None:
        """Until the session's previous turn has its answer."""
        session = self.session(spec)
        if session is not None and spec.turn > 0:
            await session.finished(spec.turn - 1).wait()

    def record_answer(self, spec: RequestSpec, answer: str | None) -> None:
        """The turn is over: answered or failed (the next turn goes on with what there is), or never
        sent (None: the run's time was up)."""
        session = self.session(spec)
        if session is not None:
            if answer is not None:
                session.turns.append((spec.user, self.maker.from_text(answer)))
            session.finished(spec.turn).set()

    def compose(self, spec: RequestSpec) -> Input:
        session = self.session(spec)
        history = session.turns if session is not None else []
        if spec.messages is not None:
            return Input(self._render(spec.messages), None, spec.messages, spec.user.num_tokens)
        messages = [] if spec.system is None else [{"role": "system", "content": spec.system.text}]
        for asked, answered in history:
            messages += [{"role": "user", "content": asked.text}, {"role": "assistant", "content": answered.text}]
        messages.append({"role": "user", "content": spec.user.text})
        pieces = ([spec.system] if spec.system is not None else []) + [p for turn in history for p in turn] + [spec.user]
        whole = self.maker.join(*pieces)
        return Input(whole.text, whole.ids, messages, whole.num_tokens)

    def _render(self, messages: list[dict[str, Any]]) -> str:
        """A JSONL conversation sent to a completions API: the model's chat template when it has one."""
        tokenizer = self.maker.tokenizer
        if tokenizer is not None and getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(messages)
        return "\n".join(m["content"] for m in messages)
