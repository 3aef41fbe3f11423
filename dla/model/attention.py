"""Softmax-attention baseline: causal SDPA with rotary position embeddings.
Shapes: `u [B, T, d_model]`; heads `H`, head width `head_dim`; `T ≤ seq_len`."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from dla.model.config import ModelConfig
from dla.model.layers import apply_rotary, rotary_table


class SoftmaxAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.heads, self.dim = cfg.n_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.n_heads * cfg.head_dim, bias=False)
        self.out_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        cos, sin = rotary_table(cfg.seq_len, cfg.head_dim)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, u: Tensor) -> Tensor:
        T = u.shape[1]
        q, k, v = self.qkv(u).unflatten(-1, (3, self.heads, self.dim)).unbind(2)
        q, k = apply_rotary(q, self.cos[:T], self.sin[:T]), apply_rotary(k, self.cos[:T], self.sin[:T])
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.out_proj(o.transpose(1, 2).flatten(-2))
