r"""The persistent-object readout with `β` (SPEC §3.1, "With β"; Gated DeltaNet, DeltaNet) in torch:
windows of `R` chunks, slot objects re-framed once per window, the window's own tokens read as a
masked band. Forward in plain torch; the backward is autograd through the forward (a float64
prototype and CPU kernel: the explicit backward below is what the Triton kernels implement).

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

**Backward** (what autograd computes here, and the Triton kernels must write out), with
`dÕ = scale · dO` and `D_E = ∂/∂S̄_E`:

    objects:  U[t,E] = dÕ_t S̄_Eᵀ,  dq̃^{(F)}_t += Σ_E ω[t,E] U[t,E],  dω[t,E] = U[t,E]·q̃^{(F)}_t,
              D_E += Σ_t ω[t,E] q̃_t^{(F)} dÕ_tᵀ                                 (ω[t,E] = λ_t[ℓ_t(a_E)])
    band:     dσ = Λ ⊙ (dÕ Vᵀ) on the scores σ = q̃ Ē,  dΛ = σ ⊙ (dÕ Vᵀ),  dV += (σ ⊙ Λ)ᵀ dÕ,
              dq̃^{(b_{c'+1})} += dσ Ēᵀ,  dĒ += q̃ᵀ dσ
    transport (reverse, from F up to b_c): dq̃^{(b_{c'+1})} += P_{c'} dq̃^{(b_{c'})},
              dP_{c'} += Σ_t q̃_t^{(b_{c'+1})} dq̃_t^{(b_{c'})ᵀ}
    re-framing (reverse over windows):  D_E += Suf_Fᵀ D_{E'},  dSuf_F += D_{E'} (Σ S̄_E)ᵀ,
              dĒ_s += Suf_{b_{c'+1}}ᵀ D_{E'(s)} v_s,  dv_s += D_{E'(s)}ᵀ Suf_{b_{c'+1}} Ē_s,
              dSuf_{b_{c'+1}} += D_{E'(s)} v_s Ē_sᵀ,  then down the suffix chain
              dSuf_{b_{c'+1}} += dSuf_{b_{c'}} P_{c'}ᵀ,  dP_{c'} += Suf_{b_{c'+1}}ᵀ dSuf_{b_{c'}}
    chunk:    dQ̂, dĒ, dP_c, dÃ into the UT backward of `chunked.py` (`dP → dE −= dP Hᵀ,
              dH = −Ēᵀ dP − Ãᵀ dQ̂, dγ_C = tr dP, …`), giving dq, dk, dβ, dg;  dS0 = D of P_0's elements.

Why this form (per token and pass, `Dk = Dv = 128`, `K = 32`, `C = 64`; `readout_delta_cost.py`
counts it from the plan, and the closing note of issue #19 tabulates it for the §7 regimes):
the readout reads `|P_w| ≤ K` objects (`Dk·Dv` each, the floor), the transport and band
`(c − wR)·C·(2Dk + Dv)` (`(R − 1)/2` chunks back on average), the re-framing `|P_{w+1}|·Dk²·Dv`
and the suffix chain `2Dk²` per token, once per window. SPEC §3.1's sketch — objects created
inside the window kept as objects, each with its own transport until the window ends — pays that
transport for every such object, and objects are created at every chunk in the moderate and dense
regimes; here no object exists inside a window, so the cost does not depend on the regime beyond
`|P_w|`.

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


def aligned_starts(step: Tensor, T: int, size: int) -> Tensor:
    """`[B, ⌈(T + size − 1)/size⌉ + 1]` int64: `clamp(i·size − step mod size, 0, T)`, the last
    entry `T` (`plan.chunk_starts`' rule per batch row; trailing entries may repeat `T`)."""
    n = 0 if T == 0 else (T + 2 * size - 2) // size
    phase = torch.remainder(step.to(torch.int64), size)
    i = torch.arange(n + 1, device=step.device)
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


def window_plan(level_start: Tensor, step: Tensor, chunk_size: int, window: int) -> WindowPlan:
    """The plan of the module doc, on the level map's device, static shapes, no host read."""
    B, T, H, L = level_start.shape
    C, R = int(chunk_size), int(window)
    if C < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if R < 1:
        raise ValueError(f"window must be a positive number of chunks, got {window!r}")
    cs = aligned_starts(step, T, C)
    ws = aligned_starts(step, T, R * C)
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
    Qh: Tensor  # Q̂ [H, n, Dk]: row t is q_tᵀ P(t, b_c)
    At: Tensor  # Ã [H, n, n]
    E: Tensor  # Ē [H, Dk, n]: column s is P(b_{c+1}, s) β_s k_s
    Hk: Tensor  # H = diag(γ) K [H, n, Dk]
    gam_C: Tensor  # γ_C [H]


def _chunk(q: Tensor, k: Tensor, beta: Tensor, g: Tensor | None) -> _Chunk:
    Hh, n, _ = k.shape
    dt, dev = k.dtype, k.device
    tri = torch.ones(n, n, dtype=torch.bool, device=dev).tril()
    if g is not None:
        G = g.cumsum(1)
        gam = torch.exp(G)
        Gam = torch.exp(torch.where(tri, G[:, :, None] - G[:, None, :], -torch.inf))
        rho = torch.exp(G[:, -1:] - G)
    else:
        gam = rho = torch.ones(Hh, n, dtype=dt, device=dev)
        Gam = tri.to(dt).expand(Hh, n, n)
    eye = torch.eye(n, dtype=dt, device=dev)
    Akk = (beta[:, :, None] * (k @ k.transpose(1, 2)) * Gam).tril(-1)
    M = torch.linalg.solve_triangular(eye + Akk, eye.expand(Hh, n, n), upper=False, unitriangular=True) * beta[:, None, :]
    At = ((q @ k.transpose(1, 2)) * Gam) @ M
    Hk = gam[..., None] * k
    return _Chunk(gam[..., None] * q - At @ Hk, At, (rho[..., None] * k).transpose(1, 2) @ M, Hk, gam[:, -1])


def _transport(x: Tensor, c: _Chunk) -> tuple[Tensor, Tensor]:
    """`(x P_c, x Ē)` for rows x [H, m, Dk]: one WY step back through the chunk, and its scores."""
    scores = x @ c.E
    return c.gam_C[:, None, None] * x - scores @ c.Hk, scores


# --------------------------------------------------------------------------------------------
# Forward (differentiable: the backward is autograd through it)
# --------------------------------------------------------------------------------------------


def _levels(starts: Tensor, lam: Tensor, positions: Tensor) -> Tensor:
    """λ_t[ℓ_t(p)] for rows starts [H, n, L], lam [H, n, L], positions [H, n, P] (0 where no level)."""
    lev = level_of(starts, positions)
    return torch.where(lev >= 0, torch.gather(lam, -1, lev.clamp(min=0)), 0.0)


def _row_forward(q, k, v, lam, g, beta, starts, S0, first, last, cs: list[int], ws: list[int], scale: float):
    """One batch row, heads batched: q [H, T, Dk], …, starts [H, T, L], S0 [H, L, Dk, Dv],
    first/last [H, NW + 1, L]; cs, ws the (distinct) chunk and window starts with T at the end.
    Returns (o [H, T, Dv], S [H, L, Dk, Dv])."""
    Hh, T, Dk = q.shape
    L = lam.shape[-1]
    dt, dev = q.dtype, q.device
    ranks_pos = -1 - torch.arange(L, device=dev)  # initial slot of rank j
    a, e = first[:, 0], last[:, 0]
    inside = (a[..., :, None] <= ranks_pos) & (ranks_pos <= e[..., :, None])  # [H, L(element), L(slot)]
    objects = torch.einsum("hrj,hjkv->hrkv", inside.to(dt), S0)
    outputs = []
    for w, (w0, w1) in enumerate(zip(ws[:-1], ws[1:])):
        a, e = first[:, w], last[:, w]
        valid = a <= e
        bounds = [c for c in cs if w0 <= c <= w1]
        chunks: list[_Chunk] = []
        for c0, c1 in zip(bounds[:-1], bounds[1:]):
            t = slice(c0, c1)
            ch = _chunk(q[:, t], k[:, t], beta[:, t], None if g is None else g[:, t])
            n = c1 - c0
            Lam = _levels(starts[:, t], lam[:, t], torch.arange(w0, c1, device=dev).expand(Hh, n, c1 - w0))
            Lam = Lam * torch.ones(n, c1 - w0, dtype=torch.bool, device=dev).tril(c0 - w0)
            out = (ch.At * Lam[..., c0 - w0:]) @ v[:, t]
            x = ch.Qh
            for prev, (p0, p1) in zip(reversed(chunks), reversed(list(zip(bounds[:-1], bounds[1:]))[: len(chunks)])):
                x, scores = _transport(x, prev)
                out = out + (scores * Lam[..., p0 - w0 : p1 - w0]) @ v[:, p0:p1]
            W = torch.where(valid[:, None, :], _levels(starts[:, t], lam[:, t], a[:, None, :].expand(Hh, n, L)), 0.0)
            out = out + torch.einsum("htr,htk,hrkv->htv", W, x, objects)
            outputs.append(scale * out)
            chunks.append(ch)
        # re-framing into the next window's frame (the final state's at T)
        a2, e2 = first[:, w + 1], last[:, w + 1]
        valid2 = a2 <= e2
        holds = (a2[..., :, None] <= a[..., None, :]) & (e[..., None, :] <= e2[..., :, None]) & valid[..., None, :]
        gathered = torch.einsum("hrj,hjkv->hrkv", (holds & valid2[..., None]).to(dt), objects)
        suf = torch.eye(Dk, dtype=dt, device=dev).expand(Hh, Dk, Dk)
        tokens = torch.zeros_like(gathered)
        for ch, (c0, c1) in zip(reversed(chunks), reversed(list(zip(bounds[:-1], bounds[1:])))):
            keys = suf @ ch.E  # [H, Dk, n]: P(we − 1, s) k̄_s
            pos = torch.arange(c0, c1, device=dev)
            member = ((a2[..., :, None] <= pos) & (pos <= e2[..., :, None]) & valid2[..., None]).to(dt)  # [H, L, n]
            tokens = tokens + torch.einsum("hrs,hks,hsv->hrkv", member, keys, v[:, c0:c1])
            suf = ch.gam_C[:, None, None] * suf - keys @ ch.Hk
        objects = suf[:, None] @ gathered + tokens
    return torch.cat(outputs, 1), objects


def _distinct(starts: Tensor) -> list[int]:
    values = starts.tolist()
    return [x for i, x in enumerate(values) if i == 0 or x != values[i - 1]]


def _forward(q, k, v, lam, g, beta, level_start, S0, scale: float, chunk_size: int, step: Tensor, window: int):
    B, T, H, Dk = q.shape
    Dv, L = v.shape[-1], lam.shape[-1]
    cd = state_dtype(q.dtype)
    plan = window_plan(level_start, step, chunk_size, window)
    qh, kh, vh, lamh, bh = (x.to(cd).transpose(1, 2) for x in (q, k, v, lam, beta))  # [B, H, T, …]
    gh = None if g is None else g.to(cd).transpose(1, 2)
    starts = level_start.to(torch.int64).transpose(1, 2)
    first = plan.first.reshape(B, H, *plan.first.shape[1:])
    last = plan.last.reshape(B, H, *plan.last.shape[1:])
    o, S = [], []
    for b in range(B):
        ob, Sb = _row_forward(qh[b], kh[b], vh[b], lamh[b], None if gh is None else gh[b], bh[b], starts[b],
                              S0[b].to(cd), first[b], last[b], _distinct(plan.chunk_starts[b]),
                              _distinct(plan.window_starts[b]), scale)
        o.append(ob)
        S.append(Sb)
    return torch.stack(o).transpose(1, 2).to(q.dtype), torch.stack(S)


@torch.no_grad()
def objects_delta_forward(q, k, v, lam, g, beta, level_start, S0, scale: float, chunk_size: int, step: Tensor,
                          window: int) -> tuple[Tensor, Tensor]:
    """`(o [B,T,H,Dv] in q's dtype, S [B,H,L,Dk,Dv] in the state dtype)`; see the module doc.
    `beta` is required (without it, `objects.py`); `window` is `R`, chunks per window."""
    B, T, H, _ = q.shape
    if T == 0:
        return q.new_empty(B, 0, H, v.shape[-1]), S0.to(state_dtype(q.dtype)).clone()
    return _forward(q, k, v, lam, g, beta, level_start, S0, scale, chunk_size, step, window)


def objects_delta_backward(do, dS, q, k, v, lam, g, beta, level_start, S0, scale: float, chunk_size: int,
                           step: Tensor, window: int):
    """`(dq, dk, dv, dlam, dg, dbeta, dS0)` by autograd through the forward; `do` or `dS` may be
    None (zero). `dg` is float32 zeros `[B,T,H]` without `g`, `dS0` in the state dtype."""
    cd = state_dtype(q.dtype)
    names = ("q", "k", "v", "lam", "g", "beta", "S0")
    inputs = dict(zip(names, (q, k, v, lam, g, beta, S0)))
    leaves = {n: x.detach().to(cd if n == "S0" else x.dtype).requires_grad_() for n, x in inputs.items()
              if x is not None}
    grads = dict.fromkeys(leaves)
    if q.shape[1] == 0:
        grads["S0"] = dS
    else:
        with torch.enable_grad():
            o, S = _forward(leaves["q"], leaves["k"], leaves["v"], leaves["lam"], leaves.get("g"), leaves["beta"],
                            level_start, leaves["S0"], scale, chunk_size, step, window)
            pairs = [(out, cot.to(out.dtype)) for out, cot in ((o, do), (S, dS)) if cot is not None]
            if pairs:
                found = torch.autograd.grad([out for out, _ in pairs], list(leaves.values()),
                                            [cot for _, cot in pairs], allow_unused=True)
                grads = dict(zip(leaves, found))
    result = []
    for n in names:
        x = inputs[n]
        if x is None:
            result.append(torch.zeros(q.shape[:3], dtype=torch.float32, device=q.device))
            continue
        dtype = cd if n == "S0" else x.dtype
        result.append(torch.zeros(x.shape, dtype=dtype, device=x.device) if grads[n] is None else grads[n].to(dtype))
    return tuple(result)
