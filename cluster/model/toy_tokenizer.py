"""A byte-level BPE tokenizer trained in a second on a built-in corpus, for `make_model` checkpoints.

Byte-level BPE as Llama 3 and Qwen use it: their split regex (Qwen also NFC-normalises; transformers 5
rebuilds Qwen tokenizers that way whatever tokenizer.json says, so we must match), a 256-symbol byte
alphabet (any text, emoji included, round-trips), merges learned from the corpus, and special tokens at
the front of the vocabulary. The corpus is a fixed English text plus pseudo-words from a seeded generator, so the
vocabulary fills to any preset size and the result is identical on every run.
"""

from __future__ import annotations

import random

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

BOS, EOS, IM_START, IM_END, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>", "<|pad|>"
SPECIAL_TOKENS = [BOS, EOS, IM_START, IM_END, PAD]

# Pre-tokenizer splits: contractions, letter runs, digits (Llama 3 groups up to 3, Qwen splits each),
# punctuation runs, whitespace
_SPLITS = {
    "llama3": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}

_TEXT = """\
The quick brown fox jumps over the lazy dog. A serving engine turns prompts into tokens, runs the model
over them, and streams the answer back one token at a time. Prefill reads the whole prompt at once and is
bound by compute; decode emits a single token per step and is bound by memory bandwidth. Splitting the two
phases onto separate workers lets each be batched for its own shape, at the price of moving the key-value
cache between them. Once upon a time there was a little robot who wanted to learn how to paint. Every
morning it rolled to the window, looked at the sky, and tried to mix the exact blue it saw. It's not easy,
they'd say, but we'll see what you've got! Numbers matter too: 0 1 2 3 4 5 6 7 8 9 10 42 100 256 1024 2048
3.14159 2.71828 1,000,000 and dates like 2024-05-17 or times like 12:30. Code looks different:
def add(a, b):
    return a + b
for i in range(10): print(i * i)
{"name": "pdserve", "version": "0.1.0", "tags": ["llm", "serving"]}
Questions? Answers! Lists: apples, oranges, bananas; cats & dogs; (parentheses) [brackets] <angles>.
Other languages: café, naïve, résumé, über, Straße, garçon, niño, señor, smörgåsbord, Ελληνικά, русский
язык, 日本語のテキスト, 中文文本, 한국어 문장, العربية, हिन्दी, emoji 🙂🚀✨ and symbols ± × ÷ € £ ¥ © ™.
"""

_ONSETS = ["", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "qu", "r", "s", "t", "v", "w", "z",
           "bl", "br", "ch", "cl", "cr", "dr", "fl", "fr", "gl", "gr", "pl", "pr", "sc", "sh", "sk", "sl", "sm",
           "sn", "sp", "st", "str", "sw", "th", "tr", "wh"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "ee", "oo", "ou", "y", "ie", "oa"]
_CODAS = ["", "", "n", "r", "s", "t", "l", "m", "nd", "ng", "st", "ck", "rt", "th", "x", "sh", "ll", "ss"]


def training_corpus(num_lines: int = 4000, seed: int = 0) -> list[str]:
    """The fixed text, repeated so its merges come first, plus seeded lines of pseudo-words."""
    rng = random.Random(seed)
    words = _TEXT.split()
    lines = _TEXT.splitlines() * 20
    for _ in range(num_lines):
        line = []
        for _ in range(rng.randint(6, 16)):
            if rng.random() < 0.4:
                line.append(rng.choice(words))
            else:
                syllables = rng.randint(1, 4)
                word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables))
                line.append(word.capitalize() if rng.random() < 0.15 else word)
        lines.append(" ".join(line) + rng.choice([".", ",", "!", "?", ":", ""]))
    return lines


def train_tokenizer(vocab_size: int, style: str = "llama3", seed: int = 0) -> Tokenizer:
    """A byte-level BPE with exactly `vocab_size` ids (special tokens included).

    style "llama3" adds BOS in its post-processor; "qwen2" adds nothing and NFC-normalises.
    """
    if style not in _SPLITS:
        raise ValueError(f"style must be one of {tuple(_SPLITS)}, got {style!r}")
    tokenizer = Tokenizer(models.BPE())
    if style == "qwen2":
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLITS[style]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(training_corpus(num_lines=max(2000, vocab_size), seed=seed), trainer)
    if tokenizer.get_vocab_size() != vocab_size:
        raise RuntimeError(f"BPE training gave {tokenizer.get_vocab_size()} tokens, wanted {vocab_size}")
    if style == "llama3":
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tokenizer.token_to_id(BOS))]
        )
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


# ChatML, opening with the BOS token when the tokenizer has one (as Llama 3's template does)
CHAT_TEMPLATE = (
    "{%- if bos_token is defined and bos_token %}{{ bos_token }}{% endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role: ' + message['role']) }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] | trim + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
