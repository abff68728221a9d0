"""Llama-family models: config parsing, TP-ready layers, the decoder, weight loading, tokenizer, presets."""

from cluster.model.arch import ModelArchConfig
from cluster.model.llama import LlamaForCausalLM
from cluster.model.loader import load_model
from cluster.model.presets import PRESETS, Preset, make_model
from cluster.model.tokenizer import Tokenizer

__all__ = ["PRESETS", "LlamaForCausalLM", "ModelArchConfig", "Preset", "Tokenizer", "load_model", "make_model"]
