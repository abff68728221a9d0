"""Tokenizer (tokenizers + jinja2, no transformers) against transformers' AutoTokenizer on the same dir."""

from __future__ import annotations

import json
import shutil

import jinja2
import pytest

from cluster.model.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog. It's 12:30 on 2024-05-17.",
    "café naïve Straße — 日本語のテキスト, 中文, 한국어, العربية 🙂🚀✨",
    "  leading and trailing spaces  \n\ttabs\nnewlines\r\n",
    "def add(a, b):\n    return a + b\n",
    "<|im_start|>user\nhi<|im_end|>",  # special tokens inside text are matched as special tokens
    "",
]
CONVERSATIONS = [
    [{"role": "user", "content": "Hi there!"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a colour. "},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another, en français ?"},
    ],
]


@pytest.fixture(scope="module", params=["tiny", "tiny-qwen2"], ids=["llama-bos", "qwen-no-bos"])
def tokenizers_pair(request, preset_model_dir):
    model_dir = preset_model_dir(request.param)
    return Tokenizer.from_dir(model_dir), transformers.AutoTokenizer.from_pretrained(model_dir)


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches_transformers(tokenizers_pair, add_special_tokens):
    ours, hf = tokenizers_pair
    for text in TEXTS:
        assert ours.encode(text, add_special_tokens) == hf.encode(text, add_special_tokens=add_special_tokens), text


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_decode_matches_transformers_and_round_trips(tokenizers_pair, skip_special_tokens):
    ours, hf = tokenizers_pair
    for text in TEXTS:
        ids = hf.encode(text)
        assert ours.decode(ids, skip_special_tokens) == hf.decode(ids, skip_special_tokens=skip_special_tokens)
        if "<|" not in text:
            assert ours.decode(ours.encode(text)) == text  # byte-level BPE is lossless


def test_bos_and_eos(tokenizers_pair):
    ours, hf = tokenizers_pair
    assert ours.bos_token_id == hf.bos_token_id
    assert hf.eos_token_id in ours.eos_token_ids
    assert ours.vocab_size == len(hf)
    first = ours.encode("hi")[0]
    assert (first == ours.bos_token_id) == (ours.bos_token_id is not None)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_renders_like_transformers(tokenizers_pair, add_generation_prompt):
    ours, hf = tokenizers_pair
    for messages in CONVERSATIONS:
        expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected
        # the template writes the BOS itself, so the prompt is encoded without adding special tokens
        prompt = ours.apply_chat_template(messages)
        assert ours.encode(prompt, add_special_tokens=False) == hf.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=True, return_dict=False
        )


def test_chat_template_raise_exception(tiny_model_dir):
    with pytest.raises(jinja2.exceptions.TemplateError, match="unknown role: robot"):
        Tokenizer.from_dir(tiny_model_dir).apply_chat_template([{"role": "robot", "content": "x"}])


def test_chat_template_is_sandboxed(tiny_model_dir, tmp_path):
    model_dir = shutil.copytree(tiny_model_dir, tmp_path / "m")
    (model_dir / "chat_template.jinja").write_text("{{ messages.__class__.__mro__ }}")
    with pytest.raises(jinja2.exceptions.SecurityError):
        Tokenizer.from_dir(model_dir).apply_chat_template([{"role": "user", "content": "x"}])


def test_chat_template_file_wins_and_tojson_is_plain(tiny_model_dir, tmp_path):
    model_dir = shutil.copytree(tiny_model_dir, tmp_path / "m")
    (model_dir / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m | tojson }}{% endfor %}{% if add_generation_prompt %}>{% endif %}"
    )
    messages = [{"role": "user", "content": "<b>é</b>"}]
    ours = Tokenizer.from_dir(model_dir).apply_chat_template(messages)
    hf = transformers.AutoTokenizer.from_pretrained(model_dir)
    assert ours == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours == '{"role": "user", "content": "<b>é</b>"}>'


def test_no_chat_template_is_a_clear_error(tiny_model_dir, tmp_path):
    model_dir = shutil.copytree(tiny_model_dir, tmp_path / "m")
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no chat_template"):
        Tokenizer.from_dir(model_dir).apply_chat_template([{"role": "user", "content": "x"}])


def with_tokenizer_edits(model_dir, add_bos_token, post_processor: bool):
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    config.pop("add_bos_token")
    if add_bos_token is not None:
        config["add_bos_token"] = add_bos_token
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    if not post_processor:
        tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
        tokenizer["post_processor"] = None
        (model_dir / "tokenizer.json").write_text(json.dumps(tokenizer))
    return model_dir


@pytest.mark.parametrize(
    ("add_bos_token", "post_processor"), [(None, True), (False, True), (True, True), (None, False)]
)
def test_bos_follows_the_post_processor_like_transformers(tiny_model_dir, tmp_path, add_bos_token, post_processor):
    """tokenizer.json's post-processor decides (transformers 5 drops add_bos_token when tokenizer.json exists)."""
    model_dir = with_tokenizer_edits(shutil.copytree(tiny_model_dir, tmp_path / "m"), add_bos_token, post_processor)
    ours, hf = Tokenizer.from_dir(model_dir), transformers.AutoTokenizer.from_pretrained(model_dir)
    for text in TEXTS[:3]:
        assert ours.encode(text) == hf.encode(text)
        assert (ours.encode(text)[0] == ours.bos_token_id) == post_processor


def test_add_bos_token_adds_a_bos_the_post_processor_lacks(tiny_model_dir, tmp_path):
    model_dir = with_tokenizer_edits(shutil.copytree(tiny_model_dir, tmp_path / "m"), True, post_processor=False)
    ours = Tokenizer.from_dir(model_dir)
    assert ours.encode("hi") == [ours.bos_token_id, *ours.encode("hi", add_special_tokens=False)]


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
