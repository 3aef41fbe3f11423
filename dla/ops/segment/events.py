"""From a per-token detection (`I_t` and the boundary flags) to the segmentation, for both
segmentation kernels: the boundary *events*, compacted for the `O(K)` merge scan, the open block
the last event leaves, and `segment_drift`, the `dla` policy under `drift` (detection, the
kernel's merge scan, the open block). Plain torch on any device, no host synchronisation.

Event `e` of a stream is its `e`-th flagged token. Per event: its position and `I_t`, and the count
and `I` sum of the tokens that the block it closes absorbed (index `e`; index `E`, after the last
event: the tokens the final open block absorbed). The merge scan then visits events only: it adds
the absorbed tokens to the open slot, merges the least dense adjacent pair when the cache is full,
and appends the event's slot.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from dla.ops.segment.detect import detect_drift
from dla.ops.segment.ends import clear_padding, drop_padding_count
from dla.ops.state import state_dtype

__all__ = ["Events", "compact_events", "open_block", "segment_drift"]


class Events(NamedTuple):
    count: Tensor  # [N] int64 events E per stream
    pos: Tensor  # [N, T + 1] int64 position of event e; T beyond E
    info: Tensor  # [N, T + 1] I_t of event e
    absorbed_n: Tensor  # [N, T + 1] int64 tokens absorbed before event e (index E: after the last)
    absorbed_I: Tensor  # [N, T + 1] their I sum, in info's dtype
    row: Tensor  # [N, T] int64 events up to and including token t


def compact_events(info: Tensor, flag: Tensor) -> Events:
    """The events of `info, flag [N, T]` (module doc). `I` sums run in float64 (a cumsum whose
    differences stay exact enough at any `T`), then take `info`'s dtype."""
    N, T = info.shape
    dev = info.device
    opens = flag != 0
    row = opens.long().cumsum(1)
    count = row[:, -1].clone()
    slot_of = torch.where(opens, row - 1, T)  # T: a dump slot, never read when E < T
    pos = torch.full((N, T + 1), T, dtype=torch.int64, device=dev)
    pos.scatter_(1, slot_of, torch.arange(T, device=dev).expand(N, T))
    absorbed = torch.where(opens, 0.0, info.double()).cumsum(1)
    csum = absorbed[:, -1:].expand(N, T + 1).clone()
    csum.scatter_(1, slot_of, absorbed)
    absorbed_I = torch.diff(csum, dim=1, prepend=csum.new_zeros(N, 1)).to(info.dtype)
    absorbed_n = torch.diff(pos, dim=1, prepend=pos.new_full((N, 1), -1)) - 1
    return Events(count=count, pos=pos, info=info.gather(1, pos.clamp(max=T - 1)), absorbed_n=absorbed_n,
                  absorbed_I=absorbed_I, row=row)


def open_block(k: Tensor, v: Tensor, flag: Tensor, Z0: Tensor, dt: torch.dtype) -> tuple[Tensor, Tensor]:
    """`(Z [B,H,Dk,Dv], zz [B,H])` in `dt` after the call: the undecayed `Σ k_s v_sᵀ` of the final
    open block — from the last flagged token, or `Z0` plus every token where no token is flagged —
    and `zz = ‖Z‖²_F`. Under `drift` no decision of the call reads `Z` or `zz`, so `zz` is taken
    from `Z` rather than carried by its update rule: equal up to rounding (SPEC §2), and the cache
    can continue under `token` or `state`. One masked product in float64 (IEEE on every device).
    `k [B,T,H,Dk]`, `v [B,T,H,Dv]`, `flag [B,H,T]`, `Z0 [B,H,Dk,Dv]`."""
    T = k.shape[1]
    t = torch.arange(T, device=k.device)
    last = torch.where(flag != 0, t, -1).amax(-1)  # [B, H]; −1: the initial block stays open
    in_block = (t >= last[..., None]).transpose(1, 2)  # [B, T, H]
    Z = torch.einsum("bthk,bthv->bhkv", k.double() * in_block[..., None], v.double())
    Z = Z + torch.where((last < 0)[..., None, None], Z0.double(), 0.0)
    return Z.to(dt), Z.pow(2).sum((-2, -1)).to(dt)


def segment_drift(k, v, g, beta, S0, n0, I0, m0, Z0, N0, K: int, tau: float, chunk_size: int, products,
                  merge_events, end: Tensor | None = None, scores=None):
    """`dla` under `drift` on any device: the detection stage with the kernel's `products` and
    `scores` (see `detect_drift`), its `merge_events(info, flag, n0, I0, m0, K) -> (level_start
    [B,T,H,K] int32, n, I, m)` (merge scan and level-map fill), and the final open block. `end
    [B]`: rows that end early (`ends.py`)."""
    dt = state_dtype(k.dtype)
    live = torch.arange(K, device=k.device) < m0[..., None]
    Sg0 = torch.where(live[..., None, None], S0.to(dt), 0.0).sum(2)  # S^g before the call
    g, beta = (None if x is None else x.detach() for x in (g, beta))
    det = detect_drift(k.detach(), v.detach(), g, beta, Sg0, N0, m0, tau, chunk_size, products, end, scores)
    info, flag = det.info, det.flag
    if end is not None:
        info, flag = clear_padding(info, flag, end)
    level_start, n, I, m = merge_events(info, flag, n0, I0, m0, K)
    if end is not None:
        n = drop_padding_count(n, m, k.shape[1], end)
    Z, zz = open_block(k, v, flag, Z0, dt)
    return level_start, n, I, m, Z, zz, det.N
