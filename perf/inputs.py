"""Timed inputs (SPEC §7): `k, v` of a segmentation regime — *sparse*, piecewise-stationary with
geometric regime lengths of mean 64 and noise 0.1; *moderate*, the same with mean 8; *dense*,
Gaussian — and `λ, g, β` as the layers make them."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dla.run.synthetic import piecewise_stationary

REGIMES = {"sparse": 64.0, "moderate": 8.0, "dense": None}  # mean regime length (dense: Gaussian)


def layer_inputs(batch, length, heads, dk, dv, levels, *, backbone="mamba2", dtype=torch.float32, device="cpu",
                 seed=0, regime="sparse") -> dict:
    """Operator inputs for one layer. `backbone="mamba2"`: `g = −exp(A_log)·softplus(dt)`, no β.
    `"gdn"`: l2-normalised `q, k`, `β = sigmoid(·)` and a gate `g`. `"linear"`: neither.
    `regime` (module doc) sets how often `k, v` change: how many boundaries a score finds."""
    if regime not in REGIMES:
        raise ValueError(f"regime must be one of {REGIMES}, got {regime!r}")
    gen = torch.Generator().manual_seed(seed)
    if regime == "dense":
        k = torch.randn(batch, length, heads, dk, generator=gen)
        v = torch.randn(batch, length, heads, dv, generator=gen)
    else:
        k, v, _ = piecewise_stationary(batch, length, heads, dk, dv, mean_regime=REGIMES[regime], noise=0.1,
                                       generator=gen)
    q = torch.randn(batch, length, heads, dk, generator=gen)
    lam = F.softplus(torch.randn(batch, length, heads, levels, generator=gen))  # softplus(L_h ⊙ W_λ x)
    g = beta = None
    if backbone in ("mamba2", "gdn"):
        A_log = torch.log(torch.empty(heads).uniform_(1, 16, generator=gen))
        dt = F.softplus(torch.randn(batch, length, heads, generator=gen) - 4.0)
        g = -torch.exp(A_log) * dt
    if backbone == "gdn":
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        beta = torch.sigmoid(torch.randn(batch, length, heads, generator=gen))
    out = {"q": q, "k": k, "v": v, "lam": lam, "g": g, "beta": beta}
    return {n: (x.to(device=device, dtype=dtype if n not in ("g", "beta") else torch.float32) if x is not None else None)
            for n, x in out.items()}
