r"""CUDA kernels of `dla::readout` and `dla::readout_backward` (SCHEMAS.md) for transitions
without `β` (none, or scalar decay `g`): the flash-style masked quadratic form of SPEC §2, no
softmax. Same signatures and outputs as the CPU kernels in `dla.ops.readout`.

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

Kernels: `_fwd_kernel` (query tiles: `o`), `_state_kernel` (one program per level and `Dv`
tile: `S`, reading only that level's token range), `_bwd_dq_kernel` (query tiles: `dq`, `dλ`,
row part of `dG`), `_bwd_dkv_kernel` (key tiles: `dk`, `dv`, column and final-state parts of
`dG`), `_bwd_ds0_kernel` (one program per initial slot and `Dv` tile: `dS0`). A `[BT, BS]` tile
builds `Λ` from the levels its rows can reach there only, `ℓ_t(min(t, s_last)) ≤ r ≤
ℓ_t(s_first)` — one or two for far tiles of every policy. Cost `(T/2)(Dk + Dv)` per query and
pass, plus `K·Dk·Dv` per token for the initial slots when a call carries a state.

Numerics: `G` is the float64 cumsum split into float32 `hi + lo`, and every `G_t − G_s` is
formed as `(hi_t − hi_r) + (lo_t − lo_r)` against a tile reference `r`, so decays keep float32
accuracy over long sequences. Products accumulate in float32; 16-bit inputs multiply in their
own dtype (the `A ⊙ Λ` and `dA ⊙ Γ` tiles are rounded to it, as in FlashAttention), state terms
(`S0`, `dS`) in float32 with TF32. float32 inputs use `input_precision` (`"ieee"` by default;
`"tf32"`, `"tf32x3"` selectable). float64 is the CPU path's.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["readout_forward_triton", "readout_backward_triton"]

NEG = -(2**30)  # running-minimum padding beyond L: ≤ every position, so never counted


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _interpreter_range_fix() -> None:
    """Triton 3.6's interpreter turns a runtime scalar into a 1-element array and `range()`
    calls `int()` on it, which numpy ≥ 2.4 refuses (triton#9171, fixed upstream by #9172). The
    kernels keep `for` loops over runtime bounds, which the GPU compiler pipelines."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "dla_range_fix", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched.dla_range_fix = True
    interpreter._patch_lang_tensor = patched


if _interpreting():
    _interpreter_range_fix()


# --------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------


@triton.jit
def _level(c, p):
    """ℓ_t(p_t) for each row of the running minimum `c [R, BL]`: p is [R] or a scalar."""
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
def _level_range(c, t, mt, s_first, s_last, L):
    """Levels that pairs (t, s), s_first ≤ s ≤ min(t, s_last), of a tile can sit at."""
    rows = mt & (t >= s_first)
    r_hi = tl.minimum(tl.max(tl.where(rows, _level(c, s_first), 0)), L - 1)
    r_lo = tl.min(tl.where(rows, _level(c, tl.minimum(t, s_last)[:, None]), L))
    return r_lo, r_hi


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------


@triton.jit
def _fwd_kernel(Q, K, V, LAM, GH, GL, CM, S0, O, T, H, L, DK, DV, scale,
                HAS_G: tl.constexpr, PREC: tl.constexpr, PREC32: tl.constexpr,
                BT: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BL: tl.constexpr):
    t0 = tl.program_id(0) * BT
    n = tl.program_id(1)
    b, h = n // H, n % H
    bT = b.to(tl.int64) * T
    t = t0 + tl.arange(0, BT)
    dk_ = tl.arange(0, BK)
    dv_ = tl.arange(0, BV)
    cols = tl.arange(0, BL)
    mt = t < T
    rt = (bT + t) * H + h
    mk = dk_ < DK
    mv = dv_ < DV
    q = tl.load(Q + rt[:, None] * DK + dk_[None, :], mask=mt[:, None] & mk[None, :], other=0.0)
    ml = mt[:, None] & (cols[None, :] < L)
    c = tl.load(CM + rt[:, None] * L + cols[None, :], mask=ml, other=NEG)
    if HAS_G:
        ref = (bT + t0) * H + h
        gh_ref = tl.load(GH + ref)
        gl_ref = tl.load(GL + ref)
        a = _rel_decay(GH, GL, rt, mt, gh_ref, gl_ref)
    acc = tl.zeros([BT, BV], dtype=tl.float32)
    t_end = tl.minimum(t0 + BT, T)
    for s0 in range(0, t_end, BS):
        s = s0 + tl.arange(0, BS)
        ms = s < t_end
        rs = (bT + s) * H + h
        k = tl.load(K + rs[:, None] * DK + dk_[None, :], mask=ms[:, None] & mk[None, :], other=0.0)
        v = tl.load(V + rs[:, None] * DV + dv_[None, :], mask=ms[:, None] & mv[None, :], other=0.0)
        causal = s[None, :] <= t[:, None]
        if HAS_G:
            bs = -_rel_decay(GH, GL, rs, ms, gh_ref, gl_ref)
            decay = tl.where(causal, tl.exp(a[:, None] + bs[None, :]), 0.0)
        else:
            decay = tl.where(causal, 1.0, 0.0)
        r_lo, r_hi = _level_range(c, t, mt, s0, tl.minimum(s0 + BS, t_end) - 1, L)
        lamm = tl.zeros([BT, BS], dtype=tl.float32)
        for i in range(0, r_hi - r_lo + 1):
            r = r_hi - i
            cr = tl.load(CM + rt * L + r, mask=mt, other=NEG)
            lr = tl.load(LAM + rt * L + r, mask=mt, other=0.0).to(tl.float32)
            lamm = tl.where(cr[:, None] <= s[None, :], lr[:, None], lamm)
        p = tl.dot(q, tl.trans(k), input_precision=PREC) * (decay * lamm * scale)
        acc += tl.dot(p.to(v.dtype), v, input_precision=PREC)
    # initial slots at pseudo-positions −1 − r
    u = tl.full([BT], scale, tl.float32)
    if HAS_G:
        u = u * tl.exp(tl.load(GH + rt, mask=mt, other=0.0) + tl.load(GL + rt, mask=mt, other=0.0))
    qu = q.to(tl.float32) * u[:, None]
    lam = tl.load(LAM + rt[:, None] * L + cols[None, :], mask=ml, other=0.0).to(tl.float32)
    for r in range(0, L):
        lev = _level(c, -1 - r)
        live = mt & (lev < L)
        if tl.max(live.to(tl.int32)) > 0:
            w = tl.where(live, _pick(lam, lev, BL), 0.0)
            s0r = tl.load(S0 + ((n.to(tl.int64) * L + r) * DK + dk_[:, None]) * DV + dv_[None, :],
                          mask=mk[:, None] & mv[None, :], other=0.0)
            acc += tl.dot(qu * w[:, None], s0r, input_precision=PREC32)
    tl.store(O + rt[:, None] * DV + dv_[None, :], acc.to(O.dtype.element_ty), mask=mt[:, None] & mv[None, :])


@triton.jit
def _state_kernel(K, V, GH, GL, CM, S0, S, T, H, L, DK, DV,
                  HAS_G: tl.constexpr, PREC: tl.constexpr,
                  BS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    r = tl.program_id(0)
    n = tl.program_id(1)
    v0 = tl.program_id(2) * BV
    b, h = n // H, n % H
    bT = b.to(tl.int64) * T
    dk_ = tl.arange(0, BK)
    dv_ = v0 + tl.arange(0, BV)
    mk = dk_ < DK
    mv = dv_ < DV
    last = (bT + T - 1) * H + h
    lo = tl.load(CM + last * L + r)
    hi = tl.load(CM + last * L + tl.maximum(r - 1, 0))
    hi = tl.where(r > 0, hi, 2**31 - 1)
    if HAS_G:
        gh_last = tl.load(GH + last)
        gl_last = tl.load(GL + last)
    acc = tl.zeros([BK, BV], dtype=tl.float32)
    for s0 in range(tl.maximum(lo, 0), tl.minimum(hi, T), BS):
        s = s0 + tl.arange(0, BS)
        ms = s < tl.minimum(hi, T)
        rs = (bT + s) * H + h
        k = tl.load(K + rs[:, None] * DK + dk_[None, :], mask=ms[:, None] & mk[None, :], other=0.0)
        v = tl.load(V + rs[:, None] * DV + dv_[None, :], mask=ms[:, None] & mv[None, :], other=0.0)
        if HAS_G:
            rho = tl.exp(-_rel_decay(GH, GL, rs, ms, gh_last, gl_last))
            k = (k.to(tl.float32) * rho[:, None]).to(v.dtype)
        acc += tl.dot(tl.trans(k), v, input_precision=PREC)
    carry = 1.0
    if HAS_G:
        carry = tl.exp(gh_last + gl_last)
    for p in range(tl.maximum(lo, -L), tl.minimum(hi, 0)):
        s0r = tl.load(S0 + ((n.to(tl.int64) * L + (-1 - p)) * DK + dk_[:, None]) * DV + dv_[None, :],
                      mask=mk[:, None] & mv[None, :], other=0.0)
        acc += carry * s0r
    tl.store(S + ((n.to(tl.int64) * L + r) * DK + dk_[:, None]) * DV + dv_[None, :], acc,
             mask=mk[:, None] & mv[None, :])


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------


@triton.jit
def _bwd_dq_kernel(Q, K, V, LAM, GH, GL, CM, S0, DO, DQ, DLAM, DGR, T, H, L, DK, DV, scale,
                   HAS_G: tl.constexpr, PREC: tl.constexpr, PREC32: tl.constexpr,
                   BT: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BL: tl.constexpr):
    t0 = tl.program_id(0) * BT
    n = tl.program_id(1)
    b, h = n // H, n % H
    bT = b.to(tl.int64) * T
    t = t0 + tl.arange(0, BT)
    dk_ = tl.arange(0, BK)
    dv_ = tl.arange(0, BV)
    cols = tl.arange(0, BL)
    mt = t < T
    rt = (bT + t) * H + h
    mk = dk_ < DK
    mv = dv_ < DV
    q = tl.load(Q + rt[:, None] * DK + dk_[None, :], mask=mt[:, None] & mk[None, :], other=0.0)
    do = tl.load(DO + rt[:, None] * DV + dv_[None, :], mask=mt[:, None] & mv[None, :], other=0.0)
    ml = mt[:, None] & (cols[None, :] < L)
    c = tl.load(CM + rt[:, None] * L + cols[None, :], mask=ml, other=NEG)
    if HAS_G:
        ref = (bT + t0) * H + h
        gh_ref = tl.load(GH + ref)
        gl_ref = tl.load(GL + ref)
        a = _rel_decay(GH, GL, rt, mt, gh_ref, gl_ref)
    dq = tl.zeros([BT, BK], dtype=tl.float32)
    dl = tl.zeros([BT, BL], dtype=tl.float32)
    dg = tl.zeros([BT], dtype=tl.float32)
    t_end = tl.minimum(t0 + BT, T)
    for s0 in range(0, t_end, BS):
        s = s0 + tl.arange(0, BS)
        ms = s < t_end
        rs = (bT + s) * H + h
        k = tl.load(K + rs[:, None] * DK + dk_[None, :], mask=ms[:, None] & mk[None, :], other=0.0)
        v = tl.load(V + rs[:, None] * DV + dv_[None, :], mask=ms[:, None] & mv[None, :], other=0.0)
        causal = s[None, :] <= t[:, None]
        if HAS_G:
            bs = -_rel_decay(GH, GL, rs, ms, gh_ref, gl_ref)
            decay = tl.where(causal, tl.exp(a[:, None] + bs[None, :]), 0.0) * scale
        else:
            decay = tl.where(causal, scale, 0.0)
        A = tl.dot(q, tl.trans(k), input_precision=PREC) * decay
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        adp = A * dp
        r_lo, r_hi = _level_range(c, t, mt, s0, tl.minimum(s0 + BS, t_end) - 1, L)
        lamm = tl.zeros([BT, BS], dtype=tl.float32)
        above = tl.full([BT], 2**31 - 1, tl.int32)  # c[t, r − 1] (+∞ for r = 0)
        if r_lo > 0:
            above = tl.load(CM + rt * L + r_lo - 1, mask=mt, other=NEG)
        for r in range(r_lo, r_hi + 1):
            cr = tl.load(CM + rt * L + r, mask=mt, other=NEG)
            lr = tl.load(LAM + rt * L + r, mask=mt, other=0.0).to(tl.float32)
            inr = (cr[:, None] <= s[None, :]) & (above[:, None] > s[None, :])
            lamm = tl.where(inr, lr[:, None], lamm)
            part = tl.sum(tl.where(inr, adp, 0.0), axis=1)
            dl += tl.where(cols[None, :] == r, part[:, None], 0.0)
            above = cr
        da = dp * lamm
        dg += tl.sum(da * A, axis=1)
        dq += tl.dot((da * decay).to(k.dtype), k, input_precision=PREC)
    # initial slots
    u = tl.full([BT], scale, tl.float32)
    if HAS_G:
        u = u * tl.exp(tl.load(GH + rt, mask=mt, other=0.0) + tl.load(GL + rt, mask=mt, other=0.0))
    lam = tl.load(LAM + rt[:, None] * L + cols[None, :], mask=ml, other=0.0).to(tl.float32)
    qf = q.to(tl.float32)
    dof = do.to(tl.float32)
    for r in range(0, L):
        lev = _level(c, -1 - r)
        live = mt & (lev < L)
        if tl.max(live.to(tl.int32)) > 0:
            w = tl.where(live, _pick(lam, lev, BL), 0.0)
            s0r = tl.load(S0 + ((n.to(tl.int64) * L + r) * DK + dk_[:, None]) * DV + dv_[None, :],
                          mask=mk[:, None] & mv[None, :], other=0.0)
            x = tl.dot(dof, tl.trans(s0r), input_precision=PREC32)  # [BT, BK]
            dw = tl.where(live, tl.sum(x * qf, axis=1) * u, 0.0)
            dl += tl.where(cols[None, :] == lev[:, None], dw[:, None], 0.0)
            dq += x * (w * u)[:, None]
            dg += w * dw
    tl.store(DQ + rt[:, None] * DK + dk_[None, :], dq.to(DQ.dtype.element_ty), mask=mt[:, None] & mk[None, :])
    tl.store(DLAM + rt[:, None] * L + cols[None, :], dl.to(DLAM.dtype.element_ty), mask=ml)
    tl.store(DGR + rt, dg, mask=mt)


@triton.jit
def _bwd_dkv_kernel(Q, K, V, LAM, GH, GL, CM, DO, DS, DK_, DV_, DGC, FIN, T, H, L, DK, DV, scale,
                    HAS_G: tl.constexpr, PREC: tl.constexpr, PREC32: tl.constexpr,
                    BT: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BL: tl.constexpr):
    """Key-major, tiles laid out [BS (keys), BT (queries)]."""
    s0 = tl.program_id(0) * BS
    n = tl.program_id(1)
    b, h = n // H, n % H
    bT = b.to(tl.int64) * T
    s = s0 + tl.arange(0, BS)
    dk_ = tl.arange(0, BK)
    dv_ = tl.arange(0, BV)
    cols = tl.arange(0, BL)
    ms = s < T
    rs = (bT + s) * H + h
    mk = dk_ < DK
    mv = dv_ < DV
    k = tl.load(K + rs[:, None] * DK + dk_[None, :], mask=ms[:, None] & mk[None, :], other=0.0)
    v = tl.load(V + rs[:, None] * DV + dv_[None, :], mask=ms[:, None] & mv[None, :], other=0.0)
    if HAS_G:
        ref = (bT + s0) * H + h
        gh_ref = tl.load(GH + ref)
        gl_ref = tl.load(GL + ref)
        bs = -_rel_decay(GH, GL, rs, ms, gh_ref, gl_ref)
    dk = tl.zeros([BS, BK], dtype=tl.float32)
    dv = tl.zeros([BS, BV], dtype=tl.float32)
    dg = tl.zeros([BS], dtype=tl.float32)
    s_last = tl.minimum(s0 + BS, T) - 1
    for t0 in range(s0, T, BT):
        t = t0 + tl.arange(0, BT)
        mt = t < T
        rt = (bT + t) * H + h
        q = tl.load(Q + rt[:, None] * DK + dk_[None, :], mask=mt[:, None] & mk[None, :], other=0.0)
        do = tl.load(DO + rt[:, None] * DV + dv_[None, :], mask=mt[:, None] & mv[None, :], other=0.0)
        c = tl.load(CM + rt[:, None] * L + cols[None, :], mask=mt[:, None] & (cols[None, :] < L), other=NEG)
        causal = (s[:, None] <= t[None, :]) & mt[None, :]
        if HAS_G:
            a = _rel_decay(GH, GL, rt, mt, gh_ref, gl_ref)
            decay = tl.where(causal, tl.exp(bs[:, None] + a[None, :]), 0.0) * scale
        else:
            decay = tl.where(causal, scale, 0.0)
        A = tl.dot(k, tl.trans(q), input_precision=PREC) * decay  # Aᵀ [BS, BT]
        dp = tl.dot(v, tl.trans(do), input_precision=PREC)  # dPᵀ
        r_lo, r_hi = _level_range(c, t, mt, s0, s_last, L)
        lamm = tl.zeros([BS, BT], dtype=tl.float32)
        for i in range(0, r_hi - r_lo + 1):
            r = r_hi - i
            cr = tl.load(CM + rt * L + r, mask=mt, other=NEG)
            lr = tl.load(LAM + rt * L + r, mask=mt, other=0.0).to(tl.float32)
            lamm = tl.where(cr[None, :] <= s[:, None], lr[None, :], lamm)
        dv += tl.dot((A * lamm).to(do.dtype), do, input_precision=PREC)
        da = dp * lamm
        dg -= tl.sum(da * A, axis=1)
        dk += tl.dot((da * decay).to(q.dtype), q, input_precision=PREC)
    # final slot states: token s joins the slot of rank ℓ_{T−1}(s), carried by ρ_s
    last = (bT + T - 1) * H + h
    c_last = tl.load(CM + last * L + cols, mask=cols < L, other=NEG)
    lev = tl.sum((c_last[None, :] > s[:, None]).to(tl.int32), axis=1)
    rho = tl.where(ms & (lev < L), 1.0, 0.0)
    if HAS_G:
        rho = rho * tl.exp(-_rel_decay(GH, GL, rs, ms, tl.load(GH + last), tl.load(GL + last)))
    kf = k.to(tl.float32)
    vf = v.to(tl.float32)
    fin = tl.zeros([BS], dtype=tl.float32)
    r_lo = tl.min(tl.where(ms, lev, L))
    r_hi = tl.minimum(tl.max(tl.where(ms, lev, 0)), L - 1)
    for r in range(r_lo, r_hi + 1):
        ds = tl.load(DS + ((n.to(tl.int64) * L + r) * DK + dk_[:, None]) * DV + dv_[None, :],
                     mask=mk[:, None] & mv[None, :], other=0.0)
        coef = tl.where(lev == r, rho, 0.0)
        dkf = tl.dot(vf, tl.trans(ds), input_precision=PREC32) * coef[:, None]
        dv += tl.dot(kf, ds, input_precision=PREC32) * coef[:, None]
        dk += dkf
        fin += tl.sum(dkf * kf, axis=1)
    tl.store(DK_ + rs[:, None] * DK + dk_[None, :], dk.to(DK_.dtype.element_ty), mask=ms[:, None] & mk[None, :])
    tl.store(DV_ + rs[:, None] * DV + dv_[None, :], dv.to(DV_.dtype.element_ty), mask=ms[:, None] & mv[None, :])
    tl.store(DGC + rs, dg - fin, mask=ms)
    tl.store(FIN + rs, fin, mask=ms)


@triton.jit
def _bwd_ds0_kernel(Q, LAM, GH, GL, CM, S0, DO, DS, DS0, CARRY, T, H, L, DK, DV, scale,
                    HAS_G: tl.constexpr, PREC32: tl.constexpr,
                    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BL: tl.constexpr):
    r = tl.program_id(0)
    n = tl.program_id(1)
    pv = tl.program_id(2)
    b, h = n // H, n % H
    bT = b.to(tl.int64) * T
    dk_ = tl.arange(0, BK)
    dv_ = pv * BV + tl.arange(0, BV)
    cols = tl.arange(0, BL)
    mk = dk_ < DK
    mv = dv_ < DV
    acc = tl.zeros([BK, BV], dtype=tl.float32)
    for t0 in range(0, T, BT):
        t = t0 + tl.arange(0, BT)
        mt = t < T
        rt = (bT + t) * H + h
        ml = mt[:, None] & (cols[None, :] < L)
        c = tl.load(CM + rt[:, None] * L + cols[None, :], mask=ml, other=NEG)
        lev = _level(c, -1 - r)
        live = mt & (lev < L)
        if tl.max(live.to(tl.int32)) > 0:
            lam = tl.load(LAM + rt[:, None] * L + cols[None, :], mask=ml, other=0.0).to(tl.float32)
            w = tl.where(live, _pick(lam, lev, BL), 0.0) * scale
            if HAS_G:
                w = w * tl.exp(tl.load(GH + rt, mask=mt, other=0.0) + tl.load(GL + rt, mask=mt, other=0.0))
            q = tl.load(Q + rt[:, None] * DK + dk_[None, :], mask=mt[:, None] & mk[None, :], other=0.0)
            do = tl.load(DO + rt[:, None] * DV + dv_[None, :], mask=mt[:, None] & mv[None, :], other=0.0)
            acc += tl.dot(tl.trans(q.to(tl.float32) * w[:, None]), do.to(tl.float32), input_precision=PREC32)
    # the slot's carry into the final state S_{ℓ_{T−1}(−1−r)}
    last = (bT + T - 1) * H + h
    c_last = tl.load(CM + last * L + cols, mask=cols < L, other=NEG)
    lev_last = tl.sum((c_last > -1 - r).to(tl.int32), axis=0)
    carry = 1.0
    if HAS_G:
        carry = tl.exp(tl.load(GH + last) + tl.load(GL + last))
    tile = (dk_[:, None] * DV + dv_[None, :])
    m2 = mk[:, None] & mv[None, :]
    ds = tl.load(DS + (n.to(tl.int64) * L + tl.minimum(lev_last, L - 1)) * DK * DV + tile,
                 mask=m2 & (lev_last < L), other=0.0)
    s0r = tl.load(S0 + (n.to(tl.int64) * L + r) * DK * DV + tile, mask=m2, other=0.0)
    acc += carry * ds
    tl.store(DS0 + (n.to(tl.int64) * L + r) * DK * DV + tile, acc, mask=m2)
    tl.store(CARRY + (n * L + r) * tl.num_programs(2) + pv, carry * tl.sum(tl.sum(ds * s0r, axis=1), axis=0))


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _config(dk: int, dv: int) -> dict:
    """Tile sizes by head dims (fixed configs: the interpreter takes no autotuning)."""
    if _interpreting():
        return dict(BT=16, BS=16, num_warps=4, num_stages=1)
    if max(dk, dv) <= 64:
        return dict(BT=64, BS=64, num_warps=4, num_stages=2)
    return dict(BT=64, BS=32, num_warps=4, num_stages=2)


def _pow2(x: int) -> int:
    return max(16, triton.next_power_of_2(x))


def _precisions(dtype: torch.dtype, input_precision: str | None) -> tuple[str, str]:
    """(precision of the input-dtype dots, precision of the float32 state dots)."""
    if dtype == torch.float32:
        prec = input_precision or "ieee"
        return prec, prec
    return "tf32", "tf32"


def _check(name: str, q: Tensor, beta: Tensor | None) -> None:
    if beta is not None:
        raise NotImplementedError(f"{name}: beta (the delta rule) is not implemented in Triton yet (issue #5)")
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"{name}: q must be float32, bfloat16 or float16, got {q.dtype} (float64 runs on the CPU path)")


class _Prepared:
    """Contiguous inputs, the running minimum of the level map and the hi/lo split of G."""

    def __init__(self, q, k, v, lam, g, level_start, S0):
        self.q, self.k, self.v, self.lam = (x.contiguous() for x in (q, k, v, lam))
        self.B, self.T, self.H, self.dk = q.shape
        self.dv, self.L = v.shape[-1], lam.shape[-1]
        self.S0 = S0.to(torch.float32).contiguous()
        self.cm = torch.cummin(level_start.contiguous(), dim=-1).values.to(torch.int32).contiguous()
        self.has_g = g is not None
        if self.has_g:
            G = g.contiguous().to(torch.float64).cumsum(1)
            self.gh = G.to(torch.float32)
            self.gl = (G - self.gh.to(torch.float64)).to(torch.float32)
        else:
            self.gh = self.gl = self.q  # never read
        self.BK, self.BV, self.BL = _pow2(self.dk), _pow2(self.dv), triton.next_power_of_2(self.L)


def readout_forward_triton(q, k, v, lam, g, beta, level_start, S0, scale: float, chunk_size: int,
                           *, input_precision: str | None = None) -> tuple[Tensor, Tensor]:
    """`(o [B,T,H,Dv] in q's dtype, S [B,H,K,Dk,Dv] float32)`; see the module doc.
    `chunk_size` is accepted for schema parity (the quadratic form has no chunks)."""
    _check("readout_forward_triton", q, beta)
    x = _Prepared(q, k, v, lam, g, level_start, S0)
    B, T, H, L = x.B, x.T, x.H, x.L
    if T == 0:
        return q.new_empty(B, 0, H, x.dv), x.S0.clone()
    cfg = _config(x.dk, x.dv)
    prec, prec32 = _precisions(q.dtype, input_precision)
    o = torch.empty(B, T, H, x.dv, dtype=q.dtype, device=q.device)
    _fwd_kernel[(triton.cdiv(T, cfg["BT"]), B * H)](
        x.q, x.k, x.v, x.lam, x.gh, x.gl, x.cm, x.S0, o, T, H, L, x.dk, x.dv, float(scale),
        HAS_G=x.has_g, PREC=prec, PREC32=prec32, BT=cfg["BT"], BS=cfg["BS"], BK=x.BK, BV=x.BV, BL=x.BL,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    S = torch.empty(B, H, L, x.dk, x.dv, dtype=torch.float32, device=q.device)
    bv = min(x.BV, 64)
    _state_kernel[(L, B * H, triton.cdiv(x.dv, bv))](
        x.k, x.v, x.gh, x.gl, x.cm, x.S0, S, T, H, L, x.dk, x.dv,
        HAS_G=x.has_g, PREC=prec, BS=cfg["BS"], BK=x.BK, BV=bv,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return o, S


def readout_backward_triton(do, dS, q, k, v, lam, g, beta, level_start, S0, scale: float, chunk_size: int,
                            *, input_precision: str | None = None):
    """`(dq, dk, dv, dlam, dg, dbeta, dS0)`, shaped and typed like the inputs; `dg`/`dbeta` are
    float32 zeros `[B,T,H]` when `g`/`beta` is absent. `do` or `dS` may be None (zero)."""
    _check("readout_backward_triton", q, beta)
    x = _Prepared(q, k, v, lam, g, level_start, S0)
    B, T, H, L, dk, dv = x.B, x.T, x.H, x.L, x.dk, x.dv
    dev = q.device
    f32 = torch.float32
    do = torch.zeros(B, T, H, dv, dtype=q.dtype, device=dev) if do is None else do.to(q.dtype).contiguous()
    dS = torch.zeros(B, H, L, dk, dv, dtype=f32, device=dev) if dS is None else dS.to(f32).contiguous()
    dbeta = torch.zeros(B, T, H, dtype=f32, device=dev)
    if T == 0:
        dg = torch.zeros(B, 0, H, dtype=g.dtype if g is not None else f32, device=dev)
        return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), lam.new_empty(lam.shape),
                dg, dbeta, dS.to(S0.dtype).clone())
    cfg = _config(dk, dv)
    prec, prec32 = _precisions(q.dtype, input_precision)
    common = dict(HAS_G=x.has_g, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    N = B * H

    dq = torch.empty(B, T, H, dk, dtype=q.dtype, device=dev)
    dlam = torch.empty(B, T, H, L, dtype=lam.dtype, device=dev)
    dg_row = torch.empty(B, T, H, dtype=f32, device=dev)
    _bwd_dq_kernel[(triton.cdiv(T, cfg["BT"]), N)](
        x.q, x.k, x.v, x.lam, x.gh, x.gl, x.cm, x.S0, do, dq, dlam, dg_row, T, H, L, dk, dv, float(scale),
        PREC=prec, PREC32=prec32, BT=cfg["BT"], BS=cfg["BS"], BK=x.BK, BV=x.BV, BL=x.BL, **common)

    dkk = torch.empty(B, T, H, dk, dtype=k.dtype, device=dev)
    dvv = torch.empty(B, T, H, dv, dtype=v.dtype, device=dev)
    dg_col = torch.empty(B, T, H, dtype=f32, device=dev)
    fin = torch.empty(B, T, H, dtype=f32, device=dev)
    _bwd_dkv_kernel[(triton.cdiv(T, cfg["BS"]), N)](
        x.q, x.k, x.v, x.lam, x.gh, x.gl, x.cm, do, dS, dkk, dvv, dg_col, fin, T, H, L, dk, dv, float(scale),
        PREC=prec, PREC32=prec32, BT=cfg["BT"], BS=cfg["BS"], BK=x.BK, BV=x.BV, BL=x.BL, **common)

    dS0 = torch.empty(B, H, L, dk, dv, dtype=f32, device=dev)
    bv = min(x.BV, 64)
    nv = triton.cdiv(dv, bv)
    carry = torch.empty(N, L, nv, dtype=f32, device=dev)
    _bwd_ds0_kernel[(L, N, nv)](
        x.q, x.lam, x.gh, x.gl, x.cm, x.S0, do, dS, dS0, carry, T, H, L, dk, dv, float(scale),
        PREC32=prec32, BT=cfg["BT"], BK=x.BK, BV=bv, BL=x.BL, **common)

    if g is not None:
        dG = dg_row + dg_col
        dG[:, -1] += fin.sum(1) + carry.sum((1, 2)).view(B, H)
        dg = dG.flip(1).cumsum(1).flip(1).to(g.dtype)
    else:
        dg = torch.zeros(B, T, H, dtype=f32, device=dev)
    return dq, dkk, dvv, dlam, dg, dbeta, dS0.to(S0.dtype)
