r"""What the readout with `β` by windows costs, kernel by kernel as `objects_delta_triton.py` runs
it, from the plan it consumes (`objects_delta.window_plan`), and the window `R` the cost model picks.

Counts per row
==============
`window_counts(plan, level_start)` gives, per `(b, h)` row (float64 `[N]`, on the plan's device,
no host read), with `n_w = |P_w|` the objects of window `w` and `j_c` the position of chunk `c` in its
window (0 for the window's first chunk):

    tokens, chunks, windows
    reads         = Σ_w tokens(w) · n_w                  object reads, Dk·Dv each
    steps         = Σ_c tokens(c) · j_c                  transport steps back to the window's frame
    visits        = Σ_c tokens(c) · ⌈j_c / G⌉            the band's visits to a query, G = BAND_KEYS
    objects       = Σ_w n_w                              objects held, once per window
    reframes      = Σ_w #{E' ∈ P_{w+1} holding an element of P_w}   (the last: the final state)
    token_chunks  = Σ_w Σ_{E' ∈ P_{w+1}} #{chunks of w holding tokens of E'}
    dl_sectors    = Σ_c Σ_{t ∈ c} Σ_{p < c − 1 in c's window} #{32-byte sectors of dλ's float32 row t
                    in columns r0 … r0 + m − 1}: the band's read-modify-write of a query's dλ at a
                    step before its last (`_level_span`: r0 = ℓ_t(max s), m the most levels a row
                    of c spans over the positions s of key chunk p)
    span_sectors_4, span_sectors_2
                  = the same over every step (p < c), for rows of 4- and 2-byte elements: the level
                    starts and λ the band reads at a step
    (without the level map, every sector of the rows: `whole_row_sectors`)

Kernels, forward then backward (a multiply-add is 2 FLOPs)
==========================================================
`D = Dk·Dv`, `s` the inputs' itemsize, `ut = C²·Dk + C³/3 + Dk·C²` a chunk's solve and `Ē`.
Bytes count each tensor a kernel touches once (DRAM), with one exception: the readout backward's
band pass walks the window's (query chunk, key chunk) pairs, `G = BAND_KEYS` key chunks at a time,
the window's later queries inside, each query taking the block's steps back to back (a visit).
What it reuses across a sweep over the queries is the block's key side (each key chunk's sums
dĒ, dH, dV and its Ē, k, v: 160 KB at the §7 shapes, within an SM's share of an H100's 50 MB L2
for blocks of up to two); the query side (its state before the block `XP`, stepped back through the
block into a scratch, its running `dx` and `dλ`, its `dO` and level rows) is reused only within a
visit, so it is counted per visit.

    UT                  NC·ut;  k, β, g; T⁻¹ and Ē written (float32)
    suffix products     2·Dk²·C per chunk (K̃ = Suf Ē, Suf ← γ_C Suf − K̃ H); Ē, k; K̃, Suf_F written
    initial objects     window 0's objects from the initial slots: L·D read (float32), each object's
                        copy and residual written
    object pass         reframes·Dk²·Dv + token_chunks·C·D; masters read once, every rank's copy
                        (the inputs' dtype, kept for the readout) and, for 16-bit inputs, its
                        rounding residual (two windows' buffers in turn; with the copy, the master)
                        written per window but the last — 4 bytes an element either way —, whose
                        float32 sums are the final state (not written when the backward recomputes
                        the pass), K̃ and v of the chunks each element holds
    readout             per chunk 2C²Dk + C³ + C²Dv, per step C·(2Dk + Dv), reads·D; q, k, v, o, λ,
                        the level rows, T⁻¹, Ē once; objects once per window (its chunks share L2)
    (backward)          UT, suffix products, initial objects, object pass again (every window's
                        copies kept)
    readout backward    per chunk 2C²Dk + C³ + 2C²Dv, per step C·(7Dk + 2Dv), per step beyond a
                        visit's first C·2Dk (the query stepped back again), reads·D. The chain pass
                        (per chunk): own chunk, the chain with the query before each visit's last
                        step written to XP, objects; dÃ, XF, dQ̂, dλ written. The band pass (per
                        window, blocks of G key chunks in order, the later query chunks inside):
                        the key side's sums read-modify-written per step in L2, to DRAM once per
                        chunk; per visit XP written (by the chain) and read (C·Dk·s each), dQ̂
                        read and written (2·C·Dk·4), dO read (C·Dv·s); per step the query's level
                        span (r0, r1: 2·2 bytes a row, written by the chain pass, read by the band),
                        the sectors of its level starts and λ in the span (span_sectors·32), dλ's
                        read and written at each step before a query's last (dl_sectors·64), and its
                        whole row read at the last (LP·4 a token of a chunk after its window's first)
    object gradients    reads·D; XF, dO, λ once; D written
    object pass backward   2·reframes·Dk²·Dv + 2·token_chunks·C·D; D read and written in place,
                        the next D and the objects' copies read; per Dv tile of `OBJECT_BWD_DV`
                        columns (`NVO` of them) Suf_F read and dSuf_F written per window, and each
                        chunk's dK̃ written by its first element and read-modify-written by the
                        others (token_chunks − chunks); v read and dv read-modify-written per
                        token chunk
    suffix backward     6·Dk²·C per chunk (the chain again and its adjoint); each chunk's Suf
                        written, then read once (its transpose, loaded right after, comes from L2);
                        Ē twice (the chain runs the window's chunks backwards, the adjoint forwards:
                        a chunk's two reads lie up to a window of chunks apart); K̃, dĒ, dH, the NVO
                        tiles' dK̃ and dSuf_F
    UT backward         per chunk 10·C²·Dk + 6·C³; q, k, β, g, T⁻¹, the gradients of Q̂, Ã, Ē, H;
                        dq, dk, dv, dβ, dg written

The window
==========
`R` trades re-framing and the object passes' masters (per window, falling as `1/R`) against the
transport, the band and the backward's per-visit traffic (`(R − 1)/2` steps and about
`(R − 1)/(2G)` visits per query, rising with `R`). `window_for(…)` takes the `R` (a power of two,
at most the chunks of the call) with the least roofline time on the given card from shapes alone
— `n_w = K` objects, `K` re-framings and `K` extra token chunks per window (the most a plan can
hold) — so the choice needs no count and no host read (decode, CUDA graphs); `window_counts` at
that `R` then gives the call's figures.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dla.ops.levels import running_min
from dla.ops.readout.objects_delta import WindowPlan

__all__ = ["window_counts", "span_sectors", "whole_row_sectors", "delta_kernels", "worst_counts", "roofline_s",
           "window_for", "WINDOWS", "BAND_KEYS", "OBJECT_BWD_DV", "band_visits"]

WINDOWS = (1, 2, 4, 8, 16, 32)
# key chunks the band pass takes per sweep over a window's queries (a power of two). Blocks of two
# send a query's state (XP, dx, dλ) through memory half as often and keep the block's key side in
# L2 (module doc), and the roofline model prefers them (it then picks R = 32); but on an H100 the
# band pass was slower at two key chunks than at one, both at R = 32 (the layer too) and at R = 16
# (`perf/results/profile_windows-h100.md`): the kernels run far from their roofline, where the
# model cannot rank the two. One, until a profile on the card shows blocks paying
BAND_KEYS = 1


# Dv columns a program of the object backward takes (`objects_delta_triton._meta`): it holds a
# [Dk, Dk] and several [Dk, ·] float32 tiles, and each tile writes its own dK̃ and dSuf_F
OBJECT_BWD_DV = 64


def band_visits(R: int, keys: int | None = None) -> int:
    """The band's visits to the queries of a window of `R` chunks, Σ_{i < R} ⌈i / G⌉ (chunk i
    visited once per block of `G = keys` key chunks before it, `BAND_KEYS` by default): the XP
    slots it keeps per window."""
    G = BAND_KEYS if keys is None else keys
    return sum(-(-i // G) for i in range(R))


def span_sectors(plan: WindowPlan, level_start: Tensor) -> dict[str, Tensor]:
    """The counts `dl_sectors`, `span_sectors_4` and `span_sectors_2` of the module doc, float64
    `[N]`, from the level map `[B, T, H, L]` the plan was made from."""
    f = torch.float64
    B, T, H, L = level_start.shape
    C, R = plan.chunk, plan.window
    cs, ws = plan.chunk_starts, plan.window_starts
    cm = running_min(level_start.to(torch.int64))  # [B, T, H, L]
    pos = torch.arange(T, device=cs.device).expand(B, T).contiguous()
    chunk = torch.searchsorted(cs.contiguous(), pos, right=True) - 1  # [B, T]
    window = torch.searchsorted(ws.contiguous(), pos, right=True) - 1
    first = torch.searchsorted(cs.contiguous(), torch.gather(ws, 1, window), right=False)  # its window's first chunk
    j = chunk - first  # the token's chunk's position in its window
    out = {name: torch.zeros(B, H, dtype=f, device=cs.device) for name in ("dl_sectors", "span_sectors_4",
                                                                             "span_sectors_2")}
    for d in range(1, R):  # key chunk p = c − d; d = 1 is a query's last step
        active = j >= d  # [B, T]
        s_hi = torch.gather(cs, 1, (chunk - d + 1).clamp(min=0)) - 1  # key chunk p's last position
        r0 = (cm > s_hi[:, :, None, None]).sum(-1)  # [B, T, H]
        r1 = (cm > (s_hi - C + 1)[:, :, None, None]).sum(-1)
        span = torch.where(active[..., None], torch.clamp(r1, max=L - 1) - r0 + 1, 0)
        m = torch.zeros(B, cs.shape[1], H, dtype=span.dtype, device=cs.device)
        m = m.scatter_reduce(1, chunk[..., None].expand(B, T, H), span, "amax")  # per query chunk
        m = torch.gather(m, 1, chunk[..., None].expand(B, T, H))
        for width in (4, 2):
            per = 32 // width
            top = torch.clamp(r0 + m - 1, max=L - 1)  # the loads stop at the last level
            sectors = torch.where((m > 0) & (r0 < L), top // per - r0 // per + 1, 0).sum(1).to(f)
            out[f"span_sectors_{width}"] += sectors
        if d >= 2:
            out["dl_sectors"] += torch.where(m > 0, (r0 + m - 1) // 8 - r0 // 8 + 1, 0).sum(1).to(f)
    return {name: x.reshape(B * H) for name, x in out.items()}


def whole_row_sectors(L: int, steps, before_last) -> dict:
    """The sector counts of the module doc had every step touched its rows whole: dλ's
    `⌈4·LP/32⌉` sectors at each step before a query's last, the level starts' and λ's `⌈w·L/32⌉`
    at every step (floats or tensors of steps)."""
    LP = 1 << max(L - 1, 0).bit_length()
    return {"dl_sectors": before_last * -(-4 * LP // 32), "span_sectors_4": steps * -(-4 * L // 32),
            "span_sectors_2": steps * -(-2 * L // 32)}


def window_counts(plan: WindowPlan, level_start: Tensor | None = None) -> dict[str, Tensor]:
    """The per-row counts of the module doc, float64 `[N]`; the sectors from `level_start`, the
    plan's level map, or every sector of the rows without it."""
    f = torch.float64
    N, W1, L = plan.first.shape
    B = plan.chunk_starts.shape[0]
    H = N // B
    cs, ws = plan.chunk_starts, plan.window_starts  # [B, NC + 1], [B, NW + 1]
    ntok = (cs[:, 1:] - cs[:, :-1]).to(f)  # [B, NC]
    window = torch.searchsorted(ws.contiguous(), cs[:, :-1].contiguous(), right=True) - 1  # [B, NC]
    first_chunk = torch.searchsorted(cs.contiguous(), torch.gather(ws, 1, window.clamp(max=ws.shape[1] - 1)),
                                     right=False)
    position = (torch.arange(cs.shape[1] - 1, device=cs.device) - first_chunk).to(f)
    wtok = (ws[:, 1:] - ws[:, :-1]).to(f)  # [B, NW]
    valid = plan.first <= plan.last  # [N, NW + 1, L]
    n_w = valid.sum(-1).to(f)  # [N, NW + 1]
    a, e = plan.first, plan.last
    holds = ((a[:, 1:, :, None] <= a[:, :-1, None, :]) & (e[:, :-1, None, :] <= e[:, 1:, :, None])
             & valid[:, :-1, None, :] & valid[:, 1:, :, None]).any(-1)  # [N, NW, L]
    live = wtok > 0  # window slots holding tokens

    def per_row(x: Tensor) -> Tensor:  # [B, …] → [N, …]
        return x.repeat_interleave(H, 0)

    def upto(x: Tensor) -> Tensor:  # how many chunk starts are ≤ x, per row
        return torch.searchsorted(cs_rows, x.reshape(N, -1).contiguous(), right=True).reshape(x.shape)

    # the chunks of window w that hold tokens of each element of the next partition
    ws_rows, cs_rows = per_row(ws), per_row(cs).contiguous()
    lo = torch.maximum(a[:, 1:], ws_rows[:, :-1, None])
    hi = torch.minimum(e[:, 1:], ws_rows[:, 1:, None] - 1)
    spans = torch.where(valid[:, 1:] & (hi >= lo), upto(hi) - upto(lo) + 1, 0).to(f)  # [N, NW, L]
    steps = per_row((ntok * position).sum(1))
    if level_start is None:
        sectors = whole_row_sectors(L, steps, per_row((ntok * (position - 1).clamp(min=0)).sum(1)))
    else:
        sectors = span_sectors(plan, level_start)
    return {
        "tokens": per_row(ntok.sum(1)),
        "chunks": per_row((ntok > 0).sum(1).to(f)),
        "windows": per_row(live.sum(1).to(f)),
        "reads": (per_row(wtok) * n_w[:, :-1]).sum(1),
        "steps": steps,
        "visits": per_row((ntok * torch.ceil(position / BAND_KEYS)).sum(1)),
        "objects": (n_w[:, :-1] * per_row(live).to(f)).sum(1),
        "reframes": (holds.sum(-1).to(f) * per_row(live).to(f)).sum(1),
        "token_chunks": (spans.sum(-1) * per_row(live).to(f)).sum(1),
        "last_steps": per_row((ntok * (position > 0)).sum(1)),
        **sectors,
    }


def worst_counts(T: int, K: int, C: int, R: int) -> dict[str, float]:
    """The counts of a call of `T` tokens from step 0 with every window holding `K` objects."""
    chunks = -(-T // C)
    windows = -(-chunks // R)
    steps = visits = before_last = last = 0.0
    for c in range(chunks):
        n = min(C, T - c * C)
        steps += n * (c % R)
        visits += n * -(-(c % R) // BAND_KEYS)
        before_last += n * max(c % R - 1, 0)
        last += n * (c % R > 0)
    return {"tokens": float(T), "chunks": float(chunks), "windows": float(windows), "reads": float(T * K),
            "steps": steps, "visits": visits, "objects": float(windows * K), "reframes": float(windows * K),
            "token_chunks": float(chunks + windows * K), "last_steps": last, **whole_row_sectors(K, steps, before_last)}


def delta_kernels(n: dict, Dk: int, Dv: int, L: int, itemsize: int, C: int) -> dict[str, tuple]:
    """Per row, `{kernel: (flops, bytes)}` of the module doc from the counts `n` (floats or `[N]`
    tensors)."""
    D, s = Dk * Dv, itemsize
    T, NC, NW = n["tokens"], n["chunks"], n["windows"]
    ut = C * C * Dk + C**3 / 3 + Dk * C * C
    rows = T * (L * (s + 4) + 8)  # λ, the level rows, g and β
    qkvo = T * (2 * Dk + 2 * Dv) * s
    ut_k = (2.0 * NC * ut, T * (Dk * s + 8) + T * (C + Dk) * 4)
    suffix = (4.0 * Dk * Dk * C * NC, T * (Dk * 4 * 2 + Dk * s + 4) + NW * Dk * Dk * 4)
    master = s + (s if s < 4 else 0)  # copy + residual; the last window's, float32, is the final state
    objects_recomputed = (2.0 * (n["reframes"] * Dk * D + n["token_chunks"] * C * D),
                          n["objects"] * D * master + (NW - 1) * L * D * master + NW * Dk * Dk * 4
                          + n["token_chunks"] * C * (Dk * 4 + Dv * s))
    objects = (objects_recomputed[0], objects_recomputed[1] + L * D * 4)
    row = T**0  # 1 per row, in the counts' type (a tensor of rows or a float)
    initial = (row * L * D, row * L * D * (4 + master))
    readout = (2.0 * (NC * (2 * C * C * Dk + C**3 + C * C * Dv) + n["steps"] * C * (2 * Dk + Dv) + n["reads"] * D),
               qkvo + rows + T * (C + Dk) * 4 + n["objects"] * D * s)
    LP = 1 << max(L - 1, 0).bit_length()  # the dλ tile's width
    readout_bwd = (2.0 * (NC * (2 * C * C * Dk + C**3 + 2 * C * C * Dv) + n["steps"] * C * (7 * Dk + 2 * Dv)
                          + (n["steps"] - n["visits"]) * C * 2 * Dk + n["reads"] * D),
                   qkvo + rows + T * L * s + T * (C * 4 + C * 4 + Dk * 4 * 2 + Dv * 4 + (2 * Dk + Dv) * 4 + LP * 4)
                   + n["visits"] * (2 * Dk * s + 2 * Dk * 4 + Dv * s) + n["steps"] * 2 * 2 * 2
                   + (n["span_sectors_4"] + n[f"span_sectors_{min(s, 4)}"]) * 32
                   + n["dl_sectors"] * 64 + n["last_steps"] * LP * 4 + n["objects"] * D * s)
    object_grads = (2.0 * n["reads"] * D, T * (Dk * 4 + Dv * s + L * (s + 4)) + n["objects"] * D * 4)
    NVO = -(-Dv // OBJECT_BWD_DV)
    object_bwd = (2.0 * (2 * n["reframes"] * Dk * D + 2 * n["token_chunks"] * C * D),
                  n["objects"] * D * (4 * 3 + s) + NVO * NW * Dk * Dk * 4 * 2 + n["token_chunks"] * C * Dv * (s + 8)
                  + NVO * (NC * C * Dk * 4 + (n["token_chunks"] - NC) * C * Dk * 4 * 2))
    suffix_bwd = (12.0 * Dk * Dk * C * NC,
                  NC * Dk * Dk * 4 * 2 + T * (Dk * 4 * (3 + NVO) + Dk * s * 2 + 8) + T * Dk * 4 * 4
                  + NVO * NW * Dk * Dk * 4)
    ut_bwd = (2.0 * NC * (10 * C * C * Dk + 6 * C**3),
              T * (2 * Dk * s + (2 * Dk + Dv) * s + 16 + C * 4 * 3 + Dk * 4 * 4 + Dv * 4 + 8) + NC * C * C * 4 * 4)
    return {
        "UT": ut_k, "suffix products": suffix, "initial objects": initial, "object pass": objects, "readout": readout,
        "UT (recomputed)": ut_k, "suffix products (recomputed)": suffix, "initial objects (recomputed)": initial,
        "object pass (recomputed)": objects_recomputed,
        "readout backward": readout_bwd, "object gradients": object_grads, "object pass backward": object_bwd,
        "suffix backward": suffix_bwd, "UT backward": ut_bwd,
    }


def roofline_s(kernels: dict[str, tuple], flops_per_s: float, bytes_per_s: float):
    """Σ over kernels of max(flops / F, bytes / W), in seconds (floats or tensors)."""
    total = 0.0
    for flops, bytes_ in kernels.values():
        t_f, t_b = flops / flops_per_s, bytes_ / bytes_per_s
        if isinstance(t_f, Tensor) or isinstance(t_b, Tensor):
            total = total + torch.maximum(torch.as_tensor(t_f, dtype=torch.float64),
                                          torch.as_tensor(t_b, dtype=torch.float64))
        else:
            total = total + max(t_f, t_b)
    return total


def window_for(T: int, K: int, Dk: int, Dv: int, itemsize: int, C: int, flops_per_s: float,
               bytes_per_s: float) -> int:
    """The `R` of `WINDOWS` (at most the call's chunks) with the least roofline time at the
    worst-case counts (module doc): a pure function of the shapes and the card's two peaks."""
    chunks = max(1, -(-T // C))
    best, best_t = 1, float("inf")
    for R in WINDOWS:
        if R > 1 and R // 2 >= chunks:
            break
        t = roofline_s(delta_kernels(worst_counts(T, K, C, R), Dk, Dv, K, itemsize, C), flops_per_s, bytes_per_s)
        if t < best_t:
            best, best_t = R, t
    return best
