"""The Llama-family decoder: Llama 2/3, Mistral, Qwen2 (q/k/v bias) and Qwen3 (q/k RMSNorm).

Pre-norm transformer blocks over a flattened varlen batch: T tokens from many sequences, no batch dim and
no padding. Attention over the paged KV cache is the backend's job: each layer hands it this step's
q/k/v and gets the attended values back. Shapes: T tokens, H hidden, Hq/Hkv heads on this rank,
D head_dim, I intermediate size on this rank, V vocab.
"""

from __future__ import annotations

import torch
from torch import nn

from cluster.attention.base import AttentionBackend
from cluster.attention.metadata import AttentionMetadata
from cluster.model.arch import ModelArchConfig
from cluster.model.layers import (
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    SiluAndMul,
    VocabParallelEmbedding,
)
from cluster.parallel.state import SINGLE_RANK, TPGroup


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelArchConfig, layer_idx: int, tp: TPGroup):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = cfg.head_dim
        self.qkv_proj = QKVParallelLinear(
            cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, bias=cfg.attention_bias, tp=tp
        )
        self.num_heads = self.qkv_proj.num_heads_per_rank
        self.num_kv_heads = self.qkv_proj.num_kv_heads_per_rank
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        self.o_proj = RowParallelLinear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.o_proj_bias, tp=tp)
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
        # Qwen3 normalises each head before rope, which keeps attention logits bounded
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None

    def forward(
        self,
        positions: torch.Tensor,  # [T]
        x: torch.Tensor,  # [T, H]
        attn: AttentionBackend,
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [T, H]
        T = x.shape[0]
        qkv = self.qkv_proj(x)  # [T, (Hq + 2 Hkv) * D]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(T, self.num_heads, self.head_dim)  # [T, Hq, D]
        k = k.view(T, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        v = v.view(T, self.num_kv_heads, self.head_dim)  # [T, Hkv, D], a strided view of qkv
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary_emb(positions, q, k)
        o = attn.forward(self.layer_idx, q, k, v, meta)  # [T, Hq, D]
        return self.o_proj(o.reshape(T, self.q_size))  # [T, H]


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelArchConfig, tp: TPGroup):
        super().__init__()
        size = cfg.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [size, size], bias=cfg.mlp_bias, tp=tp)
        self.act = SiluAndMul()
        self.down_proj = RowParallelLinear(size, cfg.hidden_size, bias=cfg.mlp_bias, tp=tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, H]
        gate_up = self.gate_up_proj(x)  # [T, 2I]
        return self.down_proj(self.act(gate_up))  # [T, I] -> [T, H]


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelArchConfig, layer_idx: int, tp: TPGroup):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg, layer_idx, tp)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg, tp)

    def forward(
        self,
        positions: torch.Tensor,  # [T]
        x: torch.Tensor,  # [T, H]: the previous layer's MLP output (the embeddings for layer 0)
        residual: torch.Tensor | None,  # [T, H]: the residual stream before x was added; None at layer 0
        attn: AttentionBackend,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # The residual add is deferred into the next norm, so each layer returns (its output, the stream)
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm.add_and_norm(x, residual)
        h = self.self_attn(positions, h, attn, meta)
        h, residual = self.post_attention_layernorm.add_and_norm(h, residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelArchConfig, tp: TPGroup):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, i, tp) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        attn: AttentionBackend,
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [T, H]
        x = self.embed_tokens(input_ids)  # [T, H]
        residual = None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, attn, meta)
        x, _ = self.norm.add_and_norm(x, residual)
        return x


class LlamaForCausalLM(nn.Module):
    """The engine's model: forward() to final hidden states, compute_logits() on the rows it samples.

    Parameter names mirror HF's except the fused `qkv_proj` and `gate_up_proj` (see `packed_modules`).
    """

    # HF projection name -> (our fused module, its shard id)
    packed_modules: dict[str, tuple[str, str | int]] = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, cfg: ModelArchConfig, tp: TPGroup = SINGLE_RANK):
        super().__init__()
        self.config = cfg
        self.tp = tp
        self.model = LlamaModel(cfg, tp)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, tp)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight  # same sharding, so one parameter serves both

    @property
    def num_kv_heads_per_rank(self) -> int:
        """KV heads this rank caches: what its attention backend is sized for."""
        return self.model.layers[0].self_attn.num_kv_heads

    def forward(
        self,
        input_ids: torch.Tensor,  # [T] int64
        positions: torch.Tensor,  # [T] int64, each token's position in its own sequence
        attn: AttentionBackend,
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [T, H]
        return self.model(input_ids, positions, attn, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [S, H] -> [S, V] float32
        return self.lm_head(hidden).float()
