"""`fenwick` and `single` segmentation in closed form, in plain torch on any device (SPEC §2):
no token loop, nothing data-dependent beyond the initial cache. Both segmentation kernels
(`cpu.py`, `triton_walk.py`) take these for the two fixed schedules."""

from __future__ import annotations

import torch
from torch import Tensor

from dla.ops.levels import EMPTY
from dla.ops.state import state_dtype

__all__ = ["segment_fenwick", "segment_single"]


def _bit_length(x: Tensor) -> Tensor:
    """bitlen of non-negative int64 values below 2**53 (exact through float64's exponent)."""
    return torch.frexp(x.to(torch.float64)).exponent.to(torch.int64)


def _untouched_dla_fields(I_like: Tensor, Z0: Tensor, zz0: Tensor, dt):
    """I, Z, zz for `fenwick` and `single`, as the references leave them: I zero, Z and zz
    those of the initial state."""
    return torch.zeros(I_like.shape, dtype=dt, device=I_like.device), Z0.to(dt).clone(), zz0.to(dt).clone()


def segment_fenwick(k, v, n0, m0, Z0, zz0, step0, L: int, end: Tensor | None = None):
    """Closed form in plain torch on any device (the Triton launcher uses it too).
    Level ℓ ≥ 1 at absolute position p holds [(p>>ℓ)<<ℓ, ((p>>ℓ)<<ℓ) + 2^(ℓ−1)) iff bit ℓ−1 of p
    is set; level 0 holds p. An initial cache (slot i = level K−1−i at time step0 − 1, at
    pseudo-position −1 − level) is folded in: a level reaching back before step0 starts at the
    oldest non-empty initial bucket it contains. `end [B]`: the final counts are those after step
    `end − 1` (rows that end early, `ends.py`)."""
    B, T, H, _ = k.shape
    dev, dt, K = k.device, state_dtype(k.dtype), L
    step = step0.to(torch.int64).to(dev)  # [B]
    t = torch.arange(T, device=dev)
    lv = torch.arange(L, device=dev)
    p = step[:, None] + t  # [B, T] absolute positions
    lo = (p[..., None] >> lv) << lv  # [B, T, L] start of the aligned block of size 2^ℓ
    half = (1 << (lv - 1).clamp(min=0))  # 2^(ℓ−1)
    bit = ((p[..., None] >> (lv - 1).clamp(min=0)) & 1) == 1
    first_tok = torch.maximum(lo, step[:, None, None])  # first of this call's tokens in the level
    tok_ok = bit & (first_tok < lo + half) & (lv >= 1)
    tok_start = torch.where(tok_ok, first_tok - step[:, None, None], EMPTY)
    tok_start[..., 0] = t  # level 0 = {p}
    count = torch.where(tok_ok, lo + half - first_tok, 0)  # tokens of this call in each level
    count[..., 0] = 1

    # initial buckets: slot i < m0 with n0 > 0 holds level ℓ = K − 1 − i at time P = step0 − 1
    slot = torch.arange(K, device=dev)
    ell = K - 1 - slot  # [K]
    P = (step - 1).clamp(min=0)  # [B] (unused where no slot is live)
    rep = (P[:, None] >> ell) << ell  # [B, K] a member of bucket ℓ
    init_level = _bit_length(p[..., None] ^ rep[:, None, :])  # [B, T, K]
    valid = (slot < m0[..., None]) & (n0 > 0)  # [B, H, K]
    idx = torch.where(valid[:, :, None, :], init_level[:, None], L)  # [B, H, T, K]; L = nowhere
    init_start = torch.full((B, H, T, L + 1), EMPTY, dtype=torch.int64, device=dev)
    pseudo = (-1 - ell).expand(B, H, T, K)
    init_start.scatter_reduce_(-1, idx, pseudo, reduce="amin")
    init_start = init_start[..., :L]
    level_start = torch.where(init_start != EMPTY, init_start, tok_start[:, None])  # [B, H, T, L]
    level_start = level_start.to(torch.int32).permute(0, 2, 1, 3).contiguous()

    # final counts: slot i holds level K − 1 − i
    last = torch.full((B,), T - 1, dtype=torch.int64, device=dev) if end is None else end.to(dev) - 1
    final = count[torch.arange(B, device=dev), last][:, None].expand(B, H, L).clone()  # [B, H, L] by level
    carried = torch.zeros(B, H, L + 1, dtype=torch.int64, device=dev)
    last_idx = idx.gather(2, last.view(B, 1, 1, 1).expand(B, H, 1, K))[:, :, 0]
    carried.scatter_add_(-1, last_idx, torch.where(valid, n0.to(torch.int64), 0))
    n = (final + carried[..., :L]).flip(-1).contiguous()
    m = torch.full((B, H), K, dtype=torch.int64, device=dev)
    I, Z, zz = _untouched_dla_fields(n, Z0, zz0, dt)
    return level_start, n, I, m, Z, zz


def segment_single(k, v, n0, m0, Z0, zz0, L: int, end: Tensor | None = None):
    """Everything at rank 0: from the oldest non-empty initial slot (position i − m0) or token 0.
    `end [B]`: the rank-0 count takes the first `end` tokens only."""
    B, T, H, _ = k.shape
    dev, dt, K = k.device, state_dtype(k.dtype), L
    slot = torch.arange(K, device=dev)
    valid = (slot < m0[..., None]) & (n0 > 0)  # [B, H, K]
    oldest = torch.where(valid, slot - m0[..., None], 0).amin(-1)  # [B, H], 0 when none
    level_start = torch.full((B, T, H, L), EMPTY, dtype=torch.int32, device=dev)
    level_start[..., 0] = oldest[:, None, :].to(torch.int32)
    n = torch.zeros(B, H, K, dtype=torch.int64, device=dev)
    length = T if end is None else end.to(dev).view(B, 1)
    n[..., 0] = length + torch.where(valid, n0.to(torch.int64), 0).sum(-1)
    m = torch.ones(B, H, dtype=torch.int64, device=dev)
    I, Z, zz = _untouched_dla_fields(n, Z0, zz0, dt)
    return level_start, n, I, m, Z, zz
