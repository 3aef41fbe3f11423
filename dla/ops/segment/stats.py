"""Statistics of a `dla` segmentation, from its level map alone (a pure function of the encoding,
`dla/compile/SCHEMAS.md`): how often slots open and merge, how long the blocks are, and how many
slots a chunk of the readout changes (SPEC §3.1: "only the slots that change inside a chunk produce
new objects at its end").

From `level_start [B,T,H,K]` and the initial live count `m0 [B,H]`:

* token `t` *opened* a slot iff `level_start[t, 0] = t` (the rank-0 slot starts at `t`); a
  *boundary* is an opening that was scored — every one but the first token of a call on an empty
  cache, which opens the first slot unscored;
* `m_t`, the live slots after step `t`, is the number of non-empty ranks (`m_{−1} = m0`); a
  boundary with `m_t = m_{t−1}` found the cache full: a *capacity merge*;
* *segments*: the call's tokens cut at every opening (the first piece continues the cache's open
  block and the last is cut by the call's end, so both may be short);
* *slots changed* in a chunk of `C` tokens (chunks aligned to the call's first token): the live
  slots after the chunk's last step minus those that are closed slots before its first step with
  the same extent (same first member, same next-younger slot) — a merged, newly closed or open
  slot is changed, so every chunk changes at least its open block.

Rates are per head, pooled over the batch: per 1000 tokens of the call, late boundaries per 1000
tokens at positions `≥ skip_first` (the first tokens of a window open slots whatever the
content), slots changed per chunk averaged over chunks.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from dla.ops.levels import EMPTY, initial_starts, running_min

__all__ = ["SegmentationStats", "segmentation_stats"]


class SegmentationStats(NamedTuple):
    """Per head, `[H]` float64 (NaN where a statistic has nothing to count); the median of an even
    count is the lower middle value, as `torch.median` takes it."""

    boundaries_per_1k: Tensor
    late_boundaries_per_1k: Tensor  # among the tokens at positions ≥ skip_first
    merges_per_1k: Tensor  # capacity merges
    mean_segment: Tensor
    median_segment: Tensor
    slots_changed_per_chunk: Tensor


def segmentation_stats(level_start: Tensor, *, m0: Tensor | None = None, chunk_size: int = 64,
                       skip_first: int = 16) -> SegmentationStats:
    """The module doc's statistics of `level_start [B,T,H,K]` (int32) after a cache with `m0 [B,H]`
    live slots (None: an empty cache)."""
    B, T, H, K = level_start.shape
    dev = level_start.device
    starts = level_start.permute(0, 2, 1, 3).long()  # [B, H, T, K]
    m0 = torch.zeros(B, H, dtype=torch.long, device=dev) if m0 is None else m0.to(dev).long()
    t = torch.arange(T, device=dev)
    opened = starts[..., 0] == t  # [B, H, T]
    unscored = (t == 0) & (m0 == 0)[..., None]
    boundary = opened & ~unscored
    m = (starts != EMPTY).sum(-1)  # [B, H, T]
    m_before = torch.cat([m0[..., None], m[..., :-1]], -1)
    merge = boundary & (m == m_before)
    tokens = B * T
    late = t >= skip_first
    late_tokens = B * int(late.sum())
    per_1k = lambda x, n: (1000.0 * x.sum((0, 2)).double() / n) if n else torch.full((H,), float("nan"))  # noqa: E731

    mean, median = _segment_lengths(opened)
    return SegmentationStats(
        boundaries_per_1k=per_1k(boundary, tokens),
        late_boundaries_per_1k=per_1k(boundary & late, late_tokens),
        merges_per_1k=per_1k(merge, tokens),
        mean_segment=mean,
        median_segment=median,
        slots_changed_per_chunk=_slots_changed(starts, m0, int(chunk_size)),
    )


def _segment_lengths(opened: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and median length of the pieces the openings cut the call into, per head."""
    B, H, T = opened.shape
    piece = opened.long().cumsum(-1)  # piece index of each token (0: before the first opening)
    lengths = torch.zeros(B, H, T + 1, dtype=torch.long, device=opened.device)
    lengths.scatter_add_(-1, piece, torch.ones_like(piece))
    mean, median = torch.empty(H, dtype=torch.float64), torch.empty(H, dtype=torch.float64)
    for h in range(H):
        found = lengths[:, h][lengths[:, h] > 0].double().cpu()
        mean[h] = found.mean()
        median[h] = found.median()
    return mean, median


def _slots_changed(starts: Tensor, m0: Tensor, C: int) -> Tensor:
    """Live slots after each chunk minus the closed slots it kept whole, averaged per head."""
    B, H, T, K = starts.shape
    before_call = torch.where(torch.arange(K, device=starts.device) < m0[..., None],
                              initial_starts(K, starts.device).long(), EMPTY)  # [B, H, K]
    ends = torch.arange(C - 1, T + C - 1, C, device=starts.device).clamp(max=T - 1)  # each chunk's last step
    after = starts[:, :, ends]  # [B, H, NC, K]
    before = torch.cat([before_call[:, :, None], starts[:, :, ends[:-1]]], 2)
    live_after = after != EMPTY
    keyed_after, keyed_before = _extents(after), _extents(before)
    closed_before = (before != EMPTY) & (torch.arange(K, device=starts.device) >= 1)
    same = (after[..., :, None] == before[..., None, :]) & (keyed_after[..., :, None] == keyed_before[..., None, :])
    kept = (same & closed_before[..., None, :]).any(-1) & live_after
    changed = (live_after.sum(-1) - kept.sum(-1)).double()  # [B, H, NC]
    return changed.mean((0, 2)).cpu()


def _extents(starts: Tensor) -> Tensor:
    """For each rank, the start of the next younger non-empty slot (`EMPTY` for rank 0: the open
    block, which has no end yet); starts decrease with rank, so it is the minimum over the
    younger ranks."""
    younger = running_min(starts)[..., :-1]
    return torch.cat([torch.full_like(starts[..., :1], EMPTY), younger], -1)
