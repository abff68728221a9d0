"""Prompts of a given token length.

With the served model's tokenizer (`--tokenizer DIR`), a prompt is random token ids drawn from its
vocabulary (special tokens left out), so its length is exact when sent as ids; its text is those ids
decoded, re-encoded and trimmed until the text itself encodes to the asked length (usually the first
try), for APIs that only take text. Without a tokenizer, a prompt is random common English words, one
word standing for one token (most BPE vocabularies hold each of them, with its leading space, as one
token): the length is then approximate and the server's usage count is what gets reported.

Every prompt draws from the caller's seeded numpy Generator: same seed, same prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

# Short, frequent words: one token each in the usual BPE vocabularies.
WORDS = tuple(dict.fromkeys((
    "the of and to in is was for on that with as by at from his he it an are this be which or had "
    "not first were her she one but also they their all its new after has who two have been more when "
    "other time into only most some would over can years year world such many then later city made "
    "used where may these school state three under there while both during him between about well "
    "people team between part since known game film best being music found through war could each so "
    "than season called series including several long life became around out back four day work home "
    "same name left early still high book five took own local second number way old final public end "
    "film place year group late north south east west line family until play even found best town"
).split()))


class TokenizerLike(Protocol):
    vocab_size: int

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


@dataclass
class Prompt:
    """One piece of prompt: its text always, its token ids when a tokenizer made it."""

    text: str
    ids: list[int] | None
    num_tokens: int  # exact with ids; the word count otherwise


class PromptMaker:
    def __init__(self, tokenizer: TokenizerLike | None = None) -> None:
        self.tokenizer = tokenizer
        self._usable: np.ndarray | None = None
        if tokenizer is not None:
            special = set(getattr(tokenizer, "eos_token_ids", []) or [])
            backend = getattr(tokenizer, "backend", None)
            if backend is not None:  # cluster.model.tokenizer.Tokenizer: its added tokens are special
                special |= set(backend.get_added_tokens_decoder())
            # Tokens that are whole characters: a lone byte of a multi-byte character decodes to U+FFFD,
            # which encodes back to other tokens and makes text lengths drift.
            self._usable = np.array([i for i in range(tokenizer.vocab_size)
                                     if i not in special and "\ufffd" not in (tokenizer.decode([i]) or "\ufffd")])

    @property
    def is_exact(self) -> bool:
        return self.tokenizer is not None

    def random(self, rng: np.random.Generator, num_tokens: int) -> Prompt:
        if self.tokenizer is None:
            words = rng.choice(len(WORDS), size=num_tokens)
            return Prompt(" ".join(WORDS[i] for i in words), None, num_tokens)
        ids = [int(i) for i in rng.choice(self._usable, size=num_tokens)]
        return Prompt(self._text_of(ids, rng), ids, num_tokens)

    def from_text(self, text: str) -> Prompt:
        if self.tokenizer is None:
            return Prompt(text, None, len(text.split()))
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return Prompt(text, ids, len(ids))

    def join(self, *parts: Prompt) -> Prompt:
        """Pieces one after another: ids concatenated exactly, texts with a space between."""
        ids = None if any(p.ids is None for p in parts) else [t for p in parts for t in p.ids]
        text = " ".join(p.text for p in parts if p.text)
        return Prompt(text, ids, len(ids) if ids is not None else sum(p.num_tokens for p in parts))

    def _text_of(self, ids: list[int], rng: np.random.Generator) -> str:
        """Text that encodes back to len(ids) tokens (decoding ids and encoding the text again can merge
        neighbours into one token: trim or top up, a few times, and keep the closest)."""
        want = len(ids)
        text = self.tokenizer.decode(ids)
        best, best_miss = text, None
        for _ in range(6):
            again = self.tokenizer.encode(text, add_special_tokens=False)
            miss = abs(len(again) - want)
            if best_miss is None or miss < best_miss:
                best, best_miss = text, miss
            if miss == 0:
                break
            if len(again) > want:
                again = again[:want]
            else:
                again = again + [int(i) for i in rng.choice(self._usable, size=want - len(again))]
            text = self.tokenizer.decode(again)
        return best
