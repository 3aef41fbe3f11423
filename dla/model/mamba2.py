"""Mamba-2 mixer over the multi-state operator (SPEC §5).

    [z, x, B, C, dt] = W_in u            x, B, C through a short causal conv and SiLU
    g_t = −exp(A_log) · softplus(dt_t + dt_bias)         (per head, ≤ 0)
    o   = multistate_attention(q = C, k = B, v = dt · x, λ, g)    (SSD: no 1/√N scale)
    y   = W_out RMSNorm((o + D ⊙ x) · silu(z))

`k = B_t` and `v = dt_t · x_t` are exactly what the state receives (`S += B_t (dt_t x_t)ᵀ`),
so the segmentation sees the state's writes. One group: `B`, `C` are shared by all heads.
Shapes: `u [B, T, d_model]`; heads `H`, state size `N = head_dim`, head width
`P = head_dim_v`, inner width `H · P`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dla.model.cache import RecurrentCache
from dla.model.config import ModelConfig
from dla.model.layers import GatedRMSNorm, MultiState, ShortConv, dt_bias_init


class DLAMamba2(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H, N, P = cfg.n_heads, cfg.head_dim, cfg.head_dim_v
        self.heads, self.state_size, self.head_width = H, N, P
        inner = H * P
        self.in_proj = nn.Linear(cfg.d_model, 2 * inner + 2 * N + H, bias=False)
        self.conv = ShortConv(inner + 2 * N, cfg.conv_size)
        self.A_log = nn.Parameter(torch.log(torch.empty(H).uniform_(1, 16)))
        self.dt_bias = nn.Parameter(dt_bias_init(H))
        self.D = nn.Parameter(torch.ones(H))
        self.norm = GatedRMSNorm(inner, inner, norm_before_gate=False, eps=cfg.norm_eps)
        self.out_proj = nn.Linear(inner, cfg.d_model, bias=False)
        self.multistate = MultiState(cfg, H)

    def forward(self, u: Tensor) -> Tensor:
        return self._mix(u, None)

    def forward_cached(self, u: Tensor, cache: RecurrentCache, pos: Tensor) -> tuple[Tensor, RecurrentCache]:
        """`forward` continued from `cache` (the tokens before `u`); returns the new cache."""
        return self._mix(u, cache)

    def empty_cache(self, batch: int, *, max_len: int, dtype: torch.dtype, device) -> RecurrentCache:
        return RecurrentCache(conv=(self.conv.empty_state(batch, dtype=dtype, device=device),),
                              state=self.multistate.empty_state(batch, dtype=dtype, device=device))

    def _mix(self, u: Tensor, cache: RecurrentCache | None):
        Bsz, T, _ = u.shape
        H, N, P = self.heads, self.state_size, self.head_width
        z, xBC, dt = self.in_proj(u).split([H * P, H * P + 2 * N, H], dim=-1)
        if cache is None:
            xBC = self.conv(xBC)
        else:
            xBC, conv = self.conv.forward_cached(xBC, cache.conv[0])
        x, B, C = xBC.split([H * P, N, N], dim=-1)
        x = x.unflatten(-1, (H, P))
        dt = F.softplus(dt.float() + self.dt_bias)  # [B, T, H]
        g = -torch.exp(self.A_log.float()) * dt
        k = B[:, :, None, :].expand(Bsz, T, H, N)
        q = C[:, :, None, :].expand(Bsz, T, H, N)
        v = (x.float() * dt[..., None]).to(x.dtype)
        if cache is None:
            o = self.multistate(u, q, k, v, g=g, scale=1.0)
        else:
            o, state = self.multistate(u, q, k, v, g=g, scale=1.0, state=cache.state)
        y = o + x * self.D[:, None].to(x.dtype)
        out = self.out_proj(self.norm(y.flatten(-2), z))
        return out if cache is None else (out, RecurrentCache(conv=(conv,), state=state))
