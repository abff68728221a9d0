"""Streams a request's text as tokens arrive: UTF-8 safe deltas, and stop strings cut across token boundaries.

UTF-8 safety uses the prefix-offset / read-offset window of vLLM and TGI: decode only the few tokens since the
last emission (plus the ones before them as context, so decoders that strip a leading space see it), and emit
the new text only once it no longer ends in U+FFFD, i.e. once a character split across byte-level BPE tokens
is complete. Cost per step is a decode of a handful of tokens, never of the whole output.

Stop strings: text is emitted only once it cannot be the start of a stop string; the longest tail that is a
proper prefix of one is held back. So a stop string is never partly emitted, a match is only ever searched
for in the held tail plus the new text, and when one is found the text before it is final.
"""

from __future__ import annotations

from typing import Protocol

# prompt tokens decoded as context ahead of the first output token (vLLM's INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET)
_PROMPT_CONTEXT = 5
_REPLACEMENT = "\ufffd"  # what a lossy UTF-8 decode yields for an incomplete character


class Decoder(Protocol):
    """What the detokenizer needs from a tokenizer: a `tokenizers.Tokenizer` has it."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """One request's streaming detokenizer. Call `update` per step, then `finish` unless a stop string hit."""

    def __init__(self, tokenizer: Decoder, prompt_token_ids: list[int], stop: list[str],
                 skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        # the decode window: tokens[:read_offset] are already emitted (and serve as context), the rest are
        # waiting for a complete character; tokens before the window are dropped, they are never needed again
        self._tokens: list[int] = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        self._read_offset = len(self._tokens)
        self._stop = [s for s in stop if s]
        # every proper prefix of a stop string: a tail of the text equal to one of them must be held back
        self._stop_prefixes = {s[:n] for s in self._stop for n in range(1, len(s))}
        self._max_held = max((len(s) for s in self._stop), default=1) - 1
        self._held = ""  # decoded text not emitted yet because it may begin a stop string
        self._parts: list[str] = []
        self._stop_string_hit: str | None = None
        self._done = False

    @property
    def stop_string_hit(self) -> str | None:
        """The stop string that ended the text, if any; once set, nothing more is emitted."""
        return self._stop_string_hit

    @property
    def output_text(self) -> str:
        """Everything emitted so far: the concatenation of all deltas."""
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    def update(self, new_token_ids: list[int]) -> str:
        """Take this step's new tokens; return the text that is safe to emit now (often "")."""
        if self._done or not new_token_ids:
            return ""
        self._tokens.extend(new_token_ids)
        text = self._decode_window(final=False)
        if not self._stop:
            return self._emit(text)  # nothing to hold back for
        return self._emit(self._cut_stop(self._held + text, final=False))

    def finish(self) -> str:
        """The request ended for another reason: release held text and any incomplete trailing character."""
        if self._done:
            return ""
        text = self._decode_window(final=True)
        out = self._cut_stop(self._held + text, final=True) if self._stop else text
        self._done = True
        return self._emit(out)

    def _decode_window(self, final: bool) -> str:
        """New text since the last emission, or "" while the window ends inside a character (unless final)."""
        decode = self._tokenizer.decode
        prefix_text = decode(self._tokens[: self._read_offset], skip_special_tokens=self._skip_special_tokens)
        new_text = decode(self._tokens, skip_special_tokens=self._skip_special_tokens)
        # not longer: only skipped special tokens arrived; so far it is all context
        if len(new_text) <= len(prefix_text) or (new_text.endswith(_REPLACEMENT) and not final):
            return ""
        # the window moves on: what was pending becomes the next step's context, older tokens are dropped
        del self._tokens[: self._read_offset]
        self._read_offset = len(self._tokens)
        return new_text[len(prefix_text):]

    def _cut_stop(self, text: str, final: bool) -> str:
        """The part of `text` (held tail + new text) to emit; ends the stream at the first stop string.

        First = the match that ends earliest (ties: the one starting earliest), i.e. the one a reader going
        character by character meets first. So the result does not depend on how tokens were chunked into
        updates, and with overlapping stops it matches what token-by-token streaming would have done.
        """
        hit_key, hit_pos, hit = (0, 0), 0, None
        for s in self._stop:
            pos = text.find(s)
            if pos != -1 and (hit is None or (pos + len(s), pos) < hit_key):
                hit_key, hit_pos, hit = (pos + len(s), pos), pos, s
        if hit is not None:
            self._stop_string_hit = hit
            self._done = True
            self._held = ""
            return text[:hit_pos]
        held = 0 if final else self._held_tail(text)
        self._held = text[len(text) - held:] if held else ""
        return text[: len(text) - held]

    def _held_tail(self, text: str) -> int:
        """Length of the longest tail of `text` that a later token could complete into a stop string."""
        for n in range(min(len(text), self._max_held), 0, -1):
            if text[-n:] in self._stop_prefixes:
                return n
        return 0

    def _emit(self, text: str) -> str:
        if text:
            self._parts.append(text)
        return text
