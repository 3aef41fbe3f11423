r"""The dense path of the CUDA readout without `β` (none, or scalar decay `g`): the flash-style
masked quadratic form of SPEC §2, no softmax, no sequential part. It takes the heads whose object
plan overflows the pool, and calls of at most one chunk (decode), by the stage's rule
(`cost.takes_objects`, evaluated on the device); rows that the same call gives to the objects
(`objects_triton.py`) are skipped (`MODE[n] = 1`). `masked_forward` and `masked_backward` run
every row dense, with the signatures of `dla::readout`'s kernels.

What it computes
================
Per batch element and head, positions `t, s = 0..T−1`, `G_t = Σ_{u≤t} g_u` over the whole call
(`G ≡ 0` without `g`), `Γ[t,s] = exp(G_t − G_s)` for `s ≤ t`, `K = L` levels.
Level map `level_start [T, L]` and its running minimum over levels `c[t, r] = min_{r'≤r}
level_start[t, r']` (non-increasing in `r`), so that

    ℓ_t(p) = first r with level_start[t, r] ≤ p = #{r : c[t, r] > p}     (none when = L)
    level r of row t holds exactly the positions c[t, r] ≤ p < c[t, r−1]   (c[t, −1] = +∞)

— one contiguous range per level; the initial slot of rank `r` sits at `p = −1 − r`.

    A[t,s]  = scale · (q_t · k_s) · Γ[t,s]                         [T, T], s ≤ t
    Λ[t,s]  = λ_t[ℓ_t(s)],   W[t,r] = λ_t[ℓ_t(−1−r)]               (0 where none)
    o_t     = Σ_s (A ⊙ Λ)[t,s] v_s + scale · exp(G_t) · Σ_r W[t,r] S0_rᵀ q_t         [T, Dv]
    S_{r'}  = Σ_{s: ℓ_{T−1}(s)=r'} exp(G_{T−1} − G_s) k_s v_sᵀ
              + Σ_{r: ℓ_{T−1}(−1−r)=r'} exp(G_{T−1}) S0_r                           [K, Dk, Dv]

Backward, with `dP = dO Vᵀ`, `dA = dP ⊙ Λ`, `u_t = scale · exp(G_t)`, `X_{t,r} = S0_r dO_t`,
`ρ_s = exp(G_{T−1} − G_s)`, `λ̂_s = ℓ_{T−1}(s)`:

    dv_s     = Σ_t (A ⊙ Λ)[t,s] dO_t + ρ_s dS_{λ̂_s}ᵀ k_s
    dq_t     = scale · Σ_s (dA ⊙ Γ)[t,s] k_s + u_t Σ_r W[t,r] X_{t,r}
    dk_s     = scale · Σ_t (dA ⊙ Γ)[t,s] q_t + ρ_s dS_{λ̂_s} v_s
    dλ_t[l]  = Σ_{s: ℓ_t(s)=l} (A ⊙ dP)[t,s] + Σ_{r: ℓ_t(−1−r)=l} u_t q_t · X_{t,r}
    dS0_r    = Σ_t u_t W[t,r] q_t dO_tᵀ + exp(G_{T−1}) dS_{ℓ_{T−1}(−1−r)}
    dG_t     = Σ_s (dA ⊙ A)[t,s] − Σ_{t'} (dA ⊙ A)[t',t] + u_t Σ_r W[t,r] q_t · X_{t,r}
               − ρ_t k_t · dS_{λ̂_t} v_t
    dG_{T−1} += Σ_s ρ_s k_s · dS_{λ̂_s} v_s + exp(G_{T−1}) Σ_r ⟨dS_{ℓ_{T−1}(−1−r)}, S0_r⟩
    dg_u     = Σ_{t≥u} dG_t

Kernels. The quadratic ones: `_fwd_kernel` (query tiles: `o`), `_bwd_dq_kernel` (query tiles:
`dq`, `dλ`, row part of `dG`), `_bwd_dkv_kernel` (key tiles: `dk`, `dv`, column part of `dG`).
The state ones write float32 buffers that the quadratic kernels start their accumulators from:
`_fwd_initial_kernel` and `_bwd_initial_kernel` (the initial slots' terms), `_bwd_final_kernel`
(the final states' terms of `dk`, `dv`, `dG`); and `_state_kernel` (one program per level and
`Dv` tile: `S`, reading only that level's token range), `_bwd_ds0_kernel` (one program per
initial slot and `Dv` tile: `dS0`).

Levels in a tile. Row `t` of a `[BT, BS]` tile meets the levels `ℓ_t(s_first)` down to
`ℓ_t(min(t, s_last))`, each on its exact range — usually one or two (a tile off the diagonal
holds one level for `fenwick` and `single`, and for `dla` one per segment it overlaps). The
key loop applies the first `NL` of them per row, unrolled: a loop inside would stop Triton from
pipelining the key loop. Each quadratic kernel is launched twice: first with `EXTRA`, which adds
the levels beyond `NL` of the tiles that have any into the float32 buffers (and does little
else), then the main pass. Cost `(T/2)(Dk + Dv)` per query and pass, plus `K·Dk·Dv` per token
for the initial slots when a call carries a state.

Numerics: `G` is the float64 cumsum split into float32 `hi + lo`, and every `G_t − G_s` is
formed as `(hi_t − hi_r) + (lo_t − lo_r)` against a tile reference `r`, so decays keep float32
accuracy over long sequences. Products accumulate in float32; 16-bit inputs multiply in their
own dtype (the `A ⊙ Λ` and `dA ⊙ Γ` tiles are rounded to it, as in FlashAttention), state terms
(`S0`, `dS`) in float32 with TF32. float32 inputs use `input_precision` (`"ieee"` by default;
`"tf32"`, `"tf32x3"` selectable). float64 is the CPU path's. Offsets inside a `(b, h)` slice are
int32 (`T·H·max(Dk, Dv, K) < 2³¹`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from dla.ops.cumsum_triton import cumsum
from dla.ops.levels import running_min
from dla.ops.triton_utils import interpreting, pow2

__all__ = ["masked_forward", "masked_backward", "dense_forward", "dense_backward", "reverse_cumsum"]

NEG = tl.constexpr(-(2**30))  # running-minimum padding beyond L: ≤ every position, so never counted
BIG = tl.constexpr(2**31 - 1)  # c[t, −1] = +∞, and the start of a level that does not exist


# --------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------


@triton.jit
def _mask(rows, cols, D: tl.constexpr, BD: tl.constexpr):
    """Load mask of a [R, BD] tile: valid rows, and columns < D unless the tile is exact."""
    if BD == D:
        return rows[:, None]
    else:
        return rows[:, None] & (cols[None, :] < D)


@triton.jit
def _mask_kv(dk_, dv_, DK: tl.constexpr, DV: tl.constexpr):
    """Load mask of a [BK, BV] state tile (dv_ may start past 0)."""
    return (dk_[:, None] < DK) & (dv_[None, :] < DV)


@triton.jit
def _level(c, p):
    """ℓ_t(p_t) for each row of the running minimum `c [R, BL]`: p is [R, 1] or a scalar."""
    return tl.sum((c > p).to(tl.int32), axis=1)


@triton.jit
def _pick(x, idx, BL: tl.constexpr):
    """x[t, idx_t] for x [R, BL] and idx [R] (0 where idx ≥ BL)."""
    cols = tl.arange(0, BL)
    return tl.sum(tl.where(cols[None, :] == idx[:, None], x, 0.0), axis=1)


@triton.jit
def _rel_decay(GH, GL, rows, mask, gh_ref, gl_ref):
    """G_rows − G_ref from the hi/lo split."""
    gh = tl.load(GH + rows, mask=mask, other=0.0)
    gl = tl.load(GL + rows, mask=mask, other=0.0)
    return (gh - gh_ref) + (gl - gl_ref)


@triton.jit
def _u(GH, GL, rt, mt, scale, HAS_G: tl.constexpr, BT: tl.constexpr):
    """u_t = scale · exp(G_t), the weight of the initial slots' read-out."""
    u = tl.full([BT], scale, tl.float32)
    if HAS_G:
        u = u * tl.exp(tl.load(GH + rt, mask=mt, other=0.0) + tl.load(GL + rt, mask=mt, other=0.0))
    return u


@triton.jit
def _row_levels(c, t, mt, s0, s_last):
    """Per query row of a tile with keys s0..s_last: the level of s0 (`top`) and how many
    levels the row meets there (0 for rows without a pair)."""
    top = _level(c, s0)
    need = tl.where(mt & (t >= s0), top - _level(c, tl.minimum(t, s_last)[:, None]) + 1, 0)
    return top, need


@triton.jit
def _level_step(CM, LAM, rq, mq, r, s, L: tl.constexpr, TRANS: tl.constexpr):
    """Exact mask of level r_t (c[t, r] ≤ s < c[t, r − 1]) for the query rows rq against the
    keys s, and λ_t[r_t] — as [Q, S] tiles, or [S, Q] when TRANS."""
    ok = mq & (r >= 0) & (r < L)
    cr = tl.load(CM + rq * L + r, mask=ok, other=BIG)
    cp = tl.load(CM + rq * L + r - 1, mask=ok & (r > 0), other=BIG)
    lr = tl.load(LAM + rq * L + r, mask=ok, other=0.0).to(tl.float32)
    if TRANS:
        return (cr[None, :] <= s[:, None]) & (cp[None, :] > s[:, None]), lr[None, :]
    else:
        return (cr[:, None] <= s[None, :]) & (cp[:, None] > s[None, :]), lr[:, None]


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------


@triton.jit
def _fwd_initial_kernel(Q, LAM, GH, GL, CM, S0, O0, MODE, T, H, scale,
                        L: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                        HAS_G: tl.constexpr, PREC32: tl.constexpr,
                        BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BL: tl.constexpr):
    """O0 [B,T,H,Dv] float32: the initial slots' part of o, u_t Σ_r W[t,r] S0_rᵀ q_t."""
    scale = tl.cast(scale, tl.float32)  # Inductor (torch 2.11) passed the float as fp64
    t0 = tl.program_id(0) * BT
    n = tl.program_id(1)
    if tl.load(MODE + n) != 0:  # an object row (objects_triton.py)
        return
    row0 = (n // H).to(tl.int64) * T * H + n % H
    Q += row0 * DK
    LAM += row0 * L
    CM += row0 * L
    O0 += row0 * DV
    GH += row0
    GL += row0
    S0 += n.to(tl.int64) * L * DK * DV
    t = t0 + tl.arange(0, BT)
    dk_ = tl.arange(0, BK)
    dv_ = tl.program_id(2) * BV + tl.arange(0, BV)
    cols = tl.arange(0, BL)
    mt = t < T
    rt = t * H
    ml = mt[:, None] & (cols[None, :] < L)
    c = tl.load(CM + rt[:, None] * L + cols[None, :], mask=ml, other=NEG)
    lam = tl.load(LAM + rt[:, None] * L + cols[None, :], mask=ml, other=0.0).to(tl.float32)
    q = tl.load(Q + rt[:, None] * DK + dk_[None, :], mask=_mask(mt, dk_, DK, BK), other=0.0).to(tl.float32)
    q = q * _u(GH, GL, rt, mt, scale, HAS_G, BT)[:, None]
    acc = tl.zeros([BT, BV], dtype=tl.float32)
    for r in range(0, L):
        lev = _level(c, -1 - r)
        live = mt & (lev < L)
        if tl.max(live.to(tl.int32)) > 0:
            w = tl.where(live, _pick(lam, lev, BL), 0.0)
            s0r = tl.load(S0 + (r * DK + dk_[:, None]) * DV + dv_[None, :], mask=_mask_kv(dk_, dv_, DK, DV), other=0.0)
            acc += tl.dot(q * w[:, None], s0r, input_precision=PREC32)
    tl.store(O0 + rt[:, None] * DV + dv_[None, :], acc, mask=mt[:, None] & (dv_[None, :] < DV))


@triton.jit
def _fwd_tile(acc, q, t, mt, rt, a, K, V, CM, LAM, GH, GL, gh_ref, gl_ref, s0, t_end, top, i0, i1, H, scale,
              L: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, HAS_G: tl.constexpr, PREC: tl.constexpr,
              UNROLL: tl.constexpr, NL: tl.constexpr,
              BT: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """acc + (A ⊙ Λ) V over the key tile at s0, Λ from the levels top − i, i ∈ [i0, i1) per row
    (i ∈ [0, NL) unrolled when UNROLL)."""
    s = s0 + tl.arange(0, BS)
    ms = s < t_end
    rs = s * H
    dk_ = tl.arange(0, BK)
    dv_ = tl.arange(0, BV)
    k = tl.load(K + rs[:, None] * DK + dk_[None, :], mask=_mask(ms, dk_, DK, BK), other=0.0)
    v = tl.load(V + rs[:, None] * DV + dv_[None, :], mask=_mask(ms, dv_, DV, BV), other=0.0)
    causal = s[None, :] <= t[:, None]
    if HAS_G:
        bs = _rel_decay(GH, GL, rs, ms, gh_ref, gl_ref)
        decay = tl.where(causal, tl.exp(a[:, None] - bs[None, :]), 0.0) * scale
    else:
        decay = tl.where(causal, scale, 0.0)
    lamm = tl.zeros([BT, BS], dtype=tl.float32)
    if UNROLL:
        for i in tl.static_range(0, NL):
            inr, lr = _level_step(CM, LAM, rt, mt, top - i, s, L, False)
            lamm = tl.where(inr, lr, lamm)
    else:
        for i in range(i0, i1):
            inr, lr = _level_step(CM, LAM, rt, mt, top - i, s, L, False)
            lamm = tl.where(inr, lr, lamm)
    p = tl.dot(q, tl.trans(k), input_precision=PREC) * (decay * lamm)
    return acc + tl.dot(p.to(v.dtype), v, input_precision=PREC)


@triton.jit
def _fwd_kernel(Q, K, V, LAM, GH, GL, CM, O0, O, MODE, T, H, scale,
                L: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                HAS_G: tl.constexpr, PREC: tl.constexpr, NL: tl.constexpr, EXTRA: tl.constexpr,
                BT: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BL: tl.constexpr):
    """Over a query tile: o = O0 + (A ⊙ Λ) V for the first NL levels of each row and key tile;
    with EXTRA, O0 += the same for the levels beyond them (a pass over the tiles that have any,
    launched before the main one)."""
    scale = tl.cast(scale, tl.float32)  # Inductor (torch 2.11) passed the float as fp64
    t0 = tl.program_id(0) * BT
    n = tl.program_id(1)
    if tl.load(MODE + n) != 0:  # an object row (objects_triton.py)
        return
    row0 = (n // H).to(tl.int64) * T * H + n % H
    Q += row0 * DK
    K += row0 * DK
    V += row0 * DV
    LAM += row0 * L
    CM += row0 * L
    O0 += row0 * DV
    O += row0 * DV
    GH += row0
    GL += row0
    t = t0 + tl.arange(0, BT)
    dk_ = tl.arange(0, BK)
    dv_ = tl.arange(0, BV)
    cols = tl.arange(0, BL)
    mt = t < T
    rt = t * H
    q = tl.load(Q + rt[:, None] * DK + dk_[None, :], mask=_mask(mt, dk_, DK, BK), other=0.0)
    c = tl.load(CM + rt[:, None] * L + cols[None, :], mask=mt[:, None] & (cols[None, :] < L), other=NEG)
    if HAS_G:
        gh_ref = tl.load(GH + t0 * H)
        gl_ref = tl.load(GL + t0 * H)
        a = _rel_decay(GH, GL, rt, mt, gh_ref, gl_ref)
    else:
        gh_ref = 0.0
        gl_ref = 0.0
        a = tl.zeros([BT], dtype=tl.float32)
    o_mask = _mask(mt, dv_, DV, BV)
    acc = tl.load(O0 + rt[:, None] * DV + dv_[None, :], mask=o_mask, other=0.0)
    t_end = tl.minimum(t0 + BT, T)
    for s0 in range(0, t_end, BS):
        top, need = _row_levels(c, t, mt, s0, tl.minimum(s0 + BS, t_end) - 1)
        if EXTRA:
            most = tl.max(need)
            if most > NL:
                acc = _fwd_tile(acc, q, t, mt, rt, a, K, V, CM, LAM, GH, GL, gh_ref, gl_ref, s0, t_end, top, NL,
                                most, H, scale, L, DK, DV, HAS_G, PREC, False, NL, BT, BS, BK, BV)
        else:
            acc = _fwd_tile(acc, q, t, mt, rt, a, K, V, CM, LAM, GH, GL, gh_ref, gl_ref, s0, t_end, top, 0, NL,
                            H, scale, L, DK, DV, HAS_G, PREC, True, NL, BT, BS, BK, BV)
    if EXTRA:
        tl.store(O0 + rt[:, None] * DV + dv_[None, :], acc, mask=o_mask)
    else:
        tl.store(O + rt[:, None] * DV + dv_[None, :], acc.to(O.dtype.element_ty), mask=o_mask)


@triton.jit
def _state_kernel(K, V, GH, GL, CM, S0, S, MODE, T, H,
                  L: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                  HAS_G: tl.constexpr, PREC: tl.constexpr,
                  BS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """S_r for one level r and Dv tile: its token range [c[T−1, r], c[T−1, r−1]) and the
    initial slots in it."""
    r = tl.program_id(0)
    n = tl.program_id(1)
    if tl.load(MODE + n) != 0:  # an object row (objects_triton.py)
        return
    row0 = (n // H).to(tl.int64) * T * H + n % H
    K += row0 * DK
    V += row0 * DV
    CM += row0 * L
    GH += row0
    GL += row0
    S0 += n.to(tl.int64) * L * DK * DV
    S += n.to(tl.int64) * L * DK * DV
    dk_ = tl.arange(0, BK)
    dv_ = tl.program_id(2) * BV + tl.arange(0, BV)
    last = (T - 1) * H
    lo = tl.load(CM + last * L + r)
    hi = tl.load(CM + last * L + tl.maximum(r - 1, 0))
    hi = tl.where(r > 0, hi, BIG)
    s_end = tl.minimum(hi, T)
    if HAS_G:
        gh_last = tl.load(GH + last)
        gl_last = tl.load(GL + last)
    acc = tl.zeros([BK, BV], dtype=tl.float32)
    for s0 in range(tl.maximum(lo, 0), s_end, BS):
        s = s0 + tl.arange(0, BS)
        ms = s < s_end
        rs = s * H
        k = tl.load(K + rs[:, None] * DK + dk_[None, :], mask=_mask(ms, dk_, DK, BK), other=0.0)
        v = tl.load(V + rs[:, None] * DV + dv_[None, :], mask=ms[:, None] & (dv_[None, :] < DV), other=0.0)
        if HAS_G:
            rho = tl.exp(-_rel_decay(GH, GL, rs, ms, gh_last, gl_last))
            k = (k.to(tl.float32) * rho[:, None]).to(v.dtype)
        acc += tl.dot(tl.trans(k), v, input_precision=PREC)
    carry = 1.0
    if HAS_G:
        carry = tl.exp(gh_last + gl_last)
    tile = dk_[:, None] * DV + dv_[None, :]
    for p in range(tl.maximum(lo, -L), tl.minimum(hi, 0)):  # initial slots r0 = −1 − p
        acc += carry * tl.load(S0 + (-1 - p) * DK * DV + tile, mask=_mask_kv(dk_, dv_, DK, DV), other=0.0)
    tl.store(S + r * DK * DV + tile, acc, mask=_mask_kv(dk_, dv_, DK, DV))


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------


@triton.jit
def _bwd_initial_kernel(Q, LAM, GH, GL, CM, S0, DO, DQ0, DL0, DG0, MODE, T, H, scale,
                        L: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                        HAS_G: tl.constexpr, PREC32: tl.constexpr,
                        BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BC: tl.constexpr,
                        BL: tl.constexpr):
    """The initial slots' parts of dq, dλ and dG (float32) over a query tile; X_{t,r} = S0_r dO_t
    is reduced over Dv in chunks of BC."""
    scale = tl.cast(scale, tl.float32)  # Inductor (torch 2.11) passed the float as fp64
    t0 = tl.program_id(0) * BT
    n = tl.program_id(1)
    if tl.load(MODE + n) != 0:  # an object row (objects_triton.py)
        return
    row0 = (n // H).to(tl.int64) * T * H + n % H
    Q += row0 * DK
    DO += row0 * DV
    LAM += row0 * L
    CM += row0 * L
    GH += row0
    GL += row0
    DQ0 += row0 * DK
    DL0 += row0 * L
    DG0 += row0
    S0 += n.to(tl.int64) * L * DK * DV
    t = t0 + tl.arange(0, BT)
    dk_ = tl.arange(0, BK)
    cols = tl.arange(0, BL)
    mt = t < T
    rt = t * H
    ml = mt[:, None] & (cols[None, :] < L)
    c = tl.load(CM + rt[:, None] * L + cols[None, :], mask=ml, other=NEG)
    lam = tl.load(LAM + rt[:, None] * L + cols[None, :], mask=ml, other=0.0).to(tl.float32)
    q_mask = _mask(mt, dk_, DK, BK)
    q = tl.load(Q + rt[:, None] * DK + dk_[None, :], mask=q_mask, other=0.0).to(tl.float32)
    u = _u(GH, GL, rt, mt, scale, HAS_G, BT)
    dq = tl.zeros([BT, BK], dtype=tl.float32)
    dl = tl.zeros([BT, BL], dtype=tl.float32)
    dg = tl.zeros([BT], dtype=tl.float32)
    for r in range(0, L):
        lev = _level(c, -1 - r)
        live = mt & (lev < L)
        if tl.max(live.to(tl.int32)) > 0:
            w = tl.where(live, _pick(lam, lev, BL), 0.0)
            x = tl.zeros([BT, BK], dtype=tl.float32)
            for v0 in tl.static_range(0, BV, BC):
                dv_ = v0 + tl.arange(0, BC)
                do = tl.load(DO + rt[:, None] * DV + dv_[None, :], mask=mt[:, None] & (dv_[None, :] < DV), other=0.0)
                s0r = tl.load(S0 + (r * DK + dk_[:, None]) * DV + dv_[None, :], mask=_mask_kv(dk_, dv_, DK, DV),
                              other=0.0)
                x += tl.dot(do.to(tl.float32), tl.trans(s0r), input_precision=PREC32)
            dw = tl.where(live, tl.sum(x * q, axis=1) * u, 0.0)
            dl += tl.where(cols[None, :] == lev[:, None], dw[:, None], 0.0)
            dq += x * (w * u)[:, None]
            dg += w * dw
    tl.store(DQ0 + rt[:, None] * DK + dk_[None, :], dq, mask=q_mask)
    tl.store(DL0 + rt[:, None] * L + cols[None, :], dl, mask=ml)
    tl.store(DG0 + rt, dg, mask=mt)


@triton.jit
def _bwd_final_kernel(K, V, GH, GL, CM, DS, DK0, DV0, DG0, FIN, MODE, T, H,
                      L: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                      HAS_G: tl.constexpr, PREC32: tl.constexpr,
                      BS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BC: tl.constexpr):
    """The final states' parts of dk, dv (float32) over a key tile: token s joins the slot of
    rank λ̂_s = ℓ_{T−1}(s), carried by ρ_s. Programs with program_id(2) = 0 write
    dv_s = ρ_s dS_{λ̂_s}ᵀ k_s, the others dk_s = ρ_s dS_{λ̂_s} v_s, FIN_s = k_s · dk_s and
    DG0 = −FIN (for dG); each in column chunks of BC."""
    s0 = tl.program_id(0) * BS
    n = tl.program_id(1)
    if tl.load(MODE + n) != 0:  # an object row (objects_triton.py)
        return
    row0 = (n // H).to(tl.int64) * T * H + n % H
    K += row0 * DK
    V += row0 * DV
    CM += row0 * L
    GH += row0
    GL += row0
    DK0 += row0 * DK
    DV0 += row0 * DV
    DG0 += row0
    FIN += row0
    DS += n.to(tl.int64) * L * DK * DV
    s = s0 + tl.arange(0, BS)
    dk_ = tl.arange(0, BK)
    dv_ = tl.arange(0, BV)
    ms = s < T
    rs = s * H
    last = (T - 1) * H
    lev = tl.zeros([BS], dtype=tl.int32)
    for r in range(0, L):  # λ̂_s = #{r : c[T−1, r] > s}
        lev += (tl.load(CM + last * L + r) > s).to(tl.int32)
    rho = tl.where(ms & (lev < L), 1.0, 0.0)
    if HAS_G:
        rho = rho * tl.exp(-_rel_decay(GH, GL, rs, ms, tl.load(GH + last), tl.load(GL + last)))
    r_lo = tl.min(tl.where(ms, lev, L))
    r_hi = tl.minimum(tl.max(tl.where(ms, lev, 0)), L - 1)
    if tl.program_id(2) == 0:
        k = tl.load(K + rs[:, None] * DK + dk_[None, :], mask=_mask(ms, dk_, DK, BK), other=0.0).to(tl.float32)
        for c0 in tl.static_range(0, BV, BC):
            cc = c0 + tl.arange(0, BC)
            acc = tl.zeros([BS, BC], dtype=tl.float32)
            for r in range(r_lo, r_hi + 1):
                coef = tl.where(lev == r, rho, 0.0)
                ds = tl.load(DS + (r * DK + dk_[:, None]) * DV + cc[None, :], mask=_mask_kv(dk_, cc, DK, DV), other=0.0)
                acc += tl.dot(k * coef[:, None], ds, input_precision=PREC32)
            tl.store(DV0 + rs[:, None] * DV + cc[None, :], acc, mask=ms[:, None] & (cc[None, :] < DV))
    else:
        v = tl.load(V + rs[:, None] * DV + dv_[None, :], mask=_mask(ms, dv_, DV, BV), other=0.0).to(tl.float32)
        fin = tl.zeros([BS], dtype=tl.float32)
        for c0 in tl.static_range(0, BK, BC):
            cc = c0 + tl.arange(0, BC)
            acc = tl.zeros([BS, BC], dtype=tl.float32)
            for r in range(r_lo, r_hi + 1):
                coef = tl.where(lev == r, rho, 0.0)
                ds = tl.load(DS + (r * DK + cc[:, None]) * DV + dv_[None, :], mask=_mask_kv(cc, dv_, DK, DV), other=0.0)
                acc += tl.dot(v * coef[:, None], tl.trans(ds), input_precision=PREC32)
            kc = tl.load(K + rs[:, None] * DK + cc[None, :], mask=ms[:, None] & (cc[None, :] < DK), other=0.0)
            fin += tl.sum(acc * kc.to(tl.float32), axis=1)
            tl.store(DK0 + rs[:, None] * DK + cc[None, :], acc, mask=ms[:, None] & (cc[None, :] < DK))
        tl.store(FIN + rs, fin, mask=ms)
        tl.store(DG0 + rs, -fin, mask=ms)


@triton.jit
def _dq_tile(dq, dl, dg, q, do, t, mt, rt, a, K, V, CM, LAM, GH, GL, gh_ref, gl_ref, s0, t_end, top, i0, i1,
             H, scale, L: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, HAS_G: tl.constexpr,
             PREC: tl.constexpr, UNROLL: tl.constexpr, NL: tl.constexpr,
             BT: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BL: tl.constexpr):
    """dq, dλ, dG rows + the key tile at s0 for the levels top − i, i ∈ [i0, i1) per row."""
    s = s0 + tl.arange(0, BS)
    ms = s < t_end
    rs = s * H
    dk_ = tl.arange(0, BK)
    dv_ = tl.arange(0, BV)
    cols = tl.arange(0, BL)
    k = tl.load(K + rs[:, None] * DK + dk_[None, :], mask=_mask(ms, dk_, DK, BK), other=0.0)
    v = tl.load(V + rs[:, None] * DV + dv_[None, :], mask=_mask(ms, dv_, DV, BV), other=0.0)
    causal = s[None, :] <= t[:, None]
    if HAS_G:
        bs = _rel_decay(GH, GL, rs, ms, gh_ref, gl_ref)
        decay = tl.where(causal, tl.exp(a[:, None] - bs[None, :]), 0.0) * scale
    else:
        decay = tl.where(causal, scale, 0.0)
    A = tl.dot(q, tl.trans(k), input_precision=PREC) * decay
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    adp = A * dp
    lamm = tl.zeros([BT, BS], dtype=tl.float32)
    if UNROLL:
        for i in tl.static_range(0, NL):
            inr, lr = _level_step(CM, LAM, rt, mt, top - i, s, L, False)
            lamm = tl.where(inr, lr, lamm)
            part = tl.sum(tl.where(inr, adp, 0.0), axis=1)
            dl += tl.where(cols[None, :] == (top - i)[:, None], part[:, None], 0.0)
    else:
        for i in range(i0, i1):
            inr, lr = _level_step(CM, LAM, rt, mt, top - i, s, L, False)
            lamm = tl.where(inr, lr, lamm)
            part = tl.sum(tl.where(inr, adp, 0.0), axis=1)
            dl += tl.where(cols[None, :] == (top - i)[:, None], part[:, None], 0.0)
    da = dp * lamm
    dg += tl.sum(da * A, axis=1)
    dq += tl.dot((da * decay).to(k.dtype), k, input_precision=PREC)
    return dq, dl, dg


@triton.jit
def _bwd_dq_kernel(Q, K, V, LAM, GH, GL, CM, DO, DQ0, DL0, DG0, DQ, DLAM, DGR, MODE, T, H, scale,
                   L: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                   HAS_G: tl.constexpr, PREC: tl.constexpr, NL: tl.constexpr, EXTRA: tl.constexpr,
                   BT: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BL: tl.constexpr):
    """dq, dλ and the row part of dG over a query tile, on top of DQ0, DL0, DG0 (the initial
    slots' parts); with EXTRA, the levels beyond the first NL go into DQ0, DL0, DG0 instead."""
    scale = tl.cast(scale, tl.float32)  # Inductor (torch 2.11) passed the float as fp64
    t0 = tl.program_id(0) * BT
    n = tl.program_id(1)
    if tl.load(MODE + n) != 0:  # an object row (objects_triton.py)
        return
    row0 = (n // H).to(tl.int64) * T * H + n % H
    Q += row0 * DK
    K += row0 * DK
    V += row0 * DV
    DO += row0 * DV
    LAM += row0 * L
    CM += row0 * L
    GH += row0
    GL += row0
    DQ0 += row0 * DK
    DL0 += row0 * L
    DG0 += row0
    DQ += row0 * DK
    DLAM += row0 * L
    DGR += row0
    t = t0 + tl.arange(0, BT)
    dk_ = tl.arange(0, BK)
    dv_ = tl.arange(0, BV)
    cols = tl.arange(0, BL)
    mt = t < T
    rt = t * H
    ml = mt[:, None] & (cols[None, :] < L)
    q_mask = _mask(mt, dk_, DK, BK)
    q = tl.load(Q + rt[:, None] * DK + dk_[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + rt[:, None] * DV + dv_[None, :], mask=_mask(mt, dv_, DV, BV), other=0.0)
    c = tl.load(CM + rt[:, None] * L + cols[None, :], mask=ml, other=NEG)
    if HAS_G:
        gh_ref = tl.load(GH + t0 * H)
        gl_ref = tl.load(GL + t0 * H)
        a = _rel_decay(GH, GL, rt, mt, gh_ref, gl_ref)
    else:
        gh_ref = 0.0
        gl_ref = 0.0
        a = tl.zeros([BT], dtype=tl.float32)
    dq = tl.load(DQ0 + rt[:, None] * DK + dk_[None, :], mask=q_mask, other=0.0)
    dl = tl.load(DL0 + rt[:, None] * L + cols[None, :], mask=ml, other=0.0)
    dg = tl.load(DG0 + rt, mask=mt, other=0.0)
    t_end = tl.minimum(t0 + BT, T)
    for s0 in range(0, t_end, BS):
        top, need = _row_levels(c, t, mt, s0, tl.minimum(s0 + BS, t_end) - 1)
        if EXTRA:
            most = tl.max(need)
            if most > NL:
                dq, dl, dg = _dq_tile(dq, dl, dg, q, do, t, mt, rt, a, K, V, CM, LAM, GH, GL, gh_ref, gl_ref, s0,
                                      t_end, top, NL, most, H, scale, L, DK, DV, HAS_G, PREC, False, NL,
                                      BT, BS, BK, BV, BL)
        else:
            dq, dl, dg = _dq_tile(dq, dl, dg, q, do, t, mt, rt, a, K, V, CM, LAM, GH, GL, gh_ref, gl_ref, s0, t_end,
                                  top, 0, NL, H, scale, L, DK, DV, HAS_G, PREC, True, NL, BT, BS, BK, BV, BL)
    if EXTRA:
        tl.store(DQ0 + rt[:, None] * DK + dk_[None, :], dq, mask=q_mask)
        tl.store(DL0 + rt[:, None] * L + cols[None, :], dl, mask=ml)
        tl.store(DG0 + rt, dg, mask=mt)
    else:
        tl.store(DQ + rt[:, None] * DK + dk_[None, :], dq.to(DQ.dtype.element_ty), mask=q_mask)
        tl.store(DLAM + rt[:, None] * L + cols[None, :], dl.to(DLAM.dtype.element_ty), mask=ml)
        tl.store(DGR + rt, dg, mask=mt)


@triton.jit
def _dkv_tile(dk, dv, dg, k, v, s, bs, Q, DO, CM, LAM, GH, GL, gh_ref, gl_ref, t, mt, rt, top, i0, i1, scale,
              L: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, HAS_G: tl.constexpr, PREC: tl.constexpr,
              UNROLL: tl.constexpr, NL: tl.constexpr,
              BT: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """dk, dv, dG columns + the query tile t for the levels top − i, i ∈ [i0, i1) per query;
    tiles laid out [BS (keys), BT (queries)]."""
    dk_ = tl.arange(0, BK)
    dv_ = tl.arange(0, BV)
    q = tl.load(Q + rt[:, None] * DK + dk_[None, :], mask=_mask(mt, dk_, DK, BK), other=0.0)
    do = tl.load(DO + rt[:, None] * DV + dv_[None, :], mask=_mask(mt, dv_, DV, BV), other=0.0)
    causal = (s[:, None] <= t[None, :]) & mt[None, :]
    if HAS_G:
        a = _rel_decay(GH, GL, rt, mt, gh_ref, gl_ref)
        decay = tl.where(causal, tl.exp(a[None, :] - bs[:, None]), 0.0) * scale
    else:
        decay = tl.where(causal, scale, 0.0)
    A = tl.dot(k, tl.trans(q), input_precision=PREC) * decay  # Aᵀ
    dp = tl.dot(v, tl.trans(do), input_precision=PREC)  # dPᵀ
    lamm = tl.zeros([BS, BT], dtype=tl.float32)
    if UNROLL:
        for i in tl.static_range(0, NL):
            inr, lr = _level_step(CM, LAM, rt, mt, top - i, s, L, True)
            lamm = tl.where(inr, lr, lamm)
    else:
        for i in range(i0, i1):
            inr, lr = _level_step(CM, LAM, rt, mt, top - i, s, L, True)
            lamm = tl.where(inr, lr, lamm)
    dv += tl.dot((A * lamm).to(do.dtype), do, input_precision=PREC)
    da = dp * lamm
    dg -= tl.sum(da * A, axis=1)
    dk += tl.dot((da * decay).to(q.dtype), q, input_precision=PREC)
    return dk, dv, dg


@triton.jit
def _bwd_dkv_kernel(Q, K, V, LAM, GH, GL, CM, DO, DK0, DV0, DG0, DK_, DV_, DGC, MODE, T, H, scale,
                    L: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                    HAS_G: tl.constexpr, PREC: tl.constexpr, NL: tl.constexpr, EXTRA: tl.constexpr,
                    BT: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BL: tl.constexpr):
    """dk, dv and the column part of dG over a key tile, on top of DK0, DV0, DG0 (the final
    states' parts); with EXTRA, the levels beyond the first NL go into DK0, DV0, DG0 instead."""
    scale = tl.cast(scale, tl.float32)  # Inductor (torch 2.11) passed the float as fp64
    s0 = tl.program_id(0) * BS
    n = tl.program_id(1)
    if tl.load(MODE + n) != 0:  # an object row (objects_triton.py)
        return
    row0 = (n // H).to(tl.int64) * T * H + n % H
    Q += row0 * DK
    K += row0 * DK
    V += row0 * DV
    DO += row0 * DV
    LAM += row0 * L
    CM += row0 * L
    GH += row0
    GL += row0
    DK0 += row0 * DK
    DV0 += row0 * DV
    DG0 += row0
    DK_ += row0 * DK
    DV_ += row0 * DV
    DGC += row0
    s = s0 + tl.arange(0, BS)
    dk_ = tl.arange(0, BK)
    dv_ = tl.arange(0, BV)
    cols = tl.arange(0, BL)
    ms = s < T
    rs = s * H
    k_mask = _mask(ms, dk_, DK, BK)
    v_mask = _mask(ms, dv_, DV, BV)
    k = tl.load(K + rs[:, None] * DK + dk_[None, :], mask=k_mask, other=0.0)
    v = tl.load(V + rs[:, None] * DV + dv_[None, :], mask=v_mask, other=0.0)
    if HAS_G:
        gh_ref = tl.load(GH + s0 * H)
        gl_ref = tl.load(GL + s0 * H)
        bs = _rel_decay(GH, GL, rs, ms, gh_ref, gl_ref)
    else:
        gh_ref = 0.0
        gl_ref = 0.0
        bs = tl.zeros([BS], dtype=tl.float32)
    dk = tl.load(DK0 + rs[:, None] * DK + dk_[None, :], mask=k_mask, other=0.0)
    dv = tl.load(DV0 + rs[:, None] * DV + dv_[None, :], mask=v_mask, other=0.0)
    dg = tl.load(DG0 + rs, mask=ms, other=0.0)
    s_last = tl.minimum(s0 + BS, T) - 1
    for t0 in range(s0, T, BT):
        t = t0 + tl.arange(0, BT)
        mt = t < T
        rt = t * H
        c = tl.load(CM + rt[:, None] * L + cols[None, :], mask=mt[:, None] & (cols[None, :] < L), other=NEG)
        top, need = _row_levels(c, t, mt, s0, s_last)
        if EXTRA:
            most = tl.max(need)
            if most > NL:
                dk, dv, dg = _dkv_tile(dk, dv, dg, k, v, s, bs, Q, DO, CM, LAM, GH, GL, gh_ref, gl_ref, t, mt, rt,
                                       top, NL, most, scale, L, DK, DV, HAS_G, PREC, False, NL, BT, BS, BK, BV)
        else:
            dk, dv, dg = _dkv_tile(dk, dv, dg, k, v, s, bs, Q, DO, CM, LAM, GH, GL, gh_ref, gl_ref, t, mt, rt, top,
                                   0, NL, scale, L, DK, DV, HAS_G, PREC, True, NL, BT, BS, BK, BV)
    if EXTRA:
        tl.store(DK0 + rs[:, None] * DK + dk_[None, :], dk, mask=k_mask)
        tl.store(DV0 + rs[:, None] * DV + dv_[None, :], dv, mask=v_mask)
        tl.store(DG0 + rs, dg, mask=ms)
    else:
        tl.store(DK_ + rs[:, None] * DK + dk_[None, :], dk.to(DK_.dtype.element_ty), mask=k_mask)
        tl.store(DV_ + rs[:, None] * DV + dv_[None, :], dv.to(DV_.dtype.element_ty), mask=v_mask)
        tl.store(DGC + rs, dg, mask=ms)


@triton.jit
def _bwd_ds0_kernel(Q, LAM, GH, GL, CM, S0, DO, DS, DS0, CARRY, MODE, T, H, scale,
                    L: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                    HAS_G: tl.constexpr, PREC32: tl.constexpr,
                    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BL: tl.constexpr):
    """dS0_r for one initial slot r and Dv tile; CARRY gets its part of dG_{T−1}."""
    scale = tl.cast(scale, tl.float32)  # Inductor (torch 2.11) passed the float as fp64
    r = tl.program_id(0)
    n = tl.program_id(1)
    if tl.load(MODE + n) != 0:  # an object row (objects_triton.py)
        return
    pv = tl.program_id(2)
    row0 = (n // H).to(tl.int64) * T * H + n % H
    Q += row0 * DK
    DO += row0 * DV
    LAM += row0 * L
    CM += row0 * L
    GH += row0
    GL += row0
    S0 += n.to(tl.int64) * L * DK * DV
    DS += n.to(tl.int64) * L * DK * DV
    DS0 += n.to(tl.int64) * L * DK * DV
    dk_ = tl.arange(0, BK)
    dv_ = pv * BV + tl.arange(0, BV)
    cols = tl.arange(0, BL)
    acc = tl.zeros([BK, BV], dtype=tl.float32)
    # segments only merge: a slot no level holds after the first token is never read
    c_first = tl.load(CM + cols, mask=cols < L, other=NEG)
    read = tl.sum((c_first > -1 - r).to(tl.int32), axis=0) < L
    for t0 in range(0, tl.where(read, T, 0), BT):
        t = t0 + tl.arange(0, BT)
        mt = t < T
        rt = t * H
        ml = mt[:, None] & (cols[None, :] < L)
        c = tl.load(CM + rt[:, None] * L + cols[None, :], mask=ml, other=NEG)
        lev = _level(c, -1 - r)
        live = mt & (lev < L)
        if tl.max(live.to(tl.int32)) > 0:
            lam = tl.load(LAM + rt[:, None] * L + cols[None, :], mask=ml, other=0.0).to(tl.float32)
            w = tl.where(live, _pick(lam, lev, BL), 0.0) * _u(GH, GL, rt, mt, scale, HAS_G, BT)
            q = tl.load(Q + rt[:, None] * DK + dk_[None, :], mask=_mask(mt, dk_, DK, BK), other=0.0)
            do = tl.load(DO + rt[:, None] * DV + dv_[None, :], mask=mt[:, None] & (dv_[None, :] < DV), other=0.0)
            acc += tl.dot(tl.trans(q.to(tl.float32) * w[:, None]), do.to(tl.float32), input_precision=PREC32)
    # the slot's carry into the final state S_{ℓ_{T−1}(−1−r)}
    last = (T - 1) * H
    c_last = tl.load(CM + last * L + cols, mask=cols < L, other=NEG)
    lev_last = tl.sum((c_last > -1 - r).to(tl.int32), axis=0)
    carry = 1.0
    if HAS_G:
        carry = tl.exp(tl.load(GH + last) + tl.load(GL + last))
    tile = dk_[:, None] * DV + dv_[None, :]
    m2 = _mask_kv(dk_, dv_, DK, DV)
    ds = tl.load(DS + tl.minimum(lev_last, L - 1) * DK * DV + tile, mask=m2 & (lev_last < L), other=0.0)
    s0r = tl.load(S0 + r * DK * DV + tile, mask=m2, other=0.0)
    acc += carry * ds
    tl.store(DS0 + r * DK * DV + tile, acc, mask=m2)
    tl.store(CARRY + (n * L + r) * tl.num_programs(2) + pv, carry * tl.sum(tl.sum(ds * s0r, axis=1), axis=0))


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _config(dk: int, dv: int, interpreted: bool) -> dict:
    """Fixed configs by head dims (the interpreter takes no autotuning), chosen so that no
    kernel spills registers on sm_90 (checked with ptxas). fwd/dq/dkv: the quadratic kernels'
    query tile BT, key tile BS and warps; NL: levels per row and tile they apply unrolled; AT:
    the state kernels' token tile, AV their Dv tile, BC the column chunk of the backward's
    state terms."""
    if interpreted:
        quad = dict(BT=16, BS=16, num_warps=4)
        return dict(fwd=quad, dq=quad, dkv=quad, NL=2, AT=16, AV=16, BC=16, num_warps=4, num_stages=1)
    bs = 64 if max(dk, dv) <= 64 else 32
    return dict(fwd=dict(BT=64, BS=bs, num_warps=8), dq=dict(BT=32, BS=bs, num_warps=8),
                dkv=dict(BT=32, BS=bs, num_warps=8), NL=2, AT=32, AV=32, BC=32, num_warps=8, num_stages=2)


def _precisions(dtype: torch.dtype, input_precision: str | None) -> tuple[str, str]:
    """(precision of the input-dtype dots, precision of the float32 state dots)."""
    if dtype == torch.float32:
        prec = input_precision or "ieee"
        return prec, prec
    return "tf32", "tf32"


def _check(name: str, q: Tensor, v: Tensor, lam: Tensor, beta: Tensor | None, input_precision: str | None) -> None:
    if beta is not None:
        raise NotImplementedError(f"{name}: beta (the delta rule) runs in dla.ops.readout.objects_delta_triton")
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"{name}: q must be float32, bfloat16 or float16, got {q.dtype} (float64 runs on the CPU path)")
    if input_precision not in (None, "ieee", "tf32", "tf32x3"):
        raise ValueError(f"{name}: input_precision must be None, 'ieee', 'tf32' or 'tf32x3', got {input_precision!r}")
    B, T, H, Dk = q.shape
    width = max(Dk, v.shape[-1], lam.shape[-1])
    if T * H * width >= 2**31:
        raise ValueError(f"{name}: T·H·max(Dk, Dv, K) = {T * H * width} must stay below 2**31 (int32 offsets)")


class _Prepared:
    """Contiguous inputs, the running minimum of the level map, the hi/lo split of G, the
    config and the constexpr arguments every kernel takes."""

    def __init__(self, q, k, v, lam, g, level_start, S0, input_precision):
        self.q, self.k, self.v, self.lam = (x.contiguous() for x in (q, k, v, lam))
        self.B, self.T, self.H, self.dk = q.shape
        self.dv, self.L = v.shape[-1], lam.shape[-1]
        self.N = self.B * self.H
        self.S0 = S0.to(torch.float32).contiguous()
        self.cm = running_min(level_start).to(torch.int32).contiguous()
        self.has_g = g is not None
        if self.has_g:
            G = cumsum(g.to(torch.float64), 1)
            self.gh = G.to(torch.float32)
            self.gl = (G - self.gh.to(torch.float64)).to(torch.float32)
        else:
            self.gh = self.gl = torch.zeros(1, dtype=torch.float32, device=q.device)  # never read
        self.BK, self.BV, self.BL = pow2(self.dk), pow2(self.dv), triton.next_power_of_2(self.L)
        self.interpreted = interpreting(q)
        self.cfg = _config(self.dk, self.dv, self.interpreted)
        self.prec, self.prec32 = _precisions(q.dtype, input_precision)
        self.dims = dict(L=self.L, DK=self.dk, DV=self.dv, HAS_G=self.has_g,
                         num_warps=self.cfg["num_warps"], num_stages=self.cfg["num_stages"])

    def meta(self, kernel: str) -> dict:
        """Meta-parameters (constexprs, num_warps, num_stages) of a kernel: the quadratic ones
        "fwd", "dq", "dkv" (plus EXTRA at launch) and "fwd_initial", "state", "bwd_initial",
        "bwd_final", "ds0"."""
        cfg = self.cfg
        if kernel in ("fwd", "dq", "dkv"):
            return {**self.dims, **cfg[kernel], "PREC": self.prec, "NL": cfg["NL"],
                    "BK": self.BK, "BV": self.BV, "BL": self.BL}
        av, bc = min(self.BV, cfg["AV"]), min(cfg["BC"], self.BK, self.BV)
        return {**self.dims, "BK": self.BK, **{
            "fwd_initial": dict(PREC32=self.prec32, BT=cfg["AT"], BV=av, BL=self.BL),
            "state": dict(PREC=self.prec, BS=cfg["AT"], BV=av),
            "bwd_initial": dict(PREC32=self.prec32, BT=cfg["AT"], BV=self.BV, BC=bc, BL=self.BL),
            "bwd_final": dict(PREC32=self.prec32, BS=cfg["AT"], BV=self.BV, BC=bc),
            "ds0": dict(PREC32=self.prec32, BT=cfg["AT"], BV=av, BL=self.BL),
        }[kernel]}

    def empty(self, *shape, dtype=torch.float32):
        return torch.empty(*shape, dtype=dtype, device=self.q.device)

    def all_dense(self) -> Tensor:
        """The row mode of a call without object rows."""
        return torch.zeros(self.N, dtype=torch.int32, device=self.q.device)

    def gradients(self, q, k, v, lam) -> dict:
        """Fresh gradient buffers, in the inputs' dtypes (dS0 float32)."""
        return {"dq": self.empty(*q.shape, dtype=q.dtype), "dk": self.empty(*k.shape, dtype=k.dtype),
                "dv": self.empty(*v.shape, dtype=v.dtype), "dlam": self.empty(*lam.shape, dtype=lam.dtype),
                "dS0": self.empty(self.B, self.H, self.L, self.dk, self.dv)}


def masked_forward(q, k, v, lam, g, beta, level_start, S0, scale: float, chunk_size: int,
                   *, input_precision: str | None = None) -> tuple[Tensor, Tensor]:
    """`(o [B,T,H,Dv] in q's dtype, S [B,H,K,Dk,Dv] float32)`; see the module doc.
    `chunk_size` is accepted for schema parity (the quadratic form has no chunks)."""
    _check("masked_forward", q, v, lam, beta, input_precision)
    x = _Prepared(q, k, v, lam, g, level_start, S0, input_precision)
    if x.T == 0:
        return q.new_empty(x.B, 0, x.H, x.dv), x.S0.clone()
    o, S = x.empty(x.B, x.T, x.H, x.dv, dtype=q.dtype), x.empty(x.B, x.H, x.L, x.dk, x.dv)
    dense_forward(x, x.all_dense(), scale, o, S)
    return o, S


def dense_forward(x: "_Prepared", mode: Tensor, scale: float, o: Tensor, S: Tensor) -> None:
    """The dense rows (`mode[n] = 0`, `n = b·H + h`) of `o` and `S`."""
    B, T, H, L, N, dv = x.B, x.T, x.H, x.L, x.N, x.dv
    scale = float(scale)
    m = x.meta("fwd_initial")
    o0 = x.empty(B, T, H, dv)
    wrap_triton(_fwd_initial_kernel)[(triton.cdiv(T, m["BT"]), N, triton.cdiv(dv, m["BV"]))](
        x.q, x.lam, x.gh, x.gl, x.cm, x.S0, o0, mode, T, H, scale, **m)
    m = x.meta("fwd")
    for extra in (True, False):  # the levels beyond NL per tile first, into o0
        wrap_triton(_fwd_kernel)[(triton.cdiv(T, m["BT"]), N)](
            x.q, x.k, x.v, x.lam, x.gh, x.gl, x.cm, o0, o, mode, T, H, scale, EXTRA=extra, **m)
    m = x.meta("state")
    wrap_triton(_state_kernel)[(L, N, triton.cdiv(dv, m["BV"]))](x.k, x.v, x.gh, x.gl, x.cm, x.S0, S, mode, T, H, **m)


def masked_backward(do, dS, q, k, v, lam, g, beta, level_start, S0, scale: float, chunk_size: int,
                    *, input_precision: str | None = None):
    """`(dq, dk, dv, dlam, dg, dbeta, dS0)`, shaped and typed like the inputs; `dg`/`dbeta` are
    float32 zeros `[B,T,H]` when `g`/`beta` is absent. `do` or `dS` may be None (zero)."""
    _check("masked_backward", q, v, lam, beta, input_precision)
    x = _Prepared(q, k, v, lam, g, level_start, S0, input_precision)
    B, T, H, L, dk, dv = x.B, x.T, x.H, x.L, x.dk, x.dv
    dev, f32 = q.device, torch.float32
    do = torch.zeros(B, T, H, dv, dtype=q.dtype, device=dev) if do is None else do.to(q.dtype).contiguous()
    dS = torch.zeros(B, H, L, dk, dv, dtype=f32, device=dev) if dS is None else dS.to(f32).contiguous()
    dbeta = torch.zeros(B, T, H, dtype=f32, device=dev)
    if T == 0:
        dg = torch.zeros(B, 0, H, dtype=g.dtype if g is not None else f32, device=dev)
        return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), lam.new_empty(lam.shape),
                dg, dbeta, dS.to(S0.dtype).clone())
    grads = x.gradients(q, k, v, lam)
    dG = dense_backward(x, x.all_dense(), scale, do, dS, grads)
    dg = reverse_cumsum(dG, g.dtype) if g is not None else torch.zeros(B, T, H, dtype=f32, device=dev)
    return grads["dq"], grads["dk"], grads["dv"], grads["dlam"], dg, dbeta, grads["dS0"].to(S0.dtype)


def reverse_cumsum(dG: Tensor, dtype) -> Tensor:
    """dg_u = Σ_{t≥u} dG_t over `[B, T, H]` (float64: T terms of either sign)."""
    return cumsum(dG.double(), 1, reverse=True).to(dtype)


def dense_backward(x: "_Prepared", mode: Tensor, scale: float, do: Tensor, dS: Tensor, grads: dict) -> Tensor:
    """The dense rows of `grads` (dq, dk, dv, dlam, dS0) and of the returned `dG [B,T,H]` (float64,
    the gradient of `G = cumsum(g)`); `do` contiguous in q's dtype, `dS` float32."""
    B, T, H, L, N, dk, dv = x.B, x.T, x.H, x.L, x.N, x.dk, x.dv
    scale = float(scale)
    # the initial slots' and final states' terms, into float32 buffers the quadratic kernels
    # start from (the levels beyond NL per tile are added to them first)
    m = x.meta("bwd_initial")
    dq0, dl0, dg0 = x.empty(B, T, H, dk), x.empty(B, T, H, L), x.empty(B, T, H)
    wrap_triton(_bwd_initial_kernel)[(triton.cdiv(T, m["BT"]), N)](
        x.q, x.lam, x.gh, x.gl, x.cm, x.S0, do, dq0, dl0, dg0, mode, T, H, scale, **m)
    m = x.meta("bwd_final")
    dk0, dv0, dgc0, fin = x.empty(B, T, H, dk), x.empty(B, T, H, dv), x.empty(B, T, H), x.empty(B, T, H)
    wrap_triton(_bwd_final_kernel)[(triton.cdiv(T, m["BS"]), N, 2)](
        x.k, x.v, x.gh, x.gl, x.cm, dS, dk0, dv0, dgc0, fin, mode, T, H, **m)
    mq, mkv = x.meta("dq"), x.meta("dkv")
    dg_row, dg_col = x.empty(B, T, H), x.empty(B, T, H)
    for extra in (True, False):
        wrap_triton(_bwd_dq_kernel)[(triton.cdiv(T, mq["BT"]), N)](
            x.q, x.k, x.v, x.lam, x.gh, x.gl, x.cm, do, dq0, dl0, dg0, grads["dq"], grads["dlam"], dg_row, mode, T,
            H, scale, EXTRA=extra, **mq)
        wrap_triton(_bwd_dkv_kernel)[(triton.cdiv(T, mkv["BS"]), N)](
            x.q, x.k, x.v, x.lam, x.gh, x.gl, x.cm, do, dk0, dv0, dgc0, grads["dk"], grads["dv"], dg_col, mode, T,
            H, scale, EXTRA=extra, **mkv)
    m = x.meta("ds0")
    nv = triton.cdiv(dv, m["BV"])
    carry = x.empty(N, L, nv)
    wrap_triton(_bwd_ds0_kernel)[(L, N, nv)](
        x.q, x.lam, x.gh, x.gl, x.cm, x.S0, do, dS, grads["dS0"], carry, mode, T, H, scale, **m)
    dG = dg_row.double() + dg_col
    dense = (mode == 0).view(B, H)
    dG[:, -1] += torch.where(dense, fin.sum(1) + carry.sum((1, 2)).view(B, H), 0.0)
    return dG
