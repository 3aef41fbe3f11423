"""CPU kernel of `dla::segment` (SCHEMAS.md): the level map and the final segmentation state.

* `dla` with `score="drift"`: the boundaries are a parallel function of the sequence
  (`detect.py`: every `I_t`, the flags and the final `N` at once), so the sequential part is the
  merge scan over boundary *events* only (`_merge_events`, vectorised over `B·H`: absorbed tokens
  join the open slot, full rows merge their least dense adjacent pair, the event's slot is
  appended, the configuration snapshotted), then the level map gathered from the snapshots and
  the final open block (`events.open_block`).
* `dla` with `score="token"` or `"state"` (SPEC §2, §3): chunked boundary detection. Per chunk
  of `C` tokens, batched over `B·H`: the Gram `(K_c K_cᵀ) ⊙ (V_c V_cᵀ)` with suffix sums of its
  strictly lower rows and `ss_t = ‖k_t‖²‖v_t‖²` (both computed ahead for a group of chunks), and
  the base term `rowsum((K_c Z) ⊙ V_c)` against the open-block content `Z` at the chunk start.
  The sequential part loops over the chunk's tokens in Python, vectorised over `B·H`:
  `c_t = [block opened before the chunk]·base_t + Σ_{s = max(block start, chunk start)}^{t−1}
  Gram[t, s]` is one lookup in those sums (no `Dk×Dv` work per token), then the score. A step
  where no row opens a block only accumulates the open block's `I` and `zz`; at an *event*
  (some row opens) the open slot is written back, full rows run the capacity merge scan (masks
  over the `K` slots), and the slot starts and live counts are snapshotted; each step's level-map row is
  gathered from its snapshot at the end. `Z` is brought to the chunk end by one masked GEMM (it
  restarts at a boundary); `zz` is carried by its update rule. Decisions are computed in the
  state dtype (float32 for float32 inputs, float64 for float64), `ε = 1e-12`, radicands clamped
  at 0; the state score's `1 − cos` is evaluated in a cancellation-free form
  (`_state_information`). The scan runs on one intra-op thread.
* `fenwick` and `single`: the closed forms of `closed_form.py`.

`N` (`‖S^g‖²` after the call) is computed where a decision needs it — `drift` under `dla`, by its
update rule in the detection; every other call returns `N0` unchanged and pays no backbone pass
(the operator then takes `N` from the final slot states; SCHEMAS.md).

The kernel reads tensor values freely (it is opaque to the compiler), returns fresh tensors
and records no autograd.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import torch
from torch import Tensor

from dla.ops.levels import EMPTY
from dla.ops.segment.closed_form import segment_fenwick, segment_single
from dla.ops.segment.detect import readout_products
from dla.ops.segment.ends import drop_padding_count, frozen
from dla.ops.segment.events import compact_events, segment_drift
from dla.ops.state import EPS, state_dtype
from dla.ops.validation import check_fenwick_levels, check_segment_options

_GROUP_ELEMENTS = 1 << 22  # chunks whose suffix sums are computed together (≈ 16 MiB in float32)
_THREADS_LOCK = threading.Lock()

__all__ = ["segment_cpu"]


def segment_cpu(
    k: Tensor, v: Tensor, g: Tensor | None, beta: Tensor | None, S0: Tensor, n0: Tensor, I0: Tensor, m0: Tensor,
    Z0: Tensor, zz0: Tensor, N0: Tensor, step0: Tensor, levels: int, policy: str, score: str, tau: float,
    chunk_size: int, end: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """`(level_start [B,T,H,L] int32, n [B,H,K] int64, I [B,H,K], m [B,H] int64, Z [B,H,Dk,Dv],
    zz [B,H], N [B,H])`, floats in the state dtype; see SCHEMAS.md for the encoding. `end [B]`:
    rows that end early (`ends.py`)."""
    check_segment_options(levels, policy, score, chunk_size)
    with torch.no_grad():
        if policy == "dla" and score == "drift":
            return frozen(segment_drift(k, v, g, beta, S0, n0, I0, m0, Z0, N0, levels, float(tau),
                                        int(chunk_size), readout_products, _merge_events, end), end)
        N = N0.to(state_dtype(k.dtype)).clone()
        if policy == "dla":
            return frozen((*_segment_dla(k, v, n0, I0, m0, Z0, zz0, levels, score, float(tau), int(chunk_size),
                                         end), N), end)
        T = k.shape[1] if end is None else int(end.max())
        if policy == "fenwick":
            check_fenwick_levels(levels, step0, T)
            return frozen((*segment_fenwick(k, v, n0, m0, Z0, zz0, step0, levels, end), N), end)
        return frozen((*segment_single(k, v, n0, m0, Z0, zz0, levels, end), N), end)


# --------------------------------------------------------------------------------------------
# dla under drift: detection, then the merge scan over events
# --------------------------------------------------------------------------------------------


def _merge_events(info: Tensor, flag: Tensor, n0: Tensor, I0: Tensor, m0: Tensor, K: int):
    """The merge scan over boundary events in torch, vectorised over `B·H` rows (a row with
    fewer events idles), and the level map from the snapshot after each event. `info, flag
    [B,H,T]`; returns `(level_start [B,T,H,K] int32, n [B,H,K], I [B,H,K], m [B,H])`."""
    B, H, T = info.shape
    N = B * H
    ev = compact_events(info.reshape(N, T), flag.reshape(N, T))
    slot = torch.arange(K, device=info.device)
    m = m0.reshape(N).to(torch.int64).clone()
    live = slot < m[:, None]
    n = torch.where(live, n0.reshape(N, K).to(torch.int64), 0)
    I = torch.where(live, I0.reshape(N, K).to(info.dtype), 0.0)
    starts = torch.where(live, slot - m[:, None], EMPTY)
    snaps_starts, snaps_m = [starts], [m]
    with _one_intra_op_thread():
        for e in range(int(ev.count.max())):
            active = e < ev.count
            at_open = (slot == (m - 1)[:, None]) & active[:, None]
            n = n + at_open * ev.absorbed_n[:, e, None]
            I = I + at_open * ev.absorbed_I[:, e, None]
            full = active & (m == K)
            if bool(full.any()):
                n, I, starts = _capacity_merge(n, I, starts, full, slot)
                m = m - full.long()
            new = (slot == m[:, None]) & active[:, None]
            n = n.masked_fill(new, 1)
            I = torch.where(new, ev.info[:, e, None], I)
            starts = torch.where(new, ev.pos[:, e, None], starts)
            m = m + active.long()
            snaps_starts.append(starts)
            snaps_m.append(m)
    at_open = slot == (m - 1)[:, None]  # the tokens absorbed after the last event
    n = n + at_open * ev.absorbed_n.gather(1, ev.count[:, None])
    I = I + at_open * ev.absorbed_I.gather(1, ev.count[:, None])
    start_rows = torch.stack(snaps_starts)[ev.row.T, torch.arange(N, device=info.device)]  # [T, N, K]
    m_rows = torch.stack(snaps_m)[ev.row.T, torch.arange(N, device=info.device)]  # [T, N]
    level_start = _level_map(start_rows, m_rows, B, H)
    return level_start, n.reshape(B, H, K), I.reshape(B, H, K), m.reshape(B, H)


def _level_map(start_rows: Tensor, m_rows: Tensor, B: int, H: int) -> Tensor:
    """`level_start [B,T,H,K]` int32 from each step's slot starts `[T, N, K]` (oldest first) and
    live counts `[T, N]`: rank r is the oldest-first slot m − 1 − r."""
    T, N, K = start_rows.shape
    src = m_rows[..., None] - 1 - torch.arange(K, device=start_rows.device)
    level_start = torch.where(src >= 0, start_rows.gather(-1, src.clamp(min=0)), EMPTY)
    return level_start.to(torch.int32).reshape(T, B, H, K).permute(1, 0, 2, 3).contiguous()


# --------------------------------------------------------------------------------------------
# dla
# --------------------------------------------------------------------------------------------


def _segment_dla(k, v, n0, I0, m0, Z0, zz0, K: int, score: str, tau: float, C: int, end: Tensor | None = None):
    B, T, H, Dk = k.shape
    Dv = v.shape[-1]
    N, dev = B * H, k.device
    dt = state_dtype(k.dtype)
    kh = k.detach().to(dt).permute(0, 2, 1, 3).reshape(N, T, Dk)
    vh = v.detach().to(dt).permute(0, 2, 1, 3).reshape(N, T, Dv)
    row_end = None if end is None else end.to(dev).repeat_interleave(H)  # [N]
    scan = _DlaScan(n0.reshape(N, K), I0.reshape(N, K), m0.reshape(N), Z0.reshape(N, Dk, Dv), zz0.reshape(N),
                    score, tau, dt, row_end)

    # What needs no sequential state (the Gram, its suffix sums, ss) is computed for a group of
    # chunks at once; per chunk remain the base term and the Z update, inside the scan.
    n_chunks = -(-T // C)
    per_group = max(1, _GROUP_ELEMENTS // (N * C * (C + 1)))
    for g0 in range(0, n_chunks, per_group):
        ng = min(per_group, n_chunks - g0)
        t0, t1 = g0 * C, min((g0 + ng) * C, T)
        pad = (0, 0, 0, ng * C - (t1 - t0))
        Kg = torch.nn.functional.pad(kh[:, t0:t1], pad).view(N, ng, C, Dk)
        Vg = torch.nn.functional.pad(vh[:, t0:t1], pad).view(N, ng, C, Dv)
        gram = torch.tril((Kg @ Kg.mT) * (Vg @ Vg.mT), diagonal=-1)  # [N, ng, C, C], s < t only
        # suf[.., t, 1 + j] = Σ_{s=j}^{t−1} gram[t, s] (summed from t − 1 down: no cancellation);
        # suf[.., t, 0] = the same from j = 0, plus the base term once the scan reaches the chunk.
        suf = torch.empty(N, ng, C, C + 1, dtype=dt, device=dev)
        suf[..., 1:] = gram.flip(-1).cumsum(-1).flip(-1)
        suf[..., 0] = suf[..., 1]
        ss = ((Kg * Kg).sum(-1) * (Vg * Vg).sum(-1)).permute(1, 2, 0).contiguous()  # [ng, C, N]
        # The scan: tiny ops, and GEMMs too small to gain from threads, whose fork and join can
        # cost milliseconds each on a busy machine.
        with _one_intra_op_thread():
            for ci in range(ng):
                c0 = (g0 + ci) * C
                c1 = min(c0 + C, T)
                scan.chunk(c0, kh[:, c0:c1], vh[:, c0:c1], suf[:, ci], ss[ci])
    level_start, n, I, m, Z, zz = scan.result(B, H)
    if end is not None:
        n = drop_padding_count(n, m, T, end)
    return level_start, n, I, m, Z, zz


class _DlaScan:
    """The sequential part of `dla` segmentation, one row per (b, h), slots oldest first.

    `n`, `I` and `starts` (first member of each slot; the initial slot i at pseudo-position
    i − m0) are exact for the closed slots. The open slot m − 1 is carried by `nbase` (its count
    before step t is t + nbase) and `cur_I`, and written back only at *events* — steps where
    some row opens a block — and at the end. `Z` is the open block's content at the current
    chunk's start, `zz` its squared norm (by the update rule), `bstart` its first position
    (−1 for the initial open block). Each event snapshots `(starts, m)`; `snap_of[t]` names
    the snapshot that holds after step t. `end [N]`: steps `t ≥ end` are padding (`ends.py`): they
    open nothing and add no information; the caller drops them from the open slot's count."""

    def __init__(self, n0, I0, m0, Z0, zz0, score: str, tau: float, dt, end: Tensor | None = None):
        N, K = n0.shape
        dev = n0.device
        self.end = end
        self.K, self.tau, self.dt, self.token_score = K, tau, dt, score == "token"
        self.slot = torch.arange(K, device=dev)
        self.rows = torch.arange(N, device=dev)
        self.m = m0.to(torch.int64).clone()
        live = self.slot < self.m[:, None]
        self.n = torch.where(live, n0.to(torch.int64), 0)
        self.I = torch.where(live, I0.to(dt), 0.0)
        self.starts = torch.where(live, self.slot - self.m[:, None], EMPTY)
        self.Z = Z0.to(dt).clone()
        self.zz = zz0.to(dt).clone()
        top = (self.m - 1).clamp(min=0)[:, None]
        has_open = self.m > 0
        self.bstart = torch.full((N,), -1, dtype=torch.int64, device=dev)
        self.nbase = torch.where(has_open, self.n.gather(1, top).squeeze(1), 0)
        self.cur_I = torch.where(has_open, self.I.gather(1, top).squeeze(1), 0.0)
        self.two = torch.full((N,), 2.0, dtype=dt, device=dev)
        self.snaps_starts, self.snaps_m, self.snap_of = [self.starts], [self.m], []

    def flush(self, t: int) -> None:
        """Write the open slot's count and information (through step t − 1) back."""
        at_open = self.slot == (self.m - 1)[:, None]
        self.n = torch.where(at_open, (self.nbase + t)[:, None], self.n)
        self.I = torch.where(at_open, self.cur_I[:, None], self.I)

    def chunk(self, c0: int, Kc: Tensor, Vc: Tensor, suf: Tensor, ss: Tensor) -> None:
        """Steps c0 .. c0 + Cc − 1. `suf [N, C, C + 1]` holds the chunk's Gram suffix sums
        (column 0 without the base term yet), `ss [C, N]` its ‖k‖²‖v‖²."""
        N, Cc, Dv = Vc.shape
        C = suf.shape[-2]
        # k_tᵀ Z v_t, Z the block content at c0 (row dots as a batch of 1×1 products: a
        # reduction this size would fork threads)
        base = torch.bmm((Kc @ self.Z).view(N * Cc, 1, Dv), Vc.reshape(N * Cc, Dv, 1)).view(N, Cc)
        suf[:, :Cc, 0] += base
        suf_flat = suf.reshape(-1)  # a copy when suf is a strided view: taken after the base term
        # flat index of suf[row, j, col] = row_base + j·(C + 1), col = 1 + block start − c0, or 0
        row_offset = self.rows * (C * (C + 1))
        row_base = row_offset + (self.bstart - (c0 - 1)).clamp(min=0)
        m, zz, cur_I = self.m, self.zz, self.cur_I
        K, slot = self.K, self.slot
        for j in range(Cc):
            t = c0 + j
            c = suf_flat.take(row_base + j * (C + 1))
            s = ss[j]
            if self.token_score:
                denom = (s * zz).clamp_(min=0).sqrt_().clamp_(min=EPS)
                info = torch.addcdiv(self.two, c, denom, value=-2).clamp_(min=0).sqrt_()
            else:
                info = _state_information(c, s, zz)
            opens = info >= self.tau
            if t == 0:
                first = m == 0  # the first token of a sequence opens the first slot, unscored
                opens = opens | first
                info = info.masked_fill(first, 0.0)
            if self.end is not None:
                padding = t >= self.end
                opens = opens & ~padding
                info = info.masked_fill(padding, 0.0)
            if not bool(opens.any()):  # every row absorbs t into its open block
                cur_I.add_(info)
                zz.add_(c, alpha=2).add_(s)
                self.snap_of.append(len(self.snaps_m) - 1)
                continue
            self.m, self.cur_I = m, cur_I
            self.flush(t)
            full = opens & (m == K)
            if bool(full.any()):
                self.n, self.I, self.starts = _capacity_merge(self.n, self.I, self.starts, full, slot)
                m = m - full.long()
            m = m + opens
            self.starts = self.starts.masked_fill((slot == (m - 1)[:, None]) & opens[:, None], t)
            cur_I = torch.where(opens, info, cur_I + info)
            zz = torch.where(opens, s, torch.add(zz, c, alpha=2).add_(s))
            self.bstart = self.bstart.masked_fill(opens, t)
            self.nbase = self.nbase.masked_fill(opens, -t)
            row_base = torch.where(opens, row_offset + (j + 1), row_base)
            self.snaps_starts.append(self.starts)
            self.snaps_m.append(m)
            self.snap_of.append(len(self.snaps_m) - 1)
        self.m, self.zz, self.cur_I = m, zz, cur_I
        # Z at the chunk end: restart where a block opened inside the chunk, then add the open
        # block's tokens of this chunk (one masked GEMM)
        in_block = (torch.arange(c0, c0 + Cc, device=Kc.device)[None, :] >= self.bstart[:, None]).to(self.dt)
        kept = self.Z.masked_fill((self.bstart >= c0)[:, None, None], 0.0)
        self.Z = torch.baddbmm(kept, (Kc * in_block[..., None]).mT, Vc)

    def result(self, B: int, H: int):
        T = len(self.snap_of)
        self.flush(T)
        K, slot = self.K, self.slot
        which = torch.tensor(self.snap_of, dtype=torch.int64, device=slot.device)
        level_start = _level_map(torch.stack(self.snaps_starts)[which], torch.stack(self.snaps_m)[which], B, H)
        Dk, Dv = self.Z.shape[-2:]
        return (level_start, self.n.reshape(B, H, K), self.I.reshape(B, H, K), self.m.reshape(B, H),
                self.Z.reshape(B, H, Dk, Dv).contiguous(), self.zz.reshape(B, H))


@contextmanager
def _one_intra_op_thread():
    """Run the block with one intra-op thread, restoring the caller's count after. The lock keeps
    concurrent callers from restoring each other's settings; other threads' ops meanwhile also
    run on one thread (the setting is process-wide for MKL)."""
    with _THREADS_LOCK:
        previous = torch.get_num_threads()
        if previous == 1:
            yield
            return
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(previous)


def _state_information(c: Tensor, ss: Tensor, zz: Tensor) -> Tensor:
    """`I = √max(0, 2 − 2 cos)` for `score="state"`, `cos = (zz + c) / max(√(zz·(zz + 2c + ss)), ε)`.

    Where `cos > 0` and the denominator clears `ε`, `1 − cos` is evaluated in the algebraically
    identical form `(zz·ss − c²) / (D·(D + zz + c))` with `D = √(zz·(zz + 2c + ss))`: the `zz²`
    terms cancel exactly instead of numerically, so a small token against a large block keeps
    its relative accuracy in float32 (the literal form loses a factor `zz / ss`)."""
    num = zz + c
    D = (zz * (zz + 2 * c + ss)).clamp(min=0).sqrt()
    direct = 2 - 2 * num / D.clamp(min=EPS)
    stable = 2 * (zz * ss - c * c).clamp(min=0) / (D * (D + num))
    use_stable = (D >= EPS) & (num > 0)
    return torch.where(use_stable, stable, direct).clamp(min=0).sqrt()


def _capacity_merge(n, I, starts, full, slot):
    """On rows `full` (all K slots live) merge the adjacent pair with minimal
    (I_i + I_{i+1}) / (n_i + n_{i+1}) (ties → smallest i): slot i takes the sums and keeps its
    start, later slots move down by one. Slot K − 1 is left stale: the append that follows
    every capacity merge overwrites its start, and the next flush its n and I."""
    K = slot.shape[0]
    dens = (I[:, :-1] + I[:, 1:]) / (n[:, :-1] + n[:, 1:]).to(I.dtype)  # [N, K − 1]
    i = dens.argmin(-1, keepdim=True)  # first minimum
    shift = (slot >= i) & full[:, None]  # slots i.. take their right neighbour
    at = shift & (slot <= i)  # slot i adds its own
    src = (slot + shift).clamp_(max=K - 1)
    n = n.gather(1, src) + n * at
    I = I.gather(1, src) + I * at
    starts = torch.where(at, starts, starts.gather(1, src))
    return n, I, starts
