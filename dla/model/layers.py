"""Pieces the mixers share: gated RMSNorm, the short causal convolution, the level weights
`λ`, the SwiGLU MLP, rotary embeddings, and the call into the multi-state operator."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dla.model.config import ModelConfig
from dla.operator import multistate_attention
from dla.ops.state import MultiStateCache, empty_cache


class GatedRMSNorm(nn.Module):
    """RMSNorm with an output gate `silu(z)`, over groups of `group` channels.

    Mamba-2 gates first and normalises its whole inner width (`norm_before_gate=False`, one
    group); Gated DeltaNet normalises each head's output and gates after."""

    def __init__(self, dim: int, group: int, *, norm_before_gate: bool, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.group, self.norm_before_gate, self.eps = group, norm_before_gate, eps

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        gate = F.silu(z.float())
        y = x.float() if self.norm_before_gate else x.float() * gate
        y = y.unflatten(-1, (-1, self.group))
        y = (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)).flatten(-2)
        if self.norm_before_gate:
            y = y * gate
        return (y * self.weight).to(x.dtype)


class ShortConv(nn.Module):
    """Depthwise causal convolution over time, then SiLU: [B, T, C] → [B, T, C]."""

    def __init__(self, channels: int, size: int):
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, size, groups=channels, padding=size - 1)

    def forward(self, x: Tensor) -> Tensor:
        T = x.shape[1]
        return F.silu(self.conv(x.transpose(1, 2))[..., :T].transpose(1, 2))

    def forward_cached(self, x: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """The same convolution continued from `state [B, size − 1, C]`, the inputs before
        `x` (zeros at the start of a sequence, which is the zero padding of `forward`).
        Returns the output and the last `size − 1` inputs; the state keeps its dtype."""
        window = torch.cat((state.to(x.dtype), x), dim=1)
        y = F.conv1d(window.transpose(1, 2), self.conv.weight, self.conv.bias, groups=self.conv.groups)
        # copied into a fresh tensor, so the cache keeps one layout from step to step (a compiled
        # step guards on strides; `.contiguous()` keeps a slice's strides when the batch is 1)
        tail = state.new_empty(state.shape).copy_(window[:, x.shape[1]:])
        return F.silu(y.transpose(1, 2)), tail

    def empty_state(self, batch: int, *, dtype: torch.dtype, device) -> Tensor:
        return torch.zeros(batch, self.conv.kernel_size[0] - 1, self.conv.in_channels, dtype=dtype, device=device)


class LevelWeights(nn.Module):
    """λ_t = softplus(L_h ⊙ (W_λ x_t)): per head and level, `L_h` initialised to ones as in
    Log-Linear Attention. [B, T, d_model] → [B, T, H, L]."""

    def __init__(self, d_model: int, heads: int, levels: int):
        super().__init__()
        self.proj = nn.Linear(d_model, heads * levels, bias=False)
        self.L = nn.Parameter(torch.ones(heads, levels))

    def forward(self, x: Tensor) -> Tensor:
        return F.softplus(self.proj(x).unflatten(-1, self.L.shape) * self.L)


class MultiState(nn.Module):
    """The operator as a mixer sees it: level weights from the mixer's input, then
    `multistate_attention` under the configured policy. `single` is the plain backbone, so
    it reads its one state with `λ ≡ 1` and has no `W_λ`."""

    def __init__(self, cfg: ModelConfig, heads: int):
        super().__init__()
        self.cfg, self.heads = cfg, heads
        self.lam = LevelWeights(cfg.d_model, heads, cfg.levels) if cfg.policy != "single" else None

    def forward(self, x: Tensor, q: Tensor, k: Tensor, v: Tensor, *, g: Tensor | None = None,
                beta: Tensor | None = None, scale: float | None = None,
                state: MultiStateCache | None = None) -> Tensor | tuple[Tensor, MultiStateCache]:
        """x [B, T, d_model] (the mixer's input); q, k [B, T, H, Dk]; v [B, T, H, Dv];
        g, beta [B, T, H] → o [B, T, H, Dv] in v's dtype. Given the recurrent `state` (the
        cache after the tokens before `x`), returns `(o, state after x)`."""
        dtype = v.dtype
        if self.lam is None:
            lam = torch.ones(*v.shape[:3], 1, dtype=dtype, device=v.device)
        else:
            lam = self.lam(x).to(dtype)
        cfg = self.cfg
        cached = {} if state is None else dict(initial_state=state, output_final_state=True)
        return multistate_attention(
            q.to(dtype), k.to(dtype), v, lam,
            g=None if g is None else g.float(), beta=None if beta is None else beta.float(),
            policy=cfg.policy, tau=cfg.tau, score=cfg.score, scale=scale, chunk_size=cfg.chunk_size, **cached,
        )

    def empty_state(self, batch: int, *, dtype: torch.dtype, device) -> MultiStateCache:
        """The operator's cache before the first token, for activations of `dtype`."""
        cfg = self.cfg
        return empty_cache(batch, self.heads, cfg.levels, cfg.head_dim, cfg.head_dim_v, dtype=dtype, device=device)


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate_up = nn.Linear(d_model, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


def rotary_table(length: int, dim: int, base: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos, sin [length, dim / 2] for RoPE on pairs (x[..., :dim/2], x[..., dim/2:])."""
    inv = base ** (-torch.arange(0, dim // 2, dtype=torch.float64) * 2 / dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float64), inv)
    return angles.cos().float(), angles.sin().float()


def rotary_at(positions: Tensor, dim: int, base: float = 10000.0) -> tuple[Tensor, Tensor]:
    """`rotary_table` rows at `positions [T]` (int64), computed the same way, so decoding
    needs no table and is not bounded by its length."""
    inv = base ** (-torch.arange(0, dim // 2, dtype=torch.float64, device=positions.device) * 2 / dim)
    angles = positions.to(torch.float64)[:, None] * inv
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, T, H, D] rotated by position; cos, sin [T, D / 2]."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).to(x.dtype)


def dt_bias_init(heads: int, dt_min: float = 1e-3, dt_max: float = 0.1) -> Tensor:
    """Mamba-2's time-step bias: softplus(bias) log-uniform in [dt_min, dt_max]."""
    dt = torch.exp(torch.rand(heads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=1e-4)
    return dt + torch.log(-torch.expm1(-dt))
