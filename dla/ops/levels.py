"""The level map in its fixed-shape encoding, `level_start[B, T, H, L]` (int32).

Row `t` lists, for each level (rank from the newest slot) `r`, the position of the first
member of the segment that sits at level `r` after step `t`; `EMPTY` where that level holds
nothing. Positions count tokens of the current call from 0; the slots of an initial state are
pseudo-tokens, the slot of rank `r` at position `−1 − r`, so a carried cache needs no other
encoding and the readout takes its states in rank order.

Every policy fits it: `dla` fills ranks `0..m−1` with decreasing starts, `single` only rank 0,
`fenwick` the non-empty levels of the Fenwick partition (gaps are `EMPTY`). Because segments
only merge, never split, all members of a segment share a level at every later step, so the
level of any token or slot at step `t` is found from its own position alone:

    ℓ_t(s) = the first r with level_start[t, r] ≤ s   (−1 when none; s ≤ t).
"""

from __future__ import annotations

import torch
from torch import Tensor

EMPTY = 2**31 - 1  # int32 max: never ≤ a position


def level_of(starts: Tensor, positions: Tensor) -> Tensor:
    """ℓ(pos) for each row of starts: starts [..., L], positions [..., P] → [..., P] int64
    (−1 where no level holds the position)."""
    L = starts.shape[-1]
    holds = starts.unsqueeze(-2) <= positions.unsqueeze(-1)  # [..., P, L]
    first = torch.where(holds, torch.arange(L, device=starts.device), L).amin(-1)
    return torch.where(first < L, first, -1)


def running_min(starts: Tensor) -> Tensor:
    """`min(starts[..., :r + 1])` for every r: the values of `torch.cummin(starts, -1)`, by
    log₂(L) shifted minima: torch's CUDA cummin over a short last dimension runs far below memory
    speed, the shifted minima are a few passes at it."""
    out, shift, L = starts, 1, starts.shape[-1]
    while shift < L:
        out = torch.cat([out[..., :shift], torch.minimum(out[..., shift:], out[..., :-shift])], dim=-1)
        shift *= 2
    return out


def initial_starts(levels: int, device) -> Tensor:
    """Starts before the first token: the initial slot of rank r at position −1 − r (ranks
    beyond the live ones hold zero states, so they may be listed)."""
    return -1 - torch.arange(levels, device=device, dtype=torch.int32)


def dense_level_map(level_start: Tensor, m0: Tensor) -> tuple[Tensor, Tensor]:
    """Decode to the dense maps of `reference.segment_naive`: `level [B, H, T, T]` with −1 above
    the diagonal, and `initial_level [B, H, T, K]` for the slots of an initial state with `m0`
    live slots, oldest first (−1 for slots that are not live)."""
    B, T, H, L = level_start.shape
    starts = level_start.permute(0, 2, 1, 3).long()  # [B, H, T, L]
    pos = torch.arange(T, device=level_start.device)
    level = level_of(starts, pos.expand(B, H, T, T))
    level = torch.where(pos[None, :] <= pos[:, None], level, -1)
    slot = torch.arange(L, device=level_start.device)
    slot_pos = slot - m0[..., None]  # oldest-first slot i of m0 sits at position i − m0
    initial = level_of(starts, slot_pos[:, :, None, :].expand(B, H, T, L))
    initial = torch.where((slot < m0[..., None])[:, :, None, :], initial, -1)
    return level, initial


def encode_level_map(level: Tensor, initial_level: Tensor, m0: Tensor) -> Tensor:
    """Inverse of `dense_level_map`: from `level [B,H,T,T]`, `initial_level [B,H,T,K]` and the
    initial live count `m0 [B,H]` to `level_start [B,T,H,L]` (L = K)."""
    B, H, T, _ = level.shape
    L = initial_level.shape[-1]
    dev = level.device
    slot = torch.arange(L, device=dev)
    positions = torch.cat([(slot - m0[..., None])[:, :, None, :].expand(B, H, T, L),
                           torch.arange(T, device=dev).expand(B, H, T, T)], dim=-1)  # [B,H,T,L+T]
    levels = torch.cat([initial_level, level], dim=-1)
    ranks = torch.arange(L, device=dev)
    member = levels[..., None, :] == ranks[:, None]  # [B,H,T,L(rank),L+T]
    start = torch.where(member, positions[..., None, :], EMPTY).amin(-1)
    return start.to(torch.int32).permute(0, 2, 1, 3).contiguous()
