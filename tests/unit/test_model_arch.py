"""ModelArchConfig: HF config.json (transformers 4 and 5 spellings) onto one validated dataclass."""

from __future__ import annotations

import json

import pytest
import torch

from cluster.model.arch import ModelArchConfig

LLAMA31_8B = {  # as published (transformers 4 spelling)
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
}
QWEN25_05B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
    "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
    "use_sliding_window": False, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "bos_token_id": 151643,
    "eos_token_id": 151645, "hidden_act": "silu",
}
QWEN3_06B = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 1024, "intermediate_size": 3072,
    "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
    "vocab_size": 151936, "max_position_embeddings": 40960, "rms_norm_eps": 1e-06, "rope_theta": 1000000,
    "rope_scaling": None, "attention_bias": False, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "eos_token_id": 151645, "bos_token_id": 151643, "hidden_act": "silu",
}
MISTRAL_7B_V03 = {
    "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "vocab_size": 32768, "max_position_embeddings": 32768, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0,
    "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 1,
    "eos_token_id": 2, "hidden_act": "silu",
}


def write(tmp_path, config, generation=None):
    (tmp_path / "config.json").write_text(json.dumps(config))
    if generation is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(generation))
    return tmp_path


def test_llama31_config(tmp_path):
    cfg = ModelArchConfig.from_dir(write(tmp_path, LLAMA31_8B, {"eos_token_id": [128001, 128009]}))
    assert (cfg.model_type, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == ("llama", 32, 32, 8, 128)
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling == LLAMA31_8B["rope_scaling"]
    assert cfg.checkpoint_dtype == torch.bfloat16
    assert cfg.eos_token_ids == [128001, 128009]  # generation_config.json wins over config.json
    assert cfg.bos_token_id == 128000
    assert not (cfg.attention_bias or cfg.o_proj_bias or cfg.qk_norm or cfg.tie_word_embeddings)


def test_qwen2_has_qkv_bias_but_no_o_bias(tmp_path):
    cfg = ModelArchConfig.from_dir(write(tmp_path, QWEN25_05B))
    assert cfg.attention_bias and not cfg.o_proj_bias
    assert cfg.tie_word_embeddings and cfg.head_dim == 64
    assert cfg.sliding_window is None  # use_sliding_window is off
    assert cfg.eos_token_ids == [151645]  # an int in config.json, no generation_config.json


def test_qwen3_has_qk_norm_and_explicit_head_dim(tmp_path):
    cfg = ModelArchConfig.from_dir(write(tmp_path, QWEN3_06B))
    assert cfg.qk_norm and cfg.head_dim == 128 != cfg.hidden_size // cfg.num_heads
    assert cfg.rope_scaling is None and cfg.rope_theta == 1e6
    del_head_dim = {k: v for k, v in QWEN3_06B.items() if k != "head_dim"}
    assert ModelArchConfig.from_hf_config(del_head_dim).head_dim == 128  # transformers' Qwen3 default


def test_mistral(tmp_path):
    cfg = ModelArchConfig.from_dir(write(tmp_path, MISTRAL_7B_V03))
    assert cfg.model_type == "mistral" and cfg.head_dim == 128 and cfg.sliding_window is None
    windowed = ModelArchConfig.from_hf_config({**MISTRAL_7B_V03, "sliding_window": 4096})
    assert windowed.sliding_window == 4096


def test_transformers5_rope_parameters_with_theta_inside():
    v5 = {k: v for k, v in LLAMA31_8B.items() if k not in ("rope_theta", "rope_scaling", "torch_dtype")}
    v5["rope_parameters"] = {**LLAMA31_8B["rope_scaling"], "rope_theta": 500000.0}
    v5["dtype"] = "bfloat16"
    old, new = ModelArchConfig.from_hf_config(LLAMA31_8B), ModelArchConfig.from_hf_config(v5)
    assert old == new


def test_plain_rope_parameters_mean_no_scaling():
    cfg = ModelArchConfig.from_hf_config(
        {**MISTRAL_7B_V03, "rope_theta": None, "rope_parameters": {"rope_type": "default", "rope_theta": 123.0}}
    )
    assert cfg.rope_scaling is None and cfg.rope_theta == 123.0


def test_legacy_type_key_and_llama3_original_context_fallback():
    linear = ModelArchConfig.from_hf_config({**MISTRAL_7B_V03, "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert linear.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    scaling = {k: v for k, v in LLAMA31_8B["rope_scaling"].items() if k != "original_max_position_embeddings"}
    llama3 = ModelArchConfig.from_hf_config({**LLAMA31_8B, "rope_scaling": scaling})
    assert llama3.rope_scaling["original_max_position_embeddings"] == LLAMA31_8B["max_position_embeddings"]


def test_unknown_model_type_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"unsupported model_type 'gpt2'.*llama"):
        ModelArchConfig.from_dir(write(tmp_path, {**LLAMA31_8B, "model_type": "gpt2"}))


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"num_key_value_heads": 5}, "num_kv_heads"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type"),
        ({"rope_scaling": {"rope_type": "linear"}}, "factor"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
        ({"torch_dtype": "float8"}, "torch_dtype"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rms_norm_eps": 0}, "rms_norm_eps"),
        ({"head_dim": 7}, "head_dim"),
    ],
)
def test_invalid_configs_name_the_field(change, field):
    with pytest.raises(ValueError, match=field):
        ModelArchConfig.from_hf_config({**LLAMA31_8B, **change})


def test_missing_required_field_is_named(tmp_path):
    config = {k: v for k, v in LLAMA31_8B.items() if k != "intermediate_size"}
    with pytest.raises(ValueError, match="intermediate_size"):
        ModelArchConfig.from_dir(write(tmp_path, config))


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelArchConfig.from_dir(tmp_path)


def test_presets_parse(preset_model_dir):
    cfg = ModelArchConfig.from_dir(preset_model_dir("tiny-qwen3"))
    assert cfg.model_type == "qwen3" and cfg.head_dim == 48 and cfg.qk_norm
    cfg = ModelArchConfig.from_dir(preset_model_dir("tiny-llama-gqa"))
    assert cfg.rope_scaling["rope_type"] == "llama3" and cfg.num_heads // cfg.num_kv_heads == 4
    assert cfg.eos_token_ids == [1, 3] and cfg.bos_token_id == 0
