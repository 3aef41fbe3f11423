"""The fixed-shape multi-state cache (SPEC §4) that `initial_state` accepts and
`output_final_state=True` returns.

Slots `i < m` are live, oldest first; slot `i` has rank `m − 1 − i` from the newest.
`fenwick` keeps one slot per level, so its `m` is `K` as soon as a token was consumed and
slot `i` holds level `K − 1 − i` (empty levels have `n = 0` and a zero state). `single`
keeps slot 0 only. `I`, `Z` and `zz` belong to the `dla` policy and stay zero otherwise.

`N = ‖S^g‖²_F` is the squared norm of the single-state backbone `S^g` — the sum of the live
slots — that the `drift` score compares step to step (SPEC §2). It is carried by its update
rule under every policy and score, so any cache can continue under any score; a cache whose `N`
was instead computed from its slots equals it up to rounding.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class MultiStateCache(NamedTuple):
    S: Tensor  # [B, H, K, Dk, Dv] slot states, oldest first
    n: Tensor  # [B, H, K] int64 tokens per slot
    I: Tensor  # [B, H, K] information sum per slot
    m: Tensor  # [B, H] int64 live slots
    Z: Tensor  # [B, H, Dk, Dv] undecayed Σ k vᵀ of the open block
    zz: Tensor  # [B, H] ‖Z‖²_F, carried by its update rule
    step: Tensor  # [B] int64 tokens consumed before the call that takes this cache
    N: Tensor  # [B, H] ‖S^g‖²_F, S^g = Σ of the live slots, carried by its update rule


EPS = 1e-12
"""SPEC §2 ("Numerics of decisions"): the floor of every cosine denominator."""


def state_dtype(input_dtype: torch.dtype) -> torch.dtype:
    """States and decision statistics: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if input_dtype == torch.float64 else torch.float32


def empty_cache(
    batch: int, heads: int, capacity: int, dk: int, dv: int, *, dtype: torch.dtype, device
) -> MultiStateCache:
    """The cache before the first token: no live slot (`m = 0`), `step = 0`, `N = 0`."""
    f = dict(dtype=state_dtype(dtype), device=device)
    i64 = dict(dtype=torch.int64, device=device)
    return MultiStateCache(
        S=torch.zeros(batch, heads, capacity, dk, dv, **f),
        n=torch.zeros(batch, heads, capacity, **i64),
        I=torch.zeros(batch, heads, capacity, **f),
        m=torch.zeros(batch, heads, **i64),
        Z=torch.zeros(batch, heads, dk, dv, **f),
        zz=torch.zeros(batch, heads, **f),
        step=torch.zeros(batch, **i64),
        N=torch.zeros(batch, heads, **f),
    )
