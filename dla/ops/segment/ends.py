"""Rows that end before `T`: the segmentation of packed sequences laid out as padded rows
(`dla.ops.packing`).

Row `b` holds a sequence of `end[b]` tokens (`1 ≤ end ≤ T`) followed by padding that writes
nothing and keeps the state (`k = v = 0`, `g = 0`, `β = 0`: the operator makes it so). Such a
token leaves `S^g`, `N`, `Z` and every slot state exactly as they were, but a score could still
flag it (a zero write is as far as can be from any state) and every slot count would take it. So
the padding is taken out of the segmentation: its flags and `I_t` are cleared before the merge
scan, the open slot's count drops the padding it absorbed, and the level map's rows from `end`
on repeat row `end − 1` (the padding sits in the open block, level 0, as absorbed tokens do). The
final state is then the one after step `end − 1` — that of the sequence alone — and the readout,
whose final slot states follow the map's last row, returns the sequence's own.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["clear_padding", "drop_padding_count", "freeze_after_end", "frozen"]


def clear_padding(info: Tensor, flag: Tensor, end: Tensor) -> tuple[Tensor, Tensor]:
    """`info, flag [B, H, T]` with every position `t ≥ end[b]` cleared."""
    T = info.shape[-1]
    pad = torch.arange(T, device=info.device) >= end.to(info.device).view(-1, 1, 1)
    return info.masked_fill(pad, 0), flag.masked_fill(pad, False)


def drop_padding_count(n: Tensor, m: Tensor, T: int, end: Tensor) -> Tensor:
    """`n [B, H, K]` (slots oldest first) with the open slot `m − 1` counting `T − end` tokens
    fewer: the padding it absorbed."""
    open_slot = torch.arange(n.shape[-1], device=n.device) == (m - 1)[..., None]
    return n - open_slot * (T - end.to(n.device)).view(-1, 1, 1)


def freeze_after_end(level_start: Tensor, end: Tensor) -> Tensor:
    """`level_start [B, T, H, K]` with rows `t ≥ end[b]` replaced by row `end[b] − 1`."""
    B, T = level_start.shape[:2]
    t = torch.arange(T, device=level_start.device)
    row = torch.minimum(t, end.to(level_start.device).view(-1, 1) - 1)  # [B, T]
    return level_start.gather(1, row.view(B, T, 1, 1).expand_as(level_start)).contiguous()


def frozen(out: tuple, end: Tensor | None) -> tuple:
    """A segmentation kernel's outputs `(level_start, …)` with the map frozen after `end`."""
    if end is None:
        return out
    return (freeze_after_end(out[0], end), *out[1:])
