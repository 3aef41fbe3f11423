"""Piecewise-stationary key/value streams: a few regimes, each a fixed direction plus small
noise, with geometric regime lengths. Random Gaussian `k, v` make almost every token a
boundary; these make boundaries, in-block merges and capacity merges all happen (SPEC §6)."""

from __future__ import annotations

import torch
from torch import Tensor


def piecewise_stationary(
    batch: int, length: int, heads: int, dk: int, dv: int, *, mean_regime: float = 64.0,
    noise: float = 0.1, generator: torch.Generator | None = None, dtype=torch.float32, device="cpu",
) -> tuple[Tensor, Tensor, Tensor]:
    """Return `k [B,T,H,Dk]`, `v [B,T,H,Dv]` and the change points `[B, T]` (bool, true where a
    new regime starts; per batch element, shared by its heads). Each regime draws a fresh
    unit direction per head for k and v; tokens add Gaussian noise of relative size `noise`."""
    gen = generator
    p_change = 1.0 / max(mean_regime, 1.0)
    change = torch.rand(batch, length, generator=gen) < p_change
    change[:, 0] = True
    regime = change.long().cumsum(1) - 1  # [B, T] regime index
    n_regimes = int(regime.max()) + 1
    kdir = torch.nn.functional.normalize(torch.randn(batch, n_regimes, heads, dk, generator=gen), dim=-1)
    vdir = torch.nn.functional.normalize(torch.randn(batch, n_regimes, heads, dv, generator=gen), dim=-1)
    idx = regime[:, :, None, None]
    k = torch.gather(kdir, 1, idx.expand(batch, length, heads, dk))
    v = torch.gather(vdir, 1, idx.expand(batch, length, heads, dv))
    k = k + noise * torch.randn(batch, length, heads, dk, generator=gen) / dk**0.5
    v = v + noise * torch.randn(batch, length, heads, dv, generator=gen) / dv**0.5
    return k.to(dtype=dtype, device=device), v.to(dtype=dtype, device=device), change.to(device)
