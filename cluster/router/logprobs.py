"""Token logprobs → the shapes OpenAI returns them in.

A request that asks for logprobs gets, with each group of new token ids from the workers, one
`TokenLogprob` per token (the raw-logit logprob the engine's sampler computed and the top-N
alternatives). Here each token id becomes its text and UTF-8 bytes, and the lot becomes either the
legacy completions shape (`tokens`, `token_logprobs`, `top_logprobs` as {token: logprob} with the
chosen token always included, `text_offset` into the completion text) or the chat shape
(`content: [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]`). Streamed responses
format each chunk's tokens as they come; the completions `text_offset` carries on across chunks.

A token's bytes come from the tokenizer's own vocabulary (byte-level BPE pieces map back to bytes;
SentencePiece pieces use `▁` for a space and `<0xNN>` for raw bytes), so a token that is only part of
a UTF-8 character keeps its exact bytes; its `token` text is then spelled `bytes:\\xNN...`, as OpenAI
spells such tokens.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Sequence

from cluster.model.tokenizer import Tokenizer
from cluster.worker.convert import TokenLogprob

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's bytes_to_unicode, inverted: the printable character each byte was mapped to → the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


_BYTE_LEVEL = _byte_level_decoder()


class TokenTexts:
    """A tokenizer's token id → (text, UTF-8 bytes), computed once per id."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        backend = tokenizer.backend
        self._backend = backend
        self._added = {i: t.content for i, t in backend.get_added_tokens_decoder().items()}
        decoder = backend.decoder
        # the decoder's JSON (also when ByteLevel sits inside a Sequence); the vocabulary is not in it
        self._is_byte_level = decoder is not None and '"ByteLevel"' in decoder.__getstate__().decode()
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def get(self, token_id: int) -> tuple[str, list[int]]:
        entry = self._cache.get(token_id)
        if entry is None:
            entry = self._cache[token_id] = self._compute(token_id)
        return entry

    def text(self, token_id: int) -> str:
        return self.get(token_id)[0]

    def _compute(self, token_id: int) -> tuple[str, list[int]]:
        if token_id in self._added:  # special and added tokens are stored as plain text
            raw = self._added[token_id].encode()
        else:
            piece = self._backend.id_to_token(token_id)
            if piece is None:
                return f"token_id:{token_id}", []
            raw = self._piece_bytes(piece)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:  # part of a multi-byte character
            text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
        return text, list(raw)

    def _piece_bytes(self, piece: str) -> bytes:
        if self._is_byte_level and all(c in _BYTE_LEVEL for c in piece):
            return bytes(_BYTE_LEVEL[c] for c in piece)
        match = _BYTE_PIECE.fullmatch(piece)
        if match:
            return bytes([int(match.group(1), 16)])
        return piece.replace("▁", " ").encode()


_TEXTS: weakref.WeakKeyDictionary[Tokenizer, TokenTexts] = weakref.WeakKeyDictionary()


def token_texts(tokenizer: Tokenizer) -> TokenTexts:
    """The (shared) TokenTexts of a tokenizer."""
    texts = _TEXTS.get(tokenizer)
    if texts is None:
        texts = _TEXTS[tokenizer] = TokenTexts(tokenizer)
    return texts


class CompletionLogprobs:
    """The legacy completions `logprobs` object of one choice, built chunk by chunk."""

    def __init__(self, texts: TokenTexts) -> None:
        self._texts = texts
        self._offset = 0  # characters of completion text before the next token

    def chunk(self, logprobs: Sequence[TokenLogprob]) -> dict:
        """The object for these tokens (a streamed chunk's, or with all tokens, the whole response's)."""
        tokens, values, tops, offsets = [], [], [], []
        text = self._texts.text
        for lp in logprobs:
            token = text(lp.token_id)
            tokens.append(token)
            values.append(lp.logprob)
            top = {text(t): v for t, v in lp.top}
            top.setdefault(token, lp.logprob)  # OpenAI: the chosen token is always listed
            tops.append(top)
            offsets.append(self._offset)
            self._offset += len(token)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(texts: TokenTexts, logprobs: Sequence[TokenLogprob]) -> list[dict]:
    """Chat `logprobs.content` entries for these tokens."""
    get = texts.get
    content = []
    for lp in logprobs:
        token, raw = get(lp.token_id)
        top = []
        for t, v in lp.top:
            alt, alt_raw = get(t)
            top.append({"token": alt, "logprob": v, "bytes": alt_raw})
        content.append({"token": token, "logprob": lp.logprob, "bytes": raw, "top_logprobs": top})
    return content
