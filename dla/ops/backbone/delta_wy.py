r"""The chunked delta rule's UT (WY) stage in Triton: the triangular solve and `w, u`, and their
backward. Notation of `delta.py`; `delta_common.py` has the gates, masks and dot precisions.

Forward, per chunk of `C` tokens (one program per chunk and head, all chunks in parallel):

    A_kk = tril(diag(β)(KKᵀ ⊙ Γ), −1),   T = (I + A_kk)⁻¹                    [C, C] float32
    w = (T diag(βγ)) K   [C, Dk],   u = (T diag(β)) V   [C, Dv]

(`w`, `u` for bfloat16 inputs as split bfloat16 products, `dla.ops.triton_utils.mmr`; the
solve's products at tf32x3.)

The solve (`unit_lower_inverse_in_place`, shared with the readout's UT kernel) runs by row
blocks of `BC = 16`: `A_kk` is written to `T`'s rows first, then every diagonal block is
replaced by `T_ii = (I + A_ii)⁻¹` (forward substitution, all blocks at once), then block row `i`
by `T_i,<i = −T_ii A_i,<i T_<i,<i` (from the rows already solved, read back from memory), so any
`C ∈ {16, 32, 64}` is one code path. Backward, with `dU` (float32) from the state pass and the
chunk states `h`:

    du = dU,   dw = −dU hᵀ
    dT = (du Vᵀ) diag(β) + (dw Kᵀ) diag(βγ),   dV = diag(β) Tᵀ du,   dK += diag(βγ) Tᵀ dw
    dβ = rowsum((Tᵀ du) ⊙ V) + γ ⊙ rowsum((Tᵀ dw) ⊙ K) + rowsum(dA_kk ⊙ KKᵀ ⊙ Γ)
    dγ = β ⊙ rowsum((Tᵀ dw) ⊙ K)
    dA_kk = −(Tᵀ dT Tᵀ) ⊙ [strict lower, same segment],   Z = diag(β) dA_kk ⊙ Γ
    dK += Z K + Zᵀ K,   dG = rowsum(Z ⊙ KKᵀ) − colsum(Z ⊙ KKᵀ) + dγ ⊙ γ + (dG of the later stages)
    dg = reverse cumsum of dG inside the chunk

`Zᵀ K` takes `Zᵀ` from a round trip through a scratch buffer (`Z` stored, read back
transposed) rather than `tl.trans` of a register tensor that came out of a dot: that pattern is
what Triton 3.4–3.7.0 miscompiles on Hopper (fla issue #640).

Launch: 4 warps a program for both kernels. ptxas gives each 255 registers a thread with some
spills (`python -m perf.sm90_resources --stages wy`), so two programs share an SM where the
8-warp launch (235 registers, no spills in the forward) fit one; on an H100 the 4-warp launches
ran faster than 8 or 16 warps, blocks of 64, a split forward (the solve, then `w`, `u` by tiles
in a grid of their own) and `dw` by a launch of its own (`perf.sweep_wy_gpu`,
`perf/results/sweep_wy-h100.md`).

Shapes: `k [B,T,H,Dk]`, `v [B,T,H,Dv]`, `g, beta, reset [B,T,H]`; `T` is stored `[B,T,H,C]`
(row `t` of its chunk's matrix at token `t`, float32), `w [B,T,H,Dk]`, `u [B,T,H,Dv]` in the
inputs' dtype; the backward reads `h [B,H,NC,Dk,Dv]` (inputs' dtype) and `dU [B,T,H,Dv]`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from dla.ops.backbone.delta_common import chunk_ends, chunk_gates, decay, precisions
from dla.ops.triton_utils import interpreting, mm16, mmr, pow2, split_products

__all__ = ["wy_forward", "wy_backward", "wy_meta"]

BC = 16  # the solve's row block: the smallest tl.dot tile


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def diagonal_blocks_in_place(P, stride, n_rows, C: tl.constexpr, BC: tl.constexpr):
    """Every diagonal [BC, BC] block `A_ii` of the strictly lower [C, C] `A` in memory replaced by
    `T_ii = (I + A_ii)⁻¹`, all `C / BC` at once by forward substitution (row i of `X = T_ii − I`
    is `−A_i − Σ_{j<i} A_ij X_j`, its `−A_i` read from memory off the loop's chain)."""
    NB: tl.constexpr = C // BC
    ob = tl.arange(0, BC)
    nb = tl.arange(0, NB)
    rows3 = nb[:, None, None] * BC + ob[None, :, None]  # [NB, BC, 1]: the block's rows
    diag = P + rows3 * stride + (nb[:, None, None] * BC + ob[None, None, :])
    live = rows3 < n_rows
    X = -tl.load(diag, mask=live, other=0.0)
    for i in range(2, BC):
        a = -tl.load(P + (nb[:, None] * BC + i) * stride + nb[:, None] * BC + ob[None, :],
                     mask=(ob[None, :] < i) & (nb[:, None] * BC + i < n_rows), other=0.0)
        a = a + tl.sum(a[:, :, None] * X, axis=1)
        X = tl.where((ob == i)[None, :, None], a[:, None, :], X)
    tl.debug_barrier()  # every thread has read its rows of A before the blocks are overwritten
    tl.store(diag, X + tl.where(ob[:, None] == ob[None, :], 1.0, 0.0)[None, :, :], mask=live)
    tl.debug_barrier()


@triton.jit
def unit_lower_inverse_in_place(P, stride, n_rows, C: tl.constexpr, BC: tl.constexpr, PREC_SOLVE: tl.constexpr):
    """Replace a chunk's strictly lower [C, C] float32 `A` in memory (row r at `P + r·stride`;
    rows from `n_rows` on neither read nor written) with `T = (I + A)⁻¹`, by row blocks of `BC`.

    The diagonal blocks first (`diagonal_blocks_in_place`): `BC − 2` dependent steps of one
    reduction each for the chunk, where block after block took `C / BC` times as many, each with
    a second reduction to pick the row out of registers. Then `T_i,<i = −T_ii A_i,<i T_<i,<i`
    block row by block row, from the rows already solved (read back from memory)."""
    NB: tl.constexpr = C // BC
    o = tl.arange(0, C)
    ob = tl.arange(0, BC)
    diagonal_blocks_in_place(P, stride, n_rows, C, BC)
    for i in tl.static_range(1, NB):
        r = i * BC + ob
        rows = r < n_rows
        Tii = tl.load(P + r[:, None] * stride + (i * BC + ob)[None, :], mask=rows[:, None], other=0.0)
        band = P + r[:, None] * stride + o[None, :]
        left = o[None, :] < i * BC
        Ai = tl.load(band, mask=rows[:, None] & left, other=0.0)
        solved = tl.load(P + o[:, None] * stride + o[None, :], mask=((o < n_rows) & (o < i * BC))[:, None],
                         other=0.0)
        Toff = -tl.dot(Tii, tl.dot(Ai, solved, input_precision=PREC_SOLVE), input_precision=PREC_SOLVE)
        tl.debug_barrier()  # every thread has read A_i before it is overwritten
        tl.store(band, Toff, mask=rows[:, None] & left)
        tl.debug_barrier()


@triton.jit
def a_kk_into_rows(K, TI, t, inside, beta, G, seg, H: tl.constexpr, DK: tl.constexpr, C: tl.constexpr,
                   BK: tl.constexpr, PREC: tl.constexpr, SPLIT: tl.constexpr, INTERP: tl.constexpr):
    """`A_kk = tril(diag(β)(KKᵀ ⊙ Γ), −1)` into `T`'s rows (`K`, `TI` at the head's token 0)."""
    o = tl.arange(0, C)
    KK = tl.zeros([C, C], dtype=tl.float32)
    for k0 in range(0, DK, BK):
        d = k0 + tl.arange(0, BK)
        kr = tl.load(K + t[:, None] * (H * DK) + d[None, :], mask=inside[:, None] & (d[None, :] < DK), other=0.0)
        kc = tl.load(K + t[None, :] * (H * DK) + d[:, None], mask=inside[None, :] & (d[:, None] < DK), other=0.0)
        KK += mm16(kr, kc, PREC, SPLIT, INTERP)
    tl.store(TI + t[:, None] * (H * C) + o[None, :], beta[:, None] * KK * decay(G, seg, C, True, False),
             mask=inside[:, None])
    tl.debug_barrier()


@triton.jit
def product_tile(Ts, X, OUT, t, inside, d, H: tl.constexpr, D: tl.constexpr, PREC_SOLVE: tl.constexpr,
                 SPLIT: tl.constexpr, INTERP: tl.constexpr):
    """OUT[:, d] = Ts · X[:, d] for the chunk's rows `t` (`X`, `OUT` at the head's token 0, row
    stride H·D): `w` or `u` at the columns `d`, from `T` with its columns scaled. Split products
    for bfloat16 inputs (`mmr`), whose 16 bits of T lie far below the rounding to the inputs'
    dtype."""
    m = inside[:, None] & (d[None, :] < D)
    x = tl.load(X + t[:, None] * (H * D) + d[None, :], mask=m, other=0.0)
    tl.store(OUT + t[:, None] * (H * D) + d[None, :], mmr(Ts, x, PREC_SOLVE, SPLIT, INTERP).to(OUT.dtype.element_ty),
             mask=m)


@triton.jit
def _wy_fwd_kernel(K, V, BETA, G, RESET, TI, W, U, T, H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                   C: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_G: tl.constexpr,
                   HAS_RESET: tl.constexpr, PREC: tl.constexpr, PREC_SOLVE: tl.constexpr, SPLIT: tl.constexpr,
                   INTERP: tl.constexpr):
    c = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1).to(tl.int64)
    tok = (n // H) * T * H + n % H
    o = tl.arange(0, C)
    t = c * C + o
    inside = t < T
    G_, seg = chunk_gates(G, RESET, tok, t, T, H, C, HAS_G, HAS_RESET)
    gam, _, _ = chunk_ends(G_, seg, C)
    beta = tl.load(BETA + tok + t * H, mask=inside, other=0.0).to(tl.float32)
    K += tok * DK
    V += tok * DV
    W += tok * DK
    U += tok * DV
    TI += tok * C

    a_kk_into_rows(K, TI, t, inside, beta, G_, seg, H, DK, C, BK, PREC, SPLIT, INTERP)
    tile = TI + t[:, None] * (H * C) + o[None, :]

    unit_lower_inverse_in_place(TI + c * C * (H * C), H * C, T - c * C, C, BC, PREC_SOLVE)

    # w = (T diag(βγ)) K, u = (T diag(β)) V
    Tm = tl.load(tile, mask=inside[:, None], other=0.0)
    Tw = Tm * (beta * gam)[None, :]
    for k0 in range(0, DK, BK):
        product_tile(Tw, K, W, t, inside, k0 + tl.arange(0, BK), H, DK, PREC_SOLVE, SPLIT, INTERP)
    Tu = Tm * beta[None, :]
    for v0 in range(0, DV, BV):
        product_tile(Tu, V, U, t, inside, v0 + tl.arange(0, BV), H, DV, PREC_SOLVE, SPLIT, INTERP)


@triton.jit
def dw_tile(DU, HS, t, inside, d, H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr,
            BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """dw = −dU hᵀ at the Dk columns `d` [BK] (`DU` at the head's token 0, `HS` at the chunk's h)."""
    dw = tl.zeros([C, BK], dtype=tl.float32)
    for v0 in range(0, DV, BV):
        e = v0 + tl.arange(0, BV)
        du = tl.load(DU + t[:, None] * (H * DV) + e[None, :], mask=inside[:, None] & (e[None, :] < DV), other=0.0)
        h = tl.load(HS + d[:, None] * DV + e[None, :], mask=(d[:, None] < DK) & (e[None, :] < DV), other=0.0)
        dw -= tl.dot(du, tl.trans(h.to(tl.float32)), input_precision=PREC)
    return dw


@triton.jit
def _wy_bwd_kernel(K, V, BETA, G, RESET, TI, HS, DU, DKP, DGP, SCR, DK_OUT, DV_OUT, DBETA, DG_OUT, T,
                   H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                   BV: tl.constexpr, HAS_G: tl.constexpr, HAS_RESET: tl.constexpr, PREC: tl.constexpr,
                   PREC_SOLVE: tl.constexpr):
    c = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1).to(tl.int64)
    NC = tl.cdiv(T, C)
    tok = (n // H) * T * H + n % H
    o = tl.arange(0, C)
    t = c * C + o
    inside = t < T
    G_, seg = chunk_gates(G, RESET, tok, t, T, H, C, HAS_G, HAS_RESET)
    gam, _, _ = chunk_ends(G_, seg, C)
    beta = tl.load(BETA + tok + t * H, mask=inside, other=0.0).to(tl.float32)
    bg = beta * gam
    K += tok * DK
    V += tok * DV
    DU += tok * DV
    HS += (n * NC + c) * DK * DV
    DKP += tok * DK
    DK_OUT += tok * DK
    DV_OUT += tok * DV
    Tt = tl.load(TI + tok * C + t[None, :] * (H * C) + o[:, None], mask=inside[None, :], other=0.0)  # Tᵀ

    dTv = tl.zeros([C, C], dtype=tl.float32)
    dTk = tl.zeros([C, C], dtype=tl.float32)
    KK = tl.zeros([C, C], dtype=tl.float32)
    dbeta = tl.zeros([C], dtype=tl.float32)
    dgam = tl.zeros([C], dtype=tl.float32)
    for v0 in range(0, DV, BV):
        d = v0 + tl.arange(0, BV)
        mv = inside[:, None] & (d[None, :] < DV)
        du = tl.load(DU + t[:, None] * (H * DV) + d[None, :], mask=mv, other=0.0)
        vr = tl.load(V + t[:, None] * (H * DV) + d[None, :], mask=mv, other=0.0).to(tl.float32)
        dTv += tl.dot(du, tl.trans(vr), input_precision=PREC)
        dvb = tl.dot(Tt, du, input_precision=PREC)
        tl.store(DV_OUT + t[:, None] * (H * DV) + d[None, :], (beta[:, None] * dvb).to(DV_OUT.dtype.element_ty),
                 mask=mv)
        dbeta += tl.sum(dvb * vr, axis=1)
    for k0 in range(0, DK, BK):
        d = k0 + tl.arange(0, BK)
        mk = inside[:, None] & (d[None, :] < DK)
        dw = dw_tile(DU, HS, t, inside, d, H, DK, DV, C, BK, BV, PREC)
        kr = tl.load(K + t[:, None] * (H * DK) + d[None, :], mask=mk, other=0.0)
        kf = kr.to(tl.float32)
        dTk += tl.dot(dw, tl.trans(kf), input_precision=PREC)
        KK += tl.dot(kr, tl.trans(kr), input_precision=PREC)
        dkb = tl.dot(Tt, dw, input_precision=PREC)
        kd = tl.sum(dkb * kf, axis=1)
        dbeta += gam * kd
        dgam += beta * kd
        part = DKP + t[:, None] * (H * DK) + d[None, :]
        tl.store(part, tl.load(part, mask=mk, other=0.0) + bg[:, None] * dkb, mask=mk)
    dT = dTv * beta[None, :] + dTk * bg[None, :]
    dA = -tl.dot(tl.dot(Tt, dT, input_precision=PREC_SOLVE), Tt, input_precision=PREC_SOLVE)
    X = dA * decay(G_, seg, C, True, False)  # Γ is 0 outside the strict lower triangle and across segments
    dbeta += tl.sum(X * KK, axis=1)
    Z = beta[:, None] * X

    scratch = SCR + (n * NC + c) * C * C
    Zs = Z.to(SCR.dtype.element_ty)
    tl.store(scratch + o[:, None] * C + o[None, :], Zs)
    tl.debug_barrier()
    Zt = tl.load(scratch + o[None, :] * C + o[:, None])
    for k0 in range(0, DK, BK):
        d = k0 + tl.arange(0, BK)
        mk = inside[:, None] & (d[None, :] < DK)
        kr = tl.load(K + t[:, None] * (H * DK) + d[None, :], mask=mk, other=0.0).to(SCR.dtype.element_ty)
        dk = tl.load(DKP + t[:, None] * (H * DK) + d[None, :], mask=mk, other=0.0)
        dk += tl.dot(Zs, kr, input_precision=PREC) + tl.dot(Zt, kr, input_precision=PREC)
        tl.store(DK_OUT + t[:, None] * (H * DK) + d[None, :], dk.to(DK_OUT.dtype.element_ty), mask=mk)
    tl.store(DBETA + tok + t * H, dbeta.to(DBETA.dtype.element_ty), mask=inside)
    if HAS_G:
        P = Z * KK
        dG = tl.sum(P, axis=1) - tl.sum(P, axis=0) + dgam * gam
        dG += tl.load(DGP + tok + t * H, mask=inside, other=0.0)
        dg = tl.sum(dG, axis=0) - tl.cumsum(dG, axis=0) + dG
        tl.store(DG_OUT + tok + t * H, dg.to(DG_OUT.dtype.element_ty), mask=inside)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def wy_meta(Dk: int, Dv: int, chunk_size: int, dtype: torch.dtype) -> dict:
    """Launch parameters of both kernels, a function of the shapes and the dtype only: `Dk`,
    `Dv` in blocks of at most 32, 4 warps (module doc)."""
    prec, prec_solve = precisions(dtype)
    return dict(C=chunk_size, BK=min(pow2(Dk), 32), BV=min(pow2(Dv), 32), PREC=prec, PREC_SOLVE=prec_solve,
                num_warps=4, num_stages=2)


def _flags(g, reset) -> dict:
    return dict(HAS_G=g is not None, HAS_RESET=reset is not None)


def _reset_bytes(reset: Tensor | None) -> Tensor | None:
    return None if reset is None else reset.contiguous().view(torch.uint8)


def wy_forward(k: Tensor, v: Tensor, g: Tensor | None, beta: Tensor, reset: Tensor | None,
               chunk_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """`(T [B,T,H,C] float32, w [B,T,H,Dk], u [B,T,H,Dv])`, `w, u` in `k`'s dtype. Inputs
    contiguous."""
    B, T, H, Dk = k.shape
    Dv = v.shape[-1]
    meta = wy_meta(Dk, Dv, chunk_size, k.dtype)
    TI = torch.empty(B, T, H, chunk_size, dtype=torch.float32, device=k.device)
    w = torch.empty_like(k)
    u = torch.empty(B, T, H, Dv, dtype=k.dtype, device=k.device)
    _wy_fwd_kernel[(triton.cdiv(T, chunk_size), B * H)](
        k, v, beta, g, _reset_bytes(reset), TI, w, u, T, H, Dk, Dv, BC=BC, **_flags(g, reset), **split_products(k),
        **meta)
    return TI, w, u


def wy_backward(k: Tensor, v: Tensor, g: Tensor | None, beta: Tensor, reset: Tensor | None, TI: Tensor,
                h: Tensor, dU: Tensor, dk_part: Tensor, dG_part: Tensor | None, chunk_size: int,
                meta: dict | None = None):
    """`(dk, dv, dg, dbeta)` typed like `k, v, g, beta` (`dg` None without g), from the chunk
    states `h` [B,H,NC,Dk,Dv], `dU` [B,T,H,Dv] float32 (`du = dU`, `dw = −dU hᵀ`), and the later
    stages' float32 `dk_part` (which this call accumulates into) and `dG_part` [B,T,H] (before
    the reverse cumsum). `meta` overrides `wy_meta`'s launch (`perf.sweep_wy_gpu`'s candidates)."""
    B, T, H, Dk = k.shape
    Dv = v.shape[-1]
    C = chunk_size
    meta = {**wy_meta(Dk, Dv, C, k.dtype), **(meta or {})}
    interpreting(k)
    NC = triton.cdiv(T, C)
    scratch = torch.empty(B * H * NC, C, C, dtype=k.dtype, device=k.device)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    dbeta = torch.empty_like(beta)
    dg = torch.empty_like(g) if g is not None else None
    _wy_bwd_kernel[(NC, B * H)](
        k, v, beta, g, _reset_bytes(reset), TI, h, dU, dk_part, dG_part, scratch, dk, dv, dbeta, dg, T, H, Dk,
        Dv, **_flags(g, reset), **meta)
    return dk, dv, dg, dbeta
