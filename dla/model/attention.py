"""Softmax-attention baseline: causal SDPA with rotary position embeddings.
Shapes: `u [B, T, d_model]`; heads `H`, head width `head_dim`; `T ≤ seq_len`. Decoding keeps a
key/value cache of a fixed `max_len` (which may exceed `seq_len`: RoPE is computed per position)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dla.model.cache import KVCache
from dla.model.config import ModelConfig
from dla.model.layers import apply_rotary, rotary_at, rotary_table


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

    def forward_cached(self, u: Tensor, cache: KVCache, pos: Tensor) -> tuple[Tensor, KVCache]:
        """`forward` of tokens at positions `pos + [0, T)` over the cached keys and values.
        Writes by `index_copy` at tensor positions and masks positions not yet written, so
        the shapes never depend on `pos`."""
        T, max_len = u.shape[1], cache.k.shape[1]
        positions = pos + torch.arange(T, device=u.device)
        cos, sin = rotary_at(positions, self.dim)
        q, k, v = self.qkv(u).unflatten(-1, (3, self.heads, self.dim)).unbind(2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        keys = cache.k.index_copy(1, positions, k.to(cache.k.dtype))
        values = cache.v.index_copy(1, positions, v.to(cache.v.dtype))
        visible = torch.arange(max_len, device=u.device)[None, :] <= positions[:, None]  # [T, max_len]
        o = F.scaled_dot_product_attention(q.transpose(1, 2), keys.to(q.dtype).transpose(1, 2),
                                           values.to(q.dtype).transpose(1, 2), attn_mask=visible)
        return self.out_proj(o.transpose(1, 2).flatten(-2)), KVCache(keys, values)

    def empty_cache(self, batch: int, *, max_len: int, dtype: torch.dtype, device) -> KVCache:
        shape = (batch, max_len, self.heads, self.dim)
        return KVCache(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
