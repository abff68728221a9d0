"""make_model: a real HF checkpoint directory that transformers reads, reproducible from its seed."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from cluster.model.presets import PRESETS, Preset, hf_config, make_model, random_weights
from cluster.model.tokenizer import Tokenizer
from cluster.model.toy_tokenizer import train_tokenizer

transformers = pytest.importorskip("transformers")

FILES = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
         "special_tokens_map.json"]
TEST_PRESETS = ["tiny", "tiny-llama-gqa", "tiny-qwen2", "tiny-qwen3", "tiny-mistral"]


@pytest.mark.parametrize("preset", TEST_PRESETS)
def test_writes_a_checkpoint_transformers_reads(preset, preset_model_dir):
    model_dir = preset_model_dir(preset)
    for name in FILES:
        assert (model_dir / name).is_file(), name
    config = transformers.AutoConfig.from_pretrained(model_dir)
    p = PRESETS[preset]
    assert config.model_type == p.model_type and config.num_hidden_layers == p.num_layers
    assert config.architectures == [hf_config(p)["architectures"][0]]
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    assert len(tokenizer) == p.vocab_size == Tokenizer.from_dir(model_dir).vocab_size
    weights = load_file(model_dir / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in weights.values())
    assert ("lm_head.weight" in weights) != p.tie_word_embeddings


def test_tiny_preset_is_small_enough(tiny_model_dir):
    num_params = sum(t.numel() for t in load_file(tiny_model_dir / "model.safetensors").values())
    assert num_params <= 7_000_000


def test_small_preset_shapes():
    weights = random_weights(PRESETS["small"], seed=0)
    assert weights["model.layers.7.self_attn.k_proj.weight"].shape == (256, 512)
    assert weights["model.layers.0.mlp.gate_proj.weight"].shape == (1408, 512)
    assert weights["lm_head.weight"].shape == (8000, 512)
    assert hf_config(PRESETS["small"])["dtype"] == "bfloat16"


def test_same_seed_same_bytes_other_seed_other_weights(preset_model_dir, tmp_path):
    again = make_model("tiny-qwen3", tmp_path / "again", seed=0)
    first = preset_model_dir("tiny-qwen3")
    for name in FILES:
        assert (again / name).read_bytes() == (first / name).read_bytes(), name
    other = load_file(make_model("tiny-qwen3", tmp_path / "other", seed=1) / "model.safetensors")
    assert not torch.equal(other["model.norm.weight"], load_file(first / "model.safetensors")["model.norm.weight"])


def test_tokenizer_training_is_deterministic():
    a, b = train_tokenizer(600, "qwen2"), train_tokenizer(600, "qwen2")
    assert a.to_str() == b.to_str() and a.get_vocab_size() == 600


def test_sharded_and_half_precision_outputs(preset_model_dir):
    model_dir = preset_model_dir("tiny-qwen2", dtype="bfloat16", num_shards=2)
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert not (model_dir / "model.safetensors").exists()
    tensors = {}
    for name in files:
        tensors.update(load_file(model_dir / name))
    assert set(tensors) == set(index["weight_map"])
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in tensors.values())
    assert json.loads((model_dir / "config.json").read_text())["dtype"] == "bfloat16"


def test_legacy_and_current_config_spellings():
    legacy = hf_config(PRESETS["tiny-llama-gqa"])
    assert legacy["rope_scaling"]["rope_type"] == "llama3" and "rope_parameters" not in legacy
    assert legacy["torch_dtype"] == "float32"
    current = hf_config(PRESETS["tiny"])
    assert current["rope_parameters"] == {"rope_type": "default", "rope_theta": 500000.0}
    assert "rope_scaling" not in current and current["dtype"] == "float32"


def test_eos_and_chat_tokens(tiny_model_dir):
    generation = json.loads((tiny_model_dir / "generation_config.json").read_text())
    tokenizer = Tokenizer.from_dir(tiny_model_dir)
    ids = [tokenizer.backend.token_to_id(t) for t in ("<|end_of_text|>", "<|im_end|>")]
    assert generation["eos_token_id"] == ids == tokenizer.eos_token_ids
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert prompt.startswith("<|begin_of_text|><|im_start|>user\nhi<|im_end|>\n")


def test_custom_preset_and_bad_arguments(tmp_path):
    custom = Preset("llama", 64, 128, 1, 2, 1, 400, 128)
    model_dir = make_model(custom, tmp_path / "custom")
    assert json.loads((model_dir / "config.json").read_text())["hidden_size"] == 64
    with pytest.raises(ValueError, match="unknown preset"):
        make_model("huge", tmp_path / "x")
    with pytest.raises(ValueError, match="dtype"):
        make_model("tiny", tmp_path / "x", dtype="int8")
