r"""CUDA kernels of the persistent-object readout (SPEC §3.1), transitions without `β`: the Triton
twin of `objects.py` (whose module doc derives the algebra), for the heads the stage's rule
gives to objects; the dense heads of the same call take `masked_triton.py`.

What it computes
================
Per row `n = b·H + h`, with the plan of `plan.py` (chunks `[cs_c, cs_{c+1})` aligned to `step + t`,
the partition `P_c` each chunk reads, objects `S̄_E` anchored at their last member `e`, parents
and tokens of every new element), `G` the float64 cumsum of `g` split into float32 `hi + lo`
(`G_p = 0` for `p < 0`), and per query the weight of an object
`W[t,E] = scale · λ_t[ℓ_t(a_E)] · exp(G_t − G_e)`:

    build        S̄_E = Σ_{parents j} exp(G_e − G_{e_j}) S̄_j + Σ_{s ∈ [lo, hi)} exp(G_e − G_s) k_s v_sᵀ
    forward      o_t = Σ_{s ∈ chunk, s ≤ t} scale·λ_t[ℓ_t(s)] (q_t·k_s) exp(G_t − G_s) v_s
                       + Σ_{E∈P_c} W[t,E] S̄_Eᵀ q_t
    final        S_r = exp(G_{T−1} − G_e) S̄_E,  E the final slot of rank r
    backward     U = dO S̄_Eᵀ:  dq += W U,  dW = U·q → dλ, dG_t += dW·W
                 D_E += Σ_t W q dOᵀ (+ the final dS)
                 in reverse creation order D_j += exp(G_e − G_{e_j}) D_E;
                 dk_s += exp(G_e − G_s) D_E v_s,  dv_s += exp(G_e − G_s) D_Eᵀ k_s,  dG_s −= k_s·(that dk_s)

Kernels and buffers
===================
* `_build_kernel` — one program per (row, `[TK, TV]` state tile), sequential over the chunks
  (as fla's state pass): it builds each chunk's new objects from their parents and the previous
  chunk's tokens (one masked dot over the chunk), in reverse rank order so that `Λ_c` — the newest
  element, held in registers (`h`, float32) — is built last and the one parent most objects
  take comes from registers. It writes every object a chunk reads as a copy in the input dtype
  (`COPY [N, P, Dk, Dv]`, by id) and, for the objects a later build reads from memory, the
  master's bf16 residual (`LO [N, M−L, Dk, Dv]`, by master index: master = copy + residual keeps
  16 mantissa bits; float32 copies are their own masters); the initial slots' masters are `S0`.
  With `FINAL` it also writes the final state `S` (forward, or a backward given no `S`).
* `_chunk_fwd_kernel` — one program per (chunk, row): the chunk's `C×C` band (its level ranges
  applied row by row, as in `masked_triton.py`) and one dot per object of `P_c` with the operand
  `X = W ⊗ q` built on the fly.
* `_bwd_objects_kernel` — one program per (object with a master, row, state tile): `D_E` over the
  chunks that read it (an object is read by a contiguous range of chunks), plus the final `dS`;
  into `DBUF [N, M−L, Dk, Dv]` float32 (`dS0` for the initial slots); and `dg`'s crossing terms.
* `_pushdown_kernel` — one program per (row, state tile), chunks in reverse: each new object's
  `D` (its `DBUF` entry, or for a `Λ_c` without master its one chunk's `Σ W q dOᵀ`, formed here)
  plus what its child pushed, written as a copy (`DTOT`, input dtype) for the token gradients;
  pushed to its parents (`Λ_{c−1}` in registers, the others read-modify-write in `DBUF`/`dS0`).
* `_chunk_bwd_kernel` — per (chunk, row) two programs: rows (`dq`, `dλ`, `dG` of the queries:
  band and `U`), columns (`dk`, `dv`, `dG` of the keys: band and the tokens' `D`).

dg. `dg_u = Σ_{t≥u} dG_t`, but not summed over the whole suffix: each `dG_t` carries the rounding
of the 16-bit objects it read, and over thousands of tokens those roundings add up while `dg`
itself (a sum of terms that largely cancel) stays small. As fla does with `⟨h, dh⟩` at each chunk's
end, the sum stops at the chunk: for `u` in chunk `c`, `dg_u = Σ_{u≤t<e} dG_t + R_{c+1}`, where
`R_c = Σ_{t ≥ start(c)} dG_t` is the derivative of the loss by a shift of every `G_t`, `t ≥
start(c)` — which scales exactly the memory that crosses that boundary, the objects chunk `c`
reads (`P_c`), in their own frames: `R_c = Σ_{E∈P_c} ⟨E, D_E^{≥c}⟩`, `D_E^{≥c} = D_E − D_E^{<c}`
(`D_E` whole, with its merges' and the final state's share; `D_E^{<c}` its reads by earlier
chunks). `_bwd_objects_kernel` adds `−⟨E, D_E^{<c}⟩` per chunk, `_pushdown_kernel` `⟨E, D_E⟩`
over E's chunks; one float32 product per object and chunk, no sum along T (`chunk_local_dg`, in
float64). Dense rows sum the whole suffix. Every program of a dense head (`MODE[n] = 0`) returns
at once. State tiles are 64×64 on the card (ptxas holds their two or three float32 tiles in
registers, at most a few bytes spilled; the build reads k `Dv/TV` and v `Dk/TK` times); the chunk
kernels hold whole `[C, Dk]` and `[C, Dv]` tiles (C = 64). Every launch goes through
`torch.library.wrap_triton`, with fixed grids: `dla::readout_without_beta` (`dla/compile/ops.py`)
is a `triton_op` whose kernels `torch.compile` sees; it builds the plan (a few hundred small torch
ops) once, in the forward, and hands its tables to the backward as one int32 tensor (`pack_plan`).
Dots on the input dtype (`input_precision` ieee for float32, tf32 with float32 operands
otherwise); accumulation, `h`, `D` in float32.
Offsets inside a row are int32 (`T·H·max(Dk, Dv, L) < 2³¹`), the pools' row offsets int64.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from dla.ops.cumsum_triton import cumsum
from dla.ops.readout import cost
from dla.ops.readout.masked_triton import (
    NEG, _check, _level, _level_step, _pick, _Prepared, dense_backward, dense_forward, reverse_cumsum,
)
from dla.ops.readout.plan import build_plan, chunk_count

__all__ = ["mixed_forward", "mixed_backward", "row_modes"]


# --------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------


@triton.jit
def _G(GH, GL, p, valid, H, HAS_G: tl.constexpr):
    """(hi, lo) of G_p for a scalar or vector position p (0 for p < 0, where not `valid`, and
    without g; GH, GL at the row)."""
    if HAS_G:
        ok = (p >= 0) & valid
        at = tl.maximum(p, 0) * H
        return tl.load(GH + at, mask=ok, other=0.0), tl.load(GL + at, mask=ok, other=0.0)
    else:
        zero = (p * 0).to(tl.float32)
        return zero, zero


@triton.jit
def _decay(ah, al, bh, bl):
    """exp(G_a − G_b) from hi/lo pairs."""
    return tl.exp((ah - bh) + (al - bl))


@triton.jit
def _tile_offsets(BK: tl.constexpr, BV: tl.constexpr, dk0, dv0, DK: tl.constexpr, DV: tl.constexpr):
    """Offsets and mask of the [BK, BV] tile at (dk0, dv0) of a [Dk, Dv] state."""
    dk_ = dk0 + tl.arange(0, BK)
    dv_ = dv0 + tl.arange(0, BV)
    return dk_[:, None] * DV + dv_[None, :], (dk_[:, None] < DK) & (dv_[None, :] < DV)


@triton.jit
def _tile(NV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """(dk0, dv0) of this program's tile: program_id(0) = dk tile · NV + dv tile."""
    pid = tl.program_id(0)
    return (pid // NV) * BK, (pid % NV) * BV


@triton.jit
def _master(COPY, LO, S0, MASTER, i, tile, mtile, L: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
            HAS_LO: tl.constexpr):
    """The float32 master of object i: S0 for the initial slots, else copy (+ bf16 residual)."""
    if i < L:
        out = tl.load(S0 + i * DK * DV + tile, mask=mtile, other=0.0)
    else:
        out = tl.load(COPY + i.to(tl.int64) * DK * DV + tile, mask=mtile, other=0.0).to(tl.float32)
        if HAS_LO:
            m = tl.load(MASTER + i)
            out += tl.load(LO + (m - L).to(tl.int64) * DK * DV + tile, mask=mtile, other=0.0).to(tl.float32)
    return out


@triton.jit
def _weights(c, lam, a, eh, el, gh, gl, mt, scale, L: tl.constexpr, BL: tl.constexpr, HAS_G: tl.constexpr):
    """(W[t] = scale·λ_t[ℓ_t(a)]·exp(G_t − G_e), ℓ_t(a), exp(G_t − G_e)) for the rows of a chunk."""
    lev = _level(c, a)
    live = mt & (lev < L)
    decay = tl.full(lev.shape, 1.0, tl.float32)
    if HAS_G:
        decay = _decay(gh, gl, eh, el)
    w = tl.where(live, _pick(lam, lev, BL) * decay * scale, 0.0)
    return w, lev, tl.where(live, decay, 0.0)


@triton.jit
def _band(c_rows, t, mt, rt, CM, LAM, cs, dlam_of, L: tl.constexpr, BL: tl.constexpr, WITH_DL: tl.constexpr):
    """Λ[t, s] = λ_t[ℓ_t(s)] over the chunk's keys s ≤ t (keys = the chunk's tokens t, from cs):
    the levels from that of cs down to ℓ_t(t) = 0, each on its exact range (as
    `masked_triton._level_step`). WITH_DL also returns dλ_t[l] = Σ_{s at level l} dlam_of[t, s]."""
    top = _level(c_rows, cs)
    most = tl.max(tl.where(mt, top + 1, 0))
    lamm = tl.zeros([t.shape[0], t.shape[0]], dtype=tl.float32)
    dl = tl.zeros([t.shape[0], BL], dtype=tl.float32)
    cols = tl.arange(0, BL)
    for i in range(0, most):
        inr, lr = _level_step(CM, LAM, rt, mt, top - i, t, L, False)
        lamm = tl.where(inr, lr, lamm)
        if WITH_DL:
            part = tl.sum(tl.where(inr, dlam_of, 0.0), axis=1)
            dl += tl.where(cols[None, :] == (top - i)[:, None], part[:, None], 0.0)
    causal = (t[None, :] <= t[:, None]) & mt[None, :] & mt[:, None]
    return tl.where(causal, lamm, 0.0), dl


@triton.jit
def _pair_decay(gh, gl, t, mt, scale, HAS_G: tl.constexpr):
    """scale·exp(G_t − G_s) on the chunk's causal pairs (0 elsewhere)."""
    causal = (t[None, :] <= t[:, None]) & mt[None, :] & mt[:, None]
    if HAS_G:
        return tl.where(causal, _decay(gh[:, None], gl[:, None], gh[None, :], gl[None, :]) * scale, 0.0)
    else:
        return tl.where(causal, scale, 0.0)


# --------------------------------------------------------------------------------------------
# Build (sequential over chunks)
# --------------------------------------------------------------------------------------------


@triton.jit
def _build_kernel(K, V, GH, GL, S0, COPY, LO, S, MODE, STARTS, READ, NEW_IDS, NEW_COUNT, LAM_ID, OBJ_CHUNK,
                  OBJ_LAST, PAR_LO, PAR_HI, TOK_LO, TOK_HI, MASTER, MERGED, FINAL_RANK, READ_LO,
                  T, H, NC, P, M,
                  L: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr,
                  BK: tl.constexpr, BV: tl.constexpr, HAS_G: tl.constexpr, HAS_LO: tl.constexpr,
                  FINAL: tl.constexpr, ALL_MASTERS: tl.constexpr, PREC: tl.constexpr, NV: tl.constexpr):
    """The objects of one row and [BK, BV] tile, chunk by chunk (module doc). ALL_MASTERS: write
    every master (forward), else only those a later build reads (`MERGED`)."""
    n = tl.program_id(1)
    if tl.load(MODE + n) == 0:
        return
    R = NC + 1
    row0 = (n // H).to(tl.int64) * T * H + n % H
    K += row0 * DK
    V += row0 * DV
    GH += row0
    GL += row0
    S0 += n.to(tl.int64) * L * DK * DV
    COPY += n.to(tl.int64) * P * DK * DV
    LO += n.to(tl.int64) * (M - L) * DK * DV
    S += n.to(tl.int64) * L * DK * DV
    STARTS += n * R
    READ += n * R * L
    NEW_IDS += n * R * L
    NEW_COUNT += n * R
    LAM_ID += n * R
    OBJ_CHUNK += n * P
    OBJ_LAST += n * P
    PAR_LO += n * P
    PAR_HI += n * P
    TOK_LO += n * P
    TOK_HI += n * P
    MASTER += n * P
    MERGED += n * P
    FINAL_RANK += n * P
    READ_LO += n * P
    dk0, dv0 = _tile(NV, BK, BV)
    tile, mtile = _tile_offsets(BK, BV, dk0, dv0, DK, DV)
    dk_ = dk0 + tl.arange(0, BK)
    dv_ = dv0 + tl.arange(0, BV)
    j = tl.arange(0, C)
    # the initial slots that chunks read, as copies
    for r in range(0, L):
        if tl.load(READ_LO + r) < NC:
            s0r = tl.load(S0 + r * DK * DV + tile, mask=mtile, other=0.0)
            tl.store(COPY + r * DK * DV + tile, s0r.to(COPY.dtype.element_ty), mask=mtile)
    h = tl.zeros([BK, BV], dtype=tl.float32)
    lam_prev = -1
    last_h, last_l = _G(GH, GL, T - 1, True, H, HAS_G)
    for c in range(0, NC + FINAL):
        cs_prev = tl.load(STARTS + tl.maximum(c - 1, 0))
        cs = tl.load(STARTS + c)
        s = cs_prev + j
        ms = (s < cs) & (c > 0)
        rs = s * H
        k = tl.load(K + rs[:, None] * DK + dk_[None, :], mask=ms[:, None] & (dk_[None, :] < DK), other=0.0)
        v = tl.load(V + rs[:, None] * DV + dv_[None, :], mask=ms[:, None] & (dv_[None, :] < DV), other=0.0)
        sh, sl = _G(GH, GL, s, ms, H, HAS_G)
        lam_c = tl.load(LAM_ID + c)
        built = False
        count = tl.load(NEW_COUNT + c)
        for i in range(count - 1, -1, -1):  # reverse rank order: Λ_c last
            x = tl.load(NEW_IDS + c * L + i)
            e = tl.load(OBJ_LAST + x)
            eh, el = _G(GH, GL, e, True, H, HAS_G)
            acc = tl.zeros([BK, BV], dtype=tl.float32)
            for r in range(tl.load(PAR_LO + x), tl.load(PAR_HI + x) + 1):
                pid = r
                if c > 0:
                    pid = tl.load(READ + (c - 1) * L + r)
                if pid >= 0:
                    ph, pl = _G(GH, GL, tl.load(OBJ_LAST + pid), True, H, HAS_G)
                    f = 1.0
                    if HAS_G:
                        f = _decay(eh, el, ph, pl)
                    if pid == lam_prev:
                        acc += f * h
                    else:
                        acc += f * _master(COPY, LO, S0, MASTER, pid, tile, mtile, L, DK, DV, HAS_LO)
            lo = tl.load(TOK_LO + x)
            hi = tl.load(TOK_HI + x)
            if lo < hi:
                w = tl.where(ms & (s >= lo) & (s < hi), 1.0, 0.0)
                if HAS_G:
                    w = tl.where(w != 0.0, _decay(eh, el, sh, sl), 0.0)
                acc += tl.dot(tl.trans(k), (v.to(tl.float32) * w[:, None]).to(v.dtype), input_precision=PREC)
            if c < NC:
                copy = acc.to(COPY.dtype.element_ty)
                tl.store(COPY + x.to(tl.int64) * DK * DV + tile, copy, mask=mtile)
                m = tl.load(MASTER + x)
                if HAS_LO and m >= 0:
                    if ALL_MASTERS or tl.load(MERGED + x):
                        tl.store(LO + (m - L).to(tl.int64) * DK * DV + tile,
                                 (acc - copy.to(tl.float32)).to(LO.dtype.element_ty), mask=mtile)
            else:
                f = 1.0
                if HAS_G:
                    f = _decay(last_h, last_l, eh, el)
                tl.store(S + tl.load(FINAL_RANK + x) * DK * DV + tile, f * acc, mask=mtile)
            if x == lam_c:
                h = acc
                built = True
        if c == 0:
            if (lam_c >= 0) & (not built):
                h = tl.load(S0 + lam_c * DK * DV + tile, mask=mtile, other=0.0)
        lam_prev = lam_c
    if FINAL:  # final slots that older objects hold
        for r in range(0, L):
            x = tl.load(READ + NC * L + r)
            zero = tl.zeros([BK, BV], dtype=tl.float32)
            if x < 0:
                tl.store(S + r * DK * DV + tile, zero, mask=mtile)
            elif tl.load(OBJ_CHUNK + x) != NC:
                eh, el = _G(GH, GL, tl.load(OBJ_LAST + x), True, H, HAS_G)
                f = 1.0
                if HAS_G:
                    f = _decay(last_h, last_l, eh, el)
                tl.store(S + r * DK * DV + tile, f * _master(COPY, LO, S0, MASTER, x, tile, mtile, L, DK, DV, HAS_LO),
                         mask=mtile)


# --------------------------------------------------------------------------------------------
# Forward readout (per chunk)
# --------------------------------------------------------------------------------------------


@triton.jit
def _chunk_fwd_kernel(Q, K, V, LAM, GH, GL, CM, COPY, MODE, STARTS, READ, FIRST, LAST, O,
                      T, H, NC, P, scale,
                      L: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr,
                      BK: tl.constexpr, BV: tl.constexpr, BL: tl.constexpr, HAS_G: tl.constexpr,
                      PREC: tl.constexpr):
    """o of chunk `program_id(0)` of row `program_id(1)`: band + Σ_E X_E S̄_E."""
    scale = tl.cast(scale, tl.float32)  # Inductor (torch 2.11) passed the float as fp64
    c = tl.program_id(0)
    n = tl.program_id(1)
    if tl.load(MODE + n) == 0:
        return
    R = NC + 1
    cs = tl.load(STARTS + n * R + c)
    ce = tl.load(STARTS + n * R + c + 1)
    if cs >= ce:
        return
    row0 = (n // H).to(tl.int64) * T * H + n % H
    Q += row0 * DK
    K += row0 * DK
    V += row0 * DV
    O += row0 * DV
    LAM += row0 * L
    CM += row0 * L
    GH += row0
    GL += row0
    COPY += n.to(tl.int64) * P * DK * DV
    READ += (n * R + c) * L
    FIRST += (n * R + c) * L
    LAST += (n * R + c) * L
    t = cs + tl.arange(0, C)
    mt = t < ce
    rt = t * H
    dk_ = tl.arange(0, BK)
    dv_ = tl.arange(0, BV)
    cols = tl.arange(0, BL)
    mq = mt[:, None] & (dk_[None, :] < DK)
    mv = mt[:, None] & (dv_[None, :] < DV)
    q = tl.load(Q + rt[:, None] * DK + dk_[None, :], mask=mq, other=0.0)
    k = tl.load(K + rt[:, None] * DK + dk_[None, :], mask=mq, other=0.0)
    v = tl.load(V + rt[:, None] * DV + dv_[None, :], mask=mv, other=0.0)
    ml = mt[:, None] & (cols[None, :] < L)
    crow = tl.load(CM + rt[:, None] * L + cols[None, :], mask=ml, other=NEG)
    lam = tl.load(LAM + rt[:, None] * L + cols[None, :], mask=ml, other=0.0).to(tl.float32)
    gh, gl = _G(GH, GL, t, mt, H, HAS_G)
    lamm, no_dl = _band(crow, t, mt, rt, CM, LAM, cs, 0.0, L, BL, False)
    a = tl.dot(q, tl.trans(k), input_precision=PREC) * _pair_decay(gh, gl, t, mt, scale, HAS_G) * lamm
    acc = tl.dot(a.to(v.dtype), v, input_precision=PREC)
    tile, mtile = _tile_offsets(BK, BV, 0, 0, DK, DV)
    for r in range(0, L):
        x = tl.load(READ + r)
        if x >= 0:
            eh, el = _G(GH, GL, tl.load(LAST + r), True, H, HAS_G)
            w, lev, decay = _weights(crow, lam, tl.load(FIRST + r), eh, el, gh, gl, mt, scale, L, BL, HAS_G)
            obj = tl.load(COPY + x.to(tl.int64) * DK * DV + tile, mask=mtile, other=0.0)
            acc += tl.dot((q.to(tl.float32) * w[:, None]).to(obj.dtype), obj, input_precision=PREC)
    tl.store(O + rt[:, None] * DV + dv_[None, :], acc.to(O.dtype.element_ty), mask=mv)


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------


@triton.jit
def _bwd_objects_kernel(Q, DO, LAM, GH, GL, CM, DS, DS0, DBUF, COPY, S0, RB, MODE, STARTS, OBJ_FIRST, OBJ_LAST,
                        MASTER, READ_LO, READ_HI, FINAL_RANK, T, H, NC, P, M, scale,
                        L: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr,
                        BK: tl.constexpr, BV: tl.constexpr, BL: tl.constexpr, HAS_G: tl.constexpr,
                        PREC: tl.constexpr, NV: tl.constexpr):
    """D_E = Σ_{chunks reading E} Σ_t W[t,E] q_t dO_tᵀ (+ exp(G_{T−1} − G_e) dS_rank) for object
    `program_id(0)` with a master and [BK, BV] tile `program_id(2)` (the initial slots into dS0,
    the others into DBUF); and into `RB[0, n, c]` the tile's `−⟨E, D_E^{<c}⟩` for each chunk `c`
    that reads E, `D_E^{<c}` its reads by the chunks before `c` (module doc, "dg")."""
    scale = tl.cast(scale, tl.float32)  # Inductor (torch 2.11) passed the float as fp64
    x = tl.program_id(0)
    n = tl.program_id(1)
    if tl.load(MODE + n) == 0:
        return
    m = tl.load(MASTER + n * P + x)
    if m < 0:
        return
    R = NC + 1
    row0 = (n // H).to(tl.int64) * T * H + n % H
    Q += row0 * DK
    DO += row0 * DV
    LAM += row0 * L
    CM += row0 * L
    GH += row0
    GL += row0
    STARTS += n * R
    dk0 = (tl.program_id(2) // NV) * BK
    dv0 = (tl.program_id(2) % NV) * BV
    tile, mtile = _tile_offsets(BK, BV, dk0, dv0, DK, DV)
    dk_ = dk0 + tl.arange(0, BK)
    dv_ = dv0 + tl.arange(0, BV)
    cols = tl.arange(0, BL)
    a = tl.load(OBJ_FIRST + n * P + x)
    e = tl.load(OBJ_LAST + n * P + x)
    eh, el = _G(GH, GL, e, True, H, HAS_G)
    acc = tl.zeros([BK, BV], dtype=tl.float32)
    if x < L:
        obj = tl.load(S0 + (n.to(tl.int64) * L + x) * DK * DV + tile, mask=mtile, other=0.0)
    else:
        obj = tl.load(COPY + (n.to(tl.int64) * P + x) * DK * DV + tile, mask=mtile, other=0.0).to(tl.float32)
    lo = tl.load(READ_LO + n * P + x)
    for c in range(lo, tl.load(READ_HI + n * P + x) + 1):
        if c > lo:
            tl.atomic_add(RB + n * (R + 1) + c, -tl.sum(obj * acc))
        cs = tl.load(STARTS + c)
        t = cs + tl.arange(0, C)
        mt = t < tl.load(STARTS + c + 1)
        rt = t * H
        ml = mt[:, None] & (cols[None, :] < L)
        crow = tl.load(CM + rt[:, None] * L + cols[None, :], mask=ml, other=NEG)
        lam = tl.load(LAM + rt[:, None] * L + cols[None, :], mask=ml, other=0.0).to(tl.float32)
        gh, gl = _G(GH, GL, t, mt, H, HAS_G)
        w, lev, decay = _weights(crow, lam, a, eh, el, gh, gl, mt, scale, L, BL, HAS_G)
        q = tl.load(Q + rt[:, None] * DK + dk_[None, :], mask=mt[:, None] & (dk_[None, :] < DK), other=0.0)
        do = tl.load(DO + rt[:, None] * DV + dv_[None, :], mask=mt[:, None] & (dv_[None, :] < DV), other=0.0)
        acc += tl.dot(tl.trans((q.to(tl.float32) * w[:, None]).to(do.dtype)), do, input_precision=PREC)
    rank = tl.load(FINAL_RANK + n * P + x)
    if rank >= 0:
        f = 1.0
        if HAS_G:
            th, tl_ = _G(GH, GL, T - 1, True, H, HAS_G)
            f = _decay(th, tl_, eh, el)
        acc += f * tl.load(DS + (n.to(tl.int64) * L + rank) * DK * DV + tile, mask=mtile, other=0.0)
    if x < L:
        tl.store(DS0 + (n.to(tl.int64) * L + x) * DK * DV + tile, acc, mask=mtile)
    else:
        tl.store(DBUF + (n.to(tl.int64) * (M - L) + m - L) * DK * DV + tile, acc, mask=mtile)


@triton.jit
def _pushdown_kernel(Q, DO, LAM, GH, GL, CM, DS, DS0, DBUF, DTOT, COPY, S0, RB, MODE, STARTS, READ, NEW_IDS,
                     NEW_COUNT, LAM_ID, OBJ_FIRST, OBJ_LAST, PAR_LO, PAR_HI, TOK_LO, TOK_HI, MASTER, FINAL_RANK,
                     READ_LO, READ_HI, T, H, NC, P, M, scale,
                     L: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr,
                     BK: tl.constexpr, BV: tl.constexpr, BL: tl.constexpr, HAS_G: tl.constexpr,
                     PREC: tl.constexpr, NV: tl.constexpr):
    """Down the merge tree for one row and [BK, BV] tile, newest chunk first (module doc); with
    each object's whole `D_E` known, the tile's `⟨E, D_E⟩` over the chunks that read E into
    `RB[1, n]` as differences (module doc, "dg")."""
    scale = tl.cast(scale, tl.float32)  # Inductor (torch 2.11) passed the float as fp64
    n = tl.program_id(1)
    if tl.load(MODE + n) == 0:
        return
    R = NC + 1
    row0 = (n // H).to(tl.int64) * T * H + n % H
    Q += row0 * DK
    DO += row0 * DV
    LAM += row0 * L
    CM += row0 * L
    GH += row0
    GL += row0
    DS += n.to(tl.int64) * L * DK * DV
    DS0 += n.to(tl.int64) * L * DK * DV
    DBUF += n.to(tl.int64) * (M - L) * DK * DV
    DTOT += n.to(tl.int64) * P * DK * DV
    COPY += n.to(tl.int64) * P * DK * DV
    S0 += n.to(tl.int64) * L * DK * DV
    RB += n * (R + 1)
    STARTS += n * R
    READ += n * R * L
    NEW_IDS += n * R * L
    NEW_COUNT += n * R
    LAM_ID += n * R
    OBJ_FIRST += n * P
    OBJ_LAST += n * P
    PAR_LO += n * P
    PAR_HI += n * P
    TOK_LO += n * P
    TOK_HI += n * P
    MASTER += n * P
    FINAL_RANK += n * P
    READ_LO += n * P
    READ_HI += n * P
    dk0, dv0 = _tile(NV, BK, BV)
    tile, mtile = _tile_offsets(BK, BV, dk0, dv0, DK, DV)
    dk_ = dk0 + tl.arange(0, BK)
    dv_ = dv0 + tl.arange(0, BV)
    cols = tl.arange(0, BL)
    last_h, last_l = _G(GH, GL, T - 1, True, H, HAS_G)
    dh = tl.zeros([BK, BV], dtype=tl.float32)  # what chunk c + 1 pushed into Λ_c
    for cc in range(0, NC + 1):
        c = NC - cc
        lam_c = tl.load(LAM_ID + c)
        lam_prev = -1
        if c > 0:
            lam_prev = tl.load(LAM_ID + c - 1)
        dh_next = tl.zeros([BK, BV], dtype=tl.float32)
        done = False
        count = tl.load(NEW_COUNT + c)
        for i in range(0, count):
            x = tl.load(NEW_IDS + c * L + i)
            e = tl.load(OBJ_LAST + x)
            eh, el = _G(GH, GL, e, True, H, HAS_G)
            m = tl.load(MASTER + x)
            d = tl.zeros([BK, BV], dtype=tl.float32)
            if m >= 0:
                d = tl.load(DBUF + (m - L).to(tl.int64) * DK * DV + tile, mask=mtile, other=0.0)
            elif c < NC:  # a Λ_c without master: read by chunk c alone
                cs = tl.load(STARTS + c)
                t = cs + tl.arange(0, C)
                mt = t < tl.load(STARTS + c + 1)
                rt = t * H
                ml = mt[:, None] & (cols[None, :] < L)
                crow = tl.load(CM + rt[:, None] * L + cols[None, :], mask=ml, other=NEG)
                lam = tl.load(LAM + rt[:, None] * L + cols[None, :], mask=ml, other=0.0).to(tl.float32)
                gh, gl = _G(GH, GL, t, mt, H, HAS_G)
                w, lev, decay = _weights(crow, lam, tl.load(OBJ_FIRST + x), eh, el, gh, gl, mt, scale, L, BL, HAS_G)
                q = tl.load(Q + rt[:, None] * DK + dk_[None, :], mask=mt[:, None] & (dk_[None, :] < DK), other=0.0)
                do = tl.load(DO + rt[:, None] * DV + dv_[None, :], mask=mt[:, None] & (dv_[None, :] < DV),
                             other=0.0)
                d = tl.dot(tl.trans((q.to(tl.float32) * w[:, None]).to(do.dtype)), do, input_precision=PREC)
            else:  # a final slot built at the end: its D is the final state's gradient
                f = 1.0
                if HAS_G:
                    f = _decay(last_h, last_l, eh, el)
                d = f * tl.load(DS + tl.load(FINAL_RANK + x) * DK * DV + tile, mask=mtile, other=0.0)
            if x == lam_c:
                d += dh
                done = True
            if tl.load(TOK_LO + x) < tl.load(TOK_HI + x):
                tl.store(DTOT + x.to(tl.int64) * DK * DV + tile, d.to(DTOT.dtype.element_ty), mask=mtile)
            lo = tl.load(READ_LO + x)
            hi = tl.load(READ_HI + x)
            if lo <= hi:
                obj = tl.load(COPY + x.to(tl.int64) * DK * DV + tile, mask=mtile, other=0.0).to(tl.float32)
                inner = tl.sum(obj * d)
                tl.atomic_add(RB + lo, inner)
                tl.atomic_add(RB + hi + 1, -inner)
            for r in range(tl.load(PAR_LO + x), tl.load(PAR_HI + x) + 1):
                pid = r
                if c > 0:
                    pid = tl.load(READ + (c - 1) * L + r)
                if pid >= 0:
                    ph, pl = _G(GH, GL, tl.load(OBJ_LAST + pid), True, H, HAS_G)
                    f = 1.0
                    if HAS_G:
                        f = _decay(eh, el, ph, pl)
                    if pid == lam_prev:
                        dh_next += f * d
                    elif pid < L:
                        at = DS0 + pid * DK * DV + tile
                        tl.store(at, tl.load(at, mask=mtile, other=0.0) + f * d, mask=mtile)
                    else:
                        at = DBUF + (tl.load(MASTER + pid) - L).to(tl.int64) * DK * DV + tile
                        tl.store(at, tl.load(at, mask=mtile, other=0.0) + f * d, mask=mtile)
        if (lam_c >= 0) & (not done):  # Λ_c is older than chunk c: an initial slot, or Λ_{c−1}
            if c == 0:
                at = DS0 + lam_c * DK * DV + tile
                tl.store(at, tl.load(at, mask=mtile, other=0.0) + dh, mask=mtile)
            else:
                dh_next += dh
        dh = dh_next
    for slot in range(0, L):  # the initial slots, whose dS0 is whole now
        lo = tl.load(READ_LO + slot)
        hi = tl.load(READ_HI + slot)
        if lo <= hi:
            inner = tl.sum(tl.load(S0 + slot * DK * DV + tile, mask=mtile, other=0.0)
                           * tl.load(DS0 + slot * DK * DV + tile, mask=mtile, other=0.0))
            tl.atomic_add(RB + lo, inner)
            tl.atomic_add(RB + hi + 1, -inner)


@triton.jit
def _chunk_bwd_kernel(Q, K, V, DO, LAM, GH, GL, CM, COPY, DTOT, MODE, STARTS, READ, FIRST, LAST, NEW_IDS,
                      NEW_COUNT, OBJ_LAST, TOK_LO, TOK_HI, DQ, DK_, DV_, DLAM, DGR, DGC,
                      T, H, NC, P, scale,
                      L: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr,
                      BK: tl.constexpr, BV: tl.constexpr, BL: tl.constexpr, HAS_G: tl.constexpr,
                      PREC: tl.constexpr):
    """Chunk `program_id(0)` of row `program_id(1)`; program_id(2) = 0: dq, dλ, dG of its queries
    (band and U = dO S̄ᵀ of every object read), = 1: dk, dv, dG of its keys (band and the
    tokens' share of the D of the objects built from them)."""
    scale = tl.cast(scale, tl.float32)  # Inductor (torch 2.11) passed the float as fp64
    c = tl.program_id(0)
    n = tl.program_id(1)
    if tl.load(MODE + n) == 0:
        return
    R = NC + 1
    cs = tl.load(STARTS + n * R + c)
    ce = tl.load(STARTS + n * R + c + 1)
    if cs >= ce:
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
    COPY += n.to(tl.int64) * P * DK * DV
    DTOT += n.to(tl.int64) * P * DK * DV
    t = cs + tl.arange(0, C)
    mt = t < ce
    rt = t * H
    dk_ = tl.arange(0, BK)
    dv_ = tl.arange(0, BV)
    cols = tl.arange(0, BL)
    mq = mt[:, None] & (dk_[None, :] < DK)
    mv = mt[:, None] & (dv_[None, :] < DV)
    q = tl.load(Q + rt[:, None] * DK + dk_[None, :], mask=mq, other=0.0)
    k = tl.load(K + rt[:, None] * DK + dk_[None, :], mask=mq, other=0.0)
    v = tl.load(V + rt[:, None] * DV + dv_[None, :], mask=mv, other=0.0)
    do = tl.load(DO + rt[:, None] * DV + dv_[None, :], mask=mv, other=0.0)
    ml = mt[:, None] & (cols[None, :] < L)
    crow = tl.load(CM + rt[:, None] * L + cols[None, :], mask=ml, other=NEG)
    lam = tl.load(LAM + rt[:, None] * L + cols[None, :], mask=ml, other=0.0).to(tl.float32)
    gh, gl = _G(GH, GL, t, mt, H, HAS_G)
    pair = _pair_decay(gh, gl, t, mt, scale, HAS_G)
    tile, mtile = _tile_offsets(BK, BV, 0, 0, DK, DV)
    if tl.program_id(2) == 0:
        qkg = tl.dot(q, tl.trans(k), input_precision=PREC) * pair
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        lamm, dl = _band(crow, t, mt, rt, CM, LAM, cs, dp * qkg, L, BL, True)
        dg = tl.sum(dp * qkg * lamm, axis=1)
        dq = tl.dot((dp * lamm * pair).to(k.dtype), k, input_precision=PREC)
        READ += (n * R + c) * L
        FIRST += (n * R + c) * L
        LAST += (n * R + c) * L
        qf = q.to(tl.float32)
        for r in range(0, L):
            x = tl.load(READ + r)
            if x >= 0:
                eh, el = _G(GH, GL, tl.load(LAST + r), True, H, HAS_G)
                w, lev, decay = _weights(crow, lam, tl.load(FIRST + r), eh, el, gh, gl, mt, scale, L, BL, HAS_G)
                obj = tl.load(COPY + x.to(tl.int64) * DK * DV + tile, mask=mtile, other=0.0)
                u = tl.dot(do, tl.trans(obj), input_precision=PREC)  # [C, BK]
                dw = tl.sum(u * qf, axis=1)
                dq += w[:, None] * u
                dl += tl.where(cols[None, :] == lev[:, None], (dw * decay * scale)[:, None], 0.0)
                dg += dw * w
        tl.store(DQ + row0 * DK + rt[:, None] * DK + dk_[None, :], dq.to(DQ.dtype.element_ty), mask=mq)
        tl.store(DLAM + row0 * L + rt[:, None] * L + cols[None, :], dl.to(DLAM.dtype.element_ty), mask=ml)
        tl.store(DGR + row0 + rt, dg, mask=mt)
    else:
        qkg = tl.dot(q, tl.trans(k), input_precision=PREC) * pair
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        lamm, no_dl = _band(crow, t, mt, rt, CM, LAM, cs, 0.0, L, BL, False)
        a = qkg * lamm  # the band's P[t, s]
        dg = -tl.sum(dp * a, axis=0)
        dkk = tl.dot(tl.trans(dp * lamm * pair).to(q.dtype), q, input_precision=PREC)
        dvv = tl.dot(tl.trans(a).to(do.dtype), do, input_precision=PREC)
        kf = k.to(tl.float32)
        count = tl.load(NEW_COUNT + n * R + c + 1)
        for i in range(0, count):  # the objects built from this chunk's tokens
            x = tl.load(NEW_IDS + (n * R + c + 1) * L + i)
            lo = tl.load(TOK_LO + n * P + x)
            hi = tl.load(TOK_HI + n * P + x)
            if lo < hi:
                w = tl.where(mt & (t >= lo) & (t < hi), 1.0, 0.0)
                if HAS_G:
                    eh, el = _G(GH, GL, tl.load(OBJ_LAST + n * P + x), True, H, HAS_G)
                    w = tl.where(w != 0.0, _decay(eh, el, gh, gl), 0.0)
                dt = tl.load(DTOT + x.to(tl.int64) * DK * DV + tile, mask=mtile, other=0.0)
                dk_tok = w[:, None] * tl.dot(v, tl.trans(dt), input_precision=PREC)
                dkk += dk_tok
                dvv += w[:, None] * tl.dot(k, dt, input_precision=PREC)
                dg -= tl.sum(kf * dk_tok, axis=1)
        tl.store(DK_ + row0 * DK + rt[:, None] * DK + dk_[None, :], dkk.to(DK_.dtype.element_ty), mask=mq)
        tl.store(DV_ + row0 * DV + rt[:, None] * DV + dv_[None, :], dvv.to(DV_.dtype.element_ty), mask=mv)
        tl.store(DGC + row0 + rt, dg, mask=mt)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def config(interpreted: bool) -> dict:
    """The object path's chunk `C`, the `[TK, TV]` state tile of the build, the object-major dS and
    the pushdown (programs hold two or three float32 tiles: 64×64 keeps them in registers on
    sm_90), and warps (fixed by the interpreter or the card; the chunk kernels hold whole
    `[C, Dk]`, `[C, Dv]` tiles)."""
    if interpreted:
        return dict(C=16, TK=16, TV=16, num_warps=4)
    return dict(C=64, TK=64, TV=64, num_warps=8)


def _tiles(x, interpreted: bool) -> dict:
    """The state-tile meta-parameters and the number of tiles."""
    cfg = config(interpreted)
    tk, tv = min(cfg["TK"], x.BK), min(cfg["TV"], x.BV)
    nv = triton.cdiv(x.dv, tv)
    return dict(BK=tk, BV=tv, NV=nv), triton.cdiv(x.dk, tk) * nv


# The plan's tables the kernels read, by their shape: `[N, R]`, `[N, R, L]`, `[N, P]` (R = NC + 1)
ROW_TABLES = ("starts", "new_count", "lam_id")
ELEMENT_TABLES = ("read", "first", "last", "new_ids")
OBJECT_TABLES = ("obj_chunk", "obj_first", "obj_last", "par_lo", "par_hi", "tok_lo", "tok_hi", "master", "merged",
                 "final_rank", "read_lo", "read_hi")


def plan_tensors(plan) -> dict:
    """The plan's tables as the contiguous int32 tensors the kernels read."""
    return {name: getattr(plan, name).to(torch.int32).contiguous()
            for name in ROW_TABLES + ELEMENT_TABLES + OBJECT_TABLES}


def pack_plan(tables: dict | None, mode: Tensor) -> Tensor:
    """The kernels' plan as one flat int32 tensor — the row modes `[N]`, then the tables of
    `plan_tensors` (none when the call is dense from its shapes) — which the forward hands to
    the backward, so the backward does not build the plan again (`unpack_plan`)."""
    parts = [mode.to(torch.int32).reshape(-1)]
    if tables is not None:
        parts += [tables[name].reshape(-1) for name in ROW_TABLES + ELEMENT_TABLES + OBJECT_TABLES]
    return torch.cat(parts)


def unpack_plan(flat: Tensor, N: int, NC: int, L: int, P: int) -> tuple[dict | None, Tensor]:
    """`(tables or None, mode [N] int32)` from `pack_plan`'s tensor, as views of it."""
    mode, at = flat[:N], N
    if flat.shape[0] == N:
        return None, mode
    R, tables = NC + 1, {}
    for names, shape in ((ROW_TABLES, (N, R)), (ELEMENT_TABLES, (N, R, L)), (OBJECT_TABLES, (N, P))):
        size = math.prod(shape)
        for name in names:
            tables[name], at = flat[at:at + size].view(shape), at + size
    return tables, mode


def _meta(x, interpreted: bool) -> dict:
    """The constexprs every object kernel takes (and warps, stages); the chunk kernels add the
    whole head dims `BK, BV`, the others their state tile (`_tiles`)."""
    cfg = config(interpreted)
    return dict(L=x.L, DK=x.dk, DV=x.dv, C=cfg["C"], HAS_G=x.has_g, PREC=x.prec,
                num_warps=cfg["num_warps"], num_stages=1)


def objects_forward_triton(x, pt: dict, M: int, mode: Tensor, scale: float, o: Tensor, S: Tensor) -> None:
    """The object rows (`mode = 1`) of `o [B,T,H,Dv]` and `S [B,H,L,Dk,Dv]` (float32); `x` is
    `masked_triton._Prepared` (contiguous inputs, G hi/lo, the level map's running minimum), `pt`
    the plan's tables (`plan_tensors`), `M` its master capacity."""
    meta = _meta(x, x.interpreted)
    tiles, nt = _tiles(x, x.interpreted)
    N, P = x.N, pt["master"].shape[1]
    NC = pt["read"].shape[1] - 1
    dev = x.q.device
    copies = torch.empty(N, P, x.dk, x.dv, dtype=x.q.dtype, device=dev)
    has_lo = x.q.dtype != torch.float32
    lo = torch.empty(N, max(M - x.L, 1) if has_lo else 1, x.dk, x.dv, dtype=torch.bfloat16, device=dev)
    wrap_triton(_build_kernel)[(nt, N)](
        x.k, x.v, x.gh, x.gl, x.S0, copies, lo, S, mode, pt["starts"], pt["read"], pt["new_ids"], pt["new_count"],
        pt["lam_id"], pt["obj_chunk"], pt["obj_last"], pt["par_lo"], pt["par_hi"], pt["tok_lo"], pt["tok_hi"],
        pt["master"], pt["merged"], pt["final_rank"], pt["read_lo"], x.T, x.H, NC, P, M, HAS_LO=has_lo,
        FINAL=True, ALL_MASTERS=True, **tiles, **meta)
    wrap_triton(_chunk_fwd_kernel)[(NC, N)](
        x.q, x.k, x.v, x.lam, x.gh, x.gl, x.cm, copies, mode, pt["starts"], pt["read"], pt["first"], pt["last"], o,
        x.T, x.H, NC, P, float(scale), BK=x.BK, BV=x.BV, BL=x.BL, **meta)


def objects_backward_triton(x, pt: dict, M: int, mode: Tensor, scale: float, do: Tensor, dS: Tensor,
                            S: Tensor | None, grads: dict) -> tuple[Tensor, Tensor]:
    """The object rows of `grads` (dq, dk, dv, dlam in the inputs' dtypes, dS0 float32, each
    `[B,T,H,·]` / `[B,H,L,Dk,Dv]`); returns `dG [B,T,H]` float32 (the gradient of `G = cumsum(g)`)
    and the crossing terms `R [N, NC+2]` float64 (module doc, "dg"). `do` contiguous in q's
    dtype, `dS` float32; `S` the forward's final state (None: rebuilt here); `pt`, `M` as for
    `objects_forward_triton`."""
    meta = _meta(x, x.interpreted)
    tiles, nt = _tiles(x, x.interpreted)
    N, P = x.N, pt["master"].shape[1]
    NC = pt["read"].shape[1] - 1
    dev = x.q.device
    copies = torch.empty(N, P, x.dk, x.dv, dtype=x.q.dtype, device=dev)
    has_lo = x.q.dtype != torch.float32
    lo = torch.empty(N, max(M - x.L, 1) if has_lo else 1, x.dk, x.dv, dtype=torch.bfloat16, device=dev)
    final = S is None
    S_built = torch.empty(x.B, x.H, x.L, x.dk, x.dv, dtype=torch.float32, device=dev) if final else x.S0
    wrap_triton(_build_kernel)[(nt, N)](
        x.k, x.v, x.gh, x.gl, x.S0, copies, lo, S_built, mode, pt["starts"], pt["read"], pt["new_ids"],
        pt["new_count"], pt["lam_id"], pt["obj_chunk"], pt["obj_last"], pt["par_lo"], pt["par_hi"], pt["tok_lo"],
        pt["tok_hi"], pt["master"], pt["merged"], pt["final_rank"], pt["read_lo"], x.T, x.H, NC, P, M,
        HAS_LO=has_lo, FINAL=final, ALL_MASTERS=final, **tiles, **meta)
    del lo
    dbuf = torch.empty(N, max(M - x.L, 1), x.dk, x.dv, dtype=torch.float32, device=dev)
    dtot = torch.empty(N, P, x.dk, x.dv, dtype=x.q.dtype, device=dev)
    # before: −⟨E, D_E^{<c}⟩ by chunk; whole: ⟨E, D_E⟩ over E's chunks, as differences. Two
    # tensors, not two views of one: Inductor (torch.compile of `dla::readout_without_beta`)
    # lost the zeros of the second view once both kernels' writes were functionalized, and the
    # pushdown then accumulated into uninitialised memory (NaN dg on the card)
    before = torch.zeros(N, NC + 2, dtype=torch.float32, device=dev)
    whole = torch.zeros(N, NC + 2, dtype=torch.float32, device=dev)
    wrap_triton(_bwd_objects_kernel)[(P, N, nt)](
        x.q, do, x.lam, x.gh, x.gl, x.cm, dS, grads["dS0"], dbuf, copies, x.S0, before, mode, pt["starts"],
        pt["obj_first"], pt["obj_last"], pt["master"], pt["read_lo"], pt["read_hi"], pt["final_rank"], x.T, x.H, NC,
        P, M, float(scale), BL=x.BL, **tiles, **meta)
    wrap_triton(_pushdown_kernel)[(nt, N)](
        x.q, do, x.lam, x.gh, x.gl, x.cm, dS, grads["dS0"], dbuf, dtot, copies, x.S0, whole, mode,
        pt["starts"], pt["read"], pt["new_ids"], pt["new_count"], pt["lam_id"], pt["obj_first"], pt["obj_last"],
        pt["par_lo"], pt["par_hi"], pt["tok_lo"], pt["tok_hi"], pt["master"], pt["final_rank"], pt["read_lo"],
        pt["read_hi"], x.T, x.H, NC, P, M, float(scale), BL=x.BL, **tiles, **meta)
    del dbuf
    dgr = torch.empty(x.B, x.T, x.H, dtype=torch.float32, device=dev)
    dgc = torch.empty(x.B, x.T, x.H, dtype=torch.float32, device=dev)
    wrap_triton(_chunk_bwd_kernel)[(NC, N, 2)](
        x.q, x.k, x.v, do, x.lam, x.gh, x.gl, x.cm, copies, dtot, mode, pt["starts"], pt["read"], pt["first"],
        pt["last"], pt["new_ids"], pt["new_count"], pt["obj_last"], pt["tok_lo"], pt["tok_hi"], grads["dq"],
        grads["dk"], grads["dv"], grads["dlam"], dgr, dgc, x.T, x.H, NC, P, float(scale), BK=x.BK, BV=x.BV, BL=x.BL,
        **meta)
    dG = dgr + dgc
    if final:  # the final state's gradient reaches G_{T−1}: ⟨dS, S⟩
        S = S_built
    dG[:, -1] += (dS * S).sum((-3, -2, -1))
    return dG, before.double() + cumsum(whole.double(), -1)


# --------------------------------------------------------------------------------------------
# Object and dense rows in one call
# --------------------------------------------------------------------------------------------


def row_modes(x: _Prepared, level_start: Tensor, step: Tensor | None, objects: Tensor | None = None):
    """`(tables or None, mode [N] int32)`: the plan's tables (`plan_tensors`) and 1 where a row
    takes the object kernels, by the stage's rule (`cost.takes_objects`: the plan fits the pool,
    evaluated on the device) or as `objects [N]` asks (rows whose plan overflows the pool stay
    dense). A call of at most one chunk is dense from its shapes alone (no tables)."""
    C = config(x.interpreted)["C"]
    if cost.decode_sized(x.T, C) and objects is None:
        return None, x.all_dense()
    P, M = _pool(x)
    plan = build_plan(level_start, step, C, P, M)
    fits = cost.takes_objects(plan)
    return plan_tensors(plan), (fits if objects is None else objects & fits).to(torch.int32)


def _pool(x: _Prepared) -> tuple[int, int]:
    """`(P, M)`: the object pool's ids and masters for these shapes (`cost.pool_capacity`)."""
    return cost.pool_capacity(x.T, x.L, x.dk, x.dv, x.q.element_size(), config(x.interpreted)["C"])


def mixed_forward(q, k, v, lam, g, level_start, S0, scale: float, step=None, *, input_precision: str | None = None,
                  objects: Tensor | None = None, keep_plan: bool = False):
    """The CUDA readout without β: `(o [B,T,H,Dv] in q's dtype, S [B,H,K,Dk,Dv] float32)`, each
    row by the object kernels or the dense ones (`row_modes`); with `keep_plan` also the plan
    and the row modes as one int32 tensor (`pack_plan`) for `mixed_backward`."""
    _check("mixed_forward", q, v, lam, None, input_precision)
    x = _Prepared(q, k, v, lam, g, level_start, S0, input_precision)
    if x.T == 0:
        o, S = q.new_empty(x.B, 0, x.H, x.dv), x.S0.clone()
        return (o, S, pack_plan(None, x.all_dense())) if keep_plan else (o, S)
    tables, mode = row_modes(x, level_start, step, objects)
    o, S = x.empty(x.B, x.T, x.H, x.dv, dtype=q.dtype), x.empty(x.B, x.H, x.L, x.dk, x.dv)
    # the dense kernels' float32 buffers are freed before the object pool is allocated: a call's
    # peak holds one path's temporaries, not both
    dense_forward(x, mode, scale, o, S)
    if tables is not None:
        objects_forward_triton(x, tables, _pool(x)[1], mode, scale, o, S)
    return (o, S, pack_plan(tables, mode)) if keep_plan else (o, S)


def mixed_backward(do, dS, q, k, v, lam, g, level_start, S0, scale: float, step=None, S=None, *,
                   input_precision: str | None = None, objects: Tensor | None = None, plan: Tensor | None = None):
    """`(dq, dk, dv, dlam, dg, dS0)` of `mixed_forward` (dg float32 zeros without g); `do`/`dS`
    may be None (zero); `S` the forward's final state, rebuilt when None; `plan` the forward's
    kept plan (`keep_plan`), built again when None (and `objects` then as for the forward)."""
    _check("mixed_backward", q, v, lam, None, input_precision)
    x = _Prepared(q, k, v, lam, g, level_start, S0, input_precision)
    B, T, H, L, dk, dv = x.B, x.T, x.H, x.L, x.dk, x.dv
    dev, f32 = q.device, torch.float32
    if T == 0:
        dS0 = torch.zeros(S0.shape, dtype=f32, device=dev) if dS is None else dS.to(f32).clone()
        dg = torch.zeros(B, 0, H, dtype=g.dtype if g is not None else f32, device=dev)
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), lam.new_empty(lam.shape), dg, dS0
    do = torch.zeros(B, T, H, dv, dtype=q.dtype, device=dev) if do is None else do.to(q.dtype).contiguous()
    dS = torch.zeros(B, H, L, dk, dv, dtype=f32, device=dev) if dS is None else dS.to(f32).contiguous()
    P, M = _pool(x)
    if plan is None:
        tables, mode = row_modes(x, level_start, step, objects)
    else:
        tables, mode = unpack_plan(plan, x.N, chunk_count(T, config(x.interpreted)["C"]), L, P)
    grads = x.gradients(q, k, v, lam)
    dG = dense_backward(x, mode, scale, do, dS, grads)  # its buffers freed before the object pool exists
    if tables is not None:
        dG_objects, crossing = objects_backward_triton(x, tables, M, mode, scale, do, dS, S, grads)
        dG = torch.where(mode.view(B, 1, H) != 0, dG_objects.double(), dG)
    if g is None:
        dg = torch.zeros(B, T, H, dtype=f32, device=dev)
    elif tables is None:
        dg = reverse_cumsum(dG, g.dtype)
    else:
        dg = chunk_local_dg(reverse_cumsum(dG, torch.float64), tables["starts"], crossing, mode).to(g.dtype)
    return grads["dq"], grads["dk"], grads["dv"], grads["dlam"], dg, grads["dS0"]


def chunk_local_dg(suffix: Tensor, starts: Tensor, crossing: Tensor, mode: Tensor) -> Tensor:
    """`dg [B,T,H]` float64 of the object rows from chunk-local sums (module doc, "dg"):
    `dg_u = Σ_{u≤t<e} dG_t + R_{c+1}` for `u` in chunk `c` ending at `e`, from the whole suffix
    sums `suffix [B,T,H]` (float64: their difference is exact to float64), the chunk starts
    `starts [N, NC+1]` and `R = crossing [N, NC+2]` float64 (`R = 0` at `e = T`); the dense rows
    keep `suffix`."""
    B, T, H = suffix.shape
    N = B * H
    rows = suffix.transpose(1, 2).reshape(N, T)
    starts = starts.long()
    u = torch.arange(T, device=suffix.device).expand(N, T).contiguous()
    chunk = torch.searchsorted(starts[:, 1:-1].contiguous(), u, right=True)  # [N, T]: the chunk of u
    end = torch.gather(starts, 1, chunk + 1)
    after = torch.gather(torch.cat([rows, rows.new_zeros(N, 1)], 1), 1, end)
    # R at T is zero (no G_t after it); trailing chunks of the plan start there and may still carry
    # the final state's share, which belongs to the boundaries before T
    crossing_next = torch.where(end < T, torch.gather(crossing, 1, chunk + 1), 0.0)
    local = rows - after + crossing_next
    rows = torch.where(mode.view(N, 1) != 0, local, rows)
    return rows.reshape(B, H, T).transpose(1, 2).contiguous()
