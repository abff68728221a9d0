"""Llama-family models: config parsing, TP-ready layers, the decoder, weight loading, tokenizer, presets.

Names are imported on first use: the router needs only the tokenizer and the config, and should not
pay for torch (seconds of start-up, hundreds of MB) to get them.
"""

import importlib

_WHERE = {
    "ModelArchConfig": "cluster.model.arch",
    "LlamaForCausalLM": "cluster.model.llama",
    "load_model": "cluster.model.loader",
    "PRESETS": "cluster.model.presets",
    "Preset": "cluster.model.presets",
    "make_model": "cluster.model.presets",
    "Tokenizer": "cluster.model.tokenizer",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(name)
    return getattr(importlib.import_module(_WHERE[name]), name)
