"""The serving tokenizer: an HF `tokenizer.json` through the `tokenizers` library, with no transformers.

It reproduces what transformers' fast tokenizer does with the same directory: special tokens from
tokenizer.json's post-processor, decoding, and chat templates rendered by a sandboxed jinja2
environment with the same globals and filters. One deliberate difference: `add_bos_token: true` in
tokenizer_config.json adds a BOS the post-processor lacks (as transformers 4's Llama tokenizer did;
transformers 5 ignores the flag once a tokenizer.json exists). `add_eos_token` is ignored, as in
transformers 5. transformers 5 never applies `clean_up_tokenization_spaces` to BPE tokenizers, and
every family served here is BPE, so neither does this.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class Tokenizer:
    def __init__(
        self,
        backend: HFTokenizer,
        special_tokens: dict[str, str],
        eos_token_ids: list[int],
        chat_template: str | None = None,
        add_bos_token: bool = False,
    ):
        self.backend = backend  # the tokenizers.Tokenizer; the incremental detokenizer works on it directly
        self.special_tokens = special_tokens  # bos_token, eos_token, ... as strings (chat-template variables)
        self.eos_token_ids = eos_token_ids
        self.chat_template = chat_template
        bos = special_tokens.get("bos_token")
        self.bos_token_id: int | None = backend.token_to_id(bos) if bos is not None else None
        # Prepend BOS ourselves only where the flag asks for it and the post-processor doesn't add it
        probe = backend.encode("a", add_special_tokens=True).ids
        self._prepend_bos = add_bos_token and self.bos_token_id is not None and probe[:1] != [self.bos_token_id]

    @property
    def vocab_size(self) -> int:
        """Token ids in use, added tokens included (the model's embedding may be larger)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {path} (only fast tokenizers are supported)")
        backend = HFTokenizer.from_file(str(tokenizer_file))
        config = _read_json(path / "tokenizer_config.json")
        special_map = _read_json(path / "special_tokens_map.json")
        special_tokens = {}
        for key in _SPECIAL_TOKEN_KEYS:  # tokenizer_config.json first, the legacy special_tokens_map.json after
            token = _token_str(config.get(key)) or _token_str(special_map.get(key))
            if token is not None:
                special_tokens[key] = token
        return cls(
            backend,
            special_tokens,
            _eos_token_ids(path, backend, special_tokens),
            _chat_template(path, config),
            add_bos_token=bool(config.get("add_bos_token", False)),
        )

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self._prepend_bos:
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str:
        """Render the conversation to a prompt string (encode it with add_special_tokens=False: templates
        write their own BOS)."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat_template (tokenizer_config.json or chat_template.jinja)")
        variables = {**self.special_tokens, **kwargs}
        variables.setdefault("tools", None)
        variables.setdefault("documents", None)
        return _compile(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **variables
        )


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_str(value: Any) -> str | None:
    """A special token as tokenizer_config spells it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _eos_token_ids(path: Path, backend: HFTokenizer, special: dict[str, str]) -> list[int]:
    """generation_config.json's eos ids (else config.json's), plus the tokenizer's own eos_token."""
    generation, config = _read_json(path / "generation_config.json"), _read_json(path / "config.json")
    value = generation.get("eos_token_id", config.get("eos_token_id"))
    ids = [] if value is None else list(value) if isinstance(value, list) else [value]
    eos = special.get("eos_token")
    eos_id = backend.token_to_id(eos) if eos is not None else None
    if eos_id is not None and eos_id not in ids:
        ids.append(eos_id)
    return [int(i) for i in ids]


def _chat_template(path: Path, config: dict[str, Any]) -> str | None:
    """chat_template.jinja wins over tokenizer_config.json, as in transformers; named lists give 'default'."""
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t["name"]: t["template"] for t in template}
        template = named.get("default")
    return template


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # jinja's own tojson HTML-escapes; templates expect plain JSON
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    # Templates come from model repos: untrusted code, hence the immutable sandbox
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)
