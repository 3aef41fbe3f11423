r"""CUDA kernels of the readout with `β` by windows, forward: the Triton twin of
`objects_delta.py` (whose module doc derives the algebra and the backward).

What it computes
================
Per row `n = b·H + h`, in *virtual* positions `u = t + φ_b`, `φ_b = step_b mod R·C`: virtual chunk
`c` holds the real tokens `[c·C − φ_b, (c+1)·C − φ_b) ∩ [0, T)` and virtual window `w` the chunks
`[w·R, (w+1)·R)`, which are exactly the chunks and windows of `objects_delta.window_plan` (chunks
and windows aligned to `step + t`); positions outside `[0, T)` are tokens with `k = v = 0`,
`β = 0`, `g = 0` — identity transitions that write nothing — so every chunk and window has the
same shape. Notation of `objects_delta.py`:

    _ut_kernel        per (chunk, row): A_kk, T⁻¹ = (I + A_kk)⁻¹ by 16-row blocks (as `delta_wy.py`),
                      Ē = Kᵀ diag(ρ) T⁻¹ diag(β)                        → TI [N,NC,C,C], EB [N,NC,Dk,C]
    _suffix_kernel    per (window, row, row tile of Dk): from the window's end, K̃ = Suf Ē and
                      Suf ← γ_C Suf − K̃ H chunk by chunk                 → KT [N,NC,Dk,C], SUF [N,NW,Dk,Dk]
    _object_kernel    per (row, Dv tile), windows in order: every element E' of the next partition
                      S̄'_{E'} = Suf_F Σ_{E⊂E'} S̄_E + Σ_{s∈E'} K̃_s v_sᵀ  (float32 masters MB,
                      copies OB in the inputs' dtype for the readout; the last masters are S)
    _readout_kernel   per (chunk, row, Dv tile): own chunk (Ã ⊙ Λ)V with Ã = (QKᵀ ⊙ Γ) T⁻¹ diag(β)
                      and Q̂ = diag(γ)Q − ÃH; back through the window's earlier chunks σ = xĒ,
                      o += (σ ⊙ Λ)V, x ← γ_C x − σH; then Σ_E λ_t[ℓ_t(a_E)] x S̄_E

Levels: with `c[t, r]` the running minimum of row `t` of the level map (non-increasing in `r`),
`ℓ_t(p) = #{r : c[t, r] > p}`, so `λ_t[ℓ_t(p)] = Σ_r λ_t[r] ([c[t, r−1] > p] − [c[t, r] > p])`
(`[c[t, −1] > p] = 1`; 0 where no level holds `p`): one pass over the `L` levels per tile.

The transport `x` is carried per `Dv` tile of the readout (recomputed `Dv/BV` times; `BV = Dv`
on the GPU). Dots on float32 operands (the inputs are converted on load), `input_precision`
`"ieee"` for float32 inputs; for 16-bit inputs `"tf32"`, and `"tf32x3"` (`delta_common.precisions`)
for the solve and for every product of the transport and suffix chains, whose rounding compounds
over up to `R − 1` chunks (`PREC_CHAIN`). Objects are read as copies in the inputs' dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from dla.ops.backbone.delta_common import decay, precisions
from dla.ops.backbone.delta_wy import BC, _unit_lower_inverse
from dla.ops.levels import running_min
from dla.ops.readout.objects_delta import window_plan
from dla.ops.state import state_dtype
from dla.ops.triton_utils import interpreting, pow2

__all__ = ["objects_delta_forward_triton"]


# --------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------


@triton.jit
def _tokens(PHI, n, c, T, H: tl.constexpr, C: tl.constexpr):
    """(t [C] the real positions of virtual chunk c, which are tokens, t clamped into [0, T), the
    row's offset in a [B, T, H] tensor)."""
    b = n // H
    t = c * C + tl.arange(0, C) - tl.load(PHI + b)
    valid = (t >= 0) & (t < T)
    return t, valid, tl.minimum(tl.maximum(t, 0), T - 1), b * T * H + n % H


@triton.jit
def _gates(G, tok, tc, valid, H: tl.constexpr, C: tl.constexpr, HAS_G: tl.constexpr):
    """(G [C] chunk-local cumsum, γ, ρ, γ_C) over the chunk's tokens (g = 0 elsewhere)."""
    if HAS_G:
        Gc = tl.cumsum(tl.load(G + tok + tc * H, mask=valid, other=0.0).to(tl.float32), axis=0)
    else:
        Gc = tl.zeros([C], dtype=tl.float32)
    G_C = tl.sum(tl.where(tl.arange(0, C) == C - 1, Gc, 0.0), axis=0)
    return Gc, tl.exp(Gc), tl.exp(G_C - Gc), tl.exp(G_C)


@triton.jit
def _rows(X, tok, tc, valid, cols, H: tl.constexpr, D: tl.constexpr):
    """Rows of a [B, T, H, D] tensor at the chunk's tokens, columns `cols`, float32 (0 elsewhere)."""
    return tl.load(X + tok * D + tc[:, None] * (H * D) + cols[None, :], mask=valid[:, None] & (cols[None, :] < D),
                   other=0.0).to(tl.float32)


@triton.jit
def _cols(X, tok, tc, valid, rows, H: tl.constexpr, D: tl.constexpr):
    """The transpose of `_rows`: [len(rows), C]."""
    return tl.load(X + tok * D + tc[None, :] * (H * D) + rows[:, None], mask=valid[None, :] & (rows[:, None] < D),
                   other=0.0).to(tl.float32)


@triton.jit
def _band_weights(CM, LAM, tokL, tc, valid, s, H: tl.constexpr, L: tl.constexpr, C: tl.constexpr):
    """Λ[t, s] = λ_t[ℓ_t(s)] for the chunk's rows t and the positions s [C] (module doc)."""
    out = tl.zeros([C, C], dtype=tl.float32)
    above = tl.full([C, C], 1.0, tl.float32)
    for r in range(L):
        cm = tl.load(CM + tokL + tc * (H * L) + r, mask=valid, other=0)
        lam = tl.load(LAM + tokL + tc * (H * L) + r, mask=valid, other=0.0).to(tl.float32)
        ind = tl.where(cm[:, None] > s[None, :], 1.0, 0.0)
        out += lam[:, None] * (above - ind)
        above = ind
    return out


@triton.jit
def _point_weights(CM, LAM, tokL, tc, valid, a, H: tl.constexpr, L: tl.constexpr, C: tl.constexpr):
    """λ_t[ℓ_t(a)] [C] for one position a."""
    out = tl.zeros([C], dtype=tl.float32)
    above = tl.full([C], 1.0, tl.float32)
    for r in range(L):
        cm = tl.load(CM + tokL + tc * (H * L) + r, mask=valid, other=0)
        lam = tl.load(LAM + tokL + tc * (H * L) + r, mask=valid, other=0.0).to(tl.float32)
        ind = tl.where(cm > a, 1.0, 0.0)
        out += lam * (above - ind)
        above = ind
    return out


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _ut_kernel(K, BETA, G, PHI, TI, EB, T, H: tl.constexpr, DK: tl.constexpr, C: tl.constexpr, BC: tl.constexpr,
               BK: tl.constexpr, HAS_G: tl.constexpr, PREC: tl.constexpr, PREC_SOLVE: tl.constexpr):
    c = tl.program_id(0)
    n = tl.program_id(1)
    NC = tl.num_programs(0)
    o = tl.arange(0, C)
    t, valid, tc, tok = _tokens(PHI, n, c, T, H, C)
    Gc, gam, rho, gam_C = _gates(G, tok, tc, valid, H, C, HAS_G)
    beta = tl.load(BETA + tok + tc * H, mask=valid, other=0.0).to(tl.float32)
    KK = tl.zeros([C, C], dtype=tl.float32)
    for k0 in range(0, DK, BK):
        d = k0 + tl.arange(0, BK)
        KK += tl.dot(_rows(K, tok, tc, valid, d, H, DK), _cols(K, tok, tc, valid, d, H, DK), input_precision=PREC)
    base = TI + (n * NC + c).to(tl.int64) * C * C
    tile = base + o[:, None] * C + o[None, :]
    tl.store(tile, beta[:, None] * KK * decay(Gc, tl.zeros([C], dtype=tl.int32), C, True, False))
    tl.debug_barrier()
    ob = tl.arange(0, BC)
    for i in tl.static_range(C // BC):
        r = i * BC + ob
        diag = base + r[:, None] * C + (i * BC + ob)[None, :]
        Tii = _unit_lower_inverse(tl.load(diag), BC)
        if i > 0:
            band = base + r[:, None] * C + o[None, :]
            left = o[None, :] < i * BC
            Ai = tl.load(band, mask=left, other=0.0)
            solved = tl.load(tile, mask=(o < i * BC)[:, None], other=0.0)
            Toff = -tl.dot(Tii, tl.dot(Ai, solved, input_precision=PREC_SOLVE), input_precision=PREC_SOLVE)
            tl.debug_barrier()  # every thread has read A_i before it is overwritten
            tl.store(band, Toff, mask=left)
        tl.store(diag, Tii)
        tl.debug_barrier()
    M = tl.load(tile) * beta[None, :]
    for k0 in range(0, DK, BK):
        d = k0 + tl.arange(0, BK)
        kr = _cols(K, tok, tc, valid, d, H, DK) * rho[None, :]
        E = tl.dot(kr, M, input_precision=PREC_SOLVE)
        tl.store(EB + (n * NC + c).to(tl.int64) * DK * C + d[:, None] * C + o[None, :], E, mask=d[:, None] < DK)


@triton.jit
def _suffix_kernel(K, G, PHI, EB, KT, SUF, T, H: tl.constexpr, DK: tl.constexpr, C: tl.constexpr, R: tl.constexpr,
                   BR: tl.constexpr, BKP: tl.constexpr, HAS_G: tl.constexpr, PREC_CHAIN: tl.constexpr):
    w = tl.program_id(0)
    n = tl.program_id(1)
    NW = tl.num_programs(0)
    NC = NW * R
    o = tl.arange(0, C)
    rows = tl.program_id(2) * BR + tl.arange(0, BR)
    cols = tl.arange(0, BKP)
    suf = tl.where(rows[:, None] == cols[None, :], 1.0, 0.0)
    for jj in range(R):
        c = w * R + R - 1 - jj
        t, valid, tc, tok = _tokens(PHI, n, c, T, H, C)
        Gp, gam, rhop, gam_C = _gates(G, tok, tc, valid, H, C, HAS_G)
        chunk = (n * NC + c).to(tl.int64) * DK * C
        E = tl.load(EB + chunk + cols[:, None] * C + o[None, :], mask=cols[:, None] < DK, other=0.0)
        kt = tl.dot(suf, E, input_precision=PREC_CHAIN)
        tl.store(KT + chunk + rows[:, None] * C + o[None, :], kt, mask=rows[:, None] < DK)
        Hk = _rows(K, tok, tc, valid, cols, H, DK) * gam[:, None]
        suf = gam_C * suf - tl.dot(kt, Hk, input_precision=PREC_CHAIN)
    tl.store(SUF + (n * NW + w).to(tl.int64) * DK * DK + rows[:, None] * DK + cols[None, :], suf,
             mask=(rows[:, None] < DK) & (cols[None, :] < DK))


@triton.jit
def _object_kernel(V, PHI, KT, SUF, FIRST, LAST, MB, OB, T, NW, H: tl.constexpr, L: tl.constexpr, DK: tl.constexpr,
                   DV: tl.constexpr, C: tl.constexpr, R: tl.constexpr, BKP: tl.constexpr, BV: tl.constexpr,
                   PREC: tl.constexpr, PREC_CHAIN: tl.constexpr):
    n = tl.program_id(0)
    NC = NW * R
    o = tl.arange(0, C)
    rk = tl.arange(0, BKP)
    cv = tl.program_id(1) * BV + tl.arange(0, BV)
    tile = rk[:, None] * DV + cv[None, :]
    mt = (rk[:, None] < DK) & (cv[None, :] < DV)
    D = DK * DV
    for w in range(NW):
        src = MB + ((n * 2 + w % 2) * L).to(tl.int64) * D
        dst = MB + ((n * 2 + (w + 1) % 2) * L).to(tl.int64) * D
        suf = tl.load(SUF + (n * NW + w).to(tl.int64) * DK * DK + rk[:, None] * DK + rk[None, :],
                      mask=(rk[:, None] < DK) & (rk[None, :] < DK), other=0.0)
        now = (n * (NW + 1) + w) * L
        nxt = (n * (NW + 1) + w + 1) * L
        for r2 in range(L):
            a2 = tl.load(FIRST + nxt + r2)
            e2 = tl.load(LAST + nxt + r2)
            acc = tl.zeros([BKP, BV], dtype=tl.float32)
            if a2 <= e2:
                for r in range(L):
                    a = tl.load(FIRST + now + r)
                    e = tl.load(LAST + now + r)
                    held = (a <= e) & (a2 <= a) & (e <= e2)
                    acc += tl.load(src + r * D + tile, mask=mt & held, other=0.0)
                acc = tl.dot(suf, acc, input_precision=PREC_CHAIN)
                for j in range(R):
                    c = w * R + j
                    t, valid, tc, tok = _tokens(PHI, n, c, T, H, C)
                    member = valid & (t >= a2) & (t <= e2)
                    kt = tl.load(KT + (n * NC + c).to(tl.int64) * DK * C + rk[:, None] * C + o[None, :],
                                 mask=(rk[:, None] < DK) & member[None, :], other=0.0)
                    acc += tl.dot(kt, _rows(V, tok, tc, member, cv, H, DV), input_precision=PREC)
            tl.store(dst + r2 * D + tile, acc, mask=mt)
            tl.store(OB + (nxt + r2).to(tl.int64) * D + tile, acc.to(OB.dtype.element_ty), mask=mt)
        tl.debug_barrier()  # the next window reads these masters


@triton.jit
def _readout_kernel(Q, K, V, LAM, CM, G, BETA, PHI, TI, EB, FIRST, LAST, OB, O, T, scale, H: tl.constexpr,
                    L: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr, R: tl.constexpr,
                    BKP: tl.constexpr, BV: tl.constexpr, HAS_G: tl.constexpr, PREC: tl.constexpr,
                    PREC_CHAIN: tl.constexpr):
    c = tl.program_id(0)
    n = tl.program_id(1)
    NC = tl.num_programs(0)
    NW = NC // R
    w = c // R
    o = tl.arange(0, C)
    ck = tl.arange(0, BKP)
    cv = tl.program_id(2) * BV + tl.arange(0, BV)
    t, valid, tc, tok = _tokens(PHI, n, c, T, H, C)
    tokL = tok * L
    Gc, gam, rho, gam_C = _gates(G, tok, tc, valid, H, C, HAS_G)
    beta = tl.load(BETA + tok + tc * H, mask=valid, other=0.0).to(tl.float32)
    q = _rows(Q, tok, tc, valid, ck, H, DK)
    k = _rows(K, tok, tc, valid, ck, H, DK)
    Aqk = tl.dot(q, _cols(K, tok, tc, valid, ck, H, DK), input_precision=PREC)
    Aqk = Aqk * decay(Gc, tl.zeros([C], dtype=tl.int32), C, False, False)
    M = tl.load(TI + (n * NC + c).to(tl.int64) * C * C + o[:, None] * C + o[None, :]) * beta[None, :]
    At = tl.dot(Aqk, M, input_precision=PREC_CHAIN)  # a product with the triangular inverse
    x = q * gam[:, None] - tl.dot(At, k * gam[:, None], input_precision=PREC_CHAIN)
    Lam = _band_weights(CM, LAM, tokL, tc, valid, t, H, L, C)
    Lam = tl.where(o[:, None] >= o[None, :], Lam, 0.0)
    acc = tl.dot(At * Lam, _rows(V, tok, tc, valid, cv, H, DV), input_precision=PREC)
    for jj in range(c - w * R):
        p = c - 1 - jj
        tp, validp, tcp, tokp = _tokens(PHI, n, p, T, H, C)
        Gp, gamp, rhop, gam_Cp = _gates(G, tokp, tcp, validp, H, C, HAS_G)
        E = tl.load(EB + (n * NC + p).to(tl.int64) * DK * C + ck[:, None] * C + o[None, :], mask=ck[:, None] < DK,
                    other=0.0)
        sigma = tl.dot(x, E, input_precision=PREC_CHAIN)
        Lp = _band_weights(CM, LAM, tokL, tc, valid, tp, H, L, C)
        acc += tl.dot(sigma * Lp, _rows(V, tok, tcp, validp, cv, H, DV), input_precision=PREC)
        x = gam_Cp * x - tl.dot(sigma, _rows(K, tok, tcp, validp, ck, H, DK) * gamp[:, None],
                                input_precision=PREC_CHAIN)
    now = (n * (NW + 1) + w) * L
    for r in range(L):
        a = tl.load(FIRST + now + r)
        e = tl.load(LAST + now + r)
        if a <= e:
            Wr = _point_weights(CM, LAM, tokL, tc, valid, a, H, L, C)
            S = tl.load(OB + (now + r).to(tl.int64) * DK * DV + ck[:, None] * DV + cv[None, :],
                        mask=(ck[:, None] < DK) & (cv[None, :] < DV), other=0.0).to(tl.float32)
            acc += Wr[:, None] * tl.dot(x, S, input_precision=PREC)
    tl.store(O + tok * DV + tc[:, None] * (H * DV) + cv[None, :], (scale * acc).to(O.dtype.element_ty),
             mask=valid[:, None] & (cv[None, :] < DV))


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------


def _meta(x: Tensor, Dk: int, Dv: int) -> dict:
    """Tiles: the whole of `Dk` (`BKP`, ≤ 256) in the transport; `Dv` whole on the GPU, by 16
    under the interpreter (so tests cross tile edges)."""
    BKP = pow2(Dk)
    BV = 16 if interpreting(x) else pow2(Dv)
    return dict(BKP=BKP, BV=BV, BR=min(BKP, 32 if interpreting(x) else 64), BK=min(BKP, 32))


def objects_delta_forward_triton(q, k, v, lam, g, beta, level_start, S0, scale: float, chunk_size: int,
                                 step: Tensor, window: int) -> tuple[Tensor, Tensor]:
    """`(o [B,T,H,Dv] in q's dtype, S [B,H,L,Dk,Dv] float32)`, as `objects_delta_forward`;
    `chunk_size` a power of two ≥ 16."""
    B, T, H, Dk = q.shape
    Dv, L = v.shape[-1], lam.shape[-1]
    C, R = int(chunk_size), int(window)
    if C < BC or C & (C - 1):
        raise ValueError(f"chunk_size must be a power of two >= {BC} for the Triton kernels, got {chunk_size!r}")
    dev, f32 = q.device, torch.float32
    sd = state_dtype(q.dtype)
    if T == 0:
        return v.new_empty(B, 0, H, Dv), S0.to(sd).clone()
    q, k, v, lam, beta = (x.contiguous() for x in (q, k, v, lam, beta))
    g = None if g is None else g.contiguous()
    plan = window_plan(level_start, step, C, R)
    NW = plan.first.shape[1] - 1
    NC = NW * R
    N = B * H
    phi = torch.remainder(step.to(torch.int64), R * C).to(torch.int32).contiguous()
    first = plan.first.clamp(-2**31, 2**31 - 1).to(torch.int32).contiguous()
    last = plan.last.clamp(-2**31, 2**31 - 1).to(torch.int32).contiguous()
    cm = running_min(level_start.to(torch.int32)).contiguous()
    prec, prec_solve = precisions(q.dtype)
    meta = _meta(q, Dk, Dv)
    TI = torch.empty(N, NC, C, C, dtype=f32, device=dev)
    EB = torch.empty(N, NC, Dk, C, dtype=f32, device=dev)
    _ut_kernel[(NC, N)](k, beta, g, phi, TI, EB, T, H, Dk, C=C, BC=BC, BK=meta["BK"], HAS_G=g is not None,
                        PREC=prec, PREC_SOLVE=prec_solve)
    KT = torch.empty(N, NC, Dk, C, dtype=f32, device=dev)
    SUF = torch.empty(N, NW, Dk, Dk, dtype=f32, device=dev)
    _suffix_kernel[(NW, N, triton.cdiv(Dk, meta["BR"]))](k, g, phi, EB, KT, SUF, T, H, Dk, C=C, R=R, BR=meta["BR"],
                                                         BKP=meta["BKP"], HAS_G=g is not None, PREC_CHAIN=prec_solve)
    # the first window's objects: the elements of P_0, sums of initial slots
    slot = -1 - torch.arange(L, device=dev)
    inside = (plan.first[:, 0, :, None] <= slot) & (slot <= plan.last[:, 0, :, None])
    objects0 = torch.einsum("nrj,njkv->nrkv", inside.to(f32), S0.to(f32).reshape(N, L, Dk, Dv))
    MB = torch.empty(N, 2, L, Dk, Dv, dtype=f32, device=dev)
    MB[:, 0] = objects0
    OB = torch.empty(N, NW + 1, L, Dk, Dv, dtype=q.dtype, device=dev)
    OB[:, 0] = objects0.to(q.dtype)
    _object_kernel[(N, triton.cdiv(Dv, meta["BV"]))](v, phi, KT, SUF, first, last, MB, OB, T, NW, H, L, Dk, Dv,
                                                      C=C, R=R, BKP=meta["BKP"], BV=meta["BV"], PREC=prec,
                                                      PREC_CHAIN=prec_solve)
    o = torch.empty_like(v)
    _readout_kernel[(NC, N, triton.cdiv(Dv, meta["BV"]))](
        q, k, v, lam, cm, g, beta, phi, TI, EB, first, last, OB, o, T, float(scale), H, L, Dk, Dv, C=C, R=R,
        BKP=meta["BKP"], BV=meta["BV"], HAS_G=g is not None, PREC=prec, PREC_CHAIN=prec_solve)
    return o, MB[:, NW % 2].reshape(B, H, L, Dk, Dv).to(sd).clone()
