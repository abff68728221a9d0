"""load_model: single and sharded safetensors, dtype casts, tied embeddings, rope keys, clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from cluster.model.arch import ModelArchConfig
from cluster.model.loader import checkpoint_files, count_parameters, load_model
from cluster.model.rotary import rope_inv_freq

transformers = pytest.importorskip("transformers")


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def copy_dir(src, dst):
    shutil.copytree(src, dst, dirs_exist_ok=True)
    return dst


def edit_config(model_dir, **changes):
    """Update config.json; a value of ... deletes the key."""
    path = model_dir / "config.json"
    config = {**json.loads(path.read_text()), **changes}
    path.write_text(json.dumps({k: v for k, v in config.items() if v is not ...}))


def test_sharded_and_single_file_load_identically(preset_model_dir):
    single, sharded = preset_model_dir("tiny-qwen3"), preset_model_dir("tiny-qwen3", num_shards=3)
    assert len(checkpoint_files(sharded)) == 3 and (sharded / "model.safetensors.index.json").is_file()
    a, _ = load_model(single, torch.float32)
    b, _ = load_model(sharded, torch.float32)
    sa, sb = state(a), state(b)
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_fused_params_hold_the_checkpoint_tensors(preset_model_dir):
    model_dir = preset_model_dir("tiny-qwen2")
    model, cfg = load_model(model_dir, torch.float32)
    ckpt = load_file(model_dir / "model.safetensors")
    attn = model.model.layers[1].self_attn
    q, k, v = attn.qkv_proj.weight.split([cfg.q_size, cfg.kv_size, cfg.kv_size])
    assert torch.equal(q, ckpt["model.layers.1.self_attn.q_proj.weight"])
    assert torch.equal(v, ckpt["model.layers.1.self_attn.v_proj.weight"])
    assert torch.equal(attn.qkv_proj.bias[cfg.q_size : cfg.q_size + cfg.kv_size], ckpt["model.layers.1.self_attn.k_proj.bias"])
    gate, up = model.model.layers[0].mlp.gate_up_proj.weight.chunk(2)
    assert torch.equal(up, ckpt["model.layers.0.mlp.up_proj.weight"])
    assert torch.equal(model.model.norm.weight, ckpt["model.norm.weight"])


@pytest.mark.parametrize("saved", ["bfloat16", "float16"])
def test_half_precision_checkpoints_load_and_cast(saved, preset_model_dir):
    model_dir = preset_model_dir("tiny-mistral", dtype=saved)
    cfg = ModelArchConfig.from_dir(model_dir)
    assert cfg.torch_dtype == saved
    ckpt = load_file(model_dir / "model.safetensors")
    assert ckpt["model.embed_tokens.weight"].dtype == getattr(torch, saved)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        model, _ = load_model(model_dir, dtype)
        assert all(p.dtype == dtype for p in model.parameters())
        expected = ckpt["model.layers.0.mlp.down_proj.weight"].to(dtype)
        assert torch.equal(model.model.layers[0].mlp.down_proj.weight, expected)
        # rope tables stay float32 whatever the model dtype
        assert model.model.layers[0].self_attn.rotary_emb.cos_sin_cache.dtype == torch.float32


def test_float32_checkpoint_loads_in_bf16_same_as_rounding(preset_model_dir):
    model_dir = preset_model_dir("tiny-llama-gqa")
    a, _ = load_model(model_dir, torch.float32)
    b, _ = load_model(model_dir, torch.bfloat16)
    sa, sb = state(a), state(b)
    assert all(torch.equal(sa[k].to(torch.bfloat16), sb[k]) for k in sa)


def test_tied_embeddings_share_one_parameter(preset_model_dir):
    model_dir = preset_model_dir("tiny-qwen2")
    assert "lm_head.weight" not in load_file(model_dir / "model.safetensors")
    model, cfg = load_model(model_dir, torch.float32)
    assert cfg.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    assert count_parameters(model) == sum(p.numel() for p in hf.parameters())


def test_missing_lm_head_means_tied_even_if_config_says_otherwise(preset_model_dir, tmp_path):
    model_dir = copy_dir(preset_model_dir("tiny-mistral"), tmp_path / "m")
    ckpt = load_file(model_dir / "model.safetensors")
    del ckpt["lm_head.weight"]
    save_file(ckpt, model_dir / "model.safetensors", metadata={"format": "pt"})
    model, cfg = load_model(model_dir, torch.float32)
    assert cfg.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, ckpt["model.embed_tokens.weight"])


def test_tied_checkpoint_that_also_stores_lm_head_loads(preset_model_dir, tmp_path):
    model_dir = copy_dir(preset_model_dir("tiny-qwen2"), tmp_path / "m")
    ckpt = load_file(model_dir / "model.safetensors")
    ckpt["lm_head.weight"] = ckpt["model.embed_tokens.weight"].clone()
    ckpt["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(16)  # old checkpoints saved these
    save_file(ckpt, model_dir / "model.safetensors", metadata={"format": "pt"})
    model, _ = load_model(model_dir, torch.float32)
    assert torch.equal(model.lm_head.weight, ckpt["model.embed_tokens.weight"])


def hf_inv_freq(model_dir) -> torch.Tensor:
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return hf.model.rotary_emb.inv_freq


def our_inv_freq(model_dir) -> torch.Tensor:
    cfg = ModelArchConfig.from_dir(model_dir)
    inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    # and the model's cos/sin table is built from exactly these frequencies
    model, _ = load_model(model_dir, torch.float32)
    cache = model.model.layers[0].self_attn.rotary_emb.cos_sin_cache
    p = 1000
    assert torch.equal(cache[p], torch.cat([(p * inv_freq).cos(), (p * inv_freq).sin()]))
    return inv_freq


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 256}


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_scaling": LLAMA3, "rope_theta": 500000.0},  # transformers 4 spelling
        {"rope_scaling": ..., "rope_theta": ..., "rope_parameters": {**LLAMA3, "rope_theta": 500000.0}},  # 5
        {"rope_scaling": {"type": "linear", "factor": 4.0}, "rope_theta": 10000.0},  # legacy "type" key
        {"rope_scaling": ..., "rope_theta": ..., "rope_parameters": {"rope_type": "linear", "factor": 4.0,
                                                                     "rope_theta": 20000.0}},
    ],
    ids=["llama3-rope_scaling", "llama3-rope_parameters", "linear-rope_scaling", "linear-rope_parameters"],
)
def test_rope_scaling_from_either_key_matches_transformers(rope, preset_model_dir, tmp_path):
    model_dir = copy_dir(preset_model_dir("tiny-llama-gqa"), tmp_path / "m")
    edit_config(model_dir, **rope)
    torch.testing.assert_close(our_inv_freq(model_dir), hf_inv_freq(model_dir), atol=0, rtol=0)


def test_unknown_model_type_fails_clearly(tiny_model_dir, tmp_path):
    model_dir = copy_dir(tiny_model_dir, tmp_path / "m")
    edit_config(model_dir, model_type="gpt_neox")
    with pytest.raises(ValueError, match="unsupported model_type 'gpt_neox'"):
        load_model(model_dir, torch.float32)


def test_missing_weight_is_named(tiny_model_dir, tmp_path):
    model_dir = copy_dir(tiny_model_dir, tmp_path / "m")
    ckpt = load_file(model_dir / "model.safetensors")
    del ckpt["model.layers.2.self_attn.k_proj.weight"]
    save_file(ckpt, model_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing weight\(s\) 'model\.layers\.2\.self_attn\.k_proj\.weight'"):
        load_model(model_dir, torch.float32)


def test_unexpected_or_misshapen_weight_is_named(tiny_model_dir, tmp_path):
    model_dir = copy_dir(tiny_model_dir, tmp_path / "m")
    ckpt = load_file(model_dir / "model.safetensors")
    ckpt["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(256)  # the config says no attention bias
    save_file(ckpt, model_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.self_attn\.q_proj\.bias' has no counterpart"):
        load_model(model_dir, torch.float32)
    del ckpt["model.layers.0.self_attn.q_proj.bias"]
    ckpt["model.layers.1.mlp.up_proj.weight"] = torch.zeros(700, 256)
    save_file(ckpt, model_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight'.*shape"):
        load_model(model_dir, torch.float32)


def test_no_weights_file(tiny_model_dir, tmp_path):
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    shutil.copy(tiny_model_dir / "config.json", model_dir)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_model(model_dir, torch.float32)
