"""Gated DeltaNet mixer over the multi-state operator (SPEC §5).

    q, k, v = short causal conv + SiLU of W_q u, W_k u, W_v u;   q, k l2-normalised per head
    g_t = −exp(A_log) · softplus(W_a u_t + dt_bias),   β_t = sigmoid(W_b u_t)
    o   = multistate_attention(q, k, v, λ, g, β)          (scale Dk^−1/2)
    y   = W_o (RMSNorm_head(o) · silu(W_g u))

Shapes: `u [B, T, d_model]`; heads `H`, `Dk = head_dim`, `Dv = head_dim_v`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dla.model.cache import RecurrentCache
from dla.model.config import ModelConfig
from dla.model.layers import GatedRMSNorm, MultiState, ShortConv, dt_bias_init


class DLAGatedDeltaNet(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H, Dk, Dv, d = cfg.n_heads, cfg.head_dim, cfg.head_dim_v, cfg.d_model
        self.heads, self.dk, self.dv = H, Dk, Dv
        self.q_proj = nn.Linear(d, H * Dk, bias=False)
        self.k_proj = nn.Linear(d, H * Dk, bias=False)
        self.v_proj = nn.Linear(d, H * Dv, bias=False)
        self.a_proj = nn.Linear(d, H, bias=False)
        self.b_proj = nn.Linear(d, H, bias=False)
        self.g_proj = nn.Linear(d, H * Dv, bias=False)
        self.q_conv = ShortConv(H * Dk, cfg.conv_size)
        self.k_conv = ShortConv(H * Dk, cfg.conv_size)
        self.v_conv = ShortConv(H * Dv, cfg.conv_size)
        self.A_log = nn.Parameter(torch.log(torch.empty(H).uniform_(0, 16)))
        self.dt_bias = nn.Parameter(dt_bias_init(H))
        self.norm = GatedRMSNorm(H * Dv, Dv, norm_before_gate=True, eps=cfg.norm_eps)
        self.o_proj = nn.Linear(H * Dv, d, bias=False)
        self.multistate = MultiState(cfg, H)

    def forward(self, u: Tensor) -> Tensor:
        H = self.heads
        q = F.normalize(self.q_conv(self.q_proj(u)).unflatten(-1, (H, self.dk)), dim=-1)
        k = F.normalize(self.k_conv(self.k_proj(u)).unflatten(-1, (H, self.dk)), dim=-1)
        v = self.v_conv(self.v_proj(u)).unflatten(-1, (H, self.dv))
        g = -torch.exp(self.A_log.float()) * F.softplus(self.a_proj(u).float() + self.dt_bias)
        beta = torch.sigmoid(self.b_proj(u).float())
        o = self.multistate(u, q, k, v, g=g, beta=beta)
        return self.o_proj(self.norm(o.flatten(-2), self.g_proj(u)))

    def forward_cached(self, u: Tensor, cache: RecurrentCache, pos: Tensor) -> tuple[Tensor, RecurrentCache]:
        """`forward` continued from `cache` (the tokens before `u`); returns the new cache."""
        H = self.heads
        q, q_state = self.q_conv.forward_cached(self.q_proj(u), cache.conv[0])
        k, k_state = self.k_conv.forward_cached(self.k_proj(u), cache.conv[1])
        v, v_state = self.v_conv.forward_cached(self.v_proj(u), cache.conv[2])
        q = F.normalize(q.unflatten(-1, (H, self.dk)), dim=-1)
        k = F.normalize(k.unflatten(-1, (H, self.dk)), dim=-1)
        v = v.unflatten(-1, (H, self.dv))
        g = -torch.exp(self.A_log.float()) * F.softplus(self.a_proj(u).float() + self.dt_bias)
        beta = torch.sigmoid(self.b_proj(u).float())
        o, state = self.multistate(u, q, k, v, g=g, beta=beta, state=cache.state)
        out = self.o_proj(self.norm(o.flatten(-2), self.g_proj(u)))
        return out, RecurrentCache(conv=(q_state, k_state, v_state), state=state)

    def empty_cache(self, batch: int, *, max_len: int, dtype: torch.dtype, device) -> RecurrentCache:
        convs = (self.q_conv, self.k_conv, self.v_conv)
        return RecurrentCache(conv=tuple(c.empty_state(batch, dtype=dtype, device=device) for c in convs),
                              state=self.multistate.empty_state(batch, dtype=dtype, device=device))
