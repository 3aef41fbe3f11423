r"""CUDA kernels of the readout with `β` by windows, forward and backward: the Triton twin of
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
    _initial_objects_kernel  per (row, object, Dv tile): window 0's S̄_E, the sum of the
                      initial slots E holds (float32; copy and residual as below)
    _object_kernel    per (row, Dv tile), windows in order: every element E' of the next partition
                      S̄'_{E'} = Suf_F Σ_{E⊂E'} S̄_E + Σ_{s∈E'} K̃_s v_sᵀ  (every window's copies
                      OB [N,NW,L,Dk,Dv] in the inputs' dtype, which the readout and the object
                      backward read; for 16-bit inputs the masters are the copies plus their
                      rounding residuals RB in the same dtype, two windows' in turn; the last
                      window's sums, in float32, are the final state SF)
    _readout_kernel   per (chunk, row, Dv tile): own chunk (Ã ⊙ Λ)V with Ã = (QKᵀ ⊙ Γ) T⁻¹ diag(β)
                      and Q̂ = diag(γ)Q − ÃH; back through the window's earlier chunks σ = xĒ,
                      o += (σ ⊙ Λ)V, x ← γ_C x − σH; then Σ_E λ_t[ℓ_t(a_E)] x S̄_E — all of it
                      transposed (oᵀ, xᵀ, σᵀ built as such), so that every product has Dk, Dv or
                      C rows and takes the carried tiles as its right operand

Backward (`objects_delta._row_backward`'s order; the forward's buffers recomputed):

    _readout_bwd_chain_kernel   per (chunk, row): own chunk (dÃ, its dV, dλ), the chain again with
                          the query written to XP before the last step of each block of KEYS key
                          chunks (one slot per visit of the band: query chunk i, block b < ⌈i/KEYS⌉;
                          bfloat16 for 16-bit inputs) and in the window's frame to XF, objects
                          (U = dÕ S̄ᵀ): dx and dλ so far into dQ̂ and DL; the level spans of the
                          chunk at each earlier key chunk of its window into SPAN (one pass over
                          the levels for all of them)
    _readout_bwd_band_kernel    per (window, row): key chunks p in order, KEYS at a time (a block),
                          the window's later query chunks inside, each query's dx climbing from the
                          window's frame to its own chunk as p rises — the band's dV, dλ, and p's
                          key-side dĒ, dH, dγ_C (one program writes each: no atomics). A query's
                          visit to a block steps its XP slot back through the block into the scratch
                          XS (one key chunk a block: the slot as it is), then takes the block's steps
                          back to back, so that its dx and dλ go back to dQ̂ and DL once per visit
                          (all R queries' live across the sweep: DRAM); a step moves only its level
                          span's columns of the query's dλ, the span read from SPAN. Every [C, ·]
                          tile is taken BKB or BVB columns at a time; the block's sums are
                          read-modify-written at each step (its working set, in L2).
                          Whole-width float32 tiles, and the sums held in registers beside them,
                          spilled several times more (`python -m perf.sm90_resources` reports it)
    _object_grad_kernel   per (window, row, element, Dv tile): D_E = Σ_t λ_t[ℓ_t(a_E)] x_t dÕ_tᵀ from XF
    _object_bwd_kernel    per (row, Dv tile), windows in reverse: D = D_readout + Suf_Fᵀ D' on the
                          elements each E' holds, in place over D_readout; this tile's dSuf_F =
                          Σ D' (Σ S̄)ᵀ and dK̃ = D' v (each chunk's stored by its first element),
                          dv += D'ᵀ K̃
    _suffix_bwd_kernel    per (window, row): the suffix chain again, then its adjoint into dĒ, dH, dγ_C,
                          summing the tiles' dK̃ and dSuf_F as it reads them
    _ut_bwd_kernel        per (chunk, row): the UT backward to dq, dk, dβ, dg; dv

Transposes of dot results go through a scratch round trip (`_transposed`), never `tl.trans`.

Levels: with `c[t, r]` the running minimum of row `t` of the level map (non-increasing in `r`),
`ℓ_t(p) = #{r : c[t, r] > p}`, so `λ_t[ℓ_t(p)] = Σ_r λ_t[r] ([c[t, r−1] > p] − [c[t, r] > p])`
(`[c[t, −1] > p] = 1`; 0 where no level holds `p`): one pass over the `L` levels per tile of
queries and positions — over only the levels that hold one of the tile's positions for the
[C, C] tiles of a chunk pair (`_level_span`), one or two per query where segments are long.

The transport `x` is carried per `Dv` tile of the readout (recomputed `Dv/BV` times; `BV = Dv`
on the GPU). Dots on float32 operands (the inputs are converted on load), `input_precision`
`"ieee"` for float32 inputs; for 16-bit inputs `"tf32"`, and `"tf32x3"` (`delta_common.precisions`)
for the solve and for every product of the transport and suffix chains, whose rounding compounds
over up to `R − 1` chunks (`PREC_CHAIN`). Objects are read as copies in the inputs' dtype.
The readout's three passes (forward, chain, band) and the UT backward with bfloat16 inputs
(`SPLIT`) instead take their products in bfloat16 with float32 accumulation (`dla.ops.triton_utils`):
a tile of the inputs (q, k, v, dO, the object copies, the bfloat16 `XP`) exact against the hi and
lo halves of the float32 side (`mm`, `mmr`), two tiles of the inputs as one product (`mm16`), two
float32 sides as three products without lo·lo (`mm32`) — 16 bits of each float32 operand, against
tf32's 11, at two or three bfloat16 products where tf32x3 takes three tf32 ones (each twice a
bfloat16 one), and no float32 operand held in registers (a plain load reaches the tensor cores from
shared memory). The band's σᵀ dx stays a single tf32 product. Under the interpreter, whose
bfloat16 dot is wrong, the same split products run in float32.
Offsets into the `[B, T, H, …]` inputs are int32 (`B·T·H·max(Dk, Dv, L) < 2³¹`, checked), buffer
bases int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from dla.ops.backbone.delta_common import decay, precisions
from dla.ops.backbone.delta_wy import BC, unit_lower_inverse_in_place
from dla.ops.levels import running_min
from dla.ops.readout.cost_delta import BAND_KEYS, OBJECT_BWD_DV, band_visits
from dla.ops.readout.objects_delta import window_plan
from dla.ops.state import state_dtype
from dla.ops.triton_utils import mm, mm16, mm32, mmr, pow2, split_products

__all__ = ["objects_delta_forward_triton", "objects_delta_backward_triton"]


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
def _rows_raw(X, tok, tc, valid, cols, H: tl.constexpr, D: tl.constexpr):
    """Rows of a [B, T, H, D] tensor at the chunk's tokens, columns `cols`, in X's dtype (0 elsewhere)."""
    return tl.load(X + tok * D + tc[:, None] * (H * D) + cols[None, :], mask=valid[:, None] & (cols[None, :] < D),
                   other=0.0)


@triton.jit
def _rows(X, tok, tc, valid, cols, H: tl.constexpr, D: tl.constexpr):
    """`_rows_raw` in float32."""
    return _rows_raw(X, tok, tc, valid, cols, H, D).to(tl.float32)


@triton.jit
def _cols_raw(X, tok, tc, valid, rows, H: tl.constexpr, D: tl.constexpr):
    """The transpose of `_rows`, [len(rows), C], in X's dtype."""
    return tl.load(X + tok * D + tc[None, :] * (H * D) + rows[:, None], mask=valid[None, :] & (rows[:, None] < D),
                   other=0.0)


@triton.jit
def _cols(X, tok, tc, valid, rows, H: tl.constexpr, D: tl.constexpr):
    """The transpose of `_rows`: [len(rows), C]."""
    return _cols_raw(X, tok, tc, valid, rows, H, D).to(tl.float32)


@triton.jit
def _level_span(CM, tokL, tc, valid, s, H: tl.constexpr, L: tl.constexpr, C: tl.constexpr):
    """`(r0 [C], m)`: for every valid query row `t`, the levels holding a position of `s` [C] lie in
    `r0[t] … r0[t] + m − 1`, with `r0[t] = ℓ_t(max s)` and `m` the most levels a row spans from
    `max s` down to `min s` (`c[t, r]` does not increase in `r`). A key chunk meets one or two
    levels of each query where segments are long, so the [C, C] passes over levels below run `m`
    times, not `L`; finding the span takes one pass over the `L` levels on [C] vectors."""
    s_lo = tl.min(s, axis=0)
    s_hi = tl.max(s, axis=0)
    r0 = tl.zeros([C], dtype=tl.int32)
    r1 = tl.zeros([C], dtype=tl.int32)
    for r in range(L):
        cm = tl.load(CM + tokL + tc * (H * L) + r, mask=valid, other=0)
        r0 += tl.where(cm > s_hi, 1, 0)
        r1 += tl.where(cm > s_lo, 1, 0)
    m = tl.max(tl.where(valid, tl.minimum(r1, L - 1) - r0 + 1, 0), axis=0)
    return r0, m


@triton.jit
def _band_weights(CM, LAM, tokL, tc, valid, s, H: tl.constexpr, L: tl.constexpr, C: tl.constexpr,
                  TRANSPOSED: tl.constexpr = False):
    """Λ[t, s] = λ_t[ℓ_t(s)] for the chunk's rows t and the positions s [C] (module doc); Λᵀ (rows
    s, columns t) when TRANSPOSED, built as such."""
    r0, m = _level_span(CM, tokL, tc, valid, s, H, L, C)
    return _span_weights(CM, LAM, tokL, tc, valid, s, r0, m, H, L, C, TRANSPOSED)


@triton.jit
def _span_weights(CM, LAM, tokL, tc, valid, s, r0, m, H: tl.constexpr, L: tl.constexpr, C: tl.constexpr,
                  TRANSPOSED: tl.constexpr = False):
    """`_band_weights` over the levels of the span `(r0, m)` of `_level_span` only: below `r0[t]`
    every `[c[t, r] > s]` is 1, so the first of them starts from `above = 1`."""
    out = tl.zeros([C, C], dtype=tl.float32)
    above = tl.full([C, C], 1.0, tl.float32)
    for j in range(m):
        r = r0 + j
        at = tokL + tc * (H * L) + r
        cm = tl.load(CM + at, mask=valid & (r < L), other=-(1 << 30))
        lam = tl.load(LAM + at, mask=valid & (r < L), other=0.0).to(tl.float32)
        if TRANSPOSED:
            ind = tl.where(cm[None, :] > s[:, None], 1.0, 0.0)
            out += lam[None, :] * (above - ind)
        else:
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


@triton.jit
def _chunk_range(PHI, n, w, a, e, H: tl.constexpr, C: tl.constexpr, R: tl.constexpr):
    """`(j0, j1)`: the window-relative chunks `[j0, j1)` holding tokens of the element `[a, e]`
    (empty when j0 ≥ j1)."""
    phi = tl.load(PHI + n // H)
    lo = tl.maximum(a, w * R * C - phi)
    hi = tl.minimum(e, (w + 1) * R * C - phi - 1)
    j0 = (lo + phi) // C - w * R
    j1 = tl.where(hi >= lo, (hi + phi) // C - w * R + 1, j0)
    return j0, j1


@triton.jit
def _visits_before(i, G: tl.constexpr):
    """Σ_{i' < i} ⌈i' / G⌉: the band's visits (query chunk, block of G key chunks) of a window's
    query chunks before chunk i — where chunk i's XP slots start (`VISITS` = the window's, R's)."""
    m = tl.maximum(i - 1, 0)
    q = m // G
    return G * q * (q + 1) // 2 + (m - q * G) * (q + 1)


@triton.jit
def _query_frame(Q, K, BETA, TI, n, c, NC, tok, tc, valid, Gc, gam, ck, H: tl.constexpr, DK: tl.constexpr,
                 C: tl.constexpr, PREC: tl.constexpr, PREC_CHAIN: tl.constexpr, SPLIT: tl.constexpr,
                 INTERP: tl.constexpr):
    """Chunk c's Ã = (QKᵀ ⊙ Γ) T⁻¹ diag(β) and its queries in the chunk's frame x = Q̂ = diag(γ)Q −
    Ã diag(γ)K, which the transport carries back chunk by chunk — both transposed, built as such:
    (Ãᵀ = diag(β) T⁻ᵀ (KQᵀ ⊙ Γᵀ) [C, C], xᵀ = Qᵀ diag(γ) − Kᵀ diag(γ) Ãᵀ [BKP, C])."""
    o = tl.arange(0, C)
    beta = tl.load(BETA + tok + tc * H, mask=valid, other=0.0).to(tl.float32)
    qT = _cols_raw(Q, tok, tc, valid, ck, H, DK)
    k = tl.load(K + tok * DK + tc[:, None] * (H * DK) + ck[None, :], mask=valid[:, None] & (ck[None, :] < DK),
                other=0.0)
    AqkT = mm16(k, qT, PREC, SPLIT, INTERP) * decay(Gc, tl.zeros([C], dtype=tl.int32), C, False, True)
    MT = tl.load(TI + (n * NC + c).to(tl.int64) * C * C + o[None, :] * C + o[:, None]) * beta[:, None]
    AtT = mm32(MT, AqkT, PREC_CHAIN, SPLIT, INTERP)  # a product with the triangular inverse
    kT = _cols_raw(K, tok, tc, valid, ck, H, DK)
    return AtT, qT.to(tl.float32) * gam[None, :] - mm(kT, gam[:, None] * AtT, PREC_CHAIN, SPLIT, INTERP)


@triton.jit
def _step_back(xT, EB, K, n, p, NC, tokp, tcp, validp, gamp, gam_Cp, ck, H: tl.constexpr, DK: tl.constexpr,
               C: tl.constexpr, PREC_CHAIN: tl.constexpr, SPLIT: tl.constexpr, INTERP: tl.constexpr):
    """One step of the transport back through chunk p, transposed: (σᵀ = Ē_pᵀ xᵀ [C, C],
    xᵀ ← γ_C xᵀ − K_pᵀ diag(γ) σᵀ)."""
    o = tl.arange(0, C)
    ET = tl.load(EB + (n * NC + p).to(tl.int64) * DK * C + ck[None, :] * C + o[:, None], mask=ck[None, :] < DK,
                 other=0.0)
    sigmaT = mm32(ET, xT, PREC_CHAIN, SPLIT, INTERP)
    kT = _cols_raw(K, tokp, tcp, validp, ck, H, DK)
    return sigmaT, gam_Cp * xT - mm(kT, gamp[:, None] * sigmaT, PREC_CHAIN, SPLIT, INTERP)


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
    unit_lower_inverse_in_place(base, C, C, C, BC, PREC_SOLVE)
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
def _initial_objects_kernel(FIRST, LAST, S0, RB, OB, NW, L: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                            BKP: tl.constexpr, BV: tl.constexpr, RESIDUAL: tl.constexpr):
    """Window 0's object r of row n (one Dv tile): the sum of the initial slots its span holds
    (slot j sits at position −1 − j) in float32, stored as copy (OB) and, for 16-bit inputs,
    rounding residual (RB), as the object pass keeps every window's masters."""
    n = tl.program_id(0)
    r = tl.program_id(1)
    rk = tl.arange(0, BKP)
    cv = tl.program_id(2) * BV + tl.arange(0, BV)
    tile = rk[:, None] * DV + cv[None, :]
    mt = (rk[:, None] < DK) & (cv[None, :] < DV)
    D = DK * DV
    a = tl.load(FIRST + n * (NW + 1) * L + r)
    e = tl.load(LAST + n * (NW + 1) * L + r)
    acc = tl.zeros([BKP, BV], dtype=tl.float32)
    for j in range(L):
        if (a <= -1 - j) & (-1 - j <= e):
            acc += tl.load(S0 + (n * L + j).to(tl.int64) * D + tile, mask=mt, other=0.0)
    if RESIDUAL:
        tl.store(RB + (n * 2 * L + r).to(tl.int64) * D + tile,
                 (acc - acc.to(OB.dtype.element_ty).to(tl.float32)).to(RB.dtype.element_ty), mask=mt)
    tl.store(OB + (n * NW * L + r).to(tl.int64) * D + tile, acc.to(OB.dtype.element_ty), mask=mt)


@triton.jit
def _object_kernel(V, PHI, KT, SUF, FIRST, LAST, RB, OB, SF, T, NW, H: tl.constexpr, L: tl.constexpr,
                   DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr, R: tl.constexpr, BKP: tl.constexpr,
                   BV: tl.constexpr, RESIDUAL: tl.constexpr, FINAL: tl.constexpr, PREC: tl.constexpr,
                   PREC_CHAIN: tl.constexpr):
    n = tl.program_id(0)
    NC = NW * R
    o = tl.arange(0, C)
    rk = tl.arange(0, BKP)
    cv = tl.program_id(1) * BV + tl.arange(0, BV)
    tile = rk[:, None] * DV + cv[None, :]
    mt = (rk[:, None] < DK) & (cv[None, :] < DV)
    D = DK * DV
    for w in range(NW):
        # a master is its copy in OB plus, for 16-bit inputs, the rounding residual in RB (two
        # windows' in turn); after the last window the float32 sums are the final state SF
        res_src = RB + ((n * 2 + w % 2) * L).to(tl.int64) * D
        res_dst = RB + ((n * 2 + (w + 1) % 2) * L).to(tl.int64) * D
        suf = tl.load(SUF + (n * NW + w).to(tl.int64) * DK * DK + rk[:, None] * DK + rk[None, :],
                      mask=(rk[:, None] < DK) & (rk[None, :] < DK), other=0.0)
        now = (n * (NW + 1) + w) * L
        nxt = (n * (NW + 1) + w + 1) * L
        copies = OB + ((n * NW + w) * L).to(tl.int64) * D  # this window's objects
        for r2 in range(L):
            a2 = tl.load(FIRST + nxt + r2)
            e2 = tl.load(LAST + nxt + r2)
            acc = tl.zeros([BKP, BV], dtype=tl.float32)
            if a2 <= e2:
                held_any = tl.full([], 0, tl.int32)
                for r in range(L):
                    a = tl.load(FIRST + now + r)
                    e = tl.load(LAST + now + r)
                    if (a <= e) & (a2 <= a) & (e <= e2):  # E' holds E: its master joins the sum
                        acc += tl.load(copies + r * D + tile, mask=mt, other=0.0).to(tl.float32)
                        if RESIDUAL:
                            acc += tl.load(res_src + r * D + tile, mask=mt, other=0.0).to(tl.float32)
                        held_any += 1
                if held_any > 0:  # re-framed only when it holds an object (else made of the window's tokens)
                    acc = tl.dot(suf, acc, input_precision=PREC_CHAIN)
                j0, j1 = _chunk_range(PHI, n, w, a2, e2, H, C, R)
                for j in range(j0, j1):
                    c = w * R + j
                    t, valid, tc, tok = _tokens(PHI, n, c, T, H, C)
                    member = valid & (t >= a2) & (t <= e2)
                    kt = tl.load(KT + (n * NC + c).to(tl.int64) * DK * C + rk[:, None] * C + o[None, :],
                                 mask=(rk[:, None] < DK) & member[None, :], other=0.0)
                    acc += tl.dot(kt, _rows(V, tok, tc, member, cv, H, DV), input_precision=PREC)
            if w < NW - 1:
                if RESIDUAL:
                    tl.store(res_dst + r2 * D + tile,
                             (acc - acc.to(OB.dtype.element_ty).to(tl.float32)).to(RB.dtype.element_ty), mask=mt)
                tl.store(copies + (L + r2) * D + tile, acc.to(OB.dtype.element_ty), mask=mt)
            elif FINAL:
                tl.store(SF + (n * L + r2).to(tl.int64) * D + tile, acc, mask=mt)
        tl.debug_barrier()  # the next window reads these masters


@triton.jit
def _readout_kernel(Q, K, V, LAM, CM, G, BETA, PHI, TI, EB, FIRST, LAST, OB, O, T, scale, H: tl.constexpr,
                    L: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr, R: tl.constexpr,
                    BKP: tl.constexpr, BV: tl.constexpr, HAS_G: tl.constexpr, PREC: tl.constexpr,
                    PREC_CHAIN: tl.constexpr, SPLIT: tl.constexpr, INTERP: tl.constexpr):
    # Transposed throughout (oᵀ, xᵀ, σᵀ): every product's rows are then Dk or Dv (128 at the §7
    # shapes) or C, and the carried xᵀ and σᵀ enter the next products as their right operands
    # (through shared memory). Carried as [C, ·] left operands, the chain's products took Triton's
    # warp layout [num_warps, 1], which splits only the C = 64 rows: the warps held copies.
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
    AtT, xT = _query_frame(Q, K, BETA, TI, n, c, NC, tok, tc, valid, Gc, gam, ck, H, DK, C, PREC, PREC_CHAIN,
                           SPLIT, INTERP)
    LamT = _band_weights(CM, LAM, tokL, tc, valid, t, H, L, C, True)
    LamT = tl.where(o[None, :] >= o[:, None], LamT, 0.0)
    accT = mm(_cols_raw(V, tok, tc, valid, cv, H, DV), AtT * LamT, PREC, SPLIT, INTERP)
    for jj in range(c - w * R):
        p = c - 1 - jj
        tp, validp, tcp, tokp = _tokens(PHI, n, p, T, H, C)
        Gp, gamp, rhop, gam_Cp = _gates(G, tokp, tcp, validp, H, C, HAS_G)
        sigmaT, xT = _step_back(xT, EB, K, n, p, NC, tokp, tcp, validp, gamp, gam_Cp, ck, H, DK, C, PREC_CHAIN,
                                SPLIT, INTERP)
        LpT = _band_weights(CM, LAM, tokL, tc, valid, tp, H, L, C, True)
        accT += mm(_cols_raw(V, tok, tcp, validp, cv, H, DV), sigmaT * LpT, PREC, SPLIT, INTERP)
    now = (n * (NW + 1) + w) * L
    for r in range(L):
        a = tl.load(FIRST + now + r)
        e = tl.load(LAST + now + r)
        if a <= e:
            Wr = _point_weights(CM, LAM, tokL, tc, valid, a, H, L, C)
            ST = tl.load(OB + ((n * NW + w) * L + r).to(tl.int64) * DK * DV + ck[None, :] * DV + cv[:, None],
                         mask=(ck[None, :] < DK) & (cv[:, None] < DV), other=0.0)
            accT += mm(ST, xT, PREC, SPLIT, INTERP) * Wr[None, :]
    tl.store(O + tok * DV + tc[None, :] * (H * DV) + cv[:, None], (scale * accT).to(O.dtype.element_ty),
             mask=valid[None, :] & (cv[:, None] < DV))


# --------------------------------------------------------------------------------------------
# Backward kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _transposed(SCR, X, C: tl.constexpr):
    """Xᵀ of a [C, C] register tile by a round trip through the program's scratch: `tl.trans` of a
    dot's result is what Triton 3.4–3.7.0 miscompiles on Hopper (fla issue #640)."""
    o = tl.arange(0, C)
    tl.store(SCR + o[:, None] * C + o[None, :], X)
    tl.debug_barrier()
    Y = tl.load(SCR + o[None, :] * C + o[:, None])
    tl.debug_barrier()
    return Y


@triton.jit
def _scatter_levels(dl, CM, tokL, tc, valid, s, X, H: tl.constexpr, L: tl.constexpr, LP: tl.constexpr,
                    C: tl.constexpr, TRANSPOSED: tl.constexpr = False):
    """dl [C, LP] += Σ_s X[t, s] at column ℓ_t(s) (X [C, C] over the positions s [C]; given as Xᵀ
    when TRANSPOSED)."""
    r0, m = _level_span(CM, tokL, tc, valid, s, H, L, C)
    return _scatter_span(dl, CM, tokL, tc, valid, s, X, r0, m, H, L, LP, C, TRANSPOSED)


@triton.jit
def _scatter_span(dl, CM, tokL, tc, valid, s, X, r0, m, H: tl.constexpr, L: tl.constexpr, LP: tl.constexpr,
                  C: tl.constexpr, TRANSPOSED: tl.constexpr = False):
    """`_scatter_levels` over the span `(r0, m)` of `_level_span`, the only columns it changes:
    column r gains P_{r−1} − P_r with P_r[t] = Σ_s X[t, s] [c[t, r] > s] (P_{−1} = Σ_s X[t, s];
    below `r0[t]`, `P_r = P_{−1}`)."""
    cols = tl.arange(0, LP)
    above = tl.sum(X, axis=0 if TRANSPOSED else 1)
    for j in range(m):
        r = r0 + j
        cm = tl.load(CM + tokL + tc * (H * L) + r, mask=valid & (r < L), other=-(1 << 30))
        if TRANSPOSED:
            ind = tl.sum(tl.where(cm[None, :] > s[:, None], X, 0.0), axis=0)
        else:
            ind = tl.sum(tl.where(cm[:, None] > s[None, :], X, 0.0), axis=1)
        dl += tl.where(cols[None, :] == r[:, None], (above - ind)[:, None], 0.0)
        above = ind
    return dl


@triton.jit
def _scatter_point(dl, CM, tokL, tc, valid, a, x, H: tl.constexpr, L: tl.constexpr, LP: tl.constexpr,
                   C: tl.constexpr):
    """dl [C, LP] += x[t] at column ℓ_t(a)."""
    cols = tl.arange(0, LP)
    above = tl.full([C], 1.0, tl.float32)
    for r in range(L):
        cm = tl.load(CM + tokL + tc * (H * L) + r, mask=valid, other=0)
        ind = tl.where(cm > a, 1.0, 0.0)
        dl += tl.where(cols[None, :] == r, (x * (above - ind))[:, None], 0.0)
        above = ind
    return dl


@triton.jit
def _readout_bwd_chain_kernel(Q, K, V, LAM, CM, G, BETA, PHI, TI, EB, FIRST, LAST, OB, DO, XP, XF, DQH, DAT, DL, DVK,
                              DLAM, SPAN, T, scale, H: tl.constexpr, L: tl.constexpr, LP: tl.constexpr,
                              DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr, R: tl.constexpr, RP: tl.constexpr,
                              BKP: tl.constexpr, BVP: tl.constexpr, KEYS: tl.constexpr, VISITS: tl.constexpr,
                              HAS_G: tl.constexpr, PREC: tl.constexpr, PREC_CHAIN: tl.constexpr,
                              SPLIT: tl.constexpr, INTERP: tl.constexpr):
    # transposed as the forward readout (Ãᵀ, xᵀ, dxᵀ, dÃᵀ); the buffers it writes keep their layouts
    c = tl.program_id(0)
    n = tl.program_id(1)
    NC = tl.num_programs(0)
    NW = NC // R
    w = c // R
    i = c - w * R
    o = tl.arange(0, C)
    ck = tl.arange(0, BKP)
    cv = tl.arange(0, BVP)
    # the band's visits of window w (query chunk i, block b of KEYS key chunks, b < ⌈i / KEYS⌉), in
    # the order of i then b: each holds the query before its step through the block's last chunk
    xp = XP + ((n * NW + w) * VISITS + _visits_before(i, KEYS)).to(tl.int64) * C * DK
    chunk = (n * NC + c).to(tl.int64)
    now = (n * (NW + 1) + w) * L
    t, valid, tc, tok = _tokens(PHI, n, c, T, H, C)
    tokL = tok * L
    Gc, gam, rho, gam_C = _gates(G, tok, tc, valid, H, C, HAS_G)
    AtT, xT = _query_frame(Q, K, BETA, TI, n, c, NC, tok, tc, valid, Gc, gam, ck, H, DK, C, PREC, PREC_CHAIN,
                           SPLIT, INTERP)
    # the band's level spans for this query chunk and each earlier key chunk p of the window
    # (`_level_span`'s r0 and r1 at p's last and first positions), from one pass over the levels
    # here: the band reads two [C] rows a step instead of the L levels
    pk = tl.arange(0, RP)
    s_hi = (w * R + pk) * C + C - 1 - tl.load(PHI + n // H)
    r0 = tl.zeros([C, RP], dtype=tl.int32)
    r1 = tl.zeros([C, RP], dtype=tl.int32)
    for r in range(L):
        cm = tl.load(CM + tokL + tc * (H * L) + r, mask=valid, other=0)
        r0 += tl.where(cm[:, None] > s_hi[None, :], 1, 0)
        r1 += tl.where(cm[:, None] > s_hi[None, :] - (C - 1), 1, 0)
    span = SPAN + (chunk * R * 2 + pk[None, :] * 2) * C + o[:, None]
    tl.store(span, r0.to(SPAN.dtype.element_ty), mask=pk[None, :] < i)
    tl.store(span + C, r1.to(SPAN.dtype.element_ty), mask=pk[None, :] < i)
    dl = tl.zeros([C, LP], dtype=tl.float32)
    # own chunk: o += (Ã ⊙ Λ) V, so dÃ = (dO Vᵀ) ⊙ Λ, dλ from dO Vᵀ ⊙ Ã, dV = (Ã ⊙ Λ)ᵀ dO
    causal = o[None, :] >= o[:, None]
    LamT = tl.where(causal, _band_weights(CM, LAM, tokL, tc, valid, t, H, L, C, True), 0.0)
    dALT = scale * mm16(_rows_raw(V, tok, tc, valid, cv, H, DV), _cols_raw(DO, tok, tc, valid, cv, H, DV), PREC,
                        SPLIT, INTERP)
    tl.store(DAT + chunk * C * C + o[None, :] * C + o[:, None], dALT * LamT)
    dl = _scatter_levels(dl, CM, tokL, tc, valid, t, tl.where(causal, dALT * AtT, 0.0), H, L, LP, C, True)
    dO = _rows_raw(DO, tok, tc, valid, cv, H, DV)
    tl.store(DVK + chunk * C * DV + o[:, None] * DV + cv[None, :], scale * mmr(AtT * LamT, dO, PREC, SPLIT, INTERP),
             mask=cv[None, :] < DV)
    # the chain to the window's frame; the query goes to its visit's XP slot before each block's last step
    for j in range(i):
        p = c - 1 - j
        pr = i - 1 - j  # p in the window
        top = (j == 0) | (pr % KEYS == KEYS - 1)  # the last step of p's block for this query
        tl.store(xp + (pr // KEYS) * C * DK + o[None, :] * DK + ck[:, None], xT.to(XP.dtype.element_ty),
                 mask=(ck[:, None] < DK) & top)
        tp, validp, tcp, tokp = _tokens(PHI, n, p, T, H, C)
        Gp, gamp, rhop, gam_Cp = _gates(G, tokp, tcp, validp, H, C, HAS_G)
        sigmaT, xT = _step_back(xT, EB, K, n, p, NC, tokp, tcp, validp, gamp, gam_Cp, ck, H, DK, C, PREC_CHAIN,
                                SPLIT, INTERP)
    # objects: Uᵀ = S̄ dOᵀ, dxᵀ = Σ Uᵀ diag(W), dW = U·x (D = Σ_t W x dÕᵀ: `_object_grad_kernel`, XF)
    tl.store(XF + chunk * C * DK + o[None, :] * DK + ck[:, None], xT, mask=ck[:, None] < DK)
    dxT = tl.zeros([BKP, C], dtype=tl.float32)
    dOT = _cols_raw(DO, tok, tc, valid, cv, H, DV)  # loaded again here: kept across the chain, it spilled
    for r in range(L):
        a = tl.load(FIRST + now + r)
        e = tl.load(LAST + now + r)
        if a <= e:
            Wr = _point_weights(CM, LAM, tokL, tc, valid, a, H, L, C)
            S = tl.load(OB + ((n * NW + w) * L + r).to(tl.int64) * DK * DV + ck[:, None] * DV + cv[None, :],
                        mask=(ck[:, None] < DK) & (cv[None, :] < DV), other=0.0)
            UT = scale * mm16(S, dOT, PREC, SPLIT, INTERP)
            dxT += Wr[None, :] * UT
            dl = _scatter_point(dl, CM, tokL, tc, valid, a, tl.sum(UT * xT, axis=0), H, L, LP, C)
    # the band pass takes the query's dx and dλ on from here; a window's first chunk has no band
    tl.store(DQH + chunk * C * DK + o[None, :] * DK + ck[:, None], dxT, mask=ck[:, None] < DK)
    lc = tl.arange(0, LP)
    if i == 0:
        tl.store(DLAM + tokL + tc[:, None] * (H * L) + lc[None, :], dl.to(DLAM.dtype.element_ty),
                 mask=valid[:, None] & (lc[None, :] < L))
    else:
        tl.store(DL + chunk * C * LP + o[:, None] * LP + lc[None, :], dl)


@triton.jit
def _readout_bwd_band_kernel(K, V, LAM, CM, G, PHI, EB, DO, XP, XS, SCR, DQH, DL, DEB, DHB, DGC, DVK, DLAM, SPAN, T,
                             scale,
                             H: tl.constexpr, L: tl.constexpr, LP: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                             C: tl.constexpr, R: tl.constexpr, BKP: tl.constexpr, BVP: tl.constexpr,
                             BKB: tl.constexpr, BVB: tl.constexpr, KEYS: tl.constexpr, VISITS: tl.constexpr,
                             HAS_G: tl.constexpr, PREC: tl.constexpr, PREC_CHAIN: tl.constexpr,
                             SPLIT: tl.constexpr, INTERP: tl.constexpr):
    w = tl.program_id(0)
    n = tl.program_id(1)
    NW = tl.num_programs(0)
    NC = NW * R
    o = tl.arange(0, C)
    kb0 = tl.arange(0, BKB)
    vb0 = tl.arange(0, BVB)
    lc = tl.arange(0, LP)
    xp = XP + ((n * NW + w) * VISITS).to(tl.int64) * C * DK
    xs = XS + ((n * NW + w) * KEYS).to(tl.int64) * C * DK
    scr = SCR + (n * NC + w * R).to(tl.int64) * C * C
    # key chunks in order, KEYS at a time, so that each query meets them as its adjoint climbs from
    # the window's frame back to its own chunk, and takes a block's steps back to back (a visit: its
    # dx and dλ go back to dQ̂ and DL once per visit). XP holds the query before the block's last
    # step; the visit steps it back through the block into the scratch XS first (a step's own terms
    # read it, never the dx chain: its rounding does not compound). Every [C, ·] tile is taken BKB
    # or BVB columns at a time and the key chunks' sums dĒ, dH, dV are read-modify-written at each
    # step (the block's working set, in L2): whole-width float32 tiles, or the sums held in
    # registers, spill
    for p0 in range(0, R, KEYS):
        for pk in tl.static_range(KEYS):  # the band is dĒ's and dH's first writer
            if p0 + pk < R:
                chunk = (n * NC + w * R + p0 + pk).to(tl.int64)
                for kb in tl.static_range(BKP // BKB):
                    ck = kb * BKB + kb0
                    tl.store(DEB + chunk * DK * C + ck[:, None] * C + o[None, :], tl.zeros([BKB, C], dtype=tl.float32),
                             mask=ck[:, None] < DK)
                    tl.store(DHB + chunk * C * DK + o[:, None] * DK + ck[None, :], tl.zeros([C, BKB], dtype=tl.float32),
                             mask=ck[None, :] < DK)
        kk = tl.arange(0, KEYS)
        dgc = tl.zeros([KEYS], dtype=tl.float32)  # dγ_C of the block's key chunks: Σ dx ∘ x
        tl.debug_barrier()
        for i in range(p0 + 1, R):
            c = w * R + i
            t, valid, tc, tok = _tokens(PHI, n, c, T, H, C)
            tokL = tok * L
            dqh = DQH + (n * NC + c).to(tl.int64) * C * DK
            dl_at = DL + (n * NC + c).to(tl.int64) * C * LP + o[:, None] * LP + lc[None, :]
            p_top = tl.minimum(p0 + KEYS, i) - 1
            top = xp + (_visits_before(i, KEYS) + p0 // KEYS) * C * DK
            if KEYS == 1:  # the visit's one step reads its XP slot as it is
                x_block = top
            else:
                x_block = xs
                for kb in tl.static_range(BKP // BKB):
                    ck = kb * BKB + kb0
                    tl.store(xs + (p_top - p0) * C * DK + o[:, None] * DK + ck[None, :],
                             tl.load(top + o[:, None] * DK + ck[None, :], mask=ck[None, :] < DK, other=0.0),
                             mask=ck[None, :] < DK)
                tl.debug_barrier()
            # `_step_back`'s step, by BKB columns as the rest of the band: called here, its whole-width
            # tiles made the band spill more (`python -m perf.sm90_resources`)
            for back in range(p_top - p0):  # through chunk ph: x before ph → x before ph − 1
                ph = p_top - back
                th, validh, tch, tokh = _tokens(PHI, n, w * R + ph, T, H, C)
                Gh, gamh, rhoh, gam_Ch = _gates(G, tokh, tch, validh, H, C, HAS_G)
                src = xs + (ph - p0) * C * DK
                eh = EB + (n * NC + w * R + ph).to(tl.int64) * DK * C
                sigma = tl.zeros([C, C], dtype=tl.float32)
                for kb in tl.static_range(BKP // BKB):
                    ck = kb * BKB + kb0
                    x_in = tl.load(src + o[:, None] * DK + ck[None, :], mask=ck[None, :] < DK, other=0.0)
                    E = tl.load(eh + ck[:, None] * C + o[None, :], mask=ck[:, None] < DK, other=0.0)
                    sigma += mm(x_in, E, PREC_CHAIN, SPLIT, INTERP)
                sigma = sigma * gamh[None, :]
                for kb in tl.static_range(BKP // BKB):
                    ck = kb * BKB + kb0
                    x_in = tl.load(src + o[:, None] * DK + ck[None, :], mask=ck[None, :] < DK, other=0.0)
                    x_lo = gam_Ch * x_in.to(tl.float32) - mmr(sigma, _rows_raw(K, tokh, tch, validh, ck, H, DK),
                                                              PREC_CHAIN, SPLIT, INTERP)
                    tl.store(src - C * DK + o[:, None] * DK + ck[None, :], x_lo.to(XS.dtype.element_ty),
                             mask=ck[None, :] < DK)
                tl.debug_barrier()
            for pi in range(p0, p_top + 1):
                p = w * R + pi
                tp, validp, tcp, tokp = _tokens(PHI, n, p, T, H, C)
                Gp, gamp, rhop, gam_Cp = _gates(G, tokp, tcp, validp, H, C, HAS_G)
                chunk = (n * NC + p).to(tl.int64)
                eb = EB + chunk * DK * C
                deb = DEB + chunk * DK * C
                dhb = DHB + chunk * C * DK
                dvk = DVK + chunk * C * DV
                x_at = x_block + (pi - p0) * C * DK
                # σ = x Ē_p, dx Hᵀ and dγ_C's Σ dx ∘ x, over Dk by blocks
                sigma = tl.zeros([C, C], dtype=tl.float32)
                dxH = tl.zeros([C, C], dtype=tl.float32)
                dgc_p = tl.zeros([C], dtype=tl.float32)
                for kb in tl.static_range(BKP // BKB):
                    ck = kb * BKB + kb0
                    x_in = tl.load(x_at + o[:, None] * DK + ck[None, :], mask=ck[None, :] < DK, other=0.0)
                    E = tl.load(eb + ck[:, None] * C + o[None, :], mask=ck[:, None] < DK, other=0.0)
                    sigma += mm(x_in, E, PREC, SPLIT, INTERP)  # a step's own term: its rounding does not compound
                    dx = tl.load(dqh + o[:, None] * DK + ck[None, :], mask=ck[None, :] < DK, other=0.0)
                    dxH += mmr(dx, _cols_raw(K, tokp, tcp, validp, ck, H, DK), PREC_CHAIN, SPLIT, INTERP)
                    dgc_p += tl.sum(dx * x_in.to(tl.float32), axis=1)
                dgc += tl.where(kk == pi - p0, tl.sum(dgc_p, axis=0), 0.0)
                dxH = dxH * gamp[None, :]
                dAL = tl.zeros([C, C], dtype=tl.float32)
                for vb in tl.static_range(BVP // BVB):
                    cv = vb * BVB + vb0
                    dAL += mm16(_rows_raw(DO, tok, tc, valid, cv, H, DV), _cols_raw(V, tokp, tcp, validp, cv, H, DV),
                                PREC, SPLIT, INTERP)
                dAL = scale * dAL
                at = SPAN + ((n * NC + c).to(tl.int64) * R * 2 + pi * 2) * C + o  # the chain's `_level_span`
                r0 = tl.load(at).to(tl.int32)
                m = tl.max(tl.where(valid, tl.minimum(tl.load(at + C).to(tl.int32), L - 1) - r0 + 1, 0), axis=0)
                Lp = _span_weights(CM, LAM, tokL, tc, valid, tp, r0, m, H, L, C)
                last = i == pi + 1  # the query's last key chunk: its dλ is whole
                # a step changes only its span's columns of dλ: it moves those alone, and the
                # last step the whole row on to DLAM
                span = valid[:, None] & (((lc[None, :] >= r0[:, None]) & (lc[None, :] < r0[:, None] + m)) | last)
                dl = _scatter_span(tl.load(dl_at, mask=span, other=0.0), CM, tokL, tc, valid, tp, dAL * sigma, r0, m,
                                   H, L, LP, C)
                tl.store(DLAM + tokL + tc[:, None] * (H * L) + lc[None, :], dl.to(DLAM.dtype.element_ty),
                         mask=valid[:, None] & (lc[None, :] < L) & last)
                tl.store(dl_at, dl, mask=span & (not last))
                dsigma = dAL * Lp - dxH
                SLt = _transposed(scr, sigma * Lp, C)
                for vb in tl.static_range(BVP // BVB):
                    cv = vb * BVB + vb0
                    at = dvk + o[:, None] * DV + cv[None, :]
                    dO = _rows_raw(DO, tok, tc, valid, cv, H, DV)
                    tl.store(at, tl.load(at, mask=cv[None, :] < DV, other=0.0)
                             + scale * mmr(SLt, dO, PREC, SPLIT, INTERP), mask=cv[None, :] < DV)
                sigT = _transposed(scr, sigma, C)
                dsT = _transposed(scr, dsigma, C)
                # dĒ += dσᵀ x, dH −= σᵀ dx, then the query's dx on through the step: dx ← γ_C dx + dσ Ē
                for kb in tl.static_range(BKP // BKB):
                    ck = kb * BKB + kb0
                    mk = ck[None, :] < DK
                    x_in = tl.load(x_at + o[:, None] * DK + ck[None, :], mask=mk, other=0.0)
                    at = deb + ck[None, :] * C + o[:, None]  # dĒᵀ [C, BKB] in Ē's [Dk, C] layout
                    tl.store(at, tl.load(at, mask=mk, other=0.0) + mmr(dsT, x_in, PREC, SPLIT, INTERP), mask=mk)
                    dx_at = dqh + o[:, None] * DK + ck[None, :]
                    dx = tl.load(dx_at, mask=mk, other=0.0)
                    at = dhb + o[:, None] * DK + ck[None, :]
                    # dĒ's and dH's step terms, like σ, do not compound: single-pass products
                    tl.store(at, tl.load(at, mask=mk, other=0.0) - tl.dot(sigT, dx, input_precision=PREC), mask=mk)
                    ET = tl.load(eb + ck[None, :] * C + o[:, None], mask=mk, other=0.0)
                    tl.store(dx_at, gam_Cp * dx + mm32(dsigma, ET, PREC_CHAIN, SPLIT, INTERP), mask=mk)
                tl.debug_barrier()  # the next step reads this query's dx and dλ, the next query the key chunks' sums
        first = (n * NC + w * R + p0).to(tl.int64)
        tl.store(DGC + first + kk, dgc, mask=p0 + kk < R)


@triton.jit
def _object_grad_kernel(DO, LAM, CM, PHI, FIRST, LAST, XF, DR, T, scale, H: tl.constexpr, L: tl.constexpr,
                        DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr, R: tl.constexpr, BKP: tl.constexpr,
                        BV: tl.constexpr, PREC: tl.constexpr):
    """D_E = Σ_t λ_t[ℓ_t(a_E)] x_t^{(F)} dÕ_tᵀ over the window's queries, one program per (window,
    row, element × Dv tile), from the queries in the window's frame (XF)."""
    w = tl.program_id(0)
    n = tl.program_id(1)
    NW = tl.num_programs(0)
    NC = NW * R
    NVT: tl.constexpr = (DV + BV - 1) // BV
    r = tl.program_id(2) // NVT
    o = tl.arange(0, C)
    ck = tl.arange(0, BKP)
    cv = (tl.program_id(2) % NVT) * BV + tl.arange(0, BV)
    now = (n * (NW + 1) + w) * L
    a = tl.load(FIRST + now + r)
    e = tl.load(LAST + now + r)
    acc = tl.zeros([BKP, BV], dtype=tl.float32)
    if a <= e:
        for i in range(R):
            c = w * R + i
            t, valid, tc, tok = _tokens(PHI, n, c, T, H, C)
            Wr = _point_weights(CM, LAM, tok * L, tc, valid, a, H, L, C)
            xT = tl.load(XF + (n * NC + c).to(tl.int64) * C * DK + o[None, :] * DK + ck[:, None],
                         mask=(ck[:, None] < DK) & valid[None, :], other=0.0)
            acc += tl.dot(xT * Wr[None, :], scale * _rows(DO, tok, tc, valid, cv, H, DV), input_precision=PREC)
    tl.store(DR + (now + r).to(tl.int64) * DK * DV + ck[:, None] * DV + cv[None, :], acc,
             mask=(ck[:, None] < DK) & (cv[None, :] < DV))


@triton.jit
def _object_bwd_kernel(V, PHI, KT, SUF, FIRST, LAST, OB, DR, DKT, DVK, DSUF, T, NW, H: tl.constexpr,
                       L: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr, R: tl.constexpr,
                       RP: tl.constexpr, BKP: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
                       PREC_CHAIN: tl.constexpr):
    """Windows in reverse: D^w = D_readout^w + Suf_Fᵀ D' on the elements each E' holds; the
    partial (this Dv tile's) dSuf_F = Σ D' (Σ S̄)ᵀ, the objects S̄ from their copies in the inputs'
    dtype (SPEC §3.1: objects are rounded once for the products, as fla rounds its chunk states),
    and dK̃ = D' v; dv += D'ᵀ K̃. DR [N, NW + 1, L, Dk, Dv] holds D_readout^w in slot w
    (`_object_grad_kernel`) and the final dS in slot NW, and each slot turns into D^w in place (a
    program owns its Dv tile's columns); D^0 ends in slot 0. DKT [N, Dv/BV, NC, Dk, C] holds each
    tile's dK̃, every chunk written."""
    n = tl.program_id(0)
    vt = tl.program_id(1)
    NVT = tl.num_programs(1)
    NC = NW * R
    o = tl.arange(0, C)
    rk = tl.arange(0, BKP)
    cv = vt * BV + tl.arange(0, BV)
    tile = rk[:, None] * DV + cv[None, :]
    tileT = rk[None, :] * DV + cv[:, None]
    mt = (rk[:, None] < DK) & (cv[None, :] < DV)
    mtT = (rk[None, :] < DK) & (cv[:, None] < DV)
    D = DK * DV
    js = tl.arange(0, RP)
    for ww in range(NW):
        w = NW - 1 - ww
        # the window's chunks whose dK̃ this tile has written: a chunk's first element stores it,
        # later ones (an element edge inside the chunk) add to it, and chunks no element holds
        # get zeros at the end — no zero fill before the kernel, no read of one
        touched = tl.zeros([RP], dtype=tl.int32)
        nxt = DR + ((n * (NW + 1) + w + 1) * L).to(tl.int64) * D
        cur = DR + ((n * (NW + 1) + w) * L).to(tl.int64) * D
        objects = OB + ((n * NW + w) * L).to(tl.int64) * D
        now = (n * (NW + 1) + w) * L
        after = (n * (NW + 1) + w + 1) * L
        sufT = tl.load(SUF + (n * NW + w).to(tl.int64) * DK * DK + rk[None, :] * DK + rk[:, None],
                       mask=(rk[:, None] < DK) & (rk[None, :] < DK), other=0.0)
        dsuf = tl.zeros([BKP, BKP], dtype=tl.float32)
        for r2 in range(L):
            a2 = tl.load(FIRST + after + r2)
            e2 = tl.load(LAST + after + r2)
            if a2 <= e2:
                Dn = tl.load(nxt + r2 * D + tile, mask=mt, other=0.0)
                gathered = tl.zeros([BV, BKP], dtype=tl.float32)
                held_any = tl.full([], 0, tl.int32)
                for r in range(L):
                    a = tl.load(FIRST + now + r)
                    e = tl.load(LAST + now + r)
                    held = (a <= e) & (a2 <= a) & (e <= e2)
                    gathered += tl.load(objects + r * D + tileT, mask=mtT & held, other=0.0).to(tl.float32)
                    held_any += held.to(tl.int32)
                if held_any > 0:
                    DT = tl.dot(sufT, Dn, input_precision=PREC_CHAIN)
                    dsuf += tl.dot(Dn, gathered, input_precision=PREC_CHAIN)
                    for r in range(L):
                        a = tl.load(FIRST + now + r)
                        e = tl.load(LAST + now + r)
                        if (a <= e) & (a2 <= a) & (e <= e2):
                            tl.store(cur + r * D + tile, tl.load(cur + r * D + tile, mask=mt, other=0.0) + DT,
                                     mask=mt)
                j0, j1 = _chunk_range(PHI, n, w, a2, e2, H, C, R)
                for j in range(j0, j1):
                    c = w * R + j
                    t, valid, tc, tok = _tokens(PHI, n, c, T, H, C)
                    member = valid & (t >= a2) & (t <= e2)
                    chunk = (n * NC + c).to(tl.int64)
                    vT = tl.load(V + tok * DV + tc[None, :] * (H * DV) + cv[:, None],
                                 mask=member[None, :] & (cv[:, None] < DV), other=0.0).to(tl.float32)
                    dkt = DKT + ((n * NVT + vt) * NC + c).to(tl.int64) * DK * C + rk[:, None] * C + o[None, :]
                    seen = tl.sum(tl.where(js == j, touched, 0), axis=0) > 0
                    tl.store(dkt, tl.load(dkt, mask=(rk[:, None] < DK) & seen, other=0.0)
                             + tl.dot(Dn, vT, input_precision=PREC), mask=rk[:, None] < DK)
                    touched = tl.where(js == j, 1, touched)
                    ktT = tl.load(KT + chunk * DK * C + rk[None, :] * C + o[:, None],
                                  mask=(rk[None, :] < DK) & member[:, None], other=0.0)
                    dvk = DVK + chunk * C * DV + o[:, None] * DV + cv[None, :]
                    tl.store(dvk, tl.load(dvk, mask=cv[None, :] < DV, other=0.0)
                             + tl.dot(ktT, Dn, input_precision=PREC), mask=cv[None, :] < DV)
                tl.debug_barrier()
        tl.store(DSUF + ((n * NVT + vt) * NW + w).to(tl.int64) * DK * DK + rk[:, None] * DK + rk[None, :], dsuf,
                 mask=(rk[:, None] < DK) & (rk[None, :] < DK))
        for j in range(R):
            if tl.sum(tl.where(js == j, touched, 0), axis=0) == 0:
                tl.store(DKT + ((n * NVT + vt) * NC + w * R + j).to(tl.int64) * DK * C + rk[:, None] * C + o[None, :],
                         tl.zeros([BKP, C], dtype=tl.float32), mask=rk[:, None] < DK)
        tl.debug_barrier()


@triton.jit
def _suffix_bwd_kernel(K, G, PHI, EB, KT, DSUF, DKT, DEB, DHB, DGC, SB, T, H: tl.constexpr,
                       DK: tl.constexpr, C: tl.constexpr, R: tl.constexpr, NVT: tl.constexpr, BKP: tl.constexpr,
                       HAS_G: tl.constexpr, PREC_CHAIN: tl.constexpr):
    """The suffix chain of window w again (each chunk's Suf into SB), then its adjoint from the
    window's first chunk on: dK̃ = −dSuf' Hᵀ + DKT, dH −= K̃ᵀ dSuf', dγ_C += ⟨dSuf', Suf⟩,
    dĒ += Sufᵀ dK̃, dSuf = γ_C dSuf' + dK̃ Ēᵀ; DKT and DSUF summed over the object backward's
    `NVT` Dv tiles as they are read."""
    w = tl.program_id(0)
    n = tl.program_id(1)
    NW = tl.num_programs(0)
    NC = NW * R
    o = tl.arange(0, C)
    rk = tl.arange(0, BKP)
    msq = (rk[:, None] < DK) & (rk[None, :] < DK)
    sb = SB + (n * NC + w * R).to(tl.int64) * DK * DK
    suf = tl.where(rk[:, None] == rk[None, :], 1.0, 0.0)
    for jj in range(R):
        j = R - 1 - jj
        c = w * R + j
        t, valid, tc, tok = _tokens(PHI, n, c, T, H, C)
        Gc, gam, rho, gam_C = _gates(G, tok, tc, valid, H, C, HAS_G)
        tl.store(sb + j * DK * DK + rk[:, None] * DK + rk[None, :], suf, mask=msq)
        E = tl.load(EB + (n * NC + c).to(tl.int64) * DK * C + rk[:, None] * C + o[None, :], mask=rk[:, None] < DK,
                    other=0.0)
        kt = tl.dot(suf, E, input_precision=PREC_CHAIN)
        suf = gam_C * suf - tl.dot(kt, _rows(K, tok, tc, valid, rk, H, DK) * gam[:, None], input_precision=PREC_CHAIN)
    tl.debug_barrier()
    dsuf = tl.zeros([BKP, BKP], dtype=tl.float32)
    for vt in range(NVT):
        dsuf += tl.load(DSUF + ((n * NVT + vt) * NW + w).to(tl.int64) * DK * DK + rk[:, None] * DK + rk[None, :],
                        mask=msq, other=0.0)
    for j in range(R):
        c = w * R + j
        chunk = (n * NC + c).to(tl.int64)
        t, valid, tc, tok = _tokens(PHI, n, c, T, H, C)
        Gc, gam, rho, gam_C = _gates(G, tok, tc, valid, H, C, HAS_G)
        # each [Dk, Dk] tile loaded where it is used, so that no two of them wait in registers
        suf_j = tl.load(sb + j * DK * DK + rk[:, None] * DK + rk[None, :], mask=msq, other=0.0)
        tl.store(DGC + chunk, tl.load(DGC + chunk) + tl.sum(tl.sum(dsuf * suf_j, axis=1), axis=0))
        HT = _cols(K, tok, tc, valid, rk, H, DK) * gam[None, :]
        ktT = tl.load(KT + chunk * DK * C + rk[None, :] * C + o[:, None], mask=rk[None, :] < DK, other=0.0)
        dkeys = -tl.dot(dsuf, HT, input_precision=PREC_CHAIN)
        for vt in range(NVT):
            dkeys += tl.load(DKT + ((n * NVT + vt) * NC + c).to(tl.int64) * DK * C + rk[:, None] * C + o[None, :],
                             mask=rk[:, None] < DK, other=0.0)
        dhb = DHB + chunk * C * DK + o[:, None] * DK + rk[None, :]
        tl.store(dhb, tl.load(dhb, mask=rk[None, :] < DK, other=0.0) - tl.dot(ktT, dsuf, input_precision=PREC_CHAIN),
                 mask=rk[None, :] < DK)
        ET = tl.load(EB + chunk * DK * C + rk[None, :] * C + o[:, None], mask=rk[None, :] < DK, other=0.0)
        dsuf = gam_C * dsuf + tl.dot(dkeys, ET, input_precision=PREC_CHAIN)
        sufT = tl.load(sb + j * DK * DK + rk[None, :] * DK + rk[:, None], mask=msq, other=0.0)
        deb = DEB + chunk * DK * C + rk[:, None] * C + o[None, :]
        tl.store(deb, tl.load(deb, mask=rk[:, None] < DK, other=0.0) + tl.dot(sufT, dkeys, input_precision=PREC_CHAIN),
                 mask=rk[:, None] < DK)


@triton.jit
def _ut_bwd_kernel(Q, K, G, BETA, PHI, TI, DQH, DAT, DEB, DHB, DGC, DVK, SCR, DQ, DK_OUT, DV_OUT, DBETA, DG_OUT, T,
                   H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr, BKP: tl.constexpr,
                   BVP: tl.constexpr, HAS_G: tl.constexpr, PREC: tl.constexpr, PREC_CHAIN: tl.constexpr,
                   SPLIT: tl.constexpr, INTERP: tl.constexpr):
    """The chunk's UT backward (`objects_delta._chunk_backward`): dq, dk, dβ, dg from the
    gradients of Q̂, Ã, Ē, H, γ_C; dv = the key side's (band and tokens)."""
    c = tl.program_id(0)
    n = tl.program_id(1)
    NC = tl.num_programs(0)
    o = tl.arange(0, C)
    ck = tl.arange(0, BKP)
    cv = tl.arange(0, BVP)
    chunk = (n * NC + c).to(tl.int64)
    scr = SCR + chunk * C * C
    t, valid, tc, tok = _tokens(PHI, n, c, T, H, C)
    Gc, gam, rho, gam_C = _gates(G, tok, tc, valid, H, C, HAS_G)
    beta = tl.load(BETA + tok + tc * H, mask=valid, other=0.0).to(tl.float32)
    seg = tl.zeros([C], dtype=tl.int32)
    Gam = decay(Gc, seg, C, False, False)
    GamT = decay(Gc, seg, C, False, True)
    q = _rows_raw(Q, tok, tc, valid, ck, H, DK)
    k = _rows_raw(K, tok, tc, valid, ck, H, DK)
    kT = _cols_raw(K, tok, tc, valid, ck, H, DK)
    QK = mm16(q, kT, PREC, SPLIT, INTERP)
    KK = mm16(k, kT, PREC, SPLIT, INTERP)
    AqkT = mm16(k, _cols_raw(Q, tok, tc, valid, ck, H, DK), PREC, SPLIT, INTERP) * GamT
    Tinv = tl.load(TI + chunk * C * C + o[:, None] * C + o[None, :])
    TinvT = tl.load(TI + chunk * C * C + o[None, :] * C + o[:, None])
    M = Tinv * beta[None, :]
    MT = TinvT * beta[:, None]
    AtT = mm32(MT, AqkT, PREC_CHAIN, SPLIT, INTERP)
    dQh = tl.load(DQH + chunk * C * DK + o[:, None] * DK + ck[None, :], mask=ck[None, :] < DK, other=0.0)
    dE = tl.load(DEB + chunk * DK * C + ck[:, None] * C + o[None, :], mask=ck[:, None] < DK, other=0.0)
    dET = tl.load(DEB + chunk * DK * C + ck[None, :] * C + o[:, None], mask=ck[None, :] < DK, other=0.0)
    dAt = (tl.load(DAT + chunk * C * C + o[:, None] * C + o[None, :])
           - mmr(dQh, kT, PREC_CHAIN, SPLIT, INTERP) * gam[None, :])
    dH = tl.load(DHB + chunk * C * DK + o[:, None] * DK + ck[None, :], mask=ck[None, :] < DK, other=0.0)
    dH -= mm32(AtT, dQh, PREC_CHAIN, SPLIT, INTERP)
    dgam = tl.sum(dQh * q.to(tl.float32), axis=1) + tl.sum(dH * k.to(tl.float32), axis=1)
    dq = gam[:, None] * dQh
    dk = gam[:, None] * dH
    dKr = mm32(M, dET, PREC_CHAIN, SPLIT, INTERP)
    # q and k are read again where they are used last (from L1/L2): held from the top of the
    # kernel, their [C, Dk] float32 copies in shared memory put float32 inputs past Hopper's limit
    k = _rows_raw(K, tok, tc, valid, ck, H, DK)
    dM = rho[:, None] * mm(k, dE, PREC_CHAIN, SPLIT, INTERP) + mm32(AqkT, dAt, PREC_CHAIN, SPLIT, INTERP)
    dAqk = mm32(dAt, MT, PREC_CHAIN, SPLIT, INTERP)
    dk += rho[:, None] * dKr
    drho = tl.sum(dKr * k.to(tl.float32), axis=1)
    dbeta = tl.sum(dM * Tinv, axis=0)
    dTinv = dM * beta[None, :]
    dAkk = -mm32(mm32(TinvT, dTinv, PREC_CHAIN, SPLIT, INTERP), TinvT, PREC_CHAIN, SPLIT, INTERP)
    dAkk = tl.where(o[:, None] > o[None, :], dAkk, 0.0)
    dbeta += tl.sum(dAkk * KK * Gam, axis=1)
    dB = beta[:, None] * dAkk
    Zk = dB * Gam
    Zq = dAqk * Gam
    ZkT = _transposed(scr, Zk, C)
    ZqT = _transposed(scr, Zq, C)
    k = _rows_raw(K, tok, tc, valid, ck, H, DK)
    q = _rows_raw(Q, tok, tc, valid, ck, H, DK)
    dk += mmr(Zk + ZkT, k, PREC, SPLIT, INTERP) + mmr(ZqT, q, PREC, SPLIT, INTERP)
    dq += mmr(Zq, k, PREC, SPLIT, INTERP)
    mk = valid[:, None] & (ck[None, :] < DK)
    tl.store(DQ + tok * DK + tc[:, None] * (H * DK) + ck[None, :], dq.to(DQ.dtype.element_ty), mask=mk)
    tl.store(DK_OUT + tok * DK + tc[:, None] * (H * DK) + ck[None, :], dk.to(DK_OUT.dtype.element_ty), mask=mk)
    tl.store(DBETA + tok + tc * H, dbeta.to(DBETA.dtype.element_ty), mask=valid)
    dv = tl.load(DVK + chunk * C * DV + o[:, None] * DV + cv[None, :], mask=cv[None, :] < DV, other=0.0)
    tl.store(DV_OUT + tok * DV + tc[:, None] * (H * DV) + cv[None, :], dv.to(DV_OUT.dtype.element_ty),
             mask=valid[:, None] & (cv[None, :] < DV))
    if HAS_G:
        Zg = (dB * KK + dAqk * QK) * Gam
        dG = tl.sum(Zg, axis=1) - tl.sum(Zg, axis=0) + dgam * gam - drho * rho
        dG += tl.where(o == C - 1, tl.sum(drho * rho, axis=0) + tl.load(DGC + chunk) * gam_C, 0.0)
        dg = tl.sum(dG, axis=0) - tl.cumsum(dG, axis=0) + dG
        tl.store(DG_OUT + tok + tc * H, dg.to(DG_OUT.dtype.element_ty), mask=valid)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _meta(Dk: int, Dv: int, interpreted: bool) -> dict:
    """Tiles: the whole of `Dk` (`BKP`, ≤ 256) in the transport; `Dv` whole on the GPU (`BV`),
    by 64 in the object backward (`BVO`, which holds a `[Dk, Dk]` and several `[Dk, BVO]` float32
    tiles); the band pass's column blocks of `Dk` and `Dv` (`BKB`, `BVB`) by 64. Under the
    interpreter `BV`, `BKB` and `BVB` are 16 (so tests cross tile edges)."""
    BKP, BVP = pow2(Dk), pow2(Dv)
    BV = 16 if interpreted else BVP
    block = 16 if interpreted else 64
    return dict(BKP=BKP, BV=BV, BVO=min(BV, OBJECT_BWD_DV), BR=min(BKP, 32 if interpreted else 64), BK=min(BKP, 32),
                BKB=min(BKP, block), BVB=min(BVP, block))


UT_BWD_MIN_BKP = 64  # the UT backward's least Dk tile (see its launch)

# Launch options by kernel (Triton's defaults are 4 warps, 3 stages); the sm_90 compile test checks
# every kernel's shared memory against Hopper's limit at these options, `python -m perf.sm90_resources`
# reports their registers and spills, and `python -m perf.sweep_readout_gpu` times the candidates on
# the GPU against these. Eight warps where a program holds several [C, Dk], [Dk, Dk] or [Dk, BVO]
# float32 tiles at once and the sweep has not shown four faster; four for the readout and its
# chain, band and UT backward passes, where the sweep did (their extra warps mostly wait on the
# same tiles); one stage where the pipelined copies of [Dk, Dk] or [Dk, BVO] tiles would not fit.
LAUNCH = {
    "_object_kernel": dict(num_warps=8),
    "_suffix_kernel": dict(num_warps=8),
    "_readout_kernel": dict(num_warps=4),
    "_readout_bwd_chain_kernel": dict(num_warps=4),
    "_readout_bwd_band_kernel": dict(num_warps=4),
    "_object_bwd_kernel": dict(num_warps=8, num_stages=1),
    "_suffix_bwd_kernel": dict(num_warps=8, num_stages=1),
    "_ut_bwd_kernel": dict(num_warps=4),
}


class _Buffers:
    """The forward's plan and intermediate buffers (module doc), shared by both passes."""

    def __init__(self, q, k, v, g, beta, level_start, S0, C: int, R: int, step: Tensor | None, final: bool):
        B, T, H, Dk = q.shape
        Dv, L = v.shape[-1], level_start.shape[-1]
        if C < BC or C & (C - 1):
            raise ValueError(f"chunk_size must be a power of two >= {BC} for the Triton kernels, got {C!r}")
        dev, f32 = q.device, torch.float32
        plan = window_plan(level_start, step, C, R)
        self.NW = NW = plan.first.shape[1] - 1
        self.NC = NC = NW * R
        self.N = N = B * H
        self.plan = plan
        self.phi = (torch.zeros(B, dtype=torch.int32, device=dev) if step is None else
                    torch.remainder(step.to(torch.int64), R * C).to(torch.int32).contiguous())
        self.first = plan.first.clamp(-2**31, 2**31 - 1).to(torch.int32).contiguous()
        self.last = plan.last.clamp(-2**31, 2**31 - 1).to(torch.int32).contiguous()
        self.cm = running_min(level_start.to(torch.int32)).contiguous()
        self.prec, self.prec_chain = precisions(q.dtype)
        # the readout passes' split bfloat16 products (module doc), emulated under the interpreter
        self.split = split_products(q)
        self.meta = meta = _meta(Dk, Dv, self.split["INTERP"])
        flags = dict(C=C, HAS_G=g is not None)
        self.TI = torch.empty(N, NC, C, C, dtype=f32, device=dev)
        self.EB = torch.empty(N, NC, Dk, C, dtype=f32, device=dev)
        _ut_kernel[(NC, N)](k, beta, g, self.phi, self.TI, self.EB, T, H, Dk, BC=BC, BK=meta["BK"], PREC=self.prec,
                            PREC_SOLVE=self.prec_chain, **flags)
        self.KT = torch.empty(N, NC, Dk, C, dtype=f32, device=dev)
        self.SUF = torch.empty(N, NW, Dk, Dk, dtype=f32, device=dev)
        _suffix_kernel[(NW, N, triton.cdiv(Dk, meta["BR"]))](k, g, self.phi, self.EB, self.KT, self.SUF, T, H, Dk,
                                                             R=R, BR=meta["BR"], BKP=meta["BKP"],
                                                             PREC_CHAIN=self.prec_chain, **flags,
                                                             **LAUNCH["_suffix_kernel"])
        self.OB = torch.empty(N, NW, L, Dk, Dv, dtype=q.dtype, device=dev)
        # the float32 masters a merge sums, as copy + residual: 16 bits of mantissa for bfloat16
        # (the split products' precision, module doc), 22 for float16; a float32 copy is its master
        self.residual = q.element_size() < 4
        self.RB = torch.empty(N, 2, L, Dk, Dv, dtype=q.dtype, device=dev) if self.residual else q.new_empty(1)
        # the final state, float32, written by the last window (none for a call that reads none,
        # nor for the backward's recomputation)
        self.SF = torch.empty(N, L, Dk, Dv, dtype=f32, device=dev) if final else None
        _initial_objects_kernel[(N, L, triton.cdiv(Dv, meta["BVO"]))](
            self.first, self.last, S0.to(f32).reshape(N, L, Dk, Dv).contiguous(), self.RB, self.OB, NW, L, Dk, Dv,
            BKP=meta["BKP"], BV=meta["BVO"], RESIDUAL=self.residual)
        _object_kernel[(N, triton.cdiv(Dv, meta["BV"]))](v, self.phi, self.KT, self.SUF, self.first, self.last,
                                                          self.RB, self.OB, self.SF, T, NW, H, L, Dk, Dv, C=C, R=R,
                                                          BKP=meta["BKP"], BV=meta["BV"], RESIDUAL=self.residual,
                                                          FINAL=final, PREC=self.prec, PREC_CHAIN=self.prec_chain,
                                                          **LAUNCH["_object_kernel"])


def _check(name: str, q: Tensor, v: Tensor, lam: Tensor, beta: Tensor | None) -> None:
    """The launchers' contract, checked before any kernel runs."""
    if beta is None:
        raise ValueError(f"{name}: beta is required (without β the readout takes dla.ops.readout.objects_triton)")
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"{name}: q must be float32, bfloat16 or float16, got {q.dtype} (float64 runs on the CPU path)")
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    if max(Dk, Dv) > 128:  # whole-Dk tiles beside [Dk, Dk] ones: larger heads exceed Hopper's shared memory
        raise ValueError(f"{name}: head sizes Dk = {Dk}, Dv = {Dv} above 128 are not supported by the Triton "
                         "kernels with β (the CPU path takes any size)")
    if lam.shape[-1] >= 2**15:  # the band's level spans are int16
        raise ValueError(f"{name}: K = {lam.shape[-1]} levels; the Triton kernels with β take fewer than 2**15")
    if B * T * H * max(Dk, Dv, lam.shape[-1]) >= 2**31:
        raise ValueError(f"{name}: B·T·H·max(Dk, Dv, K) must stay below 2**31 (the kernels' int32 offsets)")


def objects_delta_forward_triton(q, k, v, lam, g, beta, level_start, S0, scale: float, chunk_size: int,
                                 step: Tensor | None, window: int, final: bool = True) -> tuple[Tensor, Tensor | None]:
    """`(o [B,T,H,Dv] in q's dtype, S [B,H,L,Dk,Dv] float32)`, as `objects_delta_forward`;
    `chunk_size` a power of two ≥ 16; `step` None for a fresh call (no spare window); `S` None,
    never written, unless `final`."""
    B, T, H, Dk = q.shape
    Dv, L = v.shape[-1], lam.shape[-1]
    _check("objects_delta_forward_triton", q, v, lam, beta)
    C, R = int(chunk_size), int(window)
    sd = state_dtype(q.dtype)
    if T == 0:
        return v.new_empty(B, 0, H, Dv), S0.to(sd).clone() if final else None
    q, k, v, lam, beta = (x.contiguous() for x in (q, k, v, lam, beta))
    g = None if g is None else g.contiguous()
    buf = _Buffers(q, k, v, g, beta, level_start, S0, C, R, step, final=final)
    o = torch.empty_like(v)
    _readout_kernel[(buf.NC, buf.N, triton.cdiv(Dv, buf.meta["BV"]))](
        q, k, v, lam, buf.cm, g, beta, buf.phi, buf.TI, buf.EB, buf.first, buf.last, buf.OB, o, T, float(scale), H,
        L, Dk, Dv, C=C, R=R, BKP=buf.meta["BKP"], BV=buf.meta["BV"], HAS_G=g is not None, PREC=buf.prec,
        PREC_CHAIN=buf.prec_chain, **buf.split, **LAUNCH["_readout_kernel"])
    return o, buf.SF.reshape(B, H, L, Dk, Dv).to(sd) if final else None


def objects_delta_backward_triton(do, dS, q, k, v, lam, g, beta, level_start, S0, scale: float, chunk_size: int,
                                  step: Tensor | None, window: int, dS0_needed: bool = True):
    """`(dq, dk, dv, dlam, dg, dbeta, dS0)` as `objects_delta_backward` (`dS0` float32); `dS` None
    for a final state without a gradient; `dS0` None unless `dS0_needed` (its sum over the first
    window's slots skipped)."""
    B, T, H, Dk = q.shape
    Dv, L = v.shape[-1], lam.shape[-1]
    _check("objects_delta_backward_triton", q, v, lam, beta)
    C, R = int(chunk_size), int(window)
    dev, f32 = q.device, torch.float32
    zeros_g = torch.zeros(B, T, H, dtype=f32, device=dev)
    if T == 0:
        dS0 = None
        if dS0_needed:  # the final state is the initial one
            dS0 = torch.zeros(B, H, L, Dk, Dv, dtype=f32, device=dev) if dS is None else dS.to(f32, copy=True)
        return (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), torch.zeros_like(lam),
                zeros_g if g is None else torch.zeros_like(g), torch.zeros_like(beta), dS0)
    q, k, v, lam, beta = (x.contiguous() for x in (q, k, v, lam, beta))
    g = None if g is None else g.contiguous()
    # the kernels take dO in the inputs' dtype (as the gradient of an output in that dtype arrives)
    do = torch.zeros_like(v) if do is None else do.to(v.dtype).contiguous()
    buf = _Buffers(q, k, v, g, beta, level_start, S0, C, R, step, final=False)
    del buf.RB  # the backward reads every window's objects from their copies (OB)
    N, NC, NW, meta = buf.N, buf.NC, buf.NW, buf.meta
    BKP, BVP = meta["BKP"], pow2(Dv)
    flags = dict(C=C, HAS_G=g is not None)
    LP = pow2(L, 1)
    # one [C, Dk] query per visit of the band (query chunk i, block of BAND_KEYS key chunks before
    # it): about (R − 1)/(2·BAND_KEYS) times the chunk-indexed buffers beside it, and much of the
    # band pass's traffic. Kept in bfloat16 for 16-bit inputs: the band reads it only for its
    # steps' own terms (σ, dĒ, dγ_C), never into the dx chain, so its rounding does not compound
    # (bfloat16, not float16: the transported query's range is the transitions', not bounded by
    # the inputs'); XS, a window's scratch, holds it stepped back through a block
    G = BAND_KEYS
    visits = max(1, band_visits(R, G))  # one slot at R = 1, where the band has none
    xdtype = f32 if q.dtype == f32 else torch.bfloat16
    # Each buffer is made just before its first kernel and dropped after its last, so that the
    # caching allocator hands its memory to the later ones: the backward's peak is one phase's
    # buffers (the readout passes', the object passes', the suffix's) beside the plan's, not all
    XP = torch.empty(N, NW, visits, C, Dk, dtype=xdtype, device=dev)
    XS = torch.empty(N, NW, G, C, Dk, dtype=xdtype, device=dev) if G > 1 else XP.new_empty(1)
    SCR = torch.empty(N, NC, C, C, dtype=f32, device=dev)
    XF = torch.empty(N, NC, C, Dk, dtype=f32, device=dev)
    DQH = torch.empty(N, NC, C, Dk, dtype=f32, device=dev)
    DAT = torch.empty(N, NC, C, C, dtype=f32, device=dev)
    DL = torch.empty(N, NC, C, LP, dtype=f32, device=dev)
    DEB = torch.empty(N, NC, Dk, C, dtype=f32, device=dev)
    DHB = torch.empty(N, NC, C, Dk, dtype=f32, device=dev)
    DGC = torch.empty(N, NC, dtype=f32, device=dev)
    DVK = torch.empty(N, NC, C, Dv, dtype=f32, device=dev)
    dlam = torch.empty_like(lam)
    # the band's level spans `_level_span` (r0, r1) of each query chunk at each earlier key chunk of
    # its window, from the chain pass
    SPAN = torch.empty(N, NC, R, 2, C, dtype=torch.int16, device=dev)
    common = dict(H=H, L=L, LP=LP, DK=Dk, DV=Dv, R=R, BKP=BKP, BVP=BVP, PREC=buf.prec, PREC_CHAIN=buf.prec_chain,
                  **flags, **buf.split)
    _readout_bwd_chain_kernel[(NC, N)](q, k, v, lam, buf.cm, g, beta, buf.phi, buf.TI, buf.EB, buf.first, buf.last,
                                       buf.OB, do, XP, XF, DQH, DAT, DL, DVK, dlam, SPAN, T, float(scale), KEYS=G,
                                       VISITS=visits, RP=pow2(R), **common,
                                       **LAUNCH["_readout_bwd_chain_kernel"])
    _readout_bwd_band_kernel[(NW, N)](k, v, lam, buf.cm, g, buf.phi, buf.EB, do, XP, XS, SCR, DQH, DL, DEB, DHB, DGC,
                                      DVK, dlam, SPAN, T, float(scale), BKB=meta["BKB"], BVB=meta["BVB"], KEYS=G,
                                      VISITS=visits, **common,
                                      **LAUNCH["_readout_bwd_band_kernel"])
    del XP, XS, DL, SPAN  # the band's own
    NVT = triton.cdiv(Dv, meta["BV"])
    DR = torch.empty(N, NW + 1, L, Dk, Dv, dtype=f32, device=dev)
    _object_grad_kernel[(NW, N, L * NVT)](do, lam, buf.cm, buf.phi, buf.first, buf.last, XF, DR, T, float(scale), H, L,
                                          Dk, Dv, C=C, R=R, BKP=BKP, BV=meta["BV"], PREC=buf.prec)
    del XF
    if dS is None:
        DR[:, NW].zero_()
    else:
        DR[:, NW] = dS.reshape(N, L, Dk, Dv)
    NVO = triton.cdiv(Dv, meta["BVO"])
    DKT = torch.empty(N, NVO, NC, Dk, C, dtype=f32, device=dev)  # per Dv tile, each chunk written once
    DSUF = torch.empty(N, NVO, NW, Dk, Dk, dtype=f32, device=dev)
    _object_bwd_kernel[(N, NVO)](v, buf.phi, buf.KT, buf.SUF, buf.first, buf.last, buf.OB, DR, DKT, DVK, DSUF,
                                 T, NW, H, L, Dk, Dv, C=C, R=R, RP=pow2(R), BKP=BKP, BV=meta["BVO"], PREC=buf.prec,
                                 PREC_CHAIN=buf.prec_chain, **LAUNCH["_object_bwd_kernel"])
    dS0 = None
    if dS0_needed:
        slot = -1 - torch.arange(L, device=dev)
        inside = (buf.plan.first[:, 0, :, None] <= slot) & (slot <= buf.plan.last[:, 0, :, None])  # P_0 ∋ slot j
        dS0 = torch.einsum("nrj,nrkv->njkv", inside.to(f32), DR[:, 0]).reshape(B, H, L, Dk, Dv)
    del DR, buf.OB
    SB = torch.empty(N, NC, Dk, Dk, dtype=f32, device=dev)
    _suffix_bwd_kernel[(NW, N)](k, g, buf.phi, buf.EB, buf.KT, DSUF, DKT, DEB, DHB, DGC, SB, T, H, Dk, R=R, NVT=NVO,
                                BKP=BKP, PREC_CHAIN=buf.prec_chain, **flags, **LAUNCH["_suffix_bwd_kernel"])
    del SB, DSUF, DKT, buf.KT, buf.SUF
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dbeta = torch.empty_like(beta)
    dg = torch.empty_like(g) if g is not None else zeros_g
    # Dk padded to at least 64 here: at a [C, 32] tile with bf16 operands Triton 3.6's sm_90 code for
    # this kernel reads shared memory out of bounds (compute-sanitizer: "Invalid __shared__ read of
    # size 512 bytes", an illegal memory access at Dk = 32, none at 64 or in float32)
    _ut_bwd_kernel[(NC, N)](q, k, g, beta, buf.phi, buf.TI, DQH, DAT, DEB, DHB, DGC, DVK, SCR, dq, dk, dv, dbeta,
                            dg if g is not None else None, T, H, Dk, Dv, BKP=max(BKP, UT_BWD_MIN_BKP), BVP=BVP,
                            PREC=buf.prec, PREC_CHAIN=buf.prec_chain, **flags, **buf.split,
                            **LAUNCH["_ut_bwd_kernel"])
    return dq, dk, dv, dlam, dg, dbeta, dS0
