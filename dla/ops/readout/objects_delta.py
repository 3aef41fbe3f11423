r"""The persistent-object readout with `β` (SPEC §3.1, "With β"; Gated DeltaNet, DeltaNet) in torch:
windows of `R` chunks, slot objects re-framed once per window, the window's own tokens read as a
masked band. The float64 prototype of issue #19 and a CPU kernel: plain torch, the backward written
out (no autograd), in the order the Triton kernels would run it (window by window, in reverse).

The algebra
===========
Per row `(b, h)`: `A_t = a_t (I − β_t k_t k_tᵀ)`, `k̄_s = β_s k_s`, and for `s ≤ t` the transition
product `P(t, s) = A_t ⋯ A_{s+1}` (`P(s, s) = I`; `[Dk, Dk]`). Every slot takes the same `A_t`
(SPEC §2, step 1), so a slot holding the positions `E` is `S_E(t) = Σ_{s∈E} P(t, s) k̄_s v_sᵀ`
(an initial slot `j`, at pseudo-position `−1 − j`, adds `P(t, −1) S0_j`), and

    o_t = scale · Σ_{s ≤ t} Λ[t,s] (q_tᵀ P(t, s) k̄_s) v_s  (+ initial slots),   Λ[t,s] = λ_t[ℓ_t(s)].

An object `S̄` stored in frame `f` (a position) stands for `S(t) = P(t, f) S̄` at every `t ≥ f`, so
`q_tᵀ S(t) = (P(t, f)ᵀ q_t)ᵀ S̄`: either the object is carried to the query's frame
(re-framing, `Dk²·Dv`) or the query to the object's (transport, `Dk²`). Without `β` this is a
scalar and objects stay in their own frame; with `β` it is a `Dk×Dk` matrix shared by all slots,
and no frame can be left without one of the two.

Chunks `[cs_c, cs_{c+1})` of `C` tokens and windows of `R` chunks are aligned to absolute
positions `step + t` (`plan.chunk_starts`' rule, at `C` and at `R·C`; a call whose `step` is not
a multiple starts with a partial chunk or window), so every window start is a chunk start.
`b_c = cs_c − 1` is the boundary before chunk `c` (`b_0 = −1`), `P_c = P(b_{c+1}, b_c)` the
chunk's product and `F = b` of the window's first chunk its frame.

**Objects** are the elements of `P_w`, the partition of the positions before the window start
`ws` that row `ws` of the level map induces (the initial slots are positions `−1 − r`; `plan.py`'s
`E_{c,r}` at the window start): `S̄_E = Σ_{s∈E} P(F, s) k̄_s v_sᵀ`, in the window's frame. Segments
only merge, so each element lies inside one segment at every later row, and reading elements
separately at the weight of their level is exact (a merge is a sum).

**Readout** of a query `t` in chunk `c` of the window, `wR ≤ c`:

    o_t / scale = Σ_{E∈P_w} λ_t[ℓ_t(a_E)] q̃_t^{(F)} · S̄_E                         (objects)
                + Σ_{c' = first chunk}^{c − 1} Σ_{s ∈ c'} Λ[t,s] (q̃_t^{(b_{c'+1})} · Ē_s^{(c')}) v_s   (band)
                + Σ_{s ∈ c, s ≤ t} Λ[t,s] Ã[t,s] v_s                                  (own chunk)

with the query transported back chunk by chunk, `q̃^{(b_c)} = Q̂` and `q̃^{(b_{c'})} = P_{c'}ᵀ q̃^{(b_{c'+1})}`,
and the chunk's UT algebra (as in `chunked.py`, no reset: every token transforms every slot):

    A_kk = tril(diag(β)(KKᵀ ⊙ Γ), −1),  M = (I + A_kk)⁻¹ diag(β),  Ã = (QKᵀ ⊙ Γ) M,  H = diag(γ) K
    Q̂ = diag(γ) Q − Ã H    (row t: q_tᵀ P(t, b_c)),   Ē = Kᵀ diag(ρ) M    (column s: P(b_{c+1}, s) k̄_s)
    P_c = γ_C I − Ē H

In WY form one step of the transport is `q̃ P_c = γ_C q̃ − (q̃ Ē) H`, and `q̃ Ē` is the band's
score row for that chunk: the band costs its `(scores ⊙ Λ) V` only.

**Re-framing** at the window's end `we` (the next window's start, or `T` for the final state in
frame `T − 1`), for each element `E'` of the next partition:

    S̄'_{E'} = Suf_F · Σ_{E∈P_w, E⊂E'} S̄_E  +  Σ_{c'} Σ_{s ∈ c' ∩ E'} (Suf_{b_{c'+1}} Ē_s^{(c')}) v_sᵀ

with the suffix products `Suf_{b_c} = P(we − 1, b_c)`: `Suf = I` after the last chunk,
`Suf_{b_{c'}} = Suf_{b_{c'+1}} P_{c'}`, accumulated from the window's end. Elements of `P_w` lie
inside exactly one element of the next partition (partitions only coarsen). The final state is
the last re-framing: `S_r = S̄'_{E'_r}`, rank order of the map's last row.

**Backward**, with `dÕ = scale · dO` and `D_E = ∂/∂S̄_E`, window by window in reverse (`D'` the
gradient of the next window's objects; of the final state `dS` after the last window):

    own chunk:  dV += (Ã ⊙ Λ)ᵀ dÕ,  dÃ += Λ ⊙ (dÕ Vᵀ),  dΛ += Ã ⊙ (dÕ Vᵀ)
    objects:    U[t,E] = dÕ_t S̄_Eᵀ,  dq̃^{(F)}_t = Σ_E ω[t,E] U[t,E],  dω[t,E] = U[t,E]·q̃^{(F)}_t → dλ,
                D_E += Σ_t ω[t,E] q̃_t^{(F)} dÕ_tᵀ                               (ω[t,E] = λ_t[ℓ_t(a_E)])
    transport and band, from F up to b_c (step through chunk c', σ = q̃^{(b_{c'+1})} Ē, q̃^{(b_{c'})}
    = γ_C q̃^{(b_{c'+1})} − σ H, dx = ∂/∂q̃^{(b_{c'})}):
                dσ = Λ ⊙ (dÕ V_{c'}ᵀ) − dx Hᵀ,  dΛ += σ ⊙ (dÕ V_{c'}ᵀ),  dV_{c'} += (σ ⊙ Λ)ᵀ dÕ,
                dĒ_{c'} += q̃^{(b_{c'+1})ᵀ} dσ,  dH_{c'} −= σᵀ dx,  dγ_C += ⟨dx, q̃^{(b_{c'+1})}⟩,
                ∂/∂q̃^{(b_{c'+1})} = γ_C dx + dσ Ēᵀ;   at b_c it is dQ̂
    re-framing: D_E += Suf_Fᵀ D'_{E'} (E ⊂ E'),  dSuf_F = Σ_{E'} D'_{E'} (Σ_{E⊂E'} S̄_E)ᵀ, then the
                suffix chain from the window's first chunk on (K̃ = Suf Ē, Suf' = γ_C Suf − K̃ H):
                dK̃ = −dSuf' Hᵀ + D'_{E'(s)} v_s,  dH −= K̃ᵀ dSuf',  dγ_C += ⟨dSuf', Suf⟩,
                dv_s += D'_{E'(s)}ᵀ K̃_s,  dĒ += Sufᵀ dK̃,  dSuf = γ_C dSuf' + dK̃ Ēᵀ
    chunk:      dQ̂, dÃ, dĒ, dH, dγ_C through the UT algebra (`_chunk_backward`, as `chunked.py`'s
                module doc writes it: dÃ −= dQ̂ Hᵀ, dH −= Ãᵀ dQ̂, dM = Kρ dĒ + A_qkᵀ dÃ, …) to
                dq, dk, dβ, dg;   dS0_j = D_E of the element of `P_0` holding slot j.

Why this form. Per token and pass at `Dk = Dv = 128`, `K = 32`, `C = 64` (`cost_delta.py` counts
it from the plan): the readout reads `|P_w| ≤ K` objects (`Dk·Dv` each, the floor), the transport
and band cost `C·(2Dk + Dv)` per chunk stepped back (`(R − 1)/2` on average), the re-framing
`Dk²·Dv` per element of the next partition that holds an object, once per window, the suffix
chain `2Dk²`. SPEC §3.1's sketch — objects created inside a window kept as objects, each
transported on its own until the window ends — pays that transport for every such object; on
the §7 inputs at `T = 8192` objects are created at every chunk in the moderate and dense regimes,
and its forward count at its best `R` is 721K / 839K / 1014K multiply-adds per token (sparse /
moderate / dense) against 673K / 704K / 623K here at `R = 8` (the readout floor `K·Dk·Dv` is
524K). No object exists inside a window here, so the regime matters through `|P_w|` alone.

Shapes: `q, k [B,T,H,Dk]`, `v [B,T,H,Dv]`, `lam, level_start [B,T,H,L]`, `g, beta [B,T,H]`, `S0
[B,H,L,Dk,Dv]` in rank order, `step [B]` int64. Compute dtype: float64 for float64 inputs, float32
otherwise. Outputs: `o` in `q`'s dtype, `S` in the state dtype; gradients typed like their
inputs, `dg` float32 zeros without `g`, `dS0` in the state dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from dla.ops.levels import EMPTY, level_of, running_min
from dla.ops.state import state_dtype

__all__ = ["WindowPlan", "window_plan", "aligned_starts", "objects_delta_forward", "objects_delta_backward"]


# --------------------------------------------------------------------------------------------
# The plan: chunk and window starts, and the partition at each window start.
# --------------------------------------------------------------------------------------------


def aligned_starts(step: Tensor | None, T: int, size: int, batch: int, device) -> Tensor:
    """`[B, ⌈(T + size − 1)/size⌉ + 1]` int64: `clamp(i·size − step mod size, 0, T)`, the last
    entry `T` (`plan.chunk_starts`' rule per batch row; trailing entries may repeat `T`). A
    fresh call (`step` None: every row from position 0) has exactly `⌈T/size⌉` spans: the
    extra one only a row's phase can need is left out of every kernel's grid."""
    if step is None:
        n = -(-T // size)
        phase = torch.zeros(batch, dtype=torch.int64, device=device)
    else:
        n = 0 if T == 0 else (T + 2 * size - 2) // size
        phase = torch.remainder(step.to(torch.int64), size)
    i = torch.arange(n + 1, device=device)
    starts = (i[None, :] * size - phase[:, None]).clamp(0, T)
    starts[:, -1] = T
    return starts


def _partition(rows: Tensor, limit: Tensor) -> tuple[Tensor, Tensor]:
    """`(a, e)` of the elements `[a, e]` of each row's partition of the positions before `limit`
    (`plan.py`'s `E_{c,r}`): rows `[..., L]`, limit `[...]`; `a > e` where a rank is empty."""
    m = running_min(rows)
    prev = torch.cat([torch.full_like(m[..., :1], EMPTY), m[..., :-1]], -1)
    return m, torch.minimum(prev, limit[..., None]) - 1


class WindowPlan(NamedTuple):
    """What the readout with `β` consumes: `N = B·H` rows, `NW` window slots (+1 for the end)."""

    chunk: int  # C
    window: int  # R, chunks per window
    chunk_starts: Tensor  # [B, NC + 1] int64
    window_starts: Tensor  # [B, NW + 1] int64 (a subset of chunk_starts)
    first: Tensor  # [N, NW + 1, L] int64: a of the element of rank r at each window start (and T)
    last: Tensor  # [N, NW + 1, L] int64: e (a > e: empty)


def window_plan(level_start: Tensor, step: Tensor | None, chunk_size: int, window: int) -> WindowPlan:
    """The plan of the module doc, on the level map's device, static shapes, no host read;
    `step` None for a fresh call (every row from position 0)."""
    B, T, H, L = level_start.shape
    C, R = int(chunk_size), int(window)
    if C < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if R < 1:
        raise ValueError(f"window must be a positive number of chunks, got {window!r}")
    cs = aligned_starts(step, T, C, B, level_start.device)
    ws = aligned_starts(step, T, R * C, B, level_start.device)
    rows_map = level_start.permute(0, 2, 1, 3).reshape(B * H, T, L).to(torch.int64)
    limit = ws.repeat_interleave(H, 0)  # [N, NW + 1]
    row = limit.clamp(max=T - 1)
    rows = torch.gather(rows_map, 1, row[..., None].expand(*row.shape, L))
    a, e = _partition(rows, limit)
    return WindowPlan(C, R, cs, ws, a, e)


# --------------------------------------------------------------------------------------------
# One chunk's UT algebra
# --------------------------------------------------------------------------------------------


class _Chunk(NamedTuple):
    """A chunk of `n` tokens, heads batched: what both passes need (recomputed, never saved)."""

    q: Tensor  # [H, n, Dk]
    k: Tensor
    beta: Tensor  # [H, n]
    gam: Tensor  # γ [H, n]
    rho: Tensor  # ρ [H, n]
    Gam: Tensor  # Γ [H, n, n]
    QK: Tensor  # QKᵀ
    KK: Tensor  # KKᵀ
    Tinv: Tensor  # (I + A_kk)⁻¹
    M: Tensor  # Tinv diag(β)
    Aqk: Tensor  # QKᵀ ⊙ Γ
    At: Tensor  # Ã
    Hk: Tensor  # H = diag(γ) K [H, n, Dk]
    Qh: Tensor  # Q̂ [H, n, Dk]: row t is q_tᵀ P(t, b_c)
    E: Tensor  # Ē [H, Dk, n]: column s is P(b_{c+1}, s) β_s k_s

    @property
    def gam_C(self) -> Tensor:
        return self.gam[:, -1]


def _chunk(q: Tensor, k: Tensor, beta: Tensor, g: Tensor | None) -> _Chunk:
    Hh, n, _ = k.shape
    dt, dev = k.dtype, k.device
    tri = torch.ones(n, n, dtype=torch.bool, device=dev).tril()
    G = g.cumsum(1) if g is not None else torch.zeros(Hh, n, dtype=dt, device=dev)
    gam = torch.exp(G)
    Gam = torch.exp(torch.where(tri, G[:, :, None] - G[:, None, :], -torch.inf))
    rho = torch.exp(G[:, -1:] - G)
    eye = torch.eye(n, dtype=dt, device=dev)
    QK, KK = q @ k.transpose(1, 2), k @ k.transpose(1, 2)
    Akk = (beta[:, :, None] * KK * Gam).tril(-1)
    Tinv = torch.linalg.solve_triangular(eye + Akk, eye.expand(Hh, n, n), upper=False, unitriangular=True)
    M = Tinv * beta[:, None, :]
    Aqk = QK * Gam
    At = Aqk @ M
    Hk = gam[..., None] * k
    E = (rho[..., None] * k).transpose(1, 2) @ M
    return _Chunk(q, k, beta, gam, rho, Gam, QK, KK, Tinv, M, Aqk, At, Hk, gam[..., None] * q - At @ Hk, E)


def _transport(x: Tensor, c: _Chunk) -> tuple[Tensor, Tensor]:
    """`(x P_c, x Ē)` for rows x [H, m, Dk]: one WY step back through the chunk, and its scores."""
    scores = x @ c.E
    return c.gam_C[:, None, None] * x - scores @ c.Hk, scores


class _ChunkGrads(NamedTuple):
    """Gradients of a chunk's UT quantities, accumulated by the readout and the re-framing."""

    Qh: Tensor  # [H, n, Dk]
    At: Tensor  # [H, n, n]
    E: Tensor  # [H, Dk, n]
    Hk: Tensor  # [H, n, Dk]
    gam_C: Tensor  # [H]


def _chunk_backward(c: _Chunk, d: _ChunkGrads, has_g: bool) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """`(dq, dk, dβ, dg)` of the chunk from the gradients of `Q̂, Ã, Ē, H, γ_C` (the UT backward
    of `chunked.py`'s module doc)."""
    dAt = d.At - d.Qh @ c.Hk.transpose(1, 2)
    dH = d.Hk - c.At.transpose(1, 2) @ d.Qh
    dgam = (d.Qh * c.q).sum(-1) + (dH * c.k).sum(-1)
    dq = c.gam[..., None] * d.Qh
    dk = c.gam[..., None] * dH
    dKr = c.M @ d.E.transpose(1, 2)  # Ē = (diag(ρ) K)ᵀ M
    dM = (c.rho[..., None] * c.k) @ d.E + c.Aqk.transpose(1, 2) @ dAt
    dAqk = dAt @ c.M.transpose(1, 2)
    dk = dk + c.rho[..., None] * dKr
    drho = (dKr * c.k).sum(-1)
    dbeta = (dM * c.Tinv).sum(1)
    dTinv = dM * c.beta[:, None, :]
    dAkk = -(c.Tinv.transpose(1, 2) @ dTinv @ c.Tinv.transpose(1, 2)).tril(-1)
    dbeta = dbeta + (dAkk * c.KK * c.Gam).sum(2)
    dB = c.beta[:, :, None] * dAkk
    Zk = dB * c.Gam
    Zq = dAqk * c.Gam
    dk = dk + Zk @ c.k + Zk.transpose(1, 2) @ c.k + Zq.transpose(1, 2) @ c.q
    dq = dq + Zq @ c.k
    if not has_g:
        return dq, dk, dbeta, None
    Zg = (dB * c.KK + dAqk * c.QK) * c.Gam
    dG = Zg.sum(2) - Zg.sum(1) + dgam * c.gam - drho * c.rho
    dG[:, -1] += (drho * c.rho).sum(1) + d.gam_C * c.gam_C
    return dq, dk, dbeta, dG.flip(1).cumsum(1).flip(1)


# --------------------------------------------------------------------------------------------
# Windows, forward
# --------------------------------------------------------------------------------------------


class _Row(NamedTuple):
    """One batch row, heads batched, in the compute dtype."""

    q: Tensor  # [H, T, Dk]
    k: Tensor
    v: Tensor  # [H, T, Dv]
    lam: Tensor  # [H, T, L]
    g: Tensor | None  # [H, T]
    beta: Tensor  # [H, T]
    starts: Tensor  # [H, T, L] int64
    first: Tensor  # [H, NW + 1, L]
    last: Tensor
    chunk_starts: list  # distinct, T last
    window_starts: list
    scale: float


class _Window(NamedTuple):
    """Window w of a row: its chunks, its objects (in its frame) and its re-framing."""

    bounds: list  # [(c0, c1)] of its chunks
    chunks: list  # [_Chunk]
    a: Tensor  # [H, L] elements of P_w
    valid: Tensor
    objects: Tensor  # S̄ [H, L, Dk, Dv]
    holds: Tensor  # [H, L', L] element r' of the next partition holds element r of P_w
    member: list  # per chunk [H, L', n]: token s lies in element r' of the next partition
    gathered: Tensor  # Σ_{E ⊂ E'} S̄_E [H, L', Dk, Dv]
    sufs: list  # per chunk, the suffix product its keys are transported by
    keys: list  # per chunk K̃ = Suf Ē [H, Dk, n]
    suf: Tensor  # Suf_F, the window's product [H, Dk, Dk]


def _levels(starts: Tensor, lam: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
    """`(ℓ, λ_t[ℓ])` for rows starts [H, n, L], lam [H, n, L] at positions [H, n, P] (ℓ = −1
    and weight 0 where no level holds the position)."""
    lev = level_of(starts, positions)
    return lev, torch.where(lev >= 0, torch.gather(lam, -1, lev.clamp(min=0)), 0.0)


def _windows(x: _Row, S0: Tensor) -> tuple[list, Tensor]:
    """Every window of the row with its objects and re-framing, and the final state [H, L, Dk, Dv]."""
    Hh, _, Dk = x.q.shape
    L = x.lam.shape[-1]
    dt, dev = x.q.dtype, x.q.device
    initial = -1 - torch.arange(L, device=dev)  # the initial slot of rank j
    inside = (x.first[:, 0, :, None] <= initial) & (initial <= x.last[:, 0, :, None])
    objects = torch.einsum("hrj,hjkv->hrkv", inside.to(dt), S0)
    windows = []
    for w, (w0, w1) in enumerate(zip(x.window_starts[:-1], x.window_starts[1:])):
        a, e = x.first[:, w], x.last[:, w]
        valid = a <= e
        cuts = [c for c in x.chunk_starts if w0 <= c <= w1]
        bounds = list(zip(cuts[:-1], cuts[1:]))
        chunks = [_chunk(x.q[:, c0:c1], x.k[:, c0:c1], x.beta[:, c0:c1], None if x.g is None else x.g[:, c0:c1])
                  for c0, c1 in bounds]
        a2, e2 = x.first[:, w + 1], x.last[:, w + 1]
        valid2 = a2 <= e2
        holds = (a2[..., :, None] <= a[..., None, :]) & (e[..., None, :] <= e2[..., :, None]) & valid[..., None, :]
        holds &= valid2[..., None]
        gathered = torch.einsum("hrj,hjkv->hrkv", holds.to(dt), objects)
        member, sufs, keys = [None] * len(bounds), [None] * len(bounds), [None] * len(bounds)
        suf = torch.eye(Dk, dtype=dt, device=dev).expand(Hh, Dk, Dk)
        tokens = torch.zeros_like(gathered)
        for i in reversed(range(len(bounds))):
            (c0, c1), ch = bounds[i], chunks[i]
            pos = torch.arange(c0, c1, device=dev)
            member[i] = ((a2[..., :, None] <= pos) & (pos <= e2[..., :, None]) & valid2[..., None]).to(dt)
            sufs[i], keys[i] = suf, suf @ ch.E  # P(we − 1, s) k̄_s
            tokens = tokens + torch.einsum("hrs,hks,hsv->hrkv", member[i], keys[i], x.v[:, c0:c1])
            suf = ch.gam_C[:, None, None] * suf - keys[i] @ ch.Hk
        windows.append(_Window(bounds, chunks, a, valid, objects, holds, member, gathered, sufs, keys, suf))
        objects = suf[:, None] @ gathered + tokens
    return windows, objects


class _Read(NamedTuple):
    """The readout terms of query chunk `i` of a window."""

    lev: Tensor  # ℓ_t(s) [H, n, c1 − w0] for s from the window start (−1 above the diagonal)
    Lam: Tensor  # λ_t[ℓ_t(s)]
    lev_obj: Tensor  # ℓ_t(a_E) [H, n, L]
    W: Tensor  # λ_t[ℓ_t(a_E)] (0 for empty elements)
    xs: list  # the query in frames b_c, b_{c−1}, …, F: [H, n, Dk] each
    scores: list  # scores[j]: xs[j] Ē of the chunk it steps through


def _read(x: _Row, win: _Window, i: int) -> _Read:
    w0 = win.bounds[0][0]
    c0, c1 = win.bounds[i]
    n, dev = c1 - c0, x.q.device
    Hh, L = x.q.shape[0], x.lam.shape[-1]
    starts, lam = x.starts[:, c0:c1], x.lam[:, c0:c1]
    lev, Lam = _levels(starts, lam, torch.arange(w0, c1, device=dev).expand(Hh, n, c1 - w0))
    causal = torch.ones(n, c1 - w0, dtype=torch.bool, device=dev).tril(c0 - w0)
    lev, Lam = torch.where(causal, lev, -1), Lam * causal
    lev_obj, W = _levels(starts, lam, win.a[:, None, :].expand(Hh, n, L))
    lev_obj = torch.where(win.valid[:, None, :], lev_obj, -1)
    W = torch.where(win.valid[:, None, :], W, 0.0)
    xs, scores = [win.chunks[i].Qh], []
    for p in reversed(range(i)):
        xp, sp = _transport(xs[-1], win.chunks[p])
        xs.append(xp)
        scores.append(sp)
    return _Read(lev, Lam, lev_obj, W, xs, scores)


def _row_forward(x: _Row, S0: Tensor) -> tuple[Tensor, Tensor]:
    """`(o [H, T, Dv], S [H, L, Dk, Dv])` of one row."""
    windows, final = _windows(x, S0)
    outputs = []
    for win in windows:
        w0 = win.bounds[0][0]
        for i, (c0, c1) in enumerate(win.bounds):
            r = _read(x, win, i)
            out = (win.chunks[i].At * r.Lam[..., c0 - w0:]) @ x.v[:, c0:c1]
            for j, p in enumerate(reversed(range(i))):
                p0, p1 = win.bounds[p]
                out = out + (r.scores[j] * r.Lam[..., p0 - w0 : p1 - w0]) @ x.v[:, p0:p1]
            out = out + torch.einsum("htr,htk,hrkv->htv", r.W, r.xs[-1], win.objects)
            outputs.append(x.scale * out)
    return torch.cat(outputs, 1), final


# --------------------------------------------------------------------------------------------
# Windows, backward (reverse over windows; see the module doc)
# --------------------------------------------------------------------------------------------


def _row_backward(x: _Row, S0: Tensor, dO: Tensor, dS: Tensor):
    """`(dq, dk, dv, dlam, dg, dbeta, dS0)` of one row; `dO [H, T, Dv]` already scaled."""
    windows, _ = _windows(x, S0)
    dq, dk, dv = torch.zeros_like(x.q), torch.zeros_like(x.k), torch.zeros_like(x.v)
    dlam, dbeta = torch.zeros_like(x.lam), torch.zeros_like(x.beta)
    dg = None if x.g is None else torch.zeros_like(x.g)
    D_next = dS  # the gradient of the objects after the window (the final state after the last)
    for win in reversed(windows):
        w0 = win.bounds[0][0]
        grads = [_ChunkGrads(torch.zeros_like(ch.Qh), torch.zeros_like(ch.At), torch.zeros_like(ch.E),
                             torch.zeros_like(ch.Hk), torch.zeros_like(ch.gam_C)) for ch in win.chunks]
        D = torch.zeros_like(win.objects)
        # the readout of the window's queries
        for i, (c0, c1) in enumerate(win.bounds):
            r = _read(x, win, i)
            ch, dOc, vc = win.chunks[i], dO[:, c0:c1], x.v[:, c0:c1]
            Lam_own, lev_own = r.Lam[..., c0 - w0:], r.lev[..., c0 - w0:]
            dv[:, c0:c1] += (ch.At * Lam_own).transpose(1, 2) @ dOc
            dAL = dOc @ vc.transpose(1, 2)
            grads[i].At.add_(dAL * Lam_own)
            dlam_c = torch.zeros_like(x.lam[:, c0:c1])
            dlam_c.scatter_add_(-1, lev_own.clamp(min=0), torch.where(lev_own >= 0, dAL * ch.At, 0.0))
            U = torch.einsum("htv,hrkv->htrk", dOc, win.objects)
            dx = torch.einsum("htr,htrk->htk", r.W, U)
            dW = torch.einsum("htrk,htk->htr", U, r.xs[-1])
            dlam_c.scatter_add_(-1, r.lev_obj.clamp(min=0), torch.where(r.lev_obj >= 0, dW, 0.0))
            D += torch.einsum("htr,htk,htv->hrkv", r.W, r.xs[-1], dOc)
            for j in reversed(range(i)):  # from the window's frame up: step j went through chunk i − 1 − j
                p = i - 1 - j
                (p0, p1), prev, sigma, x_in = win.bounds[p], win.chunks[p], r.scores[j], r.xs[j]
                Lam_p, lev_p = r.Lam[..., p0 - w0 : p1 - w0], r.lev[..., p0 - w0 : p1 - w0]
                dAL = dOc @ x.v[:, p0:p1].transpose(1, 2)
                dlam_c.scatter_add_(-1, lev_p.clamp(min=0), torch.where(lev_p >= 0, dAL * sigma, 0.0))
                dv[:, p0:p1] += (sigma * Lam_p).transpose(1, 2) @ dOc
                dsigma = dAL * Lam_p - dx @ prev.Hk.transpose(1, 2)
                grads[p].E.add_(x_in.transpose(1, 2) @ dsigma)
                grads[p].Hk.sub_(sigma.transpose(1, 2) @ dx)
                grads[p].gam_C.add_((dx * x_in).sum((1, 2)))
                dx = prev.gam_C[:, None, None] * dx + dsigma @ prev.E.transpose(1, 2)
            grads[i].Qh.add_(dx)
            dlam[:, c0:c1] += dlam_c
        # the re-framing into the next window's frame: S̄' = Suf_F Σ S̄ + Σ K̃_s v_sᵀ
        dsuf = torch.einsum("hrkv,hrjv->hkj", D_next, win.gathered)
        D += torch.einsum("hrj,hrkv->hjkv", win.holds.to(D.dtype), win.suf.transpose(1, 2)[:, None] @ D_next)
        for i, ((c0, c1), ch) in enumerate(zip(win.bounds, win.chunks)):
            suf, keys = win.sufs[i], win.keys[i]
            dkeys = -dsuf @ ch.Hk.transpose(1, 2)
            grads[i].Hk.sub_(keys.transpose(1, 2) @ dsuf)
            grads[i].gam_C.add_((dsuf * suf).sum((1, 2)))
            dkeys = dkeys + torch.einsum("hrs,hrkv,hsv->hks", win.member[i], D_next, x.v[:, c0:c1])
            dv[:, c0:c1] += torch.einsum("hrs,hrkv,hks->hsv", win.member[i], D_next, keys)
            dsuf = ch.gam_C[:, None, None] * dsuf + dkeys @ ch.E.transpose(1, 2)
            grads[i].E.add_(suf.transpose(1, 2) @ dkeys)
        for (c0, c1), ch, d in zip(win.bounds, win.chunks, grads):
            dqc, dkc, dbc, dgc = _chunk_backward(ch, d, x.g is not None)
            dq[:, c0:c1] += dqc
            dk[:, c0:c1] += dkc
            dbeta[:, c0:c1] += dbc
            if dg is not None:
                dg[:, c0:c1] += dgc
        D_next = D
    L = x.lam.shape[-1]
    initial = -1 - torch.arange(L, device=x.q.device)
    inside = (x.first[:, 0, :, None] <= initial) & (initial <= x.last[:, 0, :, None])
    dS0 = torch.einsum("hrj,hrkv->hjkv", inside.to(D_next.dtype), D_next)
    return dq, dk, dv, dlam, dg, dbeta, dS0


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def _distinct(starts: Tensor) -> list[int]:
    values = starts.tolist()
    return [x for i, x in enumerate(values) if i == 0 or x != values[i - 1]]


def _rows(q, k, v, lam, g, beta, level_start, scale: float, chunk_size: int, step: Tensor, window: int):
    """Per batch row, the `_Row` of the call (a host read of the plan's starts: an opaque op's kernel)."""
    B, T, H, _ = q.shape
    cd = state_dtype(q.dtype)
    plan = window_plan(level_start, step, chunk_size, window)
    qh, kh, vh, lamh, bh = (x.to(cd).transpose(1, 2) for x in (q, k, v, lam, beta))  # [B, H, T, …]
    gh = None if g is None else g.to(cd).transpose(1, 2)
    starts = level_start.to(torch.int64).transpose(1, 2)
    first = plan.first.reshape(B, H, *plan.first.shape[1:])
    last = plan.last.reshape(B, H, *plan.last.shape[1:])
    return [_Row(qh[b], kh[b], vh[b], lamh[b], None if gh is None else gh[b], bh[b], starts[b], first[b], last[b],
                 _distinct(plan.chunk_starts[b]), _distinct(plan.window_starts[b]), scale) for b in range(B)]


@torch.no_grad()
def objects_delta_forward(q, k, v, lam, g, beta, level_start, S0, scale: float, chunk_size: int, step: Tensor,
                          window: int) -> tuple[Tensor, Tensor]:
    """`(o [B,T,H,Dv] in q's dtype, S [B,H,L,Dk,Dv] in the state dtype)`; see the module doc.
    `beta` is required (without it, `objects.py`); `window` is `R`, chunks per window."""
    B, T, H, _ = q.shape
    cd = state_dtype(q.dtype)
    if T == 0:
        return q.new_empty(B, 0, H, v.shape[-1]), S0.to(cd).clone()
    rows = _rows(q, k, v, lam, g, beta, level_start, scale, chunk_size, step, window)
    outs = [_row_forward(x, S0[b].to(cd)) for b, x in enumerate(rows)]
    return torch.stack([o for o, _ in outs]).transpose(1, 2).to(q.dtype).contiguous(), torch.stack([S for _, S in outs])


@torch.no_grad()
def objects_delta_backward(do, dS, q, k, v, lam, g, beta, level_start, S0, scale: float, chunk_size: int,
                           step: Tensor, window: int):
    """`(dq, dk, dv, dlam, dg, dbeta, dS0)` shaped and typed like the inputs; `do` or `dS` may be
    None (zero). `dg` is float32 zeros `[B,T,H]` without `g`, `dS0` in the state dtype."""
    B, T, H, Dk = q.shape
    Dv, L = v.shape[-1], lam.shape[-1]
    cd, dev = state_dtype(q.dtype), q.device
    dS = torch.zeros(B, H, L, Dk, Dv, dtype=cd, device=dev) if dS is None else dS.to(cd)
    zeros_g = torch.zeros(B, T, H, dtype=torch.float32, device=dev)
    if T == 0:
        return (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), torch.zeros_like(lam),
                zeros_g if g is None else torch.zeros_like(g), torch.zeros_like(beta), dS.clone())
    dO = torch.zeros(B, H, T, Dv, dtype=cd, device=dev) if do is None else scale * do.to(cd).transpose(1, 2)
    rows = _rows(q, k, v, lam, g, beta, level_start, scale, chunk_size, step, window)
    grads = [_row_backward(x, S0[b].to(cd), dO[b], dS[b]) for b, x in enumerate(rows)]

    def stacked(i: int, like: Tensor) -> Tensor:
        return torch.stack([gr[i] for gr in grads]).transpose(1, 2).to(like.dtype).contiguous()

    return (stacked(0, q), stacked(1, k), stacked(2, v), stacked(3, lam), zeros_g if g is None else stacked(4, g),
            stacked(5, beta), torch.stack([gr[6] for gr in grads]))
